//! The driver side of a split virtqueue (virtio 1.2 section 2.7).
//!
//! The driver owns the descriptor table and the available ring, the device owns the used ring.
//! All three live in DMA memory the device reads and writes concurrently, so every access is
//! volatile or atomic, and the orderings follow the spec: descriptors before the available index
//! (release), the available index before reading the device's notification hint (full fence), the
//! used index before the used elements (acquire). Nothing read from the used ring is trusted here;
//! the caller checks ids and lengths against what it has in flight.

use std::sync::atomic::{fence, Ordering};

use crypt_vfio_spec::ring;
use vm_memory::Bytes;

use super::Doorbell;
use crate::dma::{DmaBuffer, DmaPool};
use crate::error::{DeviceError, Error, Result, VfioError};

/// One split virtqueue's rings and indices.
pub struct SplitQueue {
    mem: DmaBuffer,
    size: u16,
    avail_off: usize,
    used_off: usize,
    event_idx: bool,
    /// Next available index to publish (driver's shadow copy).
    avail_idx: u16,
    /// Available index the device was last told about (published).
    published: u16,
    /// Next used element to read.
    last_used: u16,
    doorbell: Doorbell,
}

/// A used element as the device wrote it: not yet validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index the device claims to have used.
    pub id: u32,
    /// Bytes the device claims to have written.
    pub len: u32,
}

impl SplitQueue {
    /// Allocates rings for a queue of `size` entries (a power of two).
    pub fn new(
        pool: &DmaPool,
        size: u16,
        event_idx: bool,
        doorbell_for: impl FnOnce([u64; 3]) -> Result<Doorbell>,
    ) -> Result<Self> {
        if !size.is_power_of_two() || size > ring::MAX_QUEUE_SIZE {
            return Err(Error::Device(DeviceError::Init(format!(
                "queue size {size} is not a power of two up to 32768"
            ))));
        }
        let desc_len = ring::desc_table_size(size) as usize;
        let avail_off = desc_len;
        // The used ring gets its own cache lines: the device writes it while the driver writes
        // the available ring.
        let used_off = (avail_off + ring::avail_ring_size(size) as usize).next_multiple_of(64);
        let total = used_off + ring::used_ring_size(size) as usize;
        let mem = pool.alloc(total)?;
        let iova = mem.iova();
        let doorbell = doorbell_for([iova, iova + avail_off as u64, iova + used_off as u64])?;
        Ok(Self {
            mem,
            size,
            avail_off,
            used_off,
            event_idx,
            avail_idx: 0,
            published: 0,
            last_used: 0,
            doorbell,
        })
    }

    /// Starts the queue over on a device that was reset: rings zeroed, indices back to 0, and
    /// the rings handed to the device again through `doorbell_for`. The device must not be
    /// using the rings (it was reset).
    pub fn restart(&mut self, doorbell_for: impl FnOnce([u64; 3]) -> Result<Doorbell>) -> Result<()> {
        let len = self.mem.len();
        let zeros = vec![0u8; len];
        self.mem.volatile().write_slice(&zeros, 0).map_err(|e| Error::Vfio(VfioError::Dma(e.to_string())))?;
        self.avail_idx = 0;
        self.published = 0;
        self.last_used = 0;
        let iova = self.mem.iova();
        self.doorbell = doorbell_for([iova, iova + self.avail_off as u64, iova + self.used_off as u64])?;
        Ok(())
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `index` of the table.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_descs(index, &encode_desc(addr, len, flags, next));
    }

