//! LUKS1 and LUKS2 headers: reading, unlocking, creating, adding and removing passphrases.
//!
//! A LUKS image is a header, key slots (the volume key, AF-split and encrypted under a key
//! derived from a passphrase) and the data, encrypted like a plain dm-crypt volume. Unlocking
//! gives the volume key and the [`VolumeParams`] to open a [`Volume`] with; everything here is
//! byte-compatible with cryptsetup and qemu-img, which the interop tests check.
//!
//! Changes are checked completely before anything is written, so a wrong passphrase, a corrupt
//! header or a full set of key slots leaves the image as it was.

pub(crate) mod af;
pub mod kdf;
pub(crate) mod keyslot;
pub mod lock;
pub mod luks1;
pub mod luks2;
pub mod raw_dump;

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kdf::{Argon2Kind, HashAlg, Kdf};

use crate::engine::Engine;
use crate::error::{Error, LuksError, Result, VolumeError};
use crate::volume::{CipherSpec, Volume, VolumeKey, VolumeParams};

/// Lower-case hex, for dumps.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The password-based KDF of new key slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PbkdfType {
    /// PBKDF2-HMAC (LUKS1 always; LUKS2 on request).
    Pbkdf2,
    /// Argon2i (LUKS2).
    Argon2i,
    /// Argon2id (LUKS2's default).
    Argon2id,
}

/// How new key slots derive their keys (cryptsetup's `--pbkdf*` and `--iter-time` options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LuksKdfOptions {
    /// The KDF (LUKS1 takes only PBKDF2).
    pub pbkdf: PbkdfType,
    /// Fixed PBKDF2 iterations or Argon2 time cost instead of a benchmark.
    pub force_iterations: Option<u32>,
    /// Time budget for the benchmark of PBKDF2.
    pub iter_time: Duration,
    /// Argon2 memory in KiB.
    pub memory_kib: u32,
    /// Argon2 lanes.
    pub parallel: u32,
}

impl Default for LuksKdfOptions {
    fn default() -> Self {
        Self {
            pbkdf: PbkdfType::Argon2id,
            force_iterations: None,
            iter_time: Duration::from_millis(2000),
            memory_kib: 1 << 20,
            parallel: 4,
        }
    }
}

impl LuksKdfOptions {
    /// PBKDF2 with a fixed iteration count (for tests and scripts).
    pub fn pbkdf2_iterations(iterations: u32) -> Self {
        Self { pbkdf: PbkdfType::Pbkdf2, force_iterations: Some(iterations), ..Self::default() }
    }

    /// PBKDF2 iterations for a key slot whose derived key has `key_len` bytes.
    pub fn pbkdf2_iterations_for(&self, hash: HashAlg, key_len: usize) -> u32 {
        self.force_iterations.unwrap_or_else(|| hash.pbkdf2_iterations_for(self.iter_time, 1000, key_len))
    }

    /// PBKDF2 iterations for the volume key digest: cryptsetup spends 1/16 of the slot's budget
    /// there, with at least 1000 iterations.
    pub fn digest_iterations(&self, hash: HashAlg) -> u32 {
        match self.force_iterations {
            Some(n) => n.max(1000),
            None => hash.pbkdf2_iterations_for(self.iter_time / 16, 1000, hash.digest_len()),
        }
    }

    /// The KDF of a new LUKS2 key slot deriving a `key_len`-byte key.
    pub fn luks2_kdf(&self, hash: HashAlg, key_len: usize) -> Kdf {
        let argon = |kind| {
            let memory_kib = self.memory_kib;
            let parallel = self.parallel.max(1);
            let time = match self.force_iterations {
                Some(t) => t.max(1),
                None => self.argon2_time_for(kind, memory_kib, parallel),
            };
            Kdf::Argon2 { kind, time, memory_kib, parallel }
        };
        match self.pbkdf {
            PbkdfType::Pbkdf2 => Kdf::Pbkdf2 { hash, iterations: self.pbkdf2_iterations_for(hash, key_len) },
            PbkdfType::Argon2i => argon(Argon2Kind::Argon2i),
            PbkdfType::Argon2id => argon(Argon2Kind::Argon2id),
        }
    }

