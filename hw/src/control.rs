//! The control queue: session creation and destruction (virtio 1.2 section 5.9.7.2).
//!
//! Like QEMU, the device answers control requests synchronously, inside the doorbell write,
//! so a driver's session set-up costs one register write plus the key schedule. Keys are
//! copied into a buffer that is wiped after use and are never logged.

use std::sync::atomic::{fence, Ordering};

use crypt_vfio_cores::Mode;
use crypt_vfio_spec::crypto::{
    aead, cipher, op, session_op, status, CtrlPayload, CtrlRequest, SessionInput, CTRL_REQ_SIZE,
    SESSION_INPUT_SIZE,
};
use zeroize::Zeroizing;

use crate::chain::Chain;
use crate::device::Device;
use crate::device_cfg::MAX_CIPHER_KEY_LEN;
use crate::virtqueue::RingFault;

/// Heads taken from the control ring per round.
const CTRL_BATCH: usize = 16;

/// The answer to a control request.
enum Answer {
    /// A `SessionInput` with this session id and status.
    Session(u64, u8),
    /// A one-byte status.
    Status(u8),
}

impl Device {
    /// Answers every request on the control queue. The caller holds the transport registers.
    pub(crate) fn drain_ctrl(&self) {
        if !self.running()
            || self.late_ctrl.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some()
        {
            // Stopped, or stalled behind an answer held back by a fault.
            return;
        }
        let q = self.cfg.ctrl_queue();
        let mut guard = self.queues[usize::from(q)].lock();
        let Some(ring) = guard.as_mut().filter(|r| !r.broken) else { return };
        let mut chain = Chain::new();
        let mut heads = [0u16; CTRL_BATCH];
        let result = (|| -> Result<(), RingFault> {
            let mem = ring.mem(&self.iommu)?;
            let snap = self.iommu.snapshot();
            loop {
                // A late answer stalls the queue after its request, so take one at a time then.
                let batch = if self.faults.ctrl_late_armed() { 1 } else { CTRL_BATCH };
                let n = ring.pop(&mem, &mut heads[..batch])?;
                if n == 0 {
                    // Ask for a kick on the next request (with EVENT_IDX that means moving
                    // avail_event up), then look once more for one that raced with it.
                    ring.enable_notifications(&mem)?;
                    fence(Ordering::SeqCst);
                    if ring.has_work(&mem)? {
                        continue;
                    }
                    return Ok(());
                }
                let old = ring.next_used();
                for &head in &heads[..n] {
                    chain.walk(&mem, &snap, ring.indirect, head)?;
                    if let Some(delay) = self.faults.take_ctrl_late() {
                        let (bytes, offset) = self.ctrl_answer(&chain)?;
                        let due = std::time::Instant::now() + delay;
                        let ranges = chain.writable.iovas().to_vec();
                        *self.late_ctrl.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some(crate::faults::LateCtrl { due, head, bytes, offset, ranges });
                        self.wake_fault_thread();
                        log::warn!("control request answered late by {delay:?} (fault injected)");
                        return Ok(());
                    }
                    let written = self.ctrl_request(&chain)?;
                    ring.push(&mem, head, written)?;
                    self.counters.ctrl_completed.fetch_add(1, Ordering::Relaxed);
                }
                if ring.publish(&mem, old)? {
                    self.queue_interrupt(q);
                }
            }
        })();
        if let Err(fault) = result {
            self.break_ring(q, ring, fault);
        }
    }

    /// Handles one control request; returns the bytes written for the used element.
    fn ctrl_request(&self, chain: &Chain) -> Result<u32, RingFault> {
        let (bytes, offset) = self.ctrl_answer(chain)?;
        if !chain.writable.write(offset, &bytes) {
            return Err(RingFault("control answer buffer not mapped"));
        }
        Ok(bytes.len() as u32)
    }

