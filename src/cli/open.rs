//! `crypt-vfio open`: the decrypted view of a volume as a kernel block device (/dev/ublkbN, or
//! /dev/nbdN with --nbd), like `cryptsetup open`.
//!
//! The volume is opened exactly as `serve` opens it ([`serve::open_export`]), so both serve the
//! same bytes. By default the command daemonizes like `cryptsetup open` returns: it forks before
//! any thread exists, the parent waits on a pipe for the child's `READY <device>` or `ERR
//! <message>`, prints it and exits; the child serves until `close` (or SIGTERM).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::blockdev::kernel_nbd::{self, KernelNbdConfig};
use crypt_vfio::blockdev::ublk::{self, Identity, UblkConfig};
use crypt_vfio::nbd::ServerConfig;

use zeroize::Zeroizing;

use super::device::DeviceArgs;
use super::luks_opts::read_key_file;
use super::plain_opts::{PlainArgs, PlainShapeArgs};
use super::serve::{self, ExportOptions};

/// Arguments of `crypt-vfio open`.
#[derive(Args, Debug)]
pub struct OpenArgs {
    /// The image: a LUKS1/LUKS2 or authenticated volume (with --key-file), or a plain dm-crypt
    /// image (with --plain).
    #[arg(value_name = "IMG")]
    pub image: PathBuf,
    /// File holding the passphrase of a LUKS image, or the raw key of an authenticated volume
    /// (`-`: standard input).
    #[arg(long, value_name = "F", required_unless_present = "plain", conflicts_with = "plain")]
    pub key_file: Option<PathBuf>,
    #[command(flatten)]
    pub plain: PlainArgs,
    #[command(flatten)]
    pub plain_shape: PlainShapeArgs,
    /// Serve as a ublk device, /dev/ublkbN (the default): it survives a restart of its server
    /// (see --recover).
    #[arg(long, conflicts_with = "nbd")]
    pub ublk: bool,
    /// Attach through the kernel's NBD client as /dev/nbdN instead (`any`: the first free one).
    #[arg(long, value_name = "DEV")]
    pub nbd: Option<String>,
    /// Take over /dev/ublkbN, whose server was killed: the requests it held are reissued to
    /// this one, and a filesystem on it sees no error. The volume must be the same (checked).
    #[arg(long, value_name = "DEV", conflicts_with = "nbd")]
    pub recover: Option<String>,
    /// ublk: requests each queue may have in flight (1 to 1024).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub queue_depth: u16,
    /// ublk: the largest request, in KiB (4 to 1024; a whole number of sectors).
    #[arg(long, value_name = "KIB", default_value_t = 512, value_parser = clap::value_parser!(u32).range(4..=1024))]
    pub max_io_kib: u32,
    /// Refuse writes (the block device is read-only).
    #[arg(long)]
    pub read_only: bool,
    /// Let discards punch holes in the image, as dm-crypt's `allow_discards` (see `serve`).
    #[arg(long)]
    pub allow_discards: bool,
    /// Hardware queues (ublk) or connections (NBD) the kernel spreads requests over (1 to 16).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub queues: u16,
    /// Requests that run on the volume at once: in all (ublk) or per connection (NBD) (1 to 64).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Stay in the foreground (for systemd Type=simple and tests); prints the device when ready.
    #[arg(long)]
    pub foreground: bool,
    /// Write the server's pid here once the device is ready.
    #[arg(long, value_name = "P")]
    pub pidfile: Option<PathBuf>,
    /// The daemon's log (its standard error); default: discarded.
    #[arg(long, value_name = "L")]
    pub log_file: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Where readiness goes: the parent's pipe (daemon) or standard output (foreground).
struct Ready {
    pipe: Option<File>,
    /// The pidfile, written once the image is ours and before the device is made (so that
    /// failing to write it leaves no device behind); removed again if the open fails after.
    pidfile: Option<PathBuf>,
    pidfile_written: bool,
}

impl Ready {
    fn write_pidfile(&mut self) -> anyhow::Result<()> {
        if let Some(p) = &self.pidfile {
            std::fs::write(p, format!("{}\n", std::process::id()))
                .with_context(|| format!("writing the pidfile {}", p.display()))?;
            self.pidfile_written = true;
        }
        Ok(())
    }

    fn ready(&mut self, device: &str) {
        match self.pipe.take() {
            Some(mut pipe) => {
                let _ = writeln!(pipe, "READY {device}");
            }
            None => {
                println!("{device}");
                let _ = std::io::stdout().flush();
            }
        }
    }

