//! LUKS2: two binary headers with checksums, a JSON metadata area, PBKDF2 or Argon2 key slots.
//!
//! Layout from the LUKS2 On-Disk Format Specification (version 1.1.x): a 4096-byte binary header
//! followed by the JSON area, twice (primary at 0, secondary at `hdr_size`), each protected by a
//! SHA-256 over the whole copy. The JSON is kept as a document, not re-synthesised, so that
//! adding or removing a key slot preserves whatever cryptsetup put there (tokens, flags).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::kdf::{Argon2Kind, HashAlg, Kdf};
use super::keyslot::{self, AreaLayout};
use super::{hex, LuksKdfOptions};
use crate::engine::Engine;
use crate::error::{Error, LuksError, Result, VolumeError};
use crate::volume::{CipherSpec, VolumeKey, VolumeParams};

/// Magic of the primary header.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Magic of the secondary header.
pub const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";
const BINARY_LEN: usize = 4096;
/// Header sizes the specification allows (binary header plus JSON area).
const HDR_SIZES: [u64; 9] =
    [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20];
/// The header size of new images (cryptsetup's default metadata size).
pub const DEFAULT_HDR_SIZE: u64 = 16 << 10;
/// Where the data of new images starts (cryptsetup's default).
pub const DEFAULT_DATA_OFFSET: u64 = 16 << 20;
const STRIPES: usize = 4000;
const MAX_KEYSLOTS: usize = 32;
/// cryptsetup's bound on the key slot area (`LUKS2_MAX_KEYSLOTS_SIZE`, 128 MiB).
const MAX_KEYSLOTS_SIZE: u64 = 128 << 20;
/// The largest key a key slot may hold: 4096 bits, far above any dm-crypt cipher's, and small
/// enough that its AF material (4000 stripes) stays a few MiB.
const MAX_KEY_SIZE: usize = 512;
/// cryptsetup's salt length for key slots (`LUKS_SALTSIZE`).
const SALT_SIZE: usize = 32;
/// The longest stored digest cryptsetup reads (its buffer for a PBKDF2 digest).
const MAX_DIGEST_LEN: usize = 128;
/// cryptsetup's Argon2 limits: memory 32 KiB to 4 GiB, 1 to 4 threads.
const ARGON2_MEMORY_KIB: std::ops::RangeInclusive<u32> = 32..=4 * 1024 * 1024;
const ARGON2_THREADS: std::ops::RangeInclusive<u32> = 1..=4;
/// The largest count cryptsetup reads (JSON numbers are read as a C `int`).
const MAX_COUNT: u32 = i32::MAX as u32;

fn corrupt(field: &str, reason: impl Into<String>) -> Error {
    Error::Luks(LuksError::CorruptHeader { field: field.into(), reason: reason.into() })
}

/// The decoded key slot fields crypt-vfio needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyslot {
    /// Volume key length in bytes.
    pub key_size: usize,
    /// Where and how the material is stored.
    pub area: AreaLayout,
    /// Area length in bytes as the header says.
    pub area_size: u64,
    /// Key length of the area's cipher.
    pub area_key_size: usize,
    /// The KDF.
    pub kdf: Kdf,
    /// The KDF salt.
    pub salt: Vec<u8>,
    /// Priority: 0 ignore, 1 normal, 2 high.
    pub priority: u8,
}

/// A volume key digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    /// Key slots it checks.
    pub keyslots: Vec<u32>,
    /// Segments it checks.
    pub segments: Vec<u32>,
    /// PBKDF2 hash.
    pub hash: HashAlg,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: Vec<u8>,
    /// Expected PBKDF2 output.
    pub digest: Vec<u8>,
}

/// The data segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset of the data.
    pub offset: u64,
    /// Byte length, or `None` for "dynamic" (to the end of the device).
    pub size: Option<u64>,
    /// IV offset in 512-byte sectors.
    pub iv_tweak: u64,
    /// The sector cipher.
    pub spec: CipherSpec,
    /// Sector size.
    pub sector_size: u32,
}

/// A parsed LUKS2 header.
#[derive(Clone, Debug)]
pub struct Header {
    /// Binary header plus JSON area, in bytes.
    pub hdr_size: u64,
    /// Incremented on every update.
    pub seqid: u64,
    /// Label.
    pub label: Vec<u8>,
    /// Subsystem.
    pub subsystem: Vec<u8>,
    /// UUID.
    pub uuid: Vec<u8>,
    /// The JSON metadata, as read.
    pub json: Value,
    /// Decoded key slots by id.
    pub keyslots: BTreeMap<u32, Keyslot>,
    /// Decoded digests by id.
    pub digests: BTreeMap<u32, Digest>,
    /// The data segment.
    pub segment: Segment,
    /// The data segment's id (the lowest; `0` in every image the tools write).
    pub segment_id: u32,
    /// `config.keyslots_size`.
    pub keyslots_size: u64,
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The bytes of a NUL-terminated field, without the NUL: kept as bytes so that a label that is
/// not UTF-8 is written back unchanged by add-key and remove-key.
fn cbytes(b: &[u8]) -> Vec<u8> {
    b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())].to_vec()
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn get<'a>(v: &'a Value, path: &str, key: &str) -> Result<&'a Value> {
    v.get(key).ok_or_else(|| corrupt(&format!("{path}.{key}"), "missing"))
}

