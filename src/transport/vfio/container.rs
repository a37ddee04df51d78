//! The VFIO container: one IOMMU address space that any number of functions (from one or more
//! IOMMU groups) share, and where DMA memory is mapped.
//!
//! `vfio-ioctls` opens `/dev/vfio/vfio`, checks the API version and the type1v2 backend, joins
//! groups (selecting the IOMMU when the first one joins, keeping each group once however many of
//! its functions are open) and maps and unmaps DMA. What stays here is what a driver needs on top:
//! the IOMMU's valid IOVA ranges (see abi.rs) and their division between functions.
//!
//! Functions in one container share its IOVA space, but each has its own DMA pool choosing IOVAs
//! independently; so the container gives each function a window of its own (carved from the
//! valid ranges, handed back when the function closes) and the function's pool allocates only
//! inside it. Mappings of two functions can then never collide, and one function can leave (be
//! closed, or unplugged) by unmapping its window without touching the others'.

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_info, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
};
use vfio_ioctls::VfioError as IoctlError;

use super::abi::{self, cap_u32, cap_u64};
use crate::error::{Error, Result, VfioError};
use crate::pci_sysfs::Sysfs;

/// Where DMA may go when the kernel does not report valid ranges (kernels before 5.4): below the
/// x86 interrupt window at 0xfee00000, which every IOMMU reserves.
const FALLBACK_IOVA: Range<u64> = 0..0xfee0_0000;

/// Lowest IOVA a window starts at: a zeroed descriptor must not point at valid memory.
const IOVA_FLOOR: u64 = 1 << 20;

/// Window sizes tried, largest first: 16 GiB is far more DMA memory than a function pins (the
/// locked-memory limit stops it long before), and leaves room for dozens of functions in the
/// 512 GiB of a 39-bit IOMMU. Smaller ones serve IOMMUs that report little valid space.
const WINDOW_SIZES: [u64; 4] = [16 << 30, 4 << 30, 1 << 30, 256 << 20];

/// Windows start on this boundary, the DMA pool's region size, so a window wastes no IOVA space.
const WINDOW_ALIGN: u64 = 2 << 20;

/// One IOMMU address space shared by the functions opened in it.
///
/// Open one with [`VfioContainer::open`] and pass it to
/// [`VfioTransport::open_in`](super::VfioTransport::open_in) for each function; or let
/// [`VfioTransport::open`](super::VfioTransport::open) make one per function.
pub struct VfioContainer {
    inner: Arc<vfio_ioctls::VfioContainer>,
    /// Windows handed to open functions (and kept when a function could not unmap its memory).
    windows: Mutex<Vec<Range<u64>>>,
}

impl VfioContainer {
    /// Opens a new container. Each refusal says what to do: no VFIO, no permission.
    pub fn open() -> Result<Arc<Self>> {
        let inner = vfio_ioctls::VfioContainer::new(None).map_err(|e| open_error(&Sysfs::system(), e))?;
        Ok(Arc::new(Self { inner: Arc::new(inner), windows: Mutex::default() }))
    }

    /// The container as `vfio-ioctls` sees it, for opening devices in it.
    pub(super) fn ops(&self) -> Arc<vfio_ioctls::VfioContainer> {
        self.inner.clone()
    }