    fn failed(&mut self, e: &anyhow::Error) {
        // Only our own: a refused second open must not take the running server's pidfile.
        if let Some(p) = self.pidfile.take().filter(|_| self.pidfile_written) {
            let _ = std::fs::remove_file(p);
        }
        if let Some(mut pipe) = self.pipe.take() {
            let _ = writeln!(pipe, "ERR {e:#}");
        }
    }
}

/// `crypt-vfio open`.
pub fn run(mut args: OpenArgs) -> anyhow::Result<()> {
    // Device names are checked first: a typo is named before a key is asked for.
    args.nbd.as_deref().map(parse_nbd_device).transpose()?;
    args.recover.as_deref().map(parse_ublk_device).transpose()?;
    // The secret is read before the daemon's standard input becomes /dev/null (`--key-file -`,
    // `--plain --volume-key-file -`).
    let secret = match (&args.key_file, args.plain.plain, &args.plain.volume_key_file) {
        (Some(path), false, _) => Some(read_key_file(path)?),
        (_, true, Some(path)) => Some(read_key_file(path)?),
        _ => None,
    };
    // The daemon works from `/` (it must not keep the caller's file system busy: an unmount
    // would fail with "target is busy" for as long as the device exists), so the paths it
    // still uses are made absolute first.
    if !args.foreground {
        args.image = absolute(&args.image)?;
        args.pidfile = args.pidfile.as_deref().map(absolute).transpose()?;
    }
    let ready = if args.foreground {
        Ready { pipe: None, pidfile: args.pidfile.clone(), pidfile_written: false }
    } else {
        match daemonize(args.log_file.as_deref())? {
            Some(pipe) => Ready { pipe: Some(pipe), pidfile: args.pidfile.clone(), pidfile_written: false },
            // The parent: the child's verdict is already reported.
            None => return Ok(()),
        }
    };
    let ready = Arc::new(Mutex::new(ready));
    let result = serve_device(args, secret, Arc::clone(&ready));
    if let Err(e) = &result {
        ready.lock().unwrap_or_else(|p| p.into_inner()).failed(e);
    }
    result
}

/// Forks before any thread exists. In the parent, waits for the child's verdict, prints it and
/// returns `None` (or the child's error). In the child (a new session, stdio to /dev/null or the
/// log), returns the pipe to report on.
fn daemonize(log_file: Option<&std::path::Path>) -> anyhow::Result<Option<File>> {
    let log = match log_file {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening the log file {}", p.display()))?,
        ),
        None => None,
    };
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("making the readiness pipe");
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process has one thread here (nothing before `open` starts one), so the child
    // may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("forking the server");
    }
    if pid > 0 {
        drop(w);
        let mut verdict = String::new();
        File::from(r).read_to_string(&mut verdict).context("reading the server's verdict")?;
        let line = verdict.lines().next().unwrap_or("");
        if let Some(dev) = line.strip_prefix("READY ") {
            println!("{dev}");
            return Ok(None);
        }
        if let Some(msg) = line.strip_prefix("ERR ") {
            bail!("{msg}");
        }
        bail!("the server (pid {pid}) exited before the device was ready");
    }
    drop(r);
    // SAFETY: setsid has no memory effects; a new session detaches from the terminal.
    unsafe { libc::setsid() };
    let null = File::options().read(true).write(true).open("/dev/null").context("opening /dev/null")?;
    let err_to = log.as_ref().unwrap_or(&null);
    // SAFETY: dup2 onto the standard descriptors, from descriptors that are open.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(null.as_raw_fd(), 1);
        libc::dup2(err_to.as_raw_fd(), 2);
    }
    let mut w = File::from(w);
    if let Err(e) = std::env::set_current_dir("/") {
        // Told to the caller, who would otherwise only see the server exit.
        let _ = writeln!(w, "ERR changing the server's directory to /: {e}");
        return Err(e).context("changing to /");
    }
    Ok(Some(w))
}

fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("making {} an absolute path", path.display()))
}