fn get_str<'a>(v: &'a Value, path: &str, key: &str) -> Result<&'a str> {
    get(v, path, key)?.as_str().ok_or_else(|| corrupt(&format!("{path}.{key}"), "not a string"))
}

/// A u64 stored as a JSON string (the specification's convention for offsets and sizes).
fn get_u64s(v: &Value, path: &str, key: &str) -> Result<u64> {
    let s = get_str(v, path, key)?;
    s.parse().map_err(|_| corrupt(&format!("{path}.{key}"), format!("`{s}` is not a number")))
}

fn get_u32(v: &Value, path: &str, key: &str) -> Result<u32> {
    get(v, path, key)?
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| corrupt(&format!("{path}.{key}"), "not a 32-bit number"))
}

fn get_b64(v: &Value, path: &str, key: &str) -> Result<Vec<u8>> {
    B64.decode(get_str(v, path, key)?)
        .map_err(|e| corrupt(&format!("{path}.{key}"), format!("bad base64: {e}")))
}

fn ids(v: &Value, path: &str, key: &str) -> Result<Vec<u32>> {
    get(v, path, key)?
        .as_array()
        .ok_or_else(|| corrupt(&format!("{path}.{key}"), "not an array"))?
        .iter()
        .map(|x| {
            x.as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| corrupt(&format!("{path}.{key}"), "not an id"))
        })
        .collect()
}

fn objects<'a>(json: &'a Value, key: &str) -> Result<Vec<(u32, &'a Value)>> {
    let map = get(json, "json", key)?.as_object().ok_or_else(|| corrupt(key, "not an object"))?;
    map.iter()
        .map(|(k, v)| Ok((k.parse().map_err(|_| corrupt(&format!("{key}.{k}"), "id is not a number"))?, v)))
        .collect()
}

/// A count that must lie in `range`.
fn get_bounded(v: &Value, path: &str, key: &str, range: std::ops::RangeInclusive<u32>) -> Result<u32> {
    let n = get_u32(v, path, key)?;
    if !range.contains(&n) {
        return Err(corrupt(
            &format!("{path}.{key}"),
            format!("{n} is outside {}..={}", range.start(), range.end()),
        ));
    }
    Ok(n)
}

fn parse_kdf(v: &Value, path: &str) -> Result<(Kdf, Vec<u8>)> {
    let salt = get_b64(v, path, "salt")?;
    if salt.len() != SALT_SIZE {
        return Err(corrupt(&format!("{path}.salt"), format!("{} bytes, not {SALT_SIZE}", salt.len())));
    }
    let kdf = match get_str(v, path, "type")? {
        "pbkdf2" => Kdf::Pbkdf2 {
            hash: HashAlg::parse(get_str(v, path, "hash")?, &format!("{path}.hash"))?,
            iterations: get_bounded(v, path, "iterations", 1..=MAX_COUNT)?,
        },
        t @ ("argon2i" | "argon2id") => {
            let parallel = get_bounded(v, path, "cpus", ARGON2_THREADS)?;
            let memory_kib = get_bounded(v, path, "memory", ARGON2_MEMORY_KIB)?;
            if memory_kib < 8 * parallel {
                return Err(corrupt(&format!("{path}.memory"), "below 8 KiB per thread (Argon2's minimum)"));
            }
            Kdf::Argon2 {
                kind: if t == "argon2i" { Argon2Kind::Argon2i } else { Argon2Kind::Argon2id },
                time: get_bounded(v, path, "time", 1..=MAX_COUNT)?,
                memory_kib,
                parallel,
            }
        }
        t => return Err(corrupt(&format!("{path}.type"), format!("unknown KDF `{t}`"))),
    };
    Ok((kdf, salt))
}

fn kdf_json(kdf: &Kdf, salt: &[u8]) -> Value {
    match *kdf {
        Kdf::Pbkdf2 { hash, iterations } => {
            json!({"type": "pbkdf2", "hash": hash.name(), "iterations": iterations, "salt": B64.encode(salt)})
        }
        Kdf::Argon2 { kind, time, memory_kib, parallel } => json!({
            "type": if kind == Argon2Kind::Argon2i { "argon2i" } else { "argon2id" },
            "time": time, "memory": memory_kib, "cpus": parallel, "salt": B64.encode(salt)
        }),
    }
}

