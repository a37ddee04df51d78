//! Crafted headers: every number a header holds is bounded, so a hostile image gets a clear
//! error naming the field within a second, never an abort, a hang or a huge allocation. LUKS1,
//! LUKS2 and authenticated volumes; the bytes no check covered before are checked now.

mod common;
mod support;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crypt_vfio::luks::{self, FormatOptions, LuksKdfOptions, LuksVersion};
use crypt_vfio::volume::authenticated::META_ENTRY_LEN;
use crypt_vfio::volume::AuthVolume;
use crypt_vfio::{Error, LuksError, VolumeError};
use serde_json::{json, Value};
use support::scratch;

const PASS: &[u8] = b"hostile";

fn rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap()
}

fn luks_image(path: &Path, version: LuksVersion) -> File {
    let mut opts = FormatOptions::new(version);
    opts.kdf = LuksKdfOptions::pbkdf2_iterations(1000);
    let _ = std::fs::remove_file(path);
    let f = rw(path);
    f.set_len(opts.data_offset() + 4096).unwrap();
    luks::format(&common::device(), &f, &opts, PASS, None).unwrap();
    f
}

/// Reads the header and, if that works, unlocks it: the error, which must come quickly.
fn outcome(f: &File) -> Error {
    let start = Instant::now();
    let r = luks::Header::read(f).and_then(|h| h.unlock(&common::device(), f, PASS).map(|_| ()));
    let took = start.elapsed();
    let e = r.expect_err("a crafted header must be refused");
    // Generous for a loaded machine; before the bounds, these aborted or ran for minutes.
    assert!(took < Duration::from_secs(10), "{e} took {took:?}");
    e
}

/// A LUKS2 image whose JSON was changed by `edit` (checksums recomputed, as an attacker would).
fn luks2_with(dir: &Path, edit: impl FnOnce(&mut Value)) -> File {
    let f = luks_image(&dir.join("l2.img"), LuksVersion::Luks2);
    let luks::Header::V2(mut h) = luks::Header::read(&f).unwrap() else { panic!("LUKS2 expected") };
    edit(&mut h.json);
    h.write(&f).unwrap();
    f
}

fn field_named(e: &Error, field: &str) {
    let text = e.to_string();
    assert!(matches!(e, Error::Luks(LuksError::CorruptHeader { .. })), "{text}");
    assert!(text.contains(field), "`{field}` not named: {text}");
}

#[test]
fn luks2_numbers_out_of_bounds_are_named_errors_not_aborts() {
    let dir = scratch();
    let d = dir.path();
    let slot = |j: &mut Value| j["keyslots"]["0"].take();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        // The reproduction: a 4e9-byte key and an area size whose end wraps.
        (
            "keyslots.0",
            Box::new(move |j: &mut Value| {
                let mut ks = slot(j);
                ks["key_size"] = json!(4_000_000_000u64);
                ks["area"]["size"] = json!((u64::MAX - 32767).to_string());
                j["keyslots"]["0"] = ks;
            }),
        ),
        (
            "keyslots.0.area.key_size",
            Box::new(|j: &mut Value| j["keyslots"]["0"]["area"]["key_size"] = json!(1u64 << 31)),
        ),
        (
            "keyslots.0.af.stripes",
            Box::new(|j: &mut Value| j["keyslots"]["0"]["af"]["stripes"] = json!(100_000)),
        ),
        (
            "keyslots.0.area.offset",
            Box::new(|j: &mut Value| j["keyslots"]["0"]["area"]["offset"] = json!(u64::MAX.to_string())),
        ),
        ("keyslots.0.priority", Box::new(|j: &mut Value| j["keyslots"]["0"]["priority"] = json!(258))),
        (
            "keyslots.0.kdf.iterations",
            Box::new(|j: &mut Value| j["keyslots"]["0"]["kdf"]["iterations"] = json!(0)),
        ),
        ("keyslots.0.kdf.salt", Box::new(|j: &mut Value| j["keyslots"]["0"]["kdf"]["salt"] = json!("AAAA"))),
        (
            "keyslots.0.kdf.memory",
            Box::new(|j: &mut Value| {
                j["keyslots"]["0"]["kdf"] = json!({"type": "argon2id", "time": 4, "memory": 4_000_000_000u32,
                    "cpus": 1, "salt": j["keyslots"]["0"]["kdf"]["salt"].clone()})
            }),
        ),
        (
            "keyslots.0.kdf.cpus",
            Box::new(|j: &mut Value| {
                j["keyslots"]["0"]["kdf"] = json!({"type": "argon2id", "time": 4, "memory": 1024,
                    "cpus": 100_000, "salt": j["keyslots"]["0"]["kdf"]["salt"].clone()})
            }),
        ),
        ("keyslots.40", Box::new(|j: &mut Value| j["keyslots"]["40"] = j["keyslots"]["0"].clone())),
        (
            "config.keyslots_size",
            Box::new(|j: &mut Value| j["config"]["keyslots_size"] = json!(u64::MAX.to_string())),
        ),
        (
            "segments.0.size",
            Box::new(|j: &mut Value| j["segments"]["0"]["size"] = json!((u64::MAX - 511).to_string())),
        ),
        ("segments.0.sector_size", Box::new(|j: &mut Value| j["segments"]["0"]["sector_size"] = json!(0))),
        ("digests.0.iterations", Box::new(|j: &mut Value| j["digests"]["0"]["iterations"] = json!(0))),
        ("digests.0.digest", Box::new(|j: &mut Value| j["digests"]["0"]["digest"] = json!("A".repeat(4000)))),
    ];
    for (field, edit) in cases {
        let f = luks2_with(d, edit);
        field_named(&outcome(&f), field);
    }
}

