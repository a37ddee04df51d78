//! One client's transmission phase: requests in, device operations, replies out.
//!
//! The connection's own thread reads and checks requests; worker threads run them on the
//! device so that several are in flight at once (a slow flush does not hold up reads), and
//! replies go out whole under one writer lock, in completion order, each echoing its handle.
//! Payload memory is bounded by byte budgets, the connection's and the server's (see
//! [`super::budget`]), so clients that pipeline large requests wait for earlier ones to finish
//! instead of growing the server without limit. When the server gives up on a connection
//! (see [`Control`]), requests not yet run are dropped and no more replies are sent.
//!
//! Anything a client sends is checked before it reaches the device: a bad request gets an
//! error reply and the connection goes on; only a stream that can no longer be parsed (a bad
//! magic, a truncated message, an absurd write length) closes this one connection.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::budget::{Budget, BufferPool, Charge, ServerMemory};
use super::negotiate::{Session, BASE_ALLOCATION_ID};
use super::proto::{self, cmd, cmd_flag, errno, reply_flag, reply_type, state, tflags, Request};
use super::stream::{ClientReader, Next, ReplySink};
use crate::volume::block::BlockDevice;

/// A write longer than the maximum payload but at most this long is read and dropped with an
/// `EINVAL` reply; a longer one ends the connection rather than swallowing gigabytes.
const DISCARD_LIMIT: u64 = 128 << 20;
/// Extents one block status reply holds at most (the client asks again for the rest).
const MAX_EXTENTS: usize = 4096;
/// What a block status request is charged: the most metadata a device reads to answer one
/// (an authenticated volume reads 32 bytes per sector, at most 65536 sectors) and the reply.
const STATUS_COST: u64 = (2 << 20) + 8 * MAX_EXTENTS as u64;
/// Requests waiting for a worker, per connection.
const QUEUE_DEPTH: usize = 64;
/// Payload bytes each connection may hold outside the server's shared budget, for requests
/// this small: clients that fill the shared budget and stop reading their replies cannot lock
/// a new client's small requests out (only requests larger than this wait for the shared
/// budget). Bounded: at most this much per connection above the server's `max_memory`.
pub(crate) const RESERVED_PER_CONNECTION: u64 = 1 << 20;

/// How a connection runs: its handshake deadline and its transmission limits.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Largest read or write payload.
    pub max_payload: u32,
    /// Worker threads running requests.
    pub workers: usize,
    /// Payload bytes of this connection alive at once (at least `max_payload`).
    pub inflight_bytes: u64,
    /// Transmission flags sent to the client (read-only or not).
    pub flags: u16,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: std::time::Duration,
    /// Time one reply has to be sent whole; a client that reads slower is dropped (and the
    /// budget its requests hold is freed).
    pub reply_timeout: Duration,
}

/// Where a connection is, as the server sees it.
const HANDSHAKE: u8 = 0;
const TRANSMISSION: u8 = 1;
const EVICTED: u8 = 2;

/// What the server and one connection share: the phase (a connection still in the handshake
/// may be evicted to make room for a new client) and whether the server gave up on it.
#[derive(Debug)]
pub(crate) struct Control {
    phase: AtomicU8,
    abandoned: AtomicBool,
}

impl Control {
    pub(crate) fn new() -> Self {
        Control { phase: AtomicU8::new(HANDSHAKE), abandoned: AtomicBool::new(false) }
    }

    /// The connection enters transmission; false if it was evicted first.
    pub(crate) fn enter_transmission(&self) -> bool {
        self.phase.compare_exchange(HANDSHAKE, TRANSMISSION, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// Evicts the connection if it is still in the handshake; true if it was.
    pub(crate) fn evict_in_handshake(&self) -> bool {
        self.phase.compare_exchange(HANDSHAKE, EVICTED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    pub(crate) fn evicted(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == EVICTED
    }

    /// The server stops waiting for this connection: requests not yet run are dropped.
    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }

    fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }
}

/// A checked request ready for the device.
enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    /// `punch`: the client allows a hole (no `NBD_CMD_FLAG_NO_HOLE`).
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Flush,
    BlockStatus {
        offset: u64,
        len: u32,
        one: bool,
    },
}

struct Job<'a> {
    handle: u64,
    op: Op,
    /// Budget bytes held until the reply is sent (or the job is dropped).
    _charges: Option<(Charge<'a>, Charge<'a>)>,
}

