//! A volume as /dev/ublkbN: a ublk server whose queues hand requests to a worker pool.
//!
//! ublk (`ublk_drv`, Linux 6.0+) delivers a block device's requests to a userspace server over
//! io_uring and copies the data in and out of a buffer per tag. Unlike the NBD client it can keep
//! the device, and the requests the server held, while the server is gone: with
//! `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE` a killed server's requests are requeued,
//! new ones wait, and a new server (`--recover`) picks them all up. A mounted filesystem sees a
//! pause, not an error.
//!
//! Each queue thread runs one task per tag on a local executor (libublk's async API). A task
//! hands its request to a shared pool of worker threads, which run the blocking
//! [`BlockDevice`] call, and waits for it with an io_uring read of its own eventfd, so the queue
//! thread sleeps in one `io_uring_enter` for both kernel commands and finished work. Commits
//! stay on the queue thread, as the driver requires. Every request of every queue can be on the
//! volume at once (the workers bound how many run), and the volume keeps the engine's lanes full
//! underneath.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkUringData};
use serde::{Deserialize, Serialize};

use super::alive;
use crate::volume::block::BlockDevice;

/// What went wrong serving /dev/ublkbN.
#[derive(Debug, thiserror::Error)]
pub enum UblkServeError {
    /// The ublk driver or libublk refused.
    #[error("ublk {what}: {}", describe(source))]
    Ublk {
        /// What was being done.
        what: &'static str,
        /// libublk's error.
        #[source]
        source: UblkError,
    },
    /// The volume cannot be a ublk device as it is.
    #[error("{0}")]
    Unsuitable(String),
    /// `--recover` was refused: the device is not one this volume can take over.
    #[error("cannot recover /dev/ublkb{id}: {why}")]
    NotRecoverable {
        /// The device.
        id: u32,
        /// Why not.
        why: String,
    },
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

type Result<T> = std::result::Result<T, UblkServeError>;

/// libublk's error with the errno it carries spelled out (its own text for a refused control
/// command is only "other failure").
fn describe(e: &UblkError) -> String {
    match e {
        UblkError::OtherError(n) | UblkError::UringIOError(n) => {
            format!("{e} ({})", std::io::Error::from_raw_os_error(n.saturating_abs()))
        }
        e => e.to_string(),
    }
}

fn ublk(what: &'static str) -> impl FnOnce(UblkError) -> UblkServeError {
    move |source| UblkServeError::Ublk { what, source }
}

/// libublk reports a refused control command sometimes as `Ok(-errno)` (a start of user recovery
/// that stayed EBUSY for 30 s does): such a result is an error.
pub fn checked(r: std::result::Result<i32, UblkError>) -> std::result::Result<i32, UblkError> {
    match r {
        Ok(n) if n < 0 => Err(UblkError::OtherError(n)),
        r => r,
    }
}

/// Descriptors a device needs besides one eventfd per tag (io_urings, control, log, image).
const SPARE_FDS: u64 = 256;

/// Makes sure the process may open an eventfd for each of `tags` tags: raises the soft limit
/// on descriptors to the hard one if needed, or refuses. A tag that cannot get its eventfd never
/// fetches, and the driver would wait for it for ever.
fn ensure_descriptors(tags: u64) -> Result<()> {
    let need = tags + SPARE_FDS;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(UblkServeError::Os {
            what: "reading RLIMIT_NOFILE",
            source: std::io::Error::last_os_error(),
        });
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max < need {
        return Err(UblkServeError::Unsuitable(format!(
            "{tags} tags (queues x queue depth) need {need} file descriptors; this process may open {} \
             (RLIMIT_NOFILE): use fewer queues or a smaller --queue-depth",
            lim.rlim_max
        )));
    }
    let raised = libc::rlimit { rlim_cur: need, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(UblkServeError::Os {
            what: "raising RLIMIT_NOFILE",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The flags every device is created with: a killed server's requests are requeued for the next.
pub const RECOVERY_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

/// Which volume a device serves, kept in the device's JSON (/run/ublksrvd/N.json) so that
/// `--recover` and `close` can check they have the right one: recovering a device onto another
/// image, key, cipher or access mode would hand a mounted filesystem someone else's blocks (or
/// fail the writes the kernel reissues).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The image path as opened.
    pub image: String,
    /// The image's device and inode numbers (for a device node, its `st_rdev` in `ino`).
    pub dev: u64,
    /// See `dev`.
    pub ino: u64,
    /// The decrypted volume's size in bytes.
    pub size: u64,
    /// The volume's sector size.
    pub sector_size: u32,
    /// The device refuses writes.
    #[serde(default)]
    pub read_only: bool,
    /// Random salt of `key_check`, made when the device was added.
    #[serde(default)]
    pub salt: String,
    /// SHA-256 of the salt, the volume key and the cipher shape: the same image reformatted in
    /// place, or opened with another key or cipher, does not match. The key cannot be got back
    /// from it, so the JSON may stay world-readable.
    #[serde(default)]
    pub key_check: String,
}

impl Identity {
    /// `key_check` for `material` (the volume key and cipher shape) under `salt`.
    pub fn key_check(salt: &str, material: &[u8]) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"crypt-vfio ublk identity v1\0");
        h.update(salt.as_bytes());
        h.update([0u8]);
        h.update(material);
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A new salt for a device being added.
    pub fn new_salt() -> String {
        rand::random::<[u8; 16]>().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Why a device recorded as `recorded` must not be served as `self`, if it must not.
    pub fn mismatch(&self, recorded: &Identity) -> Option<String> {
        let mut why = Vec::new();
        if (recorded.dev, recorded.ino) != (self.dev, self.ino) {
            why.push(format!(
                "it serves {} (inode {}:{}), not {} (inode {}:{})",
                recorded.image, recorded.dev, recorded.ino, self.image, self.dev, self.ino
            ));
        }
        if (recorded.size, recorded.sector_size) != (self.size, self.sector_size) {
            why.push(format!(
                "it is {} bytes of {}-byte sectors, this volume {} bytes of {}-byte sectors",
                recorded.size, recorded.sector_size, self.size, self.sector_size
            ));
        }
        if recorded.key_check.is_empty() || recorded.key_check != self.key_check {
            why.push("it was opened with another key, cipher or header (or no key is recorded)".into());
        }
        if recorded.read_only != self.read_only {
            why.push(format!(
                "it was opened {}, this server would be {}",
                if recorded.read_only { "read-only" } else { "read-write" },
                if self.read_only { "read-only" } else { "read-write" }
            ));
        }
        (!why.is_empty()).then(|| why.join("; ") + "; recovering onto another volume would corrupt it")
    }
}

/// The key of the identity in the device's target JSON.
pub const JSON_KEY: &str = "crypt-vfio";

/// How /dev/ublkbN is served.
#[derive(Debug, Clone)]
pub struct UblkConfig {
    /// Hardware queues (one server thread each).
    pub queues: u16,
    /// Requests per queue the kernel may hand over at once.
    pub depth: u16,
    /// Largest request in bytes (the per-tag buffer).
    pub io_buf_bytes: u32,
    /// Worker threads running requests on the volume, shared by all queues.
    pub workers: usize,
    /// Take over this existing device (after its server died) instead of adding a new one.
    pub recover: Option<u32>,
    /// The volume being served.
    pub identity: Identity,
}

/// The ublk parameters for a volume: logical block = sector size, so that every request is whole
/// sectors and the volume never reads to modify; a volatile cache with FUA, so that flushes and
/// FUA writes reach the image; discard and write-zeroes, unless read-only.
pub fn params(size: u64, sector_size: u32, io_buf_bytes: u32, read_only: bool) -> Result<sys::ublk_params> {
    if !sector_size.is_power_of_two() || !(512..=4096).contains(&sector_size) {
        return Err(UblkServeError::Unsuitable(format!(
            "ublk devices take logical blocks of 512 to 4096 bytes; this volume's sectors are {sector_size}"
        )));
    }
    if size == 0 || size % u64::from(sector_size) != 0 {
        return Err(UblkServeError::Unsuitable(format!(
            "the volume's size {size} is not a whole, nonzero number of {sector_size}-byte sectors"
        )));
    }
    if io_buf_bytes < sector_size || io_buf_bytes % sector_size != 0 {
        return Err(UblkServeError::Unsuitable(format!(
            "the request size {io_buf_bytes} is not a whole number of {sector_size}-byte sectors"
        )));
    }
    let shift = sector_size.trailing_zeros() as u8;
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    if read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    let mut p = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_min_shift: shift,
            io_opt_shift: (io_buf_bytes.ilog2() as u8).clamp(shift, 17),
            max_sectors: io_buf_bytes >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if !read_only {
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_granularity: sector_size,
            max_discard_sectors: 1 << 21,
            // Zeroes are written encrypted, one buffer at a time: bounded like a write.
            max_write_zeroes_sectors: (1 << 20) >> 9,
            // The driver takes one range per discard.
            max_discard_segments: 1,
            ..Default::default()
        };
    }
    Ok(p)
}

/// One request as the kernel describes it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `UBLK_IO_OP_*`.
    pub op: u32,
    /// `UBLK_IO_F_FUA` was set.
    pub fua: bool,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

impl Request {
    /// Decodes a descriptor (sectors are always 512 bytes there, whatever the block size).
    pub fn from_iod(iod: &sys::ublksrv_io_desc) -> Request {
        Request {
            op: iod.op_flags & 0xff,
            fua: iod.op_flags & sys::UBLK_IO_F_FUA != 0,
            offset: iod.start_sector << 9,
            len: u64::from(iod.nr_sectors) << 9,
        }
    }
}

/// Runs `req` on `device` with `buf` as the tag's buffer; returns what the driver is told: the
/// bytes moved, 0, or a negative errno. Nothing the kernel sent is trusted: the range is checked
/// against the device and the buffer before use.
pub fn execute(device: &dyn BlockDevice, req: Request, buf: &mut [u8]) -> i32 {
    let in_bounds = req.offset.checked_add(req.len).is_some_and(|end| end <= device.size());
    let data_op = matches!(req.op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE);
    if data_op && (req.len == 0 || req.len > buf.len() as u64) {
        return -libc::EINVAL;
    }
    if req.op != sys::UBLK_IO_OP_FLUSH && !in_bounds {
        return -libc::EINVAL;
    }
    let writes = req.op != sys::UBLK_IO_OP_READ && req.op != sys::UBLK_IO_OP_FLUSH;
    if writes && device.read_only() {
        return -libc::EROFS;
    }
    let result = match req.op {
        sys::UBLK_IO_OP_READ => device.read_at(req.offset, &mut buf[..req.len as usize]),
        sys::UBLK_IO_OP_WRITE => device.write_at(req.offset, &buf[..req.len as usize]).and_then(|()| {
            if req.fua {
                device.flush()
            } else {
                Ok(())
            }
        }),
        sys::UBLK_IO_OP_FLUSH => device.flush(),
        sys::UBLK_IO_OP_DISCARD => device.trim(req.offset, req.len),
        sys::UBLK_IO_OP_WRITE_ZEROES => device.write_zeroes(req.offset, req.len),
        _ => return -libc::EOPNOTSUPP,
    };
    match result {
        Ok(()) if data_op => req.len as i32,
        Ok(()) => 0,
        Err(e) => {
            log::warn!("ublk request {req:?} failed: {e}");
            -libc::EIO
        }
    }
}

/// A tag's data buffer: page-aligned, shared by the tag's task and the worker running its
/// request. It lives until both let go, so a worker never writes into freed memory, whatever
/// happens to the task.
struct TagBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain memory; who may touch it when is the hand-off protocol below (the
// task does not touch it while a worker has the request, the worker only while it has it).
unsafe impl Send for TagBuf {}
// SAFETY: as for Send.
unsafe impl Sync for TagBuf {}

impl TagBuf {
    fn new(len: usize) -> Result<TagBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096)
            .map_err(|_| UblkServeError::Unsuitable(format!("request size {len} is too large")))?;
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(UblkServeError::Unsuitable(format!("cannot allocate a {len}-byte request buffer")));
        }
        Ok(TagBuf { ptr, layout })
    }
}

impl Drop for TagBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Where a worker leaves a tag's result, and the eventfd it then writes to wake the tag's task.
struct TagDone {
    result: AtomicI32,
    eventfd: OwnedFd,
}

impl TagDone {
    fn new() -> Result<TagDone> {
        // SAFETY: plain eventfd(2); the result is checked before it is owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(UblkServeError::Os {
                what: "creating an eventfd",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a new descriptor nobody else owns.
        Ok(TagDone { result: AtomicI32::new(0), eventfd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn finish(&self, result: i32) {
        self.result.store(result, Ordering::Release);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live array to an eventfd we own.
        let n = unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
        if n != 8 {
            // An eventfd write only fails when the counter would overflow, which one pending
            // request per tag cannot reach.
            log::error!("waking a ublk tag: {}", std::io::Error::last_os_error());
        }
    }
}

/// `prctl` option of Linux 5.6 (`linux/prctl.h`), which the libc crate does not name.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// A request on its way to a worker.
struct Job {
    req: Request,
    buf: Arc<TagBuf>,
    done: Arc<TagDone>,
}

/// Worker threads running jobs from all queues.
fn start_workers(
    device: &Arc<dyn BlockDevice>,
    n: usize,
) -> Result<(Sender<Job>, Vec<std::thread::JoinHandle<()>>)> {
    let (tx, rx) = channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let mut handles = Vec::new();
    for i in 0..n.max(1) {
        let (rx, device) = (Arc::clone(&rx), Arc::clone(device));
        let h = std::thread::Builder::new()
            .name(format!("ublk-worker-{i}"))
            .spawn(move || worker(&rx, &*device))
            .map_err(|source| UblkServeError::Os { what: "starting a worker thread", source })?;
        handles.push(h);
    }
    Ok((tx, handles))
}

fn worker(rx: &Mutex<Receiver<Job>>, device: &dyn BlockDevice) {
    // A worker writes the image behind the block device it serves: memory reclaim on its behalf
    // must not write back to that device (it would wait on itself). libublk marks its queue
    // threads so; the workers do the I/O, so they are marked too.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) } != 0 {
        log::debug!("PR_SET_IO_FLUSHER: {}", std::io::Error::last_os_error());
    }
    loop {
        // The lock is held only while waiting for the next job; a poisoned lock means another
        // worker panicked, and the channel itself is still sound.
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return, // every queue is gone
        };
        // SAFETY: the tag's task handed this buffer over with the job and does not touch it
        // until `finish` below wakes it; the Arc keeps the memory alive meanwhile.
        let buf = unsafe { std::slice::from_raw_parts_mut(job.buf.ptr, job.buf.layout.size()) };
        let result = execute(device, job.req, buf);
        job.done.finish(result);
    }
}

/// One tag: fetch a request, hand it to a worker, wait, commit the result and fetch the next,
/// until the queue goes down.
async fn serve_tag(
    q: &UblkQueue<'_>,
    tag: u16,
    (buf, done): (Arc<TagBuf>, Arc<TagDone>),
    jobs: Sender<Job>,
) -> std::result::Result<(), UblkError> {
    let addr = buf.ptr as *const u8;
    q.submit_io_prep_cmd(tag, BufDesc::RawAddress(addr), 0, None).await?;
    loop {
        let req = Request::from_iod(q.get_iod(tag));
        let job = Job { req, buf: Arc::clone(&buf), done: Arc::clone(&done) };
        let result = if jobs.send(job).is_ok() {
            let mut count = [0u8; 8];
            loop {
                let sqe =
                    opcode::Read::new(types::Fd(done.eventfd.as_raw_fd()), count.as_mut_ptr(), 8).build();
                match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await? {
                    8 => break done.result.load(Ordering::Acquire),
                    r if r == -libc::EINTR || r == -libc::EAGAIN => continue,
                    r => {
                        // The worker still has the buffer: this tag cannot go on without it.
                        log::error!("tag {tag}: reading its eventfd failed ({r})");
                        return Err(UblkError::OtherError(r));
                    }
                }
            }
        } else {
            -libc::EIO
        };
        q.submit_io_commit_cmd(tag, BufDesc::RawAddress(addr), result).await?;
    }
}

/// One queue thread: a task per tag on a local executor, driven by the queue's io_uring.
fn serve_queue(qid: u16, dev: &UblkDev, jobs: &Sender<Job>) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("ublk queue {qid}: {e}");
            // The only failure libublk lets a queue report to a start waiting for it (as if
            // locking its buffers failed): the start fails instead of waiting for ever.
            return dev.notify_buffer_registration_complete(true);
        }
    };
    // Every tag's buffer and eventfd first: a tag that could not start would never fetch, and
    // the start would wait for it for ever; failing here fails the start instead.
    let len = dev.dev_info.max_io_buf_bytes as usize;
    let mut tag_res = Vec::new();
    for tag in q.tags() {
        match (TagBuf::new(len), TagDone::new()) {
            (Ok(b), Ok(d)) => tag_res.push((tag, (Arc::new(b), Arc::new(d)))),
            (Err(e), _) | (_, Err(e)) => {
                log::error!("ublk queue {qid} tag {tag}: {e}");
                return dev.notify_buffer_registration_complete(true);
            }
        }
    }
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for (tag, res) in tag_res {
        let (q, jobs) = (Rc::clone(&q), jobs.clone());
        tasks.push(exe.spawn(async move {
            match serve_tag(&q, tag, res, jobs).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => log::error!("ublk queue {qid} tag {tag}: {e}"),
            }
        }));
    }
    // libublk's start waits until every queue says its buffers are registered; ours are our own
    // (TagBuf, given by address with each command), so there is nothing for it to record. The
    // driver itself waits for every tag's first fetch before the device goes live.
    dev.notify_buffer_registration_complete(false);
    let exe2 = Rc::clone(&exe);
    smol::block_on(exe.run(async move {
        let run = || while exe2.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run, done).await {
            log::error!("ublk queue {qid}: {e}");
        }
    }));
}

