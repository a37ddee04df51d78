//! The pool of device-visible memory and the buffers carved from it.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{
    AtomicAccess, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
    ReadVolatile, VolatileSlice, WriteVolatile,
};

use super::region::{DmaRegion, REGION_SIZE};
use super::IovaAllocator;
use crate::error::{Error, Result, VfioError};
use crate::transport::Transport;

/// Smallest buffer handed out (a cache line, so buffers never share one).
const MIN_CLASS_SHIFT: u32 = 6;
/// Largest buffer carved from a shared region; larger ones get a region of their own.
const MAX_CLASS_SHIFT: u32 = REGION_SIZE.trailing_zeros();
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

/// Memory the device can reach, addressed by IOVA.
///
/// Cloning is cheap and shares the pool. Regions stay mapped until the pool and every buffer
/// taken from it are gone.
#[derive(Clone)]
pub struct DmaPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    transport: Arc<dyn Transport>,
    state: Mutex<PoolState>,
}

struct Mapped {
    region: Arc<DmaRegion>,
    iova: u64,
    /// Its unmap failed: the device may still reach it, so it is kept (host memory and IOVA)
    /// for good and none of its buffers is handed out again.
    quarantined: bool,
}

struct PoolState {
    iova: IovaAllocator,
    regions: Vec<Option<Mapped>>,
    /// The region being carved and the next free offset in it.
    bump: Option<(usize, usize)>,
    /// Freed buffers by size class: (region index, offset).
    free: [Vec<(usize, usize)>; CLASSES],
    memory: Arc<GuestMemoryMmap>,
    /// Why the device lost access to every region ([`DmaPool::revoke_device_access`]).
    revoked: Option<String>,
}

impl DmaPool {
    /// An empty pool whose regions are mapped through `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        let iova = IovaAllocator::new(&transport.iova_ranges());
        let state = PoolState {
            iova,
            regions: Vec::new(),
            bump: None,
            free: Default::default(),
            memory: Arc::new(GuestMemoryMmap::new()),
            revoked: None,
        };
        Self { inner: Arc::new(PoolInner { transport, state: Mutex::new(state) }) }
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A zeroed buffer of `len` bytes, aligned to at least 64 bytes (and to its size class).
    /// A length no mapping can hold (2^63 bytes and more) gives [`VfioError::Dma`].
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer> {
        let len_nonzero = len.max(1);
        let Some(class_len) = len_nonzero.checked_next_power_of_two() else {
            return Err(Error::Vfio(VfioError::Dma(format!(
                "a buffer of {len} bytes exceeds the address space"
            ))));
        };
        let shift = class_len.trailing_zeros().max(MIN_CLASS_SHIFT);
        let mut st = self.state();
        let (region_idx, offset, class) = if shift > MAX_CLASS_SHIFT {
            let idx = self.map_region(&mut st, len_nonzero)?;
            (idx, 0, None)
        } else {
            let class = (shift - MIN_CLASS_SHIFT) as usize;
            let size = 1usize << shift;
            let slot = loop {
                match st.free[class].pop() {
                    Some(s) if st.is_quarantined(s.0) => continue,
                    Some(s) => break s,
                    None => break self.carve(&mut st, size)?,
                }
            };
            (slot.0, slot.1, Some(class as u8))
        };
        let mapped = st.regions[region_idx]
            .as_ref()
            .ok_or_else(|| Error::Vfio(VfioError::Dma("region vanished".into())))?;
        let buf = DmaBuffer {
            pool: self.inner.clone(),
            region: mapped.region.clone(),
            region_idx,
            offset,
            len,
            capacity: class.map_or(mapped.region.len(), |c| 1usize << (u32::from(c) + MIN_CLASS_SHIFT)),
            class,
            iova: mapped.iova + offset as u64,
        };
        drop(st);
        // SAFETY: the buffer's bytes are inside a live mapping and owned by nobody else: freed
        // buffers and fresh carvings are referenced by no descriptor. Zeroing keeps one user's
        // data from reaching the next.
        unsafe { std::ptr::write_bytes(buf.ptr(), 0, buf.capacity) };
        Ok(buf)
    }

    /// Copies `data` into a new buffer.
    pub fn alloc_from(&self, data: &[u8]) -> Result<DmaBuffer> {
        let mut b = self.alloc(data.len())?;
        b.copy_from_slice(data);
        Ok(b)
    }

