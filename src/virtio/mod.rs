//! The virtio 1.x transport on PCI, driver side: what every virtio device needs, before any
//! device-specific protocol. Device families (virtio-crypto today) build on this.

pub mod pci;
pub mod split_queue;

pub use pci::{Doorbell, VirtioPci};
pub use split_queue::SplitQueue;
