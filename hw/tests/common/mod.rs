//! A minimal test driver for the emulated device: just enough of virtio-pci and split rings to
//! bring the device up and push requests through it, written from the spec layouts alone so
//! that the tests check the device against the wire format rather than against itself.

#![allow(dead_code)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crypt_vfio_hw::{DeviceConfig, VirtioCryptoPci};
use crypt_vfio_spec::crypto::{
    op, session_op, CtrlPayload, CtrlRequest, DataParams, DataRequest, SessionInput, SESSION_INPUT_SIZE,
};
use crypt_vfio_spec::pci::{cfg, common, status, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crypt_vfio_spec::ring::{
    avail_event_offset, need_event, used_event_offset, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
    USED_F_NO_NOTIFY, USED_IDX, USED_RING,
};

/// Where the test memory sits in IOVA space.
pub const IOVA_BASE: u64 = 0x1_0000_0000;
pub const PAGE: usize = 4096;

/// Page-aligned, zeroed memory that the device may DMA to.
pub struct DmaMem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the memory is a plain heap allocation; the tests coordinate access through the rings.
unsafe impl Send for DmaMem {}
// SAFETY: as above.
unsafe impl Sync for DmaMem {}

impl DmaMem {
    pub fn new(len: usize) -> Arc<Self> {
        let len = len.div_ceil(PAGE) * PAGE;
        let layout = Layout::from_size_align(len, PAGE).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Arc::new(Self { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off <= self.len);
        self.ptr.wrapping_add(off)
    }

    pub fn map(self: &Arc<Self>, dev: &VirtioCryptoPci, iova: u64) {
        // SAFETY: the allocation lives as long as the `Arc` handed over as owner.
        unsafe { dev.dma_map(iova, self.ptr, self.len, self.clone()).unwrap() }
    }
}

impl Drop for DmaMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, Layout::from_size_align(self.len, PAGE).unwrap()) }
    }
}

/// The driver's side of one split queue.
pub struct Vq {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub last_used: u16,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    /// Per-head buffer slot: the request's bytes live at `slots + head * slot_len`.
    pub slots: u64,
}

/// One piece of a request's chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub iova: u64,
    pub len: u32,
    pub write: bool,
}

pub struct Rig {
    pub dev: VirtioCryptoPci,
    pub mem: Arc<DmaMem>,
    pub queues: Vec<Vq>,
    pub queue_size: u16,
    pub slot_len: usize,
    /// Kick on every submission instead of following the device's suppression.
    pub always_kick: bool,
    scratch_next: usize,
    scratch_start: usize,
    pub offered: u64,
    /// Features the driver accepts, of those offered.
    pub accept: u64,
}

pub const SLOT_LEN: usize = 8192;

impl Rig {
    pub fn new(cfg: DeviceConfig) -> Self {
        Self::with_sizes(cfg, 64, SLOT_LEN)
    }

    pub fn with_sizes(cfg: DeviceConfig, queue_size: u16, slot_len: usize) -> Self {
        let nq = usize::from(cfg.data_queues) + 1;
        let ring_bytes = 3 * PAGE + usize::from(queue_size) * 16;
        let slots = usize::from(queue_size) * slot_len;
        let per_queue = (ring_bytes + slots).div_ceil(PAGE) * PAGE;
        let scratch = 4 << 20;
        let mem = DmaMem::new(nq * per_queue + scratch);
        let dev = VirtioCryptoPci::new(cfg).unwrap();
        mem.map(&dev, IOVA_BASE);
        let mut queues = Vec::new();
        for q in 0..nq {
            let base = IOVA_BASE + (q * per_queue) as u64;
            let desc = base;
            let avail = (desc + u64::from(queue_size) * 16).next_multiple_of(PAGE as u64);
            let used = avail + PAGE as u64;
            let slots = used + PAGE as u64;
            queues.push(Vq {
                size: queue_size,
                desc,
                avail,
                used,
                next_avail: 0,
                last_used: 0,
                free: (0..queue_size).rev().collect(),
                chains: HashMap::new(),
                slots,
            });
        }
        let scratch_start = nq * per_queue;
        let mut rig = Self {
            dev,
            mem,
            queues,
            queue_size,
            slot_len,
            always_kick: false,
            scratch_next: scratch_start,
            scratch_start,
            offered: 0,
            accept: !0,
        };
        rig.init();
        rig
    }

    // ---- memory -------------------------------------------------------------------------

