//! Errors of the device model's host-side API.
//!
//! Only the operations a hypervisor or VFIO would refuse can fail (bad settings, IOMMU map
//! conflicts, unknown interrupt vectors). Anything a driver writes into registers or rings is
//! never an error here: the device answers it the way hardware would, with a status code or
//! DEVICE_NEEDS_RESET.

/// Why the device model refused a host-side operation.
#[derive(Debug, thiserror::Error)]
pub enum HwError {
    /// The [`DeviceConfig`](crate::DeviceConfig) describes a device the model cannot be.
    #[error("invalid device configuration: {0}")]
    InvalidConfig(String),
    /// A DMA map is empty, wraps around, or is not page aligned.
    #[error(
        "DMA map of {len:#x} bytes at IOVA {iova:#x} (host {host:#x}) is not a valid page-aligned range"
    )]
    BadMapping {
        /// The IOVA asked for.
        iova: u64,
        /// The host address given.
        host: usize,
        /// The length asked for.
        len: u64,
    },
    /// A DMA map overlaps an existing one.
    #[error("DMA map {iova:#x}+{len:#x} overlaps an existing mapping")]
    Overlap {
        /// The IOVA asked for.
        iova: u64,
        /// The length asked for.
        len: u64,
    },
    /// An unmap does not name exactly one existing mapping.
    #[error("no DMA mapping is exactly {iova:#x}+{len:#x}")]
    NotMapped {
        /// The IOVA given.
        iova: u64,
        /// The length given.
        len: u64,
    },
    /// The MSI-X vector does not exist.
    #[error("MSI-X vector {vector} does not exist (the device has {count})")]
    NoSuchVector {
        /// The vector asked for.
        vector: u16,
        /// How many vectors the device has.
        count: u16,
    },
    /// The operating system refused something the model needs (a thread, a mapping).
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}
