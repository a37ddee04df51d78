//! `async` requests on top of the submit API, for any executor.
//!
//! [`AsyncQueue::run`] submits with backlog allowed and resolves with the final completion. It
//! keeps the pipeline discipline of the contract: while one of its requests sits in the backlog,
//! new requests wait for that request's `Promoted` instead of piling up, and a full backlog
//! (`Busy`) makes them wait for a completion instead of failing. Waiting never blocks a thread.
//!
//! In polling mode the futures drive the queue themselves (each poll reaps completions and wakes
//! itself), so no reactor is needed; with an engine that completes on its own thread
//! (interrupts) they simply wait to be woken.
//!
//! A request's `Promoted` may reach the sink before its submit has returned `Backlogged` (another
//! thread polled in between, or the engine announces it from inside `submit`): the slot remembers
//! it, so the future does not wait for a `Promoted` that already came. A future dropped before
//! its completion leaves its request with the engine; the slot is marked abandoned and the
//! completion (with its buffer) is dropped when it arrives instead of being kept forever.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use super::sync::{AtomicU64, Mutex, MutexGuard, Ordering};

use super::{Buf, Completion, Direction, Engine, Event, Iv, Queue, Request, SubmitErrorKind, TAG_LEN};
use crate::error::{CryptoError, Error, Result};

enum Slot<S> {
    /// Accepted (or being submitted), not completed; `promoted` once its `Promoted` came.
    Waiting { waker: Option<Waker>, promoted: bool },
    /// Completed, the future has not taken it yet.
    Done(Completion<S>),
    /// The future was dropped: the completion is dropped on arrival.
    Abandoned,
}

struct Shared<S> {
    queue: Mutex<Option<Box<dyn Queue<S>>>>,
    state: Mutex<State<S>>,
    next_id: AtomicU64,
    self_driven: bool,
}

struct State<S> {
    slots: HashMap<u64, Slot<S>>,
    /// A request of ours waits in the backlog: hold new submissions until it is promoted.
    blocked_on: Option<u64>,
    /// Futures waiting to submit (backlog wait or busy).
    waiters: Vec<Waker>,
}

impl<S> Shared<S> {
    fn state(&self) -> MutexGuard<'_, State<S>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn on_event(&self, event: Event<S>) {
        let mut st = self.state();
        let wake_waiters = match event {
            Event::Promoted { user_data } => {
                if let Some(Slot::Waiting { promoted, .. }) = st.slots.get_mut(&user_data) {
                    // Remembered for a submitter that has not seen its Backlogged yet.
                    *promoted = true;
                }
                if st.blocked_on == Some(user_data) {
                    st.blocked_on = None;
                    true
                } else {
                    false
                }
            }
            Event::Completed(c) => {
                let id = c.request.user_data;
                match st.slots.remove(&id) {
                    Some(Slot::Abandoned) => {
                        // Nobody will take it: drop it (and its buffer) now.
                        if st.blocked_on == Some(id) {
                            st.blocked_on = None;
                        }
                    }
                    Some(Slot::Waiting { waker, .. }) => {
                        st.slots.insert(id, Slot::Done(c));
                        if let Some(w) = waker {
                            w.wake();
                        }
                    }
                    other => {
                        log::error!(
                            "async queue: a completion for request {id}, which is not waiting for one"
                        );
                        if let Some(slot) = other {
                            st.slots.insert(id, slot);
                        }
                    }
                }
                true
            }
        };
        if wake_waiters {
            for w in st.waiters.drain(..) {
                w.wake();
            }
        }
    }

    /// Reaps completions if this side drives the queue (never blocks on a busy lock).
    fn drive(&self) {
        if let Ok(mut q) = self.queue.try_lock() {
            if let Some(q) = q.as_mut() {
                q.poll();
            }
        }
    }
}

