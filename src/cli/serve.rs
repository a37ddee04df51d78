//! `crypt-vfio serve`: the decrypted view of a volume, exported over NBD.
//!
//! Everything the server needs from the command line is which block device to export, so
//! that choice lives in one function, [`open_export`]: `--raw` exports an image byte for byte
//! (to test the server on its own), `--key-file` unlocks a LUKS1/LUKS2 image with a passphrase
//! or opens an authenticated volume with its raw key. The rest is listening, signals and the
//! orderly stop.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::engine::{Engine, PoolEngine};
use crypt_vfio::luks::Header;
use crypt_vfio::nbd::{
    Listener, Server, ServerConfig, TlsConfig, TlsCredentials, MAX_CONNECTIONS, MAX_MEMORY_LIMIT,
    MAX_PAYLOAD_LIMIT, MAX_WORKERS_PER_CONNECTION,
};
use crypt_vfio::virtio_crypto::VirtioCrypto;
use crypt_vfio::volume::block::BlockDevice;
use crypt_vfio::volume::file::FileBlockDevice;
use crypt_vfio::volume::VolumeParams;
use crypt_vfio::volume::{authenticated, AuthVolume, Volume};
use crypt_vfio::{Error, LuksError};
use zeroize::Zeroizing;

use super::device::{BlockEngine, DeviceArgs};
use super::duration::{parse_within, Bounds};
use super::luks_opts::read_key_file;
use super::plain_opts::{PlainArgs, PlainShapeArgs};

/// Arguments of `crypt-vfio serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The image: an encrypted volume (with --key-file), a plain dm-crypt image (with --plain), or any file or block device with --raw.
    #[arg(value_name = "IMG")]
    pub image: PathBuf,
    /// File holding the passphrase of a LUKS image, or the raw key of an authenticated volume
    /// (`-`: standard input).
    #[arg(long, value_name = "F", required_unless_present_any = ["raw", "plain"], conflicts_with_all = ["raw", "plain"])]
    pub key_file: Option<PathBuf>,
    /// Export IMG as it is, unencrypted (serves a plain image; tests the NBD server alone).
    #[arg(long, conflicts_with = "plain")]
    pub raw: bool,
    /// A headerless dm-crypt image (as `cryptsetup open --type plain`), keyed by --volume-key-file.
    #[command(flatten)]
    pub plain: PlainArgs,
    #[command(flatten)]
    pub plain_shape: PlainShapeArgs,
    /// TCP address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10809", conflicts_with = "socket")]
    pub listen: String,
    /// Listen on a Unix socket at PATH instead of TCP (PATH must not exist; it is created with
    /// mode 0600, owner only).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// TLS: `off`, `on` (clients may use it) or `require` (clients that do not are refused).
    /// Default: `require` with --tls-certificates or --tls-psk, `off` without.
    #[arg(long, value_name = "MODE", value_parser = ["off", "on", "require"])]
    pub tls: Option<String>,
    /// x509 credentials: a directory with server-cert.pem, server-key.pem (and ca-cert.pem
    /// with --tls-verify-peer), laid out as for qemu-nbd and nbdkit.
    #[arg(long, value_name = "DIR", conflicts_with = "tls_psk")]
    pub tls_certificates: Option<PathBuf>,
    /// Pre-shared keys: a file of `username:hexkey` lines (as `psktool` writes them).
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// With --tls-certificates: require a client certificate signed by ca-cert.pem. Without
    /// it any client that reaches the socket completes the handshake and reads and writes the
    /// decrypted volume (TLS then only encrypts the wire; a warning says so). Unlike qemu-nbd,
    /// whose x509 server credentials verify peers by default, this is opt-in.
    #[arg(long, requires = "tls_certificates")]
    pub tls_verify_peer: bool,
    /// Export name; clients asking for the default export (the empty name) get it too.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub export: String,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// LUKS and plain images: let trims (NBD_CMD_TRIM) punch holes in the image, as dm-crypt's
    /// `allow_discards`. Off by default: trims are accepted and do nothing. A hole shows
    /// which parts of the volume are unused to anyone who can see the image, and it reads as
    /// zeroes only through crypt-vfio (dm-crypt decrypts it into garbage, as a discarded range
    /// on many devices). Zeroing requests always write encrypted zeroes. Authenticated volumes
    /// always accept trims (their trimmed sectors read as authenticated zeroes everywhere).
    #[arg(long)]
    pub allow_discards: bool,
    /// Requests of one client that run at once (1 to 64).
    #[arg(long, default_value_t = 4, value_parser = bounded(1, MAX_WORKERS_PER_CONNECTION as u64))]
    pub workers: u64,
    /// Clients served at once (1 to 1024); when all are taken, a new client replaces the
    /// oldest one still in its handshake.
    #[arg(long, default_value_t = 64, value_parser = bounded(1, MAX_CONNECTIONS as u64))]
    pub max_connections: u64,
    /// Memory for request payloads of all clients together (bytes, or with a K/M/G/KiB/MiB/GiB
    /// suffix; 32MiB to 1TiB).
    #[arg(long, value_name = "BYTES", default_value = "256MiB", value_parser = parse_memory)]
    pub max_memory: u64,
    /// Time a client has to choose an export after connecting (for example 10s; at most 3600s).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_handshake_timeout)]
    pub handshake_timeout: Duration,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// A parser for an integer in `min..=max` whose error names the bounds.
