//! Authenticated volumes: AES-GCM per sector, a fresh random 96-bit IV per write, the IV and the
//! 16-byte tag kept in a metadata area.
//!
//! The idea is dm-crypt's `capi:gcm(aes)-random` over dm-integrity (a tampered sector fails to
//! read instead of decrypting to garbage), in a simpler format of crypt-vfio's own, documented in
//! `docs/authenticated-format.md`; it does not claim to be that format. In short:
//!
//! * a 4096-byte superblock at 0 (magic `CVFAUTH1`, geometry, a random volume id, and a key
//!   check that authenticates the superblock under the key);
//! * a metadata area from 4096: 32 bytes per sector, `IV (12) || tag (16) || zero (4)`;
//! * the data area, sector after sector.
//!
//! Each sector is sealed with AAD = volume id || sector number (little-endian), so a sector
//! moved to another place or another volume fails its check. A write puts the data first, then
//! its metadata entry; a torn write (one of the two on disk, not the other) leaves a pair that
//! does not authenticate, so the next read of that sector fails naming it, and writing the
//! sector again repairs it. Two writes to one sector at once would interleave the same way
//! (the data of one with the tag of the other), so a write holds its sectors exclusively and a
//! read holds them shared (see `RangeLocks`). Formatting gives every sector an entry (the
//! trimmed mark with the tag of sealed zeroes, see [`ENTRY_TRIMMED`]), so there is no
//! "never written" state an attacker could restore, and the data area stays sparse.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::range_lock::RangeLocks;
use std::time::Duration;

use crypt_vfio_cores::Mode;

use super::pipeline::{CryptContext, CryptFuture, CryptOp, IvNumbering, LanePool, SectorMeta};
use super::{BlockDevice, DEFAULT_WATCHDOG};
use crate::engine::{Direction, Engine, Iv, Request};
use crate::error::{CryptoError, DeviceError, Error, LuksError, Result, VolumeError};

/// Magic at byte 0.
pub const MAGIC: [u8; 8] = *b"CVFAUTH1";
/// Superblock size, and where the metadata area starts.
pub const SUPERBLOCK_LEN: u64 = 4096;
/// Bytes of metadata per sector.
pub const META_ENTRY_LEN: usize = 32;
/// Bytes 28..32 of a metadata entry of a trimmed sector (little-endian 1): the sector holds
/// zeroes, its ciphertext is not stored (the data area there may be a hole), and the entry's IV
/// and tag are those of sealing zeroes there. Any other non-zero value is damage.
pub const ENTRY_TRIMMED: [u8; 4] = 1u32.to_le_bytes();
/// Sectors whose metadata one block status query reads at most (a bounded answer; the client
/// asks again for the rest). Trimmed ones are checked by sealing zeroes, so this bounds that
/// work too: 8 MiB of 512-byte sectors.
const STATUS_SECTORS: u64 = 1 << 14;
/// Length of the part of the superblock the key check authenticates (everything before it).
const SB_AUTH_LEN: usize = 56;
/// Where the superblock's fields end: the rest of it is zero.
const SB_RESERVED: usize = 100;

/// The superblock: geometry and identity of an authenticated volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Sector size in bytes.
    pub sector_size: u32,
    /// Sectors of data.
    pub sectors: u64,
    /// Start of the metadata area.
    pub meta_offset: u64,
    /// Start of the data area.
    pub data_offset: u64,
    /// Random id, part of every sector's AAD.
    pub volume_id: [u8; 16],
    /// IV of the key check.
    pub check_iv: [u8; 12],
    /// Tag of the key check: GCM of 16 zero bytes with the superblock's first 56 bytes as AAD.
    pub check_tag: [u8; 16],
    /// Ciphertext of the key check.
    pub check_ct: [u8; 16],
}

