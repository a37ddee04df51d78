//! Sessions: a key and algorithm installed on the device.
//!
//! A virtio-crypto session has one direction, so a [`DeviceSession`] holds two device sessions,
//! one that encrypts and one that decrypts, created together.

use crypt_vfio_cores::Mode;

use crate::engine::EngineId;

/// A session on a virtio-crypto device. Copying it copies the handle, not the key (which lives
/// only on the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSession {
    pub(crate) mode: Mode,
    /// The engine that created it: its ids mean nothing (or another key) on any other device.
    pub(crate) engine: EngineId,
    pub(crate) encrypt_id: u64,
    pub(crate) decrypt_id: u64,
}

impl DeviceSession {
    /// The session's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }
}
