//! The same misuse, on every engine: each keeps "exactly one final completion" for every request
//! it accepted, whatever the caller does meanwhile (drops its queue, the engine or the transport
//! with work in flight, destroys a session in use, submits and polls from inside the callback,
//! panics in the callback), and refuses sessions of another engine. `ContractChecker` judges.
//! Every case runs twice per engine: submitting one request at a time with a per-event callback,
//! and in batches (`submit_batch`) with a batch callback (`open_batch_queue`).

mod common;

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crypt_vfio::engine::contract::ContractChecker;
use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{
    BatchSink, Buf, Direction, Engine, Event, EventSink, Iv, Queue, Request, SubmitErrorKind,
};
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedTransport};
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions, VirtioCrypto};
use crypt_vfio::{CoreKind, CryptoError, Error, Mode};

const KEY: [u8; 64] = {
    let mut k = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        k[i] = i as u8;
        i += 1;
    }
    k
};
const N: u64 = 64;

/// An engine under test and, for a device, its transport.
struct Subject<E> {
    engine: E,
    transport: Option<Arc<EmulatedTransport>>,
}

fn software() -> Subject<SoftwareEngine> {
    Subject { engine: SoftwareEngine::new(CoreKind::Fast), transport: None }
}

fn device(completion: CompletionMode) -> Subject<VirtioCrypto> {
    // A small ring and some latency, so that requests are in flight and in the backlog.
    let config =
        EmulatedConfig { max_queue_size: 16, latency: Duration::from_micros(200), ..Default::default() };
    let options = DeviceOptions { queue_size: 16, completion, ..Default::default() };
    let (engine, t) = common::device_with(config, &options);
    Subject { engine, transport: Some(t) }
}

/// What the cases need of an engine, without its session type.
trait AnySubject: Send + Sync {
    /// Opens queue 0 with `sink` (which also feeds `checker`).
    fn open(&self, checker: &Arc<ContractChecker>, sink: Arc<dyn Fn(u64) + Send + Sync>) -> Box<dyn Handle>;
    /// Submits `n` requests with ids `first..first + n` through `h`, recording them in `checker`.
    fn submit(&self, h: &mut dyn Handle, checker: &ContractChecker, first: u64, n: u64);
    fn destroy_session(&self);
    fn drop_engine(self: Box<Self>) -> Box<dyn AnySubjectRest>;
    fn drop_transport(&mut self) -> bool;
    /// A session of a second engine of the same kind, tried here: refused on submit and destroy.
    fn foreign_session_is_refused(&self, other: &dyn AnySubject) -> Result<(), String>;
    fn as_any(&self) -> &dyn std::any::Any;
}

/// What is left once the engine is gone.
trait AnySubjectRest {}
impl<T> AnySubjectRest for T {}

/// A queue handle, type-erased.
trait Handle: Send {
    fn poll(&mut self) -> usize;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

struct TypedHandle<S: 'static>(Box<dyn Queue<S>>);

impl<S: 'static> Handle for TypedHandle<S> {
    fn poll(&mut self) -> usize {
        self.0.poll()
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

struct Keyed<E: Engine> {
    subject: Subject<E>,
    session: E::Session,
    /// Batch submits and batch callbacks.
    batched: bool,
}

/// Requests per batch submit: not a divisor of N, so that batches also straddle a full ring.
const BATCH: usize = 7;

fn keyed<E: Engine + 'static>(subject: Subject<E>, batched: bool) -> Keyed<E> {
    let session = subject.engine.create_session(Mode::Xts, &KEY).unwrap();
    Keyed { subject, session, batched }
}

fn request<S>(session: S, id: u64) -> Request<S> {
    let iv = Iv::new(&id.to_le_bytes().repeat(2)).unwrap();
    Request::new(session, Direction::Encrypt, iv, Buf::Host(vec![id as u8; 512]), id)
}

impl<E: Engine + 'static> AnySubject for Keyed<E> {
    fn open(&self, checker: &Arc<ContractChecker>, sink: Arc<dyn Fn(u64) + Send + Sync>) -> Box<dyn Handle> {
        let checker = checker.clone();
        let one = move |ev: Event<E::Session>| {
            checker.event(&ev);
            if let Event::Completed(c) = &ev {
                sink(c.request.user_data);
            }
        };
        let engine = &self.subject.engine;
        let q = if self.batched {
            let events: BatchSink<E::Session> = Arc::new(move |run| run.for_each(&one));
            engine.open_batch_queue(0, events)
        } else {
            let events: EventSink<E::Session> = Arc::new(one);
            engine.open_queue(0, events)
        };
        Box::new(TypedHandle(q.unwrap()))
    }

