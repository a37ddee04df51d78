//! The whole driver against a virtio-crypto device whose queue code is someone else's.
//!
//! The driver and the emulated device in `hw/` share `crypt-vfio-spec`, so a wrong offset or
//! ordering there would be wrong on both sides and no test would notice. Here the device side of
//! every virtqueue is rust-vmm's `virtio-queue` (the split-queue implementation VMMs such as
//! Cloud Hypervisor and Firecracker use): it pops the driver's descriptor chains (following
//! indirect tables), reads and writes the buffers through its `Reader`/`Writer`, publishes used
//! elements and decides interrupts with EVENT_IDX. The PCI registers and the virtio-crypto
//! request decoding below are written from the virtio 1.2 specification and Linux's
//! `include/uapi/linux/virtio_{pci,crypto}.h`, not from `crypt-vfio-spec`; the cipher work is done
//! by the reference AES core. Every result is compared with the software engine.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crypt_vfio::dma::DmaRegion;
use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{Buf, Direction, Engine, Event, Iv, Request, Submitted};
use crypt_vfio::transport::{Bar, EventNotifier, Transport};
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions, VirtioCrypto};
use crypt_vfio::{CoreKind, Mode};
use crypt_vfio_cores::{new_cipher, CipherCore, CoreError};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

// Numbers from the virtio 1.2 specification (sections 2.1, 2.7, 4.1.4, 5.9, 6), written here
// independently of crypt-vfio-spec.
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
const F_ACCESS_PLATFORM: u64 = 1 << 33;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;
const NO_VECTOR: u16 = 0xffff;
const VRING_DESC_F_INDIRECT: u16 = 4;

const DATA_QUEUES: u16 = 2;
const NUM_QUEUES: u16 = DATA_QUEUES + 1;
const QUEUE_MAX: u16 = 256;
const MSIX_VECTORS: u16 = 4;

// BAR 0 layout of this device.
const BAR0_LEN: u64 = 0x4000;
const COMMON: u64 = 0x0000;
const NOTIFY: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const ISR: u64 = 0x2000;
const DEVICE: u64 = 0x3000;
const DEVICE_LEN: u64 = 56;

// virtio-crypto (virtio 1.2 section 5.9; Linux uapi virtio_crypto.h).
const CIPHER_CREATE: u32 = 0x02;
const CIPHER_DESTROY: u32 = 0x03;
const AEAD_CREATE: u32 = (3 << 8) | 0x02;
const AEAD_DESTROY: u32 = (3 << 8) | 0x03;
const CIPHER_ENCRYPT: u32 = 0x00;
const CIPHER_DECRYPT: u32 = 0x01;
const AEAD_ENCRYPT: u32 = 3 << 8;
const AEAD_DECRYPT: u32 = (3 << 8) | 0x01;
const ALGO_AES_CBC: u32 = 3;
const ALGO_AES_CTR: u32 = 4;
const ALGO_AES_XTS: u32 = 13;
const ALGO_GCM: u32 = 1;
const SYM_OP_CIPHER: u32 = 1;
const OP_ENCRYPT: u32 = 1;
const OP_DECRYPT: u32 = 2;
const OK: u8 = 0;
const ERR: u8 = 1;
const BADMSG: u8 = 2;
const NOTSUPP: u8 = 3;
const INVSESS: u8 = 4;
/// `struct virtio_crypto_op_ctrl_req` and `struct virtio_crypto_op_data_req`.
const REQ_SIZE: usize = 72;
const TAG_LEN: usize = 16;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

struct DeviceSession {
    cipher: Box<dyn CipherCore>,
    aead: bool,
    encrypt: bool,
}

/// What the device saw, for the test to check.
#[derive(Default, Debug)]
struct Seen {
    doorbells: u64,
    chains: u64,
    indirect_chains: u64,
    direct_chains: u64,
    interrupts: u64,
    /// Requests completed while the device held back an interrupt (EVENT_IDX said not yet).
    suppressed_interrupts: u64,
    /// Everything the driver did that the specification forbids.
    violations: Vec<String>,
}

struct Dev {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<Queue>,
    vectors: Vec<u16>,
    kicked: Vec<bool>,
    /// The IOMMU: every mapped region at its IOVA, as virtio-queue reads guest memory.
    mem: GuestMemoryMmap,
    owners: HashMap<u64, Arc<DmaRegion>>,
    irqs: Vec<Option<File>>,
    sessions: HashMap<u64, DeviceSession>,
    next_session: u64,
    seen: Seen,
    stop: bool,
}

struct Shared {
    dev: Mutex<Dev>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Dev> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }
}

const OFFERED: u64 = F_VERSION_1 | F_ACCESS_PLATFORM | F_EVENT_IDX | F_INDIRECT_DESC;

