//! What a caller hands to an engine and what comes back.

use std::borrow::Cow;
use std::ops::{Deref, DerefMut};

use crate::dma::{DmaBuffer, DmaBytesMut};
use crate::error::Error;

/// Encrypt or decrypt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Plaintext to ciphertext (and, for AEAD, a tag).
    Encrypt,
    /// Ciphertext to plaintext (checking the tag, for AEAD).
    Decrypt,
}

/// The data of a request: ordinary memory (bounced through DMA memory by device engines) or a
/// buffer already in the engine's DMA memory (zero copy).
#[derive(Debug)]
pub enum Buf {
    /// Ordinary memory.
    Host(Vec<u8>),
    /// Device-visible memory from [`Engine::alloc_buffer`](super::Engine::alloc_buffer). Boxed:
    /// a request moves through queues, slots and events whole, and the buffer's handle is
    /// larger than everything else in it.
    Dma(Box<DmaBuffer>),
}

impl Buf {
    /// The bytes: borrowed for host memory, a copy for DMA memory (which the device may write at
    /// any time, so it is never lent out as a slice; see [`DmaBuffer::copy_to_slice`]).
    pub fn as_slice(&self) -> Cow<'_, [u8]> {
        match self {
            Buf::Host(v) => Cow::Borrowed(v),
            Buf::Dma(d) => Cow::Owned(d.to_vec()),
        }
    }

    /// The bytes to edit: borrowed for host memory; for DMA memory a copy written back with
    /// volatile writes when the guard is dropped.
    pub fn as_mut_slice(&mut self) -> BufMut<'_> {
        match self {
            Buf::Host(v) => BufMut::Host(v),
            Buf::Dma(d) => BufMut::Dma(d.as_mut_slice()),
        }
    }

    /// Copies the bytes into `dst` (as many as both hold); returns how many.
    pub fn copy_to_slice(&self, dst: &mut [u8]) -> usize {
        match self {
            Buf::Host(v) => {
                let n = v.len().min(dst.len());
                dst[..n].copy_from_slice(&v[..n]);
                n
            }
            Buf::Dma(d) => d.copy_to_slice(dst),
        }
    }

    /// Copies `src` into the first bytes (as many as both hold); returns how many.
    pub fn copy_from_slice(&mut self, src: &[u8]) -> usize {
        match self {
            Buf::Host(v) => {
                let n = v.len().min(src.len());
                v[..n].copy_from_slice(&src[..n]);
                n
            }
            Buf::Dma(d) => d.copy_from_slice(src),
        }
    }

    /// Overwrites the bytes with zeros in a way the compiler cannot skip (they may have held
    /// key material or plaintext).
    pub fn zeroize(&mut self) {
        match self {
            Buf::Host(v) => zeroize::Zeroize::zeroize(v.as_mut_slice()),
            Buf::Dma(d) => d.fill(0),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Buf::Host(v) => v.len(),
            Buf::Dma(d) => d.len(),
        }
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bytes of a [`Buf`] being edited (see [`Buf::as_mut_slice`]).
pub enum BufMut<'a> {
    /// Host memory, borrowed.
    Host(&'a mut [u8]),
    /// DMA memory, through a copy written back on drop.
    Dma(DmaBytesMut<'a>),
}

impl Deref for BufMut<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            BufMut::Host(s) => s,
            BufMut::Dma(d) => d,
        }
    }
}

impl DerefMut for BufMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            BufMut::Host(s) => s,
            BufMut::Dma(d) => d,
        }
    }
}

impl From<Vec<u8>> for Buf {
    fn from(v: Vec<u8>) -> Self {
        Buf::Host(v)
    }
}

/// An IV of up to 16 bytes, stored inline so that a request needs no allocation for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Iv {
    bytes: [u8; 16],
    len: u8,
}

impl Iv {
    /// Copies `iv`; `None` if it is longer than 16 bytes.
    pub fn new(iv: &[u8]) -> Option<Self> {
        let mut bytes = [0u8; 16];
        bytes.get_mut(..iv.len())?.copy_from_slice(iv);
        Some(Self { bytes, len: iv.len() as u8 })
    }

    /// The IV bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl From<[u8; 16]> for Iv {
    fn from(bytes: [u8; 16]) -> Self {
        Self { bytes, len: 16 }
    }
}

impl From<[u8; 12]> for Iv {
    fn from(b: [u8; 12]) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..12].copy_from_slice(&b);
        Self { bytes, len: 12 }
    }
}