/// The sending side, shared by the workers and the reader (which answers bad requests itself).
struct Replies<'a, W> {
    socket: Mutex<W>,
    /// Set once a reply could not be sent: the client is gone and the rest are skipped.
    broken: AtomicBool,
    control: &'a Control,
    peer: String,
    /// How long one reply may take to send.
    timeout: Duration,
    /// Reads and block status are answered in structured replies.
    structured: bool,
}

impl<W: ReplySink> Replies<'_, W> {
    /// No reply will reach the client any more: the socket failed or the server gave up.
    fn gone(&self) -> bool {
        self.broken.load(Ordering::Relaxed) || self.control.abandoned()
    }

    fn send(&self, header: &[u8], payload: &[u8]) {
        if self.gone() {
            return;
        }
        let mut s = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        // A deadline on the whole reply, not on each write(2): a client that reads a few
        // bytes now and then would otherwise hold its replies' budget for ever.
        let deadline = Instant::now() + self.timeout;
        let r = write_all_by(&mut *s, header, deadline)
            .and_then(|_| write_all_by(&mut *s, payload, deadline))
            .and_then(|_| s.flush());
        if let Err(e) = r {
            if !self.broken.swap(true, Ordering::Relaxed) {
                info!("{}: cannot send replies ({e}); dropping the connection", self.peer);
                // Wakes the reader so the connection winds down.
                s.close();
            }
        }
    }

    /// A reply without data: success (`error` 0) or an error. Simple, except where the
    /// protocol wants a structured one (reads and block status, once negotiated).
    fn error(&self, handle: u64, error: u32) {
        self.send(&proto::simple_reply(error, handle), &[]);
    }

    /// An error reply to `req`, in the form its command needs.
    fn fail(&self, req: Request, error: u32) {
        if self.structured && matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS) {
            self.send(&proto::structured_error(error, req.handle), &[]);
        } else {
            self.error(req.handle, error);
        }
    }

    /// The data of a successful read at `offset`.
    fn data(&self, handle: u64, offset: u64, data: &[u8]) {
        if !self.structured {
            self.send(&proto::simple_reply(0, handle), data);
        } else if data.is_empty() {
            self.send(&proto::structured_header(reply_flag::DONE, reply_type::NONE, handle, 0), &[]);
        } else {
            // One chunk for the whole read: NBD_CMD_FLAG_DF holds whether asked or not.
            let mut h = proto::structured_header(
                reply_flag::DONE,
                reply_type::OFFSET_DATA,
                handle,
                8 + data.len() as u32,
            )
            .to_vec();
            h.extend_from_slice(&offset.to_be_bytes());
            self.send(&h, data);
        }
    }
}

/// Writes all of `buf` before `deadline`, or fails with `TimedOut`.
fn write_all_by<W: ReplySink + ?Sized>(s: &mut W, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the client did not take a reply in time"));
        }
        s.set_write_timeout(left)?;
        match s.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why the reader stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the socket.
    Closed,
    /// The server is stopping.
    Stopping,
    /// The client broke the protocol or the socket failed; the reason was logged.
    Dropped,
}

/// The budgets a request is charged against.
pub(crate) struct Budgets<'a> {
    /// The server's, shared by every connection.
    pub server: &'a Budget,
    /// Where payload buffers come from and go back to.
    pub pool: &'a BufferPool,
    /// This connection's.
    pub connection: Budget,
    /// This connection's own memory outside the server's, for small requests when the
    /// server's is taken (see [`RESERVED_PER_CONNECTION`]).
    pub reserve: Budget,
}

/// Serves requests (as `session` negotiated them, for the client called `peer` in the log)
/// until the client disconnects, the server stops, or the stream breaks.
/// Returns once every request that was read has been answered (or dropped, if the server
/// gave up on the connection).
pub(crate) fn transmission<R: Read, W: ReplySink>(
    reader: &mut ClientReader<R>,
    writer: W,
    device: &dyn BlockDevice,
    limits: &Limits,
    memory: &ServerMemory,
    control: &Control,
    (peer, session): (&str, Session),
) -> End {
    let replies = Replies {
        socket: Mutex::new(writer),
        broken: AtomicBool::new(false),
        control,
        peer: peer.to_string(),
        timeout: limits.reply_timeout,
        structured: session.structured,
    };
    let budgets = Budgets {
        server: &memory.budget,
        pool: &memory.pool,
        connection: Budget::new(limits.inflight_bytes.max(u64::from(limits.max_payload))),
        reserve: Budget::new(RESERVED_PER_CONNECTION),
    };
    let (tx, rx) = sync_channel::<Job<'_>>(QUEUE_DEPTH);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        let mut started = 0;
        for i in 0..limits.workers.max(1) {
            let (rx, replies) = (&rx, &replies);
            match std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(scope, move || worker(rx, device, replies, &memory.pool))
            {
                Ok(_) => started += 1,
                // Fewer workers only means less parallelism for this client.
                Err(e) => warn!("{peer}: cannot start worker thread {i}: {e}"),
            }
        }
        if started == 0 {
            return End::Dropped;
        }
        let end =
            read_requests(reader, device, limits, session, &replies, &budgets, |job| tx.send(job).is_ok());
        // Closing the queue lets the workers finish what was read, then leave.
        drop(tx);
        end
    })
}

