//! The backlog-aware submit API that every engine implements.
//!
//! An engine runs AES for its callers: a device behind virtio-crypto, or the software cores on
//! the caller's thread. Callers open one [`Queue`] per submitting thread and submit requests
//! with or without backlog; events ([`Event::Promoted`] and the final completion) come back
//! through the callback given when the queue was opened. The contract is that of the Linux
//! crypto API with `CRYPTO_TFM_REQ_MAY_BACKLOG`; `backlog` implements it and
//! [`contract::ContractChecker`] checks it from the outside.

mod any;
pub mod async_api;
pub(crate) mod backlog;
mod blocking;
pub mod contract;
pub(crate) mod delivery;
mod identity;
pub mod pool;
mod request;
pub mod software;
pub(crate) mod sync;

use std::collections::VecDeque;
use std::sync::Arc;

use crypt_vfio_cores::{CipherCore, Mode};

pub use any::{AnyEngine, AnySession};
pub use blocking::{BlockingQueue, DEFAULT_WAIT};
pub(crate) use delivery::{deliver_one, Delivery};
pub use delivery::{BatchSink, EventSink, Sink};
pub(crate) use identity::EngineId;
pub use pool::{MemberState, MemberStats, PoolEngine, PoolOptions, PoolSession};
pub use request::{
    BatchSubmitted, Buf, BufMut, Completion, Direction, Event, Iv, Request, SubmitError, SubmitErrorKind,
    Submitted, TAG_LEN,
};

use crate::error::{CryptoError, Error, Result};

/// A provider of AES sessions and submission queues.
pub trait Engine: Send + Sync {
    /// A session handle: cheap to clone, carried by every request.
    type Session: Clone + Send + Sync + std::fmt::Debug + 'static;

    /// A short description for logs and reports (`virtio-crypto on 0000:00:04.0`, `software`).
    fn describe(&self) -> String;

    /// Creates a session of `mode` with `key`. Bad key lengths give [`CryptoError::KeyLength`]; modes
    /// the engine lacks give [`CryptoError::NotSupported`].
    fn create_session(&self, mode: Mode, key: &[u8]) -> Result<Self::Session>;

    /// Destroys a session. Requests still in flight on it may fail with
    /// [`CryptoError::InvalidSession`].
    fn destroy_session(&self, session: &Self::Session) -> Result<()>;

    /// Whether the engine accepts a session of `mode` with a key of `key_len` bytes, found by
    /// creating and destroying one (devices accept more than they advertise, or less).
    fn probe(&self, mode: Mode, key_len: usize) -> Result<bool> {
        let key: Vec<u8> = (0..key_len).map(|i| i as u8 ^ 0x5c).collect();
        match self.create_session(mode, &key) {
            Ok(s) => {
                self.destroy_session(&s)?;
                Ok(true)
            }
            Err(
                Error::Crypto(CryptoError::NotSupported(_))
                | Error::Crypto(CryptoError::KeyLength { .. })
                | Error::Crypto(CryptoError::KeyRejected(_))
                | Error::Crypto(CryptoError::Status(_)),
            ) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// How many independent submission queues the engine has.
    fn queue_count(&self) -> usize;

    /// Opens a submission handle on queue `index % queue_count()`; its events go to `sink`.
    fn open_queue(
        &self,
        index: usize,
        sink: EventSink<Self::Session>,
    ) -> Result<Box<dyn Queue<Self::Session>>>;

    /// Opens a submission handle whose events go to `sink` in runs: every event a poll (or the
    /// interrupt thread) has for this handle, in order, in one call. Engines that deliver one
    /// event at a time hand the runs over one event long.
    fn open_batch_queue(
        &self,
        index: usize,
        sink: BatchSink<Self::Session>,
    ) -> Result<Box<dyn Queue<Self::Session>>> {
        self.open_queue(index, Arc::new(move |event| sink(&mut std::iter::once(event))))
    }

    /// The largest `data` one request may carry.
    fn max_request_len(&self) -> usize;

    /// How many requests queue `index % queue_count()` holds in flight at most (its ring
    /// slots), or `None` when it has no such bound (the software engine). For a device queue,
    /// a caller that is the queue's only submitter and keeps below it is never answered `Busy`
    /// or `Backlogged`. A pool's figure is the sum over its devices' queues and only a hint:
    /// pool queues share member queues, and a zero-copy request waits for its own member, so
    /// a pool may backlog below it.
    fn queue_capacity(&self, _index: usize) -> Option<usize> {
        None
    }

    /// Whether events reach the callbacks without the caller's [`Queue::poll`] (the engine
    /// completes requests on its own thread). Then a caller with nothing to submit may sleep
    /// until its callback runs; otherwise it must keep polling.
    fn delivers_events(&self) -> bool {
        false
    }

    /// A buffer the engine can use without copying (DMA memory for a device).
    fn alloc_buffer(&self, len: usize) -> Result<Buf> {
        Ok(Buf::Host(vec![0; len]))
    }

    /// The keyed cipher of `session` when this engine would run it on the submitting thread
    /// anyway (the software engine), so that a caller with many units (a volume's sectors) may
    /// run them in place in one go instead of a request, two copies and an event each. `None`
    /// (the default, and every engine that must see its requests): submit through a queue.
    fn inline_cipher<'s>(&self, _session: &'s Self::Session) -> Option<&'s dyn CipherCore> {
        None
    }
}

