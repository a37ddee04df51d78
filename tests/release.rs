//! Giving a device back when its owner asks, as vfio-pci asks before an unbind or a hot-unplug
//! (the emulated device plays the owner: `EmulatedTransport::request_release`).
//!
//! What a user relies on: every request accepted completes exactly once (judged by
//! `ContractChecker`: backlogged ones are Promoted before they fail), requests on the device
//! finish when they can, nothing touches the device after it was given back (the emulated
//! device counts every access that still reaches it), later calls fail with
//! `DeviceError::Released`, and the listener thread ends with the engine. Tests run one at a
//! time: one counts the listener threads of the process.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crypt_vfio::engine::contract::ContractChecker;
use crypt_vfio::engine::{
    Buf, Completion, Direction, Engine, Event, Iv, Queue, Request, SubmitError, SubmitErrorKind, Submitted,
};
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedFault, EmulatedTransport};
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions, DeviceSession, ReleaseState, VirtioCrypto};
use crypt_vfio::{CoreKind, DeviceError, Error, Mode};
use crypt_vfio_cores::new_cipher;

const KEY: [u8; 32] = [0x42; 32];
/// Only a bound, never expected: the machine is shared and slow.
const PATIENCE: Duration = Duration::from_secs(30);
const LISTENER: &str = "crypt-vfio-req";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

type Ev = Event<DeviceSession>;

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim_end() == name)
        .count()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < PATIENCE, "waited {PATIENCE:?} for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

struct Rig {
    dev: VirtioCrypto,
    t: Arc<EmulatedTransport>,
    q: Box<dyn Queue<DeviceSession>>,
    inbox: Arc<Mutex<Vec<Ev>>>,
    checker: Arc<ContractChecker>,
    session: DeviceSession,
    next: AtomicU64,
    mode: CompletionMode,
}

fn rig(mode: CompletionMode, options: DeviceOptions) -> Rig {
    let config = EmulatedConfig { data_queues: 1, ..Default::default() };
    let options = DeviceOptions { completion: mode, data_queues: 1, queue_size: 8, ..options };
    let (dev, t) = common::device_with(config, &options);
    let checker = Arc::new(ContractChecker::new());
    let inbox: Arc<Mutex<Vec<Ev>>> = Arc::default();
    let (c, i) = (checker.clone(), inbox.clone());
    let q = dev
        .open_queue(
            0,
            Arc::new(move |ev| {
                c.event(&ev);
                i.lock().unwrap().push(ev);
            }),
        )
        .unwrap();
    let session = dev.create_session(Mode::Ctr, &KEY).unwrap();
    Rig { dev, t, q, inbox, checker, session, next: AtomicU64::new(1), mode }
}

fn plain(id: u64) -> Vec<u8> {
    (0..4096).map(|i| (id as usize * 7 + i) as u8).collect()
}

fn iv(id: u64) -> [u8; 16] {
    [(id % 251) as u8; 16]
}

fn expected(id: u64) -> Vec<u8> {
    let mut d = plain(id);
    new_cipher(CoreKind::Reference, Mode::Ctr, &KEY).unwrap().encrypt(&iv(id), &[], &mut d, &mut []).unwrap();
    d
}

/// The error of a request the device did not run because it was being given back (NotRun:
/// data as submitted), or of a call after it was (Released).
fn released(e: &Error) -> bool {
    matches!(e, Error::Device(DeviceError::Released(why) | DeviceError::NotRun(why)) if why.contains("given back"))
}

/// The encryption of request `id` (data and IV derived from it).
fn request<S: Clone>(session: &S, id: u64) -> Request<S> {
    Request::new(session.clone(), Direction::Encrypt, Iv::from(iv(id)), Buf::Host(plain(id)), id)
}

/// A submit `when` the device is leaving or gone: refused as not run, or as released.
fn assert_refused_as_released(r: Result<Submitted, SubmitError<DeviceSession>>, when: &str) {
    match r {
        Err(e) => match e.kind {
            SubmitErrorKind::Rejected(e) => assert!(released(&e), "{when}: {e}"),
            k => panic!("submit {when}: {k:?}"),
        },
        Ok(s) => panic!("submit {when} accepted: {s:?}"),
    }
}