    pub fn host(&self, iova: u64) -> *mut u8 {
        self.mem.ptr((iova - IOVA_BASE) as usize)
    }

    pub fn write(&self, iova: u64, data: &[u8]) {
        assert!((iova - IOVA_BASE) as usize + data.len() <= self.mem.len());
        // SAFETY: inside the test memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.host(iova), data.len()) }
    }

    pub fn read(&self, iova: u64, len: usize) -> Vec<u8> {
        assert!((iova - IOVA_BASE) as usize + len <= self.mem.len());
        let mut v = vec![0u8; len];
        // SAFETY: inside the test memory.
        unsafe { std::ptr::copy_nonoverlapping(self.host(iova), v.as_mut_ptr(), len) }
        v
    }

    fn u16_at(&self, iova: u64) -> &AtomicU16 {
        // SAFETY: ring fields are 2-byte aligned inside the test memory, which outlives `self`.
        unsafe { AtomicU16::from_ptr(self.host(iova) as *mut u16) }
    }

    /// Allocates scratch memory (never freed) for buffers outside the per-head slots.
    pub fn alloc(&mut self, len: usize, align: usize) -> u64 {
        let off = self.scratch_next.next_multiple_of(align);
        assert!(off + len <= self.mem.len(), "scratch memory exhausted");
        self.scratch_next = off + len;
        IOVA_BASE + off as u64
    }

    pub fn reset_scratch(&mut self) {
        self.scratch_next = self.scratch_start;
    }

    // ---- registers ----------------------------------------------------------------------

    pub fn cr(&self, off: u64, width: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(4, off, &mut b[..width]);
        u64::from_le_bytes(b)
    }

    pub fn cw(&self, off: u64, width: usize, v: u64) {
        self.dev.bar_write(4, off, &v.to_le_bytes()[..width]);
    }

    pub fn status(&self) -> u8 {
        self.cr(common::DEVICE_STATUS, 1) as u8
    }

    pub fn set_status(&self, s: u8) {
        self.cw(common::DEVICE_STATUS, 1, u64::from(s));
    }

    pub fn device_features(&self) -> u64 {
        self.cw(common::DEVICE_FEATURE_SELECT, 4, 0);
        let lo = self.cr(common::DEVICE_FEATURE, 4);
        self.cw(common::DEVICE_FEATURE_SELECT, 4, 1);
        let hi = self.cr(common::DEVICE_FEATURE, 4);
        lo | (hi << 32)
    }

    pub fn write_driver_features(&self, f: u64) {
        self.cw(common::DRIVER_FEATURE_SELECT, 4, 0);
        self.cw(common::DRIVER_FEATURE, 4, f & 0xffff_ffff);
        self.cw(common::DRIVER_FEATURE_SELECT, 4, 1);
        self.cw(common::DRIVER_FEATURE, 4, f >> 32);
    }

