//! The NBD server at the protocol level, through a small client written here from the
//! protocol description: negotiation, every command, requests that must be refused, several
//! requests in flight, several clients, and the orderly stop. The export is a file-backed
//! device over a temporary image, so every write is checked on disk as well.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crypt_vfio::nbd::proto::{
    self, be_u16, be_u32, be_u64, cmd, cmd_flag, errno, info, opt, rep, tflags, Request,
};
use crypt_vfio::nbd::{Listener, ServeReport, Server, ServerConfig};
use crypt_vfio::volume::file::FileBlockDevice;

const SIZE: u64 = 1 << 20;
const MAX_PAYLOAD: u32 = 64 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

struct Fixture {
    server: Arc<Server>,
    thread: Option<JoinHandle<crypt_vfio::Result<ServeReport>>>,
    addr: Option<SocketAddr>,
    socket: Option<PathBuf>,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

impl Fixture {
    fn start(read_only: bool, unix: bool) -> Fixture {
        Fixture::start_with(read_only, unix, |_| {})
    }

    /// A fixture whose configuration `tweak` adjusts.
    fn start_with(read_only: bool, unix: bool, tweak: impl FnOnce(&mut ServerConfig)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, pattern(SIZE as usize, 1)).unwrap();
        let device = Arc::new(FileBlockDevice::open(&image, read_only).unwrap());
        let config = ServerConfig {
            export_name: "disk".into(),
            description: "test image".into(),
            max_payload: MAX_PAYLOAD,
            workers_per_connection: 3,
            inflight_bytes_per_connection: 4 * u64::from(MAX_PAYLOAD),
            max_memory: 16 * u64::from(MAX_PAYLOAD),
            max_connections: 8,
            handshake_timeout: Duration::from_secs(2),
            // Long enough for a loaded machine: the stop test expects every request answered.
            stop_grace: Duration::from_secs(20),
            reply_timeout: Duration::from_secs(30),
            tls: None,
        };
        let mut config = config;
        tweak(&mut config);
        let server = Arc::new(Server::new(device, config).unwrap());
        let (listener, socket) = if unix {
            let path = dir.path().join("nbd.sock");
            (Listener::unix(&path).unwrap(), Some(path))
        } else {
            (Listener::tcp("127.0.0.1:0").unwrap(), None)
        };
        let addr = listener.local_addr();
        let s = Arc::clone(&server);
        let thread = Some(std::thread::spawn(move || s.serve(listener)));
        Fixture { server, thread, addr, socket, image, _dir: dir }
    }

    fn connect(&self) -> Client {
        let s: Box<dyn Stream> = match (&self.addr, &self.socket) {
            (Some(a), _) => {
                let s = TcpStream::connect(a).unwrap();
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                Box::new(s)
            }
            (None, Some(p)) => {
                let s = UnixStream::connect(p).unwrap();
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                Box::new(s)
            }
            _ => unreachable!(),
        };
        Client { s }
    }

    /// A client in transmission on the export.
    fn transmission(&self) -> Client {
        let mut c = self.connect();
        c.handshake(proto::client::FIXED_NEWSTYLE | proto::client::NO_ZEROES);
        c.go("disk", &[info::BLOCK_SIZE]).expect("NBD_OPT_GO succeeds");
        c
    }

    fn stop(&mut self) -> ServeReport {
        self.server.stop();
        let t = self.thread.take().expect("stopped once");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "the server did not stop within 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap().unwrap()
    }

    fn on_disk(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // A failed test must not leave the server thread running into the next one.
        self.server.stop();
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

struct Client {
    s: Box<dyn Stream>,
}

#[derive(Debug)]
struct Go {
    size: u64,
    flags: u16,
    name: Option<String>,
    block: Option<(u32, u32, u32)>,
}

impl Client {
    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// True when the server closed the connection (EOF or reset) within the timeout.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
        }
    }

    fn handshake(&mut self, client_flags: u32) -> u16 {
        let h = self.read_n(18);
        assert_eq!(&h[0..8], b"NBDMAGIC");
        assert_eq!(&h[8..16], b"IHAVEOPT");
        let flags = be_u16(&h[16..]);
        self.s.write_all(&client_flags.to_be_bytes()).unwrap();
        flags
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(be_u64(&h), proto::OPTION_REPLY_MAGIC);
        assert_eq!(be_u32(&h[8..]), option, "reply to the option that was sent");
        let kind = be_u32(&h[12..]);
        let data = self.read_n(be_u32(&h[16..]) as usize);
        (kind, data)
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        infos.iter().for_each(|i| d.extend_from_slice(&i.to_be_bytes()));
        d
    }

    /// Sends `NBD_OPT_GO` (or `INFO`) and collects the replies; `Err(reply type)` on error.
    fn info_or_go(&mut self, option: u32, name: &str, infos: &[u16]) -> Result<Go, u32> {
        self.option(option, &Self::info_data(name, infos));
        let mut go = Go { size: 0, flags: 0, name: None, block: None };
        let mut saw_export = false;
        loop {
            let (kind, d) = self.option_reply(option);
            match kind {
                rep::INFO => match be_u16(&d) {
                    info::EXPORT => {
                        assert_eq!(d.len(), 12);
                        go.size = be_u64(&d[2..]);
                        go.flags = be_u16(&d[10..]);
                        saw_export = true;
                    }
                    info::NAME => go.name = Some(String::from_utf8(d[2..].to_vec()).unwrap()),
                    info::BLOCK_SIZE => {
                        assert_eq!(d.len(), 14);
                        go.block = Some((be_u32(&d[2..]), be_u32(&d[6..]), be_u32(&d[10..])));
                    }
                    _ => {}
                },
                rep::ACK => {
                    assert!(saw_export, "NBD_INFO_EXPORT precedes the ACK");
                    return Ok(go);
                }
                k => {
                    assert_ne!(k & rep::ERR, 0, "unexpected reply type {k:#x}");
                    return Err(k);
                }
            }
        }
    }

