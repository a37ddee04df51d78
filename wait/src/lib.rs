//! Waiting without collapsing on a busy machine, shared by the driver and the emulated device.
//!
//! A thread that waits for another one on this class of machine has two bad choices: spinning,
//! which wins when the other thread runs on another CPU but hands off at scheduler-tick speed
//! when the two (and a CPU-bound neighbour) share too few CPUs, and sleeping, which costs tens of
//! microseconds per wake-up because an idle vCPU halts. Linux NAPI busy polling and io_uring's
//! hybrid polling answer this by spinning for a bounded budget sized from recent completion
//! times, then sleeping until an interrupt. [`SpinBudget`] is that budget; [`SleepGate`] is the
//! sleep half for a thread woken by a flag-checking notifier (a doorbell).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod sleep_gate;
mod spin_budget;

pub use sleep_gate::SleepGate;
pub use spin_budget::SpinBudget;
