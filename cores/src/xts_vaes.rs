//! XTS blocks on VAES, AVX-512 and VPCLMULQDQ: four blocks per AES instruction, 32 in flight.
//!
//! The `aes` crate's VAES batches reach only about half of what the instructions allow when the
//! crate is not built with target features (it dispatches at run time, and the XTS code around
//! the batch cannot be fused into it), which left AES-128-XTS well behind aws-lc's AES-256-XTS.
//! Here the whole data unit runs in one function compiled for these features: the tweaks of
//! four blocks sit in one register and are multiplied by powers of α with a carry-less multiply, the tweak XOR is
//! folded into the first and the last round key, and eight registers (512 bytes) are in flight so
//! the AES latency is hidden. Used only when the CPU has every feature; otherwise
//! [`crate::xts::AesBlocks`] runs.
//!
//! The key schedule (FIPS 197 §5.2) uses AESKEYGENASSIST for SubWord, so it has no table lookups.

use core::arch::x86_64::*;

use zeroize::Zeroize;

use crate::xts::{mul_alpha, XtsBlocks};

/// Up to 15 round keys (AES-256), as the bytes AESENC takes.
type RoundKeys = [[u8; 16]; 15];

/// The same round keys, each repeated for the four lanes of a 512-bit register, so that a data
/// unit starts with plain loads.
type RoundKeys4 = [[u8; 64]; 15];

/// Registers of four blocks kept in flight by the main loop.
const IN_FLIGHT: usize = 8;

/// Expanded data key (both directions) and tweak key of one XTS key; wiped on drop.
pub(crate) struct VaesBlocks {
    rounds: usize,
    enc: RoundKeys4,
    dec: RoundKeys4,
    tweak: RoundKeys,
}

impl Drop for VaesBlocks {
    fn drop(&mut self) {
        self.wipe();
    }
}

fn cpu_has_every_feature() -> bool {
    is_x86_feature_detected!("aes")
        && is_x86_feature_detected!("sse4.1")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
}

impl VaesBlocks {
    /// Overwrites every round key with zeros (volatile writes that the compiler keeps).
    fn wipe(&mut self) {
        self.enc.zeroize();
        self.dec.zeroize();
        self.tweak.zeroize();
    }

    /// Expands K1 || K2 (32, 48 or 64 bytes); `None` when the CPU lacks a feature this needs.
    pub(crate) fn new(key: &[u8]) -> Option<Self> {
        if !cpu_has_every_feature() || ![32, 48, 64].contains(&key.len()) {
            return None;
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        // SAFETY: the CPU has AES-NI and SSE4.1, checked above.
        let ((mut enc, mut dec, rounds), (tweak, mut tweak_dec, _)) = unsafe { (expand(k1), expand(k2)) };
        let this = Self { rounds, enc: four_lanes(&enc), dec: four_lanes(&dec), tweak };
        enc.zeroize();
        dec.zeroize();
        tweak_dec.zeroize();
        Some(this)
    }
}

impl XtsBlocks for VaesBlocks {
    fn first_tweak(&self, iv: [u8; 16]) -> u128 {
        // SAFETY: `new` checked that the CPU has AES-NI and SSE4.1.
        unsafe { encrypt_one(&self.tweak, self.rounds, iv) }
    }

