//! A data queue: requests to the ring, completions back, the backlog in front.
//!
//! Each data virtqueue has one lock, taken by its submitters and pollers; different queues share
//! nothing on the hot path, so one submitting thread per queue never contends. Submissions go
//! through [`Backlog`], which is where the contract is kept. Everything the device writes (used
//! ids, lengths, status bytes) is checked before it is believed; a device that writes something
//! impossible, stops answering, or flags DEVICE_NEEDS_RESET is reset and every request on it is
//! failed, promoted first where it was backlogged, so no caller is left waiting.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crypt_vfio_cores::Mode;
use crypt_vfio_spec::crypto::status;
use crypt_vfio_spec::ring::{DESC_F_INDIRECT, DESC_SIZE};
use crypt_vfio_wait::SpinBudget;
use vm_memory::Bytes;

use super::health::DeviceHealth;
use super::layout::{
    self, Lengths, AAD, AAD_INLINE_MAX, HDR, INDIRECT, IV, MAX_DESCS, SLOT_STRIDE, STATUS, TAG_IN, TAG_OUT,
};
use super::session::DeviceSession;
use crate::dma::{DmaBuffer, DmaPool};
use crate::engine::backlog::{self, Backlog, Refused, Ring};
use crate::engine::{
    validate_request, BatchSink, BatchSubmitted, Buf, Completion, Delivery, Direction, Event, EventSink,
    Queue, Request, SubmitError, SubmitErrorKind, Submitted, TAG_LEN,
};
use crate::error::{CryptoError, DeviceError, Error, Result, VfioError};
use crate::transport::EventNotifier;
use crate::virtio::{SplitQueue, VirtioPci};

type Session = DeviceSession;

/// Events with the callbacks they go to, in order (delivered in runs per callback).
pub(crate) type Outbox = Vec<(BatchSink<Session>, Event<Session>)>;

/// Polls (with requests in flight) between two watchdog checks.
const WATCHDOG_EVERY: u32 = 64;

/// A request the engine owns, with the callback its events go to.
pub(crate) struct Pending {
    req: Request<Session>,
    sink: BatchSink<Session>,
}

/// One ring slot. The request sits here, moved in once at placement and out once into the
/// completion event; the device's answer is decoded from the slot memory in place.
struct Slot {
    req: Option<Request<Session>>,
    sink: Option<BatchSink<Session>>,
    bounce: Option<DmaBuffer>,
    aad_bounce: Option<DmaBuffer>,
    bounced: bool,
    expect: u32,
    /// When the request went to the device: the watchdog times each request from here.
    submitted: Instant,
}

impl Slot {
    fn new(now: Instant) -> Self {
        Self {
            req: None,
            sink: None,
            bounce: None,
            aad_bounce: None,
            bounced: false,
            expect: 0,
            submitted: now,
        }
    }
}

/// The device-facing half of a queue: rings, slots, bounce buffers.
struct RingState {
    vq: SplitQueue,
    slot_mem: DmaBuffer,
    slots: Vec<Slot>,
    /// Free slots, the most recently freed reused first: a lightly loaded queue keeps to a few
    /// slots, and so to a few bounce buffers (each slot keeps the one it grew for host-memory
    /// data). Reusing them oldest first kept the available ring's entries unchanged, but
    /// measured no faster, and let every slot grow a bounce buffer.
    free: Vec<u16>,
    indirect: bool,
    pool: DmaPool,
    in_flight: usize,
    /// The engine's device incarnation: only session ids of this one are sent.
    epoch: Arc<AtomicU64>,
    /// When the current submission began: the watchdog's start for every request it places
    /// (one clock read per batch, not per request).
    stamp: Instant,
}

struct QueueState {
    ring: RingState,
    backlog: Backlog<Pending>,
    outbox: Outbox,
    failed: bool,
    polls: u32,
    /// Handles whose callers poll the ring themselves (`Queue::begin_polling`): while there is
    /// one, the completion thread leaves the interrupt unarmed and stays asleep.
    pollers: usize,
}

