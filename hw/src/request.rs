//! One data request: validation of every field against the session and the chain, and the
//! cipher or AEAD operation itself (virtio 1.2 section 5.9.7.4; the byte layout is in
//! `crypt_vfio_spec::crypto`).
//!
//! The arithmetic runs in place on the driver's destination buffer: the source is copied
//! there first, then the core encrypts or decrypts the destination. When the destination is
//! scattered over several pieces, a per-worker bounce buffer stands in for it.

use std::slice;

use crypt_vfio_cores::{CipherCore, CoreError, BLOCK_LEN, GCM_TAG_LEN};
use crypt_vfio_spec::crypto::{op, status, DataParams, DataRequest, DATA_REQ_SIZE};

use crate::chain::Chain;
use crate::config::DeviceConfig;
use crate::dma::{self, SegList};
use crate::prng::SplitMix64;
use crate::sessions::{SessionCache, Sessions};

const TAG: u64 = GCM_TAG_LEN as u64;
const HDR: u64 = DATA_REQ_SIZE as u64;

/// A worker's reusable buffers.
#[derive(Default)]
pub(crate) struct Scratch {
    bounce: Vec<u8>,
    aad: Vec<u8>,
}

/// How a data request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// The virtio-crypto status written.
    pub status: u8,
    /// Bytes written to the writable part, for the used element.
    pub written: u32,
    /// The status came from `error_rate`, not from the request.
    pub injected: bool,
}

impl Outcome {
    fn fail(status: u8) -> Self {
        Self { status, written: 1, injected: false }
    }
}

/// What the request asks for, once validated.
struct Op {
    encrypt: bool,
    aead: bool,
    iv_len: u64,
    src_len: u64,
    aad_len: u64,
    /// Bytes of data the core transforms (the source without its tag when decrypting).
    data_len: u64,
    dst_len: u64,
}

/// Validates and executes the data request in `chain`, and writes its status byte at
/// `status_at` (which the caller found mapped).
pub(crate) fn execute(
    cfg: &DeviceConfig,
    sessions: &Sessions,
    cache: &mut SessionCache,
    scratch: &mut Scratch,
    rng: &mut SplitMix64,
    chain: &Chain,
    status_at: *mut u8,
) -> Outcome {
    let outcome = run(cfg, sessions, cache, scratch, rng, chain);
    // SAFETY: the caller checked that `status_at` is the mapped last byte of the chain's
    // writable part, which the device owns until it publishes the used element (or, when a
    // fault leaves the status unwritten, a live local byte of the caller's).
    unsafe { status_at.write_volatile(outcome.status) };
    outcome
}

fn run(
    cfg: &DeviceConfig,
    sessions: &Sessions,
    cache: &mut SessionCache,
    scratch: &mut Scratch,
    rng: &mut SplitMix64,
    chain: &Chain,
) -> Outcome {
    if rng.chance(cfg.error_rate) {
        return Outcome { status: status::ERR, written: 1, injected: true };
    }
    let (r, w) = (&chain.readable, &chain.writable);
    let mut hdr = [0u8; DATA_REQ_SIZE];
    if !r.read(0, &mut hdr) {
        return Outcome::fail(status::ERR);
    }
    let Some(req) = DataRequest::decode(&hdr) else {
        return Outcome::fail(status::NOTSUPP);
    };
    let Some(session) = cache.get(sessions, req.session_id) else {
        return Outcome::fail(status::INVSESS);
    };
    let (aead, encrypt) = match req.opcode {
        op::CIPHER_ENCRYPT => (false, true),
        op::CIPHER_DECRYPT => (false, false),
        op::AEAD_ENCRYPT => (true, true),
        _ => (true, false),
    };
    if aead != session.max_aad.is_some() || encrypt != session.encrypt {
        return Outcome::fail(status::ERR);
    }
    let Some(o) = validate(cfg, &req, session.max_aad, encrypt) else {
        return Outcome::fail(status::ERR);
    };
    if o.iv_len != session.mode.iv_len() as u64 || session.mode.check_data_len(o.data_len as usize).is_err() {
        return Outcome::fail(status::ERR);
    }
    if r.len() != HDR + o.iv_len + o.src_len + o.aad_len || w.len() != o.dst_len + 1 {
        return Outcome::fail(status::ERR);
    }
    if !r.all_mapped() || !w.all_mapped() {
        return Outcome::fail(status::ERR);
    }
    let ok = Outcome { status: status::OK, written: o.dst_len as u32 + 1, injected: false };
    if cfg.null_crypto {
        return ok;
    }
    match transform(session.core.as_ref(), &o, r, w, scratch) {
        Ok(()) => ok,
        Err(CoreError::AuthFailed) => Outcome::fail(status::BADMSG),
        Err(e) => {
            log::debug!("data request failed in the core: {e}");
            Outcome::fail(status::ERR)
        }
    }
}

