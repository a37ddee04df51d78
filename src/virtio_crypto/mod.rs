//! The virtio-crypto device family (virtio 1.2 section 5.9) as an [`Engine`].
//!
//! Everything specific to virtio-crypto lives here: its configuration, sessions on the control
//! queue, and the layout of data requests. It reaches the device only through
//! `crate::virtio` and [`crate::transport`], so a second device family would sit beside this
//! module without touching the layers under it.

mod config;
mod control;
mod data_queue;
mod health;
mod layout;
mod recovery;
mod release;
mod session;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crypt_vfio_cores::Mode;
use crypt_vfio_spec::pci::{feature, VIRTIO_CRYPTO_DEVICE_ID, VIRTIO_MSI_NO_VECTOR};
use crypt_vfio_wait::SpinBudget;

pub use config::DeviceInfo;
pub use health::{Observer, ReleaseState, FAILURE_WINDOW, MAX_FAILURES};
pub use session::DeviceSession;

use control::ControlQueue;
use data_queue::{DataQueueShared, DeviceQueue, QueueSetup};
use health::DeviceHealth;
use session::SessionRegistry;

use crate::dma::DmaPool;
use crate::engine::{BatchSink, Buf, Direction, Engine, EventSink, Queue};
use crate::error::{CryptoError, DeviceError, Error, Result};
use crate::transport::{EventNotifier, Transport};
use crate::virtio::VirtioPci;

/// How completions are noticed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompletionMode {
    /// Callers' [`Queue::poll`] reaps completions (lowest latency on an idle machine; burns the
    /// caller's CPU, and collapses when the machine has no CPU to spare).
    Poll,
    /// A thread per data queue spins for a fixed couple of microseconds, then sleeps on the
    /// queue's MSI-X eventfd, and delivers events itself.
    Interrupt,
    /// Completion as NAPI busy polling does it: a caller waiting for its requests polls the
    /// queue for a budget learnt from recent completion times (at most [`ADAPTIVE_MAX_SPIN`]),
    /// then sleeps until its callback runs; a thread per data queue sleeps on the MSI-X eventfd
    /// without spinning and delivers what callers leave (so callers that never poll, like the
    /// async API, still get their events). On an idle machine completions are reaped by the
    /// spinning caller without interrupts; on a busy one nobody spins for long, so the CPU goes
    /// to whoever does the work. [`Engine::delivers_events`] says callers may sleep.
    /// The default, of the library and of the command line.
    #[default]
    Adaptive,
}

impl CompletionMode {
    /// Whether events arrive without the caller's [`Queue::poll`] (a thread of the engine
    /// delivers them), so a caller may sleep until its callback runs.
    pub fn delivers_events(self) -> bool {
        self != Self::Poll
    }

    /// The completion thread's spin before it sleeps on the interrupt.
    fn spin_budget(self) -> SpinBudget {
        match self {
            // Callers spin; a spinning completion thread would only take their CPU.
            Self::Adaptive => SpinBudget::new(Duration::ZERO, Duration::ZERO),
            _ => SpinBudget::new(INTERRUPT_SPIN, INTERRUPT_SPIN),
        }
    }
}

/// Longest a caller spins for completions in adaptive mode before sleeping: about what a sleep
/// and wake-up cost on a two-vCPU guest, beyond which spinning cannot pay.
pub const ADAPTIVE_MAX_SPIN: Duration = Duration::from_micros(50);

/// The interrupt mode's fixed spin (about the 256 polls it always made).
const INTERRUPT_SPIN: Duration = Duration::from_micros(2);

