//! Model checks (loom) of the engine's concurrent hand-offs, on the real code: event delivery
//! ([`Delivery`]), submit/reap/promote around a data queue's [`Backlog`] (one request at a time
//! and in batches), the async API's handling of a `Promoted` that races with its `Backlogged`,
//! and the sleep gate of adaptive waiting ([`SleepGate`]: announce the sleep, re-check, park; the
//! doorbell fences and checks), and three of the engine pool's hand-offs. Those three model the
//! pool, they do not run it: the pool's own [`Credit`](crypt_vfio::testing::Credit) and the real
//! [`Backlog`] (with its re-run lane) are under loom, but the member ring, the member's reaper
//! and the pool queue's completion handler (`PoolQueueShared::member_completed`) are stand-ins
//! written here with the same steps (take a credit, place; free, give back; on NotRun, re-run
//! under the queue lock and promote; the kicker's pass against a completion on another pool
//! queue). The pool queue itself (its `Mutex`, member handles and monitor) is too large for
//! loom; its lock discipline is what keeps it out: the pool has no lock-free stage/flush step,
//! members are called under the pool queue's lock, and their callbacks take it and are never
//! called under it.
//!
//! Run with `cargo test --features loom-model --test loom_models` (the feature builds the
//! engine's synchronisation on loom's types; see `src/engine/sync.rs`). With
//! `--features loom-weak-delivery` the delivery hand-off loses its SeqCst fences, and
//! `delivery_never_strands_an_event` finds the lost event.

#![cfg(feature = "loom-model")]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crypt_vfio::engine::async_api::AsyncQueue;
use crypt_vfio::engine::contract::ContractChecker;
use crypt_vfio::engine::{
    BatchSubmitted, Buf, Completion, Direction, Engine, Event, EventSink, Iv, Queue, Request, SubmitError,
    Submitted,
};
use crypt_vfio::testing::backlog::{self, Backlog, Ring};
use crypt_vfio::testing::{Delivery, Outbox};
use crypt_vfio::{Error, Mode, Result};
use crypt_vfio_wait::SleepGate;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Mutex;
use loom::thread;

/// One queue's outbox and its delivery protocol, as a data queue holds them.
struct Outboxed {
    delivery: Delivery,
    outbox: Mutex<Outbox<()>>,
}

impl Outboxed {
    fn new() -> Self {
        Self { delivery: Delivery::default(), outbox: Mutex::new(Vec::new()) }
    }

    fn deliver(&self) -> usize {
        let mut scratch = Vec::new();
        self.delivery.run(&mut scratch, |s| std::mem::swap(&mut *self.outbox.lock().unwrap(), s))
    }
}

