//! The engine pool against real emulated devices: the backlog contract for the pool as a whole
//! under load while members fail behind its back, failover with nothing lost, members
//! rejoining after their recovery, and the error when no member is left.
//!
//! Faults are the emulated device's own (`EmulatedTransport::inject`), so each member fails
//! exactly as a single device does in tests/faults.rs; the pool must hide every such failure
//! from its callers while another member can run the request.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crypt_vfio::engine::contract::{ContractChecker, ContractReport};
use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{
    AnyEngine, AnySession, Buf, Direction, Engine, Event, Iv, MemberState, PoolEngine, PoolOptions, Request,
    SubmitErrorKind, Submitted,
};
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedFault, EmulatedTransport};
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions};
use crypt_vfio::{CoreKind, DeviceError, Error, Mode};
use crypt_vfio_cores::new_cipher;

const KEY: [u8; 32] = [0x42; 32];
/// A bound for waits that should take milliseconds; never expected on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(60);

type Ev = Event<AnySession>;
type AnyQueue = Box<dyn crypt_vfio::engine::Queue<AnySession>>;
type Inbox = Arc<Mutex<Vec<Ev>>>;

struct Pool {
    engine: AnyEngine,
    transports: Vec<Arc<EmulatedTransport>>,
}

impl Pool {
    fn pool(&self) -> &PoolEngine {
        self.engine.pool().expect("a pool")
    }

    fn stats(&self, name: &str) -> crypt_vfio::engine::MemberStats {
        self.pool().member_stats().into_iter().find(|m| m.name == name).expect("member")
    }

