//! Where `encrypt` and `decrypt` put their results, so that no run loses or exposes data.
//!
//! * A regular file appears only when complete: results go to a private (0600) temporary file
//!   beside the target, renamed over it after everything was written and flushed, then the
//!   directory is flushed so that the rename survives a crash. A failure, or SIGINT, SIGTERM or
//!   SIGHUP, removes the temporary file: no partial plaintext is left under any name.
//! * A block device is written in place, as `dd` and cryptsetup do: never truncated, renamed
//!   or replaced by a file, and refused up front when it is too small.
//! * An output that is the input under any name (another spelling, a symbolic or hard link, a
//!   second node of the same device) is refused before anything is written.

use std::ffi::OsString;
use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use anyhow::{bail, Context};
use crypt_vfio::volume::file::storage_len;

/// Temporary files that exist now: the signal thread removes them before the process dies.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<PathBuf>> {
    // A panic while the list was held leaves it as consistent as ever: paths only.
    PENDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts, once, the thread that on SIGINT, SIGTERM or SIGHUP removes the temporary files and
/// then ends the process as that signal would have, so the caller's shell sees it interrupted.
fn remove_temporaries_on_signals() -> anyhow::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
            .map_err(|e| format!("installing signal handlers: {e}"))?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    // Held until the process is gone: no rename or new temporary file slips
                    // in between.
                    let list = pending();
                    for tmp in list.iter() {
                        let _ = std::fs::remove_file(tmp);
                    }
                    let _ = signal_hook::low_level::emulate_default_handler(signal);
                    // Only reached if the default action does not end the process.
                    std::process::exit(128 + signal);
                }
            })
            .map(|_| ())
            .map_err(|e| format!("starting the signal thread: {e}"))
    });
    installed.clone().map_err(anyhow::Error::msg)
}

