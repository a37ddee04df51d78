//! The reference core: RustCrypto's AES modes.
//!
//! Portable and constant-time, slower than aws-lc (see `shared/notes/performance-anchors.md`).
//! It is the yardstick that the fast core is cross-checked against.

use aes::cipher::array::Array;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt};
use aes::cipher::{InnerIvInit, KeyInit, StreamCipher};
use aes::{Aes128, Aes192, Aes256};
use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes128Gcm, Aes256Gcm};
use xts_mode::Xts128;
use zeroize::Zeroize;

use crate::{check_op, CipherCore, CoreError, Mode};

pub(crate) fn new_cipher(mode: Mode, key: &[u8]) -> Result<Box<dyn CipherCore>, CoreError> {
    // Key lengths were checked by the caller, so `new_from_slice` cannot fail below.
    let bad = |_| CoreError::Internal { mode, what: "key schedule" };
    Ok(match (mode, key.len()) {
        (Mode::Gcm, 16) => Box::new(Gcm(Aes128Gcm::new_from_slice(key).map_err(bad)?)),
        (Mode::Gcm, _) => Box::new(Gcm(Aes256Gcm::new_from_slice(key).map_err(bad)?)),
        (Mode::Xts, 32) => Box::new(xts::<Aes128>(key)?),
        // AES-192-XTS: what qemu-img writes for cipher-alg=aes-192, and dm-crypt opens.
        (Mode::Xts, 48) => Box::new(xts::<Aes192>(key)?),
        (Mode::Xts, _) => Box::new(xts::<Aes256>(key)?),
        (Mode::Cbc, 16) => Box::new(Cbc(Aes128::new_from_slice(key).map_err(bad)?)),
        (Mode::Cbc, 24) => Box::new(Cbc(Aes192::new_from_slice(key).map_err(bad)?)),
        (Mode::Cbc, _) => Box::new(Cbc(Aes256::new_from_slice(key).map_err(bad)?)),
        (Mode::Ctr, 16) => Box::new(Ctr(Aes128::new_from_slice(key).map_err(bad)?)),
        (Mode::Ctr, 24) => Box::new(Ctr(Aes192::new_from_slice(key).map_err(bad)?)),
        (Mode::Ctr, _) => Box::new(Ctr(Aes256::new_from_slice(key).map_err(bad)?)),
    })
}

struct Gcm<A>(A);

impl<A> CipherCore for Gcm<A>
where
    A: AeadInOut<NonceSize = aes::cipher::consts::U12, TagSize = aes::cipher::consts::U16> + Send + Sync,
{
    fn mode(&self) -> Mode {
        Mode::Gcm
    }

    fn encrypt(&self, iv: &[u8], aad: &[u8], data: &mut [u8], tag: &mut [u8]) -> Result<(), CoreError> {
        check_op(Mode::Gcm, iv, data.len(), tag.len())?;
        let nonce =
            Array::try_from(iv).map_err(|_| CoreError::Internal { mode: Mode::Gcm, what: "nonce" })?;
        let t = self.0.encrypt_inout_detached(&nonce, aad, data.into()).map_err(|_| {
            CoreError::DataLength { mode: Mode::Gcm, len: data.len(), rule: "below 2^36 bytes" }
        })?;
        tag.copy_from_slice(&t);
        Ok(())
    }

    fn decrypt(&self, iv: &[u8], aad: &[u8], data: &mut [u8], tag: &[u8]) -> Result<(), CoreError> {
        check_op(Mode::Gcm, iv, data.len(), tag.len())?;
        let nonce =
            Array::try_from(iv).map_err(|_| CoreError::Internal { mode: Mode::Gcm, what: "nonce" })?;
        let tag = Array::try_from(tag).map_err(|_| CoreError::TagLength(tag.len()))?;
        self.0.decrypt_inout_detached(&nonce, aad, (&mut *data).into(), &tag).map_err(|_| {
            data.zeroize();
            CoreError::AuthFailed
        })
    }
}

