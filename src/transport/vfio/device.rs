//! A function's VFIO device, opened through `vfio-ioctls`: what the function has (regions,
//! interrupts), its reset, and the routing of its MSI-X vectors to eventfds.
//!
//! `vfio-ioctls` opens the group (checking viability), joins it to the container, gets the device
//! descriptor, reads every region's and interrupt's description, and sets interrupts. Opening
//! errors are turned here into ones that say what to do; the reset is our own request (see
//! `abi.rs`) because the crate's drops its result.
//!
//! `vfio-ioctls` reads the function's sysfs directory again when the device is dropped (its
//! `iommu_group` link) and panics if it cannot. After a hot-unplug the kernel removes that
//! directory as soon as the last descriptor closes, which is the step just before; so the crate
//! is given a private stand-in ([`DevicePath`]) that lives exactly as long as the device.

use std::io;
use std::ops::Deref;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioError as IoctlError, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl;

use super::abi;
use super::container::{chain, VfioContainer};
use super::region::RegionInfo;
use crate::error::{DeviceError, Error, Result, VfioError};
use crate::pci_sysfs::{Bdf, Sysfs};

/// Smallest config space of a PCI function.
const CONFIG_MIN: u64 = 256;

/// An open VFIO device, with the path `vfio-ioctls` was given for it; the device drops first.
pub(super) struct Device {
    device: vfio_ioctls::VfioDevice,
    path: Option<DevicePath>,
}

impl Device {
    /// Whether `vfio-ioctls` was given the private stand-in of the function's sysfs directory:
    /// only then may the device be dropped after the kernel removed the function.
    pub(super) fn has_private_path(&self) -> bool {
        self.path.is_some()
    }
}

impl Deref for Device {
    type Target = vfio_ioctls::VfioDevice;
    fn deref(&self) -> &vfio_ioctls::VfioDevice {
        &self.device
    }
}

/// A private directory named after the function, holding an `iommu_group` link to its group:
/// all `vfio-ioctls` reads of the function's sysfs directory (the group number, and the
/// directory's name as the device name), in a place the kernel does not remove.
pub(super) struct DevicePath {
    root: PathBuf,
    dir: PathBuf,
}

impl DevicePath {
    /// Creates the stand-in for `bdf` (of IOMMU group `group`) in the temporary directory.
    fn new(bdf: &Bdf, group: u32) -> io::Result<Self> {
        Self::new_in(&std::env::temp_dir(), bdf, group)
    }

    /// Creates the stand-in in `tmp`, under a random name created exclusively: a name derived
    /// from the PID alone could be a directory left by a crashed run, or one someone else made
    /// there first (the temporary directory is shared).
    fn new_in(tmp: &Path, bdf: &Bdf, group: u32) -> io::Result<Self> {
        const TRIES: usize = 16;
        let mut tries = 0;
        let root = loop {
            let root = tmp.join(format!("crypt-vfio-{}-{:016x}", std::process::id(), rand::random::<u64>()));
            // DirBuilder::create fails on an existing name, so the directory is ours alone.
            match std::fs::DirBuilder::new().mode(0o700).create(&root) {
                Ok(()) => break root,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries + 1 < TRIES => tries += 1,
                Err(e) => return Err(e),
            }
        };
        let this = Self { dir: root.join(bdf.to_string()), root };
        std::fs::create_dir(&this.dir)?;
        std::os::unix::fs::symlink(
            format!("/sys/kernel/iommu_groups/{group}"),
            this.dir.join("iommu_group"),
        )?;
        Ok(this)
    }

