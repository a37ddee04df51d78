//! LUKS1: the 592-byte big-endian header, eight PBKDF2 key slots, and the 20-byte digest.
//!
//! Layout from the LUKS1 On-Disk Format Specification 1.2.3. qemu-img, cryptsetup and nbdkit all
//! read and write this format, which makes it the interchange format for disk images.

use std::fmt;
use std::fs::File;

use super::kdf::{HashAlg, Kdf};
use super::keyslot::{self, AreaLayout};
use super::{hex, LuksKdfOptions};
use crate::engine::Engine;
use crate::error::{Error, LuksError, Result, VolumeError};
use crate::volume::{CipherSpec, VolumeKey, VolumeParams};

/// The magic at byte 0.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes in the header.
pub const HEADER_LEN: usize = 592;
/// Key slots in a header.
pub const SLOTS: usize = 8;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
const STRIPES: u32 = 4000;

/// One key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyslot {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors.
    pub key_material_offset: u32,
    /// AF stripes.
    pub stripes: u32,
}

/// A parsed LUKS1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The sector cipher (from `cipher_name` and `cipher_mode`).
    pub spec: CipherSpec,
    /// `hash_spec`: the hash of PBKDF2, the digest and AF.
    pub hash: HashAlg,
    /// Start of the encrypted data, in 512-byte sectors.
    pub payload_offset: u32,
    /// Volume key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 of the volume key, to recognise it.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that PBKDF2.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Iterations of that PBKDF2.
    pub mk_digest_iterations: u32,
    /// The UUID field, byte for byte (up to its NUL): cryptsetup copies it as bytes, so a
    /// header rewritten by add-key or remove-key keeps even a UUID that is not text.
    pub uuid: Vec<u8>,
    /// The key slots.
    pub keyslots: [Keyslot; SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn text(b: &[u8], field: &str) -> Result<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end])
        .map(str::to_string)
        .map_err(|_| Error::Luks(LuksError::CorruptHeader { field: field.into(), reason: "not text".into() }))
}

fn put_text(b: &mut [u8], s: &str) {
    b[..s.len()].copy_from_slice(s.as_bytes());
}

/// The bytes of a NUL-terminated field, without the NUL and what follows.
fn cbytes(b: &[u8]) -> Vec<u8> {
    b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())].to_vec()
}

fn corrupt(field: &str, reason: impl Into<String>) -> Error {
    Error::Luks(LuksError::CorruptHeader { field: field.into(), reason: reason.into() })
}

