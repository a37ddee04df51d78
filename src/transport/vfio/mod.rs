//! A real PCI function bound to vfio-pci, as a [`Transport`].
//!
//! Opening follows the kernel's VFIO model: a container (one IOMMU address space, type1v2), the
//! function's group (which must be viable), and the device descriptor; then the function is reset
//! and its memory decoding and bus mastering are turned on. BARs are mmapped where the kernel
//! allows and otherwise reached with pread/pwrite; configuration space goes through the config
//! region; DMA regions are mapped at IOVAs inside the ranges the IOMMU reports; MSI-X vectors are
//! routed to eventfds. Closing resets the function again, so it never keeps DMAing into memory
//! this process is about to give back.
//!
//! This module is the only code that issues VFIO ioctls. The iommufd interface
//! (`/dev/vfio/devices/vfioN`, `/dev/iommu`) is not driven yet: the kernels this was tested on
//! (Debian 12's) do not build it, and opening explains that when it is the only interface there.

mod abi;
mod container;
mod device;
mod group;
mod region;

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crypt_vfio_spec::pci::{cfg, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX};

use super::{Bar, EventNotifier, Transport};
use crate::dma::DmaRegion;
use crate::error::{Error, Result, VfioError};
use crate::pci_sysfs::{Bdf, Sysfs};
use container::Container;
use device::VfioDevice;
use group::Group;
use region::{RegionInfo, VfioBar};

/// Number of memory BARs of a type-0 PCI function.
const BARS: usize = 6;

/// A PCI function bound to vfio-pci.
pub struct VfioTransport {
    bdf: Bdf,
    // Field order is drop order: the device descriptor goes before its group, and the group
    // before the container it joined.
    device: VfioDevice,
    _group: Group,
    container: Container,
    config: RegionInfo,
    bars: Mutex<[Option<Arc<VfioBar>>; BARS]>,
    iova: Vec<Range<u64>>,
    iommu_page: u64,
    msix: u16,
    /// Whether MSI-X is routed: the kernel refuses to disable what is not enabled.
    msix_enabled: AtomicBool,
    /// Live DMA mappings by IOVA, holding their regions so the memory outlives the mapping.
    dma: Mutex<BTreeMap<u64, Arc<DmaRegion>>>,
}

impl VfioTransport {
    /// Opens the function at `bdf`, which must be bound to vfio-pci. Each refusal says what to
    /// do: wrong address, no IOMMU, not bound, group not viable, no permission.
    pub fn open(bdf: &Bdf) -> Result<Self> {
        Self::open_in(&Sysfs::system(), bdf)
    }

    fn open_in(sysfs: &Sysfs, bdf: &Bdf) -> Result<Self> {
        let f = sysfs.function(bdf)?;
        let group_id = f.iommu_group.ok_or_else(|| Error::Vfio(VfioError::NoIommu(bdf.to_string())))?;
        if f.driver.as_deref() != Some(crate::pci_sysfs::VFIO_PCI) {
            return Err(Error::Vfio(VfioError::WrongDriver {
                bdf: bdf.to_string(),
                driver: f.driver_name().to_string(),
            }));
        }
        let container = Container::open(sysfs)?;
        let group = Group::open(sysfs, group_id, bdf)?;
        group.set_container(&container)?;
        container.set_iommu()?;
        let (iova, iommu_page) = container.iova_ranges()?;
        let device = VfioDevice::new(group.device(bdf)?)?;
        let config = device.region(VFIO_PCI_CONFIG_REGION_INDEX)?;
        let msix = u16::try_from(device.irq_count(VFIO_PCI_MSIX_IRQ_INDEX)?).unwrap_or(u16::MAX);
        let t = Self {
            bdf: *bdf,
            device,
            _group: group,
            container,
            config,
            bars: Mutex::default(),
            iova,
            iommu_page,
            msix,
            msix_enabled: AtomicBool::new(false),
            dma: Mutex::default(),
        };
        // A previous user may have left the function running (or DMAing): start from reset.
        t.reset()?;
        let mut cmd = [0u8; 2];
        t.read_config(cfg::COMMAND, &mut cmd)?;
        let cmd = u16::from_le_bytes(cmd) | COMMAND_MEMORY | COMMAND_BUS_MASTER;
        t.write_config(cfg::COMMAND, &cmd.to_le_bytes())?;
        log::info!(
            "{bdf}: VFIO group {group_id}, IOVA ranges {:x?}, IOMMU page {:#x}, {} MSI-X vectors",
            t.iova,
            t.iommu_page,
            t.msix
        );
        Ok(t)
    }

    /// The function's address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    fn dma(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<DmaRegion>>> {
        self.dma.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn config_access(&self, offset: u16, len: usize) -> Result<u64> {
        let end = u64::from(offset) + len as u64;
        if end > self.config.size {
            return Err(Error::Vfio(VfioError::Transport(format!(
                "config access {offset:#x}+{len} beyond the {:#x}-byte config space",
                self.config.size
            ))));
        }
        Ok(self.config.offset + u64::from(offset))
    }
}

impl Transport for VfioTransport {
    fn name(&self) -> String {
        self.bdf.to_string()
    }

