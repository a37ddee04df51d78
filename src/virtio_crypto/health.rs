//! Whether the device works, and stopping it safely when it does not.
//!
//! A failure seen on one queue fails the whole device, because the reset that stops its DMA
//! stops every queue. Before any buffer goes back to its owner the device must be quiet: a
//! virtio reset, and if the device does not complete it, bus mastering off and a
//! function-level reset. A device that completes neither may still write anything it was
//! given, so the driver then takes the IOMMU mappings of all its DMA memory away (the IOMMU,
//! not the device, is what stops a rogue device) and never uses the device again.
//!
//! A failure that ends with a quiet device is recoverable: the engine's recovery thread waits
//! here for one, re-initialises the device, and reports back. A device that keeps failing
//! ([`MAX_FAILURES`] times within [`FAILURE_WINDOW`] by default, see
//! [`super::DeviceOptions::failure_budget`]) is given up on.
//!
//! The device's owner may also want it back (an unbind, a hot-unplug; see `release`): the
//! device is then Leaving (new requests refused, those on it drained) and finally Released,
//! after which nothing touches it and every call fails with [`DeviceError::Released`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::dma::DmaPool;
use crate::error::{DeviceError, Error};
use crate::virtio::VirtioPci;

/// Failures within [`FAILURE_WINDOW`] after which the device is not recovered again.
pub const MAX_FAILURES: usize = 3;
/// The window in which [`MAX_FAILURES`] failures give the device up.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

const CLOSED: &str = "the engine was closed";

/// Where a device stands in being given back to its owner (vfio-pci, a hypervisor).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReleaseState {
    /// The engine has the device.
    #[default]
    Held,
    /// The owner asked for it back: requests are refused, those on the device drain.
    Leaving,
    /// Given back: nothing touches it again.
    Released,
}
/// A callback told that the device's state changed: see [`super::VirtioCrypto::observe`].
pub type Observer = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct State {
    reason: String,
    release: ReleaseState,
    /// Why the device is leaving or was released (the error text of later calls).
    release_reason: String,
    failures: VecDeque<Instant>,
    /// The device is not recovered again: too many failures, or it would not stop.
    gave_up: Option<Error>,
    closing: bool,
    recovering: bool,
    recoveries: u64,
}

/// The health of one device, shared by its queues, its engine and its recovery thread.
pub(crate) struct DeviceHealth {
    failed: AtomicBool,
    /// Set when the device starts leaving and never cleared: submits check it under their
    /// queue's lock, so none reaches the ring after the leaving queue was emptied.
    leaving: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
    pub(crate) pci: Arc<VirtioPci>,
    pool: DmaPool,
    pub(crate) timeout: Duration,
    budget: (usize, Duration),
    /// Set when the engine closes, for waits that must end then (control answers).
    pub(crate) closing_flag: Arc<AtomicBool>,
    /// Told of every change of state (a leaf lock: observers only wake someone).
    observers: Mutex<Vec<Observer>>,
}