#[test]
fn delivery_never_strands_an_event() {
    // Two producers each add one event under the queue lock and try to deliver. Whatever the
    // interleaving and whatever stale values the memory model allows, both events are
    // delivered before both have returned: nobody polls again to rescue a stranded one.
    loom::model(|| {
        let q = Arc::new(Outboxed::new());
        let delivered = Arc::new(AtomicUsize::new(0));
        let sink: EventSink<()> = {
            let delivered = delivered.clone();
            Arc::new(move |_| {
                delivered.fetch_add(1, Ordering::Relaxed);
            })
        };
        let producers: Vec<_> = (0..2u64)
            .map(|id| {
                let (q, sink) = (q.clone(), sink.clone());
                thread::spawn(move || {
                    {
                        let mut outbox = q.outbox.lock().unwrap();
                        outbox.push((sink, Event::Promoted { user_data: id }));
                        q.delivery.mark_pending();
                    }
                    q.deliver();
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(delivered.load(Ordering::Relaxed), 2, "an event was left in the outbox");
    });
}

/// A ring of one slot holding request ids.
#[derive(Default)]
struct OneSlot(Option<u64>);

impl Ring<u64> for OneSlot {
    fn has_space(&self) -> bool {
        self.0.is_none()
    }
    fn push(&mut self, item: u64) -> std::result::Result<(), (u64, Error)> {
        self.0 = Some(item);
        Ok(())
    }
}

/// The backlog's promotions as events in the queue's outbox.
struct ToEvents<'a>(&'a mut Outbox<()>, &'a EventSink<()>);

impl backlog::Outbox<u64> for ToEvents<'_> {
    fn promoted(&mut self, item: &u64) {
        self.0.push((self.1.clone(), Event::Promoted { user_data: *item }));
    }
    fn failed(&mut self, item: u64, error: Error) {
        self.0.push((self.1.clone(), Event::Completed(completion(item, Err(error)))));
    }
}

fn completion(id: u64, result: Result<()>) -> Completion<()> {
    Completion {
        request: Request::new((), Direction::Encrypt, Iv::default(), Buf::Host(Vec::new()), id),
        result,
    }
}

struct DataQueue {
    state: Mutex<(Backlog<u64>, OneSlot)>,
    out: Outboxed,
}

/// A one-slot data queue with a backlog of 8, the contract checker, and a sink that shows the
/// checker every event.
fn checked_one_slot_queue() -> (Arc<ContractChecker>, Arc<DataQueue>, EventSink<()>) {
    let checker = Arc::new(ContractChecker::new());
    let q = Arc::new(DataQueue {
        state: Mutex::new((Backlog::new(8), OneSlot::default())),
        out: Outboxed::new(),
    });
    let sink: EventSink<()> = {
        let checker = checker.clone();
        Arc::new(move |ev| checker.event(&ev))
    };
    (checker, q, sink)
}

impl DataQueue {
    /// The reaper: completes what is on the ring, promotes from the backlog, delivers.
    fn reap(&self, sink: &EventSink<()>) {
        {
            let mut st = self.state.lock().unwrap();
            let (backlog, ring) = &mut *st;
            let mut outbox = self.out.outbox.lock().unwrap();
            if let Some(id) = ring.0.take() {
                outbox.push((sink.clone(), Event::Completed(completion(id, Ok(())))));
            }
            backlog.promote(ring, &mut ToEvents(&mut outbox, sink));
            self.out.delivery.mark_pending();
        }
        self.out.deliver();
    }
}

#[test]
fn submit_reap_and_promote_keep_the_contract() {
    // A submitter pushes three requests (backlog allowed) through a one-slot ring while a
    // reaper completes and promotes; ContractChecker judges every interleaving: one Promoted per
    // backlogged request, before its completion, FIFO, every request completed exactly once,
    // no newer InProgress completed before an older backlogged request's Promoted.
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let (checker, q, sink) = checked_one_slot_queue();
        let submitter = {
            let (q, checker) = (q.clone(), checker.clone());
            thread::spawn(move || {
                for id in 1..=3u64 {
                    checker.begin_submit(0, id);
                    let r = {
                        let mut st = q.state.lock().unwrap();
                        let (backlog, ring) = &mut *st;
                        backlog.submit(id, true, ring)
                    };
                    let r: std::result::Result<Submitted, SubmitError<()>> = match r {
                        Ok(s) => Ok(s),
                        Err((id, _)) => Err(SubmitError::busy(Request::new(
                            (),
                            Direction::Encrypt,
                            Iv::default(),
                            Buf::Host(Vec::new()),
                            id,
                        ))),
                    };
                    checker.submitted(id, &r);
                    q.out.deliver();
                }
            })
        };
        let reaper = {
            let (q, sink) = (q.clone(), sink.clone());
            thread::spawn(move || q.reap(&sink))
        };
        submitter.join().unwrap();
        reaper.join().unwrap();
        // Drain what is left, as later polls would.
        for _ in 0..4 {
            q.reap(&sink);
        }
        let report = checker.report();
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(report.completed, 3);
    });
}

#[test]
fn a_batch_that_half_fits_keeps_the_contract() {
    // A submitter hands a batch of three to a one-slot ring under one lock (the first fits, the
    // rest are backlogged behind it, in order) while a reaper completes and promotes; then one
    // more request. Every interleaving: one Promoted per backlogged request, in batch order and
    // before its completion, and the later request does not overtake the backlog.
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let (checker, q, sink) = checked_one_slot_queue();
        let submitter = {
            let (q, checker) = (q.clone(), checker.clone());
            thread::spawn(move || {
                for ids in [&[1u64, 2, 3][..], &[4]] {
                    checker.begin_batch(0, ids);
                    let r = {
                        let mut st = q.state.lock().unwrap();
                        let (backlog, ring) = &mut *st;
                        backlog.submit_batch(ids.iter().copied(), true, ring)
                    };
                    assert!(r.refused.is_none(), "the backlog has room");
                    let r = BatchSubmitted {
                        in_progress: r.in_progress,
                        backlogged: r.backlogged,
                        refused: None,
                    };
                    checker.submitted_batch(ids, &r);
                    q.out.deliver();
                }
            })
        };
        let reaper = {
            let (q, sink) = (q.clone(), sink.clone());
            thread::spawn(move || q.reap(&sink))
        };
        submitter.join().unwrap();
        reaper.join().unwrap();
        for _ in 0..5 {
            q.reap(&sink);
        }
        let report = checker.report();
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(report.completed, 4);
    });
}