impl Superblock {
    /// Geometry for `sectors` sectors of `sector_size` bytes.
    pub fn new(sector_size: u32, sectors: u64) -> Self {
        let meta_len = (sectors * META_ENTRY_LEN as u64).next_multiple_of(4096);
        let mut sb = Self {
            sector_size,
            sectors,
            meta_offset: SUPERBLOCK_LEN,
            data_offset: SUPERBLOCK_LEN + meta_len,
            volume_id: [0; 16],
            check_iv: [0; 12],
            check_tag: [0; 16],
            check_ct: [0; 16],
        };
        rand::fill(&mut sb.volume_id);
        rand::fill(&mut sb.check_iv);
        sb
    }

    /// The bytes of the superblock.
    pub fn to_bytes(&self) -> [u8; SUPERBLOCK_LEN as usize] {
        let mut b = [0u8; SUPERBLOCK_LEN as usize];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&self.sector_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.sectors.to_le_bytes());
        b[24..32].copy_from_slice(&self.meta_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.data_offset.to_le_bytes());
        b[40..56].copy_from_slice(&self.volume_id);
        b[56..68].copy_from_slice(&self.check_iv);
        b[68..84].copy_from_slice(&self.check_tag);
        b[84..100].copy_from_slice(&self.check_ct);
        b
    }

    /// Parses and checks a superblock (not the key check, which needs the key).
    pub fn parse(b: &[u8]) -> Result<Self> {
        let corrupt = |field: &str, reason: String| {
            Error::Luks(LuksError::CorruptHeader { field: field.into(), reason })
        };
        if b.len() < 8 || b[..8] != MAGIC {
            return Err(Error::Luks(LuksError::NotLuks(
                "no crypt-vfio authenticated volume magic (CVFAUTH1)".into(),
            )));
        }
        if b.len() < SUPERBLOCK_LEN as usize {
            return Err(Error::Volume(VolumeError::Truncated {
                what: "the authenticated volume superblock".into(),
                needed: SUPERBLOCK_LEN,
                have: b.len() as u64,
            }));
        }
        // The key check authenticates bytes 0..56 only: the rest must be exactly what format
        // writes, so that nothing in the superblock can be changed unnoticed.
        if let Some(at) = b[SB_RESERVED..SUPERBLOCK_LEN as usize].iter().position(|&x| x != 0) {
            return Err(corrupt("reserved", format!("byte {} is not zero", SB_RESERVED + at)));
        }
        let u32at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u64at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        if u32at(8) != 1 {
            return Err(corrupt("version", format!("{} (1 is known)", u32at(8))));
        }
        let sb = Self {
            sector_size: u32at(12),
            sectors: u64at(16),
            meta_offset: u64at(24),
            data_offset: u64at(32),
            volume_id: b[40..56].try_into().expect("16 bytes"),
            check_iv: b[56..68].try_into().expect("12 bytes"),
            check_tag: b[68..84].try_into().expect("16 bytes"),
            check_ct: b[84..100].try_into().expect("16 bytes"),
        };
        if !(512..=4096).contains(&sb.sector_size) || !sb.sector_size.is_power_of_two() {
            return Err(corrupt("sector_size", format!("{}", sb.sector_size)));
        }
        let meta_end =
            sb.sectors.checked_mul(META_ENTRY_LEN as u64).and_then(|m| m.checked_add(sb.meta_offset));
        if sb.meta_offset < SUPERBLOCK_LEN || meta_end.is_none_or(|end| end > sb.data_offset) {
            return Err(corrupt(
                "meta_offset",
                "the metadata area overlaps the superblock or the data".into(),
            ));
        }
        let data_end =
            sb.sectors.checked_mul(u64::from(sb.sector_size)).and_then(|d| d.checked_add(sb.data_offset));
        if sb.sectors == 0 || data_end.is_none_or(|end| end > i64::MAX as u64) {
            return Err(corrupt("sectors", format!("{} sectors do not fit a file", sb.sectors)));
        }
        Ok(sb)
    }

    /// The AAD of the key check: the superblock's fields, so that changing any of them is caught.
    fn check_aad(&self) -> Vec<u8> {
        self.to_bytes()[..SB_AUTH_LEN].to_vec()
    }

    /// Bytes the image needs.
    pub fn image_len(&self) -> u64 {
        self.data_offset + self.sectors * u64::from(self.sector_size)
    }
}

