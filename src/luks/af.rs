//! The LUKS anti-forensic splitter (AF split and merge).
//!
//! LUKS never stores a volume key directly: it spreads it over `stripes` (4000) random-looking
//! blocks tied together by a hash "diffusion", so that destroying any part of the key material
//! on disk destroys the key. Both LUKS1 and LUKS2 (`"af": {"type": "luks1"}`) use the same
//! construction, specified in the LUKS1 on-disk format document, section "AF-Splitter".

use zeroize::Zeroizing;

use super::kdf::HashAlg;
use crate::error::{Error, LuksError, Result};

/// The diffusion step: each digest-sized piece of `block` replaced by
/// `H(be32(piece index) || piece)`, the last piece truncated.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let ds = hash.digest_len();
    for (i, piece) in block.chunks_mut(ds).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&d[..n]);
    }
}

/// Recovers the key of `key_len` bytes from `material` (`stripes` blocks of `key_len` bytes; any
/// bytes after them, such as sector padding, are ignored).
pub fn merge(material: &[u8], key_len: usize, stripes: usize, hash: HashAlg) -> Result<Zeroizing<Vec<u8>>> {
    if key_len == 0 || stripes == 0 || material.len() < key_len * stripes {
        return Err(Error::Luks(LuksError::CorruptHeader {
            field: "key material".into(),
            reason: format!("{} bytes cannot hold {stripes} stripes of a {key_len}-byte key", material.len()),
        }));
    }
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    for stripe in material.chunks_exact(key_len).take(stripes - 1) {
        xor_into(&mut d, stripe);
        diffuse(hash, &mut d);
    }
    let last = &material[(stripes - 1) * key_len..stripes * key_len];
    xor_into(&mut d, last);
    Ok(d)
}

/// Splits `key` into `stripes` blocks: all but the last random, the last chosen so that
/// [`merge`] gives `key` back.
pub fn split(key: &[u8], stripes: usize, hash: HashAlg) -> Zeroizing<Vec<u8>> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    rand::fill(&mut out[..n * (stripes - 1)]);
    let mut d = Zeroizing::new(vec![0u8; n]);
    for stripe in out[..n * (stripes - 1)].chunks_exact(n) {
        xor_into(&mut d, stripe);
        diffuse(hash, &mut d);
    }
    let last = &mut out[n * (stripes - 1)..];
    last.copy_from_slice(&d);
    xor_into(last, key);
    out
}

fn xor_into(acc: &mut [u8], x: &[u8]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a ^= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key_back_for_every_hash_and_odd_lengths() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            for len in [16, 24, 32, 33, 64] {
                let key: Vec<u8> = (0..len as u8).collect();
                let m = split(&key, 4000, hash);
                assert_eq!(m.len(), len * 4000);
                assert_eq!(*merge(&m, len, 4000, hash).unwrap(), key);
                let mut broken = m.clone();
                broken[len * 17] ^= 1;
                assert_ne!(
                    *merge(&broken, len, 4000, hash).unwrap(),
                    key,
                    "one flipped bit destroys the key"
                );
            }
        }
    }

    #[test]
    fn merge_matches_the_specification_worked_by_hand() {
        // Two stripes of 20 bytes with SHA-1: key = diffuse(s0) ^ s1, and diffuse of a 20-byte
        // block is SHA-1(be32(0) || block).
        let s0 = [0x11u8; 20];
        let s1 = [0x22u8; 20];
        let mut material = s0.to_vec();
        material.extend_from_slice(&s1);
        let h = HashAlg::Sha1.digest(&[&[0, 0, 0, 0], &s0]);
        let want: Vec<u8> = h.iter().zip(s1).map(|(a, b)| a ^ b).collect();
        assert_eq!(*merge(&material, 20, 2, HashAlg::Sha1).unwrap(), want);
    }

    #[test]
    fn short_material_is_a_header_error() {
        assert!(matches!(
            merge(&[0; 100], 32, 4000, HashAlg::Sha256),
            Err(Error::Luks(LuksError::CorruptHeader { .. }))
        ));
    }
}
