//! Sessions: a key and algorithm installed on the device.
//!
//! A virtio-crypto session has one direction, so a [`DeviceSession`] holds two device sessions,
//! one that encrypts and one that decrypts, created together. A device reset drops every
//! session on the device; so that a recovered device serves the same callers with the same
//! handles, the session keeps its key (zeroized when the last handle goes) and the engine
//! installs it again after the reset, updating the device ids in place.

use std::fmt;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crypt_vfio_cores::Mode;
use zeroize::Zeroizing;

use crate::engine::EngineId;

/// A session on a virtio-crypto device. Cloning it clones the handle: every clone names the same
/// session, and the key is wiped when the last one is dropped.
#[derive(Clone)]
pub struct DeviceSession {
    pub(crate) mode: Mode,
    /// The engine that created it: its ids mean nothing (or another key) on any other device.
    pub(crate) engine: EngineId,
    pub(crate) state: Arc<SessionState>,
}

/// What a session needs to be re-created after a device reset.
pub(crate) struct SessionState {
    /// The key, held only to install the session again after a reset.
    pub(crate) key: Zeroizing<Vec<u8>>,
    encrypt_id: AtomicU64,
    decrypt_id: AtomicU64,
    /// Which incarnation of the device (counted by recoveries) the ids belong to;
    /// [`CHANGING`] while [`SessionState::set_ids`] replaces them.
    epoch: AtomicU64,
    /// Destroyed by the caller: never re-created.
    pub(crate) destroyed: AtomicBool,
}

impl DeviceSession {
    pub(crate) fn new(
        engine: EngineId,
        mode: Mode,
        key: &[u8],
        encrypt_id: u64,
        decrypt_id: u64,
        epoch: u64,
    ) -> Self {
        let state = SessionState {
            key: Zeroizing::new(key.to_vec()),
            encrypt_id: AtomicU64::new(encrypt_id),
            decrypt_id: AtomicU64::new(decrypt_id),
            epoch: AtomicU64::new(epoch),
            destroyed: AtomicBool::new(false),
        };
        Self { mode, engine, state: Arc::new(state) }
    }

    /// A session with the given device ids and an all-zero key, for layout tests.
    #[cfg(test)]
    pub(crate) fn for_test(mode: Mode, encrypt_id: u64, decrypt_id: u64) -> Self {
        Self::new(EngineId::new(), mode, &[0; 32], encrypt_id, decrypt_id, 0)
    }

    /// The session's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The device id of the encrypting half (it changes when a reset makes the engine
    /// re-create the session).
    pub(crate) fn encrypt_id(&self) -> u64 {
        self.state.encrypt_id.load(Ordering::Acquire)
    }

    /// The device id of the decrypting half.
    pub(crate) fn decrypt_id(&self) -> u64 {
        self.state.decrypt_id.load(Ordering::Acquire)
    }
}

/// The epoch a session reads as while its ids are replaced: no device incarnation has it.
const CHANGING: u64 = u64::MAX;

impl SessionState {
    /// Installs the ids of the session re-created after a reset, in device incarnation `epoch`.
    /// The epoch is taken away first and stored last (a sequence lock), so a reader that sees
    /// `epoch` before and after reading the ids ([`SessionState::ids_in`]) has this pair.
    pub(crate) fn set_ids(&self, encrypt_id: u64, decrypt_id: u64, epoch: u64) {
        self.epoch.store(CHANGING, Ordering::Relaxed);
        fence(Ordering::Release);
        self.encrypt_id.store(encrypt_id, Ordering::Relaxed);
        self.decrypt_id.store(decrypt_id, Ordering::Relaxed);
        self.epoch.store(epoch, Ordering::Release);
    }

    /// The (encrypt, decrypt) device ids if they name this session on device incarnation
    /// `current`; `None` for a destroyed session or one whose ids belong to an earlier
    /// incarnation (not re-created after a reset): those ids may name another session, under
    /// another key, on the device now.
    pub(crate) fn ids_in(&self, current: u64) -> Option<(u64, u64)> {
        if self.destroyed.load(Ordering::Acquire) {
            return None;
        }
        let before = self.epoch.load(Ordering::Acquire);
        if before != current || before == CHANGING {
            return None;
        }
        let ids = (self.encrypt_id.load(Ordering::Relaxed), self.decrypt_id.load(Ordering::Relaxed));
        fence(Ordering::Acquire);
        (self.epoch.load(Ordering::Relaxed) == before).then_some(ids)
    }

    /// The device incarnation the ids belong to.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

impl PartialEq for DeviceSession {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }
}

impl Eq for DeviceSession {}

impl fmt::Debug for DeviceSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("DeviceSession")
            .field("mode", &self.mode)
            .field("encrypt_id", &self.encrypt_id())
            .field("decrypt_id", &self.decrypt_id())
            .finish_non_exhaustive()
    }
}

/// The live sessions of one engine, to re-create after a reset.
#[derive(Default)]
pub(crate) struct SessionRegistry {
    live: Mutex<Vec<(Mode, Weak<SessionState>)>>,
}

impl SessionRegistry {
    pub(crate) fn add(&self, s: &DeviceSession) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|(_, w)| w.strong_count() > 0);
        live.push((s.mode, Arc::downgrade(&s.state)));
    }

    /// The sessions still held by someone and not destroyed.
    pub(crate) fn live(&self) -> Vec<(Mode, Arc<SessionState>)> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.iter()
            .filter_map(|(m, w)| w.upgrade().map(|s| (*m, s)))
            .filter(|(_, s)| !s.destroyed.load(Ordering::Acquire))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_given_only_for_the_current_incarnation_of_a_live_session() {
        let s = DeviceSession::new(EngineId::new(), Mode::Ctr, &[1; 32], 3, 4, 0);
        assert_eq!(s.state.ids_in(0), Some((3, 4)));
        assert_eq!(s.state.ids_in(1), None, "ids of the device before a reset");
        s.state.set_ids(7, 8, 1);
        assert_eq!(s.state.ids_in(1), Some((7, 8)));
        assert_eq!(s.state.ids_in(0), None);
        s.state.destroyed.store(true, Ordering::Release);
        assert_eq!(s.state.ids_in(1), None, "a destroyed session");
    }
}