/// Runs one GCM request on `engine` synchronously (the key check: rare, tiny).
fn run_one<E: Engine>(
    engine: &E,
    session: &E::Session,
    mut req: Request<E::Session>,
) -> Result<Request<E::Session>> {
    let done: Arc<Mutex<Option<crate::engine::Completion<E::Session>>>> = Arc::default();
    let sink = done.clone();
    let mut q = engine.open_queue(
        0,
        Arc::new(move |ev| {
            if let crate::engine::Event::Completed(c) = ev {
                *sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
            }
        }),
    )?;
    req.session = session.clone();
    q.submit(req, true).map_err(|e| match e.kind {
        crate::engine::SubmitErrorKind::Busy => {
            Error::Device(DeviceError::Failed("busy on an idle queue".into()))
        }
        crate::engine::SubmitErrorKind::Rejected(e) => e,
    })?;
    let start = std::time::Instant::now();
    loop {
        q.poll();
        if let Some(c) = done.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return c.result.map(|()| c.request);
        }
        if start.elapsed() > DEFAULT_WATCHDOG {
            return Err(Error::Device(DeviceError::Timeout(DEFAULT_WATCHDOG, "the key check")));
        }
        std::thread::yield_now();
    }
}

/// An authenticated volume over a backing file.
pub struct AuthVolume<E: Engine> {
    engine: Arc<E>,
    session: E::Session,
    sb: Superblock,
    file: File,
    writable: bool,
    lanes: LanePool<E::Session>,
    /// Sectors in use: writes alone, reads together, so data and tag always match.
    sectors_in_use: RangeLocks,
    watchdog: Duration,
}