/// Default data queue size: with indirect descriptors, 256 requests in flight per queue, and a
/// descriptor table of exactly one 4 KiB page. QEMU's emulated IOMMU misreads ring areas that
/// span pages which are not physically contiguous (seen in the guest test with 512 entries on
/// normal pages), so the default keeps each ring area within a page.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Driver settings.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Data queues to use (0: all the device has).
    pub data_queues: usize,
    /// Entries per data queue (0: the device's maximum, at most 256). A power of two.
    pub queue_size: u16,
    /// Requests each data queue may hold in its software backlog.
    pub backlog_limit: usize,
    /// Adaptive (the default: spin a learnt budget, then sleep until an interrupt), polling, or interrupts.
    pub completion: CompletionMode,
    /// How long requests may wait for the device before it is declared failed.
    pub request_timeout: Duration,
    /// Use indirect descriptors when the device offers them.
    pub indirect: bool,
    /// Use EVENT_IDX notification suppression when the device offers it.
    pub event_idx: bool,
    /// Failures within a window after which the device is not recovered again (default
    /// [`MAX_FAILURES`] within [`FAILURE_WINDOW`]).
    pub failure_budget: (usize, Duration),
    /// Give the device back when its owner asks (vfio-pci before an unbind or hot-unplug):
    /// see [`VirtioCrypto`]. Off, the owner waits until the engine is closed.
    pub watch_release: bool,
    /// When the device is given back, how long requests on it may take to finish before they
    /// fail.
    pub release_drain: Duration,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            data_queues: 0,
            queue_size: 0,
            backlog_limit: 4096,
            completion: CompletionMode::Adaptive,
            request_timeout: Duration::from_secs(10),
            indirect: true,
            event_idx: true,
            failure_budget: (health::MAX_FAILURES, health::FAILURE_WINDOW),
            watch_release: true,
            release_drain: DEFAULT_RELEASE_DRAIN,
        }
    }
}

/// Default of [`DeviceOptions::release_drain`].
pub const DEFAULT_RELEASE_DRAIN: Duration = Duration::from_secs(1);

/// A virtio-crypto device, driven through a [`Transport`].
///
/// When the device fails (a request times out, it writes something impossible, a control
/// request goes unanswered), every request on it completes with an error, the device is
/// stopped, and a recovery thread resets and re-initialises it, re-creates the live sessions
/// from the keys they hold, and lets new requests in again; see `health` for when it gives up.
///
/// When the device's owner wants it back (vfio-pci before an unbind or a hot-unplug, see
/// [`Transport::watch_release_request`]), a thread of the engine gives it back: requests are
/// refused from then on, backlogged ones fail (Promoted first), those on the device get
/// [`DeviceOptions::release_drain`] to finish and fail after it, the device is stopped and its
/// DMA memory unmapped, and the transport releases it. Every later call fails with
/// [`DeviceError::Released`] and touches nothing of the device.
pub struct VirtioCrypto {
    core: Arc<Core>,
    threads: Vec<JoinHandle<()>>,
    /// Shared with the release listener, which ends it before it stops the device.
    recovery: Arc<Mutex<Option<JoinHandle<()>>>>,
    release: Option<release::Listener>,
}

/// Everything the engine and its recovery thread share.
pub(crate) struct Core {
    pci: Arc<VirtioPci>,
    pool: DmaPool,
    info: DeviceInfo,
    features: u64,
    control: Mutex<ControlQueue>,
    queues: Vec<Arc<DataQueueShared>>,
    health: Arc<DeviceHealth>,
    sessions: SessionRegistry,
    config_irq: Option<EventNotifier>,
    interrupts: bool,
    /// Incarnation of the device: counts resets the engine recovered from. Changed only with
    /// the control queue held; session ids are valid only in their incarnation, and the data
    /// queues (which share it) send no others.
    epoch: Arc<std::sync::atomic::AtomicU64>,
    /// Which engine this is: sessions of another engine are refused.
    id: crate::engine::EngineId,
}

/// What `open` built so far, torn down in order if a later step fails.
struct OpenGuard {
    pci: Arc<VirtioPci>,
    threads: Vec<JoinHandle<()>>,
    queues: Vec<Arc<DataQueueShared>>,
    msix: bool,
    armed: bool,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Stop the device before anything it was given goes away, then the threads.
        let _ = self.pci.reset();
        self.pci.fail();
        let mut scratch = Vec::new();
        for q in &self.queues {
            q.close(&mut scratch);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if self.msix {
            let _ = self.pci.transport().disable_msix();
        }
    }
}

