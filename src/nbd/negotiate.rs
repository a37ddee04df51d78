//! The handshake phase: fixed newstyle negotiation up to the choice of the export.
//!
//! Every option gets a reply, including the ones this server does not implement
//! (`NBD_REP_ERR_UNSUP`), so a client can fall back instead of being cut off. Structured
//! replies, TLS and metadata contexts are refused that way; the simple reply covers what the
//! server does.

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

/// How the handshake ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The client chose the export: transmission follows on the same socket.
    Transmission,
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

/// Runs the handshake on a fresh connection.
pub(crate) fn negotiate<R: Read, W: Write>(
    reader: &mut ClientReader<R>,
    w: &mut W,
    export: &ExportInfo,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes());
    send(w, &hello)?;

    let mut flags = [0u8; 4];
    if reader.next_message(&mut flags).map_err(io("reading client flags"))? != Next::Message {
        return Ok(Outcome::Ended);
    }
    let client_flags = be_u32(&flags);
    if client_flags & !proto::client::KNOWN != 0 {
        return Err(Error::Nbd(NbdError::Protocol(format!("unknown client flags {client_flags:#x}"))));
    }
    let fixed = client_flags & proto::client::FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & proto::client::NO_ZEROES != 0;

    for _ in 0..MAX_OPTIONS {
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
        if !fixed && option != opt::EXPORT_NAME {
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
                r.extend_from_slice(&export.flags.to_be_bytes());
                if !no_zeroes {
                    r.resize(r.len() + proto::EXPORT_NAME_PADDING, 0);
                }
                send(w, &r)?;
                return Ok(Outcome::Transmission);
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
                if info_or_go(w, option, &data, export)? && option == opt::GO {
                    return Ok(Outcome::Transmission);
                }
            }
            opt::STRUCTURED_REPLY => {
                reply(w, option, rep::ERR_UNSUP, b"structured replies are not supported")?;
            }
            opt::STARTTLS => reply(w, option, rep::ERR_UNSUP, b"TLS is not supported")?,
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                reply(w, option, rep::ERR_UNSUP, b"metadata contexts are not supported")?;
            }
            _ => reply(w, option, rep::ERR_UNSUP, format!("option {option} is not supported").as_bytes())?,
        }
    }
    Err(Error::Nbd(NbdError::Protocol(format!("more than {MAX_OPTIONS} options without choosing an export"))))
}

/// Answers `NBD_OPT_INFO` or `NBD_OPT_GO`; true when it ended with `NBD_REP_ACK`.
fn info_or_go<W: Write>(w: &mut W, option: u32, data: &[u8], export: &ExportInfo) -> Result<bool> {
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
    item.extend_from_slice(&export.flags.to_be_bytes());
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
    fn read_only_exports_do_not_offer_writes() {
        let ro = transmission_flags(true);
        assert_ne!(ro & tflags::READ_ONLY, 0);
        assert_eq!(ro & (tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES | tflags::SEND_FUA), 0);
        let rw = transmission_flags(false);
        assert_eq!(rw & tflags::READ_ONLY, 0);
        assert_ne!(rw & tflags::SEND_WRITE_ZEROES, 0);
    }
}