impl Dev {
    fn new() -> Self {
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues: (0..NUM_QUEUES).map(|_| Queue::new(QUEUE_MAX).unwrap()).collect(),
            vectors: vec![NO_VECTOR; usize::from(NUM_QUEUES)],
            kicked: vec![false; usize::from(NUM_QUEUES)],
            mem: GuestMemoryMmap::new(),
            owners: HashMap::new(),
            irqs: (0..MSIX_VECTORS).map(|_| None).collect(),
            sessions: HashMap::new(),
            next_session: 1,
            seen: Seen::default(),
            stop: false,
        }
    }

    fn reset(&mut self) {
        self.driver_features = 0;
        self.status = 0;
        self.config_vector = NO_VECTOR;
        for q in &mut self.queues {
            q.reset();
        }
        self.vectors.fill(NO_VECTOR);
        self.kicked.fill(false);
        self.sessions.clear();
    }

    fn violation(&mut self, what: String) {
        // Printed at once too: the driver usually fails on it before the test gets to look.
        eprintln!("virtio rule broken: {what}");
        self.seen.violations.push(what);
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_read(&mut self, off: u64) -> u64 {
        let sel = usize::from(self.queue_select);
        let q = self.queues.get(sel);
        match off {
            0x00 => self.device_feature_select.into(),
            0x04 => match self.device_feature_select {
                0 => OFFERED & 0xffff_ffff,
                1 => OFFERED >> 32,
                _ => 0,
            },
            0x08 => self.driver_feature_select.into(),
            0x0c => (self.driver_features >> (32 * self.driver_feature_select.min(1))) & 0xffff_ffff,
            0x10 => self.config_vector.into(),
            0x12 => NUM_QUEUES.into(),
            0x14 => self.status.into(),
            0x15 => 0,
            0x16 => self.queue_select.into(),
            0x18 => q.map_or(0, |q| q.size()).into(),
            0x1a => self.vectors.get(sel).copied().unwrap_or(NO_VECTOR).into(),
            0x1c => q.is_some_and(|q| q.ready()).into(),
            0x1e => self.queue_select.into(),
            0x20 => q.map_or(0, |q| q.desc_table() & 0xffff_ffff),
            0x24 => q.map_or(0, |q| q.desc_table() >> 32),
            0x28 => q.map_or(0, |q| q.avail_ring() & 0xffff_ffff),
            0x2c => q.map_or(0, |q| q.avail_ring() >> 32),
            0x30 => q.map_or(0, |q| q.used_ring() & 0xffff_ffff),
            0x34 => q.map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        }
    }

    fn common_write(&mut self, off: u64, v: u64) {
        let v32 = v as u32;
        let sel = usize::from(self.queue_select);
        if matches!(off, 0x18 | 0x1a | 0x20..=0x37) && self.queues.get(sel).is_some_and(|q| q.ready()) {
            // virtio 1.2 section 4.1.4.3.2: a queue is configured before it is enabled.
            self.violation(format!("write of {v:#x} to queue {sel}'s offset {off:#x} while it is enabled"));
        }
        match off {
            0x00 => self.device_feature_select = v32,
            0x08 => self.driver_feature_select = v32,
            0x0c => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v32),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32),
                s => self.violation(format!("driver_feature_select {s}")),
            },
            0x10 => self.config_vector = v as u16,
            0x14 => {
                let s = v as u8;
                if s == 0 {
                    self.reset();
                    return;
                }
                if s & !self.status & S_FEATURES_OK != 0 && self.driver_features & !OFFERED != 0 {
                    // Features not offered: FEATURES_OK does not stick (virtio 1.2 section 3.1.1).
                    self.violation(format!("driver accepted unoffered features {:#x}", self.driver_features));
                    self.status = s & !S_FEATURES_OK;
                    return;
                }
                self.status = s;
            }
            0x16 => self.queue_select = v as u16,
            0x18 => {
                // A power of two no larger than the maximum (virtio 1.2 section 2.7).
                if let Some(Err(e)) = self.queue().map(|q| q.try_set_size(v as u16)) {
                    self.violation(format!("queue size {v}: {e:?}"));
                }
            }
            0x1a => {
                let vector = v as u16;
                let ok = vector == NO_VECTOR || vector < MSIX_VECTORS;
                if let Some(slot) = self.vectors.get_mut(sel) {
                    *slot = if ok { vector } else { NO_VECTOR };
                }
            }
            0x1c => {
                if v != 1 {
                    // virtio 1.2 section 4.1.4.3.2: the driver MUST NOT write a 0 to queue_enable.
                    self.violation(format!("queue_enable written with {v}"));
                }
                let event_idx = self.driver_features & F_EVENT_IDX != 0;
                let Some(q) = self.queues.get_mut(sel) else { return };
                q.set_event_idx(event_idx);
                q.set_ready(v == 1);
                if !q.is_valid(&self.mem) {
                    let what = format!(
                        "queue {sel} enabled with size {} and rings at {:#x}/{:#x}/{:#x} that virtio-queue refuses",
                        q.size(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring()
                    );
                    self.violation(what);
                }
            }
            0x20 => self.queue().into_iter().for_each(|q| q.set_desc_table_address(Some(v32), None)),
            0x24 => self.queue().into_iter().for_each(|q| q.set_desc_table_address(None, Some(v32))),
            0x28 => self.queue().into_iter().for_each(|q| q.set_avail_ring_address(Some(v32), None)),
            0x2c => self.queue().into_iter().for_each(|q| q.set_avail_ring_address(None, Some(v32))),
            0x30 => self.queue().into_iter().for_each(|q| q.set_used_ring_address(Some(v32), None)),
            0x34 => self.queue().into_iter().for_each(|q| q.set_used_ring_address(None, Some(v32))),
            _ => self.violation(format!("write of {v:#x} to read-only common config offset {off:#x}")),
        }
    }

    /// `struct virtio_crypto_config`.
    fn device_config(&self) -> [u8; DEVICE_LEN as usize] {
        let mut b = [0u8; DEVICE_LEN as usize];
        let fields: [u32; 12] = [
            1,                                                               // status: HW_READY
            u32::from(DATA_QUEUES),                                          // max_dataqueues
            (1 << 0) | (1 << 3),                                             // services: cipher, aead
            (1 << ALGO_AES_CBC) | (1 << ALGO_AES_CTR) | (1 << ALGO_AES_XTS), // cipher_algo_l
            0,                                                               // cipher_algo_h
            0,                                                               // hash_algo
            0,                                                               // mac_algo_l
            0,                                                               // mac_algo_h
            1 << ALGO_GCM,                                                   // aead_algo
            64,                                                              // max_cipher_key_len
            0,                                                               // max_auth_key_len
            0,                                                               // akcipher_algo
        ];
        for (i, f) in fields.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&f.to_le_bytes());
        }
        b[48..56].copy_from_slice(&(1u64 << 20).to_le_bytes()); // max_size
        b
    }

    /// Serves every queue that was kicked, the way a VMM's device thread does.
    fn run_kicked(&mut self) {
        for qi in 0..usize::from(NUM_QUEUES) {
            if std::mem::take(&mut self.kicked[qi]) && self.queues[qi].ready() {
                self.serve(qi);
            }
        }
    }

    fn serve(&mut self, qi: usize) {
        let mem = self.mem.clone();
        if self.driver_features & F_EVENT_IDX != 0 {
            // virtio 1.2 section 2.7.10.1: with EVENT_IDX the driver MUST set avail flags to 0.
            let avail = GuestAddress(self.queues[qi].avail_ring());
            match mem.read_obj::<u16>(avail) {
                Ok(0) => {}
                Ok(f) => self.violation(format!("queue {qi}: avail flags {f:#x} with EVENT_IDX")),
                Err(e) => self.violation(format!("queue {qi}: avail flags: {e}")),
            }
        }
        // Entries published while the queue was being re-armed come with a doorbell, but they may
        // already be visible below: only entries that were there before a pass that then took
        // none of them are a chain virtio-queue refuses.
        let mut ahead_before = false;
        loop {
            let start = self.queues[qi].next_avail();
            loop {
                if let Err(e) = self.queues[qi].disable_notification(&mem) {
                    return self.violation(format!("queue {qi}: {e}"));
                }
                while let Some(chain) = self.queues[qi].pop_descriptor_chain(&mem) {
                    let head = chain.head_index();
                    let written = self.handle(qi, &mem, chain);
                    if let Err(e) = self.queues[qi].add_used(&mem, head, written) {
                        return self.violation(format!("queue {qi}: add_used: {e}"));
                    }
                    match self.queues[qi].needs_notification(&mem) {
                        Ok(true) => self.interrupt(qi),
                        Ok(false) => self.seen.suppressed_interrupts += 1,
                        Err(e) => return self.violation(format!("queue {qi}: {e}")),
                    }
                }
                match self.queues[qi].enable_notification(&mem) {
                    Ok(true) => continue, // the driver published more while we were re-arming
                    Ok(false) => break,
                    Err(e) => return self.violation(format!("queue {qi}: {e}")),
                }
            }
            // virtio-queue stops popping at a chain it cannot read or an available index that
            // runs more than a ring ahead; either is a driver bug.
            match self.queues[qi].avail_idx(&mem, Ordering::Acquire) {
                Ok(idx) if idx.0 != self.queues[qi].next_avail() => {
                    if ahead_before && self.queues[qi].next_avail() == start {
                        return self.violation(format!(
                            "queue {qi}: stuck at available entry {} of {} (a chain virtio-queue refuses)",
                            self.queues[qi].next_avail(),
                            idx.0
                        ));
                    }
                    ahead_before = true;
                }
                Ok(_) => return,
                Err(e) => return self.violation(format!("queue {qi}: available index: {e}")),
            }
        }
    }

    fn interrupt(&mut self, qi: usize) {
        let vector = self.vectors[qi];
        if vector == NO_VECTOR {
            return;
        }
        self.seen.interrupts += 1;
        if let Some(Some(f)) = self.irqs.get_mut(usize::from(vector)) {
            let _ = f.write_all(&1u64.to_ne_bytes());
        }
    }

    /// Checks one chain's shape and serves it; returns the bytes written to it.
    fn handle(&mut self, qi: usize, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let head = chain.head_index();
        let table = GuestAddress(self.queues[qi].desc_table());
        let raw: Descriptor = match mem.read_obj(GuestAddress(table.0 + 16 * u64::from(head))) {
            Ok(d) => d,
            Err(e) => {
                self.violation(format!("queue {qi}: head {head}: {e}"));
                return 0;
            }
        };
        if raw.refers_to_indirect_table() {
            self.seen.indirect_chains += 1;
            if self.driver_features & F_INDIRECT_DESC == 0 {
                self.violation(format!("queue {qi}: indirect descriptor without VIRTIO_F_INDIRECT_DESC"));
            }
            if raw.has_next() {
                self.violation(format!("queue {qi}: head {head} is INDIRECT and NEXT"));
            }
        } else {
            self.seen.direct_chains += 1;
        }
        self.seen.chains += 1;
        let descs: Vec<Descriptor> = chain.clone().collect();
        if descs.is_empty() {
            self.violation(format!("queue {qi}: head {head}: a chain virtio-queue cannot walk"));
            return 0;
        }
        if let Some(d) = descs.iter().find(|d| d.flags() & VRING_DESC_F_INDIRECT != 0) {
            self.violation(format!("queue {qi}: head {head}: nested indirect descriptor {d:?}"));
        }
        if let Some(first_w) = descs.iter().position(|d| d.is_write_only()) {
            if descs[first_w..].iter().any(|d| !d.is_write_only()) {
                self.violation(format!("queue {qi}: head {head}: readable descriptor after a writable one"));
            }
        }
        if let Some(d) = descs.iter().find(|d| d.len() == 0) {
            self.violation(format!("queue {qi}: head {head}: zero-length descriptor {d:?}"));
        }
        let (mut r, mut w) = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                self.violation(format!("queue {qi}: head {head}: buffers outside the IOMMU: {e}"));
                return 0;
            }
        };
        let outcome = if qi == usize::from(DATA_QUEUES) {
            self.control(&mut r, &mut w)
        } else {
            self.data(&mut r, &mut w)
        };
        if let Err(what) = outcome {
            self.violation(format!("queue {qi}: head {head}: {what}"));
        }
        if r.available_bytes() != 0 {
            self.violation(format!(
                "queue {qi}: head {head}: {} readable bytes left over",
                r.available_bytes()
            ));
        }
        if w.available_bytes() != 0 {
            self.violation(format!(
                "queue {qi}: head {head}: {} writable bytes left over",
                w.available_bytes()
            ));
        }
        w.bytes_written() as u32
    }

    fn control(&mut self, r: &mut Reader<'_>, w: &mut Writer<'_>) -> Result<(), String> {
        let mut hdr = [0u8; REQ_SIZE];
        r.read_exact(&mut hdr).map_err(|e| format!("control header: {e}"))?;
        let opcode = u32_at(&hdr, 0);
        match opcode {
            CIPHER_CREATE | AEAD_CREATE => {
                // virtio_crypto_sym_create_session_req: cipher para {algo, keylen, op} at 16,
                // op_type at 16 + 48. virtio_crypto_aead_create_session_req: {algo, key_len,
                // hash_result_len, aad_len, op} at 16.
                let aead = opcode == AEAD_CREATE;
                let algo = u32_at(&hdr, 16);
                let key_len = u32_at(&hdr, 20) as usize;
                let op = u32_at(&hdr, if aead { 32 } else { 24 });
                if u32_at(&hdr, 4) != algo {
                    return Err(format!("header algo {} differs from session algo {algo}", u32_at(&hdr, 4)));
                }
                if !aead && u32_at(&hdr, 64) != SYM_OP_CIPHER {
                    return Err(format!("op_type {} is not CIPHER", u32_at(&hdr, 64)));
                }
                if aead && u32_at(&hdr, 24) != TAG_LEN as u32 {
                    return Err(format!("tag length {}", u32_at(&hdr, 24)));
                }
                let mut key = vec![0u8; key_len];
                r.read_exact(&mut key).map_err(|e| format!("key of {key_len} bytes: {e}"))?;
                let mode = match (aead, algo) {
                    (false, ALGO_AES_CBC) => Some(Mode::Cbc),
                    (false, ALGO_AES_CTR) => Some(Mode::Ctr),
                    (false, ALGO_AES_XTS) => Some(Mode::Xts),
                    (true, ALGO_GCM) => Some(Mode::Gcm),
                    _ => None,
                };
                let (id, status) = match mode.map(|m| new_cipher(CoreKind::Reference, m, &key)) {
                    Some(Ok(cipher)) if op == OP_ENCRYPT || op == OP_DECRYPT => {
                        let id = self.next_session;
                        self.next_session += 1;
                        self.sessions.insert(id, DeviceSession { cipher, aead, encrypt: op == OP_ENCRYPT });
                        (id, OK)
                    }
                    Some(Ok(_)) => return Err(format!("session op {op}")),
                    Some(Err(_)) => (0, ERR),
                    None => (0, NOTSUPP),
                };
                // virtio_crypto_session_input: session_id u64, status u32, padding u32.
                let mut input = [0u8; 16];
                input[..8].copy_from_slice(&id.to_le_bytes());
                input[8..12].copy_from_slice(&u32::from(status).to_le_bytes());
                w.write_all(&input).map_err(|e| format!("session input: {e}"))
            }
            CIPHER_DESTROY | AEAD_DESTROY => {
                let id = u64_at(&hdr, 16);
                let status = if self.sessions.remove(&id).is_some() { OK } else { INVSESS };
                w.write_all(&[status]).map_err(|e| format!("destroy status: {e}"))
            }
            other => Err(format!("control opcode {other:#x}")),
        }
    }

    fn data(&mut self, r: &mut Reader<'_>, w: &mut Writer<'_>) -> Result<(), String> {
        let mut hdr = [0u8; REQ_SIZE];
        r.read_exact(&mut hdr).map_err(|e| format!("data header: {e}"))?;
        let opcode = u32_at(&hdr, 0);
        let id = u64_at(&hdr, 8);
        let aead = matches!(opcode, AEAD_ENCRYPT | AEAD_DECRYPT);
        let encrypt = matches!(opcode, CIPHER_ENCRYPT | AEAD_ENCRYPT);
        if !aead && !matches!(opcode, CIPHER_ENCRYPT | CIPHER_DECRYPT) {
            return Err(format!("data opcode {opcode:#x}"));
        }
        // virtio_crypto_cipher_para {iv_len, src_data_len, dst_data_len} at 24 and op_type at 64;
        // virtio_crypto_aead_para {iv_len, aad_len, src_data_len, dst_data_len} at 24.
        let (iv_len, aad_len, src_len, dst_len) = if aead {
            (u32_at(&hdr, 24), u32_at(&hdr, 28), u32_at(&hdr, 32), u32_at(&hdr, 36))
        } else {
            if u32_at(&hdr, 64) != SYM_OP_CIPHER {
                return Err(format!("op_type {}", u32_at(&hdr, 64)));
            }
            (u32_at(&hdr, 24), 0, u32_at(&hdr, 28), u32_at(&hdr, 32))
        };
        let (iv_len, aad_len, src_len, dst_len) =
            (iv_len as usize, aad_len as usize, src_len as usize, dst_len as usize);
        // The virtio specification's virtio_crypto_aead_data_flf (virtio 1.2 section 5.9.7.6) has
        // tag_len after dst_data_len; Linux's uapi struct stops before it (padding there).
        if aead && u32_at(&hdr, 40) != TAG_LEN as u32 {
            return Err(format!("AEAD request with tag_len {}", u32_at(&hdr, 40)));
        }
        let want_dst = match (aead, encrypt) {
            (false, _) => src_len,
            (true, true) => src_len + TAG_LEN,
            (true, false) => src_len.checked_sub(TAG_LEN).ok_or("AEAD decryption shorter than a tag")?,
        };
        if dst_len != want_dst {
            return Err(format!("dst_data_len {dst_len} for src_data_len {src_len}"));
        }
        if r.available_bytes() != iv_len + src_len + aad_len {
            return Err(format!(
                "{} readable bytes after the header, the header says {iv_len} + {src_len} + {aad_len}",
                r.available_bytes()
            ));
        }
        if w.available_bytes() != dst_len + 1 {
            return Err(format!("{} writable bytes for dst {dst_len} and status", w.available_bytes()));
        }
        let mut iv = vec![0u8; iv_len];
        let mut src = vec![0u8; src_len];
        let mut aad = vec![0u8; aad_len];
        for (what, b) in [("iv", &mut iv), ("src", &mut src), ("aad", &mut aad)] {
            r.read_exact(b).map_err(|e| format!("{what}: {e}"))?;
        }
        let status = match self.sessions.get(&id) {
            None => INVSESS,
            Some(s) if s.aead != aead || s.encrypt != encrypt => {
                return Err(format!("opcode {opcode:#x} on a session of the other kind or direction"));
            }
            Some(s) => {
                let result = match (aead, encrypt) {
                    (false, true) => s.cipher.encrypt(&iv, &[], &mut src, &mut []),
                    (false, false) => s.cipher.decrypt(&iv, &[], &mut src, &[]),
                    (true, true) => {
                        let mut tag = [0u8; TAG_LEN];
                        let r = s.cipher.encrypt(&iv, &aad, &mut src, &mut tag);
                        src.extend_from_slice(&tag);
                        r
                    }
                    (true, false) => {
                        let tag = src.split_off(src_len - TAG_LEN);
                        s.cipher.decrypt(&iv, &aad, &mut src, &tag)
                    }
                };
                match result {
                    Ok(()) => OK,
                    Err(CoreError::AuthFailed) => BADMSG,
                    Err(_) => ERR,
                }
            }
        };
        src.resize(dst_len, 0);
        w.write_all(&src).map_err(|e| format!("dst: {e}"))?;
        w.write_all(&[status]).map_err(|e| format!("status: {e}"))
    }
}

