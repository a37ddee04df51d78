//! What both NBD fuzz targets share: an in-memory export and the server settings.
//!
//! The device is real memory, not a stub: writes land and reads return them, so a request
//! stream that reads back what it wrote runs the same paths as against a file. Limits are
//! small so that each run is quick and a length check that is missing shows up as a large
//! allocation (libFuzzer's -malloc_limit_mb) rather than as slowness.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crypt_vfio::nbd::ServerConfig;
use crypt_vfio::volume::block::BlockDevice;
use crypt_vfio::{Error, Result, VolumeError};

/// Bytes of the in-memory export.
pub const EXPORT_SIZE: u64 = 1 << 20;

/// A block device held in memory.
pub struct MemoryDevice {
    data: Mutex<Vec<u8>>,
}

impl MemoryDevice {
    pub fn new() -> Arc<Self> {
        Arc::new(MemoryDevice { data: Mutex::new(vec![0u8; EXPORT_SIZE as usize]) })
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= EXPORT_SIZE => Ok(offset as usize..end as usize),
            _ => Err(Error::Volume(VolumeError::OutOfRange { offset, len, size: EXPORT_SIZE })),
        }
    }
}

impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        EXPORT_SIZE
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let r = self.range(offset, data.len() as u64)?;
        self.data.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.range(offset, len).map(|_| ())
    }

    fn block_size(&self) -> u32 {
        512
    }
}

/// Small limits: 64 KiB payloads, 1 MiB of memory, two workers.
pub fn config() -> ServerConfig {
    ServerConfig {
        export_name: "disk".into(),
        description: "fuzz".into(),
        max_payload: 64 << 10,
        workers_per_connection: 2,
        inflight_bytes_per_connection: 256 << 10,
        max_memory: 1 << 20,
        max_connections: 1,
        handshake_timeout: Duration::from_secs(10),
        stop_grace: Duration::from_secs(1),
        reply_timeout: Duration::from_secs(30),
        tls: None,
    }
}
