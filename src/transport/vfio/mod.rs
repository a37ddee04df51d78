//! A real PCI function bound to vfio-pci, as a [`Transport`].
//!
//! Opening follows the kernel's VFIO model: a container (one IOMMU address space, type1v2), the
//! function's group (which must be viable), and the device descriptor; then the function is reset
//! and its memory decoding and bus mastering are turned on. BARs are mmapped where the kernel
//! allows and otherwise reached through the descriptor; DMA regions are mapped at IOVAs inside the
//! ranges the IOMMU reports; MSI-X vectors are routed to eventfds. Closing resets the function
//! again and turns its bus mastering off, so it never keeps DMAing into memory this process is
//! about to give back.
//!
//! The container, group, device and interrupt requests are rust-vmm's `vfio-ioctls`. What it
//! lacks stays here, each with its reason in its module: BAR mmap with volatile accesses
//! (`region.rs`), the IOMMU's valid IOVA ranges and their division between the functions of one
//! container (`container.rs`), and a reset that reports failure (`device.rs`, `abi.rs`).
//!
//! When vfio-pci wants the function back (an unbind, a hot-unplug) it signals the device request
//! interrupt, which [`Transport::watch_release_request`] routes to an eventfd, and waits until
//! every descriptor of the function is closed; [`Transport::release`] then stops the function,
//! revokes its BAR mappings (stale readers see all ones) and closes its descriptor, which also
//! takes its group out of the container when it was the group's last open function.
//!
//! Several functions can share one container ([`VfioTransport::open_in`]), from one IOMMU group
//! or several: each gets its own IOVA window, and each can be closed while the others go on.
//!
//! The iommufd interface (`/dev/vfio/devices/vfioN`, `/dev/iommu`) is not driven yet: the kernels
//! this was tested on (Debian 12's) do not build it, and opening explains that when it is the only
//! interface there.

mod abi;
mod container;
mod device;
mod region;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crypt_vfio_spec::pci::{cfg, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
};
use vmm_sys_util::eventfd::EventFd;

use super::{released_error, Bar, EventNotifier, Transport};
use crate::dma::DmaRegion;
use crate::error::{Error, Result, VfioError};
use crate::pci_sysfs::{Bdf, Sysfs};
pub use container::VfioContainer;
use region::{RegionInfo, VfioBar};

/// Number of memory BARs of a type-0 PCI function.
const BARS: usize = 6;

/// A PCI function bound to vfio-pci.
pub struct VfioTransport {
    bdf: Bdf,
    /// The device descriptor; `None` once the function was given back (`release`).
    device: RwLock<Option<Arc<device::Device>>>,
    /// Whether the device request interrupt is routed (to disable it before the release).
    req_enabled: AtomicBool,
    container: Arc<VfioContainer>,
    config: RegionInfo,
    bars: Mutex<[Option<Arc<VfioBar>>; BARS]>,
    /// This function's share of the container's IOVA space.
    window: Range<u64>,
    /// The valid IOVA ranges inside the window.
    iova: Vec<Range<u64>>,
    iommu_page: u64,
    msix: u16,
    /// Whether MSI-X is routed: the kernel refuses to disable what is not enabled.
    msix_enabled: AtomicBool,
    /// Eventfds standing in for vectors the driver leaves unrouted (`vfio-ioctls` routes every
    /// vector it enables to an eventfd); nobody waits on them.
    msix_unrouted: Mutex<Vec<EventFd>>,
    /// Live DMA mappings by IOVA, holding their regions so the memory outlives the mapping.
    dma: Mutex<BTreeMap<u64, Arc<DmaRegion>>>,
}

impl VfioTransport {
    /// Opens the function at `bdf`, which must be bound to vfio-pci, in a container of its own.
    /// Each refusal says what to do: wrong address, no IOMMU, not bound, group not viable, no
    /// permission.
    pub fn open(bdf: &Bdf) -> Result<Self> {
        let sysfs = Sysfs::system();
        check(&sysfs, bdf)?;
        Self::open_with(&sysfs, &VfioContainer::open()?, bdf)
    }

    /// Opens the function at `bdf` in `container`, beside the functions already open there (of
    /// the same IOMMU group or of others). They share one IOMMU address space; each maps its DMA
    /// memory in a window of its own.
    pub fn open_in(container: &Arc<VfioContainer>, bdf: &Bdf) -> Result<Self> {
        Self::open_with(&Sysfs::system(), container, bdf)
    }