    fn go(&mut self, name: &str, infos: &[u16]) -> Result<Go, u32> {
        self.info_or_go(opt::GO, name, infos)
    }

    fn send(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, length: u32, payload: &[u8]) {
        let mut b = Request { flags, kind, handle, offset, length }.encode().to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one simple reply: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        let h = self.read_n(proto::SIMPLE_REPLY_LEN);
        assert_eq!(be_u32(&h), proto::SIMPLE_REPLY_MAGIC);
        (be_u32(&h[4..]), be_u64(&h[8..]))
    }

    /// Sends one command and returns its reply's error.
    fn call(&mut self, kind: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> u32 {
        self.send(kind, flags, 0xabcd, offset, length, payload);
        let (error, handle) = self.reply();
        assert_eq!(handle, 0xabcd);
        error
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        match self.call(cmd::READ, 0, offset, len, &[]) {
            0 => Ok(self.read_n(len as usize)),
            e => Err(e),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.call(cmd::WRITE, flags, offset, data.len() as u32, data)
    }

    fn disconnect(mut self) {
        self.send(cmd::DISC, 0, 0, 0, 0, &[]);
        assert!(self.closed(), "the server closes after NBD_CMD_DISC");
    }
}

#[test]
fn go_reports_size_flags_name_and_block_sizes() {
    let mut f = Fixture::start(false, false);
    let mut c = f.connect();
    let hs = c.handshake(proto::client::FIXED_NEWSTYLE | proto::client::NO_ZEROES);
    assert_eq!(hs, proto::handshake::FIXED_NEWSTYLE | proto::handshake::NO_ZEROES);
    let go = c.go("disk", &[info::BLOCK_SIZE, info::NAME]).unwrap();
    assert_eq!(go.size, SIZE);
    let want = tflags::HAS_FLAGS
        | tflags::SEND_FLUSH
        | tflags::SEND_FUA
        | tflags::SEND_TRIM
        | tflags::SEND_WRITE_ZEROES
        | tflags::CAN_MULTI_CONN;
    assert_eq!(go.flags, want);
    assert_eq!(go.name.as_deref(), Some("disk"));
    // A client that asked promises alignment, so it gets the sector size as minimum.
    assert_eq!(go.block, Some((512, 4096, MAX_PAYLOAD)));
    assert_eq!(c.read(0, 512).unwrap(), pattern(512, 1));
    c.disconnect();
    assert_eq!(f.stop().connections, 1);
}

#[test]
fn options_are_answered_and_refusals_keep_the_handshake_going() {
    let mut f = Fixture::start(false, false);
    let mut c = f.connect();
    c.handshake(proto::client::FIXED_NEWSTYLE);

    c.option(opt::LIST, &[]);
    let (kind, d) = c.option_reply(opt::LIST);
    assert_eq!(kind, rep::SERVER);
    assert_eq!(be_u32(&d) as usize, 4);
    assert_eq!(&d[4..8], b"disk");
    assert_eq!(&d[8..], b"test image");
    assert_eq!(c.option_reply(opt::LIST).0, rep::ACK);

    c.option(opt::LIST, b"junk");
    assert_eq!(c.option_reply(opt::LIST).0, rep::ERR_INVALID);

    // NBD_OPT_INFO does not enter transmission; without a block size request the minimum is 1.
    let i = c.info_or_go(opt::INFO, "", &[]).unwrap();
    assert_eq!((i.size, i.block), (SIZE, Some((1, 4096, MAX_PAYLOAD))));

    // Without TLS credentials STARTTLS is not supported.
    for refused in [opt::STARTTLS, opt::EXTENDED_HEADERS, 4242] {
        c.option(refused, &[]);
        let (kind, msg) = c.option_reply(refused);
        assert_eq!(kind, rep::ERR_UNSUP, "option {refused}");
        assert!(!msg.is_empty(), "errors carry a message");
    }

    assert_eq!(c.go("nosuch", &[]).unwrap_err(), rep::ERR_UNKNOWN);
    // A name length pointing past the data.
    c.option(opt::GO, &[0, 0, 0, 200, b'd', 0, 0]);
    assert_eq!(c.option_reply(opt::GO).0, rep::ERR_INVALID);
    // An information count that disagrees with the data.
    c.option(opt::GO, &[0, 0, 0, 0, 0, 3, 0, 1]);
    assert_eq!(c.option_reply(opt::GO).0, rep::ERR_INVALID);

    // After all that, the default export is still there.
    let go = c.go("", &[]).unwrap();
    assert_eq!(go.size, SIZE);
    assert_eq!(c.read(SIZE - 4096, 4096).unwrap(), pattern(SIZE as usize, 1)[(SIZE - 4096) as usize..]);
    c.disconnect();
    f.stop();
}

#[test]
fn export_name_enters_transmission_for_old_and_new_clients() {
    let mut f = Fixture::start(false, false);
    for (client_flags, zeroes) in [
        (proto::client::FIXED_NEWSTYLE | proto::client::NO_ZEROES, 0),
        (proto::client::FIXED_NEWSTYLE, 124),
        // A plain newstyle client: EXPORT_NAME is the only option it can send.
        (0, 124),
    ] {
        let mut c = f.connect();
        c.handshake(client_flags);
        c.option(opt::EXPORT_NAME, b"disk");
        let r = c.read_n(10 + zeroes);
        assert_eq!(be_u64(&r), SIZE);
        assert_ne!(be_u16(&r[8..]) & tflags::HAS_FLAGS, 0);
        assert!(r[10..].iter().all(|&b| b == 0));
        assert_eq!(c.write(0, b"hello", 0), 0);
        assert_eq!(c.read(0, 5).unwrap(), b"hello");
        c.disconnect();
    }
    // An unknown export cannot be refused with an error reply: the server closes.
    let mut c = f.connect();
    c.handshake(proto::client::FIXED_NEWSTYLE);
    c.option(opt::EXPORT_NAME, b"other");
    assert!(c.closed());
    f.stop();
}

#[test]
fn abort_is_acknowledged_and_bad_client_flags_close() {
    let mut f = Fixture::start(false, false);
    let mut c = f.connect();
    c.handshake(proto::client::FIXED_NEWSTYLE);
    c.option(opt::ABORT, &[]);
    assert_eq!(c.option_reply(opt::ABORT).0, rep::ACK);
    assert!(c.closed());

    let mut c = f.connect();
    c.handshake(0x80);
    assert!(c.closed(), "unknown client flags end the connection");

    let mut c = f.connect();
    c.handshake(proto::client::FIXED_NEWSTYLE);
    c.s.write_all(&[0u8; 16]).unwrap();
    assert!(c.closed(), "an option without IHAVEOPT ends the connection");

    let mut c = f.connect();
    c.handshake(proto::client::FIXED_NEWSTYLE);
    c.option(opt::LIST, &[]);
    // A plain newstyle client may only send EXPORT_NAME: same handling as any other breach.
    let mut c2 = f.connect();
    c2.handshake(0);
    c2.option(opt::LIST, &[]);
    assert!(c2.closed());
    assert_eq!(c.option_reply(opt::LIST).0, rep::SERVER);
    f.stop();
}

#[test]
fn commands_read_write_flush_trim_and_write_zeroes() {
    let mut f = Fixture::start(false, false);
    let mut c = f.transmission();
    let data = pattern(8192, 77);
    assert_eq!(c.write(4096, &data, 0), 0);
    assert_eq!(c.write(65536, &data[..4096], cmd_flag::FUA), 0);
    assert_eq!(c.read(4096, 8192).unwrap(), data);
    assert_eq!(c.call(cmd::FLUSH, 0, 0, 0, &[]), 0);
    assert_eq!(c.call(cmd::WRITE_ZEROES, 0, 8192, 4096, &[]), 0);
    assert_eq!(c.call(cmd::WRITE_ZEROES, cmd_flag::NO_HOLE | cmd_flag::FUA, 131072, 300_000, &[]), 0);
    assert_eq!(c.call(cmd::TRIM, 0, 524288, 4096, &[]), 0);
    assert_eq!(c.call(cmd::TRIM, cmd_flag::FUA, 528384, 4096, &[]), 0);
    // Zero-length transfers are legal and harmless.
    assert_eq!(c.read(0, 0).unwrap(), Vec::<u8>::new());
    assert_eq!(c.write(0, &[], 0), 0);
    // Unaligned access works: the device is byte-addressed.
    assert_eq!(c.write(1001, b"xyz", 0), 0);
    assert_eq!(c.read(1000, 5).unwrap(), [pattern(1001, 1)[1000], b'x', b'y', b'z', pattern(1005, 1)[1004]]);
    assert_eq!(c.call(cmd::FLUSH, cmd_flag::FUA, 0, 0, &[]), 0);
    c.disconnect();

    let disk = f.on_disk();
    assert_eq!(&disk[4096..8192], &data[..4096]);
    // Trimmed: holes (or the data, on a filesystem without them).
    let trimmed = &disk[524288..532480];
    assert!(trimmed.iter().all(|&b| b == 0) || trimmed == &pattern(SIZE as usize, 1)[524288..532480]);
    assert!(disk[8192..12288].iter().all(|&b| b == 0));
    assert_eq!(&disk[65536..69632], &data[..4096]);
    assert!(disk[131072..131072 + 300_000].iter().all(|&b| b == 0));
    assert_eq!(disk[131072 + 300_000], pattern(SIZE as usize, 1)[131072 + 300_000]);
    assert_eq!(&disk[1001..1004], b"xyz");
    f.stop();
}

#[test]
fn bad_requests_get_errors_and_the_connection_stays_usable() {
    let mut f = Fixture::start(false, false);
    let mut c = f.transmission();
    let before = f.on_disk();

    assert_eq!(c.read(SIZE - 10, 11), Err(errno::EINVAL), "read past the end");
    assert_eq!(c.read(u64::MAX - 1, 4), Err(errno::EINVAL), "offset + length overflows");
    assert_eq!(c.read(0, MAX_PAYLOAD + 1), Err(errno::EINVAL), "read over the maximum payload");
    assert_eq!(c.write(SIZE - 2, b"abc", 0), errno::ENOSPC, "write past the end");
    assert_eq!(c.write(u64::MAX, b"a", 0), errno::ENOSPC);
    assert_eq!(c.call(cmd::WRITE_ZEROES, 0, SIZE, 1, &[]), errno::ENOSPC);
    assert_eq!(c.call(cmd::TRIM, 0, SIZE - 1, 2, &[]), errno::EINVAL);
    assert_eq!(c.call(cmd::FLUSH, 0, 0, 512, &[]), errno::EINVAL, "flush with a length");
    assert_eq!(c.call(cmd::READ, cmd_flag::DF, 0, 512, &[]), errno::EINVAL, "DF without structured replies");
    assert_eq!(c.call(cmd::WRITE, cmd_flag::NO_HOLE, 0, 3, b"bad"), errno::EINVAL, "NO_HOLE on a write");
    assert_eq!(
        c.call(cmd::WRITE_ZEROES, cmd_flag::FAST_ZERO, 0, 512, &[]),
        errno::EINVAL,
        "FAST_ZERO not offered"
    );
    assert_eq!(c.call(cmd::WRITE, 1 << 9, 0, 3, b"bad"), errno::EINVAL, "unknown flag");
    assert_eq!(c.call(cmd::BLOCK_STATUS, 0, 0, 512, &[]), errno::EINVAL, "block status without contexts");
    assert_eq!(c.call(cmd::CACHE, 0, 0, 512, &[]), errno::EINVAL);
    assert_eq!(c.call(77, 0, 0, 512, &[]), errno::EINVAL, "unknown command");

    // A write just over the limit: its payload is skipped and the stream stays in step.
    let big = vec![0x5au8; MAX_PAYLOAD as usize + 4096];
    assert_eq!(c.write(0, &big, 0), errno::EINVAL);
    assert_eq!(c.read(0, 16).unwrap(), before[..16]);
    assert_eq!(f.on_disk(), before, "no refused request changed the disk");
    c.disconnect();
    f.stop();
}

#[test]
fn a_broken_client_is_dropped_without_disturbing_another() {
    let mut f = Fixture::start(false, false);
    let mut good = f.transmission();
    assert_eq!(good.write(0, b"first", 0), 0);

    let mut bad_magic = f.transmission();
    bad_magic.s.write_all(&[0xffu8; proto::REQUEST_LEN]).unwrap();
    assert!(bad_magic.closed());

    // A write length no server should swallow.
    let mut huge = f.transmission();
    huge.send(cmd::WRITE, 0, 1, 0, u32::MAX, &[0u8; 4096]);
    assert!(huge.closed());

    // A client that leaves halfway through a payload.
    let mut half = f.transmission();
    half.send(cmd::WRITE, 0, 1, 0, 4096, &[1u8; 100]);
    drop(half);

    assert_eq!(good.write(5, b"second", 0), 0);
    assert_eq!(good.read(0, 11).unwrap(), b"firstsecond");
    good.disconnect();
    assert_eq!(f.stop().connections, 4);
}

#[test]
fn pipelined_requests_are_answered_with_their_handles() {
    let mut f = Fixture::start(false, false);
    let mut c = f.transmission();
    // Writes to distinct blocks, all sent before any reply is read.
    let n = 24u64;
    for i in 0..n {
        let data = pattern(4096, i as u8);
        c.send(cmd::WRITE, 0, 1000 + i, i * 4096, 4096, &data);
    }
    let mut seen: Vec<u64> = (0..n)
        .map(|_| c.reply())
        .map(|(e, h)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (1000..1000 + n).collect::<Vec<_>>());

    // Reads in flight together with a flush: each reply carries its own block.
    for i in 0..n {
        c.send(cmd::READ, 0, 2000 + i, i * 4096, 4096, &[]);
    }
    c.send(cmd::FLUSH, 0, 9999, 0, 0, &[]);
    let mut handles = Vec::new();
    for _ in 0..=n {
        let (e, h) = c.reply();
        assert_eq!(e, 0);
        if h != 9999 {
            let i = h - 2000;
            assert!(i < n, "unknown handle {h}");
            assert_eq!(c.read_n(4096), pattern(4096, i as u8), "data of request {i}");
        }
        handles.push(h);
    }
    handles.sort_unstable();
    handles.dedup();
    assert_eq!(handles.len() as u64, n + 1, "every handle answered exactly once");
    c.disconnect();
    f.stop();
}

#[test]
fn two_clients_at_once_see_each_others_writes() {
    let mut f = Fixture::start(false, false);
    let workers: Vec<_> = (0..2u8)
        .map(|k| {
            let mut c = f.transmission();
            std::thread::spawn(move || {
                for round in 0..20u64 {
                    let off = (u64::from(k) * 64 + round) * 4096;
                    let data = pattern(4096, k.wrapping_mul(50).wrapping_add(round as u8));
                    assert_eq!(c.write(off, &data, 0), 0);
                    assert_eq!(c.read(off, 4096).unwrap(), data);
                }
                assert_eq!(c.call(cmd::FLUSH, 0, 0, 0, &[]), 0);
                c
            })
        })
        .collect();
    let clients: Vec<Client> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    // Each client reads what the other wrote (the export is one device: multi-conn holds).
    let mut check = f.transmission();
    for k in 0..2u64 {
        let off = (k * 64 + 19) * 4096;
        assert_eq!(
            check.read(off, 4096).unwrap(),
            pattern(4096, (k as u8).wrapping_mul(50).wrapping_add(19))
        );
    }
    for c in clients {
        c.disconnect();
    }
    check.disconnect();
    f.stop();
}

#[test]
fn a_read_only_export_refuses_writes() {
    let mut f = Fixture::start(true, false);
    let mut c = f.connect();
    c.handshake(proto::client::FIXED_NEWSTYLE);
    let go = c.go("disk", &[]).unwrap();
    assert_ne!(go.flags & tflags::READ_ONLY, 0);
    assert_eq!(go.flags & (tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES), 0);
    assert_eq!(c.write(0, b"no", 0), errno::EPERM);
    assert_eq!(c.call(cmd::TRIM, 0, 0, 512, &[]), errno::EPERM);
    assert_eq!(c.call(cmd::WRITE_ZEROES, 0, 0, 512, &[]), errno::EPERM);
    assert_eq!(c.call(cmd::FLUSH, 0, 0, 0, &[]), 0);
    assert_eq!(c.read(0, 2).unwrap(), pattern(2, 1));
    c.disconnect();
    f.stop();
}

#[test]
fn stop_answers_requests_in_flight_then_closes_every_client() {
    let mut f = Fixture::start(false, false);
    let mut busy = f.transmission();
    let mut idle = f.transmission();
    let mut haggling = f.connect();
    haggling.handshake(proto::client::FIXED_NEWSTYLE);

    let data = pattern(MAX_PAYLOAD as usize, 9);
    for i in 0..4u64 {
        busy.send(cmd::WRITE, cmd_flag::FUA, i, i * u64::from(MAX_PAYLOAD), MAX_PAYLOAD, &data);
    }
    let report = f.stop();
    assert_eq!(report.connections, 3);
    let mut handles: Vec<u64> = (0..4)
        .map(|_| busy.reply())
        .map(|(e, h)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    handles.sort_unstable();
    assert_eq!(handles, [0, 1, 2, 3], "every write read before the stop is answered");
    assert!(busy.closed() && idle.closed() && haggling.closed());
    let disk = f.on_disk();
    assert_eq!(&disk[3 * MAX_PAYLOAD as usize..4 * MAX_PAYLOAD as usize], &data[..]);
}

#[test]
fn a_unix_socket_serves_the_same_protocol() {
    let mut f = Fixture::start(false, true);
    let sock = f.socket.clone().unwrap();
    assert!(sock.exists());
    // Whoever can connect reads the export: owner only, from the start (umask at bind).
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let mut c = f.transmission();
    assert_eq!(c.write(512, b"over unix", cmd_flag::FUA), 0);
    assert_eq!(c.read(512, 9).unwrap(), b"over unix");
    c.disconnect();
    f.stop();
    assert!(!sock.exists(), "the socket file is removed on stop");
}

#[test]
fn random_requests_each_get_one_reply_and_garbage_harms_no_one() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e6264);
    let mut f = Fixture::start(false, false);

    // Well-framed requests with random commands, flags, ranges and lengths (some over the
    // limit, some past the end): each gets exactly one reply and the stream stays in step.
    let mut c = f.transmission();
    let mut expected = std::collections::HashMap::new();
    for handle in 0..320u64 {
        let kind = match rng.random_range(0..10u16) {
            cmd::DISC => cmd::READ,
            k => k,
        };
        let flags = match rng.random_range(0..4) {
            0 => 0,
            1 => cmd_flag::FUA,
            2 => cmd_flag::NO_HOLE,
            _ => rng.random(),
        };
        let offset = if rng.random_bool(0.1) { rng.random() } else { rng.random_range(0..SIZE + 8192) };
        let length = rng.random_range(0..MAX_PAYLOAD + 8192);
        let payload = if kind == cmd::WRITE { vec![handle as u8; length as usize] } else { Vec::new() };
        c.send(kind, flags, handle, offset, length, &payload);
        expected.insert(handle, (kind, length));
        // Read the replies in batches so neither side's buffers fill up.
        if handle % 8 == 7 {
            for _ in 0..8 {
                let (error, h) = c.reply();
                let (kind, length) = expected.remove(&h).expect("a reply to a request that was sent");
                if kind == cmd::READ && error == 0 {
                    c.read_n(length as usize);
                }
            }
        }
    }
    assert!(expected.is_empty(), "one reply per request");

    // Unframed garbage, in the handshake and in transmission, from short-lived clients.
    let mut good = f.transmission();
    for round in 0..40 {
        let mut bad = f.connect();
        if round % 2 == 0 {
            bad.handshake(proto::client::FIXED_NEWSTYLE);
            bad.go("disk", &[]).unwrap();
        }
        let mut junk = vec![0u8; rng.random_range(1..2000)];
        rng.fill(&mut junk[..]);
        if round % 4 == 2 && junk.len() >= 4 {
            junk[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        }
        let _ = bad.s.write_all(&junk);
        drop(bad);
        let data = pattern(512, round as u8);
        assert_eq!(good.write(round * 512, &data, 0), 0);
        assert_eq!(good.read(round * 512, 512).unwrap(), data);
    }
    c.disconnect();
    good.disconnect();
    f.stop();
}

#[test]
fn a_client_that_never_chooses_an_export_is_dropped() {
    let mut f = Fixture::start(false, false);
    let mut idle = f.connect();
    idle.handshake(proto::client::FIXED_NEWSTYLE);
    let t = Instant::now();
    assert!(idle.closed(), "the handshake deadline closes the connection");
    assert!(t.elapsed() >= Duration::from_millis(1500), "not before the deadline: {:?}", t.elapsed());
    // Once in transmission, idling is fine.
    let mut c = f.transmission();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(c.read(0, 4).unwrap(), pattern(4, 1));
    c.disconnect();
    f.stop();
}

#[test]
fn connections_over_the_limit_are_refused_until_one_leaves() {
    let mut f = Fixture::start(false, false);
    // The fixture allows 8 at once.
    let mut clients: Vec<Client> = (0..8).map(|_| f.transmission()).collect();
    let mut extra = f.connect();
    assert!(extra.closed(), "the ninth connection is closed at once");
    clients.pop().unwrap().disconnect();
    // The server notices the departure on its next turn through the accept loop.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        let mut c = f.connect();
        let mut greeting = [0u8; 18];
        if c.s.read_exact(&mut greeting).is_ok() {
            c.s.write_all(&proto::client::FIXED_NEWSTYLE.to_be_bytes()).unwrap();
            break c;
        }
        assert!(Instant::now() < deadline, "a slot frees up once a client leaves");
        std::thread::sleep(Duration::from_millis(50));
    };
    again.go("disk", &[]).unwrap();
    assert_eq!(again.read(0, 4).unwrap(), pattern(4, 1));
    again.disconnect();
    for c in clients {
        c.disconnect();
    }
    f.stop();
}

#[test]
fn a_handshake_dribbled_a_byte_at_a_time_ends_at_its_deadline() {
    // The fixture's handshake deadline is 2 s; a byte every 250 ms would keep a per-byte
    // stall limit happy for ever.
    let mut f = Fixture::start(false, false);
    let mut c = f.connect();
    c.handshake(proto::client::FIXED_NEWSTYLE);
    let mut option = proto::IHAVEOPT.to_be_bytes().to_vec();
    option.extend_from_slice(&opt::INFO.to_be_bytes());
    option.extend_from_slice(&1000u32.to_be_bytes());
    option.resize(16 + 1000, 0);
    let t = Instant::now();
    for byte in option.chunks(1) {
        if c.s.write_all(byte).is_err() || t.elapsed() > Duration::from_secs(6) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(c.closed(), "the connection is closed once the handshake deadline passes");
    assert!(t.elapsed() < Duration::from_secs(8), "closed only after {:?}", t.elapsed());
    f.stop();
}

/// A client floods reads and never reads a reply: its replies fill the socket and the
/// server's workers block writing them. The stop must still come within its grace period.
fn stop_with_a_client_that_does_not_read(unix: bool) {
    let mut f = Fixture::start_with(false, unix, |c| c.stop_grace = Duration::from_millis(500));
    let mut c = f.transmission();
    for handle in 0..256u64 {
        c.send(cmd::READ, 0, handle, 0, MAX_PAYLOAD, &[]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    f.stop();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "the stop took {took:?} with a client not reading");
    // What was sent before the stop is whole replies, then the connection ends.
    let mut replies = 0;
    loop {
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
        if c.s.read_exact(&mut h).is_err() {
            break;
        }
        assert_eq!(be_u32(&h), proto::SIMPLE_REPLY_MAGIC);
        assert_eq!(be_u32(&h[4..]), 0);
        if c.s.read_exact(&mut vec![0u8; MAX_PAYLOAD as usize]).is_err() {
            break;
        }
        replies += 1;
    }
    assert!(replies < 256, "the server stopped before answering everything");
}

#[test]
fn stop_is_bounded_with_a_tcp_client_that_does_not_read() {
    stop_with_a_client_that_does_not_read(false);
}

#[test]
fn stop_is_bounded_with_a_unix_client_that_does_not_read() {
    stop_with_a_client_that_does_not_read(true);
}

#[test]
fn configurations_out_of_bounds_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    let device = Arc::new(FileBlockDevice::open(&image, false).unwrap());
    type Tweak = fn(&mut ServerConfig);
    let cases: [(Tweak, &str); 7] = [
        (|c| c.workers_per_connection = 100_000, "workers per connection"),
        (|c| c.workers_per_connection = 0, "workers per connection"),
        (|c| c.max_connections = 0, "connections"),
        (|c| c.max_connections = 1 << 40, "connections"),
        (|c| c.max_payload = 64 << 20, "maximum payload"),
        (|c| c.max_memory = 1 << 20, "memory budget"),
        (|c| c.handshake_timeout = Duration::ZERO, "handshake timeout"),
    ];
    for (tweak, what) in cases {
        let mut config = ServerConfig::default();
        tweak(&mut config);
        match Server::new(device.clone(), config) {
            Err(crypt_vfio::Error::Crypto(crypt_vfio::CryptoError::InvalidRequest(msg))) => {
                assert!(msg.contains(what), "{msg}")
            }
            Err(e) => panic!("{what}: unexpected error {e}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
}

/// A client that sends `reads` reads of `MAX_PAYLOAD` bytes and reads none of the replies:
/// once its socket buffers are full, the replies it has not taken hold server memory.
fn hog(f: &Fixture, reads: u64) -> Client {
    let mut c = f.transmission();
    for handle in 0..reads {
        c.send(cmd::READ, 0, handle, (handle * u64::from(MAX_PAYLOAD)) % SIZE, MAX_PAYLOAD, &[]);
    }
    c
}

#[test]
fn clients_that_hold_the_memory_budget_and_do_not_read_cannot_lock_a_new_client_out() {
    // Four connections' in-flight bytes fill the server's budget; the reply deadline is far
    // off, so only each connection's own reserve can serve the new client in time.
    let f = Fixture::start_with(false, false, |c| c.reply_timeout = Duration::from_secs(120));
    let _hogs: Vec<Client> = (0..5).map(|_| hog(&f, 512)).collect();
    // Let the hogs' replies fill their sockets and the budget.
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let mut c = f.transmission();
    // Client reads fail after IO_TIMEOUT (10 s): a new client locked out fails here.
    let data = c.read(0, MAX_PAYLOAD).expect("a read of the new client");
    assert_eq!(data, pattern(SIZE as usize, 1)[..MAX_PAYLOAD as usize]);
    assert!(t.elapsed() < IO_TIMEOUT, "the new client waited {:?}", t.elapsed());
}

#[test]
fn a_client_that_takes_its_replies_a_few_bytes_at_a_time_is_dropped_at_the_reply_deadline() {
    const READS: u64 = 512;
    let f = Fixture::start_with(false, false, |c| c.reply_timeout = Duration::from_secs(1));
    let mut c = hog(&f, READS);
    // Takes a few bytes now and then for 5 s: each write(2) of the server may make some
    // progress, but the reply under way is far from sent whole within its deadline.
    let mut taken = 0usize;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let mut b = [0u8; 64];
        match c.s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => taken += n,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Then takes everything: a dropped client gets what was in the socket buffers and the
    // end of the stream; a client still served gets every reply and then waits (IO_TIMEOUT).
    let mut rest = Vec::new();
    // (The server closing with requests unread makes a reset, which may come first.)
    let closed = match c.s.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    };
    taken += rest.len();
    let all = READS as usize * (proto::SIMPLE_REPLY_LEN + MAX_PAYLOAD as usize);
    assert!(closed, "the slow reader was still connected after {taken} of {all} bytes");
    assert!(taken < all, "the slow reader got every reply");
}

/// Option data for `NBD_OPT_{LIST,SET}_META_CONTEXT`.
fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// One structured reply chunk: (flags, type, handle, payload).
fn chunk(c: &mut Client) -> (u16, u16, u64, Vec<u8>) {
    let h = c.read_n(proto::STRUCTURED_REPLY_LEN);
    assert_eq!(be_u32(&h), proto::STRUCTURED_REPLY_MAGIC, "a structured reply chunk");
    let payload = c.read_n(be_u32(&h[16..]) as usize);
    (be_u16(&h[4..]), be_u16(&h[6..]), be_u64(&h[8..]), payload)
}

/// A client with structured replies and `base:allocation`, in transmission.
fn structured_client(f: &Fixture) -> (Client, u32) {
    let mut c = f.connect();
    c.handshake(proto::client::FIXED_NEWSTYLE | proto::client::NO_ZEROES);
    // Metadata contexts need structured replies first.
    c.option(opt::SET_META_CONTEXT, &meta_data("disk", &[proto::BASE_ALLOCATION]));
    assert_eq!(c.option_reply(opt::SET_META_CONTEXT).0, rep::ERR_INVALID);
    c.option(opt::STRUCTURED_REPLY, b"x");
    assert_eq!(c.option_reply(opt::STRUCTURED_REPLY).0, rep::ERR_INVALID);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply(opt::STRUCTURED_REPLY).0, rep::ACK);
    // LIST with no query lists every context.
    c.option(opt::LIST_META_CONTEXT, &meta_data("disk", &[]));
    let (kind, d) = c.option_reply(opt::LIST_META_CONTEXT);
    assert_eq!(kind, rep::META_CONTEXT);
    assert_eq!(&d[4..], proto::BASE_ALLOCATION.as_bytes());
    assert_eq!(c.option_reply(opt::LIST_META_CONTEXT).0, rep::ACK);
    c.option(opt::SET_META_CONTEXT, &meta_data("nosuch", &[proto::BASE_ALLOCATION]));
    assert_eq!(c.option_reply(opt::SET_META_CONTEXT).0, rep::ERR_UNKNOWN);
    // Hostile lengths: a query count no data could hold, a query length past the end, a
    // trailing byte, a name length past the end. Each is refused; the handshake goes on.
    let good = meta_data("disk", &[proto::BASE_ALLOCATION]);
    let mut trailing = good.clone();
    trailing.push(0);
    let mut long_query = good.clone();
    long_query[12..16].copy_from_slice(&1000u32.to_be_bytes());
    let mut many = good.clone();
    many[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    for bad in [trailing, long_query, many, vec![0, 0, 0, 9, b'd'], vec![0, 0]] {
        c.option(opt::SET_META_CONTEXT, &bad);
        assert_eq!(c.option_reply(opt::SET_META_CONTEXT).0, rep::ERR_INVALID, "{bad:?}");
    }
    c.option(opt::SET_META_CONTEXT, &good);
    let (kind, d) = c.option_reply(opt::SET_META_CONTEXT);
    assert_eq!(kind, rep::META_CONTEXT);
    let id = be_u32(&d);
    assert_eq!(&d[4..], proto::BASE_ALLOCATION.as_bytes());
    assert_eq!(c.option_reply(opt::SET_META_CONTEXT).0, rep::ACK);
    let go = c.go("disk", &[]).unwrap();
    assert_ne!(go.flags & tflags::SEND_DF, 0, "reads come in one chunk: DF is offered");
    (c, id)
}

/// Block status descriptors from a `BLOCK_STATUS` chunk: (length, flags).
fn extents(id: u32, payload: &[u8]) -> Vec<(u32, u32)> {
    assert_eq!(be_u32(payload), id, "the context id chosen in SET_META_CONTEXT");
    assert_eq!((payload.len() - 4) % 8, 0);
    payload[4..].chunks_exact(8).map(|d| (be_u32(d), be_u32(&d[4..]))).collect()
}

#[test]
fn structured_replies_and_block_status_frame_as_the_protocol_says() {
    use proto::{reply_flag, reply_type, state};
    let mut f = Fixture::start(false, false);
    let (mut c, id) = structured_client(&f);

    // A read: one OFFSET_DATA chunk, the last, with the offset before the data.
    c.send(cmd::READ, cmd_flag::DF, 7, 4096, 100, &[]);
    let (flags, kind, handle, p) = chunk(&mut c);
    assert_eq!((flags, kind, handle), (reply_flag::DONE, reply_type::OFFSET_DATA, 7));
    assert_eq!(be_u64(&p), 4096);
    assert_eq!(&p[8..], &pattern(SIZE as usize, 1)[4096..4196]);
    // A zero-length read has no data chunk.
    c.send(cmd::READ, 0, 8, 0, 0, &[]);
    assert_eq!(chunk(&mut c), (reply_flag::DONE, reply_type::NONE, 8, vec![]));
    // A read error is a structured error chunk.
    c.send(cmd::READ, 0, 9, SIZE, 1, &[]);
    let (flags, kind, handle, p) = chunk(&mut c);
    assert_eq!((flags, kind, handle), (reply_flag::DONE, reply_type::ERROR, 9));
    assert_eq!(be_u32(&p), errno::EINVAL);
    assert_eq!(be_u16(&p[4..]) as usize, p.len() - 6, "the message length covers the rest");
    // Other commands keep simple replies.
    assert_eq!(c.call(cmd::TRIM, 0, 16384, 32768, &[]), 0);

    c.send(cmd::BLOCK_STATUS, 0, 10, 0, SIZE as u32, &[]);
    let (flags, kind, handle, p) = chunk(&mut c);
    assert_eq!((flags, kind, handle), (reply_flag::DONE, reply_type::BLOCK_STATUS, 10));
    let e = extents(id, &p);
    assert!(e.iter().all(|&(len, _)| len > 0));
    assert!(e.iter().map(|&(len, _)| u64::from(len)).sum::<u64>() <= SIZE);
    if e.len() > 1 {
        // The filesystem has holes: the trimmed range is one.
        assert_eq!(e[..2], [(16384, 0), (32768, state::HOLE | state::ZERO)]);
    }
    // REQ_ONE: exactly one extent, here from the middle of the hole.
    c.send(cmd::BLOCK_STATUS, cmd_flag::REQ_ONE, 11, 20480, 65536, &[]);
    let (_, kind, _, p) = chunk(&mut c);
    assert_eq!(kind, reply_type::BLOCK_STATUS);
    let one = extents(id, &p);
    assert_eq!(one.len(), 1);
    assert!(one[0].0 <= 65536);
    // The hole reads as zeroes.
    c.send(cmd::READ, 0, 12, 16384, 32768, &[]);
    let (_, _, _, p) = chunk(&mut c);
    assert!(p[8..].iter().all(|&b| b == 0));
    // Bad block status requests: no length, past the end, an unknown flag.
    for (flags, offset, len) in [(0, 0, 0), (0, SIZE - 1, 2), (cmd_flag::FUA, 0, 512)] {
        c.send(cmd::BLOCK_STATUS, flags, 13, offset, len, &[]);
        let (_, kind, handle, p) = chunk(&mut c);
        assert_eq!((kind, handle, be_u32(&p)), (reply_type::ERROR, 13, errno::EINVAL));
    }
    c.disconnect();
    f.stop();
}

#[test]
fn block_status_without_a_metadata_context_is_refused() {
    let mut f = Fixture::start(false, false);
    let mut c = f.transmission();
    // No structured replies: a simple error reply, and the connection goes on.
    assert_eq!(c.call(cmd::BLOCK_STATUS, 0, 0, 4096, &[]), errno::EINVAL);
    assert_eq!(c.read(0, 4).unwrap(), pattern(4, 1));
    c.disconnect();
    f.stop();
}

/// The process umask, read without changing it (`umask(2)` can only swap).
fn current_umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).expect("Umask in /proc/self/status");
    u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
}

#[test]
fn unix_listeners_bound_at_once_are_0600_and_leave_the_umask_alone() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let before = current_umask();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let root = root.clone();
            std::thread::spawn(move || {
                (0..8)
                    .map(|i| {
                        let path = root.join(format!("s{t}-{i}.sock"));
                        (Listener::unix(&path).unwrap(), path)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let listeners: Vec<_> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(current_umask(), before, "binding Unix listeners changed the process umask");
    for (_, path) in &listeners {
        let m = std::fs::metadata(path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", path.display());
    }
    // An existing path is refused, and nothing is left behind but the sockets.
    assert!(Listener::unix(&listeners[0].1).is_err());
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 64);
}
