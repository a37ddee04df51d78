//! The decrypted volume as a kernel block device, the way `cryptsetup open` makes one.
//!
//! A userspace server cannot be a block device by itself; the kernel needs a driver that hands
//! it the requests. Two drivers do this: the NBD client (`nbd.ko`, in every distribution kernel,
//! but a server that dies takes the device's I/O with it) and ublk (`ublk_drv.ko`, io_uring
//! based, which can keep the device and its queued I/O while the server restarts). This module
//! attaches a [`BlockDevice`](crate::volume::block::BlockDevice) to either.

pub mod kernel_nbd;
pub mod nbd_netlink;
pub mod ublk;
