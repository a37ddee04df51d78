//! The emulated virtio-crypto device, reached through the same [`Transport`] trait as VFIO.
//!
//! This adapter is the only place in the driver that knows the emulated device exists. It
//! forwards config-space and BAR accesses to the device model, turns DMA maps into the model's
//! IOMMU entries, and routes MSI-X vectors to eventfds, exactly the operations VFIO offers.
//!
//! It also plays the function's owner wanting the function back, as vfio-pci does before an
//! unbind or a hot-unplug: [`EmulatedTransport::request_release`] signals the watched eventfd
//! and repeats every second until the driver gives the function back with
//! [`Transport::release`]. From then on the adapter is inert and counts every access that
//! still reaches it, which a correct driver never makes.

use std::any::Any;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crypt_vfio_hw::VirtioCryptoPci;
pub use crypt_vfio_hw::{
    CoreKind, DeviceConfig as EmulatedConfig, DeviceStats as EmulatedStats, Fault as EmulatedFault,
    LATE_WRITE_BYTE,
};

use super::{released_error, Bar, EventNotifier, Transport};
use crate::dma::DmaRegion;
use crate::error::{Error, Result, VfioError};

/// How often an unanswered release request is repeated (vfio-pci repeats every 10 s; the
/// emulated owner is more impatient, so tests see the repeats).
pub const RELEASE_REQUEST_PERIOD: Duration = Duration::from_secs(1);

/// The emulated device as a PCI function.
pub struct EmulatedTransport {
    dev: Arc<VirtioCryptoPci>,
    owner: Arc<Owner>,
}

/// Emulated devices made so far in this process: each is named `emulated#<n>`, in the order
/// made (the order of `--device emulated,emulated`, as the pool names its members), so that
/// the log of several tells them apart.
static MADE: AtomicU64 = AtomicU64::new(0);

/// The function's owner side: release requests, and whether the function was given back.
#[derive(Default)]
struct Owner {
    /// The device's name (`emulated#<n>`).
    name: String,
    /// Set once by [`Transport::release`]; read on every access (the hot path), so atomic.
    released: AtomicBool,
    /// Accesses that reached the adapter after the release.
    after_release: AtomicU64,
    /// Release requests signalled so far.
    requests: AtomicU64,
    state: Mutex<OwnerState>,
    changed: Condvar,
}

#[derive(Default)]
struct OwnerState {
    /// The driver's eventfd for release requests (a descriptor of its own).
    watcher: Option<File>,
    requested: bool,
    /// The transport is gone: the requesting thread ends.
    dropped: bool,
    /// Live DMA maps (IOVA to length), so that a release leaves the IOMMU empty whatever the
    /// driver forgot.
    maps: BTreeMap<u64, u64>,
}