impl<E: Engine> AuthVolume<E> {
    /// Writes a new authenticated volume of `size` bytes of data onto `file` (which is resized
    /// to fit), every sector trimmed (reading as authenticated zeroes, the data area a hole
    /// where the filesystem allows), and opens it. `key` is an AES-128 or AES-256 key.
    pub fn format(engine: Arc<E>, file: File, key: &[u8], sector_size: u32, size: u64) -> Result<Self> {
        if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(Error::Volume(VolumeError::Invalid(format!(
                "sector size {sector_size} (512, 1024, 2048 or 4096)"
            ))));
        }
        if size == 0 || size % u64::from(sector_size) != 0 {
            return Err(Error::Volume(VolumeError::Invalid(format!(
                "size {size} is not a positive multiple of the sector size {sector_size}"
            ))));
        }
        let mut sb = Superblock::new(sector_size, size / u64::from(sector_size));
        let session = engine.create_session(Mode::Gcm, key)?;
        let mut check =
            Request::new(session.clone(), Direction::Encrypt, Iv::from(sb.check_iv), vec![0u8; 16].into(), 0);
        check.aad = sb.check_aad();
        let done = run_one(&*engine, &session, check)?;
        sb.check_tag = done.tag;
        sb.check_ct.copy_from_slice(&done.data.as_slice());
        super::file::ensure_len(&file, sb.image_len())?;
        let v = Self::with(engine, session, sb, file, true);
        // Every sector trimmed: sealed zeroes in the metadata, nothing in the data area.
        v.trim(0, size)?;
        v.file.write_all_at(&sb.to_bytes(), 0).map_err(|e| Error::os("writing the superblock", e))?;
        v.flush()?;
        Ok(v)
    }

    /// Opens an authenticated volume; a wrong key (or a modified superblock) is refused.
    pub fn open(engine: Arc<E>, file: File, writable: bool, key: &[u8]) -> Result<Self> {
        let mut b = vec![0u8; SUPERBLOCK_LEN as usize];
        crate::luks::keyslot::read_exact(&file, &mut b, 0, "the superblock")?;
        let sb = Superblock::parse(&b)?;
        let len = super::file::storage_len(&file)?;
        if len < sb.image_len() {
            return Err(Error::Volume(VolumeError::Truncated {
                what: "the authenticated volume".into(),
                needed: sb.image_len(),
                have: len,
            }));
        }
        let session = engine.create_session(Mode::Gcm, key)?;
        let mut check = Request::new(
            session.clone(),
            Direction::Decrypt,
            Iv::from(sb.check_iv),
            sb.check_ct.to_vec().into(),
            0,
        );
        check.aad = sb.check_aad();
        check.tag = sb.check_tag;
        match run_one(&*engine, &session, check) {
            Ok(_) => {}
            Err(Error::Crypto(CryptoError::AuthFailed)) => {
                let _ = engine.destroy_session(&session);
                return Err(Error::Volume(VolumeError::WrongKey));
            }
            Err(e) => return Err(e),
        }
        Ok(Self::with(engine, session, sb, file, writable))
    }

    fn with(engine: Arc<E>, session: E::Session, sb: Superblock, file: File, writable: bool) -> Self {
        Self {
            engine,
            session,
            sb,
            file,
            writable,
            lanes: LanePool::new(sb.sector_size as usize),
            sectors_in_use: RangeLocks::new(),
            watchdog: DEFAULT_WATCHDOG,
        }
    }

    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Bytes of data.
    pub fn size(&self) -> u64 {
        self.sb.sectors * u64::from(self.sb.sector_size)
    }

    fn context(&self) -> CryptContext<'_, E> {
        CryptContext {
            engine: &*self.engine,
            session: &self.session,
            ivgen: None,
            numbering: IvNumbering { shift: 0, iv_offset: 0, large_sectors: false },
            sector_size: self.sb.sector_size as usize,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Error::Volume(VolumeError::OutOfRange { offset, len, size: self.size() }));
        }
        Ok(())
    }

    fn read_meta_raw(&self, first: u64, count: usize) -> Result<Vec<u8>> {
        let mut raw = vec![0u8; count * META_ENTRY_LEN];
        let at = self.sb.meta_offset + first * META_ENTRY_LEN as u64;
        crate::luks::keyslot::read_exact(&self.file, &mut raw, at, "sector metadata")?;
        Ok(raw)
    }

    /// The IVs and tags of `count` sectors from `first`, and which of them are trimmed.
    fn read_meta(&self, first: u64, count: usize) -> Result<(Vec<SectorMeta>, Vec<bool>)> {
        let raw = self.read_meta_raw(first, count)?;
        // Bytes 28..32 of an entry are outside the tag's reach: they are zero or the trimmed
        // mark, which only says how to check the tag (against sealed zeroes, not stored
        // ciphertext): set on a sector that does not hold zeroes, its check fails. Anything
        // else fails like a bad tag.
        if let Some(i) =
            raw.chunks_exact(META_ENTRY_LEN).position(|e| e[28..] != [0; 4] && e[28..] != ENTRY_TRIMMED)
        {
            return Err(Error::Volume(VolumeError::SectorAuthFailed { sector: first + i as u64 }));
        }
        let meta = raw
            .chunks_exact(META_ENTRY_LEN)
            .map(|e| SectorMeta {
                iv: e[..12].try_into().expect("12 bytes"),
                tag: e[12..28].try_into().expect("16 bytes"),
            })
            .collect();
        let trimmed = raw.chunks_exact(META_ENTRY_LEN).map(|e| e[28..] == ENTRY_TRIMMED).collect();
        Ok((meta, trimmed))
    }

    /// Seals zeroes into `count` sectors from `first` under the IVs in `meta`, filling the tags.
    fn seal_zeroes(&self, first: u64, meta: &mut [SectorMeta]) -> Result<()> {
        let mut zeroes = vec![0u8; meta.len() * self.sb.sector_size as usize];
        let mut guard = self.lanes.take(&*self.engine, self.watchdog)?;
        let r = CryptOp::new(self.context(), guard.lane(), Direction::Encrypt, first, &mut zeroes)
            .with_aead(meta, self.sb.volume_id)
            .run();
        guard.finish();
        r
    }

    /// Checks trimmed sectors: each entry must be the IV and tag of sealed zeroes at its place.
    fn check_trimmed(&self, first: u64, stored: &[SectorMeta]) -> Result<()> {
        match self.trimmed_tags_match(first, stored)?.iter().position(|&ok| !ok) {
            Some(i) => Err(Error::Volume(VolumeError::SectorAuthFailed { sector: first + i as u64 })),
            None => Ok(()),
        }
    }

    /// For each sector from `first` whose entry carries the trimmed mark: whether its tag is
    /// that of sealed zeroes there (the mark itself is not authenticated; this is).
    fn trimmed_tags_match(&self, first: u64, stored: &[SectorMeta]) -> Result<Vec<bool>> {
        let mut fresh: Vec<SectorMeta> = stored.to_vec();
        self.seal_zeroes(first, &mut fresh)?;
        // Constant time: how much of a forged tag matches is nobody's business.
        Ok(stored
            .iter()
            .zip(&fresh)
            .map(|(a, b)| a.tag.iter().zip(&b.tag).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0)
            .collect())
    }

    /// Verifies whole sectors from `first` given their entries: trimmed runs against sealed
    /// zeroes, the others by decrypting the data area. `data` ends as the plaintext.
    fn open_sectors(
        &self,
        first: u64,
        data: &mut [u8],
        meta: &mut [SectorMeta],
        trimmed: &[bool],
    ) -> Result<()> {
        let ss = self.sb.sector_size as usize;
        let mut i = 0;
        while i < trimmed.len() {
            let kind = trimmed[i];
            let j = trimmed[i..].iter().position(|&t| t != kind).map_or(trimmed.len(), |n| i + n);
            let at = first + i as u64;
            let run = &mut data[i * ss..j * ss];
            if kind {
                self.check_trimmed(at, &meta[i..j])?;
                run.fill(0);
            } else {
                crate::luks::keyslot::read_exact(
                    &self.file,
                    run,
                    self.sb.data_offset + at * ss as u64,
                    "sector data",
                )?;
                let mut guard = self.lanes.take(&*self.engine, self.watchdog)?;
                let r = CryptOp::new(self.context(), guard.lane(), Direction::Decrypt, at, run)
                    .with_aead(&mut meta[i..j], self.sb.volume_id)
                    .run();
                guard.finish();
                r?;
            }
            i = j;
        }
        Ok(())
    }

    /// Reads and verifies whole sectors from `first`; on any failure `data` is zeroed, so no
    /// unauthenticated byte is handed out.
    fn read_sectors(&self, first: u64, data: &mut [u8]) -> Result<()> {
        let ss = self.sb.sector_size as usize;
        let count = data.len() / ss;
        let result = (|| {
            let (mut meta, trimmed) = self.read_meta(first, count)?;
            if trimmed.contains(&true) {
                return self.open_sectors(first, data, &mut meta, &trimmed);
            }
            let at = self.sb.data_offset + first * ss as u64;
            crate::luks::keyslot::read_exact(&self.file, data, at, "sector data")?;
            let mut guard = self.lanes.take(&*self.engine, self.watchdog)?;
            let r = CryptOp::new(self.context(), guard.lane(), Direction::Decrypt, first, data)
                .with_aead(&mut meta, self.sb.volume_id)
                .run();
            guard.finish();
            r
        })();
        if result.is_err() {
            data.fill(0);
        }
        result
    }

    /// Seals and writes whole sectors from `first` (data first, then the IVs and tags).
    fn write_sectors(&self, first: u64, data: &mut [u8]) -> Result<()> {
        let ss = self.sb.sector_size as usize;
        let count = data.len() / ss;
        let mut meta = vec![SectorMeta::default(); count];
        for m in &mut meta {
            rand::fill(&mut m.iv);
        }
        let mut guard = self.lanes.take(&*self.engine, self.watchdog)?;
        let r = CryptOp::new(self.context(), guard.lane(), Direction::Encrypt, first, data)
            .with_aead(&mut meta, self.sb.volume_id)
            .run();
        guard.finish();
        r?;
        self.file
            .write_all_at(data, self.sb.data_offset + first * ss as u64)
            .map_err(|e| Error::os("writing sector data", e))?;
        let mut raw = vec![0u8; count * META_ENTRY_LEN];
        for (e, m) in raw.chunks_exact_mut(META_ENTRY_LEN).zip(&meta) {
            e[..12].copy_from_slice(&m.iv);
            e[12..28].copy_from_slice(&m.tag);
        }
        self.file
            .write_all_at(&raw, self.sb.meta_offset + first * META_ENTRY_LEN as u64)
            .map_err(|e| Error::os("writing sector metadata", e))
    }

    /// Reads `buf.len()` verified bytes at `offset`. A sector that fails its check fails the
    /// read with [`VolumeError::SectorAuthFailed`] naming it, and `buf` is zeroed.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let ss = u64::from(self.sb.sector_size);
        let first = offset / ss;
        let end = (offset + buf.len() as u64).div_ceil(ss);
        let mut tmp = vec![0u8; ((end - first) * ss) as usize];
        let r = {
            let _range = self.sectors_in_use.shared(first, end);
            self.read_sectors(first, &mut tmp)
        };
        if let Err(e) = r {
            buf.fill(0);
            return Err(e);
        }
        let skip = (offset - first * ss) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes `data` at `offset` (partial sectors are read, verified, patched and resealed).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::Volume(VolumeError::ReadOnly));
        }
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let ss = u64::from(self.sb.sector_size);
        let first = offset / ss;
        let end = (offset + data.len() as u64).div_ceil(ss);
        let mut tmp = vec![0u8; ((end - first) * ss) as usize];
        let skip = (offset - first * ss) as usize;
        let _range = self.sectors_in_use.exclusive(first, end);
        if skip != 0 {
            self.read_sectors(first, &mut tmp[..ss as usize])?;
        }
        if (skip + data.len()) % ss as usize != 0 && (tmp.len() > ss as usize || skip == 0) {
            let last = tmp.len() - ss as usize;
            self.read_sectors(end - 1, &mut tmp[last..])?;
        }
        tmp[skip..skip + data.len()].copy_from_slice(data);
        self.write_sectors(first, &mut tmp)
    }

    /// [`read_at`](Self::read_at) as a future for whole sectors (the cryptography is awaited).
    pub async fn read_sectors_async(&self, first: u64, data: &mut [u8]) -> Result<()> {
        let ss = self.sb.sector_size as usize;
        if data.len() % ss != 0 {
            return Err(Error::Volume(VolumeError::Invalid(format!(
                "{} bytes is not whole sectors",
                data.len()
            ))));
        }
        self.check_range(first * ss as u64, data.len() as u64)?;
        // Never blocks the thread: other futures on it may hold the range.
        let _range = self.sectors_in_use.shared_async(first, first + (data.len() / ss) as u64).await;
        let (mut meta, trimmed) = self.read_meta(first, data.len() / ss)?;
        if trimmed.contains(&true) {
            // Rare (a trimmed sector): checked on this thread, as a partial-sector write is.
            let r = self.open_sectors(first, data, &mut meta, &trimmed);
            if r.is_err() {
                data.fill(0);
            }
            return r;
        }
        crate::luks::keyslot::read_exact(
            &self.file,
            data,
            self.sb.data_offset + first * ss as u64,
            "sector data",
        )?;
        let mut guard = self.lanes.take(&*self.engine, self.watchdog)?;
        let op = CryptOp::new(self.context(), guard.lane(), Direction::Decrypt, first, data)
            .with_aead(&mut meta, self.sb.volume_id);
        let r = CryptFuture::new(op).await;
        guard.finish();
        if r.is_err() {
            data.fill(0);
        }
        r
    }

    /// Makes written data durable.
    pub fn flush(&self) -> Result<()> {
        if self.writable {
            self.file.sync_data().map_err(|e| Error::os("flushing the image", e))?;
        }
        Ok(())
    }

    /// Writes sealed zeroes over `len` bytes at `offset`.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        super::block::write_zeroes_in_pieces(offset, len, |at, zeroes| self.write_at(at, zeroes))
    }

    /// Trims the whole sectors in `len` bytes at `offset`: each gets the trimmed mark with the
    /// IV and tag of sealed zeroes (so it reads as zeroes, authenticated: erasing or forging an
    /// entry still fails the read), then the whole filesystem blocks of their data are freed.
    /// Partial sectors at the edges are left alone (a trim is a hint).
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::Volume(VolumeError::ReadOnly));
        }
        self.check_range(offset, len)?;
        let ss = u64::from(self.sb.sector_size);
        let (first, end) = (offset.div_ceil(ss), (offset + len) / ss);
        if first >= end {
            return Ok(());
        }
        let _range = self.sectors_in_use.exclusive(first, end);
        let piece = (super::block::ZERO_PIECE / ss).max(1);
        let mut at = first;
        while at < end {
            let n = piece.min(end - at);
            let mut meta = vec![SectorMeta::default(); n as usize];
            for m in &mut meta {
                rand::fill(&mut m.iv);
            }
            self.seal_zeroes(at, &mut meta)?;
            let mut raw = vec![0u8; n as usize * META_ENTRY_LEN];
            for (e, m) in raw.chunks_exact_mut(META_ENTRY_LEN).zip(&meta) {
                e[..12].copy_from_slice(&m.iv);
                e[12..28].copy_from_slice(&m.tag);
                e[28..].copy_from_slice(&ENTRY_TRIMMED);
            }
            self.file
                .write_all_at(&raw, self.sb.meta_offset + at * META_ENTRY_LEN as u64)
                .map_err(|e| Error::os("writing sector metadata", e))?;
            at += n;
        }
        // The marks are durable first: a crash before the punch leaves sectors that read as
        // zeroes over old ciphertext, never a hole under an entry that expects ciphertext.
        // Without the sync the filesystem may commit the punch (journalled metadata) long
        // before it writes the marks back.
        self.file.sync_data().map_err(|e| Error::os("making trimmed sectors' metadata durable", e))?;
        let d = self.sb.data_offset;
        let unit = super::sparse::block_granularity(&self.file).max(ss);
        let (a, b) = super::sparse::inner_aligned(d + first * ss, d + end * ss, unit);
        super::sparse::punch(&self.file, a, b)?;
        Ok(())
    }

    /// What `len` bytes at `offset` hold: trimmed sectors read as zeroes, and are holes where
    /// their data area is one. At most 16384 sectors are looked at per call.
    ///
    /// A sector is reported as zero only once its entry's tag has been checked against sealed
    /// zeroes: the trimmed mark is outside the tag, and clients that copy by block status
    /// (`nbdcopy`, `qemu-img convert`) never read a zero extent, so a forged mark over data
    /// would otherwise erase that data without any error. A sector whose check fails is
    /// reported as data, so that the client's read of it fails.
    pub fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<super::block::Extent>> {
        use super::block::{push_extent, Extent};
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let ss = u64::from(self.sb.sector_size);
        let first = offset / ss;
        let end = (offset + len).div_ceil(ss).min(first + STATUS_SECTORS);
        let _range = self.sectors_in_use.shared(first, end);
        let raw = self.read_meta_raw(first, (end - first) as usize)?;
        let d = self.sb.data_offset;
        let holes = super::sparse::runs(&self.file, d + first * ss, d + end * ss, usize::MAX)?;
        let verified = self.verified_trimmed(first, &raw)?;
        let mut out = Vec::new();
        let mut h = holes.iter().peekable();
        for (i, &zero) in verified.iter().enumerate() {
            let s = first + i as u64;
            let (a, b) = ((s * ss).max(offset), ((s + 1) * ss).min(offset + len));
            let pos = d + s * ss;
            while h.peek().is_some_and(|r| r.end <= pos) {
                h.next();
            }
            let hole = zero && h.peek().is_some_and(|r| r.hole && r.start <= pos && r.end >= pos + ss);
            push_extent(&mut out, Extent { len: b - a, hole, zero });
            if out.len() > max_extents.max(1) {
                out.pop();
                break;
            }
        }
        Ok(out)
    }
}