    pub(super) fn windows(&self) -> MutexGuard<'_, Vec<Range<u64>>> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The IOVA ranges the IOMMU accepts now (half-open), and the smallest IOMMU page size. Valid
    /// once a group has joined; the ranges may shrink when another group joins (its reserved
    /// regions are taken out), never grow.
    pub fn iova_ranges(&self) -> Result<(Vec<Range<u64>>, u64)> {
        let init = vfio_iommu_type1_info::default();
        let (info, reply) =
            abi::query_with_caps(&*self.inner, abi::VFIO_IOMMU_GET_INFO(), init, "VFIO_IOMMU_GET_INFO")?;
        let page = if info.flags & VFIO_IOMMU_INFO_PGSIZES != 0 && info.iova_pgsizes != 0 {
            1u64 << info.iova_pgsizes.trailing_zeros()
        } else {
            4096
        };
        let mut ranges = Vec::new();
        if info.flags & VFIO_IOMMU_INFO_CAPS != 0 {
            let fixed = std::mem::size_of::<vfio_iommu_type1_info>();
            for cap in abi::capabilities(&reply, fixed, info.cap_offset) {
                if u32::from(cap.id) != VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
                    continue;
                }
                // Header (8), nr_iovas (4), reserved (4), then {start, end} pairs, end inclusive.
                let n = cap_u32(cap.bytes, 8).unwrap_or(0) as usize;
                for i in 0..n {
                    let (Some(start), Some(end)) =
                        (cap_u64(cap.bytes, 16, 2 * i), cap_u64(cap.bytes, 16, 2 * i + 1))
                    else {
                        log::warn!("IOVA range capability claims {n} ranges but holds {i}");
                        break;
                    };
                    if start <= end {
                        ranges.push(start..end.saturating_add(1));
                    }
                }
            }
        }
        if ranges.is_empty() {
            log::info!("the kernel reports no valid IOVA ranges; using {FALLBACK_IOVA:#x?}");
            ranges.push(FALLBACK_IOVA);
        }
        Ok((ranges, page))
    }

    /// Reserves a window of IOVA space for one function, inside `valid` and clear of every other
    /// function's window.
    pub(super) fn take_window(&self, valid: &[Range<u64>]) -> Result<Range<u64>> {
        let mut windows = self.windows();
        let window = carve_window(valid, &windows).ok_or_else(|| {
            Error::Vfio(VfioError::Dma(format!(
                "no IOVA window of {} MiB or more left for another function in this container (valid ranges \
                 {valid:x?}, {} functions open); open it in a container of its own",
                WINDOW_SIZES[WINDOW_SIZES.len() - 1] >> 20,
                windows.len()
            )))
        })?;
        windows.push(window.clone());
        Ok(window)
    }

    /// Hands a window back once nothing is mapped in it any more.
    pub(super) fn release_window(&self, window: &Range<u64>) {
        self.windows().retain(|w| w != window);
    }

    /// Maps `len` bytes at host address `vaddr` to `iova`, readable and writable by the device.
    ///
    /// # Safety
    ///
    /// The memory must stay allocated until [`unmap`](Self::unmap) of the same range succeeds,
    /// and be touched only through raw pointers (volatile or atomic accesses, or system calls)
    /// meanwhile: the device may write it at any time.
    pub(super) unsafe fn map(&self, iova: u64, vaddr: *mut u8, len: u64) -> Result<()> {
        let size = usize::try_from(len)
            .map_err(|_| Error::Vfio(VfioError::Dma(format!("{len:#x} bytes do not fit in memory"))))?;
        // SAFETY: the caller keeps the memory alive and unaliased by references until unmap.
        unsafe { self.inner.vfio_dma_map(iova, size, vaddr) }.map_err(|e| {
            let hint = match &e {
                IoctlError::IommuDmaMap(errno) if matches!(errno.errno(), libc::ENOMEM | libc::EPERM) => {
                    "; VFIO pins DMA memory: raise the locked-memory limit (ulimit -l, or LimitMEMLOCK= for a service)"
                }
                _ => "",
            };
            Error::Vfio(VfioError::Dma(format!("mapping {len:#x} bytes at IOVA {iova:#x}: {}{hint}", chain(&e))))
        })
    }

    /// Unmaps exactly the mapping of `len` bytes at `iova`.
    pub(super) fn unmap(&self, iova: u64, len: u64) -> Result<()> {
        let size = usize::try_from(len)
            .map_err(|_| Error::Vfio(VfioError::Dma(format!("{len:#x} bytes do not fit in memory"))))?;
        self.inner.vfio_dma_unmap(iova, size).map_err(|e| {
            Error::Vfio(VfioError::Dma(format!("unmapping {len:#x} bytes at IOVA {iova:#x}: {}", chain(&e))))
        })
    }
}

/// The first window of the largest size that fits in `valid` (aligned, above the floor) and
/// overlaps none of `taken`.
fn carve_window(valid: &[Range<u64>], taken: &[Range<u64>]) -> Option<Range<u64>> {
    let align_up = |x: u64| x.checked_add(WINDOW_ALIGN - 1).map(|v| v & !(WINDOW_ALIGN - 1));
    for size in WINDOW_SIZES {
        for r in valid {
            let mut start = align_up(r.start.max(IOVA_FLOOR))?;
            while let Some(end) = start.checked_add(size).filter(|&end| end <= r.end) {
                match taken.iter().filter(|t| t.start < end && start < t.end).map(|t| t.end).max() {
                    None => return Some(start..end),
                    Some(after) => match align_up(after) {
                        Some(next) => start = next,
                        None => break,
                    },
                }
            }
        }
    }
    None
}

/// A `vfio-ioctls` error with its causes, for messages (its own text names only the step).
pub(super) fn chain(e: &IoctlError) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    s
}