    /// The Argon2 time cost that fills `iter_time` at this memory and parallelism, at least 4
    /// (cryptsetup's minimum). One pass is timed as the difference between three passes and
    /// one, so that allocating and first touching the memory is not counted as work.
    fn argon2_time_for(&self, kind: Argon2Kind, memory_kib: u32, parallel: u32) -> u32 {
        const MIN: u32 = 4;
        let timed = |time| {
            let probe = Kdf::Argon2 { kind, time, memory_kib, parallel };
            let start = std::time::Instant::now();
            probe.derive(b"benchmark passphrase", &[0x5a; 32], 32).map(|_| start.elapsed().as_secs_f64())
        };
        let (Ok(one), Ok(three)) = (timed(1), timed(3)) else { return MIN };
        let pass = ((three - one) / 2.0).max(1e-6);
        ((self.iter_time.as_secs_f64() / pass) as u32).clamp(MIN, 1000)
    }
}

impl luks1::Header {
    fn kdf_check(kdf: &LuksKdfOptions) -> Result<()> {
        if kdf.pbkdf != PbkdfType::Pbkdf2 {
            return Err(Error::Luks(LuksError::Keyslot(
                "LUKS1 key slots use PBKDF2 only (use --pbkdf pbkdf2)".into(),
            )));
        }
        Ok(())
    }
}

/// The LUKS version of a new image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LuksVersion {
    /// LUKS1: what qemu-img and nbdkit read.
    Luks1,
    /// LUKS2: cryptsetup's default.
    Luks2,
}

/// What a new LUKS image looks like.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// LUKS1 or LUKS2.
    pub version: LuksVersion,
    /// Sector cipher.
    pub spec: CipherSpec,
    /// Volume key length in bytes.
    pub key_bytes: usize,
    /// Sector size (LUKS2; LUKS1 is always 512).
    pub sector_size: u32,
    /// Hash of PBKDF2, the digest and AF.
    pub hash: HashAlg,
    /// Key slot KDF.
    pub kdf: LuksKdfOptions,
}

impl FormatOptions {
    /// cryptsetup's defaults for `version`: aes-xts-plain64, 512-bit key, sha256, 512-byte
    /// sectors; PBKDF2 for LUKS1, Argon2id for LUKS2.
    pub fn new(version: LuksVersion) -> Self {
        let kdf = match version {
            LuksVersion::Luks1 => LuksKdfOptions { pbkdf: PbkdfType::Pbkdf2, ..LuksKdfOptions::default() },
            LuksVersion::Luks2 => LuksKdfOptions::default(),
        };
        Self {
            version,
            spec: CipherSpec::XTS_PLAIN64,
            key_bytes: 64,
            sector_size: 512,
            hash: HashAlg::Sha256,
            kdf,
        }
    }

    fn check(&self) -> Result<()> {
        self.spec.check_key_len(self.key_bytes)?;
        match self.version {
            LuksVersion::Luks1 => {
                luks1::Header::kdf_check(&self.kdf)?;
                if self.sector_size != 512 {
                    return Err(Error::Volume(VolumeError::Invalid(format!(
                        "LUKS1 has 512-byte sectors only, not {} (use LUKS2)",
                        self.sector_size
                    ))));
                }
            }
            LuksVersion::Luks2 => {
                if !(512..=4096).contains(&self.sector_size) || !self.sector_size.is_power_of_two() {
                    return Err(Error::Volume(VolumeError::Invalid(format!(
                        "sector size {} (it must be 512, 1024, 2048 or 4096)",
                        self.sector_size
                    ))));
                }
            }
        }
        Ok(())
    }