    fn submit(&self, h: &mut dyn Handle, checker: &ContractChecker, first: u64, n: u64) {
        let h = h.as_any_mut().downcast_mut::<TypedHandle<E::Session>>().expect("a handle of this engine");
        if self.batched {
            let mut ids: VecDeque<u64> = (first..first + n).collect();
            while !ids.is_empty() {
                let batch: Vec<u64> = ids.iter().take(BATCH).copied().collect();
                let mut requests: VecDeque<_> =
                    batch.iter().map(|&id| request(self.session.clone(), id)).collect();
                checker.begin_batch(0, &batch);
                let r = h.0.submit_batch(&mut requests, true);
                checker.submitted_batch(&batch, &r);
                if let Some(kind) = &r.refused {
                    panic!("request {} refused: {kind}", batch[r.accepted()]);
                }
                let left: Vec<u64> = requests.iter().map(|r| r.user_data).collect();
                assert_eq!(left, batch[r.accepted()..], "the untaken requests come back in order");
                ids.drain(..r.accepted());
            }
            return;
        }
        for id in first..first + n {
            checker.begin_submit(0, id);
            let r = h.0.submit(request(self.session.clone(), id), true);
            checker.submitted(id, &r);
            if let Err(e) = r {
                panic!("request {id} refused: {}", e.kind);
            }
        }
    }

    fn destroy_session(&self) {
        let _ = self.subject.engine.destroy_session(&self.session);
    }

    fn drop_engine(self: Box<Self>) -> Box<dyn AnySubjectRest> {
        let Keyed { subject, session, .. } = *self;
        drop(subject.engine);
        Box::new((subject.transport, session))
    }

    fn drop_transport(&mut self) -> bool {
        self.subject.transport.take().is_some()
    }

