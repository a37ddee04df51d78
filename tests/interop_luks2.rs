//! LUKS2 against cryptsetup: images cryptsetup writes (512- and 4096-byte sectors, PBKDF2 and
//! Argon2id) decrypt exactly; images crypt-vfio writes give cryptsetup the same volume key, and
//! an independent implementation (tools/dmcrypt_ref.py, Python `cryptography`) decrypts their
//! data with that key. Skipped (saying why) when cryptsetup is missing.

mod common;
mod support;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crypt_vfio::luks::{self, FormatOptions, LuksKdfOptions, LuksVersion, PbkdfType};
use crypt_vfio::virtio_crypto::VirtioCrypto;
use crypt_vfio::volume::Volume;
use crypt_vfio::{Error, LuksError};
use support::{have, have_python_cryptography, pattern, run, scratch, tool, tool_script};

const PASS: &str = "luks2 passphrase";

fn engine() -> Arc<VirtioCrypto> {
    Arc::new(common::device())
}

fn dump_volume_key(img: &Path, pass_file: &Path, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    run(Command::new(tool("cryptsetup"))
        .args(["luksDump", "-q", "--dump-volume-key", "--volume-key-file"])
        .arg(out)
        .arg("--key-file")
        .arg(pass_file)
        .arg(img));
    std::fs::read(out).unwrap()
}

/// A 20 MiB LUKS2 image formatted by cryptsetup with a cheap PBKDF2 key slot for `pass`.
fn cryptsetup_luks2_pbkdf2(img: &Path, pass: &Path) {
    File::create(img).unwrap().set_len(20 << 20).unwrap();
    run(Command::new(tool("cryptsetup"))
        .args([
            "luksFormat",
            "-q",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
        ])
        .arg("--key-file")
        .arg(pass)
        .arg(img));
}