fn bounded(min: u64, max: u64) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: u64 = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
        if !(min..=max).contains(&v) {
            return Err(format!("{v} is outside {min}..={max}"));
        }
        Ok(v)
    }
}

/// `--max-memory`: bytes with an optional binary suffix, from one maximum payload to 1 TiB.
fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (try 256MiB)"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => return Err(format!("unknown unit `{other}` in `{s}` (use KiB, MiB, GiB or TiB)")),
    };
    let bytes = n.checked_mul(1 << shift).ok_or_else(|| format!("`{s}` is too large"))?;
    let min = u64::from(MAX_PAYLOAD_LIMIT);
    if !(min..=MAX_MEMORY_LIMIT).contains(&bytes) {
        return Err(format!("{bytes} bytes is outside 32MiB..=1TiB (it must hold one 32 MiB request)"));
    }
    Ok(bytes)
}

/// `--handshake-timeout`: long enough for a client to finish, short enough that an idle socket
/// cannot hold a slot for long.
fn parse_handshake_timeout(s: &str) -> Result<Duration, String> {
    parse_within(
        s,
        Bounds {
            min: Duration::from_millis(100),
            max: Duration::from_secs(3600),
            too_short: "no client could finish its handshake",
            too_long: "an idle client would hold its slot that long",
        },
    )
}

/// The TLS setup the options ask for; `None` for no TLS.
fn tls_config(args: &ServeArgs) -> anyhow::Result<Option<TlsConfig>> {
    let credentials = match (&args.tls_certificates, &args.tls_psk) {
        (Some(dir), _) => Some(TlsCredentials::X509 { dir: dir.clone(), verify_peer: args.tls_verify_peer }),
        (None, Some(file)) => Some(TlsCredentials::Psk { file: file.clone() }),
        (None, None) => None,
    };
    let mode = args.tls.as_deref().unwrap_or(if credentials.is_some() { "require" } else { "off" });
    match (mode, credentials) {
        ("off", None) => Ok(None),
        ("off", Some(_)) => {
            bail!("--tls off with TLS credentials: drop the credentials or choose --tls on/require")
        }
        (_, None) => bail!("--tls {mode} needs credentials: --tls-certificates DIR or --tls-psk FILE"),
        (mode, Some(c)) => {
            Ok(Some(TlsConfig::new(&c, mode == "require").context("loading the TLS credentials")?))
        }
    }
}