    /// Waits until member `name` is in `state`.
    fn wait_state(&self, name: &str, state: MemberState) {
        let start = Instant::now();
        while self.stats(name).state != state {
            assert!(
                start.elapsed() < PATIENCE,
                "{name} never became {state}: {:?}",
                self.pool().member_stats()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A pool of `devices` emulated devices (one data queue of `queue_size` slots each), plus the
/// software engine when `software`.
fn pool(devices: usize, software: bool, options: DeviceOptions, pool_options: PoolOptions) -> Pool {
    let mut members = Vec::new();
    let mut transports = Vec::new();
    for k in 0..devices {
        let config = EmulatedConfig { data_queues: 1, seed: k as u64 + 1, ..Default::default() };
        let (dev, t) = common::device_with(config, &options);
        members.push((format!("emulated#{k}"), AnyEngine::Device(dev)));
        transports.push(t);
    }
    if software {
        members.push(("software".to_string(), AnyEngine::Software(SoftwareEngine::new(CoreKind::default()))));
    }
    let engine = AnyEngine::Pool(PoolEngine::new(members, pool_options).expect("pool"));
    Pool { engine, transports }
}

fn device_options(mode: CompletionMode, timeout: Duration, budget: usize) -> DeviceOptions {
    DeviceOptions {
        queue_size: 8,
        data_queues: 1,
        completion: mode,
        request_timeout: timeout,
        failure_budget: (budget, Duration::from_secs(60)),
        ..Default::default()
    }
}

fn plain(id: u64) -> Vec<u8> {
    let len = 16 + (id as usize * 37) % 2048;
    (0..len).map(|i| (id as usize * 7 + i) as u8).collect()
}

fn iv(id: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&id.to_le_bytes());
    iv
}

fn expected(id: u64) -> Vec<u8> {
    let mut d = plain(id);
    new_cipher(CoreKind::Reference, Mode::Ctr, &KEY).unwrap().encrypt(&iv(id), &[], &mut d, &mut []).unwrap();
    d
}

fn request(session: &AnySession, id: u64) -> Request<AnySession> {
    Request::new(session.clone(), Direction::Encrypt, Iv::from(iv(id)), Buf::Host(plain(id)), id)
}

/// What one submitting thread saw.
#[derive(Default, Debug)]
struct Seen {
    ok: u64,
    wrong: u64,
    errors: Vec<String>,
}

/// Submits `count` requests with ids from `first` on queue `index`, singly and in batches of
/// four (both with backlog), keeping at most 48 in flight, and checks every result.
fn drive(
    engine: &AnyEngine,
    session: &AnySession,
    checker: &Arc<ContractChecker>,
    index: usize,
    first: u64,
    count: u64,
) -> Seen {
    let inbox: Arc<Mutex<Vec<Ev>>> = Arc::default();
    let (c, i) = (checker.clone(), inbox.clone());
    let mut q = engine
        .open_queue(
            index,
            Arc::new(move |ev| {
                c.event(&ev);
                i.lock().unwrap().push(ev);
            }),
        )
        .unwrap();
    let mut seen = Seen::default();
    let mut next = first;
    let end = first + count;
    let mut in_flight = 0u64;
    let start = Instant::now();
    while next < end || in_flight > 0 {
        assert!(start.elapsed() < PATIENCE * 2, "queue {index}: {in_flight} requests never completed");
        while next < end && in_flight < 48 {
            if next % 3 == 0 && next + 4 <= end {
                let ids: Vec<u64> = (next..next + 4).collect();
                let mut batch: VecDeque<_> = ids.iter().map(|&id| request(session, id)).collect();
                checker.begin_batch(index, &ids);
                let r = q.submit_batch(&mut batch, true);
                checker.submitted_batch(&ids, &r);
                in_flight += r.accepted() as u64;
                next += r.accepted() as u64;
                match r.refused {
                    None if r.accepted() == 4 => {}
                    None | Some(SubmitErrorKind::Busy) => break,
                    Some(SubmitErrorKind::Rejected(e)) => panic!("batch refused: {e}"),
                }
            } else {
                checker.begin_submit(index, next);
                let r = q.submit(request(session, next), true);
                checker.submitted(next, &r);
                match r {
                    Ok(Submitted::InProgress | Submitted::Backlogged) => {
                        in_flight += 1;
                        next += 1;
                    }
                    Err(e) => match e.kind {
                        SubmitErrorKind::Busy => break,
                        SubmitErrorKind::Rejected(e) => panic!("request {next} refused: {e}"),
                    },
                }
            }
        }
        q.poll();
        let events: Vec<_> = std::mem::take(&mut *inbox.lock().unwrap());
        if events.is_empty() {
            std::thread::yield_now();
        }
        for ev in events {
            let Event::Completed(c) = ev else { continue };
            in_flight -= 1;
            let id = c.request.user_data;
            match c.result {
                Ok(()) if *c.request.data.as_slice() == *expected(id) => seen.ok += 1,
                Ok(()) => seen.wrong += 1,
                Err(e) => seen.errors.push(format!("request {id}: {e}")),
            }
        }
    }
    seen
}

fn clean(r: &ContractReport) {
    assert!(r.violations.is_empty(), "contract violations: {:#?}", r.violations);
    assert_eq!(r.pending, 0, "{r:?}");
    assert_eq!(r.completed, r.in_progress + r.backlogged, "every accepted request completes once: {r:?}");
}

/// Four threads through the contract checker while a fault thread breaks one member after the
/// other (a lying completion, a completion without status, a device that stops answering):
/// every request completes once, correctly, and none fails.
fn contract_under_load_with_faults(mode: CompletionMode, per_thread: u64) {
    let p = pool(
        2,
        true,
        device_options(mode, Duration::from_millis(50), 10_000),
        PoolOptions { member_wait: PATIENCE, ..Default::default() },
    );
    let session = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    let checker = Arc::new(ContractChecker::new());
    let done = Arc::new(AtomicBool::new(false));
    let injected = Arc::new(AtomicU64::new(0));
    let seen = std::thread::scope(|s| {
        let faults = {
            let (done, injected, transports) = (done.clone(), injected.clone(), p.transports.clone());
            s.spawn(move || {
                let mut k = 0usize;
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(40));
                    let t = &transports[k % 2];
                    match k % 3 {
                        0 => t.inject(EmulatedFault::DuplicateUsed),
                        1 => t.inject(EmulatedFault::StatusUnwritten),
                        _ => {
                            t.inject(EmulatedFault::NeverAnswer);
                            std::thread::sleep(Duration::from_millis(120));
                            t.clear_faults();
                        }
                    }
                    injected.fetch_add(1, Ordering::Relaxed);
                    k += 1;
                }
                for t in &transports {
                    t.clear_faults();
                }
            })
        };
        // Two threads on each pool queue: they share its backlog, whose order the checker checks.
        let queues = p.engine.queue_count();
        assert_eq!(queues, 2);
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let (engine, session, checker) = (&p.engine, &session, &checker);
                let index = t as usize % queues;
                s.spawn(move || drive(engine, session, checker, index, 1 + t * per_thread, per_thread))
            })
            .collect();
        let seen: Vec<Seen> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        done.store(true, Ordering::Relaxed);
        faults.join().unwrap();
        seen
    });
    let report = checker.report();
    clean(&report);
    let stats = p.pool().member_stats();
    eprintln!("{} faults injected; {report:?}; {stats:#?}", injected.load(Ordering::Relaxed));
    for (t, s) in seen.iter().enumerate() {
        assert!(s.errors.is_empty(), "thread {t}: requests failed: {:?}", &s.errors[..s.errors.len().min(5)]);
        assert_eq!(s.wrong, 0, "thread {t}: wrong results");
        assert_eq!(s.ok, per_thread, "thread {t}");
    }
    assert!(injected.load(Ordering::Relaxed) > 0, "no fault was injected");
    let reruns: u64 = stats.iter().map(|m| m.reruns_out).sum();
    assert!(reruns > 0, "no request ran again: {stats:?}");
    for m in &stats {
        assert_eq!(m.violations, 0, "{} refused a request it had room for: {stats:?}", m.name);
    }
    for m in &stats[..2] {
        assert!(m.requests > 0, "{} took no requests: {stats:?}", m.name);
        assert!(m.recoveries > 0, "{} never failed and recovered: {stats:?}", m.name);
    }
}