/// The output of `encrypt` or `decrypt`.
pub enum Output {
    /// A regular file, written through a temporary file beside it.
    File(PendingOutput),
    /// A block device, written in place.
    Device {
        /// The device, open for writing.
        file: File,
        /// Its path, for messages.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
}

impl Output {
    /// Opens `target` for output of data read from `input`: refuses the input itself, a
    /// directory and anything that is neither a regular file nor a block device.
    pub fn open(target: &Path, input: &File, input_path: &Path) -> anyhow::Result<Self> {
        let existing = match std::fs::metadata(target) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("looking at the output {}", target.display())),
        };
        let Some(meta) = existing else {
            if let Ok(link) = std::fs::read_link(target) {
                // The rename would replace the link itself, not create the file it names.
                bail!(
                    "the output {} is a symbolic link to {}, which does not exist: give the path \
                     of the file to create",
                    target.display(),
                    link.display()
                );
            }
            return Ok(Output::File(PendingOutput::create(target)?));
        };
        let in_meta = input.metadata().with_context(|| format!("looking at {}", input_path.display()))?;
        if same_storage(&in_meta, &meta) {
            bail!(
                "the output {} is the input {} (the same file under another name): give another output",
                target.display(),
                input_path.display()
            );
        }
        let kind = meta.file_type();
        if kind.is_dir() {
            bail!("the output {} is a directory: give the name of a file or block device", target.display());
        }
        if kind.is_block_device() {
            // O_EXCL on a block device claims it, as mkfs and cryptsetup do: the kernel refuses a
            // device that is mounted, part of a device-mapper or RAID set, or claimed by another
            // program, so plaintext never lands on a live file system (the input's among them).
            let file = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_EXCL).open(target)
            {
                Ok(file) => file,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(
                    "the output device {} is in use (mounted, or held by another program): \
                     unmount or release it first",
                    target.display()
                ),
                Err(e) => {
                    return Err(e).with_context(|| format!("opening the block device {}", target.display()))
                }
            };
            let size = storage_len(&file)?;
            return Ok(Output::Device { file, path: target.to_path_buf(), size });
        }
        if !kind.is_file() {
            bail!(
                "the output {} is neither a regular file nor a block device (a character device, FIFO \
                 or socket)",
                target.display()
            );
        }
        // Through a symbolic link, the file it names is replaced and the link kept.
        let real =
            std::fs::canonicalize(target).with_context(|| format!("resolving {}", target.display()))?;
        Ok(Output::File(PendingOutput::create(&real)?))
    }

    /// The open file or device to write to.
    pub fn file(&self) -> &File {
        match self {
            Output::File(p) => &p.file,
            Output::Device { file, .. } => file,
        }
    }

    /// Refuses an output device smaller than `len` bytes; a file grows as needed.
    pub fn check_room(&self, len: u64) -> anyhow::Result<()> {
        if let Output::Device { path, size, .. } = self {
            if *size < len {
                bail!(
                    "the output device {} is too small: it holds {size} bytes, {len} are needed",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// Flushes everything to stable storage and, for a file, moves it to its name.
    pub fn commit(self) -> anyhow::Result<()> {
        match self {
            Output::File(p) => p.commit(),
            Output::Device { file, path, .. } => {
                file.sync_all().with_context(|| format!("flushing {}", path.display()))
            }
        }
    }
}

/// Whether two files are the same storage: one inode, or two nodes of one block device.
fn same_storage(a: &Metadata, b: &Metadata) -> bool {
    (a.dev() == b.dev() && a.ino() == b.ino())
        || (a.file_type().is_block_device() && b.file_type().is_block_device() && a.rdev() == b.rdev())
}

/// A temporary output file, renamed to its final name by [`commit`](Self::commit) and removed
/// if dropped before, or on a signal.
pub struct PendingOutput {
    tmp: PathBuf,
    target: PathBuf,
    file: File,
    committed: bool,
}

impl PendingOutput {
    /// Creates the private temporary file beside `target`.
    pub fn create(target: &Path) -> anyhow::Result<Self> {
        remove_temporaries_on_signals()?;
        let dir = parent_dir(target);
        let name = target.file_name().with_context(|| format!("{} is not a file name", target.display()))?;
        for _ in 0..16 {
            let mut tmp_name = OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(".crypt-vfio-{}-{:08x}", std::process::id(), rand::random::<u32>()));
            let tmp = dir.join(tmp_name);
            // Listed before it exists, so that a signal at any moment finds it.
            let mut list = pending();
            list.push(tmp.clone());
            let opened = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&tmp);
            match opened {
                Ok(file) => {
                    drop(list);
                    return Ok(Self { tmp, target: target.to_path_buf(), file, committed: false });
                }
                Err(e) => {
                    list.retain(|p| p != &tmp);
                    if e.kind() != std::io::ErrorKind::AlreadyExists {
                        return Err(e).with_context(|| format!("creating {}", tmp.display()));
                    }
                }
            }
        }
        bail!("could not find a free temporary name beside {}", target.display())
    }

    /// Flushes the file, gives it the mode and owner of the file it replaces (a new one stays
    /// 0600), moves it to the target name and flushes the directory.
    pub fn commit(mut self) -> anyhow::Result<()> {
        self.file.sync_all().with_context(|| format!("flushing {}", self.tmp.display()))?;
        if let Ok(old) = std::fs::metadata(&self.target) {
            if old.uid() != self.file.metadata()?.uid() || old.gid() != self.file.metadata()?.gid() {
                // Only root may give a file away: a finished output is not thrown away for that,
                // it keeps its new owner (ours) and the old mode.
                if let Err(e) = std::os::unix::fs::fchown(&self.file, Some(old.uid()), Some(old.gid())) {
                    log::warn!(
                        "{} keeps its new owner: could not give it the owner of the file it replaces ({e})",
                        self.target.display()
                    );
                }
            }
            self.file
                .set_permissions(std::fs::Permissions::from_mode(old.permissions().mode() & 0o7777))
                .with_context(|| {
                    format!("giving {} the mode of {}", self.tmp.display(), self.target.display())
                })?;
        }
        {
            let mut list = pending();
            std::fs::rename(&self.tmp, &self.target)
                .with_context(|| format!("renaming {} to {}", self.tmp.display(), self.target.display()))?;
            self.committed = true;
            list.retain(|p| p != &self.tmp);
        }
        let dir = parent_dir(&self.target);
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("flushing the directory {}", dir.display()))?;
        Ok(())
    }
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        if !self.committed {
            let mut list = pending();
            let _ = std::fs::remove_file(&self.tmp);
            list.retain(|p| p != &self.tmp);
        }
    }
}

/// The directory holding `path`.
fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}
