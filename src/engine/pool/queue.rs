//! A pool queue: one backlog in front of every member.
//!
//! The pool queue's [`Backlog`] is the only place a request waits, so the contract (FIFO once
//! a backlog exists, one `Promoted` before anything else about a backlogged request, a final
//! completion for each) holds across members by construction. Its ring is [`PoolRing`]: a
//! request fits when a member that holds its session is up and has a free slot (a credit), and
//! goes to the one with the most free slots. Members are called without backlog, only with a
//! credit, so they take the request or refuse it because they are failing.
//!
//! A member completion comes back through the member's callback, which takes the pool queue's
//! lock: the request gets its caller's id and session back and goes to the caller's outbox, or,
//! when its member failed before running it, to the backlog's re-run lane to run elsewhere.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::{Shared, Slot};
use crate::engine::backlog::{self, Backlog, Refused, Ring};
use crate::engine::software::run_cipher;
use crate::engine::{
    validate_request, AnyEngine, AnySession, BatchSink, BatchSubmitted, Buf, Completion, Delivery, Engine,
    Event, Queue, Request, SubmitError, SubmitErrorKind, Submitted,
};
use crate::error::{CryptoError, DeviceError, Error, Result, VfioError};
use crate::virtio_crypto::DeviceSession;

use super::PoolSession;

type Outbox = Vec<(BatchSink<PoolSession>, Event<PoolSession>)>;

/// A request the pool owns and has not given to a member.
pub(crate) struct Pending {
    req: Request<PoolSession>,
    sink: BatchSink<PoolSession>,
    /// Members it was given to so far.
    attempts: u32,
    /// The member whose DMA memory holds its data (zero copy): it runs only there.
    pinned: Option<usize>,
}

/// A request a member holds: what the pool needs to give it back to its caller.
struct Ticket {
    user_data: u64,
    session: PoolSession,
    sink: BatchSink<PoolSession>,
    attempts: u32,
    pinned: Option<usize>,
}

struct State {
    backlog: Backlog<Pending>,
    outbox: Outbox,
    /// Requests members hold, by the id the member knows them by.
    tickets: Vec<Option<Ticket>>,
    free: Vec<usize>,
    /// The submit handle of each device member (`None` for the software member).
    handles: Vec<Option<Box<dyn Queue<DeviceSession>>>>,
    /// Requests given to each member, submitted to it in one batch (one doorbell) before the
    /// lock is released.
    staged: Vec<VecDeque<Request<DeviceSession>>>,
    /// Requests given to the software member, run by whoever took the lock once it lets go
    /// ([`PoolQueueShared::run_software`]): AES never holds up the pool queue.
    software: Vec<SoftwareWork>,
}

/// A request for the software member, with its cipher.
struct SoftwareWork {
    member: usize,
    cipher: Arc<dyn crypt_vfio_cores::CipherCore>,
    pending: Pending,
}

/// One pool queue, shared by its handles, its members' callbacks and the monitor.
pub(crate) struct PoolQueueShared {
    index: usize,
    shared: Arc<Shared>,
    state: Mutex<State>,
    delivery: Delivery,
    outstanding: AtomicUsize,
}