/// Opens the volume and serves it as a block device until it is closed.
fn serve_device(
    args: OpenArgs,
    secret: Option<Zeroizing<Vec<u8>>>,
    ready: Arc<Mutex<Ready>>,
) -> anyhow::Result<()> {
    let nbd = args.nbd.as_deref().map(parse_nbd_device).transpose()?;
    let recover = args.recover.as_deref().map(parse_ublk_device).transpose()?;
    let image = args.image.clone();
    let (read_only, queues, workers) = (args.read_only, args.queues, args.workers);
    let (depth, max_io) = (args.queue_depth, args.max_io_kib << 10);
    let export = ExportOptions {
        image: &args.image,
        key_file: args.key_file.as_deref(),
        raw: false,
        plain: &args.plain,
        plain_shape: &args.plain_shape,
        read_only,
        allow_discards: args.allow_discards,
        device: &args.device,
    };
    // Held until the server exits: a second open, a `serve`, or a plain open where --recover was
    // meant would be a second writer of the same image.
    let (_lock, meta) = lock_image(&image)?;
    let ((device, engine), material) = serve::open_export_with(&export, secret)?;
    // The engine is not aborted on a stop: a stop detaches the device only once nothing uses
    // it, and the server then flushes and finishes every request it has.
    drop(engine);
    ready.lock().unwrap_or_else(|p| p.into_inner()).write_pidfile()?;
    // A hangup (the terminal that started a foreground server goes away) must not end the
    // server of a mounted device; a stop is SIGTERM, or `close`.
    // SAFETY: setting a signal's disposition to "ignore" runs no code of ours.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing signal handlers")?;
    }
    let canonical = std::fs::canonicalize(&image).unwrap_or(image.clone());
    let on_ready = move |dev: String| ready.lock().unwrap_or_else(|p| p.into_inner()).ready(&dev);
    if let Some(index) = nbd {
        let config = KernelNbdConfig {
            index,
            connections: usize::from(queues),
            timeout_s: 60,
            backend: format!("crypt-vfio:{}", canonical.display()),
            server: ServerConfig {
                workers_per_connection: usize::from(workers),
                max_connections: usize::from(queues),
                ..ServerConfig::default()
            },
        };
        kernel_nbd::serve(device, config, stop, |n| on_ready(format!("/dev/nbd{n}")))?;
    } else {
        // A device node is named by the device it is (st_rdev), not by where the node lives.
        let (dev, ino) =
            if meta.file_type().is_block_device() { (0, meta.rdev()) } else { (meta.dev(), meta.ino()) };
        let salt = match recover {
            // The device's own salt; a device without one is refused by the identity check.
            Some(id) => ublk::recorded_identity_of(id).map(|r| r.salt).unwrap_or_default(),
            None => Identity::new_salt(),
        };
        let identity = Identity {
            image: canonical.display().to_string(),
            dev,
            ino,
            size: device.size(),
            sector_size: device.block_size(),
            read_only,
            key_check: Identity::key_check(&salt, &material),
            salt,
        };
        drop(material);
        let config = UblkConfig {
            queues,
            depth,
            io_buf_bytes: max_io,
            workers: usize::from(workers),
            recover,
            identity,
        };
        ublk::serve(device, config, stop, move |n| on_ready(format!("/dev/ublkb{n}")))?;
    }
    Ok(())
}

/// Locks the image for this server's lifetime: an exclusive `flock` (which `open` and `serve`
/// take), and for a block device an exclusive open too (which the kernel enforces against
/// mounts, dm-crypt and other exclusive openers). Returns the lock and the image's metadata.
pub(super) fn lock_image(image: &std::path::Path) -> anyhow::Result<(File, std::fs::Metadata)> {
    let meta = std::fs::metadata(image).with_context(|| format!("reading {}", image.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    if meta.file_type().is_block_device() {
        options.custom_flags(libc::O_EXCL);
    }
    let busy = || {
        format!(
            "{} is in use by another program (a crypt-vfio open or serve, a mount, dm-crypt)",
            image.display()
        )
    };
    let f = match options.open(image) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!("{}", busy()),
        other => other.with_context(|| format!("opening {}", image.display()))?,
    };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!("{}", busy());
        }
        return Err(e).with_context(|| format!("locking {}", image.display()));
    }
    Ok((f, meta))
}

/// `/dev/ublkbN` → N.
pub(super) fn parse_ublk_device(s: &str) -> anyhow::Result<u32> {
    // Device ids are the driver's i32s.
    s.strip_prefix("/dev/ublkb")
        .and_then(|n| n.parse::<i32>().ok())
        .and_then(|n| u32::try_from(n).ok())
        .with_context(|| format!("`{s}` is not a ublk device: give /dev/ublkbN (N a number)"))
}

/// `/dev/nbdN` → Some(N); `any` → None.
fn parse_nbd_device(s: &str) -> anyhow::Result<Option<u32>> {
    if s == "any" {
        return Ok(None);
    }
    s.strip_prefix("/dev/nbd")
        .and_then(|n| n.parse().ok())
        .map(Some)
        .with_context(|| format!("`{s}` is not an NBD device: give /dev/nbdN (N a number) or `any`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_device_names_parse_or_are_refused() {
        assert_eq!(parse_nbd_device("/dev/nbd3").unwrap(), Some(3));
        assert_eq!(parse_nbd_device("any").unwrap(), None);
        for bad in ["/dev/nbd", "/dev/nbdx", "nbd0", "/dev/sda"] {
            let e = parse_nbd_device(bad).unwrap_err().to_string();
            assert!(e.contains("is not an NBD device"), "{bad}: {e}");
        }
        assert_eq!(parse_ublk_device("/dev/ublkb12").unwrap(), 12);
        assert_eq!(parse_ublk_device("/dev/ublkb2147483647").unwrap(), i32::MAX as u32);
        for bad in ["/dev/ublkc1", "/dev/ublkb", "ublkb1", "/dev/ublkb2147483648", "/dev/ublkb-1"] {
            let e = parse_ublk_device(bad).unwrap_err().to_string();
            assert!(e.contains("is not a ublk device"), "{bad}: {e}");
        }
    }
}
