//! `crypt-vfio dump`: a LUKS header as `cryptsetup luksDump` shows it, without secrets.
//!
//! The volume key is never shown (there is no `--dump-volume-key`): what is printed is what the
//! header stores in the clear anyway.

use std::fs::File;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
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
    let header = Header::read(&f).with_context(|| format!("reading {}", args.image.display()))?;
    println!("LUKS header information for {}\n", args.image.display());
    print!("{header}");
    Ok(())
}
