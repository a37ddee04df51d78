//! What the fuzz targets share: images in memory files, templates made by our own `format`, and
//! the cap on KDF cost that keeps an unlock attempt in the millisecond range.
//!
//! A fuzz target must stay fast: a header asking for a million PBKDF2 iterations or a GiB of
//! Argon2 memory is valid and would be honoured by the library (within cryptsetup's limits), so
//! the harness only parses and dumps it, and tries to unlock only headers that are cheap.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::luks::kdf::Kdf;
use crypt_vfio::luks::{self, FormatOptions, LuksKdfOptions, LuksVersion};
use crypt_vfio::volume::CipherSpec;
use crypt_vfio::CoreKind;

/// The passphrase of every template.
pub const PASS: &[u8] = b"fuzz";

/// The engine of every target: the reference AES core, no device.
pub fn engine() -> SoftwareEngine {
    SoftwareEngine::new(CoreKind::Reference)
}

/// An anonymous file in memory.
pub fn mem_file() -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the descriptor it returns is
    // owned by nobody else, so handing it to File is sound.
    let fd = unsafe { libc::memfd_create(c"crypt-vfio-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh, valid descriptor that only this File will close.
    unsafe { File::from_raw_fd(fd) }
}

/// `bytes` as a file of `len` bytes (at least `bytes.len()`).
pub fn file_with(bytes: &[u8], len: u64) -> File {
    let f = mem_file();
    f.set_len(len.max(bytes.len() as u64)).unwrap();
    f.write_all_at(bytes, 0).unwrap();
    f
}

/// A LUKS image formatted by crypt-vfio with [`PASS`] in slot 0 (PBKDF2, 1000 iterations,
/// AES-128-XTS so the key material stays small). Returns its bytes.
pub fn luks_template(version: LuksVersion) -> Vec<u8> {
    let mut opts = FormatOptions::new(version);
    opts.kdf = LuksKdfOptions::pbkdf2_iterations(1000);
    opts.spec = CipherSpec::XTS_PLAIN64;
    opts.key_bytes = 32;
    let f = mem_file();
    // Up to the end of slot 0's material, what an unlock reads: the other areas and the data
    // are not needed (add-key extends the file).
    let len = match version {
        LuksVersion::Luks1 => 4096 + (32 * 4000u64).next_multiple_of(512),
        LuksVersion::Luks2 => 2 * luks::luks2::DEFAULT_HDR_SIZE + (32 * 4000u64).next_multiple_of(4096),
    };
    f.set_len(opts.data_offset() + 4096).unwrap();
    luks::format(&engine(), &f, &opts, PASS, None).unwrap();
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, 0).unwrap();
    b
}

/// Whether unlocking `header` costs little enough to try in a fuzz iteration.
pub fn cheap(header: &luks::Header) -> bool {
    let kdf_ok = |k: &Kdf| match *k {
        Kdf::Pbkdf2 { iterations, .. } => iterations <= 2000,
        Kdf::Argon2 { time, memory_kib, .. } => time <= 4 && memory_kib <= 1024,
    };
    match header {
        luks::Header::V1(h) => {
            h.mk_digest_iterations <= 2000 && h.keyslots.iter().all(|s| !s.active || s.iterations <= 2000)
        }
        luks::Header::V2(h) => {
            h.keyslots.values().all(|k| kdf_ok(&k.kdf)) && h.digests.values().all(|d| d.iterations <= 2000)
        }
    }
}

/// What every LUKS target does with an image: read the header, dump it, try to unlock it when
/// cheap, and when that works, check the key against the header again (add a slot, remove it).
pub fn exercise(file: &File) {
    let Ok(mut header) = luks::Header::read(file) else { return };
    let _ = header.to_string();
    let _ = header.volume_params();
    if !cheap(&header) {
        return;
    }
    let engine = engine();
    if header.unlock(&engine, file, PASS).is_ok() {
        let kdf = LuksKdfOptions::pbkdf2_iterations(1000);
        if let Ok(slot) = header.add_passphrase(&engine, file, PASS, b"second", &kdf) {
            let (found, _) = header.unlock(&engine, file, b"second").expect("the slot just added opens");
            assert_eq!(found, slot);
            header.remove_passphrase(&engine, file, b"second").expect("the slot just added can be removed");
        }
    }
}
