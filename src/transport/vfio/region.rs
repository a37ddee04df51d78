//! A device region (BAR or config space) reached through the device descriptor: mmapped where the
//! kernel allows it, read and written through the kernel everywhere else.
//!
//! `vfio-ioctls` describes regions and reads and writes them with pread/pwrite, but maps none:
//! a VMM hands BAR mappings to the hypervisor, not to its own code. A driver reads its registers
//! at every request, so the mapping and its volatile, bounds-checked accesses live here.

use std::os::fd::AsRawFd;
use std::sync::Arc;

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
    /// Readable through the descriptor.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Parts that may be mmapped, as (offset, length) inside the region.
    pub mmap: Vec<(u64, u64)>,
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
    // Field order is drop order: the mappings go first. A mapping holds the device file open in
    // the kernel, so were the device (its last reference) closed before them, the kernel would
    // not release the function and vfio-ioctls could not take its group out of the container.
    maps: Vec<Mapping>,
    /// Keeps the descriptor the mappings come from open, and reaches the rest of the BAR.
    device: Arc<vfio_ioctls::VfioDevice>,
    info: RegionInfo,
}

// SAFETY: the mappings are device memory reached only through volatile accesses, which are
// sound from any thread; the device is Send + Sync.
unsafe impl Send for VfioBar {}
// SAFETY: see Send: shared references only perform volatile accesses and pread/pwrite.
unsafe impl Sync for VfioBar {}

impl VfioBar {
    /// Maps what the kernel lets us map of `info`; the rest stays reachable through `device`.
    pub fn new(device: Arc<vfio_ioctls::VfioDevice>, info: RegionInfo) -> Result<Self> {
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
                    device.as_raw_fd(),
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
        Ok(Self { maps, device, info })
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
        // A read that fails (vfio-ioctls logs it) leaves the all-ones of an unclaimed PCI read.
        buf.fill(0xff);
        if self.info.read {
            self.device.region_read(self.info.index, buf, offset);
        }
    }

    fn pwrite(&self, offset: u64, buf: &[u8]) {
        if self.info.write {
            self.device.region_write(self.info.index, buf, offset);
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
