//! The virtio-crypto device (virtio 1.2 section 5.9): configuration layout, service and algorithm
//! numbers, opcodes, status codes, and the control and data request headers.
//!
//! Request layout used by crypt-vfio (the device must not assume any framing of descriptors, so
//! only the order of bytes in each direction matters):
//!
//! * control, create session: out `[CtrlRequest (72 bytes) | key]`, in `[SessionInput (16 bytes)]`
//! * control, destroy session: out `[CtrlRequest]`, in `[status u8]`
//! * cipher data: out `[DataRequest (72) | iv | src]`, in `[dst | status u8]`, dst as long as src
//! * AEAD data: out `[DataRequest | iv | src | aad]`, in `[dst | status u8]`. For encryption
//!   `dst_data_len = src_data_len + tag_len` and dst is the ciphertext followed by the tag; for
//!   decryption `src` is the ciphertext followed by the tag and `dst_data_len = src_data_len -
//!   tag_len`. A failed tag check answers [`status::BADMSG`].
//!
//! The AEAD header, checked field by field against virtio 1.2 section 5.9.7.4
//! (`virtio_crypto_aead_data_flf` inside `virtio_crypto_op_data_req`): after the 24-byte
//! `virtio_crypto_op_header` (opcode, algo, session_id, flag, padding) come `le32 iv_len`
//! (byte 24), `le32 aad_len` (28), `le32 src_data_len` (32), `le32 dst_data_len` (36), `le32
//! tag_len` (40) and `le32 reserved` (44), then padding to 72 bytes. The variable part
//! (`virtio_crypto_aead_data_vlf`) is device-readable `iv[iv_len]`, `src_data[src_data_len]`,
//! `aad[aad_len]`, then device-writable `dst_data[dst_data_len]` and the `virtio_crypto_inhdr`
//! status byte: the order used here. The spec says `dst_data_len` "should be at least
//! src_data_len + tag_len" for encryption. `tag_len` was left 0 by crypt-vfio before 2026-11;
//! the emulated device now refuses an AEAD request whose `tag_len` differs from its session's.

use crate::le::{put_u32, put_u64, u32_at, u64_at};

/// Offsets in `struct virtio_crypto_config` (the device-specific configuration).
pub mod config {
    /// u32, see [`super::VIRTIO_CRYPTO_S_HW_READY`].
    pub const STATUS: u64 = 0;
    /// u32
    pub const MAX_DATAQUEUES: u64 = 4;
    /// u32, bit mask of [`super::service`] numbers.
    pub const CRYPTO_SERVICES: u64 = 8;
    /// u32, cipher algorithms 0..31.
    pub const CIPHER_ALGO_L: u64 = 12;
    /// u32, cipher algorithms 32..63.
    pub const CIPHER_ALGO_H: u64 = 16;
    /// u32
    pub const HASH_ALGO: u64 = 20;
    /// u32
    pub const MAC_ALGO_L: u64 = 24;
    /// u32
    pub const MAC_ALGO_H: u64 = 28;
    /// u32, bit mask of [`super::aead`] numbers.
    pub const AEAD_ALGO: u64 = 32;
    /// u32
    pub const MAX_CIPHER_KEY_LEN: u64 = 36;
    /// u32
    pub const MAX_AUTH_KEY_LEN: u64 = 40;
    /// u32
    pub const AKCIPHER_ALGO: u64 = 44;
    /// u64, the largest request payload the device accepts.
    pub const MAX_SIZE: u64 = 48;
    /// Size of the structure.
    pub const SIZE: u64 = 56;
}

/// `status` bit in the device configuration: the device is ready.
pub const VIRTIO_CRYPTO_S_HW_READY: u32 = 1;