impl Rig {
    /// Submits `n` encryptions with backlog allowed; returns their ids.
    fn submit(&mut self, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                let id = self.next.fetch_add(1, Ordering::Relaxed);
                let req = request(&self.session, id);
                self.checker.begin_submit(0, id);
                let r = self.q.submit(req, true);
                self.checker.submitted(id, &r);
                assert!(
                    matches!(r, Ok(Submitted::InProgress | Submitted::Backlogged)),
                    "request {id} refused"
                );
                id
            })
            .collect()
    }

    /// The final completions of `ids`, polling in poll mode.
    fn wait(&mut self, ids: &[u64]) -> Vec<Completion<DeviceSession>> {
        let start = Instant::now();
        let mut done = Vec::new();
        while done.len() < ids.len() {
            assert!(start.elapsed() < PATIENCE, "{} of {} requests completed", done.len(), ids.len());
            if self.mode == CompletionMode::Poll {
                self.q.poll();
            }
            for ev in std::mem::take(&mut *self.inbox.lock().unwrap()) {
                if let Event::Completed(c) = ev {
                    assert!(ids.contains(&c.request.user_data), "completion of an unknown request");
                    done.push(c);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        done
    }

    fn wait_released(&self) {
        wait_until("the release", || self.dev.release_state() == ReleaseState::Released);
    }

    fn check_contract(&self) {
        let r = self.checker.report();
        assert!(r.violations.is_empty(), "contract violations: {:#?}", r.violations);
        assert_eq!(r.pending, 0, "{r:?}");
        assert_eq!(r.completed, r.in_progress + r.backlogged, "every accepted request completes once: {r:?}");
    }

    /// Every call after the release fails with Released; then closing touches nothing.
    fn check_after_release(mut self) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        assert_refused_as_released(self.q.submit(request(&self.session, id), true), "after the release");
        assert!(released(&self.dev.create_session(Mode::Ctr, &KEY).unwrap_err()));
        assert!(released(&self.dev.destroy_session(&self.session).unwrap_err()));
        assert!(released(&self.dev.alloc_buffer(4096).unwrap_err()));
        assert_eq!(self.q.poll(), 0);
        self.dev.abort();
        let t = self.t.clone();
        drop(self);
        assert!(t.is_released());
        assert_eq!(t.accesses_after_release(), 0, "the driver touched the device after giving it back");
        assert_eq!(t.live_dma_maps(), 0, "the driver left DMA maps behind");
        assert_eq!(t.stats().iommu_faults, 0);
    }
}

/// Requests on the device drain, backlogged ones fail (Promoted first), and the device goes.
fn drain_then_release(mode: CompletionMode) {
    let _s = serial();
    let mut r = rig(mode, DeviceOptions { release_drain: PATIENCE, ..Default::default() });
    // Slow answers: the ring's 8 requests are still on the device, and the rest backlogged,
    // when the release begins (64 requests take 2.4 s).
    r.t.inject(EmulatedFault::AnswerAfter(Duration::from_millis(300)));
    let ids = r.submit(64);
    r.t.request_release();
    let done = r.wait(&ids);
    r.wait_released();
    let (mut ok, mut not_run) = (0, 0);
    for c in &done {
        let id = c.request.user_data;
        match &c.result {
            Ok(()) => {
                assert_eq!(c.request.data.as_slice(), &expected(id)[..], "request {id}: wrong data");
                ok += 1;
            }
            Err(e) if released(e) => {
                assert_eq!(
                    c.request.data.as_slice(),
                    &plain(id)[..],
                    "request {id} not run, yet its data changed"
                );
                not_run += 1;
            }
            Err(e) => panic!("{mode:?}: request {id} on the device did not drain: {e}"),
        }
    }
    assert!(ok >= 1 && not_run >= 1, "{mode:?}: {ok} drained, {not_run} not run");
    r.check_contract();
    wait_until("the listener to end after the release", || threads_named(LISTENER) == 0);
    r.check_after_release();
}

#[test]
fn release_drains_the_device_fails_the_backlog_and_touches_nothing_after_polling() {
    drain_then_release(CompletionMode::Poll);
}

#[test]
fn release_drains_the_device_fails_the_backlog_and_touches_nothing_after_with_interrupts() {
    drain_then_release(CompletionMode::Interrupt);
}

#[test]
fn requests_the_device_keeps_past_the_drain_fail_and_the_device_is_released() {
    let _s = serial();
    for mode in [CompletionMode::Poll, CompletionMode::Adaptive] {
        let options = DeviceOptions { release_drain: Duration::from_millis(200), ..Default::default() };
        let mut r = rig(mode, options);
        r.t.inject(EmulatedFault::NeverAnswer);
        let ids = r.submit(4);
        r.t.request_release();
        for c in r.wait(&ids) {
            match &c.result {
                // Bounced requests cut short say so (NotRun: data as submitted).
                Err(Error::Device(DeviceError::Failed(why) | DeviceError::NotRun(why))) => {
                    assert!(why.contains("given back"), "{why}")
                }
                other => panic!("{mode:?}: request {} kept by the device: {other:?}", c.request.user_data),
            }
        }
        r.wait_released();
        r.check_contract();
        r.check_after_release();
    }
}

#[test]
fn the_listener_thread_ends_when_the_engine_closes() {
    let _s = serial();
    assert_eq!(threads_named(LISTENER), 0);
    let mut r = rig(CompletionMode::Poll, DeviceOptions::default());
    // A thread takes its name once it runs.
    wait_until("the listener thread", || threads_named(LISTENER) == 1);
    let ids = r.submit(3);
    for c in r.wait(&ids) {
        assert!(c.result.is_ok());
    }
    drop(r);
    // Joined, the thread still leaves /proc/self/task a moment later.
    wait_until("the listener thread to end", || threads_named(LISTENER) == 0);
}

#[test]
fn closing_the_engine_lets_go_of_the_release_request_eventfd() {
    let _s = serial();
    let r = rig(CompletionMode::Poll, DeviceOptions::default());
    let t = r.t.clone();
    assert!(t.watches_release_requests());
    drop(r);
    assert!(!t.is_released());
    assert!(!t.watches_release_requests(), "the closed engine's eventfd is still signalled on a request");
}

#[test]
fn a_release_request_after_an_abort_still_gives_the_device_back() {
    let _s = serial();
    let mut r = rig(CompletionMode::Poll, DeviceOptions::default());
    let ids = r.submit(3);
    for c in r.wait(&ids) {
        assert!(c.result.is_ok(), "{:?}", c.result);
    }
    // A server stopping aborts its device, then waits for its clients; the owner asks meanwhile.
    r.dev.abort();
    r.t.request_release();
    wait_until("the device to be given back", || r.t.is_released());
    r.wait_released();
    r.check_contract();
    let t = r.t.clone();
    drop(r);
    assert_eq!(t.accesses_after_release(), 0, "the driver touched the device after giving it back");
    assert_eq!(t.live_dma_maps(), 0, "the driver left DMA maps behind");
}

#[test]
fn without_the_listener_the_device_stays_and_keeps_working() {
    let _s = serial();
    let mut r = rig(CompletionMode::Poll, DeviceOptions { watch_release: false, ..Default::default() });
    assert_eq!(threads_named(LISTENER), 0);
    r.t.request_release();
    // The owner asks again and again; nobody answers.
    wait_until("a repeated release request", || r.t.release_requests() >= 2);
    assert_eq!(r.dev.release_state(), ReleaseState::Held);
    let ids = r.submit(3);
    for c in r.wait(&ids) {
        assert!(c.result.is_ok(), "{:?}", c.result);
    }
    assert!(!r.t.is_released());
}

#[test]
fn a_release_during_a_recovery_waits_for_it_and_still_releases() {
    let _s = serial();
    let options = DeviceOptions { request_timeout: Duration::from_secs(2), ..Default::default() };
    let mut r = rig(CompletionMode::Poll, options);
    // The device fails (a request never answered), and its recovery is held up by a late
    // control answer (re-creating the session) when the owner asks for it.
    r.t.inject(EmulatedFault::NeverAnswer);
    r.t.inject(EmulatedFault::CtrlLate(PATIENCE));
    let armed = r.t.stats().faults_injected;
    let ids = r.submit(2);
    for c in r.wait(&ids) {
        let failed = matches!(c.result, Err(Error::Device(DeviceError::Failed(_) | DeviceError::NotRun(_))));
        assert!(failed, "{:?}", c.result);
    }
    wait_until("the recovery's late control request", || r.t.stats().faults_injected > armed);
    r.t.request_release();
    r.wait_released();
    assert_eq!(r.dev.recoveries(), 0, "the recovery finished although the device was leaving");
    r.check_contract();
    r.check_after_release();
}

#[test]
fn the_unplug_fault_ends_a_single_device_job_with_the_released_error() {
    // No SERIAL: another process. Bench would run 30 s; the unplug ends it at once.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
        .args(["bench", "--device", "emulated", "--duration", "30s", "--device-fault", "unplug@200ms"])
        .env("RUST_LOG", "crypt_vfio=info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bench went on after the release: {err}");
    // Refused while leaving (not run) or after (released), depending on when bench submits.
    let why = "emulated#0 was given back at its owner's request (unbind or unplug)";
    assert!(
        err.contains(&format!("device released: {why}")) || err.contains(&format!("request not run: {why}")),
        "{err}"
    );
    for step in ["release request seen", "stopped taking requests", "drained", "device released (t="] {
        assert!(err.contains(step), "no '{step}' in the log: {err}");
    }
}

#[test]
fn a_release_under_load_from_several_threads_loses_nothing_and_completes_nothing_twice() {
    let _s = serial();
    let config = EmulatedConfig { data_queues: 2, latency: Duration::from_micros(200), ..Default::default() };
    let options = DeviceOptions {
        completion: CompletionMode::Interrupt,
        queue_size: 8,
        release_drain: PATIENCE,
        ..Default::default()
    };
    let (dev, t) = common::device_with(config, &options);
    let checker = Arc::new(ContractChecker::new());
    let session = dev.create_session(Mode::Ctr, &KEY).unwrap();
    let next = Arc::new(AtomicU64::new(1));
    let completed = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for worker in 0..4 {
            let (checker, completed, refused, next) =
                (checker.clone(), completed.clone(), refused.clone(), next.clone());
            let (dev, session) = (&dev, session.clone());
            s.spawn(move || {
                let (c, done) = (checker.clone(), completed.clone());
                let mut q = dev
                    .open_queue(
                        worker % 2,
                        Arc::new(move |ev| {
                            c.event(&ev);
                            if let Event::Completed(comp) = ev {
                                let id = comp.request.user_data;
                                match &comp.result {
                                    Ok(()) => assert_eq!(comp.request.data.as_slice(), &expected(id)[..]),
                                    Err(e) => assert!(
                                        released(e) || matches!(e, Error::Device(DeviceError::Failed(_))),
                                        "request {id}: {e}"
                                    ),
                                }
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }),
                    )
                    .unwrap();
                // Submit until the device refuses: it is gone.
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    checker.begin_submit(worker % 2, id);
                    let r = q.submit(request(&session, id), true);
                    checker.submitted(id, &r);
                    if let Err(e) = r {
                        match e.kind {
                            SubmitErrorKind::Rejected(e) if released(&e) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            // The backlog is full: wait for room, as a caller does.
                            SubmitErrorKind::Busy => std::thread::sleep(Duration::from_millis(1)),
                            k => panic!("request {id} refused: {k:?}"),
                        }
                    }
                }
            });
        }
        // Let the threads fill rings and backlogs, then the owner asks.
        wait_until("requests completing", || completed.load(Ordering::Relaxed) >= 200);
        t.request_release();
    });
    wait_until("the release", || dev.release_state() == ReleaseState::Released);
    // The last events may still be on their way from a completion thread.
    wait_until("every accepted request to complete", || checker.report().pending == 0);
    let r = checker.report();
    assert!(r.violations.is_empty(), "contract violations: {:#?}", r.violations);
    assert_eq!(r.pending, 0, "{r:?}");
    assert_eq!(r.completed, r.in_progress + r.backlogged, "every accepted request completes once: {r:?}");
    assert_eq!(refused.load(Ordering::Relaxed), 4);
    drop(dev);
    assert_eq!(t.accesses_after_release(), 0);
    assert_eq!(t.live_dma_maps(), 0);
}

