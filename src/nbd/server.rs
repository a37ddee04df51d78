//! The accept loop, one thread per client, and the orderly stop.
//!
//! Stopping is a flag (set from a signal handler by the command, or by a test): the accept
//! loop polls it, connections stop reading requests, and requests already read are finished
//! and answered for a short grace period. Whatever is still running after it (a client that
//! does not read its replies, one stuck in the middle of a message) is abandoned: its socket
//! is shut down, which wakes every thread blocked on it, and its unanswered requests are
//! dropped. Then the device is flushed. So a stop takes the grace period plus the flush,
//! whatever clients do. A client is isolated in its own thread, so nothing one client sends
//! can disturb another.
//!
//! Clients still in the handshake do not keep others out: when every connection slot is
//! taken, the oldest connection still in its handshake is closed to make room, and a
//! handshake has its own short deadline.

use std::io::{self, ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use super::budget::{self, BufferPool, ServerMemory};
use super::connection::{self, Control, Limits};
use super::negotiate::{self, ExportInfo, Negotiation, Outcome, Session, TlsPolicy};
use super::stream::{ClientReader, ReplySink, Stream};
use super::tls::TlsConfig;
use crate::error::{CryptoError, Error, Result};
use crate::volume::block::BlockDevice;

/// How often the accept loop looks at the stop flag when no client is connecting.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// The largest maximum payload: the protocol's conventional limit, which every client obeys.
pub const MAX_PAYLOAD_LIMIT: u32 = 32 << 20;
/// The most worker threads one connection may have.
pub const MAX_WORKERS_PER_CONNECTION: usize = 64;
/// The most connections a server may serve at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// The most threads the workers of every connection may add up to.
pub const MAX_WORKER_THREADS: usize = 16384;
/// The largest memory budget accepted (a typo guard: more than any machine here has).
pub const MAX_MEMORY_LIMIT: u64 = 1 << 40;
/// The longest handshake deadline accepted.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3600);

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
    /// Payload bytes one connection may hold in flight (so that one client cannot take the
    /// whole `max_memory`); must be at least `max_payload`; at most `max_memory` is used.
    pub inflight_bytes_per_connection: u64,
    /// Payload bytes every connection together may hold in flight: the server's memory
    /// budget; must be at least `max_payload`. Each connection may in addition hold 1 MiB of
    /// its own for small requests, so that clients holding this budget cannot lock others out.
    pub max_memory: u64,
    /// Connections served at once. When all are taken, a new client replaces the oldest one
    /// still in its handshake, or is closed right after accept if there is none.
    pub max_connections: usize,
    /// A client must choose an export within this time of connecting.
    pub handshake_timeout: Duration,
    /// How long a stop lets connections go on answering requests (and reading those the
    /// client has already sent) before it closes them: a stop takes at most this long plus
    /// the final flush, whatever clients do.
    pub stop_grace: Duration,
    /// A reply must be sent whole within this time, or its client (one that does not read
    /// its replies, or reads them a few bytes at a time) is dropped and the memory its
    /// requests hold is freed for other clients.
    pub reply_timeout: Duration,
    /// TLS credentials, and whether clients must use them; `None`: no TLS.
    pub tls: Option<TlsConfig>,
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
            max_memory: 256 << 20,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            // Leaves most of the 2 s a stop may take to the flush and a loaded machine.
            stop_grace: Duration::from_millis(600),
            reply_timeout: super::stream::WRITE_TIMEOUT,
            tls: None,
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
    /// a running server. The socket is created with mode 0600 (owner only: whoever can
    /// connect reads the export).
    ///
    /// It is bound inside a fresh directory of mode 0700 next to `path`, set to 0600 there,
    /// and only then linked at `path` (a link fails if `path` exists): nobody else can reach
    /// it before its mode is right, and the process umask is left alone (swapping it would
    /// race with other threads, and two swaps at once could leave it changed for good).
    pub fn unix(path: impl AsRef<Path>) -> Result<Listener> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = path.as_ref().to_path_buf();
        let fail =
            |what: &str, e: std::io::Error| Error::os(format!("listening on {}: {what}", path.display()), e);
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let private = parent.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(|e| fail("creating a private directory for the socket", e))?;
        let inner = private.join("s");
        let bound = (|| -> Result<UnixListener> {
            let l = UnixListener::bind(&inner).map_err(|e| fail("binding", e))?;
            std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| fail("setting the socket's mode to 0600", e))?;
            std::fs::hard_link(&inner, &path).map_err(|e| fail("linking the socket into place", e))?;
            Ok(l)
        })();
        let _ = std::fs::remove_file(&inner);
        let _ = std::fs::remove_dir(&private);
        Ok(Listener::Unix { listener: bound?, path })
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
            return Err(Error::Crypto(CryptoError::InvalidRequest(
                "an NBD export name is at most 4096 bytes, without NUL".into(),
            )));
        }
        let invalid = |what: String| Err(Error::Crypto(CryptoError::InvalidRequest(what)));
        if !(4096..=MAX_PAYLOAD_LIMIT).contains(&config.max_payload) {
            return invalid(format!(
                "maximum payload {} is outside 4096..={MAX_PAYLOAD_LIMIT} bytes",
                config.max_payload
            ));
        }
        let payload = u64::from(config.max_payload);
        if config.inflight_bytes_per_connection < payload {
            return invalid("in-flight bytes per connection must cover one maximum payload".into());
        }
        if !(payload..=MAX_MEMORY_LIMIT).contains(&config.max_memory) {
            return invalid(format!(
                "memory budget {} is outside {payload}..={MAX_MEMORY_LIMIT} bytes (it must hold \
                 one maximum payload)",
                config.max_memory
            ));
        }
        if config.handshake_timeout.is_zero() || config.handshake_timeout > MAX_HANDSHAKE_TIMEOUT {
            return invalid(format!(
                "handshake timeout {:?} is outside (0, {MAX_HANDSHAKE_TIMEOUT:?}]",
                config.handshake_timeout
            ));
        }
        if config.reply_timeout.is_zero() || config.reply_timeout > MAX_HANDSHAKE_TIMEOUT {
            return invalid(format!(
                "reply timeout {:?} is outside (0, {MAX_HANDSHAKE_TIMEOUT:?}]",
                config.reply_timeout
            ));
        }
        if config.stop_grace > MAX_HANDSHAKE_TIMEOUT {
            return invalid(format!("stop grace {:?} is over {MAX_HANDSHAKE_TIMEOUT:?}", config.stop_grace));
        }
        if !(1..=MAX_WORKERS_PER_CONNECTION).contains(&config.workers_per_connection) {
            return invalid(format!(
                "{} workers per connection is outside 1..={MAX_WORKERS_PER_CONNECTION}",
                config.workers_per_connection
            ));
        }
        if !(1..=MAX_CONNECTIONS).contains(&config.max_connections) {
            return invalid(format!(
                "{} connections is outside 1..={MAX_CONNECTIONS}",
                config.max_connections
            ));
        }
        if config.workers_per_connection * config.max_connections > MAX_WORKER_THREADS {
            return invalid(format!(
                "{} workers for each of {} connections is over {MAX_WORKER_THREADS} threads",
                config.workers_per_connection, config.max_connections
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

    /// Serves clients on `listener` until stopped, then lets every connection answer the
    /// requests it has read (for [`ServerConfig::stop_grace`], then abandons it) and flushes
    /// the device.
    ///
    /// On glibc this fixes the allocator's mmap threshold for the whole process (see
    /// `nbd::budget`), so that freed payload buffers go back to the system.
    pub fn serve(&self, listener: Listener) -> Result<ServeReport> {
        listener.set_nonblocking().map_err(|e| Error::os("making the listener non-blocking", e))?;
        budget::return_freed_buffers();
        let shared = Arc::new(Shared {
            export: self.export_info(),
            limits: self.limits(),
            memory: ServerMemory::new(self.config.max_memory),
            tls: self.config.tls.clone(),
        });
        let mut clients: Vec<Client> = Vec::new();
        let mut accepted = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            reap(&mut clients, &shared.memory.pool);
            match listener.accept(accepted + 1) {
                Ok((stream, peer)) => {
                    accepted += 1;
                    if !self.make_room(&clients) {
                        warn!("{peer}: refused, already serving {} connections", clients.len());
                        stream.shutdown();
                        continue;
                    }
                    debug!("{peer}: connected");
                    match self.start_client(stream, peer, &shared, accepted) {
                        Ok(c) => clients.push(c),
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
        let grace_end = Instant::now() + self.config.stop_grace;
        while clients.iter().any(|c| !c.thread.is_finished()) && Instant::now() < grace_end {
            std::thread::sleep(ACCEPT_POLL / 2);
        }
        for c in clients.iter().filter(|c| !c.thread.is_finished()) {
            info!(
                "{}: still busy after {:?}; closing it, unanswered requests are dropped",
                c.peer, self.config.stop_grace
            );
            c.control.abandon();
            c.socket.shutdown();
        }
        clients.into_iter().for_each(|c| join_client(c.thread));
        self.device.flush()?;
        info!("stopped after {accepted} connection(s); device flushed");
        Ok(ServeReport { connections: accepted })
    }

    /// Serves connections that are already past the handshake: the kernel's NBD client, which
    /// `crypt-vfio open --nbd` hands the other ends of these sockets (the kernel never
    /// negotiates; it sends requests at once and reads simple replies). Returns once every
    /// connection has ended (the kernel disconnected) or the server was stopped, then flushes
    /// the device.
    pub fn serve_transmission(&self, sockets: Vec<UnixStream>) -> Result<()> {
        budget::return_freed_buffers();
        let shared = Arc::new(Shared {
            export: self.export_info(),
            limits: self.limits(),
            memory: ServerMemory::new(self.config.max_memory),
            tls: None,
        });
        let mut clients = Vec::new();
        // A connection that cannot start stops the others, which are then ended and joined as
        // on any stop: none is left running on a volume this returns from.
        let mut setup_failed = None;
        for (n, socket) in sockets.into_iter().enumerate() {
            let stream = Stream::Unix(socket);
            let peer = format!("kernel connection {n}");
            let handle = match stream.try_clone() {
                Ok(h) => h,
                Err(e) => {
                    setup_failed = Some(Error::os("duplicating a connection's socket", e));
                    break;
                }
            };
            let control = Arc::new(Control::new());
            let (device, shared_, control_, stop) =
                (Arc::clone(&self.device), Arc::clone(&shared), Arc::clone(&control), Arc::clone(&self.stop));
            let peer_ = peer.clone();
            let thread = std::thread::Builder::new()
                .name(format!("nbd-kernel-{n}"))
                .spawn(move || {
                    let writer = match stream.prepare().and_then(|_| stream.try_clone()) {
                        Ok(w) => w,
                        Err(e) => return warn!("{peer_}: setting up the socket: {e}"),
                    };
                    let mut reader = ClientReader::new(stream, stop);
                    let session = Session { structured: false, base_allocation: false };
                    if control_.enter_transmission() {
                        let end = connection::transmission(
                            &mut reader,
                            writer,
                            &*device,
                            &shared_.limits,
                            &shared_.memory,
                            &control_,
                            (&peer_, session),
                        );
                        info!("{peer_}: transmission ended ({end:?})");
                    }
                })
                .map_err(|e| Error::os("starting a connection thread", e));
            match thread {
                Ok(thread) => clients.push(Client { thread, socket: handle, control, peer }),
                Err(e) => {
                    setup_failed = Some(e);
                    break;
                }
            }
        }
        if setup_failed.is_some() {
            self.stop.store(true, Ordering::SeqCst);
        }
        while clients.iter().any(|c| !c.thread.is_finished()) && !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(ACCEPT_POLL);
        }
        let grace_end = Instant::now() + self.config.stop_grace;
        while clients.iter().any(|c| !c.thread.is_finished()) && Instant::now() < grace_end {
            std::thread::sleep(ACCEPT_POLL / 2);
        }
        for c in clients.iter().filter(|c| !c.thread.is_finished()) {
            info!("{}: still busy after {:?}; closing it", c.peer, self.config.stop_grace);
            c.control.abandon();
            c.socket.shutdown();
        }
        clients.into_iter().for_each(|c| join_client(c.thread));
        self.device.flush()?;
        setup_failed.map_or(Ok(()), Err)
    }

    fn export_info(&self) -> ExportInfo {
        ExportInfo {
            name: self.config.export_name.clone(),
            description: self.config.description.clone(),
            size: self.device.size(),
            flags: negotiate::transmission_flags(self.device.read_only()),
            block_size: self.device.block_size(),
            max_payload: self.config.max_payload,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_payload: self.config.max_payload,
            workers: self.config.workers_per_connection,
            inflight_bytes: self.config.inflight_bytes_per_connection.min(self.config.max_memory),
            flags: negotiate::transmission_flags(self.device.read_only()),
            handshake_timeout: self.config.handshake_timeout,
            reply_timeout: self.config.reply_timeout,
        }
    }

    /// Whether a new client may be served: a free slot, or one freed by closing the oldest
    /// connection still in its handshake.
    fn make_room(&self, clients: &[Client]) -> bool {
        let live = clients.iter().filter(|c| !c.control.evicted()).count();
        if live < self.config.max_connections {
            return true;
        }
        // Clients are in accept order: the first one still haggling is the oldest.
        match clients.iter().find(|c| c.control.evict_in_handshake()) {
            Some(c) => {
                info!("{}: closed in its handshake to make room for a new client", c.peer);
                c.socket.shutdown();
                true
            }
            None => false,
        }
    }

    fn start_client(&self, stream: Stream, peer: String, shared: &Arc<Shared>, n: u64) -> io::Result<Client> {
        let socket = stream.try_clone()?;
        let control = Arc::new(Control::new());
        let (device, shared_, control_, stop) =
            (Arc::clone(&self.device), Arc::clone(shared), Arc::clone(&control), Arc::clone(&self.stop));
        let peer_ = peer.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nbd-client-{n}"))
            .spawn(move || serve_client(stream, &peer_, &*device, &shared_, &control_, stop))?;
        Ok(Client { thread, socket, control, peer })
    }
}

/// What every connection of one server shares.
struct Shared {
    export: ExportInfo,
    limits: Limits,
    /// The server's memory: budget and idle buffers.
    memory: ServerMemory,
    tls: Option<TlsConfig>,
}

impl Shared {
    fn tls_policy(&self) -> TlsPolicy {
        match &self.tls {
            None => TlsPolicy::Off,
            Some(t) if t.required => TlsPolicy::Required,
            Some(_) => TlsPolicy::Allowed,
        }
    }
}

/// A connection as the accept loop keeps it.
struct Client {
    thread: JoinHandle<()>,
    /// A second handle on the client's socket, to shut it down from outside.
    socket: Stream,
    control: Arc<Control>,
    peer: String,
}

/// Joins the connections that have ended, and gives their memory back (the idle buffers
/// too, once no client is left).
fn reap(clients: &mut Vec<Client>, pool: &BufferPool) {
    let before = clients.len();
    let (done, running): (Vec<_>, Vec<_>) =
        std::mem::take(clients).into_iter().partition(|c| c.thread.is_finished());
    *clients = running;
    done.into_iter().for_each(|c| join_client(c.thread));
    if clients.len() != before {
        if clients.is_empty() {
            pool.clear();
        }
        budget::trim();
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
    shared: &Shared,
    control: &Control,
    stop: Arc<AtomicBool>,
) {
    let mut writer = match stream.prepare().and_then(|_| stream.try_clone()) {
        Ok(w) => w,
        Err(e) => {
            warn!("{peer}: setting up the socket: {e}");
            return;
        }
    };
    // One deadline for the whole handshake, TLS included.
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    let mut reader = ClientReader::new(stream, Arc::clone(&stop));
    reader.set_deadline(Some(deadline));
    let mut negotiation = Negotiation::new(&shared.export, shared.tls_policy());
    let outcome = handshake(&mut negotiation, &mut reader, &mut writer, &stop);
    let Ok(Outcome::StartTls) = outcome else {
        return after_handshake(outcome, &mut reader, writer, peer, device, shared, control);
    };
    let Some(tls) = &shared.tls else {
        return; // STARTTLS is only accepted with TLS configured
    };
    drop(writer);
    let session = match tls.accept(reader.into_inner(), deadline) {
        Ok(s) => s,
        Err(e) => {
            info!("{peer}: {e}");
            return;
        }
    };
    debug!("{peer}: TLS started");
    negotiation.tls_started();
    let mut reader = ClientReader::new(session.reader(), Arc::clone(&stop));
    reader.set_deadline(Some(deadline));
    let mut writer = session.writer();
    let outcome = negotiation.options(&mut reader, &mut writer, &stop);
    after_handshake(outcome, &mut reader, writer, peer, device, shared, control);
}

/// The greeting and the options, up to the export's choice or `STARTTLS`.
fn handshake<R: Read, W: std::io::Write>(
    negotiation: &mut Negotiation<'_>,
    reader: &mut ClientReader<R>,
    writer: &mut W,
    stop: &AtomicBool,
) -> Result<Outcome> {
    if !negotiation.greet(reader, writer)? {
        return Ok(Outcome::Ended);
    }
    negotiation.options(reader, writer, stop)
}

/// Transmission, if the handshake chose the export.
fn after_handshake<R: Read, W: ReplySink>(
    outcome: Result<Outcome>,
    reader: &mut ClientReader<R>,
    writer: W,
    peer: &str,
    device: &dyn BlockDevice,
    shared: &Shared,
    control: &Control,
) {
    match outcome {
        Ok(Outcome::Transmission(session)) if control.enter_transmission() => {
            // A client in transmission may rightly stay idle for as long as it likes.
            reader.set_deadline(None);
            info!("{peer}: transmission started");
            let end = connection::transmission(
                reader,
                writer,
                device,
                &shared.limits,
                &shared.memory,
                control,
                (peer, session),
            );
            info!("{peer}: transmission ended ({end:?})");
        }
        Ok(Outcome::Transmission(_)) => debug!("{peer}: closed in the handshake to make room"),
        Ok(Outcome::Ended | Outcome::StartTls) => debug!("{peer}: left during the handshake"),
        Err(e) => info!("{peer}: handshake failed: {e}"),
    }
}

/// One connection without TLS from the first byte to the last: handshake, then transmission.
fn serve_connection<R: Read, W: ReplySink>(
    reader: &mut ClientReader<R>,
    mut writer: W,
    peer: &str,
    device: &dyn BlockDevice,
    shared: &Shared,
    control: &Control,
) {
    reader.set_deadline(Some(Instant::now() + shared.limits.handshake_timeout));
    let stop = reader.stop_flag();
    let mut negotiation = Negotiation::new(&shared.export, TlsPolicy::Off);
    let outcome = handshake(&mut negotiation, reader, &mut writer, &stop);
    after_handshake(outcome, reader, writer, peer, device, shared, control);
}

/// Serves one client whose bytes are `input`, over an in-memory stream, and returns what the
/// server sent. The fuzz targets drive the handshake and the request stream through this; it
/// runs the very code a socket connection runs.
#[doc(hidden)]
pub fn serve_bytes(device: Arc<dyn BlockDevice>, config: ServerConfig, input: &[u8]) -> Result<Vec<u8>> {
    let server = Server::new(device, config)?;
    let shared = Shared {
        export: server.export_info(),
        limits: server.limits(),
        memory: ServerMemory::new(server.config.max_memory),
        tls: None,
    };
    let mut out = Vec::new();
    let mut reader = ClientReader::new(input, Arc::clone(&server.stop));
    serve_connection(&mut reader, &mut out, "fuzz client", &*server.device, &shared, &Control::new());
    Ok(out)
}
