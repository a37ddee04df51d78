//! Writes to the same sectors at once, as an NBD server with several clients (or one client
//! with several requests in flight) issues them: afterwards every sector holds exactly one of
//! the writes, a read at any moment gets the data of a whole write, and a write of a partial
//! sector never puts back bytes that another write replaced.

mod common;
mod support;

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use crypt_vfio::virtio_crypto::VirtioCrypto;
use crypt_vfio::volume::{AuthVolume, BlockDevice, Volume, VolumeParams};
use support::scratch;

const SECTOR: usize = 512;
/// Sectors every writer covers: several per request so that requests overlap in part too.
const SECTORS: usize = 16;

fn engine() -> Arc<VirtioCrypto> {
    Arc::new(common::device())
}

fn rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap()
}

fn auth_volume(dir: &Path) -> AuthVolume<VirtioCrypto> {
    AuthVolume::format(engine(), rw(&dir.join("auth.img")), &[0x42; 32], SECTOR as u32, 64 << 10).unwrap()
}

fn plain_volume(dir: &Path) -> Volume<VirtioCrypto> {
    let f = rw(&dir.join("plain.img"));
    f.set_len(64 << 10).unwrap();
    let params = VolumeParams {
        sector_size: SECTOR as u32,
        ..VolumeParams::plain("aes-xts-plain64".parse().unwrap())
    };
    let key: Vec<u8> = (0..64u8).collect();
    Volume::open(engine(), f, true, &key, params).unwrap()
}

/// Writers hammer the same sectors with whole-sector writes of one byte value each (ranges
/// that overlap in full and in part) while readers read them: no read may fail, and every
/// sector must be one write's (uniform) at the end. `reads_see_whole_writes`: every sector a
/// read returns is one write's too (an authenticated volume promises it: it checks data and
/// tag together; a plain volume, like a disk, may return a sector being written half-way).
fn same_sectors_from_many_threads(dev: &dyn BlockDevice, reads_see_whole_writes: bool) {
    const WRITERS: usize = 6;
    const ROUNDS: usize = 1500;
    let writing = AtomicBool::new(true);
    let check_sector = |s: &[u8], what: &str| {
        assert!(s.iter().all(|&b| b == s[0]), "{what}: a sector mixes two writes: {:?}", &s[..8]);
    };
    // A plain volume's unwritten sectors decrypt to noise: start from sectors of one value.
    dev.write_at(0, &vec![0xffu8; 2 * SECTORS * SECTOR]).unwrap();
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                scope.spawn(move || {
                    for r in 0..ROUNDS {
                        // Byte values 1..: never the zeroes of a fresh volume.
                        let value = (1 + t * ROUNDS + r) as u8 | 1;
                        let first = (t % 3) * SECTORS / 4;
                        let data = vec![value; SECTORS * SECTOR];
                        dev.write_at((first * SECTOR) as u64, &data).unwrap();
                    }
                })
            })
            .collect();
        for _ in 0..3 {
            scope.spawn(|| {
                let mut buf = vec![0u8; 2 * SECTORS * SECTOR];
                while writing.load(Ordering::SeqCst) {
                    dev.read_at(0, &mut buf).expect("a read while others write the same sectors");
                    if reads_see_whole_writes {
                        buf.chunks(SECTOR).for_each(|s| check_sector(s, "while writing"));
                    }
                }
            });
        }
        for w in writers {
            w.join().unwrap();
        }
        writing.store(false, Ordering::SeqCst);
    });
    let mut buf = vec![0u8; 2 * SECTORS * SECTOR];
    dev.read_at(0, &mut buf).expect("every sector reads after the writes");
    buf.chunks(SECTOR).for_each(|s| check_sector(s, "after the writes"));
}

/// A whole-sector write and an unaligned write over the same sectors start together, many
/// times: the end result must be one of the two orders, never the unaligned write's patch over
/// the contents from before both (the whole-sector write lost).
fn partial_and_whole_writes_do_not_lose_each_other(dev: &dyn BlockDevice) {
    const ROUNDS: usize = 150;
    let len = SECTORS * SECTOR;
    // The unaligned write leaves `EDGE` bytes of the first and last sector alone.
    const EDGE: usize = 100;
    let barrier = Barrier::new(2);
    for round in 0..ROUNDS {
        let old = vec![0x11u8; len];
        let whole = vec![0x22u8; len];
        let patch = vec![0x33u8; len - 2 * EDGE];
        dev.write_at(0, &old).unwrap();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                barrier.wait();
                dev.write_at(0, &whole).unwrap();
            });
            barrier.wait();
            dev.write_at(EDGE as u64, &patch).unwrap();
        });
        let mut back = vec![0u8; len];
        dev.read_at(0, &mut back).unwrap();
        let edges = back[..EDGE].iter().chain(&back[len - EDGE..]);
        assert!(
            edges.clone().all(|&b| b == 0x22),
            "round {round}: the bytes around the unaligned write are not the whole-sector write's: \
             {:?} (0x11 is the content from before: an update was lost)",
            edges.copied().collect::<Vec<_>>().iter().take(4).collect::<Vec<_>>()
        );
        let middle = &back[EDGE..len - EDGE];
        assert!(
            middle.iter().all(|&b| b == 0x22) || middle.iter().all(|&b| b == 0x33),
            "round {round}: the middle mixes the two writes"
        );
    }
}

#[test]
fn authenticated_sectors_written_at_once_always_authenticate() {
    let dir = scratch();
    same_sectors_from_many_threads(&auth_volume(dir.path()), true);
}

#[test]
fn authenticated_partial_and_whole_sector_writes_at_once_keep_both() {
    let dir = scratch();
    partial_and_whole_writes_do_not_lose_each_other(&auth_volume(dir.path()));
}

#[test]
fn plain_volume_sectors_written_at_once_hold_one_write() {
    let dir = scratch();
    same_sectors_from_many_threads(&plain_volume(dir.path()), false);
}

#[test]
fn plain_volume_partial_and_whole_sector_writes_at_once_keep_both() {
    let dir = scratch();
    partial_and_whole_writes_do_not_lose_each_other(&plain_volume(dir.path()));
}
