//! Several engines as one: the engine pool.
//!
//! A host often has more than one accelerator (several virtio-crypto functions, many VFs), and
//! any of them can fail while a volume is in use. [`PoolEngine`] is one [`Engine`] over several
//! member engines (devices, and at most one software engine): sessions are created on every
//! member, each pool queue spreads its requests over the devices (to the one with the most free
//! ring slots), and the backlog contract holds for the pool as a whole because the pool queue
//! has the only backlog: members are only ever given a request when they have room for it.
//!
//! When a member fails, requests it had not run (its data intact: a bounce buffer is copied
//! back only on success) run again on another member; a zero-copy request whose buffer the
//! device may have written fails with [`DeviceError::MemberFailed`], for the caller to run again
//! from its own data. A recovered member rejoins (its missing sessions created first). The
//! software member stands by: it runs requests only while no device that holds their session
//! is up, the last line of failover. Requests wait while every member is down, up to
//! [`PoolOptions::member_wait`]; then, or at once when every member is gone for good, they fail
//! with [`DeviceError::NoMemberLeft`], which says what happened to each member.
//!
//! Lock order: a pool queue's lock, then a member queue's. Member callbacks take the pool
//! queue's lock and are never called under it (members are polled outside it, and a member
//! submit never calls back), and device observers only wake the monitor.

mod monitor;
mod queue;
mod session;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crypt_vfio_cores::Mode;

pub use session::PoolSession;

use super::sync::AtomicUsize;

use super::{AnyEngine, BatchSink, Buf, Engine, EngineId, EventSink, Queue};
use crate::dma::DmaPool;
use crate::error::{CryptoError, DeviceError, Error, MemberFate, Result};
use monitor::Signal;
use queue::{PoolQueue, PoolQueueShared};
use session::{SessionState, Slot};

/// Most members a pool takes (a request's tried members are a bit each of a `u64`).
pub const MAX_MEMBERS: usize = 64;

/// What a pool member is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// It takes requests.
    Up,
    /// It failed and is being recovered: it takes no requests until it rejoins.
    Down,
    /// It was given up (it failed too often, or would not stop): it never rejoins.
    Lost,
    /// Its owner (vfio-pci, a hypervisor) asked for it back: it drains or was given back, and
    /// never rejoins.
    Released,
}

impl MemberState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => MemberState::Up,
            1 => MemberState::Down,
            2 => MemberState::Lost,
            _ => MemberState::Released,
        }
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemberState::Up => "up",
            MemberState::Down => "down",
            MemberState::Lost => "lost",
            MemberState::Released => "released",
        })
    }
}

/// Pool settings.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// How long requests wait while every member is down before they fail with
    /// [`DeviceError::NoMemberLeft`].
    pub member_wait: Duration,
    /// Requests each pool queue may hold in its backlog.
    pub backlog_limit: usize,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self { member_wait: Duration::from_secs(10), backlog_limit: 4096 }
    }
}

/// One member's share of the work since the pool was opened.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberStats {
    /// The member's name (`emulated#0`, a PCI address, `software`).
    pub name: String,
    /// What it is doing now.
    pub state: MemberState,
    /// Requests it completed (successfully or with a request error).
    pub requests: u64,
    /// Bytes of those requests.
    pub bytes: u64,
    /// Requests that failed with it, to run again elsewhere: by the pool (their data intact),
    /// or by the caller ([`DeviceError::MemberFailed`]).
    pub reruns_out: u64,
    /// Requests it took to run again after another member failed.
    pub reruns_in: u64,
    /// Of `reruns_out`, those handed back to their caller ([`DeviceError::MemberFailed`]): the
    /// device may have written their zero-copy buffer.
    pub member_failed: u64,
    /// Times the device was recovered after a failure.
    pub recoveries: u64,
    /// Requests it completed since it last rejoined the pool (all of them if it never left).
    pub since_rejoin: u64,
    /// Times it broke what the pool relies on: it refused a request it had a free slot for
    /// (credits are the pool's only flow control), promoted one (it is never let backlog), or
    /// completed one it did not hold. Always 0 unless something else submits to its queues.
    pub violations: u64,
    /// Its share of all completed requests, 0 to 1.
    pub share: f64,
}