impl DeviceHealth {
    pub(crate) fn new(
        pci: Arc<VirtioPci>,
        pool: DmaPool,
        timeout: Duration,
        budget: (usize, Duration),
    ) -> Self {
        Self {
            budget,
            closing_flag: Arc::new(AtomicBool::new(false)),
            observers: Mutex::default(),
            failed: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            state: Mutex::default(),
            changed: Condvar::new(),
            pci,
            pool,
            timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `observer` to those told of every change of state.
    pub(crate) fn observe(&self, observer: Observer) {
        self.observers.lock().unwrap_or_else(|e| e.into_inner()).push(observer);
    }

    /// Tells every observer that the state changed. May run under the device's locks (a data
    /// queue's, the state's): observers must only wake someone.
    fn notify(&self) {
        let list = self.observers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for observer in list {
            observer();
        }
    }

    /// Whether the device was given up (too many failures, or it would not stop): it is not
    /// recovered again.
    pub(crate) fn gave_up(&self) -> bool {
        self.lock().gave_up.is_some()
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub(crate) fn reason(&self) -> String {
        self.lock().reason.clone()
    }

    /// The error for a request refused or failed because the device is failed (or leaving,
    /// or released).
    pub(crate) fn error(&self) -> Error {
        let st = self.lock();
        match st.release {
            ReleaseState::Leaving => return not_run_error(&st.release_reason),
            ReleaseState::Released => return Error::Device(DeviceError::Released(st.release_reason.clone())),
            ReleaseState::Held => {}
        }
        match &st.gave_up {
            Some(Error::Device(DeviceError::GaveUp { failures, window, last })) => {
                Error::Device(DeviceError::GaveUp {
                    failures: *failures,
                    window: *window,
                    last: last.clone(),
                })
            }
            _ => Error::Device(DeviceError::Failed(st.reason.clone())),
        }
    }

    /// Whether the engine is closing or the device leaving (a recovery in progress should
    /// stop).
    pub(crate) fn closing(&self) -> bool {
        let st = self.lock();
        st.closing || st.release != ReleaseState::Held
    }

    /// Whether the device is leaving or was released (set once, never cleared).
    pub(crate) fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// Where the device stands in being given back.
    pub(crate) fn release_state(&self) -> ReleaseState {
        self.lock().release
    }

    /// The owner wants the device back: from now on requests and sessions are refused and no
    /// recovery starts. Returns `false` (and changes nothing) when the device is leaving
    /// already. An engine closing (aborted, say, by a server waiting for its clients) still
    /// gives the device back: the owner would otherwise wait until the engine is dropped.
    pub(crate) fn begin_release(&self, why: String) -> bool {
        let mut st = self.lock();
        if st.release != ReleaseState::Held {
            return false;
        }
        st.release = ReleaseState::Leaving;
        st.release_reason = why;
        self.leaving.store(true, Ordering::Release);
        drop(st);
        self.notify_state_change();
        true
    }

    /// Stops a leaving device for good (no recovery follows): a virtio reset, and bus mastering
    /// off and a function-level reset if it does not complete; a device that completes neither
    /// loses its DMA access. A device the failure path stopped already is left as it is.
    pub(crate) fn stop_for_release(&self) {
        let mut st = self.lock();
        st.closing = true;
        self.closing_flag.store(true, Ordering::Release);
        if !self.failed.load(Ordering::Acquire) {
            st.reason = st.release_reason.clone();
            if !stop_device(&self.pci) {
                self.give_up_unstoppable(&mut st);
            }
            self.pci.fail();
            self.failed.store(true, Ordering::Release);
        }
        self.changed.notify_all();
    }

    /// The device was given back (`outcome` is the transport's answer): every later call
    /// fails with [`DeviceError::Released`].
    pub(crate) fn released(&self, outcome: &Result<(), Error>) {
        let mut st = self.lock();
        if let Err(e) = outcome {
            st.release_reason = format!("{}; giving it back failed: {e}", st.release_reason);
        }
        st.release = ReleaseState::Released;
        drop(st);
        self.notify_state_change();
    }

    /// Whether the transport was given back: nothing may touch it any more.
    pub(crate) fn is_released(&self) -> bool {
        self.lock().release == ReleaseState::Released
    }

    /// Tells whoever watches the device that its state changed (leaving, released): waiters
    /// in [`wait_working`](Self::wait_working) look again.
    fn notify_state_change(&self) {
        self.changed.notify_all();
        self.notify();
    }

    /// Recoveries completed so far.
    pub(crate) fn recoveries(&self) -> u64 {
        self.lock().recoveries
    }

    /// Marks the device failed and stops it, so that it touches no memory before any buffer
    /// goes back to its owner.
    pub(crate) fn fail(&self, reason: String) {
        self.stop(reason, false);
    }

    /// Stops the device for `reason`; `closing` when the engine is closing rather than the
    /// device failing (nothing to log as an error, no failure counted).
    fn stop(&self, reason: String, closing: bool) {
        let mut st = self.lock();
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        if closing {
            log::debug!("virtio-crypto device closed");
            st.closing = true;
        } else {
            log::error!("virtio-crypto device failed: {reason}; resetting it and failing every request");
            st.failures.push_back(Instant::now());
        }
        st.reason = reason;
        if !stop_device(&self.pci) {
            self.give_up_unstoppable(&mut st);
        }
        self.pci.fail();
        self.failed.store(true, Ordering::Release);
        self.changed.notify_all();
        drop(st);
        self.notify();
    }

    /// Stops the device again (after a recovery attempt failed or was cut short), and gives it
    /// up with its DMA access revoked if it does not stop: [`DeviceHealth::fail`] does nothing
    /// while the device is already failed, and a device that ignores its resets may still write
    /// the control buffer (a late session answer) the next attempt would wipe and reuse.
    /// Returns whether the device stopped.
    pub(crate) fn stop_again(&self) -> bool {
        let mut st = self.lock();
        if stop_device(&self.pci) {
            return true;
        }
        self.give_up_unstoppable(&mut st);
        self.pci.fail();
        self.changed.notify_all();
        drop(st);
        self.notify();
        false
    }

    /// The device completed neither a reset nor a function-level reset: only the IOMMU can stop
    /// it now, so all its DMA memory is unmapped before any buffer goes back, and it is never
    /// used again.
    fn give_up_unstoppable(&self, st: &mut State) {
        log::error!(
            "{}: the device did not stop after a reset and a function-level reset: unmapping all its \
             DMA memory and giving it up",
            self.pci.transport().name()
        );
        self.pool.revoke_device_access("it ignored a reset and a function-level reset");
        st.reason = format!(
            "{}; then the device ignored a reset and a function-level reset, so its DMA memory was \
             unmapped and it is not used again",
            st.reason
        );
        st.gave_up = Some(Error::Device(DeviceError::Failed(st.reason.clone())));
    }

    /// Marks the engine closing: the device is stopped and not recovered.
    pub(crate) fn close(&self) {
        self.closing_flag.store(true, Ordering::Release);
        self.stop(CLOSED.into(), true);
        self.lock().closing = true;
        self.changed.notify_all();
    }

    /// Waits until a recovery is due; `false` when the engine is closing instead. Gives the
    /// device up (and returns to waiting) when it failed too often.
    pub(crate) fn wait_for_failure(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.closing || st.release != ReleaseState::Held {
                return false;
            }
            if self.is_failed() && st.gave_up.is_none() {
                let now = Instant::now();
                let (max, window) = self.budget;
                while st.failures.front().is_some_and(|t| now.duration_since(*t) > window) {
                    st.failures.pop_front();
                }
                if st.failures.len() >= max {
                    let e = Error::Device(DeviceError::GaveUp {
                        failures: st.failures.len(),
                        window,
                        last: st.reason.clone(),
                    });
                    log::error!("{e}");
                    st.reason = e.to_string();
                    st.gave_up = Some(e);
                    self.changed.notify_all();
                    self.notify();
                    continue;
                }
                st.recovering = true;
                return true;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The device works again.
    pub(crate) fn recovered(&self) {
        let mut st = self.lock();
        st.recovering = false;
        st.recoveries += 1;
        self.failed.store(false, Ordering::Release);
        self.changed.notify_all();
        log::warn!("virtio-crypto device recovered (recovery {})", st.recoveries);
        drop(st);
        self.notify();
    }

    /// A recovery attempt failed: that counts as one more failure.
    pub(crate) fn recovery_failed(&self, e: &Error) {
        let mut st = self.lock();
        st.recovering = false;
        st.failures.push_back(Instant::now());
        st.reason = format!("recovery after a failure did not work: {e}");
        log::error!("{}", st.reason);
        self.changed.notify_all();
        drop(st);
        self.notify();
    }

    /// Waits up to `limit` for a failed device to be recovered (or given up). Returns whether
    /// the device works.
    pub(crate) fn wait_working(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        while self.is_failed() && st.gave_up.is_none() && !st.closing && st.release == ReleaseState::Held {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self.changed.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        !self.is_failed()
    }
}

/// The error of a request that never reached a leaving device (backlogged, or refused), so its
/// data and tag are as submitted.
fn not_run_error(why: &str) -> Error {
    Error::Device(DeviceError::NotRun(why.to_string()))
}

/// Stops the device's DMA: a virtio reset, and if the device does not complete it, bus
/// mastering off and a function-level reset. Returns whether the device reads as reset.
pub(crate) fn stop_device(pci: &VirtioPci) -> bool {
    match pci.reset() {
        Ok(()) => return true,
        Err(e) => log::error!("device reset: {e}; turning bus mastering off and resetting the function"),
    }
    if let Err(e) = pci.disable_bus_master() {
        log::error!("turning bus mastering off: {e}");
    }
    if let Err(e) = pci.transport().reset() {
        log::error!("function-level reset: {e}");
        return false;
    }
    pci.status() == 0
}