impl PoolQueueShared {
    pub(crate) fn new(index: usize, shared: Arc<Shared>, engines: &[AnyEngine]) -> Result<Arc<Self>> {
        let mut opened: Result<()> = Ok(());
        let me = Arc::new_cyclic(|weak: &Weak<Self>| {
            let mut handles = Vec::with_capacity(engines.len());
            for (m, engine) in engines.iter().enumerate() {
                let Some(device) = engine.device() else {
                    handles.push(None);
                    continue;
                };
                let weak = weak.clone();
                let sink: BatchSink<DeviceSession> = Arc::new(move |events| {
                    if let Some(q) = weak.upgrade() {
                        q.on_member_events(m, events);
                    } else {
                        // The pool queue is gone (every handle and the engine): nobody waits.
                        events.for_each(drop);
                    }
                });
                match device.open_batch_queue(index, sink) {
                    Ok(h) => handles.push(Some(h)),
                    Err(e) => {
                        opened = Err(e);
                        handles.push(None);
                    }
                }
            }
            Self {
                index,
                state: Mutex::new(State {
                    backlog: Backlog::new(shared.options.backlog_limit),
                    outbox: Vec::new(),
                    tickets: Vec::new(),
                    free: Vec::new(),
                    staged: handles.iter().map(|_| VecDeque::new()).collect(),
                    handles,
                    software: Vec::new(),
                }),
                shared,
                delivery: Delivery::default(),
                outstanding: AtomicUsize::new(0),
            }
        });
        opened.map(|()| me)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers what the outbox holds (unless another thread is at it).
    fn deliver(&self) -> usize {
        let mut scratch = Vec::new();
        self.delivery.run(&mut scratch, |s| std::mem::swap(&mut self.lock().outbox, s))
    }

    /// Runs `f` with the backlog and a ring over the members, then moves what it left (requests
    /// whose member failed while taking them, requests a member found wrong) where they go.
    fn with_ring<R>(
        &self,
        st: &mut State,
        f: impl FnOnce(&mut Backlog<Pending>, &mut PoolRing<'_>, &mut Outbox) -> R,
    ) -> R {
        let State { backlog, outbox, tickets, free, handles, staged, software } = st;
        let mut ring = PoolRing {
            q: self,
            tickets,
            free,
            handles,
            staged,
            software,
            deferred: Vec::new(),
            done: Vec::new(),
        };
        let r = f(backlog, &mut ring, outbox);
        ring.flush();
        let PoolRing { deferred, mut done, .. } = ring;
        let closing = self.shared.closing.load(Ordering::Acquire);
        for p in deferred {
            if closing {
                // Nobody would run it again: the monitor is gone or going.
                self.outstanding.fetch_sub(1, Ordering::Relaxed);
                done.push((p.sink, Event::Completed(Completion { request: p.req, result: Err(closed()) })));
            } else {
                backlog.rerun(p);
            }
        }
        outbox.extend(done);
        r
    }

    /// Promotes what fits, with the lock held; marks the outbox for delivery.
    fn promote_locked(&self, st: &mut State) {
        // Each pass that sends a request back to the re-run lane took a member out (or lost a
        // race for a slot): a few passes at most.
        for _ in 0..=self.shared.members.len() {
            let moved = self.with_ring(st, |backlog, ring, outbox| {
                backlog.promote(ring, &mut ToOutbox { outbox, outstanding: &self.outstanding })
            });
            // A request its member refused went back to the re-run lane: try the others.
            if moved == 0 || st.backlog.reruns() == 0 {
                break;
            }
        }
        if !st.outbox.is_empty() {
            self.delivery.mark_pending();
        }
    }

    /// Moves what waits to the members that have room and delivers (after a member rejoined,
    /// or for events a submit produced while callers sleep).
    pub(crate) fn kick(&self) -> usize {
        {
            let mut st = self.lock();
            self.promote_locked(&mut st);
        }
        self.run_software();
        self.deliver()
    }

    /// Whether the outbox holds events (marking them for delivery).
    fn delivery_pending(&self) -> bool {
        let st = self.lock();
        let events = !st.outbox.is_empty();
        if events {
            self.delivery.mark_pending();
        }
        events
    }

    /// Runs the requests given to the software member, outside the pool queue's lock, and puts
    /// their completions in the outbox (after their `Promoted`, which went in when they were
    /// given). Whether it ran any.
    fn run_software(&self) -> bool {
        let work = std::mem::take(&mut self.lock().software);
        if work.is_empty() {
            return false;
        }
        let mut done = Vec::with_capacity(work.len());
        for SoftwareWork { member: m, cipher, pending: mut p } in work {
            let result = run_cipher(&*cipher, &mut p.req);
            let member = &self.shared.members[m];
            member.requests.fetch_add(1, Ordering::Relaxed);
            member.bytes.fetch_add(p.req.data.len() as u64, Ordering::Relaxed);
            if p.attempts > 0 {
                member.reruns_in.fetch_add(1, Ordering::Relaxed);
            }
            done.push((p.sink, Event::Completed(Completion { request: p.req, result })));
        }
        let mut st = self.lock();
        self.outstanding.fetch_sub(done.len(), Ordering::Relaxed);
        st.outbox.extend(done);
        self.delivery.mark_pending();
        true
    }

    /// Fails everything that waits in the pool queue (no member left, or the pool closing).
    pub(crate) fn fail_waiting(&self, error: &dyn Fn() -> Error) {
        {
            let mut st = self.lock();
            let State { backlog, outbox, .. } = &mut *st;
            backlog.fail_all(&mut ToOutbox { outbox, outstanding: &self.outstanding }, error);
            if !st.outbox.is_empty() {
                self.delivery.mark_pending();
            }
        }
        self.deliver();
    }

    /// Events of member `m` (completions of requests the pool gave it).
    fn on_member_events(&self, m: usize, events: &mut dyn Iterator<Item = Event<DeviceSession>>) {
        {
            let mut st = self.lock();
            for event in events {
                match event {
                    Event::Promoted { user_data } => {
                        self.shared.members[m].violations.fetch_add(1, Ordering::Relaxed);
                        log::error!(
                            "pool member {} promoted request {user_data}, which it was never let backlog",
                            self.shared.members[m].name
                        )
                    }
                    Event::Completed(c) => self.member_completed(&mut st, m, c),
                }
            }
            self.promote_locked(&mut st);
            self.note_waiting(&st);
        }
        self.run_software();
        // The fence pairs with the kicker's, between its store of `waiting` and its load of this
        // count: either this sees `waiting` set, or the kicker sees the count move and looks
        // again (loom model `the_pool_kicker_never_leaves_a_freed_slot_unused`).
        self.shared.completions.fetch_add(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.shared.waiting.load(Ordering::SeqCst) {
            // Slots this queue's member queues got back may be what another pool queue waits for.
            self.shared.kick.wake();
        }
        self.deliver();
    }

    /// Marks the pool as having requests waiting when this queue has some (set after the
    /// change, under the queue's lock, so the monitor's clear-then-check cannot lose it).
    fn note_waiting(&self, st: &State) {
        if !st.backlog.is_empty() {
            self.shared.waiting.store(true, Ordering::Release);
        }
    }

    /// Whether requests wait in this queue.
    pub(crate) fn has_waiting(&self) -> bool {
        !self.lock().backlog.is_empty()
    }

    fn member_completed(&self, st: &mut State, m: usize, c: Completion<DeviceSession>) {
        let Completion { request, result } = c;
        let id = request.user_data as usize;
        let Some(ticket) = st.tickets.get_mut(id).and_then(Option::take) else {
            self.shared.members[m].violations.fetch_add(1, Ordering::Relaxed);
            log::error!(
                "pool member {} completed request {id}, which it does not hold",
                self.shared.members[m].name
            );
            return;
        };
        st.free.push(id);
        let member = &self.shared.members[m];
        if let Some(credit) = member.credit(self.index) {
            credit.give_back();
        }
        let Ticket { user_data, session, sink, attempts, pinned } = ticket;
        let req = with_session(request, session, user_data);
        let result = match result {
            Err(Error::Device(d)) if d.is_device_loss() => {
                self.shared.member_down(m, &d.to_string());
                // The bytes are as submitted unless the device had the caller's own buffer.
                let intact = matches!(d, DeviceError::NotRun(_)) || matches!(req.data, Buf::Host(_));
                if self.shared.closing.load(Ordering::Acquire) {
                    Err(Error::Device(d))
                } else if !intact {
                    member.reruns_out.fetch_add(1, Ordering::Relaxed);
                    member.member_failed.fetch_add(1, Ordering::Relaxed);
                    Err(Error::Device(DeviceError::MemberFailed {
                        member: member.name.clone(),
                        source: Box::new(Error::Device(d)),
                    }))
                } else if self.shared.is_dead() {
                    Err(self.shared.no_member_left())
                } else if attempts >= self.shared.max_attempts() {
                    Err(Error::Device(DeviceError::Failed(format!(
                        "a device failed under the request {attempts} times (the last: {} with {d}); \
                         it is not run again",
                        member.name
                    ))))
                } else {
                    member.reruns_out.fetch_add(1, Ordering::Relaxed);
                    let mut p = Pending { req, sink, attempts, pinned };
                    unpin(&mut p);
                    st.backlog.rerun(p);
                    return;
                }
            }
            other => {
                member.requests.fetch_add(1, Ordering::Relaxed);
                member.bytes.fetch_add(req.data.len() as u64, Ordering::Relaxed);
                other
            }
        };
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        st.outbox.push((sink, Event::Completed(Completion { request: req, result })));
    }

    /// The member whose DMA memory holds `data`, for a zero-copy request.
    fn pin_of(&self, data: &Buf) -> Result<Option<usize>> {
        let Buf::Dma(b) = data else { return Ok(None) };
        let owner = self.shared.members.iter().position(|m| m.dma.as_ref().is_some_and(|p| b.belongs_to(p)));
        match owner {
            Some(m) => Ok(Some(m)),
            None => Err(Error::Vfio(VfioError::Dma(
                "the buffer is not mapped for any member of the pool (it comes from another DMA pool)".into(),
            ))),
        }
    }

    /// Checks a request before the pool takes it.
    fn check(&self, req: &Request<PoolSession>) -> Result<Option<usize>> {
        if req.session.pool != self.shared.id || req.session.state.is_destroyed() {
            return Err(Error::Crypto(CryptoError::InvalidSession));
        }
        validate_request(
            req.session.mode(),
            req.iv.as_slice(),
            req.aad.len(),
            req.data.len(),
            self.shared.max_request_len,
        )?;
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(closed());
        }
        if self.shared.is_dead() {
            return Err(self.shared.no_member_left());
        }
        self.pin_of(&req.data)
    }

    /// After a submit: events for callers who sleep while the pool delivers by itself are
    /// handed to the kicker thread (a submit never calls a callback itself).
    fn after_submit(&self, st: MutexGuard<'_, State>) {
        self.note_waiting(&st);
        drop(st);
        let events = self.run_software() || self.delivery_pending();
        if events && self.shared.delivers {
            self.shared.kick.wake();
        }
    }

    fn submit(
        &self,
        req: Request<PoolSession>,
        sink: &BatchSink<PoolSession>,
        may_backlog: bool,
    ) -> Result<Submitted, SubmitError<PoolSession>> {
        let pinned = match self.check(&req) {
            Ok(p) => p,
            Err(e) => return Err(SubmitError::rejected(req, e)),
        };
        let p = Pending { req, sink: sink.clone(), attempts: 0, pinned };
        // Counted before the request can complete (the software member runs it before the return).
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        // Checked under the lock that closing's `fail_waiting` takes: nothing is let in after.
        if self.shared.closing.load(Ordering::Acquire) {
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
            drop(st);
            return Err(SubmitError::rejected(p.req, closed()));
        }
        if !st.backlog.is_empty() {
            // Slots another pool queue freed on a shared member queue wake nobody here.
            self.promote_locked(&mut st);
        }
        let r = self.with_ring(&mut st, |backlog, ring, _| backlog.submit(p, may_backlog, ring));
        if st.backlog.reruns() > 0 {
            self.promote_locked(&mut st);
        }
        let r = match r {
            Ok(s) => Ok(s),
            Err((p, why)) => {
                self.outstanding.fetch_sub(1, Ordering::Relaxed);
                Err(match why {
                    Refused::Busy => SubmitError::busy(p.req),
                    Refused::Rejected(e) => SubmitError::rejected(p.req, e),
                })
            }
        };
        self.after_submit(st);
        r
    }

    fn submit_batch(
        &self,
        requests: &mut VecDeque<Request<PoolSession>>,
        sink: &BatchSink<PoolSession>,
        may_backlog: bool,
    ) -> BatchSubmitted {
        let mut out = BatchSubmitted::default();
        if requests.is_empty() {
            return out;
        }
        let mut st = self.lock();
        if !st.backlog.is_empty() {
            self.promote_locked(&mut st);
        }
        let mut invalid = None;
        let source = std::iter::from_fn(|| {
            let req = requests.pop_front()?;
            match self.check(&req) {
                Ok(pinned) => {
                    self.outstanding.fetch_add(1, Ordering::Relaxed);
                    Some(Pending { req, sink: sink.clone(), attempts: 0, pinned })
                }
                Err(e) => {
                    invalid = Some((req, e));
                    None
                }
            }
        });
        let r = self.with_ring(&mut st, |backlog, ring, _| backlog.submit_batch(source, may_backlog, ring));
        if st.backlog.reruns() > 0 {
            self.promote_locked(&mut st);
        }
        out.in_progress = r.in_progress;
        out.backlogged = r.backlogged;
        match (r.refused, invalid) {
            (Some((p, why)), _) => {
                self.outstanding.fetch_sub(1, Ordering::Relaxed);
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
        self.after_submit(st);
        out
    }
}

/// The error of a request the pool takes no more.
fn closed() -> Error {
    Error::Device(DeviceError::Failed("the engine pool was closed".into()))
}

/// The request with its caller's session and id back.
fn with_session<S>(req: Request<S>, session: PoolSession, user_data: u64) -> Request<PoolSession> {
    let Request { direction, iv, aad, data, tag, .. } = req;
    Request { session, direction, iv, aad, data, tag, user_data }
}

/// A zero-copy request whose member failed runs elsewhere from a copy in host memory (the DMA
/// buffer stays valid memory; the caller gets the bytes back in a host buffer).
fn unpin(p: &mut Pending) {
    if p.pinned.take().is_some() {
        if let Buf::Dma(b) = &p.req.data {
            p.req.data = Buf::Host(b.to_vec());
        }
    }
}

/// Where the backlog's promotions and failures go: the callers' outbox.
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

/// Where a request goes.
enum Route {
    /// To this member now.
    To(usize),
    /// Nowhere yet: the members that may run it are full or down.
    Wait,
    /// Nowhere ever: its session is gone, or every member that could run it is.
    Never(Error),
}

/// The members as the pool queue's ring.
struct PoolRing<'a> {
    q: &'a PoolQueueShared,
    tickets: &'a mut Vec<Option<Ticket>>,
    free: &'a mut Vec<usize>,
    handles: &'a mut Vec<Option<Box<dyn Queue<DeviceSession>>>>,
    staged: &'a mut Vec<VecDeque<Request<DeviceSession>>>,
    software: &'a mut Vec<SoftwareWork>,
    /// Requests accepted whose member failed while taking them: to the re-run lane.
    deferred: Vec<Pending>,
    /// Completions of requests a member refused as wrong (after any `Promoted` of theirs).
    done: Outbox,
}

impl PoolRing<'_> {
    /// Where `p` should go now, skipping the members in `skip` (a bit per member).
    fn choose(&self, p: &Pending, skip: u64) -> Route {
        let shared = &*self.q.shared;
        if p.req.session.state.is_destroyed() {
            // Its session went while it waited: as on one device, the request is invalid.
            return Route::Never(Error::Crypto(CryptoError::InvalidSession));
        }
        let slots = p.req.session.state.slots();
        let have = |m: usize| matches!(slots.get(m), Some(Slot::Have(_)));
        let usable = |m: usize| skip & (1 << m) == 0 && shared.members[m].is_up() && have(m);
        if let Some(m) = p.pinned.filter(|&m| shared.members[m].is_up() && have(m)) {
            return if usable(m) && shared.members[m].credit(self.q.index).is_some_and(|c| c.free() > 0) {
                Route::To(m)
            } else {
                Route::Wait
            };
        }
        // Pinned to a member that is not up or lacks the session: it runs elsewhere from a copy
        // (see `unpin`). Join the shortest queue: the device with the largest free fraction,
        // ties to home.
        let home = shared.devices.get(self.q.index % shared.devices.len().max(1)).copied();
        let mut best: Option<(usize, usize, usize)> = None;
        let mut device_holds = false;
        for &m in &shared.devices {
            if !usable(m) {
                continue;
            }
            device_holds = true;
            let Some(c) = shared.members[m].credit(self.q.index) else { continue };
            let free = c.free();
            if free == 0 {
                continue;
            }
            let better = match best {
                None => true,
                Some((b, bf, bc)) => {
                    let (lhs, rhs) = (free as u128 * bc as u128, bf as u128 * c.capacity as u128);
                    lhs > rhs || (lhs == rhs && Some(m) == home && Some(b) != home)
                }
            };
            if better {
                best = Some((m, free, c.capacity));
            }
        }
        if let Some((m, ..)) = best {
            return Route::To(m);
        }
        if device_holds {
            // Devices hold the session and are only full: wait for them, keep AES off this thread.
            return Route::Wait;
        }
        // The software member stands by for when no device can run the request.
        if let Some(m) = (0..shared.members.len()).find(|&m| shared.members[m].software && usable(m)) {
            return Route::To(m);
        }
        // Waiting makes sense only for a member that may still run it: one down (its session
        // there, or created when it is back), or one skipped just now.
        let may_run = (0..shared.members.len()).any(|m| {
            let member = &shared.members[m];
            !member.is_gone() && (have(m) || matches!(slots.get(m), Some(Slot::Missing)))
        });
        if may_run {
            Route::Wait
        } else {
            Route::Never(shared.no_member_left())
        }
    }

    /// Submits what was staged for each member, one batch per member. A request a member
    /// refuses was accepted by the pool already (InProgress or Promoted): when the member is
    /// failing or full it waits in the re-run lane for another; a request the member finds
    /// wrong completes with the member's error.
    fn flush(&mut self) {
        let shared = self.q.shared.clone();
        for m in 0..self.staged.len() {
            while !self.staged[m].is_empty() {
                let Some(handle) = self.handles[m].as_mut() else {
                    unreachable!("only device members get requests staged")
                };
                let r = handle.submit_batch(&mut self.staged[m], false);
                let member = &shared.members[m];
                let Some(kind) = r.refused else {
                    if !self.staged[m].is_empty() {
                        log::error!("pool member {} ended a batch without a refusal", member.name);
                        self.take_back_all(m, None);
                    }
                    break;
                };
                match kind {
                    SubmitErrorKind::Rejected(Error::Device(d)) if d.is_device_loss() => {
                        shared.member_down(m, &d.to_string());
                        self.take_back_all(m, Some(m));
                    }
                    SubmitErrorKind::Busy => {
                        member.violations.fetch_add(1, Ordering::Relaxed);
                        log::error!(
                            "pool member {} refused a request it had a credit for (busy)",
                            member.name
                        );
                        self.take_back_all(m, None);
                    }
                    SubmitErrorKind::Rejected(e) => {
                        if let Some(req) = self.staged[m].pop_front() {
                            let p = self.take_back(m, req);
                            self.q.outstanding.fetch_sub(1, Ordering::Relaxed);
                            self.done.push((
                                p.sink,
                                Event::Completed(Completion { request: p.req, result: Err(e) }),
                            ));
                        }
                    }
                }
            }
        }
    }

    /// The staged request `req` of member `m` back as the pool's, its credit returned.
    fn take_back(&mut self, m: usize, req: Request<DeviceSession>) -> Pending {
        if let Some(credit) = self.q.shared.members[m].credit(self.q.index) {
            credit.give_back();
        }
        let id = req.user_data as usize;
        let t = self.tickets[id].take().expect("a staged request has its ticket");
        self.free.push(id);
        if t.attempts > 1 {
            self.q.shared.members[m].reruns_in.fetch_sub(1, Ordering::Relaxed);
        }
        Pending {
            req: with_session(req, t.session, t.user_data),
            sink: t.sink,
            attempts: t.attempts - 1,
            pinned: t.pinned,
        }
    }

    /// Every request still staged for member `m` goes to the re-run lane (unpinned from
    /// `unpin_from`, a member that failed).
    fn take_back_all(&mut self, m: usize, unpin_from: Option<usize>) {
        while let Some(req) = self.staged[m].pop_front() {
            let mut p = self.take_back(m, req);
            if unpin_from.is_some() {
                unpin(&mut p);
            }
            self.deferred.push(p);
        }
    }

    fn ticket(&mut self, t: Ticket) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.tickets[i] = Some(t);
                i
            }
            None => {
                self.tickets.push(Some(t));
                self.tickets.len() - 1
            }
        }
    }

    /// Gives `p` to the software member `m`: run once the pool queue's lock is let go.
    fn run_software(&mut self, m: usize, p: Pending) -> Result<(), (Pending, Error)> {
        let Some(AnySession::Software(s)) = p.req.session.on(m) else {
            return Err((p, Error::Crypto(CryptoError::InvalidSession)));
        };
        self.software.push(SoftwareWork { member: m, cipher: s.cipher().clone(), pending: p });
        Ok(())
    }
}

