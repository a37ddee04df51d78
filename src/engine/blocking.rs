//! Running one request at a time and waiting for it, for callers that have nothing else to do.
//!
//! The submit API is built for pipelines: many requests in flight, events through a callback.
//! A tool that encrypts one buffer, a key check or a test needs less: submit, wait, get the
//! result. [`BlockingQueue`] is that, over any engine, in polling or interrupt mode; it keeps
//! the contract (it allows backlog and waits for the final completion, so `Promoted` needs no
//! handling) and pays for its simplicity with one request in flight, and a copy in and out of
//! the caller's slice.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Buf, Completion, Engine, Event, Iv, Queue, Request, SubmitErrorKind, TAG_LEN};
use crate::engine::Direction;
use crate::error::{CryptoError, DeviceError, Error, Result};

/// How long [`BlockingQueue::run`] waits by default before giving a request up.
///
/// Devices fail a request themselves after their own request timeout (10 s by default), so this
/// only ends waits on an engine that never answers at all.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// Spins (with `yield_now`) before a waiter starts sleeping between polls: a device usually
/// answers within microseconds.
const SPINS: u32 = 256;
/// Longest sleep between two polls: bounds the added latency in polling mode, where nothing
/// wakes the waiter.
const MAX_NAP: Duration = Duration::from_micros(200);

/// Completions delivered to a [`BlockingQueue`], and a signal for interrupt-mode engines.
struct Inbox<S> {
    done: Mutex<Vec<Completion<S>>>,
    arrived: Condvar,
}

/// One engine queue used one request at a time.
///
/// ```
/// use crypt_vfio::engine::{BlockingQueue, Engine};
/// use crypt_vfio::Mode;
///
/// let engine = crypt_vfio::open("emulated")?;
/// let key: Vec<u8> = (0..64).collect(); // AES-256-XTS: two different 32-byte halves
/// let session = engine.create_session(Mode::Xts, &key)?;
/// let mut queue = BlockingQueue::open(&engine)?;
/// let mut data = *b"thirty-two bytes of plain text!!";
/// queue.encrypt(&session, &[0u8; 16], &mut data)?;
/// assert_ne!(&data, b"thirty-two bytes of plain text!!");
/// queue.decrypt(&session, &[0u8; 16], &mut data)?;
/// assert_eq!(&data, b"thirty-two bytes of plain text!!");
/// # Ok::<(), crypt_vfio::Error>(())
/// ```
pub struct BlockingQueue<S> {
    queue: Box<dyn Queue<S>>,
    inbox: Arc<Inbox<S>>,
    next_id: u64,
    wait: Duration,
}