/// Service numbers (bit positions in `crypto_services`).
pub mod service {
    /// Symmetric ciphers.
    pub const CIPHER: u32 = 0;
    /// Hashes.
    pub const HASH: u32 = 1;
    /// MACs.
    pub const MAC: u32 = 2;
    /// Authenticated encryption.
    pub const AEAD: u32 = 3;
    /// Asymmetric ciphers.
    pub const AKCIPHER: u32 = 4;
}

/// Cipher algorithm numbers (bit positions in `cipher_algo_l`/`_h`).
pub mod cipher {
    /// No cipher.
    pub const NO_CIPHER: u32 = 0;
    /// AES in ECB mode.
    pub const AES_ECB: u32 = 2;
    /// AES in CBC mode.
    pub const AES_CBC: u32 = 3;
    /// AES in counter mode.
    pub const AES_CTR: u32 = 4;
    /// Triple DES in CBC mode.
    pub const DES3_CBC: u32 = 8;
    /// AES in XTS mode.
    pub const AES_XTS: u32 = 13;
}

/// AEAD algorithm numbers (bit positions in `aead_algo`).
pub mod aead {
    /// No AEAD.
    pub const NO_AEAD: u32 = 0;
    /// AES-GCM.
    pub const GCM: u32 = 1;
    /// AES-CCM.
    pub const CCM: u32 = 2;
    /// ChaCha20-Poly1305.
    pub const CHACHA20_POLY1305: u32 = 3;
}

/// Builds an opcode from a service and an operation, as `VIRTIO_CRYPTO_OPCODE` does.
pub const fn opcode(service: u32, op: u32) -> u32 {
    (service << 8) | op
}

/// Opcodes of control and data requests.
pub mod op {
    use super::{opcode, service};
    /// Control: create a cipher session.
    pub const CIPHER_CREATE_SESSION: u32 = opcode(service::CIPHER, 0x02);
    /// Control: destroy a cipher session.
    pub const CIPHER_DESTROY_SESSION: u32 = opcode(service::CIPHER, 0x03);
    /// Control: create an AEAD session.
    pub const AEAD_CREATE_SESSION: u32 = opcode(service::AEAD, 0x02);
    /// Control: destroy an AEAD session.
    pub const AEAD_DESTROY_SESSION: u32 = opcode(service::AEAD, 0x03);
    /// Data: cipher encryption.
    pub const CIPHER_ENCRYPT: u32 = opcode(service::CIPHER, 0x00);
    /// Data: cipher decryption.
    pub const CIPHER_DECRYPT: u32 = opcode(service::CIPHER, 0x01);
    /// Data: AEAD encryption.
    pub const AEAD_ENCRYPT: u32 = opcode(service::AEAD, 0x00);
    /// Data: AEAD decryption.
    pub const AEAD_DECRYPT: u32 = opcode(service::AEAD, 0x01);
}

/// Direction of a session (`op` in the session parameters).
pub mod session_op {
    /// The session encrypts.
    pub const ENCRYPT: u32 = 1;
    /// The session decrypts.
    pub const DECRYPT: u32 = 2;
}

/// `op_type` of symmetric sessions and requests.
pub mod sym_op {
    /// No operation.
    pub const NONE: u32 = 0;
    /// Plain cipher.
    pub const CIPHER: u32 = 1;
    /// Cipher chained with a hash or MAC.
    pub const ALGORITHM_CHAINING: u32 = 2;
}

/// Status codes written by the device.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Any failure not covered below.
    pub const ERR: u8 = 1;
    /// Authentication failed (AEAD tag mismatch).
    pub const BADMSG: u8 = 2;
    /// Unsupported operation or algorithm.
    pub const NOTSUPP: u8 = 3;
    /// Invalid session ID.
    pub const INVSESS: u8 = 4;
    /// No free session ID (or other resource).
    pub const NOSPC: u8 = 5;
    /// Signature verification failed (virtio 1.2 section 5.9.7.1: only for AKCIPHER
    /// verification; a session-creating device does not send it).
    pub const KEY_REJECTED: u8 = 6;
}