#[test]
fn cryptsetup_encrypted_images_decrypt_exactly_with_512_and_4096_byte_sectors() {
    if !have("cryptsetup") {
        return;
    }
    let engine = engine();
    for sector in ["512", "4096"] {
        let dir = scratch();
        let img = dir.path().join("cs.img");
        let pass = dir.path().join("pass.txt");
        std::fs::write(&pass, PASS).unwrap();
        let plain = pattern(8 << 20, sector.len() as u64);
        std::fs::write(&img, &plain).unwrap();
        // Offline encryption in place: cryptsetup moves the data behind a 2 MiB header, dropping
        // the last 4 MiB of the device.
        run(Command::new(tool("cryptsetup"))
            .args(["reencrypt", "-q", "--encrypt", "--type", "luks2", "--sector-size", sector])
            .args(["--reduce-device-size", "4M", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
            .arg("--key-file")
            .arg(&pass)
            .arg(&img));
        let v = luks::open(engine.clone(), File::open(&img).unwrap(), false, PASS.as_bytes()).unwrap();
        assert_eq!(v.sector_size().to_string(), sector);
        let mut data = vec![0u8; 4 << 20];
        v.read_at(0, &mut data).unwrap();
        assert!(data == plain[..4 << 20], "{sector}-byte sectors: decrypted data differs");
    }
}

#[test]
fn cryptsetup_argon2id_key_slots_unlock() {
    if !have("cryptsetup") {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("cs.img");
    let pass = dir.path().join("pass.txt");
    std::fs::write(&pass, PASS).unwrap();
    File::create(&img).unwrap().set_len(20 << 20).unwrap();
    run(Command::new(tool("cryptsetup"))
        .args(["luksFormat", "-q", "--type", "luks2", "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4"])
        .args(["--pbkdf-memory", "32768", "--pbkdf-parallel", "2", "--key-file"])
        .arg(&pass)
        .arg(&img));
    let vk = dump_volume_key(&img, &pass, &dir.path().join("vk.bin"));
    let f = File::open(&img).unwrap();
    let header = luks::Header::read(&f).unwrap();
    let (_, key) = header.unlock(&*engine(), &f, PASS.as_bytes()).unwrap();
    assert_eq!(*key, vk);
    assert!(matches!(header.unlock(&*engine(), &f, b"wrong"), Err(Error::Luks(LuksError::WrongPassphrase))));
    assert!(header.to_string().contains("argon2id"));
}

#[test]
fn crypt_vfio_luks2_images_are_read_by_cryptsetup_and_an_independent_implementation() {
    if !have("cryptsetup") || !have_python_cryptography() {
        return;
    }
    let engine = engine();
    for (spec, key_bytes, sector) in
        [("aes-xts-plain64", 64, 512u32), ("aes-xts-plain64", 64, 4096), ("aes-cbc-essiv:sha256", 32, 512)]
    {
        let dir = scratch();
        let img = dir.path().join("ours.img");
        let pass = dir.path().join("pass.txt");
        std::fs::write(&pass, PASS).unwrap();
        let mut opts = FormatOptions::new(LuksVersion::Luks2);
        opts.sector_size = sector;
        opts.spec = spec.parse().unwrap();
        opts.key_bytes = key_bytes;
        opts.kdf = LuksKdfOptions::pbkdf2_iterations(1000);
        let plain = pattern(1 << 20, u64::from(sector));
        let f = OpenOptions::new().read(true).write(true).create_new(true).open(&img).unwrap();
        f.set_len(opts.data_offset() + plain.len() as u64).unwrap();
        let (key, params) = luks::format(&*engine, &f, &opts, PASS.as_bytes(), None).unwrap();
        let v = Volume::open(engine.clone(), f, true, &key, params).unwrap();
        v.write_at(0, &plain).unwrap();
        v.flush().unwrap();
        drop(v);
        let vk_file = dir.path().join("vk.bin");
        assert_eq!(dump_volume_key(&img, &pass, &vk_file), *key, "cryptsetup unlocks our key slot");
        let out = dir.path().join("out.raw");
        run(Command::new("python3")
            .arg(tool_script("dmcrypt_ref.py"))
            .args(["decrypt", "--cipher", spec, "--key-file"])
            .arg(&vk_file)
            .args(["--sector-size", &sector.to_string(), "--offset", &opts.data_offset().to_string()])
            .arg(&img)
            .arg(&out));
        assert!(
            std::fs::read(&out).unwrap() == plain,
            "{spec} {sector}: the reference decrypts different data"
        );
    }
}

#[test]
fn passphrases_added_and_removed_by_crypt_vfio_are_seen_by_cryptsetup() {
    if !have("cryptsetup") {
        return;
    }
    let engine = engine();
    let dir = scratch();
    let img = dir.path().join("cs.img");
    let pass = dir.path().join("pass.txt");
    let pass2 = dir.path().join("pass2.txt");
    std::fs::write(&pass, PASS).unwrap();
    std::fs::write(&pass2, "second").unwrap();
    cryptsetup_luks2_pbkdf2(&img, &pass);
    let vk = dir.path().join("vk.bin");
    let key = dump_volume_key(&img, &pass, &vk);
    let f = OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let mut header = luks::Header::read(&f).unwrap();
    let kdf = LuksKdfOptions {
        pbkdf: PbkdfType::Argon2id,
        force_iterations: Some(1),
        memory_kib: 8192,
        parallel: 1,
        ..LuksKdfOptions::default()
    };
    let slot = header.add_passphrase(&*engine, &f, PASS.as_bytes(), b"second", &kdf).unwrap();
    assert_eq!(slot, 1);
    assert_eq!(dump_volume_key(&img, &pass2, &vk), key, "cryptsetup opens the slot we added");
    assert!(matches!(
        header.add_passphrase(&*engine, &f, b"wrong", b"third", &kdf),
        Err(Error::Luks(LuksError::WrongPassphrase))
    ));
    assert_eq!(header.remove_passphrase(&*engine, &f, PASS.as_bytes()).unwrap(), 0);
    let out = Command::new(tool("cryptsetup"))
        .args(["luksDump", "-q", "--dump-volume-key", "--volume-key-file"])
        .arg(dir.path().join("vk2.bin"))
        .arg("--key-file")
        .arg(&pass)
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the removed passphrase still opens the image");
    assert_eq!(dump_volume_key(&img, &pass2, &vk), key);
    let e = header.remove_passphrase(&*engine, &f, b"second").unwrap_err();
    assert!(matches!(e, Error::Luks(LuksError::Keyslot(_))), "the last slot is kept: {e}");
}

#[test]
fn a_damaged_primary_header_falls_back_to_the_secondary_copy() {
    if !have("cryptsetup") {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("cs.img");
    let pass = dir.path().join("pass.txt");
    std::fs::write(&pass, PASS).unwrap();
    cryptsetup_luks2_pbkdf2(&img, &pass);
    let key = dump_volume_key(&img, &pass, &dir.path().join("vk.bin"));
    // One byte of the primary JSON area: its checksum no longer matches.
    let f = OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, 4096 + 10).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], 4096 + 10).unwrap();
    let header = luks::Header::read(&f).unwrap();
    let (_, got) = header.unlock(&*engine(), &f, PASS.as_bytes()).unwrap();
    assert_eq!(*got, key);
    // Both copies damaged: the checksum error is named.
    f.read_exact_at(&mut b, 16384 + 4096 + 10).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], 16384 + 4096 + 10).unwrap();
    let e = luks::Header::read(&f).unwrap_err().to_string();
    assert!(e.contains("csum") && e.contains("checksum mismatch"), "{e}");
}