impl<S: Send + 'static> BlockingQueue<S> {
    /// Opens the engine's first queue.
    pub fn open<E: Engine<Session = S>>(engine: &E) -> Result<Self> {
        Self::open_index(engine, 0)
    }

    /// Opens queue `index % queue_count()` of the engine (one per thread spreads threads over
    /// the device's queues).
    pub fn open_index<E: Engine<Session = S>>(engine: &E, index: usize) -> Result<Self> {
        let inbox = Arc::new(Inbox { done: Mutex::new(Vec::new()), arrived: Condvar::new() });
        let sink = inbox.clone();
        let queue = engine.open_queue(
            index,
            Arc::new(move |ev| {
                if let Event::Completed(c) = ev {
                    sink.done.lock().unwrap_or_else(PoisonError::into_inner).push(c);
                    sink.arrived.notify_all();
                }
            }),
        )?;
        Ok(Self { queue, inbox, next_id: 1, wait: DEFAULT_WAIT })
    }

    /// Sets how long [`run`](Self::run) waits for a completion before it returns
    /// [`DeviceError::Timeout`] (default [`DEFAULT_WAIT`]).
    pub fn set_wait(&mut self, wait: Duration) {
        self.wait = wait;
    }

    /// Runs `request` and returns it with the result in `data` (and `tag`, for AEAD
    /// encryption). Its `user_data` is replaced by the queue's own numbering.
    ///
    /// A request that fails is not handed back; use [`Queue`] directly to keep its buffer.
    pub fn run(&mut self, mut request: Request<S>) -> Result<Request<S>> {
        let id = self.next_id;
        self.next_id += 1;
        request.user_data = id;
        let start = Instant::now();
        let mut pending = Some(request);
        let mut spins = 0u32;
        loop {
            if let Some(req) = pending.take() {
                match self.queue.submit(req, true) {
                    Ok(_) => {}
                    Err(e) => match e.kind {
                        // The backlog is full (other users of the queue): completions make room.
                        SubmitErrorKind::Busy => pending = Some(e.request),
                        SubmitErrorKind::Rejected(err) => {
                            // The buffer may hold the caller's plaintext: wipe it before it is freed.
                            let mut r = e.request;
                            r.data.zeroize();
                            return Err(err);
                        }
                    },
                }
            }
            self.queue.poll();
            if let Some(mut c) = self.take(id) {
                if c.result.is_err() {
                    c.request.data.zeroize();
                }
                return c.result.map(|()| c.request);
            }
            if start.elapsed() > self.wait {
                // A request still waiting here is wiped now; one on the engine is wiped by
                // `take` when its completion arrives and is dropped.
                if let Some(mut r) = pending.take() {
                    r.data.zeroize();
                }
                return Err(Error::Device(DeviceError::Timeout(self.wait, "a blocking request")));
            }
            if spins < SPINS {
                spins += 1;
                std::thread::yield_now();
            } else {
                // Interrupt-mode engines wake this at once; in polling mode the nap ends it.
                let done = self.inbox.done.lock().unwrap_or_else(PoisonError::into_inner);
                if done.is_empty() {
                    let _unused = self.inbox.arrived.wait_timeout(done, MAX_NAP);
                }
            }
        }
    }

    /// The completion of request `id`; completions of requests given up on earlier are wiped
    /// (their buffers may hold plaintext) and dropped.
    fn take(&self, id: u64) -> Option<Completion<S>> {
        let mut done = self.inbox.done.lock().unwrap_or_else(PoisonError::into_inner);
        let pos = done.iter().position(|c| c.request.user_data == id);
        let found = pos.map(|p| done.swap_remove(p));
        for mut c in done.drain(..) {
            c.request.data.zeroize();
        }
        found
    }
}

impl<S: Clone + Send + 'static> BlockingQueue<S> {
    fn crypt(
        &mut self,
        session: &S,
        direction: Direction,
        iv: &[u8],
        aad: &[u8],
        data: &mut [u8],
        tag: [u8; TAG_LEN],
    ) -> Result<[u8; TAG_LEN]> {
        let iv = Iv::new(iv).ok_or_else(|| {
            Error::Crypto(CryptoError::InvalidRequest(format!("a {}-byte IV (16 bytes at most)", iv.len())))
        })?;
        let mut req = Request::new(session.clone(), direction, iv, Buf::Host(data.to_vec()), 0);
        req.aad = aad.to_vec();
        req.tag = tag;
        let mut done = self.run(req)?;
        done.data.copy_to_slice(data);
        done.data.zeroize();
        Ok(done.tag)
    }

    /// Encrypts `data` in place with a cipher session (XTS, CBC, CTR). For AES-GCM use
    /// [`seal`](Self::seal), which returns the tag.
    pub fn encrypt(&mut self, session: &S, iv: &[u8], data: &mut [u8]) -> Result<()> {
        self.crypt(session, Direction::Encrypt, iv, &[], data, [0; TAG_LEN]).map(drop)
    }

    /// Decrypts `data` in place with a cipher session (XTS, CBC, CTR).
    pub fn decrypt(&mut self, session: &S, iv: &[u8], data: &mut [u8]) -> Result<()> {
        self.crypt(session, Direction::Decrypt, iv, &[], data, [0; TAG_LEN]).map(drop)
    }

    /// Encrypts `data` in place with an AES-GCM session, authenticating `aad` too; returns the
    /// tag.
    pub fn seal(&mut self, session: &S, iv: &[u8], aad: &[u8], data: &mut [u8]) -> Result<[u8; TAG_LEN]> {
        self.crypt(session, Direction::Encrypt, iv, aad, data, [0; TAG_LEN])
    }

    /// Checks `tag` over `aad` and `data` with an AES-GCM session and decrypts `data` in place.
    /// On [`CryptoError::AuthFailed`] `data` is left as it was: no unauthenticated plaintext.
    pub fn open_sealed(
        &mut self,
        session: &S,
        iv: &[u8],
        aad: &[u8],
        data: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<()> {
        self.crypt(session, Direction::Decrypt, iv, aad, data, *tag).map(drop)
    }
}
