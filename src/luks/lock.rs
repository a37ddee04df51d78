//! The lock that serialises header updates of one image between crypt-vfio processes.
//!
//! Adding or removing a key slot is a read-modify-write of the header: two of them at once would
//! each start from the same header, and the second write would undo the first (two `add-key`
//! both filling "slot 1", or two `remove-key` each keeping the other's slot and so removing
//! both). crypt-vfio takes an exclusive `flock` on the image itself for every header update and
//! re-reads the header once it holds the lock, as cryptsetup serialises its own LUKS2 metadata
//! updates. Whether it also excludes a concurrent cryptsetup is not tested: cryptsetup locks a
//! block device through a file under `/run/cryptsetup`, not the device node, so against
//! cryptsetup on a block device it does not.
//!
//! `flock` locks belong to an open file description: two processes, or two `File`s opened
//! separately in one process, exclude each other; clones of one `File` share the lock.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::error::{Error, Result};

/// An exclusive `flock` on an image, released when dropped.
#[derive(Debug)]
pub struct HeaderLock<'a> {
    file: &'a File,
}

impl<'a> HeaderLock<'a> {
    /// Waits for and takes the exclusive lock on `file`.
    pub fn exclusive(file: &'a File) -> Result<Self> {
        loop {
            // SAFETY: flock only reads the descriptor number, which `file` keeps open for the
            // lifetime of the returned guard.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 {
                return Ok(Self { file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::os("locking the image for a header update (flock)", e));
            }
        }
    }
}

impl Drop for HeaderLock<'_> {
    fn drop(&mut self) {
        // SAFETY: as in `exclusive`; the descriptor is still open since we borrow the file.
        let r = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        if r != 0 {
            log::warn!("unlocking the image: {}", std::io::Error::last_os_error());
        }
    }
}
