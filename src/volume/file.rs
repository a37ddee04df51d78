//! A [`BlockDevice`] over a plain file or block device node, without encryption.
//!
//! It lets `crypt-vfio serve --raw` export an image as it is, which tests the NBD server on its
//! own, and it is the device the server's tests run against. Positioned reads and writes
//! (`pread`/`pwrite`) need no seek state, so one open file serves every thread at once.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use super::block::{push_extent, BlockDevice, Extent};
use crate::error::{CryptoError, Error, Result, VolumeError};

/// The sector size reported unless another is chosen: what a disk image is addressed in.
pub const DEFAULT_BLOCK_SIZE: u32 = 512;

/// The size of the storage behind `file`: a regular file's length, or a block device's size
/// (whose node reports a length of 0 in its metadata). The file position is left where it was.
pub fn storage_len(file: &File) -> Result<u64> {
    let meta = file.metadata().map_err(|e| Error::os("reading the image size", e))?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut f = file;
    let size = (|| {
        let here = f.stream_position()?;
        let end = f.seek(SeekFrom::End(0))?;
        f.seek(SeekFrom::Start(here))?;
        Ok(end)
    })()
    .map_err(|e| Error::os("finding the size of the block device", e))?;
    Ok(size)
}

/// Makes the storage behind `file` hold `len` bytes: a regular file is resized to `len`; a block
/// device, which cannot be resized, must already be at least that large.
pub fn ensure_len(file: &File, len: u64) -> Result<()> {
    let meta = file.metadata().map_err(|e| Error::os("reading the image size", e))?;
    if !meta.file_type().is_block_device() {
        return file.set_len(len).map_err(|e| Error::os(format!("sizing the image to {len} bytes"), e));
    }
    let have = storage_len(file)?;
    if have < len {
        return Err(Error::Volume(VolumeError::TooSmall(format!(
            "the block device holds {have} bytes; {len} are needed"
        ))));
    }
    Ok(())
}

/// A file exported byte for byte.
#[derive(Debug)]
pub struct FileBlockDevice {
    file: File,
    path: PathBuf,
    size: u64,
    block_size: u32,
    read_only: bool,
}

impl FileBlockDevice {
    /// Opens `path` (a regular file or a block device node) for reading, and for writing
    /// unless `read_only`. The size is fixed at open: the export does not grow with the file.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| Error::os(format!("opening {}", path.display()), e))?;
        let size = storage_len(&file)?;
        Ok(FileBlockDevice { file, path, size, block_size: DEFAULT_BLOCK_SIZE, read_only })
    }

    /// Reports `block_size` as the preferred granularity: a power of two from 512 to 65536
    /// (what NBD can advertise as a block size).
    pub fn with_block_size(mut self, block_size: u32) -> Result<Self> {
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(Error::Crypto(CryptoError::InvalidRequest(format!(
                "block size {block_size} is not a power of two from 512 to 65536"
            ))));
        }
        self.block_size = block_size;
        Ok(self)
    }

    /// The file this device reads and writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::Volume(VolumeError::OutOfRange { offset, len, size: self.size })),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::Volume(VolumeError::ReadOnly));
        }
        Ok(())
    }

    fn io_error(&self, what: &str, offset: u64, len: u64, e: std::io::Error) -> Error {
        Error::os(format!("{what} {len} bytes at {offset} in {}", self.path.display()), e)
    }
}

