//! The block encryption front end: an encrypted view over a backing file or block device.
//!
//! A [`Volume`] is what dm-crypt calls a mapping: a cipher spec (`aes-xts-plain64`, ...), a
//! volume key, a sector size (512 to 4096 bytes), a data offset into the backing storage and an
//! IV offset. Reads and writes of any size and alignment are split into sector requests and
//! pipelined through an [`Engine`] (the `pipeline` module); unaligned writes read, patch and rewrite
//! the sectors at their edges.
//!
//! [`block::BlockDevice`] is what the NBD server exports; [`file::FileBlockDevice`] exports an
//! image as it is, without encryption.
//!
//! Concurrency: a volume may be used from many threads at once (it is a [`BlockDevice`]). Each
//! concurrent I/O takes a lane (a submission handle of its own on one of the engine's queues,
//! chosen round-robin) from a pool, and returns it after; the pool grows to the number of I/Os
//! that were ever concurrent, and no I/O waits for another's lane. Every write holds its
//! sectors in range locks until it is on the file, so two writes into one sector
//! (two partial ones, or a whole-sector write and a read-modify-write) cannot lose each
//! other's update, while writes to other sectors go on in parallel.

pub mod authenticated;
pub mod block;
pub mod cipher_spec;
pub mod file;
mod image;
mod inline;
pub(crate) mod iv;
pub(crate) mod pipeline;
pub(crate) mod range_lock;
pub(crate) mod sparse;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

pub use authenticated::AuthVolume;
pub use block::BlockDevice;
pub use cipher_spec::{CipherSpec, IvMode};
pub use image::AnyVolume;
use iv::IvGenerator;
use pipeline::{CryptContext, CryptFuture, CryptOp, IvNumbering, LanePool};

use crate::engine::{Direction, Engine};
use crate::error::{Error, Result, VolumeError};

/// A volume key (zeroed when dropped).
pub type VolumeKey = Zeroizing<Vec<u8>>;

/// How long an I/O waits without hearing from the engine before it fails (the watchdog).
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(15);

/// Where the encrypted data is and how its sectors are encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeParams {
    /// The sector cipher.
    pub spec: CipherSpec,
    /// Sector size in bytes: a power of two from 512 to 4096.
    pub sector_size: u32,
    /// Where the encrypted data starts in the backing storage, in bytes.
    pub data_offset: u64,
    /// dm-crypt's `<iv_offset>`: added to the IV sector number, in 512-byte sectors.
    pub iv_offset: u64,
    /// dm-crypt's `iv_large_sectors`: IV numbers count sectors of `sector_size`, not 512 bytes.
    pub iv_large_sectors: bool,
    /// Size of the decrypted view in bytes (a multiple of the sector size); `None`: up to the
    /// end of the backing storage.
    pub size: Option<u64>,
}

impl VolumeParams {
    /// Plain dm-crypt defaults: 512-byte sectors, data at offset 0.
    pub fn plain(spec: CipherSpec) -> Self {
        Self { spec, sector_size: 512, data_offset: 0, iv_offset: 0, iv_large_sectors: false, size: None }
    }

    fn check(&self) -> Result<()> {
        if !(512..=4096).contains(&self.sector_size) || !self.sector_size.is_power_of_two() {
            return Err(Error::Volume(VolumeError::Invalid(format!(
                "sector size {} (it must be 512, 1024, 2048 or 4096)",
                self.sector_size
            ))));
        }
        if self.data_offset % 512 != 0 {
            return Err(Error::Volume(VolumeError::Invalid(format!(
                "data offset {} is not a multiple of 512 bytes",
                self.data_offset
            ))));
        }
        if let Some(size) = self.size {
            if size % u64::from(self.sector_size) != 0 {
                return Err(Error::Volume(VolumeError::Invalid(format!(
                    "size {size} is not a multiple of the sector size {}",
                    self.sector_size
                ))));
            }
        }
        Ok(())
    }
}