/// The engine under an export, for what `serve` does with it beside the volume: abort it when
/// stopping, and for a pool print each member's share on exit.
pub enum ExportEngine {
    /// One device.
    Device(Arc<VirtioCrypto>),
    /// A pool (`--device a,b,software`).
    Pool(Arc<PoolEngine>),
}

/// What `serve` exports, and the engine under it (none for `--raw` and the software engine).
pub type Export = (Arc<dyn BlockDevice>, Option<ExportEngine>);

/// The block device `args` name (the one place that decides what is exported), and the engine
/// under it (none for `--raw`).
/// What decides the exported volume, shared by `serve` and `open` (which has no listener, TLS
/// or export name): one struct, so that a volume option added to `serve` must be given by
/// `open` too, not silently defaulted.
pub struct ExportOptions<'a> {
    /// The image.
    pub image: &'a std::path::Path,
    /// `--key-file`.
    pub key_file: Option<&'a std::path::Path>,
    /// `--raw`: the image as it is.
    pub raw: bool,
    /// `--plain` and its key.
    pub plain: &'a PlainArgs,
    /// The plain image's cipher and sector size.
    pub plain_shape: &'a PlainShapeArgs,
    /// Refuse writes.
    pub read_only: bool,
    /// Discards punch holes.
    pub allow_discards: bool,
    /// The engine.
    pub device: &'a DeviceArgs,
}

impl ServeArgs {
    /// The options that decide the exported volume.
    pub fn export_options(&self) -> ExportOptions<'_> {
        ExportOptions {
            image: &self.image,
            key_file: self.key_file.as_deref(),
            raw: self.raw,
            plain: &self.plain,
            plain_shape: &self.plain_shape,
            read_only: self.read_only,
            allow_discards: self.allow_discards,
            device: &self.device,
        }
    }
}

pub fn open_export(args: &ServeArgs) -> anyhow::Result<Export> {
    open_export_with(&args.export_options(), None).map(|(export, _)| export)
}

/// What identifies how a volume was keyed: its volume key and cipher shape, for `open` to hash
/// into the identity `--recover` checks. Never stored or logged as it is.
pub type KeyMaterial = Zeroizing<Vec<u8>>;

/// The key and shape as one byte string (the key's length first, so that no two differ only in
/// where the key ends).
fn key_material(key: &[u8], shape: &impl std::fmt::Debug) -> KeyMaterial {
    let shape = format!("{shape:?}");
    let mut m = Zeroizing::new(Vec::with_capacity(8 + key.len() + shape.len()));
    m.extend_from_slice(&(key.len() as u64).to_le_bytes());
    m.extend_from_slice(key);
    m.extend_from_slice(shape.as_bytes());
    m
}

