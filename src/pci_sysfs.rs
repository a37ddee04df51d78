//! PCI functions as sysfs shows them: discovery, IOMMU groups, and driver binding.
//!
//! `crypt-vfio list`, `bind` and `unbind`, and the VFIO transport's diagnostics, all read the same
//! places: `/sys/bus/pci/devices`, `/sys/kernel/iommu_groups` and `/dev/vfio`. Everything goes
//! through a [`Sysfs`] rooted at `/` on a real system and at a temporary directory in tests, so
//! the rules (which functions are ours, when a group is viable, what to write where to rebind
//! a function) are tested without a kernel. Nothing here issues an ioctl.

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crypt_vfio_spec::pci::{VIRTIO_CRYPTO_DEVICE_ID, VIRTIO_CRYPTO_LEGACY_DEVICE_ID, VIRTIO_VENDOR_ID};

use crate::error::{DeviceError, Error, Result, VfioError};

/// The driver that hands a PCI function to userspace.
pub const VFIO_PCI: &str = "vfio-pci";

/// Host drivers that may hold other functions of a group without making it unviable: pci-stub
/// claims a function only to keep others off it, and pcieport drives bridges, which VFIO
/// tolerates in a group.
const HARMLESS_DRIVERS: [&str; 3] = [VFIO_PCI, "pci-stub", "pcieport"];

/// A PCI address: domain, bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// The address `domain:bus:device.function`; `None` when the device or function is out of
    /// range (32 devices of 8 functions per bus).
    pub fn new(domain: u32, bus: u8, device: u8, function: u8) -> Option<Self> {
        (device < 32 && function < 8).then_some(Self { domain, bus, device, function })
    }
}

impl FromStr for Bdf {
    type Err = Error;

    /// Parses `DDDD:BB:DD.F`, or `BB:DD.F` in domain 0 (the forms lspci prints).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Vfio(VfioError::InvalidAddress(s.to_string()));
        let hex = |part: &str, max_len: usize| -> Result<u32> {
            if part.is_empty() || part.len() > max_len || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(part, 16).map_err(|_| bad())
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        let (domain, bus, devfn) = match parts[..] {
            [d, b, df] => (hex(d, 8)?, b, df),
            [b, df] => (0, b, df),
            _ => return Err(bad()),
        };
        let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
        let bus = hex(bus, 2)? as u8;
        let dev = u8::try_from(hex(dev, 2)?).map_err(|_| bad())?;
        let func = u8::try_from(hex(func, 1)?).map_err(|_| bad())?;
        Bdf::new(domain, bus, dev, func).ok_or_else(bad)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

/// What a PCI function is to crypt-vfio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptoKind {
    /// Modern virtio-crypto (1af4:1054): driven by crypt-vfio.
    VirtioCrypto,
    /// Transitional virtio-crypto (1af4:1014): recognised, not driven.
    LegacyVirtioCrypto,
    /// Anything else.
    Other,
}

/// One PCI function as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Its address.
    pub bdf: Bdf,
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// Class code (class, subclass, prog-if).
    pub class: u32,
    /// The bound driver, if any.
    pub driver: Option<String>,
    /// The IOMMU group, if the kernel runs an IOMMU for the function.
    pub iommu_group: Option<u32>,
}

impl PciFunction {
    /// What the function is to crypt-vfio.
    pub fn kind(&self) -> CryptoKind {
        match (self.vendor, self.device) {
            (VIRTIO_VENDOR_ID, VIRTIO_CRYPTO_DEVICE_ID) => CryptoKind::VirtioCrypto,
            (VIRTIO_VENDOR_ID, VIRTIO_CRYPTO_LEGACY_DEVICE_ID) => CryptoKind::LegacyVirtioCrypto,
            _ => CryptoKind::Other,
        }
    }

    /// The driver's name, or `none`.
    pub fn driver_name(&self) -> &str {
        self.driver.as_deref().unwrap_or("none")
    }

    fn is_vfio(&self) -> bool {
        self.driver.as_deref() == Some(VFIO_PCI)
    }
}

