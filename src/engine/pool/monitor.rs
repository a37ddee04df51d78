//! The pool's monitor thread (`crypt-vfio-pool`): members leaving and rejoining.
//!
//! Device members tell it of every change of state through their observer (which only wakes
//! it: observers may run under the device's locks). It marks a failed member down, and once
//! the device's own recovery has brought it back, creates the sessions it missed and lets it
//! take requests again, moving what waits to it. While no member is up it keeps time: after
//! [`PoolOptions::member_wait`](super::PoolOptions::member_wait), or at once when every member
//! is gone for good, whatever waits fails with `NoMemberLeft`. A second thread, the kicker,
//! moves waiting requests and delivers events a submit produced (the software member completes
//! in place) when callers sleep until the pool delivers.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::queue::PoolQueueShared;
use super::session::Slot;
use super::{create_on, MemberState, Shared};
use crate::engine::{AnyEngine, Engine};
use crate::virtio_crypto::ReleaseState;

/// How often the monitor looks while a member is down (a device's recovery does not always
/// end with an observer call the monitor can act on at once, e.g. sessions still missing).
const DOWN_POLL: Duration = Duration::from_millis(20);
/// How often it looks otherwise (a bound only: observers wake it).
const IDLE_POLL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Flags {
    woken: bool,
    stop: bool,
}

/// Wakes the monitor: set a flag under a leaf lock and notify.
#[derive(Default)]
pub(crate) struct Signal {
    flags: Mutex<Flags>,
    cond: Condvar,
}

impl Signal {
    pub(crate) fn wake(&self) {
        self.flags.lock().unwrap_or_else(|e| e.into_inner()).woken = true;
        self.cond.notify_one();
    }

    pub(crate) fn stop(&self) {
        self.flags.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.cond.notify_one();
    }

    /// Waits for a wake-up or `limit`; `false` once stopped.
    fn wait(&self, limit: Duration) -> bool {
        let mut f = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        if !f.woken && !f.stop {
            f = self.cond.wait_timeout(f, limit).unwrap_or_else(|e| e.into_inner()).0;
        }
        f.woken = false;
        !f.stop
    }
}

pub(crate) fn spawn(
    shared: Arc<Shared>,
    engines: Arc<Vec<AnyEngine>>,
    queues: Arc<Vec<Arc<PoolQueueShared>>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("crypt-vfio-pool".into()).spawn(move || run(&shared, &engines, &queues))
}

fn run(shared: &Shared, engines: &[AnyEngine], queues: &[Arc<PoolQueueShared>]) {
    let mut none_up_since: Option<Instant> = None;
    loop {
        // Only a member that may come back is worth a quick look.
        let settled = shared.members.iter().all(|m| m.state() != MemberState::Down);
        if !shared.signal.wait(if settled { IDLE_POLL } else { DOWN_POLL }) {
            return;
        }
        for (m, engine) in engines.iter().enumerate() {
            let Some(device) = engine.device() else { continue };
            let member = &shared.members[m];
            let state = member.state();
            if state == MemberState::Released {
                continue;
            }
            if device.release_state() != ReleaseState::Held {
                // Its owner wants it back: whatever it still drains comes back NotRun and runs
                // elsewhere; it never rejoins.
                log::warn!(
                    "pool member {} is being given back to its owner; it leaves the pool",
                    member.name
                );
                member.set(MemberState::Released, Some("its owner asked for it back".into()));
            } else if device.gave_up() {
                if state != MemberState::Lost {
                    let why = device.failure().unwrap_or_else(|| "given up".into());
                    log::error!("pool member {} is lost: {why}", member.name);
                    member.set(MemberState::Lost, Some(why));
                }
            } else if let Some(why) = device.failure() {
                if state == MemberState::Up {
                    shared.member_down(m, &why);
                }
            } else if state == MemberState::Down && fill_missing(shared, m, engine) {
                log::warn!("pool member {} rejoined", member.name);
                member.set(MemberState::Up, None);
                // A session created while it was down, after the look above, skipped it.
                fill_missing(shared, m, engine);
            } else if state == MemberState::Up {
                // A session whose creation met a transient error on it.
                fill_missing(shared, m, engine);
            }
        }
        if shared.members.iter().any(|m| m.is_up()) {
            none_up_since = None;
            shared.dead.store(false, std::sync::atomic::Ordering::Release);
        } else {
            let since = *none_up_since.get_or_insert_with(Instant::now);
            let all_gone = shared.members.iter().all(|m| m.is_gone());
            if (all_gone || since.elapsed() >= shared.options.member_wait) && !shared.is_dead() {
                let e = shared.no_member_left();
                log::error!("{e}");
                shared.dead.store(true, std::sync::atomic::Ordering::Release);
            }
            if shared.is_dead() {
                for q in queues {
                    q.fail_waiting(&|| shared.no_member_left());
                }
            }
        }
        // A member may have come back, or requests failed: waiting requests move.
        shared.kick.wake();
    }
}

/// The kicker thread (`crypt-vfio-pool-kick`): moves waiting requests to members with room and
/// delivers events no caller's poll will (software completions a submit made while callers
/// sleep, slots one pool queue freed for another). Apart from the monitor, which may wait for
/// a device's control answer while it fills sessions, so that those events are never held up
/// for a control timeout.
pub(crate) fn spawn_kicker(
    shared: Arc<Shared>,
    queues: Arc<Vec<Arc<PoolQueueShared>>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("crypt-vfio-pool-kick".into()).spawn(move || {
        use std::sync::atomic::Ordering::SeqCst;
        while shared.kick.wait(IDLE_POLL) {
            loop {
                let seen = shared.completions.load(SeqCst);
                // Cleared before the look, so that a queue that backlogs meanwhile sets it again.
                shared.waiting.store(false, SeqCst);
                for q in queues.iter() {
                    q.kick();
                }
                if !queues.iter().any(|q| q.has_waiting()) {
                    break;
                }
                shared.waiting.store(true, SeqCst);
                std::sync::atomic::fence(SeqCst);
                // A completion while `waiting` was clear did not wake us: its freed slots may be
                // what a queue we already passed waits for.
                if shared.completions.load(SeqCst) == seen {
                    break;
                }
            }
        }
    })
}

/// Creates the sessions member `m` misses (it was down when they were made); whether it can
/// take requests (false: it failed again meanwhile; the rest is tried once it is back).
fn fill_missing(shared: &Shared, m: usize, engine: &AnyEngine) -> bool {
    for state in shared.live_sessions() {
        if !matches!(state.slots().get(m), Some(Slot::Missing)) {
            continue;
        }
        let mut ignored = None;
        let slot = create_on(shared, m, engine, state.mode, &state.key, &mut ignored, true);
        if matches!(slot, Slot::Missing) {
            return false;
        }
        // Destroyed meanwhile, or filled by its creator: the member's session goes.
        if let Some(loser) = state.fill(m, slot) {
            let _ = engine.destroy_session(&loser);
        }
    }
    true
}
