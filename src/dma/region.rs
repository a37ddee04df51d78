//! One contiguous block of pinned memory that can be mapped for DMA.

use mmap_rs::{MmapFlags, MmapMut, MmapOptions, PageSize};

use crate::error::{Error, Result, VfioError};

/// Size of the regions the pool allocates (a huge page, where the system has them).
pub const REGION_SIZE: usize = 2 << 20;

/// An anonymous memory mapping that stays in place while a device may access it.
///
/// The mapping is locked when the system allows it, so that the memory is resident; a VFIO map
/// pins it in any case.
pub struct DmaRegion {
    map: MmapMut,
    huge: bool,
}

impl DmaRegion {
    /// Maps `len` bytes (rounded up to the page size): huge pages first, then normal pages.
    pub fn new(len: usize) -> Result<Self> {
        let len = len.max(1);
        let huge_len = len.div_ceil(REGION_SIZE) * REGION_SIZE;
        let huge = MmapOptions::new(huge_len)
            .map(|o| o.with_page_size(PageSize::_2M).with_flags(MmapFlags::HUGE_PAGES | MmapFlags::POPULATE))
            .and_then(|o| o.map_mut());
        if let Ok(map) = huge {
            return Ok(Self { map, huge: true });
        }
        let page = MmapOptions::page_size();
        let len = len.div_ceil(page) * page;
        let options =
            MmapOptions::new(len).map_err(|e| Error::Vfio(VfioError::Dma(format!("{len} bytes: {e}"))))?;
        let mut map = options
            .with_flags(MmapFlags::POPULATE | MmapFlags::TRANSPARENT_HUGE_PAGES)
            .map_mut()
            .map_err(|e| Error::Vfio(VfioError::Dma(format!("cannot map {len} bytes: {e}"))))?;
        if let Err(e) = map.lock() {
            log::debug!("DMA region of {len} bytes not locked ({e}); VFIO pins it when mapped");
        }
        Ok(Self { map, huge: false })
    }

    /// Host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr() as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.size()
    }

    /// Whether the region has no bytes (never true for a mapped region).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the region is backed by huge pages.
    pub fn is_huge(&self) -> bool {
        self.huge
    }
}

impl std::fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaRegion").field("len", &self.len()).field("huge", &self.huge).finish()
    }
}

// SAFETY: the region is plain anonymous memory; sharing the base pointer between threads is
// fine, and every access to its bytes goes through DmaBuffer (exclusive owner) or volatile
// accessors (memory shared with the device).
unsafe impl Send for DmaRegion {}
// SAFETY: see Send: `&DmaRegion` only exposes the address and length.
unsafe impl Sync for DmaRegion {}