    /// The directory to give `vfio-ioctls` in place of the function's sysfs directory.
    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for DevicePath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Opens the VFIO device of `bdf` in `container` (joining its group to the container unless
/// another function of the group is already open there).
pub(super) fn open(sysfs: &Sysfs, container: &VfioContainer, bdf: &Bdf, group: u32) -> Result<Arc<Device>> {
    let ops: Arc<dyn VfioOps> = container.ops();
    // Without the stand-in, vfio-ioctls panics when it drops a device the kernel removed: such
    // a device works, but is not given back on request (see `has_private_path`).
    let path = DevicePath::new(bdf, group)
        .map_err(|e| {
            log::warn!(
                "{bdf}: cannot make a private device path in {} ({e}); vfio-ioctls reads sysfs, and \
                 the function will not be given back on an unbind or unplug request",
                std::env::temp_dir().display()
            )
        })
        .ok();
    let sysfs_path = sysfs.device_path(bdf);
    let device = vfio_ioctls::VfioDevice::new(path.as_ref().map_or(&sysfs_path, |p| p.path()), ops, false)
        .map_err(|e| open_error(sysfs, bdf, group, e))?;
    // vfio-ioctls keeps the regions it could describe in a list and reaches them by position, so
    // one that failed would shift the config region's place: check that index 7 is config space.
    let config = VFIO_PCI_CONFIG_REGION_INDEX;
    if device.get_region_size(config) < CONFIG_MIN
        || device.get_region_flags(config) & VFIO_REGION_INFO_FLAG_READ == 0
    {
        return Err(Error::Device(DeviceError::Unsupported(format!(
            "{bdf}: VFIO describes no readable config space (region {config}: {} bytes)",
            device.get_region_size(config)
        ))));
    }
    Ok(Arc::new(Device { device, path }))
}

/// What to tell the user when a function's group or device cannot be opened.
fn open_error(sysfs: &Sysfs, bdf: &Bdf, group: u32, e: IoctlError) -> Error {
    let node = sysfs.group_node(group);
    match e {
        IoctlError::OpenGroup(io, _) => match io.raw_os_error() {
            Some(libc::ENOENT) => {
                Error::Vfio(VfioError::NoVfio(format!("{} is missing although {bdf} is in group {group}", node.display())))
            }
            Some(libc::EACCES) | Some(libc::EPERM) => Error::vfio_permission(node.display().to_string()),
            Some(libc::EBUSY) => Error::Vfio(VfioError::Transport(format!(
                "{} is busy: another process (another crypt-vfio, or a VM) holds IOMMU group {group}; stop it \
                 first. Within one process, open the functions of a group in one container \
                 (VfioTransport::open_in)",
                node.display()
            ))),
            _ => Error::os(format!("opening {}", node.display()), io),
        },
        IoctlError::GroupViable => {
            let blockers = sysfs
                .group_members(group)
                .map(|m| {
                    m.iter()
                        .filter(|f| {
                            f.bdf != *bdf && f.driver.as_deref().is_some_and(|d| d != crate::pci_sysfs::VFIO_PCI)
                        })
                        .map(|f| format!("{} ({})", f.bdf, f.driver_name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let blockers = if blockers.is_empty() { "functions of the group".to_string() } else { blockers };
            Error::Vfio(VfioError::GroupNotViable { group, blockers })
        }
        IoctlError::VfioDeviceGetInfoPCI | IoctlError::VfioDeviceGetInfoOther => Error::Device(DeviceError::Unsupported(format!(
            "{bdf}: the VFIO device is not a PCI function with config space and MSI-X ({})",
            chain(&e)
        ))),
        e => Error::Vfio(VfioError::Transport(format!("{bdf}: opening its VFIO device in IOMMU group {group}: {}", chain(&e)))),
    }
}

/// What the kernel said about region `index`, if the function has it.
pub(super) fn region(device: &vfio_ioctls::VfioDevice, index: u32) -> RegionInfo {
    let flags = device.get_region_flags(index);
    let size = device.get_region_size(index);
    let mut mmap = Vec::new();
    if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
        let sparse = device.get_region_caps(index).into_iter().find_map(|c| match c {
            VfioRegionInfoCap::SparseMmap(s) => Some(s.areas.iter().map(|a| (a.offset, a.size)).collect()),
            _ => None,
        });
        mmap = sparse.unwrap_or_else(|| vec![(0, size)]);
        // An area outside the region is the kernel's mistake; never map it.
        mmap.retain(|&(o, l)| l > 0 && o.checked_add(l).is_some_and(|end| end <= size));
    }
    RegionInfo {
        index,
        size,
        offset: device.get_region_offset(index),
        read: flags & VFIO_REGION_INFO_FLAG_READ != 0,
        write: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
        mmap,
    }
}

/// How many vectors interrupt `index` (INTx, MSI, MSI-X…) has, 0 if it cannot signal eventfds.
pub(super) fn irq_count(device: &vfio_ioctls::VfioDevice, index: u32) -> u32 {
    device.get_irq_info(index).filter(|i| i.flags & VFIO_IRQ_INFO_EVENTFD != 0).map_or(0, |i| i.count)
}

/// Routes vectors `0..fds.len()` of interrupt `index` to the eventfds, enabling the interrupt.
pub(super) fn set_irq_eventfds(
    device: &vfio_ioctls::VfioDevice,
    index: u32,
    fds: Vec<&EventFd>,
) -> Result<()> {
    let n = fds.len();
    if n == 0 || irq_count(device, index) < n as u32 {
        return Err(Error::Vfio(VfioError::Transport(format!(
            "routing {n} vectors of interrupt {index}, which has {}",
            irq_count(device, index)
        ))));
    }
    // The crate's error names the step but not the kernel's reason; its checks of the vector
    // count were made before the call, so a failure here is the ioctl's and errno is its.
    device.enable_irq(index, fds).map_err(|e| {
        Error::os(
            format!("{e} (VFIO_DEVICE_SET_IRQS routing {n} vectors of interrupt {index})"),
            io::Error::last_os_error(),
        )
    })
}

/// Disables interrupt `index` and disconnects its eventfds.
pub(super) fn disable_irq(device: &vfio_ioctls::VfioDevice, index: u32) -> Result<()> {
    device.disable_irq(index).map_err(|e| {
        Error::os(
            format!("{e} (VFIO_DEVICE_SET_IRQS disabling interrupt {index})"),
            io::Error::last_os_error(),
        )
    })
}

/// Resets the function if the kernel can (FLR, PM or bus reset). Returns whether it did.
pub(super) fn reset(device: &vfio_ioctls::VfioDevice) -> Result<bool> {
    // SAFETY: an ioctl without argument on the device descriptor, which `device` keeps open.
    if unsafe { ioctl(device, abi::VFIO_DEVICE_RESET()) } < 0 {
        let e = io::Error::last_os_error();
        // vfio-pci answers EINVAL when the function has no reset method; ENOTTY when the
        // device is not one that resets at all.
        if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) {
            return Ok(false);
        }
        return Err(Error::os("VFIO_DEVICE_RESET", e));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory left by a crashed run (same PID after a reboot, or a PID reused) has the
    /// name this run would pick: the stand-in is still made, elsewhere, and links to the group.
    #[test]
    fn a_stale_directory_of_the_same_name_does_not_stop_the_stand_in() {
        let tmp = tempfile::tempdir().unwrap();
        for n in 0..256 {
            std::fs::create_dir(tmp.path().join(format!("crypt-vfio-{}-{n}", std::process::id()))).unwrap();
        }
        let bdf: Bdf = "0000:00:03.0".parse().unwrap();
        let path = DevicePath::new_in(tmp.path(), &bdf, 7).expect("a stand-in despite the stale directories");
        assert!(path.path().ends_with("0000:00:03.0"));
        let link = std::fs::read_link(path.path().join("iommu_group")).unwrap();
        assert_eq!(link, Path::new("/sys/kernel/iommu_groups/7"));
        let root = path.root.clone();
        drop(path);
        assert!(!root.exists(), "the stand-in outlived its device");
    }
    use crate::pci_sysfs::tests::FakeSysfs;

    /// What vfio-ioctls reads of a function's directory, from the stand-in: the group number
    /// (the link's last component) and the device name (the directory's); gone after the drop.
    #[test]
    fn the_private_device_path_says_what_sysfs_says_and_goes_with_the_device() {
        let bdf: Bdf = "0000:02:00.0".parse().unwrap();
        let p = DevicePath::new(&bdf, 6).unwrap();
        assert_eq!(p.path().file_name().unwrap(), "0000:02:00.0");
        let link = std::fs::read_link(p.path().join("iommu_group")).unwrap();
        assert_eq!(link.file_name().unwrap(), "6");
        let root = p.root.clone();
        drop(p);
        assert!(!root.exists(), "{} left behind", root.display());
    }

    #[test]
    fn group_errors_name_the_blockers_and_what_to_do() {
        let t = FakeSysfs::new("vfio-group-errors");
        t.function("0000:01:00.0", (0x1af4, 0x1054), Some("vfio-pci"), Some(7));
        t.function("0000:01:00.1", (0x8086, 0x1234), Some("snd_hda_intel"), Some(7));
        t.function("0000:01:00.2", (0x8086, 0x1235), Some("vfio-pci"), Some(7));
        let s = t.sysfs();
        let bdf: Bdf = "0000:01:00.0".parse().unwrap();
        match open_error(&s, &bdf, 7, IoctlError::GroupViable) {
            Error::Vfio(VfioError::GroupNotViable { group: 7, blockers }) => {
                assert_eq!(blockers, "0000:01:00.1 (snd_hda_intel)")
            }
            e => panic!("not GroupNotViable: {e}"),
        }
        let os = |errno| IoctlError::OpenGroup(io::Error::from_raw_os_error(errno), "7".into());
        match open_error(&s, &bdf, 7, os(libc::EACCES)) {
            Error::Vfio(VfioError::PermissionDenied { path, fix }) => {
                assert!(path.ends_with("dev/vfio/7"), "{path}");
                assert!(fix.contains("ulimit -l"), "{fix}");
            }
            e => panic!("not PermissionDenied: {e}"),
        }
        assert!(open_error(&s, &bdf, 7, os(libc::EBUSY)).to_string().contains("holds IOMMU group 7"));
        assert!(matches!(open_error(&s, &bdf, 7, os(libc::ENOENT)), Error::Vfio(VfioError::NoVfio(_))));
    }
}
