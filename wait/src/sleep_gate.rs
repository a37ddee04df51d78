//! Sleeping until a notifier's flag check says so, without losing a notification.

use std::time::Duration;

#[cfg(feature = "loom")]
use loom::{
    sync::atomic::{fence, AtomicBool, Ordering},
    sync::Mutex,
    thread::{self, Thread},
};
#[cfg(not(feature = "loom"))]
use std::{
    sync::atomic::{fence, AtomicBool, Ordering},
    sync::Mutex,
    thread::{self, Thread},
};

/// Where one thread sleeps until another tells it that work arrived (a doorbell).
///
/// The sleeper announces that it is about to sleep, then looks for work once more, then parks;
/// the notifier publishes work, then looks whether the sleeper announced a sleep, and only then
/// unparks it. With a SeqCst fence on each side between its store and its load, at least one of
/// them sees the other: either the re-check finds the work, or the notifier finds the sleeper.
/// Without the re-check, work published just before the announcement would wait for the next
/// notification (`tests/loom_models.rs`, `sleep_gate_*`, shows the hang).
///
/// Notifiers that find nobody sleeping pay one fence and one load, not a system call.
#[derive(Default)]
pub struct SleepGate {
    sleeping: AtomicBool,
    sleeper: Mutex<Option<Thread>>,
}

impl SleepGate {
    /// A gate with no sleeper yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the calling thread the one this gate's notifications wake.
    pub fn register(&self) {
        *self.sleeper.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread::current());
    }

    /// Sleeps until notified (or `timeout`, or spuriously), unless `stay_awake`, called after
    /// the sleep is announced, returns true: it must look for work the notifier publishes
    /// (and may do what must precede a sleep). Returns whether the thread slept.
    pub fn sleep_unless(&self, stay_awake: impl FnOnce() -> bool, timeout: Option<Duration>) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        // Pairs with the fence in `notify`: the re-check below sees the notifier's work, or
        // the notifier sees `sleeping`.
        fence(Ordering::SeqCst);
        if stay_awake() {
            self.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        park(timeout);
        self.sleeping.store(false, Ordering::SeqCst);
        true
    }

    /// Wakes the sleeper if it announced a sleep. Call after publishing the work.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Wakes the sleeper whether or not it sleeps (for a reset or shutdown, which it must see
    /// promptly even mid-announcement).
    pub fn wake(&self) {
        if let Some(t) = self.sleeper.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            t.unpark();
        }
    }

    /// Whether the sleeper announced a sleep and has not woken yet.
    pub fn is_sleeping(&self) -> bool {
        self.sleeping.load(Ordering::SeqCst)
    }
}

#[cfg(not(feature = "loom"))]
fn park(timeout: Option<Duration>) {
    match timeout {
        Some(t) => thread::park_timeout(t),
        None => thread::park(),
    }
}

/// loom has no timed park: a model must not rely on the timeout.
#[cfg(feature = "loom")]
fn park(_timeout: Option<Duration>) {
    thread::park();
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool as StdBool;
    use std::sync::Arc;

    #[test]
    fn work_found_by_the_recheck_keeps_the_thread_awake() {
        let gate = SleepGate::new();
        gate.register();
        // No timeout: if the gate parked here, the test would hang.
        assert!(!gate.sleep_unless(|| true, None));
        assert!(!gate.is_sleeping());
    }

    #[test]
    fn a_notification_wakes_the_sleeper() {
        let gate = Arc::new(SleepGate::new());
        let work = Arc::new(StdBool::new(false));
        let (g, w) = (gate.clone(), work.clone());
        let sleeper = std::thread::spawn(move || {
            g.register();
            while !w.load(Ordering::SeqCst) {
                g.sleep_unless(|| w.load(Ordering::SeqCst), None);
            }
        });
        work.store(true, Ordering::SeqCst);
        gate.notify();
        sleeper.join().unwrap();
    }
}
