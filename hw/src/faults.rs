//! Scripted device faults: the ways real accelerators misbehave, on demand.
//!
//! A driver is only as trustworthy as its answer to a device that lies, stalls or ignores it.
//! Tests (and the soak) switch these faults on while a driver runs, the way syzkaller-style
//! fault injection provokes a kernel driver: each fault is either persistent (until
//! [`crate::VirtioCryptoPci::clear_faults`]) or one-shot (it hits the next completion or
//! control request, then disarms itself). Everything a fault makes the device write still goes
//! through the IOMMU, so a write to memory the driver has unmapped is recorded as an IOMMU
//! fault ([`crate::DeviceStats::iommu_faults`]) instead of reaching host memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// A fault the emulated device can be told to commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Persistent: data requests taken from the rings are never completed.
    NeverAnswer,
    /// Persistent: data requests complete this long after they were taken (instead of the
    /// configured latency).
    AnswerAfter(Duration),
    /// One-shot: the next data completion is published twice.
    DuplicateUsed,
    /// One-shot: the next data completion names a descriptor that is not in flight (its head
    /// plus one) instead of its own.
    FreeSlotId,
    /// One-shot: the next data completion reports one byte written (status OK) instead of the
    /// destination and status.
    ShortLength,
    /// One-shot: the next data request completes without its status byte being written.
    StatusUnwritten,
    /// One-shot: the next publication carries one used element more than was completed.
    ExtraUsed,
    /// One-shot: the next data request is completed (its used element published, its status
    /// left unwritten) before the device has done it, and the device keeps writing its buffers
    /// every few milliseconds until it is reset, as a device whose completion raced its DMA.
    EarlyCompletion,
    /// Persistent: a virtio reset (status 0) is ignored, and the writable buffers of the data
    /// requests the device holds (see [`Fault::NeverAnswer`]) keep being overwritten every few
    /// milliseconds. With `flr_too`, a function-level reset is ignored as well; without it, an
    /// FLR stops the device as PCIe requires.
    IgnoreReset {
        /// Ignore function-level resets too.
        flr_too: bool,
    },
    /// One-shot: the next control request is taken but answered only after this delay; the
    /// control queue stalls until then (requests are answered in order).
    CtrlLate(Duration),
    /// Persistent: `config_generation` changes on every read, so a consistent read of the
    /// device configuration never settles.
    ConfigGenerationUnsettled,
    /// Persistent: a new session takes the lowest free id (as QEMU's cryptodev reuses its
    /// session table entries) instead of a never-used one, so a stale id a driver still holds
    /// names another session, under another key.
    ReuseSessionIds,
}

/// The lowest byte a device that ignored a reset writes over the buffers it still holds: each
/// round writes the next value up to 0xff, then starts again here, so that every round changes
/// the buffers and no round writes a status virtio-crypto defines.
pub const LATE_WRITE_BYTE: u8 = 0xee;

/// How often a device that ignored a reset writes the buffers it holds.
pub(crate) const LATE_WRITE_PERIOD: Duration = Duration::from_millis(10);

/// One-shot faults that act on a data completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CompletionFault {
    Duplicate,
    FreeSlot,
    Short,
    Extra,
}

/// The fault plan of one device.
#[derive(Default)]
pub(crate) struct Faults {
    never_answer: AtomicBool,
    answer_after_us: AtomicU64,
    status_unwritten: AtomicBool,
    early: AtomicBool,
    ignore_reset: AtomicU8,
    config_unsettled: AtomicBool,
    config_generation: AtomicU8,
    reuse_session_ids: AtomicBool,
    completion: Mutex<VecDeque<CompletionFault>>,
    any_completion: AtomicBool,
    ctrl_late: Mutex<Option<Duration>>,
    /// Writable IOVA ranges of data requests the device holds without completing them.
    held: Mutex<Vec<(u64, u64)>>,
    pub injected: AtomicU64,
}

/// What the device does on a reset while [`Fault::IgnoreReset`] is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResetBehaviour {
    Obey,
    IgnoreVirtio,
    IgnoreAll,
}

impl Faults {
    pub(crate) fn inject(&self, fault: Fault) {
        log::info!("fault injected: {fault:?}");
        match fault {
            Fault::NeverAnswer => self.never_answer.store(true, Ordering::SeqCst),
            Fault::AnswerAfter(d) => self
                .answer_after_us
                .store(d.as_micros().clamp(1, u128::from(u64::MAX)) as u64, Ordering::SeqCst),
            Fault::DuplicateUsed => self.push_completion(CompletionFault::Duplicate),
            Fault::FreeSlotId => self.push_completion(CompletionFault::FreeSlot),
            Fault::ShortLength => self.push_completion(CompletionFault::Short),
            Fault::ExtraUsed => self.push_completion(CompletionFault::Extra),
            Fault::StatusUnwritten => self.status_unwritten.store(true, Ordering::SeqCst),
            Fault::EarlyCompletion => self.early.store(true, Ordering::SeqCst),
            Fault::IgnoreReset { flr_too } => {
                self.ignore_reset.store(1 + u8::from(flr_too), Ordering::SeqCst)
            }
            Fault::CtrlLate(d) => *self.ctrl_late.lock().unwrap_or_else(PoisonError::into_inner) = Some(d),
            Fault::ConfigGenerationUnsettled => self.config_unsettled.store(true, Ordering::SeqCst),
            Fault::ReuseSessionIds => self.reuse_session_ids.store(true, Ordering::SeqCst),
        }
    }