impl VirtioCrypto {
    /// Brings up the virtio-crypto device behind `transport`. On failure the device is left
    /// reset and marked FAILED, and no thread of it is left running.
    pub fn open(transport: Arc<dyn Transport>, options: &DeviceOptions) -> Result<Self> {
        let pci = Arc::new(VirtioPci::probe(transport.clone())?);
        if pci.device_id() != VIRTIO_CRYPTO_DEVICE_ID {
            return Err(Error::Device(DeviceError::Unsupported(format!(
                "{}: virtio device {:#06x} is not virtio-crypto ({VIRTIO_CRYPTO_DEVICE_ID:#06x})",
                transport.name(),
                pci.device_id()
            ))));
        }
        let mut guard =
            OpenGuard { pci: pci.clone(), threads: Vec::new(), queues: Vec::new(), msix: false, armed: true };
        pci.enable_bus_master()?;
        let mut wanted = 1u64 << feature::ACCESS_PLATFORM;
        if options.event_idx {
            wanted |= 1 << feature::RING_EVENT_IDX;
        }
        if options.indirect {
            wanted |= 1 << feature::RING_INDIRECT_DESC;
        }
        let features = pci.negotiate(1 << feature::VERSION_1, wanted)?;
        let info = DeviceInfo::read(&pci)?;
        if !info.ready() {
            return Err(Error::Device(DeviceError::Init(format!(
                "{}: the device says it is not ready (status {})",
                transport.name(),
                info.status
            ))));
        }
        let available = info.max_dataqueues as usize;
        let ctrl_index = u16::try_from(info.max_dataqueues)
            .ok()
            .filter(|&i| i >= 1 && i < pci.num_queues())
            .ok_or_else(|| {
                Error::Device(DeviceError::Init(format!(
                    "device reports {} data queues but {} virtqueues in all",
                    info.max_dataqueues,
                    pci.num_queues()
                )))
            })?;
        let nqueues = if options.data_queues == 0 { available } else { options.data_queues.min(available) };
        if options.data_queues > available {
            log::warn!("{} data queues asked, the device has {available}", options.data_queues);
        }
        let event_idx = features & (1 << feature::RING_EVENT_IDX) != 0;
        let indirect = features & (1 << feature::RING_INDIRECT_DESC) != 0;
        let pool = DmaPool::new(transport.clone());
        let health = Arc::new(DeviceHealth::new(
            pci.clone(),
            pool.clone(),
            options.request_timeout,
            options.failure_budget,
        ));

        // Interrupts: vector 0 for configuration changes, vector 1 + q for data queue q.
        let interrupts = options.completion.delivers_events();
        let mut notifiers: Vec<Option<EventNotifier>> = Vec::new();
        if interrupts {
            let need = nqueues + 1;
            let have = usize::from(transport.msix_vectors());
            if have < need {
                return Err(Error::Device(DeviceError::Init(format!(
                    "interrupt mode needs {need} MSI-X vectors, the device has {have}; use polling"
                ))));
            }
            for _ in 0..need {
                notifiers.push(Some(EventNotifier::new()?));
            }
            let refs: Vec<Option<&EventNotifier>> = notifiers.iter().map(|n| n.as_ref()).collect();
            guard.msix = true;
            transport.enable_msix(&refs)?;
            pci.set_config_vector(0);
        }

        let control = ControlQueue::new(
            &pci,
            &pool,
            ctrl_index,
            event_idx,
            options.request_timeout,
            health.closing_flag.clone(),
        )?;
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for q in 0..nqueues {
            let index = q as u16;
            let max = pci.queue_max_size(index);
            let size = if options.queue_size == 0 { max.min(DEFAULT_QUEUE_SIZE) } else { options.queue_size };
            if size == 0 || size > max || !size.is_power_of_two() {
                return Err(Error::Device(DeviceError::Init(format!(
                    "data queue {q}: size {size} is not a power of two up to the device's maximum of {max}"
                ))));
            }
            let setup = QueueSetup {
                index,
                size,
                event_idx,
                indirect,
                backlog_limit: options.backlog_limit,
                max_size: usize::try_from(info.max_size).unwrap_or(usize::MAX),
                msix_vector: if interrupts { index + 1 } else { VIRTIO_MSI_NO_VECTOR },
                irq: notifiers.get_mut(q + 1).and_then(Option::take),
                epoch: epoch.clone(),
            };
            guard.queues.push(Arc::new(DataQueueShared::new(&pci, &pool, health.clone(), setup)?));
        }
        pci.driver_ok();
        if interrupts {
            for (i, q) in guard.queues.clone().into_iter().enumerate() {
                let spin = options.completion.spin_budget();
                let t = std::thread::Builder::new()
                    .name(format!("crypt-vfio-irq{i}"))
                    .spawn(move || q.interrupt_loop(spin))
                    .map_err(|e| Error::os("spawning the interrupt thread", e))?;
                guard.threads.push(t);
            }
        }
        log::info!(
            "{}: virtio-crypto up, {} data queue(s) of {} slots, features {features:#x} ({})",
            transport.name(),
            guard.queues.len(),
            guard.queues.first().map_or(0, |q| q.capacity()),
            info
        );
        let config_irq = notifiers.first_mut().and_then(Option::take);
        let core = Arc::new(Core {
            pci,
            pool,
            info,
            features,
            control: Mutex::new(control),
            queues: guard.queues.clone(),
            health,
            sessions: SessionRegistry::default(),
            config_irq,
            interrupts,
            epoch,
            id: crate::engine::EngineId::new(),
        });
        let recovery =
            recovery::spawn(core.clone()).map_err(|e| Error::os("spawning the recovery thread", e))?;
        guard.armed = false;
        let threads = std::mem::take(&mut guard.threads);
        let mut this = Self {
            core: core.clone(),
            threads,
            recovery: Arc::new(Mutex::new(Some(recovery))),
            release: None,
        };
        if options.watch_release {
            // On failure `this` drops, which stops the device and its threads.
            this.release = release::Listener::spawn(core, this.recovery.clone(), options.release_drain)?;
        }
        Ok(this)
    }

