//! Delivering events to callers in the order they happened.
//!
//! Completions are reaped under a queue's lock, but callbacks must not run under it (a callback
//! may submit). Once the lock is dropped, two pollers could race and deliver a request's final
//! completion before its `Promoted`. So events go to an outbox in order, and one thread at a time
//! drains it: whoever finds the outbox non-empty and wins the `delivering` flag delivers
//! everything, including what others add meanwhile.
//!
//! The hand-off between a deliverer that is finishing and a producer that just added events is
//! the store-buffer pattern: the deliverer stores `delivering = false` then loads `pending`; the
//! producer stores `pending = true` then tries to take `delivering`. With acquire/release alone
//! both may read the old value (each store still sits in its core's store buffer), the deliverer
//! leaves and the producer backs off, and the events stay in the outbox until the next poll,
//! forever if that was the last one (at close). A `SeqCst` fence between each side's store and
//! load forbids that outcome: of the two fences, the later one's thread sees the other's store.
//! `tests/loom_models.rs` checks this, and finds the lost event with the fences removed
//! (feature `loom-weak-delivery`).
//!
//! A callback that panics must not stop delivery for the other users of the queue: each call is
//! isolated with `catch_unwind`, the panic is logged, and delivery goes on.
//!
//! Events for one callback that sit next to each other in the outbox go to it in one call when
//! the callback takes batches ([`BatchSink`]): one hand-off per batch rather than per event, so
//! a caller that moves events into its own queue takes its lock once per batch.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use super::request::Event;
use super::sync::{fence, AtomicBool, Ordering};

/// The callback that receives one submitter's events. It may run on any thread that polls the
/// queue (or on the interrupt thread), and it may submit.
pub type EventSink<S> = Arc<dyn Fn(Event<S>) + Send + Sync>;

/// A callback that receives a run of one submitter's events, in order, in one call. It must
/// take them all (they are the only copy): events it leaves in the iterator are dropped, with an
/// error logged. Like [`EventSink`], it may run on any polling thread and may submit.
pub type BatchSink<S> = Arc<dyn Fn(&mut dyn Iterator<Item = Event<S>>) + Send + Sync>;

/// Events with their destinations, in order.
pub type Outbox<S> = Vec<(EventSink<S>, Event<S>)>;

/// Where an outbox entry's event goes: a per-event or a batch callback.
pub trait Sink<S>: Clone {
    /// Whether `self` and `other` are the same callback (so that their events form one run).
    fn same(&self, other: &Self) -> bool;
    /// Hands the events `run` yields to the callback, counting them in `taken` (kept exact
    /// when the callback panics, which unwinds out of here; the caller isolates it).
    fn take_run(&self, run: &mut dyn Iterator<Item = Event<S>>, taken: &mut usize);
}

impl<S> Sink<S> for EventSink<S> {
    fn same(&self, _other: &Self) -> bool {
        // One event per call: runs of one.
        false
    }

    fn take_run(&self, run: &mut dyn Iterator<Item = Event<S>>, taken: &mut usize) {
        for event in run {
            *taken += 1;
            self(event);
        }
    }
}

impl<S> Sink<S> for BatchSink<S> {
    fn same(&self, other: &Self) -> bool {
        // The data pointers alone: a vtable pointer may differ between codegen units.
        std::ptr::eq(Arc::as_ptr(self) as *const (), Arc::as_ptr(other) as *const ())
    }

    fn take_run(&self, run: &mut dyn Iterator<Item = Event<S>>, taken: &mut usize) {
        self(&mut Counted { inner: run, n: taken });
    }
}

/// An iterator that counts what it yields.
struct Counted<'a, S> {
    inner: &'a mut dyn Iterator<Item = Event<S>>,
    n: &'a mut usize,
}

impl<S> Iterator for Counted<'_, S> {
    type Item = Event<S>;

    fn next(&mut self) -> Option<Event<S>> {
        let e = self.inner.next();
        *self.n += usize::from(e.is_some());
        e
    }
}

