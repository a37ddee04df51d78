//! How one data request is laid out in DMA memory and descriptors.
//!
//! Every ring slot owns a fixed block of DMA memory for the parts of a request that are not the
//! payload: the request header and IV, the input tag and short AAD, the output tag and the
//! status byte, and (with indirect descriptors) the descriptor table. The payload is the
//! caller's DMA buffer or the slot's bounce buffer. The device sees the bytes in the order of
//! the layout documented in `crypt_vfio_spec::crypto`.

use crypt_vfio_cores::Mode;
use crypt_vfio_spec::crypto::{self, op, DataParams, DataRequest};
use crypt_vfio_spec::ring::{DESC_F_NEXT, DESC_F_WRITE};

use super::config::wire_algo;
use super::session::DeviceSession;
use crate::engine::{Direction, TAG_LEN};
use crate::virtio::split_queue::encode_desc;

// The parts the device touches for every request (header, IV, status, descriptor table) are
// packed into the slot's first three cache lines: each line the device reads was written by the
// driver on another core, so every extra line is a cross-core transfer per request.

/// Bytes of slot memory per ring slot.
pub const SLOT_STRIDE: usize = 512;
/// Request header, followed by the IV.
pub const HDR: usize = 0;
/// IV, right after the 72-byte header.
pub const IV: usize = crypto::DATA_REQ_SIZE;
/// AEAD encryption: the tag the device produces, followed by the status byte.
pub const TAG_OUT: usize = IV + 16;
/// The status byte.
pub const STATUS: usize = TAG_OUT + TAG_LEN;
/// The indirect descriptor table (16-byte aligned).
pub const INDIRECT: usize = 112;
/// AEAD decryption: the tag to check, followed by inline AAD.
pub const TAG_IN: usize = INDIRECT + MAX_DESCS * 16;
/// Inline AAD.
pub const AAD: usize = TAG_IN + TAG_LEN;
/// Longest AAD kept inline; longer AAD is bounced through its own buffer.
pub const AAD_INLINE_MAX: usize = SLOT_STRIDE - AAD;
/// Most descriptors one request needs.
pub const MAX_DESCS: usize = 6;

/// One descriptor's worth of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// IOVA.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// The descriptors of one request, in order: readable ones first.
#[derive(Clone, Copy, Debug, Default)]
pub struct Segments {
    /// The segments.
    pub items: [Segment; MAX_DESCS],
    /// How many are used.
    pub len: usize,
}

impl Segments {
    fn push(&mut self, addr: u64, len: usize, write: bool) {
        if len > 0 {
            self.items[self.len] = Segment { addr, len: len as u32, write };
            self.len += 1;
        }
    }

    /// The used segments.
    pub fn as_slice(&self) -> &[Segment] {
        &self.items[..self.len]
    }

    /// Encodes the segments as a chain of descriptors whose `next` fields count up from
    /// `first_next`; returns the bytes to write.
    pub fn encode(&self, first_next: u16, out: &mut [u8; MAX_DESCS * DESC_SIZE]) -> usize {
        for (k, s) in self.as_slice().iter().enumerate() {
            let last = k + 1 == self.len;
            let flags = if s.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            let d = encode_desc(s.addr, s.len, flags, first_next.wrapping_add(k as u16));
            out[k * DESC_SIZE..][..DESC_SIZE].copy_from_slice(&d);
        }
        self.len * DESC_SIZE
    }
}

const DESC_SIZE: usize = crypt_vfio_spec::ring::DESC_SIZE as usize;

/// Everything the device needs to know about a request, computed once.
pub struct Plan {
    /// The 72-byte header.
    pub header: [u8; crypto::DATA_REQ_SIZE],
    /// The descriptors.
    pub segments: Segments,
    /// Bytes the device must report written for a successful request.
    pub expect_written: u32,
}

/// The lengths of a request's parts.
#[derive(Clone, Copy, Debug)]
pub struct Lengths {
    /// IV bytes.
    pub iv: usize,
    /// AAD bytes.
    pub aad: usize,
    /// Payload bytes.
    pub data: usize,
}

/// Lays out a request; `slot` and `data` are the IOVAs of the slot memory and the payload,
/// `aad_ext` of bounced AAD (when too long to inline); `session_id` is the device id of the
/// session's half for `direction`, checked current by the caller.
pub fn plan(
    session: &DeviceSession,
    session_id: u64,
    direction: Direction,
    lens: Lengths,
    slot: u64,
    data: u64,
    aad_ext: Option<u64>,
) -> Plan {
    let Lengths { iv: iv_len, aad: aad_len, data: data_len } = lens;
    let aead = session.mode == Mode::Gcm;
    let (_, algo) = wire_algo(session.mode);
    let n = data_len as u32;
    let t = TAG_LEN as u32;
    let (opcode, params, dst_len) = match (aead, direction) {
        (false, dir) => {
            let opcode = if dir == Direction::Encrypt { op::CIPHER_ENCRYPT } else { op::CIPHER_DECRYPT };
            (opcode, DataParams::Cipher { iv_len: iv_len as u32, src_len: n, dst_len: n }, n)
        }
        (true, Direction::Encrypt) => {
            let p = DataParams::Aead {
                iv_len: iv_len as u32,
                aad_len: aad_len as u32,
                src_len: n,
                dst_len: n + t,
                tag_len: t,
            };
            (op::AEAD_ENCRYPT, p, n + t)
        }
        (true, Direction::Decrypt) => {
            let p = DataParams::Aead {
                iv_len: iv_len as u32,
                aad_len: aad_len as u32,
                src_len: n + t,
                dst_len: n,
                tag_len: t,
            };
            (op::AEAD_DECRYPT, p, n)
        }
    };
    let header = DataRequest { opcode, algo, session_id, flag: 0, params }.encode();
    let mut s = Segments::default();
    let at = |off: usize| slot + off as u64;
    s.push(at(HDR), crypto::DATA_REQ_SIZE + iv_len, false);
    s.push(data, data_len, false);
    let aad_inline = aad_ext.is_none();
    match (aead, direction) {
        (true, Direction::Decrypt) => {
            s.push(at(TAG_IN), TAG_LEN + if aad_inline { aad_len } else { 0 }, false);
        }
        (true, Direction::Encrypt) if aad_inline => s.push(at(AAD), aad_len, false),
        _ => {}
    }
    if let Some(a) = aad_ext {
        s.push(a, aad_len, false);
    }
    s.push(data, data_len, true);
    if aead && direction == Direction::Encrypt {
        s.push(at(TAG_OUT), TAG_LEN + 1, true);
    } else {
        s.push(at(STATUS), 1, true);
    }
    Plan { header, segments: s, expect_written: dst_len + 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// virtio 1.2 `virtio_crypto_aead_data_flf`: iv_len, aad_len, src_data_len, dst_data_len,
    /// tag_len, reserved, from byte 24 of the request header.
    #[test]
    fn aead_header_writes_tag_len() {
        let session = DeviceSession::for_test(Mode::Gcm, 7, 8);
        for (dir, src, dst) in [(Direction::Encrypt, 64u32, 80u32), (Direction::Decrypt, 80, 64)] {
            let p = plan(&session, 7, dir, Lengths { iv: 12, aad: 20, data: 64 }, 0x1000, 0x2000, None);
            let h = &p.header;
            let at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
            assert_eq!((at(24), at(28), at(32), at(36)), (12, 20, src, dst), "{dir:?}");
            assert_eq!(at(40), TAG_LEN as u32, "{dir:?}: tag_len");
            assert_eq!(at(44), 0, "reserved");
        }
    }
}
