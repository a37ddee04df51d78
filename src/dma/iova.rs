//! IOVA allocation: choosing where in the device's address space each region appears.

use std::ops::Range;

use crate::error::{Error, Result, VfioError};

/// Hands out aligned IOVA ranges inside the ranges the IOMMU accepts.
///
/// Regions are long-lived and few, so a first-fit list of free ranges is enough. IOVA 0 and the
/// first megabyte are never handed out, so a zeroed descriptor cannot point at valid memory.
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    free: Vec<Range<u64>>,
}

/// Lowest IOVA ever handed out.
const IOVA_FLOOR: u64 = 1 << 20;

impl IovaAllocator {
    /// An allocator over `valid` (as the IOMMU reports them; inclusive-exclusive ranges).
    pub fn new(valid: &[Range<u64>]) -> Self {
        let mut free: Vec<Range<u64>> = valid
            .iter()
            .filter_map(|r| {
                let start = r.start.max(IOVA_FLOOR);
                (start < r.end).then_some(start..r.end)
            })
            .collect();
        free.sort_by_key(|r| r.start);
        Self { free }
    }

    /// Takes `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64> {
        debug_assert!(align.is_power_of_two());
        for i in 0..self.free.len() {
            let r = self.free[i].clone();
            let start = r.start.checked_add(align - 1).map(|s| s & !(align - 1));
            let Some(start) = start else { continue };
            let Some(end) = start.checked_add(len) else {
                continue;
            };
            if end > r.end {
                continue;
            }
            self.free.remove(i);
            if end < r.end {
                self.free.insert(i, end..r.end);
            }
            if r.start < start {
                self.free.insert(i, r.start..start);
            }
            return Ok(start);
        }
        Err(Error::Vfio(VfioError::Dma(format!(
            "no free IOVA range of {len} bytes left in the IOMMU's valid ranges"
        ))))
    }

    /// Gives back a range taken by [`alloc`](Self::alloc).
    pub fn free(&mut self, iova: u64, len: u64) {
        let pos = self.free.partition_point(|r| r.start < iova);
        self.free.insert(pos, iova..iova + len);
        // Merge neighbours so that fragmentation does not grow without bound.
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(self.free.len());
        for r in self.free.drain(..) {
            match merged.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => merged.push(r),
            }
        }
        self.free = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respects_ranges_alignment_and_floor() {
        let mut a = IovaAllocator::new(&[0..0x40_0000, 0x1000_0000..0x1040_0000]);
        let x = a.alloc(0x20_0000, 0x20_0000).unwrap();
        assert_eq!(x, 0x20_0000, "first aligned address above the 1 MiB floor");
        let y = a.alloc(0x20_0000, 0x20_0000).unwrap();
        assert_eq!(y, 0x1000_0000);
        let z = a.alloc(0x20_0000, 0x20_0000).unwrap();
        assert_eq!(z, 0x1020_0000);
        assert!(a.alloc(0x20_0000, 0x20_0000).is_err());
        a.free(y, 0x20_0000);
        assert_eq!(a.alloc(0x20_0000, 0x20_0000).unwrap(), y);
    }
}