    /// Opens every function of `bdfs` in one new container.
    pub fn open_all(bdfs: &[Bdf]) -> Result<Vec<Self>> {
        let sysfs = Sysfs::system();
        for bdf in bdfs {
            check(&sysfs, bdf)?;
        }
        let container = VfioContainer::open()?;
        bdfs.iter().map(|bdf| Self::open_with(&sysfs, &container, bdf)).collect()
    }

    fn open_with(sysfs: &Sysfs, container: &Arc<VfioContainer>, bdf: &Bdf) -> Result<Self> {
        let group = check(sysfs, bdf)?;
        let device = device::open(sysfs, container, bdf, group)?;
        // Asked after the group joined: the IOMMU is set only then, and each group's reserved
        // regions narrow the ranges.
        let (valid, iommu_page) = container.iova_ranges()?;
        let window = container.take_window(&valid)?;
        let iova = valid
            .iter()
            .filter_map(|r| {
                let (start, end) = (r.start.max(window.start), r.end.min(window.end));
                (start < end).then_some(start..end)
            })
            .collect();
        let config = device::region(&device, VFIO_PCI_CONFIG_REGION_INDEX);
        let msix = u16::try_from(device::irq_count(&device, VFIO_PCI_MSIX_IRQ_INDEX)).unwrap_or(u16::MAX);
        let t = Self {
            bdf: *bdf,
            device: RwLock::new(Some(device)),
            req_enabled: AtomicBool::new(false),
            container: container.clone(),
            config,
            bars: Mutex::default(),
            window,
            iova,
            iommu_page,
            msix,
            msix_enabled: AtomicBool::new(false),
            msix_unrouted: Mutex::default(),
            dma: Mutex::default(),
        };
        // A previous user may have left the function running (or DMAing): start from reset.
        t.reset()?;
        let mut cmd = [0u8; 2];
        t.read_config(cfg::COMMAND, &mut cmd)?;
        let cmd = u16::from_le_bytes(cmd) | COMMAND_MEMORY | COMMAND_BUS_MASTER;
        t.write_config(cfg::COMMAND, &cmd.to_le_bytes())?;
        log::info!(
            "{bdf}: VFIO group {group}, IOVA window {:x?} of valid ranges {valid:x?}, IOMMU page {:#x}, {} MSI-X vectors",
            t.window,
            t.iommu_page,
            t.msix
        );
        Ok(t)
    }