impl Ring<Pending> for PoolRing<'_> {
    fn has_space(&self) -> bool {
        true
    }

    fn has_space_for(&self, p: &Pending) -> bool {
        // A request no member can ever run "fits": its push fails it (Promoted first when it
        // was backlogged) rather than letting it block the queue for good.
        !matches!(self.choose(p, 0), Route::Wait)
    }

    fn push(&mut self, mut p: Pending) -> Result<(), (Pending, Error)> {
        let shared = self.q.shared.clone();
        let mut skip = 0u64;
        loop {
            let m = match self.choose(&p, skip) {
                Route::To(m) => m,
                Route::Wait => break,
                Route::Never(e) => return Err((p, e)),
            };
            skip |= 1 << m;
            if p.pinned.is_some_and(|pin| pin != m) {
                unpin(&mut p);
            }
            let member = &shared.members[m];
            if member.software {
                return self.run_software(m, p);
            }
            let (Some(credit), Some(AnySession::Device(session))) =
                (member.credit(self.q.index), p.req.session.on(m))
            else {
                continue;
            };
            if !credit.take() {
                // Another pool queue on the same member queue took the last slot.
                continue;
            }
            let Pending { req, sink, attempts, pinned } = p;
            let Request { session: pool_session, direction, iv, aad, data, tag, user_data } = req;
            let ticket = Ticket { user_data, session: pool_session, sink, attempts: attempts + 1, pinned };
            let id = self.ticket(ticket);
            if attempts > 0 {
                member.reruns_in.fetch_add(1, Ordering::Relaxed);
            }
            self.staged[m].push_back(Request {
                session,
                direction,
                iv,
                aad,
                data,
                tag,
                user_data: id as u64,
            });
            return Ok(());
        }
        // Accepted, but every member that could run it failed while taking it: it waits to
        // run again, as a request its member failed under does.
        self.deferred.push(p);
        Ok(())
    }
}