/// What the kernel offers for VFIO, as far as the file system shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioSupport {
    /// The PCI bus is visible in sysfs.
    pub pci_bus: bool,
    /// An IOMMU is active (`/sys/class/iommu` lists one).
    pub iommu: bool,
    /// The vfio-pci driver is loaded.
    pub vfio_pci: bool,
    /// The legacy container interface, `/dev/vfio/vfio`.
    pub container: bool,
    /// The per-device cdev interface for iommufd, `/dev/vfio/devices`.
    pub cdev: bool,
}

impl VfioSupport {
    /// Why VFIO cannot be used here, with what to do, or `None` if it looks usable.
    pub fn problem(&self) -> Option<String> {
        if !self.pci_bus {
            return Some("no PCI bus is visible in /sys/bus/pci (is sysfs mounted?)".into());
        }
        if !self.iommu {
            return Some(
                "no IOMMU is active: enable it on the kernel command line (intel_iommu=on or amd_iommu=on) \
                 and reboot"
                    .into(),
            );
        }
        if !self.vfio_pci || !self.container {
            let what = if self.cdev && !self.container {
                "this kernel offers only the iommufd device interface (/dev/vfio/devices), which crypt-vfio \
                 does not drive yet; a kernel with CONFIG_VFIO_CONTAINER=y is needed"
            } else {
                "the vfio-pci driver is not loaded: run `modprobe vfio-pci` as root"
            };
            return Some(what.into());
        }
        None
    }
}

/// How `bind` left a function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindOutcome {
    /// The driver it was taken from (`None` if it had none or already had vfio-pci).
    pub previous: Option<String>,
    /// Whether it was bound to vfio-pci before the call.
    pub already: bool,
    /// Its IOMMU group.
    pub group: u32,
}

/// How `unbind` left a function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnbindOutcome {
    /// Whether it was bound to vfio-pci before the call.
    pub was_vfio: bool,
    /// The driver it has now.
    pub driver: Option<String>,
}

/// A view of sysfs and /dev rooted somewhere.
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::system()
    }
}

impl Sysfs {
    /// The running system's sysfs.
    pub fn system() -> Self {
        Self { root: PathBuf::from("/") }
    }

