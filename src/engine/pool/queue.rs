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
    handles: Vec<Option<Box<dyn Queue<AnySession>>>>,
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
                if engine.device().is_none() {
                    handles.push(None);
                    continue;
                }
                let weak = weak.clone();
                let sink: BatchSink<AnySession> = Arc::new(move |events| {
                    if let Some(q) = weak.upgrade() {
                        q.on_member_events(m, events);
                    } else {
                        // The pool queue is gone (every handle and the engine): nobody waits.
                        events.for_each(drop);
                    }
                });
                match engine.open_batch_queue(index, sink) {
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
                    handles,
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
    /// whose member failed while taking them, completions of the software member) where they go.
    fn with_ring<R>(
        &self,
        st: &mut State,
        f: impl FnOnce(&mut Backlog<Pending>, &mut PoolRing<'_>, &mut Outbox) -> R,
    ) -> R {
        let State { backlog, outbox, tickets, free, handles } = st;
        let mut ring = PoolRing { q: self, tickets, free, handles, deferred: Vec::new(), done: Vec::new() };
        let r = f(backlog, &mut ring, outbox);
        let PoolRing { deferred, done, .. } = ring;
        for p in deferred {
            backlog.rerun(p);
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
        self.deliver()
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
    fn on_member_events(&self, m: usize, events: &mut dyn Iterator<Item = Event<AnySession>>) {
        {
            let mut st = self.lock();
            for event in events {
                match event {
                    Event::Promoted { user_data } => log::error!(
                        "pool member {} promoted request {user_data}, which it was never let backlog",
                        self.shared.members[m].name
                    ),
                    Event::Completed(c) => self.member_completed(&mut st, m, c),
                }
            }
            self.promote_locked(&mut st);
        }
        self.deliver();
    }

    fn member_completed(&self, st: &mut State, m: usize, c: Completion<AnySession>) {
        let Completion { request, result } = c;
        let id = request.user_data as usize;
        let Some(ticket) = st.tickets.get_mut(id).and_then(Option::take) else {
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
            return Err(Error::Device(DeviceError::Failed("the engine pool was closed".into())));
        }
        if self.shared.is_dead() {
            return Err(self.shared.no_member_left());
        }
        self.pin_of(&req.data)
    }

    /// After a submit: events for callers who sleep while the pool delivers by itself are
    /// handed to the monitor (a submit never calls a callback itself).
    fn after_submit(&self, st: MutexGuard<'_, State>) {
        let events = !st.outbox.is_empty();
        if events {
            self.delivery.mark_pending();
        }
        drop(st);
        if events && self.shared.delivers {
            self.shared.signal.wake();
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
        // Counted before the request can complete (the software member completes in place).
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
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

/// The request with its caller's session and id back.
fn with_session(req: Request<AnySession>, session: PoolSession, user_data: u64) -> Request<PoolSession> {
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

/// The members as the pool queue's ring.
struct PoolRing<'a> {
    q: &'a PoolQueueShared,
    tickets: &'a mut Vec<Option<Ticket>>,
    free: &'a mut Vec<usize>,
    handles: &'a mut Vec<Option<Box<dyn Queue<AnySession>>>>,
    /// Requests accepted whose member failed while taking them: to the re-run lane.
    deferred: Vec<Pending>,
    /// Completions of the software member (after any `Promoted` of theirs in the outbox).
    done: Outbox,
}

impl PoolRing<'_> {
    /// The member `p` should go to now, skipping those in `skip` (a bit per member).
    fn choose(&self, p: &Pending, skip: u64) -> Option<usize> {
        let shared = &*self.q.shared;
        let slots = p.req.session.state.slots();
        let usable = |m: usize| {
            skip & (1 << m) == 0 && shared.members[m].is_up() && matches!(slots.get(m), Some(Slot::Have(_)))
        };
        if let Some(m) = p.pinned.filter(|&m| shared.members[m].is_up()) {
            return (usable(m) && shared.members[m].credit(self.q.index).is_some_and(|c| c.free() > 0))
                .then_some(m);
        }
        // Pinned to a member that is not up: it runs elsewhere from a copy (see `unpin`).
        // Join the shortest queue: the device with the largest free fraction, ties to home.
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
            return Some(m);
        }
        if device_holds {
            // Devices hold the session and are only full: wait for them, keep AES off this thread.
            return None;
        }
        // The software member stands by for when no device can run the request.
        (0..shared.members.len()).find(|&m| shared.members[m].software && usable(m))
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

    /// Runs `p` on the software member `m`, in place.
    fn run_software(&mut self, m: usize, mut p: Pending) -> Result<(), (Pending, Error)> {
        let Some(AnySession::Software(s)) = p.req.session.on(m) else {
            return Err((p, Error::Crypto(CryptoError::InvalidSession)));
        };
        let result = run_cipher(&**s.cipher(), &mut p.req);
        let member = &self.q.shared.members[m];
        member.requests.fetch_add(1, Ordering::Relaxed);
        member.bytes.fetch_add(p.req.data.len() as u64, Ordering::Relaxed);
        if p.attempts > 0 {
            member.reruns_in.fetch_add(1, Ordering::Relaxed);
        }
        self.q.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.done.push((p.sink, Event::Completed(Completion { request: p.req, result })));
        Ok(())
    }
}

impl Ring<Pending> for PoolRing<'_> {
    fn has_space(&self) -> bool {
        true
    }

    fn has_space_for(&self, p: &Pending) -> bool {
        self.choose(p, 0).is_some()
    }

    fn push(&mut self, mut p: Pending) -> Result<(), (Pending, Error)> {
        let shared = self.q.shared.clone();
        let mut skip = 0u64;
        while let Some(m) = self.choose(&p, skip) {
            skip |= 1 << m;
            if p.pinned.is_some_and(|pin| pin != m) {
                unpin(&mut p);
            }
            let member = &shared.members[m];
            if member.software {
                return self.run_software(m, p);
            }
            let (Some(credit), Some(session)) = (member.credit(self.q.index), p.req.session.on(m)) else {
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
            let member_req = Request { session, direction, iv, aad, data, tag, user_data: id as u64 };
            let Some(handle) = self.handles[m].as_mut() else {
                unreachable!("a device member has a submit handle")
            };
            let refused = match handle.submit(member_req, false) {
                Ok(_) => {
                    if attempts > 0 {
                        member.reruns_in.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            credit.give_back();
            let t = self.tickets[id].take().expect("the ticket just made");
            self.free.push(id);
            p = Pending {
                req: with_session(refused.request, t.session, t.user_data),
                sink: t.sink,
                attempts,
                pinned: t.pinned,
            };
            match refused.kind {
                SubmitErrorKind::Busy => {
                    log::error!("pool member {} refused a request it had a credit for (busy)", member.name)
                }
                SubmitErrorKind::Rejected(Error::Device(d)) if d.is_device_loss() => {
                    shared.member_down(m, &d.to_string());
                    unpin(&mut p);
                }
                SubmitErrorKind::Rejected(e) => return Err((p, e)),
            }
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
    polls: Vec<Box<dyn Queue<AnySession>>>,
    polling: bool,
}

impl PoolQueue {
    pub(crate) fn new(
        shared: Arc<PoolQueueShared>,
        sink: BatchSink<PoolSession>,
        engines: &[AnyEngine],
    ) -> Result<Self> {
        let mut polls = Vec::new();
        for engine in engines.iter().filter(|e| e.device().is_some()) {
            let stray: BatchSink<AnySession> = Arc::new(|events| {
                let n = events.count();
                log::error!("pool: {n} event(s) reached a poll-only member handle");
            });
            polls.push(engine.open_batch_queue(shared.index, stray)?);
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