/// Adds an unbound key slot (a key of its own, not the volume key) for `pass` with cryptsetup.
fn cryptsetup_add_unbound(img: &Path, pass: &Path) {
    run(Command::new(tool("cryptsetup"))
        .args(["luksAddKey", "-q", "--unbound", "--key-size", "512", "--pbkdf", "pbkdf2"])
        .args(["--pbkdf-force-iterations", "1000"])
        .arg(img)
        .arg(pass));
}

#[test]
fn an_unbound_key_slot_does_not_open_the_volume() {
    if !have("cryptsetup") {
        return;
    }
    let engine = engine();
    let dir = scratch();
    let img = dir.path().join("cs.img");
    let pass = dir.path().join("pass.txt");
    let unbound = dir.path().join("unbound.txt");
    std::fs::write(&pass, PASS).unwrap();
    std::fs::write(&unbound, "unbound passphrase").unwrap();
    cryptsetup_luks2_pbkdf2(&img, &pass);
    cryptsetup_add_unbound(&img, &unbound);
    let f = OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let mut header = luks::Header::read(&f).unwrap();
    let e = header.unlock(&*engine, &f, b"unbound passphrase").unwrap_err();
    assert!(
        matches!(e, Error::Luks(LuksError::WrongPassphrase)),
        "the unbound key is not the volume key: {e}"
    );
    let key = dump_volume_key(&img, &pass, &dir.path().join("vk.bin"));
    assert_eq!(*header.unlock(&*engine, &f, PASS.as_bytes()).unwrap().1, key);
    assert!(header.to_string().contains("1: luks2 (unbound)"), "{header}");
    // The bound slot is the last one holding the volume key, whatever unbound slots remain.
    let e = header.remove_passphrase(&*engine, &f, PASS.as_bytes()).unwrap_err();
    assert!(matches!(e, Error::Luks(LuksError::Keyslot(_))), "{e}");
    // A slot added with the volume key is bound, never attached to the unbound digest.
    let kdf = LuksKdfOptions::pbkdf2_iterations(1000);
    header.add_passphrase(&*engine, &f, PASS.as_bytes(), b"third", &kdf).unwrap();
    assert_eq!(*header.unlock(&*engine, &f, b"third").unwrap().1, key);
    let third = dir.path().join("third.txt");
    std::fs::write(&third, "third").unwrap();
    assert_eq!(dump_volume_key(&img, &third, &dir.path().join("vk.bin")), key, "cryptsetup agrees");
}

