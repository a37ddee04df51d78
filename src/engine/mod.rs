//! The backlog-aware submit API that every engine implements.
//!
//! An engine runs AES for its callers: a device behind virtio-crypto, or the software cores on
//! the caller's thread. Callers open one [`Queue`] per submitting thread and submit requests
//! with or without backlog; events ([`Event::Promoted`] and the final completion) come back
//! through the callback given when the queue was opened. The contract is that of the Linux
//! crypto API with `CRYPTO_TFM_REQ_MAY_BACKLOG`; [`backlog`] implements it and
//! [`contract::ContractChecker`] checks it from the outside.

pub mod async_api;
pub mod backlog;
pub mod contract;
mod delivery;
mod identity;
mod request;
pub mod software;
pub(crate) mod sync;

use crypt_vfio_cores::Mode;

pub use delivery::{deliver_one, Delivery, EventSink, Outbox};
pub use identity::EngineId;
pub use request::{
    Buf, BufMut, Completion, Direction, Event, Iv, Request, SubmitError, SubmitErrorKind, Submitted, TAG_LEN,
};

use crate::error::{Error, Result};

/// A provider of AES sessions and submission queues.
pub trait Engine: Send + Sync {
    /// A session handle: cheap to clone, carried by every request.
    type Session: Clone + Send + Sync + std::fmt::Debug + 'static;

    /// A short description for logs and reports (`virtio-crypto on 0000:00:04.0`, `software`).
    fn describe(&self) -> String;

    /// Creates a session of `mode` with `key`. Bad key lengths give [`Error::KeyLength`]; modes
    /// the engine lacks give [`Error::NotSupported`].
    fn create_session(&self, mode: Mode, key: &[u8]) -> Result<Self::Session>;

    /// Destroys a session. Requests still in flight on it may fail with
    /// [`Error::InvalidSession`].
    fn destroy_session(&self, session: &Self::Session) -> Result<()>;

    /// How many independent submission queues the engine has.
    fn queue_count(&self) -> usize;

    /// Opens a submission handle on queue `index % queue_count()`; its events go to `sink`.
    fn open_queue(
        &self,
        index: usize,
        sink: EventSink<Self::Session>,
    ) -> Result<Box<dyn Queue<Self::Session>>>;

    /// The largest `data` one request may carry.
    fn max_request_len(&self) -> usize;

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
}

/// One submitter's handle on an engine queue.
pub trait Queue<S>: Send {
    /// Submits `request`. With `may_backlog`, a full ring queues it in software
    /// ([`Submitted::Backlogged`]); without, a full ring refuses it with `Busy`. A refused
    /// request comes back whole in the error.
    fn submit(&mut self, request: Request<S>, may_backlog: bool) -> Result<Submitted, SubmitError<S>>;

    /// Reaps finished requests, promotes backlogged ones and delivers the resulting events to
    /// their callbacks. Returns how many events this call delivered. Engines that complete
    /// requests on their own thread (interrupt mode) deliver without it; calling it is harmless.
    fn poll(&mut self) -> usize;

    /// Requests submitted through this queue (by any handle) not yet finally completed.
    fn outstanding(&self) -> usize;
}

/// Checks the parts of a request that do not depend on the engine: IV length, tag use and the
/// data length rules of the mode.
pub fn validate_request(mode: Mode, iv: &[u8], aad_len: usize, data_len: usize, max: usize) -> Result<()> {
    if iv.len() != mode.iv_len() {
        return Err(Error::InvalidRequest(format!(
            "{mode} takes a {}-byte IV, got {} bytes",
            mode.iv_len(),
            iv.len()
        )));
    }
    if !mode.is_aead() && aad_len != 0 {
        return Err(Error::InvalidRequest(format!("{mode} takes no additional authenticated data")));
    }
    if data_len > max {
        return Err(Error::TooLarge { len: data_len as u64, max: max as u64 });
    }
    mode.check_data_len(data_len).map_err(Error::from)
}
