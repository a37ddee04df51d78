//! Sector range locks: concurrent I/O to the same sectors of a volume, one at a time.
//!
//! A write to an encrypted volume is not one atomic step: an authenticated volume writes the
//! sealed data and then its IV and tag, and any write of a partial sector reads the sector,
//! patches it and writes it back. Two such writes to the same sector at once can interleave
//! (data of one with the tag of the other: a sector that no longer authenticates; or a
//! read-modify-write that puts back bytes another write has just replaced: a lost update).
//! So every write holds its sector range exclusively, and a read that must see data and
//! metadata of one write holds its range shared.
//!
//! The table holds the ranges in use, not one lock per sector: a request takes its whole range
//! at once or waits, so there is no lock order to get wrong and no deadlock between
//! overlapping multi-sector requests, and unrelated requests never wait for each other.
//!
//! Synchronous callers wait on a condition variable; futures ([`RangeLocks::exclusive_async`],
//! [`RangeLocks::shared_async`]) must never block their thread (an executor that polls several
//! of them on one thread would never poll again the future that holds the range: a hang), so
//! they leave a waker in the table and every release wakes them.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// One range in use.
#[derive(Debug, Clone, Copy)]
struct Held {
    id: u64,
    first: u64,
    end: u64,
    exclusive: bool,
}

#[derive(Debug, Default)]
struct Table {
    held: Vec<Held>,
    /// Writes waiting for their range: readers arriving after them wait too, so that a
    /// steady stream of reads cannot keep a write out for ever.
    waiting_writers: Vec<Held>,
    /// Futures waiting for a range, by request id: woken on every release.
    wakers: Vec<(u64, Waker)>,
    next_id: u64,
}

impl Table {
    fn register(&mut self, first: u64, end: u64, exclusive: bool) -> Held {
        let id = self.next_id;
        self.next_id += 1;
        let me = Held { id, first, end, exclusive };
        if exclusive {
            self.waiting_writers.push(me);
        }
        me
    }

    /// Whether `me` must wait: for an overlapping held write (or any held range, for a write),
    /// and a read also for an overlapping write that waits already (writer preference).
    fn blocked(&self, me: &Held) -> bool {
        let (first, end, exclusive) = (me.first, me.end, me.exclusive);
        self.held.iter().any(|h| overlap(h, first, end) && (exclusive || h.exclusive))
            || (!exclusive && self.waiting_writers.iter().any(|w| overlap(w, first, end)))
    }

    fn grant(&mut self, me: Held) {
        if me.exclusive {
            self.waiting_writers.retain(|w| w.id != me.id);
        }
        self.wakers.retain(|(id, _)| *id != me.id);
        self.held.push(me);
    }

    /// Drops a request that gave up waiting, so that readers behind it are not kept out.
    fn withdraw(&mut self, id: u64) {
        self.waiting_writers.retain(|w| w.id != id);
        self.wakers.retain(|(w, _)| *w != id);
    }
}

fn overlap(h: &Held, first: u64, end: u64) -> bool {
    h.first < end && first < h.end
}

/// The sector ranges held by I/O in progress on one volume.
#[derive(Debug, Default)]
pub struct RangeLocks {
    table: Mutex<Table>,
    released: Condvar,
}

/// A held range; dropping it releases the range.
#[derive(Debug)]
#[must_use = "the range is released when the guard is dropped"]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds sectors `first..end` alone (for a write), waiting for every overlapping I/O.
    pub fn exclusive(&self, first: u64, end: u64) -> RangeGuard<'_> {
        self.take(first, end, true)
    }

    /// Holds sectors `first..end` alongside other readers (for a read), waiting for every
    /// overlapping write.
    pub fn shared(&self, first: u64, end: u64) -> RangeGuard<'_> {
        self.take(first, end, false)
    }

    fn take(&self, first: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let mut t = self.table();
        let me = t.register(first, end, exclusive);
        // A held range never waits for the table (it was taken whole), so waiting here for
        // held ranges, and for writers queued earlier, cannot deadlock.
        while t.blocked(&me) {
            t = self.released.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        t.grant(me);
        RangeGuard { locks: self, id: me.id }
    }

    /// [`exclusive`](Self::exclusive) for a future: waits without blocking the thread.
    pub fn exclusive_async(&self, first: u64, end: u64) -> Acquire<'_> {
        Acquire { locks: self, first, end, exclusive: true, me: None }
    }

    /// [`shared`](Self::shared) for a future: waits without blocking the thread.
    pub fn shared_async(&self, first: u64, end: u64) -> Acquire<'_> {
        Acquire { locks: self, first, end, exclusive: false, me: None }
    }

    /// Wakes every waiter, threads and futures, after the table changed.
    fn wake_all(&self, mut t: MutexGuard<'_, Table>) {
        let wakers = std::mem::take(&mut t.wakers);
        drop(t);
        self.released.notify_all();
        for (_, w) in wakers {
            w.wake();
        }
    }
}

/// A future that resolves to a held range (from [`RangeLocks::exclusive_async`] or
/// [`RangeLocks::shared_async`]). Dropping it before it resolves withdraws the request.
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct Acquire<'a> {
    locks: &'a RangeLocks,
    first: u64,
    end: u64,
    exclusive: bool,
    /// The request once registered (a queued writer holds back later readers from then on).
    me: Option<Held>,
}