impl Header {
    /// Reads the newest valid header copy from `file` (the primary, or the secondary when the
    /// primary is damaged).
    pub fn read(file: &File) -> Result<Self> {
        let primary = Self::read_copy(file, 0);
        let mut newest = match &primary {
            Ok(h) => Some(h.clone()),
            Err(e) => {
                log::warn!("LUKS2 primary header: {e}; looking for the secondary copy");
                None
            }
        };
        let hint = newest.as_ref().map(|h| h.hdr_size);
        // A secondary copy whose magic is there but which fails its checks: the image is LUKS2
        // and damaged, which is worth saying rather than "not LUKS".
        let mut damaged_secondary = None;
        for off in HDR_SIZES.iter().copied().filter(|&o| hint.is_none_or(|h| h == o)) {
            match Self::read_copy(file, off) {
                Ok(h) => {
                    if newest.as_ref().is_none_or(|n| h.seqid > n.seqid) {
                        newest = Some(h);
                    }
                    break;
                }
                // No copy there: no magic, or the file ends before that offset.
                Err(Error::Luks(LuksError::NotLuks(_)) | Error::Volume(VolumeError::Truncated { .. })) => {}
                Err(e) => {
                    damaged_secondary.get_or_insert(e);
                }
            }
        }
        match (newest, &primary, damaged_secondary) {
            (Some(h), _, _) => Ok(h),
            (None, Err(Error::Luks(LuksError::NotLuks(_))), Some(e)) => Err(e),
            (None, _, _) => primary,
        }
    }

    fn read_copy(file: &File, offset: u64) -> Result<Self> {
        let mut bin = vec![0u8; BINARY_LEN];
        keyslot::read_exact(file, &mut bin, offset, "the LUKS2 binary header")?;
        let magic = if offset == 0 { MAGIC } else { MAGIC_SECONDARY };
        if bin[..6] != magic {
            return Err(Error::Luks(LuksError::NotLuks(format!("no LUKS2 magic at byte {offset}"))));
        }
        let version = u16::from_be_bytes([bin[6], bin[7]]);
        if version != 2 {
            return Err(corrupt("version", format!("{version}, expected 2")));
        }
        let hdr_size = be64(&bin, 8);
        if !HDR_SIZES.contains(&hdr_size) {
            return Err(corrupt("hdr_size", format!("{hdr_size} is not a size LUKS2 allows")));
        }
        if be64(&bin, 256) != offset {
            return Err(corrupt("hdr_offset", format!("{} but the header is at {offset}", be64(&bin, 256))));
        }
        let alg = cstr(&bin[72..104]);
        if alg != "sha256" {
            return Err(corrupt("checksum_alg", format!("`{alg}` (only sha256 is supported)")));
        }
        let mut all = vec![0u8; hdr_size as usize];
        keyslot::read_exact(file, &mut all, offset, "the LUKS2 header and JSON area")?;
        let stored = all[448..480].to_vec();
        all[448..512].fill(0);
        if HashAlg::Sha256.digest(&[&all]) != stored {
            return Err(corrupt("csum", format!("checksum mismatch in the header copy at byte {offset}")));
        }
        let json_area = &all[BINARY_LEN..];
        let end = json_area.iter().position(|&c| c == 0).unwrap_or(json_area.len());
        let json: Value = serde_json::from_slice(&json_area[..end])
            .map_err(|e| corrupt("json area", format!("not JSON: {e}")))?;
        Self::from_json(json, hdr_size, &bin)
    }