/// What to tell the user when `/dev/vfio/vfio` cannot be used.
fn open_error(sysfs: &Sysfs, e: IoctlError) -> Error {
    let path = sysfs.container_node();
    match e {
        IoctlError::OpenContainer(io) if io.kind() == io::ErrorKind::NotFound => {
            Error::Vfio(VfioError::NoVfio(if sysfs.vfio_support().cdev {
                format!(
                    "{} is missing: this kernel offers only the iommufd device interface (/dev/vfio/devices), \
                     which crypt-vfio does not drive yet",
                    path.display()
                )
            } else {
                format!("{} is missing", path.display())
            }))
        }
        IoctlError::OpenContainer(io) if io.kind() == io::ErrorKind::PermissionDenied => {
            Error::vfio_permission(path.display().to_string())
        }
        IoctlError::OpenContainer(io) => Error::os(format!("opening {}", path.display()), io),
        IoctlError::VfioApiVersion => Error::Vfio(VfioError::NoVfio(format!(
            "the kernel's VFIO API version is not {}",
            vfio_bindings::bindings::vfio::VFIO_API_VERSION
        ))),
        IoctlError::VfioExtension | IoctlError::VfioType1V2 => Error::Vfio(VfioError::NoVfio(
            "the kernel has no type1v2 IOMMU backend for VFIO (modprobe vfio_iommu_type1)".into(),
        )),
        e => Error::Vfio(VfioError::Transport(format!("opening the VFIO container: {}", chain(&e)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci_sysfs::tests::FakeSysfs;

    #[test]
    fn container_errors_say_what_to_do() {
        let t = FakeSysfs::new("vfio-container-errors");
        let s = t.sysfs();
        let missing = || IoctlError::OpenContainer(io::Error::from(io::ErrorKind::NotFound));
        let e = open_error(&s, missing());
        assert!(
            matches!(e, Error::Vfio(VfioError::NoVfio(_))) && e.to_string().contains("modprobe vfio-pci"),
            "{e}"
        );
        assert!(!e.to_string().contains("iommufd"), "{e}");
        // A kernel with only the iommufd interface: say so rather than "load vfio-pci".
        std::fs::create_dir_all(t.root.join("dev/vfio/devices")).unwrap();
        assert!(open_error(&s, missing()).to_string().contains("only the iommufd device interface"));
        let denied = IoctlError::OpenContainer(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(
            matches!(open_error(&s, denied), Error::Vfio(VfioError::PermissionDenied { path, .. }) if path.ends_with("dev/vfio/vfio"))
        );
        assert!(open_error(&s, IoctlError::VfioExtension).to_string().contains("vfio_iommu_type1"));
    }

    const G: u64 = 1 << 30;

    #[test]
    fn windows_are_disjoint_aligned_and_inside_the_valid_ranges() {
        // QEMU's intel-iommu with 39-bit addresses: the MSI window is reserved.
        let valid = [0..0xfee0_0000, 0xfef0_0000..(1 << 39)];
        let mut taken = Vec::new();
        for _ in 0..8 {
            let w = carve_window(&valid, &taken).unwrap();
            assert_eq!(w.end - w.start, 16 * G);
            assert_eq!(w.start % WINDOW_ALIGN, 0);
            assert!(valid.iter().any(|r| r.start <= w.start && w.end <= r.end), "{w:x?} outside {valid:x?}");
            assert!(
                taken.iter().all(|t: &Range<u64>| t.end <= w.start || w.end <= t.start),
                "{w:x?} overlaps"
            );
            taken.push(w);
        }
        // A released window is reused, the others stay.
        let second = taken.remove(1);
        assert_eq!(carve_window(&valid, &taken), Some(second));
    }

    #[test]
    fn small_valid_space_gives_smaller_windows_and_then_none() {
        // Kernels that report no ranges: everything below the interrupt window, under 4 GiB.
        let valid = [FALLBACK_IOVA];
        let mut taken = Vec::new();
        let first = carve_window(&valid, &taken).unwrap();
        assert_eq!(
            first,
            IOVA_FLOOR.next_multiple_of(WINDOW_ALIGN)..IOVA_FLOOR.next_multiple_of(WINDOW_ALIGN) + G
        );
        taken.push(first);
        while let Some(w) = carve_window(&valid, &taken) {
            assert!(w.end <= FALLBACK_IOVA.end && w.start >= IOVA_FLOOR);
            taken.push(w);
        }
        // Three 1 GiB windows fit below 0xfee00000, then 256 MiB ones until the space is used up.
        assert_eq!(taken.iter().filter(|w| w.end - w.start == G).count(), 3);
        assert!(taken.len() > 3);
        let tiny = 0..IOVA_FLOOR + (255 << 20);
        assert_eq!(carve_window(std::slice::from_ref(&tiny), &[]), None, "nothing below the floor");
    }
}