/// One member queue's free ring slots. The pool is the member's only submitter, so a credit is
/// a slot the member will accept a request in: taken before a submit, given back when the
/// request's completion reaches the pool (after the member freed the slot). Pool queues that
/// share a member queue take and return its credits under their own locks, so the count is an
/// atomic (checked by `tests/loom_models.rs`).
pub struct Credit {
    free: AtomicUsize,
    capacity: usize,
}

impl Credit {
    /// A member queue of `capacity` slots, all free.
    pub fn new(capacity: usize) -> Self {
        Self { free: AtomicUsize::new(capacity), capacity }
    }

    /// Slots free now.
    pub fn free(&self) -> usize {
        self.free.load(Ordering::Acquire)
    }

    /// Takes one slot, if one is free.
    pub fn take(&self) -> bool {
        self.free.fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| f.checked_sub(1)).is_ok()
    }

    /// Returns a slot the member freed.
    pub fn give_back(&self) {
        let _ = self.free.fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
            if f < self.capacity {
                Some(f + 1)
            } else {
                log::error!("pool: a member queue's credit came back twice");
                None
            }
        });
    }
}

/// A member as every pool queue sees it.
pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) software: bool,
    state: AtomicU8,
    /// When it went down (or was lost), and why.
    down: Mutex<Option<(Instant, String)>>,
    /// Per member queue; empty for the software member (unbounded, runs in place).
    pub(crate) credits: Vec<Credit>,
    /// The device's DMA memory (a zero-copy buffer from it is pinned to this member).
    pub(crate) dma: Option<DmaPool>,
    pub(crate) requests: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) reruns_out: AtomicU64,
    pub(crate) reruns_in: AtomicU64,
    pub(crate) member_failed: AtomicU64,
    recoveries: AtomicU64,
    /// `requests` when it last rejoined.
    requests_at_rejoin: AtomicU64,
    pub(crate) violations: AtomicU64,
}

