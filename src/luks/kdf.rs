//! Hashes and key derivation for LUKS: PBKDF2 (LUKS1 and LUKS2) and Argon2i/Argon2id (LUKS2).
//!
//! Both come from RustCrypto (`pbkdf2`, `argon2`, `sha1`, `sha2`) rather than hand-written code:
//! a KDF that is wrong in one byte still "works" against itself, and only matches cryptsetup
//! if it is the real algorithm. This module only maps LUKS's names and parameters onto them and
//! measures how many iterations fit a time budget, as cryptsetup's `--iter-time` does.

use std::time::{Duration, Instant};

use sha1::Sha1;
use sha2::{Digest, Sha256, Sha384, Sha512};
use zeroize::Zeroizing;

use crate::error::{Error, LuksError, Result};

/// A hash LUKS names in `hash_spec` (LUKS1), `af.hash` and `digest.hash` (LUKS2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1 (LUKS1's historical default).
    Sha1,
    /// SHA-256 (today's default of cryptsetup and qemu-img).
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Parses the name as LUKS writes it (`sha256`).
    pub fn parse(name: &str, field: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Ok(HashAlg::Sha1),
            "sha256" => Ok(HashAlg::Sha256),
            "sha384" => Ok(HashAlg::Sha384),
            "sha512" => Ok(HashAlg::Sha512),
            n if KNOWN_ELSEWHERE.iter().any(|k| n == *k || n.starts_with(&format!("{k}-"))) => {
                Err(Error::Luks(LuksError::Unsupported(format!(
                    "{field}: hash `{name}` is valid for cryptsetup but not implemented here \
                     (sha1, sha256, sha384, sha512 are)"
                ))))
            }
            _ => Err(Error::Luks(LuksError::CorruptHeader {
                field: field.to_string(),
                reason: format!("`{name}` is not a hash LUKS knows"),
            })),
        }
    }

    /// The name LUKS writes.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The hash of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            h.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts),
            HashAlg::Sha256 => run::<Sha256>(parts),
            HashAlg::Sha384 => run::<Sha384>(parts),
            HashAlg::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2::pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }

    /// How many PBKDF2 iterations take `budget` on this machine for a `key_len`-byte output (at
    /// least `min`), measured like cryptsetup's benchmark: time a fixed count, scale.
    pub fn pbkdf2_iterations_for(self, budget: Duration, min: u32, key_len: usize) -> u32 {
        let probe = 20_000u32;
        let mut out = [0u8; 32];
        let start = Instant::now();
        self.pbkdf2(b"benchmark passphrase", &[0x5a; 32], probe, &mut out[..self.digest_len().min(32)]);
        let took = start.elapsed();
        self.pbkdf2_iterations_from(probe, took, budget, min, key_len)
    }

    /// The iterations that fill `budget` when `probe` iterations of one output block took
    /// `took`. PBKDF2 runs all its iterations once per digest-sized block of output, so a
    /// 64-byte key with SHA-256 costs twice a 32-byte one: the count is divided accordingly.
    pub fn pbkdf2_iterations_from(
        self,
        probe: u32,
        took: Duration,
        budget: Duration,
        min: u32,
        key_len: usize,
    ) -> u32 {
        let blocks = key_len.div_ceil(self.digest_len()).max(1) as f64;
        let per_iteration = took.as_secs_f64().max(1e-6) / f64::from(probe) * blocks;
        let n = (budget.as_secs_f64() / per_iteration) as u64;
        n.clamp(u64::from(min), u64::from(u32::MAX)) as u32
    }
}

/// Hashes cryptsetup accepts (through the kernel or its crypto library) that this crate does
/// not implement: a header naming one is valid, only unsupported here.
const KNOWN_ELSEWHERE: &[&str] = &[
    "ripemd160",
    "whirlpool",
    "sha224",
    "sha3",
    "blake2b",
    "blake2s",
    "stribog256",
    "stribog512",
    "sm3",
    "streebog",
];

/// Which Argon2 variant (LUKS2 `kdf.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Argon2Kind {
    /// `argon2i`.
    Argon2i,
    /// `argon2id` (cryptsetup's default for LUKS2).
    Argon2id,
}

/// A key slot's key derivation function with its parameters (not the salt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// The HMAC hash.
        hash: HashAlg,
        /// Iterations.
        iterations: u32,
    },
    /// Argon2, version 0x13.
    Argon2 {
        /// i or id.
        kind: Argon2Kind,
        /// Passes (`time`).
        time: u32,
        /// Memory in KiB (`memory`).
        memory_kib: u32,
        /// Lanes (`cpus`).
        parallel: u32,
    },
}

