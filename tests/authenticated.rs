//! Authenticated volumes: data round-trips; a tampered, moved or torn sector fails to read with
//! an error naming it and returns nothing unauthenticated; a wrong key or a modified superblock
//! is refused.

mod common;
mod support;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crypt_vfio::virtio_crypto::VirtioCrypto;
use crypt_vfio::volume::authenticated::META_ENTRY_LEN;
use crypt_vfio::volume::{AuthVolume, BlockDevice};
use crypt_vfio::{Error, LuksError, VolumeError};
use support::{pattern, scratch};

const KEY: [u8; 32] = [0x42; 32];

fn engine() -> Arc<VirtioCrypto> {
    Arc::new(common::device())
}

fn rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap()
}

fn new_volume(path: &Path, sector_size: u32, size: u64) -> AuthVolume<VirtioCrypto> {
    AuthVolume::format(engine(), rw(path), &KEY, sector_size, size).unwrap()
}

#[test]
fn data_round_trips_at_any_offset_and_survives_reopening() {
    let dir = scratch();
    let img = dir.path().join("auth.img");
    for ss in [512u32, 4096] {
        let _ = std::fs::remove_file(&img);
        let v = new_volume(&img, ss, 256 << 10);
        let mut zeroes = vec![1u8; 10_000];
        v.read_at(5, &mut zeroes).unwrap();
        assert!(zeroes.iter().all(|&b| b == 0), "a new volume reads as zeroes");
        let data = pattern(100_000, u64::from(ss));
        v.write_at(777, &data).unwrap();
        v.flush().unwrap();
        drop(v);
        let v = AuthVolume::open(engine(), File::open(&img).unwrap(), false, &KEY).unwrap();
        let mut back = vec![0u8; data.len()];
        v.read_at(777, &mut back).unwrap();
        assert!(back == data);
        let mut whole = vec![0u8; 2 * ss as usize];
        futures::executor::block_on(v.read_sectors_async(0, &mut whole)).unwrap();
        assert_eq!(whole[777..2 * ss as usize], data[..2 * ss as usize - 777]);
        assert!(matches!(BlockDevice::write_at(&v, 0, b"x"), Err(Error::Volume(VolumeError::ReadOnly))));
    }
}

fn expect_sector_failure(v: &AuthVolume<VirtioCrypto>, offset: u64, len: usize, sector: u64) {
    let mut buf = vec![0xeeu8; len];
    match v.read_at(offset, &mut buf) {
        Err(Error::Volume(VolumeError::SectorAuthFailed { sector: s })) => assert_eq!(s, sector),
        other => panic!("expected sector {sector} to fail its check, got {other:?}"),
    }
    assert!(buf.iter().all(|&b| b == 0), "nothing unauthenticated is returned");
}

#[test]
fn tampered_data_or_tags_fail_naming_the_sector() {
    let dir = scratch();
    let img = dir.path().join("auth.img");
    let v = new_volume(&img, 512, 64 << 10);
    v.write_at(0, &pattern(64 << 10, 1)).unwrap();
    let sb = *v.superblock();
    let raw = rw(&img);
    // Flip one bit of sector 5's data.
    let at = sb.data_offset + 5 * 512 + 100;
    let mut b = [0u8];
    raw.read_exact_at(&mut b, at).unwrap();
    raw.write_all_at(&[b[0] ^ 1], at).unwrap();
    expect_sector_failure(&v, 0, 8192, 5);
    // Neighbours still read.
    let mut ok = vec![0u8; 512];
    v.read_at(4 * 512, &mut ok).unwrap();
    assert_eq!(ok, pattern(64 << 10, 1)[4 * 512..5 * 512]);
    // Flip a bit of sector 9's tag.
    let at = sb.meta_offset + 9 * META_ENTRY_LEN as u64 + 20;
    raw.read_exact_at(&mut b, at).unwrap();
    raw.write_all_at(&[b[0] ^ 0x80], at).unwrap();
    expect_sector_failure(&v, 9 * 512 + 3, 10, 9);
    // Zeroing an entry does not make a sector "unwritten".
    raw.write_all_at(&[0u8; META_ENTRY_LEN], sb.meta_offset + 11 * META_ENTRY_LEN as u64).unwrap();
    expect_sector_failure(&v, 11 * 512, 512, 11);
    // Writing a sector again repairs it.
    v.write_at(5 * 512, &[3u8; 512]).unwrap();
    let mut fixed = [0u8; 512];
    v.read_at(5 * 512, &mut fixed).unwrap();
    assert_eq!(fixed, [3u8; 512]);
}

