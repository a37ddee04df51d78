//! The device's DMA engine: reading and writing driver memory once the IOMMU has translated it.
//!
//! Two shapes of access exist. A descriptor chain's buffers become a [`SegList`] per direction,
//! a byte stream that may be scattered over many host pieces (and may contain unmapped holes,
//! which the request logic answers with ERR). Ring parts and indirect tables become an
//! [`Area`]: one range accessed by offset many times, resolved once to a host pointer when it
//! lies in one mapping, or accessed through vm-memory when it straddles mappings.
//!
//! Driver memory is shared with a driver that runs concurrently, so ring fields use volatile
//! or atomic accesses; buffer contents are copied with plain memory copies because virtio gives
//! the device ownership of a buffer from the moment it is made available until the used element
//! is published, and a driver breaking that rule can only garble its own data.

use std::ptr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::iommu::Snapshot;

/// One host piece of a buffer; a null `ptr` marks bytes whose IOVA is not mapped.
#[derive(Clone, Copy, Debug)]
struct Seg {
    ptr: *mut u8,
    len: u64,
}

/// The bytes of one direction of a descriptor chain (all readable or all writable buffers), in
/// order, translated to host memory.
pub(crate) struct SegList {
    segs: Vec<Seg>,
    /// The same bytes as IOVA ranges, for writes that happen later through the IOMMU (faults).
    iovas: Vec<(u64, u64)>,
    len: u64,
    unmapped: bool,
    /// Keeps the memory behind every `Seg::ptr` alive while the list is in use.
    snap: Option<Arc<Snapshot>>,
}

impl SegList {
    pub(crate) fn new() -> Self {
        Self {
            segs: Vec::with_capacity(8),
            iovas: Vec::with_capacity(8),
            len: 0,
            unmapped: false,
            snap: None,
        }
    }

    /// Empties the list; buffers added next are translated through `snap`.
    pub(crate) fn begin(&mut self, snap: &Arc<Snapshot>) {
        self.segs.clear();
        self.iovas.clear();
        self.len = 0;
        self.unmapped = false;
        if !self.snap.as_ref().is_some_and(|s| Arc::ptr_eq(s, snap)) {
            self.snap = Some(snap.clone());
        }
    }

    /// Empties the list and lets go of its snapshot.
    pub(crate) fn release(&mut self) {
        self.segs.clear();
        self.iovas.clear();
        self.len = 0;
        self.unmapped = false;
        self.snap = None;
    }

    /// Appends the buffer `iova..iova + len`.
    pub(crate) fn push(&mut self, iova: u64, len: u32) {
        if len == 0 {
            return;
        }
        let len = u64::from(len);
        self.len += len;
        self.iovas.push((iova, len));
        let Some(snap) = &self.snap else {
            self.segs.push(Seg { ptr: ptr::null_mut(), len });
            self.unmapped = true;
            return;
        };
        let segs = &mut self.segs;
        let mapped = match iova.checked_add(len) {
            Some(_) => snap.translate(iova, len, |p, n| segs.push(Seg { ptr: p, len: n })),
            None => {
                segs.push(Seg { ptr: ptr::null_mut(), len });
                false
            }
        };
        self.unmapped |= !mapped;
    }

    /// The buffers as IOVA ranges, in order.
    pub(crate) fn iovas(&self) -> &[(u64, u64)] {
        &self.iovas
    }

    /// Total bytes, mapped or not.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Whether every byte is mapped.
    pub(crate) fn all_mapped(&self) -> bool {
        !self.unmapped
    }

    /// Calls `f(host, n, done)` for each host piece of `off..off + len`, where `done` counts
    /// the bytes before the piece. Returns false (possibly after some calls) if the range goes
    /// past the end or touches unmapped bytes.
    fn for_range(&self, off: u64, len: u64, mut f: impl FnMut(*mut u8, usize, usize)) -> bool {
        let Some(end) = off.checked_add(len) else { return false };
        if end > self.len {
            return false;
        }
        let (mut pos, mut done) = (0u64, 0usize);
        for s in &self.segs {
            if pos >= end {
                break;
            }
            let s_end = pos + s.len;
            if s_end > off {
                if s.ptr.is_null() {
                    return false;
                }
                let from = off.max(pos);
                let n = (end.min(s_end) - from) as usize;
                // SAFETY: `from - pos < s.len`, so the pointer stays inside the mapped piece.
                f(unsafe { s.ptr.add((from - pos) as usize) }, n, done);
                done += n;
            }
            pos = s_end;
        }
        true
    }

    /// Copies bytes `off..off + out.len()` into `out`.
    pub(crate) fn read(&self, off: u64, out: &mut [u8]) -> bool {
        let dst = out.as_mut_ptr();
        self.for_range(off, out.len() as u64, |p, n, done| {
            // SAFETY: `p..p + n` is mapped driver memory (kept alive by `self.snap`) and
            // `done + n <= out.len()`; `out` is local memory, so the two cannot overlap.
            unsafe { ptr::copy_nonoverlapping(p, dst.add(done), n) }
        })
    }

    /// Copies `data` to bytes `off..off + data.len()`.
    pub(crate) fn write(&self, off: u64, data: &[u8]) -> bool {
        self.for_range(off, data.len() as u64, |p, n, done| {
            // SAFETY: as in `read`, with the roles swapped; the device owns writable buffers
            // until it publishes the used element.
            unsafe { ptr::copy_nonoverlapping(data.as_ptr().add(done), p, n) }
        })
    }