    fn carve(&self, st: &mut PoolState, size: usize) -> Result<(usize, usize)> {
        if let Some((idx, next)) = st.bump.filter(|&(idx, _)| !st.is_quarantined(idx)) {
            let start = next.next_multiple_of(size);
            let region_len = st.regions[idx].as_ref().map_or(0, |m| m.region.len());
            if start + size <= region_len {
                st.bump = Some((idx, start + size));
                return Ok((idx, start));
            }
        }
        let idx = self.map_region(st, REGION_SIZE)?;
        st.bump = Some((idx, size));
        Ok((idx, 0))
    }

    fn map_region(&self, st: &mut PoolState, len: usize) -> Result<usize> {
        if let Some(why) = &st.revoked {
            return Err(Error::Vfio(VfioError::Dma(format!(
                "{}: no new DMA memory: the device's DMA access was revoked ({why})",
                self.inner.transport.name()
            ))));
        }
        let region = Arc::new(DmaRegion::new(len)?);
        let rlen = region.len() as u64;
        let iova = st.iova.alloc(rlen, REGION_SIZE as u64)?;
        if let Err(e) = self.inner.transport.dma_map(iova, &region) {
            st.iova.free(iova, rlen);
            return Err(e);
        }
        log::debug!("DMA region of {rlen} bytes at IOVA {iova:#x} (huge pages: {})", region.is_huge());
        let view = view_region(&region, iova)?;
        st.memory = Arc::new(
            st.memory
                .insert_region(view)
                .map_err(|e| Error::Vfio(VfioError::Dma(format!("IOVA view of {iova:#x}: {e}"))))?,
        );
        let idx = match st.regions.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                st.regions.push(None);
                st.regions.len() - 1
            }
        };
        st.regions[idx] = Some(Mapped { region, iova, quarantined: false });
        Ok(idx)
    }

    /// The pool's memory as the device sees it: every region mapped now, at its IOVA. The view
    /// keeps those regions' host memory alive for as long as it exists (a region unmapped later,
    /// its buffer dropped, stays readable here but is no longer the device's), and reaches the
    /// bytes only with volatile copies.
    pub(crate) fn memory(&self) -> DmaMemory {
        let st = self.state();
        DmaMemory {
            view: st.memory.clone(),
            _regions: st.regions.iter().flatten().map(|m| m.region.clone()).collect(),
        }
    }

    /// Unmaps every region from the device's IOMMU, for good: a device that ignored its resets
    /// can then write none of this memory, so buffers may go back to their owners. The memory
    /// itself stays valid for the host; the pool maps nothing new afterwards, and says `why`
    /// when asked to.
    pub fn revoke_device_access(&self, why: &str) {
        let mut st = self.state();
        if st.revoked.is_some() {
            return;
        }
        st.revoked = Some(why.to_string());
        for m in st.regions.iter_mut().flatten() {
            if let Err(e) = self.inner.transport.dma_unmap(m.iova, m.region.len() as u64) {
                log::error!(
                    "{}: unmapping DMA region at {:#x}: {e}; the device may still write it, so it is \
                     kept and never used again",
                    self.inner.transport.name(),
                    m.iova
                );
                m.quarantined = true;
            }
        }
    }

    /// Bytes of DMA memory the device may still reach but the pool never uses again (regions
    /// whose unmap failed).
    pub fn quarantined_bytes(&self) -> usize {
        self.state().regions.iter().flatten().filter(|m| m.quarantined).map(|m| m.region.len()).sum()
    }

    /// Bytes of DMA memory mapped.
    pub fn mapped_bytes(&self) -> usize {
        self.state().regions.iter().flatten().map(|m| m.region.len()).sum()
    }

    /// The transport the pool maps through.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }
}

fn view_region(region: &DmaRegion, iova: u64) -> Result<Arc<GuestRegionMmap>> {
    // SAFETY: the pointer and length describe a live anonymous mapping owned by `region`; the
    // view does not own it (build_raw never unmaps) and is dropped with the pool state, which
    // keeps the region alive in `regions` for as long as the view exists.
    let mmap = unsafe {
        MmapRegion::build_raw(
            region.as_ptr(),
            region.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
        )
    }
    .map_err(|e| Error::Vfio(VfioError::Dma(format!("vm-memory view: {e}"))))?;
    GuestRegionMmap::new(mmap, GuestAddress(iova))
        .map(Arc::new)
        .ok_or_else(|| Error::Vfio(VfioError::Dma(format!("IOVA {iova:#x} overflows the address space"))))
}

