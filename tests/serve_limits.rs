//! `crypt-vfio serve` against clients that misbehave on purpose, as the real process: it stops
//! within 2 s of SIGTERM whatever state its clients are in, its memory is bounded for the
//! whole server and given back when clients leave, idle handshakes cannot lock new clients
//! out, and every numeric option is bounded with a clear error.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::start_server;

use crypt_vfio::nbd::proto::{self, be_u32, cmd, opt, rep, Request};

const IMAGE_SIZE: u64 = 64 << 20;
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// What the issue asks of a stop, in every state.
const STOP_LIMIT: Duration = Duration::from_secs(2);

struct Served {
    child: Child,
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(extra: &[&str]) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(IMAGE_SIZE).unwrap();
        let log = dir.path().join("server.log");
        let (child, uri) = start_server(
            Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
                .arg("serve")
                .arg("--raw")
                .arg(&image)
                .args(["--listen", "127.0.0.1:0"])
                .args(extra)
                .stderr(std::fs::File::create(&log).unwrap()),
            START_TIMEOUT,
        );
        let addr = uri
            .strip_prefix("nbd://")
            .and_then(|l| l.split('/').next())
            .unwrap_or_else(|| panic!("unexpected URI {uri:?}"))
            .to_string();
        Served { child, addr, log, _dir: dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// A client through `NBD_OPT_GO`, ready for requests.
    fn client(&self) -> TcpStream {
        let mut s = self.connect();
        go(&mut s).expect("the handshake completes");
        s
    }

    /// The server's resident memory in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kb << 10
    }

    /// Minor page faults of the whole server so far (every thread, live or ended).
    fn minor_faults(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces) start at field 3; minflt is 10.
        let after = &stat[stat.rfind(')').expect("comm in /proc/PID/stat") + 1..];
        after.split_whitespace().nth(7).and_then(|v| v.parse().ok()).expect("minflt in /proc/PID/stat")
    }

    /// Sends SIGTERM; returns the exit status and how long the exit took.
    fn terminate(&mut self) -> (ExitStatus, Duration) {
        let t = Instant::now();
        assert!(Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().unwrap().success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(120) {
                panic!("the server did not stop within 120 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fixed newstyle handshake and `NBD_OPT_GO` for the default export.
fn go(s: &mut TcpStream) -> std::io::Result<()> {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    s.write_all(&(proto::client::FIXED_NEWSTYLE | proto::client::NO_ZEROES).to_be_bytes())?;
    let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&opt::GO.to_be_bytes());
    o.extend_from_slice(&6u32.to_be_bytes());
    o.extend_from_slice(&[0; 6]);
    s.write_all(&o)?;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let mut data = vec![0u8; be_u32(&h[16..]) as usize];
        s.read_exact(&mut data)?;
        match be_u32(&h[12..]) {
            rep::ACK => return Ok(()),
            rep::INFO => {}
            other => return Err(std::io::Error::other(format!("option reply {other:#x}"))),
        }
    }
}

fn request(kind: u16, handle: u64, offset: u64, length: u32) -> [u8; proto::REQUEST_LEN] {
    Request { flags: 0, kind, handle, offset, length }.encode()
}

/// A client that sends 8 MiB reads as fast as it can and never reads a reply, until its
/// socket fails or `until` is set.
fn flood_reads(mut s: TcpStream, until: Arc<AtomicBool>) {
    s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut handle = 0u64;
    while !until.load(Ordering::SeqCst) {
        let offset = (handle * (8 << 20)) % IMAGE_SIZE;
        match s.write_all(&request(cmd::READ, handle, offset, 8 << 20)) {
            Ok(()) => handle += 1,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => return,
        }
    }
}

fn assert_prompt_stop(mut server: Served, state: &str) {
    let (status, took) = server.terminate();
    assert!(status.success(), "{state}: exit {status}\n{}", server.log());
    assert!(took < STOP_LIMIT, "{state}: the stop took {took:?} (limit {STOP_LIMIT:?})\n{}", server.log());
    eprintln!("{state}: stopped in {took:?}");
}

#[test]
fn sigterm_stops_the_server_within_two_seconds_in_every_state() {
    // Idle.
    assert_prompt_stop(Served::start(&[]), "idle");

    // Clients in the handshake: one silent, one half-way through an option header.
    let server = Served::start(&[]);
    let _silent = server.connect();
    let mut halfway = server.connect();
    let mut greeting = [0u8; 18];
    halfway.read_exact(&mut greeting).unwrap();
    halfway.write_all(&proto::client::FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    halfway.write_all(&proto::IHAVEOPT.to_be_bytes()[..5]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_prompt_stop(server, "clients in the handshake");

    // Mid-transfer: a client reading and writing 1 MiB requests back to back.
    let server = Served::start(&[]);
    let mut busy = server.client();
    let running = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&running);
    let transfer = std::thread::spawn(move || {
        let data = vec![0x5au8; 1 << 20];
        let mut back = vec![0u8; 1 << 20];
        for handle in 0u64.. {
            let offset = (handle % 32) << 20;
            let ok = busy
                .write_all(&request(cmd::WRITE, handle, offset, 1 << 20))
                .and_then(|_| busy.write_all(&data))
                .and_then(|_| busy.read_exact(&mut [0u8; 16]))
                .and_then(|_| busy.write_all(&request(cmd::READ, handle, offset, 1 << 20)))
                .and_then(|_| busy.read_exact(&mut [0u8; 16]))
                .and_then(|_| busy.read_exact(&mut back));
            if ok.is_err() {
                return;
            }
            r.store(true, Ordering::SeqCst);
        }
    });
    while !running.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_prompt_stop(server, "mid-transfer");
    transfer.join().unwrap();

    // Stuck clients: requests sent without reading replies, and a write stopped half-way
    // through its payload.
    let server = Served::start(&[]);
    let stop_flooding = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let (s, until) = (server.client(), Arc::clone(&stop_flooding));
            std::thread::spawn(move || flood_reads(s, until))
        })
        .collect();
    let mut stalled = server.client();
    stalled.write_all(&request(cmd::WRITE, 1, 0, 1 << 20)).unwrap();
    stalled.write_all(&vec![1u8; 300 << 10]).unwrap();
    // Long enough for the replies to fill every socket buffer.
    std::thread::sleep(Duration::from_secs(2));
    assert_prompt_stop(server, "stuck clients");
    stop_flooding.store(true, Ordering::SeqCst);
    flooders.into_iter().for_each(|f| f.join().unwrap());
}

#[test]
fn idle_handshakes_do_not_lock_new_clients_out() {
    // Twice the default connection limit of silent clients, all connected first.
    let server = Served::start(&[]);
    let idle: Vec<TcpStream> = (0..128).map(|_| server.connect()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let mut c = server.connect();
    go(&mut c).expect("a new client completes its handshake while 128 sockets sit idle");
    c.write_all(&request(cmd::READ, 7, 4096, 4096)).unwrap();
    let mut reply = [0u8; 16];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(be_u32(&reply[4..]), 0, "the read succeeds");
    assert!(t.elapsed() < Duration::from_secs(5), "served after {:?}", t.elapsed());
    drop(idle);
}

#[test]
fn memory_is_bounded_for_the_whole_server_and_given_back() {
    // The default budget is 256 MiB; 30 clients flooding 8 MiB reads could hold 960 MiB of
    // reply buffers if each connection were bounded on its own.
    let server = Served::start(&[]);
    let until = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..30)
        .map(|_| {
            let (s, u) = (server.client(), Arc::clone(&until));
            std::thread::spawn(move || flood_reads(s, u))
        })
        .collect();
    let mut peak = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(6) {
        peak = peak.max(server.rss());
        std::thread::sleep(Duration::from_millis(50));
    }
    until.store(true, Ordering::SeqCst);
    flooders.into_iter().for_each(|f| f.join().unwrap());
    eprintln!("peak RSS with 30 flooding clients: {} MiB", peak >> 20);
    assert!(peak < 400 << 20, "peak RSS {} MiB is over the 256 MiB budget plus overhead", peak >> 20);

    // The clients are gone: the memory must leave the process too.
    let t = Instant::now();
    let mut now = server.rss();
    while now >= 64 << 20 && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
        now = server.rss();
    }
    eprintln!("RSS after the clients left: {} MiB", now >> 20);
    assert!(now < 64 << 20, "the server kept {} MiB after every client left", now >> 20);
    // And it still serves.
    let mut c = server.client();
    c.write_all(&request(cmd::READ, 1, 0, 512)).unwrap();
    let mut reply = [0u8; 16 + 512];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(be_u32(&reply[4..]), 0);
}