/// [`open_export`] with the secret already read (`open` reads it before it forks, as standard
/// input is gone after): `--key-file`'s, or with `--plain` `--volume-key-file`'s; and the
/// volume's [`KeyMaterial`].
pub fn open_export_with(
    args: &ExportOptions<'_>,
    secret: Option<Zeroizing<Vec<u8>>>,
) -> anyhow::Result<(Export, KeyMaterial)> {
    if args.raw {
        let dev = FileBlockDevice::open(args.image, args.read_only)
            .with_context(|| format!("opening {} to export it raw", args.image.display()))?;
        return Ok(((Arc::new(dev), None), key_material(b"", &"raw")));
    }
    let unlock = if args.plain.plain {
        // The key and every plain option are checked before the device is opened, and all of it
        // before anything listens.
        let (key, params) =
            args.plain.volume_with(secret, &args.plain_shape.cipher, args.plain_shape.sector_size)?;
        Unlock::Plain(key, params)
    } else {
        if args.plain.volume_key_file.is_some() {
            // Not ignored: a user who gave a raw key expects it to be the one used.
            bail!(
                "--volume-key-file goes with --plain; a LUKS passphrase or an authenticated volume's raw \
                 key goes to --key-file"
            );
        }
        match secret {
            Some(s) => Unlock::Secret(s),
            None => Unlock::Secret(read_key_file(
                args.key_file.context("--key-file is needed to unlock the volume")?,
            )?),
        }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!args.read_only)
        .open(args.image)
        .with_context(|| format!("opening {}", args.image.display()))?;
    match args.device.open_block()? {
        BlockEngine::Device(d) => {
            let d = Arc::new(d);
            let (volume, material) = export_on(Arc::clone(&d), args, file, unlock)?;
            Ok(((volume, Some(ExportEngine::Device(d))), material))
        }
        BlockEngine::Pool(p) => {
            let p = Arc::new(p);
            let (volume, material) = export_on(Arc::clone(&p), args, file, unlock)?;
            Ok(((volume, Some(ExportEngine::Pool(p))), material))
        }
        BlockEngine::Software(s) => {
            let (volume, material) = export_on(Arc::new(s), args, file, unlock)?;
            Ok(((volume, None), material))
        }
    }
}

/// How the volume is keyed.
enum Unlock {
    /// A plain dm-crypt image: its key and shape.
    Plain(Zeroizing<Vec<u8>>, VolumeParams),
    /// A passphrase or an authenticated volume's key.
    Secret(Zeroizing<Vec<u8>>),
}

/// The volume in `file`, unlocked and opened on `engine`.
fn export_on<E: Engine + 'static>(
    engine: Arc<E>,
    args: &ExportOptions<'_>,
    file: std::fs::File,
    unlock: Unlock,
) -> anyhow::Result<(Arc<dyn BlockDevice>, KeyMaterial)> {
    let writable = !args.read_only;
    let secret = match unlock {
        Unlock::Plain(key, params) => {
            let mut volume = Volume::open(engine, file, writable, &key, params)
                .with_context(|| format!("opening {} as a plain dm-crypt image", args.image.display()))?;
            volume.set_allow_discards(args.allow_discards);
            return Ok((Arc::new(volume), key_material(&key, &params)));
        }
        Unlock::Secret(secret) => secret,
    };
    let mut magic = [0u8; 8];
    if file.read_exact_at(&mut magic, 0).is_ok() && magic == authenticated::MAGIC {
        // An authenticated volume: the key file holds the raw AES-GCM key.
        let volume = AuthVolume::open(engine, file, writable, &secret)?;
        return Ok((Arc::new(volume), key_material(&secret, &"authenticated")));
    }
    let header = match Header::read(&file) {
        Err(Error::Luks(LuksError::NotLuks(why))) => bail!(
            "{} is neither a LUKS image nor an authenticated volume ({why}); use --raw to export it as it is",
            args.image.display()
        ),
        other => other?,
    };
    let (slot, key) = header.unlock(&*engine, &file, &secret)?;
    log::info!("key slot {slot} opened");
    let params = header.volume_params();
    let material = key_material(&key, &params);
    let mut volume = Volume::open(engine, file, writable, &key, params)?;
    volume.set_allow_discards(args.allow_discards);
    Ok((Arc::new(volume), material))
}

/// How long a stop waits for requests on the device before it fails them: a stop must end
/// within 2 s even when the device hangs or is being recovered.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Once `stop` is set, gives requests [`STOP_GRACE`] to finish, then aborts whatever is still
/// on the device so that the server can answer every client and exit.
fn abort_on_stop<T: Send + Sync + 'static>(
    stop: Arc<AtomicBool>,
    engine: Weak<T>,
    abort: fn(&T),
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("crypt-vfio-stop".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if engine.strong_count() == 0 {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(STOP_GRACE);
            if let Some(e) = engine.upgrade() {
                abort(&e);
            }
        })
        .context("starting the stop watcher")?;
    Ok(())
}