impl<'a> Future for Acquire<'a> {
    type Output = RangeGuard<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RangeGuard<'a>> {
        let locks = self.locks;
        let mut t = locks.table();
        let me = match self.me {
            Some(me) => me,
            None => {
                let me = t.register(self.first, self.end, self.exclusive);
                self.me = Some(me);
                me
            }
        };
        if t.blocked(&me) {
            // Registered under the table lock, so a release cannot slip in unseen.
            match t.wakers.iter_mut().find(|(id, _)| *id == me.id) {
                Some((_, w)) => w.clone_from(cx.waker()),
                None => t.wakers.push((me.id, cx.waker().clone())),
            }
            return Poll::Pending;
        }
        t.grant(me);
        self.me = None;
        Poll::Ready(RangeGuard { locks, id: me.id })
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        if let Some(me) = self.me.take() {
            let mut t = self.locks.table();
            t.withdraw(me.id);
            // A withdrawn writer may have been all that kept readers waiting.
            self.locks.wake_all(t);
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.locks.table();
        if let Some(i) = t.held.iter().position(|h| h.id == self.id) {
            t.held.swap_remove(i);
        }
        self.locks.wake_all(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn overlapping_writers_wait_and_disjoint_ones_do_not() {
        let locks = RangeLocks::new();
        let a = locks.exclusive(10, 20);
        // Disjoint ranges (and ranges that only touch) are taken at once.
        let _b = locks.exclusive(20, 30);
        let _c = locks.exclusive(0, 10);
        let released = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _d = locks.exclusive(15, 16);
                assert!(released.load(Ordering::SeqCst), "took a range that overlaps a held one");
            });
            std::thread::sleep(Duration::from_millis(100));
            released.store(true, Ordering::SeqCst);
            drop(a);
        });
    }

    #[test]
    fn readers_share_and_exclude_writers() {
        let locks = RangeLocks::new();
        let r1 = locks.shared(0, 8);
        let r2 = locks.shared(4, 12);
        let released = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _w = locks.exclusive(7, 8);
                assert!(released.load(Ordering::SeqCst), "a writer overlapped readers");
            });
            std::thread::sleep(Duration::from_millis(100));
            released.store(true, Ordering::SeqCst);
            drop(r1);
            drop(r2);
        });
        assert!(locks.table().held.is_empty());
    }

    /// Polls `f` once with a waker that does nothing.
    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx)
    }

    #[test]
    fn a_waiting_writer_holds_back_new_readers() {
        let locks = RangeLocks::new();
        let first_reader = locks.shared(0, 4);
        std::thread::scope(|s| {
            let writer = s.spawn(|| drop(locks.exclusive(2, 3)));
            // The writer queues up behind the first reader (it cannot take the range).
            while locks.table().waiting_writers.is_empty() {
                std::thread::yield_now();
            }
            // A reader of an overlapping range that arrives now must wait for the writer,
            // although only readers hold the range: polled once, it is still waiting.
            let mut late_reader = locks.shared_async(1, 3);
            assert!(poll_once(&mut late_reader).is_pending(), "a reader overtook a waiting writer");
            // A reader of a range the writer does not want is not held back.
            assert!(poll_once(&mut locks.shared_async(3, 4)).is_ready());
            drop(first_reader);
            writer.join().unwrap();
            assert!(poll_once(&mut late_reader).is_ready(), "the reader still waits after the writer");
        });
        assert!(locks.table().held.is_empty());
    }

    #[test]
    fn futures_wait_without_blocking_and_are_woken_on_release() {
        let locks = RangeLocks::new();
        let held = locks.exclusive(0, 8);
        let woken = Arc::new(AtomicBool::new(false));
        let waker = Waker::from(Arc::new(Flag(woken.clone())));
        let mut cx = Context::from_waker(&waker);
        let mut writer = locks.exclusive_async(4, 5);
        assert!(Pin::new(&mut writer).poll(&mut cx).is_pending());
        // The queued writer holds back readers, not writers of other ranges.
        assert!(poll_once(&mut locks.shared_async(4, 6)).is_pending());
        assert!(poll_once(&mut locks.exclusive_async(8, 9)).is_ready());
        // Any release wakes every waiting future, which polls again and waits on.
        assert!(woken.swap(false, Ordering::SeqCst));
        assert!(Pin::new(&mut writer).poll(&mut cx).is_pending());
        drop(held);
        assert!(woken.load(Ordering::SeqCst), "a release did not wake the waiting future");
        let Poll::Ready(guard) = Pin::new(&mut writer).poll(&mut cx) else {
            panic!("the range is free but the future still waits");
        };
        drop(guard);
        // A future dropped while it waits withdraws its claim: readers are not held back.
        let reader = locks.shared(0, 1);
        let mut gave_up = locks.exclusive_async(0, 1);
        assert!(poll_once(&mut gave_up).is_pending());
        drop(gave_up);
        assert!(poll_once(&mut locks.shared_async(0, 1)).is_ready());
        drop(reader);
        let t = locks.table();
        assert!(t.held.is_empty() && t.waiting_writers.is_empty() && t.wakers.is_empty());
    }

    struct Flag(Arc<AtomicBool>);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}