#[test]
fn payload_buffers_are_reused_not_mapped_afresh_per_request() {
    const LEN: u32 = 256 << 10;
    const ROUNDS: u64 = 100;
    let server = Served::start(&[]);
    let mut c = server.client();
    let data = vec![0xa5u8; LEN as usize];
    let mut reply = vec![0u8; 16 + LEN as usize];
    let mut round = |handle: u64| {
        let offset = (handle % 64) * u64::from(LEN);
        c.write_all(&request(cmd::WRITE, 2 * handle, offset, LEN)).unwrap();
        c.write_all(&data).unwrap();
        c.read_exact(&mut reply[..16]).unwrap();
        assert_eq!(be_u32(&reply[4..]), 0, "write {handle}");
        c.write_all(&request(cmd::READ, 2 * handle + 1, offset, LEN)).unwrap();
        c.read_exact(&mut reply).unwrap();
        assert_eq!(be_u32(&reply[4..]), 0, "read {handle}");
        assert!(reply[16..] == data[..], "read {handle} returns what was written");
    };
    // The connection's threads start and the first buffers are made.
    (0..8).for_each(&mut round);
    let before = server.minor_faults();
    (8..8 + ROUNDS).for_each(&mut round);
    let faults = server.minor_faults() - before;
    // A fresh buffer per request is faulted in as it is filled: 64 faults of 4 KiB pages
    // for each of the 2 * ROUNDS payloads.
    let fresh = 2 * ROUNDS * u64::from(LEN) / 4096;
    eprintln!("{faults} page faults for {} payloads of {LEN} bytes", 2 * ROUNDS);
    assert!(faults < fresh / 4, "{faults} page faults: payload buffers are not reused (fresh: {fresh})");
}

#[test]
fn numeric_options_are_bounded_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    for (option, value, expect) in [
        ("--workers", "100000", "1..=64"),
        ("--workers", "0", "1..=64"),
        ("--max-connections", "0", "1..=1024"),
        ("--max-connections", "1000000", "1..=1024"),
        ("--max-memory", "1KiB", "32MiB"),
        ("--max-memory", "2TiB", "1TiB"),
        ("--max-memory", "99999999999999999999", "not a size"),
        ("--handshake-timeout", "0s", "100ms"),
        ("--handshake-timeout", "5000s", "longer than 1h"),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
            .arg("serve")
            .arg("--raw")
            .arg(&image)
            .args(["--listen", "127.0.0.1:0", option, value])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{option} {value}: accepted (still running after 30 s)");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(status.code(), Some(2), "{option} {value}: {status}\n{err}");
        assert!(err.contains(option) && err.contains(expect), "{option} {value}: {err}");
    }
}
