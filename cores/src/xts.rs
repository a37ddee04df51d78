//! XTS (IEEE 1619) built on a multi-block AES, for the key sizes aws-lc's XTS does not take.
//!
//! aws-lc only has `EVP_aes_256_xts`, and RustCrypto's `xts-mode` encrypts one block at a time,
//! so AES-128-XTS (cryptsetup's default `aes-xts-plain64` with a 256-bit key) ran about 25 times
//! slower than AES-256-XTS. [`Xts`] holds what every backend shares (the checks, the first tweak,
//! ciphertext stealing); an [`XtsBlocks`] backend does the whole blocks of a data unit with the
//! tweaks computed first, XORed in, the blocks encrypted many at a time, and XORed again.
//! [`crate::xts_vaes`] is the fast backend; [`AesBlocks`] (the `aes` crate's parallel batches,
//! with the XORs inside its backend closure) runs on CPUs without VAES and AVX-512.
//! aws-lc's `EVP_aes_128_ecb` was measured as a block source too: it calls a one-block function
//! per block, 4.5 GB/s on 4 KiB against 6.8 for the `aes` crate's batches (one run).
//!
//! A final partial block uses ciphertext stealing exactly as IEEE 1619-2007 §5.3.2 and §5.4.2,
//! so the result is the same as `xts-mode`'s and the Linux kernel's.

use aes::cipher::array::{Array, ArraySize};
use aes::cipher::consts::U16;
use aes::cipher::{
    Block, BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
    BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, InOut, KeyInit, ParBlocksSizeUser,
};
use zeroize::Zeroize;

use crate::{check_op, CipherCore, CoreError, Mode};

/// One AES block as the `aes` crate sees it.
type AesBlock = Array<u8, U16>;

/// An AES block cipher the XTS construction can run on (`aes::Aes128`, `aes::Aes192`, ...).
pub(crate) trait XtsCipher:
    BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit + Send + Sync
{
}

impl<C> XtsCipher for C where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit + Send + Sync
{
}

/// The whole-block work of XTS on one implementation of AES; [`Xts`] adds the tweak of the data
/// unit, the checks and ciphertext stealing around it.
pub(crate) trait XtsBlocks: Send + Sync {
    /// T_0 = AES_K2(iv), as a little-endian integer.
    fn first_tweak(&self, iv: [u8; 16]) -> u128;

    /// Encrypts or decrypts `data` (whole 16-byte blocks) in place, the first block with
    /// `tweak`; returns the tweak of the block after the last.
    fn blocks(&self, encrypt: bool, tweak: u128, data: &mut [u8]) -> u128;
}

/// XTS over any [`XtsBlocks`]: the same checks, tweak and ciphertext stealing for every backend.
pub(crate) struct Xts<B>(pub(crate) B);

impl<B: XtsBlocks> Xts<B> {
    fn run(&self, encrypt: bool, iv: &[u8], data: &mut [u8]) -> Result<(), CoreError> {
        check_op(Mode::Xts, iv, data.len(), 0)?;
        let iv: [u8; 16] = iv.try_into().map_err(|_| CoreError::IvLength {
            mode: Mode::Xts,
            len: iv.len(),
            expected: 16,
        })?;
        let mut tweak = self.0.first_tweak(iv);
        let partial = data.len() % 16;
        let full = data.len() / 16;
        // With a partial block, the last full block takes part in ciphertext stealing below.
        let bulk = if partial == 0 { full } else { full - 1 };
        let (head, tail) = data.split_at_mut(bulk * 16);
        tweak = self.0.blocks(encrypt, tweak, head);
        if partial != 0 {
            self.steal(encrypt, tail, tweak);
        }
        tweak.zeroize();
        Ok(())
    }

