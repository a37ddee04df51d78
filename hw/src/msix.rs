//! MSI-X: the vector table in BAR1, and the delivery of vectors to eventfds.
//!
//! Under VFIO the host kernel owns the MSI-X table and turns each vector into an eventfd
//! signal (`VFIO_DEVICE_SET_IRQS`); the driver never sees message addresses. The model does the
//! same: [`Msix::set_eventfd`] is the routing, and the table in BAR1 only stores what is written
//! to it so that a driver reading it back sees a plausible table. Delivery depends on the
//! routing alone, not on the table's mask bits or the MSI-X enable bit in config space.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Mutex, PoisonError, RwLock};

use crate::bar::MsixLayout;
use crate::error::HwError;

/// Bytes per table entry: message address (low, high), data, vector control.
const ENTRY_LEN: usize = 16;
/// Vector control: masked (the reset value of every entry).
const VECTOR_MASKED: u32 = 1;

pub(crate) struct Msix {
    layout: MsixLayout,
    table: Mutex<Vec<u8>>,
    fds: RwLock<Vec<Option<OwnedFd>>>,
}

impl Msix {
    pub(crate) fn new(layout: MsixLayout) -> Self {
        let n = usize::from(layout.vectors);
        let mut table = vec![0u8; n * ENTRY_LEN];
        for e in table.chunks_exact_mut(ENTRY_LEN) {
            e[12..16].copy_from_slice(&VECTOR_MASKED.to_le_bytes());
        }
        Self { layout, table: Mutex::new(table), fds: RwLock::new((0..n).map(|_| None).collect()) }
    }

    pub(crate) fn layout(&self) -> MsixLayout {
        self.layout
    }

    /// Routes `vector` to `fd` (or disconnects it).
    pub(crate) fn set_eventfd(&self, vector: u16, fd: Option<OwnedFd>) -> Result<(), HwError> {
        let mut fds = self.fds.write().unwrap_or_else(PoisonError::into_inner);
        let slot = fds
            .get_mut(usize::from(vector))
            .ok_or(HwError::NoSuchVector { vector, count: self.layout.vectors })?;
        *slot = fd;
        Ok(())
    }

    /// Signals `vector`; returns whether an eventfd was there to signal.
    pub(crate) fn signal(&self, vector: u16) -> bool {
        let fds = self.fds.read().unwrap_or_else(PoisonError::into_inner);
        let Some(Some(fd)) = fds.get(usize::from(vector)) else { return false };
        let one = 1u64;
        // SAFETY: `fd` is an open descriptor owned by the table (the read lock keeps it from
        // being closed meanwhile), and the buffer is 8 readable bytes, what an eventfd expects.
        let r = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if r != 8 {
            // EAGAIN means the counter is saturated: the driver has a wake-up pending anyway.
            log::trace!("MSI-X vector {vector}: eventfd write returned {r}");
        }
        true
    }

    /// A BAR1 read: table bytes, or the PBA (never pending, as delivery is not masked).
    pub(crate) fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let off = offset as usize;
        if off < table.len() {
            let n = data.len().min(table.len() - off);
            data[..n].copy_from_slice(&table[off..off + n]);
        }
    }

    /// A BAR1 write: stored in the table; the PBA is read-only.
    pub(crate) fn write(&self, offset: u64, data: &[u8]) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let off = offset as usize;
        if off < table.len() {
            let n = data.len().min(table.len() - off);
            table[off..off + n].copy_from_slice(&data[..n]);
        }
    }
}