    fn read_config(&self, offset: u16, data: &mut [u8]) -> Result<()> {
        let at = self.config_access(offset, data.len())?;
        self.device
            .fd()
            .read_exact_at(data, at)
            .map_err(|e| Error::os(format!("{}: reading config space at {offset:#x}", self.bdf), e))
    }

    fn write_config(&self, offset: u16, data: &[u8]) -> Result<()> {
        let at = self.config_access(offset, data.len())?;
        self.device
            .fd()
            .write_all_at(data, at)
            .map_err(|e| Error::os(format!("{}: writing config space at {offset:#x}", self.bdf), e))
    }

    fn bar(&self, index: u8) -> Result<Arc<dyn Bar>> {
        let i = usize::from(index);
        if i >= BARS {
            return Err(Error::Vfio(VfioError::Transport(format!("{}: there is no BAR {index}", self.bdf))));
        }
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = &bars[i] {
            return Ok(b.clone());
        }
        let info = self.device.region(u32::from(index))?;
        if info.size == 0 {
            return Err(Error::Vfio(VfioError::Transport(format!(
                "{}: BAR {index} is not implemented",
                self.bdf
            ))));
        }
        let bar = Arc::new(VfioBar::new(self.device.fd().clone(), info)?);
        if !bar.is_mapped() {
            log::info!("{}: BAR {index} is not mmappable; register accesses go through the kernel", self.bdf);
        }
        bars[i] = Some(bar.clone());
        Ok(bar)
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        self.iova.clone()
    }

    fn dma_map(&self, iova: u64, region: &Arc<DmaRegion>) -> Result<()> {
        let len = region.len() as u64;
        let page = self.iommu_page;
        if iova % page != 0 || len % page != 0 || (region.as_ptr() as u64) % page != 0 {
            return Err(Error::Vfio(VfioError::Dma(format!(
                "mapping {len:#x} bytes at IOVA {iova:#x}: not aligned to the IOMMU page of {page:#x} bytes"
            ))));
        }
        let fits = iova
            .checked_add(len)
            .is_some_and(|end| self.iova.iter().any(|r| r.start <= iova && end <= r.end));
        if !fits {
            return Err(Error::Vfio(VfioError::Dma(format!(
                "IOVA {iova:#x}+{len:#x} lies outside the IOMMU's valid ranges {:x?}",
                self.iova
            ))));
        }
        let mut dma = self.dma();
        if dma
            .range(..iova.saturating_add(len))
            .next_back()
            .is_some_and(|(&at, r)| at + r.len() as u64 > iova)
        {
            return Err(Error::Vfio(VfioError::Dma(format!(
                "IOVA {iova:#x}+{len:#x} overlaps a live mapping"
            ))));
        }
        self.container.map(iova, region.as_ptr() as u64, len)?;
        dma.insert(iova, region.clone());
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<()> {
        let mut dma = self.dma();
        match dma.get(&iova) {
            Some(r) if r.len() as u64 == len => {}
            _ => {
                return Err(Error::Vfio(VfioError::Dma(format!(
                    "no mapping of {len:#x} bytes at IOVA {iova:#x}"
                ))))
            }
        }
        self.container.unmap(iova, len)?;
        // Only now may the memory go: the IOMMU no longer translates to it.
        dma.remove(&iova);
        Ok(())
    }

    fn msix_vectors(&self) -> u16 {
        self.msix
    }

    fn enable_msix(&self, notifiers: &[Option<&EventNotifier>]) -> Result<()> {
        if notifiers.len() > usize::from(self.msix) {
            return Err(Error::Vfio(VfioError::Transport(format!(
                "{}: {} MSI-X vectors asked, the function has {}",
                self.bdf,
                notifiers.len(),
                self.msix
            ))));
        }
        let fds: Vec<i32> = notifiers.iter().map(|n| n.map_or(-1, |n| n.raw_fd())).collect();
        self.device.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, &fds)?;
        self.msix_enabled.store(true, Ordering::Release);
        Ok(())
    }

    fn disable_msix(&self) -> Result<()> {
        if !self.msix_enabled.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.device.disable_irq(VFIO_PCI_MSIX_IRQ_INDEX)
    }

    fn reset(&self) -> Result<()> {
        if !self.device.reset()? {
            log::debug!(
                "{}: the kernel cannot reset this function; relying on the virtio status reset",
                self.bdf
            );
        }
        Ok(())
    }
}

impl Drop for VfioTransport {
    fn drop(&mut self) {
        if let Err(e) = self.disable_msix() {
            log::warn!("{}: disabling MSI-X: {e}", self.bdf);
        }
        // Stop the function before its DMA memory is unmapped and freed.
        if let Err(e) = self.reset() {
            log::warn!("{}: reset on close: {e}", self.bdf);
        }
        let mut cmd = [0u8; 2];
        if self.read_config(cfg::COMMAND, &mut cmd).is_ok() {
            let cmd = u16::from_le_bytes(cmd) & !COMMAND_BUS_MASTER;
            let _ = self.write_config(cfg::COMMAND, &cmd.to_le_bytes());
        }
        let dma = std::mem::take(&mut *self.dma());
        for (iova, region) in dma {
            if let Err(e) = self.container.unmap(iova, region.len() as u64) {
                log::warn!("{}: {e}", self.bdf);
            }
        }
    }
}