    /// Bytes before the data: header and key slot areas.
    pub fn data_offset(&self) -> u64 {
        match self.version {
            LuksVersion::Luks1 => {
                let area = ((self.key_bytes as u64 * 4000).div_ceil(512)).next_multiple_of(8);
                (8 + luks1::SLOTS as u64 * area).next_multiple_of(2048) * 512
            }
            LuksVersion::Luks2 => luks2::DEFAULT_DATA_OFFSET,
        }
    }
}

/// A parsed LUKS header of either version.
#[derive(Clone, Debug)]
pub enum Header {
    /// LUKS1.
    V1(Box<luks1::Header>),
    /// LUKS2.
    V2(Box<luks2::Header>),
}

impl Header {
    /// Reads and checks the header at the start of `file`.
    pub fn read(file: &File) -> Result<Self> {
        let len = crate::volume::file::storage_len(file)?;
        if len < luks1::HEADER_LEN as u64 {
            return Err(Error::Volume(VolumeError::Truncated {
                what: "a LUKS header".into(),
                needed: luks1::HEADER_LEN as u64,
                have: len,
            }));
        }
        let mut b = vec![0u8; luks1::HEADER_LEN];
        keyslot::read_exact(file, &mut b, 0, "the LUKS header")?;
        if b[..6] != luks1::MAGIC {
            // LUKS2 keeps a secondary copy at one of the standard offsets: with the primary's
            // magic damaged, cryptsetup opens the image from it, and so do we.
            return match luks2::Header::read(file) {
                Ok(h) => {
                    log::warn!("no LUKS magic at byte 0; using the LUKS2 secondary header");
                    Ok(Header::V2(Box::new(h)))
                }
                Err(Error::Luks(LuksError::NotLuks(_))) => Err(Error::Luks(LuksError::NotLuks(
                    "no LUKS magic at byte 0, and no LUKS2 secondary header".into(),
                ))),
                // A secondary copy is there but damaged too: say what is wrong with it, never
                // "not LUKS" (which would send the user to --plain and garbage).
                Err(e) => Err(e),
            };
        }
        // A known magic with an unknown version is refused, as cryptsetup does ("Unsupported
        // LUKS version").
        match u16::from_be_bytes([b[6], b[7]]) {
            1 => Ok(Header::V1(Box::new(luks1::Header::parse(&b)?))),
            2 => Ok(Header::V2(Box::new(luks2::Header::read(file)?))),
            v => Err(Error::Luks(LuksError::CorruptHeader {
                field: "version".into(),
                reason: format!("{v} (1 and 2 are known)"),
            })),
        }
    }

    /// Whether `file` starts with the LUKS magic.
    pub fn is_luks(file: &File) -> bool {
        let mut b = [0u8; 6];
        keyslot::read_exact(file, &mut b, 0, "magic").is_ok() && b == luks1::MAGIC
    }

    /// Finds the key slot `passphrase` opens: its number and the volume key.
    pub fn unlock<E: Engine>(
        &self,
        engine: &E,
        file: &File,
        passphrase: &[u8],
    ) -> Result<(usize, VolumeKey)> {
        match self {
            Header::V1(h) => h.unlock(engine, file, passphrase),
            Header::V2(h) => h.unlock(engine, file, passphrase),
        }
    }

    /// Where the data is and how it is encrypted.
    pub fn volume_params(&self) -> VolumeParams {
        match self {
            Header::V1(h) => h.volume_params(),
            Header::V2(h) => h.volume_params(),
        }
    }