/// A snapshot of a pool's mapped memory, addressed by IOVA (see `DmaPool::memory`).
///
/// Only byte copies go through it (the [`Bytes`] trait of `vm-memory`, volatile accesses): no
/// reference into memory the device may write, and no handle that could outlive the regions,
/// which the snapshot holds.
pub struct DmaMemory {
    view: Arc<GuestMemoryMmap>,
    /// The host memory behind `view`'s raw (non-owning) regions.
    _regions: Vec<Arc<DmaRegion>>,
}

impl fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaMemory").field("regions", &self._regions.len()).finish()
    }
}

impl Bytes<GuestAddress> for DmaMemory {
    type E = GuestMemoryError;

    fn write(&self, buf: &[u8], addr: GuestAddress) -> Result<usize, Self::E> {
        self.view.write(buf, addr)
    }

    fn read(&self, buf: &mut [u8], addr: GuestAddress) -> Result<usize, Self::E> {
        self.view.read(buf, addr)
    }

    fn write_slice(&self, buf: &[u8], addr: GuestAddress) -> Result<(), Self::E> {
        self.view.write_slice(buf, addr)
    }

    fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> Result<(), Self::E> {
        self.view.read_slice(buf, addr)
    }

    fn read_volatile_from<F: ReadVolatile>(
        &self,
        addr: GuestAddress,
        src: &mut F,
        count: usize,
    ) -> Result<usize, Self::E> {
        self.view.read_volatile_from(addr, src, count)
    }

    fn read_exact_volatile_from<F: ReadVolatile>(
        &self,
        addr: GuestAddress,
        src: &mut F,
        count: usize,
    ) -> Result<(), Self::E> {
        self.view.read_exact_volatile_from(addr, src, count)
    }

    fn write_volatile_to<F: WriteVolatile>(
        &self,
        addr: GuestAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<usize, Self::E> {
        self.view.write_volatile_to(addr, dst, count)
    }

    fn write_all_volatile_to<F: WriteVolatile>(
        &self,
        addr: GuestAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<(), Self::E> {
        self.view.write_all_volatile_to(addr, dst, count)
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: GuestAddress,
        order: std::sync::atomic::Ordering,
    ) -> Result<(), Self::E> {
        self.view.store(val, addr, order)
    }

    fn load<T: AtomicAccess>(
        &self,
        addr: GuestAddress,
        order: std::sync::atomic::Ordering,
    ) -> Result<T, Self::E> {
        self.view.load(addr, order)
    }
}

impl PoolState {
    fn is_quarantined(&self, idx: usize) -> bool {
        self.regions.get(idx).and_then(Option::as_ref).is_some_and(|m| m.quarantined)
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for m in st.regions.iter_mut().flatten() {
            if st.revoked.is_some() && !m.quarantined {
                continue;
            }
            if let Err(e) = self.transport.dma_unmap(m.iova, m.region.len() as u64) {
                log::error!(
                    "unmapping DMA region at {:#x}: {e}; leaking its memory, which the device may write",
                    m.iova
                );
                m.quarantined = true;
            }
        }
        // Host memory the device may still write never goes back to the allocator.
        for m in st.regions.iter_mut().filter_map(Option::take).filter(|m| m.quarantined) {
            std::mem::forget(m.region);
        }
    }
}

/// A buffer in DMA memory: the device reaches it at [`iova`](Self::iova).
///
/// Owning the buffer means owning its bytes: while a request holds it the device may write it,
/// and the caller gets it back only with the request's final completion. It returns to its pool
/// when dropped.
///
/// Its bytes stay mapped for the device even while the caller owns it, so no reference to them
/// is ever handed out; they are copied in and out:
///
/// ```compile_fail
/// fn borrow(b: &crypt_vfio::dma::DmaBuffer) -> &[u8] {
///     b.as_slice() // a copy (Vec<u8>), not a view of device-writable memory
/// }
/// ```
pub struct DmaBuffer {
    pool: Arc<PoolInner>,
    region: Arc<DmaRegion>,
    region_idx: usize,
    offset: usize,
    len: usize,
    capacity: usize,
    class: Option<u8>,
    iova: u64,
}

impl DmaBuffer {
    /// The address the device uses for the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can grow to without reallocation.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the buffer was taken from `pool` (and so is mapped for that pool's device).
    pub fn belongs_to(&self, pool: &DmaPool) -> bool {
        Arc::ptr_eq(&self.pool, &pool.inner)
    }

    /// Changes the length within the capacity. Returns false (and changes nothing) beyond it.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.capacity {
            return false;
        }
        self.len = len;
        true
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: offset + capacity lies inside the region by construction.
        unsafe { self.region.as_ptr().add(self.offset) }
    }