/// The identity recorded for /dev/ublkb`id`, if it exists and crypt-vfio made it.
pub fn recorded_identity_of(id: u32) -> Option<Identity> {
    recorded_identity(&UblkCtrl::new_simple(i32::try_from(id).ok()?).ok()?)
}

/// The device's recorded identity, if crypt-vfio made it.
pub fn recorded_identity(ctrl: &UblkCtrl) -> Option<Identity> {
    let data = ctrl.get_target_data_from_json()?;
    serde_json::from_value(data.get(JSON_KEY)?.clone()).ok()
}

/// Checks that /dev/ublkb`id` can be taken over by a server of `identity`, waiting (up to 35 s)
/// for a dead server's device to settle; returns the control handle.
fn check_recoverable(id: u32, identity: &Identity, log_t: &dyn Fn(&str)) -> Result<UblkCtrl> {
    let refuse = |why: String| UblkServeError::NotRecoverable { id, why };
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| refuse(format!("no such device ({e})")))?;
    let info = ctrl.dev_info();
    if info.flags & RECOVERY_FLAGS != RECOVERY_FLAGS {
        return Err(refuse("it was made without user recovery".into()));
    }
    match recorded_identity(&ctrl) {
        None => return Err(refuse("crypt-vfio did not make it (no identity in its JSON)".into())),
        Some(recorded) => {
            if let Some(why) = identity.mismatch(&recorded) {
                return Err(refuse(why));
            }
        }
    }
    let mut p = sys::ublk_params {
        len: std::mem::size_of::<sys::ublk_params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC,
        ..Default::default()
    };
    ctrl.get_params(&mut p).map_err(ublk("reading the device's parameters"))?;
    let shift = identity.sector_size.trailing_zeros() as u8;
    if p.basic.dev_sectors != identity.size >> 9 || p.basic.logical_bs_shift != shift {
        return Err(refuse(format!(
            "the kernel's device has {} sectors of {} bytes; this volume is {} bytes of {}-byte sectors",
            p.basic.dev_sectors,
            1u32 << p.basic.logical_bs_shift,
            identity.size,
            identity.sector_size
        )));
    }
    if (p.basic.attrs & sys::UBLK_ATTR_READ_ONLY != 0) != identity.read_only {
        return Err(refuse("the kernel's device and this server differ in read-only".into()));
    }
    let deadline = Instant::now() + Duration::from_secs(35);
    loop {
        ctrl.read_dev_info().map_err(ublk("reading the device's state"))?;
        let info = ctrl.dev_info();
        match u32::from(info.state) {
            sys::UBLK_S_DEV_QUIESCED => {
                log_t("device quiesced (its server is gone)");
                return Ok(ctrl);
            }
            sys::UBLK_S_DEV_DEAD => return Err(refuse("it is stopped; open the volume anew".into())),
            sys::UBLK_S_DEV_LIVE if alive(info.ublksrv_pid) => {
                return Err(refuse(format!("it is live, served by pid {}", info.ublksrv_pid)))
            }
            // Live with a dead server: the driver has not noticed yet (it does when the server's
            // held requests time out).
            _ if Instant::now() > deadline => {
                return Err(refuse(format!(
                    "its dead server's device did not quiesce (state {})",
                    info.state
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Serves `device` as a new /dev/ublkbN, or (with `config.recover`) takes over the device a
/// killed server left, until the device is stopped (`close`) or `stop` is set. `ready` gets N
/// once the device is live. The volume is flushed before this returns.
pub fn serve(
    device: Arc<dyn BlockDevice>,
    config: UblkConfig,
    stop: Arc<AtomicBool>,
    ready: impl FnOnce(u32) + Send + Sync + 'static,
) -> Result<()> {
    let t0 = Instant::now();
    let log_t = move |what: &str| log::info!("[{:>6} ms] {what}", t0.elapsed().as_millis());
    let sector = device.block_size();
    let params = params(device.size(), sector, config.io_buf_bytes, device.read_only())?;
    let ctrl = match config.recover {
        None => UblkCtrlBuilder::default()
            .name("crypt-vfio")
            .id(-1)
            .nr_queues(config.queues)
            .depth(config.depth)
            .io_buf_bytes(config.io_buf_bytes)
            .ctrl_flags(RECOVERY_FLAGS)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(ublk("adding a device (is ublk_drv loaded?)"))?,
        Some(id) => {
            let old = check_recoverable(id, &config.identity, &log_t)?;
            checked(old.start_user_recover()).map_err(ublk("starting user recovery"))?;
            log_t("user recovery started");
            let info = old.dev_info();
            UblkCtrlBuilder::default()
                .name("crypt-vfio")
                .id(id as i32)
                .nr_queues(info.nr_hw_queues)
                .depth(info.queue_depth)
                .io_buf_bytes(info.max_io_buf_bytes)
                .ctrl_flags(info.flags & RECOVERY_FLAGS)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(ublk("reopening the device for recovery"))?
        }
    };
    let flags = ctrl.dev_info().flags;
    if flags & RECOVERY_FLAGS != RECOVERY_FLAGS {
        // A kernel clears the flags it does not know; a device that cannot recover would fail
        // a mounted filesystem's I/O when its server restarts.
        return Err(UblkServeError::Unsuitable(format!(
            "this kernel's ublk driver does not offer user recovery with reissue (flags {flags:#x})"
        )));
    }
    let id = ctrl.dev_info().dev_id;
    let info = ctrl.dev_info();
    if let Err(e) = ensure_descriptors(u64::from(info.nr_hw_queues) * u64::from(info.queue_depth)) {
        // Nothing was started on the device yet: an added one goes with its handle, a recovered
        // one stays quiesced for the next try.
        if config.recover.is_some() {
            ctrl.disown();
        }
        return Err(e);
    }
    let (jobs, workers) = start_workers(&device, config.workers)?;
    let identity = serde_json::json!({ JSON_KEY: config.identity });
    let tgt_init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = params.basic.dev_sectors << 9;
        dev.tgt.params = params;
        // Each tag may have its kernel command and its eventfd read in flight.
        let depth = dev.dev_info.queue_depth;
        dev.tgt.sq_depth = depth.saturating_mul(2);
        dev.tgt.cq_depth = depth.saturating_mul(2);
        dev.set_target_json(identity);
        Ok(())
    };
    let q_jobs = Mutex::new(jobs);
    let q_fn = {
        let q_jobs = Arc::new(q_jobs);
        move |qid: u16, dev: &UblkDev| {
            let jobs = q_jobs.lock().unwrap_or_else(|p| p.into_inner()).clone();
            serve_queue(qid, dev, &jobs)
        }
    };
    let started = move |ctrl: &UblkCtrl| {
        log_t("device live");
        let id = ctrl.dev_info().dev_id;
        ready(id);
        // SIGTERM: stop the device as `close` does, and only when `close` would; the queues
        // then unwind and run_target returns.
        std::thread::spawn(move || {
            let path = std::path::PathBuf::from(format!("/dev/ublkb{id}"));
            super::stop_when_unused(&stop, &AtomicBool::new(false), &path, || {
                let c = UblkCtrl::new_simple(id as i32).map_err(|e| e.to_string())?;
                checked(c.stop_dev()).map(drop).map_err(|e| describe(&e))
            });
        });
    };
    let served = ctrl.run_target(tgt_init, q_fn, started).map_err(ublk("serving"));
    if let Err(e) = served {
        // The start failed: run_target returned without joining its queue threads, which still
        // hold the job senders and /dev/ublkcN. Joining the workers, or the synchronous delete
        // of dropping the handle (it waits for the char device to be released), would wait for
        // ever; the asynchronous delete does not, and the threads end with the process.
        // A device being recovered is never deleted: it holds a filesystem's requeued writes,
        // which the next `--recover` can still complete.
        if config.recover.is_some() || checked(ctrl.del_dev_async()).is_err() {
            ctrl.disown();
        }
        return Err(e);
    }
    // The queue closures (and their job senders) are gone with run_target: the workers finish
    // what they have and exit.
    for w in workers {
        let _ = w.join();
    }
    let flushed = device.flush();
    if config.recover.is_some() {
        // A recovered device belongs to no ADD_DEV handle, so nothing else deletes it.
        let _ = ctrl.del_dev();
    }
    drop(ctrl);
    flushed.map_err(|e| {
        UblkServeError::Unsuitable(format!("flushing the volume after the device stopped: {e}"))
    })?;
    log::info!("/dev/ublkb{id} stopped; the volume is flushed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::file::FileBlockDevice;

    #[test]
    fn parameters_follow_the_volume_sector_size() {
        let p = params(64 << 20, 4096, 256 << 10, false).unwrap();
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.io_min_shift, 12);
        assert_eq!(p.basic.io_opt_shift, 17);
        assert_eq!(p.basic.dev_sectors, (64 << 20) >> 9, "dev_sectors are 512-byte units");
        assert_eq!(p.basic.max_sectors, (256 << 10) >> 9);
        assert_eq!(p.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_discard_segments, 1, "the driver takes one discard range");
        let p = params(1 << 20, 512, 4096, true).unwrap();
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.io_opt_shift, 12);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_READ_ONLY, 0);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC, "no discard on a read-only device");
    }

    #[test]
    fn shapes_the_driver_cannot_take_are_refused() {
        for (size, ss, io) in [
            (1 << 20, 8192, 1 << 20),
            (1 << 20, 1000, 4096),
            ((1 << 20) + 512, 4096, 4096),
            (0, 512, 4096),
            (1 << 20, 4096, 6144),
        ] {
            assert!(
                matches!(params(size, ss, io, false), Err(UblkServeError::Unsuitable(_))),
                "size {size} sector {ss} io {io} accepted"
            );
        }
    }

    fn iod(op: u32, flags: u32, sector: u64, sectors: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc { op_flags: op | flags, nr_sectors: sectors, start_sector: sector, addr: 0 }
    }

    #[test]
    fn descriptors_decode_in_512_byte_sectors_whatever_the_block_size() {
        let r = Request::from_iod(&iod(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 16, 8));
        assert_eq!(r, Request { op: sys::UBLK_IO_OP_WRITE, fua: true, offset: 8192, len: 4096 });
    }

    fn device(len: u64, read_only: bool) -> (tempfile::NamedTempFile, FileBlockDevice) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        let d = FileBlockDevice::open(f.path(), read_only).unwrap();
        (f, d)
    }

    #[test]
    fn requests_run_on_the_device_and_report_what_the_driver_expects() {
        let (_f, dev) = device(1 << 20, false);
        let mut buf = vec![0u8; 64 << 10];
        buf[..4096].fill(0xab);
        let req = |op, fua, offset, len| Request { op, fua, offset, len };
        assert_eq!(execute(&dev, req(sys::UBLK_IO_OP_WRITE, true, 4096, 4096), &mut buf), 4096);
        buf.fill(0);
        assert_eq!(execute(&dev, req(sys::UBLK_IO_OP_READ, false, 4096, 4096), &mut buf), 4096);
        assert!(buf[..4096].iter().all(|&b| b == 0xab));
        assert_eq!(execute(&dev, req(sys::UBLK_IO_OP_FLUSH, false, 0, 0), &mut buf), 0);
        assert_eq!(execute(&dev, req(sys::UBLK_IO_OP_WRITE_ZEROES, false, 4096, 4096), &mut buf), 0);
        assert_eq!(execute(&dev, req(sys::UBLK_IO_OP_READ, false, 4096, 4096), &mut buf), 4096);
        assert!(buf[..4096].iter().all(|&b| b == 0), "write-zeroes did not zero");
        assert_eq!(execute(&dev, req(sys::UBLK_IO_OP_DISCARD, false, 0, 8192), &mut buf), 0);
        // Past the end, longer than the tag's buffer, empty, unknown: refused, nothing run.
        assert_eq!(execute(&dev, req(sys::UBLK_IO_OP_READ, false, 1 << 20, 4096), &mut buf), -libc::EINVAL);
        assert_eq!(
            execute(&dev, req(sys::UBLK_IO_OP_READ, false, u64::MAX - 10, 4096), &mut buf),
            -libc::EINVAL
        );
        assert_eq!(execute(&dev, req(sys::UBLK_IO_OP_WRITE, false, 0, 128 << 10), &mut buf), -libc::EINVAL);
        assert_eq!(execute(&dev, req(sys::UBLK_IO_OP_READ, false, 0, 0), &mut buf), -libc::EINVAL);
        assert_eq!(
            execute(&dev, req(sys::UBLK_IO_OP_ZONE_OPEN, false, 0, 4096), &mut buf),
            -libc::EOPNOTSUPP
        );
        let (_g, ro) = device(1 << 20, true);
        for op in [sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_OP_DISCARD, sys::UBLK_IO_OP_WRITE_ZEROES] {
            assert_eq!(execute(&ro, req(op, false, 0, 4096), &mut buf), -libc::EROFS, "op {op}");
        }
        assert_eq!(execute(&ro, req(sys::UBLK_IO_OP_READ, false, 0, 4096), &mut buf), 4096);
    }

    /// The hand-off a tag and a worker share: the worker's result is visible once the eventfd
    /// says so, and the buffer outlives the tag's own reference.
    #[test]
    fn workers_finish_jobs_through_the_tag_eventfd() {
        let (_f, dev) = device(1 << 20, false);
        let dev: Arc<dyn BlockDevice> = Arc::new(dev);
        let (tx, workers) = start_workers(&dev, 2).unwrap();
        let buf = Arc::new(TagBuf::new(8192).unwrap());
        let done = Arc::new(TagDone::new().unwrap());
        // SAFETY: no job holds the buffer yet.
        unsafe { std::slice::from_raw_parts_mut(buf.ptr, 4096) }.fill(7);
        let req = Request { op: sys::UBLK_IO_OP_WRITE, fua: false, offset: 0, len: 4096 };
        tx.send(Job { req, buf: Arc::clone(&buf), done: Arc::clone(&done) }).unwrap();
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a live array from an eventfd we own (blocking until written).
        let n = unsafe { libc::read(done.eventfd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(u64::from_ne_bytes(count), 1);
        assert_eq!(done.result.load(Ordering::Acquire), 4096);
        let mut back = [0u8; 4096];
        dev.read_at(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        drop(tx);
        for w in workers {
            w.join().unwrap();
        }
    }

    #[test]
    fn identities_round_trip_through_the_device_json() {
        let salt = Identity::new_salt();
        let id = Identity {
            image: "/dev/vdb".into(),
            dev: 0,
            ino: 0xfd10,
            size: 3 << 20,
            sector_size: 4096,
            read_only: false,
            key_check: Identity::key_check(&salt, b"key and shape"),
            salt,
        };
        let json = serde_json::json!({ JSON_KEY: id });
        let back: Identity = serde_json::from_value(json[JSON_KEY].clone()).unwrap();
        assert_eq!(back, id);
        assert_eq!(id.mismatch(&back), None);
        assert!(!json.to_string().contains("key and shape"));
    }

    /// `--recover` takes a device over only from the same image, key, cipher and access mode.
    #[test]
    fn recovery_onto_another_key_image_or_mode_is_refused() {
        let salt = Identity::new_salt();
        let recorded = Identity {
            image: "/srv/a.img".into(),
            dev: 1,
            ino: 2,
            size: 3 << 20,
            sector_size: 4096,
            read_only: false,
            key_check: Identity::key_check(&salt, b"key A, aes-xts-plain64"),
            salt: salt.clone(),
        };
        let other_key =
            Identity { key_check: Identity::key_check(&salt, b"key B, aes-xts-plain64"), ..recorded.clone() };
        let other_cipher = Identity {
            key_check: Identity::key_check(&salt, b"key A, aes-cbc-essiv:sha256"),
            ..recorded.clone()
        };
        let read_only = Identity { read_only: true, ..recorded.clone() };
        let other_image = Identity { ino: 3, ..recorded.clone() };
        let unrecorded = Identity { key_check: String::new(), salt: String::new(), ..recorded.clone() };
        for (case, this, text) in [
            ("another key", &other_key, "another key"),
            ("another cipher", &other_cipher, "another key, cipher"),
            ("read-only", &read_only, "read-only"),
            ("another image", &other_image, "inode 1:2"),
        ] {
            let why = this.mismatch(&recorded).unwrap_or_else(|| panic!("{case} accepted"));
            assert!(why.contains(text), "{case}: {why}");
        }
        // A device recorded without a key check (an older crypt-vfio) is never taken over.
        assert!(recorded.mismatch(&unrecorded).is_some());
        // The same material under another salt gives another check: the JSON says nothing
        // about whether two devices share a key.
        assert_ne!(Identity::key_check("x", b"k"), Identity::key_check("y", b"k"));
    }

    #[test]
    fn refused_control_commands_reported_as_ok_are_errors() {
        assert!(checked(Ok(-libc::EBUSY)).is_err());
        assert_eq!(checked(Ok(0)).unwrap(), 0);
    }
}
