//! DMA memory is reached only through copies, never through a view that outlives its mapping,
//! and sizes no mapping can hold are errors.

use std::sync::Arc;

use crypt_vfio::dma::DmaPool;
use crypt_vfio::engine::Engine;
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedTransport};
use crypt_vfio::transport::Transport;
use crypt_vfio::virtio_crypto::{DeviceOptions, VirtioCrypto};
use crypt_vfio::Error;
use vm_memory::{Bytes, GuestAddress};

fn pool() -> DmaPool {
    let t: Arc<dyn Transport> = Arc::new(EmulatedTransport::new(EmulatedConfig::default()).unwrap());
    DmaPool::new(t)
}

#[test]
fn the_memory_view_outlives_its_pool_and_buffers_safely() {
    let pool = pool();
    // A dedicated region (larger than the shared 2 MiB ones) is unmapped when its buffer goes.
    let mut big = pool.alloc(8 << 20).unwrap();
    let mut small = pool.alloc(256).unwrap();
    big.copy_from_slice(&[0xa5; 64]);
    small.copy_from_slice(&[0x3c; 256]);
    let (big_iova, small_iova) = (big.iova(), small.iova());
    let mem = pool.memory();
    drop(big);
    drop(small);
    drop(pool);
    // The view still reads what the regions held: it keeps their host memory alive. Before,
    // it read unmapped memory here (a crash, or another allocation's bytes).
    let mut got = [0u8; 64];
    mem.read_slice(&mut got, GuestAddress(big_iova)).unwrap();
    assert_eq!(got, [0xa5; 64]);
    let mut got = [0u8; 256];
    mem.read_slice(&mut got, GuestAddress(small_iova)).unwrap();
    assert_eq!(got, [0x3c; 256]);
    // Some other mapping now takes the place of the old one; the view is unaffected.
    let other = crate::pool();
    let mut filler = other.alloc(8 << 20).unwrap();
    filler.fill(0xff);
    mem.read_slice(&mut got[..64], GuestAddress(big_iova)).unwrap();
    assert_eq!(got[..64], [0xa5; 64]);
}

#[test]
fn buffers_are_read_and_written_by_copies() {
    let pool = pool();
    let mut b = pool.alloc(100).unwrap();
    assert_eq!(b.copy_from_slice(&[7; 200]), 100, "copies stop at the buffer's length");
    let mut out = [0u8; 40];
    assert_eq!(b.copy_to_slice(&mut out), 40);
    assert_eq!(out, [7; 40]);
    {
        let mut edit = b.as_mut_slice();
        edit[..4].copy_from_slice(b"head");
    }
    assert_eq!(&b.to_vec()[..6], b"head\x07\x07");
    // What the device sees at the buffer's IOVA is what the copies wrote.
    let mut seen = [0u8; 6];
    pool.memory().read_slice(&mut seen, GuestAddress(b.iova())).unwrap();
    assert_eq!(&seen, b"head\x07\x07");
    b.fill(0);
    assert!(b.to_vec().iter().all(|&x| x == 0));
}

#[test]
fn buffers_of_2_pow_63_bytes_and_more_are_errors_not_overflows() {
    let pool = pool();
    for len in [1usize << 63, (1usize << 63) + 1, usize::MAX] {
        assert!(matches!(pool.alloc(len), Err(Error::Dma(_))), "{len} bytes");
    }
    let t: Arc<dyn Transport> = Arc::new(EmulatedTransport::new(EmulatedConfig::default()).unwrap());
    let dev = VirtioCrypto::open(t, &DeviceOptions::default()).unwrap();
    for len in [1usize << 63, usize::MAX] {
        assert!(matches!(dev.alloc_buffer(len), Err(Error::Dma(_))), "alloc_buffer({len})");
    }
}
