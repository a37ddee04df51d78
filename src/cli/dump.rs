//! `crypt-vfio dump`: a LUKS header as `cryptsetup luksDump` shows it, without secrets.
//!
//! The volume key is never shown (there is no `--dump-volume-key`): what is printed is what the
//! header stores in the clear anyway.

use std::fs::File;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use crypt_vfio::luks::raw_dump::raw_dump;
use crypt_vfio::luks::Header;

use super::device::DeviceArgs;

/// Arguments of `crypt-vfio dump`.
#[derive(Args, Debug)]
pub struct DumpArgs {
    /// Accepted like every subcommand's; reading a header needs no engine.
    #[command(flatten)]
    device: DeviceArgs,
    /// The LUKS image.
    image: PathBuf,
}

/// `crypt-vfio dump`.
pub fn run(args: DumpArgs) -> anyhow::Result<()> {
    let f = File::open(&args.image).with_context(|| format!("opening {}", args.image.display()))?;
    match Header::read(&f) {
        Ok(header) => {
            println!("LUKS header information for {}\n", args.image.display());
            print!("{header}");
        }
        // A valid header asking for what crypt-vfio does not implement is still shown.
        Err(
            e @ (crypt_vfio::Error::Luks(crypt_vfio::LuksError::Unsupported(_))
            | crypt_vfio::Error::Volume(crypt_vfio::VolumeError::UnsupportedCipher { .. })),
        ) => {
            let text = raw_dump(&f).with_context(|| format!("reading {}", args.image.display()))?;
            println!("LUKS header information for {}\n", args.image.display());
            print!("{text}");
            eprintln!("note: {e}");
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", args.image.display())),
    }
    Ok(())
}