#[test]
fn contract_holds_for_the_pool_under_load_and_faults_polling() {
    contract_under_load_with_faults(CompletionMode::Poll, 10_000);
}

#[test]
fn contract_holds_for_the_pool_under_load_and_faults_interrupts() {
    contract_under_load_with_faults(CompletionMode::Interrupt, 5_000);
}

/// Without faults the software member stands by: the devices share the work.
#[test]
fn devices_share_the_work_and_software_stands_by() {
    let p = pool(
        2,
        true,
        device_options(CompletionMode::Adaptive, Duration::from_secs(10), 3),
        PoolOptions::default(),
    );
    let session = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    let checker = Arc::new(ContractChecker::new());
    let seen = drive(&p.engine, &session, &checker, 0, 1, 2000);
    clean(&checker.report());
    assert_eq!((seen.ok, seen.wrong, seen.errors.len()), (2000, 0, 0));
    let stats = p.pool().member_stats();
    assert!(stats[0].requests > 0 && stats[1].requests > 0, "one queue keeps both devices busy: {stats:?}");
    assert_eq!(stats[2].requests, 0, "the software member ran requests while devices were up: {stats:?}");
    let shares: f64 = stats.iter().map(|m| m.share).sum();
    assert!((shares - 1.0).abs() < 1e-9, "{stats:?}");
}

/// A member that failed comes back after its recovery and takes requests again; meanwhile the
/// other member ran everything.
#[test]
fn a_recovered_member_rejoins() {
    let p = pool(
        2,
        false,
        device_options(CompletionMode::Poll, Duration::from_millis(100), 3),
        PoolOptions::default(),
    );
    let session = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    let checker = Arc::new(ContractChecker::new());
    p.transports[0].inject(EmulatedFault::DuplicateUsed);
    let seen = drive(&p.engine, &session, &checker, 0, 1, 300);
    assert_eq!((seen.ok, seen.errors.len()), (300, 0), "{:?}", seen.errors);
    p.wait_state("emulated#0", MemberState::Up);
    let before = p.stats("emulated#0");
    assert!(before.recoveries >= 1, "{before:?}");
    // A session made after the rejoin, and the old one, both run on it again.
    let later = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    let seen = drive(&p.engine, &session, &checker, 0, 1000, 300);
    let again = drive(&p.engine, &later, &checker, 0, 2000, 300);
    assert_eq!((seen.ok + again.ok, seen.errors.len() + again.errors.len()), (600, 0));
    clean(&checker.report());
    let after = p.stats("emulated#0");
    assert!(after.requests > before.requests, "the rejoined member took nothing: {after:?}");
}

