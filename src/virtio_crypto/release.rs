//! Giving the device back when its owner asks for it.
//!
//! vfio-pci cannot take a function away from a process: before an unbind or a hot-unplug it
//! signals the device request interrupt and waits, every 10 s, until every descriptor of the
//! function is closed; a process that never answers blocks the kernel's unbind (and with it the
//! hypervisor's unplug) for as long as it runs. DPDK forwards that interrupt to the application
//! and leaves the detach to it. Here the engine answers by itself, on a thread of its own
//! (`crypt-vfio-req`; never an interrupt thread, which the drain needs): the device stops
//! taking requests, lets those it holds finish for a short while, stops, loses its DMA
//! mappings, and goes back to its owner. Each step logs one line stamped with CLOCK_MONOTONIC,
//! the clock of the kernel's log, so the two timelines line up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Core;
use crate::error::{Error, Result};
use crate::transport::{EventNotifier, Transport};

/// How often the listener looks at its stop flag while no request comes.
const WAKE: Duration = Duration::from_secs(1);

/// The listener thread of one device.
pub(crate) struct Listener {
    stop: Arc<AtomicBool>,
    notifier: Arc<EventNotifier>,
    thread: Option<JoinHandle<()>>,
    /// Told to stop signalling `notifier` once the thread ended.
    transport: Arc<dyn Transport>,
}

impl Listener {
    /// Watches `core`'s transport for release requests, if it can tell them; `None` (with a
    /// warning) when it cannot. `recovery` is the recovery thread, joined before the device
    /// is stopped for good (it would touch the device); `drain` is how long requests on the
    /// device may take to finish.
    pub(crate) fn spawn(
        core: Arc<Core>,
        recovery: Arc<Mutex<Option<JoinHandle<()>>>>,
        drain: Duration,
    ) -> Result<Option<Self>> {
        let notifier = Arc::new(EventNotifier::new()?);
        let transport = core.pci.transport().clone();
        let watching = transport.watch_release_request(&notifier).unwrap_or_else(|e| {
            log::warn!("{}: routing the device request interrupt: {e}", transport.name());
            false
        });
        if !watching {
            log::warn!(
                "{}: the transport cannot tell when the kernel wants the device back; an unbind or \
                 unplug will wait until crypt-vfio closes it",
                transport.name()
            );
            return Ok(None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (s, n) = (stop.clone(), notifier.clone());
        let spawned = std::thread::Builder::new()
            .name("crypt-vfio-req".into())
            .spawn(move || listen(&core, &recovery, &s, &n, drain));
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                transport.unwatch_release_request();
                return Err(Error::os(
                    format!("{}: spawning the release request thread", transport.name()),
                    e,
                ));
            }
        };
        Ok(Some(Self { stop, notifier, thread: Some(thread), transport }))
    }

    /// Ends the thread (a release under way finishes first), and the routing of release
    /// requests to its eventfd: the transport would otherwise keep a descriptor (or the
    /// kernel an interrupt) for a listener that is gone.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.notifier.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.transport.unwatch_release_request();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The listener thread: waits for a release request on `notifier` (looking at `stop` every
/// [`WAKE`]) and answers the first with [`release_now`]; ends then, on `stop`, or when the
/// eventfd cannot be read.
fn listen(
    core: &Core,
    recovery: &Mutex<Option<JoinHandle<()>>>,
    stop: &AtomicBool,
    notifier: &EventNotifier,
    drain: Duration,
) {
    while !stop.load(Ordering::Acquire) {
        match notifier.wait(WAKE) {
            Ok(true) if !stop.load(Ordering::Acquire) => {
                // Later requests (the owner repeats them until it has the device) find the
                // device gone; nothing is left to do for them.
                release_now(core, recovery, drain);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                log::error!(
                    "{}: waiting for release requests: {e}; no longer listening (an unbind or unplug \
                     will wait until crypt-vfio closes the device)",
                    core.pci.transport().name()
                );
                return;
            }
        }
    }
}

/// Seconds on CLOCK_MONOTONIC, the clock the kernel's log is stamped with.
fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid one given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Gives the device back: stop taking requests, drain, stop, unmap, release.
fn release_now(core: &Core, recovery: &Mutex<Option<JoinHandle<()>>>, drain: Duration) {
    let transport = core.pci.transport();
    let name = transport.name();
    log::info!("{name}: release request seen (t={:.3})", monotonic());
    let why = format!("{name} was given back at its owner's request (unbind or unplug)");
    if !core.health.begin_release(why) {
        return;
    }
    let mut scratch = Vec::new();
    let (mut in_flight, mut backlogged) = (0, 0);
    for q in &core.queues {
        let (i, b) = q.begin_leaving(&mut scratch);
        in_flight += i;
        backlogged += b;
    }
    log::info!(
        "{name}: stopped taking requests: {in_flight} in flight, {backlogged} backlogged failed (t={:.3})",
        monotonic()
    );
    // A recovery under way would set the device up again behind the release: it sees the
    // device leaving and ends, and its thread with it.
    let recovery = recovery.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = recovery {
        let _ = t.join();
    }
    // The device still works: let what it holds finish, reaping here whatever the completion
    // mode (in polling mode nobody else may be polling now).
    let deadline = Instant::now() + drain;
    let left = loop {
        let left: usize = core
            .queues
            .iter()
            .map(|q| {
                q.poll(&mut scratch);
                q.outstanding()
            })
            .sum();
        if left == 0 || core.health.is_failed() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    log::info!(
        "{name}: drained {}, {left} still on the device fail (t={:.3})",
        in_flight.saturating_sub(left),
        monotonic()
    );
    // No session request is under way, and none starts: they look at `leaving` under this lock.
    let ctl = core.control();
    core.health.stop_for_release();
    for q in &core.queues {
        // Fails what is left (the device is stopped) and ends the queue's completion thread.
        q.close(&mut scratch);
    }
    core.pool.revoke_device_access("it was given back");
    let outcome = transport.release();
    if let Err(e) = &outcome {
        log::error!("{name}: giving the device back: {e}");
    }
    core.health.released(&outcome);
    drop(ctl);
    log::info!("{name}: stopped, DMA unmapped, device released (t={:.3})", monotonic());
}
