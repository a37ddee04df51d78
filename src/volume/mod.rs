//! Block devices that can be exported: the [`block::BlockDevice`] trait the NBD server serves,
//! and a plain file-backed implementation of it.
//!
//! The trait sits here rather than in the NBD code because the encrypted volume (dm-crypt/LUKS
//! over the crypto engine) implements it too: the server does not know whether the bytes it
//! moves are decrypted by a device or read straight from an image.

pub mod block;
pub mod file;