    /// Adds `new_passphrase` in a free key slot, unlocking with `passphrase`. Returns the slot.
    ///
    /// The update holds the image's [`lock::HeaderLock`] and starts from the header as it is
    /// on disk under that lock (`self` is replaced by it), so two updates at once never undo
    /// each other.
    pub fn add_passphrase<E: Engine>(
        &mut self,
        engine: &E,
        file: &File,
        passphrase: &[u8],
        new_passphrase: &[u8],
        kdf: &LuksKdfOptions,
    ) -> Result<usize> {
        let _lock = lock::HeaderLock::exclusive(file)?;
        *self = Header::read(file)?;
        let (_, key) = self.unlock(engine, file, passphrase)?;
        match self {
            Header::V1(h) => {
                luks1::Header::kdf_check(kdf)?;
                let mut updated = h.clone();
                let (slot, material) = updated.add_keyslot(engine, &key, new_passphrase, kdf)?;
                // Material first, into a free area: until the header names it, it is unused.
                let offset = u64::from(updated.keyslots[slot].key_material_offset) * 512;
                keyslot::write_all(file, &material, offset, "key slot material")?;
                updated.write(file)?;
                *h = updated;
                Ok(slot)
            }
            Header::V2(h) => {
                let mut updated = h.clone();
                let (slot, material) = updated.add_keyslot(engine, &key, new_passphrase, kdf)?;
                let offset = updated.keyslots[&(slot as u32)].area.offset;
                keyslot::write_all(file, &material, offset, "key slot material")?;
                updated.write(file)?;
                *h = updated;
                Ok(slot)
            }
        }
    }

    /// Removes the key slot `passphrase` opens (refusing the last one). Returns the slot.
    ///
    /// Like [`Header::add_passphrase`], under the image's lock and from the header on disk, so
    /// the "last slot" check holds against another update at the same time.
    pub fn remove_passphrase<E: Engine>(
        &mut self,
        engine: &E,
        file: &File,
        passphrase: &[u8],
    ) -> Result<usize> {
        let _lock = lock::HeaderLock::exclusive(file)?;
        *self = Header::read(file)?;
        let (slot, _) = self.unlock(engine, file, passphrase)?;
        match self {
            Header::V1(h) => {
                let mut updated = h.clone();
                let (offset, len) = updated.remove_keyslot(slot)?;
                // Header first: a slot the header no longer names is never read again; then
                // destroy its material, as cryptsetup does.
                updated.write(file)?;
                *h = updated;
                wipe(file, offset, len)?;
                Ok(slot)
            }
            Header::V2(h) => {
                let mut updated = h.clone();
                let (offset, len) = updated.remove_keyslot(slot)?;
                updated.write(file)?;
                *h = updated;
                wipe(file, offset, len)?;
                Ok(slot)
            }
        }
    }
}

impl std::fmt::Display for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Header::V1(h) => h.fmt(f),
            Header::V2(h) => h.fmt(f),
        }
    }
}

fn wipe(file: &File, offset: u64, len: usize) -> Result<()> {
    let mut noise = vec![0u8; len];
    rand::fill(&mut noise[..]);
    keyslot::write_all(file, &noise, offset, "the removed key slot's material")?;
    file.sync_data().map_err(|e| Error::os("flushing the image", e))
}