/// The device's PCI configuration space: a type 0 header and the virtio capabilities.
fn config_space() -> [u8; 256] {
    let mut c = [0u8; 256];
    c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
    c[2..4].copy_from_slice(&0x1054u16.to_le_bytes());
    c[6..8].copy_from_slice(&(1u16 << 4).to_le_bytes()); // capability list
    c[0x34] = 0x40;
    // struct virtio_pci_cap: vndr, next, len, cfg_type, bar, id, padding[2], offset, length.
    let caps: [(u8, u64, u64, u8); 4] =
        [(1, COMMON, 0x38, 0x50), (2, NOTIFY, 0x1000, 0x64), (3, ISR, 4, 0x74), (4, DEVICE, DEVICE_LEN, 0)];
    let mut at = 0x40;
    for (ty, off, len, next) in caps {
        let cap_len = if ty == 2 { 20 } else { 16 };
        c[at] = 0x09;
        c[at + 1] = next;
        c[at + 2] = cap_len;
        c[at + 3] = ty;
        c[at + 4] = 0;
        c[at + 8..at + 12].copy_from_slice(&(off as u32).to_le_bytes());
        c[at + 12..at + 16].copy_from_slice(&(len as u32).to_le_bytes());
        if ty == 2 {
            c[at + 16..at + 20].copy_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        }
        at = usize::from(next);
    }
    c
}

