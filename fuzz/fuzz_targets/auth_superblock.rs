//! Authenticated volumes: the input overwrites the start of a real volume (superblock and the
//! first metadata entries) made by our `format`; opening with the right key and reading every
//! sector must give data, or a typed error, never a panic or a huge allocation.
#![no_main]

use std::sync::{Arc, OnceLock};

use crypt_vfio::volume::AuthVolume;
use crypt_vfio_fuzz::{engine, file_with, mem_file};
use libfuzzer_sys::fuzz_target;
use std::os::unix::fs::FileExt;

const KEY: [u8; 32] = [0x42; 32];
const SIZE: u64 = 16 << 10;

static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();

fn template() -> Vec<u8> {
    let f = mem_file();
    let v = AuthVolume::format(Arc::new(engine()), f.try_clone().unwrap(), &KEY, 512, SIZE).unwrap();
    drop(v);
    let len = f.metadata().unwrap().len();
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, 0).unwrap();
    b
}

fuzz_target!(|data: &[u8]| {
    let template = TEMPLATE.get_or_init(template);
    let mut image = template.clone();
    let n = data.len().min(image.len());
    image[..n].copy_from_slice(&data[..n]);
    let Ok(v) = AuthVolume::open(Arc::new(engine()), file_with(&image, image.len() as u64), false, &KEY)
    else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    let mut at = 0;
    while at + 4096 <= SIZE {
        let _ = v.read_at(at, &mut buf);
        at += 4096;
    }
});