    /// The first `len` bytes as a volatile slice.
    fn bytes(&self) -> VolatileSlice<'_> {
        // SAFETY: the range is inside a live mapping that outlives `&self`; VolatileSlice only
        // performs volatile accesses, which are sound against concurrent device writes.
        unsafe { VolatileSlice::new(self.ptr(), self.len) }
    }

    /// Copies the buffer's bytes into `dst` (as many as both hold); returns how many.
    ///
    /// DMA memory stays mapped for the device while the caller owns the buffer, and a faulty or
    /// malicious device can write it at any time, so its bytes are only ever copied with
    /// volatile accesses, never lent out as `&[u8]` or `&mut [u8]` (the rule `vfio_dma_map`
    /// states for memory it maps).
    pub fn copy_to_slice(&self, dst: &mut [u8]) -> usize {
        self.bytes().copy_to(dst)
    }

    /// Copies `src` into the buffer's first bytes (as many as both hold); returns how many.
    pub fn copy_from_slice(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(self.len);
        self.bytes().copy_from(&src[..n]);
        n
    }

    /// Sets every byte to `value` (volatile writes, so zeroing is never optimised away).
    pub fn fill(&mut self, value: u8) {
        let chunk = [value; 256];
        let v = self.bytes();
        let mut off = 0;
        while off < v.len() {
            let n = (v.len() - off).min(chunk.len());
            if let Ok(part) = v.subslice(off, n) {
                part.copy_from(&chunk[..n]);
            }
            off += n;
        }
    }

    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.copy_to_slice(&mut v);
        v
    }

    /// A copy of the bytes (see [`copy_to_slice`](Self::copy_to_slice) for why not a
    /// reference). Kept for callers of the former `&[u8]` accessor.
    pub fn as_slice(&self) -> Vec<u8> {
        self.to_vec()
    }

    /// The bytes to edit, through a copy written back (with volatile writes) when the guard
    /// is dropped. Kept for callers of the former `&mut [u8]` accessor; bulk copies are cheaper
    /// with [`copy_from_slice`](Self::copy_from_slice).
    pub fn as_mut_slice(&mut self) -> DmaBytesMut<'_> {
        let copy = self.to_vec();
        DmaBytesMut { buf: self, copy }
    }

    /// The whole capacity as a volatile slice, for structures the device reads and writes
    /// concurrently (rings, request headers, status bytes).
    pub fn volatile(&self) -> VolatileSlice<'_> {
        // SAFETY: the range is inside a live mapping that outlives `&self`; VolatileSlice only
        // performs volatile accesses, which are sound against concurrent device writes.
        unsafe { VolatileSlice::new(self.ptr(), self.capacity) }
    }
}

/// The bytes of a [`DmaBuffer`] being edited: a host copy, written back when dropped.
pub struct DmaBytesMut<'a> {
    buf: &'a mut DmaBuffer,
    copy: Vec<u8>,
}

impl Deref for DmaBytesMut<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.copy
    }
}

impl DerefMut for DmaBytesMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.copy
    }
}

impl Drop for DmaBytesMut<'_> {
    fn drop(&mut self) {
        self.buf.copy_from_slice(&self.copy);
        // The copy may hold key material or plaintext.
        zeroize::Zeroize::zeroize(&mut self.copy);
    }
}

impl fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        let mut guard = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        if st.is_quarantined(self.region_idx) {
            // The device may still write it: its bytes go to nobody again.
            return;
        }
        match self.class {
            Some(c) => st.free[usize::from(c)].push((self.region_idx, self.offset)),
            None => {
                // A dedicated region: unmap it and give back its IOVA, only once the device
                // can no longer reach it (a revocation unmapped it already).
                let Some(m) = st.regions[self.region_idx].as_mut() else { return };
                let (iova, len) = (m.iova, m.region.len() as u64);
                if st.revoked.is_none() {
                    if let Err(e) = self.pool.transport.dma_unmap(iova, len) {
                        log::error!(
                            "unmapping DMA region at {iova:#x}: {e}; the device may still write it, so \
                             it is kept and its IOVA never reused"
                        );
                        m.quarantined = true;
                        return;
                    }
                }
                st.regions[self.region_idx] = None;
                st.iova.free(iova, len);
                if let Ok(mem) = st.memory.remove_region(GuestAddress(iova), len) {
                    st.memory = Arc::new(mem.0);
                }
            }
        }
    }
}
