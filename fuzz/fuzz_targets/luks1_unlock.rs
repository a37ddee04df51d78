//! LUKS1 unlock: the input is XORed onto the header of a real image (made by our `format`, with
//! the passphrase the harness tries, over its key material), so an empty or all-zero input is
//! that valid image and every mutation is a change to it: unlocking, adding and removing key
//! slots are reached, not only parsing. Raw LUKS1 headers from other tools are in `luks_image`.
#![no_main]

use std::sync::OnceLock;

use crypt_vfio::luks::LuksVersion;
use crypt_vfio_fuzz::{exercise, file_with, luks_template};
use libfuzzer_sys::fuzz_target;

static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let template = TEMPLATE.get_or_init(|| luks_template(LuksVersion::Luks1));
    let mut image = template.clone();
    for (b, d) in image.iter_mut().zip(data.iter().take(4096)) {
        *b ^= d;
    }
    exercise(&file_with(&image, image.len() as u64));
});
