//! The two VFIO requests `vfio-ioctls` does not make the way we need, and the capability-chain
//! reader they share.
//!
//! `vfio-ioctls` 0.10 never asks the IOMMU for its valid IOVA ranges (VFIO_IOMMU_GET_INFO and its
//! capability chain): a VMM maps guest memory at guest-physical addresses it does not choose, so
//! it has no use for them, while a driver that picks IOVAs must stay inside them. And its
//! `VfioDevice::reset` drops the result of VFIO_DEVICE_RESET, where we must know whether the
//! function was stopped before its DMA memory goes back. `vfio-bindings` carries the structures
//! but not the request numbers (bindgen cannot expand `_IO()`), so these two are spelled out here
//! from the uapi's numbering, `_IO(VFIO_TYPE, VFIO_BASE + n)`.

use std::mem::size_of;
use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;
use vmm_sys_util::ioctl_io_nr;

use crate::error::{Error, Result, VfioError};

ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);
ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);

/// Largest info reply accepted: far above any real capability chain, small enough that a
/// kernel (or a fake) asking for more cannot make us allocate without bound.
const MAX_INFO_SIZE: usize = 64 * 1024;

/// A query whose reply is a fixed structure starting with `argsz`, followed by a capability chain
/// when `argsz` leaves room for one: asks once with the bare structure, and again with the size
/// the kernel asked for. Returns the structure and the whole reply.
pub(super) fn query_with_caps<T: Copy>(
    fd: &impl AsRawFd,
    request: libc::c_ulong,
    init: T,
    what: &str,
) -> Result<(T, Vec<u8>)> {
    let base = size_of::<T>();
    let mut size = base;
    loop {
        // u64 words keep the buffer aligned for every VFIO structure.
        let mut buf = vec![0u64; size.div_ceil(8)];
        let p = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: the buffer holds at least `size >= size_of::<T>()` bytes and is 8-byte aligned;
        // T is a plain C structure whose first field is the u32 argsz.
        unsafe {
            std::ptr::write(p.cast::<T>(), init);
            std::ptr::write(p.cast::<u32>(), size as u32);
        }
        // SAFETY: the kernel writes at most argsz (= size) bytes into the buffer, which is that long.
        let r = unsafe { ioctl_with_mut_ptr(fd, request, p) };
        if r < 0 {
            return Err(Error::last_os(what.to_string()));
        }
        // SAFETY: the buffer starts with an initialised T (written above, updated by the kernel).
        let reply = unsafe { std::ptr::read(p.cast::<T>()) };
        // SAFETY: as above; argsz is the first u32.
        let wanted = unsafe { std::ptr::read(p.cast::<u32>()) } as usize;
        if wanted > size && size == base {
            if wanted > MAX_INFO_SIZE {
                return Err(Error::Vfio(VfioError::Transport(format!(
                    "{what}: the kernel asks for a {wanted}-byte reply"
                ))));
            }
            size = wanted;
            continue;
        }
        // SAFETY: the buffer is `buf.len() * 8 >= size` initialised bytes.
        let bytes = unsafe { std::slice::from_raw_parts(p, size) }.to_vec();
        return Ok((reply, bytes));
    }
}

/// A capability in a reply: its id, and bytes from its header to the end of the reply.
pub(super) struct Capability<'a> {
    pub id: u16,
    /// The capability, header included, up to the end of the reply (its own length is implicit
    /// in its type; readers check against this slice).
    pub bytes: &'a [u8],
}

/// Walks a capability chain starting at `first` (an offset from the start of `reply`). Offsets
/// come from the kernel: each must lie inside the reply, after the fixed part, and move forward,
/// so a corrupt chain ends the walk instead of looping or reading outside the buffer.
pub(super) fn capabilities(reply: &[u8], fixed_len: usize, first: u32) -> Vec<Capability<'_>> {
    let mut out = Vec::new();
    let mut off = first as usize;
    let mut floor = fixed_len;
    while off != 0 {
        if off < floor || off.checked_add(8).is_none_or(|end| end > reply.len()) {
            log::warn!("VFIO capability chain points outside its reply (offset {off}); ignoring the rest");
            break;
        }
        let id = u16::from_ne_bytes([reply[off], reply[off + 1]]);
        let next = u32::from_ne_bytes([reply[off + 4], reply[off + 5], reply[off + 6], reply[off + 7]]);
        out.push(Capability { id, bytes: &reply[off..] });
        floor = off + 8;
        off = next as usize;
    }
    out
}

/// Reads the `i`-th u64 after `skip` bytes of a capability, if the capability is that long.
pub(super) fn cap_u64(bytes: &[u8], skip: usize, i: usize) -> Option<u64> {
    let at = skip.checked_add(i.checked_mul(8)?)?;
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(b.try_into().ok()?))
}

/// Reads a u32 at `at` in a capability, if it is that long.
pub(super) fn cap_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(b.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(id: u16, next: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&id.to_ne_bytes());
        v.extend_from_slice(&1u16.to_ne_bytes());
        v.extend_from_slice(&next.to_ne_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn walks_a_chain_and_stops_on_bad_offsets() {
        let mut reply = vec![0u8; 16];
        reply.extend(cap(3, 32, &[0; 8]));
        reply.extend(cap(1, 0, &[2, 0, 0, 0, 0, 0, 0, 0]));
        let caps = capabilities(&reply, 16, 16);
        assert_eq!(caps.iter().map(|c| c.id).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(cap_u32(caps[1].bytes, 8), Some(2));
        assert_eq!(cap_u64(caps[1].bytes, 8, 0), Some(2));
        assert_eq!(cap_u64(caps[1].bytes, 8, 1), None, "past the end of the reply");
        // A chain that loops back, or points into the fixed part or past the end, is cut.
        let mut looping = vec![0u8; 16];
        looping.extend(cap(3, 16, &[]));
        assert_eq!(capabilities(&looping, 16, 16).len(), 1);
        assert!(capabilities(&reply, 16, 8).is_empty());
        assert!(capabilities(&reply, 16, 4000).is_empty());
    }
}
