//! One engine type for whichever engine a device name opened.
//!
//! [`crate::open`] turns `emulated`, a PCI address or `software` into an engine; those are a
//! [`VirtioCrypto`] or a [`SoftwareEngine`], two types. So that a caller (a volume, an example, a
//! tool) is written once for either, [`AnyEngine`] holds one of them and forwards every call.
//! Its sessions and queues are wrappers in the same way; a request moves between the wrapper
//! and the inner type by value, so the data is never copied.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use crypt_vfio_cores::Mode;

use super::pool::{PoolEngine, PoolSession};
use super::software::{SoftwareEngine, SoftwareSession};
use super::{
    BatchSink, BatchSubmitted, Buf, Completion, Engine, Event, EventSink, Queue, Request, SubmitError,
    SubmitErrorKind, Submitted,
};
use crate::error::{CryptoError, Error, Result};
use crate::virtio_crypto::{DeviceSession, VirtioCrypto};

/// A device or the software engine, behind one type.
///
/// ```
/// use crypt_vfio::engine::Engine;
///
/// let engine = crypt_vfio::open("software")?;
/// assert_eq!(engine.describe(), "software (aws-lc)");
/// assert!(engine.device().is_none());
/// # Ok::<(), crypt_vfio::Error>(())
/// ```
pub enum AnyEngine {
    /// A virtio-crypto device (emulated or behind VFIO).
    Device(VirtioCrypto),
    /// The AES cores on the caller's thread.
    Software(SoftwareEngine),
    /// Several of the above as one engine (`--device a,b,software`).
    Pool(PoolEngine),
}

impl fmt::Debug for AnyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AnyEngine").field(&self.describe()).finish()
    }
}

impl AnyEngine {
    /// The device, when this engine is one (for its [`info`](VirtioCrypto::info), health and
    /// [`abort`](VirtioCrypto::abort)).
    pub fn device(&self) -> Option<&VirtioCrypto> {
        match self {
            AnyEngine::Device(d) => Some(d),
            AnyEngine::Software(_) | AnyEngine::Pool(_) => None,
        }
    }

    /// The pool, when this engine is one (for its members and their shares).
    pub fn pool(&self) -> Option<&PoolEngine> {
        match self {
            AnyEngine::Pool(p) => Some(p),
            _ => None,
        }
    }

    /// Every device this engine drives: the device, or a pool's device members.
    pub fn devices(&self) -> Vec<&VirtioCrypto> {
        match self {
            AnyEngine::Device(d) => vec![d],
            AnyEngine::Software(_) => Vec::new(),
            AnyEngine::Pool(p) => p.members().filter_map(|(_, e)| e.device()).collect(),
        }
    }

    /// Stops every device for good and completes every request with an error, without
    /// recovery (or, in a pool, running anything again): for a caller that must end now.
    pub fn abort(&self) {
        match self {
            AnyEngine::Device(d) => d.abort(),
            AnyEngine::Software(_) => {}
            AnyEngine::Pool(p) => p.abort(),
        }
    }

    /// Whether events arrive without the caller polling (a device in interrupt mode). When they
    /// do not, whoever waits for a completion must call [`Queue::poll`]; see
    /// [`AsyncQueue::new`](super::async_api::AsyncQueue::new).
    pub fn completes_by_itself(&self) -> bool {
        match self {
            AnyEngine::Device(d) => d.interrupts(),
            AnyEngine::Software(_) => false,
            AnyEngine::Pool(p) => p.completes_by_itself(),
        }
    }
}

impl From<VirtioCrypto> for AnyEngine {
    fn from(d: VirtioCrypto) -> Self {
        AnyEngine::Device(d)
    }
}

impl From<PoolEngine> for AnyEngine {
    fn from(p: PoolEngine) -> Self {
        AnyEngine::Pool(p)
    }
}

impl From<SoftwareEngine> for AnyEngine {
    fn from(s: SoftwareEngine) -> Self {
        AnyEngine::Software(s)
    }
}

/// A session of an [`AnyEngine`]: valid only on the engine that created it.
#[derive(Clone, Debug)]
pub enum AnySession {
    /// A session on a device.
    Device(DeviceSession),
    /// A software session.
    Software(SoftwareSession),
    /// A session of an engine pool.
    Pool(PoolSession),
}

impl AnySession {
    /// The session's mode.
    pub fn mode(&self) -> Mode {
        match self {
            AnySession::Device(s) => s.mode(),
            AnySession::Software(s) => s.mode(),
            AnySession::Pool(s) => s.mode(),
        }
    }
}

/// `req` with its session replaced by `f(session)`; nothing else moves.
fn map_session<S, T>(req: Request<S>, f: impl FnOnce(S) -> T) -> Request<T> {
    let Request { session, direction, iv, aad, data, tag, user_data } = req;
    Request { session: f(session), direction, iv, aad, data, tag, user_data }
}

/// The session of `req`, and the rest of it.
fn split<S>(req: Request<S>) -> (S, Request<()>) {
    let Request { session, direction, iv, aad, data, tag, user_data } = req;
    (session, Request { session: (), direction, iv, aad, data, tag, user_data })
}

