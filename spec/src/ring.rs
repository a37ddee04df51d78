//! Split virtqueue layout (virtio 1.2 section 2.7).
//!
//! Both sides compute addresses of ring fields from these offsets; the driver writes the
//! descriptor table and available ring, the device writes the used ring.

/// Size of one descriptor (`struct virtq_desc`).
pub const DESC_SIZE: u64 = 16;
/// Descriptor field: guest (IO virtual) address, u64.
pub const DESC_ADDR: u64 = 0;
/// Descriptor field: length, u32.
pub const DESC_LEN: u64 = 8;
/// Descriptor field: flags, u16.
pub const DESC_FLAGS: u64 = 12;
/// Descriptor field: next index, u16.
pub const DESC_NEXT: u64 = 14;

/// The buffer continues in the `next` descriptor.
pub const DESC_F_NEXT: u16 = 1;
/// The buffer is device write-only.
pub const DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of indirect descriptors.
pub const DESC_F_INDIRECT: u16 = 4;

/// Available ring: flags, u16.
pub const AVAIL_FLAGS: u64 = 0;
/// Available ring: index of the next free entry, u16.
pub const AVAIL_IDX: u64 = 2;
/// Available ring: first ring entry, u16 each.
pub const AVAIL_RING: u64 = 4;
/// Available ring flag: the driver does not want interrupts (ignored with EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Used ring: flags, u16.
pub const USED_FLAGS: u64 = 0;
/// Used ring: index of the next free entry, u16.
pub const USED_IDX: u64 = 2;
/// Used ring: first element (`struct virtq_used_elem`: u32 id, u32 len).
pub const USED_RING: u64 = 4;
/// Size of one used element.
pub const USED_ELEM_SIZE: u64 = 8;
/// Used ring flag: the device does not want notifications (ignored with EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Largest queue size a split virtqueue may have.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of the descriptor table for `size` entries (alignment 16).
pub fn desc_table_size(size: u16) -> u64 {
    DESC_SIZE * u64::from(size)
}

/// Bytes of the available ring, including `used_event` (alignment 2).
pub fn avail_ring_size(size: u16) -> u64 {
    AVAIL_RING + 2 * u64::from(size) + 2
}

/// Offset of `used_event` in the available ring.
pub fn used_event_offset(size: u16) -> u64 {
    AVAIL_RING + 2 * u64::from(size)
}

/// Bytes of the used ring, including `avail_event` (alignment 4).
pub fn used_ring_size(size: u16) -> u64 {
    USED_RING + USED_ELEM_SIZE * u64::from(size) + 2
}

/// Offset of `avail_event` in the used ring.
pub fn avail_event_offset(size: u16) -> u64 {
    USED_RING + USED_ELEM_SIZE * u64::from(size)
}

/// The EVENT_IDX rule (virtio 1.2 section 2.7.10): whether moving an index from `old` to `new`
/// crosses the other side's requested `event` index, i.e. whether a notification is due.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_spec_examples() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 3, 0));
        assert!(need_event(5, 6, 0));
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(!need_event(2, 1, 0xfffe));
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(desc_table_size(8), 128);
        assert_eq!(avail_ring_size(8), 22);
        assert_eq!(used_ring_size(8), 70);
    }
}