    fn foreign_session_is_refused(&self, other: &dyn AnySubject) -> Result<(), String> {
        let other = other.as_any().downcast_ref::<Keyed<E>>().ok_or("another kind of engine")?;
        let mut q = self.subject.engine.open_queue(0, Arc::new(|_| {})).unwrap();
        match q.submit(request(other.session.clone(), 1), true) {
            Err(e)
                if matches!(
                    e.kind,
                    SubmitErrorKind::Rejected(Error::Crypto(CryptoError::InvalidSession))
                ) => {}
            Err(e) => return Err(format!("submit refused with {}, not InvalidSession", e.kind)),
            Ok(s) => return Err(format!("another engine's session was accepted ({s:?})")),
        }
        // In a batch, the foreign request ends it and comes back; the one before it went in.
        let mut q = self.subject.engine.open_batch_queue(0, Arc::new(|run| run.for_each(drop))).unwrap();
        let mut batch: VecDeque<_> =
            [request(self.session.clone(), 1), request(other.session.clone(), 2)].into_iter().collect();
        let r = q.submit_batch(&mut batch, true);
        match (&r.refused, r.accepted(), batch.front().map(|r| r.user_data)) {
            (Some(SubmitErrorKind::Rejected(Error::Crypto(CryptoError::InvalidSession))), 1, Some(2))
                if batch.len() == 1 => {}
            _ => return Err(format!("a batch with another engine's session gave {r:?}")),
        }
        drop(batch);
        let start = Instant::now();
        while q.outstanding() > 0 && start.elapsed() < Duration::from_secs(10) {
            q.poll();
        }
        match self.subject.engine.destroy_session(&other.session) {
            Err(Error::Crypto(CryptoError::InvalidSession)) => Ok(()),
            r => Err(format!("destroying another engine's session gave {r:?}")),
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Polls `h` (if any) until `checker` has seen every accepted request complete, 10 s at most.
fn settle(checker: &ContractChecker, mut h: Option<&mut dyn Handle>, what: &str) {
    let start = Instant::now();
    loop {
        if let Some(h) = h.as_deref_mut() {
            let _ = catch_unwind(AssertUnwindSafe(|| h.poll()));
        }
        let r = checker.report();
        if r.pending == 0 {
            assert!(r.violations.is_empty(), "{what}: {:?}", r.violations);
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: {} accepted requests never completed ({:?})",
            r.pending,
            r.violations.iter().take(3).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn subject<E: Engine + 'static>(s: Subject<E>, batched: bool) -> Box<dyn AnySubject> {
    Box::new(keyed(s, batched))
}

fn make(kind: &str) -> Box<dyn AnySubject> {
    let batched = kind.ends_with("batched");
    match kind.trim_end_matches(", batched") {
        "software" => subject(software(), batched),
        "device, polling" => subject(device(CompletionMode::Poll), batched),
        _ => subject(device(CompletionMode::Interrupt), batched),
    }
}

/// Runs `case` against every engine, one request at a time and in batches.
fn each(case: impl Fn(&str)) {
    for name in [
        "software",
        "device, polling",
        "device, interrupts",
        "software, batched",
        "device, polling, batched",
        "device, interrupts, batched",
    ] {
        case(name);
    }
}

#[test]
fn dropping_a_queue_with_work_in_flight_still_completes_every_request() {
    each(|name| {
        let e = make(name);
        let checker = Arc::new(ContractChecker::new());
        let mut q = e.open(&checker, Arc::new(|_| {}));
        e.submit(&mut *q, &checker, 1, N);
        drop(q);
        // Whoever polls the queue next (or its interrupt thread) delivers what is left.
        let mut other = e.open(&checker, Arc::new(|_| {}));
        settle(&checker, Some(&mut *other), &format!("{name}: queue dropped"));
    });
}

#[test]
fn dropping_the_engine_or_the_transport_with_work_in_flight_completes_every_request() {
    each(|name| {
        let mut e = make(name);
        let checker = Arc::new(ContractChecker::new());
        let mut q = e.open(&checker, Arc::new(|_| {}));
        e.submit(&mut *q, &checker, 1, N);
        e.drop_transport();
        e.submit(&mut *q, &checker, N + 1, N);
        let rest = e.drop_engine();
        settle(&checker, Some(&mut *q), &format!("{name}: engine dropped"));
        drop(q);
        drop(rest);
    });
}

#[test]
fn destroying_a_session_in_use_completes_every_request_once() {
    each(|name| {
        let e = make(name);
        let checker = Arc::new(ContractChecker::new());
        let mut q = e.open(&checker, Arc::new(|_| {}));
        e.submit(&mut *q, &checker, 1, N);
        e.destroy_session();
        settle(&checker, Some(&mut *q), &format!("{name}: session destroyed"));
    });
}

#[test]
fn submitting_and_polling_from_inside_the_callback_works() {
    each(|name| {
        let e: Arc<dyn AnySubject> = Arc::from(make(name));
        let checker = Arc::new(ContractChecker::new());
        // The callback of queue A submits a follow-up for each of its completions on queue B,
        // and polls B, from inside the callback.
        let b: Arc<Mutex<Option<Box<dyn Handle>>>> = Arc::default();
        let next = Arc::new(AtomicU64::new(1000));
        let sink = {
            let (e, b, checker, next) = (Arc::downgrade(&e), b.clone(), checker.clone(), next.clone());
            Arc::new(move |id: u64| {
                if id >= 1000 {
                    return;
                }
                let Some(e) = e.upgrade() else { return };
                if let Ok(mut b) = b.try_lock() {
                    if let Some(b) = b.as_mut() {
                        e.submit(&mut **b, &checker, next.fetch_add(1, Ordering::Relaxed), 1);
                        b.poll();
                    }
                }
            })
        };
        let mut a = e.open(&checker, sink);
        *b.lock().unwrap() = Some(e.open(&checker, Arc::new(|_| {})));
        e.submit(&mut *a, &checker, 1, N);
        settle(&checker, Some(&mut *a), &format!("{name}: submit from the callback"));
        let mut b = b.lock().unwrap().take().unwrap();
        settle(&checker, Some(&mut *b), &format!("{name}: follow-ups"));
        assert!(next.load(Ordering::Relaxed) > 1000, "{name}: no follow-up was submitted");
    });
}

#[test]
fn a_panicking_callback_stops_delivery_for_nobody() {
    each(|name| {
        let e = make(name);
        let checker = Arc::new(ContractChecker::new());
        let panicked = Arc::new(AtomicBool::new(false));
        let bad = {
            let panicked = panicked.clone();
            Arc::new(move |_id: u64| {
                if !panicked.swap(true, Ordering::Relaxed) {
                    panic!("a caller's callback panics");
                }
            })
        };
        let mut a = e.open(&checker, bad);
        let mut b = e.open(&checker, Arc::new(|_| {}));
        e.submit(&mut *a, &checker, 1, N);
        e.submit(&mut *b, &checker, N + 1, N);
        // The panicking handle is polled first; the other one must still get everything.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            let start = Instant::now();
            while !panicked.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(10) {
                a.poll();
            }
        }));
        assert!(panicked.load(Ordering::Relaxed), "{name}: the callback never ran");
        settle(&checker, Some(&mut *b), &format!("{name}: after a panicking callback (other handle)"));
        settle(&checker, Some(&mut *a), &format!("{name}: after a panicking callback"));
    });
}

#[test]
fn a_session_of_another_engine_is_refused() {
    each(|name| {
        let (a, b) = (make(name), make(name));
        if let Err(why) = a.foreign_session_is_refused(&*b) {
            panic!("{name}: {why}");
        }
    });
}