/// Length of the control request (`struct virtio_crypto_op_ctrl_req`).
pub const CTRL_REQ_SIZE: usize = 72;
/// Length of the data request header (`struct virtio_crypto_op_data_req`).
pub const DATA_REQ_SIZE: usize = 72;
/// Length of `struct virtio_crypto_session_input`.
pub const SESSION_INPUT_SIZE: usize = 16;
/// Length of `struct virtio_crypto_inhdr`.
pub const INHDR_SIZE: usize = 1;

/// Session parameters of a control request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlPayload {
    /// `virtio_crypto_sym_create_session_req` with `op_type = CIPHER`.
    CreateCipher {
        /// Cipher algorithm number.
        algo: u32,
        /// Key length in bytes; the key follows the request.
        key_len: u32,
        /// [`session_op::ENCRYPT`] or [`session_op::DECRYPT`].
        op: u32,
    },
    /// `virtio_crypto_aead_create_session_req`.
    CreateAead {
        /// AEAD algorithm number.
        algo: u32,
        /// Key length in bytes; the key follows the request.
        key_len: u32,
        /// Tag length in bytes (`hash_result_len`).
        tag_len: u32,
        /// Largest AAD length the session will see.
        aad_len: u32,
        /// [`session_op::ENCRYPT`] or [`session_op::DECRYPT`].
        op: u32,
    },
    /// `virtio_crypto_destroy_session_req`.
    Destroy {
        /// The session to destroy.
        session_id: u64,
    },
}

/// A control queue request: `struct virtio_crypto_ctrl_header` plus its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtrlRequest {
    /// One of the `*_SESSION` opcodes in [`op`].
    pub opcode: u32,
    /// Algorithm number, repeated from the parameters as the spec asks.
    pub algo: u32,
    /// Flags (none defined for session mode).
    pub flag: u32,
    /// Data queue the session is meant for (advisory).
    pub queue_id: u32,
    /// The parameters.
    pub payload: CtrlPayload,
}

impl CtrlRequest {
    /// Encodes into the 72-byte wire form.
    pub fn encode(&self) -> [u8; CTRL_REQ_SIZE] {
        let mut b = [0u8; CTRL_REQ_SIZE];
        put_u32(&mut b, 0, self.opcode);
        put_u32(&mut b, 4, self.algo);
        put_u32(&mut b, 8, self.flag);
        put_u32(&mut b, 12, self.queue_id);
        match self.payload {
            CtrlPayload::CreateCipher { algo, key_len, op } => {
                put_u32(&mut b, 16, algo);
                put_u32(&mut b, 20, key_len);
                put_u32(&mut b, 24, op);
                put_u32(&mut b, 64, sym_op::CIPHER);
            }
            CtrlPayload::CreateAead { algo, key_len, tag_len, aad_len, op } => {
                put_u32(&mut b, 16, algo);
                put_u32(&mut b, 20, key_len);
                put_u32(&mut b, 24, tag_len);
                put_u32(&mut b, 28, aad_len);
                put_u32(&mut b, 32, op);
            }
            CtrlPayload::Destroy { session_id } => put_u64(&mut b, 16, session_id),
        }
        b
    }

    /// Decodes the wire form. Returns `None` for an opcode that is not a session opcode, or a
    /// symmetric session whose `op_type` is not a plain cipher: the caller answers NOTSUPP.
    pub fn decode(b: &[u8; CTRL_REQ_SIZE]) -> Option<Self> {
        let opcode = u32_at(b, 0);
        let payload = match opcode {
            op::CIPHER_CREATE_SESSION => {
                if u32_at(b, 64) != sym_op::CIPHER {
                    return None;
                }
                CtrlPayload::CreateCipher { algo: u32_at(b, 16), key_len: u32_at(b, 20), op: u32_at(b, 24) }
            }
            op::AEAD_CREATE_SESSION => CtrlPayload::CreateAead {
                algo: u32_at(b, 16),
                key_len: u32_at(b, 20),
                tag_len: u32_at(b, 24),
                aad_len: u32_at(b, 28),
                op: u32_at(b, 32),
            },
            op::CIPHER_DESTROY_SESSION | op::AEAD_DESTROY_SESSION => {
                CtrlPayload::Destroy { session_id: u64_at(b, 16) }
            }
            _ => return None,
        };
        Some(Self { opcode, algo: u32_at(b, 4), flag: u32_at(b, 8), queue_id: u32_at(b, 12), payload })
    }
}

