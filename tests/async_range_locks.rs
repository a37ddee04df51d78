//! Futures that write the same sectors, polled together on one thread (as `join` or a
//! single-threaded executor does): the one that waits for the range must not block the thread,
//! or the one that holds it is never polled again and both hang for ever.

mod common;
mod support;

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crypt_vfio::transport::emulated::EmulatedConfig;
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions, VirtioCrypto};
use crypt_vfio::volume::{AuthVolume, Volume, VolumeParams};
use futures::executor::block_on;
use support::scratch;

const SECTOR: usize = 512;

fn plain_volume(path: &Path, completion: CompletionMode) -> Volume<VirtioCrypto> {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap();
    f.set_len(64 << 10).unwrap();
    let params = VolumeParams {
        sector_size: SECTOR as u32,
        ..VolumeParams::plain("aes-xts-plain64".parse().unwrap())
    };
    let key: Vec<u8> = (0..64u8).collect();
    let options = DeviceOptions { completion, ..DeviceOptions::default() };
    let engine = Arc::new(common::device_with(EmulatedConfig::default(), &options).0);
    Volume::open(engine, f, true, &key, params).unwrap()
}

/// Runs `f` on another thread; fails the test (instead of hanging it) after `secs` seconds.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).unwrap_or_else(|_| panic!("{what}: hung for {secs} s"))
}

fn same_sectors_on_one_thread(completion: CompletionMode) {
    let dir = scratch();
    let path = dir.path().join("plain.img");
    within(60, "futures writing the same sectors on one thread", move || {
        let v = plain_volume(&path, completion);
        let a = vec![0xaau8; 8 * SECTOR];
        let b = vec![0xbbu8; 8 * SECTOR];
        for _ in 0..20 {
            // Two whole-sector writes of the same range.
            let (ra, rb) = block_on(futures::future::join(v.write_at_async(0, &a), v.write_at_async(0, &b)));
            ra.unwrap();
            rb.unwrap();
            // A whole-sector write and a read-modify-write of a partial sector in its range.
            let (ra, rb) =
                block_on(futures::future::join(v.write_at_async(0, &a), v.write_at_async(100, &b[..SECTOR])));
            ra.unwrap();
            rb.unwrap();
            // Writes and a read in between.
            let mut back = vec![0u8; 8 * SECTOR];
            let (ra, rr, rb) = block_on(futures::future::join3(
                v.write_at_async(0, &a),
                v.read_at_async(0, &mut back),
                v.write_at_async(SECTOR as u64, &b[..2 * SECTOR]),
            ));
            ra.unwrap();
            rr.unwrap();
            rb.unwrap();
        }
        let mut back = vec![0u8; 8 * SECTOR];
        v.read_at(0, &mut back).unwrap();
        assert!(back[..SECTOR].iter().all(|&x| x == 0xaa));
        assert!(back[SECTOR..3 * SECTOR].iter().all(|&x| x == 0xbb));
    });
}

#[test]
fn polled_futures_writing_the_same_sectors_on_one_thread_all_finish() {
    same_sectors_on_one_thread(CompletionMode::Poll);
}

#[test]
fn interrupt_driven_futures_writing_the_same_sectors_on_one_thread_all_finish() {
    same_sectors_on_one_thread(CompletionMode::Interrupt);
}

#[test]
fn authenticated_read_futures_on_one_thread_finish_while_another_thread_writes_their_sectors() {
    // A write waiting for the first read future's range holds back the second (writer
    // preference); the second must then wait without blocking the thread that has to poll
    // the first, or reader, writer and thread wait on each other for ever.
    let dir = scratch();
    let path = dir.path().join("auth.img");
    within(60, "authenticated read futures beside a writer", move || {
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).unwrap();
        let v =
            AuthVolume::format(Arc::new(common::device()), f, &[0x42; 32], SECTOR as u32, 64 << 10).unwrap();
        let writing = AtomicBool::new(true);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 0u8;
                while writing.load(Ordering::SeqCst) {
                    n = n.wrapping_add(1);
                    v.write_at(0, &[n; 8 * SECTOR]).unwrap();
                }
            });
            for _ in 0..300 {
                let (mut a, mut b) = (vec![0u8; 8 * SECTOR], vec![0u8; 8 * SECTOR]);
                let (ra, rb) = block_on(futures::future::join(
                    v.read_sectors_async(0, &mut a),
                    v.read_sectors_async(0, &mut b),
                ));
                ra.unwrap();
                rb.unwrap();
            }
            writing.store(false, Ordering::SeqCst);
        });
    });
}
