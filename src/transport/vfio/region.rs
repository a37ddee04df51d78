//! A device region (BAR or config space) reached through the device descriptor: mmapped where the
//! kernel allows it, read and written through the kernel everywhere else.
//!
//! `vfio-ioctls` describes regions and reads and writes them with pread/pwrite, but maps none:
//! a VMM hands BAR mappings to the hypervisor, not to its own code. A driver reads its registers
//! at every request, so the mapping and its volatile, bounds-checked accesses live here.
//!
//! When the function goes back to the kernel ([`VfioBar::revoke`]), each mapping is replaced in
//! place by anonymous memory full of ones: a register read that races the release sees what an
//! unclaimed PCI read gives, not SIGBUS, and the device file loses its last mapping, which the
//! kernel waits for before it lets the function go.

use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};

use super::device::Device;
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
        // SAFETY: ptr/len are the run mmap returned, or, once revoked, the same run replaced in
        // place by memory of ours (revoke_mapping never returns leaving anything else there);
        // no reference into it outlives the owning VfioBar.
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
    /// Keeps the descriptor the mappings come from open, and reaches the rest of the BAR;
    /// `None` once revoked. The mapped accesses (the hot path) never look at it.
    device: RwLock<Option<Arc<Device>>>,
    info: RegionInfo,
}

// SAFETY: the mappings are device memory reached only through volatile accesses, which are
// sound from any thread; the device is Send + Sync.
unsafe impl Send for VfioBar {}
// SAFETY: see Send: shared references only perform volatile accesses and pread/pwrite.
unsafe impl Sync for VfioBar {}

impl VfioBar {
    /// Maps what the kernel lets us map of `info`; the rest stays reachable through `device`.
    pub fn new(device: Arc<Device>, info: RegionInfo) -> Result<Self> {
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
        Ok(Self { maps, device: RwLock::new(Some(device)), info })
    }

    /// Takes the BAR away from the function for good: each mapping becomes anonymous memory
    /// reading all ones (writes to it reach nothing), and the descriptor is let go. Idempotent.
    pub fn revoke(&self, owner: &str) {
        let device = self.device.write().unwrap_or_else(|e| e.into_inner()).take();
        if device.is_none() {
            return;
        }
        for m in &self.maps {
            // SAFETY: m.ptr/m.len is a live mapping this BAR owns, and nothing holds a reference
            // into it: other threads may be reading or writing it right now, but only with
            // volatile accesses through raw pointers (the Bar methods), and revoke_mapping
            // swaps it atomically for memory of the same length, so each of those accesses
            // reaches either the device or the all-ones memory, never a hole.
            unsafe {
                revoke_mapping(
                    m.ptr,
                    m.len as usize,
                    &format!("{owner}: BAR {} [{:#x}+{:#x}]", self.info.index, m.offset, m.len),
                )
            };
        }
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
            if let Some(d) = &*self.device.read().unwrap_or_else(|e| e.into_inner()) {
                d.region_read(self.info.index, buf, offset);
            }
        }
    }

    fn pwrite(&self, offset: u64, buf: &[u8]) {
        if self.info.write {
            if let Some(d) = &*self.device.read().unwrap_or_else(|e| e.into_inner()) {
                d.region_write(self.info.index, buf, offset);
            }
        }
    }
}

/// Replaces the mapping at `ptr` (`len` bytes, page-aligned) by private memory full of ones,
/// atomically: a reader sees either the old mapping or all ones, never a hole or zeroes (the
/// kernel swaps mappings under the address space's lock, which a faulting reader waits for).
/// mremap moves a prepared anonymous run over it; should that fail, a private mapping of a
/// prepared file full of ones is mapped over it.
///
/// Either call may fail (ENOMEM) after the kernel already unmapped the old mapping. Should the
/// fallback fail too, a hole may be left where readers on other threads would fault and a later
/// munmap would take whatever the address space put there since: the process aborts rather
/// than go on with that.
///
/// # Safety
/// `ptr..ptr + len` must be a mapping the caller owns, reached by nobody through references
/// (volatile accesses through raw pointers only).
pub(super) unsafe fn revoke_mapping(ptr: *mut u8, len: usize, what: &str) {
    // The fallback is made ready first: once mremap has failed, the old mapping may already be
    // gone, and every moment spent preparing then is a moment a reader would fault.
    let fallback = ones_file(len);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a fresh anonymous mapping; the result is checked.
    let tmp = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, anon, -1, 0) };
    let e = if tmp == libc::MAP_FAILED {
        std::io::Error::last_os_error()
    } else {
        // SAFETY: tmp is our fresh mapping of len bytes.
        unsafe { std::ptr::write_bytes(tmp.cast::<u8>(), 0xff, len) };
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        // SAFETY: moves our anonymous run onto ptr, which the caller owns; the kernel unmaps
        // what was there in the same call.
        if unsafe { libc::mremap(tmp, len, len, flags, ptr.cast::<libc::c_void>()) } != libc::MAP_FAILED {
            return;
        }
        let e = std::io::Error::last_os_error();
        // SAFETY: tmp is still our mapping (mremap failed).
        unsafe { libc::munmap(tmp, len) };
        e
    };
    // SAFETY: as this function's.
    let mapped = fallback.and_then(|file| unsafe { map_file_over(ptr, len, &file) });
    match mapped {
        Ok(()) => {
            log::warn!("revoking {what}: moving all ones over it: {e}; mapped a file of ones over it instead")
        }
        Err(f) => {
            log::error!("revoking {what}: moving all ones over it: {e}; a file of ones: {f}; it may be a hole now, aborting");
            std::process::abort();
        }
    }
}

