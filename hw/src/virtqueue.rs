//! The device side of a split virtqueue (virtio 1.2 section 2.7): taking heads from the
//! available ring, publishing used elements, and both directions of notification suppression.
//!
//! The ring's three parts are resolved through the IOMMU once, when the queue is first used
//! after DRIVER_OK (and again only if the mappings change), so the per-request path touches
//! host pointers directly. Everything read from the ring is untrusted: an index that jumps by
//! more than the queue size is a [`RingFault`], never a panic.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crypt_vfio_spec::le::{u16_at, u32_at, u64_at};
use crypt_vfio_spec::ring::{
    avail_event_offset, avail_ring_size, desc_table_size, need_event, used_event_offset, used_ring_size,
    AVAIL_FLAGS, AVAIL_F_NO_INTERRUPT, AVAIL_IDX, AVAIL_RING, DESC_ADDR, DESC_FLAGS, DESC_LEN, DESC_NEXT,
    DESC_SIZE, USED_ELEM_SIZE, USED_FLAGS, USED_F_NO_NOTIFY, USED_IDX, USED_RING,
};

use crate::dma::Area;
use crate::iommu::{Iommu, Snapshot};

/// Why the device stopped a queue: the driver put something on it that no correct driver
/// would, or made part of it unreadable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingFault(pub &'static str);

/// Where the driver placed a queue, as written to the common configuration.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RingLayout {
    pub size: u16,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// A descriptor as read from a table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub(crate) fn decode(b: [u8; DESC_SIZE as usize]) -> Self {
        Self {
            addr: u64_at(&b, DESC_ADDR as usize),
            len: u32_at(&b, DESC_LEN as usize),
            flags: u16_at(&b, DESC_FLAGS as usize),
            next: u16_at(&b, DESC_NEXT as usize),
        }
    }
}

/// A queue's ring parts resolved to host memory in one IOMMU snapshot.
pub(crate) struct RingMem {
    snap: Arc<Snapshot>,
    pub size: u16,
    desc: Area,
    avail: Area,
    used: Area,
}

// SAFETY: the raw pointers inside the `Area`s point into memory kept alive by `snap`, and every
// access through them is volatile or atomic (the memory is shared with the driver anyway).
unsafe impl Send for RingMem {}
// SAFETY: see `Send`; `RingMem` has no interior mutability of its own.
unsafe impl Sync for RingMem {}

impl RingMem {
    fn resolve(snap: Arc<Snapshot>, l: &RingLayout) -> Result<Self, RingFault> {
        if l.desc % 16 != 0 || l.driver % 2 != 0 || l.device % 4 != 0 {
            return Err(RingFault("ring parts are not aligned (descriptors 16, driver 2, device 4)"));
        }
        let area = |iova, len, what| Area::resolve(&snap, iova, len).ok_or(RingFault(what));
        let desc = area(l.desc, desc_table_size(l.size), "descriptor table not mapped")?;
        let avail = area(l.driver, avail_ring_size(l.size), "available ring not mapped")?;
        let used = area(l.device, used_ring_size(l.size), "used ring not mapped")?;
        Ok(Self { size: l.size, desc, avail, used, snap })
    }

    /// Reads descriptor `i` of the main table (`i < size`).
    pub(crate) fn desc(&self, i: u16) -> Result<Desc, RingFault> {
        self.desc
            .read::<16>(&self.snap.mem, u64::from(i) * DESC_SIZE)
            .map(Desc::decode)
            .ok_or(RingFault("descriptor table unreadable"))
    }

    fn avail_u16(&self, off: u64, order: Ordering) -> Result<u16, RingFault> {
        self.avail.load_u16(&self.snap.mem, off, order).ok_or(RingFault("available ring unreadable"))
    }

    fn used_u16(&self, off: u64, v: u16, order: Ordering) -> Result<(), RingFault> {
        self.used
            .store_u16(&self.snap.mem, off, v, order)
            .then_some(())
            .ok_or(RingFault("used ring unwritable"))
    }
}

/// The device's state of one enabled queue.
pub(crate) struct Ring {
    pub layout: RingLayout,
    pub event_idx: bool,
    pub indirect: bool,
    mem: Option<Arc<RingMem>>,
    mem_generation: u64,
    last_avail: u16,
    next_used: u16,
    notify_enabled: bool,
    /// Set when the queue hit a [`RingFault`]; a broken queue is left alone until reset.
    pub broken: bool,
}

impl Ring {
    pub(crate) fn new(layout: RingLayout, event_idx: bool, indirect: bool) -> Self {
        Self {
            layout,
            event_idx,
            indirect,
            mem: None,
            mem_generation: 0,
            last_avail: 0,
            next_used: 0,
            notify_enabled: true,
            broken: false,
        }
    }