/// Length of the AEAD tag.
pub const TAG_LEN: usize = 16;

/// One encryption or decryption, transformed in place in `data`.
///
/// The engine owns the request, and with it `data`, from a successful submit until the final
/// completion hands it back; a refused submit hands it back at once, untouched.
#[derive(Debug)]
pub struct Request<S> {
    /// The session (algorithm and key).
    pub session: S,
    /// Encrypt or decrypt.
    pub direction: Direction,
    /// The IV (12 bytes for GCM, 16 for the other modes).
    pub iv: Iv,
    /// Additional authenticated data (AEAD only).
    pub aad: Vec<u8>,
    /// The data, replaced by the result. An engine pool may hand a [`Buf::Dma`] back as
    /// [`Buf::Host`] holding the same bytes, when the device whose memory it was in left and
    /// the request ran on another member.
    pub data: Buf,
    /// AEAD tag: written by encryption, checked by decryption.
    pub tag: [u8; TAG_LEN],
    /// The caller's identifier, echoed in every event about this request.
    pub user_data: u64,
}

impl<S> Request<S> {
    /// A request with no AAD and a zero tag.
    pub fn new(session: S, direction: Direction, iv: Iv, data: Buf, user_data: u64) -> Self {
        Self { session, direction, iv, aad: Vec::new(), data, tag: [0; TAG_LEN], user_data }
    }
}

/// What a submit did with an accepted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// The request is on the hardware ring; one final completion follows.
    InProgress,
    /// The ring was full and the request waits in the software backlog (the kernel's -EBUSY):
    /// one [`Event::Promoted`] follows when it reaches the ring, then one final completion.
    Backlogged,
}

/// What a batch submit did: the first `in_progress` requests taken went to the ring, the next
/// `backlogged` to the backlog (each gets one [`Event::Promoted`], in this order, before its
/// final completion). A batch never has an `InProgress` after a `Backlogged`: once a backlog
/// exists, later requests queue behind it. Requests not taken stay with the caller, untouched
/// and in order; `refused` says why the first of them was not taken (`None` when all were taken,
/// or when the engine ended the batch after a Backlogged one).
#[derive(Debug, Default)]
pub struct BatchSubmitted {
    /// Requests taken that went to the ring.
    pub in_progress: usize,
    /// Requests taken, after those, that went to the backlog.
    pub backlogged: usize,
    /// Why the batch stopped at a request it refused.
    pub refused: Option<SubmitErrorKind>,
}

impl BatchSubmitted {
    /// Requests the engine took (and now owns until their final completions).
    pub fn accepted(&self) -> usize {
        self.in_progress + self.backlogged
    }
}

/// Why a submit refused a request.
#[derive(Debug, thiserror::Error)]
pub enum SubmitErrorKind {
    /// The ring is full (or a backlog exists) and backlogging was not allowed or the backlog is
    /// at its limit. Try again after a completion.
    #[error("queue busy")]
    Busy,
    /// The request cannot be run: bad parameters, unknown session, failed device.
    #[error(transparent)]
    Rejected(Error),
}

/// A refused submit: the reason, and the request back, whole.
#[derive(Debug)]
pub struct SubmitError<S> {
    /// Why.
    pub kind: SubmitErrorKind,
    /// The request, untouched.
    pub request: Request<S>,
}

impl<S> SubmitError<S> {
    /// A busy refusal.
    pub fn busy(request: Request<S>) -> Self {
        Self { kind: SubmitErrorKind::Busy, request }
    }

    /// A refusal for `error`.
    pub fn rejected(request: Request<S>, error: Error) -> Self {
        Self { kind: SubmitErrorKind::Rejected(error), request }
    }
}

/// The final outcome of an accepted request.
#[derive(Debug)]
pub struct Completion<S> {
    /// The request, with `data` (and `tag` for AEAD encryption) holding the result on success.
    /// After an authentication failure `data` holds no plaintext.
    pub request: Request<S>,
    /// Success, or why it failed.
    pub result: Result<(), Error>,
}

/// A notification about an accepted request.
#[derive(Debug)]
pub enum Event<S> {
    /// A backlogged request has reached the hardware ring (the kernel's -EINPROGRESS callback).
    Promoted {
        /// The request's `user_data`.
        user_data: u64,
    },
    /// The request is finished: its one final completion.
    Completed(Completion<S>),
}
