//! The state of the emulated function shared by the register interface (the driver's thread),
//! the control queue and the worker threads, and the device-wide actions they trigger: reset,
//! doorbells, interrupts and stopping a queue that the driver broke.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crypt_vfio_spec::crypto::config as crypto_config;
use crypt_vfio_spec::pci::{status, ISR_CONFIG, ISR_QUEUE, VIRTIO_MSI_NO_VECTOR};

use crate::bar::MsixLayout;
use crate::common_cfg::TransportRegs;
use crate::config::DeviceConfig;
use crate::faults::{Faults, LateCtrl, ResetBehaviour};
use crate::iommu::Iommu;
use crate::msix::Msix;
use crate::pci_config::PciConfig;
use crate::quiesce::Quiesce;
use crate::sessions::Sessions;
use crate::stats::Counters;
use crate::virtqueue::{Ring, RingFault};
use crate::worker::WorkerSlot;

/// Keeps a hot atomic on its own cache line(s).
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct Padded<T>(pub T);

/// One virtqueue as the device sees it.
pub(crate) struct Queue {
    /// The ring while the queue is enabled. Workers only `try_lock` it.
    ring: Mutex<Option<Ring>>,
    /// The MSI-X vector of the queue, read on every interrupt.
    pub vector: AtomicU16,
}

impl Queue {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Option<Ring>> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, Option<Ring>>> {
        match self.ring.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// The emulated function.
pub(crate) struct Device {
    pub cfg: DeviceConfig,
    pub pci: PciConfig,
    pub msix: Msix,
    pub device_cfg: [u8; crypto_config::SIZE as usize],
    regs: Mutex<TransportRegs>,
    pub status: AtomicU8,
    /// Features confirmed by FEATURES_OK.
    pub negotiated: AtomicU64,
    /// DRIVER_OK is set, FAILED is not, and bus mastering is on: queues may be processed.
    running: AtomicBool,
    isr: AtomicU8,
    pub config_vector: AtomicU16,
    pub queues: Box<[Queue]>,
    pub iommu: Iommu,
    pub sessions: Sessions,
    pub counters: Counters,
    /// Data requests taken from rings and not completed yet, device-wide.
    pub inflight: Padded<AtomicUsize>,
    pub quiesce: Quiesce,
    pub workers: Box<[WorkerSlot]>,
    pub shutdown: AtomicBool,
    /// The scripted faults.
    pub faults: Faults,
    /// The thread that commits timed faults (late answers, writes after an ignored reset).
    pub fault_thread: std::sync::OnceLock<std::thread::Thread>,
    /// A reset was ignored: the held requests' buffers keep being written.
    pub rogue: AtomicBool,
    /// Held while a round of late writes runs, so that a reset the device obeys can wait for
    /// the round to end.
    rogue_round: Mutex<()>,
    /// A control answer held back by [`crate::Fault::CtrlLate`]; the control queue stalls
    /// while it is there.
    pub late_ctrl: Mutex<Option<LateCtrl>>,
}

impl Device {
    pub(crate) fn new(cfg: DeviceConfig) -> Self {
        let layout = MsixLayout::new(cfg.msix_vectors());
        let n = cfg.num_queues();
        Self {
            pci: PciConfig::new(n, layout),
            msix: Msix::new(layout),
            device_cfg: crate::device_cfg::image(&cfg),
            regs: Mutex::new(TransportRegs::new(n, cfg.max_queue_size)),
            status: AtomicU8::new(0),
            negotiated: AtomicU64::new(0),
            running: AtomicBool::new(false),
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queues: (0..n)
                .map(|_| Queue { ring: Mutex::new(None), vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR) })
                .collect(),
            iommu: Iommu::new(),
            sessions: Sessions::new(cfg.max_sessions, cfg.core),
            counters: Counters::default(),
            inflight: Padded(AtomicUsize::new(0)),
            quiesce: Quiesce::new(cfg.workers),
            workers: (0..cfg.workers).map(|_| WorkerSlot::default()).collect(),
            shutdown: AtomicBool::new(false),
            faults: Faults::default(),
            fault_thread: std::sync::OnceLock::new(),
            rogue: AtomicBool::new(false),
            rogue_round: Mutex::new(()),
            late_ctrl: Mutex::new(None),
            cfg,
        }
    }

    /// The common configuration registers; holding them serialises all driver-visible state
    /// changes (status, queue setup, reset, control requests).
    pub(crate) fn regs(&self) -> MutexGuard<'_, TransportRegs> {
        self.regs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Recomputes whether queues may be processed, and starts processing if they now may.
    pub(crate) fn update_running(&self) {
        let s = self.status.load(Ordering::SeqCst);
        let now = s & status::DRIVER_OK != 0 && s & status::FAILED == 0 && self.pci.bus_master();
        let was = self.running.swap(now, Ordering::AcqRel);
        if now && !was {
            self.drain_ctrl();
            self.wake_workers();
        }
    }