impl Kdf {
    /// Derives `len` bytes from `passphrase` and `salt`.
    pub fn derive(&self, passphrase: &[u8], salt: &[u8], len: usize) -> Result<Zeroizing<Vec<u8>>> {
        let mut out = Zeroizing::new(vec![0u8; len]);
        match *self {
            Kdf::Pbkdf2 { hash, iterations } => hash.pbkdf2(passphrase, salt, iterations, &mut out),
            Kdf::Argon2 { kind, time, memory_kib, parallel } => {
                let bad = |e: argon2::Error| {
                    Error::Luks(LuksError::CorruptHeader {
                        field: "kdf".into(),
                        reason: format!("argon2 parameters refused: {e}"),
                    })
                };
                let params = argon2::Params::new(memory_kib, time, parallel, Some(len)).map_err(bad)?;
                let alg = match kind {
                    Argon2Kind::Argon2i => argon2::Algorithm::Argon2i,
                    Argon2Kind::Argon2id => argon2::Algorithm::Argon2id,
                };
                argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                    .hash_password_into(passphrase, salt, &mut out)
                    .map_err(bad)?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn pbkdf2_matches_rfc_6070_and_rfc_7914() {
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 4096, &mut out);
        assert_eq!(hex(&out), "4b007901b765489abead49d926f721d065a429c1");
        // RFC 7914 section 11, PBKDF2-HMAC-SHA256, c = 1, dkLen = 64.
        let mut out = [0u8; 64];
        HashAlg::Sha256.pbkdf2(b"passwd", b"salt", 1, &mut out);
        assert!(hex(&out).starts_with("55ac046e56e3089fec1691c22544b605"));
    }

    #[test]
    fn argon2id_matches_an_independent_implementation() {
        // Values from Python `cryptography` (OpenSSL's Argon2id):
        // Argon2id(salt=bytes([1]*16), length=32, iterations=T, lanes=P, memory_cost=64).derive(b"pass")
        let k = |time, parallel| {
            let kdf = Kdf::Argon2 { kind: Argon2Kind::Argon2id, time, memory_kib: 64, parallel };
            hex(&kdf.derive(b"pass", &[1; 16], 32).unwrap())
        };
        assert_eq!(k(1, 1), "522c397c0c2990f143685dfdbe10b3425ee4266edcbbbd1184f7517e0b6ebae1");
        assert_eq!(k(2, 2), "1232fcd300025bce807772b70a781b0144117b0d6f95e64b8c88730f158d5fea");
    }

    #[test]
    fn iter_time_counts_every_output_block_of_pbkdf2() {
        // 1000 iterations of one block took 1 s: a 1 s budget is 1000 iterations for a key of
        // one SHA-256 block, 500 for a 512-bit key (two blocks), 250 for SHA-1 and 64 bytes.
        let (probe, took, budget) = (1000, Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(HashAlg::Sha256.pbkdf2_iterations_from(probe, took, budget, 1, 32), 1000);
        assert_eq!(HashAlg::Sha256.pbkdf2_iterations_from(probe, took, budget, 1, 64), 500);
        assert_eq!(HashAlg::Sha1.pbkdf2_iterations_from(probe, took, budget, 1, 64), 250);
        assert_eq!(HashAlg::Sha512.pbkdf2_iterations_from(probe, took, budget, 1, 64), 1000);
    }

    #[test]
    fn sha384_is_supported_and_other_known_hashes_are_unsupported_not_corrupt() {
        let mut out = [0u8; 48];
        HashAlg::parse("sha384", "hash_spec").unwrap().pbkdf2(b"password", b"salt", 1, &mut out);
        // Python: hashlib.pbkdf2_hmac("sha384", b"password", b"salt", 1, 48)
        assert_eq!(
            hex(&out),
            "c0e14f06e49e32d73f9f52ddf1d0c5c7191609233631dadd76a567db42b78676b38fc800cc53ddb642f5c74442e62be4"
        );
        for name in ["ripemd160", "whirlpool", "sha3-256", "stribog512"] {
            assert!(
                matches!(HashAlg::parse(name, "hash_spec"), Err(Error::Luks(LuksError::Unsupported(_)))),
                "{name}"
            );
        }
        assert!(matches!(
            HashAlg::parse("nonsense", "hash_spec"),
            Err(Error::Luks(LuksError::CorruptHeader { .. }))
        ));
    }

    #[test]
    fn bad_argon2_parameters_are_a_header_error() {
        let k = Kdf::Argon2 { kind: Argon2Kind::Argon2id, time: 0, memory_kib: 64, parallel: 1 };
        assert!(matches!(k.derive(b"p", &[1; 16], 32), Err(Error::Luks(LuksError::CorruptHeader { .. }))));
    }
}
