//! LUKS1: the input is the 592-byte header over a real image's key material (made by our
//! `format` with the passphrase the harness tries), so mutations reach unlocking, adding and
//! removing key slots, not only parsing.
#![no_main]

use std::sync::OnceLock;

use crypt_vfio::luks::LuksVersion;
use crypt_vfio_fuzz::{exercise, file_with, luks_template};
use libfuzzer_sys::fuzz_target;

static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let template = TEMPLATE.get_or_init(|| luks_template(LuksVersion::Luks1));
    let mut image = template.clone();
    let n = data.len().min(4096);
    image[..n].copy_from_slice(&data[..n]);
    if data.len() < 4096 {
        // A short input is a short file: truncation is part of what is fuzzed.
        image.truncate(if data.len() < 592 { data.len() } else { image.len() });
    }
    exercise(&file_with(&image, image.len() as u64));
});
