//! The NBD transmission phase: a fixed, valid handshake (`NBD_OPT_GO` for the default export)
//! followed by the fuzzer's bytes as the request stream. Every request must be answered or
//! refused, or the connection closed, without a panic or an allocation that the request's
//! length field alone decides.
#![no_main]

mod nbd_common;

use crypt_vfio::nbd::proto;
use libfuzzer_sys::fuzz_target;

/// Client flags and `NBD_OPT_GO` with the empty (default) export name and no information
/// requests.
fn handshake() -> Vec<u8> {
    let mut h = (proto::client::FIXED_NEWSTYLE | proto::client::NO_ZEROES).to_be_bytes().to_vec();
    h.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&proto::opt::GO.to_be_bytes());
    h.extend_from_slice(&6u32.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    h
}

fuzz_target!(|data: &[u8]| {
    let mut input = handshake();
    input.extend_from_slice(data);
    let out = crypt_vfio::nbd::serve_bytes(nbd_common::MemoryDevice::new(), nbd_common::config(), &input)
        .expect("the fuzz configuration is valid");
    // The option replies end with NBD_REP_ACK: the stream is in transmission.
    assert!(out.len() >= 18 + 20, "the handshake was answered");
});
