//! The server's memory: a byte budget for request payloads, and giving freed memory back.
//!
//! Payload buffers are the server's memory: a read or write of up to the maximum payload each.
//! Counting them per connection alone lets many clients multiply the bound (60 clients
//! flooding 8 MiB reads grew a server to 2 GB), so a request holds a charge against both its
//! connection's budget (fairness between clients) and the server's (the bound), from the
//! moment it is read until its reply is sent or it is dropped. Buffers that are freed must
//! also leave the process: glibc keeps freed memory of its thread arenas, and raises its
//! mmap threshold to the largest freed block, so without [`return_freed_buffers`] a server
//! that once served large requests keeps that memory for good. Freeing every payload has a
//! price of its own, though (a fresh mapping faulted in page by page, then unmapped), so a
//! bounded [`BufferPool`] carved out of the same budget keeps buffers between requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, Once};
use std::time::Duration;

/// How often a request waiting for budget checks whether it should give up.
const GIVE_UP_POLL: Duration = Duration::from_millis(50);

/// A counting semaphore over bytes.
#[derive(Debug)]
pub(crate) struct Budget {
    total: u64,
    available: Mutex<u64>,
    freed: Condvar,
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Charge<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Budget {
    /// A budget of `total` bytes.
    pub(crate) fn new(total: u64) -> Self {
        Budget { total, available: Mutex::new(total), freed: Condvar::new() }
    }

    /// The bytes it holds when nothing is taken.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Takes `bytes`, waiting until they are free; `None` once `give_up` says so (checked
    /// every few tens of milliseconds, so a stop never waits for a budget that is not freed).
    /// `bytes` must not exceed the total, or this waits until `give_up`.
    pub(crate) fn acquire(&self, bytes: u64, give_up: impl Fn() -> bool) -> Option<Charge<'_>> {
        let mut avail = self.available.lock().unwrap_or_else(|p| p.into_inner());
        while *avail < bytes {
            if give_up() {
                return None;
            }
            avail = self.freed.wait_timeout(avail, GIVE_UP_POLL).unwrap_or_else(|p| p.into_inner()).0;
        }
        *avail -= bytes;
        Some(Charge { budget: self, bytes })
    }

    /// Takes `bytes` if they are free now.
    pub(crate) fn try_acquire(&self, bytes: u64) -> Option<Charge<'_>> {
        let mut avail = self.available.lock().unwrap_or_else(|p| p.into_inner());
        if *avail < bytes {
            return None;
        }
        *avail -= bytes;
        Some(Charge { budget: self, bytes })
    }

    /// Takes `bytes` from this budget or, when it is short, from `reserve`, whichever has
    /// room first; `None` once `give_up` says so.
    pub(crate) fn acquire_or<'a>(
        &'a self,
        reserve: &'a Budget,
        bytes: u64,
        give_up: impl Fn() -> bool,
    ) -> Option<Charge<'a>> {
        loop {
            if let Some(c) = self.try_acquire(bytes).or_else(|| reserve.try_acquire(bytes)) {
                return Some(c);
            }
            if give_up() {
                return None;
            }
            // Woken by a release of this budget; the reserve's releases are seen at the
            // next poll.
            let avail = self.available.lock().unwrap_or_else(|p| p.into_inner());
            if *avail < bytes {
                drop(self.freed.wait_timeout(avail, GIVE_UP_POLL).unwrap_or_else(|p| p.into_inner()));
            }
        }
    }

    #[cfg(test)]
    fn available(&self) -> u64 {
        *self.available.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        *self.budget.available.lock().unwrap_or_else(|p| p.into_inner()) += self.bytes;
        self.budget.freed.notify_all();
    }
}

/// Payload buffers kept between requests, so that a request reuses memory already mapped
/// instead of a fresh mapping (every payload is above the mmap threshold set by
/// [`return_freed_buffers`]) that is faulted in page by page and unmapped after the reply: a
/// profile of `serve` spent a third of its time on those faults and `munmap`.
///
/// The idle buffers are memory the server holds, so they come out of the memory budget: the
/// server's [`Budget`] for requests is `max_memory` less [`BufferPool::cap`], and the pool
/// never holds more than that cap. Requests in flight and idle buffers together stay within
/// `max_memory`, and the pool holds no request budget, so idle buffers cannot keep a client
/// waiting.
#[derive(Debug)]
pub(crate) struct BufferPool {
    cap: u64,
    idle: Mutex<Idle>,
    allocations: AtomicU64,
}

#[derive(Debug, Default)]
struct Idle {
    buffers: Vec<Vec<u8>>,
    /// The capacities of `buffers`, summed.
    bytes: u64,
}

impl BufferPool {
    /// The share of a `max_memory` budget its pool may keep: an eighth, at most 32 MiB
    /// (128 of the 256 KiB requests `nbdcopy` sends).
    pub(crate) fn cap_for(max_memory: u64) -> u64 {
        (max_memory / 8).min(32 << 20)
    }

    /// A pool that keeps at most `cap` bytes of idle buffers.
    pub(crate) fn new(cap: u64) -> Self {
        BufferPool { cap, idle: Mutex::new(Idle::default()), allocations: AtomicU64::new(0) }
    }

    /// The most idle bytes it keeps.
    pub(crate) fn cap(&self) -> u64 {
        self.cap
    }

