//! A progress bar for bench runs longer than a second, only on a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A bar that fills with the run's elapsed time, drawn from its own thread so the measured
/// threads never touch it.
pub struct RunProgress {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RunProgress {
    /// Starts a bar for a run of `duration` if `enabled`, the run is longer than a second and
    /// standard error is a terminal.
    pub fn start(duration: Duration, enabled: bool) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        if !enabled || duration <= Duration::from_secs(1) || !std::io::stderr().is_terminal() {
            return Self { done, thread: None };
        }
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let bar = ProgressBar::new(duration.as_millis() as u64);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{bar:40}] {elapsed}/{msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(format!("{:.0?}", duration));
            let start = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                bar.set_position(start.elapsed().as_millis() as u64);
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        Self { done, thread: Some(thread) }
    }

    /// Removes the bar.
    pub fn finish(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
