//! The VFIO container: one IOMMU address space (type1v2) that groups join, and where DMA memory is
//! mapped at IOVAs the IOMMU accepts.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, vfio_iommu_type1_info, VFIO_TYPE1v2_IOMMU,
    VFIO_API_VERSION, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::abi::{self, cap_u32, cap_u64};
use crate::error::{Error, Result, VfioError};
use crate::pci_sysfs::Sysfs;

/// Where DMA may go when the kernel does not report valid ranges (kernels before 5.4): below the
/// x86 interrupt window at 0xfee00000, which every IOMMU reserves.
const FALLBACK_IOVA: Range<u64> = 0..0xfee0_0000;

/// An open container.
pub(super) struct Container {
    fd: File,
}

impl Container {
    /// Opens `/dev/vfio/vfio` and checks that the kernel speaks this API with a type1v2 IOMMU.
    pub fn open(sysfs: &Sysfs) -> Result<Self> {
        let path = sysfs.container_node();
        let fd = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                let cdev = sysfs.vfio_support().cdev;
                Error::Vfio(VfioError::NoVfio(if cdev {
                    format!(
                        "{} is missing: this kernel offers only the iommufd device interface (/dev/vfio/devices), \
                         which crypt-vfio does not drive yet",
                        path.display()
                    )
                } else {
                    format!("{} is missing", path.display())
                }))
            }
            io::ErrorKind::PermissionDenied => Error::vfio_permission(path.display().to_string()),
            _ => Error::os(format!("opening {}", path.display()), e),
        })?;
        // SAFETY: a plain ioctl without argument on a descriptor we own.
        let version = unsafe { ioctl(&fd, abi::VFIO_GET_API_VERSION()) };
        if version != VFIO_API_VERSION as i32 {
            return Err(Error::Vfio(VfioError::NoVfio(format!(
                "the kernel's VFIO API version is {version}, not {VFIO_API_VERSION}"
            ))));
        }
        // SAFETY: as above, with an integer argument.
        let type1v2 = unsafe { ioctl_with_val(&fd, abi::VFIO_CHECK_EXTENSION(), VFIO_TYPE1v2_IOMMU.into()) };
        if type1v2 <= 0 {
            return Err(Error::Vfio(VfioError::NoVfio(
                "the kernel has no type1v2 IOMMU backend for VFIO (modprobe vfio_iommu_type1)".into(),
            )));
        }
        Ok(Self { fd })
    }

    /// Selects the type1v2 IOMMU; valid once a group has joined.
    pub fn set_iommu(&self) -> Result<()> {
        // SAFETY: an ioctl with an integer argument on a descriptor we own.
        let r = unsafe { ioctl_with_val(&self.fd, abi::VFIO_SET_IOMMU(), VFIO_TYPE1v2_IOMMU.into()) };
        if r < 0 {
            return Err(Error::last_os("VFIO_SET_IOMMU (type1v2)"));
        }
        Ok(())
    }

    /// The raw descriptor, for a group to join.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// The IOVA ranges the IOMMU accepts (half-open), and the smallest IOMMU page size.
    pub fn iova_ranges(&self) -> Result<(Vec<Range<u64>>, u64)> {
        let init = vfio_iommu_type1_info::default();
        let (info, reply) =
            abi::query_with_caps(&self.fd, abi::VFIO_IOMMU_GET_INFO(), init, "VFIO_IOMMU_GET_INFO")?;
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

    /// Maps `len` bytes at host address `vaddr` to `iova`, readable and writable by the device.
    pub fn map(&self, iova: u64, vaddr: u64, len: u64) -> Result<()> {
        let map = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size: len,
        };
        // SAFETY: the kernel reads the structure; the memory it describes is the caller's to
        // guarantee (it stays mapped until unmap, see VfioTransport::dma_map).
        let r = unsafe { ioctl_with_ref(&self.fd, abi::VFIO_IOMMU_MAP_DMA(), &map) };
        if r < 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::ENOMEM) | Some(libc::EPERM) => {
                    "; VFIO pins DMA memory: raise the locked-memory limit (ulimit -l, or LimitMEMLOCK= for a service)"
                }
                _ => "",
            };
            return Err(Error::Vfio(VfioError::Dma(format!(
                "VFIO_IOMMU_MAP_DMA of {len:#x} bytes at IOVA {iova:#x}: {e}{hint}"
            ))));
        }
        Ok(())
    }

    /// Unmaps exactly the mapping of `len` bytes at `iova`.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<()> {
        let mut unmap = vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size: len,
            ..Default::default()
        };
        // SAFETY: the kernel reads the structure and writes back the unmapped size into it.
        let r = unsafe { ioctl_with_mut_ref(&self.fd, abi::VFIO_IOMMU_UNMAP_DMA(), &mut unmap) };
        if r < 0 {
            return Err(Error::Vfio(VfioError::Dma(format!(
                "VFIO_IOMMU_UNMAP_DMA of {len:#x} bytes at IOVA {iova:#x}: {}",
                io::Error::last_os_error()
            ))));
        }
        if unmap.size != len {
            return Err(Error::Vfio(VfioError::Dma(format!(
                "VFIO_IOMMU_UNMAP_DMA at IOVA {iova:#x} unmapped {:#x} bytes, not {len:#x}",
                unmap.size
            ))));
        }
        Ok(())
    }
}