/// One data queue, shared by its handles and its interrupt thread.
pub(crate) struct DataQueueShared {
    index: u16,
    state: Mutex<QueueState>,
    delivery: Delivery,
    outstanding: AtomicUsize,
    health: Arc<DeviceHealth>,
    max_size: usize,
    pub(crate) irq: Option<EventNotifier>,
    stop: AtomicBool,
    /// Ring size and MSI-X vector, to set the queue up again after a reset.
    size: u16,
    msix_vector: u16,
}

/// Where the backlog's promotions and failures go: the queue's outbox.
struct ToOutbox<'a> {
    outbox: &'a mut Outbox,
    outstanding: &'a AtomicUsize,
}

impl backlog::Outbox<Pending> for ToOutbox<'_> {
    fn promoted(&mut self, item: &Pending) {
        self.outbox.push((item.sink.clone(), Event::Promoted { user_data: item.req.user_data }));
    }

    fn failed(&mut self, item: Pending, error: Error) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.outbox.push((item.sink, Event::Completed(Completion { request: item.req, result: Err(error) })));
    }
}

/// Set-up parameters of a data queue.
pub(crate) struct QueueSetup {
    pub index: u16,
    pub size: u16,
    pub event_idx: bool,
    pub indirect: bool,
    pub backlog_limit: usize,
    pub max_size: usize,
    pub msix_vector: u16,
    pub irq: Option<EventNotifier>,
    /// The engine's device incarnation (`Core::epoch`).
    pub epoch: Arc<AtomicU64>,
}