/// Both devices hang and are given up at their first failure: every request fails with
/// NoMemberLeft naming both (backlogged ones Promoted first, which the checker judges), and a
/// later submit is refused with it.
#[test]
fn no_member_left_names_each_member() {
    let p = pool(
        2,
        false,
        device_options(CompletionMode::Poll, Duration::from_millis(50), 1),
        PoolOptions { member_wait: Duration::from_secs(30), ..Default::default() },
    );
    let session = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    for t in &p.transports {
        t.inject(EmulatedFault::NeverAnswer);
    }
    let checker = Arc::new(ContractChecker::new());
    let inbox: Arc<Mutex<Vec<Ev>>> = Arc::default();
    let (c, i) = (checker.clone(), inbox.clone());
    let mut q = p
        .engine
        .open_queue(
            0,
            Arc::new(move |ev| {
                c.event(&ev);
                i.lock().unwrap().push(ev);
            }),
        )
        .unwrap();
    // 16 slots in all: the rest waits in the pool's backlog.
    let mut outcomes = HashMap::new();
    for id in 1..=40u64 {
        checker.begin_submit(0, id);
        let r = q.submit(request(&session, id), true);
        checker.submitted(id, &r);
        outcomes.insert(id, r.map_err(|e| e.kind.to_string()).unwrap());
    }
    assert!(outcomes.values().any(|s| *s == Submitted::Backlogged), "nothing was backlogged");
    let start = Instant::now();
    let mut errors = Vec::new();
    while errors.len() < 40 {
        assert!(start.elapsed() < PATIENCE, "only {} of 40 requests completed", errors.len());
        q.poll();
        for ev in std::mem::take(&mut *inbox.lock().unwrap()) {
            if let Event::Completed(c) = ev {
                errors.push(c.result.expect_err("a request ran with every member hung"));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    clean(&checker.report());
    for e in &errors {
        match e {
            Error::Device(DeviceError::NoMemberLeft(fates)) => {
                let names: Vec<&str> = fates.iter().map(|f| f.member.as_str()).collect();
                assert_eq!(names, ["emulated#0", "emulated#1"]);
                let text = e.to_string();
                assert!(text.contains("emulated#0:") && text.contains("emulated#1:"), "{text}");
                assert!(text.contains("giving up"), "{text}");
            }
            other => panic!("expected NoMemberLeft, got {other}"),
        }
    }
    p.wait_state("emulated#1", MemberState::Lost);
    match q.submit(request(&session, 99), true) {
        Err(e) => assert!(
            matches!(e.kind, SubmitErrorKind::Rejected(Error::Device(DeviceError::NoMemberLeft(_)))),
            "{}",
            e.kind
        ),
        Ok(s) => panic!("a pool with no member accepted a request ({s:?})"),
    }
}

/// While every member is down, requests wait; they run once one is back (here within the
/// member wait), and nothing fails.
#[test]
fn requests_wait_for_a_member_to_come_back() {
    // The request timeout is half the 200 ms both devices hang: each fails at most twice under a
    // request (once while it hangs, once for a request placed just before it stops hanging), so
    // no request meets the pool's cap of 2 failures per device + 1; with a timeout of 50 ms a
    // loaded machine let one device fail under the same request three times.
    let p = pool(
        2,
        false,
        device_options(CompletionMode::Poll, Duration::from_millis(100), 10),
        PoolOptions { member_wait: PATIENCE, ..Default::default() },
    );
    let session = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    for t in &p.transports {
        t.inject(EmulatedFault::NeverAnswer);
    }
    let clear = {
        let transports = p.transports.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            for t in &transports {
                t.clear_faults();
            }
        })
    };
    let checker = Arc::new(ContractChecker::new());
    let seen = drive(&p.engine, &session, &checker, 0, 1, 200);
    clear.join().unwrap();
    clean(&checker.report());
    assert_eq!((seen.ok, seen.wrong, seen.errors.len()), (200, 0, 0), "{:?}", seen.errors);
}

#[test]
fn pools_do_not_nest_and_take_one_software_member() {
    let sw = || AnyEngine::Software(SoftwareEngine::new(CoreKind::default()));
    let e =
        PoolEngine::new(vec![("software".into(), sw()), ("software".into(), sw())], PoolOptions::default())
            .unwrap_err();
    assert!(e.to_string().contains("at most one"), "{e}");
    let inner = PoolEngine::new(vec![("software".into(), sw())], PoolOptions::default()).unwrap();
    let e =
        PoolEngine::new(vec![("pool".into(), AnyEngine::Pool(inner))], PoolOptions::default()).unwrap_err();
    assert!(e.to_string().contains("cannot be a member"), "{e}");
}

/// Both devices hang and are given up: the software member, standing by until then, carries
/// every request, and nothing fails.
#[test]
fn software_carries_the_work_when_no_device_is_left() {
    let p = pool(
        2,
        true,
        device_options(CompletionMode::Interrupt, Duration::from_millis(50), 1),
        PoolOptions::default(),
    );
    let session = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    for t in &p.transports {
        t.inject(EmulatedFault::NeverAnswer);
    }
    let checker = Arc::new(ContractChecker::new());
    let seen = drive(&p.engine, &session, &checker, 0, 1, 500);
    clean(&checker.report());
    assert_eq!((seen.ok, seen.wrong, seen.errors.len()), (500, 0, 0), "{:?}", seen.errors);
    p.wait_state("emulated#0", MemberState::Lost);
    p.wait_state("emulated#1", MemberState::Lost);
    let sw = p.stats("software");
    assert!(sw.requests > 0 && sw.reruns_in > 0, "{sw:?}");
}

/// A zero-copy request (a buffer from the pool, in one member's DMA memory) whose member hangs:
/// the device may have written the buffer, so it is not run again behind the caller's back; it
/// fails with MemberFailed naming the member.
#[test]
fn a_zero_copy_request_on_a_failed_member_fails_with_member_failed() {
    let p = pool(
        2,
        false,
        device_options(CompletionMode::Poll, Duration::from_millis(50), 10),
        PoolOptions::default(),
    );
    let session = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    let mut data = p.engine.alloc_buffer(4096).unwrap();
    assert!(matches!(data, Buf::Dma(_)), "a pool of devices hands out DMA memory");
    data.copy_from_slice(&plain(7)[..16]);
    for t in &p.transports {
        t.inject(EmulatedFault::NeverAnswer);
    }
    let mut q = common::SyncQueue::open(&p.engine, 0);
    let c = q.run(Request::new(session, Direction::Encrypt, Iv::from(iv(7)), data, 7));
    match c.result {
        Err(Error::Device(DeviceError::MemberFailed { member, source })) => {
            assert!(member.starts_with("emulated#"), "{member}");
            assert!(matches!(*source, Error::Device(DeviceError::Failed(_))), "{source}");
        }
        other => panic!("expected MemberFailed, got {other:?}"),
    }
}

/// A volume over the pool (zero-copy sector buffers) while its members hang in turn: sectors
/// whose member failed under them run again from the volume's own data, and what is written
/// and read back is exactly what the software engine makes of it.
#[test]
fn a_volume_over_the_pool_stays_bit_exact_while_members_fail() {
    use crypt_vfio::volume::{Volume, VolumeParams};
    let p = pool(
        2,
        false,
        device_options(CompletionMode::Adaptive, Duration::from_millis(100), 10_000),
        PoolOptions { member_wait: PATIENCE, ..Default::default() },
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    let len = 4u64 << 20;
    let open = |path: &std::path::Path| {
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap()
    };
    open(&path).set_len(len).unwrap();
    let params = VolumeParams::plain("aes-xts-plain64".parse().unwrap());
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(29) ^ 0x5a).collect();
    let engine = Arc::new(p.engine);
    let volume = Volume::open(engine.clone(), open(&path), true, &key, params).unwrap();
    let data: Vec<u8> = (0..len as usize).map(|i| (i * 31 + i / 4096) as u8).collect();
    let done = Arc::new(AtomicBool::new(false));
    let hangs = Arc::new(AtomicU64::new(0));
    let faults = {
        let (done, hangs, transports) = (done.clone(), hangs.clone(), p.transports.clone());
        std::thread::spawn(move || {
            let mut k = 0;
            while !done.load(Ordering::Relaxed) {
                let t = &transports[k % 2];
                // Shorter than the request timeout: the watchdog resets a device that works again,
                // as when a device hangs for a moment.
                t.inject(EmulatedFault::NeverAnswer);
                std::thread::sleep(Duration::from_millis(40));
                t.clear_faults();
                hangs.fetch_add(1, Ordering::Relaxed);
                // Far enough apart that a sector is not caught by more hangs than it may be
                // run again for (SECTOR_TRIES), even on a loaded machine.
                std::thread::sleep(Duration::from_millis(400));
                k += 1;
            }
        })
    };
    // Until each member hung at least twice, and at least three rounds.
    let start = Instant::now();
    let mut round = 0;
    while round < 3 || hangs.load(Ordering::Relaxed) < 4 {
        assert!(start.elapsed() < PATIENCE, "the faults never came");
        round += 1;
        for chunk in (0..len as usize).step_by(256 << 10) {
            volume
                .write_at(chunk as u64, &data[chunk..chunk + (256 << 10)])
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        let mut back = vec![0u8; len as usize];
        for chunk in (0..len as usize).step_by(256 << 10) {
            volume
                .read_at(chunk as u64, &mut back[chunk..chunk + (256 << 10)])
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        assert!(back == data, "round {round}: the volume read back something else");
    }
    done.store(true, Ordering::Relaxed);
    faults.join().unwrap();
    volume.flush().unwrap();
    drop(volume);
    let stats = engine.pool().unwrap().member_stats();
    assert!(stats.iter().all(|m| m.recoveries > 0), "every member failed at least once: {stats:?}");
    // Zero-copy sectors were handed back to the volume, which ran them again (it would have
    // failed the I/O otherwise).
    let handed_back: u64 = stats.iter().map(|m| m.member_failed).sum();
    assert!(handed_back > 0, "no sector was run again by the volume: {stats:?}");
    // The image, decrypted by the software engine, is the data.
    let software = Arc::new(SoftwareEngine::new(CoreKind::Reference));
    let check = Volume::open(software, open(&path), false, &key, params).unwrap();
    let mut back = vec![0u8; len as usize];
    check.read_at(0, &mut back).unwrap();
    assert!(back == data, "the image holds something else than the data written");
}

/// When every device member delivers events on its own threads, callers may sleep instead of
/// polling; a request the software member ran in place must still reach them without a poll
/// (the monitor delivers it).
#[test]
fn software_completions_reach_a_caller_that_does_not_poll() {
    let p = pool(
        2,
        true,
        device_options(CompletionMode::Interrupt, Duration::from_millis(50), 1),
        PoolOptions::default(),
    );
    assert!(p.engine.completes_by_itself());
    let session = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    for t in &p.transports {
        t.inject(EmulatedFault::NeverAnswer);
    }
    // Both devices hang and are given up: from then on only the software member runs.
    let checker = Arc::new(ContractChecker::new());
    drive(&p.engine, &session, &checker, 0, 1, 50);
    p.wait_state("emulated#0", MemberState::Lost);
    p.wait_state("emulated#1", MemberState::Lost);
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    let mut q = p.engine.open_queue(0, Arc::new(move |ev| drop(tx.lock().unwrap().send(ev)))).unwrap();
    q.submit(request(&session, 1000), true).unwrap();
    // No poll from here on.
    match rx.recv_timeout(PATIENCE) {
        Ok(Event::Completed(c)) => {
            c.result.unwrap();
            assert!(*c.request.data.as_slice() == *expected(1000));
        }
        Ok(other) => panic!("{other:?}"),
        Err(_) => panic!("the completion never arrived without a poll"),
    }
}

/// Waits up to `limit` for the completion of request `id` in `inbox`, polling `q`.
fn completion_of(
    q: &mut AnyQueue,
    inbox: &Inbox,
    id: u64,
    limit: Duration,
) -> Option<crypt_vfio::Result<Vec<u8>>> {
    let start = Instant::now();
    while start.elapsed() < limit {
        q.poll();
        for ev in std::mem::take(&mut *inbox.lock().unwrap()) {
            if let Event::Completed(c) = ev {
                if c.request.user_data == id {
                    return Some(c.result.map(|()| c.request.data.as_slice().to_vec()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn open(engine: &AnyEngine, index: usize) -> (AnyQueue, Inbox) {
    let inbox: Inbox = Arc::default();
    let i = inbox.clone();
    let q = engine.open_queue(index, Arc::new(move |ev| i.lock().unwrap().push(ev))).unwrap();
    (q, inbox)
}

/// A member given back to its owner never rejoins, and counts as gone: once every member was
/// released a request fails at once (not after the member wait) with `NoMemberLeft` saying
/// "released", and destroying a session made before is not an error.
#[test]
fn released_members_are_gone_at_once() {
    let p = pool(
        2,
        false,
        device_options(CompletionMode::Poll, Duration::from_secs(5), 3),
        PoolOptions { member_wait: PATIENCE, ..Default::default() },
    );
    let session = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    for t in &p.transports {
        t.request_release();
    }
    for name in ["emulated#0", "emulated#1"] {
        let start = Instant::now();
        while p.pool().members().find(|(n, _)| *n == name).unwrap().1.device().unwrap().release_state()
            != crypt_vfio::virtio_crypto::ReleaseState::Released
        {
            assert!(start.elapsed() < PATIENCE, "{name} was never released");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (mut q, inbox) = open(&p.engine, 0);
    let result = match q.submit(request(&session, 7), true) {
        Err(e) => match e.kind {
            SubmitErrorKind::Rejected(e) => Err(e),
            SubmitErrorKind::Busy => panic!("busy"),
        },
        Ok(_) => completion_of(&mut q, &inbox, 7, Duration::from_secs(10))
            .expect("a request waited for released members to come back"),
    };
    match result {
        Err(e @ Error::Device(DeviceError::NoMemberLeft(_))) => {
            let text = e.to_string();
            assert!(text.matches("released").count() >= 2, "{text}");
        }
        other => panic!("expected NoMemberLeft, got {other:?}"),
    }
    p.engine.destroy_session(&session).expect("destroying a session of released members");
}

/// A session destroyed while its requests wait in a pool queue's backlog: they fail (Promoted
/// first), and the requests of other sessions behind them run.
#[test]
fn requests_of_a_destroyed_session_do_not_block_the_queue() {
    let config = EmulatedConfig { data_queues: 1, latency: Duration::from_millis(100), ..Default::default() };
    let (dev, _t) = common::device_with(config, &device_options(CompletionMode::Poll, PATIENCE, 3));
    let engine = AnyEngine::Pool(
        PoolEngine::new(vec![("emulated#0".into(), AnyEngine::Device(dev))], PoolOptions::default()).unwrap(),
    );
    let a = engine.create_session(Mode::Ctr, &KEY).unwrap();
    let b = engine.create_session(Mode::Ctr, &KEY).unwrap();
    let checker = Arc::new(ContractChecker::new());
    let inbox: Arc<Mutex<Vec<Ev>>> = Arc::default();
    let (c, i) = (checker.clone(), inbox.clone());
    let mut q = engine
        .open_queue(
            0,
            Arc::new(move |ev| {
                c.event(&ev);
                i.lock().unwrap().push(ev);
            }),
        )
        .unwrap();
    // 8 slots: b fills them, a waits behind, then b again.
    for id in 1..=20u64 {
        let s = if (9..=12).contains(&id) { &a } else { &b };
        checker.begin_submit(0, id);
        let r = q.submit(request(s, id), true);
        checker.submitted(id, &r);
        r.map_err(|e| e.kind.to_string()).unwrap();
    }
    engine.destroy_session(&a).unwrap();
    let start = Instant::now();
    let mut results = HashMap::new();
    while results.len() < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {} of 20 completed: {:?}",
            results.len(),
            results.keys()
        );
        q.poll();
        for ev in std::mem::take(&mut *inbox.lock().unwrap()) {
            if let Event::Completed(c) = ev {
                results.insert(c.request.user_data, c.result.map(|()| c.request.data.as_slice().to_vec()));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    clean(&checker.report());
    for (id, r) in results {
        if (9..=12).contains(&id) {
            assert!(matches!(r, Err(Error::Crypto(crypt_vfio::CryptoError::InvalidSession))), "{id}: {r:?}");
        } else {
            assert_eq!(r.expect("ran"), expected(id), "{id}");
        }
    }
}

/// A volume over a pool whose devices all fail for good under it: sectors whose member failed
/// under them cannot run again, and the I/O ends at once with the pool's error, not after the
/// volume's watchdog (a refused re-run was once never counted, and the op waited for it).
#[test]
fn a_volume_whose_reruns_are_refused_ends_with_the_pools_error() {
    use crypt_vfio::volume::{Volume, VolumeParams};
    for round in 0..10 {
        let p = pool(
            2,
            false,
            device_options(CompletionMode::Interrupt, Duration::from_millis(50), 1),
            PoolOptions { member_wait: PATIENCE, ..Default::default() },
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let params = VolumeParams::plain("aes-xts-plain64".parse().unwrap());
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(29) ^ 0x5a).collect();
        let mut volume = Volume::open(Arc::new(p.engine), file, true, &key, params).unwrap();
        volume.set_watchdog(Duration::from_secs(30));
        volume.write_at(0, &vec![0x5a; 256 << 10]).unwrap();
        for t in &p.transports {
            t.inject(EmulatedFault::NeverAnswer);
        }
        let start = Instant::now();
        let mut back = vec![0u8; 256 << 10];
        let e = volume.read_at(0, &mut back).expect_err("a read with every device hung");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "round {round}: the read took {:?}: {e}",
            start.elapsed()
        );
        let text = e.to_string();
        // The first failed sector's error: its member's failure, or every member's fate.
        assert!(text.contains("emulated#"), "round {round}: {text}");
    }
}

/// Idle spells longer than the timers of the pool and its members (the request timeout, the
/// pool monitor's and kicker's 1 s ticks, the devices' and completion threads' spins and
/// sleeps): after each, requests complete without the caller polling, through the devices, and
/// no member was taken for failed or recovered meanwhile.
#[test]
fn a_pool_serves_after_idle_spells_longer_than_every_timeout() {
    // Short enough to be passed many times over by each idle spell; long enough that a loaded
    // machine does not miss it while requests are in flight.
    let options = device_options(CompletionMode::Adaptive, Duration::from_millis(500), 1);
    let p = pool(2, true, options, PoolOptions::default());
    let session = p.engine.create_session(Mode::Ctr, &KEY).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    let mut q = p.engine.open_queue(0, Arc::new(move |ev| drop(tx.lock().unwrap().send(ev)))).unwrap();
    let mut id = 0;
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(1500));
        let first = id;
        for _ in 0..24 {
            assert!(matches!(
                q.submit(request(&session, id), true),
                Ok(Submitted::InProgress | Submitted::Backlogged)
            ));
            id += 1;
        }
        // No poll: the completions come by themselves.
        let mut done = 0;
        while done < id - first {
            match rx.recv_timeout(PATIENCE) {
                Ok(Event::Completed(c)) => {
                    let rid = c.request.user_data;
                    c.result.unwrap_or_else(|e| panic!("round {round}, request {rid}: {e}"));
                    assert!(*c.request.data.as_slice() == *expected(rid), "request {rid}: wrong data");
                    done += 1;
                }
                Ok(Event::Promoted { .. }) => {}
                Err(_) => {
                    panic!("round {round}: {} of {} completions came after the idle spell", done, id - first)
                }
            }
        }
        for m in p.pool().member_stats() {
            assert_eq!(m.state, MemberState::Up, "round {round}: {m:?}");
            assert_eq!(m.recoveries, 0, "an idle member was taken for failed: {m:?}");
        }
    }
    let devices: u64 =
        p.pool().member_stats().iter().filter(|m| m.name != "software").map(|m| m.requests).sum();
    assert!(devices > 0, "the devices ran nothing: {:?}", p.pool().member_stats());
}
