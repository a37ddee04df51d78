//! `cargo bench`: the raw AES cores, the driver's cost per request against a device that does no
//! crypto work, and 4 KiB AES-256-GCM through the emulated device.
//!
//! The null-cost device measures what the driver and the rings add per request (submit, ring
//! write, doorbell suppression, used-ring read, callback), with batches of 64 in flight; the GCM
//! benchmark is the end-to-end figure next to the core on its own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{Buf, Direction, Engine, Event, Iv, Request, Submitted};
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedTransport};
use crypt_vfio::virtio_crypto::{DeviceOptions, VirtioCrypto};
use crypt_vfio::{CoreKind, Mode};
use crypt_vfio_cores::new_cipher;

fn cores(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    for (mode, key_len) in [(Mode::Gcm, 32), (Mode::Xts, 64), (Mode::Cbc, 32), (Mode::Ctr, 32)] {
        for kind in [CoreKind::Fast, CoreKind::Reference] {
            let cipher = new_cipher(
                kind,
                mode,
                &vec![7u8; key_len / 2].into_iter().chain(vec![9u8; key_len / 2]).collect::<Vec<_>>(),
            )
            .unwrap();
            let mut data = vec![0u8; 4096];
            let iv = vec![1u8; mode.iv_len()];
            let mut tag = [0u8; 16];
            g.throughput(Throughput::Bytes(4096));
            g.bench_function(BenchmarkId::new(format!("{mode}-{}", key_len * 8), kind), |b| {
                b.iter(|| {
                    let t: &mut [u8] = if mode.is_aead() { &mut tag } else { &mut [] };
                    cipher.encrypt(&iv, &[], &mut data, t).unwrap()
                })
            });
        }
    }
    g.finish();
}

/// Pushes `iters` requests through one queue with `qd` in flight; returns the elapsed time.
fn pipeline<E: Engine>(engine: &E, session: &E::Session, size: usize, qd: usize, iters: u64) -> Duration {
    let done: Arc<Mutex<Vec<Buf>>> = Arc::default();
    let sink = done.clone();
    let mut q = engine
        .open_queue(
            0,
            Arc::new(move |ev| {
                if let Event::Completed(c) = ev {
                    sink.lock().unwrap().push(c.request.data)
                }
            }),
        )
        .unwrap();
    let mut free: Vec<Buf> = (0..qd).map(|_| engine.alloc_buffer(size).unwrap()).collect();
    // All sessions here are AES-GCM: a 12-byte IV.
    let iv = Iv::from([3u8; 12]);
    let (mut sent, mut finished) = (0u64, 0u64);
    let start = Instant::now();
    while finished < iters {
        while sent < iters {
            let Some(data) = free.pop() else { break };
            let req = Request::new(session.clone(), Direction::Encrypt, iv, data, sent);
            match q.submit(req, false) {
                Ok(Submitted::InProgress) => sent += 1,
                Ok(Submitted::Backlogged) => unreachable!("backlog not allowed"),
                Err(e) => {
                    free.push(e.request.data);
                    break;
                }
            }
        }
        q.poll();
        let mut d = done.lock().unwrap();
        finished += d.len() as u64;
        free.append(&mut d);
    }
    start.elapsed()
}

fn device(null_crypto: bool) -> VirtioCrypto {
    let config = EmulatedConfig { null_crypto, workers: 1, ..Default::default() };
    let t = Arc::new(EmulatedTransport::new(config).unwrap());
    VirtioCrypto::open(t, &DeviceOptions::default()).unwrap()
}

fn driver(c: &mut Criterion) {
    let mut g = c.benchmark_group("driver");
    g.measurement_time(Duration::from_secs(5));
    let dev = device(true);
    let s = dev.create_session(Mode::Gcm, &[5; 32]).unwrap();
    g.throughput(Throughput::Elements(1));
    g.bench_function("null-device-64B-qd64", |b| b.iter_custom(|iters| pipeline(&dev, &s, 64, 64, iters)));
    drop(dev);

    let dev = device(false);
    let s = dev.create_session(Mode::Gcm, &[5; 32]).unwrap();
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("emulated-aes256gcm-4KiB-qd64", |b| {
        b.iter_custom(|iters| pipeline(&dev, &s, 4096, 64, iters))
    });
    let sw = SoftwareEngine::new(CoreKind::Fast);
    let s = sw.create_session(Mode::Gcm, &[5; 32]).unwrap();
    g.bench_function("software-aes256gcm-4KiB", |b| {
        b.iter_custom(|iters| pipeline(&sw, &s, 4096, 64, iters))
    });
    g.finish();
}

criterion_group!(benches, cores, driver);
criterion_main!(benches);
