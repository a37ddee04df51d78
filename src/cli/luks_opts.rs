//! Options shared by the LUKS subcommands: passphrases and the shape of new images.
//!
//! Flag names follow cryptsetup (`--type`, `--cipher`, `--key-size`, `--sector-size`, `--hash`,
//! `--pbkdf`, `--pbkdf-force-iterations`, `--iter-time`, `--pbkdf-memory`, `--pbkdf-parallel`,
//! `--key-file`) so that a cryptsetup user needs no new vocabulary.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::luks::kdf::HashAlg;
use crypt_vfio::luks::{FormatOptions, LuksKdfOptions, LuksVersion, PbkdfType};
use crypt_vfio::volume::CipherSpec;
use zeroize::Zeroizing;

/// The most a key file may hold: cryptsetup's default maximum key file size (8192 KiB).
pub const MAX_KEY_FILE: usize = 8192 << 10;

/// Reads a passphrase (or key) file as cryptsetup does: byte for byte, `-` being standard input
/// read whole (a trailing newline included), at most [`MAX_KEY_FILE`] bytes. A longer one (or one
/// that never ends, like /dev/zero) is refused once that much is read, so memory stays bounded.
pub fn read_key_file(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let shown = path.display();
    let buf = if path == Path::new("-") {
        read_bounded(std::io::stdin().lock()).context("reading the passphrase from standard input")?
    } else {
        std::fs::File::open(path)
            .and_then(read_bounded)
            .with_context(|| format!("reading the key file {shown}"))?
    };
    let Some(buf) = buf else {
        bail!(
            "the key file {shown} holds more than {} KiB, the most cryptsetup reads from a key file",
            MAX_KEY_FILE >> 10
        );
    };
    if buf.is_empty() {
        bail!("the passphrase in {shown} is empty");
    }
    Ok(buf)
}

/// Reads `r` to its end into zeroized memory; `None` when it holds more than [`MAX_KEY_FILE`]
/// bytes. The buffer grows by copying into a new one, so that no copy of the key is freed
/// without being zeroed.
fn read_bounded(mut r: impl Read) -> std::io::Result<Option<Zeroizing<Vec<u8>>>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        let n = match r.read(&mut chunk[..]) {
            Ok(0) => return Ok(Some(buf)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.len() + n > MAX_KEY_FILE {
            return Ok(None);
        }
        if buf.len() + n > buf.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity((buf.capacity() * 2).max(buf.len() + n)));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Parses `--sector-size`: a power of two from 512 to 4096 bytes, as dm-crypt takes.
pub fn parse_sector_size(s: &str) -> Result<u32, String> {
    let v: u32 = s.trim().parse().map_err(|_| format!("`{s}` is not a sector size in bytes"))?;
    if !(512..=4096).contains(&v) || !v.is_power_of_two() {
        return Err(format!("sector size {v}: it must be 512, 1024, 2048 or 4096 bytes"));
    }
    Ok(v)
}

/// `--key-file`.
#[derive(Args, Debug, Clone)]
pub struct KeyFileArgs {
    /// File holding the passphrase (`-`: standard input).
    #[arg(long, short = 'd', value_name = "FILE")]
    pub key_file: PathBuf,
}

/// How new key slots derive their keys.
#[derive(Args, Debug, Clone)]
pub struct KdfArgs {
    /// Key slot KDF (default: pbkdf2 for LUKS1, argon2id for LUKS2).
    #[arg(long, value_parser = ["pbkdf2", "argon2i", "argon2id"])]
    pub pbkdf: Option<String>,
    /// Fixed PBKDF2 iterations (at least 1000) or Argon2 time cost (at least 4), instead of a
    /// benchmark; cryptsetup's minimums.
    #[arg(long)]
    pub pbkdf_force_iterations: Option<u32>,
    /// PBKDF2 time budget in milliseconds.
    #[arg(long, short = 'i', default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=u64::from(u32::MAX)))]
    pub iter_time: u64,
    /// Argon2 memory in KiB (32 to 4194304, cryptsetup's limits).
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(32..=4 << 20))]
    pub pbkdf_memory: u32,
    /// Argon2 threads (1 to 4, cryptsetup's limits).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4))]
    pub pbkdf_parallel: u32,
}

