//! The worker threads: the device's engines, which take data requests from the rings, run
//! them, and complete them.
//!
//! Every worker serves every data queue, holding a queue's lock only to take heads or to
//! publish used elements (and only via `try_lock`, moving on to the next queue when another
//! worker has it). A worker polls while there is work and, after, for a spin budget learnt from
//! how long the driver took to send more (at most `idle_spin`), because on this class of machine
//! a sleeping thread costs tens of microseconds to wake; then it re-enables the driver's
//! notifications, checks the rings once more so no doorbell can be lost, and sleeps on its
//! [`SleepGate`] until a doorbell wakes it. The bound matters on a busy machine: a worker that
//! spun until its time slice ended would keep the CPU from the driver thread it waits for.
//!
//! Requests are executed as soon as they are taken (the AES runs immediately), but complete
//! only when due: at take time plus `latency` and a random jitter, in random order when
//! `out_of_order` is set. Taken but uncompleted requests count against `inflight_limit`.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crypt_vfio_wait::{SleepGate, SpinBudget};

use crate::chain::Chain;
use crate::device::Device;
use crate::iommu::Snapshot;
use crate::prng::SplitMix64;
use crate::request::{self, Outcome, Scratch};
use crate::sessions::SessionCache;
use crate::stats::LocalCounts;
use crate::virtqueue::{RingFault, RingMem};

/// Most heads a worker takes from one queue at a time (and so publishes per used-index store).
const BATCH: usize = 32;

/// Shortest idle spin: a poll of the rings and a little more.
const MIN_IDLE_SPIN: Duration = Duration::from_micros(1);

/// What the rest of the device knows about a worker: where it sleeps, so a doorbell can wake it.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct WorkerSlot {
    pub gate: SleepGate,
}

/// A request taken and executed, waiting to be completed.
#[derive(Clone, Copy, Debug)]
struct Pending {
    queue: u16,
    head: u16,
    outcome: Outcome,
    /// When it may complete; `None` is "now" (no latency configured).
    due: Option<Instant>,
}

/// Starts worker `id` of `dev`.
pub(crate) fn spawn(dev: Arc<Device>, id: usize) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new().name(format!("crypt-hw-{id}")).spawn(move || {
        // Even if the worker died of a bug, a reset must not wait for it forever.
        struct Idle<'a>(&'a Device, usize);
        impl Drop for Idle<'_> {
            fn drop(&mut self) {
                self.0.quiesce.idle(self.1);
            }
        }
        let _idle = Idle(&dev, id);
        let mut w = Worker::new(id, &dev);
        w.run(&dev);
        w.leave(&dev);
    })
}

/// Pushes the used element of `p`, as the fault plan wants it.
fn push_with_faults(
    dev: &Device,
    ring: &mut crate::virtqueue::Ring,
    mem: &RingMem,
    p: &Pending,
) -> Result<(), RingFault> {
    use crate::faults::CompletionFault;
    let (head, written) = (p.head, p.outcome.written);
    match dev.faults.take_completion() {
        None => ring.push(mem, head, written),
        Some(CompletionFault::Duplicate) => {
            ring.push(mem, head, written)?;
            ring.push(mem, head, written)
        }
        Some(CompletionFault::FreeSlot) => ring.push(mem, head.wrapping_add(1) % ring.layout.size, written),
        Some(CompletionFault::Short) => ring.push(mem, head, 1),
        Some(CompletionFault::Extra) => {
            ring.push(mem, head, written)?;
            ring.skip();
            Ok(())
        }
    }
}

struct Worker {
    id: usize,
    epoch: u64,
    snap: Arc<Snapshot>,
    cache: SessionCache,
    chain: Chain,
    scratch: Scratch,
    rng: SplitMix64,
    pending: Vec<Pending>,
    /// Requests taken while [`crate::Fault::NeverAnswer`] was set: never completed.
    held: usize,
    ready: Vec<Pending>,
    heads: [u16; BATCH],
    next_queue: usize,
    counts: LocalCounts,
    /// Latency or jitter is configured, so completions wait for due times.
    timed: bool,
}

