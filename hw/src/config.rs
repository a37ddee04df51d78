//! What kind of device to emulate: queue counts, worker threads, timing and fault injection.
//!
//! A test or benchmark chooses the device it runs against here, the way one would pick a card
//! model and firmware settings; nothing in it can be changed once the device exists, because a
//! real function's capabilities do not change under a running driver either.

use std::time::Duration;

use crypt_vfio_cores::CoreKind;
use crypt_vfio_spec::crypto::{aead, cipher};
use crypt_vfio_spec::pci::feature;
use crypt_vfio_spec::ring::MAX_QUEUE_SIZE;

use crate::error::HwError;

/// Feature bits the device model knows how to honour; offering anything else would be a lie.
pub(crate) const SUPPORTED_FEATURES: u64 = (1 << feature::VERSION_1)
    | (1 << feature::ACCESS_PLATFORM)
    | (1 << feature::RING_EVENT_IDX)
    | (1 << feature::RING_INDIRECT_DESC);

/// Most data queues: the notify region (4 KiB, 4 bytes per queue) holds 1024 doorbells, one of
/// which belongs to the control queue.
pub const MAX_DATA_QUEUES: u16 = 1023;

/// Settings of an emulated virtio-crypto function.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Number of data queues (at least 1); the control queue's index is `data_queues`.
    pub data_queues: u16,
    /// Largest queue size (a power of two up to 32768). `queue_size` reads this value; the
    /// driver may write a smaller power of two.
    pub max_queue_size: u16,
    /// Worker threads serving the data queues (at least 1).
    pub workers: usize,
    /// Time added to every data request between being taken from the ring and completing.
    pub latency: Duration,
    /// Uniformly random extra time, `0..latency_jitter`, added on top of `latency`.
    pub latency_jitter: Duration,
    /// Device-wide limit of data requests taken from the rings but not yet completed; 0 means no
    /// limit. Models a small hardware queue behind the rings.
    pub inflight_limit: usize,
    /// Complete ready requests in random order rather than in the order they were taken.
    pub out_of_order: bool,
    /// Fraction (0 to 1) of data requests that complete with status ERR and write no data.
    pub error_rate: f64,
    /// Which AES implementation does the arithmetic.
    pub core: CoreKind,
    /// Complete data requests with status OK without copying data or running AES, to measure
    /// what the driver costs on its own. Requests are still validated.
    pub null_crypto: bool,
    /// Cipher algorithm numbers offered (`crypto::cipher`): any of AES_CBC, AES_CTR, AES_XTS.
    pub cipher_algos: Vec<u32>,
    /// AEAD algorithm numbers offered (`crypto::aead`): GCM or nothing.
    pub aead_algos: Vec<u32>,
    /// `max_size` in the device configuration; requests with more source bytes complete with ERR.
    pub max_size: u64,
    /// Most sessions alive at once; creating one more answers NOSPC.
    pub max_sessions: usize,
    /// Offered feature bits: a subset of VERSION_1, ACCESS_PLATFORM, RING_EVENT_IDX and
    /// RING_INDIRECT_DESC.
    pub features: u64,
    /// Seed of the random choices (jitter, completion order, injected errors), so that a failing
    /// run can be replayed.
    pub seed: u64,
    /// Longest a worker polls with nothing to do before it sleeps until the next doorbell (it
    /// spins less when the driver answers faster). About what a sleep and wake-up cost here:
    /// spinning longer never pays, and on a busy machine it takes the CPU from the driver.
    pub idle_spin: Duration,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            data_queues: 4,
            max_queue_size: 256,
            workers: 1,
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            inflight_limit: 0,
            out_of_order: false,
            error_rate: 0.0,
            core: CoreKind::Fast,
            null_crypto: false,
            cipher_algos: vec![cipher::AES_CBC, cipher::AES_CTR, cipher::AES_XTS],
            aead_algos: vec![aead::GCM],
            max_size: 1 << 20,
            max_sessions: 1024,
            features: SUPPORTED_FEATURES,
            seed: 0x5eed_c0de,
            idle_spin: Duration::from_micros(50),
        }
    }
}

impl DeviceConfig {
    /// Checks that the settings describe a device the model can be.
    pub(crate) fn validate(&self) -> Result<(), HwError> {
        let bad = |what: String| Err(HwError::InvalidConfig(what));
        if self.data_queues == 0 || self.data_queues > MAX_DATA_QUEUES {
            return bad(format!("data_queues must be 1..={MAX_DATA_QUEUES}, not {}", self.data_queues));
        }
        if !self.max_queue_size.is_power_of_two() || self.max_queue_size > MAX_QUEUE_SIZE {
            return bad(format!(
                "max_queue_size must be a power of two up to {MAX_QUEUE_SIZE}, not {}",
                self.max_queue_size
            ));
        }
        if self.workers == 0 || self.workers > 256 {
            return bad(format!("workers must be 1..=256, not {}", self.workers));
        }
        if !(0.0..=1.0).contains(&self.error_rate) {
            return bad(format!("error_rate must be in [0, 1], not {}", self.error_rate));
        }
        if let Some(a) = self
            .cipher_algos
            .iter()
            .find(|a| ![cipher::AES_CBC, cipher::AES_CTR, cipher::AES_XTS].contains(a))
        {
            return bad(format!("cipher algorithm {a} is not one the AES cores implement"));
        }
        if let Some(a) = self.aead_algos.iter().find(|&&a| a != aead::GCM) {
            return bad(format!("AEAD algorithm {a} is not one the AES cores implement"));
        }
        if self.features & !SUPPORTED_FEATURES != 0 {
            return bad(format!(
                "features {:#x} include bits the device model does not implement",
                self.features & !SUPPORTED_FEATURES
            ));
        }
        if self.max_size > u64::from(u32::MAX) - 16 {
            return bad(format!("max_size {} does not fit the 32-bit request lengths", self.max_size));
        }
        Ok(())
    }

    /// Number of virtqueues: the data queues and the control queue.
    pub(crate) fn num_queues(&self) -> u16 {
        self.data_queues + 1
    }

    /// Index of the control queue.
    pub(crate) fn ctrl_queue(&self) -> u16 {
        self.data_queues
    }

    /// MSI-X vectors: one for configuration changes and one per virtqueue.
    pub(crate) fn msix_vectors(&self) -> u16 {
        self.data_queues + 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bad_settings_are_refused() {
        DeviceConfig::default().validate().unwrap();
        let cases: [fn(&mut DeviceConfig); 7] = [
            |c| c.data_queues = 0,
            |c| c.max_queue_size = 100,
            |c| c.workers = 0,
            |c| c.error_rate = 1.5,
            |c| c.cipher_algos = vec![cipher::AES_ECB],
            |c| c.aead_algos = vec![aead::CCM],
            |c| c.features |= 1 << feature::RING_PACKED,
        ];
        for f in cases {
            let mut c = DeviceConfig::default();
            f(&mut c);
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
