//! Where things are in the function's memory BARs, and the dispatch of BAR accesses to them.
//!
//! The layout imitates QEMU's virtio-crypto-pci, so that a driver tested here meets the same
//! offsets on the real rig: BAR4 is a 16 KiB 64-bit memory BAR holding the common
//! configuration at 0x0, the ISR at 0x1000, the device configuration at 0x2000 and the
//! doorbells at 0x3000 (4 bytes per queue); BAR1 holds the MSI-X table and pending-bit array.

use crate::device::Device;

/// The BAR holding the virtio structures.
pub(crate) const VIRTIO_BAR: u8 = 4;
/// The BAR holding the MSI-X table and PBA.
pub(crate) const MSIX_BAR: u8 = 1;
/// Size of BAR4.
pub(crate) const VIRTIO_BAR_SIZE: u64 = 0x4000;
/// Each virtio structure gets a 4 KiB window.
pub(crate) const REGION_LEN: u64 = 0x1000;
/// Offset of the common configuration in BAR4.
pub(crate) const COMMON_OFFSET: u64 = 0x0;
/// Offset of the ISR status byte in BAR4.
pub(crate) const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device configuration in BAR4.
pub(crate) const DEVICE_OFFSET: u64 = 0x2000;
/// Offset of the doorbells in BAR4.
pub(crate) const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' doorbells (`notify_off_multiplier`).
pub(crate) const NOTIFY_MULTIPLIER: u32 = 4;

/// Placement of the MSI-X table and PBA in BAR1 for a number of vectors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MsixLayout {
    pub vectors: u16,
    pub pba_offset: u64,
    pub bar_size: u64,
}

impl MsixLayout {
    pub(crate) fn new(vectors: u16) -> Self {
        let table_len = u64::from(vectors) * 16;
        let pba_offset = table_len.div_ceil(0x800).max(1) * 0x800;
        let pba_len = u64::from(vectors).div_ceil(64) * 8;
        let bar_size = (pba_offset + pba_len).next_power_of_two().max(0x1000);
        Self { vectors, pba_offset, bar_size }
    }
}

/// Whether `len` is an access width the device answers.
fn valid_width(len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8)
}

impl Device {
    /// Size of BAR `bar`, 0 if the function does not implement it.
    pub(crate) fn bar_size(&self, bar: u8) -> u64 {
        match bar {
            VIRTIO_BAR => VIRTIO_BAR_SIZE,
            MSIX_BAR => self.msix.layout().bar_size,
            _ => 0,
        }
    }

    /// A read from a BAR; unimplemented places and odd widths read as all ones, as an
    /// unclaimed PCI read does.
    pub(crate) fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let len = data.len() as u64;
        if !valid_width(data.len()) || offset.checked_add(len).is_none_or(|end| end > self.bar_size(bar)) {
            return;
        }
        if bar == MSIX_BAR {
            self.msix.read(offset, data);
            return;
        }
        let (base, rel) = (offset & !(REGION_LEN - 1), offset & (REGION_LEN - 1));
        if rel + len > REGION_LEN {
            return;
        }
        match base {
            COMMON_OFFSET => self.common_read(rel, data),
            ISR_OFFSET => {
                data.fill(0);
                if rel == 0 {
                    data[0] = self.take_isr();
                }
            }
            DEVICE_OFFSET => {
                data.fill(0);
                let img = &self.device_cfg;
                let rel = rel as usize;
                if rel < img.len() {
                    let n = data.len().min(img.len() - rel);
                    data[..n].copy_from_slice(&img[rel..rel + n]);
                }
            }
            NOTIFY_OFFSET => data.fill(0),
            _ => {}
        }
    }

    /// A write to a BAR; writes to read-only or unimplemented places are dropped.
    pub(crate) fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if !valid_width(data.len()) || offset.checked_add(len).is_none_or(|end| end > self.bar_size(bar)) {
            return;
        }
        if bar == MSIX_BAR {
            self.msix.write(offset, data);
            return;
        }
        let (base, rel) = (offset & !(REGION_LEN - 1), offset & (REGION_LEN - 1));
        if rel + len > REGION_LEN {
            return;
        }
        match base {
            COMMON_OFFSET => self.common_write(rel, data),
            NOTIFY_OFFSET => self.doorbell((rel / u64::from(NOTIFY_MULTIPLIER)) as u16),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msix_layout_fits() {
        let l = MsixLayout::new(6);
        assert_eq!((l.pba_offset, l.bar_size), (0x800, 0x1000));
        let l = MsixLayout::new(1025);
        assert!(l.pba_offset >= 1025 * 16);
        assert!(l.bar_size >= l.pba_offset + 17 * 8);
        assert!(l.bar_size.is_power_of_two());
    }
}