    pub(crate) fn clear(&self) {
        self.never_answer.store(false, Ordering::SeqCst);
        self.answer_after_us.store(0, Ordering::SeqCst);
        self.status_unwritten.store(false, Ordering::SeqCst);
        self.early.store(false, Ordering::SeqCst);
        self.ignore_reset.store(0, Ordering::SeqCst);
        self.config_unsettled.store(false, Ordering::SeqCst);
        self.reuse_session_ids.store(false, Ordering::SeqCst);
        self.completion.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.any_completion.store(false, Ordering::SeqCst);
        *self.ctrl_late.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn push_completion(&self, f: CompletionFault) {
        self.completion.lock().unwrap_or_else(PoisonError::into_inner).push_back(f);
        self.any_completion.store(true, Ordering::SeqCst);
    }

    /// The one-shot fault for the next completion, if any (disarmed by taking it).
    pub(crate) fn take_completion(&self) -> Option<CompletionFault> {
        if !self.any_completion.load(Ordering::Relaxed) {
            return None;
        }
        let mut q = self.completion.lock().unwrap_or_else(PoisonError::into_inner);
        let f = q.pop_front();
        if q.is_empty() {
            self.any_completion.store(false, Ordering::SeqCst);
        }
        if f.is_some() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        f
    }

    pub(crate) fn never_answer(&self) -> bool {
        self.never_answer.load(Ordering::Relaxed)
    }

    pub(crate) fn answer_after(&self) -> Option<Duration> {
        match self.answer_after_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Whether to leave the next status byte unwritten (disarmed by asking).
    pub(crate) fn take_status_unwritten(&self) -> bool {
        let hit = self.status_unwritten.load(Ordering::Relaxed)
            && self.status_unwritten.swap(false, Ordering::SeqCst);
        if hit {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Whether to complete the next request before doing it (disarmed by asking).
    pub(crate) fn take_early(&self) -> bool {
        let hit = self.early.load(Ordering::Relaxed) && self.early.swap(false, Ordering::SeqCst);
        if hit {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    pub(crate) fn reset_behaviour(&self) -> ResetBehaviour {
        match self.ignore_reset.load(Ordering::SeqCst) {
            0 => ResetBehaviour::Obey,
            1 => ResetBehaviour::IgnoreVirtio,
            _ => ResetBehaviour::IgnoreAll,
        }
    }

    /// The value `config_generation` reads as.
    pub(crate) fn config_generation(&self) -> u8 {
        if self.config_unsettled.load(Ordering::Relaxed) {
            self.config_generation.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
        } else {
            self.config_generation.load(Ordering::Relaxed)
        }
    }

    /// Whether new sessions take the lowest free id.
    pub(crate) fn reuse_session_ids(&self) -> bool {
        self.reuse_session_ids.load(Ordering::Relaxed)
    }

    /// Whether the next control answer is to be late.
    pub(crate) fn ctrl_late_armed(&self) -> bool {
        self.ctrl_late.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// The delay of the next control answer, if it is to be late (disarmed by taking it).
    pub(crate) fn take_ctrl_late(&self) -> Option<Duration> {
        let d = self.ctrl_late.lock().unwrap_or_else(PoisonError::into_inner).take();
        if d.is_some() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        d
    }

    /// Records the writable ranges of a request the device holds.
    pub(crate) fn hold(&self, ranges: &[(u64, u64)]) {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(ranges);
    }

    /// The writable ranges of held requests.
    pub(crate) fn held(&self) -> Vec<(u64, u64)> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Forgets the held requests (a reset the device obeyed dropped them).
    pub(crate) fn release_held(&self) {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

/// A control answer the device computed but publishes only later ([`Fault::CtrlLate`]).
pub(crate) struct LateCtrl {
    pub due: std::time::Instant,
    pub head: u16,
    /// The answer bytes and where they go in the writable part.
    pub bytes: Vec<u8>,
    pub offset: u64,
    /// The writable part as IOVA ranges, translated again when the answer is written.
    pub ranges: Vec<(u64, u64)>,
}

/// Writes `data` at byte `offset` of the buffer made of `ranges`, through the IOMMU as it maps
/// memory now. Returns false if any byte fell on unmapped IOVA space (an IOMMU fault: nothing
/// is written there).
pub(crate) fn write_through(
    snap: &crate::iommu::Snapshot,
    ranges: &[(u64, u64)],
    offset: u64,
    data: &[u8],
) -> bool {
    let mut ok = true;
    let (mut pos, end) = (0u64, offset + data.len() as u64);
    for &(iova, len) in ranges {
        let (from, to) = (offset.max(pos), end.min(pos + len));
        if from < to {
            let mut done = (from - offset) as usize;
            ok &= snap.translate(iova + (from - pos), to - from, |p, n| {
                if !p.is_null() {
                    // SAFETY: `p..p + n` is mapped memory kept alive by `snap`; the device may
                    // write memory the driver mapped for it, and does so with a raw copy.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(done), p, n as usize) };
                }
                done += n as usize;
            });
        }
        pos += len;
    }
    ok
}
