//! `crypt-vfio format`: a new LUKS header on an image, like `cryptsetup luksFormat`, or (with
//! `--type authenticated`) a new authenticated volume keyed by `--volume-key-file`.
//!
//! The image must exist and be large enough (cryptsetup's habit), or be created at `--size`
//! bytes of data (qemu-img's habit). Nothing is written until every option was checked, and an
//! image this command created is removed again if formatting fails.

use std::fs::OpenOptions;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::luks;
use crypt_vfio::volume::authenticated::{Superblock, META_ENTRY_LEN, SUPERBLOCK_LEN};
use crypt_vfio::volume::AuthVolume;
use std::sync::Arc;

use super::device::{with_block_engine, DeviceArgs};
use super::luks_opts::{read_key_file, NewImageArgs};
use super::plain_opts::authenticated_key;

/// Arguments of `crypt-vfio format`.
#[derive(Args, Debug)]
pub struct FormatArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    image: NewImageArgs,
    /// File holding the passphrase of a LUKS image's key slot (`-`: standard input).
    #[arg(long, short = 'd', value_name = "FILE", conflicts_with = "volume_key_file")]
    key_file: Option<PathBuf>,
    /// `--type authenticated`: file holding the raw 16- or 32-byte AES-GCM key.
    #[arg(long, value_name = "FILE")]
    volume_key_file: Option<PathBuf>,
    #[command(flatten)]
    batch: super::overwrite_check::BatchArgs,
    /// Create IMG with room for this many bytes of data (it must not exist yet).
    #[arg(long)]
    size: Option<u64>,
    /// The image to format.
    image_path: PathBuf,
}

/// `crypt-vfio format`.
pub fn run(args: FormatArgs) -> anyhow::Result<()> {
    if args.image.luks_type == "authenticated" {
        return format_authenticated(&args);
    }
    if args.volume_key_file.is_some() {
        bail!("--volume-key-file keys --type authenticated; a LUKS image takes a passphrase (--key-file)");
    }
    let opts = args.image.options()?;
    let pass = read_key_file(args.key_file.as_deref().context("--key-file is needed")?)?;
    let path = &args.image_path;
    // Checked before anything is created: a size that overflows, or passes the largest file
    // offset, is refused by name.
    let new_len = match args.size {
        Some(size) => {
            if size == 0 || size % u64::from(opts.sector_size) != 0 {
                bail!("--size {size} is not a positive multiple of the sector size {}", opts.sector_size);
            }
            match opts.data_offset().checked_add(size) {
                Some(len) if len <= i64::MAX as u64 => Some(len),
                _ => bail!(
                    "--size {size}: with the {}-byte header that is more than the largest file ({} bytes)",
                    opts.data_offset(),
                    i64::MAX
                ),
            }
        }
        None => None,
    };
    let engine = args.device.open_block()?;
    let (file, created) =
        match new_len {
            Some(len) => {
                let f =
                    OpenOptions::new().read(true).write(true).create_new(true).open(path).with_context(
                        || format!("creating {} (--size creates a new image)", path.display()),
                    )?;
                let created = Created(path);
                f.set_len(len).with_context(|| {
                    format!("--size {}: making {} {len} bytes long", args.size.unwrap_or(0), path.display())
                })?;
                (f, Some(created))
            }
            None => {
                let f = OpenOptions::new().read(true).write(true).open(path).with_context(|| {
                    format!("opening {} (use --size to create a new image)", path.display())
                })?;
                (f, None)
            }
        };
    if created.is_none() {
        super::overwrite_check::confirm_overwrite(&file, path, args.batch.batch_mode)?;
    }
    with_block_engine!(&engine, |e| luks::format(e, &file, &opts, &pass, None))
        .with_context(|| format!("formatting {}", path.display()))?;
    file.sync_all().with_context(|| format!("flushing {}", path.display()))?;
    if let Some(created) = created {
        created.keep();
    }
    Ok(())
}

/// `format --type authenticated`: a new authenticated volume (every sector trimmed: sealed zeroes
/// in its entry, no ciphertext stored) on a
/// new image of `--size` bytes of data, or filling an existing image.
fn format_authenticated(args: &FormatArgs) -> anyhow::Result<()> {
    let ss = args.image.sector_size;
    let key = authenticated_key(args.volume_key_file.as_deref())?;
    let path = &args.image_path;
    if let Some(size) = args.size {
        if size == 0 || size % u64::from(ss) != 0 {
            bail!("--size {size} is not a positive multiple of the sector size {ss}");
        }
        let fits = Superblock::new(ss, size / u64::from(ss))
            .data_offset
            .checked_add(size)
            .is_some_and(|len| len <= i64::MAX as u64);
        if !fits {
            bail!("--size {size}: with the metadata that is more than the largest file ({} bytes)", i64::MAX);
        }
    }
    let engine = args.device.open_block()?;
    let (file, created, size) =
        match args.size {
            Some(size) => {
                let f =
                    OpenOptions::new().read(true).write(true).create_new(true).open(path).with_context(
                        || format!("creating {} (--size creates a new image)", path.display()),
                    )?;
                (f, Some(Created(path)), size)
            }
            None => {
                let f = OpenOptions::new().read(true).write(true).open(path).with_context(|| {
                    format!("opening {} (use --size to create a new image)", path.display())
                })?;
                let len = crypt_vfio::volume::file::storage_len(&f)
                    .with_context(|| format!("reading the size of {}", path.display()))?;
                let sectors = sectors_fitting(len, ss);
                if sectors == 0 {
                    bail!(
                    "{} ({len} bytes) is too small for an authenticated volume of even one {ss}-byte sector",
                    path.display()
                );
                }
                (f, None, sectors * u64::from(ss))
            }
        };
    if created.is_none() {
        super::overwrite_check::confirm_overwrite(&file, path, args.batch.batch_mode)?;
    }
    let data = file.try_clone()?;
    // The volume is dropped (its engine queues closed) before the file is synced.
    with_block_engine!(engine, |e| AuthVolume::format(Arc::new(e), data, &key, ss, size).map(drop))
        .with_context(|| format!("formatting {}", path.display()))?;
    file.sync_all().with_context(|| format!("flushing {}", path.display()))?;
    if let Some(created) = created {
        created.keep();
    }
    Ok(())
}

/// The most sectors of `sector_size` bytes whose authenticated volume (superblock, metadata,
/// data) fits in `len` bytes, so that formatting an existing image never grows it.
fn sectors_fitting(len: u64, sector_size: u32) -> u64 {
    let per_sector = u64::from(sector_size) + META_ENTRY_LEN as u64;
    let mut sectors = len.saturating_sub(SUPERBLOCK_LEN) / per_sector;
    while sectors > 0 && Superblock::new(sector_size, sectors).image_len() > len {
        sectors -= 1;
    }
    sectors
}

/// An image this command created: removed when dropped, unless kept, so that a failure leaves
/// no empty or half-formatted file behind.
struct Created<'a>(&'a std::path::Path);

impl Created<'_> {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Created<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}