    pub fn enable_bus_master(&self) {
        self.dev.config_write(cfg::COMMAND, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
    }

    /// Brings the device up from reset: features, all queues, DRIVER_OK.
    pub fn init(&mut self) {
        self.set_status(0);
        self.enable_bus_master();
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.offered = self.device_features();
        self.write_driver_features(self.offered & self.accept);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(self.status() & status::FEATURES_OK, 0, "features refused");
        for q in 0..self.queues.len() {
            self.setup_queue(q);
        }
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    }

    fn setup_queue(&mut self, q: usize) {
        let size = self.queue_size;
        let vq = &mut self.queues[q];
        vq.next_avail = 0;
        vq.last_used = 0;
        vq.free = (0..size).rev().collect();
        vq.chains.clear();
        let (desc, avail, used) = (vq.desc, vq.avail, vq.used);
        // Fresh ring memory, as a driver allocates it.
        // SAFETY: inside the test memory; the device is reset and does not touch it.
        unsafe {
            std::ptr::write_bytes(self.host(desc), 0, usize::from(size) * 16);
            std::ptr::write_bytes(self.host(avail), 0, PAGE);
            std::ptr::write_bytes(self.host(used), 0, PAGE);
        }
        self.cw(common::QUEUE_SELECT, 2, q as u64);
        self.cw(common::QUEUE_SIZE, 2, u64::from(size));
        for (off, v) in
            [(common::QUEUE_DESC, desc), (common::QUEUE_DRIVER, avail), (common::QUEUE_DEVICE, used)]
        {
            self.cw(off, 4, v & 0xffff_ffff);
            self.cw(off + 4, 4, v >> 32);
        }
        self.cw(common::QUEUE_MSIX_VECTOR, 2, q as u64 + 1);
        self.cw(common::QUEUE_ENABLE, 2, 1);
    }

    pub fn ctrl_queue(&self) -> usize {
        self.queues.len() - 1
    }

    pub fn slot(&self, q: usize, head: u16) -> u64 {
        self.queues[q].slots + u64::from(head) * self.slot_len as u64
    }

    // ---- rings --------------------------------------------------------------------------

    fn write_desc(&self, table: u64, i: u16, b: Buf, next: Option<u16>) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&b.iova.to_le_bytes());
        d[8..12].copy_from_slice(&b.len.to_le_bytes());
        let flags = if b.write { DESC_F_WRITE } else { 0 } | if next.is_some() { DESC_F_NEXT } else { 0 };
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
        self.write(table + u64::from(i) * 16, &d);
    }

    /// Writes a raw descriptor (any flags) into queue `q`'s table.
    pub fn raw_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(self.queues[q].desc + u64::from(i) * 16, &d);
    }

    /// Takes free descriptors for a chain of `n`; None if the ring is full.
    pub fn take_descs(&mut self, q: usize, n: usize) -> Option<Vec<u16>> {
        let vq = &mut self.queues[q];
        if vq.free.len() < n {
            return None;
        }
        Some((0..n).map(|_| vq.free.pop().unwrap()).collect())
    }

    /// Puts `bufs` on queue `q` as a plain chain; returns the head.
    pub fn add_chain_with(&mut self, q: usize, ids: Vec<u16>, bufs: &[Buf]) -> u16 {
        let table = self.queues[q].desc;
        for (k, b) in bufs.iter().enumerate() {
            self.write_desc(table, ids[k], *b, ids.get(k + 1).copied());
        }
        let head = ids[0];
        self.queues[q].chains.insert(head, ids);
        self.publish(q, head);
        head
    }

    pub fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> Option<u16> {
        let ids = self.take_descs(q, bufs.len())?;
        Some(self.add_chain_with(q, ids, bufs))
    }

    /// Puts `bufs` on queue `q` through an indirect table at `table`; returns the head.
    pub fn add_indirect(&mut self, q: usize, table: u64, bufs: &[Buf]) -> Option<u16> {
        for (k, b) in bufs.iter().enumerate() {
            let next = (k + 1 < bufs.len()).then_some(k as u16 + 1);
            self.write_desc(table, k as u16, *b, next);
        }
        let ids = self.take_descs(q, 1)?;
        let head = ids[0];
        self.raw_desc(q, head, table, (bufs.len() * 16) as u32, DESC_F_INDIRECT, 0);
        self.queues[q].chains.insert(head, ids);
        self.publish(q, head);
        Some(head)
    }

    /// Makes `head` available without kicking.
    pub fn publish_only(&mut self, q: usize, head: u16) {
        let vq = &self.queues[q];
        let pos = vq.next_avail & (vq.size - 1);
        self.write(vq.avail + 4 + 2 * u64::from(pos), &head.to_le_bytes());
        let next = vq.next_avail.wrapping_add(1);
        self.u16_at(vq.avail + 2).store(next, Ordering::Release);
        self.queues[q].next_avail = next;
    }

    fn publish(&mut self, q: usize, head: u16) {
        let old = self.queues[q].next_avail;
        self.publish_only(q, head);
        self.maybe_kick(q, old);
    }

    /// Kicks if the device asked for it (or always with `always_kick`).
    pub fn maybe_kick(&self, q: usize, old: u16) {
        fence(Ordering::SeqCst);
        let vq = &self.queues[q];
        let wanted = if self.event_idx() {
            let event = self.u16_at(vq.used + avail_event_offset(vq.size)).load(Ordering::Relaxed);
            need_event(event, vq.next_avail, old)
        } else {
            self.u16_at(vq.used).load(Ordering::Relaxed) & USED_F_NO_NOTIFY == 0
        };
        if self.always_kick || wanted {
            self.kick(q);
        }
    }

    pub fn event_idx(&self) -> bool {
        self.offered & self.accept & (1 << crypt_vfio_spec::pci::feature::RING_EVENT_IDX) != 0
    }

    pub fn kick(&self, q: usize) {
        self.dev.bar_write(4, 0x3000 + 4 * q as u64, &(q as u16).to_le_bytes());
    }

    /// Takes one used element of queue `q` if there is one: (head, len).
    pub fn try_used(&mut self, q: usize) -> Option<(u16, u32)> {
        let vq = &self.queues[q];
        let idx = self.u16_at(vq.used + USED_IDX).load(Ordering::Acquire);
        if idx == vq.last_used {
            return None;
        }
        let pos = vq.last_used & (vq.size - 1);
        let e = self.read(vq.used + USED_RING + 8 * u64::from(pos), 8);
        let id = u32::from_le_bytes(e[..4].try_into().unwrap()) as u16;
        let len = u32::from_le_bytes(e[4..].try_into().unwrap());
        let vq = &mut self.queues[q];
        vq.last_used = vq.last_used.wrapping_add(1);
        if let Some(ids) = vq.chains.remove(&id) {
            vq.free.extend(ids);
        } else {
            panic!("device completed head {id} on queue {q}, which was not outstanding");
        }
        // Ask for interrupts right after this element, as a polling driver would not care.
        let ue = used_event_offset(vq.size);
        let last = vq.last_used;
        self.u16_at(self.queues[q].avail + ue).store(last, Ordering::Relaxed);
        Some((id, len))
    }

    pub fn wait_used(&mut self, q: usize) -> (u16, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(u) = self.try_used(q) {
                return u;
            }
            assert!(Instant::now() < deadline, "queue {q}: no completion within 10 s");
            std::thread::yield_now();
        }
    }

    pub fn outstanding(&self, q: usize) -> usize {
        self.queues[q].chains.len()
    }

    // ---- control requests ---------------------------------------------------------------

    /// Sends a control request with `key` and returns the answer bytes (`answer_len` of them).
    pub fn ctrl_raw(&mut self, req: &[u8], key: &[u8], answer_len: usize) -> (Vec<u8>, u32) {
        let q = self.ctrl_queue();
        let ids = self.take_descs(q, 2).unwrap();
        let slot = self.slot(q, ids[0]);
        let mut out = req.to_vec();
        out.extend_from_slice(key);
        self.write(slot, &out);
        let ans = slot + out.len() as u64;
        self.write(ans, &vec![0xee; answer_len]);
        let bufs = [
            Buf { iova: slot, len: out.len() as u32, write: false },
            Buf { iova: ans, len: answer_len as u32, write: true },
        ];
        let head = self.add_chain_with(q, ids, &bufs);
        let (id, len) = self.try_used(q).expect("control requests are answered synchronously");
        assert_eq!(id, head);
        (self.read(ans, answer_len), len)
    }

    pub fn create_cipher(&mut self, algo: u32, key: &[u8], encrypt: bool) -> SessionInput {
        let req = CtrlRequest {
            opcode: op::CIPHER_CREATE_SESSION,
            algo,
            flag: 0,
            queue_id: 0,
            payload: CtrlPayload::CreateCipher {
                algo,
                key_len: key.len() as u32,
                op: if encrypt { session_op::ENCRYPT } else { session_op::DECRYPT },
            },
        };
        let (b, len) = self.ctrl_raw(&req.encode(), key, SESSION_INPUT_SIZE);
        assert_eq!(len, SESSION_INPUT_SIZE as u32);
        SessionInput::decode(&b.try_into().unwrap())
    }

    pub fn create_aead(&mut self, algo: u32, key: &[u8], encrypt: bool, aad_len: u32) -> SessionInput {
        let req = CtrlRequest {
            opcode: op::AEAD_CREATE_SESSION,
            algo,
            flag: 0,
            queue_id: 0,
            payload: CtrlPayload::CreateAead {
                algo,
                key_len: key.len() as u32,
                tag_len: 16,
                aad_len,
                op: if encrypt { session_op::ENCRYPT } else { session_op::DECRYPT },
            },
        };
        let (b, len) = self.ctrl_raw(&req.encode(), key, SESSION_INPUT_SIZE);
        assert_eq!(len, SESSION_INPUT_SIZE as u32);
        SessionInput::decode(&b.try_into().unwrap())
    }

    pub fn destroy(&mut self, session_id: u64, aead: bool) -> u8 {
        let opcode = if aead { op::AEAD_DESTROY_SESSION } else { op::CIPHER_DESTROY_SESSION };
        let req = CtrlRequest {
            opcode,
            algo: 0,
            flag: 0,
            queue_id: 0,
            payload: CtrlPayload::Destroy { session_id },
        };
        let (b, len) = self.ctrl_raw(&req.encode(), &[], 1);
        assert_eq!(len, 1);
        b[0]
    }

    // ---- data requests ------------------------------------------------------------------

    /// Lays a data request out in head's slot as [hdr|iv|src|aad] [dst][status] and makes it
    /// available. Returns the head and the IOVA of dst (the status follows it).
    pub fn submit_data(
        &mut self,
        q: usize,
        hdr: &DataRequest,
        iv: &[u8],
        src: &[u8],
        aad: &[u8],
        dst_len: usize,
    ) -> Option<(u16, u64)> {
        let ids = self.take_descs(q, 3)?;
        let slot = self.slot(q, ids[0]);
        let mut out = hdr.encode().to_vec();
        out.extend_from_slice(iv);
        out.extend_from_slice(src);
        out.extend_from_slice(aad);
        assert!(out.len() + dst_len < self.slot_len, "request does not fit a slot");
        self.write(slot, &out);
        let dst = slot + out.len() as u64;
        self.write(dst, &vec![0xaa; dst_len + 1]);
        let bufs = [
            Buf { iova: slot, len: out.len() as u32, write: false },
            Buf { iova: dst, len: dst_len as u32, write: true },
            Buf { iova: dst + dst_len as u64, len: 1, write: true },
        ];
        Some((self.add_chain_with(q, ids, &bufs), dst))
    }

    /// Runs one data request to completion: (status, used len, dst bytes).
    pub fn run_data(
        &mut self,
        q: usize,
        hdr: &DataRequest,
        iv: &[u8],
        src: &[u8],
        aad: &[u8],
        dst_len: usize,
    ) -> (u8, u32, Vec<u8>) {
        let (head, dst) = self.submit_data(q, hdr, iv, src, aad, dst_len).unwrap();
        let (id, len) = self.wait_used(q);
        assert_eq!(id, head);
        let out = self.read(dst, dst_len + 1);
        (out[dst_len], len, out[..dst_len].to_vec())
    }
}