fn map_event<S, T>(event: Event<S>, f: impl FnOnce(S) -> T) -> Event<T> {
    match event {
        Event::Promoted { user_data } => Event::Promoted { user_data },
        Event::Completed(Completion { request, result }) => {
            Event::Completed(Completion { request: map_session(request, f), result })
        }
    }
}

impl Engine for AnyEngine {
    type Session = AnySession;

    fn describe(&self) -> String {
        match self {
            AnyEngine::Device(d) => d.describe(),
            AnyEngine::Software(s) => s.describe(),
            AnyEngine::Pool(p) => p.describe(),
        }
    }

    fn create_session(&self, mode: Mode, key: &[u8]) -> Result<AnySession> {
        Ok(match self {
            AnyEngine::Device(d) => AnySession::Device(d.create_session(mode, key)?),
            AnyEngine::Software(s) => AnySession::Software(s.create_session(mode, key)?),
            AnyEngine::Pool(p) => AnySession::Pool(p.create_session(mode, key)?),
        })
    }

    fn destroy_session(&self, session: &AnySession) -> Result<()> {
        match (self, session) {
            (AnyEngine::Device(d), AnySession::Device(s)) => d.destroy_session(s),
            (AnyEngine::Software(e), AnySession::Software(s)) => e.destroy_session(s),
            (AnyEngine::Pool(p), AnySession::Pool(s)) => p.destroy_session(s),
            _ => Err(Error::Crypto(CryptoError::InvalidSession)),
        }
    }

    fn queue_count(&self) -> usize {
        match self {
            AnyEngine::Device(d) => d.queue_count(),
            AnyEngine::Software(s) => s.queue_count(),
            AnyEngine::Pool(p) => p.queue_count(),
        }
    }

    fn open_queue(&self, index: usize, sink: EventSink<AnySession>) -> Result<Box<dyn Queue<AnySession>>> {
        Ok(match self {
            AnyEngine::Device(d) => {
                let inner: EventSink<DeviceSession> =
                    Arc::new(move |ev| sink(map_event(ev, AnySession::Device)));
                Box::new(AnyQueue::Device(d.open_queue(index, inner)?))
            }
            AnyEngine::Software(s) => {
                let inner: EventSink<SoftwareSession> =
                    Arc::new(move |ev| sink(map_event(ev, AnySession::Software)));
                Box::new(AnyQueue::Software(s.open_queue(index, inner)?))
            }
            AnyEngine::Pool(p) => {
                let inner: EventSink<PoolSession> = Arc::new(move |ev| sink(map_event(ev, AnySession::Pool)));
                Box::new(AnyQueue::Pool(p.open_queue(index, inner)?))
            }
        })
    }

    fn open_batch_queue(
        &self,
        index: usize,
        sink: BatchSink<AnySession>,
    ) -> Result<Box<dyn Queue<AnySession>>> {
        Ok(match self {
            AnyEngine::Device(d) => {
                let inner: BatchSink<DeviceSession> =
                    Arc::new(move |run| sink(&mut run.map(|ev| map_event(ev, AnySession::Device))));
                Box::new(AnyQueue::Device(d.open_batch_queue(index, inner)?))
            }
            AnyEngine::Software(s) => {
                let inner: BatchSink<SoftwareSession> =
                    Arc::new(move |run| sink(&mut run.map(|ev| map_event(ev, AnySession::Software))));
                Box::new(AnyQueue::Software(s.open_batch_queue(index, inner)?))
            }
            AnyEngine::Pool(p) => {
                let inner: BatchSink<PoolSession> =
                    Arc::new(move |run| sink(&mut run.map(|ev| map_event(ev, AnySession::Pool))));
                Box::new(AnyQueue::Pool(p.open_batch_queue(index, inner)?))
            }
        })
    }

    fn max_request_len(&self) -> usize {
        match self {
            AnyEngine::Device(d) => d.max_request_len(),
            AnyEngine::Software(s) => s.max_request_len(),
            AnyEngine::Pool(p) => p.max_request_len(),
        }
    }

    fn queue_capacity(&self, index: usize) -> Option<usize> {
        match self {
            AnyEngine::Device(d) => d.queue_capacity(index),
            AnyEngine::Software(s) => s.queue_capacity(index),
            AnyEngine::Pool(p) => p.queue_capacity(index),
        }
    }

    fn delivers_events(&self) -> bool {
        self.completes_by_itself()
    }

    fn alloc_buffer(&self, len: usize) -> Result<Buf> {
        match self {
            AnyEngine::Device(d) => d.alloc_buffer(len),
            AnyEngine::Software(s) => s.alloc_buffer(len),
            AnyEngine::Pool(p) => p.alloc_buffer(len),
        }
    }
}

/// A queue of an [`AnyEngine`].
enum AnyQueue {
    Device(Box<dyn Queue<DeviceSession>>),
    Software(Box<dyn Queue<SoftwareSession>>),
    Pool(Box<dyn Queue<PoolSession>>),
}

