//! `crypt-vfio format`: a new LUKS header on an image, like `cryptsetup luksFormat`.
//!
//! The image must exist and be large enough (cryptsetup's habit), or be created at `--size`
//! bytes of data (qemu-img's habit). Nothing is written until every option was checked, and an
//! image this command created is removed again if formatting fails.

use std::fs::OpenOptions;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::luks;

use super::device::DeviceArgs;
use super::luks_opts::{read_key_file, KeyFileArgs, NewImageArgs};

/// Arguments of `crypt-vfio format`.
#[derive(Args, Debug)]
pub struct FormatArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    image: NewImageArgs,
    #[command(flatten)]
    key: KeyFileArgs,
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
    let opts = args.image.options()?;
    let pass = read_key_file(&args.key.key_file)?;
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
    let engine = args.device.open(&args.device.options())?;
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
    luks::format(&engine, &file, &opts, &pass, None)
        .with_context(|| format!("formatting {}", path.display()))?;
    file.sync_all().with_context(|| format!("flushing {}", path.display()))?;
    if let Some(created) = created {
        created.keep();
    }
    Ok(())
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
