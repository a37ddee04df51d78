//! Engine wrappers that change how an engine answers, to test the volume pipeline against
//! engines that backlog constantly and engines that break the contract.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crypt_vfio::engine::{Buf, Engine, Event, EventSink, Queue, Request, SubmitError, Submitted};
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
        Ok(Box::new(WrappedQueue {
            inner: self.inner.open_queue(index, sink.clone())?,
            sink,
            pending: VecDeque::new(),
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
    pending: VecDeque<Request<S>>,
    behaviour: Behaviour,
    backlogged: Arc<AtomicUsize>,
    impatient: Arc<AtomicUsize>,
}

impl<S: Send> Queue<S> for WrappedQueue<S> {
    fn submit(&mut self, request: Request<S>, may_backlog: bool) -> Result<Submitted, SubmitError<S>> {
        match self.behaviour {
            Behaviour::AlwaysBacklog => {
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
        let mut n = 0;
        // Promote a few, oldest first; each announced before the engine can complete it.
        for _ in 0..4 {
            let Some(req) = self.pending.pop_front() else { break };
            let user_data = req.user_data;
            match self.inner.submit(req, false) {
                Ok(_) => {
                    (self.sink)(Event::Promoted { user_data });
                    n += 1;
                }
                Err(e) => {
                    self.pending.push_front(e.request);
                    break;
                }
            }
        }
        n + self.inner.poll()
    }

    fn outstanding(&self) -> usize {
        self.inner.outstanding() + self.pending.len()
    }
}
