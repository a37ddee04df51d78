//! The virtio common configuration structure (virtio 1.2 section 4.1.4.3): feature
//! negotiation, the status handshake and queue setup.
//!
//! Registers are served field by field: a read renders each field it covers and a write
//! read-modify-writes each field it covers, so any access width works (including the two 32-bit
//! halves of the 64-bit queue addresses) without one code path per width.

use std::sync::atomic::Ordering;

use crypt_vfio_spec::pci::{common, feature, status, VIRTIO_MSI_NO_VECTOR};

use crate::device::Device;
use crate::virtqueue::{Ring, RingLayout};

/// Per-queue registers as the driver set them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueRegs {
    pub size: u16,
    pub vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// The common configuration registers that are not hot enough to be atomics.
pub(crate) struct TransportRegs {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    pub queues: Vec<QueueRegs>,
}

impl TransportRegs {
    pub(crate) fn new(num_queues: u16, max_size: u16) -> Self {
        let q = QueueRegs {
            size: max_size,
            vector: VIRTIO_MSI_NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        };
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues: vec![q; usize::from(num_queues)],
        }
    }
}

/// The fields of the structure: offset and width.
const FIELDS: [(u64, u64); 16] = [
    (common::DEVICE_FEATURE_SELECT, 4),
    (common::DEVICE_FEATURE, 4),
    (common::DRIVER_FEATURE_SELECT, 4),
    (common::DRIVER_FEATURE, 4),
    (common::CONFIG_MSIX_VECTOR, 2),
    (common::NUM_QUEUES, 2),
    (common::DEVICE_STATUS, 1),
    (common::CONFIG_GENERATION, 1),
    (common::QUEUE_SELECT, 2),
    (common::QUEUE_SIZE, 2),
    (common::QUEUE_MSIX_VECTOR, 2),
    (common::QUEUE_ENABLE, 2),
    (common::QUEUE_NOTIFY_OFF, 2),
    (common::QUEUE_DESC, 8),
    (common::QUEUE_DRIVER, 8),
    (common::QUEUE_DEVICE, 8),
];

fn half(v: u64, select: u32) -> u64 {
    match select {
        0 => v & 0xffff_ffff,
        1 => v >> 32,
        _ => 0,
    }
}