/// The fallback of [`revoke_mapping`]: a file of `len` bytes of ones, made before it is needed.
fn ones_file(len: usize) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: a new memfd; the result is checked.
    let fd = unsafe { libc::memfd_create(c"crypt-vfio-revoked-bar".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours and open; File takes it over (and closes it: a mapping keeps the
    // memory).
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let ones = [0xffu8; 4096];
    let mut left = len;
    while left > 0 {
        let n = left.min(ones.len());
        file.write_all(&ones[..n])?;
        left -= n;
    }
    Ok(file)
}

/// Maps `file` (filled with ones) privately over `ptr`, so it reads all ones from the first
/// moment.
///
/// # Safety
/// As [`revoke_mapping`].
unsafe fn map_file_over(ptr: *mut u8, len: usize, file: &std::fs::File) -> std::io::Result<()> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: replaces the caller's mapping at ptr with a private one of the same size, of a
    // file of len bytes; writes to it stay in this process.
    let p =
        unsafe { libc::mmap(ptr.cast(), len, rw, libc::MAP_PRIVATE | libc::MAP_FIXED, file.as_raw_fd(), 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::FromRawFd;

    use super::*;

    /// A file of `len` bytes of `byte`, and a shared mapping of it (the stand-in for a BAR
    /// mapping of the device file).
    fn mapped_file(name: &std::ffi::CStr, len: usize, byte: u8) -> (std::fs::File, *mut u32) {
        // SAFETY: a new memfd; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is ours and open; File takes it over.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.write_all(&vec![byte; len]).unwrap();
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a shared mapping of the file's len bytes; checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_SHARED, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        (file, p.cast())
    }

    /// The fallback, as the mremap: a reader racing it sees the device's value or all ones,
    /// never the zeroes of fresh anonymous memory.
    #[test]
    fn a_reader_racing_the_fallback_sees_the_old_value_or_all_ones() {
        let len = 64 << 20;
        let (_file, p) = mapped_file(c"bar-race", len, 0x5a);
        let last = p.wrapping_add(len / 4 - 1) as usize;
        let started = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                started.wait();
                let mut seen = std::collections::BTreeSet::new();
                loop {
                    // SAFETY: the last word of the mapping, which stays mapped (old or new)
                    // for the whole test; reached through a raw pointer only.
                    let v = unsafe { std::ptr::read_volatile(last as *const u32) };
                    seen.insert(v);
                    if v == u32::MAX {
                        return seen;
                    }
                }
            });
            let ones = ones_file(len).unwrap();
            started.wait();
            std::thread::sleep(std::time::Duration::from_millis(5));
            // SAFETY: p..p+len is our mapping, reached only through raw pointers.
            unsafe { map_file_over(p.cast(), len, &ones) }.unwrap();
            let seen = reader.join().unwrap();
            assert!(seen.iter().all(|&v| v == 0x5a5a_5a5a || v == u32::MAX), "the reader saw {seen:x?}");
        });
        // SAFETY: the mapping that replaced ours.
        unsafe { libc::munmap(p.cast(), len) };
    }

    /// A shared mapping of a file stands in for a BAR mapping of the device file: after the
    /// revocation the old pointer reads all ones, writes through it no longer reach the file,
    /// and the file is no longer mapped (the kernel waits for that before it lets a function go).
    #[test]
    fn a_revoked_mapping_reads_all_ones_and_lets_go_of_the_file() {
        let len = 2 * 4096;
        let (file, p) = mapped_file(c"bar", len, 0x5a);
        // SAFETY: inside the mapping, aligned.
        assert_eq!(unsafe { std::ptr::read_volatile(p) }, 0x5a5a_5a5a);
        let maps = || std::fs::read_to_string("/proc/self/maps").unwrap();
        let ino = file.metadata().map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap().to_string();
        assert!(maps().lines().any(|l| l.contains("memfd:bar") && l.contains(&ino)));
        // SAFETY: p..p+len is our mapping, reached only through raw pointers.
        unsafe { revoke_mapping(p.cast(), len, "test BAR") };
        // SAFETY: the same addresses, now anonymous memory of the same length.
        unsafe {
            assert_eq!(std::ptr::read_volatile(p), u32::MAX);
            assert_eq!(std::ptr::read_volatile(p.add(len / 4 - 1)), u32::MAX);
            std::ptr::write_volatile(p, 0);
        }
        assert!(
            !maps().lines().any(|l| l.contains("memfd:bar") && l.contains(&ino)),
            "the file is still mapped"
        );
        let mut back = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 0).unwrap();
        assert_eq!(back, [0x5a; 4], "a write after the revocation reached the file");
        // SAFETY: the anonymous mapping that replaced ours.
        unsafe { libc::munmap(p.cast(), len) };
    }
}