impl Member {
    pub(crate) fn state(&self) -> MemberState {
        MemberState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Up to Down, in one step: the monitor may have found it lost or released meanwhile, and
    /// that must not be overwritten by a Down it would then bring back. Whether it was Up.
    fn down_if_up(&self, why: &str) -> bool {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        let was_up = self
            .state
            .compare_exchange(
                MemberState::Up as u8,
                MemberState::Down as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if was_up {
            let since = down.as_ref().map_or_else(Instant::now, |d| d.0);
            *down = Some((since, why.to_string()));
        }
        was_up
    }

    pub(crate) fn is_up(&self) -> bool {
        self.state.load(Ordering::Acquire) == MemberState::Up as u8
    }

    /// Whether it is gone for good (lost or released): it never runs a request again.
    pub(crate) fn is_gone(&self) -> bool {
        matches!(self.state(), MemberState::Lost | MemberState::Released)
    }

    fn set(&self, state: MemberState, why: Option<String>) {
        if state == MemberState::Up {
            self.requests_at_rejoin.store(self.requests.load(Ordering::Relaxed), Ordering::Relaxed);
            *self.down.lock().unwrap_or_else(|e| e.into_inner()) = None;
        } else if let Some(why) = why {
            let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
            let since = down.as_ref().map_or_else(Instant::now, |d| d.0);
            *down = Some((since, why));
        }
        self.state.store(state as u8, Ordering::Release);
    }

    /// The credit of member queue `q`.
    pub(crate) fn credit(&self, q: usize) -> Option<&Credit> {
        (!self.credits.is_empty()).then(|| &self.credits[q % self.credits.len()])
    }

    fn fate(&self, wait: Duration) -> MemberFate {
        let down = self.down.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let fate = match (self.state(), down) {
            (MemberState::Up, _) => "up".to_string(),
            (MemberState::Down, Some((since, why))) => format!(
                "failed {:.1} s ago and not back within {wait:?} (last: {why})",
                since.elapsed().as_secs_f64()
            ),
            (MemberState::Lost, Some((_, why))) => why,
            (MemberState::Released, Some((since, why))) => {
                format!("released {:.1} s ago ({why})", since.elapsed().as_secs_f64())
            }
            (state, None) => state.to_string(),
        };
        MemberFate { member: self.name.clone(), fate }
    }
}

/// What the pool's queues, its monitor and its engine share.
pub(crate) struct Shared {
    pub(crate) id: EngineId,
    pub(crate) members: Vec<Member>,
    /// Device members, in member order (pool queue `i`'s home is `devices[i % len]`).
    pub(crate) devices: Vec<usize>,
    sessions: Mutex<Vec<Weak<SessionState>>>,
    pub(crate) signal: Arc<Signal>,
    /// Wakes the kicker thread, which moves waiting requests and delivers events (apart from
    /// the monitor, which may wait on a device's control queue while it fills sessions).
    pub(crate) kick: Signal,
    pub(crate) closing: AtomicBool,
    /// Set while no member is left (every one lost, or down past `member_wait`).
    dead: AtomicBool,
    /// Some pool queue may have requests waiting for a member slot. Pool queues that share a
    /// member queue free each other's slots, and a completion reaches only its own pool queue,
    /// so while this is set a completion wakes the monitor to move the others' waiting requests
    /// (rather than leaving them to the next poll, or the monitor's idle look a second later).
    pub(crate) waiting: AtomicBool,
    /// Member completions so far (each may have given a member queue's slots back). The kicker
    /// reads it around its pass: slots freed while it looked, after it had seen `waiting`
    /// cleared, would otherwise wait for its idle look (see `monitor::spawn_kicker`).
    pub(crate) completions: std::sync::atomic::AtomicU64,
    pub(crate) options: PoolOptions,
    pub(crate) max_request_len: usize,
    /// Every device member delivers events on its own thread.
    pub(crate) delivers: bool,
}

impl Shared {
    /// Member `m` failed under a request (or refused one): no more requests go to it, and the
    /// monitor looks at it.
    pub(crate) fn member_down(&self, m: usize, why: &str) {
        let member = &self.members[m];
        if member.software {
            return;
        }
        if member.down_if_up(why) {
            log::warn!("pool member {} failed ({why}); its requests move to the other members", member.name);
        }
        self.signal.wake();
    }

    /// The error for a request no member is left to run.
    pub(crate) fn no_member_left(&self) -> Error {
        let wait = self.options.member_wait;
        Error::Device(DeviceError::NoMemberLeft(self.members.iter().map(|m| m.fate(wait)).collect()))
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Most times a request may be given to a member before it fails. A request that every
    /// device fails under may be what breaks them, so it is not run forever; but a device may
    /// fail a few times (three by default) before it is given up, for reasons of its own, and a
    /// request that met those failures is not to blame.
    ///
    /// The bound is twice per device, plus one: a device fails under a request it did nothing
    /// to about as often as a device fails at all, and twice is below the default failure
    /// budget (three in a minute), so a request that breaks every device it touches cannot by
    /// itself make the pool give a device up; the extra attempt lets a request meet one
    /// failure of each device while the others recover. The software member never fails
    /// under a request, so it always ends the count.
    pub(crate) fn max_attempts(&self) -> u32 {
        2 * self.devices.len() as u32 + 1
    }

    fn live_sessions(&self) -> Vec<Arc<SessionState>> {
        let mut list = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).filter(|s| !s.is_destroyed()).collect()
    }
}

/// Several engines as one; see the module documentation.
pub struct PoolEngine {
    shared: Arc<Shared>,
    engines: Arc<Vec<AnyEngine>>,
    queues: Arc<Vec<Arc<PoolQueueShared>>>,
    monitor: Option<JoinHandle<()>>,
    kicker: Option<JoinHandle<()>>,
    /// The device member the next buffer comes from (round robin).
    next_buffer: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for PoolEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PoolEngine").field(&self.describe()).finish()
    }
}

impl PoolEngine {
    /// A pool of `members`, each with its name (`emulated#0`, a PCI address, `software`).
    /// Pools do not nest, and at most one member is the software engine.
    pub fn new(members: Vec<(String, AnyEngine)>, options: PoolOptions) -> Result<Self> {
        let invalid = |why: String| Error::Device(DeviceError::Init(format!("engine pool: {why}")));
        if members.is_empty() {
            return Err(invalid("no members".into()));
        }
        if members.iter().any(|(_, e)| matches!(e, AnyEngine::Pool(_))) {
            return Err(invalid("a pool cannot be a member of a pool".into()));
        }
        if members.len() > MAX_MEMBERS {
            return Err(invalid(format!("{} members; at most {MAX_MEMBERS}", members.len())));
        }
        if members.iter().filter(|(_, e)| matches!(e, AnyEngine::Software(_))).count() > 1 {
            return Err(invalid("at most one member may be the software engine".into()));
        }
        let signal = Arc::new(Signal::default());
        let mut list = Vec::with_capacity(members.len());
        let mut engines = Vec::with_capacity(members.len());
        let mut devices = Vec::new();
        let mut delivers = true;
        for (m, (name, engine)) in members.into_iter().enumerate() {
            let software = engine.device().is_none();
            let credits = if software {
                Vec::new()
            } else {
                devices.push(m);
                delivers &= engine.completes_by_itself();
                (0..engine.queue_count())
                    .map(|q| Credit::new(engine.queue_capacity(q).unwrap_or(usize::MAX).max(1)))
                    .collect()
            };
            if let Some(d) = engine.device() {
                let signal = signal.clone();
                d.observe(Arc::new(move || signal.wake()));
            }
            list.push(Member {
                name,
                software,
                state: AtomicU8::new(MemberState::Up as u8),
                down: Mutex::new(None),
                credits,
                dma: engine.device().map(|d| d.pool().clone()),
                requests: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                reruns_out: AtomicU64::new(0),
                reruns_in: AtomicU64::new(0),
                member_failed: AtomicU64::new(0),
                recoveries: AtomicU64::new(engine.device().map_or(0, |d| d.recoveries())),
                requests_at_rejoin: AtomicU64::new(0),
                violations: AtomicU64::new(0),
            });
            engines.push(engine);
        }
        // With only the software member, events need a poll as they do from the software engine.
        delivers &= !devices.is_empty();
        let queue_count = devices.iter().map(|&m| engines[m].queue_count()).sum::<usize>().max(1);
        let shared = Arc::new(Shared {
            id: EngineId::new(),
            max_request_len: engines.iter().map(|e| e.max_request_len()).min().unwrap_or(0),
            members: list,
            devices,
            sessions: Mutex::default(),
            signal,
            kick: Signal::default(),
            closing: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            completions: std::sync::atomic::AtomicU64::new(0),
            options,
            delivers,
        });
        let queues = (0..queue_count)
            .map(|i| PoolQueueShared::new(i, shared.clone(), &engines))
            .collect::<Result<Vec<_>>>()?;
        let engines = Arc::new(engines);
        let queues = Arc::new(queues);
        let kicker = monitor::spawn_kicker(shared.clone(), queues.clone())
            .map_err(|e| Error::os("spawning the pool kicker thread", e))?;
        let monitor = match monitor::spawn(shared.clone(), engines.clone(), queues.clone()) {
            Ok(m) => m,
            Err(e) => {
                shared.kick.stop();
                let _ = kicker.join();
                return Err(Error::os("spawning the pool monitor thread", e));
            }
        };
        log::info!(
            "engine pool of {} member(s), {queue_count} queue(s): {}",
            engines.len(),
            shared.members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        Ok(Self {
            shared,
            engines,
            queues,
            monitor: Some(monitor),
            kicker: Some(kicker),
            next_buffer: Default::default(),
        })
    }

    /// The members, in order, with their names.
    pub fn members(&self) -> impl Iterator<Item = (&str, &AnyEngine)> {
        self.shared.members.iter().map(|m| m.name.as_str()).zip(self.engines.iter())
    }

    /// Each member's state and share of the work since the pool was opened.
    pub fn member_stats(&self) -> Vec<MemberStats> {
        let total: u64 = self.shared.members.iter().map(|m| m.requests.load(Ordering::Relaxed)).sum();
        self.shared
            .members
            .iter()
            .zip(self.engines.iter())
            .map(|(m, e)| {
                let requests = m.requests.load(Ordering::Relaxed);
                MemberStats {
                    name: m.name.clone(),
                    state: m.state(),
                    requests,
                    bytes: m.bytes.load(Ordering::Relaxed),
                    reruns_out: m.reruns_out.load(Ordering::Relaxed),
                    reruns_in: m.reruns_in.load(Ordering::Relaxed),
                    member_failed: m.member_failed.load(Ordering::Relaxed),
                    recoveries: e.device().map_or(0, |d| d.recoveries())
                        - m.recoveries.load(Ordering::Relaxed),
                    since_rejoin: requests.saturating_sub(m.requests_at_rejoin.load(Ordering::Relaxed)),
                    violations: m.violations.load(Ordering::Relaxed),
                    share: if total == 0 { 0.0 } else { requests as f64 / total as f64 },
                }
            })
            .collect()
    }

    /// Whether events arrive without the caller polling: every device member runs its own
    /// completion threads.
    pub fn completes_by_itself(&self) -> bool {
        self.shared.delivers
    }

    /// Stops every device member for good and completes every request with an error, without
    /// running anything again: for a caller that must end now (a server stopping).
    pub fn abort(&self) {
        self.shared.closing.store(true, Ordering::Release);
        for e in self.engines.iter() {
            if let Some(d) = e.device() {
                d.abort();
            }
        }
        let closed = || Error::Device(DeviceError::Failed("the engine pool was stopped".into()));
        for q in self.queues.iter() {
            q.fail_waiting(&closed);
        }
    }

    /// The pool queue of `index`.
    fn queue(&self, index: usize) -> Arc<PoolQueueShared> {
        self.queues[index % self.queues.len()].clone()
    }
}

impl Engine for PoolEngine {
    type Session = PoolSession;