/// `crypt-vfio serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Credentials are checked before the volume is unlocked.
    let tls = tls_config(&args)?;
    // Held while serving: an `open` of the same image meanwhile would be a second writer.
    let _lock = super::open::lock_image(&args.image)?;
    let (device, engine) = open_export(&args)?;
    let size = device.size();
    let config = ServerConfig {
        export_name: args.export.clone(),
        description: format!("{} ({})", args.image.display(), if args.raw { "raw" } else { "decrypted" }),
        // Both were bounded by the parser, far below usize::MAX.
        workers_per_connection: args.workers as usize,
        max_connections: args.max_connections as usize,
        max_memory: args.max_memory,
        handshake_timeout: args.handshake_timeout,
        tls: tls.clone(),
        ..ServerConfig::default()
    };
    let server = Server::new(device, config).context("configuring the NBD server")?;

    let stop = server.stop_flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first so that it sees the flag before the first signal sets it: a second
        // signal while a stop is stuck on a client exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .context("installing signal handlers")?;
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing signal handlers")?;
    }

    // The pool is kept for its exit table; a device goes with the volume.
    let mut pool = None;
    match engine {
        Some(ExportEngine::Device(d)) => {
            abort_on_stop(Arc::clone(&stop), Arc::downgrade(&d), VirtioCrypto::abort)?
        }
        Some(ExportEngine::Pool(p)) => {
            abort_on_stop(Arc::clone(&stop), Arc::downgrade(&p), PoolEngine::abort)?;
            pool = Some(p);
        }
        None => {}
    }

    let listener = match &args.socket {
        Some(path) => Listener::unix(path)?,
        None => Listener::tcp(args.listen.as_str())?,
    };
    if args.socket.is_none() && !args.raw && !tls.as_ref().is_some_and(|t| t.required) {
        log::warn!(
            "serving the decrypted volume on TCP {} without {} TLS: anyone who can reach the port \
             reads and writes the plaintext (use --tls-certificates/--tls-psk, or --socket)",
            args.listen,
            if tls.is_some() { "required" } else { "any" }
        );
    }
    if args.tls_certificates.is_some() && !args.tls_verify_peer {
        log::warn!(
            "TLS with --tls-certificates but without --tls-verify-peer authenticates no client: any \
             client that can reach the {} reads and writes the {} volume",
            if args.socket.is_some() { "socket" } else { "port" },
            if args.raw { "exported" } else { "decrypted" }
        );
    }
    // Scripts and tests read this line to find the port when --listen asked for port 0.
    let uri = listener.uri(&args.export);
    // The scheme says how to connect: nbds:// (nbds+unix://) when TLS is offered.
    let uri = if tls.is_some() { uri.replacen("nbd", "nbds", 1) } else { uri };
    println!("listening on {uri} ({size} bytes)");
    std::io::stdout().flush().context("writing to stdout")?;

    let report = server.serve(listener).context("serving")?;
    eprintln!("crypt-vfio: stopped after {} connection(s); the device is flushed", report.connections);
    if let Some(p) = pool {
        eprint!("{}", member_table(&p.member_stats()));
    }
    Ok(())
}

/// Each pool member's state and share, as `serve` prints it on exit (tests read it).
pub fn member_table(stats: &[crypt_vfio::engine::MemberStats]) -> String {
    let mut out = String::from(
        "crypt-vfio: pool members: name state share requests bytes reruns-out reruns-in recoveries since-rejoin\n",
    );
    for m in stats {
        out.push_str(&format!(
            "crypt-vfio:   member {} {} {:.1}% requests {} bytes {} reruns-out {} reruns-in {} recoveries {} since-rejoin {}\n",
            m.name,
            m.state,
            m.share * 100.0,
            m.requests,
            m.bytes,
            m.reruns_out,
            m.reruns_in,
            m.recoveries,
            m.since_rejoin
        ));
    }
    out
}