impl<E: Engine> AuthVolume<E> {
    /// For each entry of `raw` (sectors from `first`): whether it carries the trimmed mark and
    /// its tag is that of sealed zeroes. Runs of marked entries are checked together.
    fn verified_trimmed(&self, first: u64, raw: &[u8]) -> Result<Vec<bool>> {
        let marked: Vec<bool> = raw.chunks_exact(META_ENTRY_LEN).map(|e| e[28..] == ENTRY_TRIMMED).collect();
        let mut out = vec![false; marked.len()];
        let mut i = 0;
        while i < marked.len() {
            if !marked[i] {
                i += 1;
                continue;
            }
            let piece = (super::block::ZERO_PIECE / u64::from(self.sb.sector_size)).max(1) as usize;
            let j = marked[i..].iter().position(|&m| !m).map_or(marked.len(), |n| i + n).min(i + piece);
            let stored: Vec<SectorMeta> = raw[i * META_ENTRY_LEN..j * META_ENTRY_LEN]
                .chunks_exact(META_ENTRY_LEN)
                .map(|e| SectorMeta {
                    iv: e[..12].try_into().expect("12 bytes"),
                    tag: e[12..28].try_into().expect("16 bytes"),
                })
                .collect();
            out[i..j].copy_from_slice(&self.trimmed_tags_match(first + i as u64, &stored)?);
            i = j;
        }
        Ok(out)
    }
}

