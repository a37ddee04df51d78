//! Opening an engine from a device name: the one entry point a program needs.
//!
//! Users name devices as the CLI's `--device` does: `emulated` (the software model of a
//! virtio-crypto device, always present), a PCI address of a function bound to vfio-pci
//! (`0000:00:04.0`), or `software` (the AES cores on the caller's thread, no device at all).
//! This module turns such a name into a transport, a driver and an engine, so that the CLI and
//! every library user open devices the same way. A comma-separated list of names
//! (`emulated,emulated,software`, `0000:00:04.0,0000:00:05.0`) opens every one and makes them one
//! engine, a [`PoolEngine`](crate::engine::PoolEngine).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crypt_vfio_cores::CoreKind;

use crate::engine::software::SoftwareEngine;
use crate::engine::{AnyEngine, PoolEngine, PoolOptions};
use crate::error::{CryptoError, Error, Result};
use crate::pci_sysfs::Bdf;
use crate::transport::emulated::{EmulatedConfig, EmulatedTransport};
use crate::transport::vfio::VfioTransport;
use crate::transport::Transport;
use crate::virtio_crypto::{DeviceOptions, VirtioCrypto};

/// Where the AES work runs.
///
/// ```
/// use crypt_vfio::DeviceName;
///
/// assert_eq!("emulated".parse::<DeviceName>()?, DeviceName::Emulated);
/// assert_eq!("software".parse::<DeviceName>()?, DeviceName::Software);
/// let pci: DeviceName = "00:04.0".parse()?;
/// assert_eq!(pci.to_string(), "0000:00:04.0");
/// assert!("00:1f".parse::<DeviceName>().is_err());
/// # Ok::<(), crypt_vfio::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceName {
    /// The emulated virtio-crypto device (`emulated`).
    Emulated,
    /// A PCI function bound to vfio-pci, by address.
    Pci(Bdf),
    /// The software engine (`software`): no device.
    Software,
}

impl FromStr for DeviceName {
    type Err = Error;

    /// `emulated`, `software`, or a PCI address (`DDDD:BB:DD.F` or `BB:DD.F`).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "emulated" => Ok(DeviceName::Emulated),
            "software" => Ok(DeviceName::Software),
            other => other.parse().map(DeviceName::Pci),
        }
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceName::Emulated => f.write_str("emulated"),
            DeviceName::Pci(bdf) => bdf.fmt(f),
            DeviceName::Software => f.write_str("software"),
        }
    }
}

impl DeviceName {
    /// The PCI function this name reaches: the emulated device (built from `emulated`) or the
    /// function at a PCI address through VFIO. `software` has none and gives
    /// [`CryptoError::NotSupported`].
    pub fn transport(&self, emulated: EmulatedConfig) -> Result<Arc<dyn Transport>> {
        match self {
            DeviceName::Emulated => Ok(Arc::new(EmulatedTransport::new(emulated)?)),
            DeviceName::Pci(bdf) => Ok(Arc::new(VfioTransport::open(bdf)?)),
            DeviceName::Software => Err(Error::Crypto(CryptoError::NotSupported(
                "`software` is the software engine, not a device: name `emulated` or a PCI address".into(),
            ))),
        }
    }
}

/// How [`open_with`] sets up what it opens.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Driver settings for a device (queues, polling or interrupts, timeouts).
    pub driver: DeviceOptions,
    /// The emulated device's shape (queues, workers, latency, algorithms).
    pub emulated: EmulatedConfig,
    /// The AES core of the software engine (the emulated device takes `emulated.core`).
    pub core: CoreKind,
    /// Settings of a pool, when a list of names is opened.
    pub pool: PoolOptions,
}

/// Opens the engine `name` gives (`emulated`, `software`, or a PCI address) with default
/// settings.
///
/// ```
/// use crypt_vfio::engine::{BlockingQueue, Engine};
/// use crypt_vfio::Mode;
///
/// let engine = crypt_vfio::open("emulated")?;
/// let session = engine.create_session(Mode::Gcm, &[1u8; 32])?;
/// let mut queue = BlockingQueue::open(&engine)?;
/// let mut data = b"attack at dawn".to_vec();
/// let tag = queue.seal(&session, &[0u8; 12], b"header", &mut data)?;
/// queue.open_sealed(&session, &[0u8; 12], b"header", &mut data, &tag)?;
/// assert_eq!(data, b"attack at dawn");
/// # Ok::<(), crypt_vfio::Error>(())
/// ```
///
/// A comma-separated list opens a pool of every engine it names:
///
/// ```
/// use crypt_vfio::engine::Engine;
///
/// let pool = crypt_vfio::open("emulated,emulated,software")?;
/// let names: Vec<&str> = pool.pool().unwrap().members().map(|(name, _)| name).collect();
/// assert_eq!(names, ["emulated#0", "emulated#1", "software"]);
/// assert!(crypt_vfio::open("software,software").is_err());
/// # Ok::<(), crypt_vfio::Error>(())
/// ```
pub fn open(name: &str) -> Result<AnyEngine> {
    let names = parse_list(name)?;
    match &names[..] {
        [one] => open_with(one, &OpenOptions::default()),
        _ => open_pool(&names, &OpenOptions::default()).map(AnyEngine::Pool),
    }
}

/// The names of a comma-separated list (`emulated,0000:00:04.0,software`). Refused: an empty
/// item, a PCI address named twice (one function cannot be opened twice), and `software`
/// twice (one software member does all a second would). `emulated` may repeat: each is a new
/// device.
pub fn parse_list(list: &str) -> Result<Vec<DeviceName>> {
    let mut names: Vec<DeviceName> = Vec::new();
    for item in list.split(',') {
        if item.trim().is_empty() {
            return Err(Error::Crypto(CryptoError::InvalidRequest(format!(
                "`{list}`: an empty device name in the list"
            ))));
        }
        let name: DeviceName = item.parse()?;
        if name != DeviceName::Emulated && names.contains(&name) {
            return Err(Error::Crypto(CryptoError::InvalidRequest(format!(
                "`{list}`: {name} is named twice"
            ))));
        }
        names.push(name);
    }
    Ok(names)
}

/// The name of member `index`, `name`, in a pool: `emulated#<index>` (so that the index a fault
/// plan gives and the name agree), the PCI address, or `software`.
pub fn member_name(index: usize, name: &DeviceName) -> String {
    match name {
        DeviceName::Emulated => format!("emulated#{index}"),
        other => other.to_string(),
    }
}

/// Opens every engine of `names` and makes them one pool.
pub fn open_pool(names: &[DeviceName], options: &OpenOptions) -> Result<PoolEngine> {
    let members = names
        .iter()
        .enumerate()
        .map(|(i, name)| Ok((member_name(i, name), open_with(name, options)?)))
        .collect::<Result<Vec<_>>>()?;
    PoolEngine::new(members, options.pool.clone())
}

/// Opens the engine `name` names with `options`.
pub fn open_with(name: &DeviceName, options: &OpenOptions) -> Result<AnyEngine> {
    match name {
        DeviceName::Software => Ok(AnyEngine::Software(SoftwareEngine::new(options.core))),
        device => Ok(AnyEngine::Device(open_device(device, options)?)),
    }
}

/// Opens the virtio-crypto device `name` names (`emulated` or a PCI address), for callers that
/// need the device itself (its [`info`](VirtioCrypto::info), health or
/// [`abort`](VirtioCrypto::abort)).
pub fn open_device(name: &DeviceName, options: &OpenOptions) -> Result<VirtioCrypto> {
    VirtioCrypto::open(name.transport(options.emulated.clone())?, &options.driver)
}