    /// Reads and clears the ISR status.
    pub(crate) fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    /// A doorbell write for queue `q`.
    pub(crate) fn doorbell(&self, q: u16) {
        self.counters.notifications.fetch_add(1, Ordering::Relaxed);
        if q >= self.cfg.num_queues() {
            log::debug!("doorbell for queue {q}, which does not exist");
        } else if q == self.cfg.ctrl_queue() {
            let _regs = self.regs();
            self.drain_ctrl();
        } else {
            self.wake_workers();
        }
    }

    /// Wakes workers that went to sleep waiting for a doorbell. The gate's fences make the
    /// driver's published buffers and a worker's sleep meet: either the worker's re-check of the
    /// rings sees the buffers, or this sees the worker asleep.
    pub(crate) fn wake_workers(&self) {
        for w in self.workers.iter() {
            w.gate.notify();
        }
    }

    /// Wakes every worker, sleeping or not.
    pub(crate) fn wake_all_workers(&self) {
        for w in self.workers.iter() {
            w.gate.wake();
        }
    }

    /// Signals `vector` if it is assigned and routed; returns whether an interrupt was sent.
    fn signal(&self, vector: u16) -> bool {
        if vector != VIRTIO_MSI_NO_VECTOR && self.msix.signal(vector) {
            self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Interrupts the driver for used buffers on queue `q`.
    pub(crate) fn queue_interrupt(&self, q: u16) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        self.signal(self.queues[usize::from(q)].vector.load(Ordering::Relaxed));
    }

    /// Interrupts the driver for a configuration change (here: DEVICE_NEEDS_RESET).
    fn config_interrupt(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        self.signal(self.config_vector.load(Ordering::Relaxed));
    }

    /// Stops queue `q` because of `fault`: the device needs a reset, and says so.
    pub(crate) fn break_ring(&self, q: u16, ring: &mut Ring, fault: RingFault) {
        if ring.broken {
            return;
        }
        ring.broken = true;
        log::warn!("queue {q}: {}; stopping the queue, the device needs a reset", fault.0);
        self.counters.rings_broken.fetch_add(1, Ordering::Relaxed);
        self.status.fetch_or(status::DEVICE_NEEDS_RESET, Ordering::SeqCst);
        self.config_interrupt();
    }

    /// Like [`Device::break_ring`] for a caller that does not hold the queue's lock.
    pub(crate) fn break_queue(&self, q: u16, fault: RingFault) {
        if let Some(ring) = self.queues[usize::from(q)].lock().as_mut() {
            self.break_ring(q, ring, fault);
        }
    }

    /// Device reset (status 0): every queue disabled, sessions dropped, requests in flight
    /// dropped without completion, and no worker touching driver memory when it returns.
    pub(crate) fn reset_locked(&self, regs: &mut TransportRegs) {
        self.running.store(false, Ordering::SeqCst);
        self.rogue.store(false, Ordering::SeqCst);
        // A round of late writes that started before the flag changed ends before the reset.
        drop(self.rogue_round.lock().unwrap_or_else(PoisonError::into_inner));
        self.faults.release_held();
        *self.late_ctrl.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.status.store(0, Ordering::SeqCst);
        self.quiesce.advance_and_wait(|| self.wake_all_workers());
        for q in self.queues.iter() {
            *q.lock() = None;
            q.vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::Relaxed);
        }
        self.sessions.clear();
        self.negotiated.store(0, Ordering::SeqCst);
        self.config_vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::Relaxed);
        self.isr.store(0, Ordering::SeqCst);
        *regs = TransportRegs::new(self.cfg.num_queues(), self.cfg.max_queue_size);
        self.counters.resets.fetch_add(1, Ordering::Relaxed);
        log::debug!("device reset");
    }

    /// Function-level reset: a device reset plus the PCI command register cleared.
    pub(crate) fn flr(&self) {
        if self.faults.reset_behaviour() == ResetBehaviour::IgnoreAll {
            log::warn!("function-level reset ignored (fault injected)");
            self.go_rogue();
            return;
        }
        let mut regs = self.regs();
        self.pci.flr();
        self.reset_locked(&mut regs);
    }

    /// A reset was ignored: keep writing the buffers of held requests.
    pub(crate) fn go_rogue(&self) {
        self.rogue.store(true, Ordering::SeqCst);
        self.wake_fault_thread();
    }

    pub(crate) fn wake_fault_thread(&self) {
        if let Some(t) = self.fault_thread.get() {
            t.unpark();
        }
    }

