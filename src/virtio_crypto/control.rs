//! The control queue: creating and destroying sessions.
//!
//! Session set-up is rare and synchronous, so the control queue carries one request at a time
//! and the caller waits for it. The key is copied into DMA memory only for the duration of the
//! request and wiped as soon as the device has answered.
//!
//! A request the device does not answer in time, or answers with something impossible, stays
//! published: the device may still read its buffer and write its answer. So after such a failure
//! the queue is *dirty* and refuses every request (the buffer, key included, is left as the
//! device may still read it) until the engine has reset the device and [`ControlQueue::restart`]
//! has wiped the buffer and started the ring afresh. Reusing the buffer earlier would let a late
//! answer to one request pass for the answer to the next: a session under another key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crypt_vfio_cores::Mode;
use crypt_vfio_spec::crypto::{self, op, session_op, status, CtrlPayload, CtrlRequest, SessionInput};
use crypt_vfio_spec::ring::{DESC_F_NEXT, DESC_F_WRITE};
use vm_memory::Bytes;

use super::config::wire_algo;
use crate::dma::{DmaBuffer, DmaPool};
use crate::engine::Direction;
use crate::error::{CryptoError, DeviceError, Error, Result, VfioError};
use crate::virtio::{SplitQueue, VirtioPci};

const KEY_OFF: usize = crypto::CTRL_REQ_SIZE;
const MAX_KEY: usize = 64;
const INPUT_OFF: usize = 192;
const BUF_LEN: usize = 256;

/// The control virtqueue with its request buffer.
pub struct ControlQueue {
    vq: SplitQueue,
    buf: DmaBuffer,
    timeout: Duration,
    index: u16,
    /// Why the queue awaits a device reset, if it does.
    dirty: Option<String>,
    /// Set when the engine closes: a wait for an answer ends at once.
    cancel: Arc<AtomicBool>,
}

