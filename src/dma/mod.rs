//! Device-visible memory.
//!
//! A device reaches host memory only through IO virtual addresses (IOVAs) that the IOMMU
//! translates; this layer owns that memory. It allocates regions (2 MiB huge pages when the system
//! has them, else locked normal pages), gives each an IOVA, asks the transport to map it, and
//! carves it into [`DmaBuffer`]s. Buffers return to the pool when dropped, so the hot path
//! allocates nothing once warm. A `vm-memory` view of all regions, addressed by IOVA, lets code
//! reach any mapped byte by the address the device sees.

mod iova;
mod pool;
mod region;

pub use iova::IovaAllocator;
pub use pool::{DmaBuffer, DmaPool};
pub use region::DmaRegion;
