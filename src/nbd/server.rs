//! The accept loop, one thread per client, and the orderly stop.
//!
//! Stopping is a flag (set from a signal handler by the command, or by a test): the accept
//! loop polls it, idle connections notice it between requests, requests already read are
//! finished and answered, and the device is flushed once every connection is gone. A client
//! is isolated in its own thread, so nothing one client sends can disturb another.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use super::connection::{self, Limits};
use super::negotiate::{self, ExportInfo, Outcome};
use super::stream::{ClientReader, Stream};
use crate::error::{Error, Result};
use crate::volume::block::BlockDevice;

/// How often the accept loop looks at the stop flag when no client is connecting.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// How the server exports its device.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Export name; clients asking for the empty name (the default export) get it too.
    pub export_name: String,
    /// Human-readable description shown by `NBD_OPT_LIST` and `NBD_OPT_INFO`.
    pub description: String,
    /// Largest read or write accepted in one request, advertised as the maximum block size.
    pub max_payload: u32,
    /// Worker threads per connection: how many of one client's requests run at once.
    pub workers_per_connection: usize,
    /// Payload bytes one connection may hold in flight; must be at least `max_payload`.
    pub inflight_bytes_per_connection: u64,
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
    /// A client must choose an export within this time of connecting, so that idle or
    /// dawdling clients cannot hold every connection slot.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            export_name: String::new(),
            description: String::new(),
            // What the protocol tells clients they may always use.
            max_payload: 32 << 20,
            workers_per_connection: 4,
            inflight_bytes_per_connection: 64 << 20,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix domain socket at `path`, removed when the listener is dropped.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Where it is bound.
        path: PathBuf,
    },
}

impl Listener {
    /// Binds a TCP address such as `127.0.0.1:10809` (port 0 picks a free port).
    pub fn tcp(addr: impl ToSocketAddrs + std::fmt::Debug) -> Result<Listener> {
        let l = TcpListener::bind(&addr).map_err(|e| Error::os(format!("listening on {addr:?}"), e))?;
        Ok(Listener::Tcp(l))
    }

    /// Binds a Unix socket at `path`, which must not exist: an existing socket may belong to
    /// a running server.
    pub fn unix(path: impl AsRef<Path>) -> Result<Listener> {
        let path = path.as_ref().to_path_buf();
        let l = UnixListener::bind(&path)
            .map_err(|e| Error::os(format!("listening on {}", path.display()), e))?;
        Ok(Listener::Unix { listener: l, path })
    }

    /// The TCP address actually bound, if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix { .. } => None,
        }
    }

    /// The NBD URI a client would use to reach `export` here.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("nbd://{a}/{export}"),
                Err(_) => format!("nbd://?/{export}"),
            },
            Listener::Unix { path, .. } => format!("nbd+unix:///{export}?socket={}", path.display()),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
        }
    }

    fn accept(&self, n: u64) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, a)| (Stream::Tcp(s), format!("client {n} ({a})"))),
            Listener::Unix { listener, .. } => {
                listener.accept().map(|(s, _)| (Stream::Unix(s), format!("client {n} (unix)")))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            if let Err(e) = std::fs::remove_file(&*path) {
                debug!("removing {}: {e}", path.display());
            }
        }
    }
}

/// What a finished [`Server::serve`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeReport {
    /// Connections accepted.
    pub connections: u64,
}

/// An NBD server exporting one block device.
pub struct Server {
    device: Arc<dyn BlockDevice>,
    config: ServerConfig,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// A server for `device`; checks the configuration.
    pub fn new(device: Arc<dyn BlockDevice>, config: ServerConfig) -> Result<Server> {
        if config.export_name.len() > 4096 || config.export_name.contains('\0') {
            return Err(Error::InvalidRequest(
                "an NBD export name is at most 4096 bytes, without NUL".into(),
            ));
        }
        if config.max_payload < 4096 {
            return Err(Error::InvalidRequest(format!(
                "maximum payload {} is below 4096 bytes",
                config.max_payload
            )));
        }
        if config.inflight_bytes_per_connection < u64::from(config.max_payload) {
            return Err(Error::InvalidRequest(
                "in-flight bytes per connection must cover one maximum payload".into(),
            ));
        }
        if config.handshake_timeout.is_zero() {
            return Err(Error::InvalidRequest("the handshake timeout must be above zero".into()));
        }
        if config.workers_per_connection == 0 || config.max_connections == 0 {
            return Err(Error::InvalidRequest(
                "workers per connection and connections must be at least 1".into(),
            ));
        }
        Ok(Server { device, config, stop: Arc::new(AtomicBool::new(false)) })
    }

