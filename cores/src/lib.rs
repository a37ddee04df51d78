//! The AES cores: the arithmetic that an accelerator performs, as a library.
//!
//! Two implementations sit behind one trait. [`CoreKind::Reference`] is RustCrypto (`aes-gcm`,
//! `xts-mode`, `cbc`, `ctr`): portable and easy to audit, the yardstick for correctness.
//! [`CoreKind::Fast`] is aws-lc (through `aws-lc-rs`, and `aws-lc-sys` for XTS, which `aws-lc-rs`
//! does not expose): several times faster on machines with AES-NI/VAES, and what the emulated
//! device and the software engine use to show how fast the driver path can go.
//!
//! The emulated device and the software engine both call these cores, so "device versus software"
//! comparisons measure the driver and the rings, never two different AES implementations.
//!
//! All operations work in place: callers copy the source into the destination first.

#![deny(missing_docs)]

mod fast;
mod reference;
mod xts;
#[cfg(target_arch = "x86_64")]
mod xts_vaes;

use std::fmt;
use std::str::FromStr;

/// Length of the AES-GCM nonce that every core accepts.
pub const GCM_IV_LEN: usize = 12;
/// Length of the AES-GCM tag.
pub const GCM_TAG_LEN: usize = 16;
/// AES block length, which is also the IV length of XTS, CBC and CTR.
pub const BLOCK_LEN: usize = 16;

/// Which implementation runs the arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CoreKind {
    /// RustCrypto: portable reference.
    Reference,
    /// aws-lc: the fast core.
    #[default]
    Fast,
}

impl fmt::Display for CoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CoreKind::Reference => "rustcrypto",
            CoreKind::Fast => "aws-lc",
        })
    }
}

impl FromStr for CoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rustcrypto" | "reference" => Ok(CoreKind::Reference),
            "aws-lc" | "fast" => Ok(CoreKind::Fast),
            _ => Err(format!("unknown AES core `{s}` (expected `aws-lc` or `rustcrypto`)")),
        }
    }
}

/// The AES modes the cores implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// AES-GCM with a 12-byte IV and a 16-byte tag (AEAD).
    Gcm,
    /// AES-XTS with a 16-byte tweak as IV, ciphertext stealing for partial final blocks.
    Xts,
    /// AES-CBC without padding: data must be whole blocks.
    Cbc,
    /// AES-CTR with a 16-byte big-endian counter block as IV (the kernel's `ctr(aes)`).
    Ctr,
}

impl Mode {
    /// Key lengths in bytes that the mode accepts.
    pub fn key_lengths(self) -> &'static [usize] {
        match self {
            Mode::Gcm => &[16, 32],
            Mode::Xts => &[32, 48, 64],
            Mode::Cbc | Mode::Ctr => &[16, 24, 32],
        }
    }

    /// The IV length in bytes.
    pub fn iv_len(self) -> usize {
        match self {
            Mode::Gcm => GCM_IV_LEN,
            _ => BLOCK_LEN,
        }
    }

    /// Whether the mode authenticates (produces and checks a tag).
    pub fn is_aead(self) -> bool {
        self == Mode::Gcm
    }

    /// Checks that `len` bytes of data can be processed in one operation.
    pub fn check_data_len(self, len: usize) -> Result<(), CoreError> {
        match self {
            Mode::Xts if len < BLOCK_LEN => {
                Err(CoreError::DataLength { mode: self, len, rule: "at least one 16-byte block" })
            }
            Mode::Cbc if !len.is_multiple_of(BLOCK_LEN) => {
                Err(CoreError::DataLength { mode: self, len, rule: "a multiple of 16 bytes" })
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Gcm => "aes-gcm",
            Mode::Xts => "aes-xts",
            Mode::Cbc => "aes-cbc",
            Mode::Ctr => "aes-ctr",
        })
    }
}

/// Why a core refused a key or an operation.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// The key has a length the mode does not take.
    #[error("{mode} does not take a {len}-byte key (expected one of {expected:?} bytes)")]
    KeyLength {
        /// The mode.
        mode: Mode,
        /// The length given.
        len: usize,
        /// The lengths the mode takes.
        expected: &'static [usize],
    },
    /// The key has the right length but is refused, such as an XTS key with two equal halves.
    #[error("{mode} key rejected: {reason}")]
    KeyRejected {
        /// The mode.
        mode: Mode,
        /// Why.
        reason: &'static str,
    },
    /// The IV has the wrong length.
    #[error("{mode} takes a {expected}-byte IV, got {len} bytes")]
    IvLength {
        /// The mode.
        mode: Mode,
        /// The length given.
        len: usize,
        /// The length expected.
        expected: usize,
    },
    /// The data length is not one the mode can process.
    #[error("{mode} cannot process {len} bytes: the length must be {rule}")]
    DataLength {
        /// The mode.
        mode: Mode,
        /// The length given.
        len: usize,
        /// The rule it broke.
        rule: &'static str,
    },
    /// The tag has the wrong length.
    #[error("AES-GCM takes a 16-byte tag, got {0} bytes")]
    TagLength(usize),
    /// The AEAD tag did not verify; the data must not be used.
    #[error("authentication failed: the tag does not match")]
    AuthFailed,
    /// The library failed in a way it does not explain.
    #[error("{mode}: the AES library failed ({what})")]
    Internal {
        /// The mode.
        mode: Mode,
        /// What call failed.
        what: &'static str,
    },
}