#[test]
fn luks1_numbers_out_of_bounds_are_named_errors() {
    let dir = scratch();
    let img = dir.path().join("l1.img");
    let at = 208; // key slot 0
    let cases: [(usize, u32, &str); 3] = [
        (at + 44, 100_000, "key slot 0 stripes"),
        (at + 44, u32::MAX, "key slot 0 stripes"),
        (at + 40, 1, "key slot 0 key_material_offset"),
    ];
    for (offset, value, field) in cases {
        let f = luks_image(&img, LuksVersion::Luks1);
        f.write_all_at(&value.to_be_bytes(), offset as u64).unwrap();
        field_named(&outcome(&f), field);
    }
}

#[test]
fn unsupported_luks2_requirements_are_unsupported_not_corrupt() {
    let dir = scratch();
    let f = luks2_with(dir.path(), |j| {
        j["config"]["requirements"] = json!({"mandatory": ["online-reencrypt-v2"]});
    });
    let e = outcome(&f);
    assert!(matches!(e, Error::Luks(LuksError::Unsupported(_))), "{e}");
    assert!(e.to_string().starts_with("unsupported: ") && e.to_string().contains("reencrypt"), "{e}");
}

#[test]
fn luks_text_fields_that_are_not_utf8_survive_add_key_byte_for_byte() {
    let dir = scratch();
    let engine = common::device();
    let kdf = LuksKdfOptions::pbkdf2_iterations(1000);
    // LUKS1: the UUID field (168..208); LUKS2: the label (24..72) of both copies, so the
    // checksum has to be recomputed, which add-key does for us after a first write.
    let f = luks_image(&dir.path().join("l1.img"), LuksVersion::Luks1);
    let odd = b"\xff\xfe not text \xc3\x28";
    let mut field = [0u8; 40];
    field[..odd.len()].copy_from_slice(odd);
    f.write_all_at(&field, 168).unwrap();
    let mut h = luks::Header::read(&f).unwrap();
    h.add_passphrase(&engine, &f, PASS, b"second", &kdf).unwrap();
    let mut back = [0u8; 40];
    f.read_exact_at(&mut back, 168).unwrap();
    assert_eq!(&back[..odd.len()], odd);
    assert!(back[odd.len()..].iter().all(|&b| b == 0));

    let f = luks_image(&dir.path().join("l2.img"), LuksVersion::Luks2);
    let luks::Header::V2(mut h2) = luks::Header::read(&f).unwrap() else { panic!() };
    h2.label = odd.to_vec();
    h2.write(&f).unwrap();
    let mut h = luks::Header::read(&f).unwrap();
    h.add_passphrase(&engine, &f, PASS, b"second", &kdf).unwrap();
    for copy in [0u64, 16384] {
        let mut back = [0u8; 48];
        f.read_exact_at(&mut back, copy + 24).unwrap();
        assert_eq!(&back[..odd.len()], odd, "copy at {copy}");
    }
}

