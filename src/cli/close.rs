//! `crypt-vfio close DEV`: stops or detaches a block device that `crypt-vfio open` made, like
//! `cryptsetup close`.
//!
//! It refuses a device it did not make (unless `--force`) and a device in use: detaching a
//! mounted filesystem's device would fail its I/O. Otherwise it flushes the device, detaches it,
//! and waits for the server to finish and exit (the server flushes the image last).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::blockdev::nbd_netlink::NbdNetlink;
use crypt_vfio::blockdev::{alive, open_exclusive, ublk};
use libublk::ctrl::UblkCtrl;

/// How long `close` waits for the server to exit after detaching its device.
/// The server flushes the image last, which on a slow disk may take a while.
const EXIT_WAIT: Duration = Duration::from_secs(120);

/// How long `close` waits for the device's flush before giving up.
const FLUSH_WAIT: Duration = Duration::from_secs(120);

/// Arguments of `crypt-vfio close`.
#[derive(Args, Debug)]
pub struct CloseArgs {
    /// The device: /dev/ublkbN or /dev/nbdN.
    #[arg(value_name = "DEV")]
    pub device: PathBuf,
    /// Detach it even if crypt-vfio did not make it.
    #[arg(long)]
    pub force: bool,
}

/// `crypt-vfio close`.
pub fn run(args: CloseArgs) -> anyhow::Result<()> {
    let name = args.device.to_string_lossy().into_owned();
    if name.starts_with("/dev/ublkb") {
        return close_ublk(&args, super::open::parse_ublk_device(&name)?);
    }
    let Some(index) = name.strip_prefix("/dev/nbd").and_then(|n| n.parse::<u32>().ok()) else {
        bail!("`{name}` is not a device crypt-vfio opens: give /dev/ublkbN or /dev/nbdN");
    };
    let sys = format!("/sys/block/nbd{index}");
    let backend = std::fs::read_to_string(format!("{sys}/backend")).unwrap_or_default();
    let pid = std::fs::read_to_string(format!("{sys}/pid")).ok().and_then(|p| p.trim().parse::<i32>().ok());
    if pid.is_none() {
        bail!("{name} is not connected");
    }
    if !backend.starts_with("crypt-vfio:") && !args.force {
        bail!(
            "{name} was not opened by crypt-vfio (its backend is `{}`); use --force to detach it anyway",
            backend.trim()
        );
    }
    // Pinned before the flush, which may take long: a server that dies meanwhile must not have
    // its pid taken by another process that close would then wait for.
    let server = pid.map(ServerProcess::pin);
    let held = flush_unless_busy(&args.device)?;
    let mut nl = NbdNetlink::open()?;
    nl.disconnect(index).with_context(|| format!("disconnecting {name}"))?;
    // Held across the disconnect: nothing mounts the device between the check and the detach.
    drop(held);
    if let Some(server) = server {
        server.wait_exit(&name)?;
    }
    Ok(())
}

/// Stops and deletes /dev/ublkb`id`: the server (if alive) unwinds, flushes the volume and exits;
/// a device whose server is dead fails its queued requests.
fn close_ublk(args: &CloseArgs, id: u32) -> anyhow::Result<()> {
    let name = args.device.display();
    // parse_ublk_device keeps ids in the driver's i32 range.
    let ctrl = UblkCtrl::new_simple(i32::try_from(id)?)
        .map_err(|e| anyhow::anyhow!("{name}: no such ublk device ({e})"))?;
    if ublk::recorded_identity(&ctrl).is_none() && !args.force {
        bail!("{name} was not opened by crypt-vfio (no crypt-vfio identity in its JSON); use --force to delete it anyway");
    }
    let info = ctrl.dev_info();
    // A live device whose server is dead is one the driver has not quiesced yet: nothing would
    // serve a flush (it would wait for a recovery that may never come).
    let live = u32::from(info.state) == libublk::sys::UBLK_S_DEV_LIVE && alive(info.ublksrv_pid);
    // Pinned before the flush, as for NBD.
    let server = live.then(|| ServerProcess::pin(info.ublksrv_pid));
    let held = if live {
        flush_unless_busy(&args.device)?
    } else {
        // Only refuse while something holds the device.
        open_exclusive(&args.device).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => {
                anyhow::anyhow!("{name} is in use (mounted, or held by another program); unmount it first")
            }
            _ => anyhow::anyhow!("opening {name}: {e}"),
        })?
    };
    let stopped = ublk::checked(ctrl.stop_dev());
    // Held across the stop (nothing mounts it in between), and not after: the server's delete
    // waits for the device to be released.
    drop(held);
    stopped.map_err(|e| anyhow::anyhow!("stopping {name}: {e}"))?;
    if let Some(server) = server {
        server.wait_exit(&name.to_string())?;
    }
    // The server of a device it added deletes it on exit; a recovered or orphaned one is not.
    let _ = ublk::checked(ctrl.del_dev());
    Ok(())
}

/// Opens `dev` exclusively (a mounted filesystem or another exclusive holder makes that fail
/// with EBUSY) and flushes it, waiting at most [`FLUSH_WAIT`]; returns the exclusive file.
fn flush_unless_busy(dev: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let f = match open_exclusive(dev) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            bail!("{} is in use (mounted, or held by another program); unmount it first", dev.display())
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", dev.display())),
    };
    // A flush the server never answers would leave close in D state, holding the device: it
    // runs on its own thread, and close gives up on it (the thread ends with the process, or
    // when the device goes away).
    let (tx, rx) = std::sync::mpsc::channel();
    let flusher = f.try_clone().with_context(|| format!("flushing {}", dev.display()))?;
    std::thread::spawn(move || {
        let _ = tx.send(flusher.sync_all());
    });
    match rx.recv_timeout(FLUSH_WAIT) {
        Ok(r) => r.with_context(|| format!("flushing {}", dev.display()))?,
        Err(_) => bail!("flushing {} did not finish in {FLUSH_WAIT:?}; is its server stuck?", dev.display()),
    }
    Ok(f)
}

/// A device's server, pinned by a pidfd before the detach: waiting on it cannot mistake a new
/// process that got the same pid for the server.
struct ServerProcess {
    pid: i32,
    /// `None`: the kernel has no pidfd_open (then /proc is polled) or the process is gone.
    fd: Option<OwnedFd>,
}

impl ServerProcess {
    fn pin(pid: i32) -> ServerProcess {
        // SAFETY: pidfd_open takes integers only; the result is checked before it is owned.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = (fd >= 0).then(|| {
            // SAFETY: a new descriptor nobody else owns (it fits an i32: descriptors do).
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        });
        ServerProcess { pid, fd }
    }

    /// Waits for the server to exit.
    fn wait_exit(&self, name: &str) -> anyhow::Result<()> {
        let (pid, start) = (self.pid, Instant::now());
        let gone = || match &self.fd {
            Some(fd) => {
                let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: polls one live pollfd; a pidfd is readable once its process has exited.
                let ready = unsafe { libc::poll(&mut p, 1, 20) };
                ready == 1
            }
            None => {
                let gone = !alive(pid);
                if !gone {
                    std::thread::sleep(Duration::from_millis(20));
                }
                gone
            }
        };
        while !gone() {
            if start.elapsed() > EXIT_WAIT {
                bail!("{name} is detached, but its server (pid {pid}) has not exited after {EXIT_WAIT:?}");
            }
        }
        Ok(())
    }
}
