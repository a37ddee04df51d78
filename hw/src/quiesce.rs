//! Making a reset synchronous with respect to the workers.
//!
//! When the driver writes 0 to `device_status`, it may reuse or unmap every buffer as soon as
//! it reads the status back as 0. So the reset must not return while a worker could still
//! write a used element or a destination buffer of a request taken before the reset.
//!
//! This is a tiny epoch scheme: reset advances a global epoch and waits until every worker has
//! either announced the new epoch (after dropping everything it held) or is parked with
//! nothing held. A worker announces an epoch by storing it and then re-reading the global one,
//! so a reset cannot slip between its read and its announcement.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// Slot value of a worker that holds nothing and touches no driver memory.
const IDLE: u64 = u64::MAX;

/// One cache line per worker slot, so announcing does not bounce other workers' lines.
#[repr(align(128))]
struct Slot(AtomicU64);

pub(crate) struct Quiesce {
    epoch: AtomicU64,
    slots: Box<[Slot]>,
}

impl Quiesce {
    pub(crate) fn new(workers: usize) -> Self {
        Self { epoch: AtomicU64::new(0), slots: (0..workers).map(|_| Slot(AtomicU64::new(IDLE))).collect() }
    }

    /// The current epoch.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// Announces that worker `slot` is active in the current epoch. If the epoch moved since
    /// `*seen`, `on_new_epoch` runs first (the worker drops what it held) and `*seen` is
    /// updated. After this returns, a reset that starts later waits for the worker.
    pub(crate) fn enter(&self, slot: usize, seen: &mut u64, mut on_new_epoch: impl FnMut()) {
        loop {
            let e = self.epoch.load(SeqCst);
            if e != *seen {
                on_new_epoch();
                *seen = e;
            }
            self.slots[slot].0.store(e, SeqCst);
            if self.epoch.load(SeqCst) == e {
                return;
            }
        }
    }

    /// Announces that worker `slot` holds nothing and will call [`Quiesce::enter`] before
    /// touching driver memory again.
    pub(crate) fn idle(&self, slot: usize) {
        self.slots[slot].0.store(IDLE, SeqCst);
    }

    /// Starts a new epoch and waits until no worker can still act on an older one. `wake`
    /// is called to get sleeping workers that still hold requests moving.
    pub(crate) fn advance_and_wait(&self, wake: impl Fn()) {
        let new = self.epoch.fetch_add(1, SeqCst) + 1;
        wake();
        let start = Instant::now();
        let mut warned = false;
        for s in self.slots.iter() {
            loop {
                let v = s.0.load(SeqCst);
                if v == IDLE || v >= new {
                    break;
                }
                if !warned && start.elapsed() > Duration::from_secs(5) {
                    log::warn!("reset: still waiting for a worker to leave epoch {v}");
                    warned = true;
                }
                wake();
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enter_drops_on_new_epoch_and_idle_does_not_block() {
        let q = Quiesce::new(2);
        let mut seen = 0;
        let mut dropped = 0;
        q.enter(0, &mut seen, || dropped += 1);
        assert_eq!(dropped, 0);
        q.idle(0);
        q.advance_and_wait(|| {});
        q.enter(0, &mut seen, || dropped += 1);
        assert_eq!((dropped, seen), (1, 1));
    }
}