fn worker<W: ReplySink>(
    rx: &Mutex<Receiver<Job<'_>>>,
    device: &dyn BlockDevice,
    replies: &Replies<'_, W>,
    pool: &BufferPool,
) {
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        // Nobody would hear the reply: dropping the job frees its budget at once.
        if !replies.gone() {
            run(job.handle, job.op, device, replies, pool);
        }
    }
}

fn run<W: ReplySink>(
    handle: u64,
    op: Op,
    device: &dyn BlockDevice,
    replies: &Replies<'_, W>,
    pool: &BufferPool,
) {
    let durable = |fua: bool| if fua { device.flush() } else { Ok(()) };
    let read_failed = matches!(op, Op::Read { .. });
    let result = match op {
        Op::Read { offset, len } => {
            let mut buf = pool.take(len as usize);
            let r = device.read_at(offset, &mut buf);
            if r.is_ok() {
                replies.data(handle, offset, &buf);
            }
            pool.give(buf);
            if r.is_ok() {
                return;
            }
            r
        }
        Op::BlockStatus { offset, len, one } => {
            let max = if one { 1 } else { MAX_EXTENTS };
            let req = Request { flags: 0, kind: cmd::BLOCK_STATUS, handle, offset, length: len };
            match device.block_status(offset, u64::from(len), max) {
                Ok(extents) if !extents.is_empty() => {
                    let n = extents.len().min(max);
                    let mut payload = Vec::with_capacity(4 + 8 * n);
                    payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                    for e in &extents[..n] {
                        // Never longer than the request, which fits in 32 bits.
                        let l = u32::try_from(e.len.min(u64::from(len))).unwrap_or(u32::MAX);
                        let flags =
                            if e.hole { state::HOLE } else { 0 } | if e.zero { state::ZERO } else { 0 };
                        payload.extend_from_slice(&l.to_be_bytes());
                        payload.extend_from_slice(&flags.to_be_bytes());
                    }
                    let h = proto::structured_header(
                        reply_flag::DONE,
                        reply_type::BLOCK_STATUS,
                        handle,
                        payload.len() as u32,
                    );
                    replies.send(&h, &payload);
                }
                Ok(_) => replies.fail(req, errno::EIO),
                Err(e) => {
                    debug!("{}: block status {handle:#x} failed: {e}", replies.peer);
                    replies.fail(req, proto::errno_of(&e));
                }
            }
            return;
        }
        Op::Write { offset, data, fua } => {
            let r = device.write_at(offset, &data);
            pool.give(data);
            r.and_then(|_| durable(fua))
        }
        Op::WriteZeroes { offset, len, fua, punch } => {
            let r = if punch { device.zero_or_punch(offset, len) } else { device.write_zeroes(offset, len) };
            r.and_then(|_| durable(fua))
        }
        Op::Trim { offset, len, fua } => device.trim(offset, len).and_then(|_| durable(fua)),
        Op::Flush => device.flush(),
    };
    match result {
        Ok(()) => replies.error(handle, 0),
        Err(e) => {
            debug!("{}: request {handle:#x} failed: {e}", replies.peer);
            // The command decides the reply's form: a failed read's is structured if negotiated.
            let kind = if read_failed { cmd::READ } else { cmd::WRITE };
            replies.fail(Request { flags: 0, kind, handle, offset: 0, length: 0 }, proto::errno_of(&e));
        }
    }
}

/// The bytes a request is charged: the memory the device holds to run it (payload buffer
/// included), at most what the budgets hold in all (a request as large as the budget still
/// runs, alone). Zeroing runs piece by piece: it holds the memory of one piece.
fn cost(device: &dyn BlockDevice, kind: u16, len: u64, budgets: &Budgets<'_>) -> u64 {
    let bytes = match kind {
        cmd::READ | cmd::WRITE => device.working_set(len),
        // Zeroing and trimming (which seals zeroes on an authenticated volume) run piece by piece.
        cmd::WRITE_ZEROES | cmd::TRIM => device.working_set(len.min(crate::volume::block::ZERO_PIECE)),
        cmd::BLOCK_STATUS => STATUS_COST,
        _ => 0,
    };
    bytes.min(budgets.connection.total()).min(budgets.server.total())
}