#[test]
fn while_the_device_drains_it_takes_no_new_request_or_session() {
    let _s = serial();
    // Long enough for a loaded machine to see the device leaving.
    let options = DeviceOptions { release_drain: Duration::from_secs(10), ..Default::default() };
    let mut r = rig(CompletionMode::Poll, options);
    // Requests the device keeps hold the release in its drain.
    r.t.inject(EmulatedFault::NeverAnswer);
    let held = r.submit(2);
    r.t.request_release();
    wait_until("the device to be leaving", || r.dev.release_state() == ReleaseState::Leaving);
    let id = r.next.fetch_add(1, Ordering::Relaxed);
    assert_refused_as_released(r.q.submit(request(&r.session, id), true), "while leaving");
    assert!(released(&r.dev.create_session(Mode::Ctr, &KEY).unwrap_err()));
    for c in r.wait(&held) {
        let cut_short =
            matches!(c.result, Err(Error::Device(DeviceError::Failed(_) | DeviceError::NotRun(_))));
        assert!(cut_short, "{:?}", c.result);
    }
    r.wait_released();
    r.check_contract();
    r.check_after_release();
}

/// A pool member given back under load: the pool carries the work on the other member, every
/// request completes once and bit-exact, and nothing touches the released device afterwards.
#[test]
fn a_pool_member_given_back_under_load_loses_nothing() {
    use crypt_vfio::engine::{AnyEngine, PoolEngine, PoolOptions};
    let _s = serial();
    let options = DeviceOptions {
        completion: CompletionMode::Interrupt,
        data_queues: 1,
        queue_size: 8,
        release_drain: PATIENCE,
        ..Default::default()
    };
    let mut members = Vec::new();
    let mut transports = Vec::new();
    for k in 0..2 {
        let config =
            EmulatedConfig { data_queues: 1, latency: Duration::from_micros(100), ..Default::default() };
        let (dev, t) = common::device_with(config, &options);
        members.push((format!("emulated#{k}"), AnyEngine::Device(dev)));
        transports.push(t);
    }
    let engine = AnyEngine::Pool(PoolEngine::new(members, PoolOptions::default()).unwrap());
    let session = engine.create_session(Mode::Ctr, &KEY).unwrap();
    let checker = Arc::new(ContractChecker::new());
    let completed = Arc::new(AtomicU64::new(0));
    let (ok, wrong, errors) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));
    // Far more ids than the run uses: the threads submit until told to stop.
    const PER_THREAD: u64 = 1 << 40;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for worker in 0..3u64 {
            let (checker, completed, ok, wrong, errors) =
                (checker.clone(), completed.clone(), ok.clone(), wrong.clone(), errors.clone());
            let (engine, session) = (&engine, session.clone());
            let (stop, accepted) = (stop.clone(), accepted.clone());
            s.spawn(move || {
                let c = checker.clone();
                let done = completed.clone();
                let mut q = engine
                    .open_queue(
                        worker as usize,
                        Arc::new(move |ev| {
                            c.event(&ev);
                            if let Event::Completed(comp) = ev {
                                let id = comp.request.user_data;
                                match &comp.result {
                                    Ok(()) if comp.request.data.as_slice() == &expected(id)[..] => {
                                        ok.fetch_add(1, Ordering::Relaxed)
                                    }
                                    Ok(()) => wrong.fetch_add(1, Ordering::Relaxed),
                                    Err(e) => {
                                        errors.lock().unwrap().push(format!("request {id}: {e}"));
                                        0
                                    }
                                };
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }),
                    )
                    .unwrap();
                let first = 1 + worker * PER_THREAD;
                let mut id = first;
                while !stop.load(Ordering::Acquire) {
                    checker.begin_submit(worker as usize, id);
                    let r = q.submit(request(&session, id), true);
                    checker.submitted(id, &r);
                    match r {
                        Ok(_) => {
                            id += 1;
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => match e.kind {
                            SubmitErrorKind::Busy => std::thread::sleep(Duration::from_millis(1)),
                            k => panic!("request {id} refused: {k:?}"),
                        },
                    }
                    q.poll();
                }
                let start = Instant::now();
                while q.outstanding() > 0 {
                    assert!(start.elapsed() < PATIENCE, "requests never completed");
                    q.poll();
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        wait_until("requests completing", || completed.load(Ordering::Relaxed) >= 500);
        transports[1].request_release();
        // The load goes on across the release and well after it.
        wait_until("the member's release", || transports[1].is_released());
        let after = completed.load(Ordering::Relaxed) + 1000;
        wait_until("requests after the release", || completed.load(Ordering::Relaxed) >= after);
        stop.store(true, Ordering::Release);
    });
    wait_until("every accepted request to complete", || checker.report().pending == 0);
    let r = checker.report();
    assert!(r.violations.is_empty(), "contract violations: {:#?}", r.violations);
    assert_eq!(r.completed, r.in_progress + r.backlogged, "{r:?}");
    let errors = errors.lock().unwrap();
    assert!(errors.is_empty(), "{} errors, first: {:?}", errors.len(), errors.first());
    assert_eq!(
        (ok.load(Ordering::Relaxed), wrong.load(Ordering::Relaxed)),
        (accepted.load(Ordering::Relaxed), 0)
    );
    drop(engine);
    assert_eq!(transports[1].accesses_after_release(), 0);
    assert_eq!(transports[1].live_dma_maps(), 0);
}