    /// The ring's memory in the current IOMMU mappings, resolving it on first use and after
    /// any map or unmap (a ring the driver unmapped under the device is a fault).
    pub(crate) fn mem(&mut self, iommu: &Iommu) -> Result<Arc<RingMem>, RingFault> {
        let generation = iommu.generation();
        match &self.mem {
            Some(m) if self.mem_generation == generation => Ok(m.clone()),
            _ => {
                let first = self.mem.is_none();
                let m = Arc::new(RingMem::resolve(iommu.snapshot(), &self.layout)?);
                if first {
                    // The device owns the used ring: start it from a known state, with
                    // notifications enabled (avail_event 0 asks for a kick on the first buffer).
                    m.used_u16(USED_FLAGS, 0, Ordering::Relaxed)?;
                    m.used_u16(USED_IDX, 0, Ordering::Release)?;
                    m.used_u16(avail_event_offset(self.layout.size), 0, Ordering::Release)?;
                }
                self.mem_generation = m.snap.generation;
                self.mem = Some(m.clone());
                Ok(m)
            }
        }
    }

    /// Takes up to `out.len()` new heads from the available ring. The heads are untrusted
    /// indices; the chain walker checks them.
    pub(crate) fn pop(&mut self, mem: &RingMem, out: &mut [u16]) -> Result<usize, RingFault> {
        let idx = mem.avail_u16(AVAIL_IDX, Ordering::Acquire)?;
        let pending = idx.wrapping_sub(self.last_avail);
        if pending > self.layout.size {
            return Err(RingFault("available index moved by more than the queue size"));
        }
        let n = usize::from(pending).min(out.len());
        let mask = self.layout.size - 1;
        for (k, slot) in out[..n].iter_mut().enumerate() {
            let pos = self.last_avail.wrapping_add(k as u16) & mask;
            *slot = mem.avail_u16(AVAIL_RING + 2 * u64::from(pos), Ordering::Relaxed)?;
        }
        self.last_avail = self.last_avail.wrapping_add(n as u16);
        Ok(n)
    }

    /// Whether the driver made buffers available that the device has not taken yet.
    pub(crate) fn has_work(&self, mem: &RingMem) -> Result<bool, RingFault> {
        Ok(mem.avail_u16(AVAIL_IDX, Ordering::Acquire)? != self.last_avail)
    }

    /// Writes one used element; it becomes visible to the driver at [`Ring::publish`].
    pub(crate) fn push(&mut self, mem: &RingMem, head: u16, written: u32) -> Result<(), RingFault> {
        let pos = self.next_used & (self.layout.size - 1);
        let mut elem = [0u8; USED_ELEM_SIZE as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&written.to_le_bytes());
        if !mem.used.write(&mem.snap.mem, USED_RING + USED_ELEM_SIZE * u64::from(pos), elem) {
            return Err(RingFault("used ring unwritable"));
        }
        self.next_used = self.next_used.wrapping_add(1);
        Ok(())
    }

    /// Advances the used index past an element that was never written (a fault: the driver
    /// sees one more used element than the device completed).
    pub(crate) fn skip(&mut self) {
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// The used index as the device will publish it next.
    pub(crate) fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Publishes the used elements pushed since the used index was `old`, and says whether the
    /// driver asked to be interrupted for them.
    pub(crate) fn publish(&mut self, mem: &RingMem, old: u16) -> Result<bool, RingFault> {
        if old == self.next_used {
            return Ok(false);
        }
        mem.used_u16(USED_IDX, self.next_used, Ordering::Release)?;
        // The driver writes used_event (or the flag) and then reads the used index; the device
        // writes the used index and then reads used_event. Without a full fence both could read
        // the old value and the interrupt would be lost.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = mem.avail_u16(used_event_offset(self.layout.size), Ordering::Relaxed)?;
            Ok(need_event(event, self.next_used, old))
        } else {
            Ok(mem.avail_u16(AVAIL_FLAGS, Ordering::Relaxed)? & AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Asks the driver to kick again for new buffers: done before a worker sleeps.
    pub(crate) fn enable_notifications(&mut self, mem: &RingMem) -> Result<(), RingFault> {
        if self.event_idx {
            mem.used_u16(avail_event_offset(self.layout.size), self.last_avail, Ordering::Relaxed)?;
        } else {
            mem.used_u16(USED_FLAGS, 0, Ordering::Relaxed)?;
        }
        self.notify_enabled = true;
        Ok(())
    }

    /// Tells the driver kicks are not needed while a worker polls the ring. With EVENT_IDX the
    /// stale `avail_event` already does that, so nothing is written.
    pub(crate) fn disable_notifications(&mut self, mem: &RingMem) -> Result<(), RingFault> {
        if self.notify_enabled {
            if !self.event_idx {
                mem.used_u16(USED_FLAGS, USED_F_NO_NOTIFY, Ordering::Relaxed)?;
            }
            self.notify_enabled = false;
        }
        Ok(())
    }
}