    fn describe(&self) -> String {
        let names: Vec<&str> = self.shared.members.iter().map(|m| m.name.as_str()).collect();
        format!("pool of {}", names.join(", "))
    }

    fn create_session(&self, mode: Mode, key: &[u8]) -> Result<PoolSession> {
        // The checks every member makes, so that a bad key gets the same error as from one
        // engine even when no member is up to make them.
        crypt_vfio_cores::check_key(mode, key)?;
        let state = Arc::new(SessionState::new(mode, key, self.engines.len()));
        // Registered first: a member that rejoins meanwhile gets the session from the monitor.
        self.shared.sessions.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&state));
        let mut first_error = None;
        for (m, engine) in self.engines.iter().enumerate() {
            if !self.shared.members[m].is_up() {
                continue;
            }
            let slot = create_on(&self.shared, m, engine, mode, key, &mut first_error, false);
            // The monitor may have filled the slot meanwhile (the member rejoined): one wins.
            if let Some(loser) = state.fill(m, slot) {
                let _ = engine.destroy_session(&loser);
            }
        }
        let held = state.slots().iter().filter(|s| matches!(s, Slot::Have(_))).count();
        // A member that rejoined while this ran may have missed the session: the monitor
        // fills it.
        self.shared.signal.wake();
        if held == 0 {
            let _ = self.destroy_session(&PoolSession { pool: self.shared.id, state: state.clone() });
            return Err(first_error.unwrap_or_else(|| self.shared.no_member_left()));
        }
        Ok(PoolSession { pool: self.shared.id, state })
    }

