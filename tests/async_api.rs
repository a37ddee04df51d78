//! The async API: requests awaited from an executor, with backpressure instead of failures.

mod common;

use std::time::Duration;

use crypt_vfio::engine::async_api::AsyncQueue;
use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{Buf, Engine};
use crypt_vfio::transport::emulated::EmulatedConfig;
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions};
use crypt_vfio::{CoreKind, Error, Mode};
use futures::executor::block_on;
use futures::future::join_all;

const KEY: [u8; 32] = [0x11; 32];

async fn roundtrip_many<S: Clone + Send + Sync + 'static>(q: &AsyncQueue<S>, s: S, n: usize) -> usize {
    let jobs = (0..n).map(|i| {
        let (q, s) = (q.clone(), s.clone());
        async move {
            let plain: Vec<u8> = (0..1024).map(|j| (i + j) as u8).collect();
            let iv = [i as u8; 12];
            let (ct, tag) = q.encrypt(s.clone(), &iv, b"aad", Buf::Host(plain.clone())).await.unwrap();
            assert_ne!(ct.as_slice(), &plain[..]);
            let back = q.decrypt(s, &iv, b"aad", ct, tag).await.unwrap();
            assert_eq!(back.as_slice(), &plain[..]);
        }
    });
    join_all(jobs).await.len()
}

#[test]
fn many_concurrent_futures_on_a_tiny_ring_all_finish() {
    // 300 futures against 8 ring slots and a backlog of 4: most must wait, none may fail.
    let config =
        EmulatedConfig { max_queue_size: 8, latency: Duration::from_micros(5), ..Default::default() };
    let options = DeviceOptions { queue_size: 8, backlog_limit: 4, ..Default::default() };
    let (dev, _t) = common::device_with(config, &options);
    let s = dev.create_session(Mode::Gcm, &KEY).unwrap();
    let q = AsyncQueue::new(&dev, 0, true).unwrap();
    assert_eq!(block_on(roundtrip_many(&q, s, 300)), 300);
}

#[test]
fn interrupt_mode_wakes_futures_without_self_driving() {
    let options =
        DeviceOptions { completion: CompletionMode::Interrupt, queue_size: 16, ..Default::default() };
    let (dev, _t) = common::device_with(EmulatedConfig::default(), &options);
    let s = dev.create_session(Mode::Gcm, &KEY).unwrap();
    let q = AsyncQueue::new(&dev, 0, false).unwrap();
    assert_eq!(block_on(roundtrip_many(&q, s, 100)), 100);
}

#[test]
fn software_engine_through_the_async_api() {
    let sw = SoftwareEngine::new(CoreKind::Reference);
    let s = sw.create_session(Mode::Gcm, &KEY).unwrap();
    let q = AsyncQueue::new(&sw, 0, true).unwrap();
    assert_eq!(block_on(roundtrip_many(&q, s, 50)), 50);
}

#[test]
fn errors_come_back_typed() {
    let dev = common::device();
    let s = dev.create_session(Mode::Gcm, &KEY).unwrap();
    let q = AsyncQueue::new(&dev, 0, true).unwrap();
    let (ct, mut tag) = block_on(q.encrypt(s.clone(), &[1; 12], &[], Buf::Host(vec![1; 64]))).unwrap();
    tag[5] ^= 0x80;
    assert!(matches!(block_on(q.decrypt(s.clone(), &[1; 12], &[], ct, tag)), Err(Error::AuthFailed)));
    assert!(matches!(
        block_on(q.encrypt(s, &[1; 16], &[], Buf::Host(vec![1; 64]))),
        Err(Error::InvalidRequest(_))
    ));
}