impl Owner {
    fn lock(&self) -> MutexGuard<'_, OwnerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the function was given back; counts the access if so.
    #[inline]
    fn gone(&self) -> bool {
        if self.released.load(Ordering::Acquire) {
            self.after_release.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Signals the watcher now and every [`RELEASE_REQUEST_PERIOD`] until the release.
    fn keep_requesting(&self) {
        let mut st = self.lock();
        while !st.dropped && !self.released.load(Ordering::Acquire) {
            let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
            match st.watcher.as_mut().map(|w| w.write_all(&1u64.to_ne_bytes())) {
                Some(Ok(())) => log::info!("{}: release request #{n} sent to the driver", self.name),
                Some(Err(e)) => log::warn!("{}: signalling release request #{n}: {e}", self.name),
                None => log::info!("{}: release request #{n}, but the driver watches for none", self.name),
            }
            st = self.changed.wait_timeout(st, RELEASE_REQUEST_PERIOD).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl EmulatedTransport {
    /// Creates an emulated device with `config` (queues, workers, latency, faults).
    pub fn new(config: EmulatedConfig) -> Result<Self> {
        let dev = VirtioCryptoPci::new(config)
            .map_err(|e| Error::Vfio(VfioError::Transport(format!("emulated device: {e}"))))?;
        let name = format!("emulated#{}", MADE.fetch_add(1, Ordering::Relaxed));
        Ok(Self { dev: Arc::new(dev), owner: Arc::new(Owner { name, ..Owner::default() }) })
    }

    /// Asks the driver to give the function back, as vfio-pci does before an unbind or a
    /// hot-unplug: the eventfd of [`Transport::watch_release_request`] is signalled now and
    /// every [`RELEASE_REQUEST_PERIOD`] until [`Transport::release`]. Asking again changes
    /// nothing.
    pub fn request_release(&self) {
        {
            let mut st = self.owner.lock();
            if st.requested || self.owner.released.load(Ordering::Acquire) {
                return;
            }
            st.requested = true;
        }
        let owner = self.owner.clone();
        let spawned =
            std::thread::Builder::new().name("crypt-hw-unplug".into()).spawn(move || owner.keep_requesting());
        if let Err(e) = spawned {
            log::error!("{}: starting the release request thread: {e}", self.owner.name);
        }
    }

    /// Release requests made so far (each signalled to the driver if it watches for them).
    pub fn release_requests(&self) -> u64 {
        self.owner.requests.load(Ordering::Relaxed)
    }

    /// Whether the driver watches for release requests (holds an eventfd the owner signals).
    pub fn watches_release_requests(&self) -> bool {
        self.owner.lock().watcher.is_some()
    }

    /// Whether the driver gave the function back.
    pub fn is_released(&self) -> bool {
        self.owner.released.load(Ordering::Acquire)
    }

    /// Accesses (config space, registers, DMA maps, interrupts, resets) that reached the
    /// function after it was given back: a correct driver makes none.
    pub fn accesses_after_release(&self) -> u64 {
        self.owner.after_release.load(Ordering::Relaxed)
    }

    /// DMA maps the device model holds now.
    pub fn live_dma_maps(&self) -> usize {
        self.owner.lock().maps.len()
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

impl Drop for EmulatedTransport {
    fn drop(&mut self) {
        self.owner.lock().dropped = true;
        self.owner.changed.notify_all();
    }
}

struct EmulatedBar {
    dev: Arc<VirtioCryptoPci>,
    owner: Arc<Owner>,
    index: u8,
    len: u64,
}

impl EmulatedBar {
    fn read<const N: usize>(&self, offset: u64) -> [u8; N] {
        let mut b = [0xffu8; N];
        if self.owner.gone() {
            return b;
        }
        if offset.checked_add(N as u64).is_some_and(|end| end <= self.len) {
            self.dev.bar_read(self.index, offset, &mut b);
        }
        b
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if self.owner.gone() {
            return;
        }
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
        self.owner.name.clone()
    }

    fn read_config(&self, offset: u16, data: &mut [u8]) -> Result<()> {
        if self.owner.gone() {
            data.fill(0xff);
            return Ok(());
        }
        self.dev.config_read(offset, data);
        Ok(())
    }

    fn write_config(&self, offset: u16, data: &[u8]) -> Result<()> {
        if self.owner.gone() {
            return Err(released_error(&self.name()));
        }
        self.dev.config_write(offset, data);
        Ok(())
    }

    fn bar(&self, index: u8) -> Result<Arc<dyn Bar>> {
        if self.owner.gone() {
            return Err(released_error(&self.name()));
        }
        let len = self.dev.bar_size(index);
        if len == 0 {
            return Err(Error::Vfio(VfioError::Transport(format!("the emulated device has no BAR {index}"))));
        }
        Ok(Arc::new(EmulatedBar { dev: self.dev.clone(), owner: self.owner.clone(), index, len }))
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        // A 48-bit IOVA space, as Intel's IOMMU offers with 4-level tables.
        std::iter::once(0..(1u64 << 48)).collect()
    }

    fn dma_map(&self, iova: u64, region: &Arc<DmaRegion>) -> Result<()> {
        // Under the owner's lock, which release() takes to empty the IOMMU: no map after it.
        let mut st = self.owner.lock();
        if self.owner.gone() {
            return Err(released_error(&self.name()));
        }
        let owner: Arc<dyn Any + Send + Sync> = region.clone();
        // SAFETY: `owner` keeps the region's mapping alive for as long as the device holds the
        // IOMMU entry, and the region is readable and writable for its whole length.
        unsafe { self.dev.dma_map(iova, region.as_ptr(), region.len(), owner) }
            .map_err(|e| Error::Vfio(VfioError::Dma(format!("map {iova:#x}: {e}"))))?;
        st.maps.insert(iova, region.len() as u64);
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<()> {
        let mut st = self.owner.lock();
        if self.owner.gone() {
            return Err(released_error(&self.name()));
        }
        self.dev
            .dma_unmap(iova, len)
            .map_err(|e| Error::Vfio(VfioError::Dma(format!("unmap {iova:#x}: {e}"))))?;
        st.maps.remove(&iova);
        Ok(())
    }

    fn msix_vectors(&self) -> u16 {
        self.dev.msix_vectors()
    }

    fn enable_msix(&self, notifiers: &[Option<&EventNotifier>]) -> Result<()> {
        if self.owner.gone() {
            return Err(released_error(&self.name()));
        }
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
        if self.owner.gone() {
            return Err(released_error(&self.name()));
        }
        for v in 0..self.dev.msix_vectors() {
            self.dev
                .set_irq_eventfd(v, None)
                .map_err(|e| Error::Vfio(VfioError::Transport(format!("MSI-X {v}: {e}"))))?;
        }
        Ok(())
    }

    fn reset(&self) -> Result<()> {
        if self.owner.gone() {
            return Err(released_error(&self.name()));
        }
        self.dev.reset();
        Ok(())
    }

    fn watch_release_request(&self, notifier: &EventNotifier) -> Result<bool> {
        if self.owner.gone() {
            return Err(released_error(&self.name()));
        }
        self.owner.lock().watcher = Some(File::from(notifier.dup()?));
        Ok(true)
    }

    fn unwatch_release_request(&self) {
        // Not an access of the function (the owner's side only): not counted after a release.
        self.owner.lock().watcher = None;
    }

    fn release(&self) -> Result<()> {
        let mut st = self.owner.lock();
        if self.owner.released.load(Ordering::Acquire) {
            return Ok(());
        }
        // What the kernel does when the last descriptor of a vfio-pci function closes: the
        // function is reset and its interrupts and IOMMU entries go.
        self.dev.reset();
        for v in 0..self.dev.msix_vectors() {
            let _ = self.dev.set_irq_eventfd(v, None);
        }
        if !st.maps.is_empty() {
            log::warn!("{}: released with {} DMA maps left; removing them", self.owner.name, st.maps.len());
        }
        for (iova, len) in std::mem::take(&mut st.maps) {
            if let Err(e) = self.dev.dma_unmap(iova, len) {
                log::error!("{}: unmapping {iova:#x} on release: {e}", self.owner.name);
            }
        }
        st.watcher = None;
        self.owner.released.store(true, Ordering::Release);
        self.owner.changed.notify_all();
        log::info!("{}: given back by the driver", self.owner.name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_function_reads_all_ones_refuses_changes_and_counts_each_access() {
        let t = EmulatedTransport::new(EmulatedConfig::default()).unwrap();
        let bar = t.bar(4).unwrap();
        let mut id = [0u8; 2];
        t.read_config(0, &mut id).unwrap();
        assert_eq!(u16::from_le_bytes(id), 0x1af4);
        let region = Arc::new(DmaRegion::new(4096).unwrap());
        t.dma_map(0x10000, &region).unwrap();
        assert_eq!(t.live_dma_maps(), 1);
        t.release().unwrap();
        assert!(t.is_released());
        // The kernel leaves nothing of the driver's in the IOMMU.
        assert_eq!(t.live_dma_maps(), 0);
        assert_eq!(t.accesses_after_release(), 0);
        t.read_config(0, &mut id).unwrap();
        assert_eq!(id, [0xff, 0xff]);
        assert_eq!(bar.read32(0), u32::MAX, "a BAR handed out before reads all ones");
        bar.write32(0x14, 0);
        let released =
            |r: Result<()>| matches!(r, Err(Error::Vfio(VfioError::Transport(m))) if m.ends_with("released"));
        assert!(released(t.write_config(4, &[0, 0])));
        assert!(released(t.dma_map(0x20000, &region)));
        assert!(released(t.dma_unmap(0x10000, 4096)));
        assert!(released(t.reset()));
        assert!(t.bar(4).is_err());
        assert_eq!(t.accesses_after_release(), 8);
        // Giving back twice is giving back once.
        t.release().unwrap();
    }
}