    /// A tree laid out like `/` under `root` (for tests).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn devices_dir(&self) -> PathBuf {
        self.path("sys/bus/pci/devices")
    }

    fn device_dir(&self, bdf: &Bdf) -> PathBuf {
        self.devices_dir().join(bdf.to_string())
    }

    fn driver_dir(&self, driver: &str) -> PathBuf {
        self.path("sys/bus/pci/drivers").join(driver)
    }

    /// The sysfs directory of the function at `bdf`, as VFIO opens functions by it.
    pub fn device_path(&self, bdf: &Bdf) -> PathBuf {
        self.device_dir(bdf)
    }

    /// The VFIO group device node of `group`.
    pub fn group_node(&self, group: u32) -> PathBuf {
        self.path("dev/vfio").join(group.to_string())
    }

    /// The VFIO container node.
    pub fn container_node(&self) -> PathBuf {
        self.path("dev/vfio/vfio")
    }

    /// What the kernel offers for VFIO.
    pub fn vfio_support(&self) -> VfioSupport {
        let non_empty = |p: PathBuf| fs::read_dir(p).is_ok_and(|mut d| d.next().is_some());
        VfioSupport {
            pci_bus: self.devices_dir().is_dir(),
            iommu: non_empty(self.path("sys/class/iommu")) || non_empty(self.path("sys/kernel/iommu_groups")),
            vfio_pci: self.driver_dir(VFIO_PCI).is_dir(),
            container: self.container_node().exists(),
            cdev: self.path("dev/vfio/devices").is_dir(),
        }
    }

    /// Every PCI function, in address order.
    pub fn functions(&self) -> Result<Vec<PciFunction>> {
        let dir = self.devices_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::os(format!("reading {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::os(format!("reading {}", dir.display()), e))?;
            // Entries that are not addresses are not functions (sysfs has none, but a tree we
            // are pointed at might).
            let Ok(bdf) = entry.file_name().to_string_lossy().parse::<Bdf>() else { continue };
            out.push(self.function(&bdf)?);
        }
        out.sort_by_key(|f| f.bdf);
        Ok(out)
    }

    /// The crypto functions (modern and legacy virtio-crypto).
    pub fn crypto_functions(&self) -> Result<Vec<PciFunction>> {
        Ok(self.functions()?.into_iter().filter(|f| f.kind() != CryptoKind::Other).collect())
    }

    /// The modern virtio-crypto functions bound to vfio-pci, in address order: the devices
    /// `--device auto` may pick (a legacy function or one a host driver holds is not offered).
    pub fn vfio_bound_crypto(&self) -> Result<Vec<PciFunction>> {
        Ok(self
            .functions()?
            .into_iter()
            .filter(|f| f.kind() == CryptoKind::VirtioCrypto && f.is_vfio())
            .collect())
    }

    /// The function at `bdf`.
    pub fn function(&self, bdf: &Bdf) -> Result<PciFunction> {
        let dir = self.device_dir(bdf);
        if !dir.is_dir() {
            return Err(Error::Vfio(VfioError::NoSuchDevice(bdf.to_string())));
        }
        let vendor = read_hex(&dir.join("vendor"))?;
        let device = read_hex(&dir.join("device"))?;
        let class = read_hex(&dir.join("class"))?;
        let (Ok(vendor), Ok(device)) = (u16::try_from(vendor), u16::try_from(device)) else {
            return Err(Error::Device(DeviceError::Unsupported(format!(
                "{bdf}: impossible vendor/device {vendor:#x}:{device:#x}"
            ))));
        };
        let driver = link_name(&dir.join("driver"));
        let iommu_group = link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok());
        Ok(PciFunction { bdf: *bdf, vendor, device, class, driver, iommu_group })
    }

    /// The functions in IOMMU group `group`.
    pub fn group_members(&self, group: u32) -> Result<Vec<PciFunction>> {
        let dir = self.path("sys/kernel/iommu_groups").join(group.to_string()).join("devices");
        let entries = fs::read_dir(&dir).map_err(|e| Error::os(format!("reading {}", dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::os(format!("reading {}", dir.display()), e))?;
            if let Ok(bdf) = entry.file_name().to_string_lossy().parse::<Bdf>() {
                out.push(self.function(&bdf)?);
            }
        }
        out.sort_by_key(|f| f.bdf);
        Ok(out)
    }

    /// The other functions of `f`'s group that keep it from being viable, as
    /// `0000:00:1f.3 (snd_hda_intel)`.
    fn blockers(&self, f: &PciFunction, group: u32) -> Result<Vec<String>> {
        Ok(self
            .group_members(group)?
            .into_iter()
            .filter(|m| m.bdf != f.bdf)
            .filter_map(|m| {
                let d = m.driver.as_deref()?;
                (!HARMLESS_DRIVERS.contains(&d)).then(|| format!("{} ({d})", m.bdf))
            })
            .collect())
    }

    /// Whether crypt-vfio can open `f` now; if not, the error says why and what to do.
    pub fn check_ready(&self, f: &PciFunction) -> Result<()> {
        check_supported(f)?;
        let group = f.iommu_group.ok_or_else(|| Error::Vfio(VfioError::NoIommu(f.bdf.to_string())))?;
        if !f.is_vfio() {
            return Err(Error::Vfio(VfioError::WrongDriver {
                bdf: f.bdf.to_string(),
                driver: f.driver_name().to_string(),
            }));
        }
        let blockers = self.blockers(f, group)?;
        if !blockers.is_empty() {
            return Err(Error::Vfio(VfioError::GroupNotViable { group, blockers: blockers.join(", ") }));
        }
        let node = self.group_node(group);
        if !node.exists() {
            return Err(Error::Vfio(VfioError::NoVfio(format!(
                "{} does not exist although vfio-pci holds {}",
                node.display(),
                f.bdf
            ))));
        }
        for path in [node, self.container_node()] {
            if !accessible(&path) {
                return Err(Error::vfio_permission(path.display().to_string()));
            }
        }
        Ok(())
    }

    /// Hands `bdf` to vfio-pci, the way driverctl and dpdk-devbind do: driver_override, unbind
    /// from the current driver, drivers_probe. Refuses, changing nothing, when the function is
    /// not a supported crypto device, has no IOMMU group, vfio-pci is not loaded, or other
    /// functions of its group are still used by host drivers.
    pub fn bind(&self, bdf: &Bdf) -> Result<BindOutcome> {
        let f = self.function(bdf)?;
        check_supported(&f)?;
        let group = f.iommu_group.ok_or_else(|| Error::Vfio(VfioError::NoIommu(bdf.to_string())))?;
        if f.is_vfio() {
            return Ok(BindOutcome { previous: None, already: true, group });
        }
        if !self.driver_dir(VFIO_PCI).is_dir() {
            return Err(Error::Vfio(VfioError::NoVfio("the vfio-pci driver is not loaded".into())));
        }
        let blockers = self.blockers(&f, group)?;
        if !blockers.is_empty() {
            return Err(Error::Vfio(VfioError::GroupNotViable { group, blockers: blockers.join(", ") }));
        }
        let dir = self.device_dir(bdf);
        write_attr(&dir.join("driver_override"), VFIO_PCI)?;
        if let Some(driver) = &f.driver {
            log::info!("{bdf}: unbinding from {driver}");
            write_attr(&self.driver_dir(driver).join("unbind"), &bdf.to_string())?;
        }
        write_attr(&self.path("sys/bus/pci/drivers_probe"), &bdf.to_string())?;
        let now = self.function(bdf)?;
        if !now.is_vfio() {
            return Err(Error::Vfio(VfioError::NoVfio(format!(
                "vfio-pci did not take {bdf} after drivers_probe (its driver is now {})",
                now.driver_name()
            ))));
        }
        Ok(BindOutcome { previous: f.driver, already: false, group })
    }

    /// Gives `bdf` back to the host: unbinds it from vfio-pci, clears driver_override, and lets
    /// the kernel probe its own driver. A function bound to another driver is left alone.
    pub fn unbind(&self, bdf: &Bdf) -> Result<UnbindOutcome> {
        let f = self.function(bdf)?;
        let dir = self.device_dir(bdf);
        if f.is_vfio() {
            write_attr(&self.driver_dir(VFIO_PCI).join("unbind"), &bdf.to_string())?;
        } else if f.driver.is_some() {
            return Ok(UnbindOutcome { was_vfio: false, driver: f.driver });
        }
        // A newline clears the override (an empty write is refused by some kernels).
        write_attr(&dir.join("driver_override"), "\n")?;
        write_attr(&self.path("sys/bus/pci/drivers_probe"), &bdf.to_string())?;
        Ok(UnbindOutcome { was_vfio: f.is_vfio(), driver: self.function(bdf)?.driver })
    }
}