    /// Ciphertext stealing over the last full block and the partial block after it; `tweak` is
    /// the last full block's tweak T_{m-1}. Encryption uses T_{m-1} then T_m, decryption T_m
    /// then T_{m-1}; otherwise both directions move the same bytes (IEEE 1619 §5.3.2, §5.4.2).
    fn steal(&self, encrypt: bool, tail: &mut [u8], tweak: u128) {
        let (last, partial) = tail.split_at_mut(16);
        let next = mul_alpha(tweak);
        let (first, second) = if encrypt { (tweak, next) } else { (next, tweak) };
        let mut cc = [0u8; 16];
        cc.copy_from_slice(last);
        self.0.blocks(encrypt, first, &mut cc);
        let r = partial.len();
        let mut pp = cc;
        pp[..r].copy_from_slice(partial);
        partial.copy_from_slice(&cc[..r]);
        self.0.blocks(encrypt, second, &mut pp);
        last.copy_from_slice(&pp);
        cc.zeroize();
        pp.zeroize();
    }
}

impl<B: XtsBlocks> CipherCore for Xts<B> {
    fn mode(&self) -> Mode {
        Mode::Xts
    }

    fn encrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &mut [u8]) -> Result<(), CoreError> {
        self.run(true, iv, data)
    }

    fn decrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &[u8]) -> Result<(), CoreError> {
        self.run(false, iv, data)
    }
}

/// The fastest XTS this CPU runs for a key of `C`'s size (K1 || K2): VAES and AVX-512 where
/// present ([`crate::xts_vaes`]), else the `aes` crate's batches.
pub(crate) fn new_fast<C: XtsCipher + 'static>(key: &[u8]) -> Result<Box<dyn CipherCore>, CoreError> {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = crate::xts_vaes::VaesBlocks::new(key) {
        return Ok(Box::new(Xts(v)));
    }
    Ok(Box::new(Xts(AesBlocks::<C>::new(key)?)))
}

/// XTS blocks on the `aes` crate: portable, and the fallback where [`crate::xts_vaes`] does not
/// run. Holds the data key K1 and the tweak key K2; the `aes` crate (feature `zeroize`) wipes both
/// key schedules on drop.
pub(crate) struct AesBlocks<C> {
    data: C,
    tweak: C,
}

impl<C: XtsCipher> AesBlocks<C> {
    /// Splits `key` into K1 || K2; the caller has checked the length and that the halves differ.
    pub(crate) fn new(key: &[u8]) -> Result<Self, CoreError> {
        let (k1, k2) = key.split_at(key.len() / 2);
        let bad = |_| CoreError::Internal { mode: Mode::Xts, what: "key schedule" };
        Ok(Self { data: C::new_from_slice(k1).map_err(bad)?, tweak: C::new_from_slice(k2).map_err(bad)? })
    }
}

impl<C: XtsCipher> XtsBlocks for AesBlocks<C> {
    fn first_tweak(&self, iv: [u8; 16]) -> u128 {
        let mut t0 = AesBlock::from(iv);
        self.tweak.encrypt_block(&mut t0);
        let tweak = u128::from_le_bytes(t0.0);
        t0.0.zeroize();
        tweak
    }

    fn blocks(&self, encrypt: bool, mut tweak: u128, data: &mut [u8]) -> u128 {
        let (blocks, _) = AesBlock::slice_as_chunks_mut(data);
        if encrypt {
            self.data.encrypt_with_backend(EncryptUnits { blocks, tweak: &mut tweak });
        } else {
            self.data.decrypt_with_backend(DecryptUnits { blocks, tweak: &mut tweak });
        }
        tweak
    }
}

/// Multiplies a tweak by the primitive element α of GF(2^128), in IEEE 1619's little-endian
/// convention: a left shift of the 128-bit little-endian integer, reduced by x^128 = x^7+x^2+x+1.
/// Branch-free, so the time does not depend on the tweak.
#[inline(always)]
pub(crate) fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

#[inline(always)]
fn xor_tweak(block: &mut AesBlock, tweak: u128) {
    block.0 = (u128::from_le_bytes(block.0) ^ tweak).to_le_bytes();
}

