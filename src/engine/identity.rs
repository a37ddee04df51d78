//! Which engine a session belongs to.
//!
//! Session ids are small numbers that every device starts counting at 1, so a session created on
//! one device names some other session (another key) on a second device. Every engine takes a
//! unique [`EngineId`] when it is created, stamps it into its sessions, and refuses sessions that
//! carry another id with [`CryptoError::InvalidSession`](crate::error::CryptoError::InvalidSession).

use std::sync::atomic::{AtomicU64, Ordering};

/// The identity of one engine instance, unique within the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EngineId(u64);

impl EngineId {
    /// A fresh identity, never handed out before in this process.
    pub fn new() -> Self {
        // A counter, not an address: an engine dropped and another allocated in its place must
        // not inherit its sessions.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for EngineId {
    fn default() -> Self {
        Self::new()
    }
}
