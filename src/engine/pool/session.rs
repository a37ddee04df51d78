//! A pool session: one session on every member that can hold it.
//!
//! A request may run on any member, and after a failure on another than the one it was sent
//! to, so the pool creates the session on every member at once. A member that is down when the
//! session is created gets it when it rejoins, from the key the pool keeps: one more copy of the
//! key, in memory that is wiped when the last handle on the session goes. Each member's session
//! stays that member's business (a device re-creates its own in place after a reset).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crypt_vfio_cores::Mode;
use zeroize::Zeroizing;

use crate::engine::{AnySession, EngineId};

/// What one member holds of a session.
#[derive(Clone, Debug)]
pub(crate) enum Slot {
    /// The member's own session.
    Have(AnySession),
    /// Not created yet (the member was down): created when it rejoins.
    Missing,
    /// The member refused the mode or the key: never asked again.
    Unsupported,
}

/// What every handle on one pool session shares.
pub(crate) struct SessionState {
    pub(crate) mode: Mode,
    pub(crate) key: Zeroizing<Vec<u8>>,
    slots: RwLock<Vec<Slot>>,
    pub(crate) destroyed: AtomicBool,
}

impl SessionState {
    pub(crate) fn new(mode: Mode, key: &[u8], members: usize) -> Self {
        Self {
            mode,
            key: Zeroizing::new(key.to_vec()),
            slots: RwLock::new(vec![Slot::Missing; members]),
            destroyed: AtomicBool::new(false),
        }
    }

    pub(crate) fn slots(&self) -> RwLockReadGuard<'_, Vec<Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn slots_mut(&self) -> RwLockWriteGuard<'_, Vec<Slot>> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `slot` for member `m` if that slot is still Missing and the session is not
    /// destroyed; otherwise returns the member session that lost (to be destroyed). Checked
    /// under the write lock that `destroy_session` takes after marking the session destroyed,
    /// so a member session is either in the slots when they are emptied, or returned here.
    pub(crate) fn fill(&self, m: usize, slot: Slot) -> Option<AnySession> {
        let mut slots = self.slots_mut();
        if !self.is_destroyed() && matches!(slots.get(m), Some(Slot::Missing)) {
            slots[m] = slot;
            return None;
        }
        match slot {
            Slot::Have(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }
}

/// A session of a [`PoolEngine`](super::PoolEngine): valid on the pool that created it, which
/// runs it on whichever member holds it.
#[derive(Clone)]
pub struct PoolSession {
    pub(crate) pool: EngineId,
    pub(crate) state: Arc<SessionState>,
}

impl PoolSession {
    /// The session's mode.
    pub fn mode(&self) -> Mode {
        self.state.mode
    }

    /// The member's own session, when member `m` holds it.
    pub(crate) fn on(&self, m: usize) -> Option<AnySession> {
        match self.state.slots().get(m) {
            Some(Slot::Have(s)) => Some(s.clone()),
            _ => None,
        }
    }
}

impl fmt::Debug for PoolSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("PoolSession").field("mode", &self.state.mode).finish_non_exhaustive()
    }
}
