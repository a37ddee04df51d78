//! CPU-bound neighbours for `bench --competitor N`: the busy machine a user's is.
//!
//! A driver whose threads spin while they wait for each other keeps its speed on an idle machine
//! and collapses when something else wants the CPUs; a bench that only ever runs alone cannot
//! show either. The competitors are separate processes (a shell's empty loop), as another
//! program on the machine would be, and are killed when the guard drops, also when the bench
//! fails.

use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// Most competitors a bench may start.
pub const MAX_COMPETITORS: u64 = 64;

/// Parses `--competitor`: 0 to [`MAX_COMPETITORS`] busy processes.
pub fn parse_competitors(s: &str) -> Result<usize, String> {
    let v: u64 = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if v > MAX_COMPETITORS {
        return Err(format!("{v} is more than the {MAX_COMPETITORS} busy processes a bench may start"));
    }
    Ok(v as usize)
}

/// Running competitors; dropping it kills and reaps them.
pub struct Competitors {
    children: Vec<Child>,
}

impl Competitors {
    /// Starts `n` processes that each spin on a CPU until killed.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let mut this = Self { children: Vec::with_capacity(n) };
        for i in 0..n {
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting CPU-bound competitor {} of {n} (`sh -c`)", i + 1))?;
            this.children.push(child);
        }
        Ok(this)
    }

    /// How many are running.
    pub fn len(&self) -> usize {
        self.children.len()
    }
}

impl Drop for Competitors {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Err(e) = c.kill() {
                log::warn!("stopping competitor {}: {e}", c.id());
            }
            let _ = c.wait();
        }
    }
}