/// An async submission queue over an engine queue.
pub struct AsyncQueue<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for AsyncQueue<S> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<S: Clone + Send + Sync + 'static> AsyncQueue<S> {
    /// Opens queue `index` of `engine`, with futures that poll the queue themselves exactly when
    /// the engine does not deliver events on its own thread ([`Engine::delivers_events`]).
    pub fn open<E: Engine<Session = S>>(engine: &E, index: usize) -> Result<Self> {
        Self::new(engine, index, !engine.delivers_events())
    }

    /// Opens queue `index` of `engine`. With `self_driven`, futures poll the queue themselves
    /// (for engines in polling mode); without, something else must deliver events.
    /// [`open`](Self::open) chooses for the engine.
    pub fn new<E: Engine<Session = S>>(engine: &E, index: usize, self_driven: bool) -> Result<Self> {
        // The queue's sink needs the shared state, and the shared state holds the queue.
        let shared = Arc::new(Shared {
            queue: Mutex::new(None),
            state: Mutex::new(State { slots: HashMap::new(), blocked_on: None, waiters: Vec::new() }),
            next_id: AtomicU64::new(1),
            self_driven,
        });
        let weak: Weak<Shared<S>> = Arc::downgrade(&shared);
        let sink: super::EventSink<S> = Arc::new(move |ev| {
            if let Some(s) = weak.upgrade() {
                s.on_event(ev)
            }
        });
        *shared.queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine.open_queue(index, sink)?);
        Ok(Self { shared })
    }

    /// Requests whose state the queue still keeps: submitted and not yet taken by their future
    /// (in flight, or finished and not yet polled, or abandoned and not yet completed).
    pub fn tracked(&self) -> usize {
        self.shared.state().slots.len()
    }

    /// Runs `request` and resolves with it and its outcome (the request's `user_data` is
    /// replaced by the queue's own identifier).
    pub fn run(&self, request: Request<S>) -> RunFuture<S> {
        RunFuture { shared: self.shared.clone(), request: Some(request), id: None }
    }

    /// Encrypts `data` with `session`; returns the ciphertext and the tag (zero for non-AEAD).
    pub async fn encrypt(
        &self,
        session: S,
        iv: &[u8],
        aad: &[u8],
        data: Buf,
    ) -> Result<(Buf, [u8; TAG_LEN])> {
        let iv = Iv::new(iv)
            .ok_or_else(|| Error::Crypto(CryptoError::InvalidRequest(format!("{}-byte IV", iv.len()))))?;
        let mut req = Request::new(session, Direction::Encrypt, iv, data, 0);
        req.aad = aad.to_vec();
        let (req, result) = self.run(req).await;
        result.map(|()| (req.data, req.tag))
    }

    /// Decrypts `data` with `session`, checking `tag` for AEAD sessions.
    pub async fn decrypt(
        &self,
        session: S,
        iv: &[u8],
        aad: &[u8],
        data: Buf,
        tag: [u8; TAG_LEN],
    ) -> Result<Buf> {
        let iv = Iv::new(iv)
            .ok_or_else(|| Error::Crypto(CryptoError::InvalidRequest(format!("{}-byte IV", iv.len()))))?;
        let mut req = Request::new(session, Direction::Decrypt, iv, data, 0);
        req.aad = aad.to_vec();
        req.tag = tag;
        let (req, result) = self.run(req).await;
        result.map(|()| req.data)
    }
}

/// The future of [`AsyncQueue::run`].
pub struct RunFuture<S> {
    shared: Arc<Shared<S>>,
    request: Option<Request<S>>,
    id: Option<u64>,
}

impl<S> Unpin for RunFuture<S> {}

impl<S> RunFuture<S> {
    fn pending(&self, cx: &Context<'_>) -> Poll<(Request<S>, Result<()>)> {
        if self.shared.self_driven {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<S> Drop for RunFuture<S> {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        let mut st = self.shared.state();
        match st.slots.remove(&id) {
            // Finished and never taken: the completion goes now.
            Some(Slot::Done(_)) | None => {}
            // Still with the engine: its completion is dropped when it comes.
            Some(Slot::Waiting { .. } | Slot::Abandoned) => {
                st.slots.insert(id, Slot::Abandoned);
            }
        }
    }
}

impl<S> Future for RunFuture<S> {
    type Output = (Request<S>, Result<()>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let shared = self.shared.clone();
        if let Some(id) = self.id {
            if shared.self_driven {
                shared.drive();
            }
            let mut st = shared.state();
            return match st.slots.remove(&id) {
                Some(Slot::Done(c)) => {
                    drop(st);
                    self.id = None;
                    Poll::Ready((c.request, c.result))
                }
                Some(Slot::Waiting { promoted, .. }) => {
                    st.slots.insert(id, Slot::Waiting { waker: Some(cx.waker().clone()), promoted });
                    drop(st);
                    self.pending(cx)
                }
                Some(Slot::Abandoned) | None => {
                    // Polled again after it resolved.
                    drop(st);
                    self.id = None;
                    Poll::Pending
                }
            };
        }
        // Not yet accepted: wait while one of our requests is backlogged.
        {
            let mut st = shared.state();
            if st.blocked_on.is_some() {
                st.waiters.push(cx.waker().clone());
                drop(st);
                if shared.self_driven {
                    shared.drive();
                }
                return self.pending(cx);
            }
        }
        // Polled again after it resolved: the request was handed back already.
        let Some(mut req) = self.request.take() else {
            return Poll::Pending;
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        req.user_data = id;
        shared.state().slots.insert(id, Slot::Waiting { waker: Some(cx.waker().clone()), promoted: false });
        let outcome = match shared.queue.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(q) => q.submit(req, true),
            None => Err(super::SubmitError::rejected(
                req,
                Error::Crypto(CryptoError::InvalidRequest("queue not open".into())),
            )),
        };
        match outcome {
            Ok(s) => {
                self.id = Some(id);
                if s == super::Submitted::Backlogged {
                    let mut st = shared.state();
                    // Promoted may already have arrived (another poller, or the engine said it
                    // before returning): then there is nothing to wait for.
                    if matches!(st.slots.get(&id), Some(Slot::Waiting { promoted: false, .. })) {
                        st.blocked_on = Some(id);
                    }
                }
                self.pending(cx)
            }
            Err(e) => {
                shared.state().slots.remove(&id);
                match e.kind {
                    SubmitErrorKind::Busy => {
                        self.request = Some(e.request);
                        shared.state().waiters.push(cx.waker().clone());
                        if shared.self_driven {
                            shared.drive();
                        }
                        self.pending(cx)
                    }
                    SubmitErrorKind::Rejected(err) => Poll::Ready((e.request, Err(err))),
                }
            }
        }
    }
}