/// One keyed cipher context: a session's key schedule, shareable across threads.
pub trait CipherCore: Send + Sync {
    /// The mode this context runs.
    fn mode(&self) -> Mode;

    /// Encrypts `data` in place. For GCM the tag goes to `tag` (16 bytes) and `aad` is
    /// authenticated; other modes ignore `aad` and `tag` (pass empty slices).
    fn encrypt(&self, iv: &[u8], aad: &[u8], data: &mut [u8], tag: &mut [u8]) -> Result<(), CoreError>;

    /// Decrypts `data` in place. For GCM, `tag` is checked and on mismatch `data` is wiped and
    /// [`CoreError::AuthFailed`] returned.
    fn decrypt(&self, iv: &[u8], aad: &[u8], data: &mut [u8], tag: &[u8]) -> Result<(), CoreError>;

    /// Encrypts (or, with `encrypt` false, decrypts) `data` in place as consecutive data units
    /// of `unit` bytes, unit `i` under the IV `iv_of(i)`: a run of disk sectors in one call, so
    /// that what a call sets up (a cipher context, for aws-lc's XTS) is set up once per run and
    /// not once per 512-byte sector. Not for GCM, whose units each need a tag. On failure the
    /// error comes with the index of the unit that failed; the units before it are transformed.
    fn crypt_units(
        &self,
        encrypt: bool,
        unit: usize,
        iv_of: &dyn Fn(usize) -> [u8; BLOCK_LEN],
        data: &mut [u8],
    ) -> Result<(), (usize, CoreError)> {
        check_units(self.mode(), unit, data.len())?;
        for (i, u) in data.chunks_exact_mut(unit).enumerate() {
            let iv = iv_of(i);
            let r = if encrypt { self.encrypt(&iv, &[], u, &mut []) } else { self.decrypt(&iv, &[], u, &[]) };
            r.map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

/// Checks the shape of a [`CipherCore::crypt_units`] call: a mode without tags, and `len` a
/// whole number of units that each take one operation of the mode.
pub(crate) fn check_units(mode: Mode, unit: usize, len: usize) -> Result<(), (usize, CoreError)> {
    if mode.is_aead() {
        return Err((0, CoreError::TagLength(0)));
    }
    if unit == 0 || !len.is_multiple_of(unit) {
        return Err((0, CoreError::DataLength { mode, len, rule: "a whole number of data units" }));
    }
    mode.check_data_len(unit).map_err(|e| (0, e))
}

/// Whether `key` is one [`new_cipher`] takes for `mode`: of a length the mode allows, and for
/// XTS without two equal halves. Engines that key something else (a device) check with it too,
/// so that every engine refuses the same keys with the same errors.
pub fn check_key(mode: Mode, key: &[u8]) -> Result<(), CoreError> {
    let expected = mode.key_lengths();
    if !expected.contains(&key.len()) {
        return Err(CoreError::KeyLength { mode, len: key.len(), expected });
    }
    if mode == Mode::Xts {
        let (a, b) = key.split_at(key.len() / 2);
        if a == b {
            return Err(CoreError::KeyRejected { mode, reason: "the two key halves are equal" });
        }
    }
    Ok(())
}

/// Builds a keyed context of `mode` on the core `kind`.
///
/// XTS keys whose two halves are equal are refused by both cores (aws-lc refuses them, and a
/// device must answer the same whichever core it runs).
pub fn new_cipher(kind: CoreKind, mode: Mode, key: &[u8]) -> Result<Box<dyn CipherCore>, CoreError> {
    check_key(mode, key)?;
    match kind {
        CoreKind::Reference => reference::new_cipher(mode, key),
        CoreKind::Fast => fast::new_cipher(mode, key),
    }
}

/// Checks the lengths common to every core before an operation.
pub(crate) fn check_op(mode: Mode, iv: &[u8], data_len: usize, tag_len: usize) -> Result<(), CoreError> {
    if iv.len() != mode.iv_len() {
        return Err(CoreError::IvLength { mode, len: iv.len(), expected: mode.iv_len() });
    }
    if mode.is_aead() && tag_len != GCM_TAG_LEN {
        return Err(CoreError::TagLength(tag_len));
    }
    mode.check_data_len(data_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 1) as u8).collect()
    }

    /// A run of units in one call gives the bytes of one call per unit, for every mode, key size
    /// and core (aws-lc's XTS overrides the loop).
    #[test]
    fn a_run_of_units_equals_one_call_per_unit() {
        for kind in [CoreKind::Reference, CoreKind::Fast] {
            for mode in [Mode::Xts, Mode::Cbc, Mode::Ctr] {
                for &klen in mode.key_lengths() {
                    let c = new_cipher(kind, mode, &key(klen)).unwrap();
                    let iv_of = |i: usize| {
                        let mut iv = [0u8; BLOCK_LEN];
                        iv[..8].copy_from_slice(&(1000 + i as u64).to_le_bytes());
                        iv
                    };
                    let plain: Vec<u8> = (0..8 * 512).map(|i| (i * 13 + 5) as u8).collect();
                    let mut one_by_one = plain.clone();
                    for (i, u) in one_by_one.chunks_exact_mut(512).enumerate() {
                        c.encrypt(&iv_of(i), &[], u, &mut []).unwrap();
                    }
                    let mut run = plain.clone();
                    c.crypt_units(true, 512, &iv_of, &mut run).unwrap();
                    assert!(run == one_by_one, "{kind} {mode} {klen}: encrypting a run");
                    c.crypt_units(false, 512, &iv_of, &mut run).unwrap();
                    assert!(run == plain, "{kind} {mode} {klen}: decrypting a run");
                }
            }
        }
    }

    #[test]
    fn a_run_of_units_refuses_gcm_and_partial_units() {
        let iv_of = |_| [0u8; BLOCK_LEN];
        let gcm = new_cipher(CoreKind::Fast, Mode::Gcm, &key(32)).unwrap();
        assert!(gcm.crypt_units(true, 512, &iv_of, &mut [0u8; 1024]).is_err());
        let xts = new_cipher(CoreKind::Fast, Mode::Xts, &key(64)).unwrap();
        assert!(matches!(
            xts.crypt_units(true, 512, &iv_of, &mut [0u8; 1000]),
            Err((0, CoreError::DataLength { .. }))
        ));
        assert!(xts.crypt_units(true, 0, &iv_of, &mut []).is_err());
    }

    #[test]
    fn cores_agree_on_every_mode_and_key_size() {
        for mode in [Mode::Gcm, Mode::Xts, Mode::Cbc, Mode::Ctr] {
            for &klen in mode.key_lengths() {
                let k = key(klen);
                let r = new_cipher(CoreKind::Reference, mode, &k).unwrap();
                let f = new_cipher(CoreKind::Fast, mode, &k).unwrap();
                let iv = vec![0x5a; mode.iv_len()];
                for len in [16usize, 32, 48, 4096, 4096 + 16, 65536] {
                    let len = if mode == Mode::Cbc { len - len % 16 } else { len };
                    let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
                    let (mut a, mut b) = (plain.clone(), plain.clone());
                    let tlen = if mode.is_aead() { 16 } else { 0 };
                    let (mut ta, mut tb) = (vec![0; tlen], vec![0; tlen]);
                    r.encrypt(&iv, b"aad", &mut a, &mut ta).unwrap();
                    f.encrypt(&iv, b"aad", &mut b, &mut tb).unwrap();
                    assert_eq!(a, b, "{mode} {klen} {len}");
                    assert_eq!(ta, tb);
                    assert_ne!(a, plain);
                    f.decrypt(&iv, b"aad", &mut a, &ta).unwrap();
                    assert_eq!(a, plain);
                    r.decrypt(&iv, b"aad", &mut b, &tb).unwrap();
                    assert_eq!(b, plain);
                }
            }
        }
    }

    #[test]
    fn xts_ciphertext_stealing_agrees() {
        let k = key(64);
        let r = new_cipher(CoreKind::Reference, Mode::Xts, &k).unwrap();
        let f = new_cipher(CoreKind::Fast, Mode::Xts, &k).unwrap();
        for len in [17usize, 31, 33, 100] {
            let (mut a, mut b) = (vec![3u8; len], vec![3u8; len]);
            r.encrypt(&[1; 16], &[], &mut a, &mut []).unwrap();
            f.encrypt(&[1; 16], &[], &mut b, &mut []).unwrap();
            assert_eq!(a, b, "len {len}");
        }
    }

    #[test]
    fn bad_input_is_refused() {
        for kind in [CoreKind::Reference, CoreKind::Fast] {
            assert!(matches!(new_cipher(kind, Mode::Gcm, &[0; 24]), Err(CoreError::KeyLength { .. })));
            assert!(matches!(new_cipher(kind, Mode::Xts, &[7; 64]), Err(CoreError::KeyRejected { .. })));
            let c = new_cipher(kind, Mode::Cbc, &key(16)).unwrap();
            assert!(matches!(
                c.encrypt(&[0; 16], &[], &mut [0; 15], &mut []),
                Err(CoreError::DataLength { .. })
            ));
            assert!(matches!(
                c.encrypt(&[0; 12], &[], &mut [0; 16], &mut []),
                Err(CoreError::IvLength { .. })
            ));
            let g = new_cipher(kind, Mode::Gcm, &key(32)).unwrap();
            let mut data = [1u8; 40];
            let mut tag = [0u8; 16];
            g.encrypt(&[0; 12], b"x", &mut data, &mut tag).unwrap();
            tag[3] ^= 1;
            assert_eq!(g.decrypt(&[0; 12], b"x", &mut data, &tag), Err(CoreError::AuthFailed));
            assert_eq!(data, [0u8; 40], "failed open must not leave plaintext behind");
        }
    }
}
