//! The fast core: aws-lc.
//!
//! GCM, CBC and CTR go through `aws-lc-rs`. AES-256-XTS goes through `aws-lc-sys`
//! (`EVP_aes_256_xts`) because `aws-lc-rs` has no XTS API; aws-lc has no AES-128-XTS, so 32-byte
//! XTS keys run on [`crate::xts`], XTS built on the `aes` crate's multi-block AES.

use std::ptr;
use std::sync::Mutex;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use aws_lc_rs::cipher::{
    DecryptingKey, DecryptionContext, EncryptingKey, EncryptionContext, UnboundCipherKey, AES_128, AES_192,
    AES_256,
};
use aws_lc_rs::iv::FixedLength;
use zeroize::Zeroize;

use crate::{check_op, CipherCore, CoreError, Mode};

pub(crate) fn new_cipher(mode: Mode, key: &[u8]) -> Result<Box<dyn CipherCore>, CoreError> {
    let rejected = |_| CoreError::KeyRejected { mode, reason: "aws-lc refused the key" };
    Ok(match mode {
        Mode::Gcm => {
            let alg = if key.len() == 16 { &AES_128_GCM } else { &AES_256_GCM };
            Box::new(Gcm(LessSafeKey::new(UnboundKey::new(alg, key).map_err(rejected)?)))
        }
        Mode::Xts if key.len() == 32 => crate::xts::new_fast::<aes::Aes128>(key)?,
        Mode::Xts if key.len() == 48 => crate::xts::new_fast::<aes::Aes192>(key)?,
        Mode::Xts => Box::new(Xts256::new(key)?),
        Mode::Cbc | Mode::Ctr => {
            let alg = match key.len() {
                16 => &AES_128,
                24 => &AES_192,
                _ => &AES_256,
            };
            let unbound = || UnboundCipherKey::new(alg, key).map_err(rejected);
            let (enc, dec) = if mode == Mode::Cbc {
                (EncryptingKey::cbc(unbound()?), DecryptingKey::cbc(unbound()?))
            } else {
                (EncryptingKey::ctr(unbound()?), DecryptingKey::ctr(unbound()?))
            };
            Box::new(Block { mode, enc: enc.map_err(rejected)?, dec: dec.map_err(rejected)? })
        }
    })
}

struct Gcm(LessSafeKey);

impl CipherCore for Gcm {
    fn mode(&self) -> Mode {
        Mode::Gcm
    }

    fn encrypt(&self, iv: &[u8], aad: &[u8], data: &mut [u8], tag: &mut [u8]) -> Result<(), CoreError> {
        check_op(Mode::Gcm, iv, data.len(), tag.len())?;
        let nonce = Nonce::try_assume_unique_for_key(iv).map_err(|_| CoreError::IvLength {
            mode: Mode::Gcm,
            len: iv.len(),
            expected: 12,
        })?;
        let t = self.0.seal_in_place_separate_tag(nonce, Aad::from(aad), data).map_err(|_| {
            CoreError::DataLength { mode: Mode::Gcm, len: data.len(), rule: "below 2^36 bytes" }
        })?;
        tag.copy_from_slice(t.as_ref());
        Ok(())
    }

    fn decrypt(&self, iv: &[u8], aad: &[u8], data: &mut [u8], tag: &[u8]) -> Result<(), CoreError> {
        check_op(Mode::Gcm, iv, data.len(), tag.len())?;
        let nonce = Nonce::try_assume_unique_for_key(iv).map_err(|_| CoreError::IvLength {
            mode: Mode::Gcm,
            len: iv.len(),
            expected: 12,
        })?;
        match self.0.open_in_place_separate_tag(nonce, Aad::from(aad), tag, data) {
            Ok(_) => Ok(()),
            Err(_) => {
                // aws-lc may have written unverified plaintext: never leave it behind.
                data.zeroize();
                Err(CoreError::AuthFailed)
            }
        }
    }
}

struct Block {
    mode: Mode,
    enc: EncryptingKey,
    dec: DecryptingKey,
}

impl Block {
    fn iv(&self, iv: &[u8]) -> Result<[u8; 16], CoreError> {
        iv.try_into().map_err(|_| CoreError::IvLength { mode: self.mode, len: iv.len(), expected: 16 })
    }
}

impl CipherCore for Block {
    fn mode(&self) -> Mode {
        self.mode
    }

    fn encrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &mut [u8]) -> Result<(), CoreError> {
        check_op(self.mode, iv, data.len(), 0)?;
        let ctx = EncryptionContext::Iv128(FixedLength::from(self.iv(iv)?));
        self.enc
            .less_safe_encrypt(data, ctx)
            .map(|_| ())
            .map_err(|_| CoreError::Internal { mode: self.mode, what: "encrypt" })
    }

    fn decrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &[u8]) -> Result<(), CoreError> {
        check_op(self.mode, iv, data.len(), 0)?;
        let ctx = DecryptionContext::Iv128(FixedLength::from(self.iv(iv)?));
        self.dec
            .decrypt(data, ctx)
            .map(|_| ())
            .map_err(|_| CoreError::Internal { mode: self.mode, what: "decrypt" })
    }
}

/// An owned `EVP_CIPHER_CTX` keyed for one direction.
struct EvpCtx(ptr::NonNull<aws_lc_sys::EVP_CIPHER_CTX>);

// SAFETY: an EVP_CIPHER_CTX is plain heap state with no thread affinity; the pool below hands
// each one to a single thread at a time.
unsafe impl Send for EvpCtx {}