/// Writes a new LUKS header with `passphrase` in key slot 0 onto `file`, whose data area must
/// follow (the file must hold the header and at least one sector). `volume_key` is generated
/// when not given. Returns the volume key and where the data is.
pub fn format<E: Engine>(
    engine: &E,
    file: &File,
    opts: &FormatOptions,
    passphrase: &[u8],
    volume_key: Option<&[u8]>,
) -> Result<(VolumeKey, VolumeParams)> {
    opts.check()?;
    let _lock = lock::HeaderLock::exclusive(file)?;
    let len = crate::volume::file::storage_len(file)?;
    let needed = opts.data_offset() + u64::from(opts.sector_size);
    if len < needed {
        return Err(Error::Volume(VolumeError::TooSmall(format!(
            "it has {len} bytes; this LUKS header and its key slots take {} bytes, and at least one \
             {}-byte sector of data must follow ({needed} bytes in all)",
            opts.data_offset(),
            opts.sector_size
        ))));
    }
    let key = match volume_key {
        Some(k) => {
            opts.spec.check_key_len(k.len())?;
            VolumeKey::new(k.to_vec())
        }
        None => {
            let mut k = VolumeKey::new(vec![0u8; opts.key_bytes]);
            loop {
                rand::fill(&mut k[..]);
                // An XTS key with equal halves is refused by engines; vanishingly rare, but cheap.
                if k[..k.len() / 2] != k[k.len() / 2..] {
                    break;
                }
            }
            k
        }
    };
    match opts.version {
        LuksVersion::Luks1 => {
            let mut h = luks1::Header::new(opts.spec, &key, opts.hash, &opts.kdf)?;
            let (slot, material) = h.add_keyslot(engine, &key, passphrase, &opts.kdf)?;
            let offset = u64::from(h.keyslots[slot].key_material_offset) * 512;
            // Key slot areas zeroed, as cryptsetup leaves unused ones.
            let zeroes = vec![0u8; (u64::from(h.payload_offset) * 512 - 4096) as usize];
            keyslot::write_all(file, &zeroes, 4096, "the key slot areas")?;
            keyslot::write_all(file, &material, offset, "key slot material")?;
            keyslot::write_all(file, &[0u8; 4096], 0, "the LUKS1 header")?;
            h.write(file)?;
            let params = h.volume_params();
            Ok((key, params))
        }
        LuksVersion::Luks2 => {
            let mut h = luks2::Header::new(opts.spec, &key, opts.sector_size, opts.hash, &opts.kdf)?;
            let (slot, material) = h.add_keyslot(engine, &key, passphrase, &opts.kdf)?;
            keyslot::write_all(file, &vec![0u8; 2 * h.hdr_size as usize], 0, "the LUKS2 header areas")?;
            keyslot::write_all(file, &material, h.keyslots[&(slot as u32)].area.offset, "key slot material")?;
            h.write(file)?;
            Ok((key, h.volume_params()))
        }
    }
}

/// Creates a new LUKS image file at `path` with room for `data_len` bytes of data (a positive
/// multiple of the sector size) and `passphrase` in key slot 0; returns where its data is.
///
/// An existing file is never overwritten ([`Error::Os`] with `AlreadyExists`); the new file is
/// readable by its owner only, and removed again if formatting fails.
pub fn create<E: Engine>(
    engine: &E,
    path: impl AsRef<Path>,
    opts: &FormatOptions,
    passphrase: &[u8],
    data_len: u64,
) -> Result<VolumeParams> {
    let path = path.as_ref();
    opts.check()?;
    if data_len == 0 || data_len % u64::from(opts.sector_size) != 0 {
        return Err(Error::Volume(VolumeError::Invalid(format!(
            "data length {data_len} is not a positive multiple of the sector size {}",
            opts.sector_size
        ))));
    }
    let total = opts.data_offset().checked_add(data_len).ok_or_else(|| {
        Error::Volume(VolumeError::Invalid(format!(
            "data length {data_len} does not fit after the LUKS header"
        )))
    })?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::os(format!("creating {}", path.display()), e))?;
    let made = crate::volume::file::ensure_len(&file, total)
        .and_then(|()| format(engine, &file, opts, passphrase, None))
        .and_then(|(_key, params)| {
            file.sync_all().map_err(|e| Error::os(format!("flushing {}", path.display()), e))?;
            Ok(params)
        });
    if made.is_err() {
        drop(file);
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Opens the decrypted view of a LUKS image with `passphrase`.
pub fn open<E: Engine>(engine: Arc<E>, file: File, writable: bool, passphrase: &[u8]) -> Result<Volume<E>> {
    let header = Header::read(&file)?;
    let (slot, key) = header.unlock(&*engine, &file, passphrase)?;
    log::info!("key slot {slot} opened");
    Volume::open(engine, file, writable, &key, header.volume_params())
}