impl DataQueueShared {
    pub(crate) fn new(
        pci: &VirtioPci,
        pool: &DmaPool,
        health: Arc<DeviceHealth>,
        s: QueueSetup,
    ) -> Result<Self> {
        let vq = SplitQueue::new(pool, s.size, s.event_idx, |rings| {
            pci.setup_queue(s.index, s.size, rings, s.msix_vector)
        })?;
        let nslots = if s.indirect { usize::from(s.size) } else { (usize::from(s.size) / MAX_DESCS).max(1) };
        if !s.indirect && usize::from(s.size) < MAX_DESCS {
            return Err(Error::Device(DeviceError::Init(format!(
                "data queue {}: {} descriptors cannot hold one request ({MAX_DESCS} needed) without indirect descriptors",
                s.index, s.size
            ))));
        }
        let slot_mem = pool.alloc(nslots * SLOT_STRIDE)?;
        let ring = RingState {
            vq,
            slot_mem,
            slots: (0..nslots).map(|_| Slot::new(Instant::now())).collect(),
            free: (0..nslots as u16).rev().collect(),
            indirect: s.indirect,
            pool: pool.clone(),
            in_flight: 0,
            epoch: s.epoch,
            stamp: Instant::now(),
        };
        let state = QueueState {
            ring,
            backlog: Backlog::new(s.backlog_limit),
            outbox: Vec::with_capacity(nslots * 2),
            failed: false,
            polls: 0,
            pollers: 0,
        };
        Ok(Self {
            index: s.index,
            state: Mutex::new(state),
            delivery: Delivery::default(),
            outstanding: AtomicUsize::new(0),
            health,
            max_size: s.max_size,
            irq: s.irq,
            stop: AtomicBool::new(false),
            size: s.size,
            msix_vector: s.msix_vector,
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests on the ring plus those in the backlog.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Ring slots (requests the ring holds at most).
    pub(crate) fn capacity(&self) -> usize {
        self.lock().ring.slots.len()
    }

    #[inline]
    fn submit(
        &self,
        req: Request<Session>,
        sink: &BatchSink<Session>,
        may_backlog: bool,
    ) -> Result<Submitted, SubmitError<Session>> {
        let mode = req.session.mode;
        if let Err(e) =
            validate_request(mode, req.iv.as_slice(), req.aad.len(), req.data.len(), self.max_size)
        {
            return Err(SubmitError::rejected(req, e));
        }
        if self.health.is_failed() {
            return Err(SubmitError::rejected(req, self.health.error()));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        // Leaving is looked at under the lock: `begin_leaving` empties the backlog under it.
        if st.failed || self.health.is_leaving() {
            drop(guard);
            return Err(SubmitError::rejected(req, self.health.error()));
        }
        let pending = Pending { req, sink: sink.clone() };
        st.ring.stamp = Instant::now();
        match st.backlog.submit(pending, may_backlog, &mut st.ring) {
            Ok(s) => {
                self.outstanding.fetch_add(1, Ordering::Relaxed);
                if s == Submitted::InProgress {
                    st.ring.vq.publish();
                }
                Ok(s)
            }
            Err((p, Refused::Busy)) => Err(SubmitError::busy(p.req)),
            Err((p, Refused::Rejected(e))) => Err(SubmitError::rejected(p.req, e)),
        }
    }

    /// Submits the front of `requests` under one lock with one ring publish (so at most one
    /// doorbell): see [`Queue::submit_batch`]. `engine` is the engine the handle belongs to.
    fn submit_batch(
        &self,
        requests: &mut VecDeque<Request<Session>>,
        sink: &BatchSink<Session>,
        may_backlog: bool,
        engine: crate::engine::EngineId,
    ) -> BatchSubmitted {
        let mut out = BatchSubmitted::default();
        if requests.is_empty() {
            return out;
        }
        if self.health.is_failed() {
            out.refused = Some(SubmitErrorKind::Rejected(self.health.error()));
            return out;
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.failed || self.health.is_leaving() {
            drop(guard);
            out.refused = Some(SubmitErrorKind::Rejected(self.health.error()));
            return out;
        }
        st.ring.stamp = Instant::now();
        // Requests are checked as they are taken: a bad one ends the batch where it stands.
        let mut invalid = None;
        let source = std::iter::from_fn(|| {
            let req = requests.pop_front()?;
            let checked = if req.session.engine != engine {
                Err(Error::Crypto(CryptoError::InvalidSession))
            } else {
                validate_request(
                    req.session.mode,
                    req.iv.as_slice(),
                    req.aad.len(),
                    req.data.len(),
                    self.max_size,
                )
            };
            match checked {
                Ok(()) => Some(Pending { req, sink: sink.clone() }),
                Err(e) => {
                    invalid = Some((req, e));
                    None
                }
            }
        });
        let r = st.backlog.submit_batch(source, may_backlog, &mut st.ring);
        let accepted = r.in_progress + r.backlogged;
        if accepted > 0 {
            self.outstanding.fetch_add(accepted, Ordering::Relaxed);
        }
        if r.in_progress > 0 {
            st.ring.vq.publish();
        }
        drop(guard);
        out.in_progress = r.in_progress;
        out.backlogged = r.backlogged;
        match (r.refused, invalid) {
            (Some((p, why)), _) => {
                requests.push_front(p.req);
                out.refused = Some(match why {
                    Refused::Busy => SubmitErrorKind::Busy,
                    Refused::Rejected(e) => SubmitErrorKind::Rejected(e),
                });
            }
            (None, Some((req, e))) => {
                requests.push_front(req);
                out.refused = Some(SubmitErrorKind::Rejected(e));
            }
            (None, None) => {}
        }
        out
    }

    /// Reaps, promotes and delivers. Returns the number of events this call delivered.
    pub(crate) fn poll(&self, scratch: &mut Outbox) -> usize {
        {
            let mut guard = self.lock();
            self.reap(&mut guard);
        }
        self.delivery.run(scratch, |s| std::mem::swap(&mut self.lock().outbox, s))
    }

    fn reap(&self, st: &mut QueueState) {
        if st.failed {
            return;
        }
        if self.health.is_failed() {
            return self.fail_locked(st);
        }
        let n = st.ring.vq.used_pending();
        if usize::from(n) > st.ring.in_flight {
            self.health.fail(format!(
                "data queue {}: device published {n} used elements with {} requests in flight",
                self.index, st.ring.in_flight
            ));
            return self.fail_locked(st);
        }
        let mut done = 0;
        for _ in 0..n {
            let used = st.ring.vq.take_used();
            // The id must name a slot with a request in it: anything else is a device bug.
            let finished = st.ring.slot_of(used.id).and_then(|i| Some((i, st.ring.finish(i, used.len)?)));
            let Some((i, result)) = finished else {
                self.health.fail(format!(
                    "data queue {}: device returned descriptor {} which is not a request in flight",
                    self.index, used.id
                ));
                self.outstanding.fetch_sub(done, Ordering::Relaxed);
                return self.fail_locked(st);
            };
            done += 1;
            // An answer that cannot be true (no status, too few bytes) means the device may not
            // be done with the request, or lies about others: stop it before this request (or
            // the slot's buffers, reused by the next one) goes anywhere.
            let lie = match &result {
                Err(Error::Device(DeviceError::Failed(why))) => Some(why.clone()),
                _ => None,
            };
            // Moved straight from the slot into the outbox (a slot holds both or neither).
            let slot = &mut st.ring.slots[i];
            if let (Some(request), Some(sink)) = (slot.req.take(), slot.sink.take()) {
                st.outbox.push((sink, Event::Completed(Completion { request, result })));
            }
            if let Some(why) = lie {
                self.outstanding.fetch_sub(done, Ordering::Relaxed);
                self.health.fail(format!("data queue {}: {why}", self.index));
                return self.fail_locked(st);
            }
        }
        if done > 0 {
            self.outstanding.fetch_sub(done, Ordering::Relaxed);
        }
        // Checked every few polls whether or not others complete: one request stuck behind a
        // stream of completions must be noticed too.
        if st.ring.in_flight > 0 {
            st.polls = st.polls.wrapping_add(1);
            if st.polls % WATCHDOG_EVERY == 0 && !self.check_device(st) {
                return self.fail_locked(st);
            }
        }
        let moved = st
            .backlog
            .promote(&mut st.ring, &mut ToOutbox { outbox: &mut st.outbox, outstanding: &self.outstanding });
        if moved > 0 {
            st.ring.vq.publish();
        }
        if !st.outbox.is_empty() {
            self.delivery.mark_pending();
        }
    }

    /// Whether the device is still healthy while requests wait; marks it failed if not.
    fn check_device(&self, st: &QueueState) -> bool {
        if self.health.pci.needs_reset() {
            self.health.fail(format!("data queue {}: the device set DEVICE_NEEDS_RESET", self.index));
            return false;
        }
        // Each request is timed from its own submission: the oldest decides. (Timing from the
        // last completion would fail the first request after any idle spell.)
        let oldest = st.ring.slots.iter().filter(|s| s.req.is_some()).map(|s| s.submitted).min();
        let waited = oldest.map_or(Duration::ZERO, |t| t.elapsed());
        if waited > self.health.timeout {
            self.health.fail(format!(
                "data queue {}: a request got no completion for {waited:?} (timeout {:?}), {} requests in flight",
                self.index, self.health.timeout, st.ring.in_flight
            ));
            return false;
        }
        true
    }

    /// Fails everything this queue owns: the device is failed (and reset).
    fn fail_locked(&self, st: &mut QueueState) {
        st.failed = true;
        let reason = self.health.reason();
        for slot in &mut st.ring.slots {
            if let (Some(request), Some(sink)) = (slot.req.take(), slot.sink.take()) {
                self.outstanding.fetch_sub(1, Ordering::Relaxed);
                // A bounced request's data is copied back only on success, so the caller's
                // bytes are as submitted: it may run again elsewhere. A zero-copy buffer may
                // hold part of what the device wrote.
                let result = Err(Error::Device(if slot.bounced || request.data.is_empty() {
                    DeviceError::NotRun(reason.clone())
                } else {
                    DeviceError::Failed(reason.clone())
                }));
                st.outbox.push((sink, Event::Completed(Completion { request, result })));
            }
        }
        st.ring.in_flight = 0;
        st.backlog.fail_all(&mut ToOutbox { outbox: &mut st.outbox, outstanding: &self.outstanding }, || {
            Error::Device(DeviceError::NotRun(reason.clone()))
        });
        self.delivery.mark_pending();
    }

    /// Fails every request of the queue because the device failed (and was stopped), and
    /// delivers their completions.
    pub(crate) fn fail_all(&self, scratch: &mut Outbox) {
        {
            let mut st = self.lock();
            if !st.failed {
                self.fail_locked(&mut st);
            }
        }
        self.delivery.run(scratch, |s| std::mem::swap(&mut self.lock().outbox, s));
    }

    /// Sets the queue up again on a device that was reset, with its slots empty; it stays
    /// failed (refusing requests) until [`resume_all`](Self::resume_all).
    pub(crate) fn restart(&self, pci: &VirtioPci) -> Result<()> {
        let mut st = self.lock();
        if !st.failed {
            self.fail_locked(&mut st);
        }
        let r = &mut st.ring;
        let (index, size, vector) = (self.index, self.size, self.msix_vector);
        r.vq.restart(|rings| pci.setup_queue(index, size, rings, vector))?;
        r.free = (0..r.slots.len() as u16).rev().collect();
        r.in_flight = 0;
        st.polls = 0;
        Ok(())
    }

    /// Accepts requests again on every queue after [`restart`](Self::restart), calling
    /// `then` (which marks the device working) while no queue can be reaped: a reap in between
    /// would see the device still failed and fail its queue again.
    pub(crate) fn resume_all(queues: &[Arc<Self>], then: impl FnOnce()) {
        let mut guards: Vec<_> = queues.iter().map(|q| q.lock()).collect();
        for g in &mut guards {
            g.failed = false;
        }
        then();
    }

    /// The device is leaving (`DeviceHealth::begin_release`, set before this): its backlog
    /// fails, each request Promoted first, and delivers; the requests on the ring stay to drain.
    /// Returns how many were on the ring and how many backlogged requests failed.
    pub(crate) fn begin_leaving(&self, scratch: &mut Outbox) -> (usize, usize) {
        let counts = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let backlogged = st.backlog.len();
            let error = || self.health.error();
            st.backlog
                .fail_all(&mut ToOutbox { outbox: &mut st.outbox, outstanding: &self.outstanding }, error);
            if !st.outbox.is_empty() {
                self.delivery.mark_pending();
            }
            (st.ring.in_flight, backlogged)
        };
        self.delivery.run(scratch, |s| std::mem::swap(&mut self.lock().outbox, s));
        counts
    }

    /// Fails the queue because the engine is closing.
    pub(crate) fn close(&self, scratch: &mut Outbox) {
        self.stop.store(true, Ordering::Release);
        if let Some(irq) = &self.irq {
            let _ = irq.signal();
        }
        {
            let mut st = self.lock();
            if !st.failed {
                self.fail_locked(&mut st);
            }
        }
        self.delivery.run(scratch, |s| std::mem::swap(&mut self.lock().outbox, s));
    }

    /// A caller starts polling this queue itself: the interrupt goes unarmed at once (the
    /// completion thread may have armed it before), and stays so until the last such caller
    /// ends.
    fn begin_polling(&self) {
        let mut st = self.lock();
        st.pollers += 1;
        st.ring.vq.request_interrupt_after(0);
    }

    /// A caller stops polling. The last one arms the interrupt for the completion thread and
    /// looks at the ring once more: `false` if completions are already there (published
    /// before the arm, so they raised no interrupt, and nobody else will reap them while the
    /// completion thread sleeps).
    fn end_polling(&self) -> bool {
        let mut st = self.lock();
        st.pollers = st.pollers.saturating_sub(1);
        let armed = st.pollers > 0 || Self::arm(&st);
        if !armed {
            // The caller is told to reap; should it not (a handle going away), the completion
            // thread must not wait for its timeout to find them: wake it now.
            if let Some(irq) = &self.irq {
                let _ = irq.signal();
            }
        }
        armed
    }

    /// Arms the interrupt (coalesced to half of what is in flight) and re-checks the ring; with
    /// completions already there it disarms again and returns `false`: the caller must reap
    /// them itself, no interrupt is coming for them. Called with the queue locked, so the
    /// arm and the check see the same `pollers`.
    fn arm(st: &QueueState) -> bool {
        if st.failed {
            // Nothing more will be published; the failure's events are in the outbox already.
            return st.outbox.is_empty();
        }
        let batch = (st.ring.in_flight / 2).clamp(1, 32) as u16;
        st.ring.vq.request_interrupt_after(batch);
        if st.ring.vq.used_pending() > 0 || !st.outbox.is_empty() {
            st.ring.vq.request_interrupt_after(0);
            return false;
        }
        true
    }

    /// The completion loop of the interrupt and adaptive modes: poll while completions come and
    /// for `spin`'s budget after, then arm the interrupt, look at the ring once more (a
    /// completion published before the arm raised no interrupt) and sleep on the eventfd.
    /// While a caller polls the queue itself (`begin_polling`) the thread neither polls nor
    /// arms: it sleeps until that caller ends, which arms the interrupt in its place.
    pub(crate) fn interrupt_loop(&self, mut spin: SpinBudget) {
        let Some(irq) = &self.irq else { return };
        let mut scratch = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let idle_since = Instant::now();
            if self.lock().pollers == 0 {
                if self.poll(&mut scratch) > 0 {
                    continue;
                }
                if spin.spin(|| self.poll(&mut scratch) > 0 || self.stop.load(Ordering::Acquire)) {
                    continue;
                }
                let st = self.lock();
                if st.pollers == 0 && !Self::arm(&st) {
                    continue;
                }
            }
            // Bounded: `stop` and the watchdog (in `poll`) are looked at again after it.
            let _ = irq.wait(Duration::from_millis(10));
            self.lock().ring.vq.request_interrupt_after(0);
            spin.record(idle_since.elapsed());
        }
    }
}

impl RingState {
    fn slot_of(&self, id: u32) -> Option<usize> {
        let id = usize::try_from(id).ok()?;
        let i = if self.indirect {
            id
        } else {
            if id % MAX_DESCS != 0 {
                return None;
            }
            id / MAX_DESCS
        };
        self.slots.get(i).filter(|s| s.req.is_some()).map(|_| i)
    }

    /// Decides the outcome of slot `i`'s request from what the device wrote, puts the result
    /// into the request (still in the slot, for the caller to take) and frees the slot; `None`
    /// if the slot holds no request.
    fn finish(&mut self, i: usize, written: u32) -> Option<Result<()>> {
        let slot = self.slots.get_mut(i)?;
        let req = slot.req.as_mut()?;
        self.free.push(i as u16);
        self.in_flight -= 1;
        let base = i * SLOT_STRIDE;
        let v = self.slot_mem.volatile();
        let code = v.read_obj::<u8>(base + STATUS).unwrap_or(status::ERR);
        let result = match code {
            status::OK if written >= slot.expect => Ok(()),
            status::OK => Err(Error::Device(DeviceError::Failed(format!(
                "device reported success but wrote {written} of {} bytes",
                slot.expect
            )))),
            status::BADMSG => Err(Error::Crypto(CryptoError::AuthFailed)),
            status::NOTSUPP => {
                Err(Error::Crypto(CryptoError::NotSupported(format!("{} request", req.session.mode))))
            }
            status::INVSESS => Err(Error::Crypto(CryptoError::InvalidSession)),
            status::NOSPC => {
                Err(Error::Crypto(CryptoError::NoSpace("device out of resources for the request".into())))
            }
            0xff => Err(Error::Device(DeviceError::Failed(
                "device completed a request without writing its status".into(),
            ))),
            s if s > status::KEY_REJECTED => Err(Error::Device(DeviceError::Failed(format!(
                "device wrote status {s:#04x}, which virtio-crypto does not define"
            )))),
            s => Err(Error::Crypto(CryptoError::Status(s))),
        };
        match &result {
            Ok(()) => {
                if slot.bounced {
                    if let (Buf::Host(out), Some(b)) = (&mut req.data, &slot.bounce) {
                        b.copy_to_slice(out);
                    }
                }
                if req.session.mode == Mode::Gcm && req.direction == Direction::Encrypt {
                    let _ = v.read_slice(&mut req.tag, base + TAG_OUT);
                }
            }
            Err(Error::Crypto(CryptoError::AuthFailed)) => req.data.zeroize(),
            Err(_) => {}
        }
        Some(result)
    }
}

impl Ring<Pending> for RingState {
    fn has_space(&self) -> bool {
        !self.free.is_empty()
    }

    // Inlined into the batch loop, so that the request is not copied once more into an
    // argument slot on its way to the ring slot.
    #[inline(always)]
    fn push(&mut self, p: Pending) -> Result<(), (Pending, Error)> {
        let Some(i) = self.free.pop() else {
            return Err((p, Error::Crypto(CryptoError::InvalidRequest("ring full".into()))));
        };
        match self.place(usize::from(i), &p.req) {
            Ok((head, expect, bounced)) => {
                let slot = &mut self.slots[usize::from(i)];
                slot.req = Some(p.req);
                slot.sink = Some(p.sink);
                slot.expect = expect;
                slot.bounced = bounced;
                slot.submitted = self.stamp;
                self.vq.push_avail(head);
                self.in_flight += 1;
                Ok(())
            }
            Err(e) => {
                self.free.push(i);
                Err((p, e))
            }
        }
    }
}

/// Takes `buf`, or a new buffer of at least `len` bytes from the pool.
fn ensure_buffer<'a>(
    buf: &'a mut Option<DmaBuffer>,
    pool: &DmaPool,
    len: usize,
) -> Result<&'a mut DmaBuffer> {
    if buf.as_ref().is_none_or(|b| b.capacity() < len) {
        *buf = Some(pool.alloc(len)?);
    }
    let b = buf.as_mut().expect("just set");
    b.set_len(len);
    Ok(b)
}

impl RingState {
    /// Writes request `req` into slot `i`: payload, header, descriptors. Returns the head
    /// descriptor, the bytes the device must write, and whether the payload was bounced.
    fn place(&mut self, i: usize, req: &Request<Session>) -> Result<(u16, u32, bool)> {
        // A destroyed session, or one not re-created after a reset, holds ids that may name
        // another session (another key) on the device now: never send them.
        let Some((encrypt_id, decrypt_id)) = req.session.state.ids_in(self.epoch.load(Ordering::Acquire))
        else {
            return Err(Error::Crypto(CryptoError::InvalidSession));
        };
        let session_id = match req.direction {
            Direction::Encrypt => encrypt_id,
            Direction::Decrypt => decrypt_id,
        };
        let n = req.data.len();
        let slot = &mut self.slots[i];
        let (data_iova, bounced) = match &req.data {
            Buf::Dma(b) => {
                if !b.belongs_to(&self.pool) {
                    return Err(Error::Vfio(VfioError::Dma(
                        "the buffer is not mapped for this device (it comes from another DMA pool)".into(),
                    )));
                }
                (b.iova(), false)
            }
            Buf::Host(v) if n > 0 => {
                let b = ensure_buffer(&mut slot.bounce, &self.pool, n)?;
                b.copy_from_slice(v);
                (b.iova(), true)
            }
            Buf::Host(_) => (0, false),
        };
        let aad_ext = if req.aad.len() > AAD_INLINE_MAX {
            let b = ensure_buffer(&mut slot.aad_bounce, &self.pool, req.aad.len())?;
            b.copy_from_slice(&req.aad);
            Some(b.iova())
        } else {
            None
        };
        let base = i * SLOT_STRIDE;
        let slot_iova = self.slot_mem.iova() + base as u64;
        let lens = Lengths { iv: req.iv.as_slice().len(), aad: req.aad.len(), data: n };
        let plan = layout::plan(&req.session, session_id, req.direction, lens, slot_iova, data_iova, aad_ext);
        let v = self.slot_mem.volatile();
        let iv = req.iv.as_slice();
        let mut head = [0u8; IV + 16];
        head[..IV].copy_from_slice(&plan.header);
        head[IV..IV + iv.len()].copy_from_slice(iv);
        let mut ok = v.write_slice(&head[..IV + iv.len()], base + HDR).is_ok()
            && v.write_obj(0xffu8, base + STATUS).is_ok();
        if req.session.mode == Mode::Gcm {
            ok &= v.write_slice(&req.tag, base + TAG_IN).is_ok();
            if aad_ext.is_none() {
                ok &= v.write_slice(&req.aad, base + AAD).is_ok();
            }
        }
        if !ok {
            return Err(Error::Vfio(VfioError::Dma("slot memory write out of bounds".into())));
        }
        let mut table = [0u8; MAX_DESCS * DESC_SIZE as usize];
        let head = if self.indirect {
            let n = plan.segments.encode(1, &mut table);
            crate::virtio::split_queue::update_descs(&self.slot_mem, base + INDIRECT, &table[..n]);
            self.vq.set_desc(i as u16, slot_iova + INDIRECT as u64, n as u32, DESC_F_INDIRECT, 0);
            i as u16
        } else {
            let head = (i * MAX_DESCS) as u16;
            let n = plan.segments.encode(head + 1, &mut table);
            self.vq.write_descs(head, &table[..n]);
            head
        };
        Ok((head, plan.expect_written, bounced))
    }
}

/// A submitter's handle on a data queue.
pub struct DeviceQueue {
    shared: Arc<DataQueueShared>,
    sink: BatchSink<Session>,
    scratch: Outbox,
    engine: crate::engine::EngineId,
    /// Between `begin_polling` and `end_polling`: counted once in the queue's `pollers`.
    polling: bool,
}

impl DeviceQueue {
    /// A handle whose events go to `sink` one at a time.
    pub(crate) fn new(
        shared: Arc<DataQueueShared>,
        sink: EventSink<Session>,
        engine: crate::engine::EngineId,
    ) -> Self {
        let sink: BatchSink<Session> = Arc::new(move |events| events.for_each(|e| sink(e)));
        Self::batched(shared, sink, engine)
    }

