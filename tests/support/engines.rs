//! Engine wrappers that change how an engine answers, to test the volume pipeline against
//! engines that backlog constantly and engines that break the contract.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crypt_vfio::engine::{Buf, Completion, Engine, Event, EventSink, Queue, Request, SubmitError, Submitted};
use crypt_vfio::{Mode, Result};

/// What the wrapper does to submissions.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Every request is backlogged, then promoted (with `Promoted`) and passed on at the next
    /// poll, a few at a time: a correct engine that is always "busy".
    AlwaysBacklog,
    /// Once `ring` requests are in flight, further requests are answered `Backlogged` and
    /// dropped: the 2015 CAAM behaviour, which breaks the contract.
    DropBacklogged {
        /// Requests accepted before dropping starts.
        ring: usize,
    },
    /// Every request with backlog allowed goes to the engine at once, and its `Promoted` is
    /// sent from inside `submit`, before `submit` returns `Backlogged`: what the contract allows
    /// when another thread's poll promotes the request first.
    PromoteBeforeReturn,
    /// The engine's first completion is delivered twice, and the last completion of every poll
    /// is held back until the next poll: a duplicate that arrives while a sector is still in
    /// flight (a broken engine).
    DuplicateFirstHoldLast,
    /// Every request is backlogged and passed on at the next poll without a `Promoted`: a
    /// backlogged request completes unannounced (a broken engine).
    CompleteBackloggedUnpromoted,
    /// The first submit of each request (by user data) is answered `Backlogged`, after its
    /// `Promoted` and a `MemberFailed` completion went out from inside `submit`: a pool whose
    /// member failed under the request while another thread's poll promoted it. Its re-run
    /// goes to the engine. A correct engine.
    PromoteAndFailOnce,
}

/// An engine whose queues answer according to a [`Behaviour`].
pub struct Wrapped<E> {
    /// The engine doing the work.
    pub inner: E,
    /// How submissions are answered.
    pub behaviour: Behaviour,
    /// Submits answered `Backlogged`.
    pub backlogged: Arc<AtomicUsize>,
    /// Submits that came while the same queue's earlier backlogged request was not promoted
    /// yet: a caller that does not wait for `Promoted` (what dm-crypt must not do).
    pub impatient: Arc<AtomicUsize>,
}

impl<E> Wrapped<E> {
    /// `inner` answering by `behaviour`.
    pub fn new(inner: E, behaviour: Behaviour) -> Self {
        Self { inner, behaviour, backlogged: Arc::default(), impatient: Arc::default() }
    }
}

impl<E: Engine> Engine for Wrapped<E> {
    type Session = E::Session;

    fn describe(&self) -> String {
        format!("{} behind a test wrapper ({:?})", self.inner.describe(), self.behaviour)
    }

    fn create_session(&self, mode: Mode, key: &[u8]) -> Result<E::Session> {
        self.inner.create_session(mode, key)
    }

    fn destroy_session(&self, session: &E::Session) -> Result<()> {
        self.inner.destroy_session(session)
    }

    fn queue_count(&self) -> usize {
        self.inner.queue_count()
    }

    fn open_queue(&self, index: usize, sink: EventSink<E::Session>) -> Result<Box<dyn Queue<E::Session>>> {
        let held: Arc<Mutex<Vec<Event<E::Session>>>> = Arc::default();
        let gate: Arc<Mutex<PromotionGate<E::Session>>> = Arc::default();
        let inner_sink: EventSink<E::Session> = match self.behaviour {
            Behaviour::DuplicateFirstHoldLast => {
                let held = held.clone();
                Arc::new(move |ev| held.lock().unwrap().push(ev))
            }
            _ => {
                let (gate, sink) = (gate.clone(), sink.clone());
                Arc::new(move |ev| {
                    if let Event::Completed(c) = &ev {
                        let mut g = gate.lock().unwrap();
                        if g.promoting.contains(&c.request.user_data) {
                            g.held.push(ev);
                            return;
                        }
                    }
                    sink(ev)
                })
            }
        };
        Ok(Box::new(WrappedQueue {
            inner: self.inner.open_queue(index, inner_sink)?,
            sink,
            held,
            gate,
            deferred: None,
            duplicated: false,
            pending: VecDeque::new(),
            failed_once: HashSet::new(),
            behaviour: self.behaviour,
            backlogged: self.backlogged.clone(),
            impatient: self.impatient.clone(),
        }))
    }

    fn max_request_len(&self) -> usize {
        self.inner.max_request_len()
    }

    fn alloc_buffer(&self, len: usize) -> Result<Buf> {
        self.inner.alloc_buffer(len)
    }
}

struct WrappedQueue<S> {
    inner: Box<dyn Queue<S>>,
    sink: EventSink<S>,
    /// The inner queue's events (DuplicateFirstHoldLast).
    held: Arc<Mutex<Vec<Event<S>>>>,
    /// Completions that came before their request's `Promoted` went out.
    gate: Arc<Mutex<PromotionGate<S>>>,
    /// The event held back until the next poll.
    deferred: Option<Event<S>>,
    duplicated: bool,
    pending: VecDeque<Request<S>>,
    /// Requests (by user data) already failed once (PromoteAndFailOnce).
    failed_once: HashSet<u64>,
    behaviour: Behaviour,
    backlogged: Arc<AtomicUsize>,
    impatient: Arc<AtomicUsize>,
}

