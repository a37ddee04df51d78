//! LUKS images as they are: the input is the start of an image (LUKS1 header, or both LUKS2
//! header copies with their magic, sizes, offsets and checksums), so header detection, the
//! probing of a LUKS2 secondary copy at the standard offsets and every binary check are fuzzed.
#![no_main]

use crypt_vfio_fuzz::{exercise, file_with};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    exercise(&file_with(data, data.len() as u64));
});