/// An engine whose first request is backlogged and then promoted and completed by a "device"
/// thread, racing with the submitter; later requests go in progress and complete at once.
struct RacingEngine {
    sink: Arc<Mutex<Option<EventSink<()>>>>,
    backlogged: Arc<Mutex<Option<Request<()>>>>,
    submits: Arc<AtomicUsize>,
}

struct RacingQueue {
    sink: EventSink<()>,
    backlogged: Arc<Mutex<Option<Request<()>>>>,
    submits: Arc<AtomicUsize>,
}

impl Queue<()> for RacingQueue {
    fn submit(
        &mut self,
        request: Request<()>,
        _may_backlog: bool,
    ) -> std::result::Result<Submitted, SubmitError<()>> {
        if self.submits.fetch_add(1, Ordering::SeqCst) == 0 {
            *self.backlogged.lock().unwrap() = Some(request);
            Ok(Submitted::Backlogged)
        } else {
            (self.sink)(Event::Completed(Completion { request, result: Ok(()) }));
            Ok(Submitted::InProgress)
        }
    }
    fn poll(&mut self) -> usize {
        0
    }
    fn outstanding(&self) -> usize {
        0
    }
}

impl Engine for RacingEngine {
    type Session = ();
    fn describe(&self) -> String {
        "loom racing engine".into()
    }
    fn create_session(&self, _: Mode, _: &[u8]) -> Result<()> {
        Ok(())
    }
    fn destroy_session(&self, _: &()) -> Result<()> {
        Ok(())
    }
    fn queue_count(&self) -> usize {
        1
    }
    fn open_queue(&self, _: usize, sink: EventSink<()>) -> Result<Box<dyn Queue<()>>> {
        *self.sink.lock().unwrap() = Some(sink.clone());
        Ok(Box::new(RacingQueue { sink, backlogged: self.backlogged.clone(), submits: self.submits.clone() }))
    }
    fn max_request_len(&self) -> usize {
        1 << 20
    }
}

fn noop_request() -> Request<()> {
    Request::new((), Direction::Encrypt, Iv::default(), Buf::Host(vec![0; 16]), 0)
}

#[test]
fn async_api_promoted_before_or_after_backlogged_never_blocks_the_queue() {
    loom::model(|| {
        let engine = RacingEngine {
            sink: Arc::new(Mutex::new(None)),
            backlogged: Arc::new(Mutex::new(None)),
            submits: Arc::new(AtomicUsize::new(0)),
        };
        let q = AsyncQueue::new(&engine, 0, false).unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        // The device: promotes then completes the backlogged request as soon as it sees it.
        let device = {
            let (sink, backlogged) = (engine.sink.clone(), engine.backlogged.clone());
            thread::spawn(move || loop {
                let taken = backlogged.lock().unwrap().take();
                if let Some(req) = taken {
                    let sink = sink.lock().unwrap().clone().expect("queue open");
                    sink(Event::Promoted { user_data: req.user_data });
                    sink(Event::Completed(Completion { request: req, result: Ok(()) }));
                    return;
                }
                thread::yield_now();
            })
        };
        let mut first = q.run(noop_request());
        // Submits (Backlogged); the device's Promoted may come before or after it is recorded.
        let _ = Pin::new(&mut first).poll(&mut cx);
        device.join().unwrap();
        // Everything about the first request has been said: the next one must go straight to
        // the engine, and the first must resolve.
        let mut second = q.run(noop_request());
        let _ = Pin::new(&mut second).poll(&mut cx);
        assert_eq!(engine.submits.load(Ordering::SeqCst), 2, "the second request was held back forever");
        assert!(matches!(Pin::new(&mut second).poll(&mut cx), Poll::Ready((_, Ok(())))));
        assert!(matches!(Pin::new(&mut first).poll(&mut cx), Poll::Ready((_, Ok(())))));
        drop((first, second));
        assert_eq!(q.tracked(), 0);
    });
}

