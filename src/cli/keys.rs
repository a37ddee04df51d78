//! `crypt-vfio add-key` and `crypt-vfio remove-key`: passphrases of a LUKS image, like
//! `cryptsetup luksAddKey` and `luksRemoveKey`.
//!
//! Both unlock with an existing passphrase first, so a wrong one changes nothing; removing the
//! last key slot is refused, since it would make the data unreadable forever.

use std::fs::OpenOptions;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use crypt_vfio::luks::{Header, LuksVersion};

use super::device::{with_block_engine, DeviceArgs};
use super::luks_opts::{read_key_file, KdfArgs, KeyFileArgs};

/// Arguments of `crypt-vfio add-key`.
#[derive(Args, Debug)]
pub struct AddKeyArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    key: KeyFileArgs,
    #[command(flatten)]
    kdf: KdfArgs,
    /// File holding the new passphrase (`-`: standard input).
    #[arg(long, value_name = "FILE")]
    new_key_file: PathBuf,
    /// The LUKS image.
    image: PathBuf,
}

/// Arguments of `crypt-vfio remove-key`.
#[derive(Args, Debug)]
pub struct RemoveKeyArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// File holding the passphrase to remove (`-`: standard input).
    #[command(flatten)]
    key: KeyFileArgs,
    /// The LUKS image.
    image: PathBuf,
}

/// `crypt-vfio add-key`.
pub fn add(args: AddKeyArgs) -> anyhow::Result<()> {
    let pass = read_key_file(&args.key.key_file)?;
    let new = read_key_file(&args.new_key_file)?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.image)
        .with_context(|| format!("opening {}", args.image.display()))?;
    let mut header = Header::read(&f)?;
    let version = match header {
        Header::V1(_) => LuksVersion::Luks1,
        Header::V2(_) => LuksVersion::Luks2,
    };
    let kdf = args.kdf.options(version)?;
    let engine = args.device.open_block()?;
    let slot = with_block_engine!(&engine, |e| header.add_passphrase(e, &f, &pass, &new, &kdf))?;
    eprintln!("key slot {slot} added");
    Ok(())
}

/// `crypt-vfio remove-key`.
pub fn remove(args: RemoveKeyArgs) -> anyhow::Result<()> {
    let pass = read_key_file(&args.key.key_file)?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.image)
        .with_context(|| format!("opening {}", args.image.display()))?;
    let mut header = Header::read(&f)?;
    let engine = args.device.open_block()?;
    let slot = with_block_engine!(&engine, |e| header.remove_passphrase(e, &f, &pass))?;
    eprintln!("key slot {slot} removed");
    Ok(())
}