/// Runs the whole-block part of a data unit on one backend: `par` encrypts or decrypts a batch
/// of `P` blocks in parallel, `one` a single block. `tweak` enters as T_0 and leaves as the
/// tweak of the block after the last one processed.
#[inline(always)]
fn units<P: ArraySize>(
    blocks: &mut [AesBlock],
    tweak: &mut u128,
    mut par: impl FnMut(&mut Array<AesBlock, P>),
    mut one: impl FnMut(&mut AesBlock),
) {
    let mut tweaks: Array<u128, P> = Array::default();
    let (batches, rest) = Array::<AesBlock, P>::slice_as_chunks_mut(blocks);
    for batch in batches {
        batch_xor(batch, &mut tweaks, tweak);
        par(batch);
        for (b, t) in batch.iter_mut().zip(tweaks.iter()) {
            xor_tweak(b, *t);
        }
    }
    // A short remainder (a 512-byte sector is 32 blocks, less than a VAES batch) is padded to a
    // full batch when that is cheaper than single blocks, whose AES rounds do not overlap.
    if rest.len() * 8 >= P::USIZE {
        let mut batch: Array<AesBlock, P> = Array::default();
        batch[..rest.len()].copy_from_slice(rest);
        let n = rest.len();
        batch_xor(&mut batch[..n], &mut tweaks, tweak);
        par(&mut batch);
        for ((out, b), t) in rest.iter_mut().zip(batch.iter()).zip(tweaks.iter()) {
            *out = *b;
            xor_tweak(out, *t);
        }
    } else {
        for b in rest {
            xor_tweak(b, *tweak);
            one(b);
            xor_tweak(b, *tweak);
            *tweak = mul_alpha(*tweak);
        }
    }
    // The tweaks are E_K2(iv)·α^j: wipe them (cheap, 16-byte writes). The blocks in flight are
    // the output XORed with a tweak, like every intermediate of `xts-mode`, and are not wiped.
    tweaks.as_mut_slice().zeroize();
}

/// XORs successive tweaks into `blocks`, keeps them in `tweaks`, and advances `tweak`.
#[inline(always)]
fn batch_xor(blocks: &mut [AesBlock], tweaks: &mut [u128], tweak: &mut u128) {
    for (b, t) in blocks.iter_mut().zip(tweaks.iter_mut()) {
        *t = *tweak;
        xor_tweak(b, *tweak);
        *tweak = mul_alpha(*tweak);
    }
}

/// The `aes` crate calls this with the backend for the CPU it runs on (VAES, AES-NI or
/// software); inlined there, the XORs run with the same target features.
struct EncryptUnits<'a> {
    blocks: &'a mut [AesBlock],
    tweak: &'a mut u128,
}

impl BlockSizeUser for EncryptUnits<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for EncryptUnits<'_> {
    #[inline(always)]
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        units::<<B as ParBlocksSizeUser>::ParBlocksSize>(
            self.blocks,
            self.tweak,
            |batch| backend.encrypt_par_blocks(InOut::from(batch)),
            |b: &mut Block<B>| backend.encrypt_block(InOut::from(b)),
        );
    }
}

/// The decrypting twin of [`EncryptUnits`].
struct DecryptUnits<'a> {
    blocks: &'a mut [AesBlock],
    tweak: &'a mut u128,
}

impl BlockSizeUser for DecryptUnits<'_> {
    type BlockSize = U16;
}

impl BlockCipherDecClosure for DecryptUnits<'_> {
    #[inline(always)]
    fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, backend: &B) {
        units::<<B as ParBlocksSizeUser>::ParBlocksSize>(
            self.blocks,
            self.tweak,
            |batch| backend.decrypt_par_blocks(InOut::from(batch)),
            |b: &mut Block<B>| backend.decrypt_block(InOut::from(b)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_follows_ieee_1619_little_endian_convention() {
        // Doubling moves bit 7 of byte 0 into bit 0 of byte 1 ...
        assert_eq!(
            mul_alpha(u128::from_le_bytes([0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])),
            1 << 8
        );
        // ... and a carry out of byte 15 bit 7 folds back as 0x87 into byte 0.
        let top = u128::from_le_bytes([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80]);
        assert_eq!(mul_alpha(top).to_le_bytes()[0], 0x87);
        assert_eq!(mul_alpha(top) >> 8, 0);
    }
}
