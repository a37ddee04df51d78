//! The interface between an exporter (the NBD server) and what it exports.
//!
//! It is byte-addressed so that an exporter never has to split or align requests itself; an
//! implementation with a sector size does any read-modify-write it needs, and says which
//! granularity is efficient through [`BlockDevice::block_size`].

/// A byte-addressed block device that the NBD server exports.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()>;
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> crate::Result<()>;
    /// Makes written data durable.
    fn flush(&self) -> crate::Result<()>;
    /// Writes zeroes over `len` bytes at `offset` (encrypted zeroes for a volume).
    fn write_zeroes(&self, offset: u64, len: u64) -> crate::Result<()>;
    /// Zeroes `len` bytes at `offset`, freeing storage where it can (a hole that reads as
    /// zeroes) and writing zeroes elsewhere. The default writes zeroes everywhere.
    fn zero_or_punch(&self, offset: u64, len: u64) -> crate::Result<()> {
        self.write_zeroes(offset, len)
    }
    /// Discards `len` bytes at `offset` (may do nothing). Devices that free space here
    /// report the freed ranges through [`BlockDevice::block_status`] and read them as zeroes.
    fn trim(&self, offset: u64, len: u64) -> crate::Result<()>;
    /// Preferred I/O granularity (the sector size).
    fn block_size(&self) -> u32;
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// The most memory a read or write of `len` bytes holds while it runs, the caller's
    /// buffer included: what an exporter charges against its memory budget.
    fn working_set(&self, len: u64) -> u64 {
        len
    }
    /// What `[offset, offset + len)` holds without reading it: extents in order, starting at
    /// `offset`, at most `max_extents` of them. They may cover less than `len` (never
    /// nothing, unless `len` is 0). The default: all of it is data.
    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> crate::Result<Vec<Extent>> {
        let _ = (offset, max_extents);
        Ok(if len == 0 { Vec::new() } else { vec![Extent { len, hole: false, zero: false }] })
    }
}

/// One extent of a block status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes.
    pub len: u64,
    /// No storage is allocated for it.
    pub hole: bool,
    /// It reads as zeroes.
    pub zero: bool,
}

/// Appends an extent, merging it into the last one when they agree (fewer, longer extents
/// are what clients want).
pub fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += e.len,
        _ => out.push(e),
    }
}

/// Largest piece [`write_zeroes_in_pieces`] writes at once (so `write_zeroes` holds at most
/// the working set of a write of this size).
pub const ZERO_PIECE: u64 = 1 << 20;

/// Writes `len` zero bytes at `offset` through `write`, at most 1 MiB at a time, so that zeroing
/// a large range needs no buffer of its size.
pub fn write_zeroes_in_pieces(
    offset: u64,
    len: u64,
    mut write: impl FnMut(u64, &[u8]) -> crate::Result<()>,
) -> crate::Result<()> {
    let zeroes = vec![0u8; len.min(ZERO_PIECE) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_PIECE);
        write(offset + done, &zeroes[..n as usize])?;
        done += n;
    }
    Ok(())
}