    /// Makes descriptor `index` say what is given, storing only if the table says something
    /// else. A slot's head descriptor (its indirect table) is the same for every request of
    /// one shape, and a store to a line the device has read takes that line from the device's
    /// cache (the next read of it misses on the other core), where a load leaves it shared: the
    /// store was 15 % of the submitting thread at 64-byte requests. The table is read back, not
    /// a copy of it kept, so a device that scribbled on it gets it rewritten.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let want = encode_desc(addr, len, flags, next);
        let off = usize::from(index % self.size) * ring::DESC_SIZE as usize;
        update_descs(&self.mem, off, &want);
    }

    /// Writes encoded descriptors into the table from `first` on; they must not wrap past the
    /// end of the table.
    pub fn write_descs(&self, first: u16, descs: &[u8]) {
        debug_assert!(usize::from(first % self.size) * 16 + descs.len() <= usize::from(self.size) * 16);
        write_descs(&self.mem, usize::from(first % self.size) * ring::DESC_SIZE as usize, descs);
    }

    /// Queues head `head` in the available ring; it becomes visible at [`publish`](Self::publish).
    /// The entry is stored only if it holds another head (a lap of the ring that placed the same
    /// head at the same position, as the control queue always does): a load leaves the line in
    /// the device's cache (see [`set_desc`](Self::set_desc)).
    pub fn push_avail(&mut self, head: u16) {
        let slot = self.avail_off + ring::AVAIL_RING as usize + 2 * usize::from(self.avail_idx % self.size);
        if self.load16(slot, Ordering::Relaxed) != head {
            self.store16(slot, head, Ordering::Relaxed);
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes every pushed head visible to the device and rings the doorbell if the device asked
    /// to be told. Returns whether it rang.
    pub fn publish(&mut self) -> bool {
        if self.avail_idx == self.published {
            return false;
        }
        let old = self.published;
        let new = self.avail_idx;
        self.store16(self.avail_off + ring::AVAIL_IDX as usize, new, Ordering::Release);
        self.published = new;
        // The device may be deciding to sleep right now: order our index store before reading its
        // notification hint, or both sides could miss each other.
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            let event =
                self.load16(self.used_off + ring::avail_event_offset(self.size) as usize, Ordering::Relaxed);
            ring::need_event(event, new, old)
        } else {
            self.load16(self.used_off + ring::USED_FLAGS as usize, Ordering::Relaxed) & ring::USED_F_NO_NOTIFY
                == 0
        };
        if notify {
            self.doorbell.ring();
        }
        notify
    }

    /// Used elements the device has published and the driver not yet taken. May exceed what is
    /// in flight if the device misbehaves; the caller checks.
    pub fn used_pending(&self) -> u16 {
        let idx = self.load16(self.used_off + ring::USED_IDX as usize, Ordering::Acquire);
        idx.wrapping_sub(self.last_used)
    }

    /// Takes the next used element; call only while [`used_pending`](Self::used_pending) is
    /// non-zero (the acquire there orders this read).
    pub fn take_used(&mut self) -> UsedElem {
        let off = self.used_off
            + ring::USED_RING as usize
            + ring::USED_ELEM_SIZE as usize * usize::from(self.last_used % self.size);
        let v = self.mem.volatile();
        let id = v.read_obj::<u32>(off).unwrap_or(u32::MAX);
        let len = v.read_obj::<u32>(off + 4).unwrap_or(0);
        self.last_used = self.last_used.wrapping_add(1);
        UsedElem { id: u32::from_le(id), len: u32::from_le(len) }
    }

    /// Asks for an interrupt once `count` more elements are used (EVENT_IDX), or for every
    /// completion without it. `count == 0` asks for none.
    pub fn request_interrupt_after(&self, count: u16) {
        if self.event_idx {
            // With EVENT_IDX the device interrupts when used idx passes used_event.
            let event = if count == 0 {
                self.last_used.wrapping_sub(1)
            } else {
                self.last_used.wrapping_add(count - 1)
            };
            self.store16(
                self.avail_off + ring::used_event_offset(self.size) as usize,
                event,
                Ordering::Relaxed,
            );
        } else {
            let flags = if count == 0 { ring::AVAIL_F_NO_INTERRUPT } else { 0 };
            self.store16(self.avail_off + ring::AVAIL_FLAGS as usize, flags, Ordering::Relaxed);
        }
        // The request must be visible before the driver re-checks the used index.
        fence(Ordering::SeqCst);
    }

    fn store16(&self, off: usize, v: u16, order: Ordering) {
        // Offsets are computed from the queue size the ring was allocated for, so they are in
        // bounds; an error would be a bug here, not device input.
        let r = self.mem.volatile().store(v.to_le(), off, order);
        debug_assert!(r.is_ok());
    }

    fn load16(&self, off: usize, order: Ordering) -> u16 {
        u16::from_le(self.mem.volatile().load::<u16>(off, order).unwrap_or(0))
    }
}

/// Encodes one descriptor (`struct virtq_desc`).
pub fn encode_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; ring::DESC_SIZE as usize] {
    let mut d = [0u8; ring::DESC_SIZE as usize];
    d[ring::DESC_ADDR as usize..][..8].copy_from_slice(&addr.to_le_bytes());
    d[ring::DESC_LEN as usize..][..4].copy_from_slice(&len.to_le_bytes());
    d[ring::DESC_FLAGS as usize..][..2].copy_from_slice(&flags.to_le_bytes());
    d[ring::DESC_NEXT as usize..][..2].copy_from_slice(&next.to_le_bytes());
    d
}

/// Writes encoded descriptors at byte offset `off` of `table` (a ring or an indirect table) in
/// one volatile copy.
pub fn write_descs(table: &DmaBuffer, off: usize, descs: &[u8]) {
    let r = table.volatile().write_slice(descs, off);
    debug_assert!(r.is_ok(), "descriptor write out of bounds");
}

/// [`write_descs`], skipped when `table` already holds exactly `descs` (a slot's indirect table
/// for a request of the same shape on the same buffer): see [`SplitQueue::set_desc`] for why
/// a store the device would notice is worth a load.
pub fn update_descs(table: &DmaBuffer, off: usize, descs: &[u8]) {
    let mut have = [0u8; 8 * ring::DESC_SIZE as usize];
    let have = &mut have[..descs.len().min(8 * ring::DESC_SIZE as usize)];
    if have.len() < descs.len() || table.volatile().read_slice(have, off).is_err() || have != descs {
        write_descs(table, off, descs);
    }
}