impl ControlQueue {
    /// Sets up queue `index` of `pci` as the control queue.
    pub fn new(
        pci: &VirtioPci,
        pool: &DmaPool,
        index: u16,
        event_idx: bool,
        timeout: Duration,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self> {
        let size = pci.queue_max_size(index).min(16);
        if size < 2 {
            return Err(Error::Device(DeviceError::Init(format!(
                "control queue {index} has room for {size} descriptors, needs 2"
            ))));
        }
        let size = 1 << (15 - size.leading_zeros()); // largest power of two not above it
        let vq = SplitQueue::new(pool, size, event_idx, |rings| {
            pci.setup_queue(index, size, rings, crypt_vfio_spec::pci::VIRTIO_MSI_NO_VECTOR)
        })?;
        Ok(Self { vq, buf: pool.alloc(BUF_LEN)?, timeout, index, dirty: None, cancel })
    }

    /// Why the queue cannot be used until the device is reset, if it cannot.
    pub fn dirty(&self) -> Option<&str> {
        self.dirty.as_deref()
    }

    /// Starts the queue again on a device that was reset (and so let go of the buffer): the
    /// buffer, key included, is wiped and the ring starts from zero.
    pub fn restart(&mut self, pci: &VirtioPci) -> Result<()> {
        let _ = self.buf.volatile().write_slice(&[0u8; BUF_LEN], 0);
        let (index, size) = (self.index, self.vq.size());
        self.vq.restart(|rings| {
            pci.setup_queue(index, size, rings, crypt_vfio_spec::pci::VIRTIO_MSI_NO_VECTOR)
        })?;
        self.dirty = None;
        Ok(())
    }

    fn check_clean(&self) -> Result<()> {
        match &self.dirty {
            Some(why) => {
                Err(Error::Device(DeviceError::Failed(format!("control queue awaits a device reset: {why}"))))
            }
            None => Ok(()),
        }
    }

    /// Creates a one-direction session; returns the device's session id.
    pub fn create(&mut self, mode: Mode, direction: Direction, key: &[u8]) -> Result<u64> {
        if key.len() > MAX_KEY {
            return Err(Error::Crypto(CryptoError::KeyLength {
                mode,
                len: key.len(),
                expected: mode.key_lengths(),
            }));
        }
        self.check_clean()?;
        let (svc, algo) = wire_algo(mode);
        let sop = match direction {
            Direction::Encrypt => session_op::ENCRYPT,
            Direction::Decrypt => session_op::DECRYPT,
        };
        let key_len = key.len() as u32;
        let (opcode, payload) = if svc == crypto::service::AEAD {
            let payload = CtrlPayload::CreateAead { algo, key_len, tag_len: 16, aad_len: MAX_AAD, op: sop };
            (op::AEAD_CREATE_SESSION, payload)
        } else {
            (op::CIPHER_CREATE_SESSION, CtrlPayload::CreateCipher { algo, key_len, op: sop })
        };
        let req = CtrlRequest { opcode, algo, flag: 0, queue_id: 0, payload };
        let v = self.buf.volatile();
        let wrote = v.write_slice(&req.encode(), 0).is_ok() && v.write_slice(key, KEY_OFF).is_ok();
        // The answer area starts invalid so that a device that writes nothing cannot pass.
        let invalid = SessionInput { session_id: 0, status: u32::from(status::ERR) }.encode();
        let wrote = wrote && v.write_slice(&invalid, INPUT_OFF).is_ok();
        let result = if wrote {
            self.exchange(KEY_OFF + key.len(), crypto::SESSION_INPUT_SIZE)
        } else {
            Err(Error::Vfio(VfioError::Dma("control buffer write failed".into())))
        };
        let v = self.buf.volatile();
        // Wipe the key from DMA memory once the device is done with it: after its answer, or
        // (when the queue is dirty) at the restart that follows the reset.
        if self.dirty.is_none() {
            let _ = v.write_slice(&[0u8; MAX_KEY], KEY_OFF);
        }
        result?;
        let mut input = [0u8; crypto::SESSION_INPUT_SIZE];
        v.read_slice(&mut input, INPUT_OFF).map_err(|e| Error::Vfio(VfioError::Dma(e.to_string())))?;
        let input = SessionInput::decode(&input);
        match u8::try_from(input.status).unwrap_or(status::ERR) {
            status::OK => Ok(input.session_id),
            s => Err(session_error(s, mode, key.len())),
        }
    }

    /// Destroys a session created by [`create`](Self::create).
    pub fn destroy(&mut self, mode: Mode, session_id: u64) -> Result<()> {
        let (svc, algo) = wire_algo(mode);
        let opcode =
            if svc == crypto::service::AEAD { op::AEAD_DESTROY_SESSION } else { op::CIPHER_DESTROY_SESSION };
        let req =
            CtrlRequest { opcode, algo, flag: 0, queue_id: 0, payload: CtrlPayload::Destroy { session_id } };
        self.check_clean()?;
        let v = self.buf.volatile();
        v.write_slice(&req.encode(), 0).map_err(|e| Error::Vfio(VfioError::Dma(e.to_string())))?;
        v.write_obj(status::ERR, INPUT_OFF).map_err(|e| Error::Vfio(VfioError::Dma(e.to_string())))?;
        self.exchange(crypto::CTRL_REQ_SIZE, crypto::INHDR_SIZE)?;
        let v = self.buf.volatile();
        match v.read_obj::<u8>(INPUT_OFF).map_err(|e| Error::Vfio(VfioError::Dma(e.to_string())))? {
            status::OK => Ok(()),
            status::INVSESS => Err(Error::Crypto(CryptoError::InvalidSession)),
            s => Err(Error::Crypto(CryptoError::Status(s))),
        }
    }

    /// Runs the request prepared in the buffer; a timeout or an impossible answer leaves the
    /// queue `dirty`.
    fn exchange(&mut self, out_len: usize, in_len: usize) -> Result<()> {
        let r = run(&mut self.vq, &self.cancel, self.buf.iova(), self.timeout, out_len, in_len);
        if let Err(e) = &r {
            self.dirty = Some(e.to_string());
        }
        r
    }
}

/// Sends the prepared request (`out_len` readable bytes at `iova`, `in_len` writable at the
/// answer offset) and waits for the device.
fn run(
    vq: &mut SplitQueue,
    cancel: &AtomicBool,
    iova: u64,
    timeout: Duration,
    out_len: usize,
    in_len: usize,
) -> Result<()> {
    vq.write_desc(0, iova, out_len as u32, DESC_F_NEXT, 1);
    vq.write_desc(1, iova + INPUT_OFF as u64, in_len as u32, DESC_F_WRITE, 0);
    vq.push_avail(0);
    vq.publish();
    let start = Instant::now();
    let mut spins = 0u32;
    while vq.used_pending() == 0 {
        if start.elapsed() > timeout {
            return Err(Error::Device(DeviceError::Timeout(timeout, "a control queue answer")));
        }
        if cancel.load(Ordering::Acquire) {
            return Err(Error::Device(DeviceError::Failed("the engine is closing".into())));
        }
        spins += 1;
        if spins > 1000 {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            std::hint::spin_loop();
        }
    }
    let pending = vq.used_pending();
    let used = vq.take_used();
    if pending != 1 || used.id != 0 {
        return Err(Error::Device(DeviceError::Failed(format!(
            "control queue: device returned descriptor {} ({} used) for the one request in flight",
            used.id, pending
        ))));
    }
    if (used.len as usize) < in_len {
        log::debug!("control queue: device reported {} bytes written, expected {in_len}", used.len);
    }
    Ok(())
}

/// Largest AAD the driver announces for AEAD sessions.
pub const MAX_AAD: u32 = 64 * 1024;

fn session_error(status_code: u8, mode: Mode, key_len: usize) -> Error {
    match status_code {
        status::NOTSUPP => {
            Error::Crypto(CryptoError::NotSupported(format!("{mode} with a {}-bit key", key_len * 8)))
        }
        status::NOSPC => Error::Crypto(CryptoError::NoSpace("the device has no free session".into())),
        status::INVSESS => Error::Crypto(CryptoError::InvalidSession),
        status::KEY_REJECTED => {
            Error::Crypto(CryptoError::KeyRejected(format!("the device refused the {mode} key")))
        }
        s => Error::Crypto(CryptoError::Status(s)),
    }
}
