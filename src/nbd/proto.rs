//! NBD wire constants and message layouts (the fixed newstyle handshake, simple and
//! structured replies).
//!
//! Kept apart from the server logic so that the protocol's numbers live in one place and the
//! tests' client can use the very same definitions. Every integer on the wire is big-endian.

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows `NBDMAGIC` in newstyle negotiation and starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// The one metadata context this server offers: which ranges are holes and which read as zeroes.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Handshake flags the server sends.
pub mod handshake {
    /// The server speaks fixed newstyle (options get replies).
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags, the client's answer to the handshake flags.
pub mod client {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag a client may set.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags: what the export supports.
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes fail with `EPERM`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The medium is rotational.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flushes and FUA on one connection cover writes completed on every connection.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option types sent by the client during the handshake.
pub mod opt {
    /// Choose an export and enter transmission (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End the handshake without transmission.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Ask for structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Ask for extended (64-bit) headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// The option succeeded (or its list of replies is complete).
    pub const ACK: u32 = 1;
    /// One export in answer to `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// One item of information in answer to `NBD_OPT_INFO`/`NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    /// One metadata context in answer to `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31 marks every error reply.
    pub const ERR: u32 = 1 << 31;
    /// The option is not known to this server.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// The option is known but refused by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// The option is malformed.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// TLS is required before this option.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The request or reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information types in `NBD_REP_INFO` replies (and requested in `NBD_OPT_INFO`/`NBD_OPT_GO`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission request types.
pub mod cmd {
    /// Read `length` bytes at `offset`.
    pub const READ: u16 = 0;
    /// Write the `length` bytes that follow the header.
    pub const WRITE: u16 = 1;
    /// Disconnect once outstanding requests are answered; no reply.
    pub const DISC: u16 = 2;
    /// Make completed writes durable.
    pub const FLUSH: u16 = 3;
    /// Discard a range (a hint).
    pub const TRIM: u16 = 4;
    /// Prefetch a range.
    pub const CACHE: u16 = 5;
    /// Write zeroes over a range without a payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query block status (structured replies only).
    pub const BLOCK_STATUS: u16 = 7;
}

/// Structured reply chunk types.
pub mod reply_type {
    /// No payload (ends a reply that had nothing else to say).
    pub const NONE: u16 = 0;
    /// Data read at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A range of a read that is all zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error, with a message.
    pub const ERROR: u16 = (1 << 15) | 1;
}

/// Structured reply chunk flags.
pub mod reply_flag {
    /// The last chunk of the reply.
    pub const DONE: u16 = 1 << 0;
}

/// `base:allocation` status flags.
pub mod state {
    /// No storage is allocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// Command flags in a request.
pub mod cmd_flag {
    /// Reply only once the command's writes are durable.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_WRITE_ZEROES`: do not leave a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_READ`: do not fragment the structured reply.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_BLOCK_STATUS`: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_WRITE_ZEROES`: fail unless zeroing is fast.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Error values of a reply (the protocol's own numbering, equal to Linux errno values).
pub mod errno {
    /// Operation not permitted (writes to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (bad range, flag, command or length).
    pub const EINVAL: u32 = 22;
    /// No space left (writes beyond the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Bytes of an option header: the `IHAVEOPT` magic, the option type and the data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Zero bytes that end an `NBD_OPT_EXPORT_NAME` reply unless both sides agreed to drop them.
pub const EXPORT_NAME_PADDING: usize = 124;

/// A transmission request header as it comes off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags ([`cmd_flag`]).
    pub flags: u16,
    /// Command type ([`cmd`]).
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub handle: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte count.
    pub length: u32,
}

impl Request {
    /// Parses a header, or `None` when the magic is wrong (the stream is out of step and cannot
    /// be trusted any further).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be_u32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be_u16(&b[4..6]),
            kind: be_u16(&b[6..8]),
            handle: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            length: be_u32(&b[24..28]),
        })
    }

    /// The wire form (what a client sends).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header: error 0 for success, echoing the request's handle.
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header announcing `len` bytes of chunk payload.
pub fn structured_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A whole final `NBD_REPLY_TYPE_ERROR` chunk (error, empty message).
pub fn structured_error(error: u32, handle: u64) -> Vec<u8> {
    let mut b = structured_header(reply_flag::DONE, reply_type::ERROR, handle, 6).to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b
}

/// An option reply: header and data in one buffer, so it goes out in one write.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Reads a big-endian `u16` from the first two bytes.
pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Reads a big-endian `u32` from the first four bytes.
pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads a big-endian `u64` from the first eight bytes.
pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The reply error for a failed device operation: the protocol only has a few values, so
/// everything without a closer match is an I/O error.
pub fn errno_of(e: &crate::Error) -> u32 {
    use crate::{CryptoError, Error, VolumeError};
    match e {
        Error::Volume(VolumeError::ReadOnly) => errno::EPERM,
        Error::Volume(VolumeError::OutOfRange { .. }) | Error::Crypto(CryptoError::InvalidRequest(_)) => {
            errno::EINVAL
        }
        Error::Os { source, .. } => match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => errno::ENOSPC,
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => errno::EPERM,
            Some(libc::EINVAL) => errno::EINVAL,
            _ => errno::EIO,
        },
        _ => errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_checks_magic() {
        let r = Request {
            flags: cmd_flag::FUA,
            kind: cmd::WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let mut b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::parse(&b), Some(r));
        b[3] ^= 1;
        assert_eq!(Request::parse(&b), None);
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let b = simple_reply(errno::EINVAL, 7);
        assert_eq!(&b[..], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]);
        let o = option_reply(opt::GO, rep::ERR_UNKNOWN, b"x");
        assert_eq!(&o[0..8], &[0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(be_u32(&o[8..]), 7);
        assert_eq!(be_u32(&o[12..]), 0x8000_0006);
        assert_eq!(be_u32(&o[16..]), 1);
        assert_eq!(o[20], b'x');
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        let e = structured_error(errno::EIO, 9);
        assert_eq!(&e[..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1]);
        assert_eq!(be_u64(&e[8..]), 9);
        assert_eq!(be_u32(&e[16..]), 6);
        assert_eq!(be_u32(&e[20..]), 5);
        assert_eq!(e.len(), 26);
    }

    #[test]
    fn device_errors_map_to_protocol_errors() {
        let os = |code| crate::Error::os("x", std::io::Error::from_raw_os_error(code));
        assert_eq!(errno_of(&os(libc::ENOSPC)), errno::ENOSPC);
        assert_eq!(errno_of(&os(libc::EROFS)), errno::EPERM);
        assert_eq!(errno_of(&os(libc::EIO)), errno::EIO);
        assert_eq!(errno_of(&crate::Error::Volume(crate::error::VolumeError::ReadOnly)), errno::EPERM);
        assert_eq!(
            errno_of(&crate::Error::Volume(crate::error::VolumeError::OutOfRange {
                offset: 1,
                len: 1,
                size: 1
            })),
            errno::EINVAL
        );
        assert_eq!(errno_of(&crate::Error::Crypto(crate::error::CryptoError::AuthFailed)), errno::EIO);
    }
}
