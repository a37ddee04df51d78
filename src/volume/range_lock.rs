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

use std::sync::{Condvar, Mutex, MutexGuard};

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
    next_id: u64,
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
        let id = t.next_id;
        t.next_id += 1;
        let me = Held { id, first, end, exclusive };
        if exclusive {
            t.waiting_writers.push(me);
        }
        // A held range never waits for the table (it was taken whole), so waiting here for
        // held ranges, and for writers queued earlier, cannot deadlock.
        let blocked = |t: &Table| {
            t.held.iter().any(|h| overlap(h, first, end) && (exclusive || h.exclusive))
                || (!exclusive && t.waiting_writers.iter().any(|w| overlap(w, first, end)))
        };
        while blocked(&t) {
            t = self.released.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        if exclusive {
            t.waiting_writers.retain(|w| w.id != id);
        }
        t.held.push(me);
        RangeGuard { locks: self, id }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.locks.table();
        if let Some(i) = t.held.iter().position(|h| h.id == self.id) {
            t.held.swap_remove(i);
        }
        drop(t);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
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

    #[test]
    fn a_waiting_writer_holds_back_new_readers() {
        let locks = RangeLocks::new();
        let first_reader = locks.shared(0, 4);
        let wrote = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _w = locks.exclusive(2, 3);
                wrote.store(true, Ordering::SeqCst);
            });
            // Let the writer queue up behind the first reader.
            while locks.table().waiting_writers.is_empty() {
                std::thread::yield_now();
            }
            s.spawn(|| {
                let _r = locks.shared(1, 3);
                assert!(wrote.load(Ordering::SeqCst), "a reader overtook a waiting writer");
            });
            std::thread::sleep(Duration::from_millis(100));
            drop(first_reader);
        });
    }
}
