//! Counters of what the device did, for tests and benchmarks to check against what the driver
//! believes happened (a real card exposes similar counters through its firmware).
//!
//! Workers add to these once per batch rather than per request, so counting stays off the
//! per-request cost that benchmarks measure.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crypt_vfio_spec::crypto::status;

/// A snapshot of the device's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Data requests completed (used elements published on data queues), whatever their status.
    pub data_completed: u64,
    /// Data requests completed with status OK.
    pub data_ok: u64,
    /// Data requests completed with status ERR (including injected errors).
    pub data_err: u64,
    /// Data requests completed with status BADMSG (AEAD tag mismatch).
    pub data_badmsg: u64,
    /// Data requests completed with status NOTSUPP.
    pub data_notsupp: u64,
    /// Data requests completed with status INVSESS.
    pub data_invsess: u64,
    /// Data requests of those counted in `data_err` that failed because of `error_rate`.
    pub data_injected_errors: u64,
    /// Control requests answered.
    pub ctrl_completed: u64,
    /// Doorbell writes received, on any queue.
    pub notifications: u64,
    /// Interrupts sent (eventfd writes), queue and configuration interrupts together.
    pub interrupts: u64,
    /// Sessions created.
    pub sessions_created: u64,
    /// Sessions destroyed by the driver (not counting those dropped by a reset).
    pub sessions_destroyed: u64,
    /// Virtqueues stopped because the driver put something malformed or unreadable on them.
    pub rings_broken: u64,
    /// Data requests taken from rings and dropped uncompleted by a reset.
    pub dropped_by_reset: u64,
    /// Device resets (status 0 written, or function-level reset).
    pub resets: u64,
    /// Most data requests in flight (taken from rings, not yet completed) seen at once.
    pub max_in_flight: u64,
    /// Device writes that hit IOVA space the driver had unmapped (blocked by the IOMMU).
    pub iommu_faults: u64,
    /// Writes a device that ignored a reset made to buffers it still held.
    pub late_writes: u64,
    /// Faults committed from the fault plan ([`crate::Fault`]), one-shot faults counted once.
    pub faults_injected: u64,
}

/// The live counters behind [`DeviceStats`].
#[derive(Default)]
pub(crate) struct Counters {
    pub data_completed: AtomicU64,
    pub data_by_status: [AtomicU64; 8],
    pub data_injected_errors: AtomicU64,
    pub ctrl_completed: AtomicU64,
    pub notifications: AtomicU64,
    pub interrupts: AtomicU64,
    pub sessions_created: AtomicU64,
    pub sessions_destroyed: AtomicU64,
    pub rings_broken: AtomicU64,
    pub dropped_by_reset: AtomicU64,
    pub resets: AtomicU64,
    pub max_in_flight: AtomicU64,
    pub iommu_faults: AtomicU64,
    pub late_writes: AtomicU64,
}

/// Per-batch sums a worker keeps before adding them to [`Counters`].
#[derive(Default)]
pub(crate) struct LocalCounts {
    pub completed: u64,
    pub by_status: [u64; 8],
    pub injected: u64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        if n != 0 {
            c.fetch_add(n, Relaxed);
        }
    }

    /// Adds a worker's batch sums and clears them.
    pub(crate) fn flush(&self, local: &mut LocalCounts) {
        Self::add(&self.data_completed, local.completed);
        for (c, n) in self.data_by_status.iter().zip(local.by_status) {
            Self::add(c, n);
        }
        Self::add(&self.data_injected_errors, local.injected);
        *local = LocalCounts::default();
    }

    pub(crate) fn snapshot(&self) -> DeviceStats {
        let s = |i: u8| self.data_by_status[usize::from(i)].load(Relaxed);
        DeviceStats {
            data_completed: self.data_completed.load(Relaxed),
            data_ok: s(status::OK),
            data_err: s(status::ERR),
            data_badmsg: s(status::BADMSG),
            data_notsupp: s(status::NOTSUPP),
            data_invsess: s(status::INVSESS),
            data_injected_errors: self.data_injected_errors.load(Relaxed),
            ctrl_completed: self.ctrl_completed.load(Relaxed),
            notifications: self.notifications.load(Relaxed),
            interrupts: self.interrupts.load(Relaxed),
            sessions_created: self.sessions_created.load(Relaxed),
            sessions_destroyed: self.sessions_destroyed.load(Relaxed),
            rings_broken: self.rings_broken.load(Relaxed),
            dropped_by_reset: self.dropped_by_reset.load(Relaxed),
            resets: self.resets.load(Relaxed),
            max_in_flight: self.max_in_flight.load(Relaxed),
            iommu_faults: self.iommu_faults.load(Relaxed),
            late_writes: self.late_writes.load(Relaxed),
            faults_injected: 0,
        }
    }
}

impl LocalCounts {
    /// Records one completed data request with `status`.
    pub(crate) fn record(&mut self, status: u8) {
        self.completed += 1;
        self.by_status[usize::from(status & 7)] += 1;
    }
}
