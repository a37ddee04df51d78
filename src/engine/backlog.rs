//! The backlog contract, in one place.
//!
//! Every engine with a bounded hardware ring routes its submissions through [`Backlog`], so the
//! rules of the Linux crypto API's `CRYPTO_TFM_REQ_MAY_BACKLOG` hold by construction:
//!
//! * A request goes to the ring only when the ring has room and nothing is backlogged: once a
//!   backlog exists, newer requests queue behind it (FIFO).
//! * With backlog allowed and the ring full, the request is kept ([`Submitted::Backlogged`]);
//!   past the backlog limit, or without backlog allowed, it comes back with `Busy`.
//! * When room appears, backlogged requests move to the ring in order, each announced by exactly
//!   one `Promoted` before anything else is said about it, including when the move fails.
//! * When the device fails, every backlogged request is promoted and then failed, so that no
//!   caller waiting for `Promoted` waits forever.
//! * A batch ([`Backlog::submit_batch`]) is the same rules applied to its requests in order,
//!   under one lock: the ones that fit go to the ring, and once one does not, the rest of the
//!   batch goes to the backlog behind it, in order; the first refused request ends the batch.
//! * A request already announced (answered `InProgress`, or `Promoted`) that must run again
//!   (its device failed under it, and an engine with several devices runs it on another) waits
//!   in the re-run lane ([`Backlog::rerun`]). It goes to the ring before any backlogged request,
//!   without a second `Promoted`; a failure fails it without one; and while it waits, new
//!   requests queue behind it as behind a backlog.
//!
//! This is the fix for the 2015 CAAM behaviour, where "busy" meant "dropped" and dm-crypt waited
//! for a callback that never came.

use std::collections::VecDeque;

use super::request::Submitted;
use crate::error::Error;

/// The hardware side of a queue, as the backlog sees it.
pub trait Ring<T> {
    /// Whether one more request fits on the ring now.
    fn has_space(&self) -> bool;
    /// Whether `item` fits on the ring now. A ring where it depends on the request (an engine
    /// of several devices, where a request can go only to a device that holds its session)
    /// says so here; the default is [`has_space`](Self::has_space).
    fn has_space_for(&self, _item: &T) -> bool {
        self.has_space()
    }
    /// Places `item` on the ring; called only when [`has_space_for`](Self::has_space_for). On failure
    /// the item comes back with the reason and is not on the ring.
    fn push(&mut self, item: T) -> Result<(), (T, Error)>;
}

/// Where the backlog reports what happened to requests it moved or failed.
pub trait Outbox<T> {
    /// `item` reached the ring (or is about to fail): the `Promoted` notification.
    fn promoted(&mut self, item: &T);
    /// `item` is finished without reaching the device.
    fn failed(&mut self, item: T, error: Error);
}

/// Why a submission was not accepted.
#[derive(Debug)]
pub enum Refused {
    /// Ring full (or backlog non-empty) and no backlogging possible.
    Busy,
    /// The ring refused the request itself.
    Rejected(Error),
}

/// What [`Backlog::submit_batch`] did with a batch.
#[derive(Debug)]
pub struct BatchResult<T> {
    /// Items placed on the ring (the first ones taken).
    pub in_progress: usize,
    /// Items backlogged after them.
    pub backlogged: usize,
    /// The item that ended the batch, and why; the source's later items were not taken.
    pub refused: Option<(T, Refused)>,
}

/// The software backlog in front of a ring.
#[derive(Debug)]
pub struct Backlog<T> {
    queue: VecDeque<T>,
    /// Announced requests to run again, ahead of the backlog.
    rerun: VecDeque<T>,
    limit: usize,
}

impl<T> Backlog<T> {
    /// A backlog holding at most `limit` requests.
    pub fn new(limit: usize) -> Self {
        Self { queue: VecDeque::with_capacity(limit.min(4096)), rerun: VecDeque::new(), limit }
    }

    /// Backlogged requests waiting (not counting re-runs).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Announced requests waiting to run again.
    pub fn reruns(&self) -> usize {
        self.rerun.len()
    }

