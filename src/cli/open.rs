//! `crypt-vfio open`: the decrypted view of a volume as a kernel block device, like
//! `cryptsetup open`.
//!
//! The volume is opened exactly as `serve` opens it ([`serve::open_export`]), so both serve the
//! same bytes. By default the command daemonizes like `cryptsetup open` returns: it forks before
//! any thread exists, the parent waits on a pipe for the child's `READY <device>` or `ERR
//! <message>`, prints it and exits; the child serves until `close` (or SIGTERM).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::blockdev::kernel_nbd::{self, KernelNbdConfig};
use crypt_vfio::nbd::ServerConfig;

use super::device::DeviceArgs;
use super::plain_opts::{PlainArgs, PlainShapeArgs};
use super::serve::{self, ServeArgs};

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
    /// Attach through the kernel's NBD client as /dev/nbdN (`any`: the first free one).
    #[arg(long, value_name = "DEV")]
    pub nbd: String,
    /// Refuse writes (the block device is read-only).
    #[arg(long)]
    pub read_only: bool,
    /// Let discards punch holes in the image, as dm-crypt's `allow_discards` (see `serve`).
    #[arg(long)]
    pub allow_discards: bool,
    /// Connections (NBD) the kernel spreads requests over (1 to 16).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub queues: u16,
    /// Requests of one queue that run on the volume at once (1 to 64).
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
    pidfile: Option<PathBuf>,
}

impl Ready {
    fn ready(&mut self, device: &str) -> anyhow::Result<()> {
        if let Some(p) = &self.pidfile {
            std::fs::write(p, format!("{}\n", std::process::id()))
                .with_context(|| format!("writing the pidfile {}", p.display()))?;
        }
        match self.pipe.take() {
            Some(mut pipe) => {
                let _ = writeln!(pipe, "READY {device}");
            }
            None => {
                println!("{device}");
                let _ = std::io::stdout().flush();
            }
        }
        Ok(())
    }

    fn failed(&mut self, e: &anyhow::Error) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = writeln!(pipe, "ERR {e:#}");
        }
    }
}

/// `crypt-vfio open`.
pub fn run(args: OpenArgs) -> anyhow::Result<()> {
    let mut ready = if args.foreground {
        Ready { pipe: None, pidfile: args.pidfile.clone() }
    } else {
        match daemonize(args.log_file.as_deref())? {
            Some(pipe) => Ready { pipe: Some(pipe), pidfile: args.pidfile.clone() },
            // The parent: the child's verdict is already reported.
            None => return Ok(()),
        }
    };
    let result = serve_device(args, &mut ready);
    if let Err(e) = &result {
        ready.failed(e);
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
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto the standard descriptors, from descriptors that are open.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(null.as_raw_fd(), 1);
        libc::dup2(err_to.as_raw_fd(), 2);
    }
    Ok(Some(File::from(w)))
}

/// Opens the volume and serves it as a block device until it is closed.
fn serve_device(args: OpenArgs, ready: &mut Ready) -> anyhow::Result<()> {
    let index = parse_nbd_device(&args.nbd)?;
    let image = args.image.clone();
    let (read_only, queues, workers) = (args.read_only, args.queues, args.workers);
    let export_args = ServeArgs {
        image: args.image,
        key_file: args.key_file,
        raw: false,
        plain: args.plain,
        plain_shape: args.plain_shape,
        listen: String::new(),
        socket: None,
        tls: None,
        tls_certificates: None,
        tls_psk: None,
        tls_verify_peer: false,
        export: String::new(),
        read_only,
        allow_discards: args.allow_discards,
        workers: u64::from(workers),
        max_connections: u64::from(queues),
        max_memory: 256 << 20,
        handshake_timeout: std::time::Duration::from_secs(10),
        device: args.device,
    };
    let (device, engine) = serve::open_export(&export_args)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing signal handlers")?;
    }
    if let Some(engine) = &engine {
        serve::abort_on_stop(Arc::clone(&stop), Arc::downgrade(engine))?;
    }
    drop(engine);
    let backend = format!("crypt-vfio:{}", std::fs::canonicalize(&image).unwrap_or(image).display());
    let config = KernelNbdConfig {
        index,
        connections: usize::from(queues),
        timeout_s: 60,
        backend,
        server: ServerConfig {
            workers_per_connection: usize::from(workers),
            max_connections: usize::from(queues),
            ..ServerConfig::default()
        },
    };
    let mut ready_err = None;
    kernel_nbd::serve(device, config, stop, |n| {
        if let Err(e) = ready.ready(&format!("/dev/nbd{n}")) {
            ready_err = Some(e);
        }
    })?;
    if let Some(e) = ready_err {
        return Err(e);
    }
    Ok(())
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
    }
}
