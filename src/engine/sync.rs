//! The synchronisation types of the engine's lock-free and locked hand-offs, from one place.
//!
//! With the `loom-model` feature they are loom's, so that `tests/loom_models.rs` can run the real
//! event delivery, backlog and async API code under loom and explore every interleaving (and
//! every weak-memory outcome loom models); otherwise they are std's, at no cost. Only the code
//! that the models exercise uses this module.

#[cfg(feature = "loom-model")]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize};
#[cfg(feature = "loom-model")]
pub(crate) use loom::sync::{Mutex, MutexGuard};

#[cfg(not(feature = "loom-model"))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize};
#[cfg(not(feature = "loom-model"))]
pub(crate) use std::sync::{Mutex, MutexGuard};

pub(crate) use std::sync::atomic::Ordering;
