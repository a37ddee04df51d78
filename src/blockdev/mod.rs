//! The decrypted volume as a kernel block device, the way `cryptsetup open` makes one.
//!
//! A userspace server cannot be a block device by itself; the kernel needs a driver that hands
//! it the requests. Two drivers do this: the NBD client (`nbd.ko`, in every distribution kernel,
//! but a server that dies takes the device's I/O with it) and ublk (`ublk_drv.ko`, io_uring
//! based, which can keep the device and its queued I/O while the server restarts). This module
//! attaches a [`BlockDevice`](crate::volume::block::BlockDevice) to either.

pub mod kernel_nbd;
pub mod nbd_netlink;
pub mod ublk;

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Whether process `pid` runs (a zombie has exited: an orphaned daemon waits for init to reap
/// it). `open --recover` and `close` both ask whether a device's server is still there.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) != Some('Z'),
        Err(_) => false,
    }
}

/// Opens block device `dev` exclusively: a mounted filesystem or another exclusive holder makes
/// this fail with EBUSY, and while the file is open nothing can mount the device. Whoever
/// detaches a device holds this across the detach, so that no mount slips in between the check
/// and the stop.
pub fn open_exclusive(dev: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(dev)
}

/// Waits for `stop` (SIGTERM) unless `done` comes first, then detaches the device at `path` with `detach` as `close` does:
/// exclusively opened (so nothing mounts it meanwhile) and flushed. While the device is in use
/// (mounted, or held exclusively), or cannot be opened here to find out, the stop is refused and
/// forgotten: stopping a mounted device would fail the filesystem's writeback.
pub fn stop_when_unused(
    stop: &AtomicBool,
    done: &AtomicBool,
    path: &Path,
    mut detach: impl FnMut() -> std::result::Result<(), String>,
) {
    loop {
        while !stop.load(Ordering::Acquire) {
            if done.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match open_exclusive(path) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                log::warn!(
                    "{} is in use (mounted?): not stopping it; unmount it, then stop again",
                    path.display()
                );
                stop.store(false, Ordering::Release);
            }
            // Not held, so not known to be unused: a private /dev, a missing node or a
            // permission error says nothing about a mount elsewhere.
            Err(e) => {
                log::warn!(
                    "cannot open {} exclusively ({e}), so cannot tell whether it is mounted: not \
                     stopping it; use `crypt-vfio close` where the device node is visible",
                    path.display()
                );
                stop.store(false, Ordering::Release);
            }
            Ok(held) => {
                if let Err(e) = held.sync_all() {
                    log::warn!("flushing {}: {e}", path.display());
                }
                if let Err(e) = detach() {
                    log::error!("detaching {}: {e}", path.display());
                }
                // The exclusive hold ends only after the detach.
                drop(held);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A device node this process cannot open (here: one that is not there, as in a container
    /// with its own /dev) may still be mounted elsewhere, so a stop must not detach it.
    #[test]
    fn a_device_that_cannot_be_opened_is_not_detached() {
        let stop = Arc::new(AtomicBool::new(true));
        let done = Arc::new(AtomicBool::new(false));
        let detached = Arc::new(AtomicUsize::new(0));
        let path = std::env::temp_dir().join(format!("crypt-vfio-no-such-dev-{}", std::process::id()));
        let t = {
            let (stop, done, detached) = (Arc::clone(&stop), Arc::clone(&done), Arc::clone(&detached));
            std::thread::spawn(move || {
                stop_when_unused(&stop, &done, &path, || {
                    detached.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
            })
        };
        // The refusal forgets the stop; then the server ends for another reason.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while stop.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        done.store(true, Ordering::Release);
        t.join().unwrap();
        assert_eq!(detached.load(Ordering::SeqCst), 0, "a device it could not hold was detached");
        assert!(!stop.load(Ordering::Acquire), "the refused stop was not forgotten");
    }
}