/// Charges `bytes` to the connection, then to the server; `None` if the connection ends
/// while waiting.
fn charge<'a, W: ReplySink>(
    budgets: &'a Budgets<'a>,
    bytes: u64,
    replies: &Replies<'_, W>,
) -> Option<Option<(Charge<'a>, Charge<'a>)>> {
    if bytes == 0 {
        return Some(None);
    }
    let give_up = || replies.gone();
    let own = budgets.connection.acquire(bytes, give_up)?;
    let shared = if bytes <= RESERVED_PER_CONNECTION {
        budgets.server.acquire_or(&budgets.reserve, bytes, give_up)?
    } else {
        budgets.server.acquire(bytes, give_up)?
    };
    Some(Some((own, shared)))
}

/// The reader loop: parse, check, hand over. `submit` returns false when no worker is left.
fn read_requests<'a, R: Read, W: ReplySink>(
    reader: &mut ClientReader<R>,
    device: &dyn BlockDevice,
    limits: &Limits,
    session: Session,
    replies: &Replies<'_, W>,
    budgets: &'a Budgets<'a>,
    submit: impl Fn(Job<'a>) -> bool,
) -> End {
    let size = device.size();
    let read_only = limits.flags & tflags::READ_ONLY != 0;
    let peer = &replies.peer;
    let fail = |what: &str, e: io::Error| {
        if !replies.broken.load(Ordering::Relaxed) {
            info!("{peer}: {what}: {e}; closing the connection");
        }
        End::Dropped
    };
    loop {
        if replies.gone() {
            return End::Dropped;
        }
        let mut header = [0u8; proto::REQUEST_LEN];
        match reader.next_message(&mut header) {
            Ok(Next::Message) => {}
            Ok(Next::Closed) => return End::Closed,
            Ok(Next::Stopping) => return End::Stopping,
            Err(e) => return fail("reading a request", e),
        }
        let Some(req) = Request::parse(&header) else {
            warn!("{peer}: request without the NBD request magic; closing the connection");
            return End::Dropped;
        };
        let len = u64::from(req.length);
        let in_bounds = req.offset.checked_add(len).is_some_and(|end| end <= size);
        let fua = req.flags & cmd_flag::FUA != 0;

        if req.kind == cmd::WRITE {
            // The payload follows whatever the verdict: it must leave the stream either way.
            if req.length > limits.max_payload {
                if len > DISCARD_LIMIT {
                    warn!(
                        "{peer}: write of {len} bytes is over the {} byte limit and too large to skip; \
                         closing the connection",
                        limits.max_payload
                    );
                    return End::Dropped;
                }
                if let Err(e) = reader.discard(len) {
                    return fail("skipping an oversized write", e);
                }
                debug!("{peer}: write of {len} bytes refused (limit {})", limits.max_payload);
                replies.fail(req, errno::EINVAL);
                continue;
            }
            if let Some(error) = refuse_change(req.flags, cmd_flag::FUA, read_only, in_bounds, errno::ENOSPC)
            {
                // Refused before any buffer is made for it.
                if let Err(e) = reader.discard(len) {
                    return fail("skipping a refused write", e);
                }
                replies.fail(req, error);
                continue;
            }
            let Some(charges) = charge(budgets, cost(device, req.kind, len, budgets), replies) else {
                return End::Dropped;
            };
            let mut data = budgets.pool.take(req.length as usize);
            if let Err(e) = reader.read_exact(&mut data) {
                return fail("reading a write payload", e);
            }
            if !submit(Job {
                handle: req.handle,
                op: Op::Write { offset: req.offset, data, fua },
                _charges: charges,
            }) {
                return End::Dropped;
            }
            continue;
        }

        let (op, bytes) = match req.kind {
            cmd::DISC => return End::Disconnect,
            cmd::READ => {
                let allowed = if session.structured { cmd_flag::FUA | cmd_flag::DF } else { cmd_flag::FUA };
                if req.flags & !allowed != 0 || req.length > limits.max_payload || !in_bounds {
                    replies.fail(req, errno::EINVAL);
                    continue;
                }
                (Op::Read { offset: req.offset, len: req.length }, cost(device, req.kind, len, budgets))
            }
            cmd::FLUSH => {
                if req.flags & !cmd_flag::FUA != 0 || req.offset != 0 || req.length != 0 {
                    replies.fail(req, errno::EINVAL);
                    continue;
                }
                (Op::Flush, 0)
            }
            cmd::TRIM => {
                if let Some(error) =
                    refuse_change(req.flags, cmd_flag::FUA, read_only, in_bounds, errno::EINVAL)
                {
                    replies.fail(req, error);
                    continue;
                }
                (Op::Trim { offset: req.offset, len, fua }, cost(device, req.kind, len, budgets))
            }
            cmd::WRITE_ZEROES => {
                let allowed = cmd_flag::FUA | cmd_flag::NO_HOLE;
                if let Some(error) = refuse_change(req.flags, allowed, read_only, in_bounds, errno::ENOSPC) {
                    replies.fail(req, error);
                    continue;
                }
                // Without NO_HOLE the device may punch a hole that reads as zeroes.
                let punch = req.flags & cmd_flag::NO_HOLE == 0;
                (
                    Op::WriteZeroes { offset: req.offset, len, fua, punch },
                    cost(device, req.kind, len, budgets),
                )
            }
            cmd::BLOCK_STATUS => {
                if !session.base_allocation
                    || req.flags & !cmd_flag::REQ_ONE != 0
                    || req.length == 0
                    || !in_bounds
                {
                    replies.fail(req, errno::EINVAL);
                    continue;
                }
                let one = req.flags & cmd_flag::REQ_ONE != 0;
                (
                    Op::BlockStatus { offset: req.offset, len: req.length, one },
                    cost(device, req.kind, len, budgets),
                )
            }
            other => {
                // Not advertised (cache, ...); none of them carries a payload
                // without extended headers, so the stream stays in step.
                debug!("{peer}: unsupported command {other}");
                replies.fail(req, errno::EINVAL);
                continue;
            }
        };
        let Some(charges) = charge(budgets, bytes, replies) else {
            return End::Dropped;
        };
        if !submit(Job { handle: req.handle, op, _charges: charges }) {
            return End::Dropped;
        }
    }
}

