//! LUKS2 metadata. The input is a JSON merge patch (RFC 7386) applied to the metadata of a real
//! image made by our `format` (so `{}` is that valid image, with the passphrase the harness
//! tries), or, when it is not JSON, the raw JSON area. The harness wraps the result in valid
//! binary headers (both copies, correct checksums) in front of the image's key material, so
//! mutations get past the checksum and reach every field, unlocking included.
#![no_main]

use std::sync::OnceLock;

use crypt_vfio::luks::LuksVersion;
use crypt_vfio_fuzz::{exercise, file_with, luks_template};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sha2::{Digest, Sha256};

const HDR: usize = 16 << 10;

static TEMPLATE: OnceLock<(Vec<u8>, Value)> = OnceLock::new();

fn init() -> (Vec<u8>, Value) {
    let image = luks_template(LuksVersion::Luks2);
    let area = &image[4096..HDR];
    let end = area.iter().position(|&c| c == 0).unwrap_or(area.len());
    let json = serde_json::from_slice(&area[..end]).expect("our own metadata is JSON");
    (image, json)
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other,
    }
}

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
    let (template, json) = TEMPLATE.get_or_init(init);
    let area = match serde_json::from_slice::<Value>(data) {
        Ok(patch) => {
            let mut j = json.clone();
            merge(&mut j, patch);
            serde_json::to_vec(&j).expect("JSON values serialise")
        }
        Err(_) => data.to_vec(),
    };
    let mut image = template.clone();
    image[..HDR].copy_from_slice(&copy(template, &area, 0));
    image[HDR..2 * HDR].copy_from_slice(&copy(template, &area, HDR));
    exercise(&file_with(&image, image.len() as u64));
});
