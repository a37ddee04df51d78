//! The kernel NBD client's generic netlink interface: attach connected sockets to /dev/nbdN,
//! and detach them.
//!
//! `nbd-client` and `qemu-nbd -c` do the NBD handshake in userspace and then hand the kernel the
//! connected socket; `crypt-vfio open --nbd` has no handshake to do (its server is in the same
//! process, on the other end of a socketpair), so it only needs the hand-over: the `nbd` genl
//! family's `NBD_CMD_CONNECT` (size, block size, transmission flags, the sockets) and
//! `NBD_CMD_DISCONNECT`. The messages are built and parsed here as bytes, without a netlink
//! library, so that their encoding is tested on machines without the `nbd` module.
//!
//! Numbers are from the kernel's uapi headers `linux/netlink.h`, `linux/genetlink.h` and
//! `linux/nbd-netlink.h`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// What went wrong talking to the kernel's NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdNetlinkError {
    /// A system call on the netlink socket failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel has no `nbd` genl family: the module is not loaded.
    #[error("the kernel has no NBD client (generic netlink family \"nbd\"); load it with `modprobe nbd`")]
    NoFamily,
    /// The kernel refused the request.
    #[error("the kernel refused {what}: {source}")]
    Refused {
        /// The request.
        what: &'static str,
        /// The errno it answered, as an error.
        #[source]
        source: std::io::Error,
    },
    /// A message from the kernel could not be parsed.
    #[error("malformed netlink message from the kernel: {0}")]
    Malformed(&'static str),
}

type Result<T> = std::result::Result<T, NbdNetlinkError>;
/// One attribute: its type (flags masked off) and payload.
type Attr = (u16, Vec<u8>);

// linux/netlink.h
const NETLINK_GENERIC: i32 = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

// linux/genetlink.h
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// linux/nbd-netlink.h
const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// What `NBD_CMD_CONNECT` tells the kernel about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The device to use (`/dev/nbdN`); `None`: the kernel picks a free one.
    pub index: Option<u32>,
    /// Export size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Logical block size: 512..=4096, a power of two.
    pub block_size: u64,
    /// Seconds a request may take before the kernel fails it.
    pub timeout_s: u64,
    /// The NBD transmission flags (`NBD_FLAG_*`), as a server would send them.
    pub server_flags: u64,
    /// An identifier the kernel shows in /sys/block/nbdN/backend.
    pub backend: String,
    /// The kernel's ends of the connections (one or more).
    pub sockets: Vec<RawFd>,
}