#[test]
fn a_sector_moved_to_another_place_fails_its_check() {
    let dir = scratch();
    let img = dir.path().join("auth.img");
    let v = new_volume(&img, 512, 64 << 10);
    v.write_at(0, &pattern(64 << 10, 2)).unwrap();
    let sb = *v.superblock();
    let raw = rw(&img);
    // Copy sector 2 (data and its IV and tag) over sector 3.
    let mut data = [0u8; 512];
    let mut meta = [0u8; META_ENTRY_LEN];
    raw.read_exact_at(&mut data, sb.data_offset + 2 * 512).unwrap();
    raw.read_exact_at(&mut meta, sb.meta_offset + 2 * META_ENTRY_LEN as u64).unwrap();
    raw.write_all_at(&data, sb.data_offset + 3 * 512).unwrap();
    raw.write_all_at(&meta, sb.meta_offset + 3 * META_ENTRY_LEN as u64).unwrap();
    expect_sector_failure(&v, 3 * 512, 512, 3);
}

#[test]
fn a_torn_write_is_detected_on_the_next_read() {
    let dir = scratch();
    let img = dir.path().join("auth.img");
    let v = new_volume(&img, 4096, 64 << 10);
    v.write_at(0, &pattern(64 << 10, 3)).unwrap();
    let sb = *v.superblock();
    let raw = rw(&img);
    // Data written, tag not: keep the old metadata entry of sector 6 and put it back after the
    // write, as if the machine stopped between the data and the metadata writes.
    let mut old_meta = [0u8; META_ENTRY_LEN];
    raw.read_exact_at(&mut old_meta, sb.meta_offset + 6 * META_ENTRY_LEN as u64).unwrap();
    v.write_at(6 * 4096, &[9u8; 4096]).unwrap();
    raw.write_all_at(&old_meta, sb.meta_offset + 6 * META_ENTRY_LEN as u64).unwrap();
    expect_sector_failure(&v, 6 * 4096, 4096, 6);
    // The other order: the tag written, the data not.
    let mut old_data = vec![0u8; 4096];
    raw.read_exact_at(&mut old_data, sb.data_offset + 7 * 4096).unwrap();
    v.write_at(7 * 4096, &[8u8; 4096]).unwrap();
    raw.write_all_at(&old_data, sb.data_offset + 7 * 4096).unwrap();
    expect_sector_failure(&v, 7 * 4096, 4096, 7);
}

#[test]
fn a_wrong_key_or_a_modified_superblock_is_refused() {
    let dir = scratch();
    let img = dir.path().join("auth.img");
    drop(new_volume(&img, 512, 16 << 10));
    let e = AuthVolume::open(engine(), File::open(&img).unwrap(), false, &[0x43; 32]).err().unwrap();
    assert!(matches!(e, Error::Volume(VolumeError::WrongKey)), "{e}");
    // Claim fewer sectors (still consistent geometry): the key check covers the superblock.
    let raw = rw(&img);
    raw.write_all_at(&16u64.to_le_bytes(), 16).unwrap();
    let e = AuthVolume::open(engine(), File::open(&img).unwrap(), false, &KEY).err().unwrap();
    assert!(matches!(e, Error::Volume(VolumeError::WrongKey)), "{e}");
    raw.write_all_at(b"XXXX", 0).unwrap();
    let e = AuthVolume::open(engine(), File::open(&img).unwrap(), false, &KEY).err().unwrap();
    assert!(matches!(e, Error::Luks(LuksError::NotLuks(_))), "{e}");
}

