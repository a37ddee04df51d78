//! The library's errors: one enum per layer, all wrapped by [`Error`].
//!
//! A caller matches the layer and the variant, never the text:
//! `Err(Error::Luks(LuksError::WrongPassphrase))`, `Err(Error::Crypto(CryptoError::AuthFailed))`.
//! The layers are those of the crate: the platform ([`VfioError`]), the device as a whole
//! ([`DeviceError`]), one request or session on any engine ([`CryptoError`]), volumes
//! ([`VolumeError`]), LUKS headers ([`LuksError`]) and NBD peers ([`NbdError`]); a failed
//! system call is [`Error::Os`] whichever layer made it. Messages say what went wrong and, where
//! there is something to do, what to do.
//!
//! ```
//! use crypt_vfio::engine::Engine;
//! use crypt_vfio::{CryptoError, Error, Mode};
//!
//! let engine = crypt_vfio::open("software")?;
//! match engine.create_session(Mode::Xts, &[0u8; 20]) {
//!     Err(Error::Crypto(CryptoError::KeyLength { len: 20, .. })) => {}
//!     other => panic!("a 20-byte XTS key was not refused: {other:?}"),
//! }
//! # Ok::<(), Error>(())
//! ```

use crypt_vfio_cores::{CoreError, Mode};

/// Everything that can go wrong in crypt-vfio.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed (a VFIO ioctl, sysfs, mmap, a file read or write).
    #[error("{context}: {source}")]
    Os {
        /// What was being done.
        context: String,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The platform (VFIO, sysfs, DMA memory, the transport) failed: see [`VfioError`].
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// The device cannot be used, or failed: see [`DeviceError`].
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A request or a session was refused or failed: see [`CryptoError`].
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A volume refused or failed an operation: see [`VolumeError`].
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// A LUKS image cannot be opened or changed: see [`LuksError`].
    #[error(transparent)]
    Luks(#[from] LuksError),
    /// An NBD peer broke the protocol: see [`NbdError`].
    #[error(transparent)]
    Nbd(#[from] NbdError),
}

/// The platform around the device: VFIO, sysfs, the IOMMU, device-visible memory and the
/// transport's accesses.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// Device-visible memory could not be allocated or mapped.
    #[error("DMA memory: {0}")]
    Dma(String),
    /// The transport (VFIO or the emulated device) refused an access or an operation.
    #[error("transport: {0}")]
    Transport(String),
    /// The text given as a PCI address is not one.
    #[error("`{0}` is not a PCI address: expected DDDD:BB:DD.F or BB:DD.F, e.g. 0000:00:02.0")]
    InvalidAddress(String),
    /// No PCI function exists at the address.
    #[error("no PCI function at {0}: check the address with `crypt-vfio list` (or lspci -D)")]
    NoSuchDevice(String),
    /// The function has no IOMMU group: the kernel runs without an IOMMU, so VFIO cannot
    /// protect memory from the device.
    #[error(
        "{0} has no IOMMU group: the IOMMU is off. Enable it on the kernel command line \
         (intel_iommu=on on Intel, amd_iommu=on on AMD; check that VT-d/AMD-Vi is on in the firmware) and reboot"
    )]
    NoIommu(String),
    /// The kernel offers no VFIO for PCI.
    #[error("VFIO is not available: {0}. Load it with `modprobe vfio-pci` (as root)")]
    NoVfio(String),
    /// The caller may not use a file the driver needs.
    #[error("permission denied on {path}: {fix}")]
    PermissionDenied {
        /// The file.
        path: String,
        /// What to do about it.
        fix: String,
    },
    /// The function is bound to another driver than vfio-pci.
    #[error(
        "{bdf} is not bound to vfio-pci (its driver: {driver}): run `crypt-vfio bind {bdf}` (as root) first"
    )]
    WrongDriver {
        /// The function.
        bdf: String,
        /// Its current driver (`no driver` when unbound).
        driver: String,
    },
    /// Other functions in the IOMMU group are still used by host drivers, so the kernel will not
    /// hand the group to userspace.
    #[error(
        "IOMMU group {group} is not viable: {blockers} still bound to host drivers; unbind them or \
         bind them to vfio-pci too (the whole group goes to userspace together)"
    )]
    GroupNotViable {
        /// The group number.
        group: u32,
        /// The functions in the way, with their drivers (`0000:00:1f.3 (snd_hda_intel)`).
        blockers: String,
    },
}