/// A netlink message under construction: header, genl header, attributes.
struct Message {
    buf: Vec<u8>,
    /// Start offsets of the nested attributes still open.
    nests: Vec<usize>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl Message {
    fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Message {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Message { buf, nests: Vec::new() }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    fn string(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut z = s.as_bytes().to_vec();
        z.push(0);
        self.attr(kind, &z)
    }

    fn begin_nest(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end_nest(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("end_nest without begin_nest");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(mut self) -> Vec<u8> {
        debug_assert!(self.nests.is_empty());
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The `CTRL_CMD_GETFAMILY` request that asks for the `nbd` family's id.
pub fn encode_get_family(seq: u32) -> Vec<u8> {
    let mut m = Message::new(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq, CTRL_CMD_GETFAMILY, 1);
    m.string(CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
    m.finish()
}

/// The `NBD_CMD_CONNECT` request for `c`, to the family `family`.
pub fn encode_connect(family: u16, seq: u32, c: &Connect) -> Vec<u8> {
    let mut m = Message::new(family, NLM_F_REQUEST | NLM_F_ACK, seq, NBD_CMD_CONNECT, NBD_GENL_VERSION);
    if let Some(i) = c.index {
        m.u32(NBD_ATTR_INDEX, i);
    }
    m.u64(NBD_ATTR_SIZE_BYTES, c.size)
        .u64(NBD_ATTR_BLOCK_SIZE_BYTES, c.block_size)
        .u64(NBD_ATTR_TIMEOUT, c.timeout_s)
        .u64(NBD_ATTR_SERVER_FLAGS, c.server_flags)
        // No NBD_CFLAG_DESTROY_ON_DISCONNECT nor DISCONNECT_ON_CLOSE: the device lives until
        // `close` disconnects it, whoever opens and closes it meanwhile.
        .u64(NBD_ATTR_CLIENT_FLAGS, 0)
        // A dead connection is an error at once: the server is in this process, it is not coming back.
        .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, 0)
        .string(NBD_ATTR_BACKEND_IDENTIFIER, &c.backend);
    m.begin_nest(NBD_ATTR_SOCKETS);
    for &fd in &c.sockets {
        m.begin_nest(NBD_SOCK_ITEM).u32(NBD_SOCK_FD, fd as u32).end_nest();
    }
    m.end_nest();
    m.finish()
}

/// The `NBD_CMD_DISCONNECT` request for /dev/nbd`index`.
pub fn encode_disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut m = Message::new(family, NLM_F_REQUEST | NLM_F_ACK, seq, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
    m.u32(NBD_ATTR_INDEX, index);
    m.finish()
}

/// One message the kernel sent, as far as this module cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The acknowledgement (error 0) or refusal (a negative errno) of request `seq`.
    Ack {
        /// The request it answers.
        seq: u32,
        /// 0, or a negative errno.
        error: i32,
    },
    /// A genl message answering request `seq`, with its top-level attributes.
    Data {
        /// The request it answers.
        seq: u32,
        /// (type, payload) of each top-level attribute.
        attrs: Vec<Attr>,
    },
    /// The end of a multi-part answer.
    Done,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_ne_bytes([s[0], s[1]]))
        .ok_or(NbdNetlinkError::Malformed("truncated field"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(NbdNetlinkError::Malformed("truncated field"))
}

/// Splits what one `recv` returned into messages; every length is checked before use.
pub fn parse_replies(mut b: &[u8]) -> Result<Vec<Reply>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = u32_at(b, 0)? as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(NbdNetlinkError::Malformed("message length outside the datagram"));
        }
        let kind = u16_at(b, 4)?;
        let seq = u32_at(b, 8)?;
        let body = &b[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_ERROR => Reply::Ack { seq, error: u32_at(body, 0)? as i32 },
            NLMSG_DONE => Reply::Done,
            _ => {
                let attrs = body.get(GENL_HDRLEN..).ok_or(NbdNetlinkError::Malformed("no genl header"))?;
                Reply::Data { seq, attrs: parse_attrs(attrs)? }
            }
        });
        b = b.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

fn parse_attrs(mut b: &[u8]) -> Result<Vec<Attr>> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16_at(b, 0)? as usize;
        if len < 4 || len > b.len() {
            return Err(NbdNetlinkError::Malformed("attribute length outside its message"));
        }
        out.push((u16_at(b, 2)? & NLA_TYPE_MASK, b[4..len].to_vec()));
        b = b.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

fn attr(attrs: &[Attr], kind: u16) -> Option<&[u8]> {
    attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.as_slice())
}

/// A generic netlink socket talking to the kernel's `nbd` family.
#[derive(Debug)]
pub struct NbdNetlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl NbdNetlink {
    /// Opens a generic netlink socket and looks up the `nbd` family.
    pub fn open() -> Result<NbdNetlink> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let raw =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_GENERIC) };
        if raw < 0 {
            return Err(NbdNetlinkError::Os {
                what: "opening a generic netlink socket",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut nl = NbdNetlink { fd, family: 0, seq: 1 };
        let seq = nl.next_seq();
        let replies = match nl.request(&encode_get_family(seq), seq, "looking up the nbd family") {
            Err(NbdNetlinkError::Refused { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Err(NbdNetlinkError::NoFamily)
            }
            other => other?,
        };
        nl.family = replies
            .iter()
            .find_map(|a| attr(a, CTRL_ATTR_FAMILY_ID))
            .and_then(|v| v.get(..2))
            .map(|v| u16::from_ne_bytes([v[0], v[1]]))
            .ok_or(NbdNetlinkError::Malformed("the family reply has no id"))?;
        Ok(nl)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Connects the export; returns the index of the device the kernel used.
    pub fn connect(&mut self, c: &Connect) -> Result<u32> {
        let seq = self.next_seq();
        let replies = self.request(&encode_connect(self.family, seq, c), seq, "NBD_CMD_CONNECT")?;
        replies
            .iter()
            .find_map(|a| attr(a, NBD_ATTR_INDEX))
            .and_then(|v| v.get(..4))
            .map(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
            .or(c.index)
            .ok_or(NbdNetlinkError::Malformed("the connect reply has no device index"))
    }

    /// Disconnects /dev/nbd`index`: the kernel sends `NBD_CMD_DISC` and shuts the sockets down.
    pub fn disconnect(&mut self, index: u32) -> Result<()> {
        let seq = self.next_seq();
        self.request(&encode_disconnect(self.family, seq, index), seq, "NBD_CMD_DISCONNECT").map(|_| ())
    }

    /// Sends `msg` and collects the attributes of every data reply to it, up to its ack.
    fn request(&mut self, msg: &[u8], seq: u32, what: &'static str) -> Result<Vec<Vec<Attr>>> {
        // SAFETY: sockaddr_nl is plain data; all zero addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `msg` and `kernel` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(NbdNetlinkError::Os { what, source: std::io::Error::last_os_error() });
        }
        let mut data = Vec::new();
        let mut buf = vec![0u8; 32 << 10];
        loop {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NbdNetlinkError::Os { what, source: e });
            }
            for r in parse_replies(&buf[..n as usize])? {
                match r {
                    Reply::Ack { seq: s, error } if s == seq => {
                        if error != 0 {
                            let source = std::io::Error::from_raw_os_error(-error);
                            return Err(NbdNetlinkError::Refused { what, source });
                        }
                        return Ok(data);
                    }
                    Reply::Data { seq: s, attrs } if s == seq => data.push(attrs),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes libnl would send for the same request (written out by hand from the headers:
    /// nlmsghdr, genlmsghdr, then attributes padded to 4 bytes).
    #[test]
    fn get_family_matches_the_wire_layout() {
        let m = encode_get_family(7);
        let mut want = Vec::new();
        want.extend_from_slice(&28u32.to_ne_bytes());
        want.extend_from_slice(&0x10u16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes()); // REQUEST | ACK
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[3, 1, 0, 0]);
        want.extend_from_slice(&8u16.to_ne_bytes()); // "nbd\0" + header
        want.extend_from_slice(&2u16.to_ne_bytes());
        want.extend_from_slice(b"nbd\0");
        assert_eq!(m, want);
    }

    #[test]
    fn connect_carries_every_attribute_and_nests_the_sockets() {
        let c = Connect {
            index: Some(3),
            size: 64 << 20,
            block_size: 4096,
            timeout_s: 60,
            server_flags: 0x16d,
            backend: "crypt-vfio:abc".into(),
            sockets: vec![5, 9],
        };
        let m = encode_connect(0x21, 4, &c);
        assert_eq!(u32_at(&m, 0).unwrap() as usize, m.len());
        assert_eq!(u16_at(&m, 4).unwrap(), 0x21);
        assert_eq!(m[16], NBD_CMD_CONNECT);
        assert_eq!(m[17], NBD_GENL_VERSION);
        let attrs = parse_attrs(&m[20..]).unwrap();
        let u64_of = |k| u64::from_ne_bytes(attr(&attrs, k).unwrap().try_into().unwrap());
        assert_eq!(attr(&attrs, NBD_ATTR_INDEX).unwrap(), 3u32.to_ne_bytes());
        assert_eq!(u64_of(NBD_ATTR_SIZE_BYTES), 64 << 20);
        assert_eq!(u64_of(NBD_ATTR_BLOCK_SIZE_BYTES), 4096);
        assert_eq!(u64_of(NBD_ATTR_TIMEOUT), 60);
        assert_eq!(u64_of(NBD_ATTR_SERVER_FLAGS), 0x16d);
        assert_eq!(u64_of(NBD_ATTR_DEAD_CONN_TIMEOUT), 0);
        assert_eq!(attr(&attrs, NBD_ATTR_BACKEND_IDENTIFIER).unwrap(), b"crypt-vfio:abc\0");
        // The sockets nest: SOCKETS { ITEM { FD }, ITEM { FD } }.
        let items = parse_attrs(attr(&attrs, NBD_ATTR_SOCKETS).unwrap()).unwrap();
        let fds: Vec<u32> = items
            .iter()
            .map(|(k, v)| {
                assert_eq!(*k, NBD_SOCK_ITEM);
                let inner = parse_attrs(v).unwrap();
                assert_eq!(inner.len(), 1);
                assert_eq!(inner[0].0, NBD_SOCK_FD);
                u32::from_ne_bytes(inner[0].1.as_slice().try_into().unwrap())
            })
            .collect();
        assert_eq!(fds, [5, 9]);
    }

    #[test]
    fn nested_attributes_carry_the_nested_flag_and_their_whole_length() {
        let c = Connect {
            index: None,
            size: 4096,
            block_size: 512,
            timeout_s: 1,
            server_flags: 1,
            backend: String::new(),
            sockets: vec![1],
        };
        let m = encode_connect(0x21, 1, &c);
        // Without an index the first attribute is the size.
        assert_eq!(u16_at(&m, 22).unwrap(), NBD_ATTR_SIZE_BYTES);
        // The sockets attribute is last: 4 (SOCKETS) + 4 (ITEM) + 8 (FD) bytes.
        let tail = &m[m.len() - 16..];
        assert_eq!(u16_at(tail, 0).unwrap(), 16);
        assert_eq!(u16_at(tail, 2).unwrap(), NBD_ATTR_SOCKETS | NLA_F_NESTED);
        assert_eq!(u16_at(tail, 4).unwrap(), 12);
        assert_eq!(u16_at(tail, 6).unwrap(), NBD_SOCK_ITEM | NLA_F_NESTED);
        assert_eq!(u16_at(tail, 8).unwrap(), 8);
        assert_eq!(u16_at(tail, 10).unwrap(), NBD_SOCK_FD);
        assert_eq!(u32_at(tail, 12).unwrap(), 1);
    }

    #[test]
    fn disconnect_names_the_device() {
        let m = encode_disconnect(0x22, 9, 7);
        assert_eq!(m.len(), 28);
        assert_eq!(m[16], NBD_CMD_DISCONNECT);
        assert_eq!(u16_at(&m, 20).unwrap(), 8);
        assert_eq!(u16_at(&m, 22).unwrap(), NBD_ATTR_INDEX);
        assert_eq!(u32_at(&m, 24).unwrap(), 7);
    }

    fn ack(seq: u32, error: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&error.to_ne_bytes());
        b.extend_from_slice(&[0u8; 16]); // the request's header, echoed
        b
    }

    #[test]
    fn replies_parse_data_then_ack() {
        let mut m = Message::new(0x21, 0, 4, NBD_CMD_CONNECT, 1);
        m.u32(NBD_ATTR_INDEX, 2);
        let mut b = m.finish();
        b.extend(ack(4, 0));
        let r = parse_replies(&b).unwrap();
        assert_eq!(r[0], Reply::Data { seq: 4, attrs: vec![(NBD_ATTR_INDEX, 2u32.to_ne_bytes().to_vec())] });
        assert_eq!(r[1], Reply::Ack { seq: 4, error: 0 });
        assert_eq!(
            parse_replies(&ack(5, -libc::EBUSY)).unwrap(),
            [Reply::Ack { seq: 5, error: -libc::EBUSY }]
        );
    }

    #[test]
    fn lengths_past_the_datagram_are_refused() {
        let mut b = ack(1, 0);
        b[0] = 200; // claims 200 bytes in a 36-byte datagram
        assert!(matches!(parse_replies(&b), Err(NbdNetlinkError::Malformed(_))));
        let mut m = Message::new(0x21, 0, 4, 1, 1);
        m.u32(NBD_ATTR_INDEX, 2);
        let mut b = m.finish();
        b[20] = 60; // an attribute longer than its message
        assert!(matches!(parse_replies(&b), Err(NbdNetlinkError::Malformed(_))));
        b[20] = 2; // shorter than its own header
        assert!(matches!(parse_replies(&b), Err(NbdNetlinkError::Malformed(_))));
        assert!(matches!(parse_replies(&[1, 2, 3]), Err(NbdNetlinkError::Malformed(_))));
    }
}
