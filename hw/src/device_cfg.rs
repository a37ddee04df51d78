//! The virtio-crypto device configuration (`struct virtio_crypto_config`, virtio 1.2 section
//! 5.9.4): what the device offers, as the driver reads it from BAR4.
//!
//! The structure never changes while the device exists (so `config_generation` stays 0), and
//! is therefore built once as a byte image that reads of any width simply copy from.

use crypt_vfio_spec::crypto::{config, service, VIRTIO_CRYPTO_S_HW_READY};
use crypt_vfio_spec::le::{put_u32, put_u64};

use crate::config::DeviceConfig;

/// Longest cipher key the device takes: an AES-256-XTS key.
pub(crate) const MAX_CIPHER_KEY_LEN: u32 = 64;

/// The configuration structure as bytes.
pub(crate) fn image(cfg: &DeviceConfig) -> [u8; config::SIZE as usize] {
    let mut b = [0u8; config::SIZE as usize];
    let at = |off: u64| off as usize;
    put_u32(&mut b, at(config::STATUS), VIRTIO_CRYPTO_S_HW_READY);
    put_u32(&mut b, at(config::MAX_DATAQUEUES), u32::from(cfg.data_queues));
    let mut services = 0u32;
    if !cfg.cipher_algos.is_empty() {
        services |= 1 << service::CIPHER;
    }
    if !cfg.aead_algos.is_empty() {
        services |= 1 << service::AEAD;
    }
    put_u32(&mut b, at(config::CRYPTO_SERVICES), services);
    let cipher_bits = cfg.cipher_algos.iter().fold(0u64, |m, &a| m | (1u64 << a));
    put_u32(&mut b, at(config::CIPHER_ALGO_L), cipher_bits as u32);
    put_u32(&mut b, at(config::CIPHER_ALGO_H), (cipher_bits >> 32) as u32);
    let aead_bits = cfg.aead_algos.iter().fold(0u32, |m, &a| m | (1u32 << a));
    put_u32(&mut b, at(config::AEAD_ALGO), aead_bits);
    put_u32(&mut b, at(config::MAX_CIPHER_KEY_LEN), MAX_CIPHER_KEY_LEN);
    put_u64(&mut b, at(config::MAX_SIZE), cfg.max_size);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crypt_vfio_spec::crypto::{aead, cipher};
    use crypt_vfio_spec::le::{u32_at, u64_at};

    #[test]
    fn default_image() {
        let b = image(&DeviceConfig::default());
        assert_eq!(u32_at(&b, 0), VIRTIO_CRYPTO_S_HW_READY);
        assert_eq!(u32_at(&b, 4), 4);
        assert_eq!(u32_at(&b, 8), (1 << service::CIPHER) | (1 << service::AEAD));
        assert_eq!(u32_at(&b, 12), (1 << cipher::AES_CBC) | (1 << cipher::AES_CTR) | (1 << cipher::AES_XTS));
        assert_eq!(u32_at(&b, 32), 1 << aead::GCM);
        assert_eq!(u32_at(&b, 36), 64);
        assert_eq!(u64_at(&b, 48), 1 << 20);
    }
}
