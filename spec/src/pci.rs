//! PCI configuration space and the virtio-over-PCI ("modern", virtio 1.x) transport (virtio 1.2
//! section 4.1).

/// PCI vendor ID of virtio devices (Red Hat, Inc.).
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio-crypto: 0x1040 + device type 20.
pub const VIRTIO_CRYPTO_DEVICE_ID: u16 = 0x1054;
/// Transitional (legacy) virtio-crypto, which crypt-vfio does not drive.
pub const VIRTIO_CRYPTO_LEGACY_DEVICE_ID: u16 = 0x1014;
/// Size of a PCI function's (non-extended) configuration space.
pub const PCI_CONFIG_SIZE: usize = 256;

/// Offsets in the PCI configuration header (type 0).
pub mod cfg {
    /// Vendor ID, u16.
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID, u16.
    pub const DEVICE_ID: u16 = 0x02;
    /// Command register, u16.
    pub const COMMAND: u16 = 0x04;
    /// Status register, u16.
    pub const STATUS: u16 = 0x06;
    /// Revision ID, u8.
    pub const REVISION: u16 = 0x08;
    /// Class code (prog-if, subclass, class), 3 bytes.
    pub const CLASS: u16 = 0x09;
    /// Header type, u8.
    pub const HEADER_TYPE: u16 = 0x0e;
    /// First base address register; BAR n is at `BAR0 + 4 * n`.
    pub const BAR0: u16 = 0x10;
    /// Subsystem vendor ID, u16.
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    /// Subsystem ID (the virtio device type for transitional devices), u16.
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Pointer to the first capability, u8.
    pub const CAPABILITIES: u16 = 0x34;
    /// Interrupt line, u8.
    pub const INTERRUPT_LINE: u16 = 0x3c;
}

/// Command register: respond to memory space accesses.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the function may master the bus (issue DMA).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: legacy INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: a capability list is present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Capability ID of vendor-specific capabilities, which virtio uses.
pub const CAP_ID_VENDOR: u8 = 0x09;

/// MSI-X capability: message control (u16) offset within the capability.
pub const MSIX_MSG_CTRL: u16 = 2;
/// MSI-X capability: table offset and BIR (u32).
pub const MSIX_TABLE: u16 = 4;
/// MSI-X capability: PBA offset and BIR (u32).
pub const MSIX_PBA: u16 = 8;
/// MSI-X message control: enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// MSI-X message control: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// MSI-X message control: table size minus one.
pub const MSIX_TABLE_SIZE_MASK: u16 = 0x07ff;

/// `cfg_type` of a virtio PCI capability.
pub mod cap_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications (doorbells).
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access window.
    pub const PCI: u8 = 5;
}

/// Layout of `struct virtio_pci_cap` (offsets within the capability).
pub mod cap {
    /// Capability ID (0x09).
    pub const VNDR: u16 = 0;
    /// Next capability pointer.
    pub const NEXT: u16 = 1;
    /// Capability length.
    pub const LEN: u16 = 2;
    /// `cfg_type`, see [`super::cap_type`].
    pub const CFG_TYPE: u16 = 3;
    /// BAR index.
    pub const BAR: u16 = 4;
    /// Identifier for multiple capabilities of one type.
    pub const ID: u16 = 5;
    /// Offset within the BAR, u32.
    pub const OFFSET: u16 = 8;
    /// Length of the structure, u32.
    pub const LENGTH: u16 = 12;
    /// Size of `struct virtio_pci_cap`.
    pub const SIZE: u8 = 16;
    /// Notify capability only: `notify_off_multiplier`, u32.
    pub const NOTIFY_OFF_MULTIPLIER: u16 = 16;
    /// Size of `struct virtio_pci_notify_cap`.
    pub const NOTIFY_SIZE: u8 = 20;
}

/// Offsets in `struct virtio_pci_common_cfg`.
pub mod common {
    /// u32
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// u32
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// u32
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// u32
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// u16
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// u16
    pub const NUM_QUEUES: u64 = 0x12;
    /// u8
    pub const DEVICE_STATUS: u64 = 0x14;
    /// u8
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// u16
    pub const QUEUE_SELECT: u64 = 0x16;
    /// u16
    pub const QUEUE_SIZE: u64 = 0x18;
    /// u16
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// u16
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// u16
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// u64
    pub const QUEUE_DESC: u64 = 0x20;
    /// u64
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// u64
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Size of the structure up to and including `queue_device`.
    pub const SIZE: u64 = 0x38;
}

/// "No MSI-X vector" in `config_msix_vector` and `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Bits of `device_status` (virtio 1.2 section 2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device has hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver has given up on the device.
    pub const FAILED: u8 = 0x80;
}

/// ISR status bit: a virtqueue has been used.
pub const ISR_QUEUE: u8 = 1;
/// ISR status bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// Feature bit numbers shared by all device types (virtio 1.2 section 6).
pub mod feature {
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u32 = 29;
    /// Compliance with virtio 1.x (not legacy).
    pub const VERSION_1: u32 = 32;
    /// The device sits behind an IOMMU: descriptor addresses are IOVAs.
    pub const ACCESS_PLATFORM: u32 = 33;
    /// Packed virtqueues (not used by crypt-vfio).
    pub const RING_PACKED: u32 = 34;
    /// The device may be reset per queue.
    pub const RING_RESET: u32 = 40;
}
