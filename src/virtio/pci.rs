//! Finding a virtio device's registers and bringing it up (virtio 1.2 sections 3.1 and 4.1).
//!
//! The driver walks the PCI capability list for the common, notify, ISR and device
//! configuration structures, checks each against its BAR, negotiates features and runs the status
//! handshake. Everything read from the device is validated before use.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crypt_vfio_spec::pci::{self, cap, cap_type, cfg, common, status};

use crate::error::{DeviceError, Error, Result};
use crate::transport::{BarWindow, Transport};

/// A doorbell: where and what to write to tell the device a queue has new buffers.
#[derive(Clone)]
pub struct Doorbell {
    window: BarWindow,
    offset: u64,
    queue: u16,
}

impl Doorbell {
    /// Rings the doorbell.
    pub fn ring(&self) {
        self.window.write16(self.offset, self.queue);
    }
}

/// The MSI-X capability, if the function has one.
#[derive(Clone, Copy, Debug)]
pub struct MsixInfo {
    /// Offset of the capability in config space.
    pub cap_offset: u16,
    /// Number of vectors.
    pub vectors: u16,
}

/// A virtio PCI function with its register windows located.
pub struct VirtioPci {
    transport: Arc<dyn Transport>,
    device_id: u16,
    common: BarWindow,
    notify: BarWindow,
    notify_multiplier: u32,
    isr: BarWindow,
    device_cfg: BarWindow,
    msix: Option<MsixInfo>,
}

/// How long the device may take to finish a reset.
const RESET_TIMEOUT: Duration = Duration::from_secs(1);

/// Consistent reads of the device configuration tried before giving up. The spec only asks
/// drivers to retry; a device changes its configuration rarely, so 64 changes in a row is a
/// device that never settles.
pub const CONFIG_READ_ATTEMPTS: u32 = 64;

impl VirtioPci {
    /// Locates the virtio structures of `transport`'s function. Fails with a message naming the
    /// missing or inconsistent piece for anything that is not a modern virtio device.
    pub fn probe(transport: Arc<dyn Transport>) -> Result<Self> {
        let vendor = read_cfg16(&*transport, cfg::VENDOR_ID)?;
        let device_id = read_cfg16(&*transport, cfg::DEVICE_ID)?;
        if vendor != pci::VIRTIO_VENDOR_ID {
            return Err(Error::Device(DeviceError::Unsupported(format!(
                "{}: vendor {vendor:#06x} is not virtio ({:#06x})",
                transport.name(),
                pci::VIRTIO_VENDOR_ID
            ))));
        }
        if device_id < 0x1040 {
            return Err(Error::Device(DeviceError::Unsupported(format!(
                "{}: device {device_id:#06x} is a legacy (transitional) virtio device; only modern (0x1040+) devices are supported",
                transport.name()
            ))));
        }
        let mut found: [Option<(u8, u64, u64, u16)>; 5] = [None; 5];
        let mut msix = None;
        for off in capabilities(&*transport)? {
            let id = read_cfg8(&*transport, off)?;
            if id == pci::CAP_ID_MSIX {
                let ctrl = read_cfg16(&*transport, off + pci::MSIX_MSG_CTRL)?;
                msix = Some(MsixInfo { cap_offset: off, vectors: (ctrl & pci::MSIX_TABLE_SIZE_MASK) + 1 });
                continue;
            }
            if id != pci::CAP_ID_VENDOR {
                continue;
            }
            let len = read_cfg8(&*transport, off + cap::LEN)?;
            let ty = read_cfg8(&*transport, off + cap::CFG_TYPE)?;
            if len < cap::SIZE || !(cap_type::COMMON..=cap_type::DEVICE).contains(&ty) {
                continue;
            }
            let slot = &mut found[usize::from(ty)];
            if slot.is_some() {
                continue; // The spec asks drivers to use the first usable one.
            }
            let bar = read_cfg8(&*transport, off + cap::BAR)?;
            let offset = u64::from(read_cfg32(&*transport, off + cap::OFFSET)?);
            let length = u64::from(read_cfg32(&*transport, off + cap::LENGTH)?);
            if bar > 5 {
                continue;
            }
            *slot = Some((bar, offset, length, off));
        }
        let window = |ty: u8, what: &str, min: u64| -> Result<(BarWindow, u16)> {
            let (bar, offset, length, cap_off) = found[usize::from(ty)].ok_or_else(|| {
                Error::Device(DeviceError::Unsupported(format!(
                    "{}: no virtio {what} capability",
                    transport.name()
                )))
            })?;
            if length < min {
                return Err(Error::Device(DeviceError::Unsupported(format!(
                    "{}: virtio {what} structure is {length} bytes, needs {min}",
                    transport.name()
                ))));
            }
            Ok((BarWindow::new(transport.bar(bar)?, offset, length)?, cap_off))
        };
        let (common, _) = window(cap_type::COMMON, "common configuration", common::SIZE)?;
        let (notify, notify_cap) = window(cap_type::NOTIFY, "notification", 2)?;
        let (isr, _) = window(cap_type::ISR, "ISR", 1)?;
        let (device_cfg, _) = window(cap_type::DEVICE, "device configuration", 0)?;
        let notify_multiplier = read_cfg32(&*transport, notify_cap + cap::NOTIFY_OFF_MULTIPLIER)?;
        Ok(Self { transport, device_id, common, notify, notify_multiplier, isr, device_cfg, msix })
    }

