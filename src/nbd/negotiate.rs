//! The handshake phase: fixed newstyle negotiation up to the choice of the export.
//!
//! Every option gets a reply, including the ones this server does not implement
//! (`NBD_REP_ERR_UNSUP`), so a client can fall back instead of being cut off. The options that
//! shape transmission (structured replies, the `base:allocation` metadata context) are kept in
//! a [`Session`]. `NBD_OPT_STARTTLS` ends this phase with [`Outcome::StartTls`]: the caller
//! upgrades the socket and negotiation goes on over TLS from a clean slate, as the protocol
//! requires (nothing chosen before TLS is kept). With TLS required, every option but
//! `STARTTLS` and `ABORT` is refused with `NBD_REP_ERR_TLS_REQD` until then.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use super::proto::{self, be_u16, be_u32, handshake, info, opt, rep, tflags};
use super::stream::{ClientReader, Next};
use crate::error::{Error, NbdError, Result};

/// Option data larger than this is not a real client's: the connection is dropped.
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// A client still haggling after this many options is not going anywhere.
const MAX_OPTIONS: usize = 1024;
/// The longest export name the protocol allows.
const MAX_NAME: usize = 4096;
/// The context id of `base:allocation` (the only context; any id is the server's choice).
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What a client is told about the export.
#[derive(Debug, Clone)]
pub(crate) struct ExportInfo {
    /// The export's name; the empty name also selects it (the default export).
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// The device's preferred granularity.
    pub block_size: u32,
    /// Largest read or write payload accepted.
    pub max_payload: u32,
}

impl ExportInfo {
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// Minimum, preferred and maximum block size. The device is byte-addressed, so a client
    /// that did not ask is told (and may use) a minimum of 1; a client that asked promises to
    /// obey, so it gets the device's sector size as minimum and never makes the device
    /// read-modify-write.
    pub(crate) fn block_sizes(&self, client_asked: bool) -> (u32, u32, u32) {
        let bs = self.block_size;
        let usable = bs.is_power_of_two() && bs <= 65536;
        let min = if client_asked && usable && self.size % u64::from(bs) == 0 { bs } else { 1 };
        let preferred = if usable { bs.max(4096) } else { 4096 };
        let max = self.max_payload / min * min;
        (min, preferred, max)
    }
}

/// What the client chose for transmission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Session {
    /// Replies to reads and block status are structured.
    pub structured: bool,
    /// `base:allocation` was selected: block status is answered.
    pub base_allocation: bool,
}

/// How the server treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsPolicy {
    /// No credentials: `STARTTLS` is refused.
    Off,
    /// Clients may upgrade, or not.
    Allowed,
    /// Nothing but `STARTTLS` (and `ABORT`) before TLS.
    Required,
}

/// How the handshake ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The client chose the export: transmission follows on the same socket.
    Transmission(Session),
    /// `STARTTLS` was accepted: the caller upgrades the socket and calls
    /// [`Negotiation::options`] again over TLS.
    StartTls,
    /// The client aborted or left, or the server is stopping.
    Ended,
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::os(format!("NBD handshake: {what}"), e)
}

fn send<W: Write>(w: &mut W, bytes: &[u8]) -> Result<()> {
    w.write_all(bytes).and_then(|_| w.flush()).map_err(io("sending"))
}

fn reply<W: Write>(w: &mut W, option: u32, kind: u32, data: &[u8]) -> Result<()> {
    send(w, &proto::option_reply(option, kind, data))
}

/// One connection's handshake, which may span a TLS upgrade.
pub(crate) struct Negotiation<'a> {
    export: &'a ExportInfo,
    tls: TlsPolicy,
    tls_active: bool,
    fixed: bool,
    no_zeroes: bool,
    session: Session,
    options_seen: usize,
}

impl<'a> Negotiation<'a> {
    pub(crate) fn new(export: &'a ExportInfo, tls: TlsPolicy) -> Self {
        Negotiation {
            export,
            tls,
            tls_active: false,
            fixed: false,
            no_zeroes: false,
            session: Session::default(),
            options_seen: 0,
        }
    }