impl Device {
    fn field_read(&self, r: &TransportRegs, off: u64) -> u64 {
        let q = r.queues.get(usize::from(r.queue_select));
        match off {
            common::DEVICE_FEATURE_SELECT => u64::from(r.device_feature_select),
            common::DEVICE_FEATURE => half(self.cfg.features, r.device_feature_select),
            common::DRIVER_FEATURE_SELECT => u64::from(r.driver_feature_select),
            common::DRIVER_FEATURE => half(r.driver_features, r.driver_feature_select),
            common::CONFIG_MSIX_VECTOR => u64::from(self.config_vector.load(Ordering::Relaxed)),
            common::NUM_QUEUES => u64::from(self.cfg.num_queues()),
            common::DEVICE_STATUS => u64::from(self.status.load(Ordering::SeqCst)),
            common::CONFIG_GENERATION => u64::from(self.faults.config_generation()),
            common::QUEUE_SELECT => u64::from(r.queue_select),
            common::QUEUE_SIZE => q.map_or(0, |q| u64::from(q.size)),
            common::QUEUE_MSIX_VECTOR => q.map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |q| u64::from(q.vector)),
            common::QUEUE_ENABLE => q.map_or(0, |q| u64::from(q.enabled)),
            common::QUEUE_NOTIFY_OFF => q.map_or(0, |_| u64::from(r.queue_select)),
            common::QUEUE_DESC => q.map_or(0, |q| q.desc),
            common::QUEUE_DRIVER => q.map_or(0, |q| q.driver),
            common::QUEUE_DEVICE => q.map_or(0, |q| q.device),
            _ => 0,
        }
    }

    fn field_write(&self, r: &mut TransportRegs, off: u64, v: u64) {
        let sel = usize::from(r.queue_select);
        match off {
            common::DEVICE_FEATURE_SELECT => r.device_feature_select = v as u32,
            common::DRIVER_FEATURE_SELECT => r.driver_feature_select = v as u32,
            common::DRIVER_FEATURE => {
                if self.status.load(Ordering::SeqCst) & status::FEATURES_OK != 0 {
                    log::debug!("driver features written after FEATURES_OK: ignored");
                    return;
                }
                match r.driver_feature_select {
                    0 => r.driver_features = (r.driver_features & !0xffff_ffff) | (v & 0xffff_ffff),
                    1 => r.driver_features = (r.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            common::CONFIG_MSIX_VECTOR => {
                self.config_vector.store(self.vector_or_none(v as u16), Ordering::Relaxed)
            }
            common::DEVICE_STATUS => self.write_status(r, v as u8),
            common::QUEUE_SELECT => r.queue_select = v as u16,
            common::QUEUE_SIZE => {
                let max = self.cfg.max_queue_size;
                if let Some(q) = r.queues.get_mut(sel).filter(|q| !q.enabled) {
                    let size = v as u16;
                    if size.is_power_of_two() && size <= max {
                        q.size = size;
                    } else {
                        log::warn!("queue {sel}: size {size} refused (power of two up to {max})");
                    }
                }
            }
            common::QUEUE_MSIX_VECTOR => {
                let vector = self.vector_or_none(v as u16);
                if let Some(q) = r.queues.get_mut(sel) {
                    q.vector = vector;
                    self.queues[sel].vector.store(vector, Ordering::Relaxed);
                }
            }
            common::QUEUE_ENABLE if v & 1 == 1 => self.enable_queue(r, sel),
            common::QUEUE_DESC | common::QUEUE_DRIVER | common::QUEUE_DEVICE => {
                if let Some(q) = r.queues.get_mut(sel).filter(|q| !q.enabled) {
                    match off {
                        common::QUEUE_DESC => q.desc = v,
                        common::QUEUE_DRIVER => q.driver = v,
                        _ => q.device = v,
                    }
                }
            }
            _ => {}
        }
    }

    /// A vector number the device can use, or NO_VECTOR (which the driver reads back to learn
    /// that the assignment failed).
    fn vector_or_none(&self, v: u16) -> u16 {
        if v < self.cfg.msix_vectors() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn enable_queue(&self, r: &mut TransportRegs, sel: usize) {
        let Some(q) = r.queues.get_mut(sel).filter(|q| !q.enabled) else { return };
        q.enabled = true;
        let layout = RingLayout { size: q.size, desc: q.desc, driver: q.driver, device: q.device };
        let features = r.driver_features;
        let ring = Ring::new(
            layout,
            features & (1 << feature::RING_EVENT_IDX) != 0,
            features & (1 << feature::RING_INDIRECT_DESC) != 0,
        );
        *self.queues[sel].lock() = Some(ring);
        log::debug!(
            "queue {sel} enabled: size {} desc {:#x} driver {:#x} device {:#x}",
            q.size,
            q.desc,
            q.driver,
            q.device
        );
        if self.running() {
            self.wake_workers();
        }
    }

    /// Whether the driver's accepted features may be confirmed with FEATURES_OK.
    fn features_acceptable(&self, accepted: u64) -> bool {
        let offered = self.cfg.features;
        let platform = 1u64 << feature::ACCESS_PLATFORM;
        accepted & !offered == 0
            && accepted & (1 << feature::VERSION_1) != 0
            // Every address the device sees is an IOVA, so a driver that does not accept
            // ACCESS_PLATFORM would hand it addresses it cannot use.
            && (offered & platform == 0 || accepted & platform != 0)
    }

    fn write_status(&self, r: &mut TransportRegs, v: u8) {
        if v == 0 {
            if self.faults.reset_behaviour() != crate::faults::ResetBehaviour::Obey {
                log::warn!("device reset ignored (fault injected)");
                self.go_rogue();
                return;
            }
            self.reset_locked(r);
            return;
        }
        let old = self.status.load(Ordering::SeqCst);
        // DEVICE_NEEDS_RESET belongs to the device: the driver can neither set nor clear it.
        let mut new = (v & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            if self.features_acceptable(r.driver_features) {
                self.negotiated.store(r.driver_features, Ordering::SeqCst);
            } else {
                log::warn!(
                    "FEATURES_OK refused: driver accepted {:#x}, device offers {:#x}",
                    r.driver_features,
                    self.cfg.features
                );
                new &= !status::FEATURES_OK;
            }
        }
        self.status.store(new, Ordering::SeqCst);
        self.update_running();
    }

    /// A read from the common configuration window (`rel` within it).
    pub(crate) fn common_read(&self, rel: u64, data: &mut [u8]) {
        data.fill(0);
        let r = self.regs();
        for (i, b) in data.iter_mut().enumerate() {
            let at = rel + i as u64;
            if let Some(&(off, _)) = FIELDS.iter().find(|(off, w)| (*off..off + w).contains(&at)) {
                *b = (self.field_read(&r, off) >> (8 * (at - off))) as u8;
            }
        }
    }

    /// A write to the common configuration window (`rel` within it).
    pub(crate) fn common_write(&self, rel: u64, data: &[u8]) {
        let mut r = self.regs();
        let end = rel + data.len() as u64;
        for &(off, width) in FIELDS.iter().filter(|(off, w)| *off < end && rel < off + w) {
            let mut v = self.field_read(&r, off);
            for at in rel.max(off)..end.min(off + width) {
                let shift = 8 * (at - off);
                v = (v & !(0xff << shift)) | (u64::from(data[(at - rel) as usize]) << shift);
            }
            self.field_write(&mut r, off, v);
        }
    }
}