pub fn cipher_hdr(session: u64, encrypt: bool, algo: u32, iv_len: usize, len: usize) -> DataRequest {
    DataRequest {
        opcode: if encrypt { op::CIPHER_ENCRYPT } else { op::CIPHER_DECRYPT },
        algo,
        session_id: session,
        flag: 0,
        params: DataParams::Cipher { iv_len: iv_len as u32, src_len: len as u32, dst_len: len as u32 },
    }
}

pub fn aead_hdr(session: u64, encrypt: bool, aad_len: usize, src_len: usize, dst_len: usize) -> DataRequest {
    DataRequest {
        opcode: if encrypt { op::AEAD_ENCRYPT } else { op::AEAD_DECRYPT },
        algo: crypt_vfio_spec::crypto::aead::GCM,
        session_id: session,
        flag: 0,
        params: DataParams::Aead {
            iv_len: 12,
            aad_len: aad_len as u32,
            src_len: src_len as u32,
            dst_len: dst_len as u32,
            tag_len: 16,
        },
    }
}

/// Deterministic test bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A non-blocking eventfd standing in for an MSI-X vector's interrupt.
pub struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    pub fn new() -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the result is checked before being owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    pub fn dup(&self) -> std::os::fd::OwnedFd {
        self.0.try_clone().unwrap()
    }

    /// Reads and clears the counter (0 if nothing was signalled).
    pub fn take(&self) -> u64 {
        use std::os::fd::AsRawFd;
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v`.
        let r = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if r == 8 {
            v
        } else {
            0
        }
    }
}

impl Rig {
    /// Reads queue `q`'s used index as the device published it.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.u16_at(self.queues[q].used + USED_IDX).load(Ordering::Acquire)
    }

    /// Takes one used element without any bookkeeping of descriptors: (head, len).
    pub fn harvest_raw(&mut self, q: usize) -> Option<(u16, u32)> {
        let vq = &self.queues[q];
        let idx = self.u16_at(vq.used + USED_IDX).load(Ordering::Acquire);
        if idx == vq.last_used {
            return None;
        }
        let pos = vq.last_used & (vq.size - 1);
        let e = self.read(vq.used + USED_RING + 8 * u64::from(pos), 8);
        let next = vq.last_used.wrapping_add(1);
        self.queues[q].last_used = next;
        Some((
            u32::from_le_bytes(e[..4].try_into().unwrap()) as u16,
            u32::from_le_bytes(e[4..].try_into().unwrap()),
        ))
    }

    /// Waits until `f` holds or `timeout` passes; returns whether it held.
    pub fn wait_for(&self, timeout: Duration, mut f: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f(self) {
                return true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        f(self)
    }
}