    /// Sends the greeting and reads the client's flags; false if the client left.
    pub(crate) fn greet<R: Read, W: Write>(
        &mut self,
        reader: &mut ClientReader<R>,
        w: &mut W,
    ) -> Result<bool> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes());
        send(w, &hello)?;

        let mut flags = [0u8; 4];
        if reader.next_message(&mut flags).map_err(io("reading client flags"))? != Next::Message {
            return Ok(false);
        }
        let client_flags = be_u32(&flags);
        if client_flags & !proto::client::KNOWN != 0 {
            return Err(Error::Nbd(NbdError::Protocol(format!("unknown client flags {client_flags:#x}"))));
        }
        if client_flags & proto::client::FIXED_NEWSTYLE == 0 {
            // Only NBD_OPT_EXPORT_NAME could follow, which cannot be refused politely; with
            // TLS required it would have to be.
            if self.tls == TlsPolicy::Required {
                return Err(Error::Nbd(NbdError::Protocol(
                    "a client without fixed newstyle cannot start TLS".into(),
                )));
            }
        }
        self.fixed = client_flags & proto::client::FIXED_NEWSTYLE != 0;
        self.no_zeroes = client_flags & proto::client::NO_ZEROES != 0;
        Ok(true)
    }

    /// The upgrade to TLS succeeded: everything negotiated before it is forgotten.
    pub(crate) fn tls_started(&mut self) {
        self.tls_active = true;
        self.session = Session::default();
    }

    /// Reads and answers options until the client chooses the export, starts TLS, or leaves.
    pub(crate) fn options<R: Read, W: Write>(
        &mut self,
        reader: &mut ClientReader<R>,
        w: &mut W,
        stop: &AtomicBool,
    ) -> Result<Outcome> {
        let export = self.export;
        while self.options_seen < MAX_OPTIONS {
            self.options_seen += 1;
            let mut header = [0u8; proto::OPTION_HEADER_LEN];
            if reader.next_message(&mut header).map_err(io("reading an option"))? != Next::Message {
                return Ok(Outcome::Ended);
            }
            if proto::be_u64(&header) != proto::IHAVEOPT {
                return Err(Error::Nbd(NbdError::Protocol("option without the IHAVEOPT magic".into())));
            }
            let option = be_u32(&header[8..]);
            let len = be_u32(&header[12..]);
            if len > MAX_OPTION_DATA {
                return Err(Error::Nbd(NbdError::Protocol(format!(
                    "option {option} carries {len} bytes of data"
                ))));
            }
            let mut data = vec![0u8; len as usize];
            reader.read_exact(&mut data).map_err(io("reading option data"))?;
            if !self.fixed && option != opt::EXPORT_NAME {
                return Err(Error::Nbd(NbdError::Protocol(format!(
                    "option {option} from a client without fixed newstyle"
                ))));
            }
            if stop.load(Ordering::Relaxed) {
                if option == opt::EXPORT_NAME {
                    // This option cannot be answered with an error: the only way out is to close.
                    return Ok(Outcome::Ended);
                }
                if option != opt::ABORT {
                    reply(w, option, rep::ERR_SHUTDOWN, b"the server is shutting down")?;
                    continue;
                }
            }
            if self.tls == TlsPolicy::Required
                && !self.tls_active
                && !matches!(option, opt::STARTTLS | opt::ABORT)
            {
                if option == opt::EXPORT_NAME {
                    return Err(Error::Nbd(NbdError::Protocol(
                        "NBD_OPT_EXPORT_NAME before the required TLS".into(),
                    )));
                }
                reply(w, option, rep::ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS first")?;
                continue;
            }
            match option {
                opt::EXPORT_NAME => {
                    if !export.matches(&data) {
                        return Err(Error::Nbd(NbdError::Protocol(format!(
                            "NBD_OPT_EXPORT_NAME asked for unknown export {:?}",
                            String::from_utf8_lossy(&data)
                        ))));
                    }
                    let mut r = Vec::with_capacity(10 + proto::EXPORT_NAME_PADDING);
                    r.extend_from_slice(&export.size.to_be_bytes());
                    r.extend_from_slice(&self.flags().to_be_bytes());
                    if !self.no_zeroes {
                        r.resize(r.len() + proto::EXPORT_NAME_PADDING, 0);
                    }
                    send(w, &r)?;
                    return Ok(Outcome::Transmission(self.session));
                }
                opt::ABORT => {
                    // The client may already have closed; the reply is a courtesy.
                    let _ = reply(w, option, rep::ACK, &[]);
                    return Ok(Outcome::Ended);
                }
                opt::LIST => {
                    if !data.is_empty() {
                        reply(w, option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    let mut server = Vec::new();
                    server.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    server.extend_from_slice(export.name.as_bytes());
                    server.extend_from_slice(export.description.as_bytes());
                    reply(w, option, rep::SERVER, &server)?;
                    reply(w, option, rep::ACK, &[])?;
                }
                opt::INFO | opt::GO => {
                    if info_or_go(w, option, &data, export, self.flags())? && option == opt::GO {
                        return Ok(Outcome::Transmission(self.session));
                    }
                }
                opt::STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        reply(w, option, rep::ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                        continue;
                    }
                    self.session.structured = true;
                    reply(w, option, rep::ACK, &[])?;
                }
                opt::STARTTLS => {
                    if !data.is_empty() {
                        reply(w, option, rep::ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?;
                    } else if self.tls_active {
                        reply(w, option, rep::ERR_INVALID, b"TLS is already running")?;
                    } else if self.tls == TlsPolicy::Off {
                        reply(w, option, rep::ERR_UNSUP, b"TLS is not configured on this server")?;
                    } else {
                        reply(w, option, rep::ACK, &[])?;
                        return Ok(Outcome::StartTls);
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(w, option, &data)?,
                _ => {
                    reply(w, option, rep::ERR_UNSUP, format!("option {option} is not supported").as_bytes())?
                }
            }
        }
        Err(Error::Nbd(NbdError::Protocol(format!(
            "more than {MAX_OPTIONS} options without choosing an export"
        ))))
    }

    /// The transmission flags for this session.
    fn flags(&self) -> u16 {
        if self.session.structured {
            // Reads are answered in one chunk: "do not fragment" holds whatever the client asks.
            self.export.flags | tflags::SEND_DF
        } else {
            self.export.flags
        }
    }

    /// Answers `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context<W: Write>(&mut self, w: &mut W, option: u32, data: &[u8]) -> Result<()> {
        let set = option == opt::SET_META_CONTEXT;
        if set && !self.session.structured {
            return reply(w, option, rep::ERR_INVALID, b"metadata contexts need structured replies first");
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            return reply(w, option, rep::ERR_INVALID, b"malformed metadata context request");
        };
        if !self.export.matches(name) {
            let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
            return reply(w, option, rep::ERR_UNKNOWN, msg.as_bytes());
        }
        let base = proto::BASE_ALLOCATION.as_bytes();
        // LIST with no query lists every context; "base:" asks for all of the base namespace.
        let wanted = if queries.is_empty() {
            !set
        } else {
            queries.iter().any(|q| *q == base || (!set && *q == b"base:"))
        };
        if set {
            // A SET replaces whatever an earlier one chose.
            self.session.base_allocation = wanted;
        }
        if wanted {
            let mut item = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            item.extend_from_slice(base);
            reply(w, option, rep::META_CONTEXT, &item)?;
        }
        reply(w, option, rep::ACK, &[])
    }
}

/// Splits metadata context request data into the export name and the queries; `None` if the
/// lengths do not add up.
fn parse_meta_request(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let name_len = be_u32(data.get(0..4)?) as usize;
    if name_len > MAX_NAME {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let mut rest = &data[4 + name_len..];
    let count = be_u32(rest.get(0..4)?) as usize;
    rest = &rest[4..];
    // Each query takes at least its four length bytes: a count beyond that is a lie.
    if count > rest.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = be_u32(rest.get(0..4)?) as usize;
        queries.push(rest.get(4..4usize.checked_add(len)?)?);
        rest = &rest[4 + len..];
    }
    rest.is_empty().then_some((name, queries))
}

/// Answers `NBD_OPT_INFO` or `NBD_OPT_GO`; true when it ended with `NBD_REP_ACK`.
fn info_or_go<W: Write>(
    w: &mut W,
    option: u32,
    data: &[u8],
    export: &ExportInfo,
    flags: u16,
) -> Result<bool> {
    let Some((name, requests)) = parse_info_request(data) else {
        reply(w, option, rep::ERR_INVALID, b"malformed export name or information request list")?;
        return Ok(false);
    };
    if !export.matches(name) {
        let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
        reply(w, option, rep::ERR_UNKNOWN, msg.as_bytes())?;
        return Ok(false);
    }
    let mut item = Vec::with_capacity(14);
    item.extend_from_slice(&info::EXPORT.to_be_bytes());
    item.extend_from_slice(&export.size.to_be_bytes());
    item.extend_from_slice(&flags.to_be_bytes());
    reply(w, option, rep::INFO, &item)?;

    let asked = |t: u16| requests.contains(&t);
    if asked(info::NAME) {
        let mut item = info::NAME.to_be_bytes().to_vec();
        item.extend_from_slice(export.name.as_bytes());
        reply(w, option, rep::INFO, &item)?;
    }
    if asked(info::DESCRIPTION) && !export.description.is_empty() {
        let mut item = info::DESCRIPTION.to_be_bytes().to_vec();
        item.extend_from_slice(export.description.as_bytes());
        reply(w, option, rep::INFO, &item)?;
    }
    // Sent even when not asked for (the protocol allows it): the maximum is worth knowing.
    let (min, preferred, max) = export.block_sizes(asked(info::BLOCK_SIZE));
    let mut item = info::BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        item.extend_from_slice(&v.to_be_bytes());
    }
    reply(w, option, rep::INFO, &item)?;
    reply(w, option, rep::ACK, &[])?;
    Ok(true)
}

/// Splits `NBD_OPT_INFO`/`NBD_OPT_GO` data into the export name and the information types
/// asked for; `None` if the lengths do not add up.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = be_u32(data.get(0..4)?) as usize;
    if name_len > MAX_NAME {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let rest = &data[4 + name_len..];
    let count = be_u16(rest.get(0..2)?) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    Some((name, list.chunks_exact(2).map(be_u16).collect()))
}

/// The transmission flags for an export of this device.
pub(crate) fn transmission_flags(read_only: bool) -> u16 {
    // Every connection shares the one device and a flush flushes all of it, so a flush on any
    // connection covers writes completed on all of them: multi-conn is safe.
    let common = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::CAN_MULTI_CONN;
    if read_only {
        common | tflags::READ_ONLY
    } else {
        common | tflags::SEND_FUA | tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(size: u64, block_size: u32) -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: String::new(),
            size,
            flags: transmission_flags(false),
            block_size,
            max_payload: 32 << 20,
        }
    }

    #[test]
    fn block_sizes_follow_the_protocol_rules() {
        assert_eq!(export(1 << 20, 512).block_sizes(true), (512, 4096, 32 << 20));
        assert_eq!(export(1 << 20, 512).block_sizes(false), (1, 4096, 32 << 20));
        assert_eq!(export(1 << 20, 65536).block_sizes(true), (65536, 65536, 32 << 20));
        // A size that is not a multiple of the sector would hide the tail: fall back to 1.
        assert_eq!(export(1000, 512).block_sizes(true), (1, 4096, 32 << 20));
        let mut odd = export(1 << 20, 4096);
        odd.max_payload = 100_000;
        assert_eq!(odd.block_sizes(true), (4096, 4096, 98_304));
    }

    #[test]
    fn info_requests_parse_only_when_lengths_agree() {
        let mut d = vec![0, 0, 0, 4];
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&[0, 2, 0, 3, 0, 1]);
        assert_eq!(parse_info_request(&d), Some((&b"disk"[..], vec![3, 1])));
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 9, b'a']), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 0, 0, 0]), Some((&b""[..], vec![])));
    }

    #[test]
    fn meta_context_requests_parse_only_when_lengths_agree() {
        let mut d = vec![0, 0, 0, 4];
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 5]);
        d.extend_from_slice(b"base:");
        d.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(parse_meta_request(&d), Some((&b"disk"[..], vec![&b"base:"[..], &b""[..]])));
        assert_eq!(parse_meta_request(&d[..d.len() - 1]), None);
        let mut extra = d.clone();
        extra.push(0);
        assert_eq!(parse_meta_request(&extra), None);
        // A count no data could hold, and a query length past the end.
        assert_eq!(parse_meta_request(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(parse_meta_request(&[0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(parse_meta_request(&[0, 0, 0, 0, 0, 0, 0, 0]), Some((&b""[..], vec![])));
    }

    #[test]
    fn read_only_exports_do_not_offer_writes() {
        let ro = transmission_flags(true);
        assert_ne!(ro & tflags::READ_ONLY, 0);
        assert_eq!(ro & (tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES | tflags::SEND_FUA), 0);
        let rw = transmission_flags(false);
        assert_eq!(rw & tflags::READ_ONLY, 0);
        assert_ne!(rw & tflags::SEND_WRITE_ZEROES, 0);
    }
}
