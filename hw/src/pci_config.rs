//! PCI configuration space (the 256-byte type 0 header and capability list).
//!
//! This is where a driver identifies the function and finds everything else: the virtio
//! capabilities point into BAR4, the MSI-X capability into BAR1. The space is an image plus a
//! mask of writable bits, which is all PCI needs here: BAR sizing (write all ones, read back
//! the size mask) falls out of the mask, as it does in hardware.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crypt_vfio_spec::crypto::config as crypto_config;
use crypt_vfio_spec::pci::{
    cap, cap_type, cfg, common, CAP_ID_MSIX, CAP_ID_VENDOR, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE,
    COMMAND_MEMORY, MSIX_ENABLE, MSIX_FUNCTION_MASK, MSIX_MSG_CTRL, MSIX_PBA, MSIX_TABLE, PCI_CONFIG_SIZE,
    STATUS_CAP_LIST, VIRTIO_CRYPTO_DEVICE_ID, VIRTIO_VENDOR_ID,
};

use crate::bar::{
    MsixLayout, COMMON_OFFSET, DEVICE_OFFSET, ISR_OFFSET, MSIX_BAR, NOTIFY_MULTIPLIER, NOTIFY_OFFSET,
    VIRTIO_BAR, VIRTIO_BAR_SIZE,
};

/// Revision of the modern virtio PCI function (virtio 1.2 section 4.1.2.1: at least 1).
const REVISION: u8 = 1;
/// Class code: encryption/decryption controller, "other".
const CLASS_ENCRYPTION: u8 = 0x10;
const SUBCLASS_OTHER: u8 = 0x80;
/// Subsystem ID that QEMU gives modern-only virtio functions.
const SUBSYSTEM_ID: u16 = 0x1100;

/// Where the capabilities sit: MSI-X first, then the four virtio structures.
pub(crate) const MSIX_CAP: u16 = 0x40;
pub(crate) const COMMON_CAP: u16 = 0x50;
pub(crate) const NOTIFY_CAP: u16 = 0x60;
pub(crate) const ISR_CAP: u16 = 0x74;
pub(crate) const DEVICE_CAP: u16 = 0x84;

/// BAR1: 32-bit non-prefetchable memory. BAR4/5: 64-bit prefetchable memory.
const BAR_MEM_64_PREFETCH: u32 = 0b1100;

struct Space {
    bytes: [u8; PCI_CONFIG_SIZE],
    writable: [u8; PCI_CONFIG_SIZE],
}

impl Space {
    fn put(&mut self, off: u16, v: &[u8]) {
        let o = usize::from(off);
        self.bytes[o..o + v.len()].copy_from_slice(v);
    }
    fn put8(&mut self, off: u16, v: u8) {
        self.put(off, &[v]);
    }
    fn put16(&mut self, off: u16, v: u16) {
        self.put(off, &v.to_le_bytes());
    }
    fn put32(&mut self, off: u16, v: u32) {
        self.put(off, &v.to_le_bytes());
    }
    fn mask(&mut self, off: u16, m: &[u8]) {
        let o = usize::from(off);
        self.writable[o..o + m.len()].copy_from_slice(m);
    }
    fn get16(&self, off: u16) -> u16 {
        let o = usize::from(off);
        u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]])
    }

    fn virtio_cap(&mut self, at: u16, next: u16, kind: u8, offset: u64, length: u64, len: u8) {
        self.put8(at + cap::VNDR, CAP_ID_VENDOR);
        self.put8(at + cap::NEXT, next as u8);
        self.put8(at + cap::LEN, len);
        self.put8(at + cap::CFG_TYPE, kind);
        self.put8(at + cap::BAR, VIRTIO_BAR);
        self.put8(at + cap::ID, 0);
        self.put32(at + cap::OFFSET, offset as u32);
        self.put32(at + cap::LENGTH, length as u32);
    }
}

/// The configuration space of the function.
pub(crate) struct PciConfig {
    space: Mutex<Space>,
    bus_master: AtomicBool,
}

