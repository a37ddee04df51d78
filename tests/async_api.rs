//! The async API: requests awaited from an executor, with backpressure instead of failures.

mod common;
mod support;

use std::pin::Pin;
use std::time::Duration;

use crypt_vfio::engine::async_api::AsyncQueue;
use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{Buf, Engine};
use crypt_vfio::transport::emulated::EmulatedConfig;
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions};
use crypt_vfio::{CoreKind, CryptoError, Error, Mode};
use futures::executor::block_on;
use futures::future::join_all;
use support::engines::{Behaviour, Wrapped};

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
    assert!(matches!(
        block_on(q.decrypt(s.clone(), &[1; 12], &[], ct, tag)),
        Err(Error::Crypto(CryptoError::AuthFailed))
    ));
    assert!(matches!(
        block_on(q.encrypt(s, &[1; 16], &[], Buf::Host(vec![1; 64]))),
        Err(Error::Crypto(CryptoError::InvalidRequest(_)))
    ));
}

/// Runs `f` on another thread; fails the test if it has not finished within `secs` seconds.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).unwrap_or_else(|_| panic!("{what}: hung for {secs} s"))
}

#[test]
fn a_promoted_that_comes_before_backlogged_does_not_block_later_requests() {
    // The engine says Promoted from inside submit, then Backlogged: the future must not wait for
    // a Promoted that already came, nor make every later request on the queue wait for it.
    let engine = Wrapped::new(SoftwareEngine::new(CoreKind::Fast), Behaviour::PromoteBeforeReturn);
    let backlogged = engine.backlogged.clone();
    let done = within(20, "requests after an early Promoted", move || {
        let s = engine.create_session(Mode::Gcm, &KEY).unwrap();
        let q = AsyncQueue::new(&engine, 0, true).unwrap();
        let mut done = 0;
        for i in 0..20u8 {
            let (ct, tag) = block_on(q.encrypt(s.clone(), &[i; 12], b"", Buf::Host(vec![i; 64]))).unwrap();
            let back = block_on(q.decrypt(s.clone(), &[i; 12], b"", ct, tag)).unwrap();
            assert_eq!(*back.as_slice(), [i; 64]);
            done += 1;
        }
        assert_eq!(q.tracked(), 0);
        done
    });
    assert_eq!(done, 20);
    assert_eq!(backlogged.load(std::sync::atomic::Ordering::Relaxed), 40, "every submit said Backlogged");
}

#[test]
fn a_dropped_future_leaves_no_slot_or_buffer_behind() {
    use std::future::Future;
    use std::task::Context;

    let dev = common::device();
    let s = dev.create_session(Mode::Gcm, &KEY).unwrap();
    let q = AsyncQueue::new(&dev, 0, false).unwrap();
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    for i in 0..8u8 {
        let iv = crypt_vfio::engine::Iv::new(&[i; 12]).unwrap();
        let buf = dev.alloc_buffer(4096).unwrap();
        let req =
            crypt_vfio::engine::Request::new(s.clone(), crypt_vfio::engine::Direction::Encrypt, iv, buf, 0);
        let mut fut = q.run(req);
        // One poll submits it; then the caller loses interest.
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        drop(fut);
    }
    // Let the device finish: a second handle on the same queue reaps and delivers the events.
    let mut other = common::SyncQueue::open(&dev, 0);
    let start = std::time::Instant::now();
    while q.tracked() > 0 && start.elapsed() < Duration::from_secs(10) {
        other.queue.poll();
        std::thread::yield_now();
    }
    assert_eq!(q.tracked(), 0, "completions of dropped futures are kept (with their DMA buffers) forever");
}
