//! Property tests of the backlog contract: random submission schedules (threads, backlog allowed
//! or not, request sizes, how much each thread keeps in flight) against random device behaviour
//! (latency, jitter, reordering, error rate, small rings, polling or interrupts), every history
//! judged by `ContractChecker`.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crypt_vfio::engine::contract::{ContractChecker, ContractReport};
use crypt_vfio::engine::{Buf, Direction, Engine, Event, Iv, Request, SubmitErrorKind, Submitted};
use crypt_vfio::transport::emulated::EmulatedConfig;
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions};
use crypt_vfio::{CryptoError, Error, Mode};
use proptest::prelude::*;

/// What the device does.
#[derive(Debug, Clone)]
struct DeviceBehaviour {
    queues: u16,
    ring: u16,
    backlog_limit: usize,
    latency_us: u64,
    jitter_us: u64,
    out_of_order: bool,
    error_rate: f64,
    inflight_limit: usize,
    interrupts: bool,
    seed: u64,
}

/// What the submitters do.
#[derive(Debug, Clone)]
struct Schedule {
    threads: usize,
    per_thread: u64,
    max_in_flight: usize,
    /// Out of 10 submissions, how many allow backlog.
    backlog_tenths: u32,
    /// Request sizes, in 16-byte blocks, cycled through.
    sizes: Vec<usize>,
    /// Requests per submit: 1 submits one at a time (per-event callback); more submit with
    /// `submit_batch` (batch callback).
    batch: usize,
}

fn device_behaviour() -> impl Strategy<Value = DeviceBehaviour> {
    (
        1u16..=3,
        prop_oneof![Just(8u16), Just(16), Just(32)],
        0usize..=16,
        0u64..=40,
        0u64..=40,
        any::<bool>(),
        prop_oneof![Just(0.0), 0.0..0.2f64],
        0usize..=8,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                queues,
                ring,
                backlog_limit,
                latency_us,
                jitter_us,
                out_of_order,
                error_rate,
                inflight_limit,
                interrupts,
                seed,
            )| {
                DeviceBehaviour {
                    queues,
                    ring,
                    backlog_limit,
                    latency_us,
                    jitter_us,
                    out_of_order,
                    error_rate,
                    inflight_limit,
                    interrupts,
                    seed,
                }
            },
        )
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (
        1usize..=4,
        50u64..=300,
        1usize..=40,
        0u32..=10,
        prop::collection::vec(1usize..=64, 1..6),
        prop_oneof![Just(1usize), 2usize..=24],
    )
        .prop_map(|(threads, per_thread, max_in_flight, backlog_tenths, sizes, batch)| Schedule {
            threads,
            per_thread,
            max_in_flight,
            backlog_tenths,
            sizes,
            batch,
        })
}

