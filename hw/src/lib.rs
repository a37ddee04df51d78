//! An emulated virtio-crypto PCI function: the hardware of every crypt-vfio test that runs
//! without a device.
//!
//! [`VirtioCryptoPci`] offers exactly what VFIO offers for a real function — configuration
//! space, memory BARs, IOMMU maps, MSI-X vectors routed to eventfds, and function reset — and
//! behind it behaves like a virtio 1.2 crypto device: split virtqueues read at IOVAs, a control
//! queue answered synchronously, and worker threads that run real AES (through
//! `crypt_vfio_cores`) on the driver's buffers. It trusts nothing the driver writes: malformed
//! rings end in DEVICE_NEEDS_RESET, bad requests in status codes, never in a panic.
//!
//! Layout (imitating QEMU's virtio-crypto-pci so the driver meets the same offsets there):
//!
//! * config space: 1af4:1054 rev 1, class 10/80, subsystem 1af4:1100; capabilities MSI-X
//!   (0x40), then virtio COMMON (0x50), NOTIFY (0x60), ISR (0x74), DEVICE (0x84).
//! * BAR4, 64-bit memory, 16 KiB: common configuration at 0x0, ISR at 0x1000, device
//!   configuration at 0x2000, doorbells at 0x3000 + 4 × queue index.
//! * BAR1, 32-bit memory: MSI-X table at 0, PBA at 0x800 (or after a larger table).
//! * MSI-X: `data_queues + 2` vectors, enough for one for configuration changes and one per
//!   virtqueue; which vector serves what is the driver's choice (`config_msix_vector`,
//!   `queue_msix_vector`).
//!
//! Timing and fault injection (latency, jitter, a small in-flight window, out-of-order
//! completion, injected errors) come from [`DeviceConfig`]; scripted misbehaviour (lost,
//! duplicated or lying completions, ignored resets, late control answers) from [`Fault`],
//! armed while a driver runs.

#![deny(missing_docs)]

mod bar;
mod chain;
mod common_cfg;
mod config;
mod control;
mod device;
mod device_cfg;
mod dma;
mod error;
mod faults;
mod iommu;
mod msix;
mod pci_config;
mod prng;
mod quiesce;
mod request;
mod sessions;
mod stats;
mod virtqueue;
mod worker;

use std::any::Any;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

pub use config::{DeviceConfig, MAX_DATA_QUEUES};
pub use crypt_vfio_cores::CoreKind;
pub use error::HwError;
pub use faults::{Fault, LATE_WRITE_BYTE};
pub use stats::DeviceStats;

use device::Device;

/// The emulated virtio-crypto PCI function.
///
/// All methods take `&self` and may be called from any thread, as a driver may touch a real
/// function's registers from several threads.
pub struct VirtioCryptoPci {
    dev: Arc<Device>,
    workers: Vec<JoinHandle<()>>,
}

impl VirtioCryptoPci {
    /// Creates the function and starts its worker threads. Fails if `cfg` is not a device the
    /// model can be (see [`DeviceConfig`]'s fields for the limits).
    pub fn new(cfg: DeviceConfig) -> Result<Self, HwError> {
        cfg.validate()?;
        let n = cfg.workers;
        let dev = Arc::new(Device::new(cfg));
        let mut this = Self { dev, workers: Vec::with_capacity(n) };
        for id in 0..n {
            let handle = worker::spawn(this.dev.clone(), id)
                .map_err(|source| HwError::Os { what: "starting a device worker thread", source })?;
            this.workers.push(handle);
        }
        let dev = this.dev.clone();
        let faults = std::thread::Builder::new()
            .name("crypt-hw-faults".into())
            .spawn(move || {
                let _ = dev.fault_thread.set(std::thread::current());
                dev.run_faults();
            })
            .map_err(|source| HwError::Os { what: "starting the fault thread", source })?;
        this.workers.push(faults);
        Ok(this)
    }