/// The emulated device's worker going to sleep while the driver rings its doorbell: the worker
/// announces the sleep on its gate, re-checks the ring (here an atomic standing for the avail
/// index) and parks; the driver publishes and then notifies. In every interleaving the worker
/// ends up seeing the work: either its re-check finds it, or the notification unparks it.
/// With the re-check taken out of `SleepGate::sleep_unless`, loom finds the interleaving where
/// the work is published before the announcement and the worker parks for ever (a deadlock).
#[test]
fn sleep_gate_never_sleeps_through_a_doorbell() {
    loom::model(|| {
        let gate = Arc::new(SleepGate::new());
        let avail = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let (g, a) = (gate.clone(), avail.clone());
        let worker = thread::spawn(move || {
            g.register();
            while !a.load(Ordering::SeqCst) {
                g.sleep_unless(|| a.load(Ordering::SeqCst), None);
            }
        });
        avail.store(true, Ordering::SeqCst);
        gate.notify();
        worker.join().unwrap();
    });
}

#[test]
fn pool_credits_never_overfill_a_shared_member_queue() {
    // Two pool queues share one member queue of one slot. Each takes a credit before it puts a
    // request on the member's ring; the member's reaper frees the slot, then the completion
    // gives the credit back. Whatever the interleaving, a pool queue that holds a credit finds
    // the slot free (the member never refuses a request the pool had room for), and each
    // request that got a credit is placed.
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let credit = Arc::new(crypt_vfio::testing::Credit::new(1));
        let ring: Arc<Mutex<Option<u64>>> = Arc::new(Mutex::new(None));
        let placed = Arc::new(AtomicUsize::new(0));
        let pool_queues: Vec<_> = (0..2u64)
            .map(|id| {
                let (credit, ring, placed) = (credit.clone(), ring.clone(), placed.clone());
                thread::spawn(move || {
                    if credit.take() {
                        let mut slot = ring.lock().unwrap();
                        assert!(slot.is_none(), "a credit was taken for a slot the member still holds");
                        *slot = Some(id);
                        placed.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let reaper = {
            let (credit, ring) = (credit.clone(), ring.clone());
            thread::spawn(move || {
                for _ in 0..2 {
                    let done = ring.lock().unwrap().take();
                    if done.is_some() {
                        credit.give_back();
                    }
                    thread::yield_now();
                }
            })
        };
        for t in pool_queues {
            t.join().unwrap();
        }
        reaper.join().unwrap();
        let left = usize::from(ring.lock().unwrap().is_some());
        assert_eq!(credit.free() + left, 1, "a credit was lost or made");
        assert!(placed.load(Ordering::SeqCst) >= 1);
    });
}

/// A ring of one slot whose member fails the first request it completes before running it
/// (NotRun): the pool's completion handler sends it to the backlog's re-run lane.
#[derive(Default)]
struct FailingOnce {
    slot: Option<u64>,
    failed_one: bool,
}

impl Ring<u64> for FailingOnce {
    fn has_space(&self) -> bool {
        self.slot.is_none()
    }
    fn push(&mut self, item: u64) -> std::result::Result<(), (u64, Error)> {
        self.slot = Some(item);
        Ok(())
    }
}

#[test]
fn a_rerun_after_a_member_failure_keeps_the_contract() {
    // A submitter pushes three requests (backlog allowed) through a pool queue of one slot while
    // the member completes: its first completion is a failure before running, so the pool puts
    // the request in the re-run lane under its lock and promotes. Every interleaving: the re-run
    // gets no second Promoted, each request completes once, and nothing submitted meanwhile
    // overtakes the backlog.
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let checker = Arc::new(ContractChecker::new());
        let state: Arc<Mutex<(Backlog<u64>, FailingOnce)>> =
            Arc::new(Mutex::new((Backlog::new(8), FailingOnce::default())));
        let out = Arc::new(Outboxed::new());
        let sink: EventSink<()> = {
            let checker = checker.clone();
            Arc::new(move |ev| checker.event(&ev))
        };
        // The member's completion, as the pool's callback handles it.
        let complete = {
            let (state, out, sink) = (state.clone(), out.clone(), sink.clone());
            move || {
                {
                    let mut st = state.lock().unwrap();
                    let (backlog, ring) = &mut *st;
                    let mut outbox = out.outbox.lock().unwrap();
                    if let Some(id) = ring.slot.take() {
                        if !ring.failed_one {
                            ring.failed_one = true;
                            backlog.rerun(id);
                        } else {
                            outbox.push((sink.clone(), Event::Completed(completion(id, Ok(())))));
                        }
                    }
                    backlog.promote(ring, &mut ToEvents(&mut outbox, &sink));
                    out.delivery.mark_pending();
                }
                out.deliver();
            }
        };
        let submitter = {
            let (state, out, checker) = (state.clone(), out.clone(), checker.clone());
            thread::spawn(move || {
                for id in 1..=3u64 {
                    checker.begin_submit(0, id);
                    let r = {
                        let mut st = state.lock().unwrap();
                        let (backlog, ring) = &mut *st;
                        backlog.submit(id, true, ring)
                    };
                    let r: std::result::Result<Submitted, SubmitError<()>> = match r {
                        Ok(s) => Ok(s),
                        Err((id, _)) => Err(SubmitError::busy(Request::new(
                            (),
                            Direction::Encrypt,
                            Iv::default(),
                            Buf::Host(Vec::new()),
                            id,
                        ))),
                    };
                    checker.submitted(id, &r);
                    out.deliver();
                }
            })
        };
        let member = {
            let complete = complete.clone();
            thread::spawn(complete)
        };
        submitter.join().unwrap();
        member.join().unwrap();
        for _ in 0..5 {
            complete();
        }
        let report = checker.report();
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(report.completed, 3);
    });
}

/// The pool kicker's pass against a member completion on another pool queue (a stand-in of
/// `monitor::spawn_kicker` and the end of `PoolQueueShared::on_member_events`, with the same
/// orderings and fences): queue 0 waits for a slot of a member queue it shares with queue 1, and queue 1's
/// completion gives one back while the kicker is in its pass with `waiting` cleared. Afterwards
/// queue 0 has its slot, or the kicker has been woken to look again; never neither (a stall
/// until the kicker's idle look). With `recheck` off (the pass without its look at the
/// completion count) loom finds that interleaving.
fn kicker_pass_model(recheck: bool) {
    use loom::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::atomic::Ordering::SeqCst;
    loom::model(move || {
        let slots = Arc::new(AtomicUsize::new(0));
        let q0_waits = Arc::new(AtomicBool::new(true));
        let waiting = Arc::new(AtomicBool::new(true));
        let completions = Arc::new(AtomicU64::new(0));
        let woken = Arc::new(AtomicBool::new(false));
        let completion = {
            let (slots, waiting, completions, woken) =
                (slots.clone(), waiting.clone(), completions.clone(), woken.clone());
            thread::spawn(move || {
                slots.fetch_add(1, SeqCst);
                completions.fetch_add(1, SeqCst);
                loom::sync::atomic::fence(SeqCst);
                if waiting.load(SeqCst) {
                    woken.store(true, SeqCst);
                }
            })
        };
        loop {
            let seen = completions.load(SeqCst);
            waiting.store(false, SeqCst);
            if q0_waits.load(SeqCst) && slots.load(SeqCst) > 0 {
                slots.fetch_sub(1, SeqCst);
                q0_waits.store(false, SeqCst);
            }
            if !q0_waits.load(SeqCst) {
                break;
            }
            waiting.store(true, SeqCst);
            loom::sync::atomic::fence(SeqCst);
            if !recheck || completions.load(SeqCst) == seen {
                break;
            }
        }
        completion.join().unwrap();
        assert!(
            !q0_waits.load(SeqCst) || woken.load(SeqCst),
            "queue 0 waits with a free slot and nobody will move it"
        );
    });
}

#[test]
fn the_pool_kicker_never_leaves_a_freed_slot_unused() {
    kicker_pass_model(true);
}

/// The model finds the stall when the kicker does not look again (so the model can fail).
#[test]
#[should_panic(expected = "nobody will move it")]
fn without_its_recheck_the_pool_kicker_can_stall() {
    kicker_pass_model(false);
}
