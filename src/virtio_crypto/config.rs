//! What a virtio-crypto device says about itself in its configuration space.

use std::fmt;

use crypt_vfio_cores::Mode;
use crypt_vfio_spec::crypto::{aead, cipher, config, service, VIRTIO_CRYPTO_S_HW_READY};

use crate::virtio::VirtioPci;

/// The device configuration (virtio 1.2 section 5.9.4), as read at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `status` (bit 0: hardware ready).
    pub status: u32,
    /// Data queues the device has.
    pub max_dataqueues: u32,
    /// Bit mask of services.
    pub services: u32,
    /// Bit mask of cipher algorithms (low and high words joined).
    pub cipher_algos: u64,
    /// Bit mask of hash algorithms.
    pub hash_algos: u32,
    /// Bit mask of MAC algorithms.
    pub mac_algos: u64,
    /// Bit mask of AEAD algorithms.
    pub aead_algos: u32,
    /// Longest cipher key.
    pub max_cipher_key_len: u32,
    /// Longest authentication key.
    pub max_auth_key_len: u32,
    /// Largest request payload.
    pub max_size: u64,
}

impl DeviceInfo {
    /// Reads the configuration of `pci`; fails if it never reads consistently.
    pub fn read(pci: &VirtioPci) -> crate::error::Result<Self> {
        pci.read_device_config(|w| DeviceInfo {
            status: w.read32(config::STATUS),
            max_dataqueues: w.read32(config::MAX_DATAQUEUES),
            services: w.read32(config::CRYPTO_SERVICES),
            cipher_algos: u64::from(w.read32(config::CIPHER_ALGO_L))
                | (u64::from(w.read32(config::CIPHER_ALGO_H)) << 32),
            hash_algos: w.read32(config::HASH_ALGO),
            mac_algos: u64::from(w.read32(config::MAC_ALGO_L))
                | (u64::from(w.read32(config::MAC_ALGO_H)) << 32),
            aead_algos: w.read32(config::AEAD_ALGO),
            max_cipher_key_len: w.read32(config::MAX_CIPHER_KEY_LEN),
            max_auth_key_len: w.read32(config::MAX_AUTH_KEY_LEN),
            max_size: w.read64(config::MAX_SIZE),
        })
    }

    /// Whether the device says it is ready.
    pub fn ready(&self) -> bool {
        self.status & VIRTIO_CRYPTO_S_HW_READY != 0
    }

    /// Whether the configuration advertises `mode`. Devices may accept more than they advertise
    /// (QEMU's does), so session creation is the real test.
    pub fn advertises(&self, mode: Mode) -> bool {
        let (svc, algo) = wire_algo(mode);
        self.services & (1 << svc) != 0
            && match svc {
                service::AEAD => self.aead_algos & (1 << algo) != 0,
                _ => self.cipher_algos & (1 << algo) != 0,
            }
    }

    /// Names of the advertised services.
    pub fn service_names(&self) -> Vec<&'static str> {
        let names = [(0, "cipher"), (1, "hash"), (2, "mac"), (3, "aead"), (4, "akcipher")];
        names.iter().filter(|(b, _)| self.services & (1 << b) != 0).map(|(_, n)| *n).collect()
    }

    /// Names of the advertised cipher and AEAD algorithms.
    pub fn algorithm_names(&self) -> Vec<String> {
        let mut v: Vec<String> =
            (0..64).filter(|b| self.cipher_algos & (1u64 << b) != 0).map(cipher_name).collect();
        v.extend((0..32).filter(|b| self.aead_algos & (1u32 << b) != 0).map(aead_name));
        v
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ready={} data_queues={} services=[{}] algorithms=[{}] max_key={} max_size={}",
            self.ready(),
            self.max_dataqueues,
            self.service_names().join(","),
            self.algorithm_names().join(","),
            self.max_cipher_key_len,
            self.max_size
        )
    }
}

/// The virtio service and algorithm numbers of `mode`.
pub fn wire_algo(mode: Mode) -> (u32, u32) {
    match mode {
        Mode::Gcm => (service::AEAD, aead::GCM),
        Mode::Xts => (service::CIPHER, cipher::AES_XTS),
        Mode::Cbc => (service::CIPHER, cipher::AES_CBC),
        Mode::Ctr => (service::CIPHER, cipher::AES_CTR),
    }
}

fn cipher_name(bit: u32) -> String {
    match bit {
        1 => "arc4".into(),
        2 => "aes-ecb".into(),
        3 => "aes-cbc".into(),
        4 => "aes-ctr".into(),
        5 => "des-ecb".into(),
        6 => "des-cbc".into(),
        7 => "3des-ecb".into(),
        8 => "3des-cbc".into(),
        9 => "3des-ctr".into(),
        10 => "kasumi-f8".into(),
        11 => "snow3g-uea2".into(),
        12 => "aes-f8".into(),
        13 => "aes-xts".into(),
        14 => "zuc-eea3".into(),
        b => format!("cipher-{b}"),
    }
}

fn aead_name(bit: u32) -> String {
    match bit {
        1 => "aes-gcm".into(),
        2 => "aes-ccm".into(),
        3 => "chacha20-poly1305".into(),
        b => format!("aead-{b}"),
    }
}
