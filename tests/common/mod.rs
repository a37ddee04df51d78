//! Helpers shared by the integration tests: devices, synchronous request running, vector files.

#![allow(dead_code, clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crypt_vfio::engine::{Buf, Completion, Direction, Engine, Event, Iv, Queue, Request, Submitted};
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedTransport};
use crypt_vfio::transport::Transport;
use crypt_vfio::virtio_crypto::{DeviceOptions, VirtioCrypto};

/// An opened emulated device and the transport under it (to inspect or disturb it).
pub type Device = (VirtioCrypto, Arc<EmulatedTransport>);

/// An emulated device with `config`, opened by the driver with `options`.
pub fn device_with(config: EmulatedConfig, options: &DeviceOptions) -> Device {
    let t = Arc::new(EmulatedTransport::new(config).expect("emulated device"));
    let dev = VirtioCrypto::open(t.clone() as Arc<dyn Transport>, options)
        .expect("driver opens the emulated device");
    (dev, t)
}

/// An emulated device with default settings.
pub fn device() -> VirtioCrypto {
    device_with(EmulatedConfig::default(), &DeviceOptions::default()).0
}

/// A queue whose events are collected for the test to read.
pub struct SyncQueue<S> {
    pub queue: Box<dyn Queue<S>>,
    pub events: Arc<Mutex<Vec<Event<S>>>>,
}

impl<S: Send + 'static> SyncQueue<S> {
    pub fn open<E: Engine<Session = S>>(engine: &E, index: usize) -> Self {
        let events: Arc<Mutex<Vec<Event<S>>>> = Arc::default();
        let sink = events.clone();
        let queue = engine.open_queue(index, Arc::new(move |e| sink.lock().unwrap().push(e))).unwrap();
        Self { queue, events }
    }

    /// Submits and waits for the final completion (10 s at most).
    pub fn run(&mut self, req: Request<S>) -> Completion<S> {
        let id = req.user_data;
        match self.queue.submit(req, true) {
            Ok(Submitted::InProgress | Submitted::Backlogged) => {}
            Err(e) => {
                // A refusal keeps its typed reason, so that tests match the variant.
                let result = match e.kind {
                    crypt_vfio::engine::SubmitErrorKind::Rejected(err) => Err(err),
                    busy => Err(crypt_vfio::Error::Crypto(crypt_vfio::CryptoError::InvalidRequest(
                        busy.to_string(),
                    ))),
                };
                return Completion { request: e.request, result };
            }
        }
        let start = Instant::now();
        loop {
            self.queue.poll();
            let mut ev = self.events.lock().unwrap();
            if let Some(pos) =
                ev.iter().position(|e| matches!(e, Event::Completed(c) if c.request.user_data == id))
            {
                if let Event::Completed(c) = ev.remove(pos) {
                    return c;
                }
            }
            drop(ev);
            assert!(start.elapsed() < Duration::from_secs(10), "request {id} did not complete");
            std::thread::yield_now();
        }
    }

    /// Submits; on refusal returns the error kind and the request.
    pub fn try_submit(&mut self, req: Request<S>) -> Result<Submitted, crypt_vfio::engine::SubmitError<S>> {
        self.queue.submit(req, true)
    }
}

/// One cipher or AEAD operation through `q`: returns the output data and tag, or the error.
pub fn crypt<S: Send + 'static>(
    q: &mut SyncQueue<S>,
    session: S,
    direction: Direction,
    iv: &[u8],
    aad: &[u8],
    data: Buf,
    tag: [u8; 16],
) -> Result<(Vec<u8>, [u8; 16]), crypt_vfio::Error> {
    let mut req = Request::new(session, direction, Iv::new(iv).expect("iv of 16 bytes or less"), data, 7);
    req.aad = aad.to_vec();
    req.tag = tag;
    let c = q.run(req);
    c.result.map(|()| (c.request.data.as_slice().to_vec(), c.request.tag))
}

/// A record of a NIST .rsp file: its fields, the section it is in, and whether it is marked FAIL.
#[derive(Debug, Clone)]
pub struct Record {
    pub section: String,
    pub fields: HashMap<String, String>,
    pub fail: bool,
}

impl Record {
    pub fn hex(&self, key: &str) -> Vec<u8> {
        let v = self.fields.get(key).unwrap_or_else(|| panic!("field {key} missing in {:?}", self.fields));
        hex::decode(v).unwrap_or_else(|e| panic!("field {key}: {e}"))
    }
    pub fn has(&self, key: &str) -> bool {
        self.fields.contains_key(key)
    }
}

/// Parses a NIST CAVP response file from `fixtures/nist/`.
pub fn nist(file: &str) -> Vec<Record> {
    let path = format!("{}/fixtures/nist/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Vec::new();
    let mut section = String::new();
    for block in text.split("\n\n") {
        let lines: Vec<&str> =
            block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        if lines.is_empty() {
            continue;
        }
        if lines.iter().all(|l| l.starts_with('[')) {
            section = lines.concat();
            continue;
        }
        let mut fields = HashMap::new();
        let mut fail = false;
        for line in lines {
            if line == "FAIL" {
                fail = true;
            } else if let Some((k, v)) = line.split_once('=') {
                fields.insert(k.trim().to_ascii_uppercase(), v.trim().to_string());
            }
        }
        out.push(Record { section: section.clone(), fields, fail });
    }
    assert!(!out.is_empty(), "{path}: no vectors");
    out
}