/// A PCI function whose device side is virtio-queue.
struct VirtioQueueTransport {
    shared: Arc<Shared>,
    config: Mutex<[u8; 256]>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl VirtioQueueTransport {
    fn new() -> Arc<Self> {
        let shared = Arc::new(Shared { dev: Mutex::new(Dev::new()), wake: Condvar::new() });
        let s = shared.clone();
        let worker = std::thread::spawn(move || {
            let mut dev = s.lock();
            while !dev.stop {
                dev.run_kicked();
                if !dev.kicked.contains(&true) && !dev.stop {
                    dev = s.wake.wait(dev).unwrap_or_else(|e| e.into_inner());
                }
            }
        });
        Arc::new(Self { shared, config: Mutex::new(config_space()), worker: Mutex::new(Some(worker)) })
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.shared.lock().seen)
    }
}

impl Drop for VirtioQueueTransport {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(w) = self.worker.lock().unwrap().take() {
            let _ = w.join();
        }
    }
}

struct Bar0 {
    shared: Arc<Shared>,
}

impl Bar0 {
    fn read(&self, off: u64, width: u64) -> u64 {
        let mut d = self.shared.lock();
        if (COMMON..COMMON + 0x38).contains(&off) {
            return d.common_read(off - COMMON);
        }
        if (DEVICE..DEVICE + DEVICE_LEN).contains(&off) {
            let cfg = d.device_config();
            let o = (off - DEVICE) as usize;
            let mut v = [0u8; 8];
            let n = (width as usize).min(cfg.len() - o);
            v[..n].copy_from_slice(&cfg[o..o + n]);
            return u64::from_le_bytes(v);
        }
        if off == ISR {
            return 0;
        }
        d.violation(format!("read of {width} bytes at BAR 0 offset {off:#x}"));
        u64::MAX
    }

