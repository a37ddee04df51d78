//! Interrupt delivery: an eventfd that an MSI-X vector is routed to.
//!
//! VFIO signals MSI-X through eventfds (VFIO_DEVICE_SET_IRQS) and the emulated device writes the
//! same kind of eventfd, so one waiting path serves both.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};

/// An eventfd an interrupt is delivered to.
#[derive(Debug)]
pub struct EventNotifier {
    fd: EventFd,
}

impl EventNotifier {
    /// A new, non-blocking eventfd.
    pub fn new() -> Result<Self> {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::os("eventfd", e))?;
        Ok(Self { fd })
    }

    /// Raw descriptor, for VFIO_DEVICE_SET_IRQS.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// The eventfd, for interfaces that take one (VFIO's interrupt routing).
    pub(crate) fn event_fd(&self) -> &EventFd {
        &self.fd
    }

    /// A second descriptor for the same eventfd, for the party that signals it.
    pub fn dup(&self) -> Result<OwnedFd> {
        // SAFETY: the descriptor is owned by self.fd and open for the duration of this call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) };
        borrowed.try_clone_to_owned().map_err(|e| Error::os("dup eventfd", e))
    }

    /// Waits up to `timeout` for the eventfd to be signalled and clears it. Returns whether it was.
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: pfd is a valid pollfd for one descriptor that stays open during the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(Error::os("poll on interrupt eventfd", e));
        }
        Ok(n > 0 && self.clear())
    }

    /// Clears a pending signal without waiting; returns whether one was pending.
    pub fn clear(&self) -> bool {
        self.fd.read().is_ok()
    }

    /// Signals the eventfd (used to wake a waiter on shutdown).
    pub fn signal(&self) -> Result<()> {
        self.fd.write(1).map_err(|e| Error::os("eventfd write", e))
    }
}