fn check_supported(f: &PciFunction) -> Result<()> {
    match f.kind() {
        CryptoKind::VirtioCrypto => Ok(()),
        CryptoKind::LegacyVirtioCrypto => Err(Error::Device(DeviceError::Unsupported(format!(
            "{} is a legacy (transitional) virtio-crypto device {:04x}:{:04x}; crypt-vfio drives only modern \
             virtio-crypto ({VIRTIO_VENDOR_ID:04x}:{VIRTIO_CRYPTO_DEVICE_ID:04x}); with QEMU, add disable-legacy=on",
            f.bdf, f.vendor, f.device
        )))),
        CryptoKind::Other => Err(Error::Device(DeviceError::Unsupported(format!(
            "{} is {:04x}:{:04x}, not a virtio-crypto device; crypt-vfio binds only crypto functions (use \
             driverctl or dpdk-devbind for others)",
            f.bdf, f.vendor, f.device
        )))),
    }
}

/// Reads a sysfs attribute holding `0x…`.
fn read_hex(path: &Path) -> Result<u32> {
    let text = fs::read_to_string(path).map_err(|e| Error::os(format!("reading {}", path.display()), e))?;
    let t = text.trim();
    u32::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).map_err(|_| {
        Error::Device(DeviceError::Unsupported(format!(
            "{}: `{t}` is not a hexadecimal number",
            path.display()
        )))
    })
}

