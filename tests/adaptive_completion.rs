//! Adaptive completion (`CompletionMode::Adaptive`, the command line's default): callers and the
//! emulated device's workers spin for a bounded budget and then sleep, so these tests make them
//! sleep (an idle gap, a device that answers late) and check that every request still completes
//! without anyone polling, and that a future waiting for such an engine does not wake itself.
//!
//! Nothing here is timed: the waits are bounds that turn a hang (a lost wake-up) into a failure.

mod common;

use std::fs::OpenOptions;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use crypt_vfio::engine::{Buf, Direction, Engine, Event, Iv, Request, Submitted};
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedFault};
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions, DeviceSession};
use crypt_vfio::volume::{Volume, VolumeParams};
use crypt_vfio::{CoreKind, Mode};
use crypt_vfio_cores::new_cipher;

const KEY: [u8; 32] = [0x24; 32];
/// Only a bound on a wait that must end; never expected to be reached.
const PATIENCE: Duration = Duration::from_secs(30);
/// Longer than every spin budget (tens of microseconds) on any machine: the device's worker and
/// the driver's completion thread are asleep at its end.
const IDLE_GAP: Duration = Duration::from_millis(50);

fn adaptive() -> DeviceOptions {
    DeviceOptions { completion: CompletionMode::Adaptive, data_queues: 1, ..DeviceOptions::default() }
}

/// Completions delivered to a queue's callback, and a way to sleep until they arrive.
#[derive(Default)]
struct Inbox {
    done: Mutex<Vec<(u64, Vec<u8>)>>,
    arrived: Condvar,
}

impl Inbox {
    /// Sleeps (never polling the queue) until `n` completions arrived; fails after PATIENCE.
    fn wait_for(&self, n: usize) -> Vec<(u64, Vec<u8>)> {
        let done = self.done.lock().unwrap();
        let (mut done, timeout) = self.arrived.wait_timeout_while(done, PATIENCE, |d| d.len() < n).unwrap();
        assert!(!timeout.timed_out(), "only {} of {n} completions arrived: a wake-up was lost", done.len());
        std::mem::take(&mut *done)
    }
}

/// A queue of `dev` whose completions go to the returned inbox.
fn inbox_queue(
    dev: &crypt_vfio::virtio_crypto::VirtioCrypto,
) -> (Arc<Inbox>, Box<dyn crypt_vfio::engine::Queue<DeviceSession>>) {
    let inbox = Arc::new(Inbox::default());
    let sink = inbox.clone();
    let q = dev
        .open_queue(
            0,
            Arc::new(move |ev: Event<DeviceSession>| {
                if let Event::Completed(c) = ev {
                    c.result.expect("request failed");
                    sink.done.lock().unwrap().push((c.request.user_data, c.request.data.as_slice().to_vec()));
                    sink.arrived.notify_all();
                }
            }),
        )
        .unwrap();
    (inbox, q)
}

/// Waits (without reaping) until the device has published `n` data completions in all.
fn wait_published(t: &crypt_vfio::transport::emulated::EmulatedTransport, n: u64) {
    let start = std::time::Instant::now();
    while t.stats().data_completed < n {
        assert!(start.elapsed() < PATIENCE, "the device never answered");
        std::thread::yield_now();
    }
}

#[test]
fn a_polling_caller_takes_no_interrupts() {
    let (dev, t) = common::device_with(EmulatedConfig { data_queues: 1, ..Default::default() }, &adaptive());
    let (inbox, mut q) = inbox_queue(&dev);
    let session = dev.create_session(Mode::Ctr, &KEY).unwrap();
    // The completion thread armed the interrupt when it found the queue idle.
    std::thread::sleep(IDLE_GAP);
    q.begin_polling();
    let before = t.stats().interrupts;
    let mut expected = 0;
    for round in 0..20u64 {
        submit_batch(&mut *q, &session, 100 * round, 8);
        expected += 8;
        // Reaped by this caller alone: nothing may raise an interrupt meanwhile.
        wait_published(&t, expected);
        while q.outstanding() > 0 {
            q.poll();
        }
    }
    assert_eq!(t.stats().interrupts, before, "the device interrupted a caller that polls");
    check(inbox.wait_for(expected as usize));
    // Handed back: a sleeping caller is woken by the completion thread again.
    assert!(q.end_polling());
    submit_batch(&mut *q, &session, 10_000, 4);
    check(inbox.wait_for(4));
}

