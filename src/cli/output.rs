//! Output files that appear only when complete.
//!
//! A failed or interrupted encrypt or decrypt must not leave a half-written image under the
//! name the user asked for (or clobber a good one): results go to a temporary file beside the
//! target, which is renamed over it only after everything was written and flushed.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A temporary output file, renamed to its final name by [`commit`](Self::commit) and removed
/// if dropped before.
pub struct PendingOutput {
    tmp: PathBuf,
    target: PathBuf,
    file: Option<File>,
}

impl PendingOutput {
    /// Creates the temporary file beside `target`.
    pub fn create(target: &Path) -> anyhow::Result<Self> {
        let dir = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = target.file_name().with_context(|| format!("{} is not a file name", target.display()))?;
        let tmp = dir.join(format!(".{}.crypt-vfio-{}", name.to_string_lossy(), std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self { tmp, target: target.to_path_buf(), file: Some(file) })
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("open until committed")
    }

    /// Flushes the file and moves it to the target name.
    pub fn commit(mut self) -> anyhow::Result<()> {
        let file = self.file.take().expect("open until committed");
        file.sync_all().with_context(|| format!("flushing {}", self.tmp.display()))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.target)
            .with_context(|| format!("renaming {} to {}", self.tmp.display(), self.target.display()))?;
        Ok(())
    }
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