    /// Reads PCI configuration space at `offset`; bytes beyond the 256-byte space read 0xff.
    pub fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.dev.pci.read(offset, data);
    }

    /// Writes PCI configuration space at `offset`. Only the command register (memory enable,
    /// bus master, INTx disable), the MSI-X enable and function-mask bits, the BAR address bits
    /// (so BAR sizing works) and the interrupt line are writable; other writes are ignored.
    /// The device processes no queue and does no DMA while bus mastering is off.
    pub fn config_write(&self, offset: u16, data: &[u8]) {
        self.dev.config_write(offset, data);
    }

    /// Size of BAR `bar` in bytes; 0 if the function does not implement it.
    pub fn bar_size(&self, bar: u8) -> u64 {
        self.dev.bar_size(bar)
    }

    /// Reads `data.len()` bytes (1, 2, 4 or 8) at `offset` in BAR `bar`. Unimplemented places
    /// and other widths read as all ones. Reading the ISR clears it.
    pub fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        self.dev.bar_read(bar, offset, data);
    }

    /// Writes `data` (1, 2, 4 or 8 bytes) at `offset` in BAR `bar`. A doorbell write on the
    /// control queue is answered before this returns; on a data queue it wakes the workers.
    pub fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        self.dev.bar_write(bar, offset, data);
    }

    /// Maps host memory at an IOVA for device DMA, as an IOMMU map does. `iova` and `host` must
    /// be page aligned (4 KiB) and the range must not overlap an existing map. `owner` is kept
    /// alive until the range is unmapped and no worker uses the old mappings any more.
    ///
    /// # Safety
    /// `host..host + len` must be valid readable and writable memory for as long as `owner`
    /// lives.
    pub unsafe fn dma_map(
        &self,
        iova: u64,
        host: *mut u8,
        len: usize,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<(), HwError> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.dev.iommu.map(iova, host, len, owner) }
    }

    /// Removes the mapping that is exactly `iova..iova + len`.
    pub fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), HwError> {
        self.dev.iommu.unmap(iova, len)
    }

    /// Number of MSI-X vectors: `data_queues + 2`, one for configuration changes and one for
    /// each virtqueue (the control queue included).
    pub fn msix_vectors(&self) -> u16 {
        self.dev.cfg.msix_vectors()
    }

    /// Routes MSI-X vector `vector` to an eventfd (stand-in for `VFIO_DEVICE_SET_IRQS`): the
    /// device writes 1 (u64) to it to interrupt. `None` disconnects the vector. Routing
    /// survives resets, as VFIO's does.
    pub fn set_irq_eventfd(&self, vector: u16, fd: Option<OwnedFd>) -> Result<(), HwError> {
        self.dev.msix.set_eventfd(vector, fd)
    }

    /// Function-level reset: as writing 0 to `device_status` (queues disabled, sessions
    /// dropped, requests in flight dropped without completion), plus the PCI command register
    /// cleared, so the driver must enable bus mastering again.
    pub fn reset(&self) {
        self.dev.flr();
    }

    /// The device's counters.
    pub fn stats(&self) -> DeviceStats {
        let mut s = self.dev.counters.snapshot();
        s.faults_injected = self.dev.faults.injected.load(Ordering::Relaxed);
        s
    }

    /// Arms `fault` (see [`Fault`] for which faults are one-shot and which persist).
    pub fn inject(&self, fault: Fault) {
        self.dev.faults.inject(fault);
        if matches!(fault, Fault::NeverAnswer | Fault::IgnoreReset { .. } | Fault::ReuseSessionIds) {
            self.dev.faults.injected.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Disarms every fault. Requests the device already holds stay held until a reset.
    pub fn clear_faults(&self) {
        self.dev.faults.clear();
    }
}

impl Drop for VirtioCryptoPci {
    fn drop(&mut self) {
        self.dev.shutdown.store(true, Ordering::SeqCst);
        self.dev.wake_all_workers();
        self.dev.wake_fault_thread();
        for h in self.workers.drain(..) {
            if h.join().is_err() {
                log::error!("a device worker thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for VirtioCryptoPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioCryptoPci").field("config", &self.dev.cfg).finish_non_exhaustive()
    }
}
