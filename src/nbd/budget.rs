//! The server's memory: a byte budget for request payloads, and giving freed memory back.
//!
//! Payload buffers are the server's memory: a read or write of up to the maximum payload each.
//! Counting them per connection alone lets many clients multiply the bound (60 clients
//! flooding 8 MiB reads grew a server to 2 GB), so a request holds a charge against both its
//! connection's budget (fairness between clients) and the server's (the bound), from the
//! moment it is read until its reply is sent or it is dropped. Buffers that are freed must
//! also leave the process: glibc keeps freed memory of its thread arenas, and raises its
//! mmap threshold to the largest freed block, so without [`return_freed_buffers`] a server
//! that once served large requests keeps that memory for good.

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
    use std::sync::atomic::{AtomicBool, Ordering};

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
}