/// One callback's run: its first event, then the next `left` events of the outbox drain. The
/// run's length is found by looking at the keys in place ([`std::vec::Drain::as_slice`]), so
/// the events after the first move once, out of the outbox into the callback's hands (a
/// 200-byte completion moved through a peek buffer would cost a copy per event per hop).
struct Run<'a, 'd, S, K> {
    first: Option<Event<S>>,
    rest: &'a mut std::vec::Drain<'d, (K, Event<S>)>,
    /// Events of the run still in `rest`.
    left: usize,
}

impl<S, K> Run<'_, '_, S, K> {
    fn is_empty(&self) -> bool {
        self.first.is_none() && self.left == 0
    }
}

impl<S, K> Iterator for Run<'_, '_, S, K> {
    type Item = Event<S>;

    #[inline]
    fn next(&mut self) -> Option<Event<S>> {
        if let Some(e) = self.first.take() {
            return Some(e);
        }
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.rest.next().map(|(_, e)| e)
    }
}

/// The single-deliverer protocol of one queue.
#[derive(Debug, Default)]
pub struct Delivery {
    delivering: AtomicBool,
    pending: AtomicBool,
}

/// The store-load barrier of the hand-off (see the module comment). The `loom-weak-delivery`
/// feature removes it, only to show that the loom model then finds the lost event.
#[inline]
fn store_load_barrier() {
    if !cfg!(feature = "loom-weak-delivery") {
        fence(Ordering::SeqCst);
    }
}

/// Clears `delivering` if the deliverer unwinds (a panic outside the callbacks, say in `take`),
/// so that the queue does not stay without a deliverer forever.
struct DeliveringGuard<'a>(&'a AtomicBool);

impl Drop for DeliveringGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Calls `sink` with `event`; a panic in it is caught and logged, so it ends neither delivery to
/// the queue's other users nor the thread that delivers. Returns whether the sink returned.
pub fn deliver_one<S>(sink: &EventSink<S>, event: Event<S>) -> bool {
    match catch_unwind(AssertUnwindSafe(|| sink(event))) {
        Ok(()) => true,
        Err(panic) => {
            log_panic(&*panic);
            false
        }
    }
}

fn log_panic(panic: &(dyn std::any::Any + Send)) {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into());
    log::error!("an event callback panicked ({what}); its event is dropped, delivery goes on");
}

/// Delivers an outbox's events, each run of one callback's events in one call. A panicking
/// callback loses the event it was handling, as [`deliver_one`] does; the rest of its run is
/// handed to it again. Returns how many events were handed over.
pub fn deliver_runs<S, K: Sink<S>>(mut events: std::vec::Drain<'_, (K, Event<S>)>) -> usize {
    let mut delivered = 0;
    while let Some((sink, first)) = events.next() {
        let more = events.as_slice().iter().take_while(|(k, _)| k.same(&sink)).count();
        let mut run = Run { first: Some(first), rest: &mut events, left: more };
        loop {
            let before = delivered;
            match catch_unwind(AssertUnwindSafe(|| sink.take_run(&mut run, &mut delivered))) {
                Ok(()) => break,
                Err(panic) => {
                    log_panic(&*panic);
                    // The panic ended the call; what the run still holds goes in a new one. A
                    // callback that panics before taking anything loses the next event, so
                    // that each call makes progress.
                    if delivered == before {
                        drop(run.next());
                    }
                    if run.is_empty() {
                        break;
                    }
                }
            }
        }
        // A callback that returned without taking its whole run: the remainder is dropped
        // with a log line rather than delivered to nobody silently.
        let left = run.count();
        if left > 0 {
            log::error!("an event callback returned with {left} of its events untaken; they are dropped");
        }
    }
    delivered
}

impl Delivery {
    /// Notes that events were added to the outbox (call with the queue lock held, then call
    /// [`run`](Self::run)).
    pub fn mark_pending(&self) {
        self.pending.store(true, Ordering::Release);
    }