    fn write(&self, off: u64, width: u64, v: u64) {
        let mut d = self.shared.lock();
        if (COMMON..COMMON + 0x38).contains(&off) {
            return d.common_write(off - COMMON, v);
        }
        if (NOTIFY..NOTIFY + 0x1000).contains(&off) {
            let q = (off - NOTIFY) / u64::from(NOTIFY_MULTIPLIER);
            d.seen.doorbells += 1;
            if width != 2 || v != q || q >= u64::from(NUM_QUEUES) {
                return d
                    .violation(format!("doorbell write of {v:#x} ({width} bytes) at queue {q}'s address"));
            }
            if d.status & S_DRIVER_OK == 0 {
                // virtio 1.2 section 3.1.1: no notification before DRIVER_OK.
                return d.violation(format!("doorbell of queue {q} before DRIVER_OK"));
            }
            d.kicked[q as usize] = true;
            drop(d);
            self.shared.wake.notify_all();
            return;
        }
        d.violation(format!("write of {v:#x} ({width} bytes) at BAR 0 offset {off:#x}"));
    }
}

impl Bar for Bar0 {
    fn len(&self) -> u64 {
        BAR0_LEN
    }
    fn read8(&self, offset: u64) -> u8 {
        self.read(offset, 1) as u8
    }
    fn read16(&self, offset: u64) -> u16 {
        self.read(offset, 2) as u16
    }
    fn read32(&self, offset: u64) -> u32 {
        self.read(offset, 4) as u32
    }
    fn write8(&self, offset: u64, value: u8) {
        self.write(offset, 1, value.into())
    }
    fn write16(&self, offset: u64, value: u16) {
        self.write(offset, 2, value.into())
    }
    fn write32(&self, offset: u64, value: u32) {
        self.write(offset, 4, value.into())
    }
}