    /// The flag that stops [`Server::serve`]; setting it is safe from a signal handler.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Asks a running [`Server::serve`] to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Serves clients on `listener` until stopped, then waits for every connection to finish
    /// its requests and flushes the device.
    pub fn serve(&self, listener: Listener) -> Result<ServeReport> {
        listener.set_nonblocking().map_err(|e| Error::os("making the listener non-blocking", e))?;
        let export = Arc::new(ExportInfo {
            name: self.config.export_name.clone(),
            description: self.config.description.clone(),
            size: self.device.size(),
            flags: negotiate::transmission_flags(self.device.read_only()),
            block_size: self.device.block_size(),
            max_payload: self.config.max_payload,
        });
        let limits = Arc::new(Limits {
            max_payload: self.config.max_payload,
            workers: self.config.workers_per_connection,
            inflight_bytes: self.config.inflight_bytes_per_connection,
            flags: export.flags,
            handshake_timeout: self.config.handshake_timeout,
        });
        let mut clients: Vec<JoinHandle<()>> = Vec::new();
        let mut accepted = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            let (done, running): (Vec<_>, Vec<_>) = clients.into_iter().partition(|h| h.is_finished());
            clients = running;
            done.into_iter().for_each(join_client);
            match listener.accept(accepted + 1) {
                Ok((stream, peer)) => {
                    accepted += 1;
                    if clients.len() >= self.config.max_connections {
                        warn!("{peer}: refused, already serving {} connections", clients.len());
                        stream.shutdown();
                        continue;
                    }
                    debug!("{peer}: connected");
                    let (device, export, limits, stop) = (
                        Arc::clone(&self.device),
                        Arc::clone(&export),
                        Arc::clone(&limits),
                        Arc::clone(&self.stop),
                    );
                    let spawned = std::thread::Builder::new()
                        .name(format!("nbd-client-{accepted}"))
                        .spawn(move || serve_client(stream, &peer, &*device, &export, &limits, stop));
                    match spawned {
                        Ok(h) => clients.push(h),
                        Err(e) => warn!("cannot start a thread for a client: {e}"),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, a client that vanished before accept: keep serving.
                    warn!("accepting a connection: {e}");
                    std::thread::sleep(ACCEPT_POLL * 5);
                }
            }
        }
        drop(listener);
        info!("stopping: waiting for {} connection(s) to finish their requests", clients.len());
        clients.into_iter().for_each(join_client);
        self.device.flush()?;
        info!("stopped after {accepted} connection(s); device flushed");
        Ok(ServeReport { connections: accepted })
    }
}

fn join_client(h: JoinHandle<()>) {
    let name = h.thread().name().unwrap_or("nbd client").to_string();
    if h.join().is_err() {
        error!("{name} panicked; its connection was dropped");
    }
}

fn serve_client(
    stream: Stream,
    peer: &str,
    device: &dyn BlockDevice,
    export: &ExportInfo,
    limits: &Limits,
    stop: Arc<AtomicBool>,
) {
    let mut writer = match stream.prepare().and_then(|_| stream.try_clone()) {
        Ok(w) => w,
        Err(e) => {
            warn!("{peer}: setting up the socket: {e}");
            return;
        }
    };
    let mut reader = ClientReader::new(stream, Arc::clone(&stop));
    reader.set_deadline(Some(Instant::now() + limits.handshake_timeout));
    match negotiate::negotiate(&mut reader, &mut writer, export, &stop) {
        Ok(Outcome::Transmission) => {
            // A client in transmission may rightly stay idle for as long as it likes.
            reader.set_deadline(None);
            info!("{peer}: transmission started");
            let end = connection::transmission(&mut reader, writer, device, limits, peer);
            info!("{peer}: transmission ended ({end:?})");
        }
        Ok(Outcome::Ended) => debug!("{peer}: left during the handshake"),
        Err(e) => info!("{peer}: handshake failed: {e}"),
    }
}
