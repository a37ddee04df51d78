//! The device's session table: keyed cipher contexts created and destroyed on the control
//! queue and looked up by every data request.
//!
//! Data requests are the hot path and sessions change rarely, so workers keep a few recently
//! used sessions in a [`SessionCache`] and only take the table's read lock on a miss; destroying
//! a session bumps a generation counter that empties every cache before the next batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crypt_vfio_cores::{new_cipher, CipherCore, CoreError, CoreKind, Mode};
use crypt_vfio_spec::crypto::status;

/// A session: one key schedule, one mode, one direction.
pub(crate) struct Session {
    pub mode: Mode,
    pub encrypt: bool,
    /// For AEAD sessions, the largest AAD the driver announced; `None` for cipher sessions.
    pub max_aad: Option<u32>,
    pub core: Box<dyn CipherCore>,
}

struct Table {
    map: HashMap<u64, Arc<Session>>,
    next_id: u64,
}

/// All sessions of the device.
pub(crate) struct Sessions {
    table: RwLock<Table>,
    generation: AtomicU64,
    max: usize,
    kind: CoreKind,
}

impl Sessions {
    pub(crate) fn new(max: usize, kind: CoreKind) -> Self {
        Self {
            table: RwLock::new(Table { map: HashMap::new(), next_id: 1 }),
            generation: AtomicU64::new(0),
            max,
            kind,
        }
    }

    /// Creates a session and returns its id, or the virtio-crypto status to answer. With
    /// `reuse_ids` ([`crate::Fault::ReuseSessionIds`]) the id is the lowest free one.
    pub(crate) fn create(
        &self,
        mode: Mode,
        encrypt: bool,
        max_aad: Option<u32>,
        key: &[u8],
        reuse_ids: bool,
    ) -> Result<u64, u8> {
        if self.len() >= self.max {
            return Err(status::NOSPC);
        }
        let core = new_cipher(self.kind, mode, key).map_err(|e| match e {
            CoreError::KeyLength { .. } => status::NOTSUPP,
            CoreError::KeyRejected { .. } => {
                log::debug!("session key refused: {e}");
                status::ERR
            }
            _ => status::ERR,
        })?;
        let session = Arc::new(Session { mode, encrypt, max_aad, core });
        let mut t = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if t.map.len() >= self.max {
            return Err(status::NOSPC);
        }
        // Ids only grow (from 1), so a stale id held by a buggy driver never names a new session;
        // unless a test asks for ids reused as real devices do.
        let id = if reuse_ids {
            (1..).find(|id| !t.map.contains_key(id)).expect("fewer sessions than ids")
        } else {
            t.next_id += 1;
            t.next_id - 1
        };
        t.map.insert(id, session);
        Ok(id)
    }

    /// Destroys session `id`; INVSESS if there is none.
    pub(crate) fn destroy(&self, id: u64) -> Result<(), u8> {
        let removed = self.table.write().unwrap_or_else(PoisonError::into_inner).map.remove(&id);
        match removed {
            Some(_) => {
                self.generation.fetch_add(1, Ordering::Release);
                Ok(())
            }
            None => Err(status::INVSESS),
        }
    }

    /// Drops every session (device reset). Ids keep counting up.
    pub(crate) fn clear(&self) {
        self.table.write().unwrap_or_else(PoisonError::into_inner).map.clear();
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn len(&self) -> usize {
        self.table.read().unwrap_or_else(PoisonError::into_inner).map.len()
    }

    fn get(&self, id: u64) -> Option<Arc<Session>> {
        self.table.read().unwrap_or_else(PoisonError::into_inner).map.get(&id).cloned()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

const CACHE_WAYS: usize = 8;

/// A worker's few most recently used sessions.
pub(crate) struct SessionCache {
    generation: u64,
    entries: [(u64, Option<Arc<Session>>); CACHE_WAYS],
    next: usize,
}

impl SessionCache {
    pub(crate) fn new() -> Self {
        Self { generation: u64::MAX, entries: Default::default(), next: 0 }
    }

    /// Forgets cached sessions if any session was destroyed since the last call.
    pub(crate) fn refresh(&mut self, sessions: &Sessions) {
        let g = sessions.generation();
        if g != self.generation {
            self.entries = Default::default();
            self.generation = g;
        }
    }

    /// Looks `id` up, in the cache first.
    pub(crate) fn get(&mut self, sessions: &Sessions, id: u64) -> Option<Arc<Session>> {
        if let Some((_, Some(s))) = self.entries.iter().find(|(i, s)| *i == id && s.is_some()) {
            return Some(s.clone());
        }
        let s = sessions.get(id)?;
        self.entries[self.next] = (id, Some(s.clone()));
        self.next = (self.next + 1) % CACHE_WAYS;
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_grow_table_fills_and_caches_forget_destroyed_sessions() {
        let s = Sessions::new(2, CoreKind::Reference);
        let a = s.create(Mode::Cbc, true, None, &[1; 16], false).unwrap();
        let b = s.create(Mode::Gcm, false, Some(64), &[2; 32], false).unwrap();
        assert_eq!((a, b), (1, 2));
        assert_eq!(s.create(Mode::Ctr, true, None, &[3; 16], false), Err(status::NOSPC));
        assert_eq!(s.create(Mode::Xts, true, None, &[3; 32], false), Err(status::NOSPC));
        let mut cache = SessionCache::new();
        cache.refresh(&s);
        assert!(cache.get(&s, a).is_some());
        s.destroy(a).unwrap();
        assert_eq!(s.destroy(a), Err(status::INVSESS));
        cache.refresh(&s);
        assert!(cache.get(&s, a).is_none());
        assert_eq!(s.create(Mode::Xts, true, None, &[3; 32], false), Err(status::ERR), "equal XTS halves");
        assert_eq!(s.create(Mode::Cbc, true, None, &[1; 16], false), Ok(3));
        // Reused ids: the lowest free one.
        assert_eq!(s.create(Mode::Cbc, true, None, &[1; 16], true), Err(status::NOSPC));
        s.destroy(b).unwrap();
        assert_eq!(s.create(Mode::Cbc, true, None, &[1; 16], true), Ok(1));
    }
}