    /// Whether nothing waits, backlogged or to run again.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.rerun.is_empty()
    }

    /// Takes back `item`, which was announced already (its submit said `InProgress`, or its
    /// `Promoted` was sent) and must run again: it goes to the ring before any backlogged
    /// request, with no second `Promoted`. Not counted against the backlog limit: it was
    /// counted when it was accepted.
    pub fn rerun(&mut self, item: T) {
        self.rerun.push_back(item);
    }

    /// Submits `item`: to the ring, to the backlog, or back to the caller.
    #[inline(always)]
    pub fn submit<R: Ring<T>>(
        &mut self,
        item: T,
        may_backlog: bool,
        ring: &mut R,
    ) -> Result<Submitted, (T, Refused)> {
        if self.queue.is_empty() && self.rerun.is_empty() && ring.has_space_for(&item) {
            return match ring.push(item) {
                Ok(()) => Ok(Submitted::InProgress),
                Err((item, e)) => Err((item, Refused::Rejected(e))),
            };
        }
        if may_backlog && self.queue.len() < self.limit {
            self.queue.push_back(item);
            Ok(Submitted::Backlogged)
        } else {
            Err((item, Refused::Busy))
        }
    }

    /// Submits the items of `items` in order, as [`submit`](Self::submit) would one by one,
    /// until it runs out or an item is refused; nothing else can happen in between (the caller
    /// holds the queue lock), so the accepted items are ring placements followed by backlogged
    /// ones, never the reverse.
    #[inline]
    pub fn submit_batch<R: Ring<T>>(
        &mut self,
        items: impl Iterator<Item = T>,
        may_backlog: bool,
        ring: &mut R,
    ) -> BatchResult<T> {
        let mut out = BatchResult { in_progress: 0, backlogged: 0, refused: None };
        for item in items {
            match self.submit(item, may_backlog, ring) {
                Ok(Submitted::InProgress) => out.in_progress += 1,
                Ok(Submitted::Backlogged) => out.backlogged += 1,
                Err(refused) => {
                    out.refused = Some(refused);
                    break;
                }
            }
        }
        out
    }

    /// Moves re-runs, then backlogged requests, to the ring, oldest first, while the oldest
    /// fits. Returns how many moved (including ones whose move failed and were reported as
    /// failed).
    pub fn promote<R: Ring<T>, O: Outbox<T>>(&mut self, ring: &mut R, out: &mut O) -> usize {
        let mut moved = 0;
        while self.rerun.front().is_some_and(|item| ring.has_space_for(item)) {
            let Some(item) = self.rerun.pop_front() else {
                break;
            };
            if let Err((item, e)) = ring.push(item) {
                out.failed(item, e);
            }
            moved += 1;
        }
        if !self.rerun.is_empty() {
            return moved;
        }
        while self.queue.front().is_some_and(|item| ring.has_space_for(item)) {
            let Some(item) = self.queue.pop_front() else {
                break;
            };
            out.promoted(&item);
            if let Err((item, e)) = ring.push(item) {
                out.failed(item, e);
            }
            moved += 1;
        }
        moved
    }

    /// Fails every waiting request (device failure): each re-run (announced already) is
    /// failed, and each backlogged one is promoted, then failed.
    pub fn fail_all<O: Outbox<T>>(&mut self, out: &mut O, error: impl Fn() -> Error) {
        while let Some(item) = self.rerun.pop_front() {
            out.failed(item, error());
        }
        while let Some(item) = self.queue.pop_front() {
            out.promoted(&item);
            out.failed(item, error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{CryptoError, DeviceError};

    struct TestRing {
        cap: usize,
        items: Vec<u32>,
        reject: Option<u32>,
    }

    impl Ring<u32> for TestRing {
        fn has_space(&self) -> bool {
            self.items.len() < self.cap
        }
        fn push(&mut self, item: u32) -> Result<(), (u32, Error)> {
            if Some(item) == self.reject {
                return Err((item, Error::Crypto(CryptoError::InvalidSession)));
            }
            self.items.push(item);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Log(Vec<String>);

    impl Outbox<u32> for Log {
        fn promoted(&mut self, item: &u32) {
            self.0.push(format!("P{item}"));
        }
        fn failed(&mut self, item: u32, _: Error) {
            self.0.push(format!("F{item}"));
        }
    }

    #[test]
    fn fifo_once_a_backlog_exists() {
        let mut ring = TestRing { cap: 1, items: vec![], reject: None };
        let mut b = Backlog::new(2);
        assert_eq!(b.submit(1, true, &mut ring).unwrap(), Submitted::InProgress);
        assert_eq!(b.submit(2, true, &mut ring).unwrap(), Submitted::Backlogged);
        ring.items.clear(); // the device completed 1
                            // Room on the ring, but 2 waits: 3 must queue behind it.
        assert_eq!(b.submit(3, true, &mut ring).unwrap(), Submitted::Backlogged);
        assert!(matches!(b.submit(4, true, &mut ring), Err((4, Refused::Busy))), "limit reached");
        assert!(matches!(b.submit(5, false, &mut ring), Err((5, Refused::Busy))));
        let mut log = Log::default();
        assert_eq!(b.promote(&mut ring, &mut log), 1);
        assert_eq!(log.0, ["P2"]);
        assert_eq!(ring.items, [2]);
    }

    #[test]
    fn a_batch_that_half_fits_backlogs_the_rest_in_order() {
        let mut ring = TestRing { cap: 2, items: vec![], reject: None };
        let mut b = Backlog::new(3);
        let mut source = 1..=7u32;
        let r = b.submit_batch(&mut source, true, &mut ring);
        // 1 and 2 fit, 3..5 fill the backlog, 6 is refused and ends the batch; 7 is untouched.
        assert_eq!((r.in_progress, r.backlogged), (2, 3));
        assert!(matches!(r.refused, Some((6, Refused::Busy))));
        assert_eq!(source.next(), Some(7));
        assert_eq!(ring.items, [1, 2]);
        // Room again, but the backlog is older: a new batch queues behind it, never overtakes.
        ring.items.clear();
        let r = b.submit_batch([8u32].into_iter(), true, &mut ring);
        assert_eq!((r.in_progress, r.backlogged), (0, 0));
        assert!(matches!(r.refused, Some((8, Refused::Busy))), "backlog full");
        let mut log = Log::default();
        assert_eq!(b.promote(&mut ring, &mut log), 2);
        assert_eq!(log.0, ["P3", "P4"]);
        let r = b.submit_batch([9u32, 10].into_iter(), false, &mut ring);
        assert_eq!((r.in_progress, r.backlogged), (0, 0), "a backlog exists: without backlog, busy");
        assert!(matches!(r.refused, Some((9, Refused::Busy))));
        let r = b.submit_batch([11u32, 12].into_iter(), true, &mut ring);
        assert_eq!((r.in_progress, r.backlogged), (0, 2));
        ring.items.clear();
        b.promote(&mut ring, &mut log);
        assert_eq!(log.0, ["P3", "P4", "P5", "P11"]);
    }

    #[test]
    fn a_rerun_goes_first_without_a_second_promoted_and_holds_new_requests_back() {
        let mut ring = TestRing { cap: 1, items: vec![], reject: None };
        let mut b = Backlog::new(4);
        assert_eq!(b.submit(1, true, &mut ring).unwrap(), Submitted::InProgress);
        assert_eq!(b.submit(2, true, &mut ring).unwrap(), Submitted::Backlogged);
        // 1's device failed under it: it runs again, before 2, and is not announced twice.
        ring.items.clear();
        b.rerun(1);
        assert!(!b.is_empty());
        assert_eq!((b.len(), b.reruns()), (1, 1));
        // Room on the ring, but a re-run waits: a new request queues behind it.
        assert_eq!(b.submit(3, true, &mut ring).unwrap(), Submitted::Backlogged);
        assert!(matches!(b.submit(4, false, &mut ring), Err((4, Refused::Busy))));
        let mut log = Log::default();
        assert_eq!(b.promote(&mut ring, &mut log), 1);
        assert_eq!(log.0, Vec::<String>::new(), "a re-run is not promoted again");
        assert_eq!(ring.items, [1]);
        ring.items.clear();
        assert_eq!(b.promote(&mut ring, &mut log), 1);
        assert_eq!(log.0, ["P2"]);
        // A failure fails a re-run without a Promoted, and promotes the backlog first.
        b.rerun(7);
        b.fail_all(&mut log, || Error::Device(DeviceError::NotRun("gone".into())));
        assert_eq!(log.0, ["P2", "F7", "P3", "F3"]);
        assert!(b.is_empty());
    }

    /// A ring that takes only even items (as a pool member holds only some sessions).
    struct EvenRing(Vec<u32>);

    impl Ring<u32> for EvenRing {
        fn has_space(&self) -> bool {
            true
        }
        fn has_space_for(&self, item: &u32) -> bool {
            item % 2 == 0
        }
        fn push(&mut self, item: u32) -> Result<(), (u32, Error)> {
            self.0.push(item);
            Ok(())
        }
    }

    #[test]
    fn space_is_asked_for_the_request_and_the_oldest_decides() {
        let mut ring = EvenRing(vec![]);
        let mut b = Backlog::new(4);
        assert_eq!(b.submit(2, true, &mut ring).unwrap(), Submitted::InProgress);
        assert_eq!(b.submit(3, true, &mut ring).unwrap(), Submitted::Backlogged);
        // 4 would fit, but 3 is older: FIFO holds.
        assert_eq!(b.submit(4, true, &mut ring).unwrap(), Submitted::Backlogged);
        let mut log = Log::default();
        assert_eq!(b.promote(&mut ring, &mut log), 0);
        assert_eq!(ring.0, [2]);
        b.rerun(5);
        assert_eq!(b.promote(&mut ring, &mut log), 0, "a re-run that does not fit holds the backlog back");
        assert!(log.0.is_empty());
    }

    #[test]
    fn promoted_comes_before_a_failure() {
        let mut ring = TestRing { cap: 1, items: vec![1], reject: Some(2) };
        let mut b = Backlog::new(8);
        b.submit(2, true, &mut ring).unwrap();
        b.submit(3, true, &mut ring).unwrap();
        ring.items.clear();
        let mut log = Log::default();
        b.promote(&mut ring, &mut log);
        assert_eq!(log.0, ["P2", "F2", "P3"]);
        b.submit(4, true, &mut ring).unwrap();
        b.fail_all(&mut log, || Error::Device(DeviceError::Failed("gone".into())));
        assert_eq!(log.0, ["P2", "F2", "P3", "P4", "F4"]);
        assert!(b.is_empty());
    }
}
