//! The driver against a device that misbehaves on purpose: one test per scripted fault of the
//! emulated device (`EmulatedFault`).
//!
//! Each test checks what a user must be able to rely on: the error names the problem, every
//! request accepted completes exactly once (judged by `ContractChecker`), no write of the device
//! reaches caller memory after the caller got it back, and the device is recovered (or, when it
//! cannot be, says why). Timeouts are short (300 ms) so the tests run quickly; nothing asserts
//! tight timing.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crypt_vfio::engine::contract::{ContractChecker, ContractReport};
use crypt_vfio::engine::{
    Buf, Completion, Direction, Engine, Event, Iv, Queue, Request, SubmitErrorKind, Submitted,
};
use crypt_vfio::testing::VirtioPci;
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedFault, EmulatedTransport};
use crypt_vfio::transport::Transport;
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions, DeviceSession, VirtioCrypto};
use crypt_vfio::volume::{Volume, VolumeParams};
use crypt_vfio::{CoreKind, CryptoError, DeviceError, Error, Mode};
use crypt_vfio_cores::new_cipher;

const KEY: [u8; 32] = [0x42; 32];
const TIMEOUT: Duration = Duration::from_millis(300);
/// Long enough for any recovery on a loaded machine; only a bound, never expected.
const PATIENCE: Duration = Duration::from_secs(20);

type Ev = Event<DeviceSession>;

/// A device, one queue on it, a session, and a contract checker watching every event.
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

fn rig_with(config: EmulatedConfig, mode: CompletionMode) -> Rig {
    let options =
        DeviceOptions { request_timeout: TIMEOUT, completion: mode, data_queues: 1, ..Default::default() };
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

fn rig(mode: CompletionMode) -> Rig {
    rig_with(EmulatedConfig { data_queues: 1, ..Default::default() }, mode)
}

fn plain(id: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (id as usize * 7 + i) as u8).collect()
}

fn expected(id: u64, len: usize) -> Vec<u8> {
    let mut d = plain(id, len);
    new_cipher(CoreKind::Reference, Mode::Ctr, &KEY).unwrap().encrypt(&iv(id), &[], &mut d, &mut []).unwrap();
    d
}

fn iv(id: u64) -> [u8; 16] {
    [(id % 251) as u8; 16]
}

