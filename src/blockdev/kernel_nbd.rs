//! A volume as /dev/nbdN, served from this process: the kernel's NBD client on one end of a few
//! socketpairs, this crate's NBD server on the other.
//!
//! There is no handshake (the server is in the same process; the kernel is told the export's
//! size, block size and flags through netlink), no TCP and no listening socket that someone else
//! could reach. Each socketpair is one kernel connection, so requests spread over several
//! server connections and their workers.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::nbd_netlink::{Connect, NbdNetlink, NbdNetlinkError};
use crate::nbd::proto::tflags;
use crate::nbd::{Server, ServerConfig};
use crate::volume::block::BlockDevice;

/// What went wrong attaching or serving /dev/nbdN.
#[derive(Debug, thiserror::Error)]
pub enum KernelNbdError {
    /// The kernel's NBD client refused, or could not be reached.
    #[error(transparent)]
    Netlink(#[from] NbdNetlinkError),
    /// The volume cannot be a kernel block device as it is.
    #[error("{0}")]
    Unsuitable(String),
    /// The NBD server failed (its configuration, or the final flush).
    #[error(transparent)]
    Server(#[from] crate::Error),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

/// How /dev/nbdN is attached.
#[derive(Debug, Clone)]
pub struct KernelNbdConfig {
    /// The device (`/dev/nbdN` is index N); `None`: the first free one.
    pub index: Option<u32>,
    /// Connections (socketpairs): the kernel spreads requests over them.
    pub connections: usize,
    /// Seconds a request may take before the kernel fails it.
    pub timeout_s: u64,
    /// Shown in /sys/block/nbdN/backend; `close` checks it before disconnecting.
    pub backend: String,
    /// The NBD server's settings (workers per connection, memory).
    pub server: ServerConfig,
}

/// The transmission flags the kernel is given: what the server's own handshake would send.
pub fn kernel_flags(read_only: bool) -> u64 {
    let common = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::CAN_MULTI_CONN;
    u64::from(if read_only {
        common | tflags::READ_ONLY
    } else {
        common | tflags::SEND_FUA | tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES
    })
}

/// The `NBD_CMD_CONNECT` for `device`, checked: the kernel takes block sizes of 512 to 4096
/// bytes and a size that is a whole number of blocks.
pub fn connect_request(
    device: &dyn BlockDevice,
    config: &KernelNbdConfig,
    sockets: Vec<i32>,
) -> Result<Connect, KernelNbdError> {
    let bs = u64::from(device.block_size());
    if !(512..=4096).contains(&bs) || !bs.is_power_of_two() {
        return Err(KernelNbdError::Unsuitable(format!(
            "the kernel's block devices take logical blocks of 512 to 4096 bytes; this volume's sectors are {bs}"
        )));
    }
    if device.size() == 0 || device.size() % bs != 0 {
        return Err(KernelNbdError::Unsuitable(format!(
            "the volume's size {} is not a whole, nonzero number of {bs}-byte sectors",
            device.size()
        )));
    }
    Ok(Connect {
        index: config.index,
        size: device.size(),
        block_size: bs,
        timeout_s: config.timeout_s,
        server_flags: kernel_flags(device.read_only()),
        backend: config.backend.clone(),
        sockets,
    })
}

/// Attaches `device` as /dev/nbdN and serves it until the device is disconnected (`close`, or
/// `nbd-client -d`) or `stop` is set, which disconnects it from here. `ready` is called with N
/// once the kernel has the device. The device is flushed before this returns.
pub fn serve(
    device: Arc<dyn BlockDevice>,
    config: KernelNbdConfig,
    stop: Arc<AtomicBool>,
    ready: impl FnOnce(u32),
) -> Result<(), KernelNbdError> {
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..config.connections.max(1) {
        let (a, b) = UnixStream::pair()
            .map_err(|source| KernelNbdError::Os { what: "making a socketpair", source })?;
        ours.push(a);
        theirs.push(b);
    }
    let connect = connect_request(&*device, &config, theirs.iter().map(|s| s.as_raw_fd()).collect())?;
    let server = Server::new(Arc::clone(&device), config.server.clone())?;
    let mut nl = NbdNetlink::open()?;
    let index = nl.connect(&connect)?;
    // The kernel holds its own references to its ends.
    drop(theirs);
    log::info!("attached as /dev/nbd{index}");
    ready(index);
    // A stop (SIGTERM) disconnects as `close` does (not while mounted): the kernel sends NBD_CMD_DISC on every
    // connection after the requests in flight, and the server's connections end on it.
    let server_stop = server.stop_flag();
    let watcher_done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = Arc::clone(&watcher_done);
        std::thread::Builder::new()
            .name("nbd-stop".into())
            .spawn(move || {
                let path = std::path::PathBuf::from(format!("/dev/nbd{index}"));
                super::stop_when_unused(&stop, &done, &path, || {
                    nl.disconnect(index).map_err(|e| {
                        // Without the kernel's NBD_CMD_DISC, ending the connections ends it.
                        server_stop.store(true, Ordering::SeqCst);
                        format!("{e}; closing its connections")
                    })
                });
            })
            .map_err(|source| KernelNbdError::Os { what: "starting the stop watcher", source })?
    };
    let served = server.serve_transmission(ours);
    watcher_done.store(true, Ordering::Release);
    let _ = watcher.join();
    if served.is_err() {
        // The device must not stay configured with sockets nobody answers.
        if let Err(e) = NbdNetlink::open().and_then(|mut nl| nl.disconnect(index)) {
            log::warn!("disconnecting /dev/nbd{index} after the server failed: {e}");
        }
    }
    served?;
    log::info!("/dev/nbd{index} disconnected; the volume is flushed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::file::FileBlockDevice;
    use std::time::Duration;

    fn config() -> KernelNbdConfig {
        KernelNbdConfig {
            index: Some(2),
            connections: 2,
            timeout_s: 60,
            backend: "crypt-vfio:t".into(),
            server: ServerConfig::default(),
        }
    }

    #[test]
    fn the_connect_request_carries_the_volume_shape_and_flags() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let dev = FileBlockDevice::open(f.path(), true).unwrap();
        let c = connect_request(&dev, &config(), vec![3, 4]).unwrap();
        assert_eq!(c.size, 1 << 20);
        assert_eq!(c.block_size, u64::from(dev.block_size()));
        assert_eq!(c.index, Some(2));
        assert_eq!(c.sockets, [3, 4]);
        assert_ne!(c.server_flags & u64::from(tflags::READ_ONLY), 0);
        assert_eq!(c.server_flags & u64::from(tflags::SEND_TRIM), 0);
        let w = kernel_flags(false);
        for f in [tflags::SEND_FLUSH, tflags::SEND_FUA, tflags::SEND_TRIM, tflags::SEND_WRITE_ZEROES] {
            assert_ne!(w & u64::from(f), 0, "flag {f:#x} not passed through");
        }
    }

    #[test]
    fn a_size_the_kernel_cannot_take_is_refused_before_attaching() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len((1 << 20) + 100).unwrap();
        let dev = FileBlockDevice::open(f.path(), false).unwrap();
        let e = connect_request(&dev, &config(), vec![3]).unwrap_err();
        assert!(e.to_string().contains("not a whole"), "{e}");
    }

    fn request(kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
        use std::io::Read;
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698, "not a simple reply");
        (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }

    /// What the kernel does on a connection it was handed: requests at once, no handshake,
    /// simple replies; NBD_CMD_DISC ends the connection, and the server returns once all have.
    #[test]
    fn pre_negotiated_connections_serve_the_kernel_protocol_and_end_on_disc() {
        use std::io::{Read, Write};
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(FileBlockDevice::open(f.path(), false).unwrap());
        let server = Server::new(Arc::clone(&dev), ServerConfig::default()).unwrap();
        let (a, mut k0) = UnixStream::pair().unwrap();
        let (b, mut k1) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || server.serve_transmission(vec![a, b]));
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        // A FUA write on one connection, read back on the other.
        k0.write_all(&request(1, 1, 11, 8192, 4096)).unwrap();
        k0.write_all(&data).unwrap();
        assert_eq!(simple_reply(&mut k0), (0, 11));
        k1.write_all(&request(0, 0, 12, 8192, 4096)).unwrap();
        assert_eq!(simple_reply(&mut k1), (0, 12));
        let mut back = vec![0u8; 4096];
        k1.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
        // Flush, trim and write-zeroes are answered, not refused.
        for (kind, h) in [(3u16, 13u64), (4, 14), (6, 15)] {
            let len = if kind == 3 { 0 } else { 4096 };
            k1.write_all(&request(kind, 0, h, if kind == 3 { 0 } else { 8192 }, len)).unwrap();
            assert_eq!(simple_reply(&mut k1), (0, h), "command {kind}");
        }
        k1.write_all(&request(0, 0, 16, 8192, 4096)).unwrap();
        assert_eq!(simple_reply(&mut k1), (0, 16));
        k1.read_exact(&mut back).unwrap();
        assert_eq!(back, vec![0u8; 4096], "write-zeroes did not zero");
        // A read past the end gets an error reply, and the connection goes on.
        k0.write_all(&request(0, 0, 17, 1 << 20, 4096)).unwrap();
        assert_ne!(simple_reply(&mut k0).0, 0);
        assert!(!t.is_finished());
        k0.write_all(&request(2, 0, 18, 0, 0)).unwrap();
        k1.write_all(&request(2, 0, 19, 0, 0)).unwrap();
        let done = std::time::Instant::now();
        while !t.is_finished() {
            assert!(done.elapsed() < Duration::from_secs(30), "the server did not end after NBD_CMD_DISC");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap().unwrap();
    }
}
