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
    let created = args.size.is_some();
    let file =
        match args.size {
            Some(size) => {
                if size == 0 || size % u64::from(opts.sector_size) != 0 {
                    bail!("--size {size} is not a positive multiple of the sector size {}", opts.sector_size);
                }
                let f =
                    OpenOptions::new().read(true).write(true).create_new(true).open(path).with_context(
                        || format!("creating {} (--size creates a new image)", path.display()),
                    )?;
                f.set_len(opts.data_offset() + size)?;
                f
            }
            None => {
                OpenOptions::new().read(true).write(true).open(path).with_context(|| {
                    format!("opening {} (use --size to create a new image)", path.display())
                })?
            }
        };
    if !created {
        super::overwrite_check::confirm_overwrite(&file, path, args.batch.batch_mode)?;
    }
    let engine = args.device.open(&args.device.options())?;
    match luks::format(&engine, &file, &opts, &pass, None) {
        Ok(_) => {
            file.sync_all()?;
            Ok(())
        }
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(path);
            }
            Err(e).with_context(|| format!("formatting {}", path.display()))
        }
    }
}