    /// Whether completions are delivered by the engine's own threads (interrupt mode) rather
    /// than by callers' [`Queue::poll`].
    pub fn interrupts(&self) -> bool {
        self.core.interrupts
    }

    /// The device configuration read at start-up.
    pub fn info(&self) -> &DeviceInfo {
        &self.core.info
    }

    /// The negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.core.features
    }

    /// The DMA pool of this device (for zero-copy buffers).
    pub fn pool(&self) -> &DmaPool {
        &self.core.pool
    }

    /// Whether the device is failed right now (awaiting recovery, or given up), and why.
    pub fn failure(&self) -> Option<String> {
        self.core.health.is_failed().then(|| self.core.health.reason())
    }

    /// Where the device stands in being given back to its owner.
    pub fn release_state(&self) -> ReleaseState {
        self.core.health.release_state()
    }

    /// Whether the device was given up: it failed too often, or would not stop. It is not
    /// recovered again.
    pub fn gave_up(&self) -> bool {
        self.core.health.gave_up()
    }

    /// Calls `observer` on every change of the device's state: it failed, it was recovered, a
    /// recovery attempt failed, it was given up (and, with the release of a device the kernel
    /// asks back, when it is leaving and when it is released). The observer is not told what
    /// changed: it reads the state again ([`failure`](Self::failure), [`gave_up`](Self::gave_up)).
    ///
    /// It runs on whichever thread changed the state, possibly under the device's own locks, so
    /// it must return at once and must not call into this device: set a flag and wake a thread
    /// (an engine pool wakes its monitor this way).
    pub fn observe(&self, observer: Observer) {
        self.core.health.observe(observer);
    }

    /// How many times the device was recovered after a failure.
    pub fn recoveries(&self) -> u64 {
        self.core.health.recoveries()
    }

    /// Waits up to `limit` for a failed device to be recovered; returns whether it works.
    pub fn wait_working(&self, limit: Duration) -> bool {
        self.core.health.wait_working(limit)
    }

    /// Stops the device for good and completes every request on it with an error, without
    /// recovery: for a caller that must end now (a server stopping) whatever the device does.
    pub fn abort(&self) {
        self.core.health.close();
        let mut scratch = Vec::new();
        for q in &self.core.queues {
            q.fail_all(&mut scratch);
        }
    }
}

/// How long a session call waits for a recovery in progress before it fails.
const RECOVERY_WAIT: Duration = Duration::from_secs(5);

impl Core {
    fn control(&self) -> std::sync::MutexGuard<'_, ControlQueue> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The control queue, once the device works (waiting for a recovery in progress).
    fn working_control(&self) -> Result<std::sync::MutexGuard<'_, ControlQueue>> {
        if self.health.is_failed() && !self.health.wait_working(RECOVERY_WAIT) {
            return Err(self.health.error());
        }
        let ctl = self.control();
        // Under the lock: a release stops the device while it holds it.
        if self.health.is_leaving() {
            return Err(self.health.error());
        }
        Ok(ctl)
    }

    /// A control request failed in a way that leaves the queue waiting for a reset: the device
    /// is failed (and so reset, then recovered).
    fn check_control(&self, ctl: std::sync::MutexGuard<'_, ControlQueue>) {
        if let Some(why) = ctl.dirty().map(str::to_owned) {
            drop(ctl);
            self.health.fail(format!("control queue: {why}"));
        }
    }

    fn create_pair(&self, ctl: &mut ControlQueue, mode: Mode, key: &[u8]) -> Result<(u64, u64)> {
        let encrypt_id = ctl.create(mode, Direction::Encrypt, key)?;
        match ctl.create(mode, Direction::Decrypt, key) {
            Ok(id) => Ok((encrypt_id, id)),
            Err(e) => {
                if ctl.dirty().is_none() {
                    let _ = ctl.destroy(mode, encrypt_id);
                }
                Err(e)
            }
        }
    }
}