/// Requests being passed to the inner engine and announced, and their completions that came
/// first. An engine that completes on its own threads (interrupt or adaptive mode) can finish a
/// request before the wrapper has sent its `Promoted`; the contract wants `Promoted` first.
struct PromotionGate<S> {
    promoting: HashSet<u64>,
    held: Vec<Event<S>>,
}

impl<S> Default for PromotionGate<S> {
    fn default() -> Self {
        Self { promoting: HashSet::new(), held: Vec::new() }
    }
}

/// A copy of a completion: what a device that reports one request twice produces.
fn duplicate<S: Clone>(c: &Completion<S>) -> Completion<S> {
    let r = &c.request;
    let mut request = Request::new(
        r.session.clone(),
        r.direction,
        r.iv,
        Buf::Host(r.data.as_slice().to_vec()),
        r.user_data,
    );
    request.aad = r.aad.clone();
    request.tag = r.tag;
    Completion { request, result: Ok(()) }
}

impl<S: Send + Clone> WrappedQueue<S> {
    /// Submits `request` to the inner engine without backlog and, when it went in and
    /// `announce` is set, sends its `Promoted` before any completion of it.
    #[allow(clippy::result_large_err)] // the request goes back whole, as the contract wants
    fn pass_on(&mut self, request: Request<S>, announce: bool) -> Result<(), SubmitError<S>> {
        let user_data = request.user_data;
        self.gate.lock().unwrap().promoting.insert(user_data);
        let submitted = self.inner.submit(request, false);
        if submitted.is_ok() && announce {
            (self.sink)(Event::Promoted { user_data });
        }
        let early: Vec<Event<S>> = {
            let mut g = self.gate.lock().unwrap();
            g.promoting.remove(&user_data);
            let (early, rest) = std::mem::take(&mut g.held)
                .into_iter()
                .partition(|ev| matches!(ev, Event::Completed(c) if c.request.user_data == user_data));
            g.held = rest;
            early
        };
        early.into_iter().for_each(|ev| (self.sink)(ev));
        submitted.map(|_| ())
    }

    fn poll_duplicating(&mut self) -> usize {
        let mut n = 0;
        if let Some(ev) = self.deferred.take() {
            (self.sink)(ev);
            n += 1;
        }
        n += self.inner.poll();
        let mut events = std::mem::take(&mut *self.held.lock().unwrap());
        self.deferred = events.pop();
        for ev in events {
            let copy = match &ev {
                Event::Completed(c) if !self.duplicated => {
                    self.duplicated = true;
                    Some(duplicate(c))
                }
                _ => None,
            };
            (self.sink)(ev);
            if let Some(c) = copy {
                (self.sink)(Event::Completed(c));
            }
        }
        n
    }
}

impl<S: Send + Clone> Queue<S> for WrappedQueue<S> {
    fn submit(&mut self, request: Request<S>, may_backlog: bool) -> Result<Submitted, SubmitError<S>> {
        match self.behaviour {
            Behaviour::PromoteBeforeReturn => {
                if !may_backlog {
                    return self.inner.submit(request, false);
                }
                self.pass_on(request, true)?;
                self.backlogged.fetch_add(1, Ordering::Relaxed);
                Ok(Submitted::Backlogged)
            }
            Behaviour::DuplicateFirstHoldLast => self.inner.submit(request, may_backlog),
            Behaviour::PromoteAndFailOnce => {
                if !may_backlog || !self.failed_once.insert(request.user_data) {
                    return self.inner.submit(request, may_backlog);
                }
                let user_data = request.user_data;
                (self.sink)(Event::Promoted { user_data });
                let source = Box::new(crypt_vfio::Error::Device(crypt_vfio::DeviceError::Failed(
                    "test wrapper: member failed".into(),
                )));
                let result = Err(crypt_vfio::Error::Device(crypt_vfio::DeviceError::MemberFailed {
                    member: "test#0".into(),
                    source,
                }));
                (self.sink)(Event::Completed(Completion { request, result }));
                self.backlogged.fetch_add(1, Ordering::Relaxed);
                Ok(Submitted::Backlogged)
            }
            Behaviour::AlwaysBacklog | Behaviour::CompleteBackloggedUnpromoted => {
                if !may_backlog {
                    return Err(SubmitError::busy(request));
                }
                if !self.pending.is_empty() {
                    self.impatient.fetch_add(1, Ordering::Relaxed);
                }
                self.pending.push_back(request);
                self.backlogged.fetch_add(1, Ordering::Relaxed);
                Ok(Submitted::Backlogged)
            }
            Behaviour::DropBacklogged { ring } => {
                if self.inner.outstanding() >= ring {
                    drop(request);
                    self.backlogged.fetch_add(1, Ordering::Relaxed);
                    Ok(Submitted::Backlogged)
                } else {
                    self.inner.submit(request, may_backlog)
                }
            }
        }
    }

    fn poll(&mut self) -> usize {
        if matches!(self.behaviour, Behaviour::DuplicateFirstHoldLast) {
            return self.poll_duplicating();
        }
        let mut n = 0;
        // Promote a few, oldest first; each announced before the engine can complete it.
        for _ in 0..4 {
            let Some(req) = self.pending.pop_front() else { break };
            let announce = !matches!(self.behaviour, Behaviour::CompleteBackloggedUnpromoted);
            match self.pass_on(req, announce) {
                Ok(()) => n += 1,
                Err(e) => {
                    self.pending.push_front(e.request);
                    break;
                }
            }
        }
        n + self.inner.poll()
    }

    fn outstanding(&self) -> usize {
        self.inner.outstanding() + self.pending.len() + usize::from(self.deferred.is_some())
    }
}