    /// Delivers pending events unless another thread is already doing so. `take` swaps the
    /// queue's outbox with the (empty) vector it is given, under the queue lock. Returns how many
    /// events this thread delivered.
    pub fn run<S, K: Sink<S>>(
        &self,
        scratch: &mut Vec<(K, Event<S>)>,
        mut take: impl FnMut(&mut Vec<(K, Event<S>)>),
    ) -> usize {
        let mut delivered = 0;
        // Between our `pending = true` (mark_pending) and the attempt on `delivering`.
        store_load_barrier();
        while self.pending.load(Ordering::Acquire) {
            if self.delivering.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
                // The current deliverer re-checks `pending` after it finishes (after its fence).
                return delivered;
            }
            let guard = DeliveringGuard(&self.delivering);
            loop {
                self.pending.store(false, Ordering::Release);
                take(scratch);
                if scratch.is_empty() {
                    break;
                }
                delivered += deliver_runs(scratch.drain(..));
            }
            drop(guard);
            // Between our `delivering = false` and the re-check of `pending`.
            store_load_barrier();
        }
        delivered
    }
}

#[cfg(all(test, not(feature = "loom-model")))]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn promoted(id: u64) -> Event<()> {
        Event::Promoted { user_data: id }
    }

    fn ids(run: &mut dyn Iterator<Item = Event<()>>) -> Vec<u64> {
        run.map(|e| match e {
            Event::Promoted { user_data } => user_data,
            Event::Completed(c) => c.request.user_data,
        })
        .collect()
    }

    #[test]
    fn each_callback_gets_its_neighbouring_events_in_one_call_in_order() {
        type Calls = Mutex<Vec<(char, Vec<u64>)>>;
        let calls: Arc<Calls> = Arc::default();
        let sink = |name: char| -> BatchSink<()> {
            let calls = calls.clone();
            Arc::new(move |run| {
                let got = ids(run);
                calls.lock().unwrap().push((name, got));
            })
        };
        let (a, b) = (sink('a'), sink('b'));
        let mut outbox: Vec<(BatchSink<()>, Event<()>)> =
            [(&a, 1), (&a, 2), (&b, 3), (&a, 4), (&a, 5), (&a, 6)]
                .into_iter()
                .map(|(s, id)| (s.clone(), promoted(id)))
                .collect();
        assert_eq!(deliver_runs(outbox.drain(..)), 6);
        assert_eq!(*calls.lock().unwrap(), [('a', vec![1, 2]), ('b', vec![3]), ('a', vec![4, 5, 6])]);
    }

    #[test]
    fn a_panic_in_a_run_loses_only_the_event_in_hand() {
        let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
        let sink: BatchSink<()> = {
            let seen = seen.clone();
            Arc::new(move |run| {
                for e in run {
                    let Event::Promoted { user_data } = e else { continue };
                    if user_data == 2 || user_data == 3 {
                        panic!("callback fails on {user_data}");
                    }
                    seen.lock().unwrap().push(user_data);
                }
            })
        };
        let mut outbox: Vec<_> = (1..=5).map(|id| (sink.clone(), promoted(id))).collect();
        // 2 and 3 were taken (and lost in the panics); 4 and 5 come in a new call.
        assert_eq!(deliver_runs(outbox.drain(..)), 5);
        assert_eq!(*seen.lock().unwrap(), [1, 4, 5]);
        // A callback that panics before taking anything loses one event per call, not all.
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let refuses: BatchSink<()> = {
            let calls = calls.clone();
            Arc::new(move |_| {
                calls.fetch_add(1, Ordering::Relaxed);
                panic!("callback fails before taking");
            })
        };
        let mut outbox: Vec<_> = (1..=3).map(|id| (refuses.clone(), promoted(id))).collect();
        assert_eq!(deliver_runs(outbox.drain(..)), 0);
        assert_eq!(calls.load(Ordering::Relaxed), 3, "one call per event, each losing one");
    }
}