    /// The function's address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The container the function was opened in, to open more functions beside it.
    pub fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }

    /// The device descriptor, or the error of a function given back.
    fn device(&self) -> Result<Arc<device::Device>> {
        let d = self.device.read().unwrap_or_else(|e| e.into_inner());
        d.clone().ok_or_else(|| released_error(&self.bdf.to_string()))
    }

    fn released(&self) -> bool {
        self.device.read().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    fn dma(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<DmaRegion>>> {
        self.dma.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn config_access(&self, offset: u16, len: usize) -> Result<()> {
        let end = u64::from(offset) + len as u64;
        if end > self.config.size {
            return Err(Error::Vfio(VfioError::Transport(format!(
                "config access {offset:#x}+{len} beyond the {:#x}-byte config space",
                self.config.size
            ))));
        }
        Ok(())
    }
}

/// Checks what sysfs shows before VFIO is asked, so that the usual mistakes get their own
/// message; returns the function's IOMMU group.
fn check(sysfs: &Sysfs, bdf: &Bdf) -> Result<u32> {
    let f = sysfs.function(bdf)?;
    let group = f.iommu_group.ok_or_else(|| Error::Vfio(VfioError::NoIommu(bdf.to_string())))?;
    if f.driver.as_deref() != Some(crate::pci_sysfs::VFIO_PCI) {
        return Err(Error::Vfio(VfioError::WrongDriver {
            bdf: bdf.to_string(),
            driver: f.driver_name().to_string(),
        }));
    }
    Ok(group)
}

impl Transport for VfioTransport {
    fn name(&self) -> String {
        self.bdf.to_string()
    }

    fn read_config(&self, offset: u16, data: &mut [u8]) -> Result<()> {
        self.config_access(offset, data.len())?;
        // vfio-ioctls logs a failed read and leaves the buffer alone: all ones is then what the
        // caller sees, as from a function that no longer answers (or was given back).
        data.fill(0xff);
        if let Ok(device) = self.device() {
            device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, data, u64::from(offset));
        }
        Ok(())
    }

    fn write_config(&self, offset: u16, data: &[u8]) -> Result<()> {
        self.config_access(offset, data.len())?;
        self.device()?.region_write(VFIO_PCI_CONFIG_REGION_INDEX, data, u64::from(offset));
        Ok(())
    }

    fn bar(&self, index: u8) -> Result<Arc<dyn Bar>> {
        let i = usize::from(index);
        if i >= BARS {
            return Err(Error::Vfio(VfioError::Transport(format!("{}: there is no BAR {index}", self.bdf))));
        }
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = &bars[i] {
            return Ok(b.clone());
        }
        let device = self.device()?;
        let info = device::region(&device, u32::from(index));
        if info.size == 0 {
            return Err(Error::Vfio(VfioError::Transport(format!(
                "{}: BAR {index} is not implemented",
                self.bdf
            ))));
        }
        let bar = Arc::new(VfioBar::new(device, info)?);
        if !bar.is_mapped() {
            log::info!("{}: BAR {index} is not mmappable; register accesses go through the kernel", self.bdf);
        }
        bars[i] = Some(bar.clone());
        Ok(bar)
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        self.iova.clone()
    }

    fn dma_map(&self, iova: u64, region: &Arc<DmaRegion>) -> Result<()> {
        let len = region.len() as u64;
        let page = self.iommu_page;
        if iova % page != 0 || len % page != 0 || (region.as_ptr() as u64) % page != 0 {
            return Err(Error::Vfio(VfioError::Dma(format!(
                "mapping {len:#x} bytes at IOVA {iova:#x}: not aligned to the IOMMU page of {page:#x} bytes"
            ))));
        }
        let fits = iova
            .checked_add(len)
            .is_some_and(|end| self.iova.iter().any(|r| r.start <= iova && end <= r.end));
        if !fits {
            return Err(Error::Vfio(VfioError::Dma(format!(
                "IOVA {iova:#x}+{len:#x} lies outside this function's valid ranges {:x?}",
                self.iova
            ))));
        }
        let mut dma = self.dma();
        // Under the DMA lock: release() takes the device before it empties the map, so a
        // mapping made here is either refused or unmapped by it.
        if self.released() {
            return Err(released_error(&self.bdf.to_string()));
        }
        if dma
            .range(..iova.saturating_add(len))
            .next_back()
            .is_some_and(|(&at, r)| at + r.len() as u64 > iova)
        {
            return Err(Error::Vfio(VfioError::Dma(format!(
                "IOVA {iova:#x}+{len:#x} overlaps a live mapping"
            ))));
        }
        // SAFETY: the region stays allocated while it is in `dma` (until its unmap succeeded, or
        // for good when that fails), and DmaRegion's memory is reached only through raw pointers
        // and volatile copies.
        unsafe { self.container.map(iova, region.as_ptr(), len)? };
        dma.insert(iova, region.clone());
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<()> {
        let mut dma = self.dma();
        if self.released() {
            return Err(released_error(&self.bdf.to_string()));
        }
        match dma.get(&iova) {
            Some(r) if r.len() as u64 == len => {}
            _ => {
                return Err(Error::Vfio(VfioError::Dma(format!(
                    "no mapping of {len:#x} bytes at IOVA {iova:#x}"
                ))))
            }
        }
        self.container.unmap(iova, len)?;
        // Only now may the memory go: the IOMMU no longer translates to it.
        dma.remove(&iova);
        Ok(())
    }

    fn msix_vectors(&self) -> u16 {
        self.msix
    }

    fn enable_msix(&self, notifiers: &[Option<&EventNotifier>]) -> Result<()> {
        if notifiers.len() > usize::from(self.msix) {
            return Err(Error::Vfio(VfioError::Transport(format!(
                "{}: {} MSI-X vectors asked, the function has {}",
                self.bdf,
                notifiers.len(),
                self.msix
            ))));
        }
        let mut unrouted = self.msix_unrouted.lock().unwrap_or_else(|e| e.into_inner());
        *unrouted = notifiers
            .iter()
            .filter(|n| n.is_none())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::os("eventfd", e))?;
        let mut spare = unrouted.iter();
        let fds: Vec<&EventFd> =
            notifiers.iter().filter_map(|n| n.map(|n| n.event_fd()).or_else(|| spare.next())).collect();
        device::set_irq_eventfds(&*self.device()?, VFIO_PCI_MSIX_IRQ_INDEX, fds)?;
        self.msix_enabled.store(true, Ordering::Release);
        Ok(())
    }

    fn disable_msix(&self) -> Result<()> {
        let device = self.device()?;
        if !self.msix_enabled.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        device::disable_irq(&device, VFIO_PCI_MSIX_IRQ_INDEX)?;
        self.msix_unrouted.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }

    fn reset(&self) -> Result<()> {
        if !device::reset(&*self.device()?)? {
            log::debug!(
                "{}: the kernel cannot reset this function; relying on the virtio status reset",
                self.bdf
            );
        }
        Ok(())
    }

    fn watch_release_request(&self, notifier: &EventNotifier) -> Result<bool> {
        let device = self.device()?;
        // Kernels before 4.0 have no device request interrupt; vfio-pci then waits for the
        // process to close the function by itself.
        if device::irq_count(&device, VFIO_PCI_REQ_IRQ_INDEX) < 1 {
            return Ok(false);
        }
        // Giving the device back drops it while the kernel removes the function; vfio-ioctls
        // would then panic reading the function's vanished sysfs directory.
        if !device.has_private_path() {
            log::warn!("{}: no private device path; not answering release requests", self.bdf);
            return Ok(false);
        }
        device::set_irq_eventfds(&device, VFIO_PCI_REQ_IRQ_INDEX, vec![notifier.event_fd()])?;
        self.req_enabled.store(true, Ordering::Release);
        Ok(true)
    }

    fn release(&self) -> Result<()> {
        if self.released() {
            return Ok(());
        }
        let bdf = self.bdf;
        self.unwatch_release_request();
        // While the kernel removes the function it holds its lock, and vfio-pci's reset then
        // answers EAGAIN: the virtio reset and bus mastering off have to do.
        self.quiesce(true);
        // From here on the transport is released: every later call fails or reads all ones,
        // and what checks `device` under the DMA or BAR lock adds nothing after the steps below.
        let Some(last) = self.device.write().unwrap_or_else(|e| e.into_inner()).take() else { return Ok(()) };
        let all_unmapped = self.unmap_all();
        // Stale readers of a BAR see all ones from now on, and no mapping holds the device
        // file open any more. A BAR mapped by bar() before `device` was taken is in the list
        // by now (bar() holds the list's lock while it maps).
        for bar in self.bars.lock().unwrap_or_else(|e| e.into_inner()).iter().flatten() {
            bar.revoke(&bdf.to_string());
        }
        // The last reference: vfio-ioctls closes the descriptor and, if this was the group's
        // last open function, takes the group out of the container. (Linux 6.1 and later do
        // that themselves once the removed function's last descriptor closes, and may be first:
        // vfio-ioctls then logs "Could not unbind VFIO group", EINVAL, which is harmless.)
        if Arc::strong_count(&last) > 1 {
            log::warn!("{bdf}: the device descriptor is still held elsewhere; the kernel waits for it");
        }
        drop(last);
        if all_unmapped {
            self.container.release_window(&self.window);
        }
        log::info!("{bdf}: given back to the kernel");
        Ok(())
    }

    fn unwatch_release_request(&self) {
        if !self.req_enabled.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Ok(device) = self.device() {
            if let Err(e) = device::disable_irq(&device, VFIO_PCI_REQ_IRQ_INDEX) {
                log::warn!("{}: disabling the device request interrupt: {e}", self.bdf);
            }
        }
    }
}

impl VfioTransport {
    /// Stops the function before any of its DMA memory is unmapped: MSI-X off, a function-level
    /// reset, bus mastering off (the driver stopped the function already; these make sure of
    /// it). `releasing`: the kernel may be removing the function, when the reset's EAGAIN is
    /// expected.
    fn quiesce(&self, releasing: bool) {
        let bdf = self.bdf;
        if let Err(e) = self.disable_msix() {
            log::warn!("{bdf}: disabling MSI-X: {e}");
        }
        match self.reset() {
            Err(Error::Os { source, .. }) if releasing && source.raw_os_error() == Some(libc::EAGAIN) => {
                log::info!("{bdf}: no function-level reset on release: the kernel holds the function")
            }
            Err(e) => log::warn!("{bdf}: reset on {}: {e}", if releasing { "release" } else { "close" }),
            Ok(()) => {}
        }
        let mut cmd = [0u8; 2];
        if self.read_config(cfg::COMMAND, &mut cmd).is_ok() {
            let cmd = u16::from_le_bytes(cmd) & !COMMAND_BUS_MASTER;
            let _ = self.write_config(cfg::COMMAND, &cmd.to_le_bytes());
        }
    }

    /// Unmaps every live DMA mapping (the memory is kept where the unmap fails: the device may
    /// still reach it). Returns whether all went.
    fn unmap_all(&self) -> bool {
        let dma = std::mem::take(&mut *self.dma());
        let mut all_unmapped = true;
        for (iova, region) in dma {
            if let Err(e) = self.container.unmap(iova, region.len() as u64) {
                log::warn!("{}: {e}; the memory is kept and the IOVA window never reused", self.bdf);
                // The device may still reach it: the memory must never be freed or reused.
                std::mem::forget(region);
                all_unmapped = false;
            }
        }
        all_unmapped
    }
}

impl Drop for VfioTransport {
    fn drop(&mut self) {
        if self.released() {
            // Given back already: stopped, unmapped, its window returned.
            return;
        }
        self.unwatch_release_request();
        self.quiesce(false);
        if self.unmap_all() {
            self.container.release_window(&self.window);
        }
    }
}

/// Run in a QEMU guest by tools/vfio-guest-test.sh, on real virtio-crypto functions behind a
/// real vfio-pci and IOMMU; there is nothing to run them on elsewhere, so they are ignored.
#[cfg(test)]
mod guest_tests {
    use futures::executor::block_on;

    use super::*;
    use crate::engine::async_api::AsyncQueue;
    use crate::engine::software::SoftwareEngine;
    use crate::engine::{Buf, Engine};
    use crate::virtio_crypto::{DeviceOptions, VirtioCrypto};
    use crate::{CoreKind, Mode};

    /// The functions to use, from CRYPT_VFIO_GUEST_FUNCTIONS (comma-separated addresses).
    fn functions() -> Vec<Bdf> {
        let list = std::env::var("CRYPT_VFIO_GUEST_FUNCTIONS")
            .expect("CRYPT_VFIO_GUEST_FUNCTIONS must name the functions bound to vfio-pci");
        list.split(',').map(|s| s.parse().expect("a PCI address")).collect()
    }

    /// Encrypts the same data on `dev` and in software, with XTS and CBC; `seed` keeps the data
    /// of two devices apart.
    fn matches_software(dev: &VirtioCrypto, seed: u8) {
        let sw = SoftwareEngine::new(CoreKind::Reference);
        let (hq, sq) = (AsyncQueue::new(dev, 0, true).unwrap(), AsyncQueue::new(&sw, 0, true).unwrap());
        for (mode, key_len) in [(Mode::Xts, 64), (Mode::Cbc, 32)] {
            let key: Vec<u8> = (0..key_len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
            let (hs, ss) = (dev.create_session(mode, &key).unwrap(), sw.create_session(mode, &key).unwrap());
            for round in 0..8u8 {
                let data: Vec<u8> = (0..65536).map(|i| (i as u8) ^ round ^ seed).collect();
                let iv = [round ^ seed; 16];
                let (on_device, _) =
                    block_on(hq.encrypt(hs.clone(), &iv, &[], Buf::Host(data.clone()))).unwrap();
                let (in_software, _) = block_on(sq.encrypt(ss.clone(), &iv, &[], Buf::Host(data))).unwrap();
                assert!(
                    on_device.as_slice() == in_software.as_slice(),
                    "{}: {mode} round {round} differs from software",
                    dev.describe()
                );
            }
            dev.destroy_session(&hs).unwrap();
        }
    }

    #[test]
    #[ignore = "needs virtio-crypto functions bound to vfio-pci: run by tools/vfio-guest-test.sh"]
    fn functions_in_one_container_work_side_by_side_and_leave_one_by_one() {
        // vfio-ioctls reports trouble (a group it could not release) only in its log.
        let _ = env_logger::builder().is_test(true).filter_level(log::LevelFilter::Warn).try_init();
        let bdfs = functions();
        assert!(bdfs.len() >= 2, "two functions or more are needed, got {bdfs:?}");
        let container = VfioContainer::open().unwrap();
        let opened: Vec<VfioTransport> =
            bdfs.iter().map(|b| VfioTransport::open_in(&container, b).unwrap()).collect();
        for (i, a) in opened.iter().enumerate() {
            assert!(Arc::ptr_eq(a.container(), &container));
            for b in &opened[i + 1..] {
                assert!(a.window.end <= b.window.start || b.window.end <= a.window.start, "windows overlap");
            }
        }
        let windows: Vec<Range<u64>> = opened.iter().map(|t| t.window.clone()).collect();
        let mut devices: Vec<VirtioCrypto> = opened
            .into_iter()
            .map(|t| VirtioCrypto::open(Arc::new(t), &DeviceOptions::default()).unwrap())
            .collect();
        // All at once: each device DMAs into its own window of the one IOMMU address space.
        std::thread::scope(|s| {
            for (i, dev) in devices.iter().enumerate() {
                s.spawn(move || matches_software(dev, i as u8));
            }
        });
        // The first one leaves: its window goes back, the others go on.
        drop(devices.remove(0));
        assert_eq!(container.windows().len(), bdfs.len() - 1, "closing a function releases its IOVA window");
        for (i, dev) in devices.iter().enumerate() {
            matches_software(dev, 0x40 + i as u8);
        }
        // And comes back into the same container, beside them.
        let back = VfioTransport::open_in(&container, &bdfs[0]).unwrap();
        assert_eq!(back.window, windows[0], "the released window is the first free one");
        let back = VirtioCrypto::open(Arc::new(back), &DeviceOptions::default()).unwrap();
        matches_software(&back, 0x80);
    }

    #[test]
    #[ignore = "needs virtio-crypto functions bound to vfio-pci: run by tools/vfio-guest-test.sh"]
    fn a_function_the_kernel_takes_back_is_given_back_while_its_neighbour_goes_on() {
        use crate::virtio_crypto::ReleaseState;
        let _ = env_logger::builder().is_test(true).filter_level(log::LevelFilter::Info).try_init();
        let bdfs = functions();
        assert!(bdfs.len() >= 2, "two functions are needed, got {bdfs:?}");
        let container = VfioContainer::open().unwrap();
        let devices: Vec<VirtioCrypto> = bdfs[..2]
            .iter()
            .map(|b| {
                let t = VfioTransport::open_in(&container, b).unwrap();
                VirtioCrypto::open(Arc::new(t), &DeviceOptions::default()).unwrap()
            })
            .collect();
        matches_software(&devices[0], 1);
        // The kernel wants the first one back: the unbind blocks until crypt-vfio gives it back
        // (the kernel asks again only after 10 s).
        let unbind = format!("/sys/bus/pci/devices/{}/driver/unbind", bdfs[0]);
        let bdf = bdfs[0].to_string();
        let start = std::time::Instant::now();
        let unbinding = std::thread::spawn(move || std::fs::write(unbind, bdf));
        unbinding.join().unwrap().expect("the unbind");
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_secs(10), "the kernel waited {took:?} for the function");
        // The kernel goes on as soon as the descriptor closes, a moment before the engine
        // records the release.
        while devices[0].release_state() != ReleaseState::Released {
            assert!(start.elapsed() < std::time::Duration::from_secs(30), "{:?}", devices[0].release_state());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(container.windows().len(), 1, "the released function's IOVA window went back");
        // Its neighbour in the container goes on.
        matches_software(&devices[1], 2);
        // Given back for good: bound again, it opens afresh in a new container while the old
        // one lives on.
        std::fs::write("/sys/bus/pci/drivers_probe", bdfs[0].to_string()).unwrap();
        let back = VfioTransport::open(&bdfs[0]).expect("the released group opens again");
        let back = VirtioCrypto::open(Arc::new(back), &DeviceOptions::default()).unwrap();
        matches_software(&back, 3);
        matches_software(&devices[1], 4);
    }
}
