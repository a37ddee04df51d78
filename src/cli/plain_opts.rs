//! Options for images keyed by a raw volume key rather than a passphrase: plain dm-crypt
//! (headerless, as cryptsetup's `open --type plain`) and authenticated volumes. `encrypt`,
//! `decrypt`, `serve` and `format` take them, so they are defined once here.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::volume::{CipherSpec, VolumeParams};
use zeroize::Zeroizing;

use super::luks_opts::{parse_sector_size, read_key_file};

/// Plain dm-crypt (no header) options, as cryptsetup's `open --type plain`.
#[derive(Args, Debug, Clone)]
pub struct PlainArgs {
    /// The image is plain dm-crypt: no header, the key given by --volume-key-file.
    #[arg(long)]
    pub plain: bool,
    /// File holding the raw volume key (plain mode and authenticated volumes).
    #[arg(long, value_name = "FILE")]
    pub volume_key_file: Option<PathBuf>,
    /// Plain mode: start of the data in the image, in 512-byte sectors.
    #[arg(long, short = 'o', default_value_t = 0, requires = "plain")]
    pub offset: u64,
    /// Plain mode: IV offset, in 512-byte sectors.
    #[arg(long, short = 'p', default_value_t = 0, requires = "plain")]
    pub skip: u64,
    /// Plain mode: count IVs in sectors of --sector-size instead of 512 bytes.
    #[arg(long, requires = "plain")]
    pub iv_large_sectors: bool,
}

impl PlainArgs {
    pub fn volume(
        &self,
        cipher: &str,
        sector_size: u32,
    ) -> anyhow::Result<(Zeroizing<Vec<u8>>, VolumeParams)> {
        self.volume_with(None, cipher, sector_size)
    }

    /// [`volume`](Self::volume) with the key file's bytes already read (`open` reads them
    /// before it forks: after, standard input is /dev/null and `--volume-key-file -` would
    /// read nothing).
    pub fn volume_with(
        &self,
        key: Option<Zeroizing<Vec<u8>>>,
        cipher: &str,
        sector_size: u32,
    ) -> anyhow::Result<(Zeroizing<Vec<u8>>, VolumeParams)> {
        let Some(path) = &self.volume_key_file else {
            bail!("--plain needs --volume-key-file (the raw key)");
        };
        let key = match key {
            Some(k) => k,
            None => read_key_file(path)?,
        };
        let spec: CipherSpec = cipher.parse()?;
        spec.check_key_len(key.len())
            .with_context(|| format!("the volume key file {} holds {} bytes", path.display(), key.len()))?;
        let data_offset =
            self.offset.checked_mul(512).filter(|&b| b <= i64::MAX as u64).with_context(|| {
                format!("--offset {}: more 512-byte sectors than a file can hold", self.offset)
            })?;
        let params = VolumeParams {
            sector_size,
            data_offset,
            iv_offset: self.skip,
            iv_large_sectors: self.iv_large_sectors,
            ..VolumeParams::plain(spec)
        };
        Ok((key, params))
    }
}

/// The cipher and sector size of a plain image that is read (for a new image, `encrypt` takes
/// them from the new image's options).
#[derive(Args, Debug, Clone)]
pub struct PlainShapeArgs {
    /// Plain mode: the cipher spec.
    #[arg(long, short = 'c', default_value = "aes-xts-plain64")]
    pub cipher: String,
    /// Plain mode: sector size in bytes (512, 1024, 2048 or 4096).
    #[arg(long, default_value_t = 512, value_parser = parse_sector_size)]
    pub sector_size: u32,
}

/// The raw key of an authenticated volume (AES-128 or AES-256 for GCM), from `path`.
pub fn authenticated_key(path: Option<&Path>) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let Some(path) = path else {
        bail!("an authenticated volume needs --volume-key-file (a raw 16- or 32-byte AES-GCM key)");
    };
    let key = read_key_file(path)?;
    if key.len() != 16 && key.len() != 32 {
        bail!(
            "{} holds {} bytes; an authenticated volume takes a 16- or 32-byte key",
            path.display(),
            key.len()
        );
    }
    Ok(key)
}