impl Transport for VirtioQueueTransport {
    fn name(&self) -> String {
        "virtio-queue".into()
    }

    fn read_config(&self, offset: u16, data: &mut [u8]) -> crypt_vfio::Result<()> {
        let c = self.config.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(usize::from(offset) + i).copied().unwrap_or(0xff);
        }
        Ok(())
    }

    fn write_config(&self, offset: u16, data: &[u8]) -> crypt_vfio::Result<()> {
        // Only the command register is writable here.
        if offset == 4 && data.len() == 2 {
            self.config.lock().unwrap()[4..6].copy_from_slice(data);
        }
        Ok(())
    }

    fn bar(&self, index: u8) -> crypt_vfio::Result<Arc<dyn Bar>> {
        if index != 0 {
            return Err(crypt_vfio::Error::Vfio(crypt_vfio::VfioError::Transport(format!("no BAR {index}"))));
        }
        Ok(Arc::new(Bar0 { shared: self.shared.clone() }))
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        // Start above 4 GiB so that the high halves of ring addresses matter.
        std::iter::once((1u64 << 32)..(1u64 << 40)).collect()
    }

    fn dma_map(&self, iova: u64, region: &Arc<DmaRegion>) -> crypt_vfio::Result<()> {
        // SAFETY: the pointer and length describe the region's live mapping; `owners` keeps the
        // region alive for as long as this view is in `mem` (both are dropped in dma_unmap or
        // with the device).
        let mmap = unsafe {
            MmapRegion::build_raw(
                region.as_ptr(),
                region.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
            )
        }
        .map_err(|e| crypt_vfio::Error::Vfio(crypt_vfio::VfioError::Dma(format!("{e}"))))?;
        let view = GuestRegionMmap::new(mmap, GuestAddress(iova)).ok_or_else(|| {
            crypt_vfio::Error::Vfio(crypt_vfio::VfioError::Dma(format!("IOVA {iova:#x} overflows")))
        })?;
        let mut d = self.shared.lock();
        d.mem = d
            .mem
            .insert_region(Arc::new(view))
            .map_err(|e| crypt_vfio::Error::Vfio(crypt_vfio::VfioError::Dma(format!("{e}"))))?;
        d.owners.insert(iova, region.clone());
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> crypt_vfio::Result<()> {
        let mut d = self.shared.lock();
        let (mem, _) = d.mem.remove_region(GuestAddress(iova), len).map_err(|e| {
            crypt_vfio::Error::Vfio(crypt_vfio::VfioError::Dma(format!("unmap {iova:#x}: {e}")))
        })?;
        d.mem = mem;
        d.owners.remove(&iova);
        Ok(())
    }

    fn msix_vectors(&self) -> u16 {
        MSIX_VECTORS
    }

    fn enable_msix(&self, notifiers: &[Option<&EventNotifier>]) -> crypt_vfio::Result<()> {
        let mut d = self.shared.lock();
        for (v, n) in notifiers.iter().enumerate() {
            let slot = d.irqs.get_mut(v).ok_or_else(|| {
                crypt_vfio::Error::Vfio(crypt_vfio::VfioError::Transport(format!("vector {v}")))
            })?;
            *slot = n.map(|n| n.dup()).transpose()?.map(File::from);
        }
        Ok(())
    }

    fn disable_msix(&self) -> crypt_vfio::Result<()> {
        self.shared.lock().irqs.iter_mut().for_each(|i| *i = None);
        Ok(())
    }

    fn reset(&self) -> crypt_vfio::Result<()> {
        self.shared.lock().reset();
        Ok(())
    }
}