    fn blocks(&self, encrypt: bool, tweak: u128, data: &mut [u8]) -> u128 {
        // SAFETY: `new` checked that the CPU has every feature `xts_blocks` enables.
        unsafe {
            match (self.rounds, encrypt) {
                (10, true) => xts_blocks::<10, true>(&self.enc, tweak, data),
                (10, false) => xts_blocks::<10, false>(&self.dec, tweak, data),
                (12, true) => xts_blocks::<12, true>(&self.enc, tweak, data),
                (12, false) => xts_blocks::<12, false>(&self.dec, tweak, data),
                (_, true) => xts_blocks::<14, true>(&self.enc, tweak, data),
                (_, false) => xts_blocks::<14, false>(&self.dec, tweak, data),
            }
        }
    }
}

fn four_lanes(keys: &RoundKeys) -> RoundKeys4 {
    let mut out = [[0u8; 64]; 15];
    for (o, k) in out.iter_mut().zip(keys) {
        for lane in o.chunks_exact_mut(16) {
            lane.copy_from_slice(k);
        }
    }
    out
}

#[inline]
#[target_feature(enable = "sse2")]
fn from_bytes(b: [u8; 16]) -> __m128i {
    let lo = i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let hi = i64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    _mm_set_epi64x(hi, lo)
}

#[inline]
#[target_feature(enable = "sse2")]
fn from_u128(v: u128) -> __m128i {
    _mm_set_epi64x((v >> 64) as i64, v as i64)
}

#[inline]
#[target_feature(enable = "sse4.1")]
fn to_u128(x: __m128i) -> u128 {
    let lo = _mm_cvtsi128_si64(x) as u64;
    let hi = _mm_extract_epi64::<1>(x) as u64;
    (u128::from(hi) << 64) | u128::from(lo)
}

#[inline]
#[target_feature(enable = "aes")]
fn sub_word(w: u32) -> u32 {
    // AESKEYGENASSIST puts SubWord of its second 32-bit lane in the first.
    _mm_cvtsi128_si32(_mm_aeskeygenassist_si128::<0>(_mm_set_epi32(0, 0, w as i32, 0))) as u32
}

/// FIPS 197 key expansion for a 16-, 24- or 32-byte key, with words as little-endian integers
/// (so RotWord is a right rotation); returns encryption keys, the equivalent inverse cipher's
/// decryption keys, and the number of rounds.
#[target_feature(enable = "aes,sse4.1")]
fn expand(key: &[u8]) -> (RoundKeys, RoundKeys, usize) {
    let nk = key.len() / 4;
    let rounds = nk + 6;
    let mut w = [0u32; 60];
    for (wi, c) in w.iter_mut().zip(key.chunks_exact(4)) {
        *wi = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    let mut rcon = 1u32;
    for i in nk..4 * (rounds + 1) {
        let mut t = w[i - 1];
        if i % nk == 0 {
            t = sub_word(t).rotate_right(8) ^ rcon;
            rcon = (rcon << 1) ^ ((rcon >> 7) * 0x11b);
        } else if nk > 6 && i % nk == 4 {
            t = sub_word(t);
        }
        w[i] = w[i - nk] ^ t;
    }
    let mut enc = [[0u8; 16]; 15];
    for (r, rk) in enc.iter_mut().enumerate().take(rounds + 1) {
        for (j, word) in rk.chunks_exact_mut(4).enumerate() {
            word.copy_from_slice(&w[4 * r + j].to_le_bytes());
        }
    }
    w.zeroize();
    let mut dec = [[0u8; 16]; 15];
    dec[0] = enc[rounds];
    dec[rounds] = enc[0];
    for r in 1..rounds {
        dec[r] = to_u128(_mm_aesimc_si128(from_bytes(enc[rounds - r]))).to_le_bytes();
    }
    (enc, dec, rounds)
}

#[target_feature(enable = "aes,sse4.1")]
fn encrypt_one(keys: &RoundKeys, rounds: usize, block: [u8; 16]) -> u128 {
    let mut b = _mm_xor_si128(from_bytes(block), from_bytes(keys[0]));
    for k in &keys[1..rounds] {
        b = _mm_aesenc_si128(b, from_bytes(*k));
    }
    to_u128(_mm_aesenclast_si128(b, from_bytes(keys[rounds])))
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load(bytes: &[u8; 64]) -> __m512i {
    // SAFETY: `bytes` is 64 readable bytes; the unaligned load has no alignment requirement.
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn store(bytes: &mut [u8; 64], v: __m512i) {
    // SAFETY: `bytes` is 64 writable bytes; the unaligned store has no alignment requirement.
    unsafe { _mm512_storeu_si512(bytes.as_mut_ptr().cast(), v) }
}

/// Multiplies each 128-bit tweak of `t` by α^s, s being the shift count of its two 64-bit
/// halves (0 ≤ s ≤ 55): a left shift across the halves, and the s bits shifted out of the top
/// reduced by x^128 = x^7+x^2+x+1, a carry-less multiply by 0x87 that stays below 2^64 (a count
/// of 64 shifts everything out, so s = 0 is the identity). Branch-free.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_alpha_pow(t: __m512i, shift: __m512i) -> __m512i {
    let top = _mm512_srlv_epi64(t, _mm512_sub_epi64(_mm512_set1_epi64(64), shift));
    let carry = _mm512_bslli_epi128::<8>(top);
    let reduced = _mm512_clmulepi64_epi128::<0x01>(top, _mm512_set1_epi64(0x87));
    _mm512_xor_si512(_mm512_xor_si512(_mm512_sllv_epi64(t, shift), carry), reduced)
}

/// The whitening, rounds and final whitening of `N` registers; each tweak is folded into the
/// first and the last round key (AddRoundKey is the last step of AESENCLAST).
#[inline]
#[target_feature(enable = "avx512f,vaes")]
fn crypt<const NR: usize, const ENC: bool, const N: usize>(
    k: &[__m512i; 15],
    b: &mut [__m512i; N],
    tweaks: &[__m512i; N],
) {
    for (bj, tj) in b.iter_mut().zip(tweaks) {
        *bj = _mm512_xor_si512(*bj, _mm512_xor_si512(*tj, k[0]));
    }
    for kr in &k[1..NR] {
        for bj in b.iter_mut() {
            *bj = if ENC { _mm512_aesenc_epi128(*bj, *kr) } else { _mm512_aesdec_epi128(*bj, *kr) };
        }
    }
    for (bj, tj) in b.iter_mut().zip(tweaks) {
        let last = _mm512_xor_si512(k[NR], *tj);
        *bj = if ENC { _mm512_aesenclast_epi128(*bj, last) } else { _mm512_aesdeclast_epi128(*bj, last) };
    }
}

/// XTS over whole blocks with `NR` rounds, `keys` for the direction `ENC`; returns the tweak of
/// the block after the last.
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes,sse4.1")]
fn xts_blocks<const NR: usize, const ENC: bool>(keys: &RoundKeys4, tweak: u128, data: &mut [u8]) -> u128 {
    let mut k = [_mm512_setzero_si512(); 15];
    for (kr, rk) in k.iter_mut().zip(keys).take(NR + 1) {
        *kr = load(rk);
    }
    // The tweaks of the next four blocks, one per 128-bit lane: T·α^0 .. T·α^3.
    let mut t =
        mul_alpha_pow(_mm512_broadcast_i32x4(from_u128(tweak)), _mm512_setr_epi64(0, 0, 1, 1, 2, 2, 3, 3));

    let (groups, partial) = data.as_chunks_mut::<64>();
    let mut batches = groups.chunks_exact_mut(IN_FLIGHT);
    for batch in &mut batches {
        // Each register's tweaks straight from `t`, so they do not wait on one another.
        let mut tweaks = [t; IN_FLIGHT];
        for (j, tw) in tweaks.iter_mut().enumerate().skip(1) {
            *tw = mul_alpha_pow(t, _mm512_set1_epi64(4 * j as i64));
        }
        t = mul_alpha_pow(t, _mm512_set1_epi64(4 * IN_FLIGHT as i64));
        let mut b = [_mm512_setzero_si512(); IN_FLIGHT];
        for (bj, g) in b.iter_mut().zip(batch.iter()) {
            *bj = load(g);
        }
        crypt::<NR, ENC, IN_FLIGHT>(&k, &mut b, &tweaks);
        for (bj, g) in b.iter().zip(batch.iter_mut()) {
            store(g, *bj);
        }
    }
    for g in batches.into_remainder() {
        let mut b = [load(g)];
        crypt::<NR, ENC, 1>(&k, &mut b, &[t]);
        store(g, b[0]);
        t = mul_alpha_pow(t, _mm512_set1_epi64(4));
    }
    let mut next = to_u128(_mm512_castsi512_si128(t));
    if !partial.is_empty() {
        // One to three blocks: through a full register, the unused lanes ignored.
        let mut buf = [0u8; 64];
        buf[..partial.len()].copy_from_slice(partial);
        let mut b = [load(&buf)];
        crypt::<NR, ENC, 1>(&k, &mut b, &[t]);
        store(&mut buf, b[0]);
        partial.copy_from_slice(&buf[..partial.len()]);
        buf.zeroize();
        for _ in 0..partial.len() / 16 {
            next = mul_alpha(next);
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_schedule_matches_fips_197() {
        if !cpu_has_every_feature() {
            eprintln!("skipped: the CPU lacks VAES/AVX-512");
            return;
        }
        // FIPS 197 Appendix A: the last round key of each key size.
        let k128 = hex_bytes("2b7e151628aed2a6abf7158809cf4f3c");
        let k192 = hex_bytes("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b");
        let k256 = hex_bytes("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
        for (key, last) in [
            (k128, "d014f9a8c9ee2589e13f0cc8b6630ca6"),
            (k192, "e98ba06f448c773c8ecc720401002202"),
            (k256, "fe4890d1e6188d0b046df344706c631e"),
        ] {
            // SAFETY: features checked above.
            let (enc, _, rounds) = unsafe { expand(&key) };
            assert_eq!(enc[rounds].to_vec(), hex_bytes(last), "{}-byte key", key.len());
        }
    }

    /// The VAES blocks against the `aes` crate's, for every AES key size and every length up to
    /// three main-loop batches, so each loop and the partial register are covered whichever one
    /// `fast.rs` picks.
    #[test]
    fn vaes_blocks_match_the_aes_crate_blocks() {
        use crate::xts::{AesBlocks, XtsBlocks};
        if !cpu_has_every_feature() {
            eprintln!("skipped: the CPU lacks VAES/AVX-512");
            return;
        }
        fn check<C: crate::xts::XtsCipher>(key: &[u8]) {
            let v = VaesBlocks::new(key).unwrap();
            let a = AesBlocks::<C>::new(key).unwrap();
            let iv: [u8; 16] = core::array::from_fn(|i| (i * 29 + key.len()) as u8 | 0x80);
            assert_eq!(v.first_tweak(iv), a.first_tweak(iv));
            let t0 = v.first_tweak(iv);
            for blocks in 0..=3 * 32 + 5 {
                let plain: Vec<u8> = (0..blocks * 16).map(|i| (i * 131 + blocks) as u8).collect();
                for encrypt in [true, false] {
                    let (mut x, mut y) = (plain.clone(), plain.clone());
                    let tv = v.blocks(encrypt, t0, &mut x);
                    let ta = a.blocks(encrypt, t0, &mut y);
                    assert!(x == y, "{}-byte key, {blocks} blocks, encrypt {encrypt}", key.len());
                    assert_eq!(tv, ta, "next tweak after {blocks} blocks");
                }
            }
        }
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5c).collect();
        check::<aes::Aes128>(&key[..32]);
        check::<aes::Aes192>(&key[..48]);
        check::<aes::Aes256>(&key);
    }

    #[test]
    fn wipe_clears_every_round_key() {
        let Some(mut v) = VaesBlocks::new(&(1..=32).collect::<Vec<u8>>()) else {
            eprintln!("skipped: the CPU lacks VAES/AVX-512");
            return;
        };
        assert!(v.enc[10] != [0; 64] && v.dec[5] != [0; 64] && v.tweak[1] != [0; 16]);
        v.wipe();
        assert!([v.enc, v.dec].iter().flatten().all(|k| *k == [0; 64]));
        assert!(v.tweak.iter().all(|k| *k == [0; 16]));
    }

    fn hex_bytes(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }
}
