//! TLS for NBD (`NBD_OPT_STARTTLS`), with x509 certificates or pre-shared keys, laid out as
//! qemu-nbd and nbdkit expect them so that the same files serve all three.
//!
//! * x509: a directory holding `server-cert.pem` and `server-key.pem`, and `ca-cert.pem` when
//!   client certificates are checked (`verify_peer`, nbdkit's `--tls-verify-peer`).
//! * PSK: a file of `username:hexkey` lines, the format of GnuTLS's `psktool`.
//!
//! OpenSSL does both (rustls has no PSK). After the handshake one TLS session is shared by the
//! connection's reader and its reply writers: the socket turns non-blocking and each side
//! takes the session's lock only for one `SSL_read`/`SSL_write`, waiting for the socket with
//! `poll` outside the lock, so a reader waiting for the next request never holds up a reply.

use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openssl::ssl::{
    ErrorCode, HandshakeError, SslAcceptor, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslStream,
    SslVerifyMode, SslVersion,
};
use rustix::event::{PollFd, PollFlags};
use zeroize::Zeroizing;

use super::stream::{ReplySink, Stream, POLL_INTERVAL, WRITE_TIMEOUT};
use crate::error::{CryptoError, Error, NbdError, Result};

/// The longest PSK identity the TLS PSK extension allows.
const MAX_IDENTITY: usize = 128;
/// The longest key accepted (OpenSSL's own limit on a PSK).
const MAX_PSK: usize = 256;

/// Where the server's TLS credentials come from.
#[derive(Debug, Clone)]
pub enum TlsCredentials {
    /// `server-cert.pem`, `server-key.pem` (and `ca-cert.pem` to check client certificates)
    /// in a directory.
    X509 {
        /// The directory.
        dir: PathBuf,
        /// Require a client certificate signed by `ca-cert.pem`.
        verify_peer: bool,
    },
    /// A `username:hexkey` file.
    Psk {
        /// The file.
        file: PathBuf,
    },
}

/// A server's TLS setup, ready to accept sessions.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: SslAcceptor,
    /// Whether clients that do not start TLS are refused.
    pub required: bool,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").field("required", &self.required).finish_non_exhaustive()
    }
}

fn tls_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Crypto(CryptoError::InvalidRequest(format!("TLS: {what}: {e}")))
}

fn need_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        return Err(Error::Crypto(CryptoError::InvalidRequest(format!(
            "TLS: {} is missing (the directory must hold server-cert.pem and server-key.pem, and \
             ca-cert.pem to verify clients, as for qemu-nbd and nbdkit)",
            p.display()
        ))));
    }
    Ok(p)
}

impl TlsConfig {
    /// Loads credentials; a missing or malformed file is an error that names it.
    pub fn new(credentials: &TlsCredentials, required: bool) -> Result<TlsConfig> {
        let acceptor = match credentials {
            TlsCredentials::X509 { dir, verify_peer } => x509(dir, *verify_peer)?,
            TlsCredentials::Psk { file } => psk(file)?,
        };
        Ok(TlsConfig { acceptor, required })
    }

    /// Runs the server side of the handshake on `stream`, which must end by `deadline`.
    ///
    /// The socket is non-blocking throughout and each step waits in `poll` for what is left
    /// of the deadline: one deadline for the whole handshake. Socket timeouts would bound each
    /// receive only, and a client sending its ClientHello a byte at a time would hold its
    /// connection slot for hours.
    pub(crate) fn accept(&self, stream: Stream, deadline: Instant) -> Result<TlsSession> {
        let raw = stream.try_clone().map_err(|e| Error::os("TLS: cloning the socket", e))?;
        raw.set_nonblocking(true).map_err(|e| Error::os("TLS: making the socket non-blocking", e))?;
        let late = || {
            Error::Nbd(NbdError::Protocol("TLS handshake not finished before the handshake deadline".into()))
        };
        let mut attempt = self.acceptor.accept(stream);
        let ssl = loop {
            match attempt {
                Ok(s) => break s,
                Err(HandshakeError::WouldBlock(mid)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(late());
                    }
                    let flags = if mid.error().code() == ErrorCode::WANT_WRITE {
                        PollFlags::OUT
                    } else {
                        PollFlags::IN
                    };
                    if !wait_fd(&raw, flags, left).map_err(|e| Error::os("TLS: waiting on the socket", e))? {
                        return Err(late());
                    }
                    attempt = mid.handshake();
                }
                Err(HandshakeError::Failure(m)) => {
                    return Err(Error::Nbd(NbdError::Protocol(format!(
                        "TLS handshake failed: {}",
                        m.error()
                    ))))
                }
                Err(HandshakeError::SetupFailure(e)) => {
                    return Err(Error::Nbd(NbdError::Protocol(format!("TLS setup: {e}"))))
                }
            }
        };
        log::debug!(
            "TLS: {} with {}",
            ssl.ssl().version_str(),
            ssl.ssl().current_cipher().map_or("no cipher", |c| c.name())
        );
        Ok(TlsSession { shared: Arc::new(Shared { ssl: Mutex::new(ssl), raw }) })
    }
}