/// Checks the lengths of the header against each other and the limits.
fn validate(cfg: &DeviceConfig, req: &DataRequest, max_aad: Option<u32>, encrypt: bool) -> Option<Op> {
    let (iv_len, src_len, dst_len, aad_len, aead) = match req.params {
        DataParams::Cipher { iv_len, src_len, dst_len } => (iv_len, src_len, dst_len, 0, false),
        DataParams::Aead { iv_len, aad_len, src_len, dst_len, tag_len } => {
            // virtio 1.2: tag_len must be the session's (GCM, 16 bytes here).
            if u64::from(tag_len) != TAG {
                return None;
            }
            (iv_len, src_len, dst_len, aad_len, true)
        }
    };
    let (iv_len, src_len, dst_len, aad_len) =
        (u64::from(iv_len), u64::from(src_len), u64::from(dst_len), u64::from(aad_len));
    if src_len > cfg.max_size || iv_len > BLOCK_LEN as u64 {
        return None;
    }
    let data_len = match (aead, encrypt) {
        (false, _) => (dst_len == src_len).then_some(src_len)?,
        (true, true) => (dst_len == src_len + TAG).then_some(src_len)?,
        (true, false) => (src_len >= TAG && dst_len == src_len - TAG).then_some(dst_len)?,
    };
    if aead && aad_len > u64::from(max_aad.unwrap_or(0)) {
        return None;
    }
    Some(Op { encrypt, aead, iv_len, src_len, aad_len, data_len, dst_len })
}

/// Copies the source to the destination and runs the core on it.
fn transform(
    core: &dyn CipherCore,
    o: &Op,
    r: &SegList,
    w: &SegList,
    scratch: &mut Scratch,
) -> Result<(), CoreError> {
    let internal = CoreError::Internal { mode: core.mode(), what: "driver buffer access" };
    let mut iv = [0u8; BLOCK_LEN];
    let iv = &mut iv[..o.iv_len as usize];
    let src_off = HDR + o.iv_len;
    let mut tag = [0u8; GCM_TAG_LEN];
    scratch.aad.resize(o.aad_len as usize, 0);
    // Everything the core reads besides the data is copied out first: the destination may
    // overlap the source, and the driver may decrypt in place.
    if !r.read(HDR, iv) || !r.read(src_off + o.src_len, &mut scratch.aad) {
        return Err(internal);
    }
    if o.aead && !o.encrypt && !r.read(src_off + o.data_len, &mut tag) {
        return Err(internal);
    }
    let aad = &scratch.aad[..];
    let tag_len = if o.aead { GCM_TAG_LEN } else { 0 };
    let result = if let Some(p) = w.contiguous(0, o.data_len) {
        if !dma::copy(r, src_off, w, 0, o.data_len) {
            return Err(internal);
        }
        // SAFETY: `p..p + data_len` is one mapped piece of a buffer the driver made available
        // as device-writable; under virtio's ownership rule the driver does not touch it until
        // the used element is published, so the device may hold the only reference. The
        // snapshot inside `w` keeps the memory alive for this call.
        let data = unsafe { slice::from_raw_parts_mut(p, o.data_len as usize) };
        apply(core, o.encrypt, iv, aad, data, &mut tag[..tag_len])
    } else {
        let data = &mut scratch.bounce;
        data.resize(o.data_len as usize, 0);
        if !r.read(src_off, data) {
            return Err(internal);
        }
        let res = apply(core, o.encrypt, iv, aad, data, &mut tag[..tag_len]);
        // On a failed tag check the core wiped `data`, which then clears the destination.
        if !w.write(0, data) {
            return Err(internal);
        }
        res
    };
    result?;
    if o.aead && o.encrypt && !w.write(o.data_len, &tag) {
        return Err(internal);
    }
    Ok(())
}

fn apply(
    core: &dyn CipherCore,
    encrypt: bool,
    iv: &[u8],
    aad: &[u8],
    data: &mut [u8],
    tag: &mut [u8],
) -> Result<(), CoreError> {
    if encrypt {
        core.encrypt(iv, aad, data, tag)
    } else {
        core.decrypt(iv, aad, data, tag)
    }
}