/// Runs a mix of every mode, direction and length through the driver on the virtio-queue
/// device and through the software engine, and compares them byte for byte.
fn run_against_software(options: DeviceOptions, rounds: usize) -> Arc<VirtioQueueTransport> {
    let _ = env_logger::builder().is_test(true).try_init();
    let t = VirtioQueueTransport::new();
    let dev = VirtioCrypto::open(t.clone() as Arc<dyn Transport>, &options)
        .expect("the driver opens the virtio-queue device");
    let sw = SoftwareEngine::new(CoreKind::Fast);
    let cases = [(Mode::Cbc, 32usize), (Mode::Ctr, 16), (Mode::Xts, 64), (Mode::Gcm, 32)];
    for (k, &(mode, key_len)) in cases.iter().enumerate() {
        let key: Vec<u8> = (0..key_len).map(|i| (i * 7 + k) as u8).collect();
        let hs = dev.create_session(mode, &key).expect("session on the virtio-queue device");
        let ss = sw.create_session(mode, &key).unwrap();
        let mut hq = common::SyncQueue::open(&dev, k);
        let mut sq = common::SyncQueue::open(&sw, 0);
        for i in 0..rounds {
            // Empty requests (no payload descriptor at all) and large ones too.
            let len = match (i, mode) {
                (0, _) => 0,
                (1, _) => 256 * 1024,
                (_, Mode::Cbc | Mode::Xts) => 16 * (1 + i % 40),
                _ => 1 + (i * 37) % 700,
            };
            if mode.check_data_len(len).is_err() {
                continue;
            }
            let data: Vec<u8> = (0..len).map(|j| (i + j * 3) as u8).collect();
            let iv = vec![i as u8; mode.iv_len()];
            // Long AAD goes through its own bounce buffer: one more descriptor.
            let aad: Vec<u8> = if mode == Mode::Gcm { vec![0xa5; i % 3 * 200] } else { Vec::new() };
            let dbuf = if i % 2 == 0 { Buf::Host(data.clone()) } else { dev.alloc_buffer(len).unwrap() };
            let dbuf = match dbuf {
                Buf::Dma(mut b) => {
                    b.as_mut_slice().copy_from_slice(&data);
                    Buf::Dma(b)
                }
                b => b,
            };
            let (hw_ct, hw_tag) =
                common::crypt(&mut hq, hs.clone(), Direction::Encrypt, &iv, &aad, dbuf, [0; 16]).unwrap();
            let (sw_ct, sw_tag) = common::crypt(
                &mut sq,
                ss.clone(),
                Direction::Encrypt,
                &iv,
                &aad,
                Buf::Host(data.clone()),
                [0; 16],
            )
            .unwrap();
            assert_eq!(hw_ct, sw_ct, "{mode} request {i} ({len} bytes): ciphertext differs");
            assert_eq!(hw_tag, sw_tag, "{mode} request {i}: tag differs");
            let (pt, _) = common::crypt(
                &mut hq,
                hs.clone(),
                Direction::Decrypt,
                &iv,
                &aad,
                Buf::Host(hw_ct.clone()),
                hw_tag,
            )
            .unwrap();
            assert_eq!(pt, data, "{mode} request {i}: round trip");
            if mode == Mode::Gcm && i % 5 == 0 {
                let mut bad = hw_tag;
                bad[0] ^= 1;
                let r =
                    common::crypt(&mut hq, hs.clone(), Direction::Decrypt, &iv, &aad, Buf::Host(hw_ct), bad);
                assert!(
                    matches!(r, Err(crypt_vfio::Error::Crypto(crypt_vfio::CryptoError::AuthFailed))),
                    "{mode} request {i}: {r:?}"
                );
            }
        }
        dev.destroy_session(&hs).unwrap();
    }
    assert!(dev.failure().is_none(), "driver declared the device failed: {:?}", dev.failure());
    drop(dev);
    let violations = t.seen(|s| s.violations.clone());
    assert!(violations.is_empty(), "the driver broke the virtio rules:\n{}", violations.join("\n"));
    t
}