/// Waits until `raw` is ready for `flags` or `timeout` passes; false on timeout.
fn wait_fd(raw: &Stream, flags: PollFlags, timeout: Duration) -> io::Result<bool> {
    let ts = rustix::event::Timespec::try_from(timeout)
        .unwrap_or(rustix::event::Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
    let fd: BorrowedFd<'_> = raw.as_fd();
    let mut fds = [PollFd::from_borrowed_fd(fd, flags)];
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

fn x509(dir: &Path, verify_peer: bool) -> Result<SslAcceptor> {
    let cert = need_file(dir, "server-cert.pem")?;
    let key = need_file(dir, "server-key.pem")?;
    let mut b =
        SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(|e| tls_error("setup", e))?;
    b.set_certificate_chain_file(&cert).map_err(|e| tls_error(cert.display(), e))?;
    b.set_private_key_file(&key, SslFiletype::PEM).map_err(|e| tls_error(key.display(), e))?;
    b.check_private_key()
        .map_err(|e| tls_error(format!("{} does not match {}", key.display(), cert.display()), e))?;
    if verify_peer {
        let ca = need_file(dir, "ca-cert.pem")?;
        b.set_ca_file(&ca).map_err(|e| tls_error(ca.display(), e))?;
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    Ok(b.build())
}

/// Parses a `psktool` key file: `username:hexkey` lines (blank lines and `#` comments skipped).
pub fn parse_psk_file(text: &str) -> Result<Vec<(String, Zeroizing<Vec<u8>>)>> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| {
            Error::Crypto(CryptoError::InvalidRequest(format!("TLS PSK file, line {}: {why}", n + 1)))
        };
        let (user, hex) = line.split_once(':').ok_or_else(|| bad("expected username:hexkey"))?;
        if user.is_empty() || user.len() > MAX_IDENTITY {
            return Err(bad("the username must be 1 to 128 bytes"));
        }
        if hex.len() % 2 != 0 || hex.is_empty() || hex.len() / 2 > MAX_PSK {
            return Err(bad("the key must be an even number of hex digits (at most 256 bytes)"));
        }
        let mut key = Zeroizing::new(vec![0u8; hex.len() / 2]);
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad("the key is not hex"))?;
        }
        if keys.iter().any(|(u, _): &(String, _)| u == user) {
            return Err(bad("the username appears twice"));
        }
        keys.push((user.to_string(), key));
    }
    if keys.is_empty() {
        return Err(Error::Crypto(CryptoError::InvalidRequest(
            "TLS PSK file holds no username:hexkey line".into(),
        )));
    }
    Ok(keys)
}

fn psk(file: &Path) -> Result<SslAcceptor> {
    let text = Zeroizing::new(
        fs::read_to_string(file)
            .map_err(|e| Error::os(format!("reading the PSK file {}", file.display()), e))?,
    );
    let keys = parse_psk_file(&text)?;
    let mut b =
        SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(|e| tls_error("setup", e))?;
    // TLS 1.2 PSK suites (what GnuTLS clients such as qemu and libnbd offer), with forward
    // secrecy first; TLS 1.3 uses the same callback with its own suites.
    b.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!eNULL:!aNULL:!3DES:!RC4:!MD5:@STRENGTH")
        .map_err(|e| tls_error("PSK cipher suites", e))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(|e| tls_error("setup", e))?;
    // A TLS 1.3 PSK from the callback goes with SHA-256 suites only; AES-GCM first (hardware
    // AES makes it several times faster than ChaCha20 here), in the server's order.
    b.set_ciphersuites("TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256")
        .map_err(|e| tls_error("PSK cipher suites", e))?;
    b.set_options(openssl::ssl::SslOptions::CIPHER_SERVER_PREFERENCE);
    b.set_mode(SslMode::AUTO_RETRY | SslMode::ACCEPT_MOVING_WRITE_BUFFER | SslMode::ENABLE_PARTIAL_WRITE);
    let builder: &mut SslContextBuilder = &mut b;
    builder.set_psk_server_callback(move |_ssl, identity, out| {
        let Some(identity) = identity else { return Ok(0) };
        match keys.iter().find(|(u, _)| u.as_bytes() == identity) {
            Some((_, key)) if key.len() <= out.len() => {
                out[..key.len()].copy_from_slice(key);
                Ok(key.len())
            }
            // Unknown user: 0 makes OpenSSL fail the handshake.
            _ => Ok(0),
        }
    });
    Ok(b.build())
}

