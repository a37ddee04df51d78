//! The device's IOMMU: which IOVA ranges the driver has mapped, and to which host memory.
//!
//! Every address the driver hands the device (ring areas, descriptor buffers, indirect tables)
//! is an IOVA and goes through here, so a driver that forgets to map a buffer is caught the way
//! a real IOMMU would catch it, instead of the model silently reading process memory.
//!
//! The map of record is a `vm-memory` [`GuestMemoryMmap`] whose "guest addresses" are IOVAs.
//! Maps and unmaps are rare and publish a new immutable [`Snapshot`]; workers keep an `Arc` of
//! the snapshot they use and pick up a new one when the generation counter moves. That `Arc`
//! is also what keeps unmapped memory alive while a worker may still touch it: each snapshot
//! holds the owners the driver passed to [`Iommu::map`].

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion,
};

use crate::error::HwError;

/// Granularity of IOMMU mappings, as with VFIO type1 on x86.
const PAGE_SIZE: u64 = 4096;

/// A contiguous piece of IOVA space backed by one host mapping.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    iova: u64,
    len: u64,
    host: *mut u8,
}

/// An immutable view of the IOMMU mappings at one point in time.
pub(crate) struct Snapshot {
    /// The mappings, for accesses that vm-memory splits across regions.
    pub(crate) mem: GuestMemoryMmap,
    /// The same mappings as plain host spans sorted by IOVA, resolved once so that per-request
    /// translation is a short binary search instead of a region walk.
    spans: Vec<Span>,
    /// Keep the mapped memory alive for as long as anyone holds this snapshot.
    owners: Vec<(u64, Arc<dyn Any + Send + Sync>)>,
    pub(crate) generation: u64,
}

// SAFETY: the raw pointers in `spans` point into memory kept alive by `owners`, which are
// `Send + Sync`; the snapshot itself is never mutated after construction, and every access
// through the pointers is done by code that treats the memory as shared with the driver
// (volatile or atomic accesses, or copies into buffers the driver handed to the device).
unsafe impl Send for Snapshot {}
// SAFETY: as for `Send`: the snapshot is immutable and the pointed-to memory outlives it.
unsafe impl Sync for Snapshot {}

impl Snapshot {
    fn empty() -> Self {
        Self { mem: GuestMemoryMmap::new(), spans: Vec::new(), owners: Vec::new(), generation: 0 }
    }

    /// The host address of `iova..iova + len` if the whole range lies in one mapping.
    pub(crate) fn contiguous(&self, iova: u64, len: u64) -> Option<*mut u8> {
        let s = self.span_at(iova)?;
        let off = iova - s.iova;
        if len > s.len - off {
            return None;
        }
        // SAFETY: `off < s.len`, so the result stays inside the mapping `s` describes.
        Some(unsafe { s.host.add(off as usize) })
    }

    /// Splits `iova..iova + len` into host pieces, calling `f(host, len)` for each mapped piece
    /// and `f(null, rest)` once for the remainder if the range runs into unmapped space.
    /// Returns whether all of it was mapped.
    pub(crate) fn translate(&self, mut iova: u64, mut len: u64, mut f: impl FnMut(*mut u8, u64)) -> bool {
        while len > 0 {
            let Some(s) = self.span_at(iova) else {
                f(std::ptr::null_mut(), len);
                return false;
            };
            let off = iova - s.iova;
            let n = len.min(s.len - off);
            // SAFETY: `off < s.len`, inside the mapping.
            f(unsafe { s.host.add(off as usize) }, n);
            // Cannot overflow: a mapping ends at most at u64::MAX (checked when it was made).
            iova += n;
            len -= n;
        }
        true
    }

    /// Whether every byte of `iova..iova + len` is mapped.
    pub(crate) fn is_mapped(&self, iova: u64, len: u64) -> bool {
        iova.checked_add(len).is_some() && self.translate(iova, len, |_, _| {})
    }

    fn span_at(&self, iova: u64) -> Option<&Span> {
        let i = self.spans.partition_point(|s| s.iova <= iova);
        let s = self.spans.get(i.checked_sub(1)?)?;
        (iova - s.iova < s.len).then_some(s)
    }

    /// Builds the snapshot that follows `self` with `mem` and `owners` as the new mappings.
    fn successor(
        &self,
        mem: GuestMemoryMmap,
        owners: Vec<(u64, Arc<dyn Any + Send + Sync>)>,
    ) -> Result<Self, HwError> {
        let mut spans = Vec::with_capacity(mem.num_regions());
        for r in mem.iter() {
            let len = r.len();
            let slice = r
                .get_slice(MemoryRegionAddress(0), len as usize)
                .map_err(|_| HwError::BadMapping { iova: r.start_addr().0, host: 0, len })?;
            spans.push(Span { iova: r.start_addr().0, len, host: slice.ptr_guard_mut().as_ptr() });
        }
        Ok(Self { mem, spans, owners, generation: self.generation + 1 })
    }
}

/// The IOMMU of the emulated function.
pub(crate) struct Iommu {
    current: Mutex<Arc<Snapshot>>,
    generation: AtomicU64,
}

