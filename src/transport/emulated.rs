//! The emulated virtio-crypto device, reached through the same [`Transport`] trait as VFIO.
//!
//! This adapter is the only place in the driver that knows the emulated device exists. It
//! forwards config-space and BAR accesses to the device model, turns DMA maps into the model's
//! IOMMU entries, and routes MSI-X vectors to eventfds, exactly the operations VFIO offers.

use std::any::Any;
use std::ops::Range;
use std::sync::Arc;

use crypt_vfio_hw::VirtioCryptoPci;
pub use crypt_vfio_hw::{
    CoreKind, DeviceConfig as EmulatedConfig, DeviceStats as EmulatedStats, Fault as EmulatedFault,
    LATE_WRITE_BYTE,
};

use super::{Bar, EventNotifier, Transport};
use crate::dma::DmaRegion;
use crate::error::{Error, Result, VfioError};

/// The emulated device as a PCI function.
pub struct EmulatedTransport {
    dev: Arc<VirtioCryptoPci>,
}

impl EmulatedTransport {
    /// Creates an emulated device with `config` (queues, workers, latency, faults).
    pub fn new(config: EmulatedConfig) -> Result<Self> {
        let dev = VirtioCryptoPci::new(config)
            .map_err(|e| Error::Vfio(VfioError::Transport(format!("emulated device: {e}"))))?;
        Ok(Self { dev: Arc::new(dev) })
    }

    /// The device model's counters (for tests and benchmarks; a real device has its own).
    pub fn stats(&self) -> EmulatedStats {
        self.dev.stats()
    }

    /// Arms a scripted fault of the device model (tests, the soak): see [`EmulatedFault`].
    pub fn inject(&self, fault: EmulatedFault) {
        self.dev.inject(fault);
    }

    /// Disarms every scripted fault.
    pub fn clear_faults(&self) {
        self.dev.clear_faults();
    }
}

struct EmulatedBar {
    dev: Arc<VirtioCryptoPci>,
    index: u8,
    len: u64,
}

impl EmulatedBar {
    fn read<const N: usize>(&self, offset: u64) -> [u8; N] {
        let mut b = [0xffu8; N];
        if offset.checked_add(N as u64).is_some_and(|end| end <= self.len) {
            self.dev.bar_read(self.index, offset, &mut b);
        }
        b
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset.checked_add(data.len() as u64).is_some_and(|end| end <= self.len) {
            self.dev.bar_write(self.index, offset, data);
        }
    }
}

impl Bar for EmulatedBar {
    fn len(&self) -> u64 {
        self.len
    }
    fn read8(&self, offset: u64) -> u8 {
        self.read::<1>(offset)[0]
    }
    fn read16(&self, offset: u64) -> u16 {
        u16::from_le_bytes(self.read(offset))
    }
    fn read32(&self, offset: u64) -> u32 {
        u32::from_le_bytes(self.read(offset))
    }
    fn write8(&self, offset: u64, value: u8) {
        self.write(offset, &[value])
    }
    fn write16(&self, offset: u64, value: u16) {
        self.write(offset, &value.to_le_bytes())
    }
    fn write32(&self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes())
    }
}

impl Transport for EmulatedTransport {
    fn name(&self) -> String {
        "emulated".into()
    }

    fn read_config(&self, offset: u16, data: &mut [u8]) -> Result<()> {
        self.dev.config_read(offset, data);
        Ok(())
    }

    fn write_config(&self, offset: u16, data: &[u8]) -> Result<()> {
        self.dev.config_write(offset, data);
        Ok(())
    }

    fn bar(&self, index: u8) -> Result<Arc<dyn Bar>> {
        let len = self.dev.bar_size(index);
        if len == 0 {
            return Err(Error::Vfio(VfioError::Transport(format!("the emulated device has no BAR {index}"))));
        }
        Ok(Arc::new(EmulatedBar { dev: self.dev.clone(), index, len }))
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        // A 48-bit IOVA space, as Intel's IOMMU offers with 4-level tables.
        std::iter::once(0..(1u64 << 48)).collect()
    }

    fn dma_map(&self, iova: u64, region: &Arc<DmaRegion>) -> Result<()> {
        let owner: Arc<dyn Any + Send + Sync> = region.clone();
        // SAFETY: `owner` keeps the region's mapping alive for as long as the device holds the
        // IOMMU entry, and the region is readable and writable for its whole length.
        unsafe { self.dev.dma_map(iova, region.as_ptr(), region.len(), owner) }
            .map_err(|e| Error::Vfio(VfioError::Dma(format!("map {iova:#x}: {e}"))))
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<()> {
        self.dev
            .dma_unmap(iova, len)
            .map_err(|e| Error::Vfio(VfioError::Dma(format!("unmap {iova:#x}: {e}"))))
    }

    fn msix_vectors(&self) -> u16 {
        self.dev.msix_vectors()
    }

    fn enable_msix(&self, notifiers: &[Option<&EventNotifier>]) -> Result<()> {
        for (v, n) in notifiers.iter().enumerate() {
            let vector = u16::try_from(v)
                .map_err(|_| Error::Vfio(VfioError::Transport("too many MSI-X vectors".into())))?;
            let fd = n.map(|n| n.dup()).transpose()?;
            self.dev
                .set_irq_eventfd(vector, fd)
                .map_err(|e| Error::Vfio(VfioError::Transport(format!("MSI-X {v}: {e}"))))?;
        }
        Ok(())
    }

    fn disable_msix(&self) -> Result<()> {
        for v in 0..self.dev.msix_vectors() {
            self.dev
                .set_irq_eventfd(v, None)
                .map_err(|e| Error::Vfio(VfioError::Transport(format!("MSI-X {v}: {e}"))))?;
        }
        Ok(())
    }

    fn reset(&self) -> Result<()> {
        self.dev.reset();
        Ok(())
    }
}
