//! `crypt-vfio close DEV`: detaches a block device that `crypt-vfio open` made, like
//! `cryptsetup close`.
//!
//! It refuses a device it did not make (unless `--force`) and a device in use: detaching a
//! mounted filesystem's device would fail its I/O. Otherwise it flushes the device, detaches it,
//! and waits for the server to finish and exit (the server flushes the image last).

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::blockdev::nbd_netlink::NbdNetlink;

/// How long `close` waits for the server to exit after detaching its device.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Arguments of `crypt-vfio close`.
#[derive(Args, Debug)]
pub struct CloseArgs {
    /// The device: /dev/nbdN.
    #[arg(value_name = "DEV")]
    pub device: PathBuf,
    /// Detach it even if crypt-vfio did not make it.
    #[arg(long)]
    pub force: bool,
}

/// `crypt-vfio close`.
pub fn run(args: CloseArgs) -> anyhow::Result<()> {
    let name = args.device.to_string_lossy().into_owned();
    let Some(index) = name.strip_prefix("/dev/nbd").and_then(|n| n.parse::<u32>().ok()) else {
        bail!("`{name}` is not a device crypt-vfio opens: give /dev/nbdN");
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
    flush_unless_busy(&args.device)?;
    let mut nl = NbdNetlink::open()?;
    nl.disconnect(index).with_context(|| format!("disconnecting {name}"))?;
    if let Some(pid) = pid {
        wait_exit(pid, &name)?;
    }
    Ok(())
}

/// Opens `dev` exclusively (a mounted filesystem or another exclusive holder makes that fail
/// with EBUSY) and flushes it.
fn flush_unless_busy(dev: &std::path::Path) -> anyhow::Result<()> {
    let f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(dev) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            bail!("{} is in use (mounted, or held by another program); unmount it first", dev.display())
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", dev.display())),
    };
    f.sync_all().with_context(|| format!("flushing {}", dev.display()))
}

/// Whether `pid` runs (a zombie has exited: an orphaned daemon waits for init to reap it).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) != Some('Z'),
        Err(_) => false,
    }
}

/// Waits for the server `pid` to exit.
fn wait_exit(pid: i32, name: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > EXIT_WAIT {
            bail!("{name} is detached, but its server (pid {pid}) has not exited after {EXIT_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
