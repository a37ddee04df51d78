//! The NBD transmission phase: a fixed, valid handshake (`NBD_OPT_GO` for the default export)
//! followed by the fuzzer's bytes as the request stream. Every request must be answered or
//! refused, or the connection closed, without a panic or an allocation that the request's
//! length field alone decides; and what the server sends back must be well-formed simple
//! replies, each to a request that was sent, with a payload exactly for successful reads.
#![no_main]

mod nbd_common;

use std::collections::{HashMap, VecDeque};

use crypt_vfio::nbd::proto::{self, be_u32, be_u64, cmd, rep, Request};
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

/// The requests a client sent, as far as they are framed: handle -> (kind, length) in order.
fn requests(mut data: &[u8]) -> HashMap<u64, VecDeque<(u16, u32)>> {
    let mut sent: HashMap<u64, VecDeque<(u16, u32)>> = HashMap::new();
    while let Some(header) = data.get(..proto::REQUEST_LEN) {
        let Some(r) = Request::parse(header.try_into().unwrap()) else { break };
        sent.entry(r.handle).or_default().push_back((r.kind, r.length));
        data = &data[proto::REQUEST_LEN..];
        if r.kind == cmd::WRITE {
            data = data.get(r.length as usize..).unwrap_or(&[]);
        }
        if r.kind == cmd::DISC {
            break;
        }
    }
    sent
}

/// Checks the server's side of the transmission phase.
fn check_replies(mut out: &[u8], mut sent: HashMap<u64, VecDeque<(u16, u32)>>) {
    while !out.is_empty() {
        let h = out.get(..proto::SIMPLE_REPLY_LEN).expect("a whole reply header");
        assert_eq!(be_u32(h), proto::SIMPLE_REPLY_MAGIC, "a simple reply");
        let (error, handle) = (be_u32(&h[4..]), be_u64(&h[8..]));
        let queue = sent.get_mut(&handle).expect("a reply to a handle that was sent");
        // A handle reused for requests of another kind or length makes replies ambiguous.
        if queue.iter().any(|q| *q != queue[0]) {
            return;
        }
        let (kind, len) = queue.pop_front().expect("one reply per request");
        out = &out[proto::SIMPLE_REPLY_LEN..];
        if kind == cmd::READ && error == 0 {
            out = out.get(len as usize..).expect("a successful read carries its payload");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = handshake();
    input.extend_from_slice(data);
    let out = crypt_vfio::nbd::serve_bytes(nbd_common::MemoryDevice::new(), nbd_common::config(), &input)
        .expect("the fuzz configuration is valid");
    // Greeting, then option replies up to the NBD_REP_ACK of the NBD_OPT_GO.
    let mut at = 18;
    loop {
        let header = out.get(at..at + 20).expect("the NBD_OPT_GO is answered");
        at += 20 + be_u32(&header[16..]) as usize;
        if be_u32(&header[12..]) == rep::ACK {
            break;
        }
    }
    check_replies(&out[at..], requests(data));
});
