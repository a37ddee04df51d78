//! Key slot material: the AF-split volume key, encrypted with a key derived from a passphrase.
//!
//! LUKS1 and LUKS2 store it the same way: `stripes * key_len` bytes, AF-split, encrypted as
//! 512-byte sectors numbered from 0 at the start of the area with the slot's cipher spec. The
//! encryption goes through the engine like any other sector data.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::af;
use super::kdf::HashAlg;
use crate::engine::{Direction, Engine};
use crate::error::{Error, Result, VolumeError};
use crate::volume::iv::IvGenerator;
use crate::volume::pipeline::{CryptContext, CryptOp, IvNumbering, Lane};
use crate::volume::{CipherSpec, VolumeKey, DEFAULT_WATCHDOG};

/// Where a slot's material is and how it is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AreaLayout {
    /// Byte offset in the image.
    pub offset: u64,
    /// Cipher of the area.
    pub spec: CipherSpec,
    /// AF stripes.
    pub stripes: usize,
    /// AF hash.
    pub af_hash: HashAlg,
    /// Volume key length (the AF block size).
    pub key_len: usize,
}

impl AreaLayout {
    /// Bytes of material, whole 512-byte sectors.
    pub fn len(&self) -> usize {
        (self.key_len * self.stripes).div_ceil(512) * 512
    }

    /// Whether the area holds nothing (never for a valid slot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Encrypts or decrypts `data` (whole 512-byte sectors numbered from 0) with `spec` and `key`
/// through `engine`.
pub fn crypt_area<E: Engine>(
    engine: &E,
    spec: CipherSpec,
    key: &[u8],
    direction: Direction,
    data: &mut [u8],
) -> Result<()> {
    spec.check_key_len(key.len())?;
    let session = engine.create_session(spec.mode, key)?;
    let ivgen = IvGenerator::new(spec.iv, key);
    let result = (|| {
        let mut lane = Lane::open(engine, 0, 512, DEFAULT_WATCHDOG)?;
        let ctx = CryptContext {
            engine,
            session: &session,
            ivgen: Some(&ivgen),
            numbering: IvNumbering { shift: 0, iv_offset: 0, large_sectors: false },
            sector_size: 512,
        };
        let r = CryptOp::new(ctx, &mut lane, direction, 0, data).run();
        // The buffers held AF material: as good as the key once decrypted.
        lane.wipe_buffers();
        r
    })();
    if let Err(e) = engine.destroy_session(&session) {
        log::debug!("destroying a key slot session: {e}");
    }
    result
}

/// Reads a slot's material and recovers the candidate volume key with the derived `slot_key`.
/// The caller checks the candidate against the header's digest.
pub fn open_area<E: Engine>(
    engine: &E,
    file: &File,
    area: &AreaLayout,
    slot_key: &[u8],
) -> Result<VolumeKey> {
    let mut material = VolumeKey::new(vec![0u8; area.len()]);
    read_exact(file, &mut material, area.offset, "key slot material")?;
    crypt_area(engine, area.spec, slot_key, Direction::Decrypt, &mut material)?;
    af::merge(&material, area.key_len, area.stripes, area.af_hash)
}

/// Makes a slot's encrypted material for `volume_key` (to be written at `area.offset`).
pub fn seal_area<E: Engine>(
    engine: &E,
    area: &AreaLayout,
    slot_key: &[u8],
    volume_key: &[u8],
) -> Result<Vec<u8>> {
    let split = af::split(volume_key, area.stripes, area.af_hash);
    let mut material = vec![0u8; area.len()];
    material[..split.len()].copy_from_slice(&split);
    crypt_area(engine, area.spec, slot_key, Direction::Encrypt, &mut material)?;
    Ok(material)
}

/// `read_exact_at` with a truncation error that says what was cut off.
pub fn read_exact(file: &File, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Volume(VolumeError::Truncated {
                what: what.to_string(),
                needed: offset + buf.len() as u64,
                have: file.metadata().map(|m| m.len()).unwrap_or(0),
            })
        } else {
            Error::os(format!("reading {what}"), e)
        }
    })
}

/// `write_all_at` with context.
pub fn write_all(file: &File, data: &[u8], offset: u64, what: &str) -> Result<()> {
    file.write_all_at(data, offset).map_err(|e| Error::os(format!("writing {what}"), e))
}