/// `struct virtio_crypto_session_input`: the device's answer to a create-session request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionInput {
    /// The new session's ID, valid when `status` is OK.
    pub session_id: u64,
    /// A [`status`] code.
    pub status: u32,
}

impl SessionInput {
    /// Encodes into the 16-byte wire form.
    pub fn encode(&self) -> [u8; SESSION_INPUT_SIZE] {
        let mut b = [0u8; SESSION_INPUT_SIZE];
        put_u64(&mut b, 0, self.session_id);
        put_u32(&mut b, 8, self.status);
        b
    }

    /// Decodes the wire form.
    pub fn decode(b: &[u8; SESSION_INPUT_SIZE]) -> Self {
        Self { session_id: u64_at(b, 0), status: u32_at(b, 8) }
    }
}

/// Per-request lengths of a data request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataParams {
    /// `virtio_crypto_cipher_para` inside a `virtio_crypto_sym_data_req` with `op_type = CIPHER`.
    Cipher {
        /// IV length.
        iv_len: u32,
        /// Source length.
        src_len: u32,
        /// Destination length.
        dst_len: u32,
    },
    /// `virtio_crypto_aead_para`.
    Aead {
        /// IV length.
        iv_len: u32,
        /// AAD length.
        aad_len: u32,
        /// Source length (ciphertext and tag when decrypting).
        src_len: u32,
        /// Destination length (ciphertext and tag when encrypting).
        dst_len: u32,
        /// Authentication tag length (`tag_len` of `virtio_crypto_aead_data_flf`, at byte 40
        /// of the header); the same as the session's.
        tag_len: u32,
    },
}

/// A data queue request header: `struct virtio_crypto_op_header` plus its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRequest {
    /// One of the data opcodes in [`op`].
    pub opcode: u32,
    /// Algorithm number.
    pub algo: u32,
    /// Session the request runs in.
    pub session_id: u64,
    /// Flags (none in session mode).
    pub flag: u32,
    /// Lengths.
    pub params: DataParams,
}

impl DataRequest {
    /// Encodes into the 72-byte wire form.
    pub fn encode(&self) -> [u8; DATA_REQ_SIZE] {
        let mut b = [0u8; DATA_REQ_SIZE];
        self.encode_into(&mut b);
        b
    }

    /// Encodes into `b`, which must be zeroed where the header has padding.
    pub fn encode_into(&self, b: &mut [u8; DATA_REQ_SIZE]) {
        put_u32(b, 0, self.opcode);
        put_u32(b, 4, self.algo);
        put_u64(b, 8, self.session_id);
        put_u32(b, 16, self.flag);
        match self.params {
            DataParams::Cipher { iv_len, src_len, dst_len } => {
                put_u32(b, 24, iv_len);
                put_u32(b, 28, src_len);
                put_u32(b, 32, dst_len);
                put_u32(b, 64, sym_op::CIPHER);
            }
            DataParams::Aead { iv_len, aad_len, src_len, dst_len, tag_len } => {
                put_u32(b, 24, iv_len);
                put_u32(b, 28, aad_len);
                put_u32(b, 32, src_len);
                put_u32(b, 36, dst_len);
                // virtio 1.2 section 5.9.7.6 has `tag_len` here; Linux's uapi struct has padding.
                put_u32(b, 40, tag_len);
            }
        }
    }