impl Worker {
    fn new(id: usize, dev: &Device) -> Self {
        dev.workers[id].gate.register();
        let cfg = &dev.cfg;
        Self {
            id,
            epoch: dev.quiesce.epoch(),
            snap: dev.iommu.snapshot(),
            cache: SessionCache::new(),
            chain: Chain::new(),
            scratch: Scratch::default(),
            rng: SplitMix64::new(cfg.seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            pending: Vec::with_capacity(4 * BATCH),
            held: 0,
            ready: Vec::with_capacity(4 * BATCH),
            heads: [0; BATCH],
            next_queue: id % usize::from(cfg.data_queues),
            counts: LocalCounts::default(),
            timed: !cfg.latency.is_zero() || !cfg.latency_jitter.is_zero(),
        }
    }

    fn run(&mut self, dev: &Device) {
        let mut spin = SpinBudget::new(MIN_IDLE_SPIN, dev.cfg.idle_spin.max(MIN_IDLE_SPIN));
        // Since when the worker found nothing to do; the wait ends with the next progress.
        let mut idle_since: Option<Instant> = None;
        while !dev.shutdown.load(Ordering::Acquire) {
            self.enter(dev);
            let running = dev.running();
            let mut progress = 0;
            if running {
                progress += self.poll_all(dev);
                progress += self.complete(dev);
            }
            if progress > 0 {
                if let Some(since) = idle_since.take() {
                    spin.record(since.elapsed());
                }
                continue;
            }
            let now = Instant::now();
            let since = *idle_since.get_or_insert(now);
            if running && !self.pending.is_empty() {
                // Waiting for due times: sleep through long waits, poll through short ones
                // (requests already due wait for a queue another worker holds).
                let wait = self
                    .pending
                    .iter()
                    .filter_map(|p| p.due)
                    .min()
                    .map_or(Duration::ZERO, |d| d.saturating_duration_since(now));
                if !(wait <= spin.budget() && spin.pause(now.duration_since(since))) {
                    self.sleep(dev, running, Some(wait.max(MIN_IDLE_SPIN)));
                }
                continue;
            }
            let idle = now.duration_since(since);
            // Pauses leave the rings' cache lines to the driver for a moment; later yields
            // leave it the CPU, should it be waiting for this one.
            if idle < spin.budget() && spin.pause(idle) {
                continue;
            }
            // Past the budget: the worker sleeps until a doorbell, and does not spin again
            // before it has done something.
            self.sleep(dev, running, None);
        }
    }

    /// Start of a round: join the current epoch (dropping requests a reset cancelled) and pick
    /// up changed mappings and sessions.
    fn enter(&mut self, dev: &Device) {
        let (pending, held) = (&mut self.pending, &mut self.held);
        let mut dropped = 0;
        dev.quiesce.enter(self.id, &mut self.epoch, || {
            dropped += pending.len() + *held;
            pending.clear();
            *held = 0;
        });
        if dropped > 0 {
            dev.release_inflight(dropped);
            dev.counters.dropped_by_reset.fetch_add(dropped as u64, Ordering::Relaxed);
        }
        dev.iommu.refresh(&mut self.snap);
        self.cache.refresh(&dev.sessions);
    }

    /// The thread is ending: give back what it held.
    fn leave(&mut self, dev: &Device) {
        dev.release_inflight(self.pending.len() + self.held);
        self.held = 0;
        self.pending.clear();
        dev.quiesce.idle(self.id);
    }

    fn poll_all(&mut self, dev: &Device) -> usize {
        let nq = usize::from(dev.cfg.data_queues);
        let start = self.next_queue;
        self.next_queue = (start + 1) % nq;
        (0..nq).map(|k| self.poll(dev, ((start + k) % nq) as u16)).sum()
    }

    /// Takes and executes up to a batch of requests from data queue `q`.
    fn poll(&mut self, dev: &Device, q: u16) -> usize {
        let reserved = dev.reserve_inflight(BATCH);
        if reserved == 0 {
            return 0;
        }
        let Some(mut guard) = dev.queues[usize::from(q)].try_lock() else {
            dev.commit_inflight(reserved, 0);
            return 0;
        };
        let Some(ring) = guard.as_mut().filter(|r| !r.broken) else {
            dev.commit_inflight(reserved, 0);
            return 0;
        };
        let heads = &mut self.heads[..reserved];
        let taken = ring.mem(&dev.iommu).and_then(|mem| {
            ring.disable_notifications(&mem)?;
            let n = ring.pop(&mem, heads)?;
            Ok((mem, n))
        });
        let (mem, n) = match taken {
            Ok(t) => t,
            Err(fault) => {
                dev.break_ring(q, ring, fault);
                dev.commit_inflight(reserved, 0);
                return 0;
            }
        };
        let indirect = ring.indirect;
        drop(guard);
        dev.commit_inflight(reserved, n);
        let due = self.due_base(dev, n);
        for i in 0..n {
            let head = self.heads[i];
            match self.execute(dev, &mem, indirect, head) {
                Ok(_) if dev.faults.never_answer() => {
                    // Held: taken and executed, never completed; a device that ignores a reset
                    // keeps writing its destination.
                    dev.faults.hold(self.chain.writable.iovas());
                    self.held += 1;
                }
                Ok(outcome) => {
                    let due = match dev.faults.answer_after() {
                        Some(d) => {
                            self.timed = true;
                            Some(Instant::now() + d)
                        }
                        None => due.map(|d| d + self.jitter(dev)),
                    };
                    self.pending.push(Pending { queue: q, head, outcome, due });
                }
                Err(fault) => {
                    // The rest of the batch dies with the queue.
                    dev.break_queue(q, fault);
                    dev.release_inflight(n - i);
                    break;
                }
            }
        }
        n
    }

    fn execute(
        &mut self,
        dev: &Device,
        mem: &RingMem,
        indirect: bool,
        head: u16,
    ) -> Result<Outcome, RingFault> {
        self.chain.walk(mem, &self.snap, indirect, head)?;
        let status_at =
            self.chain.writable.last_byte().ok_or(RingFault("data request without a mapped status byte"))?;
        if dev.faults.take_early() {
            // Completed now, done never: the buffers keep being written until a reset.
            dev.faults.hold(self.chain.writable.iovas());
            dev.go_rogue();
            let written = u32::try_from(self.chain.writable.len()).unwrap_or(u32::MAX);
            return Ok(Outcome { status: crypt_vfio_spec::crypto::status::OK, written, injected: true });
        }
        // A status left unwritten is modelled by writing it where nobody looks.
        let mut discard = 0u8;
        let status_at = if dev.faults.take_status_unwritten() { &raw mut discard } else { status_at };
        Ok(request::execute(
            &dev.cfg,
            &dev.sessions,
            &mut self.cache,
            &mut self.scratch,
            &mut self.rng,
            &self.chain,
            status_at,
        ))
    }

    /// When requests taken now become due, before jitter; `None` without latency.
    fn due_base(&self, dev: &Device, n: usize) -> Option<Instant> {
        (self.timed && n > 0).then(|| Instant::now() + dev.cfg.latency)
    }

    fn jitter(&mut self, dev: &Device) -> Duration {
        let j = dev.cfg.latency_jitter.as_nanos().min(u128::from(u64::MAX)) as u64;
        if j == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(self.rng.below(j))
        }
    }