struct Shared {
    ssl: Mutex<SslStream<Stream>>,
    /// The same socket, to wait on and to shut down without the session's lock.
    raw: Stream,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SslStream<Stream>> {
        self.ssl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the socket is ready for `flags` or `timeout` passes; false on timeout.
    fn wait(&self, flags: PollFlags, timeout: Duration) -> io::Result<bool> {
        wait_fd(&self.raw, flags, timeout)
    }
}

/// A connection after its TLS handshake; split into a reader and writers.
pub(crate) struct TlsSession {
    shared: Arc<Shared>,
}

impl TlsSession {
    /// The request side: reads give up after [`POLL_INTERVAL`] without data, as a plain
    /// socket's do, so that the caller can watch the stop flag and its deadlines.
    pub(crate) fn reader(&self) -> TlsReader {
        TlsReader { shared: Arc::clone(&self.shared) }
    }

    /// The reply side.
    pub(crate) fn writer(&self) -> TlsWriter {
        TlsWriter { shared: Arc::clone(&self.shared), timeout: Mutex::new(WRITE_TIMEOUT) }
    }
}

/// Reads plaintext from a TLS connection.
pub(crate) struct TlsReader {
    shared: Arc<Shared>,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = self.shared.lock().ssl_read(buf);
            let e = match r {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            let flags = match e.code() {
                ErrorCode::ZERO_RETURN => return Ok(0),
                // The peer closed the socket without a close_notify: a close all the same
                // (the NBD layer tells a clean one from a truncated message).
                ErrorCode::SYSCALL if e.io_error().is_none() => return Ok(0),
                ErrorCode::WANT_READ => PollFlags::IN,
                ErrorCode::WANT_WRITE => PollFlags::OUT,
                _ => {
                    return Err(e
                        .into_io_error()
                        .unwrap_or_else(|e| io::Error::new(ErrorKind::InvalidData, format!("TLS: {e}"))))
                }
            };
            if !self.shared.wait(flags, POLL_INTERVAL)? {
                return Err(ErrorKind::WouldBlock.into());
            }
        }
    }
}

/// Writes plaintext to a TLS connection, each `write` within the timeout last set.
pub(crate) struct TlsWriter {
    shared: Arc<Shared>,
    timeout: Mutex<Duration>,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let timeout = *self.timeout.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.shared.lock().ssl_write(buf);
            let e = match r {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            let flags = match e.code() {
                ErrorCode::WANT_WRITE => PollFlags::OUT,
                ErrorCode::WANT_READ => PollFlags::IN,
                _ => {
                    return Err(e
                        .into_io_error()
                        .unwrap_or_else(|e| io::Error::new(ErrorKind::BrokenPipe, format!("TLS: {e}"))))
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.shared.wait(flags, left)? {
                return Err(io::Error::new(ErrorKind::TimedOut, "the client did not take a reply in time"));
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ReplySink for TlsWriter {
    fn close(&self) {
        self.shared.raw.shutdown();
    }

    fn set_write_timeout(&self, timeout: Duration) -> io::Result<()> {
        *self.timeout.lock().unwrap_or_else(|p| p.into_inner()) = timeout;
        Ok(())
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        // A courtesy close_notify; the peer may be gone, and a full socket is not waited for.
        let _ = self.shared.lock().shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_as_psktool_writes_them() {
        let keys = parse_psk_file("# comment\nalice:00ff10\n\nbob:AbCd\n").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].0, "alice");
        assert_eq!(&keys[0].1[..], &[0, 0xff, 0x10]);
        assert_eq!(&keys[1].1[..], &[0xab, 0xcd]);
        for bad in ["", "alice", "alice:0", "alice:zz", ":00", "a:00\na:11"] {
            assert!(parse_psk_file(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_certificates_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = TlsConfig::new(&TlsCredentials::X509 { dir: dir.path().into(), verify_peer: false }, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("server-cert.pem"), "{e}");
    }
}
