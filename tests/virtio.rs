//! The virtio layer against the emulated device: feature negotiation, notification suppression,
//! interrupts, and the DMA pool's IOVA view.

mod common;

use std::sync::Arc;

use crypt_vfio::dma::DmaPool;
use crypt_vfio::engine::{Buf, Direction, Engine};
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedTransport};
use crypt_vfio::transport::Transport;
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions, VirtioCrypto};
use crypt_vfio::{DeviceError, Error, Mode};
use crypt_vfio_spec::pci::feature;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn a_device_without_version_1_is_refused_by_name() {
    let config = EmulatedConfig { features: 1 << feature::ACCESS_PLATFORM, ..Default::default() };
    let t = Arc::new(EmulatedTransport::new(config).unwrap());
    match VirtioCrypto::open(t, &DeviceOptions::default()) {
        Err(Error::Device(DeviceError::Init(m))) => {
            assert!(m.contains("[32]"), "the missing bit is named: {m}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a device without VERSION_1"),
    }
}

#[test]
fn features_are_taken_only_where_offered_and_wanted() {
    let all = (1u64 << feature::VERSION_1)
        | (1 << feature::ACCESS_PLATFORM)
        | (1 << feature::RING_EVENT_IDX)
        | (1 << feature::RING_INDIRECT_DESC);
    let (dev, _t) = common::device_with(
        EmulatedConfig { features: all, ..Default::default() },
        &DeviceOptions::default(),
    );
    assert_eq!(dev.features(), all);
    let plain = DeviceOptions { indirect: false, event_idx: false, ..Default::default() };
    let (dev, _t) = common::device_with(EmulatedConfig { features: all, ..Default::default() }, &plain);
    assert_eq!(dev.features(), (1 << feature::VERSION_1) | (1 << feature::ACCESS_PLATFORM));
}

/// Runs `n` requests one at a time and returns the doorbells the device saw.
fn doorbells(options: DeviceOptions, n: u64) -> u64 {
    let (dev, t) = common::device_with(EmulatedConfig::default(), &options);
    let s = dev.create_session(Mode::Ctr, &[1; 32]).unwrap();
    let mut q = common::SyncQueue::open(&dev, 0);
    let before = t.stats().notifications;
    for i in 0..n {
        common::crypt(
            &mut q,
            s.clone(),
            Direction::Encrypt,
            &[i as u8; 16],
            &[],
            Buf::Host(vec![0; 64]),
            [0; 16],
        )
        .unwrap();
    }
    t.stats().notifications - before
}

#[test]
fn event_idx_suppresses_doorbells_while_the_device_polls() {
    // Back-to-back requests keep the device's workers spinning, so with EVENT_IDX they ask for
    // (almost) no doorbells; without it the driver rings unless the device sets NO_NOTIFY.
    // A worker that parks (it may, on a loaded machine) asks for the next doorbell, so the bound
    // is loose; without suppression every request would ring.
    let with = doorbells(DeviceOptions::default(), 2000);
    assert!(with < 1000, "{with} doorbells for 2000 requests with EVENT_IDX");
}

#[test]
fn interrupt_mode_gets_interrupts_and_polling_mode_none() {
    for (mode, expect_irqs) in [(CompletionMode::Poll, false), (CompletionMode::Interrupt, true)] {
        let options = DeviceOptions { completion: mode, ..Default::default() };
        let (dev, t) = common::device_with(
            EmulatedConfig { latency: std::time::Duration::from_millis(1), ..Default::default() },
            &options,
        );
        let s = dev.create_session(Mode::Gcm, &[2; 32]).unwrap();
        let mut q = common::SyncQueue::open(&dev, 0);
        for i in 0..20u8 {
            common::crypt(
                &mut q,
                s.clone(),
                Direction::Encrypt,
                &[i; 12],
                b"a",
                Buf::Host(vec![i; 100]),
                [0; 16],
            )
            .unwrap();
        }
        assert_eq!(t.stats().interrupts > 0, expect_irqs, "{mode:?}: {:?}", t.stats());
    }
}

#[test]
fn pool_buffers_are_visible_at_their_iova_through_the_vm_memory_view() {
    let t: Arc<dyn Transport> = Arc::new(EmulatedTransport::new(EmulatedConfig::default()).unwrap());
    let pool = DmaPool::new(t);
    let mut a = pool.alloc(100).unwrap();
    let mut b = pool.alloc(3 << 20).unwrap(); // larger than a region: a dedicated mapping
    a.as_mut_slice().copy_from_slice(&[0x5a; 100]);
    b.as_mut_slice()[..4].copy_from_slice(b"tail");
    let mem = crypt_vfio::testing::dma_memory(&pool);
    let mut back = [0u8; 100];
    mem.read_slice(&mut back, GuestAddress(a.iova())).unwrap();
    assert_eq!(back, [0x5a; 100]);
    let mut tail = [0u8; 4];
    mem.read_slice(&mut tail, GuestAddress(b.iova())).unwrap();
    assert_eq!(&tail, b"tail");
    assert_ne!(a.iova(), b.iova());
    assert!(a.iova() >= 1 << 20, "IOVAs below 1 MiB are never used");
    let (ia, ib) = (a.iova(), b.iova());
    drop(b);
    assert!(
        crypt_vfio::testing::dma_memory(&pool).read_slice(&mut tail, GuestAddress(ib)).is_err(),
        "a dropped dedicated region is unmapped"
    );
    drop(a);
    let again = pool.alloc(100).unwrap();
    assert_eq!(again.iova(), ia, "small buffers are recycled");
    assert!(again.as_slice().iter().all(|&x| x == 0), "recycled buffers are zeroed");
}

#[test]
fn zero_copy_and_bounced_requests_give_the_same_result() {
    let dev = common::device();
    let s = dev.create_session(Mode::Xts, &(0..64).collect::<Vec<u8>>()).unwrap();
    let mut q = common::SyncQueue::open(&dev, 0);
    let data: Vec<u8> = (0..8192).map(|i| (i * 7) as u8).collect();
    let mut dma = dev.alloc_buffer(data.len()).unwrap();
    dma.as_mut_slice().copy_from_slice(&data);
    let a = common::crypt(&mut q, s.clone(), Direction::Encrypt, &[3; 16], &[], dma, [0; 16]).unwrap().0;
    let b = common::crypt(&mut q, s, Direction::Encrypt, &[3; 16], &[], Buf::Host(data), [0; 16]).unwrap().0;
    assert_eq!(a, b);
}