#[test]
fn trimmed_sectors_read_as_authenticated_zeroes_and_their_mark_cannot_forge_zeroes() {
    use crypt_vfio::volume::authenticated::ENTRY_TRIMMED;
    let dir = scratch();
    let img = dir.path().join("auth.img");
    let v = new_volume(&img, 512, 64 << 10);
    let data = pattern(64 << 10, 3);
    v.write_at(0, &data).unwrap();
    // Sectors 2..=9 whole; the partial sectors at the edges keep their data.
    v.trim(1000, 4200).unwrap();
    let mut back = vec![1u8; 64 << 10];
    v.read_at(0, &mut back).unwrap();
    let mut expected = data.clone();
    expected[1024..5120].fill(0);
    assert!(back == expected, "trimmed sectors read as zeroes, the rest unchanged");
    let mut sectors = vec![1u8; 4096];
    futures::executor::block_on(v.read_sectors_async(0, &mut sectors)).unwrap();
    assert!(sectors[..] == expected[..4096], "the async path agrees");

    let sb = *v.superblock();
    let raw = rw(&img);
    let entry = |s: u64| sb.meta_offset + s * META_ENTRY_LEN as u64;
    // The mark on a sector that holds data does not make it read as zeroes: its tag is not
    // that of zeroes.
    raw.write_all_at(&ENTRY_TRIMMED, entry(12) + 28).unwrap();
    expect_sector_failure(&v, 12 * 512, 512, 12);
    // A changed tag of a trimmed sector fails; so does a mark other than 0 or 1.
    let mut b = [0u8];
    raw.read_exact_at(&mut b, entry(4) + 20).unwrap();
    raw.write_all_at(&[b[0] ^ 1], entry(4) + 20).unwrap();
    expect_sector_failure(&v, 2048, 512, 4);
    raw.write_all_at(&2u32.to_le_bytes(), entry(6) + 28).unwrap();
    expect_sector_failure(&v, 3072, 512, 6);
    // Writing a trimmed sector again makes it an ordinary one.
    v.write_at(4 * 512, &[7u8; 512]).unwrap();
    let mut one = [0u8; 512];
    v.read_at(4 * 512, &mut one).unwrap();
    assert_eq!(one, [7u8; 512]);
    let mut e = [0u8; 4];
    raw.read_exact_at(&mut e, entry(4) + 28).unwrap();
    assert_eq!(e, [0; 4]);
}

#[test]
fn block_status_reports_zero_only_for_trimmed_sectors_whose_tag_checks_out() {
    use crypt_vfio::volume::authenticated::ENTRY_TRIMMED;
    let dir = scratch();
    let img = dir.path().join("auth.img");
    let v = new_volume(&img, 512, 64 << 10);
    v.write_at(0, &pattern(16 << 10, 5)).unwrap();
    v.trim(8 << 10, 4 << 10).unwrap();
    let sb = *v.superblock();
    let raw = rw(&img);
    // An attacker who holds only the image sets the mark on sector 5, which holds data: block
    // status must not tell a copying client (which then never reads it) that it is zero.
    raw.write_all_at(&ENTRY_TRIMMED, sb.meta_offset + 5 * META_ENTRY_LEN as u64 + 28).unwrap();
    let st = v.block_status(5 * 512, 512, 16).unwrap();
    assert!(!st[0].zero && !st[0].hole, "a forged trimmed mark was reported as zero: {st:?}");
    // The whole picture: data up to 8 KiB (sector 5 included), the real trim zero, data after.
    let st = v.block_status(0, 16 << 10, 16).unwrap();
    let zero: Vec<(u64, bool)> = st.iter().map(|e| (e.len, e.zero)).collect();
    assert_eq!(zero, vec![(8 << 10, false), (4 << 10, true), (4 << 10, false)], "{st:?}");
    // A genuinely trimmed sector whose tag was changed is data too.
    let mut b = [0u8];
    let at = sb.meta_offset + 17 * META_ENTRY_LEN as u64 + 20;
    raw.read_exact_at(&mut b, at).unwrap();
    raw.write_all_at(&[b[0] ^ 1], at).unwrap();
    let st = v.block_status(17 * 512, 512, 16).unwrap();
    assert!(!st[0].zero, "{st:?}");
}
