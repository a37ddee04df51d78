//! The NBD fuzz targets' seed corpora and their findings, run through the server's connection
//! code by `cargo test` (the fuzz targets themselves need cargo-fuzz): captured qemu sessions,
//! inputs built from the protocol, and every input that once broke the server (kept under
//! `fuzz/regressions/`). Each must be served to its end without a panic, and a captured
//! session must reach transmission.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crypt_vfio::nbd::{serve_bytes, ServerConfig};
use crypt_vfio::volume::file::FileBlockDevice;

/// The fuzz targets' settings (fuzz/fuzz_targets/nbd_common/mod.rs).
fn config() -> ServerConfig {
    ServerConfig {
        export_name: "disk".into(),
        description: "fuzz".into(),
        max_payload: 64 << 10,
        workers_per_connection: 2,
        inflight_bytes_per_connection: 256 << 10,
        max_memory: 1 << 20,
        max_connections: 1,
        handshake_timeout: Duration::from_secs(10),
        stop_grace: Duration::from_secs(1),
        reply_timeout: Duration::from_secs(30),
        tls: None,
    }
}

/// The client flags and `NBD_OPT_GO` the nbd_requests target puts before its input.
fn go_prefix() -> Vec<u8> {
    use crypt_vfio::nbd::proto;
    let mut h = (proto::client::FIXED_NEWSTYLE | proto::client::NO_ZEROES).to_be_bytes().to_vec();
    h.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&proto::opt::GO.to_be_bytes());
    h.extend_from_slice(&6u32.to_be_bytes());
    h.extend_from_slice(&[0; 6]);
    h
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in [root.join("corpus").join(target), root.join("regressions").join(target)] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            files.extend(entries.map(|e| e.unwrap().path()));
        }
    }
    files.sort();
    files
}

fn serve(input: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let device = Arc::new(FileBlockDevice::open(&image, false).unwrap());
    let out = serve_bytes(device, config(), input).unwrap();
    assert!(out.starts_with(b"NBDMAGICIHAVEOPT"), "the server greets first");
    out
}

#[test]
fn handshake_inputs_are_served_without_a_panic() {
    let files = inputs("nbd_handshake");
    assert!(files.len() >= 5, "the seed corpus is in fuzz/corpus/nbd_handshake");
    for f in files {
        let input = std::fs::read(&f).unwrap();
        let out = serve(&input);
        if f.file_name().unwrap().to_string_lossy().starts_with("qemu") {
            // A real client's session: it got past the option haggling to replies of requests.
            // (qemu asks for structured replies: its reads are answered in structured chunks.)
            use crypt_vfio::nbd::proto::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
            let (simple, structured) =
                (SIMPLE_REPLY_MAGIC.to_be_bytes(), STRUCTURED_REPLY_MAGIC.to_be_bytes());
            assert!(
                out.windows(4).any(|w| w == simple || w == structured),
                "{}: no transmission reply",
                f.display()
            );
        }
    }
}

#[test]
fn request_inputs_are_served_without_a_panic() {
    let files = inputs("nbd_requests");
    assert!(files.len() >= 3, "the seed corpus is in fuzz/corpus/nbd_requests");
    for f in files {
        let mut input = go_prefix();
        input.extend_from_slice(&std::fs::read(&f).unwrap());
        serve(&input);
    }
}