/// Runs `schedule` against a device behaving as `b`; returns the checker's report.
fn run(b: &DeviceBehaviour, schedule: &Schedule) -> ContractReport {
    let config = EmulatedConfig {
        data_queues: b.queues,
        max_queue_size: b.ring,
        workers: 2,
        latency: Duration::from_micros(b.latency_us),
        latency_jitter: Duration::from_micros(b.jitter_us),
        out_of_order: b.out_of_order,
        error_rate: b.error_rate,
        inflight_limit: b.inflight_limit,
        seed: b.seed,
        ..Default::default()
    };
    let completion = if b.interrupts { CompletionMode::Interrupt } else { CompletionMode::Poll };
    let options = DeviceOptions {
        queue_size: b.ring,
        backlog_limit: b.backlog_limit,
        completion,
        ..Default::default()
    };
    let (dev, _t) = common::device_with(config, &options);
    let session = dev.create_session(Mode::Ctr, &[0x24; 32]).unwrap();
    let checker = Arc::new(ContractChecker::new());
    let next_id = AtomicU64::new(1);
    std::thread::scope(|s| {
        for t in 0..schedule.threads {
            let (dev, checker, session, next_id) = (&dev, checker.clone(), session.clone(), &next_id);
            s.spawn(move || {
                let inbox: Arc<Mutex<Vec<Event<_>>>> = Arc::default();
                let (sink_inbox, sink_checker) = (inbox.clone(), checker.clone());
                let mut q = if schedule.batch == 1 {
                    dev.open_queue(
                        t,
                        Arc::new(move |ev| {
                            sink_checker.event(&ev);
                            sink_inbox.lock().unwrap().push(ev);
                        }),
                    )
                } else {
                    dev.open_batch_queue(
                        t,
                        Arc::new(move |run| {
                            let mut inbox = sink_inbox.lock().unwrap();
                            for ev in run {
                                sink_checker.event(&ev);
                                inbox.push(ev);
                            }
                        }),
                    )
                }
                .unwrap();
                let (mut sent, mut in_flight, mut n) = (0u64, 0usize, 0usize);
                let mut blocked: Option<u64> = None;
                let started = Instant::now();
                while sent < schedule.per_thread || in_flight > 0 {
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "thread {t} stuck, {in_flight} in flight"
                    );
                    while schedule.batch > 1
                        && blocked.is_none()
                        && in_flight < schedule.max_in_flight
                        && sent < schedule.per_thread
                    {
                        // One batch, as many as the limits allow; each request allows backlog
                        // or not by its id, so the batch allows it if its first request does.
                        let room = (schedule.max_in_flight - in_flight)
                            .min((schedule.per_thread - sent) as usize)
                            .min(schedule.batch);
                        let ids: Vec<u64> =
                            (0..room).map(|_| next_id.fetch_add(1, Ordering::Relaxed)).collect();
                        let mut requests: VecDeque<_> = ids
                            .iter()
                            .map(|&id| {
                                let len = 16 * schedule.sizes[n % schedule.sizes.len()];
                                n += 1;
                                Request::new(
                                    session.clone(),
                                    Direction::Encrypt,
                                    Iv::from([id as u8; 16]),
                                    Buf::Host(vec![id as u8; len]),
                                    id,
                                )
                            })
                            .collect();
                        let may_backlog = (ids[0] % 10) < u64::from(schedule.backlog_tenths);
                        checker.begin_batch(t % dev.queue_count(), &ids);
                        let r = q.submit_batch(&mut requests, may_backlog);
                        checker.submitted_batch(&ids, &r);
                        let taken = r.accepted();
                        let left: Vec<u64> = requests.iter().map(|r| r.user_data).collect();
                        assert_eq!(left, ids[taken..], "untaken requests come back whole and in order");
                        in_flight += taken;
                        sent += taken as u64;
                        if r.backlogged > 0 {
                            blocked = Some(ids[taken - 1]);
                        }
                        match r.refused {
                            None => {}
                            Some(SubmitErrorKind::Busy) => break,
                            Some(SubmitErrorKind::Rejected(e)) => {
                                panic!("request {} refused: {e}", ids[taken])
                            }
                        }
                    }
                    while schedule.batch == 1
                        && blocked.is_none()
                        && in_flight < schedule.max_in_flight
                        && sent < schedule.per_thread
                    {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        let len = 16 * schedule.sizes[n % schedule.sizes.len()];
                        n += 1;
                        let may_backlog = (id % 10) < u64::from(schedule.backlog_tenths);
                        let req = Request::new(
                            session.clone(),
                            Direction::Encrypt,
                            Iv::from([id as u8; 16]),
                            Buf::Host(vec![id as u8; len]),
                            id,
                        );
                        checker.begin_submit(t % dev.queue_count(), id);
                        let r = q.submit(req, may_backlog);
                        checker.submitted(id, &r);
                        match r {
                            Ok(Submitted::InProgress) => in_flight += 1,
                            Ok(Submitted::Backlogged) => {
                                in_flight += 1;
                                blocked = Some(id);
                            }
                            Err(e) => match e.kind {
                                SubmitErrorKind::Busy => break,
                                SubmitErrorKind::Rejected(e) => panic!("request {id} refused: {e}"),
                            },
                        }
                        sent += 1;
                    }
                    // In interrupt mode the engine's own thread delivers: never poll.
                    if !b.interrupts {
                        q.poll();
                    }
                    let events: Vec<_> = std::mem::take(&mut *inbox.lock().unwrap());
                    if events.is_empty() {
                        std::thread::yield_now();
                    }
                    for ev in events {
                        match ev {
                            Event::Promoted { user_data } if blocked == Some(user_data) => blocked = None,
                            Event::Promoted { .. } => {}
                            Event::Completed(c) => {
                                in_flight -= 1;
                                match c.result {
                                    Ok(()) | Err(Error::Crypto(CryptoError::Status(_))) => {}
                                    Err(e) => panic!("request {} failed: {e}", c.request.user_data),
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    checker.report()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_schedules_on_random_devices_keep_the_contract(b in device_behaviour(), s in schedule()) {
        let report = run(&b, &s);
        prop_assert!(report.violations.is_empty(), "{:?}", &report.violations[..report.violations.len().min(10)]);
        prop_assert_eq!(report.pending, 0);
        prop_assert_eq!(report.completed, report.in_progress + report.backlogged);
        prop_assert_eq!(report.completed, s.threads as u64 * s.per_thread);
    }
}

#[test]
fn the_schedules_reach_the_backlog_and_the_busy_path() {
    // The property above is only as good as the paths it reaches: a small ring with latency and
    // a deep queue per thread must see Backlogged and Busy answers.
    let b = DeviceBehaviour {
        queues: 1,
        ring: 8,
        backlog_limit: 4,
        latency_us: 20,
        jitter_us: 20,
        out_of_order: true,
        error_rate: 0.05,
        inflight_limit: 4,
        interrupts: false,
        seed: 1,
    };
    for batch in [1, 16] {
        let s = Schedule {
            threads: 3,
            per_thread: 300,
            max_in_flight: 40,
            backlog_tenths: 8,
            sizes: vec![1, 4, 64],
            batch,
        };
        let report = run(&b, &s);
        assert!(report.violations.is_empty(), "batch {batch}: {:?}", report.violations);
        assert!(report.backlogged > 0 && report.refused > 0, "batch {batch}: {report:?}");
    }
}

#[test]
fn a_batch_that_half_fits_goes_in_whole_the_rest_backlogged_and_promoted_in_order() {
    // A ring of 8 with nothing reaped (no poll until the batch returns): a batch of 20 places 8
    // and backlogs 12, in order; each backlogged request gets its Promoted, in batch order,
    // before its completion; a second batch queues behind the backlog although the device
    // may have finished with the ring by then.
    let config =
        EmulatedConfig { max_queue_size: 8, latency: Duration::from_micros(200), ..Default::default() };
    let options = DeviceOptions { queue_size: 8, backlog_limit: 64, ..Default::default() };
    let (dev, _t) = common::device_with(config, &options);
    let session = dev.create_session(Mode::Ctr, &[0x24; 32]).unwrap();
    let checker = Arc::new(ContractChecker::new());
    let order: Arc<Mutex<Vec<(bool, u64)>>> = Arc::default();
    let (sink_checker, sink_order) = (checker.clone(), order.clone());
    let mut q = dev
        .open_batch_queue(
            0,
            Arc::new(move |run| {
                for ev in run {
                    sink_checker.event(&ev);
                    let e = match &ev {
                        Event::Promoted { user_data } => (true, *user_data),
                        Event::Completed(c) => (false, c.request.user_data),
                    };
                    sink_order.lock().unwrap().push(e);
                }
            }),
        )
        .unwrap();
    let request = |id: u64| {
        Request::new(
            session.clone(),
            Direction::Encrypt,
            Iv::from([id as u8; 16]),
            Buf::Host(vec![7; 64]),
            id,
        )
    };
    for (ids, expect) in [((1..=20u64).collect::<Vec<_>>(), (8, 12)), ((21..=24).collect(), (0, 4))] {
        let mut batch: VecDeque<_> = ids.iter().map(|&id| request(id)).collect();
        checker.begin_batch(0, &ids);
        let r = q.submit_batch(&mut batch, true);
        checker.submitted_batch(&ids, &r);
        assert!(r.refused.is_none() && batch.is_empty(), "{r:?}");
        assert_eq!((r.in_progress, r.backlogged), expect);
    }
    // Wait for the completions themselves, not for `outstanding`: in the default (adaptive) mode
    // the engine's thread delivers a reaped request's event after the count has dropped.
    let completed = || order.lock().unwrap().iter().filter(|e| !e.0).count();
    let started = Instant::now();
    while completed() < 24 {
        assert!(started.elapsed() < Duration::from_secs(30), "{} requests never completed", 24 - completed());
        q.poll();
        std::thread::yield_now();
    }
    let report = checker.report();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!((report.in_progress, report.backlogged, report.completed), (8, 16, 24));
    let promoted: Vec<u64> = order.lock().unwrap().iter().filter(|e| e.0).map(|e| e.1).collect();
    assert_eq!(promoted, (9..=24).collect::<Vec<_>>(), "promotions in submission order");
}