/// The error a command that changes the export gets, if any: flags it does not take, a
/// read-only export, or a range past the end (`past_end`: ENOSPC for writes, EINVAL for trim).
fn refuse_change(flags: u16, allowed: u16, read_only: bool, in_bounds: bool, past_end: u32) -> Option<u32> {
    if flags & !allowed != 0 {
        Some(errno::EINVAL)
    } else if read_only {
        Some(errno::EPERM)
    } else if !in_bounds {
        Some(past_end)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that holds a copy of every I/O's data, as an encrypted volume does.
    struct Copying;

    impl BlockDevice for Copying {
        fn size(&self) -> u64 {
            1 << 40
        }
        fn read_at(&self, _offset: u64, _buf: &mut [u8]) -> crate::Result<()> {
            Ok(())
        }
        fn write_at(&self, _offset: u64, _data: &[u8]) -> crate::Result<()> {
            Ok(())
        }
        fn flush(&self) -> crate::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _offset: u64, _len: u64) -> crate::Result<()> {
            Ok(())
        }
        fn trim(&self, _offset: u64, _len: u64) -> crate::Result<()> {
            Ok(())
        }
        fn block_size(&self) -> u32 {
            512
        }
        fn working_set(&self, len: u64) -> u64 {
            2 * len
        }
    }

    #[test]
    fn requests_are_charged_the_memory_the_device_holds_for_them() {
        let server = Budget::new(64 << 20);
        let pool = BufferPool::new(0);
        let budgets = Budgets {
            server: &server,
            pool: &pool,
            connection: Budget::new(16 << 20),
            reserve: Budget::new(0),
        };
        let dev = Copying;
        assert_eq!(cost(&dev, cmd::READ, 1 << 20, &budgets), 2 << 20);
        assert_eq!(cost(&dev, cmd::WRITE, 1 << 20, &budgets), 2 << 20);
        // Zeroing a gigabyte holds one piece's buffers, not nothing and not a gigabyte.
        assert_eq!(cost(&dev, cmd::WRITE_ZEROES, 1 << 30, &budgets), 2 * crate::volume::block::ZERO_PIECE);
        assert_eq!(cost(&dev, cmd::WRITE_ZEROES, 4096, &budgets), 8192);
        assert_eq!(cost(&dev, cmd::TRIM, 1 << 30, &budgets), 2 * crate::volume::block::ZERO_PIECE);
        assert_eq!(cost(&dev, cmd::FLUSH, 0, &budgets), 0);
        // Never more than the budget holds, or the request would wait for ever.
        assert_eq!(cost(&dev, cmd::WRITE, 32 << 20, &budgets), 16 << 20);
    }
}