/// An encrypted view over a backing file, pipelined through an engine.
pub struct Volume<E: Engine> {
    engine: Arc<E>,
    session: E::Session,
    ivgen: IvGenerator,
    params: VolumeParams,
    numbering: IvNumbering,
    file: File,
    writable: bool,
    size: u64,
    lanes: LanePool<E::Session>,
    /// Sectors in use: a write or trim holds its range alone until its last byte is on the
    /// file; reads hold theirs shared, so that a trim cannot punch the ciphertext a read is
    /// about to decrypt.
    writing: range_lock::RangeLocks,
    watchdog: Duration,
    /// The unit holes are punched in: the filesystem block, at least a sector.
    hole_unit: u64,
    /// Where the image is known to hold data (forgotten at every punch).
    known_data: sparse::KnownData,
    /// Whether trim may punch holes (`serve --allow-discards`; off by default, as dm-crypt's
    /// `allow_discards`): a hole shows which parts of the volume are unused.
    allow_discards: bool,
    /// Whether the backing file is a regular file. Only there does a punched range read back
    /// as a hole (`SEEK_HOLE`); a block device zeroes the bytes, which decrypt to garbage.
    regular_file: bool,
}

impl<E: Engine> std::fmt::Debug for Volume<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("engine", &self.engine.describe())
            .field("params", &self.params)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl<E: Engine> Volume<E> {
    /// Opens the encrypted view of `file` with `key`. `writable` allows writes (the file must
    /// then be open for writing).
    pub fn open(
        engine: Arc<E>,
        file: File,
        writable: bool,
        key: &[u8],
        params: VolumeParams,
    ) -> Result<Self> {
        params.check()?;
        params.spec.check_key_len(key.len())?;
        let len = file::storage_len(&file)?;
        let ss = u64::from(params.sector_size);
        // Offsets and sizes come from headers and command lines: near u64::MAX they must give
        // an error, not an overflow.
        let beyond = |what: &str| {
            Error::Volume(VolumeError::Invalid(format!(
                "{what} (data offset {} bytes) lies beyond the largest file offset",
                params.data_offset
            )))
        };
        let size = match params.size {
            Some(size) => {
                let needed = params
                    .data_offset
                    .checked_add(size)
                    .filter(|&end| end <= i64::MAX as u64)
                    .ok_or_else(|| beyond(&format!("the end of a data area of {size} bytes")))?;
                if len < needed {
                    return Err(Error::Volume(VolumeError::Truncated {
                        what: "the volume's data area".into(),
                        needed,
                        have: len,
                    }));
                }
                size
            }
            None => {
                let needed = params
                    .data_offset
                    .checked_add(ss)
                    .filter(|&end| end <= i64::MAX as u64)
                    .ok_or_else(|| beyond("the first sector"))?;
                if len < needed {
                    return Err(Error::Volume(VolumeError::Truncated {
                        what: "the volume's data area (at least one sector)".into(),
                        needed,
                        have: len,
                    }));
                }
                (len - params.data_offset) / ss * ss
            }
        };
        let session = engine.create_session(params.spec.mode, key)?;
        let numbering = IvNumbering {
            shift: params.sector_size.trailing_zeros() - 9,
            iv_offset: params.iv_offset,
            large_sectors: params.iv_large_sectors,
        };
        Ok(Self {
            ivgen: IvGenerator::new(params.spec.iv, key),
            engine,
            session,
            params,
            numbering,
            writable,
            size,
            lanes: LanePool::new(params.sector_size as usize),
            hole_unit: sparse::block_granularity(&file).max(ss),
            known_data: sparse::KnownData::new(),
            allow_discards: false,
            regular_file: file.metadata().is_ok_and(|m| m.file_type().is_file()),
            file,
            writing: range_lock::RangeLocks::new(),
            watchdog: DEFAULT_WATCHDOG,
        })
    }

    /// Sets how long an I/O waits without any engine event before it fails (the watchdog).
    pub fn set_watchdog(&mut self, watchdog: Duration) {
        self.watchdog = watchdog;
    }

    /// Lets [`trim`](Self::trim) punch holes in the image (off by default). Like dm-crypt's
    /// `allow_discards`, this shows which parts of the volume are unused to anyone who can see
    /// the image, and a trimmed range reads as zeroes only through crypt-vfio: dm-crypt
    /// (`cryptsetup open`) decrypts a hole into garbage, as it does a discarded range on
    /// many devices. A trim's contents are undefined, so both are allowed.
    pub fn set_allow_discards(&mut self, allow: bool) {
        self.allow_discards = allow;
    }

    /// Size of the decrypted view in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Sector size in bytes.
    pub fn sector_size(&self) -> u32 {
        self.params.sector_size
    }

    /// The parameters the volume was opened with.
    pub fn params(&self) -> &VolumeParams {
        &self.params
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<E> {
        &self.engine
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn context(&self) -> CryptContext<'_, E> {
        CryptContext {
            engine: &*self.engine,
            session: &self.session,
            ivgen: Some(&self.ivgen),
            numbering: self.numbering,
            sector_size: self.params.sector_size as usize,
        }
    }

    /// The whole I/O in place on this thread when the engine runs its cipher inline (see
    /// [`inline`]); `None` when the sectors go through the engine's queue.
    fn crypt_inline(&self, direction: Direction, first_sector: u64, data: &mut [u8]) -> Option<Result<()>> {
        let cipher = self.engine.inline_cipher(&self.session)?;
        Some(inline::crypt_in_place(
            cipher,
            &self.ivgen,
            self.numbering,
            self.params.sector_size as usize,
            direction,
            first_sector,
            data,
        ))
    }

    /// Encrypts or decrypts whole sectors in memory, `data` starting at volume sector
    /// `first_sector`, on this thread.
    pub fn crypt_sectors(&self, direction: Direction, first_sector: u64, data: &mut [u8]) -> Result<()> {
        self.check_whole(data.len())?;
        if let Some(r) = self.crypt_inline(direction, first_sector, data) {
            return r;
        }
        let mut guard = self.lanes.take(&*self.engine, self.watchdog)?;
        let r = CryptOp::new(self.context(), guard.lane(), direction, first_sector, data).run();
        guard.finish();
        r
    }

    /// [`crypt_sectors`](Self::crypt_sectors) as a future.
    pub async fn crypt_sectors_async(
        &self,
        direction: Direction,
        first_sector: u64,
        data: &mut [u8],
    ) -> Result<()> {
        self.check_whole(data.len())?;
        if let Some(r) = self.crypt_inline(direction, first_sector, data) {
            return r;
        }
        let mut guard = self.lanes.take(&*self.engine, self.watchdog)?;
        let r =
            CryptFuture::new(CryptOp::new(self.context(), guard.lane(), direction, first_sector, data)).await;
        guard.finish();
        r
    }

    fn check_whole(&self, len: usize) -> Result<()> {
        if len % self.params.sector_size as usize != 0 {
            return Err(Error::Volume(VolumeError::Invalid(format!(
                "{len} bytes is not a whole number of {}-byte sectors",
                self.params.sector_size
            ))));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(Error::Volume(VolumeError::OutOfRange { offset, len: len as u64, size: self.size }));
        }
        Ok(())
    }

    /// The sector-aligned span covering `len` bytes at `offset`: first sector and byte length.
    fn span(&self, offset: u64, len: usize) -> (u64, usize) {
        let ss = u64::from(self.params.sector_size);
        let first = offset / ss;
        let end = (offset + len as u64).div_ceil(ss);
        (first, ((end - first) * ss) as usize)
    }

    fn read_raw(&self, first_sector: u64, buf: &mut [u8]) -> Result<()> {
        let pos = self.params.data_offset + first_sector * u64::from(self.params.sector_size);
        self.file.read_exact_at(buf, pos).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                let have = self.file.metadata().map(|m| m.len()).unwrap_or(0);
                Error::Volume(VolumeError::Truncated {
                    what: format!("sector {first_sector} of the volume"),
                    needed: pos + buf.len() as u64,
                    have,
                })
            } else {
                Error::os(format!("reading {} bytes at {pos} of the backing file", buf.len()), e)
            }
        })
    }

    fn write_raw(&self, first_sector: u64, data: &[u8]) -> Result<()> {
        let pos = self.params.data_offset + first_sector * u64::from(self.params.sector_size);
        self.file
            .write_all_at(data, pos)
            .map_err(|e| Error::os(format!("writing {} bytes at {pos} of the backing file", data.len()), e))
    }

    /// Reads and decrypts `buf.len()` bytes at `offset` of the decrypted view. Sectors that are
    /// holes in the image (never written, or trimmed) read as zeroes.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let (first, span) = self.span(offset, buf.len());
        let _range = self.writing.shared(first, first + (span / self.params.sector_size as usize) as u64);
        self.read_holding_range(offset, buf)
    }

    /// The read itself; the caller holds (at least shared) the sectors it covers.
    fn read_holding_range(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (first, span) = self.span(offset, buf.len());
        if span == buf.len() {
            return self.read_sectors(first, buf);
        }
        let mut tmp = vec![0u8; span];
        self.read_sectors(first, &mut tmp)?;
        let skip = (offset - first * u64::from(self.params.sector_size)) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    /// Reads and decrypts whole sectors from `first`, holes as zeroes.
    fn read_sectors(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        let holes = self.hole_sectors(first, buf.len())?;
        if holes.iter().any(|&(a, b)| a == 0 && b == buf.len()) {
            buf.fill(0);
            return Ok(());
        }
        self.read_raw(first, buf)?;
        self.crypt_sectors(Direction::Decrypt, first, buf)?;
        holes.into_iter().for_each(|(a, b)| buf[a..b].fill(0));
        Ok(())
    }

    /// The byte ranges of a sector-aligned buffer (`len` bytes from sector `first`) whose
    /// sectors lie wholly in holes of the image: they read as zeroes, not as decrypted zeroes.
    fn hole_sectors(&self, first: u64, len: usize) -> Result<Vec<(usize, usize)>> {
        let ss = u64::from(self.params.sector_size);
        let base = self.params.data_offset + first * ss;
        let runs = self.known_data.runs(&self.file, base, base + len as u64)?;
        Ok(runs
            .into_iter()
            .filter(|r| r.hole)
            .filter_map(|r| {
                // Whole sectors only: a sector partly in a hole (an image punched elsewhere,
                // out of step with the sectors) is data.
                let a = (r.start - base).div_ceil(ss) * ss;
                let b = (r.end - base) / ss * ss;
                (a < b).then_some((a as usize, b as usize))
            })
            .collect())
    }

    /// [`read_at`](Self::read_at) as a future (the backing file is read synchronously; the
    /// cryptography is what is awaited).
    pub async fn read_at_async(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let (first, span) = self.span(offset, buf.len());
        let _range =
            self.writing.shared_async(first, first + (span / self.params.sector_size as usize) as u64).await;
        let holes = self.hole_sectors(first, span)?;
        if span == buf.len() {
            self.read_raw(first, buf)?;
            self.crypt_sectors_async(Direction::Decrypt, first, buf).await?;
            holes.into_iter().for_each(|(a, b)| buf[a..b].fill(0));
            return Ok(());
        }
        let mut tmp = vec![0u8; span];
        self.read_raw(first, &mut tmp)?;
        self.crypt_sectors_async(Direction::Decrypt, first, &mut tmp).await?;
        holes.into_iter().for_each(|(a, b)| tmp[a..b].fill(0));
        let skip = (offset - first * u64::from(self.params.sector_size)) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    fn check_write(&self, offset: u64, len: usize) -> Result<()> {
        if !self.writable {
            return Err(Error::Volume(VolumeError::ReadOnly));
        }
        self.check_range(offset, len)
    }

    /// Encrypts and writes `data` at `offset` of the decrypted view.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_write(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let (first, end) = self.lock_span(offset, data.len());
        let _range = self.writing.exclusive(first, end);
        match self.fill_holes_around(offset, data)? {
            Some((at, padded)) => self.write_holding_range(at, &padded),
            None => self.write_holding_range(offset, data),
        }
    }

    /// The sectors a write at `offset` must hold: its own, widened to whole hole units
    /// (see [`fill_holes_around`](Self::fill_holes_around)).
    fn lock_span(&self, offset: u64, len: usize) -> (u64, u64) {
        let ss = u64::from(self.params.sector_size);
        let (d, unit) = (self.params.data_offset, self.hole_unit);
        let (first, span) = self.span(offset, len);
        // Units are aligned in the file, not in the volume.
        let a = d + first * ss;
        let b = a + span as u64;
        let ua = (a / unit * unit).max(d);
        let ub = b.div_ceil(unit).saturating_mul(unit).min(d + self.size);
        ((ua - d) / ss, (ub - d).div_ceil(ss))
    }

    /// A write that lands in a hole makes the filesystem allocate a block around it, and the
    /// other sectors of that block would then read as decrypted zero bytes: garbage where
    /// zeroes were. The filesystem's real block may be smaller than `st_blksize` (NFS reports
    /// its `wsize`, XFS its `allocsize`) and cannot be asked for, so an edge unit that holds any
    /// hole at all is rewritten whole with what it reads as now (holes as zeroes): the padded
    /// write (offset and data), or `None` when no edge unit holds a hole.
    fn fill_holes_around(&self, offset: u64, data: &[u8]) -> Result<Option<(u64, Vec<u8>)>> {
        let ss = u64::from(self.params.sector_size);
        if self.params.data_offset % ss != 0 {
            // Sectors out of step with filesystem blocks: holes are never punched here.
            return Ok(None);
        }
        let unit = self.hole_unit;
        let pos = |v: u64| self.params.data_offset + v;
        let has_hole = |a: u64, b: u64| -> Result<bool> {
            Ok(sparse::runs(&self.file, pos(a), pos(b), usize::MAX)?.iter().any(|r| r.hole))
        };
        let end = offset + data.len() as u64;
        let mut start = offset;
        let mut stop = end;
        // The unit around each edge, in volume bytes, clipped to the volume.
        let unit_of = |v: u64| {
            let a = (pos(v) / unit * unit).max(self.params.data_offset) - self.params.data_offset;
            (a, (a + unit).min(self.size))
        };
        let (ha, hb) = unit_of(offset);
        if ha < offset && has_hole(ha, hb)? {
            start = ha;
        }
        let (ta, tb) = unit_of(end - 1);
        if tb > end && has_hole(ta, tb)? {
            stop = tb;
        }
        if start == offset && stop == end {
            return Ok(None);
        }
        let mut padded = vec![0u8; (stop - start) as usize];
        let at = (offset - start) as usize;
        if start < offset {
            self.read_holding_range(start, &mut padded[..at])?;
        }
        if stop > end {
            self.read_holding_range(end, &mut padded[at + data.len()..])?;
        }
        padded[at..at + data.len()].copy_from_slice(data);
        Ok(Some((start, padded)))
    }

    /// The write itself, read-modify-write of partial sectors included; the caller holds the
    /// range of sectors it covers.
    fn write_holding_range(&self, offset: u64, data: &[u8]) -> Result<()> {
        let (first, span) = self.span(offset, data.len());
        let ss = self.params.sector_size as usize;
        let mut tmp = vec![0u8; span];
        let skip = (offset - first * ss as u64) as usize;
        if skip != 0 {
            self.read_holding_range(first * ss as u64, &mut tmp[..ss])?;
        }
        if (skip + data.len()) % ss != 0 && (span > ss || skip == 0) {
            let last = span - ss;
            self.read_holding_range((first * ss as u64) + last as u64, &mut tmp[last..])?;
        }
        tmp[skip..skip + data.len()].copy_from_slice(data);
        self.crypt_sectors(Direction::Encrypt, first, &mut tmp)?;
        self.write_raw(first, &tmp)
    }

    /// [`write_at`](Self::write_at) as a future. It waits for its sector range without
    /// blocking the thread, so futures polled together on one thread cannot lock each other out.
    pub async fn write_at_async(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_write(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let (first, span) = self.span(offset, data.len());
        let (lock_first, lock_end) = self.lock_span(offset, data.len());
        let _range = self.writing.exclusive_async(lock_first, lock_end).await;
        if let Some((at, padded)) = self.fill_holes_around(offset, data)? {
            return self.write_holding_range(at, &padded);
        }
        if span != data.len() {
            // Read-modify-write reads and writes synchronously under its range lock.
            return self.write_holding_range(offset, data);
        }
        let mut tmp = data.to_vec();
        self.crypt_sectors_async(Direction::Encrypt, first, &mut tmp).await?;
        self.write_raw(first, &tmp)
    }

    /// With [`set_allow_discards`](Self::set_allow_discards), frees the whole hole units
    /// (filesystem blocks) of the image that lie in `len` bytes at `offset`: they then read as
    /// zeroes through this volume, and [`BlockDevice::block_status`] reports them as holes.
    /// Sectors at the edges that do not fill a unit keep their data (a trim is a hint).
    ///
    /// Without it, or when the image is not a regular file (a block device zeroes a punched
    /// range instead of making a hole, and zero bytes decrypt to garbage), the range is checked
    /// and nothing else happens, like dm-crypt without `allow_discards`.
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, 0)?;
        self.check_range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let ss = u64::from(self.params.sector_size);
        if !self.allow_discards || !self.regular_file || self.params.data_offset % ss != 0 || len == 0 {
            return Ok(());
        }
        let d = self.params.data_offset;
        let (a, b) = sparse::inner_aligned(d + offset, d + offset + len, self.hole_unit);
        if a >= b {
            return Ok(());
        }
        let _range = self.writing.exclusive((a - d) / ss, (b - d) / ss);
        // A filesystem that punches but cannot report holes (a FUSE one without lseek) would
        // leave zero bytes that decrypt to garbage and that block status calls data: the trim
        // then writes encrypted zeroes instead, so what it reports and reads agree.
        let punched = sparse::punch(&self.file, a, b);
        self.known_data.forget();
        if punched? && !sparse::is_hole(&self.file, a, b)? {
            block::write_zeroes_in_pieces(a - d, b - a, |at, zeroes| self.write_holding_range(at, zeroes))?;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset` by writing encrypted zeroes, never by punching, even when
    /// the client allows a hole: a hole reads as zeroes only through crypt-vfio, and dm-crypt
    /// would decrypt it into garbage where the client wrote zeroes.
    pub fn zero_or_punch(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    /// What `len` bytes at `offset` hold: holes (whole sectors only) read as zeroes.
    pub fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<block::Extent>> {
        self.check_range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let ss = u64::from(self.params.sector_size);
        let d = self.params.data_offset;
        let mut out = Vec::new();
        for r in sparse::runs(&self.file, d + offset, d + offset + len, max_extents)? {
            let (start, end) = (r.start - d, r.end - d);
            let (a, b) = if r.hole {
                // Round inward to whole sectors, except at the request's own edges (a run
                // starting there may have started before it).
                let a = if start == offset { start } else { start.div_ceil(ss) * ss }.min(end);
                let b = if end == offset + len { end } else { end / ss * ss }.max(a);
                (a, b)
            } else {
                (start, start)
            };
            block::push_extent(&mut out, block::Extent { len: a - start, hole: false, zero: false });
            block::push_extent(&mut out, block::Extent { len: b - a, hole: true, zero: true });
            block::push_extent(&mut out, block::Extent { len: end - b, hole: false, zero: false });
        }
        Ok(out)
    }

    /// Makes written data durable.
    pub fn flush(&self) -> Result<()> {
        if self.writable {
            self.file.sync_data().map_err(|e| Error::os("flushing the backing file", e))?;
        }
        Ok(())
    }

    /// Writes encrypted zeroes over `len` bytes at `offset`.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, 0)?;
        self.check_range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        block::write_zeroes_in_pieces(offset, len, |at, zeroes| self.write_at(at, zeroes))
    }
}

impl<E: Engine> Drop for Volume<E> {
    fn drop(&mut self) {
        // Queues first: a device may refuse to destroy a session with requests in flight.
        self.lanes.clear();
        if let Err(e) = self.engine.destroy_session(&self.session) {
            log::debug!("destroying the volume's session: {e}");
        }
    }
}

impl<E: Engine> BlockDevice for Volume<E> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Volume::read_at(self, offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        Volume::write_at(self, offset, data)
    }

    fn flush(&self) -> Result<()> {
        Volume::flush(self)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Volume::write_zeroes(self, offset, len)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        Volume::trim(self, offset, len)
    }

    fn zero_or_punch(&self, offset: u64, len: u64) -> Result<()> {
        Volume::zero_or_punch(self, offset, len)
    }

    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<block::Extent>> {
        Volume::block_status(self, offset, len, max_extents)
    }

    fn block_size(&self) -> u32 {
        self.params.sector_size
    }

    fn working_set(&self, len: u64) -> u64 {
        // The caller's buffer and a copy of the sector-aligned span (encrypted in place; at
        // most two sectors more than `len`).
        len.saturating_mul(2).saturating_add(2 * u64::from(self.params.sector_size))
    }

    fn read_only(&self) -> bool {
        !self.writable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::software::SoftwareEngine;

    #[test]
    fn a_write_into_a_hole_smaller_than_the_unit_keeps_its_neighbours_zero() {
        // Holes of 4 KiB where st_blksize says 64 KiB (NFS wsize, XFS allocsize): the unit
        // around the write is not one hole, but its 4 KiB hole still must not turn to garbage.
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let disk = file.try_clone().unwrap();
        let engine = Arc::new(SoftwareEngine::new(crate::CoreKind::Fast));
        let key: Vec<u8> = (0..64u8).collect();
        let p = VolumeParams::plain("aes-xts-plain64".parse().unwrap());
        let mut v = Volume::open(engine, file, true, &key, p).unwrap();
        v.write_at(0, &vec![0u8; 1 << 20]).unwrap();
        disk.sync_all().unwrap();
        let (a, b) = (64 * 1024 + 4096, 64 * 1024 + 8192);
        if !sparse::punch(&disk, a, b).unwrap() || !sparse::is_hole(&disk, a, b).unwrap() {
            return; // a filesystem without holes: nothing to check
        }
        v.hole_unit = 64 * 1024;
        v.write_at(a, &[0xaa; 512]).unwrap();
        let mut back = vec![1u8; 4096 - 512];
        v.read_at(a + 512, &mut back).unwrap();
        assert!(back.iter().all(|&x| x == 0), "sectors next to a write into a small hole became garbage");
        let mut sector = [0u8; 512];
        v.read_at(a, &mut sector).unwrap();
        assert_eq!(sector, [0xaa; 512]);
    }
}