/// Submits `req` (whose session is already unwrapped) and wraps the refused request back.
fn forward<S, T>(
    queue: &mut dyn Queue<S>,
    req: Request<S>,
    may_backlog: bool,
    wrap: impl FnOnce(S) -> T,
) -> Result<Submitted, SubmitError<T>> {
    queue
        .submit(req, may_backlog)
        .map_err(|SubmitError { kind, request }| SubmitError { kind, request: map_session(request, wrap) })
}

/// Submits the leading run of `requests` whose session is of this queue's kind (`unwrap`) as
/// one batch on `queue`, so that an engine's own batching (one lock, one doorbell; a pool's
/// one pass over its members) is kept; what it does not accept goes back in front, in order.
/// A request of another kind at the head ends the batch refused, as [`forward`] refuses it.
fn forward_batch<S>(
    queue: &mut dyn Queue<S>,
    requests: &mut VecDeque<Request<AnySession>>,
    may_backlog: bool,
    unwrap: impl Fn(AnySession) -> Result<S, AnySession>,
    wrap: impl Fn(S) -> AnySession,
) -> BatchSubmitted {
    let mut inner = VecDeque::with_capacity(requests.len());
    while let Some(r) = requests.pop_front() {
        let (session, rest) = split(r);
        match unwrap(session) {
            Ok(s) => inner.push_back(map_session(rest, |()| s)),
            Err(other) => {
                requests.push_front(map_session(rest, |()| other));
                break;
            }
        }
    }
    let wrong_kind_next = !requests.is_empty();
    let mut out = if inner.is_empty() {
        BatchSubmitted::default()
    } else {
        queue.submit_batch(&mut inner, may_backlog)
    };
    let all_taken = inner.is_empty();
    while let Some(r) = inner.pop_back() {
        requests.push_front(map_session(r, &wrap));
    }
    if all_taken && wrong_kind_next && out.refused.is_none() {
        out.refused = Some(SubmitErrorKind::Rejected(Error::Crypto(CryptoError::InvalidSession)));
    }
    out
}

impl Queue<AnySession> for AnyQueue {
    fn submit_batch(
        &mut self,
        requests: &mut VecDeque<Request<AnySession>>,
        may_backlog: bool,
    ) -> BatchSubmitted {
        match self {
            AnyQueue::Device(q) => forward_batch(
                &mut **q,
                requests,
                may_backlog,
                |s| match s {
                    AnySession::Device(s) => Ok(s),
                    other => Err(other),
                },
                AnySession::Device,
            ),
            AnyQueue::Software(q) => forward_batch(
                &mut **q,
                requests,
                may_backlog,
                |s| match s {
                    AnySession::Software(s) => Ok(s),
                    other => Err(other),
                },
                AnySession::Software,
            ),
            AnyQueue::Pool(q) => forward_batch(
                &mut **q,
                requests,
                may_backlog,
                |s| match s {
                    AnySession::Pool(s) => Ok(s),
                    other => Err(other),
                },
                AnySession::Pool,
            ),
        }
    }

    fn submit(
        &mut self,
        request: Request<AnySession>,
        may_backlog: bool,
    ) -> Result<Submitted, SubmitError<AnySession>> {
        let (session, rest) = split(request);
        match (self, session) {
            (AnyQueue::Device(q), AnySession::Device(s)) => {
                forward(&mut **q, map_session(rest, |()| s), may_backlog, AnySession::Device)
            }
            (AnyQueue::Software(q), AnySession::Software(s)) => {
                forward(&mut **q, map_session(rest, |()| s), may_backlog, AnySession::Software)
            }
            (AnyQueue::Pool(q), AnySession::Pool(s)) => {
                forward(&mut **q, map_session(rest, |()| s), may_backlog, AnySession::Pool)
            }
            // A session of the other kind of engine names nothing here.
            (_, session) => Err(SubmitError::rejected(
                map_session(rest, |()| session),
                Error::Crypto(CryptoError::InvalidSession),
            )),
        }
    }

    fn poll(&mut self) -> usize {
        match self {
            AnyQueue::Device(q) => q.poll(),
            AnyQueue::Software(q) => q.poll(),
            AnyQueue::Pool(q) => q.poll(),
        }
    }

    fn outstanding(&self) -> usize {
        match self {
            AnyQueue::Device(q) => q.outstanding(),
            AnyQueue::Software(q) => q.outstanding(),
            AnyQueue::Pool(q) => q.outstanding(),
        }
    }

    fn begin_polling(&mut self) {
        match self {
            AnyQueue::Device(q) => q.begin_polling(),
            AnyQueue::Software(q) => q.begin_polling(),
            AnyQueue::Pool(q) => q.begin_polling(),
        }
    }

    fn end_polling(&mut self) -> bool {
        match self {
            AnyQueue::Device(q) => q.end_polling(),
            AnyQueue::Software(q) => q.end_polling(),
            AnyQueue::Pool(q) => q.end_polling(),
        }
    }
}