    /// Decodes the wire form. Returns `None` for an unknown opcode or a symmetric request whose
    /// `op_type` is not a plain cipher.
    pub fn decode(b: &[u8; DATA_REQ_SIZE]) -> Option<Self> {
        let opcode = u32_at(b, 0);
        let params = match opcode {
            op::CIPHER_ENCRYPT | op::CIPHER_DECRYPT => {
                if u32_at(b, 64) != sym_op::CIPHER {
                    return None;
                }
                DataParams::Cipher { iv_len: u32_at(b, 24), src_len: u32_at(b, 28), dst_len: u32_at(b, 32) }
            }
            op::AEAD_ENCRYPT | op::AEAD_DECRYPT => DataParams::Aead {
                iv_len: u32_at(b, 24),
                aad_len: u32_at(b, 28),
                src_len: u32_at(b, 32),
                dst_len: u32_at(b, 36),
                tag_len: u32_at(b, 40),
            },
            _ => return None,
        };
        Some(Self { opcode, algo: u32_at(b, 4), session_id: u64_at(b, 8), flag: u32_at(b, 16), params })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_match_the_spec() {
        assert_eq!(op::CIPHER_CREATE_SESSION, 0x02);
        assert_eq!(op::AEAD_CREATE_SESSION, 0x0302);
        assert_eq!(op::AEAD_DECRYPT, 0x0301);
    }

    #[test]
    fn ctrl_round_trip() {
        for payload in [
            CtrlPayload::CreateCipher { algo: cipher::AES_XTS, key_len: 64, op: session_op::DECRYPT },
            CtrlPayload::CreateAead { algo: aead::GCM, key_len: 32, tag_len: 16, aad_len: 64, op: 1 },
            CtrlPayload::Destroy { session_id: 0x1234_5678_9abc },
        ] {
            let r = CtrlRequest {
                opcode: match payload {
                    CtrlPayload::CreateCipher { .. } => op::CIPHER_CREATE_SESSION,
                    CtrlPayload::CreateAead { .. } => op::AEAD_CREATE_SESSION,
                    CtrlPayload::Destroy { .. } => op::AEAD_DESTROY_SESSION,
                },
                algo: 7,
                flag: 0,
                queue_id: 3,
                payload,
            };
            assert_eq!(CtrlRequest::decode(&r.encode()), Some(r));
        }
    }

    #[test]
    fn data_round_trip_and_layout() {
        let r = DataRequest {
            opcode: op::CIPHER_ENCRYPT,
            algo: cipher::AES_CBC,
            session_id: 9,
            flag: 0,
            params: DataParams::Cipher { iv_len: 16, src_len: 4096, dst_len: 4096 },
        };
        let b = r.encode();
        assert_eq!(&b[24..28], &16u32.to_le_bytes());
        assert_eq!(&b[64..68], &sym_op::CIPHER.to_le_bytes());
        assert_eq!(DataRequest::decode(&b), Some(r));
        let mut bad = b;
        bad[0] = 0x77;
        assert_eq!(DataRequest::decode(&bad), None);
    }

    #[test]
    fn aead_header_has_every_field_of_the_spec() {
        let r = DataRequest {
            opcode: op::AEAD_ENCRYPT,
            algo: aead::GCM,
            session_id: 5,
            flag: 0,
            params: DataParams::Aead { iv_len: 12, aad_len: 20, src_len: 64, dst_len: 80, tag_len: 16 },
        };
        let b = r.encode();
        let le = |v: u32| v.to_le_bytes();
        assert_eq!((&b[24..28], &b[28..32], &b[32..36]), (&le(12)[..], &le(20)[..], &le(64)[..]));
        assert_eq!((&b[36..40], &b[40..44], &b[44..48]), (&le(80)[..], &le(16)[..], &le(0)[..]));
        assert_eq!(DataRequest::decode(&b), Some(r));
    }
}