/// The last component of the target of the symbolic link `path` (a driver or group name).
fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Writes a sysfs attribute (which must exist: sysfs never creates files).
fn write_attr(path: &Path, value: &str) -> Result<()> {
    let r = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| io::Write::write_all(&mut f, value.as_bytes()));
    r.map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => Error::Vfio(VfioError::PermissionDenied {
            path: path.display().to_string(),
            fix: "changing a function's driver needs root: run crypt-vfio bind/unbind as root".into(),
        }),
        _ => Error::os(format!("writing `{}` to {}", value.trim(), path.display()), e),
    })
}

/// Whether the real user may read and write `path`.
fn accessible(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: `c` is a NUL-terminated path that lives across the call; access only reads it.
    unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) == 0 }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A sysfs-shaped tree in a temporary directory, removed on drop (also used by the VFIO
    /// transport's tests of its messages).
    pub(crate) struct FakeSysfs {
        pub(crate) root: PathBuf,
    }

    impl FakeSysfs {
        pub(crate) fn new(name: &str) -> Self {
            let root = std::env::temp_dir().join(format!("crypt-vfio-sysfs-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            for d in ["sys/bus/pci/devices", "sys/bus/pci/drivers", "sys/kernel/iommu_groups", "dev/vfio"] {
                fs::create_dir_all(root.join(d)).unwrap();
            }
            fs::write(root.join("sys/bus/pci/drivers_probe"), "").unwrap();
            Self { root }
        }

        pub(crate) fn sysfs(&self) -> Sysfs {
            Sysfs::at(&self.root)
        }

        fn driver(&self, name: &str) {
            let d = self.root.join("sys/bus/pci/drivers").join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("unbind"), "").unwrap();
        }

        pub(crate) fn function(&self, bdf: &str, id: (u16, u16), driver: Option<&str>, group: Option<u32>) {
            let dir = self.root.join("sys/bus/pci/devices").join(bdf);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("vendor"), format!("{:#06x}\n", id.0)).unwrap();
            fs::write(dir.join("device"), format!("{:#06x}\n", id.1)).unwrap();
            fs::write(dir.join("class"), "0x100000\n").unwrap();
            fs::write(dir.join("driver_override"), "(null)\n").unwrap();
            if let Some(d) = driver {
                self.driver(d);
                symlink(self.root.join("sys/bus/pci/drivers").join(d), dir.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gdir = self.root.join("sys/kernel/iommu_groups").join(g.to_string());
                fs::create_dir_all(gdir.join("devices")).unwrap();
                symlink(&gdir, dir.join("iommu_group")).unwrap();
                symlink(&dir, gdir.join("devices").join(bdf)).unwrap();
            }
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.root.join(rel)).unwrap()
        }

        /// Moves a function to another driver, as the kernel would after a probe.
        fn rebind(&self, bdf: &str, driver: &str) {
            let link = self.root.join("sys/bus/pci/devices").join(bdf).join("driver");
            let _ = fs::remove_file(&link);
            self.driver(driver);
            symlink(self.root.join("sys/bus/pci/drivers").join(driver), link).unwrap();
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    const CRYPTO: (u16, u16) = (0x1af4, 0x1054);
    const LEGACY: (u16, u16) = (0x1af4, 0x1014);
    const AUDIO: (u16, u16) = (0x8086, 0x2668);

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_parse_in_both_forms_and_bad_ones_are_named() {
        assert_eq!(bdf("0000:00:02.0").to_string(), "0000:00:02.0");
        assert_eq!(bdf("3b:1f.7").to_string(), "0000:3b:1f.7");
        assert_eq!(bdf("10000:e1:00.1").to_string(), "10000:e1:00.1");
        for bad in [
            "",
            "00:02",
            "0000:00:20.0",
            "0000:00:02.8",
            "zz:00.0",
            "0000:000:02.0",
            "00:02.0.1",
            "1:2:3:4.0",
        ] {
            match bad.parse::<Bdf>() {
                Err(Error::Vfio(VfioError::InvalidAddress(s))) => assert_eq!(s, bad),
                other => panic!("`{bad}` parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn lists_crypto_functions_with_driver_and_group() {
        let t = FakeSysfs::new("list");
        t.function("0000:00:1f.3", AUDIO, Some("snd_hda_intel"), Some(3));
        t.function("0000:00:03.0", LEGACY, Some("virtio-pci"), Some(4));
        t.function("0000:00:02.0", CRYPTO, Some("virtio-pci"), Some(2));
        let s = t.sysfs();
        let found = s.crypto_functions().unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].bdf, bdf("0000:00:02.0"));
        assert_eq!(found[0].kind(), CryptoKind::VirtioCrypto);
        assert_eq!(found[0].driver.as_deref(), Some("virtio-pci"));
        assert_eq!(found[0].iommu_group, Some(2));
        assert_eq!(found[1].kind(), CryptoKind::LegacyVirtioCrypto);
        assert!(
            matches!(s.check_ready(&found[1]), Err(Error::Device(DeviceError::Unsupported(m))) if m.contains("disable-legacy"))
        );
        match s.check_ready(&found[0]) {
            Err(Error::Vfio(VfioError::WrongDriver { driver, .. })) => assert_eq!(driver, "virtio-pci"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_modern_functions_held_by_vfio_pci_are_offered_for_auto() {
        let fake = FakeSysfs::new("auto");
        assert!(fake.sysfs().vfio_bound_crypto().unwrap().is_empty());
        fake.function("0000:00:05.0", CRYPTO, Some("vfio-pci"), Some(5));
        fake.function("0000:00:04.0", CRYPTO, Some("virtio-pci"), Some(4));
        fake.function("0000:00:06.0", LEGACY, Some("vfio-pci"), Some(6));
        fake.function("0000:00:07.0", AUDIO, Some("vfio-pci"), Some(7));
        fake.function("0000:00:03.0", CRYPTO, Some("vfio-pci"), Some(3));
        let found: Vec<Bdf> = fake.sysfs().vfio_bound_crypto().unwrap().iter().map(|f| f.bdf).collect();
        assert_eq!(found, [bdf("0000:00:03.0"), bdf("0000:00:05.0")]);
    }

    #[test]
    fn no_iommu_and_no_vfio_are_reported_with_what_to_do() {
        let t = FakeSysfs::new("noiommu");
        t.function("0000:00:02.0", CRYPTO, None, None);
        let s = t.sysfs();
        let support = s.vfio_support();
        assert!(support.pci_bus && !support.iommu && !support.vfio_pci);
        assert!(support.problem().unwrap().contains("intel_iommu=on"));
        let f = s.function(&bdf("00:02.0")).unwrap();
        assert!(matches!(s.check_ready(&f), Err(Error::Vfio(VfioError::NoIommu(_)))));
        assert!(matches!(s.bind(&bdf("00:02.0")), Err(Error::Vfio(VfioError::NoIommu(_)))));
        let msg = Error::Vfio(VfioError::NoIommu("0000:00:02.0".into())).to_string();
        assert!(msg.contains("kernel command line"), "{msg}");
        assert!(Sysfs::at(t.root.join("nowhere")).vfio_support().problem().unwrap().contains("no PCI bus"));
    }

    #[test]
    fn bind_writes_override_unbind_and_probe() {
        let t = FakeSysfs::new("bind");
        t.driver(VFIO_PCI);
        t.function("0000:00:02.0", CRYPTO, Some("virtio-pci"), Some(2));
        let s = t.sysfs();
        // The fake kernel does not move the function: bind must notice and say so.
        match s.bind(&bdf("0000:00:02.0")) {
            Err(Error::Vfio(VfioError::NoVfio(m))) => assert!(m.contains("now virtio-pci"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.read("sys/bus/pci/devices/0000:00:02.0/driver_override"), "vfio-pci");
        assert_eq!(t.read("sys/bus/pci/drivers/virtio-pci/unbind"), "0000:00:02.0");
        assert_eq!(t.read("sys/bus/pci/drivers_probe"), "0000:00:02.0");
        // Once the kernel has moved it, bind is a no-op that says so, and unbind reverses it.
        t.rebind("0000:00:02.0", VFIO_PCI);
        let out = s.bind(&bdf("0000:00:02.0")).unwrap();
        assert!(out.already);
        assert_eq!(out.group, 2);
        fs::write(t.root.join("sys/bus/pci/drivers_probe"), "").unwrap();
        let after = s.unbind(&bdf("0000:00:02.0")).unwrap();
        assert!(after.was_vfio);
        assert_eq!(after.driver.as_deref(), Some(VFIO_PCI), "the fake kernel leaves the link in place");
        assert_eq!(t.read("sys/bus/pci/drivers/vfio-pci/unbind"), "0000:00:02.0");
        assert_eq!(t.read("sys/bus/pci/devices/0000:00:02.0/driver_override"), "\n");
        assert_eq!(t.read("sys/bus/pci/drivers_probe"), "0000:00:02.0");
        // A function another driver holds is not taken from it.
        t.function("0000:00:1f.3", AUDIO, Some("snd_hda_intel"), Some(3));
        let other = s.unbind(&bdf("0000:00:1f.3")).unwrap();
        assert_eq!((other.was_vfio, other.driver.as_deref()), (false, Some("snd_hda_intel")));
        assert_eq!(t.read("sys/bus/pci/drivers/snd_hda_intel/unbind"), "");
    }

    #[test]
    fn bind_refuses_a_group_shared_with_host_drivers_and_changes_nothing() {
        let t = FakeSysfs::new("viable");
        t.driver(VFIO_PCI);
        t.function("0000:00:02.0", CRYPTO, Some("virtio-pci"), Some(7));
        t.function("0000:00:02.1", AUDIO, Some("snd_hda_intel"), Some(7));
        t.function("0000:00:01.0", (0x8086, 0x1901), Some("pcieport"), Some(7));
        let s = t.sysfs();
        match s.bind(&bdf("0000:00:02.0")) {
            Err(Error::Vfio(VfioError::GroupNotViable { group, blockers })) => {
                assert_eq!(group, 7);
                assert_eq!(blockers, "0000:00:02.1 (snd_hda_intel)", "the bridge's pcieport is harmless");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.read("sys/bus/pci/devices/0000:00:02.0/driver_override"), "(null)\n");
        assert_eq!(t.read("sys/bus/pci/drivers_probe"), "");
        // Once the other function is bound to vfio-pci too, the group is fine.
        t.rebind("0000:00:02.1", VFIO_PCI);
        t.rebind("0000:00:02.0", VFIO_PCI);
        let f = s.function(&bdf("0000:00:02.0")).unwrap();
        // The group node is missing in the fake tree: that is the next thing reported.
        assert!(
            matches!(s.check_ready(&f), Err(Error::Vfio(VfioError::NoVfio(m))) if m.contains("/dev/vfio/7"))
        );
        fs::write(t.root.join("dev/vfio/7"), "").unwrap();
        fs::write(t.root.join("dev/vfio/vfio"), "").unwrap();
        s.check_ready(&f).unwrap();
    }

    #[test]
    fn bind_refuses_unknown_and_foreign_functions() {
        let t = FakeSysfs::new("foreign");
        t.driver(VFIO_PCI);
        t.function("0000:00:1f.3", AUDIO, Some("snd_hda_intel"), Some(3));
        let s = t.sysfs();
        assert!(
            matches!(s.bind(&bdf("0000:00:05.0")), Err(Error::Vfio(VfioError::NoSuchDevice(b))) if b == "0000:00:05.0")
        );
        assert!(
            matches!(s.bind(&bdf("0000:00:1f.3")), Err(Error::Device(DeviceError::Unsupported(m))) if m.contains("driverctl"))
        );
        assert_eq!(t.read("sys/bus/pci/drivers_probe"), "");
    }
}