#[test]
fn authenticated_superblock_reserved_bytes_and_entry_padding_are_checked() {
    let dir = scratch();
    let img = dir.path().join("auth.img");
    let key = [0x42u8; 32];
    let engine = Arc::new(common::device());
    let v = AuthVolume::format(engine.clone(), rw(&img), &key, 512, 64 << 10).unwrap();
    v.write_at(0, &[7u8; 4096]).unwrap();
    drop(v);
    // A byte of the superblock's unused part: refused at open, naming it.
    let f = rw(&img);
    f.write_all_at(&[1], 2000).unwrap();
    let e = AuthVolume::open(engine.clone(), rw(&img), false, &key).err().expect("refused");
    assert!(e.to_string().contains("reserved") && e.to_string().contains("2000"), "{e}");
    f.write_all_at(&[0], 2000).unwrap();
    // The padding of sector 3's metadata entry: that sector fails, the others read.
    f.write_all_at(&[1], 4096 + 3 * META_ENTRY_LEN as u64 + 30).unwrap();
    let v = AuthVolume::open(engine, rw(&img), false, &key).unwrap();
    let mut buf = vec![0u8; 512];
    v.read_at(2 * 512, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 512]);
    let e = v.read_at(3 * 512, &mut buf).unwrap_err();
    assert!(matches!(e, Error::Volume(VolumeError::SectorAuthFailed { sector: 3 })), "{e}");
    assert_eq!(buf, [0u8; 512], "nothing unauthenticated is handed out");
}

fn cli() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
}

#[test]
fn unsupported_but_valid_headers_are_dumped_and_refused_as_unsupported() {
    let dir = scratch();
    let d = dir.path();
    std::fs::write(d.join("pass"), PASS).unwrap();
    // LUKS1 with a hash cryptsetup knows and we do not implement.
    let img = d.join("whirlpool.img");
    let f = luks_image(&img, LuksVersion::Luks1);
    f.write_all_at(b"whirlpool\0", 72).unwrap();
    let e = luks::Header::read(&f).unwrap_err();
    assert!(
        matches!(e, Error::Luks(LuksError::Unsupported(_))) && e.to_string().contains("whirlpool"),
        "{e}"
    );
    let out = cli().arg("dump").arg(&img).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Hash spec:     \twhirlpool") && text.contains("Key Slot 0: ENABLED"), "{text}");
    let out = cli()
        .args(["decrypt", "--key-file"])
        .arg(d.join("pass"))
        .arg(&img)
        .arg(d.join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unsupported: ") && !err.contains("corrupt"), "{err}");

    // LUKS2 with a reencryption in progress.
    let f = luks2_with(d, |j| j["config"]["requirements"] = json!({"mandatory": ["online-reencrypt-v2"]}));
    drop(f);
    let img = d.join("l2.img");
    let out = cli().arg("dump").arg(&img).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Requirements:\tonline-reencrypt-v2") && text.contains("\"keyslots\""), "{text}");
}

/// Found by fuzzing (luks1_unlock): a free LUKS1 slot whose area points into the data. Adding a
/// passphrase wrote the key material over the data and a header that no longer opened.
#[test]
fn add_key_refuses_a_free_luks1_slot_whose_area_overlaps_data_or_another_slot() {
    let dir = scratch();
    let img = dir.path().join("l1.img");
    let engine = common::device();
    let kdf = LuksKdfOptions::pbkdf2_iterations(1000);
    let slot1_offset = 208 + 48 + 40;
    for (what, sector) in [("the data", 0u32), ("key slot 0", 8)] {
        let f = luks_image(&img, LuksVersion::Luks1);
        let payload = u32::from_be_bytes(std::fs::read(&img).unwrap()[104..108].try_into().unwrap());
        let sector = if what == "the data" { payload - 10 } else { sector };
        f.write_all_at(&sector.to_be_bytes(), slot1_offset).unwrap();
        let before = std::fs::read(&img).unwrap();
        let mut h = luks::Header::read(&f).unwrap();
        let e = h.add_passphrase(&engine, &f, PASS, b"second", &kdf).unwrap_err();
        assert!(
            matches!(e, Error::Luks(LuksError::Keyslot(_))) && e.to_string().contains("overlaps"),
            "{what}: {e}"
        );
        assert!(std::fs::read(&img).unwrap() == before, "{what}: the image is unchanged");
        luks::Header::read(&f).unwrap().unlock(&engine, &f, PASS).unwrap();
    }
}
