//! The VFIO device descriptor: what the function has (regions, interrupts), its reset, and the
//! routing of its MSI-X vectors to eventfds.

use std::fs::File;
use std::io;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_irq_set, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_CONFIG_REGION_INDEX,
};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ptr};

use super::abi;
use super::region::RegionInfo;
use crate::error::{DeviceError, Error, Result, VfioError};

/// An open VFIO PCI device.
pub(super) struct VfioDevice {
    fd: Arc<File>,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
}

impl VfioDevice {
    /// Wraps a device descriptor and checks that it is a PCI device.
    pub fn new(fd: File) -> Result<Self> {
        let mut info =
            vfio_device_info { argsz: std::mem::size_of::<vfio_device_info>() as u32, ..Default::default() };
        // SAFETY: the kernel fills the structure, which lives across the call; argsz bounds it.
        if unsafe { ioctl_with_mut_ref(&fd, abi::VFIO_DEVICE_GET_INFO(), &mut info) } < 0 {
            return Err(Error::last_os("VFIO_DEVICE_GET_INFO"));
        }
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(Error::Device(DeviceError::Unsupported(
                "the VFIO device is not a PCI device".into(),
            )));
        }
        if info.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX {
            return Err(Error::Device(DeviceError::Unsupported(format!(
                "the VFIO device has {} regions, too few for a PCI function",
                info.num_regions
            ))));
        }
        Ok(Self {
            fd: Arc::new(fd),
            flags: info.flags,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
        })
    }

    /// The descriptor, shared with the regions that read and map through it.
    pub fn fd(&self) -> &Arc<File> {
        &self.fd
    }

    /// What the kernel says about region `index`.
    pub fn region(&self, index: u32) -> Result<RegionInfo> {
        if index >= self.num_regions {
            return Err(Error::Vfio(VfioError::Transport(format!("the device has no region {index}"))));
        }
        RegionInfo::query(&self.fd, index)
    }

    /// How many vectors interrupt `index` (INTx, MSI, MSI-X…) has, 0 if it cannot signal
    /// eventfds.
    pub fn irq_count(&self, index: u32) -> Result<u32> {
        if index >= self.num_irqs {
            return Ok(0);
        }
        let mut info =
            vfio_irq_info { argsz: std::mem::size_of::<vfio_irq_info>() as u32, index, ..Default::default() };
        // SAFETY: the kernel fills the structure, which lives across the call.
        if unsafe { ioctl_with_mut_ref(&*self.fd, abi::VFIO_DEVICE_GET_IRQ_INFO(), &mut info) } < 0 {
            return Err(Error::last_os(format!("VFIO_DEVICE_GET_IRQ_INFO {index}")));
        }
        Ok(if info.flags & VFIO_IRQ_INFO_EVENTFD != 0 { info.count } else { 0 })
    }

    /// Routes vectors `0..fds.len()` of interrupt `index` to the eventfds (-1 leaves a vector
    /// unrouted), enabling the interrupt.
    pub fn set_irq_eventfds(&self, index: u32, fds: &[i32]) -> Result<()> {
        let header = std::mem::size_of::<vfio_irq_set>();
        let len = header + std::mem::size_of_val(fds);
        // u32 words: vfio_irq_set is five u32s followed by the descriptors.
        let mut buf = vec![0u32; len.div_ceil(4)];
        let set = vfio_irq_set {
            argsz: len as u32,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: fds.len() as u32,
            ..Default::default()
        };
        let p = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: the buffer is `len` bytes, 4-byte aligned like vfio_irq_set; the header goes
        // first and the descriptors right after it, inside the buffer.
        unsafe {
            std::ptr::write(p.cast::<vfio_irq_set>(), set);
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                p.add(header),
                std::mem::size_of_val(fds),
            );
        }
        // SAFETY: the kernel reads argsz bytes from the buffer, which is that long.
        if unsafe { ioctl_with_ptr(&*self.fd, abi::VFIO_DEVICE_SET_IRQS(), p) } < 0 {
            return Err(Error::os(
                format!("VFIO_DEVICE_SET_IRQS routing {} vectors of interrupt {index}", fds.len()),
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Disables interrupt `index` and disconnects its eventfds.
    pub fn disable_irq(&self, index: u32) -> Result<()> {
        let set = vfio_irq_set {
            argsz: std::mem::size_of::<vfio_irq_set>() as u32,
            flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 0,
            ..Default::default()
        };
        // SAFETY: the kernel reads the header-only structure.
        if unsafe { ioctl_with_ptr(&*self.fd, abi::VFIO_DEVICE_SET_IRQS(), &set) } < 0 {
            return Err(Error::last_os(format!("VFIO_DEVICE_SET_IRQS disabling interrupt {index}")));
        }
        Ok(())
    }

    /// Resets the function if the kernel can (FLR, PM or bus reset). Returns whether it did.
    pub fn reset(&self) -> Result<bool> {
        if self.flags & VFIO_DEVICE_FLAGS_RESET == 0 {
            return Ok(false);
        }
        // SAFETY: an ioctl without argument on a descriptor we own.
        if unsafe { ioctl(&*self.fd, abi::VFIO_DEVICE_RESET()) } < 0 {
            return Err(Error::last_os("VFIO_DEVICE_RESET"));
        }
        Ok(true)
    }
}