    fn from_json(json: Value, hdr_size: u64, bin: &[u8]) -> Result<Self> {
        let config = get(&json, "json", "config")?;
        if let Some(mandatory) = config.get("requirements").and_then(|r| r.get("mandatory")) {
            let names: Vec<&str> = mandatory
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if !names.is_empty() {
                let what = if names.iter().any(|n| n.contains("reencrypt")) {
                    "a LUKS2 reencryption is in progress (finish it with `cryptsetup reencrypt`)"
                } else {
                    "the header has mandatory requirements"
                };
                return Err(Error::Luks(LuksError::Unsupported(format!(
                    "{what}: config.requirements.mandatory = {names:?}"
                ))));
            }
        }
        let keyslots_size = get_u64s(config, "config", "keyslots_size")?;
        if keyslots_size > MAX_KEYSLOTS_SIZE || keyslots_size % 4096 != 0 {
            return Err(corrupt(
                "config.keyslots_size",
                format!("{keyslots_size} (a multiple of 4096 up to {MAX_KEYSLOTS_SIZE})"),
            ));
        }
        // Both below their bounds: no sum of them can overflow.
        let areas_end = 2 * hdr_size + keyslots_size;
        let json_size = get_u64s(config, "config", "json_size")?;
        if json_size != hdr_size - BINARY_LEN as u64 {
            return Err(corrupt(
                "config.json_size",
                format!("{json_size} does not match hdr_size {hdr_size}"),
            ));
        }
        let mut segments = objects(&json, "segments")?;
        segments.sort_by_key(|(id, _)| *id);
        let (sid, seg) = segments.first().ok_or_else(|| corrupt("segments", "no data segment"))?;
        let segment_id = *sid;
        let path = format!("segments.{sid}");
        if get_str(seg, &path, "type")? != "crypt" {
            return Err(corrupt(&format!("{path}.type"), "only `crypt` segments are supported"));
        }
        if seg.get("integrity").is_some() {
            return Err(Error::Volume(VolumeError::UnsupportedCipher {
                spec: get_str(seg, &path, "encryption")?.to_string(),
                reason: "LUKS2 with dm-integrity is not supported".into(),
            }));
        }
        let size = match get_str(seg, &path, "size")? {
            "dynamic" => None,
            _ => match get_u64s(seg, &path, "size")? {
                0 => return Err(corrupt(&format!("{path}.size"), "zero bytes (cryptsetup refuses it too)")),
                n => Some(n),
            },
        };
        let segment = Segment {
            offset: get_u64s(seg, &path, "offset")?,
            size,
            iv_tweak: get_u64s(seg, &path, "iv_tweak")?,
            spec: get_str(seg, &path, "encryption")?.parse()?,
            sector_size: get_u32(seg, &path, "sector_size")?,
        };
        if segment.offset < areas_end {
            return Err(corrupt(&format!("{path}.offset"), "the data overlaps the key slot area"));
        }
        if !(512..=4096).contains(&segment.sector_size) || !segment.sector_size.is_power_of_two() {
            return Err(corrupt(
                &format!("{path}.sector_size"),
                format!("{} (512, 1024, 2048 or 4096)", segment.sector_size),
            ));
        }
        if segment.offset % 512 != 0 {
            return Err(corrupt(&format!("{path}.offset"), "not a multiple of 512"));
        }
        let data_end = segment.size.map_or(Some(segment.offset), |n| segment.offset.checked_add(n));
        if data_end.is_none() || segment.size.is_some_and(|n| n % u64::from(segment.sector_size) != 0) {
            return Err(corrupt(
                &format!("{path}.size"),
                "not a whole number of sectors within 2^64 bytes".to_string(),
            ));
        }
        let mut keyslots = BTreeMap::new();
        for (id, ks) in objects(&json, "keyslots")? {
            let path = format!("keyslots.{id}");
            if id as usize >= MAX_KEYSLOTS {
                return Err(corrupt(&path, format!("LUKS2 has key slots 0 to {}", MAX_KEYSLOTS - 1)));
            }
            if get_str(ks, &path, "type")? != "luks2" {
                return Err(corrupt(&format!("{path}.type"), "only `luks2` key slots are supported"));
            }
            let key_size = get_bounded(ks, &path, "key_size", 1..=MAX_KEY_SIZE as u32)? as usize;
            let area = get(ks, &path, "area")?;
            let apath = format!("{path}.area");
            if get_str(area, &apath, "type")? != "raw" {
                return Err(corrupt(&format!("{apath}.type"), "only `raw` areas are supported"));
            }
            let af = get(ks, &path, "af")?;
            let afpath = format!("{path}.af");
            if get_str(af, &afpath, "type")? != "luks1" {
                return Err(corrupt(&format!("{afpath}.type"), "only the `luks1` AF is supported"));
            }
            // cryptsetup reads every LUKS2 key slot with 4000 stripes, whatever this says.
            let stripes = get_bounded(af, &afpath, "stripes", STRIPES as u32..=STRIPES as u32)? as usize;
            let (kdf, salt) = parse_kdf(get(ks, &path, "kdf")?, &format!("{path}.kdf"))?;
            let spec: CipherSpec = get_str(area, &apath, "encryption")?.parse()?;
            let layout = AreaLayout {
                offset: get_u64s(area, &apath, "offset")?,
                spec,
                stripes,
                af_hash: HashAlg::parse(get_str(af, &afpath, "hash")?, &format!("{afpath}.hash"))?,
                key_len: key_size,
            };
            let area_size = get_u64s(area, &apath, "size")?;
            if (layout.len() as u64) > area_size {
                return Err(corrupt(&format!("{apath}.size"), "too small for the key material"));
            }
            if layout.offset < 2 * hdr_size
                || layout.offset.checked_add(area_size).is_none_or(|end| end > areas_end)
            {
                return Err(corrupt(&format!("{apath}.offset"), "outside the key slot area"));
            }
            if layout.offset % 512 != 0 {
                return Err(corrupt(&format!("{apath}.offset"), "not a multiple of 512"));
            }
            let priority = match ks.get("priority") {
                None => 1,
                Some(p) => match p.as_u64() {
                    Some(p @ 0..=2) => p as u8,
                    _ => return Err(corrupt(&format!("{path}.priority"), format!("{p} (0, 1 or 2)"))),
                },
            };
            let area_key_size = get_u32(area, &apath, "key_size")? as usize;
            spec.check_key_len(area_key_size).map_err(|_| {
                corrupt(&format!("{apath}.key_size"), format!("{area_key_size} bytes does not suit {spec}"))
            })?;
            keyslots.insert(
                id,
                Keyslot { key_size, area: layout, area_size, area_key_size, kdf, salt, priority },
            );
        }
        let mut digests = BTreeMap::new();
        for (id, d) in objects(&json, "digests")? {
            let path = format!("digests.{id}");
            if get_str(d, &path, "type")? != "pbkdf2" {
                return Err(corrupt(&format!("{path}.type"), "only `pbkdf2` digests are supported"));
            }
            let digest = get_b64(d, &path, "digest")?;
            if digest.is_empty() || digest.len() > MAX_DIGEST_LEN {
                return Err(corrupt(&format!("{path}.digest"), format!("{} bytes", digest.len())));
            }
            let salt = get_b64(d, &path, "salt")?;
            if salt.len() != SALT_SIZE {
                return Err(corrupt(
                    &format!("{path}.salt"),
                    format!("{} bytes, not {SALT_SIZE}", salt.len()),
                ));
            }
            digests.insert(
                id,
                Digest {
                    keyslots: ids(d, &path, "keyslots")?,
                    segments: ids(d, &path, "segments")?,
                    hash: HashAlg::parse(get_str(d, &path, "hash")?, &format!("{path}.hash"))?,
                    iterations: get_bounded(d, &path, "iterations", 1..=MAX_COUNT)?,
                    salt,
                    digest,
                },
            );
        }
        Ok(Self {
            hdr_size,
            seqid: be64(bin, 16),
            label: cbytes(&bin[24..72]),
            subsystem: cbytes(&bin[208..256]),
            uuid: cbytes(&bin[168..208]),
            json,
            keyslots,
            digests,
            segment,
            segment_id,
            keyslots_size,
        })
    }

