//! The VFIO group: the unit of isolation the IOMMU gives userspace. It must be viable (no function
//! in it used by a host driver), joins a container, and hands out device descriptors.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::FromRawFd;

use vfio_bindings::bindings::vfio::{vfio_group_status, VFIO_GROUP_FLAGS_VIABLE};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref};

use super::abi;
use super::container::Container;
use crate::error::{Error, Result, VfioError};
use crate::pci_sysfs::{Bdf, Sysfs};

/// An open, viable group.
pub(super) struct Group {
    fd: File,
    id: u32,
}

impl Group {
    /// Opens `/dev/vfio/<id>` and checks that the group is viable.
    pub fn open(sysfs: &Sysfs, id: u32, bdf: &Bdf) -> Result<Self> {
        let path = sysfs.group_node(id);
        let fd = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => {
                Error::Vfio(VfioError::NoVfio(format!("{} is missing although {bdf} is in group {id}", path.display())))
            }
            Some(libc::EACCES) | Some(libc::EPERM) => Error::vfio_permission(path.display().to_string()),
            Some(libc::EBUSY) => Error::Vfio(VfioError::Transport(format!(
                "{} is busy: another process (another crypt-vfio, or a VM) holds IOMMU group {id}; stop it first",
                path.display()
            ))),
            _ => Error::os(format!("opening {}", path.display()), e),
        })?;
        let mut status =
            vfio_group_status { argsz: std::mem::size_of::<vfio_group_status>() as u32, flags: 0 };
        // SAFETY: the kernel fills the status structure, which lives across the call.
        if unsafe { ioctl_with_mut_ref(&fd, abi::VFIO_GROUP_GET_STATUS(), &mut status) } < 0 {
            return Err(Error::last_os(format!("VFIO_GROUP_GET_STATUS on group {id}")));
        }
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            let blockers = sysfs
                .group_members(id)
                .map(|m| {
                    m.iter()
                        .filter(|f| {
                            f.bdf != *bdf
                                && f.driver.as_deref().is_some_and(|d| d != crate::pci_sysfs::VFIO_PCI)
                        })
                        .map(|f| format!("{} ({})", f.bdf, f.driver_name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let blockers = if blockers.is_empty() { "functions of the group".to_string() } else { blockers };
            return Err(Error::Vfio(VfioError::GroupNotViable { group: id, blockers }));
        }
        Ok(Self { fd, id })
    }

    /// Joins `container`.
    pub fn set_container(&self, container: &Container) -> Result<()> {
        let fd = container.raw_fd();
        // SAFETY: the kernel reads one int (the container descriptor) from the reference.
        if unsafe { ioctl_with_ref(&self.fd, abi::VFIO_GROUP_SET_CONTAINER(), &fd) } < 0 {
            return Err(Error::last_os(format!("VFIO_GROUP_SET_CONTAINER for group {}", self.id)));
        }
        Ok(())
    }

    /// A descriptor for the function `bdf` of this group.
    pub fn device(&self, bdf: &Bdf) -> Result<File> {
        let name = CString::new(bdf.to_string())
            .map_err(|_| Error::Vfio(VfioError::InvalidAddress(bdf.to_string())))?;
        // SAFETY: the kernel reads the NUL-terminated name, which lives across the call.
        let fd = unsafe { ioctl_with_ptr(&self.fd, abi::VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) };
        if fd < 0 {
            return Err(Error::os(
                format!("VFIO_GROUP_GET_DEVICE_FD for {bdf} in group {}", self.id),
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: the ioctl returned a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}