    /// A buffer of `len` bytes: the smallest idle one that holds them, else a new one. Its
    /// contents are whatever its last user left (callers overwrite it whole).
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let best = idle
                .buffers
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| {
                let b = idle.buffers.swap_remove(i);
                idle.bytes -= b.capacity() as u64;
                b
            })
        };
        match reused {
            Some(mut b) => {
                // Idle buffers are kept at full length (see `give`): no byte is written here.
                b.truncate(len);
                b
            }
            None => {
                self.allocations.fetch_add(1, Ordering::Relaxed);
                vec![0u8; len]
            }
        }
    }

    /// Keeps `buf` for a later [`take`](Self::take) if the pool has room for it, else frees it.
    pub(crate) fn give(&self, mut buf: Vec<u8>) {
        let bytes = buf.capacity() as u64;
        if bytes == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.bytes + bytes <= self.cap {
            idle.bytes += bytes;
            // A full-length buffer needs no zeroing when taken again at any length.
            let cap = buf.capacity();
            buf.resize(cap, 0);
            idle.buffers.push(buf);
        }
    }

    /// Frees every idle buffer (the server has no clients left).
    pub(crate) fn clear(&self) {
        let buffers = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.bytes = 0;
            std::mem::take(&mut idle.buffers)
        };
        drop(buffers);
    }

    /// Buffers [`take`](Self::take) had to allocate since the pool was made.
    #[cfg(test)]
    pub(crate) fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// The bytes of the idle buffers.
    #[cfg(test)]
    pub(crate) fn idle_bytes(&self) -> u64 {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

/// The server's memory: the budget requests are charged against, and the idle payload
/// buffers kept for reuse, which together stay within `max_memory`.
#[derive(Debug)]
pub(crate) struct ServerMemory {
    /// What requests in flight may hold: `max_memory` less the pool's cap.
    pub budget: Budget,
    /// Idle payload buffers.
    pub pool: BufferPool,
}

impl ServerMemory {
    /// Splits `max_memory` between requests and idle buffers.
    pub(crate) fn new(max_memory: u64) -> Self {
        let pool = BufferPool::new(BufferPool::cap_for(max_memory));
        ServerMemory { budget: Budget::new(max_memory - pool.cap()), pool }
    }
}

/// Freed blocks at least this large go straight back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 << 10;

/// Makes large buffers (payloads) come from their own mappings, which `free` unmaps at once.
/// glibc's default adapts the threshold upwards to the largest block ever freed (up to 32 MiB),
/// after which payload buffers come from the heaps and stay with the process when freed.
pub(crate) fn return_freed_buffers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator tuning; it is thread-safe in glibc and takes
        // no pointers.
        if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) } != 1 {
            log::debug!("mallopt(M_MMAP_THRESHOLD) refused; freed payloads may stay mapped");
        }
    });
}

/// Gives the free memory of every allocator arena back to the system, after a connection
/// ended (its buffers below the mmap threshold were freed into the arenas of its threads).
pub(crate) fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and is thread-safe in glibc.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn charges_wait_for_room_and_give_it_back() {
        let b = Budget::new(100);
        let a = b.acquire(60, || false).unwrap();
        assert_eq!(b.available(), 40);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _c = b.acquire(50, || false).unwrap();
                assert!(done.load(Ordering::SeqCst), "took bytes that were not free");
            });
            std::thread::sleep(Duration::from_millis(100));
            done.store(true, Ordering::SeqCst);
            drop(a);
        });
        assert_eq!(b.available(), 100);
    }

    #[test]
    fn a_waiting_charge_gives_up_when_told() {
        let b = Budget::new(10);
        let _all = b.acquire(10, || false).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.acquire(5, || stop.load(Ordering::SeqCst)).is_none());
            std::thread::sleep(Duration::from_millis(100));
            stop.store(true, Ordering::SeqCst);
            assert!(waiter.join().unwrap());
        });
    }

    #[test]
    fn payload_buffers_are_reused_within_the_pool_cap() {
        let pool = BufferPool::new(1 << 20);
        let a = pool.take(256 << 10);
        let at = a.as_ptr();
        pool.give(a);
        // The same memory serves the next request, shorter ones too.
        let b = pool.take(256 << 10);
        assert_eq!(b.as_ptr(), at);
        assert_eq!(b.len(), 256 << 10);
        pool.give(b);
        let c = pool.take(4096);
        assert_eq!((c.as_ptr(), c.len()), (at, 4096));
        pool.give(c);
        assert_eq!(pool.allocations(), 1);
        // A longer one needs a new buffer.
        let d = pool.take(512 << 10);
        assert_eq!(pool.allocations(), 2);
        drop(d);

        // Idle buffers never exceed the cap: the rest is freed.
        let many: Vec<_> = (0..8).map(|_| pool.take(256 << 10)).collect();
        many.into_iter().for_each(|b| pool.give(b));
        assert_eq!(pool.idle_bytes(), 1 << 20);
        pool.give(vec![0u8; 1]);
        assert_eq!(pool.idle_bytes(), 1 << 20);
        pool.clear();
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn requests_and_idle_buffers_together_stay_within_max_memory() {
        for max in [32u64 << 20, 256 << 20, 1 << 40] {
            let m = ServerMemory::new(max);
            assert!(m.pool.cap() > 0);
            assert_eq!(m.budget.total() + m.pool.cap(), max, "max_memory {max}");
        }
    }
}
