//! The software engine: the AES cores called directly on the submitting thread.
//!
//! It is the baseline every device number is compared with (the same core, no rings, no second
//! core) and the fallback when no device is present. Requests complete at submit; their events
//! are delivered by the next [`Queue::poll`], so callers see the same protocol as with a device,
//! or when the queue is dropped: like a device queue closing, it hands every accepted request
//! back with its one final completion.

use std::fmt;
use std::sync::Arc;

use crypt_vfio_cores::{new_cipher, CipherCore, CoreKind, Mode};

use super::{
    deliver_one, validate_request, Completion, Direction, Engine, EngineId, Event, EventSink, Queue, Request,
    SubmitError, Submitted,
};
use crate::error::{CryptoError, Error, Result};

/// The AES cores as an engine.
#[derive(Debug, Clone)]
pub struct SoftwareEngine {
    core: CoreKind,
    id: EngineId,
}

impl SoftwareEngine {
    /// An engine running `core`.
    pub fn new(core: CoreKind) -> Self {
        Self { core, id: EngineId::new() }
    }
}

/// A keyed software session.
#[derive(Clone)]
pub struct SoftwareSession {
    mode: Mode,
    engine: EngineId,
    cipher: Arc<dyn CipherCore>,
}

impl fmt::Debug for SoftwareSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("SoftwareSession").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl SoftwareSession {
    /// The session's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The keyed cipher (for an engine pool, which runs its software member in place).
    pub(crate) fn cipher(&self) -> &Arc<dyn CipherCore> {
        &self.cipher
    }
}

/// Runs `req` through `cipher` in place.
pub(crate) fn run_cipher<S>(cipher: &dyn CipherCore, req: &mut Request<S>) -> Result<()> {
    let Request { direction, iv, aad, data, tag, .. } = req;
    let tag_slice: &mut [u8] = if cipher.mode().is_aead() { tag } else { &mut [] };
    match direction {
        Direction::Encrypt => cipher.encrypt(iv.as_slice(), aad, &mut data.as_mut_slice(), tag_slice)?,
        Direction::Decrypt => cipher.decrypt(iv.as_slice(), aad, &mut data.as_mut_slice(), tag_slice)?,
    }
    Ok(())
}

/// Largest request the software engine takes (the same default as the emulated device).
const MAX_REQUEST: usize = 1 << 30;

impl Engine for SoftwareEngine {
    type Session = SoftwareSession;

    fn describe(&self) -> String {
        format!("software ({})", self.core)
    }

    fn create_session(&self, mode: Mode, key: &[u8]) -> Result<SoftwareSession> {
        Ok(SoftwareSession { mode, engine: self.id, cipher: Arc::from(new_cipher(self.core, mode, key)?) })
    }

    fn destroy_session(&self, session: &SoftwareSession) -> Result<()> {
        if session.engine != self.id {
            return Err(Error::Crypto(CryptoError::InvalidSession));
        }
        Ok(())
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn open_queue(
        &self,
        _index: usize,
        sink: EventSink<SoftwareSession>,
    ) -> Result<Box<dyn Queue<SoftwareSession>>> {
        Ok(Box::new(SoftwareQueue { sink, done: Vec::new(), engine: self.id }))
    }

    fn max_request_len(&self) -> usize {
        MAX_REQUEST
    }

    fn inline_cipher<'s>(&self, session: &'s SoftwareSession) -> Option<&'s dyn CipherCore> {
        // Another engine's session goes to a queue, which refuses it as it refuses any request.
        (session.engine == self.id).then(|| &*session.cipher)
    }
}

struct SoftwareQueue {
    sink: EventSink<SoftwareSession>,
    done: Vec<Completion<SoftwareSession>>,
    engine: EngineId,
}

impl Queue<SoftwareSession> for SoftwareQueue {
    fn submit(
        &mut self,
        mut request: Request<SoftwareSession>,
        _may_backlog: bool,
    ) -> Result<Submitted, SubmitError<SoftwareSession>> {
        if request.session.engine != self.engine {
            return Err(SubmitError::rejected(request, Error::Crypto(CryptoError::InvalidSession)));
        }
        let mode = request.session.mode;
        if let Err(e) =
            validate_request(mode, request.iv.as_slice(), request.aad.len(), request.data.len(), MAX_REQUEST)
        {
            return Err(SubmitError::rejected(request, e));
        }
        let cipher = request.session.cipher.clone();
        let result = run_cipher(&*cipher, &mut request);
        self.done.push(Completion { request, result });
        Ok(Submitted::InProgress)
    }

    fn poll(&mut self) -> usize {
        let done = std::mem::take(&mut self.done);
        let n = done.len();
        // deliver_one contains a panicking sink, so the completions after it still arrive.
        for c in done {
            deliver_one(&self.sink, Event::Completed(c));
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }
}

impl Drop for SoftwareQueue {
    fn drop(&mut self) {
        // Accepted requests get their final completion even if nobody polls again.
        self.poll();
    }
}