/// A submitter's handle on a pool queue.
pub(crate) struct PoolQueue {
    shared: Arc<PoolQueueShared>,
    sink: BatchSink<PoolSession>,
    /// A handle per device member queue, for polling outside the pool queue's lock (its
    /// completions go to the pool, whoever reaps them).
    polls: Vec<Box<dyn Queue<DeviceSession>>>,
    polling: bool,
}

impl PoolQueue {
    pub(crate) fn new(
        shared: Arc<PoolQueueShared>,
        sink: BatchSink<PoolSession>,
        engines: &[AnyEngine],
    ) -> Result<Self> {
        let mut polls = Vec::new();
        for device in engines.iter().filter_map(AnyEngine::device) {
            let stray: BatchSink<DeviceSession> = Arc::new(|events| {
                let n = events.count();
                log::error!("pool: {n} event(s) reached a poll-only member handle");
            });
            polls.push(device.open_batch_queue(shared.index, stray)?);
        }
        Ok(Self { shared, sink, polls, polling: false })
    }
}

impl Queue<PoolSession> for PoolQueue {
    fn submit(
        &mut self,
        request: Request<PoolSession>,
        may_backlog: bool,
    ) -> Result<Submitted, SubmitError<PoolSession>> {
        self.shared.submit(request, &self.sink, may_backlog)
    }

    fn submit_batch(
        &mut self,
        requests: &mut VecDeque<Request<PoolSession>>,
        may_backlog: bool,
    ) -> BatchSubmitted {
        self.shared.submit_batch(requests, &self.sink, may_backlog)
    }

    fn poll(&mut self) -> usize {
        let mut n = 0;
        for h in &mut self.polls {
            n += h.poll();
        }
        n + self.shared.kick()
    }

    fn outstanding(&self) -> usize {
        self.shared.outstanding.load(Ordering::Relaxed)
    }

    fn begin_polling(&mut self) {
        self.polling = true;
        for h in &mut self.polls {
            h.begin_polling();
        }
    }

    fn end_polling(&mut self) -> bool {
        self.polling = false;
        let mut sleep_ok = true;
        for h in &mut self.polls {
            sleep_ok &= h.end_polling();
        }
        sleep_ok
    }
}
