//! A device region (BAR or config space) reached through the device descriptor: mmapped where the
//! kernel allows it, read and written with pread/pwrite on the descriptor everywhere else.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use super::abi::{self, cap_u32, cap_u64};
use crate::error::Result;
use crate::transport::Bar;

/// What the kernel says about one region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RegionInfo {
    /// The region index (BAR number, or the config/ROM/VGA index).
    pub index: u32,
    /// Length in bytes.
    pub size: u64,
    /// Where the region starts in the device descriptor's offset space.
    pub offset: u64,
    /// Readable and writable through the descriptor.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Parts that may be mmapped, as (offset, length) inside the region.
    pub mmap: Vec<(u64, u64)>,
}

impl RegionInfo {
    /// Asks the kernel about region `index` of the device `fd`.
    pub fn query(fd: &File, index: u32) -> Result<Self> {
        let init = vfio_region_info { index, ..Default::default() };
        let (info, reply) = abi::query_with_caps(
            fd,
            abi::VFIO_DEVICE_GET_REGION_INFO(),
            init,
            &format!("VFIO_DEVICE_GET_REGION_INFO {index}"),
        )?;
        let mut mmap = Vec::new();
        if info.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
            let mut sparse = None;
            if info.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 {
                let fixed = std::mem::size_of::<vfio_region_info>();
                for cap in abi::capabilities(&reply, fixed, info.cap_offset) {
                    if u32::from(cap.id) != VFIO_REGION_INFO_CAP_SPARSE_MMAP {
                        continue;
                    }
                    // Header (8), nr_areas (4), reserved (4), then {offset, size} pairs.
                    let n = cap_u32(cap.bytes, 8).unwrap_or(0) as usize;
                    let mut areas = Vec::new();
                    for i in 0..n {
                        match (cap_u64(cap.bytes, 16, 2 * i), cap_u64(cap.bytes, 16, 2 * i + 1)) {
                            (Some(o), Some(l)) => areas.push((o, l)),
                            _ => break,
                        }
                    }
                    sparse = Some(areas);
                }
            }
            mmap = sparse.unwrap_or_else(|| vec![(0, info.size)]);
            // An area outside the region is the kernel's mistake; never map it.
            mmap.retain(|&(o, l)| l > 0 && o.checked_add(l).is_some_and(|end| end <= info.size));
        }
        Ok(Self {
            index,
            size: info.size,
            offset: info.offset,
            read: info.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            write: info.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap,
        })
    }
}

/// One mmapped part of a region.
struct Mapping {
    /// Offset inside the region.
    offset: u64,
    len: u64,
    ptr: *mut u8,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, and no reference into the mapping
        // outlives the owning VfioBar.
        unsafe { libc::munmap(self.ptr.cast(), self.len as usize) };
    }
}

/// A memory BAR of a VFIO device.
///
/// Accesses that fall in an mmapped part at their natural alignment are single volatile loads and
/// stores; everything else goes through pread/pwrite, which the kernel turns into accesses of the
/// same width. Out-of-range reads give all ones and out-of-range writes are dropped, as
/// [`Bar`] promises.
pub(super) struct VfioBar {
    device: Arc<File>,
    info: RegionInfo,
    maps: Vec<Mapping>,
}

// SAFETY: the mappings are device memory reached only through volatile accesses, which are
// sound from any thread; the descriptor is a File (Send + Sync).
unsafe impl Send for VfioBar {}
// SAFETY: see Send: shared references only perform volatile accesses and pread/pwrite.
unsafe impl Sync for VfioBar {}

impl VfioBar {
    /// Maps what the kernel lets us map of `info`; the rest stays reachable through `device`.
    pub fn new(device: Arc<File>, info: RegionInfo) -> Result<Self> {
        let mut maps = Vec::new();
        for &(off, len) in &info.mmap {
            let prot = if info.write { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
            let Some(file_off) = info.offset.checked_add(off).and_then(|o| libc::off_t::try_from(o).ok())
            else {
                continue;
            };
            // SAFETY: a fresh shared mapping of the device descriptor at an offset and length the
            // kernel advertised as mappable; the result is checked before use.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    prot,
                    libc::MAP_SHARED,
                    std::os::fd::AsRawFd::as_raw_fd(&*device),
                    file_off,
                )
            };
            if p == libc::MAP_FAILED {
                // Falling back to pread/pwrite is slower but correct.
                log::warn!(
                    "mmap of BAR {} [{off:#x}+{len:#x}] failed ({}); using read/write on the device",
                    info.index,
                    std::io::Error::last_os_error()
                );
                continue;
            }
            maps.push(Mapping { offset: off, len, ptr: p.cast() });
        }
        log::debug!(
            "BAR {}: {:#x} bytes, {} of them mmapped",
            info.index,
            info.size,
            maps.iter().map(|m| m.len).sum::<u64>()
        );
        Ok(Self { device, info, maps })
    }

    /// Whether any part of the BAR is mmapped.
    pub fn is_mapped(&self) -> bool {
        !self.maps.is_empty()
    }

    fn in_range(&self, offset: u64, width: u64) -> bool {
        offset.checked_add(width).is_some_and(|end| end <= self.info.size)
    }

    /// The address of `offset` if `width` bytes there lie in a mapping at natural alignment.
    fn mapped(&self, offset: u64, width: u64) -> Option<*mut u8> {
        if offset % width != 0 {
            return None;
        }
        let m = self.maps.iter().find(|m| offset >= m.offset && offset + width <= m.offset + m.len)?;
        // SAFETY: offset - m.offset + width <= m.len, so the pointer stays inside the mapping.
        Some(unsafe { m.ptr.add((offset - m.offset) as usize) })
    }

    fn pread(&self, offset: u64, buf: &mut [u8]) {
        if !self.info.read || self.device.read_exact_at(buf, self.info.offset + offset).is_err() {
            buf.fill(0xff);
        }
    }

    fn pwrite(&self, offset: u64, buf: &[u8]) {
        if self.info.write {
            if let Err(e) = self.device.write_all_at(buf, self.info.offset + offset) {
                log::debug!("BAR {} write at {offset:#x} failed: {e}", self.info.index);
            }
        }
    }
}

macro_rules! access {
    ($read:ident, $write:ident, $t:ty) => {
        fn $read(&self, offset: u64) -> $t {
            const W: u64 = std::mem::size_of::<$t>() as u64;
            if !self.in_range(offset, W) {
                return <$t>::MAX;
            }
            if let Some(p) = self.mapped(offset, W) {
                // SAFETY: p is naturally aligned and inside a live device mapping (see mapped()).
                return <$t>::from_le(unsafe { std::ptr::read_volatile(p.cast::<$t>()) });
            }
            let mut b = [0u8; W as usize];
            self.pread(offset, &mut b);
            <$t>::from_le_bytes(b)
        }

        fn $write(&self, offset: u64, value: $t) {
            const W: u64 = std::mem::size_of::<$t>() as u64;
            if !self.in_range(offset, W) || !self.info.write {
                return;
            }
            if let Some(p) = self.mapped(offset, W) {
                // SAFETY: as in the read: aligned, inside a live writable device mapping.
                unsafe { std::ptr::write_volatile(p.cast::<$t>(), value.to_le()) };
                return;
            }
            self.pwrite(offset, &value.to_le_bytes());
        }
    };
}

impl Bar for VfioBar {
    fn len(&self) -> u64 {
        self.info.size
    }
    access!(read8, write8, u8);
    access!(read16, write16, u16);
    access!(read32, write32, u32);
}
