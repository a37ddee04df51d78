//! DMA memory is reached only through copies, never through a view that outlives its mapping,
//! and sizes no mapping can hold are errors.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crypt_vfio::dma::{DmaPool, DmaRegion, REGION_SIZE};
use crypt_vfio::engine::Engine;
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedTransport};
use crypt_vfio::transport::{Bar, EventNotifier, Transport};
use crypt_vfio::virtio_crypto::{DeviceOptions, VirtioCrypto};
use crypt_vfio::{Error, VfioError};
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
    let mem = crypt_vfio::testing::dma_memory(&pool);
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
    crypt_vfio::testing::dma_memory(&pool).read_slice(&mut seen, GuestAddress(b.iova())).unwrap();
    assert_eq!(&seen, b"head\x07\x07");
    b.fill(0);
    assert!(b.to_vec().iter().all(|&x| x == 0));
}

#[test]
fn buffers_of_2_pow_63_bytes_and_more_are_errors_not_overflows() {
    let pool = pool();
    for len in [1usize << 63, (1usize << 63) + 1, usize::MAX] {
        assert!(matches!(pool.alloc(len), Err(Error::Vfio(VfioError::Dma(_)))), "{len} bytes");
    }
    let t: Arc<dyn Transport> = Arc::new(EmulatedTransport::new(EmulatedConfig::default()).unwrap());
    let dev = VirtioCrypto::open(t, &DeviceOptions::default()).unwrap();
    for len in [1usize << 63, usize::MAX] {
        assert!(matches!(dev.alloc_buffer(len), Err(Error::Vfio(VfioError::Dma(_)))), "alloc_buffer({len})");
    }
}

/// The emulated device behind an IOMMU whose unmaps can be made to fail (the device keeps its
/// access), and that refuses to map an IOVA range still mapped.
struct UnmapFails {
    inner: EmulatedTransport,
    fail_unmap: AtomicBool,
    mapped: Mutex<Vec<(u64, u64)>>,
}

impl UnmapFails {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: EmulatedTransport::new(EmulatedConfig::default()).unwrap(),
            fail_unmap: AtomicBool::new(false),
            mapped: Mutex::default(),
        })
    }
}

impl Transport for UnmapFails {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn read_config(&self, offset: u16, data: &mut [u8]) -> crypt_vfio::Result<()> {
        self.inner.read_config(offset, data)
    }
    fn write_config(&self, offset: u16, data: &[u8]) -> crypt_vfio::Result<()> {
        self.inner.write_config(offset, data)
    }
    fn bar(&self, index: u8) -> crypt_vfio::Result<Arc<dyn Bar>> {
        self.inner.bar(index)
    }
    fn iova_ranges(&self) -> Vec<Range<u64>> {
        self.inner.iova_ranges()
    }
    fn dma_map(&self, iova: u64, region: &Arc<DmaRegion>) -> crypt_vfio::Result<()> {
        let len = region.len() as u64;
        let mut mapped = self.mapped.lock().unwrap();
        assert!(
            !mapped.iter().any(|&(a, l)| iova < a + l && a < iova + len),
            "IOVA {iova:#x} handed out again while the device can still reach it"
        );
        self.inner.dma_map(iova, region)?;
        mapped.push((iova, len));
        Ok(())
    }
    fn dma_unmap(&self, iova: u64, len: u64) -> crypt_vfio::Result<()> {
        if self.fail_unmap.load(Ordering::SeqCst) {
            return Err(Error::Vfio(VfioError::Dma(format!("unmap {iova:#x}: refused (test)"))));
        }
        self.inner.dma_unmap(iova, len)?;
        self.mapped.lock().unwrap().retain(|&(a, _)| a != iova);
        Ok(())
    }
    fn msix_vectors(&self) -> u16 {
        self.inner.msix_vectors()
    }
    fn enable_msix(&self, notifiers: &[Option<&EventNotifier>]) -> crypt_vfio::Result<()> {
        self.inner.enable_msix(notifiers)
    }
    fn disable_msix(&self) -> crypt_vfio::Result<()> {
        self.inner.disable_msix()
    }
    fn reset(&self) -> crypt_vfio::Result<()> {
        self.inner.reset()
    }
}

#[test]
fn a_dedicated_region_whose_unmap_fails_keeps_its_iova() {
    let t = UnmapFails::new();
    let pool = DmaPool::new(t.clone());
    let big = 2 * REGION_SIZE;
    let a = pool.alloc(big).unwrap();
    let a_iova = a.iova();
    t.fail_unmap.store(true, Ordering::SeqCst);
    drop(a);
    assert_eq!(pool.quarantined_bytes(), big, "the region the device still reaches is kept");
    t.fail_unmap.store(false, Ordering::SeqCst);
    // The next region must not get the IOVA the device can still write (the transport checks).
    let b = pool.alloc(big).unwrap();
    assert_ne!(b.iova(), a_iova);
    drop(b);
    assert_eq!(pool.quarantined_bytes(), big);
}

#[test]
fn buffers_of_a_region_whose_revocation_failed_are_never_handed_out_again() {
    let t = UnmapFails::new();
    let pool = DmaPool::new(t.clone());
    let a = pool.alloc(4096).unwrap();
    let a_iova = a.iova();
    t.fail_unmap.store(true, Ordering::SeqCst);
    pool.revoke_device_access("a test");
    assert_eq!(pool.quarantined_bytes(), REGION_SIZE);
    drop(a);
    // The device may still write that memory: a new buffer never comes from it.
    match pool.alloc(4096) {
        Ok(b) => assert!(
            b.iova() / REGION_SIZE as u64 != a_iova / REGION_SIZE as u64,
            "a buffer of the region the device can still write was handed out again at {:#x}",
            b.iova()
        ),
        Err(Error::Vfio(VfioError::Dma(why))) => assert!(why.contains("revoked"), "{why}"),
        Err(e) => panic!("{e}"),
    }
}