#[test]
fn a_caller_that_stops_polling_is_told_of_completions_the_interrupt_missed() {
    let (dev, t) = common::device_with(EmulatedConfig { data_queues: 1, ..Default::default() }, &adaptive());
    let (inbox, mut q) = inbox_queue(&dev);
    let session = dev.create_session(Mode::Ctr, &KEY).unwrap();
    for round in 0..20u64 {
        q.begin_polling();
        submit_batch(&mut *q, &session, 100 * round, 1);
        // Published while the interrupt was unarmed and before it is armed again: no interrupt
        // will come for it, so `end_polling` must say so instead of letting the caller sleep.
        wait_published(&t, round + 1);
        let sleep_ok = q.end_polling();
        assert!(!sleep_ok || q.outstanding() == 0, "round {round}: a completion would be slept through");
        if !sleep_ok {
            q.poll();
        }
        check(inbox.wait_for(1));
    }
}

fn submit_batch(
    q: &mut dyn crypt_vfio::engine::Queue<DeviceSession>,
    session: &DeviceSession,
    first: u64,
    n: u64,
) {
    for id in first..first + n {
        let data = Buf::Host(vec![id as u8; 4096]);
        let req = Request::new(session.clone(), Direction::Encrypt, iv(id), data, id);
        assert!(matches!(q.submit(req, true), Ok(Submitted::InProgress | Submitted::Backlogged)));
    }
}

fn iv(id: u64) -> Iv {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&id.to_le_bytes());
    Iv::new(&b).unwrap()
}

fn check(results: Vec<(u64, Vec<u8>)>) {
    let reference = new_cipher(CoreKind::Fast, Mode::Ctr, &KEY).unwrap();
    for (id, got) in results {
        let mut expect = vec![id as u8; 4096];
        reference.encrypt(iv(id).as_slice(), &[], &mut expect, &mut []).unwrap();
        assert!(got == expect, "request {id}: wrong ciphertext");
    }
}

#[test]
fn requests_after_an_idle_gap_complete_without_polling_even_when_the_device_answers_late() {
    let (dev, t) = common::device_with(EmulatedConfig { data_queues: 1, ..Default::default() }, &adaptive());
    assert!(dev.delivers_events());
    let inbox = Arc::new(Inbox::default());
    let sink = inbox.clone();
    let mut q = dev
        .open_queue(
            0,
            Arc::new(move |ev: Event<DeviceSession>| {
                if let Event::Completed(c) = ev {
                    c.result.expect("request failed");
                    sink.done.lock().unwrap().push((c.request.user_data, c.request.data.as_slice().to_vec()));
                    sink.arrived.notify_all();
                }
            }),
        )
        .unwrap();
    let session = dev.create_session(Mode::Ctr, &KEY).unwrap();

    // Answered at once, while everybody spins.
    submit_batch(&mut *q, &session, 0, 32);
    check(inbox.wait_for(32));
    for round in 0..5u64 {
        // Everybody goes to sleep: the next doorbell must wake the device's worker and its
        // completion must wake the driver's completion thread.
        std::thread::sleep(IDLE_GAP);
        submit_batch(&mut *q, &session, 100 * (round + 1), 1 + round * 7);
        check(inbox.wait_for(1 + round as usize * 7));
    }
    // A device that answers later than any spin budget: the driver sleeps on the interrupt.
    t.inject(EmulatedFault::AnswerAfter(Duration::from_millis(20)));
    for round in 0..3u64 {
        submit_batch(&mut *q, &session, 1000 * (round + 1), 16);
        check(inbox.wait_for(16));
        std::thread::sleep(IDLE_GAP);
    }
    t.clear_faults();
}

/// Counts wake-ups and unparks the test thread.
struct CountingWaker {
    wakes: AtomicUsize,
    thread: std::thread::Thread,
}

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// A plain aes-xts-plain64 volume of `len` bytes in `dir`, with 512-byte sectors, on `dev`.
fn xts_volume(
    dev: Arc<crypt_vfio::virtio_crypto::VirtioCrypto>,
    dir: &std::path::Path,
    len: u64,
) -> Volume<crypt_vfio::virtio_crypto::VirtioCrypto> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("v.img"))
        .unwrap();
    f.set_len(len).unwrap();
    let params = VolumeParams { sector_size: 512, ..VolumeParams::plain("aes-xts-plain64".parse().unwrap()) };
    let key: Vec<u8> = (0..64u8).collect();
    Volume::open(dev, f, true, &key, params).unwrap()
}