    /// Completes the requests that are due, one used-index store and at most one interrupt
    /// per queue.
    fn complete(&mut self, dev: &Device) -> usize {
        if self.pending.is_empty() {
            return 0;
        }
        let now = self.timed.then(Instant::now);
        let out_of_order = dev.cfg.out_of_order;
        let (pending, ready, rng) = (&mut self.pending, &mut self.ready, &mut self.rng);
        pending.retain(|p| {
            let due = match (p.due, now) {
                (Some(d), Some(n)) => d <= n,
                _ => true,
            };
            // Out of order: also hold a few ready requests back a round, so that completions
            // overtake each other across batches, not only within one.
            if due && !(out_of_order && rng.below(4) == 0) {
                ready.push(*p);
                false
            } else {
                true
            }
        });
        if ready.is_empty() {
            return 0;
        }
        if out_of_order {
            for i in (1..ready.len()).rev() {
                ready.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let mut finished = 0;
        while let Some(first) = ready.first() {
            let q = first.queue;
            let Some(mut guard) = dev.queues[usize::from(q)].try_lock() else {
                // Another worker is on this queue; try again next round.
                pending.extend(ready.iter().filter(|p| p.queue == q));
                ready.retain(|p| p.queue != q);
                continue;
            };
            // A queue that was disabled or broke meanwhile drops its requests uncompleted.
            if let Some(ring) = guard.as_mut().filter(|r| !r.broken) {
                let counts = &mut self.counts;
                let published = ring.mem(&dev.iommu).and_then(|mem| {
                    let old = ring.next_used();
                    for p in ready.iter().filter(|p| p.queue == q) {
                        push_with_faults(dev, ring, &mem, p)?;
                        counts.record(p.outcome.status);
                        counts.injected += u64::from(p.outcome.injected);
                    }
                    ring.publish(&mem, old)
                });
                match published {
                    Ok(interrupt) => {
                        drop(guard);
                        if interrupt {
                            dev.queue_interrupt(q);
                        }
                    }
                    Err(fault) => dev.break_ring(q, ring, fault),
                }
            }
            let before = ready.len();
            ready.retain(|p| p.queue != q);
            finished += before - ready.len();
        }
        dev.release_inflight(finished);
        dev.counters.flush(&mut self.counts);
        finished
    }

    /// Sleeps until a doorbell, a reset, shutdown or `timeout`, unless work shows up while the
    /// driver's notifications are being re-enabled.
    fn sleep(&mut self, dev: &Device, was_running: bool, timeout: Option<Duration>) {
        let gate = &dev.workers[self.id].gate;
        gate.sleep_unless(
            || {
                let work = was_running && self.arm_notifications(dev);
                if work
                    || dev.shutdown.load(Ordering::SeqCst)
                    || dev.running() != was_running
                    || dev.quiesce.epoch() != self.epoch
                {
                    return true;
                }
                if self.pending.is_empty() {
                    dev.quiesce.idle(self.id);
                }
                // Hold no old mappings while asleep, so unmapped memory can be freed.
                self.chain.release();
                dev.iommu.refresh(&mut self.snap);
                false
            },
            timeout,
        );
    }

    /// Asks the driver to kick every data queue again, then checks whether any has work.
    fn arm_notifications(&mut self, dev: &Device) -> bool {
        let mut work = false;
        for q in 0..dev.cfg.data_queues {
            let mut guard = dev.queues[usize::from(q)].lock();
            let Some(ring) = guard.as_mut().filter(|r| !r.broken) else { continue };
            let checked = ring.mem(&dev.iommu).and_then(|mem| {
                ring.enable_notifications(&mem)?;
                // The driver publishes buffers and then reads our notification fields; we
                // write the fields and then read its index. The fence keeps either side
                // from missing the other.
                fence(Ordering::SeqCst);
                ring.has_work(&mem)
            });
            match checked {
                Ok(w) => work |= w,
                Err(fault) => dev.break_ring(q, ring, fault),
            }
        }
        work
    }
}
