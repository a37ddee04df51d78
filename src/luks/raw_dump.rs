//! `dump` of a header crypt-vfio cannot use (a hash or cipher it does not implement, a LUKS2
//! reencryption in progress): shown field by field from the bytes, as `cryptsetup luksDump`
//! shows it, without interpreting what is unsupported.

use std::fmt::Write as _;
use std::fs::File;

use super::keyslot::read_exact;
use super::{hex, luks1};
use crate::error::Result;

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The header of `file` as text, from its raw fields (LUKS1) or its binary header and JSON
/// metadata (LUKS2, either copy). Checks nothing beyond the magic and sizes it needs to read.
pub fn raw_dump(file: &File) -> Result<String> {
    let mut b = vec![0u8; 4096];
    read_exact(file, &mut b[..luks1::HEADER_LEN], 0, "the LUKS header")?;
    let mut out = String::new();
    if b[6..8] == [0, 1] {
        let w = &mut out;
        let _ = writeln!(w, "Version:       \t1");
        let _ = writeln!(w, "Cipher name:   \t{}", text(&b[8..40]));
        let _ = writeln!(w, "Cipher mode:   \t{}", text(&b[40..72]));
        let _ = writeln!(w, "Hash spec:     \t{}", text(&b[72..104]));
        let _ = writeln!(w, "Payload offset:\t{}", be32(&b, 104));
        let _ = writeln!(w, "MK bits:       \t{}", u64::from(be32(&b, 108)) * 8);
        let _ = writeln!(w, "MK digest:     \t{}", hex(&b[112..132]));
        let _ = writeln!(w, "MK salt:       \t{}", hex(&b[132..164]));
        let _ = writeln!(w, "MK iterations: \t{}", be32(&b, 164));
        let _ = writeln!(w, "UUID:          \t{}\n", text(&b[168..208]));
        for i in 0..luks1::SLOTS {
            let at = 208 + i * 48;
            if be32(&b, at) == 0x00AC_71F3 {
                let _ = writeln!(w, "Key Slot {i}: ENABLED");
                let _ = writeln!(w, "\tIterations:         \t{}", be32(&b, at + 4));
                let _ = writeln!(w, "\tSalt:               \t{}", hex(&b[at + 8..at + 40]));
                let _ = writeln!(w, "\tKey material offset:\t{}", be32(&b, at + 40));
                let _ = writeln!(w, "\tAF stripes:            \t{}", be32(&b, at + 44));
            } else {
                let _ = writeln!(w, "Key Slot {i}: DISABLED");
            }
        }
        return Ok(out);
    }
    // LUKS2: the first copy whose JSON parses (the checksums are not this dump's business).
    for offset in
        [0u64, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20]
    {
        if read_exact(file, &mut b, offset, "a LUKS2 binary header").is_err() {
            continue;
        }
        let hdr_size = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes"));
        if b[6..8] != [0, 2] || !(16 << 10..=4 << 20).contains(&hdr_size) {
            continue;
        }
        let mut json = vec![0u8; hdr_size as usize - 4096];
        if read_exact(file, &mut json, offset + 4096, "the LUKS2 JSON area").is_err() {
            continue;
        }
        let end = json.iter().position(|&c| c == 0).unwrap_or(json.len());
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&json[..end]) else { continue };
        let w = &mut out;
        let _ = writeln!(w, "Version:       \t2");
        let _ =
            writeln!(w, "Epoch:         \t{}", u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")));
        let _ = writeln!(w, "Metadata area: \t{hdr_size} [bytes]");
        let _ = writeln!(w, "UUID:          \t{}", text(&b[168..208]));
        let _ = writeln!(w, "Label:         \t{}", text(&b[24..72]));
        let _ = writeln!(w, "Subsystem:     \t{}", text(&b[208..256]));
        if let Some(req) = value["config"]["requirements"]["mandatory"].as_array() {
            let names: Vec<&str> = req.iter().filter_map(|v| v.as_str()).collect();
            let _ = writeln!(w, "Requirements:\t{}", names.join(" "));
        }
        let _ = writeln!(w, "\nMetadata (JSON, header copy at byte {offset}):");
        let _ = writeln!(w, "{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        return Ok(out);
    }
    Err(crate::error::Error::Luks(crate::error::LuksError::NotLuks(
        "no readable LUKS1 or LUKS2 header".into(),
    )))
}
