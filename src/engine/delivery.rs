//! Delivering events to callers in the order they happened.
//!
//! Completions are reaped under a queue's lock, but callbacks must not run under it (a callback
//! may submit). Once the lock is dropped, two pollers could race and deliver a request's final
//! completion before its `Promoted`. So events go to an outbox in order, and one thread at a time
//! drains it: whoever finds the outbox non-empty and wins the `delivering` flag delivers
//! everything, including what others add meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::request::Event;

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

impl Delivery {
    /// Notes that events were added to the outbox (call with the queue lock held).
    pub fn mark_pending(&self) {
        self.pending.store(true, Ordering::Release);
    }

    /// Delivers pending events unless another thread is already doing so. `take` swaps the
    /// queue's outbox with the (empty) vector it is given, under the queue lock. Returns how many
    /// events this thread delivered.
    pub fn run<S>(&self, scratch: &mut Outbox<S>, mut take: impl FnMut(&mut Outbox<S>)) -> usize {
        let mut delivered = 0;
        while self.pending.load(Ordering::Acquire) {
            if self.delivering.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
                // The current deliverer re-checks `pending` after it finishes.
                return delivered;
            }
            loop {
                self.pending.store(false, Ordering::Release);
                take(scratch);
                if scratch.is_empty() {
                    break;
                }
                for (sink, event) in scratch.drain(..) {
                    sink(event);
                    delivered += 1;
                }
            }
            self.delivering.store(false, Ordering::Release);
        }
        delivered
    }
}
