//! How long to spin before sleeping, learnt from how long recent waits took.

use std::time::{Duration, Instant};

/// How long a waiter spins on the CPU before it yields between checks for the rest of its
/// budget: long enough for an answer from a partner running on another CPU, short enough that a
/// partner waiting for this CPU (two CPUs, three runnable threads) gets it soon.
const PURE_SPIN: Duration = Duration::from_micros(4);

/// A yield that kept the waiter off the CPU this long handed it to a CPU-bound neighbour for a
/// time slice: with two CPUs and a busy neighbour on each, every further yield would do the same.
const SLOW_YIELD: Duration = Duration::from_micros(500);

/// Pauses without yielding after a slow yield.
const NO_YIELD_PAUSES: u32 = 1024;

/// Pause instructions between two checks while spinning on the CPU (a pause is ~40 to ~140
/// cycles depending on the core: a few hundred nanoseconds in all, so the budget is kept to
/// within about that).
const PAUSES: u32 = 8;

/// A bounded, adaptive spin budget (the NAPI busy-poll / io_uring hybrid-poll idea).
///
/// The budget is twice the recent average wait, kept between `min` and `max`: when answers
/// come within a few microseconds the waiter spins just long enough to catch them, and it never
/// spins longer than `max`, so a waiter whose partner is off the CPU (a busy machine) gives its
/// CPU up after `max` instead of burning a scheduler tick. `max` should be about what a sleep
/// and wake-up costs: spinning longer than that can never pay. Waits longer than `max` are idle
/// gaps, not answer times, and leave the average alone, so one quiet spell does not end spinning
/// for the burst after it. After a few microseconds the waiter yields between checks instead of
/// pausing, so that a partner that waits for this very CPU is not kept from it for the whole
/// budget.
#[derive(Clone, Debug)]
pub struct SpinBudget {
    min_ns: u64,
    max_ns: u64,
    avg_ns: u64,
    /// Pauses left during which the waiter does not yield, because a recent yield gave the CPU
    /// away for long (a CPU-bound neighbour took its whole time slice).
    no_yield: u32,
}

impl SpinBudget {
    /// A budget between `min` and `max` (`min` is raised to `max` if larger), starting at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let max_ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        let min_ns = u64::try_from(min.as_nanos()).unwrap_or(u64::MAX).min(max_ns);
        Self { min_ns, max_ns, avg_ns: max_ns / 2, no_yield: 0 }
    }

    /// How long the next [`spin`](Self::spin) lasts at most.
    pub fn budget(&self) -> Duration {
        Duration::from_nanos(self.avg_ns.saturating_mul(2).clamp(self.min_ns, self.max_ns))
    }

    /// Calls `ready` until it returns true or the budget is spent; returns whether it did. A
    /// success is recorded as a wait of the time it took.
    pub fn spin(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        let budget = self.budget();
        let start = Instant::now();
        loop {
            if ready() {
                self.record(start.elapsed());
                return true;
            }
            // A clock read (vDSO, tens of nanoseconds) per check keeps the bound exact.
            let waited = start.elapsed();
            if waited >= budget || !self.pause(waited) {
                return false;
            }
        }
    }

    /// One pause of a waiter that has waited `waited` so far: a few spin-loop hints at first,
    /// then a yield of the CPU. Returns false when the yield gave the CPU away for a neighbour's
    /// time slice: the CPU is contended, the waiter should sleep now, and it will not yield for
    /// a while (a sleeper is woken when its partner has something; a yielder waits for a
    /// neighbour's time slice).
    pub fn pause(&mut self, waited: Duration) -> bool {
        if waited < PURE_SPIN || self.no_yield > 0 {
            self.no_yield = self.no_yield.saturating_sub(1);
            for _ in 0..PAUSES {
                std::hint::spin_loop();
            }
            return true;
        }
        let before = Instant::now();
        std::thread::yield_now();
        if before.elapsed() > SLOW_YIELD {
            self.no_yield = NO_YIELD_PAUSES;
            return false;
        }
        true
    }

    /// Records a wait that ended after a sleep, spin and sleep together: if it was short, a
    /// longer spin would have caught it, and the budget grows toward it.
    pub fn record(&mut self, waited: Duration) {
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        if ns <= self.max_ns {
            // An average over about the last eight waits.
            self.avg_ns = self.avg_ns - self.avg_ns / 8 + ns / 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn budget_follows_short_waits_and_stays_within_bounds() {
        let mut b = SpinBudget::new(2 * US, 50 * US);
        assert_eq!(b.budget(), 50 * US);
        for _ in 0..64 {
            b.record(3 * US);
        }
        // Twice the ~3 µs average (integer eighths lag a little above it).
        assert!(b.budget() >= 6 * US && b.budget() < 8 * US, "{:?}", b.budget());
        for _ in 0..64 {
            b.record(Duration::ZERO);
        }
        assert_eq!(b.budget(), 2 * US);
    }

    #[test]
    fn idle_gaps_leave_the_budget_alone() {
        let mut b = SpinBudget::new(US, 50 * US);
        for _ in 0..64 {
            b.record(10 * US);
        }
        let before = b.budget();
        for _ in 0..64 {
            b.record(Duration::from_millis(5));
        }
        assert_eq!(b.budget(), before);
    }

    #[test]
    fn a_wait_that_slept_briefly_grows_the_budget() {
        let mut b = SpinBudget::new(US, 50 * US);
        for _ in 0..64 {
            b.record(US);
        }
        let small = b.budget();
        for _ in 0..16 {
            b.record(20 * US);
        }
        assert!(b.budget() > small);
        assert!(b.budget() <= 50 * US);
    }

    #[test]
    fn spin_gives_up_when_nothing_comes_and_returns_at_once_when_ready() {
        let mut b = SpinBudget::new(US, 20 * US);
        assert!(!b.spin(|| false));
        let mut calls = 0;
        assert!(b.spin(|| {
            calls += 1;
            calls == 3
        }));
        assert_eq!(calls, 3);
    }
}