impl Engine for VirtioCrypto {
    type Session = DeviceSession;

    fn describe(&self) -> String {
        format!("virtio-crypto on {}", self.core.pci.transport().name())
    }

    fn create_session(&self, mode: Mode, key: &[u8]) -> Result<DeviceSession> {
        // The same key checks as the software cores, so both engines refuse the same keys with
        // the same typed errors before the device sees them.
        crypt_vfio_cores::check_key(mode, key)?;
        let core = &self.core;
        let mut ctl = core.working_control()?;
        // Registered while the control queue is held, so that a recovery (which takes it
        // first) cannot miss the session and leave it with ids of the device before the reset.
        let result = core.create_pair(&mut ctl, mode, key).map(|(encrypt_id, decrypt_id)| {
            let epoch = core.epoch.load(std::sync::atomic::Ordering::Acquire);
            let session = DeviceSession::new(core.id, mode, key, encrypt_id, decrypt_id, epoch);
            core.sessions.add(&session);
            session
        });
        core.check_control(ctl);
        result
    }

    fn destroy_session(&self, session: &DeviceSession) -> Result<()> {
        let core = &self.core;
        if session.engine != core.id {
            return Err(Error::Crypto(CryptoError::InvalidSession));
        }
        // Marked destroyed only once the control queue is held (a recovery, which holds it, then
        // cannot be under way): if the device does not come back in time the session stays
        // live, so a recovery still re-creates it and its handle keeps ids that name it.
        let mut ctl = core.working_control()?;
        session.state.destroyed.store(true, std::sync::atomic::Ordering::Release);
        if session.state.epoch() != core.epoch.load(std::sync::atomic::Ordering::Acquire) {
            // Its device sessions died with a reset and it was not re-created: nothing to
            // destroy, and its old ids may name another session now.
            return Ok(());
        }
        let a = ctl.destroy(session.mode, session.encrypt_id());
        let b = if ctl.dirty().is_none() { ctl.destroy(session.mode, session.decrypt_id()) } else { Ok(()) };
        core.check_control(ctl);
        a.and(b)
    }

    fn queue_count(&self) -> usize {
        self.core.queues.len()
    }

    fn open_queue(
        &self,
        index: usize,
        sink: EventSink<DeviceSession>,
    ) -> Result<Box<dyn Queue<DeviceSession>>> {
        let queues = &self.core.queues;
        let shared = queues[index % queues.len()].clone();
        Ok(Box::new(DeviceQueue::new(shared, sink, self.core.id)))
    }

    fn open_batch_queue(
        &self,
        index: usize,
        sink: BatchSink<DeviceSession>,
    ) -> Result<Box<dyn Queue<DeviceSession>>> {
        let queues = &self.core.queues;
        let shared = queues[index % queues.len()].clone();
        Ok(Box::new(DeviceQueue::batched(shared, sink, self.core.id)))
    }

    fn max_request_len(&self) -> usize {
        usize::try_from(self.core.info.max_size).unwrap_or(usize::MAX)
    }

    fn queue_capacity(&self, index: usize) -> Option<usize> {
        let queues = &self.core.queues;
        Some(queues[index % queues.len()].capacity())
    }

    fn delivers_events(&self) -> bool {
        self.core.interrupts
    }

    fn alloc_buffer(&self, len: usize) -> Result<Buf> {
        if self.core.health.is_leaving() {
            return Err(self.core.health.error());
        }
        Ok(Buf::Dma(Box::new(self.core.pool.alloc(len)?)))
    }
}

impl Drop for VirtioCrypto {
    fn drop(&mut self) {
        // Stop the device (the failure path resets it) before anything it may touch goes away,
        // and the recovery thread with it; then hand every request back.
        let core = &self.core;
        // A release under way finishes first; the device is then stopped already.
        if let Some(mut l) = self.release.take() {
            l.stop();
        }
        core.health.close();
        let recovery = self.recovery.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = recovery {
            let _ = t.join();
        }
        // A recovery that finished meanwhile left the device running: stop it again.
        core.health.close();
        let mut scratch = Vec::new();
        for q in &core.queues {
            q.close(&mut scratch);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // A device given back is not ours to touch.
        if !core.health.is_released() {
            let _ = core.pci.transport().disable_msix();
        }
    }
}
