//! The pool of device-visible memory and the buffers carved from it.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion, VolatileSlice};

use super::region::{DmaRegion, REGION_SIZE};
use super::IovaAllocator;
use crate::error::{Error, Result};
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
}

struct PoolState {
    iova: IovaAllocator,
    regions: Vec<Option<Mapped>>,
    /// The region being carved and the next free offset in it.
    bump: Option<(usize, usize)>,
    /// Freed buffers by size class: (region index, offset).
    free: [Vec<(usize, usize)>; CLASSES],
    memory: Arc<GuestMemoryMmap>,
    /// The device lost access to every region ([`DmaPool::revoke_device_access`]).
    revoked: bool,
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
            revoked: false,
        };
        Self { inner: Arc::new(PoolInner { transport, state: Mutex::new(state) }) }
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A zeroed buffer of `len` bytes, aligned to at least 64 bytes (and to its size class).
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer> {
        let len_nonzero = len.max(1);
        let shift = len_nonzero.next_power_of_two().trailing_zeros().max(MIN_CLASS_SHIFT);
        let mut st = self.state();
        let (region_idx, offset, class) = if shift > MAX_CLASS_SHIFT {
            let idx = self.map_region(&mut st, len_nonzero)?;
            (idx, 0, None)
        } else {
            let class = (shift - MIN_CLASS_SHIFT) as usize;
            let size = 1usize << shift;
            let slot = match st.free[class].pop() {
                Some(s) => s,
                None => self.carve(&mut st, size)?,
            };
            (slot.0, slot.1, Some(class as u8))
        };
        let mapped = st.regions[region_idx].as_ref().ok_or_else(|| Error::Dma("region vanished".into()))?;
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
        b.as_mut_slice().copy_from_slice(data);
        Ok(b)
    }

    fn carve(&self, st: &mut PoolState, size: usize) -> Result<(usize, usize)> {
        if let Some((idx, next)) = st.bump {
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
        if st.revoked {
            return Err(Error::Dma("the device's DMA access was revoked after it ignored a reset".into()));
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
            st.memory.insert_region(view).map_err(|e| Error::Dma(format!("IOVA view of {iova:#x}: {e}")))?,
        );
        let idx = match st.regions.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                st.regions.push(None);
                st.regions.len() - 1
            }
        };
        st.regions[idx] = Some(Mapped { region, iova });
        Ok(idx)
    }

    /// The pool's memory as `vm-memory` sees it: every mapped region at its IOVA.
    pub fn memory(&self) -> Arc<GuestMemoryMmap> {
        self.state().memory.clone()
    }

    /// Unmaps every region from the device's IOMMU, for good: a device that ignored its resets
    /// can then write none of this memory, so buffers may go back to their owners. The memory
    /// itself stays valid for the host; the pool maps nothing new afterwards.
    pub fn revoke_device_access(&self) {
        let mut st = self.state();
        if st.revoked {
            return;
        }
        st.revoked = true;
        for m in st.regions.iter().flatten() {
            if let Err(e) = self.inner.transport.dma_unmap(m.iova, m.region.len() as u64) {
                log::warn!("unmapping DMA region at {:#x}: {e}", m.iova);
            }
        }
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
    .map_err(|e| Error::Dma(format!("vm-memory view: {e}")))?;
    GuestRegionMmap::new(mmap, GuestAddress(iova))
        .map(Arc::new)
        .ok_or_else(|| Error::Dma(format!("IOVA {iova:#x} overflows the address space")))
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if st.revoked {
            return;
        }
        for m in st.regions.iter().flatten() {
            if let Err(e) = self.transport.dma_unmap(m.iova, m.region.len() as u64) {
                log::warn!("unmapping DMA region at {:#x}: {e}", m.iova);
            }
        }
    }
}

/// A buffer in DMA memory: the device reaches it at [`iova`](Self::iova).
///
/// Owning the buffer means owning its bytes: while a request holds it the device may write it,
/// and the caller gets it back only with the request's final completion. It returns to its pool
/// when dropped.
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

    /// The bytes, for the owner while no request holds the buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the range is inside a live mapping owned through `region`; the buffer is not in
        // a request (the caller owns it), so the device has no descriptor pointing at it.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len) }
    }

    /// The whole capacity as a volatile slice, for structures the device reads and writes
    /// concurrently (rings, request headers, status bytes).
    pub fn volatile(&self) -> VolatileSlice<'_> {
        // SAFETY: the range is inside a live mapping that outlives `&self`; VolatileSlice only
        // performs volatile accesses, which are sound against concurrent device writes.
        unsafe { VolatileSlice::new(self.ptr(), self.capacity) }
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
        let mut st = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
        match self.class {
            Some(c) => st.free[usize::from(c)].push((self.region_idx, self.offset)),
            None => {
                // A dedicated region: unmap it and give back its IOVA.
                if let Some(m) = st.regions[self.region_idx].take() {
                    let len = m.region.len() as u64;
                    if st.revoked {
                        // Unmapped already; the IOVA stays retired.
                    } else if let Err(e) = self.pool.transport.dma_unmap(m.iova, len) {
                        log::warn!("unmapping DMA region at {:#x}: {e}", m.iova);
                    }
                    st.iova.free(m.iova, len);
                    if let Ok(mem) = st.memory.remove_region(GuestAddress(m.iova), len) {
                        st.memory = Arc::new(mem.0);
                    }
                }
            }
        }
    }
}
