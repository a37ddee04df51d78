//! Bringing a failed device back.
//!
//! A failure is often transient (one lost answer, a firmware hiccup), and a storage stack that
//! dies with its first device error is not one people can run. So when the device fails, a
//! thread of the engine waits for it ([`DeviceHealth::wait_for_failure`]), fails every request
//! still on the queues (they complete exactly once, with the error: an in-place operation is
//! never retried behind its caller's back), resets the device, negotiates the same features,
//! sets every queue up again on the same memory, and re-creates the sessions callers still hold
//! from the keys they keep. Only then does it let requests in again.

use std::sync::Arc;
use std::thread::JoinHandle;

use crypt_vfio_spec::pci::feature;

use super::data_queue::DataQueueShared;
use super::Core;
use crate::engine::Direction;
use crate::error::{DeviceError, Error, Result};
use crate::transport::EventNotifier;

/// Starts the recovery thread of `core`; it ends when the engine closes.
pub(crate) fn spawn(core: Arc<Core>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("crypt-vfio-recovery".into()).spawn(move || {
        while core.health.wait_for_failure() {
            match recover(&core) {
                Ok(()) => DataQueueShared::resume_all(&core.queues, || core.health.recovered()),
                Err(_) if core.health.closing() => {
                    // Cut short by the engine closing: leave the device stopped (or, if it
                    // will not stop, without access to any memory) before buffers go back.
                    core.health.stop_again();
                    fail_queues(&core);
                }
                Err(e) => {
                    core.health.recovery_failed(&e);
                    // Leave the device stopped before the next attempt or giving up. One that
                    // will not stop may still answer a control request of this attempt into
                    // the buffer the next one would reuse: it is given up, its DMA revoked.
                    core.health.stop_again();
                    fail_queues(&core);
                }
            }
        }
        // Closing: the engine's drop fails what is left.
    })
}

fn fail_queues(core: &Core) {
    let mut scratch = Vec::new();
    for q in &core.queues {
        q.fail_all(&mut scratch);
    }
}

/// One recovery: the device was stopped by the failure (`DeviceHealth::fail`).
fn recover(core: &Core) -> Result<()> {
    // Everything that was on the device completes now, with the failure.
    fail_queues(core);
    let closing = || {
        if core.health.closing() {
            Err(Error::Device(DeviceError::Failed("the engine is closing".into())))
        } else {
            Ok(())
        }
    };
    closing()?;
    let mut ctl = core.control.lock().unwrap_or_else(|e| e.into_inner());
    let pci = &core.pci;
    pci.enable_bus_master()?;
    let features = pci.negotiate(1 << feature::VERSION_1, core.features)?;
    if features != core.features {
        return Err(Error::Device(DeviceError::Init(format!(
            "after the reset the device accepts features {features:#x}, not {:#x} as before",
            core.features
        ))));
    }
    if core.interrupts {
        // A function-level reset disables MSI-X: route the vectors again.
        let mut refs: Vec<Option<&EventNotifier>> = vec![core.config_irq.as_ref()];
        refs.extend(core.queues.iter().map(|q| q.irq.as_ref()));
        pci.transport().enable_msix(&refs)?;
        pci.set_config_vector(0);
    }
    ctl.restart(pci)?;
    for q in &core.queues {
        q.restart(pci)?;
    }
    closing()?;
    pci.driver_ok();
    let epoch = core.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
    let sessions = core.sessions.live();
    for (mode, s) in &sessions {
        closing()?;
        let enc = ctl.create(*mode, Direction::Encrypt, &s.key)?;
        let dec = ctl.create(*mode, Direction::Decrypt, &s.key)?;
        s.set_ids(enc, dec, epoch);
    }
    drop(ctl);
    log::info!("virtio-crypto device re-initialised, {} session(s) re-created", sessions.len());
    Ok(())
}