    /// The fault thread: commits late control answers when due and, after an ignored reset,
    /// overwrites the held requests' buffers through the IOMMU every few milliseconds.
    pub(crate) fn run_faults(&self) {
        use crate::faults::{write_through, LATE_WRITE_BYTE, LATE_WRITE_PERIOD};
        let mut round = 0u8;
        while !self.shutdown.load(Ordering::Acquire) {
            let now = std::time::Instant::now();
            let mut wait: Option<std::time::Duration> = None;
            let round_guard = self.rogue_round.lock().unwrap_or_else(PoisonError::into_inner);
            if self.rogue.load(Ordering::SeqCst) {
                let snap = self.iommu.snapshot();
                // A different byte every round, so that every late write is visible; never a
                // status virtio-crypto defines (0 to 6), so junk never reads as a real answer.
                round = (round + 1) % 0x12;
                for (iova, len) in self.faults.held() {
                    let junk = vec![LATE_WRITE_BYTE + round; len as usize];
                    if write_through(&snap, &[(iova, len)], 0, &junk) {
                        self.counters.late_writes.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.counters.iommu_faults.fetch_add(1, Ordering::Relaxed);
                    }
                }
                wait = Some(LATE_WRITE_PERIOD);
            }
            drop(round_guard);
            let due = self.late_ctrl.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|l| l.due);
            match due {
                Some(d) if d <= now => self.publish_late_ctrl(),
                Some(d) => wait = Some(wait.map_or(d - now, |w| w.min(d - now))),
                None => {}
            }
            match wait {
                _ if due.is_some_and(|d| d <= now) => {}
                Some(w) => std::thread::park_timeout(w),
                None => std::thread::park(),
            }
        }
    }

    /// Writes and publishes the held-back control answer, then serves the control requests
    /// that queued up behind it.
    fn publish_late_ctrl(&self) {
        let _regs = self.regs();
        let Some(late) = self.late_ctrl.lock().unwrap_or_else(PoisonError::into_inner).take() else { return };
        let q = self.cfg.ctrl_queue();
        {
            let mut guard = self.queues[usize::from(q)].lock();
            let Some(ring) = guard.as_mut().filter(|r| !r.broken) else { return };
            let snap = self.iommu.snapshot();
            if !crate::faults::write_through(&snap, &late.ranges, late.offset, &late.bytes) {
                self.counters.iommu_faults.fetch_add(1, Ordering::Relaxed);
            }
            let written = late.bytes.len() as u32;
            let published = ring.mem(&self.iommu).and_then(|mem| {
                let old = ring.next_used();
                ring.push(&mem, late.head, written)?;
                ring.publish(&mem, old)
            });
            match published {
                Ok(interrupt) => {
                    self.counters.ctrl_completed.fetch_add(1, Ordering::Relaxed);
                    if interrupt {
                        self.queue_interrupt(q);
                    }
                }
                Err(fault) => self.break_ring(q, ring, fault),
            }
        }
        self.drain_ctrl();
    }

    /// A config space write, with its effect on bus mastering.
    pub(crate) fn config_write(&self, offset: u16, data: &[u8]) {
        let _regs = self.regs();
        let (before, after) = self.pci.write(offset, data);
        if before != after {
            log::debug!("PCI command {before:#06x} -> {after:#06x}");
            self.update_running();
        }
    }

    /// Reserves room for up to `want` data requests under the in-flight limit; returns how many.
    pub(crate) fn reserve_inflight(&self, want: usize) -> usize {
        let limit = self.cfg.inflight_limit;
        let counter = &self.inflight.0;
        if limit == 0 {
            counter.fetch_add(want, Ordering::Relaxed);
            return want;
        }
        let mut cur = counter.load(Ordering::Relaxed);
        loop {
            let n = want.min(limit.saturating_sub(cur));
            if n == 0 {
                return 0;
            }
            match counter.compare_exchange_weak(cur, cur + n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return n,
                Err(c) => cur = c,
            }
        }
    }

    /// Keeps `used` of `reserved` places (requests actually taken) and returns the rest.
    pub(crate) fn commit_inflight(&self, reserved: usize, used: usize) {
        let spare = reserved - used;
        let now = if spare == 0 {
            self.inflight.0.load(Ordering::Relaxed)
        } else {
            self.inflight.0.fetch_sub(spare, Ordering::Relaxed) - spare
        };
        if used != 0 {
            self.note_inflight(now);
        }
    }

    /// Returns `n` in-flight places (requests completed or dropped).
    pub(crate) fn release_inflight(&self, n: usize) {
        if n != 0 {
            self.inflight.0.fetch_sub(n, Ordering::Relaxed);
        }
    }

    fn note_inflight(&self, now: usize) {
        self.counters.max_in_flight.fetch_max(now as u64, Ordering::Relaxed);
    }
}
