//! The NBD handshake (fixed newstyle option negotiation) from the client's first byte: any
//! bytes a client sends must end in a reply, a clean close or transmission, never a panic or
//! an allocation the option lengths alone decide. Bytes after a successful `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME` go on as transmission requests.
#![no_main]

mod nbd_common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = crypt_vfio::nbd::serve_bytes(nbd_common::MemoryDevice::new(), nbd_common::config(), data)
        .expect("the fuzz configuration is valid");
    // The server always speaks first: NBDMAGIC, IHAVEOPT and its handshake flags.
    assert!(out.len() >= 18 && out[..8] == *b"NBDMAGIC" && out[8..16] == *b"IHAVEOPT");
});