/// The device as a whole: it is not one this driver runs, it did not initialise, it failed
/// (and is being recovered), or it broke the engine contract.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The PCI function is not a device this driver can run.
    #[error("unsupported device: {0}")]
    Unsupported(String),
    /// The device did not accept the feature set or status handshake.
    #[error("device initialisation failed: {0}")]
    Init(String),
    /// The device broke the protocol: it wrote something impossible or stopped answering.
    /// Every request in flight on it has failed; the device needs a reset.
    #[error("device failed: {0}")]
    Failed(String),
    /// The device did not answer within the deadline.
    #[error("device timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
    /// The engine broke the backlog contract (for example it never promoted a backlogged
    /// request before the deadline).
    #[error("engine contract violation: {0}")]
    ContractViolation(String),
    /// The device's configuration kept changing while it was read (its `config_generation`
    /// never settled), so no consistent copy could be taken.
    #[error("device configuration did not settle: config_generation changed on each of {attempts} reads")]
    ConfigUnsettled {
        /// How many consistent reads were attempted.
        attempts: u32,
    },
    /// The device was given back to its owner (vfio-pci's unbind, a hypervisor's unplug) at
    /// the owner's request: the engine no longer has it, and every later call on it fails so.
    #[error("device released: {0}")]
    Released(String),
    /// The request was not run: the device failed or is leaving before it took the request
    /// (a refused submit, a backlogged request) or before it answered, and its data and tag
    /// are exactly as submitted (the request went through a bounce buffer, which is copied back
    /// only on success). It may be run again, on this device once it recovers or on another.
    #[error("request not run: {0}")]
    NotRun(String),
    /// A pool member failed while it held a request whose buffer is in its DMA memory (zero
    /// copy), so the device may have written part of it; other members remain. Run the request
    /// again from the caller's own copy of the data.
    #[error("pool member {member} failed with the request: {source}")]
    MemberFailed {
        /// The member's name (`emulated#1`, a PCI address).
        member: String,
        /// What the member reported.
        #[source]
        source: Box<Error>,
    },
    /// Every member of a pool is gone (failed and not back in time, given up, or released):
    /// what happened to each, in member order.
    #[error("no pool member left: {}", fates(.0))]
    NoMemberLeft(Vec<MemberFate>),
    /// The device failed too often to be recovered again; it stays failed.
    #[error("device failed {failures} times within {window:?}; giving up on it (last failure: {last})")]
    GaveUp {
        /// Failures counted in the window.
        failures: usize,
        /// The window.
        window: std::time::Duration,
        /// Why it failed last.
        last: String,
    },
}

/// What happened to one pool member, for [`DeviceError::NoMemberLeft`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberFate {
    /// The member's name (`emulated#0`, `0000:01:00.0`, `software`).
    pub member: String,
    /// Its state, said for a person: "failed 1.2 s ago, not back after 10 s: …",
    /// "gave up after 3 failures in 60 s (last: …)".
    pub fate: String,
}

impl std::fmt::Display for MemberFate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.member, self.fate)
    }
}

fn fates(list: &[MemberFate]) -> String {
    if list.is_empty() {
        return "the pool has no members".into();
    }
    list.iter().map(MemberFate::to_string).collect::<Vec<_>>().join("; ")
}

impl DeviceError {
    /// Whether the error says the device (not the request) failed: the request's data is
    /// intact when it went through a bounce buffer, and another device could run it.
    pub fn is_device_loss(&self) -> bool {
        matches!(
            self,
            DeviceError::Failed(_)
                | DeviceError::NotRun(_)
                | DeviceError::Timeout(..)
                | DeviceError::GaveUp { .. }
                | DeviceError::Released(_)
        )
    }
}

/// One request or session, as any engine (device or software) reports it: keys, parameters,
/// algorithms, sessions, authentication.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key has a length the algorithm does not take.
    #[error("{mode} does not take a {len}-byte key (expected one of {expected:?} bytes)")]
    KeyLength {
        /// The algorithm.
        mode: Mode,
        /// Bytes given.
        len: usize,
        /// Bytes accepted.
        expected: &'static [usize],
    },
    /// The key was refused (for example an XTS key with equal halves).
    #[error("key rejected: {0}")]
    KeyRejected(String),
    /// A request parameter is wrong: IV length, tag length, data length for the mode.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The request exceeds what the device accepts in one request.
    #[error("request of {len} bytes exceeds the device's limit of {max} bytes")]
    TooLarge {
        /// Bytes in the request.
        len: u64,
        /// The device's `max_size`.
        max: u64,
    },
    /// The device (or engine) does not offer this algorithm or operation.
    #[error("not supported by the device: {0}")]
    NotSupported(String),
    /// The session does not exist (never created, destroyed, or lost in a device reset).
    #[error("invalid session")]
    InvalidSession,
    /// The device is out of a resource (sessions).
    #[error("device out of resources: {0}")]
    NoSpace(String),
    /// AEAD tag verification failed; no plaintext was released.
    #[error("authentication failed: the data or its tag was modified")]
    AuthFailed,
    /// The device reported a failure for this request.
    #[error("device reported an error (status {0})")]
    Status(u8),
}

