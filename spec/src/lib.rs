//! Wire layouts of the virtio 1.2 PCI transport and of the virtio-crypto device (section 5.9).
//!
//! This crate is to crypt-vfio what `include/uapi/linux/virtio_*.h` is to Linux and QEMU: the one
//! place where offsets, bit numbers and structure layouts are written down, so that the driver
//! (`crypt-vfio`) and the emulated device (`crypt-vfio-hw`) cannot silently disagree about them.
//! It holds no logic beyond encoding and decoding little-endian fields; everything here is checked
//! against the specification, and the driver is also run against QEMU's own device.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod crypto;
pub mod le;
pub mod pci;
pub mod ring;
