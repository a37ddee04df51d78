//! Futures that write the same sectors, polled together on one thread (as `join` or a
//! single-threaded executor does): the one that waits for the range must not block the thread,
//! or the one that holds it is never polled again and both hang for ever.

mod common;
mod support;

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crypt_vfio::transport::emulated::EmulatedConfig;
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions, VirtioCrypto};
use crypt_vfio::volume::{Volume, VolumeParams};
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
