//! The question `format` asks before it writes over an existing LUKS header (or authenticated
//! superblock), as `cryptsetup luksFormat` does: a new header destroys the old key slots (or
//! volume id), and with them every byte of data.
//!
//! On a terminal the user must type `YES`; `-q`/`--batch-mode` skips the question (scripts);
//! with neither a terminal nor `-q`, the command refuses rather than destroy data unasked.

use std::fs::File;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::bail;
use clap::Args;
use crypt_vfio::luks::Header;
use crypt_vfio::volume::authenticated;
use std::os::unix::fs::FileExt;

/// `-q`/`--batch-mode`: do not ask for confirmation.
#[derive(Args, Debug, Clone, Copy)]
pub struct BatchArgs {
    /// Do not ask for confirmation before overwriting an existing LUKS header (as cryptsetup's -q).
    #[arg(short = 'q', long = "batch-mode")]
    pub batch_mode: bool,
}

/// Refuses to go on over an existing LUKS header (or authenticated superblock) of `file` unless the user confirms: `YES` typed
/// on a terminal, or `batch_mode`.
pub fn confirm_overwrite(file: &File, path: &Path, batch_mode: bool) -> anyhow::Result<()> {
    // Header::read also finds a LUKS2 header from its secondary copy.
    let what = if Header::is_luks(file) || Header::read(file).is_ok() {
        "a LUKS header"
    } else if is_authenticated(file) {
        "an authenticated volume's superblock"
    } else {
        return Ok(());
    };
    eprintln!("WARNING: {} holds {what}: this will overwrite data on it irrevocably.", path.display());
    if batch_mode {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!(
            "refusing to overwrite {what} of {} without confirmation: standard input is not a \
             terminal, pass -q (--batch-mode) to confirm",
            path.display()
        );
    }
    eprint!("Are you sure? (Type 'yes' in capital letters): ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    if answer.trim_end_matches(['\n', '\r']) != "YES" {
        bail!("operation aborted: {} was not changed", path.display());
    }
    Ok(())
}

/// Whether `file` starts with an authenticated volume's magic (a superblock the new header would
/// destroy, and with it the volume id every sector is sealed under).
fn is_authenticated(file: &File) -> bool {
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0).is_ok() && magic == authenticated::MAGIC
}
