//! LUKS2 binary headers: the input is the start of an image as it is (both header copies, with
//! their magic, sizes, offsets and checksums), so the probing of the secondary copy at the
//! standard offsets and every check of the binary header are fuzzed.
#![no_main]

use crypt_vfio_fuzz::{exercise, file_with};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    exercise(&file_with(data, data.len() as u64));
});