impl KdfArgs {
    /// The library's KDF options for a key slot of a `version` image; a forced iteration count
    /// below cryptsetup's minimum for the KDF is refused (cryptsetup would not write, and for
    /// PBKDF2 not open, such a slot).
    pub fn options(&self, version: LuksVersion) -> anyhow::Result<LuksKdfOptions> {
        let pbkdf = match self.pbkdf.as_deref() {
            Some("pbkdf2") => PbkdfType::Pbkdf2,
            Some("argon2i") => PbkdfType::Argon2i,
            Some("argon2id") => PbkdfType::Argon2id,
            _ if version == LuksVersion::Luks1 => PbkdfType::Pbkdf2,
            _ => PbkdfType::Argon2id,
        };
        if let Some(n) = self.pbkdf_force_iterations {
            let (name, min) = match pbkdf {
                PbkdfType::Pbkdf2 => ("pbkdf2", 1000),
                PbkdfType::Argon2i => ("argon2i", 4),
                PbkdfType::Argon2id => ("argon2id", 4),
            };
            if n < min {
                bail!("--pbkdf-force-iterations {n} is too low for {name}: the minimum is {min}");
            }
        }
        Ok(LuksKdfOptions {
            pbkdf,
            force_iterations: self.pbkdf_force_iterations,
            iter_time: Duration::from_millis(self.iter_time),
            memory_kib: self.pbkdf_memory,
            parallel: self.pbkdf_parallel,
        })
    }
}

/// How a new LUKS image is made.
#[derive(Args, Debug, Clone)]
pub struct NewImageArgs {
    /// LUKS version, or `authenticated` (AES-GCM per sector, see docs/authenticated-format.md;
    /// `encrypt` and `format`, keyed by --volume-key-file).
    #[arg(long = "type", default_value = "luks2", value_parser = ["luks1", "luks2", "authenticated"])]
    pub luks_type: String,
    /// dm-crypt cipher spec.
    #[arg(long, short = 'c', default_value = "aes-xts-plain64")]
    pub cipher: String,
    /// Volume key size in bits (default: 512 for XTS, 256 otherwise).
    #[arg(long, short = 's')]
    pub key_size: Option<usize>,
    /// Sector size in bytes (LUKS2 and authenticated: 512, 1024, 2048 or 4096; LUKS1: 512).
    #[arg(long, default_value_t = 512, value_parser = parse_sector_size)]
    pub sector_size: u32,
    /// Hash for PBKDF2, the digest and the AF splitter.
    #[arg(long, default_value = "sha256")]
    pub hash: String,
    /// How the key slot's key is derived.
    #[command(flatten)]
    pub kdf: KdfArgs,
}

impl NewImageArgs {
    /// The library's format options, checked.
    pub fn options(&self) -> anyhow::Result<FormatOptions> {
        let version = match self.luks_type.as_str() {
            "luks1" => LuksVersion::Luks1,
            "luks2" => LuksVersion::Luks2,
            other => bail!("--type {other} is not a LUKS version (luks1 or luks2)"),
        };
        let spec: CipherSpec = self.cipher.parse()?;
        let key_size = self.key_size.unwrap_or(if spec.mode == crypt_vfio::Mode::Xts { 512 } else { 256 });
        if key_size % 8 != 0 {
            bail!("--key-size {key_size} is not a whole number of bytes");
        }
        spec.check_key_len(key_size / 8)?;
        let hash = HashAlg::parse(&self.hash, "--hash")
            .map_err(|_| anyhow::anyhow!("--hash {}: not supported (sha1, sha256, sha512 are)", self.hash))?;
        let mut opts = FormatOptions::new(version);
        opts.spec = spec;
        opts.key_bytes = key_size / 8;
        opts.sector_size = self.sector_size;
        opts.hash = hash;
        opts.kdf = self.kdf.options(version)?;
        Ok(opts)
    }
}

/// A progress bar on standard error when it is a terminal, nothing otherwise.
pub fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        // A constant template: the fallback is never taken, but is no reason to panic either.
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