impl PciConfig {
    pub(crate) fn new(num_queues: u16, msix: MsixLayout) -> Self {
        let mut s = Space { bytes: [0; PCI_CONFIG_SIZE], writable: [0; PCI_CONFIG_SIZE] };
        s.put16(cfg::VENDOR_ID, VIRTIO_VENDOR_ID);
        s.put16(cfg::DEVICE_ID, VIRTIO_CRYPTO_DEVICE_ID);
        s.put16(cfg::STATUS, STATUS_CAP_LIST);
        s.put8(cfg::REVISION, REVISION);
        s.put(cfg::CLASS, &[0, SUBCLASS_OTHER, CLASS_ENCRYPTION]);
        s.put16(cfg::SUBSYSTEM_VENDOR_ID, VIRTIO_VENDOR_ID);
        s.put16(cfg::SUBSYSTEM_ID, SUBSYSTEM_ID);
        s.put8(cfg::CAPABILITIES, MSIX_CAP as u8);
        let command = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        s.mask(cfg::COMMAND, &command.to_le_bytes());
        s.mask(cfg::INTERRUPT_LINE, &[0xff]);

        // BARs: the size is encoded by which address bits are writable.
        let bar = |n: u8| cfg::BAR0 + 4 * u16::from(n);
        s.mask(bar(MSIX_BAR), &((!(msix.bar_size as u32 - 1)) & !0xf).to_le_bytes());
        s.put32(bar(VIRTIO_BAR), BAR_MEM_64_PREFETCH);
        s.mask(bar(VIRTIO_BAR), &((!(VIRTIO_BAR_SIZE as u32 - 1)) & !0xf).to_le_bytes());
        s.mask(bar(VIRTIO_BAR + 1), &u32::MAX.to_le_bytes());

        // MSI-X: table at BAR1 offset 0, PBA after it.
        s.put8(MSIX_CAP, CAP_ID_MSIX);
        s.put8(MSIX_CAP + 1, COMMON_CAP as u8);
        s.put16(MSIX_CAP + MSIX_MSG_CTRL, msix.vectors - 1);
        s.mask(MSIX_CAP + MSIX_MSG_CTRL, &(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes());
        s.put32(MSIX_CAP + MSIX_TABLE, u32::from(MSIX_BAR));
        s.put32(MSIX_CAP + MSIX_PBA, msix.pba_offset as u32 | u32::from(MSIX_BAR));

        s.virtio_cap(COMMON_CAP, NOTIFY_CAP, cap_type::COMMON, COMMON_OFFSET, common::SIZE, cap::SIZE);
        let notify_len = u64::from(num_queues) * u64::from(NOTIFY_MULTIPLIER);
        s.virtio_cap(NOTIFY_CAP, ISR_CAP, cap_type::NOTIFY, NOTIFY_OFFSET, notify_len, cap::NOTIFY_SIZE);
        s.put32(NOTIFY_CAP + cap::NOTIFY_OFF_MULTIPLIER, NOTIFY_MULTIPLIER);
        s.virtio_cap(ISR_CAP, DEVICE_CAP, cap_type::ISR, ISR_OFFSET, 1, cap::SIZE);
        s.virtio_cap(DEVICE_CAP, 0, cap_type::DEVICE, DEVICE_OFFSET, crypto_config::SIZE, cap::SIZE);

        Self { space: Mutex::new(s), bus_master: AtomicBool::new(false) }
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as 0xff.
    pub(crate) fn read(&self, offset: u16, data: &mut [u8]) {
        let s = self.space.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, b) in data.iter_mut().enumerate() {
            *b = s.bytes.get(usize::from(offset) + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes `data` at `offset` through the writable mask; returns the command register before
    /// and after.
    pub(crate) fn write(&self, offset: u16, data: &[u8]) -> (u16, u16) {
        let mut s = self.space.lock().unwrap_or_else(PoisonError::into_inner);
        let before = s.get16(cfg::COMMAND);
        for (i, &v) in data.iter().enumerate() {
            let o = usize::from(offset) + i;
            if o >= PCI_CONFIG_SIZE {
                break;
            }
            let m = s.writable[o];
            s.bytes[o] = (s.bytes[o] & !m) | (v & m);
        }
        let after = s.get16(cfg::COMMAND);
        self.bus_master.store(after & COMMAND_BUS_MASTER != 0, Ordering::SeqCst);
        (before, after)
    }

    /// Function-level reset: the command register and MSI-X control return to 0.
    pub(crate) fn flr(&self) {
        let mut s = self.space.lock().unwrap_or_else(PoisonError::into_inner);
        s.put16(cfg::COMMAND, 0);
        let ctrl = s.get16(MSIX_CAP + MSIX_MSG_CTRL) & !(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        s.put16(MSIX_CAP + MSIX_MSG_CTRL, ctrl);
        self.bus_master.store(false, Ordering::SeqCst);
    }

    /// Whether the function may do DMA.
    pub(crate) fn bus_master(&self) -> bool {
        self.bus_master.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r32(p: &PciConfig, off: u16) -> u32 {
        let mut b = [0u8; 4];
        p.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn bar_sizing_and_command() {
        let p = PciConfig::new(5, MsixLayout::new(6));
        p.write(cfg::BAR0 + 16, &u32::MAX.to_le_bytes());
        p.write(cfg::BAR0 + 20, &u32::MAX.to_le_bytes());
        let lo = r32(&p, cfg::BAR0 + 16);
        assert_eq!(lo & 0xf, 0b1100);
        assert_eq!(!(lo & !0xf) + 1, 0x4000);
        assert_eq!(r32(&p, cfg::BAR0 + 20), u32::MAX);
        p.write(cfg::BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(!(r32(&p, cfg::BAR0 + 4) & !0xf) + 1, 0x1000);
        p.write(cfg::BAR0, &u32::MAX.to_le_bytes());
        assert_eq!(r32(&p, cfg::BAR0), 0, "BAR0 is not implemented");
        let (before, after) = p.write(cfg::COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(before, 0);
        assert_eq!(after, COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
        assert!(p.bus_master());
        p.write(cfg::VENDOR_ID, &[0, 0]);
        assert_eq!(r32(&p, 0), 0x1054_1af4);
        let mut b = [0u8; 4];
        p.read(254, &mut b);
        assert_eq!(b[2..], [0xff, 0xff]);
        p.flr();
        assert!(!p.bus_master());
    }
}