impl<E: Engine> Drop for AuthVolume<E> {
    fn drop(&mut self) {
        self.lanes.clear();
        if let Err(e) = self.engine.destroy_session(&self.session) {
            log::debug!("destroying the volume's session: {e}");
        }
    }
}

impl<E: Engine> BlockDevice for AuthVolume<E> {
    fn size(&self) -> u64 {
        AuthVolume::size(self)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        AuthVolume::read_at(self, offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        AuthVolume::write_at(self, offset, data)
    }

    fn flush(&self) -> Result<()> {
        AuthVolume::flush(self)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        AuthVolume::write_zeroes(self, offset, len)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        AuthVolume::trim(self, offset, len)
    }

    fn zero_or_punch(&self, offset: u64, len: u64) -> Result<()> {
        // Trimmed sectors read as zeroes whether or not the filesystem punched their data.
        self.check_range(offset, len)?;
        let ss = u64::from(self.sb.sector_size);
        let (a, b) = (offset.div_ceil(ss) * ss, (offset + len) / ss * ss);
        if a >= b {
            return AuthVolume::write_zeroes(self, offset, len);
        }
        AuthVolume::trim(self, a, b - a)?;
        AuthVolume::write_zeroes(self, offset, a - offset)?;
        AuthVolume::write_zeroes(self, b, offset + len - b)
    }

    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<super::block::Extent>> {
        AuthVolume::block_status(self, offset, len, max_extents)
    }

    fn block_size(&self) -> u32 {
        self.sb.sector_size
    }

    fn working_set(&self, len: u64) -> u64 {
        // The caller's buffer, the sector-aligned copy (two sectors more at most), and the
        // IVs and tags of its sectors, as read or written and as decoded.
        let ss = u64::from(self.sb.sector_size);
        let sectors = len / ss + 2;
        len.saturating_mul(2)
            .saturating_add(2 * ss)
            .saturating_add(sectors.saturating_mul(2 * META_ENTRY_LEN as u64))
    }

    fn read_only(&self) -> bool {
        !self.writable
    }
}
