//! Opening an encrypted image by path, whatever its format.
//!
//! An image is a LUKS1 or LUKS2 image (unlocked with a passphrase), an authenticated volume
//! (opened with its raw AES-GCM key; see [`super::authenticated`]) or a plain dm-crypt image
//! (no header: the caller gives the key and the [`VolumeParams`]). The first two say what they
//! are in their first bytes, so [`AnyVolume::open`] tells them apart as the CLI's `serve` and
//! `decrypt` do; a plain image cannot be recognised and has its own call.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::{authenticated, AuthVolume, BlockDevice, Volume, VolumeParams};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::luks;

/// An opened encrypted image: sector encryption (LUKS or plain) or an authenticated volume.
///
/// ```
/// use std::sync::Arc;
/// use crypt_vfio::luks::{self, FormatOptions, LuksKdfOptions, LuksVersion};
/// use crypt_vfio::volume::AnyVolume;
///
/// let engine = Arc::new(crypt_vfio::open("software")?);
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.img");
/// // A LUKS2 image of 1 MiB of data; fast key slot derivation for the example only.
/// let mut opts = FormatOptions::new(LuksVersion::Luks2);
/// opts.kdf = LuksKdfOptions::pbkdf2_iterations(1000);
/// luks::create(&*engine, &path, &opts, b"secret", 1 << 20)?;
///
/// let volume = AnyVolume::open(engine, &path, b"secret", true)?;
/// volume.write_at(4096, b"hello")?;
/// let mut back = [0u8; 5];
/// volume.read_at(4096, &mut back)?;
/// assert_eq!(&back, b"hello");
/// # Ok::<(), crypt_vfio::Error>(())
/// ```
// One per open image, moved rarely: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnyVolume<E: Engine> {
    /// Sector encryption: a LUKS1, LUKS2 or plain dm-crypt image.
    Sectors(Volume<E>),
    /// An authenticated volume.
    Authenticated(AuthVolume<E>),
}

impl<E: Engine> std::fmt::Debug for AnyVolume<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnyVolume::Sectors(v) => v.fmt(f),
            AnyVolume::Authenticated(v) => f.debug_tuple("AuthVolume").field(v.superblock()).finish(),
        }
    }
}

fn open_file(path: &Path, writable: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| Error::os(format!("opening {}", path.display()), e))
}

impl<E: Engine> AnyVolume<E> {
    /// Opens the image at `path`: a LUKS image with the passphrase `secret`, or an
    /// authenticated volume with the raw key `secret`. `writable` allows writes.
    ///
    /// A file that is neither gives [`LuksError::NotLuks`](crate::error::LuksError::NotLuks); a plain dm-crypt image opens with
    /// [`open_plain`](Self::open_plain).
    pub fn open(engine: Arc<E>, path: impl AsRef<Path>, secret: &[u8], writable: bool) -> Result<Self> {
        let file = open_file(path.as_ref(), writable)?;
        let mut magic = [0u8; 8];
        if file.read_exact_at(&mut magic, 0).is_ok() && magic == authenticated::MAGIC {
            return Ok(AnyVolume::Authenticated(AuthVolume::open(engine, file, writable, secret)?));
        }
        Ok(AnyVolume::Sectors(luks::open(engine, file, writable, secret)?))
    }

    /// Opens a plain dm-crypt image at `path` (no header) with the volume key `key`, as
    /// `cryptsetup open --type plain` does with the same parameters.
    pub fn open_plain(
        engine: Arc<E>,
        path: impl AsRef<Path>,
        key: &[u8],
        params: VolumeParams,
        writable: bool,
    ) -> Result<Self> {
        let file = open_file(path.as_ref(), writable)?;
        Ok(AnyVolume::Sectors(Volume::open(engine, file, writable, key, params)?))
    }

    fn inner(&self) -> &dyn BlockDevice {
        match self {
            AnyVolume::Sectors(v) => v,
            AnyVolume::Authenticated(v) => v,
        }
    }

    /// Bytes of decrypted data.
    pub fn size(&self) -> u64 {
        self.inner().size()
    }

    /// Reads and decrypts `buf.len()` bytes at `offset` (any alignment).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner().read_at(offset, buf)
    }

    /// Encrypts and writes `data` at `offset` (any alignment).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner().write_at(offset, data)
    }

    /// Makes written data durable.
    pub fn flush(&self) -> Result<()> {
        self.inner().flush()
    }
}

impl<E: Engine> BlockDevice for AnyVolume<E> {
    fn size(&self) -> u64 {
        self.inner().size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner().read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner().write_at(offset, data)
    }
    fn flush(&self) -> Result<()> {
        self.inner().flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner().write_zeroes(offset, len)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner().trim(offset, len)
    }
    fn zero_or_punch(&self, offset: u64, len: u64) -> Result<()> {
        self.inner().zero_or_punch(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<super::block::Extent>> {
        self.inner().block_status(offset, len, max_extents)
    }
    fn block_size(&self) -> u32 {
        self.inner().block_size()
    }
    fn read_only(&self) -> bool {
        self.inner().read_only()
    }
    fn working_set(&self, len: u64) -> u64 {
        self.inner().working_set(len)
    }
}
