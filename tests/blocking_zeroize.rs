//! `BlockingQueue` copies the caller's buffer into its request. On the error paths (a rejected
//! submit, a failed completion, a timeout) that copy must be wiped before it is freed: it may
//! hold plaintext. A counting allocator looks at every block freed of the test's odd size and
//! counts those still holding the marker.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{BlockingQueue, Engine};
use crypt_vfio::{CoreKind, Mode};

/// An odd size nothing else in the test allocates.
const LEN: usize = 4093;
const MARKER: &[u8; 16] = b"PLAINTEXT-MARKER";

static LEAKED: AtomicUsize = AtomicUsize::new(0);

struct Watch;

// SAFETY: every call is forwarded to the system allocator unchanged; `dealloc` only reads the
// block it is handed, which is still allocated and `layout.size()` bytes long until forwarded.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() == LEN {
            // SAFETY: `ptr` is a live block of `layout.size()` bytes (the caller's contract).
            let head = unsafe { std::slice::from_raw_parts(ptr, MARKER.len()) };
            if head == MARKER {
                LEAKED.fetch_add(1, Ordering::SeqCst);
            }
        }
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

#[test]
fn a_failed_request_leaves_no_plaintext_copy_behind() {
    let engine = SoftwareEngine::new(CoreKind::Fast);
    let session = engine.create_session(Mode::Cbc, &[7u8; 32]).unwrap();
    let mut queue = BlockingQueue::open(&engine).unwrap();
    // On the stack: only the queue's copy is on the heap. CBC takes whole 16-byte blocks
    // only, so the engine refuses this length.
    let mut data = [0u8; LEN];
    data[..MARKER.len()].copy_from_slice(MARKER);
    assert!(queue.encrypt(&session, &[0u8; 16], &mut data[..]).is_err(), "CBC took a partial block");
    assert_eq!(LEAKED.load(Ordering::SeqCst), 0, "a copy of the plaintext was freed unwiped");
}
