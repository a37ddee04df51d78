//! Walking a descriptor chain (plain or through an indirect table) into the readable and
//! writable byte streams of one request.
//!
//! Every field comes from driver memory and is untrusted. Malformed chains (an index out of
//! range, a loop, a nested or misaligned indirect table, a readable buffer after a writable
//! one) are [`RingFault`]s that stop the queue; buffers that are merely unmapped are recorded
//! as holes for the request logic to answer with ERR, as an IOMMU fault on a data transfer
//! would make a real device fail that one request.

use std::sync::Arc;

use crypt_vfio_spec::ring::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE, MAX_QUEUE_SIZE};

use crate::dma::{Area, SegList};
use crate::iommu::Snapshot;
use crate::virtqueue::{Desc, RingFault, RingMem};

/// The two directions of one request.
pub(crate) struct Chain {
    /// Device-readable bytes (the request header, IV, source, AAD).
    pub readable: SegList,
    /// Device-writable bytes (the destination, then the status).
    pub writable: SegList,
}

impl Chain {
    pub(crate) fn new() -> Self {
        Self { readable: SegList::new(), writable: SegList::new() }
    }

    /// Drops the translations of the last chain (and the mappings they kept alive).
    pub(crate) fn release(&mut self) {
        self.readable.release();
        self.writable.release();
    }

    /// Reads the chain starting at `head` from `ring`, translating buffers through `snap`.
    pub(crate) fn walk(
        &mut self,
        ring: &RingMem,
        snap: &Arc<Snapshot>,
        indirect_ok: bool,
        head: u16,
    ) -> Result<(), RingFault> {
        self.readable.begin(snap);
        self.writable.begin(snap);
        if head >= ring.size {
            return Err(RingFault("descriptor index out of range"));
        }
        let mut seen_write = false;
        let mut d = ring.desc(head)?;
        let mut count: u32 = 1;
        loop {
            if d.flags & DESC_F_INDIRECT != 0 {
                if !indirect_ok {
                    return Err(RingFault("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC"));
                }
                if d.flags & DESC_F_NEXT != 0 {
                    return Err(RingFault("indirect descriptor with NEXT set"));
                }
                return self.walk_indirect(snap, d, seen_write);
            }
            self.add(d, &mut seen_write)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            if d.next >= ring.size {
                return Err(RingFault("descriptor index out of range"));
            }
            count += 1;
            if count > u32::from(ring.size) {
                return Err(RingFault("descriptor chain loops or is longer than the queue"));
            }
            d = ring.desc(d.next)?;
        }
    }

    fn walk_indirect(&mut self, snap: &Snapshot, table: Desc, mut seen_write: bool) -> Result<(), RingFault> {
        if table.len == 0 || u64::from(table.len) % DESC_SIZE != 0 {
            return Err(RingFault("indirect table length is not a positive multiple of 16"));
        }
        let entries = u64::from(table.len) / DESC_SIZE;
        if entries > u64::from(MAX_QUEUE_SIZE) {
            return Err(RingFault("indirect table has more than 32768 entries"));
        }
        let area = Area::resolve(snap, table.addr, u64::from(table.len))
            .ok_or(RingFault("indirect table not mapped"))?;
        let read = |i: u64| {
            area.read::<16>(&snap.mem, i * DESC_SIZE)
                .map(Desc::decode)
                .ok_or(RingFault("indirect table unreadable"))
        };
        let mut d = read(0)?;
        let mut count = 1u64;
        loop {
            if d.flags & DESC_F_INDIRECT != 0 {
                return Err(RingFault("nested indirect table"));
            }
            self.add(d, &mut seen_write)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            if u64::from(d.next) >= entries {
                return Err(RingFault("indirect descriptor index out of range"));
            }
            count += 1;
            if count > entries {
                return Err(RingFault("indirect chain loops"));
            }
            d = read(u64::from(d.next))?;
        }
    }

    fn add(&mut self, d: Desc, seen_write: &mut bool) -> Result<(), RingFault> {
        if d.flags & DESC_F_WRITE != 0 {
            *seen_write = true;
            self.writable.push(d.addr, d.len);
        } else if *seen_write {
            return Err(RingFault("device-readable descriptor after a device-writable one"));
        } else {
            self.readable.push(d.addr, d.len);
        }
        Ok(())
    }
}