    /// Where the data is and how it is encrypted. LUKS2 counts IVs in 512-byte sectors whatever
    /// the sector size (cryptsetup never sets `iv_large_sectors` for LUKS2).
    pub fn volume_params(&self) -> VolumeParams {
        VolumeParams {
            spec: self.segment.spec,
            sector_size: self.segment.sector_size,
            data_offset: self.segment.offset,
            iv_offset: self.segment.iv_tweak,
            iv_large_sectors: false,
            size: self.segment.size,
        }
    }

    /// The digest of the data segment's volume key: only key slots it names open the volume.
    /// An unbound key slot (`cryptsetup luksAddKey --unbound`) has a digest of its own with no
    /// segment; its key is not the volume key, and decrypting with it would give garbage.
    fn segment_digest(&self) -> Option<(u32, &Digest)> {
        self.digests.iter().find(|(_, d)| d.segments.contains(&self.segment_id)).map(|(id, d)| (*id, d))
    }

    /// Whether key slot `slot` holds the data segment's volume key (is bound to it).
    pub fn is_bound(&self, slot: u32) -> bool {
        self.segment_digest().is_some_and(|(_, d)| d.keyslots.contains(&slot))
    }

    fn check_digest(d: &Digest, key: &[u8]) -> bool {
        let mut out = vec![0u8; d.digest.len()];
        d.hash.pbkdf2(key, &d.salt, d.iterations, &mut out);
        out == d.digest
    }

    /// Finds the key slot `passphrase` opens: its number and the volume key.
    pub fn unlock<E: Engine>(
        &self,
        engine: &E,
        file: &File,
        passphrase: &[u8],
    ) -> Result<(usize, VolumeKey)> {
        let mut order: Vec<(&u32, &Keyslot)> =
            self.keyslots.iter().filter(|(_, k)| k.priority != 0).collect();
        order.sort_by_key(|(id, k)| (std::cmp::Reverse(k.priority), **id));
        let Some((_, digest)) = self.segment_digest() else {
            return Err(corrupt("digests", "no digest names the data segment: no key slot can open it"));
        };
        for (&id, ks) in order {
            if !digest.keyslots.contains(&id) {
                // Unbound, or bound to something else: its key is not the volume key.
                continue;
            }
            let slot_key = ks.kdf.derive(passphrase, &ks.salt, ks.area_key_size)?;
            let candidate = keyslot::open_area(engine, file, &ks.area, &slot_key)?;
            if Self::check_digest(digest, &candidate) {
                return Ok((id as usize, candidate));
            }
        }
        Err(Error::Luks(LuksError::WrongPassphrase))
    }

