//! crypt-vfio: a userspace driver for PCIe crypto accelerators.
//!
//! Start with [`open`]: it turns a device name (`emulated`, a PCI address bound to vfio-pci, or
//! `software`) into an [`AnyEngine`]. [`BlockingQueue`] runs one request at a time on it;
//! [`engine::async_api::AsyncQueue`] runs many under any executor; [`volume::AnyVolume`] opens a
//! LUKS or authenticated image by path with `read_at`/`write_at`. Errors are one enum per layer
//! inside [`Error`] (see [`error`]). The `examples/` directory has each of these as a program.
//!
//! Layers, bottom up:
//!
//! * [`transport`]: a PCI function as a driver sees it (config space, BARs, DMA mapping,
//!   MSI-X), implemented by VFIO and by the emulated device.
//! * [`pci_sysfs`]: PCI functions as sysfs shows them, IOMMU groups, binding to vfio-pci.
//! * [`dma`]: device-visible memory addressed by IOVA.
//! * `virtio` (internal): the virtio 1.x PCI transport and split virtqueues, driver side.
//! * [`virtio_crypto`]: the virtio-crypto device family as an [`engine::Engine`].
//! * [`engine`]: the backlog-aware submit API that every engine implements, its contract
//!   checker, the software engine, and the async API.
//! * [`volume`]: the block encryption front end (dm-crypt compatible sectors over a file) and
//!   the block devices to export; [`luks`]: LUKS1 and LUKS2 headers; [`nbd`]: the NBD server
//!   that exports block devices; [`blockdev`]: a block device as a kernel block device
//!   (/dev/nbdN through the kernel's NBD client, /dev/ublkbN through ublk).

#![deny(missing_docs)]
// A refused submit hands the request back by value inside the error: boxing it would allocate on
// the `Busy` path, which a full ring takes often.
#![allow(clippy::result_large_err)]

pub mod blockdev;
pub mod dma;
pub mod engine;
pub mod error;
pub mod luks;
pub mod nbd;
mod open;
pub mod pci_sysfs;
pub mod transport;
pub(crate) mod virtio;
pub mod virtio_crypto;
pub mod volume;

/// Internals that the integration tests in `tests/` reach on purpose (probing a device's
/// registers, inspecting DMA memory as the device sees it, model-checking the backlog). Not part
/// of the API: it may change in any release.
#[doc(hidden)]
pub mod testing {
    pub use crate::dma::pool::DmaMemory;
    pub use crate::engine::delivery::{Delivery, Outbox};
    pub use crate::virtio::VirtioPci;

    /// A pool member queue's credits, for the loom models.
    pub use crate::engine::pool::Credit;

    /// The software backlog of the submit contract, for the loom models.
    pub mod backlog {
        pub use crate::engine::backlog::{Backlog, Outbox, Refused, Ring};
    }

    /// The pool's memory as the device sees it (see `DmaPool::memory`).
    pub fn dma_memory(pool: &crate::dma::DmaPool) -> DmaMemory {
        pool.memory()
    }
}

pub use crypt_vfio_cores::{CoreKind, Mode};
pub use engine::{AnyEngine, AnySession, BlockingQueue};
pub use error::{
    CryptoError, DeviceError, Error, LuksError, MemberFate, NbdError, Result, VfioError, VolumeError,
};
pub use open::{member_name, open, open_device, open_pool, open_with, parse_list, DeviceName, OpenOptions};