impl BlockDevice for FileBlockDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_error("reading", offset, buf.len() as u64, e))
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.io_error("writing", offset, data.len() as u64, e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| Error::os(format!("syncing {}", self.path.display()), e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        super::block::write_zeroes_in_pieces(offset, len, |at, zeroes| {
            self.file
                .write_all_at(zeroes, at)
                .map_err(|e| self.io_error("zeroing", at, zeroes.len() as u64, e))
        })
    }

    /// Punches a hole over the whole blocks (of [`BlockDevice::block_size`]) in the range, so
    /// that the space is freed and block status reports it; partial blocks keep their data.
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let (start, end) = super::sparse::inner_aligned(offset, offset + len, u64::from(self.block_size));
        super::sparse::punch(&self.file, start, end)?;
        Ok(())
    }

    fn zero_or_punch(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let (a, b) = super::sparse::inner_aligned(offset, offset + len, u64::from(self.block_size));
        if a >= b || !super::sparse::punch(&self.file, a, b)? {
            return self.write_zeroes(offset, len);
        }
        self.write_zeroes(offset, a - offset)?;
        self.write_zeroes(b, offset + len - b)
    }

    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out = Vec::new();
        for r in super::sparse::runs(&self.file, offset, offset + len, max_extents)? {
            push_extent(&mut out, Extent { len: r.end - r.start, hole: r.hole, zero: r.hole });
        }
        Ok(out)
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>()).unwrap();
        (dir, path)
    }

    #[test]
    fn reads_writes_and_zeroes_in_place() {
        let (_dir, path) = image(8192);
        let dev = FileBlockDevice::open(&path, false).unwrap();
        assert_eq!(dev.size(), 8192);
        let mut buf = [0u8; 4];
        dev.read_at(251, &mut buf).unwrap();
        assert_eq!(buf, [0, 1, 2, 3]);
        dev.write_at(100, b"abcd").unwrap();
        dev.write_zeroes(4096, 4096).unwrap();
        dev.flush().unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[100..104], b"abcd");
        assert!(on_disk[4096..].iter().all(|&b| b == 0));
        assert_eq!(on_disk[4095], (4095 % 251) as u8);
    }

    #[test]
    fn refuses_out_of_range_and_overflow() {
        let (_dir, path) = image(4096);
        let dev = FileBlockDevice::open(&path, false).unwrap();
        let mut buf = [0u8; 2];
        assert!(matches!(dev.read_at(4095, &mut buf), Err(Error::Volume(VolumeError::OutOfRange { .. }))));
        assert!(matches!(dev.write_at(u64::MAX, b"x"), Err(Error::Volume(VolumeError::OutOfRange { .. }))));
        assert!(matches!(dev.write_zeroes(1, 4096), Err(Error::Volume(VolumeError::OutOfRange { .. }))));
        assert!(matches!(dev.trim(4096, 1), Err(Error::Volume(VolumeError::OutOfRange { .. }))));
        dev.read_at(4094, &mut buf).unwrap();
    }

    #[test]
    fn trim_punches_whole_blocks_that_block_status_reports() {
        let (_dir, path) = image(64 << 10);
        let dev = FileBlockDevice::open(&path, false).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        let g = super::super::sparse::block_granularity(&std::fs::File::open(&path).unwrap());
        // One byte short of whole blocks at each end: only the blocks inside are punched.
        dev.trim(g - 1, 4 * g + 2).unwrap();
        let st = dev.block_status(0, 64 << 10, 64).unwrap();
        if st.len() == 1 {
            return; // a filesystem without holes
        }
        assert_eq!(
            st,
            vec![
                Extent { len: g, hole: false, zero: false },
                Extent { len: 4 * g, hole: true, zero: true },
                Extent { len: (64 << 10) - 5 * g, hole: false, zero: false },
            ]
        );
        let mut b = vec![1u8; 4 * g as usize + 2];
        dev.read_at(g - 1, &mut b).unwrap();
        assert_eq!(b[0], ((g - 1) % 251) as u8, "the partial block before keeps its data");
        assert!(b[1..b.len() - 1].iter().all(|&x| x == 0));
        assert_eq!(b[b.len() - 1], ((5 * g) % 251) as u8);
        assert!(matches!(
            dev.block_status(60 << 10, 8 << 10, 4),
            Err(Error::Volume(VolumeError::OutOfRange { .. }))
        ));
    }

    #[test]
    fn read_only_refuses_writes() {
        let (_dir, path) = image(4096);
        let dev = FileBlockDevice::open(&path, true).unwrap();
        assert!(dev.read_only());
        assert!(matches!(dev.write_at(0, b"x"), Err(Error::Volume(VolumeError::ReadOnly))));
        assert!(matches!(dev.write_zeroes(0, 1), Err(Error::Volume(VolumeError::ReadOnly))));
        dev.flush().unwrap();
    }

    #[test]
    fn block_size_must_be_a_power_of_two_nbd_accepts() {
        let (_dir, path) = image(4096);
        assert!(FileBlockDevice::open(&path, false).unwrap().with_block_size(1000).is_err());
        assert!(FileBlockDevice::open(&path, false).unwrap().with_block_size(256).is_err());
        assert_eq!(
            FileBlockDevice::open(&path, false).unwrap().with_block_size(4096).unwrap().block_size(),
            4096
        );
    }
}