/// Formats a small LUKS2 image with our code and rewrites its JSON with `edit`.
fn crafted(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> File {
    let img = dir.join("crafted.img");
    let mut opts = FormatOptions::new(LuksVersion::Luks2);
    opts.kdf = LuksKdfOptions::pbkdf2_iterations(1000);
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&img).unwrap();
    f.set_len(opts.data_offset() + 4096).unwrap();
    luks::format(&*engine(), &f, &opts, PASS.as_bytes(), None).unwrap();
    let luks::Header::V2(mut h) = luks::Header::read(&f).unwrap() else { panic!("LUKS2 expected") };
    edit(&mut h.json);
    h.write(&f).unwrap();
    f
}

#[test]
fn a_digest_bound_to_no_segment_or_an_empty_segment_is_refused() {
    let dir = scratch();
    let f = crafted(dir.path(), |j| j["digests"]["0"]["segments"] = serde_json::json!([]));
    let h = luks::Header::read(&f).unwrap();
    let e = h.unlock(&*engine(), &f, PASS.as_bytes()).unwrap_err();
    assert!(matches!(e, Error::Luks(LuksError::CorruptHeader { .. })), "{e}");
    let f = crafted(dir.path(), |j| j["segments"]["0"]["size"] = serde_json::json!("0"));
    let e = luks::Header::read(&f).unwrap_err().to_string();
    assert!(e.contains("segments.0.size"), "{e}");
}

#[test]
fn a_damaged_primary_magic_opens_from_the_secondary_copy_as_cryptsetup_does() {
    if !have("cryptsetup") {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("cs.img");
    let pass = dir.path().join("pass.txt");
    std::fs::write(&pass, PASS).unwrap();
    cryptsetup_luks2_pbkdf2(&img, &pass);
    let key = dump_volume_key(&img, &pass, &dir.path().join("vk.bin"));
    for damage in [&b"XUKS"[..], &[0u8; 6][..]] {
        let f = OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let mut saved = vec![0u8; damage.len()];
        f.read_exact_at(&mut saved, 0).unwrap();
        f.write_all_at(damage, 0).unwrap();
        // cryptsetup repairs the primary in place when it opens: ask it on a copy.
        let copy = dir.path().join("copy.img");
        std::fs::copy(&img, &copy).unwrap();
        assert_eq!(dump_volume_key(&copy, &pass, &dir.path().join("vk.bin")), key, "cryptsetup opens it");
        let header = luks::Header::read(&f).unwrap_or_else(|e| panic!("{damage:?}: {e}"));
        assert_eq!(*header.unlock(&*engine(), &f, PASS.as_bytes()).unwrap().1, key);
        f.write_all_at(&saved, 0).unwrap();
    }
    // The primary's magic damaged and the secondary copy damaged as well: the error says what
    // is wrong with the secondary, never "not LUKS" (which would send the user to --plain).
    let f = OpenOptions::new().read(true).write(true).open(&img).unwrap();
    f.write_all_at(b"XUKS", 0).unwrap();
    let hdr_size = 16384;
    let mut json = [0u8; 1];
    f.read_exact_at(&mut json, hdr_size + 4096 + 8).unwrap();
    f.write_all_at(&[json[0] ^ 0x20], hdr_size + 4096 + 8).unwrap();
    let e = luks::Header::read(&f).unwrap_err();
    assert!(
        !matches!(e, Error::Luks(LuksError::NotLuks(_))),
        "a damaged LUKS2 image reported as not LUKS: {e}"
    );
    // Nothing LUKS anywhere: still "not LUKS".
    let plain = dir.path().join("plain.img");
    std::fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    let e = luks::Header::read(&File::open(&plain).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Luks(LuksError::NotLuks(_))), "{e}");
}