    /// The PCI device ID (0x1040 + virtio device type).
    pub fn device_id(&self) -> u16 {
        self.device_id
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// The MSI-X capability, if any.
    pub fn msix(&self) -> Option<MsixInfo> {
        self.msix
    }

    /// The device-specific configuration window.
    pub fn device_config(&self) -> &BarWindow {
        &self.device_cfg
    }

    /// Turns on memory decoding and bus mastering, without which the function can neither be
    /// programmed nor do DMA.
    pub fn enable_bus_master(&self) -> Result<()> {
        let cmd = read_cfg16(&*self.transport, cfg::COMMAND)?;
        let want = cmd | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER;
        self.transport.write_config(cfg::COMMAND, &want.to_le_bytes())
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.common.read8(common::DEVICE_STATUS)
    }

    /// Whether the device has flagged an unrecoverable error.
    pub fn needs_reset(&self) -> bool {
        let s = self.status();
        s != 0xff && s & status::DEVICE_NEEDS_RESET != 0
    }

    fn add_status(&self, bits: u8) {
        let s = self.status();
        self.common.write8(common::DEVICE_STATUS, s | bits);
    }

    /// Resets the device and waits until it reports status 0.
    pub fn reset(&self) -> Result<()> {
        self.common.write8(common::DEVICE_STATUS, 0);
        let start = Instant::now();
        while self.status() != 0 {
            if start.elapsed() > RESET_TIMEOUT {
                return Err(Error::Device(DeviceError::Timeout(RESET_TIMEOUT, "device reset")));
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    /// Marks the device FAILED: the driver has given up on it.
    pub fn fail(&self) {
        self.add_status(status::FAILED);
    }

    /// Resets the device, acknowledges it and negotiates features: `required` must all be
    /// offered, `wanted` are taken where offered. Returns the accepted set.
    pub fn negotiate(&self, required: u64, wanted: u64) -> Result<u64> {
        self.reset()?;
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        let offered = self.device_features();
        let missing = required & !offered;
        if missing != 0 {
            self.fail();
            return Err(Error::Device(DeviceError::Init(format!(
                "device lacks required feature bits {:?} (offered {offered:#x})",
                bit_list(missing)
            ))));
        }
        let accepted = offered & (required | wanted);
        self.common.write32(common::DRIVER_FEATURE_SELECT, 0);
        self.common.write32(common::DRIVER_FEATURE, accepted as u32);
        self.common.write32(common::DRIVER_FEATURE_SELECT, 1);
        self.common.write32(common::DRIVER_FEATURE, (accepted >> 32) as u32);
        self.add_status(status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.fail();
            return Err(Error::Device(DeviceError::Init(format!(
                "device refused the feature set {accepted:#x} (FEATURES_OK cleared)"
            ))));
        }
        Ok(accepted)
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.common.write32(common::DEVICE_FEATURE_SELECT, 0);
        let lo = self.common.read32(common::DEVICE_FEATURE);
        self.common.write32(common::DEVICE_FEATURE_SELECT, 1);
        let hi = self.common.read32(common::DEVICE_FEATURE);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Number of virtqueues.
    pub fn num_queues(&self) -> u16 {
        self.common.read16(common::NUM_QUEUES)
    }

    /// Largest size queue `index` may have (0: the queue does not exist).
    pub fn queue_max_size(&self, index: u16) -> u16 {
        self.common.write16(common::QUEUE_SELECT, index);
        self.common.read16(common::QUEUE_SIZE)
    }

    /// Sets up and enables queue `index` with rings at the given IOVAs; returns its doorbell.
    pub fn setup_queue(&self, index: u16, size: u16, rings: [u64; 3], msix_vector: u16) -> Result<Doorbell> {
        self.common.write16(common::QUEUE_SELECT, index);
        self.common.write16(common::QUEUE_SIZE, size);
        self.common.write64(common::QUEUE_DESC, rings[0]);
        self.common.write64(common::QUEUE_DRIVER, rings[1]);
        self.common.write64(common::QUEUE_DEVICE, rings[2]);
        self.common.write16(common::QUEUE_MSIX_VECTOR, msix_vector);
        if msix_vector != pci::VIRTIO_MSI_NO_VECTOR
            && self.common.read16(common::QUEUE_MSIX_VECTOR) != msix_vector
        {
            return Err(Error::Device(DeviceError::Init(format!(
                "queue {index}: device refused MSI-X vector {msix_vector}"
            ))));
        }
        let notify_off = u64::from(self.common.read16(common::QUEUE_NOTIFY_OFF));
        let offset = notify_off * u64::from(self.notify_multiplier);
        if offset.checked_add(2).is_none_or(|end| end > self.notify.len()) {
            return Err(Error::Device(DeviceError::Init(format!(
                "queue {index}: doorbell offset {offset:#x} lies outside the {}-byte notify region",
                self.notify.len()
            ))));
        }
        self.common.write16(common::QUEUE_ENABLE, 1);
        Ok(Doorbell { window: self.notify.clone(), offset, queue: index })
    }

    /// Routes configuration-change interrupts to `vector`.
    pub fn set_config_vector(&self, vector: u16) {
        self.common.write16(common::CONFIG_MSIX_VECTOR, vector);
    }

    /// Tells the device the driver is ready.
    pub fn driver_ok(&self) {
        self.add_status(status::DRIVER_OK);
    }

    /// Reads (and so clears) the ISR status.
    pub fn read_isr(&self) -> u8 {
        self.isr.read8(0)
    }

    /// Reads device configuration consistently: retries while `config_generation` changes,
    /// up to [`CONFIG_READ_ATTEMPTS`] times, then fails with [`DeviceError::ConfigUnsettled`] (a device
    /// whose generation never settles would otherwise hold the driver forever).
    pub fn read_device_config<T>(&self, read: impl Fn(&BarWindow) -> T) -> Result<T> {
        for _ in 0..CONFIG_READ_ATTEMPTS {
            let before = self.common.read8(common::CONFIG_GENERATION);
            let v = read(&self.device_cfg);
            if self.common.read8(common::CONFIG_GENERATION) == before {
                return Ok(v);
            }
        }
        Err(Error::Device(DeviceError::ConfigUnsettled { attempts: CONFIG_READ_ATTEMPTS }))
    }

    /// Turns bus mastering off: a function that obeys PCI stops its DMA.
    pub fn disable_bus_master(&self) -> Result<()> {
        let cmd = read_cfg16(&*self.transport, cfg::COMMAND)?;
        self.transport.write_config(cfg::COMMAND, &(cmd & !pci::COMMAND_BUS_MASTER).to_le_bytes())
    }
}

fn bit_list(mask: u64) -> Vec<u32> {
    (0..64).filter(|b| mask & (1 << b) != 0).collect()
}

fn read_cfg8(t: &dyn Transport, off: u16) -> Result<u8> {
    let mut b = [0u8; 1];
    t.read_config(off, &mut b)?;
    Ok(b[0])
}

fn read_cfg16(t: &dyn Transport, off: u16) -> Result<u16> {
    let mut b = [0u8; 2];
    t.read_config(off, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn read_cfg32(t: &dyn Transport, off: u16) -> Result<u32> {
    let mut b = [0u8; 4];
    t.read_config(off, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Offsets of the capabilities in config space, with loop and range protection.
fn capabilities(t: &dyn Transport) -> Result<Vec<u16>> {
    let mut out = Vec::new();
    if read_cfg16(t, cfg::STATUS)? & pci::STATUS_CAP_LIST == 0 {
        return Ok(out);
    }
    let mut next = u16::from(read_cfg8(t, cfg::CAPABILITIES)? & !3);
    // 48 capabilities of 4 bytes fill the 192 bytes after the header: more means a loop.
    while next >= 0x40 && out.len() < 48 {
        if out.contains(&next) {
            break;
        }
        out.push(next);
        next = u16::from(read_cfg8(t, next + 1)? & !3);
    }
    Ok(out)
}