    /// Executes one control request and returns its answer and where in the writable part
    /// it goes, without writing it.
    fn ctrl_answer(&self, chain: &Chain) -> Result<(Vec<u8>, u64), RingFault> {
        let (r, w) = (&chain.readable, &chain.writable);
        let mut hdr = [0u8; CTRL_REQ_SIZE];
        let readable_hdr = r.read(0, &mut hdr);
        let opcode = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let creates = readable_hdr && matches!(opcode, op::CIPHER_CREATE_SESSION | op::AEAD_CREATE_SESSION);
        let answer = if !readable_hdr {
            log::debug!("control request without a readable 72-byte header");
            Answer::Status(status::ERR)
        } else {
            match CtrlRequest::decode(&hdr) {
                None => {
                    log::debug!("control opcode {opcode:#x} not supported");
                    if creates {
                        Answer::Session(0, status::NOTSUPP)
                    } else {
                        Answer::Status(status::NOTSUPP)
                    }
                }
                Some(req) => self.ctrl_decoded(chain, &req),
            }
        };
        // A create answer is a SessionInput if the driver left room for one; anything else
        // (and any malformed create) answers with one status byte at the end of the buffer.
        match answer {
            Answer::Session(id, st) if w.len() == SESSION_INPUT_SIZE as u64 => {
                let input = SessionInput { session_id: id, status: u32::from(st) };
                Ok((input.encode().to_vec(), 0))
            }
            Answer::Session(_, st) | Answer::Status(st) => {
                w.last_byte().ok_or(RingFault("control request has no writable status byte"))?;
                Ok((vec![st], w.len() - 1))
            }
        }
    }

    fn ctrl_decoded(&self, chain: &Chain, req: &CtrlRequest) -> Answer {
        let (r, w) = (&chain.readable, &chain.writable);
        let hdr = CTRL_REQ_SIZE as u64;
        let create = |mode: Mode, key_len: u32, op: u32, max_aad: Option<u32>| -> (u64, u8) {
            let encrypt = match op {
                session_op::ENCRYPT => true,
                session_op::DECRYPT => false,
                _ => return (0, status::ERR),
            };
            if key_len > MAX_CIPHER_KEY_LEN || !mode.key_lengths().contains(&(key_len as usize)) {
                return (0, status::NOTSUPP);
            }
            if r.len() != hdr + u64::from(key_len) || w.len() != SESSION_INPUT_SIZE as u64 {
                log::debug!("create session: {} readable / {} writable bytes do not fit", r.len(), w.len());
                return (0, status::ERR);
            }
            let mut key = Zeroizing::new([0u8; MAX_CIPHER_KEY_LEN as usize]);
            let key = &mut key[..key_len as usize];
            if !r.read(hdr, key) {
                return (0, status::ERR);
            }
            match self.sessions.create(mode, encrypt, max_aad, key, self.faults.reuse_session_ids()) {
                Ok(id) => {
                    self.counters.sessions_created.fetch_add(1, Ordering::Relaxed);
                    log::debug!(
                        "session {id} created: {mode} {}",
                        if encrypt { "encrypt" } else { "decrypt" }
                    );
                    (id, status::OK)
                }
                Err(st) => (0, st),
            }
        };
        match req.payload {
            CtrlPayload::CreateCipher { algo, key_len, op } => {
                let mode = match algo {
                    cipher::AES_CBC => Mode::Cbc,
                    cipher::AES_CTR => Mode::Ctr,
                    cipher::AES_XTS => Mode::Xts,
                    _ => return Answer::Session(0, status::NOTSUPP),
                };
                if !self.cfg.cipher_algos.contains(&algo) {
                    return Answer::Session(0, status::NOTSUPP);
                }
                let (id, st) = create(mode, key_len, op, None);
                Answer::Session(id, st)
            }
            CtrlPayload::CreateAead { algo, key_len, tag_len, aad_len, op } => {
                if algo != aead::GCM || !self.cfg.aead_algos.contains(&algo) {
                    return Answer::Session(0, status::NOTSUPP);
                }
                if tag_len != crypt_vfio_cores::GCM_TAG_LEN as u32 {
                    return Answer::Session(0, status::NOTSUPP);
                }
                let (id, st) = create(Mode::Gcm, key_len, op, Some(aad_len));
                Answer::Session(id, st)
            }
            CtrlPayload::Destroy { session_id } => {
                if r.len() != hdr || w.len() != 1 {
                    return Answer::Status(status::ERR);
                }
                match self.sessions.destroy(session_id) {
                    Ok(()) => {
                        self.counters.sessions_destroyed.fetch_add(1, Ordering::Relaxed);
                        log::debug!("session {session_id} destroyed");
                        Answer::Status(status::OK)
                    }
                    Err(st) => Answer::Status(st),
                }
            }
        }
    }
}
