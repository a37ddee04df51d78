//! crypt-vfio: a userspace driver for PCIe crypto accelerators.
//!
//! Layers, bottom up:
//!
//! * [`transport`]: a PCI function as a driver sees it (config space, BARs, DMA mapping,
//!   MSI-X), implemented by VFIO and by the emulated device.
//! * [`pci_sysfs`]: PCI functions as sysfs shows them, IOMMU groups, binding to vfio-pci.
//! * [`dma`]: device-visible memory addressed by IOVA.
//! * [`virtio`]: the virtio 1.x PCI transport and split virtqueues, driver side.
//! * [`virtio_crypto`]: the virtio-crypto device family as an [`engine::Engine`].
//! * [`engine`]: the backlog-aware submit API that every engine implements, its contract
//!   checker, the software engine, and the async API.
//! * [`volume`]: the block encryption front end (dm-crypt compatible sectors over a file) and
//!   the block devices to export; [`luks`]: LUKS1 and LUKS2 headers; [`nbd`]: the NBD server
//!   that exports block devices.

#![warn(missing_docs)]
// A refused submit hands the request back by value inside the error: boxing it would allocate on
// the `Busy` path, which a full ring takes often.
#![allow(clippy::result_large_err)]

pub mod dma;
pub mod engine;
pub mod error;
pub mod luks;
pub mod nbd;
mod open;
pub mod pci_sysfs;
pub mod transport;
pub mod virtio;
pub mod virtio_crypto;
pub mod volume;

pub use crypt_vfio_cores::{CoreKind, Mode};
pub use engine::{AnyEngine, AnySession, BlockingQueue};
pub use error::{Error, Result};
pub use open::{open, open_device, open_with, DeviceName, OpenOptions};