impl Header {
    /// Parses and checks the first [`HEADER_LEN`] bytes of an image.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < HEADER_LEN {
            return Err(Error::Volume(VolumeError::Truncated {
                what: "the LUKS1 header".into(),
                needed: HEADER_LEN as u64,
                have: b.len() as u64,
            }));
        }
        if b[..6] != MAGIC {
            return Err(Error::Luks(LuksError::NotLuks("no LUKS magic at byte 0".into())));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(corrupt("version", format!("{version}, expected 1")));
        }
        let cipher_name = text(&b[8..40], "cipher_name")?;
        let cipher_mode = text(&b[40..72], "cipher_mode")?;
        let spec = CipherSpec::from_luks1(&cipher_name, &cipher_mode)?;
        let hash = HashAlg::parse(&text(&b[72..104], "hash_spec")?, "hash_spec")?;
        let payload_offset = be32(b, 104);
        let key_bytes = be32(b, 108);
        spec.check_key_len(key_bytes as usize)
            .map_err(|_| corrupt("key_bytes", format!("{key_bytes} bytes does not suit {spec}")))?;
        let mk_digest_iterations = be32(b, 164);
        if mk_digest_iterations == 0 {
            return Err(corrupt("mk_digest_iter", "zero"));
        }
        let uuid = cbytes(&b[168..208]);
        let mut keyslots = std::array::from_fn(|_| Keyslot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_material_offset: 0,
            stripes: 0,
        });
        for (i, slot) in keyslots.iter_mut().enumerate() {
            let at = 208 + i * 48;
            let state = be32(b, at);
            let field = |f: &str| format!("key slot {i} {f}");
            slot.active = match state {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                other => {
                    return Err(corrupt(
                        &field("active"),
                        format!("{other:#x} is neither enabled nor disabled"),
                    ))
                }
            };
            slot.iterations = be32(b, at + 4);
            slot.salt.copy_from_slice(&b[at + 8..at + 40]);
            slot.key_material_offset = be32(b, at + 40);
            slot.stripes = be32(b, at + 44);
            if slot.active {
                if slot.iterations == 0 {
                    return Err(corrupt(&field("iterations"), "zero"));
                }
                // cryptsetup refuses any other count ("LUKS keyslot is invalid"); it also bounds
                // the material this slot makes us read.
                if slot.stripes != STRIPES {
                    return Err(corrupt(
                        &field("stripes"),
                        format!("{} (LUKS1 uses {STRIPES})", slot.stripes),
                    ));
                }
                if u64::from(slot.key_material_offset) * 512 < HEADER_LEN as u64 {
                    return Err(corrupt(&field("key_material_offset"), "overlaps the header"));
                }
                let end = u64::from(slot.key_material_offset)
                    + (key_bytes as u64 * u64::from(slot.stripes)).div_ceil(512);
                if payload_offset != 0 && end > u64::from(payload_offset) {
                    return Err(corrupt(&field("key_material_offset"), "key material overlaps the payload"));
                }
            }
        }
        if payload_offset == 0 {
            return Err(corrupt("payload_offset", "zero (a detached header is not supported)"));
        }
        let mut h = Self {
            spec,
            hash,
            payload_offset,
            key_bytes,
            mk_digest: [0; DIGEST_LEN],
            mk_digest_salt: [0; SALT_LEN],
            mk_digest_iterations,
            uuid,
            keyslots,
        };
        h.mk_digest.copy_from_slice(&b[112..132]);
        h.mk_digest_salt.copy_from_slice(&b[132..164]);
        Ok(h)
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b[8..40], self.spec.luks1_cipher_name());
        put_text(&mut b[40..72], &self.spec.luks1_cipher_mode());
        put_text(&mut b[72..104], self.hash.name());
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iterations.to_be_bytes());
        let uuid = &self.uuid[..self.uuid.len().min(40)];
        b[168..168 + uuid.len()].copy_from_slice(uuid);
        for (i, s) in self.keyslots.iter().enumerate() {
            let at = 208 + i * 48;
            b[at..at + 4].copy_from_slice(&if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE }.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&s.salt);
            b[at + 40..at + 44].copy_from_slice(&s.key_material_offset.to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Where the volume's data is and how it is encrypted.
    pub fn volume_params(&self) -> VolumeParams {
        VolumeParams {
            spec: self.spec,
            sector_size: 512,
            data_offset: u64::from(self.payload_offset) * 512,
            iv_offset: 0,
            iv_large_sectors: false,
            size: None,
        }
    }

    fn area(&self, slot: usize) -> AreaLayout {
        let s = &self.keyslots[slot];
        AreaLayout {
            offset: u64::from(s.key_material_offset) * 512,
            spec: self.spec,
            stripes: s.stripes as usize,
            af_hash: self.hash,
            key_len: self.key_bytes as usize,
        }
    }

    fn digest_of(&self, key: &[u8]) -> [u8; DIGEST_LEN] {
        let mut d = [0u8; DIGEST_LEN];
        self.hash.pbkdf2(key, &self.mk_digest_salt, self.mk_digest_iterations, &mut d);
        d
    }

    /// Tries `slot` with `passphrase`: the volume key if it opens.
    fn try_slot<E: Engine>(
        &self,
        engine: &E,
        file: &File,
        slot: usize,
        passphrase: &[u8],
    ) -> Result<Option<VolumeKey>> {
        let s = &self.keyslots[slot];
        let kdf = Kdf::Pbkdf2 { hash: self.hash, iterations: s.iterations };
        let slot_key = kdf.derive(passphrase, &s.salt, self.key_bytes as usize)?;
        let candidate = keyslot::open_area(engine, file, &self.area(slot), &slot_key)?;
        Ok((self.digest_of(&candidate) == self.mk_digest).then_some(candidate))
    }

    /// Finds the slot `passphrase` opens: its number and the volume key.
    pub fn unlock<E: Engine>(
        &self,
        engine: &E,
        file: &File,
        passphrase: &[u8],
    ) -> Result<(usize, VolumeKey)> {
        for slot in (0..SLOTS).filter(|&i| self.keyslots[i].active) {
            if let Some(key) = self.try_slot(engine, file, slot, passphrase)? {
                return Ok((slot, key));
            }
        }
        Err(Error::Luks(LuksError::WrongPassphrase))
    }

    /// A new header for a volume key of `key_len` bytes, with every slot empty and the areas laid
    /// out as cryptsetup does: slots 4 KiB-aligned after the header, data 1 MiB-aligned.
    pub fn new(spec: CipherSpec, key: &[u8], hash: HashAlg, kdf: &LuksKdfOptions) -> Result<Self> {
        spec.check_key_len(key.len())?;
        let area_sectors = ((key.len() as u64 * u64::from(STRIPES)).div_ceil(512)).next_multiple_of(8) as u32;
        let keyslots = std::array::from_fn(|i| {
            let mut salt = [0u8; SALT_LEN];
            rand::fill(&mut salt);
            Keyslot {
                active: false,
                iterations: 0,
                salt,
                key_material_offset: 8 + i as u32 * area_sectors,
                stripes: STRIPES,
            }
        });
        let payload_offset = (8 + SLOTS as u32 * area_sectors).next_multiple_of(2048);
        let mut h = Self {
            spec,
            hash,
            payload_offset,
            key_bytes: key.len() as u32,
            mk_digest: [0; DIGEST_LEN],
            mk_digest_salt: [0; SALT_LEN],
            mk_digest_iterations: kdf.digest_iterations(hash),
            uuid: uuid::Uuid::new_v4().to_string().into_bytes(),
            keyslots,
        };
        rand::fill(&mut h.mk_digest_salt);
        h.mk_digest = h.digest_of(key);
        Ok(h)
    }

    /// Fills a free slot with `passphrase` for `volume_key`; returns the slot number and the
    /// material to write at its offset. The header changes only in memory.
    pub fn add_keyslot<E: Engine>(
        &mut self,
        engine: &E,
        volume_key: &[u8],
        passphrase: &[u8],
        kdf: &LuksKdfOptions,
    ) -> Result<(usize, Vec<u8>)> {
        if self.digest_of(volume_key) != self.mk_digest {
            return Err(Error::Luks(LuksError::Keyslot(
                "the volume key does not match the header's digest".into(),
            )));
        }
        let slot = (0..SLOTS)
            .find(|&i| !self.keyslots[i].active)
            .ok_or_else(|| Error::Luks(LuksError::Keyslot("all 8 LUKS1 key slots are in use".into())))?;
        self.check_free_area(slot)?;
        let iterations = kdf.pbkdf2_iterations_for(self.hash, self.key_bytes as usize);
        let s = &mut self.keyslots[slot];
        rand::fill(&mut s.salt);
        s.iterations = iterations;
        s.stripes = STRIPES;
        let salt = s.salt;
        let slot_key =
            Kdf::Pbkdf2 { hash: self.hash, iterations }.derive(passphrase, &salt, self.key_bytes as usize)?;
        let material = keyslot::seal_area(engine, &self.area(slot), &slot_key, volume_key)?;
        self.keyslots[slot].active = true;
        Ok((slot, material))
    }

    /// Checks that the area of the free `slot` lies between the header and the data and
    /// overlaps no active slot's: the header names it, but nothing checked it while the slot
    /// was free, and writing material there could destroy data or another key slot.
    fn check_free_area(&self, slot: usize) -> Result<()> {
        let sectors = |len: u64| len.div_ceil(512);
        let material = sectors(u64::from(self.key_bytes) * u64::from(STRIPES));
        let start = u64::from(self.keyslots[slot].key_material_offset);
        let end = start + material;
        let refuse = |why: String| {
            Err(Error::Luks(LuksError::Keyslot(format!(
                "key slot {slot} cannot be used: its key material area {why}"
            ))))
        };
        if start * 512 < HEADER_LEN as u64 {
            return refuse("overlaps the header".into());
        }
        if end > u64::from(self.payload_offset) {
            return refuse(format!(
                "(sectors {start}..{end}) overlaps the data at sector {}",
                self.payload_offset
            ));
        }
        for (i, other) in self.keyslots.iter().enumerate().filter(|(_, o)| o.active) {
            let o_start = u64::from(other.key_material_offset);
            let o_end = o_start + sectors(u64::from(self.key_bytes) * u64::from(other.stripes));
            if start < o_end && o_start < end {
                return refuse(format!("overlaps key slot {i}'s"));
            }
        }
        Ok(())
    }

    /// Marks `slot` free; returns where its material is and how long, to be wiped.
    pub fn remove_keyslot(&mut self, slot: usize) -> Result<(u64, usize)> {
        if slot >= SLOTS || !self.keyslots[slot].active {
            return Err(Error::Luks(LuksError::Keyslot(format!("key slot {slot} is not in use"))));
        }
        if self.keyslots.iter().filter(|s| s.active).count() == 1 {
            return Err(Error::Luks(LuksError::Keyslot(format!(
                "key slot {slot} is the last one: removing it would make the volume unreadable forever"
            ))));
        }
        self.keyslots[slot].active = false;
        self.keyslots[slot].iterations = 0;
        let area = self.area(slot);
        Ok((area.offset, area.len()))
    }

    /// Writes the header at the start of `file`.
    pub fn write(&self, file: &File) -> Result<()> {
        keyslot::write_all(file, &self.to_bytes(), 0, "the LUKS1 header")
    }
}