#[test]
fn the_driver_runs_on_virtio_queue_with_indirect_descriptors_and_event_idx() {
    let t = run_against_software(
        DeviceOptions { request_timeout: Duration::from_secs(20), ..Default::default() },
        60,
    );
    let s = t.seen(|s| (s.indirect_chains, s.direct_chains, s.chains, s.doorbells));
    println!("virtio-queue device saw {s:?} (indirect, direct, chains, doorbells)");
    // Data chains are indirect; only control requests are direct.
    assert!(s.0 >= 400, "indirect data chains: {}", s.0);
}

#[test]
fn the_driver_runs_on_virtio_queue_with_plain_chains() {
    let options = DeviceOptions {
        indirect: false,
        event_idx: false,
        request_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let t = run_against_software(options, 60);
    let s = t.seen(|s| (s.indirect_chains, s.direct_chains));
    assert_eq!(s.0, 0, "indirect chains without the feature");
    assert!(s.1 >= 400, "direct chains: {}", s.1);
}

#[test]
fn interrupt_mode_on_virtio_queue_with_event_idx() {
    let options = DeviceOptions {
        completion: CompletionMode::Interrupt,
        request_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let t = run_against_software(options, 30);
    let (irqs, suppressed) = t.seen(|s| (s.interrupts, s.suppressed_interrupts));
    println!("interrupts {irqs}, held back by used_event {suppressed}");
    assert!(irqs > 0, "no interrupt was ever due: used_event was never armed");
}

/// Keeps the ring full for more than 65536 requests: the 16-bit ring indices wrap on both
/// sides, the device is busy while the driver publishes (so EVENT_IDX must hold doorbells back),
/// and a lost doorbell would leave requests hanging until the timeout fails the test.
#[test]
fn pipelined_requests_wrap_the_ring_indices_and_skip_doorbells() {
    let t = VirtioQueueTransport::new();
    let options = DeviceOptions { data_queues: 1, queue_size: 64, ..Default::default() };
    let dev = VirtioCrypto::open(t.clone() as Arc<dyn Transport>, &options).unwrap();
    let key = [0x3cu8; 32];
    let s = dev.create_session(Mode::Ctr, &key).unwrap();
    let reference = new_cipher(CoreKind::Fast, Mode::Ctr, &key).unwrap();
    let mut q = common::SyncQueue::open(&dev, 0);
    const N: u64 = 70_000;
    let (mut submitted, mut done) = (0u64, 0u64);
    let start = std::time::Instant::now();
    while done < N {
        while submitted < N && submitted - done < 256 {
            let iv = submitted.to_le_bytes().repeat(2);
            let req = Request::new(
                s.clone(),
                Direction::Encrypt,
                Iv::new(&iv).unwrap(),
                Buf::Host(vec![0u8; 32]),
                submitted,
            );
            match q.queue.submit(req, true) {
                Ok(Submitted::InProgress) => submitted += 1,
                Ok(Submitted::Backlogged) => {
                    submitted += 1;
                    break;
                }
                Err(e) => panic!("request {submitted} refused: {}", e.kind),
            }
        }
        q.queue.poll();
        let events = std::mem::take(&mut *q.events.lock().unwrap());
        for e in events {
            if let Event::Completed(c) = e {
                c.result.unwrap_or_else(|e| panic!("request {}: {e}", c.request.user_data));
                let mut want = vec![0u8; 32];
                let iv = c.request.user_data.to_le_bytes().repeat(2);
                reference.encrypt(&iv, &[], &mut want, &mut []).unwrap();
                assert_eq!(c.request.data.as_slice(), &want[..], "request {}", c.request.user_data);
                done += 1;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{done} of {N} requests done after 120 s");
    }
    assert!(dev.failure().is_none(), "{:?}", dev.failure());
    drop(dev);
    let (chains, doorbells, violations) = t.seen(|s| (s.chains, s.doorbells, s.violations.clone()));
    println!("{chains} chains, {doorbells} doorbells");
    assert!(violations.is_empty(), "the driver broke the virtio rules:\n{}", violations.join("\n"));
    assert!(chains > N, "{chains} chains for {N} requests");
    assert!(doorbells < chains, "EVENT_IDX never held a doorbell back: {doorbells} for {chains} chains");
}