    /// A handle whose events go to `sink` in runs.
    pub(crate) fn batched(
        shared: Arc<DataQueueShared>,
        sink: BatchSink<Session>,
        engine: crate::engine::EngineId,
    ) -> Self {
        Self { shared, sink, scratch: Vec::new(), engine, polling: false }
    }
}

impl Drop for DeviceQueue {
    fn drop(&mut self) {
        // A caller that stops polling by going away must not leave the interrupt unarmed for
        // the queue's other handles.
        if self.polling {
            // Completions already on the ring (`false`) are the completion thread's: the
            // shared end wakes it for them. Not reaped here, where a sink could be waiting for
            // something the dropping thread holds.
            self.shared.end_polling();
        }
    }
}

impl Queue<Session> for DeviceQueue {
    fn submit(
        &mut self,
        request: Request<Session>,
        may_backlog: bool,
    ) -> Result<Submitted, SubmitError<Session>> {
        // Another device's session ids name other keys here.
        if request.session.engine != self.engine {
            return Err(SubmitError::rejected(request, Error::Crypto(CryptoError::InvalidSession)));
        }
        self.shared.submit(request, &self.sink, may_backlog)
    }

    fn submit_batch(
        &mut self,
        requests: &mut VecDeque<Request<Session>>,
        may_backlog: bool,
    ) -> BatchSubmitted {
        self.shared.submit_batch(requests, &self.sink, may_backlog, self.engine)
    }

    fn poll(&mut self) -> usize {
        self.shared.poll(&mut self.scratch)
    }

    fn outstanding(&self) -> usize {
        self.shared.outstanding()
    }

    fn begin_polling(&mut self) {
        if !self.polling && self.shared.irq.is_some() {
            self.polling = true;
            self.shared.begin_polling();
        }
    }

    fn end_polling(&mut self) -> bool {
        if !self.polling {
            return true;
        }
        self.polling = false;
        self.shared.end_polling()
    }
}

// The slot layout: tag-out then status contiguous (one writable descriptor), the table aligned
// and clear of them, tag-in then AAD contiguous, everything inside the slot.
const _: () = assert!(
    TAG_IN + TAG_LEN == AAD
        && TAG_OUT + TAG_LEN == STATUS
        && STATUS < INDIRECT
        && INDIRECT % 16 == 0
        && INDIRECT + MAX_DESCS * 16 <= TAG_IN
        && AAD < SLOT_STRIDE
        && SLOT_STRIDE % 64 == 0
);