impl Rig {
    /// Submits an encryption of `data`; returns its id, or the refusal.
    fn submit(&mut self, data: Buf) -> Result<u64, Error> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let req = Request::new(self.session.clone(), Direction::Encrypt, Iv::from(iv(id)), data, id);
        self.checker.begin_submit(0, id);
        let r = self.q.submit(req, true);
        self.checker.submitted(id, &r);
        match r {
            Ok(Submitted::InProgress | Submitted::Backlogged) => Ok(id),
            Err(e) => {
                assert_eq!(e.request.user_data, id, "a refused request comes back whole");
                match e.kind {
                    SubmitErrorKind::Rejected(e) => Err(e),
                    SubmitErrorKind::Busy => panic!("busy with backlog allowed"),
                }
            }
        }
    }

    fn submit_host(&mut self, len: usize) -> u64 {
        let id = self.next.load(Ordering::Relaxed);
        self.submit(Buf::Host(plain(id, len))).expect("request accepted")
    }

    /// Submits `n` requests in 4 KiB DMA buffers, which the device may write directly: the
    /// buffers a device that ignores its reset could still change.
    fn submit_dma(&mut self, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                let id = self.next.load(Ordering::Relaxed);
                let Buf::Dma(mut b) = self.dev.alloc_buffer(4096).unwrap() else { panic!("DMA buffer") };
                b.as_mut_slice().copy_from_slice(&plain(id, 4096));
                self.submit(Buf::Dma(b)).unwrap()
            })
            .collect()
    }

    /// Waits for the final completions of `ids` (polling in poll mode only).
    fn wait(&mut self, ids: &[u64]) -> Vec<Completion<DeviceSession>> {
        let start = Instant::now();
        let mut done: Vec<Completion<DeviceSession>> = Vec::new();
        while done.len() < ids.len() {
            assert!(start.elapsed() < PATIENCE, "requests {ids:?} not all completed: {} done", done.len());
            if self.mode == CompletionMode::Poll {
                self.q.poll();
            }
            let evs: Vec<Ev> = std::mem::take(&mut *self.inbox.lock().unwrap());
            for ev in evs {
                if let Event::Completed(c) = ev {
                    assert!(ids.contains(&c.request.user_data), "completion of unknown request");
                    done.push(c);
                }
            }
            // Poll as a busy caller does (many polls per request), or let the interrupt
            // thread deliver.
            if self.mode == CompletionMode::Poll {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        done.sort_by_key(|c| c.request.user_data);
        done
    }

    fn check_ok(&self, c: &Completion<DeviceSession>) {
        let id = c.request.user_data;
        assert!(c.result.is_ok(), "request {id}: {:?}", c.result);
        assert_eq!(
            c.request.data.as_slice(),
            &expected(id, c.request.data.len())[..],
            "request {id}: wrong data"
        );
    }

    /// The device serves again, with the session created before the failure.
    fn assert_recovered(&mut self) {
        self.t.clear_faults();
        assert!(self.dev.wait_working(PATIENCE), "not recovered: {:?}", self.dev.failure());
        let ids: Vec<u64> = (0..4).map(|_| self.submit_host(64)).collect();
        for c in self.wait(&ids) {
            self.check_ok(&c);
        }
        assert!(self.dev.recoveries() >= 1);
    }

    fn report(&self) -> ContractReport {
        let r = self.checker.report();
        assert!(r.violations.is_empty(), "contract violations: {:#?}", r.violations);
        assert_eq!(r.pending, 0, "{r:?}");
        assert_eq!(r.completed, r.in_progress + r.backlogged, "every accepted request completes once: {r:?}");
        r
    }
}

/// The request failed with the device. A bounced request (host memory) that the failure cut
/// short says NotRun (its data is as submitted, so a pool may run it elsewhere); a zero-copy one
/// says Failed (the device may have written part of its buffer).
fn device_failed(c: &Completion<DeviceSession>, needle: &str) {
    let host = matches!(c.request.data, Buf::Host(_));
    match &c.result {
        Err(Error::Device(DeviceError::Failed(why))) => {
            assert!(why.contains(needle), "{why:?} should mention {needle:?}")
        }
        Err(Error::Device(DeviceError::NotRun(why))) if host => {
            assert!(why.contains(needle), "{why:?} should mention {needle:?}")
        }
        other => panic!("request {}: expected DeviceFailed ({needle}), got {other:?}", c.request.user_data),
    }
}

// ---- Item 1: the watchdog -------------------------------------------------------------------

fn idle_then_request(mode: CompletionMode) {
    let config = EmulatedConfig { data_queues: 1, latency: Duration::from_millis(20), ..Default::default() };
    let mut r = rig_with(config, mode);
    let id = r.submit_host(4096);
    let c = r.wait(&[id]);
    r.check_ok(&c[0]);
    // An idle spell longer than the timeout, then requests that take well under it.
    std::thread::sleep(TIMEOUT * 3);
    for _ in 0..3 {
        let id = r.submit_host(4096);
        let c = r.wait(&[id]);
        r.check_ok(&c[0]);
    }
    assert_eq!(r.dev.failure(), None);
    assert_eq!(r.dev.recoveries(), 0);
    r.report();
}

#[test]
fn watchdog_after_an_idle_spell_polling() {
    idle_then_request(CompletionMode::Poll);
}

#[test]
fn watchdog_after_an_idle_spell_with_interrupts() {
    idle_then_request(CompletionMode::Interrupt);
}

#[test]
fn never_answer_fails_after_the_timeout_from_submission_then_recovers() {
    for mode in [CompletionMode::Poll, CompletionMode::Interrupt] {
        let mut r = rig(mode);
        r.t.inject(EmulatedFault::NeverAnswer);
        let start = Instant::now();
        let id = r.submit_host(512);
        let c = r.wait(&[id]);
        let took = start.elapsed();
        device_failed(&c[0], "no completion");
        assert!(took >= TIMEOUT, "{mode:?}: failed after {took:?}, before the timeout");
        r.assert_recovered();
        r.report();
    }
}

// ---- Item 2: recovery, and giving up ---------------------------------------------------------

#[test]
fn a_device_that_keeps_failing_is_given_up() {
    let mut r = rig(CompletionMode::Poll);
    r.t.inject(EmulatedFault::NeverAnswer);
    for round in 0..3 {
        let id = r.submit_host(64);
        device_failed(&r.wait(&[id])[0], "no completion");
        if round < 2 {
            assert!(r.dev.wait_working(PATIENCE), "round {round}: {:?}", r.dev.failure());
        }
    }
    assert!(!r.dev.wait_working(Duration::from_secs(2)));
    match r.submit(Buf::Host(vec![0; 64])) {
        Err(Error::Device(DeviceError::GaveUp { failures: 3, .. })) => {}
        other => panic!("expected DeviceGaveUp, got {other:?}"),
    }
    assert_eq!(r.dev.recoveries(), 2);
    r.report();
}

#[test]
fn requests_in_flight_at_a_failure_complete_once_with_the_error() {
    let mut r = rig(CompletionMode::Poll);
    r.t.inject(EmulatedFault::NeverAnswer);
    // More than the ring holds, so some wait in the backlog.
    let ids: Vec<u64> = (0..300).map(|_| r.submit_host(64)).collect();
    for c in r.wait(&ids) {
        device_failed(&c, "no completion");
        assert_eq!(
            c.request.data.as_slice(),
            &plain(c.request.user_data, 64)[..],
            "no retry, data back as given"
        );
    }
    r.assert_recovered();
    r.report();
}

#[test]
fn a_session_destroyed_while_the_device_is_failed_is_not_recreated_and_others_live_on() {
    let mut r = rig(CompletionMode::Poll);
    let doomed = r.dev.create_session(Mode::Ctr, &[0x21; 32]).unwrap();
    r.t.inject(EmulatedFault::NeverAnswer);
    let id = r.submit_host(64);
    device_failed(&r.wait(&[id])[0], "no completion");
    r.t.clear_faults();
    // Destroyed while the device is failed (or being recovered): it waits for the recovery,
    // which does not bring it back, and touches no session of the new device.
    r.dev.destroy_session(&doomed).unwrap();
    r.assert_recovered();
    r.report();
}

// ---- Used-ring faults --------------------------------------------------------------------------

/// Runs `n` requests with `fault` armed: the driver fails the device (naming the problem in
/// the error of any request it held), every request completes once, and the device comes back.
fn used_ring_fault(fault: EmulatedFault, n: usize, needle: &str) {
    let mut r = rig(CompletionMode::Poll);
    r.t.inject(fault);
    let ids: Vec<u64> = (0..n).map(|_| r.submit_host(256)).collect();
    for c in r.wait(&ids) {
        match &c.result {
            Ok(()) => r.check_ok(&c),
            Err(_) => device_failed(&c, needle),
        }
    }
    let start = Instant::now();
    while r.dev.recoveries() == 0 {
        assert!(start.elapsed() < PATIENCE, "the fault went unnoticed: {:?}", r.dev.failure());
        r.q.poll();
        std::thread::sleep(Duration::from_millis(1));
    }
    r.assert_recovered();
    r.report();
}

#[test]
fn duplicate_used_entry() {
    used_ring_fault(EmulatedFault::DuplicateUsed, 1, "2 used elements with 1 requests in flight");
}

#[test]
fn used_id_of_a_free_slot() {
    used_ring_fault(EmulatedFault::FreeSlotId, 1, "not a request in flight");
}

#[test]
fn more_used_entries_than_in_flight() {
    used_ring_fault(EmulatedFault::ExtraUsed, 1, "used elements");
}

#[test]
fn used_length_shorter_than_promised() {
    used_ring_fault(EmulatedFault::ShortLength, 2, "wrote 1 of");
}

#[test]
fn status_left_unwritten() {
    used_ring_fault(EmulatedFault::StatusUnwritten, 2, "without writing its status");
}

#[test]
fn a_completion_before_the_work_is_done_never_corrupts_later_requests() {
    // Requests stay on the device for 20 ms, long enough for late writes to land on them.
    let config = EmulatedConfig { data_queues: 1, latency: Duration::from_millis(20), ..Default::default() };
    let mut r = rig_with(config, CompletionMode::Poll);
    r.t.inject(EmulatedFault::EarlyCompletion);
    let first = r.submit_host(256);
    // No status, or (if the device's late write got there first) a status that does not exist.
    device_failed(&r.wait(&[first])[0], "status");
    // The slot of that request, and its buffers, must not be reused while the device may
    // still write them: later requests are right, or fail with the device.
    for _ in 0..20 {
        let ids: Vec<u64> = (0..4)
            .filter_map(|_| r.submit(Buf::Host(plain(r.next.load(Ordering::Relaxed), 256))).ok())
            .collect();
        for c in r.wait(&ids) {
            match &c.result {
                Ok(()) => r.check_ok(&c),
                Err(Error::Device(DeviceError::Failed(_) | DeviceError::NotRun(_))) => {}
                Err(e) => panic!("request {}: {e} (a late device write reached it)", c.request.user_data),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    r.assert_recovered();
    r.report();
}

#[test]
fn answer_after_the_timeout() {
    let mut r = rig(CompletionMode::Interrupt);
    r.t.inject(EmulatedFault::AnswerAfter(TIMEOUT * 4));
    let ids = [r.submit_host(256), r.submit_host(256)];
    for c in r.wait(&ids) {
        device_failed(&c, "no completion");
    }
    r.assert_recovered();
    r.report();
}

// ---- Item 4: a reset that does not complete ------------------------------------------------

/// Each request failed with `why`, and its buffer holds what it held when it came back.
fn unchanged_since_hand_back(back: &[Completion<DeviceSession>], snapshot: &[Vec<u8>], why: &str) {
    for (c, before) in back.iter().zip(snapshot) {
        device_failed(c, why);
        assert_eq!(
            c.request.data.as_slice(),
            &before[..],
            "the device wrote a buffer after it was handed back"
        );
    }
}

#[test]
fn a_device_that_ignores_reset_is_stopped_by_flr_before_buffers_go_back() {
    let mut r = rig(CompletionMode::Poll);
    r.t.inject(EmulatedFault::NeverAnswer);
    let ids = r.submit_dma(4);
    std::thread::sleep(Duration::from_millis(50));
    r.t.inject(EmulatedFault::IgnoreReset { flr_too: false });
    let back = r.wait(&ids);
    let snapshot: Vec<Vec<u8>> = back.iter().map(|c| c.request.data.as_slice().to_vec()).collect();
    assert!(r.t.stats().late_writes > 0, "the device kept writing after the reset it ignored");
    std::thread::sleep(Duration::from_millis(300));
    unchanged_since_hand_back(&back, &snapshot, "no completion");
    r.assert_recovered();
    r.report();
}

#[test]
fn a_device_that_ignores_every_reset_loses_its_dma_mappings_and_is_given_up() {
    let mut r = rig(CompletionMode::Poll);
    r.t.inject(EmulatedFault::NeverAnswer);
    let ids = r.submit_dma(4);
    std::thread::sleep(Duration::from_millis(50));
    r.t.inject(EmulatedFault::IgnoreReset { flr_too: true });
    let back = r.wait(&ids);
    let snapshot: Vec<Vec<u8>> = back.iter().map(|c| c.request.data.as_slice().to_vec()).collect();
    let faults_then = r.t.stats().iommu_faults;
    std::thread::sleep(Duration::from_millis(300));
    unchanged_since_hand_back(&back, &snapshot, "ignored a reset");
    assert!(r.t.stats().iommu_faults > faults_then, "the IOMMU must have blocked the late writes");
    assert!(!r.dev.wait_working(Duration::from_secs(1)), "a device that will not stop is not used again");
    match r.submit(Buf::Host(vec![0; 64])) {
        Err(Error::Device(DeviceError::Failed(why))) => assert!(why.contains("ignored a reset"), "{why}"),
        other => panic!("{other:?}"),
    }
    r.report();
}

// ---- Item 3: the control queue --------------------------------------------------------------

#[test]
fn a_late_create_session_answer_never_gives_a_session_the_wrong_key() {
    let mut r = rig(CompletionMode::Poll);
    r.t.inject(EmulatedFault::CtrlLate(TIMEOUT * 2));
    let key_x = [0x11u8; 32];
    let key_y = [0x77u8; 32];
    match r.dev.create_session(Mode::Ctr, &key_x) {
        Err(Error::Device(DeviceError::Timeout(..))) => {}
        other => panic!("expected a control timeout, got {other:?}"),
    }
    // The next session must be created (after the reset and recovery) under its own key.
    let y = r.dev.create_session(Mode::Ctr, &key_y).expect("a session after the control timeout");
    let id = r.next.fetch_add(1, Ordering::Relaxed);
    let req = Request::new(y, Direction::Encrypt, Iv::from(iv(id)), Buf::Host(plain(id, 256)), id);
    r.checker.begin_submit(0, id);
    let s = r.q.submit(req, true);
    r.checker.submitted(id, &s);
    s.unwrap();
    let c = r.wait(&[id]).remove(0);
    c.result.as_ref().unwrap();
    let mut want = plain(id, 256);
    new_cipher(CoreKind::Reference, Mode::Ctr, &key_y)
        .unwrap()
        .encrypt(&iv(id), &[], &mut want, &mut [])
        .unwrap();
    assert_eq!(c.request.data.as_slice(), &want[..], "the session encrypts under another key");
    // And the session from before the failure still works, re-created from its key.
    r.assert_recovered();
    r.report();
}

#[test]
fn a_control_answer_late_during_a_recovery_from_a_device_that_ignores_every_reset_revokes_its_dma() {
    // A control timeout during the re-creation of sessions leaves the key in the control
    // buffer the device may still answer into; a device that then ignores the reset and the
    // FLR must lose its DMA mappings and be given up, never have the buffer reused.
    let mut r = rig(CompletionMode::Poll);
    let late = TIMEOUT * 6;
    r.t.inject(EmulatedFault::NeverAnswer);
    r.t.inject(EmulatedFault::CtrlLate(late));
    let armed = r.t.stats().faults_injected;
    let id = r.submit_host(64);
    device_failed(&r.wait(&[id])[0], "no completion");
    // The recovery's first control request (re-creating the session) is the late one.
    let start = Instant::now();
    while r.t.stats().faults_injected == armed {
        assert!(start.elapsed() < PATIENCE, "the recovery sent no control request");
        std::thread::sleep(Duration::from_millis(1));
    }
    r.t.inject(EmulatedFault::IgnoreReset { flr_too: true });
    let faults_then = r.t.stats().iommu_faults;
    let start = Instant::now();
    loop {
        let why = r.dev.failure().unwrap_or_default();
        if why.contains("ignored a reset") {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "not given up; failure: {why:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The late answer comes after the mappings are gone: the IOMMU blocks it.
    let start = Instant::now();
    while r.t.stats().iommu_faults == faults_then {
        assert!(start.elapsed() < PATIENCE, "the late control answer reached memory");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!r.dev.wait_working(Duration::from_secs(1)), "a device that will not stop is not used again");
    match r.submit(Buf::Host(vec![0; 64])) {
        Err(Error::Device(DeviceError::Failed(why))) => assert!(why.contains("ignored a reset"), "{why}"),
        other => panic!("{other:?}"),
    }
    r.report();
}

#[test]
fn a_session_destroyed_during_a_recovery_never_runs_under_another_sessions_key() {
    // The device reuses session ids (as QEMU's does), so ids a handle kept from before a reset
    // may name another session: the driver must never send them.
    let mut r = rig(CompletionMode::Poll);
    let key_b = [0x21u8; 32];
    let key_c = [0x5cu8; 32];
    let doomed = r.dev.create_session(Mode::Ctr, &key_b).unwrap();
    r.t.inject(EmulatedFault::ReuseSessionIds);
    r.t.inject(EmulatedFault::NeverAnswer);
    // Holds the first recovery attempt in its first control request while `doomed` is destroyed.
    r.t.inject(EmulatedFault::CtrlLate(TIMEOUT * 2));
    let armed = r.t.stats().faults_injected;
    let id = r.submit_host(64);
    device_failed(&r.wait(&[id])[0], "no completion");
    let _ = r.dev.destroy_session(&doomed);
    assert!(r.t.stats().faults_injected > armed, "the recovery never met the late control answer");
    r.t.clear_faults();
    r.t.inject(EmulatedFault::ReuseSessionIds);
    assert!(r.dev.wait_working(PATIENCE), "not recovered: {:?}", r.dev.failure());
    // Takes the lowest free ids: those `doomed` had before the reset, or after it.
    let c = r.dev.create_session(Mode::Ctr, &key_c).unwrap();
    let encrypt = |session: &DeviceSession, r: &mut Rig| {
        let id = r.next.fetch_add(1, Ordering::Relaxed);
        let req = Request::new(
            session.clone(),
            Direction::Encrypt,
            Iv::from(iv(id)),
            Buf::Host(plain(id, 256)),
            id,
        );
        r.checker.begin_submit(0, id);
        let s = r.q.submit(req, true);
        r.checker.submitted(id, &s);
        match s {
            Ok(_) => {
                let done = r.wait(&[id]).remove(0);
                (id, done.result.map(|()| done.request.data.as_slice().to_vec()))
            }
            Err(e) => match e.kind {
                SubmitErrorKind::Rejected(e) => (id, Err(e)),
                SubmitErrorKind::Busy => panic!("busy with backlog allowed"),
            },
        }
    };
    let under = |key: &[u8], id: u64| {
        let mut want = plain(id, 256);
        new_cipher(CoreKind::Reference, Mode::Ctr, key)
            .unwrap()
            .encrypt(&iv(id), &[], &mut want, &mut [])
            .unwrap();
        want
    };
    let (id, got) = encrypt(&doomed, &mut r);
    match got {
        Err(Error::Crypto(CryptoError::InvalidSession)) => {}
        Ok(data) => {
            assert_ne!(data, under(&key_c, id), "a destroyed session ran under another session's key");
            panic!("a destroyed session ran");
        }
        Err(e) => panic!("expected InvalidSession, got {e}"),
    }
    let (id, got) = encrypt(&c, &mut r);
    assert_eq!(got.unwrap(), under(&key_c, id), "the new session runs under its own key");
    r.assert_recovered();
    r.report();
}

// ---- Item 9: configuration and open ---------------------------------------------------------

#[test]
fn a_config_generation_that_never_settles_fails_open_cleanly() {
    for mode in [CompletionMode::Poll, CompletionMode::Interrupt] {
        let t = Arc::new(EmulatedTransport::new(EmulatedConfig::default()).unwrap());
        t.inject(EmulatedFault::ConfigGenerationUnsettled);
        let options = DeviceOptions { completion: mode, ..Default::default() };
        match VirtioCrypto::open(t.clone() as Arc<dyn Transport>, &options) {
            Err(Error::Device(DeviceError::ConfigUnsettled { attempts })) => assert!(attempts > 1),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened a device whose configuration never settles"),
        }
        let pci = VirtioPci::probe(t.clone() as Arc<dyn Transport>).unwrap();
        assert_eq!(pci.status(), 0x80, "{mode:?}: the device is left reset and FAILED");
    }
}

#[test]
fn a_failed_open_leaves_the_device_reset_and_failed() {
    let t = Arc::new(EmulatedTransport::new(EmulatedConfig::default()).unwrap());
    let options =
        DeviceOptions { completion: CompletionMode::Interrupt, queue_size: 3, ..Default::default() };
    assert!(matches!(
        VirtioCrypto::open(t.clone() as Arc<dyn Transport>, &options),
        Err(Error::Device(DeviceError::Init(_)))
    ));
    let pci = VirtioPci::probe(t.clone() as Arc<dyn Transport>).unwrap();
    assert_eq!(pci.status(), 0x80, "status left behind");
}

// ---- Item 2 through the volume ------------------------------------------------------------------

#[test]
fn a_volume_keeps_serving_after_a_recovered_failure() {
    let options = DeviceOptions { request_timeout: TIMEOUT, ..Default::default() };
    let (dev, t) = common::device_with(EmulatedConfig::default(), &options);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    let f =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(29) ^ 0x5a).collect();
    let params = VolumeParams { sector_size: 512, ..VolumeParams::plain("aes-xts-plain64".parse().unwrap()) };
    let v = Volume::open(Arc::new(dev), f, true, &key, params).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 13) as u8).collect();
    v.write_at(0, &data).unwrap();
    t.inject(EmulatedFault::NeverAnswer);
    let mut buf = vec![0u8; 65536];
    assert!(v.read_at(0, &mut buf).is_err(), "the read during the failure fails");
    t.clear_faults();
    assert!(v.engine().wait_working(PATIENCE));
    v.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, data);
    v.write_at(4096, &data[..4096]).unwrap();
    v.read_at(4096, &mut buf[..4096]).unwrap();
    assert_eq!(&buf[..4096], &data[..4096]);
}