/// The block layer: volume parameters, I/O ranges, images that are too small or truncated,
/// authenticated sectors.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A block device access falls outside the device.
    #[error("{len} bytes at offset {offset} fall outside the device of {size} bytes")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The device's size.
        size: u64,
    },
    /// A write to a block device that was opened read-only.
    #[error("the device is read-only")]
    ReadOnly,
    /// The key does not open an authenticated volume.
    #[error("the key does not open this volume (wrong key, or its superblock was modified)")]
    WrongKey,
    /// The file is shorter than its header (or the caller) says it must be.
    #[error("truncated image: {what} needs {needed} bytes but the file has {have}")]
    Truncated {
        /// What does not fit.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        have: u64,
    },
    /// The cipher specification is not one this volume layer implements.
    #[error("unsupported cipher spec `{spec}`: {reason}")]
    UnsupportedCipher {
        /// The spec as given (`aes-xts-plain64`).
        spec: String,
        /// Why it is refused, with what is supported.
        reason: String,
    },
    /// The image cannot hold what is to be written into it (a header and at least one sector).
    #[error("the image is too small: {0}")]
    TooSmall(String),
    /// A volume parameter or an I/O request does not fit the volume.
    #[error("invalid volume request: {0}")]
    Invalid(String),
    /// An authenticated sector failed its check; nothing of it was returned.
    #[error(
        "sector {sector}: authentication failed (the data or its tag was modified, or a write was torn)"
    )]
    SectorAuthFailed {
        /// The sector, counted from the start of the volume's data.
        sector: u64,
    },
    /// The engine failed the request of one sector.
    #[error("sector {sector}: {source}")]
    Sector {
        /// The sector, counted from the start of the volume's data.
        sector: u64,
        /// What the engine reported.
        #[source]
        source: Box<Error>,
    },
}

/// LUKS headers and key slots.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    /// No key slot of the LUKS header opens with the passphrase given.
    #[error("no key slot opens with this passphrase (wrong passphrase?)")]
    WrongPassphrase,
    /// The file does not start with a LUKS header.
    #[error("not a LUKS image: {0}")]
    NotLuks(String),
    /// A LUKS header field holds a value that cannot be right.
    #[error("corrupt LUKS header: {field}: {reason}")]
    CorruptHeader {
        /// The field, as the format specification names it.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key slot operation cannot be done (all slots full, slot not active, last slot).
    #[error("key slot: {0}")]
    Keyslot(String),
    /// A valid header asks for something crypt-vfio does not implement (a hash, a cipher, a
    /// LUKS2 reencryption in progress): the image is not corrupt, it needs another tool.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// The NBD server's peers.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A network peer broke the protocol (NBD): the connection cannot go on.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl Error {
    /// No access to a VFIO device node: root, or the node and a locked-memory limit for the user.
    pub fn vfio_permission(path: impl Into<String>) -> Self {
        let path = path.into();
        let fix = format!(
            "run as root, or give your user the VFIO device files (e.g. chown $USER {path}) and a locked-memory \
             limit (ulimit -l) large enough for the DMA memory"
        );
        VfioError::PermissionDenied { path, fix }.into()
    }

    /// Wraps an OS error with what was being attempted.
    pub fn os(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Os { context: context.into(), source }
    }

    /// The last OS error, with context.
    pub fn last_os(context: impl Into<String>) -> Self {
        Error::os(context, std::io::Error::last_os_error())
    }
}

impl From<CoreError> for Error {
    fn from(e: CoreError) -> Self {
        Error::Crypto(match e {
            CoreError::KeyLength { mode, len, expected } => CryptoError::KeyLength { mode, len, expected },
            CoreError::KeyRejected { .. } => CryptoError::KeyRejected(e.to_string()),
            CoreError::AuthFailed => CryptoError::AuthFailed,
            CoreError::IvLength { .. } | CoreError::DataLength { .. } | CoreError::TagLength(_) => {
                CryptoError::InvalidRequest(e.to_string())
            }
            CoreError::Internal { .. } => CryptoError::Status(crypt_vfio_spec::crypto::status::ERR),
        })
    }
}

/// Result with the library's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