    /// The host address of `off..off + len` if it is one mapped piece.
    pub(crate) fn contiguous(&self, off: u64, len: u64) -> Option<*mut u8> {
        let mut pos = 0u64;
        for s in &self.segs {
            if off < pos + s.len {
                let inner = off - pos;
                return (!s.ptr.is_null() && len <= s.len - inner)
                    // SAFETY: `inner < s.len`, inside the piece.
                    .then(|| unsafe { s.ptr.add(inner as usize) });
            }
            pos += s.len;
        }
        None
    }

    /// The host address of the last byte, if there is one and it is mapped: where a request's
    /// status goes.
    pub(crate) fn last_byte(&self) -> Option<*mut u8> {
        let s = self.segs.last()?;
        // SAFETY: pieces are never empty, so `len - 1` is inside the piece.
        (!s.ptr.is_null()).then(|| unsafe { s.ptr.add(s.len as usize - 1) })
    }
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`. The two may overlap in
/// memory (a driver may decrypt in place), so this moves rather than copies.
pub(crate) fn copy(src: &SegList, src_off: u64, dst: &SegList, dst_off: u64, len: u64) -> bool {
    let mut ok = true;
    let all = src.for_range(src_off, len, |sp, n, done| {
        ok &= dst.for_range(dst_off + done as u64, n as u64, |dp, m, inner| {
            // SAFETY: both ranges are mapped driver memory the device may access (see
            // `SegList::write`); `inner + m <= n`, inside the source piece. `ptr::copy`
            // tolerates overlap.
            let from = unsafe { sp.add(inner) };
            // An in-place request (source and destination the same bytes) needs no copy.
            if from != dp {
                // SAFETY: as above.
                unsafe { ptr::copy(from, dp, m) }
            }
        });
    });
    all && ok
}

/// A range of IOVA space the device accesses by offset: a ring part or an indirect table.
///
/// The owner of the [`Snapshot`] it was resolved in must keep that snapshot alive while using
/// the area, and pass it to every access.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Area {
    /// Lies in one mapping, at this host address.
    Direct(*mut u8),
    /// Straddles mappings; accessed through vm-memory at this IOVA.
    Split(u64),
}

impl Area {
    /// Resolves `iova..iova + len` in `snap`, or `None` if some of it is not mapped.
    pub(crate) fn resolve(snap: &Snapshot, iova: u64, len: u64) -> Option<Self> {
        if let Some(p) = snap.contiguous(iova, len) {
            Some(Area::Direct(p))
        } else {
            snap.is_mapped(iova, len).then_some(Area::Split(iova))
        }
    }

    fn addr(iova: u64, off: u64) -> GuestAddress {
        GuestAddress(iova.wrapping_add(off))
    }

    /// Reads `N` bytes at `off`.
    pub(crate) fn read<const N: usize>(&self, mem: &GuestMemoryMmap, off: u64) -> Option<[u8; N]> {
        match *self {
            // SAFETY: callers only pass offsets inside the resolved range, whose memory the
            // snapshot keeps alive; a byte array has no alignment requirement.
            Area::Direct(p) => Some(unsafe { ptr::read_volatile(p.add(off as usize) as *const [u8; N]) }),
            Area::Split(iova) => {
                let mut b = [0u8; N];
                mem.read_slice(&mut b, Self::addr(iova, off)).ok().map(|_| b)
            }
        }
    }

    /// Writes `data` at `off`.
    pub(crate) fn write<const N: usize>(&self, mem: &GuestMemoryMmap, off: u64, data: [u8; N]) -> bool {
        match *self {
            Area::Direct(p) => {
                // SAFETY: as in `read`; the device owns the used ring it writes to.
                unsafe { ptr::write_volatile(p.add(off as usize) as *mut [u8; N], data) };
                true
            }
            Area::Split(iova) => mem.write_slice(&data, Self::addr(iova, off)).is_ok(),
        }
    }

    /// Loads the little-endian `u16` at `off` (2-byte aligned) with `order`.
    pub(crate) fn load_u16(&self, mem: &GuestMemoryMmap, off: u64, order: Ordering) -> Option<u16> {
        match *self {
            Area::Direct(p) => {
                // SAFETY: ring parts are checked to be 2-byte aligned and `off` is even and
                // inside the range, so this is a valid, aligned u16 that lives as long as the
                // snapshot; the driver accesses it concurrently, hence the atomic.
                let a = unsafe { AtomicU16::from_ptr(p.add(off as usize) as *mut u16) };
                Some(u16::from_le(a.load(order)))
            }
            Area::Split(iova) => mem.load::<u16>(Self::addr(iova, off), order).ok().map(u16::from_le),
        }
    }

    /// Stores the little-endian `u16` at `off` (2-byte aligned) with `order`.
    pub(crate) fn store_u16(&self, mem: &GuestMemoryMmap, off: u64, v: u16, order: Ordering) -> bool {
        match *self {
            Area::Direct(p) => {
                // SAFETY: as in `load_u16`.
                let a = unsafe { AtomicU16::from_ptr(p.add(off as usize) as *mut u16) };
                a.store(v.to_le(), order);
                true
            }
            Area::Split(iova) => mem.store(v.to_le(), Self::addr(iova, off), order).is_ok(),
        }
    }
}