fn xts<C: KeyInit + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>>(
    key: &[u8],
) -> Result<Xts<C>, CoreError> {
    let (k1, k2) = key.split_at(key.len() / 2);
    let bad = |_| CoreError::Internal { mode: Mode::Xts, what: "key schedule" };
    Ok(Xts(Xts128::new(C::new_from_slice(k1).map_err(bad)?, C::new_from_slice(k2).map_err(bad)?)))
}

struct Xts<C>(Xts128<C>);

impl<C> CipherCore for Xts<C>
where
    C: BlockCipherEncrypt
        + BlockCipherDecrypt
        + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
    C: Send + Sync,
{
    fn mode(&self) -> Mode {
        Mode::Xts
    }

    fn encrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &mut [u8]) -> Result<(), CoreError> {
        check_op(Mode::Xts, iv, data.len(), 0)?;
        let tweak =
            Array::try_from(iv).map_err(|_| CoreError::Internal { mode: Mode::Xts, what: "tweak" })?;
        self.0.encrypt_sector(data, tweak);
        Ok(())
    }

    fn decrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &[u8]) -> Result<(), CoreError> {
        check_op(Mode::Xts, iv, data.len(), 0)?;
        let tweak =
            Array::try_from(iv).map_err(|_| CoreError::Internal { mode: Mode::Xts, what: "tweak" })?;
        self.0.decrypt_sector(data, tweak);
        Ok(())
    }
}

struct Cbc<C>(C);

impl<C> CipherCore for Cbc<C>
where
    C: BlockCipherEncrypt
        + BlockCipherDecrypt
        + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
    C: Clone + Send + Sync,
{
    fn mode(&self) -> Mode {
        Mode::Cbc
    }

    fn encrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &mut [u8]) -> Result<(), CoreError> {
        check_op(Mode::Cbc, iv, data.len(), 0)?;
        let mut enc = cbc::Encryptor::<C>::inner_iv_slice_init(self.0.clone(), iv)
            .map_err(|_| CoreError::Internal { mode: Mode::Cbc, what: "iv" })?;
        let (blocks, _) = Array::slice_as_chunks_mut(data);
        enc.encrypt_blocks(blocks);
        Ok(())
    }

    fn decrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &[u8]) -> Result<(), CoreError> {
        check_op(Mode::Cbc, iv, data.len(), 0)?;
        let mut dec = cbc::Decryptor::<C>::inner_iv_slice_init(self.0.clone(), iv)
            .map_err(|_| CoreError::Internal { mode: Mode::Cbc, what: "iv" })?;
        let (blocks, _) = Array::slice_as_chunks_mut(data);
        dec.decrypt_blocks(blocks);
        Ok(())
    }
}

struct Ctr<C>(C);

impl<C> Ctr<C>
where
    C: BlockCipherEncrypt + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16> + Clone,
{
    fn apply(&self, iv: &[u8], data: &mut [u8]) -> Result<(), CoreError> {
        check_op(Mode::Ctr, iv, data.len(), 0)?;
        let core = ctr::CtrCore::<C, ctr::flavors::Ctr128BE>::inner_iv_slice_init(self.0.clone(), iv)
            .map_err(|_| CoreError::Internal { mode: Mode::Ctr, what: "iv" })?;
        let mut ctr = ctr::Ctr128BE::<C>::from_core(core);
        ctr.apply_keystream(data);
        Ok(())
    }
}

impl<C> CipherCore for Ctr<C>
where
    C: BlockCipherEncrypt + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
    C: Clone + Send + Sync,
{
    fn mode(&self) -> Mode {
        Mode::Ctr
    }

    fn encrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &mut [u8]) -> Result<(), CoreError> {
        self.apply(iv, data)
    }

    fn decrypt(&self, iv: &[u8], _aad: &[u8], data: &mut [u8], _tag: &[u8]) -> Result<(), CoreError> {
        self.apply(iv, data)
    }
}
