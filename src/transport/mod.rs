//! What a driver needs from a PCI function, whoever provides it.
//!
//! [`Transport`] is the seam between device drivers and the way the device is reached: VFIO for
//! a real function bound to vfio-pci, or the emulated device for tests and benchmarks. A driver
//! gets config space, BAR registers (volatile accesses through [`Bar`]), DMA mapping of pool
//! regions, and MSI-X vectors delivered to eventfds, and nothing else: no side door exists that
//! real hardware would not offer.

pub mod emulated;
mod irq;
pub mod vfio;

use std::ops::Range;
use std::sync::Arc;

pub use irq::EventNotifier;

use crate::dma::DmaRegion;
use crate::error::Result;

/// A PCI function, as a driver sees it.
pub trait Transport: Send + Sync {
    /// Where the function is: a PCI address, or `emulated`.
    fn name(&self) -> String;

    /// Reads PCI configuration space at `offset`.
    fn read_config(&self, offset: u16, data: &mut [u8]) -> Result<()>;

    /// Writes PCI configuration space at `offset`.
    fn write_config(&self, offset: u16, data: &[u8]) -> Result<()>;

    /// The memory BAR `index`, for register access.
    fn bar(&self, index: u8) -> Result<Arc<dyn Bar>>;

    /// IOVA ranges the IOMMU accepts for this function.
    fn iova_ranges(&self) -> Vec<Range<u64>>;

    /// Makes `region` visible to the device at `iova`. The transport keeps the region alive
    /// until [`dma_unmap`](Self::dma_unmap).
    fn dma_map(&self, iova: u64, region: &Arc<DmaRegion>) -> Result<()>;

    /// Removes a mapping made by [`dma_map`](Self::dma_map).
    fn dma_unmap(&self, iova: u64, len: u64) -> Result<()>;

    /// Number of MSI-X vectors the function has (0 without MSI-X).
    fn msix_vectors(&self) -> u16;

    /// Routes MSI-X vector `i` to `notifiers[i]` (None leaves it unrouted) and enables MSI-X.
    fn enable_msix(&self, notifiers: &[Option<&EventNotifier>]) -> Result<()>;

    /// Disconnects all MSI-X vectors.
    fn disable_msix(&self) -> Result<()>;

    /// Resets the function (function-level reset where available).
    fn reset(&self) -> Result<()>;

    /// Asks to be told when the function's owner wants it back: vfio-pci before an unbind or a
    /// hot-unplug (its device request interrupt), the emulated device on request. `notifier`
    /// is signalled for each such request, repeatedly until [`release`](Self::release).
    /// Returns whether the transport can tell; without it the owner's unbind waits until this
    /// process closes the function.
    fn watch_release_request(&self, notifier: &EventNotifier) -> Result<bool> {
        let _ = notifier;
        Ok(false)
    }

    /// Stops signalling the notifier of [`watch_release_request`](Self::watch_release_request)
    /// and lets go of it (the driver's listener is ending). Nothing to do if none is watched,
    /// or once the function was given back.
    fn unwatch_release_request(&self) {}

    /// Gives the function back to its owner for good, once the driver has stopped it and
    /// unmapped its DMA memory: interrupts off, function reset, bus mastering off, every
    /// descriptor on the function closed. Afterwards config reads give all ones, BARs handed
    /// out before read all ones and drop writes, and writes, maps and unmaps fail with
    /// `Transport("released")`.
    fn release(&self) -> Result<()> {
        Err(crate::Error::Vfio(crate::error::VfioError::Transport(format!(
            "{}: this transport cannot give the function back",
            self.name()
        ))))
    }
}

/// What a transport says once its function was given back ([`Transport::release`]).
pub(crate) fn released_error(name: &str) -> crate::Error {
    crate::Error::Vfio(crate::error::VfioError::Transport(format!("{name}: released")))
}

/// A memory BAR's registers.
///
/// Accesses are volatile and bounds-checked: an access outside the BAR reads all ones and writes
/// nothing, as an unclaimed PCI read does, so that a wrong offset from a misbehaving device
/// cannot become a wild pointer.
pub trait Bar: Send + Sync {
    /// Length of the BAR in bytes.
    fn len(&self) -> u64;
    /// Whether the BAR is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads a byte.
    fn read8(&self, offset: u64) -> u8;
    /// Reads a little-endian u16.
    fn read16(&self, offset: u64) -> u16;
    /// Reads a little-endian u32.
    fn read32(&self, offset: u64) -> u32;
    /// Writes a byte.
    fn write8(&self, offset: u64, value: u8);
    /// Writes a little-endian u16.
    fn write16(&self, offset: u64, value: u16);
    /// Writes a little-endian u32.
    fn write32(&self, offset: u64, value: u32);
    /// Writes a u64 as two u32 halves, low first, as virtio allows for 64-bit fields.
    fn write64(&self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

/// A register window inside a BAR: a base offset and a length, checked once when created.
#[derive(Clone)]
pub struct BarWindow {
    bar: Arc<dyn Bar>,
    base: u64,
    len: u64,
}

impl BarWindow {
    /// A window of `len` bytes at `base` in `bar`; fails if it does not fit.
    pub fn new(bar: Arc<dyn Bar>, base: u64, len: u64) -> Result<Self> {
        if base.checked_add(len).is_none_or(|end| end > bar.len()) {
            return Err(crate::Error::Device(crate::error::DeviceError::Unsupported(format!(
                "register window {base:#x}+{len:#x} lies outside its {:#x}-byte BAR",
                bar.len()
            ))));
        }
        Ok(Self { bar, base, len })
    }

    /// Length of the window.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(&self, off: u64, width: u64) -> Option<u64> {
        (off.checked_add(width)? <= self.len).then_some(self.base + off)
    }

    /// Reads a byte; all ones outside the window.
    pub fn read8(&self, off: u64) -> u8 {
        self.at(off, 1).map_or(!0, |o| self.bar.read8(o))
    }
    /// Reads a u16; all ones outside the window.
    pub fn read16(&self, off: u64) -> u16 {
        self.at(off, 2).map_or(!0, |o| self.bar.read16(o))
    }
    /// Reads a u32; all ones outside the window.
    pub fn read32(&self, off: u64) -> u32 {
        self.at(off, 4).map_or(!0, |o| self.bar.read32(o))
    }
    /// Reads a u64 as two u32 halves, low first.
    pub fn read64(&self, off: u64) -> u64 {
        u64::from(self.read32(off)) | (u64::from(self.read32(off + 4)) << 32)
    }
    /// Writes a byte; ignored outside the window.
    pub fn write8(&self, off: u64, v: u8) {
        if let Some(o) = self.at(off, 1) {
            self.bar.write8(o, v)
        }
    }
    /// Writes a u16; ignored outside the window.
    pub fn write16(&self, off: u64, v: u16) {
        if let Some(o) = self.at(off, 2) {
            self.bar.write16(o, v)
        }
    }
    /// Writes a u32; ignored outside the window.
    pub fn write32(&self, off: u64, v: u32) {
        if let Some(o) = self.at(off, 4) {
            self.bar.write32(o, v)
        }
    }
    /// Writes a u64 as two u32 halves, low first.
    pub fn write64(&self, off: u64, v: u64) {
        if let Some(o) = self.at(off, 8) {
            self.bar.write64(o, v)
        }
    }
}
