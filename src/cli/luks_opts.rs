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

/// Reads a passphrase (or key) file; `-` is standard input, whose one trailing newline is
/// dropped (as typed or echoed); a file is used byte for byte, as cryptsetup does.
pub fn read_key_file(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    if path == Path::new("-") {
        std::io::stdin().read_to_end(&mut buf).context("reading the passphrase from standard input")?;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
    } else {
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .with_context(|| format!("reading the key file {}", path.display()))?;
    }
    if buf.is_empty() {
        bail!("the passphrase in {} is empty", path.display());
    }
    Ok(buf)
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
    /// Fixed PBKDF2 iterations or Argon2 time cost, instead of a benchmark.
    #[arg(long)]
    pub pbkdf_force_iterations: Option<u32>,
    /// PBKDF2 time budget in milliseconds.
    #[arg(long, short = 'i', default_value_t = 2000)]
    pub iter_time: u64,
    /// Argon2 memory in KiB.
    #[arg(long, default_value_t = 1 << 20)]
    pub pbkdf_memory: u32,
    /// Argon2 threads.
    #[arg(long, default_value_t = 4)]
    pub pbkdf_parallel: u32,
}

impl KdfArgs {
    /// The library's KDF options for a key slot of a `version` image.
    pub fn options(&self, version: LuksVersion) -> LuksKdfOptions {
        let pbkdf = match self.pbkdf.as_deref() {
            Some("pbkdf2") => PbkdfType::Pbkdf2,
            Some("argon2i") => PbkdfType::Argon2i,
            Some("argon2id") => PbkdfType::Argon2id,
            _ if version == LuksVersion::Luks1 => PbkdfType::Pbkdf2,
            _ => PbkdfType::Argon2id,
        };
        LuksKdfOptions {
            pbkdf,
            force_iterations: self.pbkdf_force_iterations,
            iter_time: Duration::from_millis(self.iter_time),
            memory_kib: self.pbkdf_memory,
            parallel: self.pbkdf_parallel,
        }
    }
}

/// How a new LUKS image is made.
#[derive(Args, Debug, Clone)]
pub struct NewImageArgs {
    /// LUKS version, or `authenticated` (AES-GCM per sector, see docs/authenticated-format.md;
    /// `encrypt` only, keyed by --volume-key-file).
    #[arg(long = "type", default_value = "luks2", value_parser = ["luks1", "luks2", "authenticated"])]
    pub luks_type: String,
    /// dm-crypt cipher spec.
    #[arg(long, short = 'c', default_value = "aes-xts-plain64")]
    pub cipher: String,
    /// Volume key size in bits (default: 512 for XTS, 256 otherwise).
    #[arg(long, short = 's')]
    pub key_size: Option<usize>,
    /// Sector size in bytes (LUKS2: 512 to 4096; LUKS1: 512).
    #[arg(long, default_value_t = 512)]
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
        opts.kdf = self.kdf.options(version);
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
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
