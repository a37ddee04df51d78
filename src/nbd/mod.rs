//! An NBD (Network Block Device) server: exports a [`BlockDevice`] over TCP or a Unix socket.
//!
//! This is how the decrypted view of a volume reaches the rest of the system: the kernel's
//! `nbd` client, qemu, or libnbd tools connect and read and write plaintext while the volume
//! layer encrypts underneath. The server speaks fixed newstyle negotiation (with
//! `NBD_OPT_GO`/`NBD_OPT_INFO`), TLS (`NBD_OPT_STARTTLS`, x509 or PSK), simple and structured
//! replies, and block status (`base:allocation`: the image's holes), serves several clients
//! at once with several requests in flight per client, and stops cleanly.
//!
//! [`BlockDevice`]: crate::volume::block::BlockDevice

mod budget;
mod connection;
mod negotiate;
pub mod proto;
pub mod server;
mod stream;
pub mod tls;

pub use server::{
    serve_bytes, Listener, ServeReport, Server, ServerConfig, MAX_CONNECTIONS, MAX_HANDSHAKE_TIMEOUT,
    MAX_MEMORY_LIMIT, MAX_PAYLOAD_LIMIT, MAX_WORKERS_PER_CONNECTION, MAX_WORKER_THREADS,
};
pub use tls::{TlsConfig, TlsCredentials};
