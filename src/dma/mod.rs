//! Device-visible memory.
//!
//! A device reaches host memory only through IO virtual addresses (IOVAs) that the IOMMU
//! translates; this layer owns that memory. It allocates regions (2 MiB huge pages when the system
//! has them, else locked normal pages), gives each an IOVA, asks the transport to map it, and
//! carves it into [`DmaBuffer`]s. Buffers return to the pool when dropped, so the hot path
//! allocates nothing once warm. A `vm-memory` view of all regions, addressed by IOVA, lets code
//! reach any mapped byte by the address the device sees.
//!
//! Mapped memory is the device's to write at any time, so no safe function lends it out as
//! `&[u8]`/`&mut [u8]` or hands out a view that could outlive its mapping: bytes are copied in
//! and out with volatile accesses (`DmaBuffer::copy_to_slice`, `VolatileSlice`, `DmaMemory`).

mod iova;
pub(crate) mod pool;
mod region;

pub(crate) use iova::IovaAllocator;
pub use pool::{DmaBuffer, DmaBytesMut, DmaPool};
pub use region::{DmaRegion, REGION_SIZE};