    fn destroy_session(&self, session: &PoolSession) -> Result<()> {
        if session.pool != self.shared.id {
            return Err(Error::Crypto(CryptoError::InvalidSession));
        }
        session.state.destroyed.store(true, Ordering::Release);
        let slots: Vec<Slot> =
            std::mem::replace(&mut *session.state.slots_mut(), vec![Slot::Unsupported; self.engines.len()]);
        let mut result = Ok(());
        for ((engine, slot), member) in self.engines.iter().zip(slots).zip(&self.shared.members) {
            if let Slot::Have(s) = slot {
                if member.state() == MemberState::Released {
                    // Given back: the device holds nothing any more.
                    continue;
                }
                if let Err(e) = engine.destroy_session(&s) {
                    if matches!(e, Error::Device(DeviceError::Released(_))) {
                        continue;
                    }
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        result
    }

    fn queue_count(&self) -> usize {
        self.queues.len()
    }

    fn open_queue(&self, index: usize, sink: EventSink<PoolSession>) -> Result<Box<dyn Queue<PoolSession>>> {
        let sink: BatchSink<PoolSession> = Arc::new(move |events| events.for_each(|e| sink(e)));
        self.open_batch_queue(index, sink)
    }

    fn open_batch_queue(
        &self,
        index: usize,
        sink: BatchSink<PoolSession>,
    ) -> Result<Box<dyn Queue<PoolSession>>> {
        Ok(Box::new(PoolQueue::new(self.queue(index), sink, &self.engines)?))
    }

    fn max_request_len(&self) -> usize {
        self.shared.max_request_len
    }

    fn queue_capacity(&self, index: usize) -> Option<usize> {
        let i = index % self.queues.len();
        let mut total = 0usize;
        for &m in &self.shared.devices {
            total = total.saturating_add(self.shared.members[m].credit(i)?.capacity);
        }
        (!self.shared.devices.is_empty()).then_some(total)
    }

    fn delivers_events(&self) -> bool {
        self.shared.delivers
    }

    /// DMA memory of an up device, each in turn (zero copy: a request with it runs on that
    /// device, or, if it is down, elsewhere from a copy); host memory when no device is up.
    fn alloc_buffer(&self, len: usize) -> Result<Buf> {
        let devices = &self.shared.devices;
        let start = self.next_buffer.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for k in 0..devices.len() {
            let m = devices[(start + k) % devices.len()];
            if self.shared.members[m].is_up() {
                if let Ok(b) = self.engines[m].alloc_buffer(len) {
                    return Ok(b);
                }
            }
        }
        Ok(Buf::Host(vec![0; len]))
    }
}

/// Creates the session on member `m`: its slot, and the first error worth reporting. Only a
/// device loss leaves the slot Missing for good (created when the member is back); a member
/// that refuses the mode or key gets Unsupported; another error (a transient status, no room)
/// leaves it Missing for one more try by the monitor, which passes `last_try` and then marks
/// it Unsupported, so that no session keeps a member out of the pool.
fn create_on(
    shared: &Shared,
    m: usize,
    engine: &AnyEngine,
    mode: Mode,
    key: &[u8],
    first_error: &mut Option<Error>,
    last_try: bool,
) -> Slot {
    match engine.create_session(mode, key) {
        Ok(s) => Slot::Have(s),
        Err(e) => {
            let slot = match &e {
                Error::Device(d) if d.is_device_loss() => {
                    shared.member_down(m, &d.to_string());
                    Slot::Missing
                }
                Error::Crypto(
                    CryptoError::NotSupported(_)
                    | CryptoError::KeyRejected(_)
                    | CryptoError::KeyLength { .. },
                ) => Slot::Unsupported,
                _ if last_try => {
                    log::warn!(
                        "pool member {}: no {mode} session ({e}); it runs none of that session's requests",
                        shared.members[m].name
                    );
                    Slot::Unsupported
                }
                _ => Slot::Missing,
            };
            log::debug!("pool member {}: no {mode} session: {e}", shared.members[m].name);
            first_error.get_or_insert(e);
            slot
        }
    }
}

impl Drop for PoolEngine {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.signal.stop();
        self.shared.kick.stop();
        for t in [self.monitor.take(), self.kicker.take()].into_iter().flatten() {
            let _ = t.join();
        }
        // What waits in the pool fails now; what members hold fails as they close (their
        // engines go when the last reference, this one, drops), and nothing runs again.
        let closed = || Error::Device(DeviceError::Failed("the engine pool was closed".into()));
        for q in self.queues.iter() {
            q.fail_waiting(&closed);
        }
    }
}
