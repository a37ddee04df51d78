//! LUKS2 metadata: the input is the JSON area. The harness wraps it in valid binary headers
//! (both copies, correct checksums) in front of a real image's key material, so mutations get
//! past the checksum and exercise every JSON field, unlocking included.
#![no_main]

use std::sync::OnceLock;

use crypt_vfio::luks::LuksVersion;
use crypt_vfio_fuzz::{exercise, file_with, luks_template};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const HDR: usize = 16 << 10;

static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();

fn copy(template: &[u8], json: &[u8], offset: usize) -> Vec<u8> {
    let mut c = template[offset..offset + HDR].to_vec();
    c[4096..].fill(0);
    let n = json.len().min(HDR - 4096);
    c[4096..4096 + n].copy_from_slice(&json[..n]);
    c[448..512].fill(0);
    let sum = Sha256::digest(&c);
    c[448..480].copy_from_slice(&sum);
    c
}

fuzz_target!(|data: &[u8]| {
    let template = TEMPLATE.get_or_init(|| luks_template(LuksVersion::Luks2));
    let mut image = template.clone();
    let primary = copy(template, data, 0);
    let secondary = copy(template, data, HDR);
    image[..HDR].copy_from_slice(&primary);
    image[HDR..2 * HDR].copy_from_slice(&secondary);
    exercise(&file_with(&image, image.len() as u64));
});