#[test]
fn a_volume_future_waits_for_its_waker_instead_of_waking_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, t) = common::device_with(EmulatedConfig { data_queues: 1, ..Default::default() }, &adaptive());
    let v = xts_volume(Arc::new(dev), dir.path(), 64 << 10);
    let data = vec![0x5au8; 4096];
    v.write_at(0, &data).unwrap();

    // Answers only after a while: until then nothing may wake the future.
    t.inject(EmulatedFault::AnswerAfter(Duration::from_secs(2)));
    let counter = Arc::new(CountingWaker { wakes: AtomicUsize::new(0), thread: std::thread::current() });
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let mut back = vec![0u8; 4096];
    let result = {
        let mut fut = pin!(v.read_at_async(0, &mut back));
        let mut polls = 0;
        loop {
            let before = counter.wakes.load(Ordering::SeqCst);
            polls += 1;
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(r) => break r,
                Poll::Pending => {
                    if polls == 1 {
                        // The device holds the requests for seconds: a wake-up now can only be the
                        // future waking itself (a busy loop for its executor).
                        assert_eq!(counter.wakes.load(Ordering::SeqCst), before, "the future woke itself");
                    }
                    while counter.wakes.load(Ordering::SeqCst) == before {
                        std::thread::park_timeout(PATIENCE);
                    }
                }
            }
            assert!(polls < 10_000, "the future was woken {polls} times: it busy-loops");
        }
    };
    result.unwrap();
    t.clear_faults();
    assert_eq!(back, data);
}

#[test]
fn an_async_queue_opened_on_any_engine_leaves_delivery_to_an_interrupt_device() {
    let (dev, _t) = common::device_with(EmulatedConfig { data_queues: 1, ..Default::default() }, &adaptive());
    let engine = crypt_vfio::AnyEngine::from(dev);
    // `AsyncQueue::open` chooses from this: an adaptive device delivers on its own thread.
    assert!(engine.delivers_events());
    let q = crypt_vfio::engine::async_api::AsyncQueue::open(&engine, 0).unwrap();
    let session = engine.create_session(Mode::Ctr, &KEY).unwrap();
    let data = Buf::Host(vec![7u8; 4096]);
    let (done, result) =
        futures::executor::block_on(q.run(Request::new(session, Direction::Encrypt, iv(7), data, 0)));
    result.unwrap();
    let mut expect = vec![7u8; 4096];
    new_cipher(CoreKind::Fast, Mode::Ctr, &KEY)
        .unwrap()
        .encrypt(iv(7).as_slice(), &[], &mut expect, &mut [])
        .unwrap();
    assert!(done.data.as_slice() == expect.as_slice());
}

#[test]
fn a_volume_hands_reaping_back_to_the_completion_thread_after_each_io() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, _t) = common::device_with(EmulatedConfig { data_queues: 1, ..Default::default() }, &adaptive());
    let dev = Arc::new(dev);
    let v = xts_volume(dev.clone(), dir.path(), 256 << 10);
    let data: Vec<u8> = (0..128 << 10).map(|i: u32| (i * 7) as u8).collect();
    v.write_at(0, &data).unwrap();
    // Blocking I/Os of a few sectors (the op polls the device queue while it waits) and of many
    // (it sleeps at first, then polls for the last ones).
    for (i, len) in [4096usize, 512, 128 << 10, 8192, 4096].into_iter().cycle().take(25).enumerate() {
        let mut back = vec![0u8; len];
        v.read_at(0, &mut back).unwrap();
        assert!(back == data[..len], "read {i}: wrong plaintext");
    }
    // Another handle on the same device queue, whose caller never polls: its completions come
    // only if the volume's last op gave the reaping back to the completion thread.
    let (inbox, mut q) = inbox_queue(&dev);
    let session = dev.create_session(Mode::Ctr, &KEY).unwrap();
    submit_batch(&mut *q, &session, 0, 8);
    check(inbox.wait_for(8));
}

#[test]
fn a_blocking_volume_io_sleeps_through_a_device_that_answers_late() {
    // 128 sectors on the device at once: the op sleeps (its long wait) while the device holds
    // them longer than every park and spin of the driver, and still gets every sector back.
    let dir = tempfile::tempdir().unwrap();
    let (dev, t) = common::device_with(EmulatedConfig { data_queues: 1, ..Default::default() }, &adaptive());
    let v = xts_volume(Arc::new(dev), dir.path(), 256 << 10);
    let data: Vec<u8> = (0..64 << 10).map(|i: u32| (i * 13) as u8).collect();
    v.write_at(0, &data).unwrap();
    t.inject(EmulatedFault::AnswerAfter(Duration::from_millis(300)));
    for round in 0..3 {
        let mut back = vec![0u8; data.len()];
        v.read_at(0, &mut back).unwrap();
        assert!(back == data, "round {round}: wrong plaintext");
        std::thread::sleep(IDLE_GAP);
    }
    t.clear_faults();
}