/// One submitter's handle on an engine queue.
pub trait Queue<S>: Send {
    /// Submits `request`. With `may_backlog`, a full ring queues it in software
    /// ([`Submitted::Backlogged`]); without, a full ring refuses it with `Busy`. A refused
    /// request comes back whole in the error.
    fn submit(&mut self, request: Request<S>, may_backlog: bool) -> Result<Submitted, SubmitError<S>>;

    /// Submits the requests at the front of `requests`, in order, taking each one it accepts
    /// off the front, and stops at the first it refuses (which stays at the front, untouched,
    /// with the others behind it). What happened to each taken request follows from the counts
    /// in the result, exactly as if each had been given to [`submit`](Self::submit) in turn:
    /// InProgress for the first ones, Backlogged for the rest once one did not fit. A call may
    /// also end after a Backlogged request without a refusal, leaving the rest with the caller
    /// (`refused` is `None` then). A device engine takes its queue lock once, publishes the ring
    /// once and rings the doorbell at most once per call, and backlogs the whole rest of a batch
    /// that half fits. The default submits one at a time and ends after the first Backlogged
    /// (the backlog could drain before its next submit, which would then go InProgress).
    fn submit_batch(&mut self, requests: &mut VecDeque<Request<S>>, may_backlog: bool) -> BatchSubmitted {
        let mut out = BatchSubmitted::default();
        while let Some(request) = requests.pop_front() {
            match self.submit(request, may_backlog) {
                Ok(Submitted::InProgress) => out.in_progress += 1,
                Ok(Submitted::Backlogged) => {
                    out.backlogged += 1;
                    break;
                }
                Err(e) => {
                    requests.push_front(e.request);
                    out.refused = Some(e.kind);
                    break;
                }
            }
        }
        out
    }

    /// Reaps finished requests, promotes backlogged ones and delivers the resulting events to
    /// their callbacks. Returns how many events this call delivered. Engines that complete
    /// requests on their own thread (interrupt mode) deliver without it; calling it is harmless.
    fn poll(&mut self) -> usize;

    /// Requests submitted through this queue (by any handle) not yet reaped. An engine that
    /// delivers events on its own thread ([`Engine::delivers_events`]) may still be delivering a
    /// reaped request's completion when the count drops: wait for the completion itself.
    fn outstanding(&self) -> usize;

    /// Says this handle's caller is about to poll the queue in a loop. Until
    /// [`end_polling`](Self::end_polling), an engine with its own completion thread keeps that
    /// thread's interrupt unarmed and leaves the reaping to the caller, so a busy caller does not
    /// pay a context switch per coalesced interrupt. Calling it again is harmless; a handle that
    /// is dropped ends it. Until then the caller must keep polling: the engine's thread delivers
    /// nothing meanwhile. The default (an engine without such a thread) does nothing.
    fn begin_polling(&mut self) {}

    /// Says this handle's caller stops polling and is about to sleep until an event arrives.
    /// Returns `false` if completions already wait on the ring (the caller should poll instead
    /// of sleeping: nothing would wake it for those); `true` when the engine will deliver the
    /// next completion on its own (its interrupt armed again, or another caller still polling).
    /// The default returns `true`.
    fn end_polling(&mut self) -> bool {
        true
    }
}

/// Checks the parts of a request that do not depend on the engine: IV length, tag use and the
/// data length rules of the mode.
pub fn validate_request(mode: Mode, iv: &[u8], aad_len: usize, data_len: usize, max: usize) -> Result<()> {
    if iv.len() != mode.iv_len() {
        return Err(Error::Crypto(CryptoError::InvalidRequest(format!(
            "{mode} takes a {}-byte IV, got {} bytes",
            mode.iv_len(),
            iv.len()
        ))));
    }
    if !mode.is_aead() && aad_len != 0 {
        return Err(Error::Crypto(CryptoError::InvalidRequest(format!(
            "{mode} takes no additional authenticated data"
        ))));
    }
    if data_len > max {
        return Err(Error::Crypto(CryptoError::TooLarge { len: data_len as u64, max: max as u64 }));
    }
    mode.check_data_len(data_len).map_err(Error::from)
}
