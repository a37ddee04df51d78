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

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use super::request::Event;
use super::sync::{fence, AtomicBool, Ordering};

/// The callback that receives one submitter's events. It may run on any thread that polls the
/// queue (or on the interrupt thread), and it may submit.
pub type EventSink<S> = Arc<dyn Fn(Event<S>) + Send + Sync>;

/// Events with their destinations, in order.
pub type Outbox<S> = Vec<(EventSink<S>, Event<S>)>;

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
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".into());
            log::error!("an event callback panicked ({what}); its event is dropped, delivery goes on");
            false
        }
    }
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
    pub fn run<S>(&self, scratch: &mut Outbox<S>, mut take: impl FnMut(&mut Outbox<S>)) -> usize {
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
                for (sink, event) in scratch.drain(..) {
                    deliver_one(&sink, event);
                    delivered += 1;
                }
            }
            drop(guard);
            // Between our `delivering = false` and the re-check of `pending`.
            store_load_barrier();
        }
        delivered
    }
}