impl Drop for EvpCtx {
    fn drop(&mut self) {
        // SAFETY: the pointer came from EVP_CIPHER_CTX_new and is freed once; free cleanses the
        // key schedule.
        unsafe { aws_lc_sys::EVP_CIPHER_CTX_free(self.0.as_ptr()) }
    }
}

/// AES-256-XTS through aws-lc's EVP interface.
///
/// An EVP context is mutable state (it holds the tweak), so each operation takes one from a
/// small per-direction pool; the pools stay as large as the number of threads using the session
/// at once, and the lock is held only to pop and push.
struct Xts256 {
    key: zeroize::Zeroizing<Vec<u8>>,
    pools: [Mutex<Vec<EvpCtx>>; 2],
}

impl Xts256 {
    fn new(key: &[u8]) -> Result<Self, CoreError> {
        let this = Self { key: zeroize::Zeroizing::new(key.to_vec()), pools: Default::default() };
        // Key it once now so that a key aws-lc refuses is reported at session creation.
        let ctx = this.new_ctx(true)?;
        this.pools[1].lock().unwrap_or_else(|e| e.into_inner()).push(ctx);
        Ok(this)
    }

    fn new_ctx(&self, encrypt: bool) -> Result<EvpCtx, CoreError> {
        // SAFETY: EVP_CIPHER_CTX_new has no preconditions; a null return is handled.
        let raw = unsafe { aws_lc_sys::EVP_CIPHER_CTX_new() };
        let ctx = EvpCtx(
            ptr::NonNull::new(raw)
                .ok_or(CoreError::Internal { mode: Mode::Xts, what: "EVP_CIPHER_CTX_new" })?,
        );
        // SAFETY: ctx is a fresh context, the cipher is a static, and the key is 64 bytes as
        // EVP_aes_256_xts requires (checked by new_cipher).
        let ok = unsafe {
            aws_lc_sys::EVP_CipherInit_ex(
                ctx.0.as_ptr(),
                aws_lc_sys::EVP_aes_256_xts(),
                ptr::null_mut(),
                self.key.as_ptr(),
                ptr::null(),
                i32::from(encrypt),
            )
        };
        if ok != 1 {
            return Err(CoreError::KeyRejected { mode: Mode::Xts, reason: "aws-lc refused the XTS key" });
        }
        Ok(ctx)
    }

    fn run(&self, encrypt: bool, iv: &[u8], data: &mut [u8]) -> Result<(), CoreError> {
        check_op(Mode::Xts, iv, data.len(), 0)?;
        let iv: &[u8; 16] = iv.try_into().map_err(|_| CoreError::IvLength {
            mode: Mode::Xts,
            len: iv.len(),
            expected: 16,
        })?;
        let ctx = self.take_ctx(encrypt)?;
        let r = Self::update(&ctx, iv, data);
        self.pools[usize::from(encrypt)].lock().unwrap_or_else(|e| e.into_inner()).push(ctx);
        r
    }

    /// A context keyed for the direction, from the pool or new; the caller gives it back.
    fn take_ctx(&self, encrypt: bool) -> Result<EvpCtx, CoreError> {
        let popped = self.pools[usize::from(encrypt)].lock().unwrap_or_else(|e| e.into_inner()).pop();
        match popped {
            Some(c) => Ok(c),
            None => self.new_ctx(encrypt),
        }
    }

    /// One data unit through `ctx` under the tweak `iv`.
    fn update(ctx: &EvpCtx, iv: &[u8; 16], data: &mut [u8]) -> Result<(), CoreError> {
        let len = i32::try_from(data.len()).map_err(|_| CoreError::DataLength {
            mode: Mode::Xts,
            len: data.len(),
            rule: "below 2 GiB",
        })?;
        let mut out_len = 0i32;
        // SAFETY: ctx is keyed for this direction; passing null cipher and key keeps them and sets
        // only the 16-byte tweak (iv is 16 bytes by its type). Update reads and writes `len` bytes of
        // `data`, in place, which aws-lc's XTS supports.
        let ok = unsafe {
            aws_lc_sys::EVP_CipherInit_ex(
                ctx.0.as_ptr(),
                ptr::null(),
                ptr::null_mut(),
                ptr::null(),
                iv.as_ptr(),
                -1,
            ) == 1
                && aws_lc_sys::EVP_CipherUpdate(
                    ctx.0.as_ptr(),
                    data.as_mut_ptr(),
                    &mut out_len,
                    data.as_ptr(),
                    len,
                ) == 1
        };
        if ok && out_len == len {
            Ok(())
        } else {
            Err(CoreError::Internal { mode: Mode::Xts, what: "EVP_CipherUpdate" })
        }
    }
}

impl CipherCore for Xts256 {
    fn mode(&self) -> Mode {
        Mode::Xts
    }

    fn encrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &mut [u8]) -> Result<(), CoreError> {
        self.run(true, iv, data)
    }

    fn decrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &[u8]) -> Result<(), CoreError> {
        self.run(false, iv, data)
    }

    fn crypt_units(
        &self,
        encrypt: bool,
        unit: usize,
        iv_of: &dyn Fn(usize) -> [u8; crate::BLOCK_LEN],
        data: &mut [u8],
    ) -> Result<(), (usize, CoreError)> {
        crate::check_units(Mode::Xts, unit, data.len())?;
        // One context for the whole run: the pool's lock is taken twice per run, not per unit.
        let ctx = self.take_ctx(encrypt).map_err(|e| (0, e))?;
        let r = data
            .chunks_exact_mut(unit)
            .enumerate()
            .try_for_each(|(i, u)| Self::update(&ctx, &iv_of(i), u).map_err(|e| (i, e)));
        self.pools[usize::from(encrypt)].lock().unwrap_or_else(|e| e.into_inner()).push(ctx);
        r
    }
}