    /// A new header for `key` with no key slot yet, laid out as cryptsetup's defaults.
    pub fn new(
        spec: CipherSpec,
        key: &[u8],
        sector_size: u32,
        hash: HashAlg,
        kdf: &LuksKdfOptions,
    ) -> Result<Self> {
        spec.check_key_len(key.len())?;
        let hdr_size = DEFAULT_HDR_SIZE;
        let keyslots_size = DEFAULT_DATA_OFFSET - 2 * hdr_size;
        let mut salt = [0u8; 32];
        rand::fill(&mut salt);
        let iterations = kdf.digest_iterations(hash);
        let mut digest = vec![0u8; hash.digest_len()];
        hash.pbkdf2(key, &salt, iterations, &mut digest);
        let json = json!({
            "keyslots": {},
            "tokens": {},
            "segments": {"0": {
                "type": "crypt", "offset": DEFAULT_DATA_OFFSET.to_string(), "size": "dynamic",
                "iv_tweak": "0", "encryption": spec.to_string(), "sector_size": sector_size
            }},
            "digests": {"0": {
                "type": "pbkdf2", "keyslots": [], "segments": ["0"], "hash": hash.name(),
                "iterations": iterations, "salt": B64.encode(salt), "digest": B64.encode(&digest)
            }},
            "config": {"json_size": (hdr_size - BINARY_LEN as u64).to_string(), "keyslots_size": keyslots_size.to_string()}
        });
        let mut bin = vec![0u8; BINARY_LEN];
        let uuid = uuid::Uuid::new_v4().to_string();
        bin[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
        Self::from_json(json, hdr_size, &bin)
    }

    /// Fills a free key slot with `passphrase` for `volume_key`: returns the slot and the
    /// material to write at its area offset. The header changes only in memory.
    pub fn add_keyslot<E: Engine>(
        &mut self,
        engine: &E,
        volume_key: &[u8],
        passphrase: &[u8],
        kdf_opts: &LuksKdfOptions,
    ) -> Result<(usize, Vec<u8>)> {
        let (digest_id, digest) = self.segment_digest().ok_or_else(|| {
            Error::Luks(LuksError::Keyslot("the header has no digest for the data segment".into()))
        })?;
        if !Self::check_digest(digest, volume_key) {
            return Err(Error::Luks(LuksError::Keyslot(
                "the volume key does not match the header's digest".into(),
            )));
        }
        let id = (0..MAX_KEYSLOTS as u32).find(|i| !self.keyslots.contains_key(i)).ok_or_else(|| {
            Error::Luks(LuksError::Keyslot(format!("all {MAX_KEYSLOTS} LUKS2 key slots are in use")))
        })?;
        let spec = self.segment.spec;
        let key_size = volume_key.len();
        let area_size = ((key_size * STRIPES) as u64).next_multiple_of(4096);
        // First fit in the key slot area, 4 KiB aligned.
        let mut used: Vec<(u64, u64)> =
            self.keyslots.values().map(|k| (k.area.offset, k.area_size)).collect();
        used.sort_unstable();
        let mut offset = 2 * self.hdr_size;
        for (o, s) in used {
            if offset + area_size <= o {
                break;
            }
            offset = offset.max((o + s).next_multiple_of(4096));
        }
        if offset + area_size > 2 * self.hdr_size + self.keyslots_size {
            return Err(Error::Luks(LuksError::Keyslot("no room left in the key slot area".into())));
        }
        let hash = digest.hash;
        let kdf = kdf_opts.luks2_kdf(hash, key_size);
        let mut salt = vec![0u8; 32];
        rand::fill(&mut salt[..]);
        let area = AreaLayout { offset, spec, stripes: STRIPES, af_hash: hash, key_len: key_size };
        let slot_key = kdf.derive(passphrase, &salt, key_size)?;
        let material = keyslot::seal_area(engine, &area, &slot_key, volume_key)?;
        let mut json = self.json.clone();
        json["keyslots"][id.to_string()] = json!({
            "type": "luks2",
            "key_size": key_size,
            "af": {"type": "luks1", "stripes": STRIPES, "hash": hash.name()},
            "area": {"type": "raw", "offset": offset.to_string(), "size": area_size.to_string(),
                     "encryption": spec.to_string(), "key_size": key_size},
            "kdf": kdf_json(&kdf, &salt),
        });
        let list = json["digests"][digest_id.to_string()]["keyslots"]
            .as_array_mut()
            .ok_or_else(|| corrupt(&format!("digests.{digest_id}.keyslots"), "not an array"))?;
        list.push(Value::String(id.to_string()));
        self.replace_json(json)?;
        Ok((id as usize, material))
    }

    /// Removes key slot `slot` (refusing the last one): returns its area to wipe.
    pub fn remove_keyslot(&mut self, slot: usize) -> Result<(u64, usize)> {
        let id = slot as u32;
        let ks = self
            .keyslots
            .get(&id)
            .ok_or_else(|| Error::Luks(LuksError::Keyslot(format!("key slot {slot} is not in use"))))?;
        // The last slot holding the volume key: unbound slots (other keys) do not count.
        let bound = self.keyslots.keys().filter(|&&k| self.is_bound(k)).count();
        if self.keyslots.len() == 1 || (self.is_bound(id) && bound == 1) {
            return Err(Error::Luks(LuksError::Keyslot(format!(
                "key slot {slot} is the last one: removing it would make the volume unreadable forever"
            ))));
        }
        let wipe = (ks.area.offset, ks.area_size as usize);
        let mut json = self.json.clone();
        if let Some(m) = json["keyslots"].as_object_mut() {
            m.remove(&id.to_string());
        }
        if let Some(digests) = json["digests"].as_object_mut() {
            for d in digests.values_mut() {
                if let Some(list) = d["keyslots"].as_array_mut() {
                    list.retain(|x| x.as_str() != Some(&id.to_string()));
                }
            }
        }
        self.replace_json(json)?;
        Ok(wipe)
    }

    fn replace_json(&mut self, json: Value) -> Result<()> {
        let mut bin = vec![0u8; BINARY_LEN];
        bin[16..24].copy_from_slice(&self.seqid.to_be_bytes());
        self.put_text_fields(&mut bin);
        *self = Self::from_json(json, self.hdr_size, &bin)?;
        Ok(())
    }

    /// Label (24..72), UUID (168..208) and subsystem (208..256), as read; each keeps a NUL.
    fn put_text_fields(&self, bin: &mut [u8]) {
        for (field, at, len) in [(&self.label, 24, 48), (&self.uuid, 168, 40), (&self.subsystem, 208, 48)] {
            let n = field.len().min(len - 1);
            bin[at..at + n].copy_from_slice(&field[..n]);
        }
    }

    /// One header copy's bytes (`secondary` at offset `hdr_size`).
    fn copy_bytes(&self, secondary: bool) -> Result<Vec<u8>> {
        let mut all = vec![0u8; self.hdr_size as usize];
        all[..6].copy_from_slice(if secondary { &MAGIC_SECONDARY } else { &MAGIC });
        all[6..8].copy_from_slice(&2u16.to_be_bytes());
        all[8..16].copy_from_slice(&self.hdr_size.to_be_bytes());
        all[16..24].copy_from_slice(&self.seqid.to_be_bytes());
        self.put_text_fields(&mut all);
        all[72..78].copy_from_slice(b"sha256");
        rand::fill(&mut all[104..168]);
        let offset = if secondary { self.hdr_size } else { 0 };
        all[256..264].copy_from_slice(&offset.to_be_bytes());
        let text = serde_json::to_vec(&self.json).expect("JSON values serialise");
        if text.len() >= all.len() - BINARY_LEN {
            return Err(Error::Luks(LuksError::Keyslot(format!(
                "the metadata ({} bytes of JSON) does not fit the {}-byte JSON area",
                text.len(),
                all.len() - BINARY_LEN
            ))));
        }
        all[BINARY_LEN..BINARY_LEN + text.len()].copy_from_slice(&text);
        let csum = HashAlg::Sha256.digest(&[&all]);
        all[448..448 + csum.len()].copy_from_slice(&csum);
        Ok(all)
    }

    /// Writes both header copies with the next sequence number: secondary first, so that a
    /// crash between the two writes leaves one complete copy of either version.
    pub fn write(&mut self, file: &File) -> Result<()> {
        self.seqid += 1;
        let secondary = self.copy_bytes(true)?;
        let primary = self.copy_bytes(false)?;
        keyslot::write_all(file, &secondary, self.hdr_size, "the LUKS2 secondary header")?;
        file.sync_data().map_err(|e| Error::os("flushing the image", e))?;
        keyslot::write_all(file, &primary, 0, "the LUKS2 primary header")?;
        file.sync_data().map_err(|e| Error::os("flushing the image", e))
    }

    /// The data segment's JSON object (for tests and tools).
    pub fn segment_json(&self) -> Option<&Map<String, Value>> {
        self.json["segments"]["0"].as_object()
    }
}

impl fmt::Display for Header {
    /// The header as `cryptsetup luksDump` prints it, without secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or = |s: &[u8], none: &'static str| {
            if s.is_empty() {
                none.to_string()
            } else {
                String::from_utf8_lossy(s).into_owned()
            }
        };
        writeln!(f, "Version:       \t2")?;
        writeln!(f, "Epoch:         \t{}", self.seqid)?;
        writeln!(f, "Metadata area: \t{} [bytes]", self.hdr_size)?;
        writeln!(f, "Keyslots area: \t{} [bytes]", self.keyslots_size)?;
        writeln!(f, "UUID:          \t{}", String::from_utf8_lossy(&self.uuid))?;
        writeln!(f, "Label:         \t{}", or(&self.label, "(no label)"))?;
        writeln!(f, "Subsystem:     \t{}", or(&self.subsystem, "(no subsystem)"))?;
        writeln!(f)?;
        writeln!(f, "Data segments:")?;
        let s = &self.segment;
        writeln!(f, "  0: crypt")?;
        writeln!(f, "\toffset: {} [bytes]", s.offset)?;
        match s.size {
            Some(n) => writeln!(f, "\tlength: {n} [bytes]")?,
            None => writeln!(f, "\tlength: (whole device)")?,
        }
        writeln!(f, "\tcipher: {}", s.spec)?;
        writeln!(f, "\tsector: {} [bytes]", s.sector_size)?;
        writeln!(f)?;
        writeln!(f, "Keyslots:")?;
        for (id, k) in &self.keyslots {
            let unbound = if self.is_bound(*id) { "" } else { " (unbound)" };
            writeln!(f, "  {id}: luks2{unbound}")?;
            writeln!(f, "\tKey:        {} bits", k.key_size * 8)?;
            let prio = match k.priority {
                0 => "ignored",
                2 => "high",
                _ => "normal",
            };
            writeln!(f, "\tPriority:   {prio}")?;
            writeln!(f, "\tCipher:     {}", k.area.spec)?;
            writeln!(f, "\tCipher key: {} bits", k.area_key_size * 8)?;
            match k.kdf {
                Kdf::Pbkdf2 { hash, iterations } => {
                    writeln!(f, "\tPBKDF:      pbkdf2")?;
                    writeln!(f, "\tHash:       {}", hash.name())?;
                    writeln!(f, "\tIterations: {iterations}")?;
                }
                Kdf::Argon2 { kind, time, memory_kib, parallel } => {
                    let name = if kind == Argon2Kind::Argon2i { "argon2i" } else { "argon2id" };
                    writeln!(f, "\tPBKDF:      {name}")?;
                    writeln!(f, "\tTime cost:  {time}")?;
                    writeln!(f, "\tMemory:     {memory_kib}")?;
                    writeln!(f, "\tThreads:    {parallel}")?;
                }
            }
            writeln!(f, "\tSalt:       {}", hex(&k.salt))?;
            writeln!(f, "\tAF stripes: {}", k.area.stripes)?;
            writeln!(f, "\tAF hash:    {}", k.area.af_hash.name())?;
            writeln!(f, "\tArea offset:{} [bytes]", k.area.offset)?;
            writeln!(f, "\tArea length:{} [bytes]", k.area_size)?;
            if let Some((did, _)) = self.digests.iter().find(|(_, d)| d.keyslots.contains(id)) {
                writeln!(f, "\tDigest ID:  {did}")?;
            }
        }
        writeln!(f, "Digests:")?;
        for (id, d) in &self.digests {
            writeln!(f, "  {id}: pbkdf2")?;
            writeln!(f, "\tHash:       {}", d.hash.name())?;
            writeln!(f, "\tIterations: {}", d.iterations)?;
            writeln!(f, "\tSalt:       {}", hex(&d.salt))?;
            writeln!(f, "\tDigest:     {}", hex(&d.digest))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_header_serialises_with_valid_checksums_and_parses_back() {
        let key: Vec<u8> = (1..=64).collect();
        let h = Header::new(
            CipherSpec::XTS_PLAIN64,
            &key,
            4096,
            HashAlg::Sha256,
            &LuksKdfOptions::pbkdf2_iterations(1000),
        )
        .unwrap();
        let bytes = h.copy_bytes(false).unwrap();
        assert_eq!(&bytes[..6], b"LUKS\xba\xbe");
        let mut zeroed = bytes.clone();
        zeroed[448..512].fill(0);
        assert_eq!(HashAlg::Sha256.digest(&[&zeroed]), bytes[448..480]);
        let back = Header::from_json(
            serde_json::from_slice(&bytes[4096..bytes[4096..].iter().position(|&c| c == 0).unwrap() + 4096])
                .unwrap(),
            h.hdr_size,
            &bytes[..4096],
        )
        .unwrap();
        assert_eq!(back.segment, h.segment);
        assert_eq!(back.segment.sector_size, 4096);
        assert!(Header::check_digest(&back.digests[&0], &key));
        assert!(!Header::check_digest(&back.digests[&0], &[0; 64]));
    }

    #[test]
    fn bad_json_fields_are_named() {
        let key: Vec<u8> = (1..=64).collect();
        let h = Header::new(
            CipherSpec::XTS_PLAIN64,
            &key,
            512,
            HashAlg::Sha256,
            &LuksKdfOptions::pbkdf2_iterations(1000),
        )
        .unwrap();
        let mut j = h.json.clone();
        j["segments"]["0"]["offset"] = json!("lots");
        let e = Header::from_json(j, h.hdr_size, &[0; 4096]).unwrap_err().to_string();
        assert!(e.contains("segments.0.offset"), "{e}");
        let mut j = h.json.clone();
        j["segments"]["0"]["encryption"] = json!("aes-xts-benbi");
        assert!(matches!(
            Header::from_json(j, h.hdr_size, &[0; 4096]),
            Err(Error::Volume(VolumeError::UnsupportedCipher { .. }))
        ));
    }
}