impl fmt::Display for Header {
    /// The header as `cryptsetup luksDump` prints it, without secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Version:       \t1")?;
        writeln!(f, "Cipher name:   \t{}", self.spec.luks1_cipher_name())?;
        writeln!(f, "Cipher mode:   \t{}", self.spec.luks1_cipher_mode())?;
        writeln!(f, "Hash spec:     \t{}", self.hash.name())?;
        writeln!(f, "Payload offset:\t{}", self.payload_offset)?;
        writeln!(f, "MK bits:       \t{}", self.key_bytes * 8)?;
        writeln!(f, "MK digest:     \t{}", hex(&self.mk_digest))?;
        writeln!(f, "MK salt:       \t{}", hex(&self.mk_digest_salt))?;
        writeln!(f, "MK iterations: \t{}", self.mk_digest_iterations)?;
        writeln!(f, "UUID:          \t{}", String::from_utf8_lossy(&self.uuid))?;
        writeln!(f)?;
        for (i, s) in self.keyslots.iter().enumerate() {
            if s.active {
                writeln!(f, "Key Slot {i}: ENABLED")?;
                writeln!(f, "\tIterations:         \t{}", s.iterations)?;
                writeln!(f, "\tSalt:               \t{}", hex(&s.salt))?;
                writeln!(f, "\tKey material offset:\t{}", s.key_material_offset)?;
                writeln!(f, "\tAF stripes:            \t{}", s.stripes)?;
            } else {
                writeln!(f, "Key Slot {i}: DISABLED")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let kdf = LuksKdfOptions::pbkdf2_iterations(1000);
        let key: Vec<u8> = (0..64).collect();
        Header::new(CipherSpec::XTS_PLAIN64, &key, HashAlg::Sha256, &kdf).unwrap()
    }

    #[test]
    fn a_header_survives_bytes_and_back_and_is_laid_out_like_cryptsetups() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(&b[..6], b"LUKS\xba\xbe");
        assert_eq!(&b[40..52], b"xts-plain64\0");
        assert_eq!(Header::parse(&b).unwrap(), h);
        // 64-byte key: 500 sectors of material, 504 aligned; data after 8 slots at 4096.
        assert_eq!(h.keyslots[1].key_material_offset, 8 + 504);
        assert_eq!(h.payload_offset, 4096);
    }

    #[test]
    fn corrupt_fields_are_named() {
        let good = sample().to_bytes();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(Header::parse(&b), Err(Error::Luks(LuksError::NotLuks(_)))));
        let mut b = good;
        b[208..212].copy_from_slice(&0x1234u32.to_be_bytes());
        let msg = Header::parse(&b).unwrap_err().to_string();
        assert!(msg.contains("key slot 0 active"), "{msg}");
        let mut b = good;
        b[40..52].copy_from_slice(b"ecb-plain64\0");
        assert!(matches!(Header::parse(&b), Err(Error::Volume(VolumeError::UnsupportedCipher { .. }))));
        let mut b = good;
        b[108..112].copy_from_slice(&20u32.to_be_bytes());
        let msg = Header::parse(&b).unwrap_err().to_string();
        assert!(msg.contains("key_bytes"), "{msg}");
        assert!(matches!(Header::parse(&good[..300]), Err(Error::Volume(VolumeError::Truncated { .. }))));
    }

    #[test]
    fn dump_shows_no_key() {
        let h = sample();
        let text = h.to_string();
        assert!(text.contains("Cipher mode:   \txts-plain64") && text.contains("Key Slot 7: DISABLED"));
    }
}