impl Iommu {
    pub(crate) fn new() -> Self {
        Self { current: Mutex::new(Arc::new(Snapshot::empty())), generation: AtomicU64::new(0) }
    }

    /// The current mappings.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The generation of the current mappings; it changes on every map and unmap.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Replaces `snap` with the current snapshot if the mappings changed since it was taken.
    pub(crate) fn refresh(&self, snap: &mut Arc<Snapshot>) {
        if snap.generation != self.generation() {
            *snap = self.snapshot();
        }
    }

    /// Maps `host..host + len` at `iova`.
    ///
    /// # Safety
    /// `host..host + len` must be readable and writable memory for as long as `owner` lives.
    pub(crate) unsafe fn map(
        &self,
        iova: u64,
        host: *mut u8,
        len: usize,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<(), HwError> {
        let len64 = len as u64;
        let bad = HwError::BadMapping { iova, host: host as usize, len: len64 };
        if len == 0
            || host.is_null()
            || iova % PAGE_SIZE != 0
            || (host as usize as u64) % PAGE_SIZE != 0
            || iova.checked_add(len64).is_none()
        {
            return Err(bad);
        }
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let end = iova + len64;
        if cur.spans.iter().any(|s| s.iova < end && iova < s.iova + s.len) {
            return Err(HwError::Overlap { iova, len: len64 });
        }
        // SAFETY: the caller guarantees the range is valid, readable and writable memory while
        // `owner` lives, and the snapshot built below holds `owner` alongside the region.
        let region = unsafe {
            MmapRegion::<()>::build_raw(host, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED)
        }
        .map_err(|_| HwError::BadMapping { iova, host: host as usize, len: len64 })?;
        let region = GuestRegionMmap::new(region, GuestAddress(iova)).ok_or(bad)?;
        let mem =
            cur.mem.insert_region(Arc::new(region)).map_err(|_| HwError::Overlap { iova, len: len64 })?;
        let mut owners = cur.owners.clone();
        owners.push((iova, owner));
        let next = cur.successor(mem, owners)?;
        self.publish(&mut cur, next);
        log::debug!("IOMMU: mapped {iova:#x}+{len64:#x}");
        Ok(())
    }

    /// Removes the mapping that is exactly `iova..iova + len`.
    pub(crate) fn unmap(&self, iova: u64, len: u64) -> Result<(), HwError> {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let (mem, _) =
            cur.mem.remove_region(GuestAddress(iova), len).map_err(|_| HwError::NotMapped { iova, len })?;
        let owners = cur.owners.iter().filter(|(a, _)| *a != iova).cloned().collect();
        let next = cur.successor(mem, owners)?;
        self.publish(&mut cur, next);
        log::debug!("IOMMU: unmapped {iova:#x}+{len:#x}");
        Ok(())
    }

    fn publish(&self, cur: &mut Arc<Snapshot>, next: Snapshot) {
        let generation = next.generation;
        *cur = Arc::new(next);
        self.generation.store(generation, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_buf(pages: usize) -> (Arc<Vec<u8>>, *mut u8) {
        // Over-allocate so that a page-aligned window exists; the Vec is never resized.
        let mut v = vec![0u8; (pages + 1) * PAGE_SIZE as usize];
        let p = v.as_mut_ptr();
        let aligned = p.wrapping_add(p.align_offset(PAGE_SIZE as usize));
        (Arc::new(v), aligned)
    }

    #[test]
    fn map_translate_unmap() {
        let iommu = Iommu::new();
        let (a, pa) = page_buf(2);
        let (b, pb) = page_buf(1);
        // SAFETY: the windows lie inside the Vecs, which the owners keep alive.
        unsafe {
            iommu.map(0x10000, pa, 0x2000, a.clone()).unwrap();
            iommu.map(0x12000, pb, 0x1000, b.clone()).unwrap();
            assert!(matches!(iommu.map(0x11000, pb, 0x1000, b.clone()), Err(HwError::Overlap { .. })));
            assert!(matches!(iommu.map(0x20001, pb, 0x1000, b.clone()), Err(HwError::BadMapping { .. })));
        }
        let s = iommu.snapshot();
        assert_eq!(s.contiguous(0x10010, 0x100), Some(pa.wrapping_add(0x10)));
        assert_eq!(s.contiguous(0x11f00, 0x200), None, "spans two mappings");
        let mut pieces = Vec::new();
        assert!(s.translate(0x11f00, 0x200, |p, n| pieces.push((p, n))));
        assert_eq!(pieces, vec![(pa.wrapping_add(0x1f00), 0x100), (pb, 0x100)]);
        assert!(!s.is_mapped(0x12f00, 0x200));
        assert!(!s.is_mapped(u64::MAX - 4, 0x10));
        assert!(iommu.unmap(0x10000, 0x1000).is_err(), "only exact regions");
        iommu.unmap(0x12000, 0x1000).unwrap();
        assert!(s.is_mapped(0x12000, 0x10), "old snapshots keep their view");
        assert!(!iommu.snapshot().is_mapped(0x12000, 0x10));
        assert_ne!(iommu.generation(), s.generation);
    }
}
