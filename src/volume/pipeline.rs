//! Sector requests through an engine queue, pipelined the way dm-crypt does it right.
//!
//! One I/O becomes one request per sector (each sector has its own IV, so sectors cannot share a
//! request). [`CryptOp`] submits them with backlog allowed and follows the contract of the
//! submit API: it keeps submitting while requests go `InProgress`; after a `Backlogged` it stops
//! until that request's `Promoted` arrives, then goes on; it marks each sector's final
//! completion in a per-sector set and is done when every submitted sector is marked. It never
//! waits for a single request to finish before submitting the next one.
//!
//! Completions are tracked per sector, not counted: an engine that completes a sector twice (or
//! completes a request the op never submitted) would otherwise make the count reach its end while
//! another sector is still in flight, and the I/O would end with that sector untransformed
//! (plaintext written to disk). A duplicate or unknown event is an [`DeviceError::ContractViolation`]
//! that fails the I/O; the op still waits for every sector it submitted, and the volume writes
//! nothing of a failed I/O.
//!
//! The watchdog: if nothing happens for [`Lane::watchdog`] while the op waits for a `Promoted`
//! or for completions, the op fails instead of hanging. An engine that said `Backlogged` and
//! then never promoted (the 2015 CAAM behaviour) gets an [`DeviceError::ContractViolation`] naming the
//! sector; an engine that accepted requests and never completed them gets [`DeviceError::Timeout`].
//! The lane is then poisoned: the engine still owns those requests, so the queue is not reused.
//!
//! [`CryptOp::step`] never blocks, so the same state machine serves the blocking API (a spin
//! loop around it) and the async one (a future whose `poll` is one step).
//!
//! Authenticated (AES-GCM) sectors go through the same op ([`CryptOp::with_aead`]): their IVs
//! are stored rather than computed, and each carries its tag and an AAD binding it to its place.
//! A volume keeps its lanes in a [`LanePool`], one lane per concurrent I/O.
//!
//! On an engine pool, a sector whose device failed while it may have written the sector's
//! buffer ([`DeviceError::MemberFailed`]) is run again from the op's own data, in another
//! buffer (the lane's next free one: it may be the failed member's memory too, which the pool
//! runs elsewhere from a copy while that member is not up): `data` still holds the sector as the caller gave it (the ciphertext
//! read, the plaintext to write) because a sector is copied back only on success, and an
//! authenticated sector reuses its stored IV with the same plaintext (the same output, no new
//! nonce). At most [`SECTOR_TRIES`] runs per sector, under the same watchdog; a re-run the
//! engine refuses ends the op with that error at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crypt_vfio_wait::SpinBudget;

use crate::engine::{BatchSink, Buf, Direction, Engine, Event, Iv, Queue, Request, SubmitErrorKind, TAG_LEN};
use crate::error::{CryptoError, DeviceError, Error, Result, VolumeError};
use crate::virtio_crypto::ADAPTIVE_MAX_SPIN;

use super::iv::IvGenerator;

/// How many sector requests one op keeps in flight (ring plus backlog). Enough to fill any ring
/// and exercise the backlog, while bounding the DMA memory a lane holds.
pub const WINDOW: usize = 1024;

/// Most sector requests per submit call: a device engine takes its queue lock, publishes its
/// ring and rings its doorbell once per call, not once per sector.
const SUBMIT_BATCH: usize = 32;

/// Sector buffers an idle lane keeps.
const SPARE_BUFFERS: usize = 128;

/// Most runs of one sector when pool members fail under it.
pub const SECTOR_TRIES: u8 = 3;

/// Events from the engine, as the queue's callback leaves them.
struct Inbox<S> {
    events: Mutex<Vec<Event<S>>>,
    waker: Mutex<Option<Waker>>,
}

/// One engine queue, used by one I/O at a time, with its inbox and spare sector buffers.
pub struct Lane<S> {
    queue: Box<dyn Queue<S>>,
    inbox: Arc<Inbox<S>>,
    scratch: Vec<Event<S>>,
    /// Requests being gathered for one submit call (kept for its allocation).
    staged: VecDeque<Request<S>>,
    free: Vec<Buf>,
    buf_len: usize,
    io_seq: u32,
    poisoned: bool,
    describe: String,
    /// Events arrive only when this side polls the queue (an engine in polling mode).
    self_driven: bool,
    /// How long an op waits without any event before failing.
    pub watchdog: Duration,
}

impl<S: Send + 'static> Lane<S> {
    /// Opens queue `index` of `engine` for requests of `buf_len` bytes.
    pub fn open<E: Engine<Session = S>>(
        engine: &E,
        index: usize,
        buf_len: usize,
        watchdog: Duration,
    ) -> Result<Self> {
        let inbox = Arc::new(Inbox { events: Mutex::new(Vec::new()), waker: Mutex::new(None) });
        let sink_inbox = inbox.clone();
        // Events come in runs (every completion one reap found): one lock and one wake-up per
        // run, not per sector.
        let sink: BatchSink<S> = Arc::new(move |events: &mut dyn Iterator<Item = Event<S>>| {
            let mut inbox = sink_inbox.events.lock().unwrap_or_else(|e| e.into_inner());
            let before = inbox.len();
            inbox.extend(events);
            let arrived = inbox.len() > before;
            drop(inbox);
            if arrived {
                if let Some(w) = sink_inbox.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    w.wake();
                }
            }
        });
        Ok(Self {
            queue: engine.open_batch_queue(index, sink)?,
            inbox,
            scratch: Vec::new(),
            staged: VecDeque::with_capacity(SUBMIT_BATCH),
            free: Vec::new(),
            buf_len,
            io_seq: 0,
            poisoned: false,
            describe: engine.describe(),
            self_driven: !engine.delivers_events(),
            watchdog,
        })
    }

    /// Zeroes the spare buffers, which still hold the last data that went through them (for
    /// key slot material, key-equivalent bytes).
    pub fn wipe_buffers(&mut self) {
        for b in &mut self.free {
            b.zeroize();
        }
    }

    fn buffer<E: Engine<Session = S>>(&mut self, engine: &E) -> Result<Buf> {
        match self.free.pop() {
            Some(b) => Ok(b),
            None => engine.alloc_buffer(self.buf_len),
        }
    }
}

/// Lanes of one volume, reused across I/Os: each concurrent I/O takes one, so concurrent callers
/// never share an engine queue handle, and the pool grows to the largest concurrency seen.
pub struct LanePool<S> {
    lanes: Mutex<Vec<Lane<S>>>,
    next_index: AtomicUsize,
    buf_len: usize,
}

impl<S: Send + 'static> LanePool<S> {
    /// An empty pool of lanes for requests of `buf_len` bytes.
    pub fn new(buf_len: usize) -> Self {
        Self { lanes: Mutex::new(Vec::new()), next_index: AtomicUsize::new(0), buf_len }
    }

    /// A lane from the pool, or a new one on the next engine queue.
    pub fn take<E: Engine<Session = S>>(&self, engine: &E, watchdog: Duration) -> Result<LaneGuard<'_, S>> {
        let pooled = self.lanes.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut lane = match pooled {
            Some(l) => l,
            None => {
                let index = self.next_index.fetch_add(1, Ordering::Relaxed);
                Lane::open(engine, index, self.buf_len, watchdog)?
            }
        };
        lane.watchdog = watchdog;
        Ok(LaneGuard { pool: self, lane: Some(lane), finished: false })
    }

    /// Closes every pooled lane (their engine queues).
    pub fn clear(&self) {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// A lane on loan from a [`LanePool`]; returned on drop unless the op left it poisoned or
/// unfinished.
pub struct LaneGuard<'p, S> {
    pool: &'p LanePool<S>,
    lane: Option<Lane<S>>,
    finished: bool,
}

impl<S> LaneGuard<'_, S> {
    /// The lane.
    pub fn lane(&mut self) -> &mut Lane<S> {
        self.lane.as_mut().expect("a guard holds its lane until dropped")
    }

    /// Marks the op on the lane as run to its end (success or failure), so the lane may be
    /// reused.
    pub fn finish(&mut self) {
        self.finished = true;
    }
}

impl<S> Drop for LaneGuard<'_, S> {
    fn drop(&mut self) {
        if let Some(lane) = self.lane.take() {
            // An op dropped half-way (a cancelled future) leaves requests with the engine: the
            // lane is not reused, so their late events cannot meet a new op.
            if self.finished && !lane.poisoned {
                let mut lane = lane;
                // An idle lane keeps a few buffers for the next I/O, not a whole window's worth:
                // a server may hold a lane per client request.
                lane.free.truncate(SPARE_BUFFERS);
                self.pool.lanes.lock().unwrap_or_else(|e| e.into_inner()).push(lane);
            }
        }
    }
}

/// The per-sector IV and tag of an authenticated (AES-GCM) sector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SectorMeta {
    /// The 96-bit IV, fresh and random for every write.
    pub iv: [u8; 12],
    /// The GCM tag.
    pub tag: [u8; TAG_LEN],
}

/// Authenticated sectors: their IVs and tags, and what binds each to its place.
struct Aead<'d> {
    meta: &'d mut [SectorMeta],
    volume_id: [u8; 16],
}

/// The additional authenticated data of an authenticated sector: the volume's id and the sector
/// number, so that a sector copied to another place or another volume fails its check.
pub fn sector_aad(volume_id: &[u8; 16], sector: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(24);
    aad.extend_from_slice(volume_id);
    aad.extend_from_slice(&sector.to_le_bytes());
    aad
}

/// Where a sector's IV number comes from.
#[derive(Clone, Copy, Debug)]
pub struct IvNumbering {
    /// log2(sector size / 512).
    pub shift: u32,
    /// dm-crypt's `<iv_offset>`, in 512-byte sectors.
    pub iv_offset: u64,
    /// dm-crypt's `iv_large_sectors`: count IVs in sectors of the volume's size, not 512 bytes.
    pub large_sectors: bool,
}

impl IvNumbering {
    /// The IV number of volume sector `sector` (dm-crypt: `(sector512 + iv_offset) >> shift` with
    /// large sectors, `sector512 + iv_offset` without).
    pub fn iv_sector(&self, sector: u64) -> u64 {
        let s512 = (sector << self.shift).wrapping_add(self.iv_offset);
        if self.large_sectors {
            s512 >> self.shift
        } else {
            s512
        }
    }
}

/// The cipher context of an op: what every sector request shares.
pub struct CryptContext<'a, E: Engine> {
    /// The engine (for buffers).
    pub engine: &'a E,
    /// The keyed session.
    pub session: &'a E::Session,
    /// The IV generator (`None` for authenticated sectors, whose IVs are stored).
    pub ivgen: Option<&'a IvGenerator>,
    /// IV numbering.
    pub numbering: IvNumbering,
    /// Sector size in bytes.
    pub sector_size: usize,
}

/// Encrypts or decrypts whole sectors in place through one lane.
pub struct CryptOp<'a, 'd, E: Engine> {
    ctx: CryptContext<'a, E>,
    lane: &'a mut Lane<E::Session>,
    direction: Direction,
    first_sector: u64,
    data: &'d mut [u8],
    count: usize,
    next: usize,
    /// Distinct sectors finally completed (the number of `true`s in `finished`).
    completed: usize,
    /// Which sectors have had their final completion.
    finished: Vec<bool>,
    /// A request of ours waits in the backlog: submit nothing until it is promoted.
    blocked_on: Option<usize>,
    /// `Promoted` events seen, by sector index (they may come before the submit returns).
    promoted: Vec<bool>,
    /// Backlogged requests not yet promoted (to name a contract violation).
    backlogged: Vec<usize>,
    /// A request refused with `Busy` (backlog full), to submit again after a completion.
    retry: Option<Request<E::Session>>,
    /// The first failure, by sector; no more submissions after one.
    error: Option<(usize, Error)>,
    last_progress: Instant,
    aead: Option<Aead<'d>>,
    /// Sectors to run again (their pool member failed under them), and runs so far per sector.
    reruns: Vec<usize>,
    tries: Vec<u8>,
}

impl<'a, 'd, E: Engine> CryptOp<'a, 'd, E>
where
    E::Session: Send + 'static,
{
    /// An op over `data` (whole sectors), the first being volume sector `first_sector`.
    pub fn new(
        ctx: CryptContext<'a, E>,
        lane: &'a mut Lane<E::Session>,
        direction: Direction,
        first_sector: u64,
        data: &'d mut [u8],
    ) -> Self {
        debug_assert_eq!(data.len() % ctx.sector_size, 0);
        let count = data.len() / ctx.sector_size;
        lane.io_seq = lane.io_seq.wrapping_add(1);
        Self {
            ctx,
            lane,
            direction,
            first_sector,
            data,
            count,
            next: 0,
            completed: 0,
            finished: vec![false; count],
            blocked_on: None,
            promoted: vec![false; count],
            backlogged: Vec::new(),
            retry: None,
            error: None,
            last_progress: Instant::now(),
            aead: None,
            reruns: Vec::new(),
            tries: vec![1; count],
        }
    }

    /// Makes the op AES-GCM over authenticated sectors: encryption fills `meta[i].tag` (the
    /// IVs must be fresh and set by the caller), decryption checks it.
    pub fn with_aead(mut self, meta: &'d mut [SectorMeta], volume_id: [u8; 16]) -> Self {
        assert_eq!(meta.len(), self.count, "one IV and tag per sector");
        self.aead = Some(Aead { meta, volume_id });
        self
    }

    fn user_data(&self, index: usize) -> u64 {
        (u64::from(self.lane.io_seq) << 32) | index as u64
    }

    /// The sector index a request of this op carries in its user data (see [`user_data`]).
    ///
    /// [`user_data`]: Self::user_data
    fn index_of(request: &Request<E::Session>) -> usize {
        (request.user_data & 0xffff_ffff) as usize
    }

    /// The index of our sector an event is about, if it is ours (a poisoned-then-dropped op's
    /// late events carry another sequence number).
    fn ours(&self, user_data: u64) -> Option<usize> {
        let idx = (user_data & 0xffff_ffff) as usize;
        ((user_data >> 32) as u32 == self.lane.io_seq && idx < self.count).then_some(idx)
    }

    fn fail(&mut self, index: usize, error: Error) {
        let sector = self.first_sector + index as u64;
        let error = match error {
            e @ (Error::Device(DeviceError::ContractViolation(_))
            | Error::Device(DeviceError::Timeout(..))) => e,
            Error::Crypto(CryptoError::AuthFailed) if self.aead.is_some() => {
                Error::Volume(VolumeError::SectorAuthFailed { sector })
            }
            e => Error::Volume(VolumeError::Sector { sector, source: Box::new(e) }),
        };
        match &self.error {
            Some((i, _)) if *i <= index => {}
            _ => self.error = Some((index, error)),
        }
    }

    /// Records a broken promise of the engine: the I/O fails with it (it outranks a sector's
    /// own error; the first violation wins). The lane is not reused: more stray events may come.
    fn violation(&mut self, what: String) {
        self.lane.poisoned = true;
        if matches!(self.error, Some((_, Error::Device(DeviceError::ContractViolation(_))))) {
            return;
        }
        let index = self.error.as_ref().map_or(self.count, |(i, _)| *i);
        self.error = Some((
            index,
            Error::Device(DeviceError::ContractViolation(format!("{}: {what}", self.lane.describe))),
        ));
    }

    /// The sector an event names, if it is one this op has submitted.
    fn submitted_sector(&self, user_data: u64) -> Option<usize> {
        self.ours(user_data).filter(|&i| i < self.next)
    }

    fn drain_events(&mut self) {
        let mut events = std::mem::take(&mut self.lane.scratch);
        std::mem::swap(&mut events, &mut *self.lane.inbox.events.lock().unwrap_or_else(|e| e.into_inner()));
        let ss = self.ctx.sector_size;
        // The watchdog's clock is read once per drain that saw progress, not once per event.
        let mut progressed = false;
        for ev in events.drain(..) {
            match ev {
                Event::Promoted { user_data } => {
                    let Some(i) = self.submitted_sector(user_data) else {
                        self.violation(format!(
                            "Promoted for request {user_data:#x}, which this I/O never submitted"
                        ));
                        continue;
                    };
                    if self.promoted[i] || self.finished[i] {
                        let sector = self.first_sector + i as u64;
                        self.violation(format!("sector {sector}: Promoted twice or after its completion"));
                        continue;
                    }
                    self.promoted[i] = true;
                    self.backlogged.retain(|&b| b != i);
                    if self.blocked_on == Some(i) {
                        self.blocked_on = None;
                    }
                    progressed = true;
                }
                Event::Completed(c) => {
                    let Some(i) = self.submitted_sector(c.request.user_data) else {
                        let user_data = c.request.user_data;
                        self.violation(format!(
                            "a completion for request {user_data:#x}, which this I/O never submitted"
                        ));
                        continue;
                    };
                    if self.finished[i] {
                        // Its buffer is not ours to reuse: the engine may still hold the original.
                        let sector = self.first_sector + i as u64;
                        self.violation(format!("sector {sector} completed twice"));
                        continue;
                    }
                    if !self.promoted[i] && self.backlogged.contains(&i) {
                        // Nothing else would unblock the op: it would sit out the watchdog.
                        let sector = self.first_sector + i as u64;
                        self.violation(format!(
                            "sector {sector} was backlogged and completed without Promoted"
                        ));
                        self.backlogged.retain(|&b| b != i);
                        if self.blocked_on == Some(i) {
                            self.blocked_on = None;
                        }
                    }
                    self.finished[i] = true;
                    self.completed += 1;
                    progressed = true;
                    match c.result {
                        Ok(()) if c.request.data.len() != ss => {
                            let sector = self.first_sector + i as u64;
                            let len = c.request.data.len();
                            self.violation(format!(
                                "sector {sector} came back with {len} bytes instead of {ss}"
                            ));
                            continue;
                        }
                        Ok(()) => {
                            c.request.data.copy_to_slice(&mut self.data[i * ss..(i + 1) * ss]);
                            if let (Some(a), Direction::Encrypt) = (&mut self.aead, self.direction) {
                                a.meta[i].tag = c.request.tag;
                            }
                        }
                        Err(Error::Device(DeviceError::MemberFailed { member, source }))
                            if self.error.is_none() && self.tries[i] < SECTOR_TRIES =>
                        {
                            // Not finished after all: run again from `data`. The buffer may hold
                            // what the failed device wrote, and is pinned to it: dropped.
                            let sector = self.first_sector + i as u64;
                            log::warn!("sector {sector}: pool member {member} failed under it ({source}); running it again");
                            self.tries[i] += 1;
                            self.finished[i] = false;
                            self.promoted[i] = false;
                            self.completed -= 1;
                            self.reruns.push(i);
                            continue;
                        }
                        Err(e) => self.fail(i, e),
                    }
                    self.lane.free.push(c.request.data);
                }
            }
        }
        self.lane.scratch = events;
        if progressed {
            self.last_progress = Instant::now();
        }
    }

    fn request(&mut self, index: usize) -> Result<Request<E::Session>> {
        let ss = self.ctx.sector_size;
        let mut buf = self.lane.buffer(self.ctx.engine)?;
        buf.copy_from_slice(&self.data[index * ss..(index + 1) * ss]);
        let sector = self.first_sector + index as u64;
        let user_data = self.user_data(index);
        if let Some(a) = &self.aead {
            let m = a.meta[index];
            let mut req =
                Request::new(self.ctx.session.clone(), self.direction, Iv::from(m.iv), buf, user_data);
            req.aad = sector_aad(&a.volume_id, sector);
            req.tag = m.tag;
            return Ok(req);
        }
        let ivgen = self
            .ctx
            .ivgen
            .ok_or_else(|| Error::Volume(VolumeError::Invalid("no IV generator for the sectors".into())))?;
        let iv = ivgen.iv(self.ctx.numbering.iv_sector(sector));
        Ok(Request::new(self.ctx.session.clone(), self.direction, Iv::from(iv), buf, user_data))
    }

    /// Submits what the contract allows now, in batches of up to [`SUBMIT_BATCH`]: a request
    /// refused as busy first, then sectors to run again, then new sectors in order. After a
    /// batch with backlogged requests it submits nothing more until the last of them is
    /// promoted (the backlog promotes in order, so the earlier ones are promoted by then).
    fn submit_some(&mut self) {
        let mut staged = std::mem::take(&mut self.lane.staged);
        while self.error.is_none() && self.blocked_on.is_none() {
            let limit = SUBMIT_BATCH.min(WINDOW.saturating_sub(self.next - self.completed));
            if limit == 0 {
                break;
            }
            let mut indices = [0usize; SUBMIT_BATCH];
            // The next new sector to stage (a busy-refused new sector is `next` itself).
            let mut upcoming = self.next;
            if let Some(r) = self.retry.take() {
                let index = Self::index_of(&r);
                upcoming += usize::from(index == self.next);
                indices[0] = index;
                staged.push_back(r);
            }
            while staged.len() < limit {
                let (index, made) = if !self.reruns.is_empty() {
                    let i = self.reruns.remove(0);
                    (i, self.request(i))
                } else if upcoming < self.count {
                    upcoming += 1;
                    (upcoming - 1, self.request(upcoming - 1))
                } else {
                    break;
                };
                match made {
                    Ok(r) => {
                        indices[staged.len()] = index;
                        staged.push_back(r);
                    }
                    // What is staged still goes; nothing more is staged after a failure.
                    Err(e) if index < self.next => {
                        self.give_up_rerun(index, e);
                        break;
                    }
                    Err(e) => {
                        self.fail(index, e);
                        break;
                    }
                }
            }
            // After a failure nothing more is submitted: what was staged goes back below.
            let r = if staged.is_empty() || self.error.is_some() {
                Default::default()
            } else {
                self.lane.queue.submit_batch(&mut staged, true)
            };
            let taken = r.in_progress + r.backlogged;
            for &index in &indices[..taken] {
                // New sectors are staged in order from `next`; the others are re-runs.
                self.next += usize::from(index == self.next);
            }
            if r.backlogged > 0 {
                self.last_progress = Instant::now();
                // Recorded before the events are looked at: Promoted (and even a completion)
                // may have come already through another thread's poll, and the drain below
                // must find these sectors backlogged to take them off (or to see a completion
                // without Promoted for what it is).
                for &index in &indices[r.in_progress..taken] {
                    self.backlogged.push(index);
                }
                self.blocked_on = Some(indices[taken - 1]);
                self.drain_events();
            }
            let busy = match r.refused {
                Some(SubmitErrorKind::Busy) => {
                    // The backlog is at its limit: wait for a completion, then resubmit.
                    self.retry = staged.pop_front();
                    true
                }
                Some(SubmitErrorKind::Rejected(err)) => {
                    if let Some(req) = staged.pop_front() {
                        let index = Self::index_of(&req);
                        self.lane.free.push(req.data);
                        if index < self.next {
                            self.give_up_rerun(index, err);
                        } else {
                            self.fail(index, err);
                        }
                    }
                    false
                }
                None => false,
            };
            // Requests behind a refusal (or after a backlogged one) go back: re-runs to the
            // front of their list, in order; new sectors are staged again from `next`.
            while let Some(req) = staged.pop_back() {
                let index = Self::index_of(&req);
                if index < self.next {
                    self.reruns.insert(0, index);
                }
                self.lane.free.push(req.data);
            }
            if busy || taken == 0 {
                break;
            }
        }
        self.lane.staged = staged;
    }

    /// Sector `i`, which was to run again, cannot: it is finished, with `error` (the op's
    /// error unless an earlier sector has one). Counted, or the op would wait for it forever.
    fn give_up_rerun(&mut self, i: usize, error: Error) {
        self.finished[i] = true;
        self.completed += 1;
        self.fail(i, error);
    }

    fn done(&self) -> bool {
        let stop = self.error.is_some()
            || (self.next == self.count && self.retry.is_none() && self.reruns.is_empty());
        // After a failure, sectors waiting to run again (in `reruns`, or a re-run refused as
        // busy in `retry`) are given up with the I/O.
        let given_up = if self.error.is_some() {
            let retried_rerun = self.retry.as_ref().is_some_and(|r| Self::index_of(r) < self.next);
            self.reruns.len() + usize::from(retried_rerun)
        } else {
            0
        };
        stop && self.completed + given_up == self.next
    }

    /// One non-blocking step: collect events, submit what may be submitted, reap. `Ready` when
    /// every sector has completed (or the watchdog fired).
    pub fn step(&mut self) -> Poll<Result<()>> {
        self.drain_events();
        self.submit_some();
        self.lane.queue.poll();
        self.drain_events();
        self.submit_some();
        if self.done() {
            return Poll::Ready(match self.error.take() {
                Some((_, e)) => Err(e),
                None => Ok(()),
            });
        }
        if self.last_progress.elapsed() > self.lane.watchdog {
            self.lane.poisoned = true;
            // A contract violation already seen (a duplicate standing in for a missing
            // completion) says more than the timeout it led to.
            return Poll::Ready(Err(match self.error.take() {
                Some((_, e @ Error::Device(DeviceError::ContractViolation(_)))) => e,
                _ => self.watchdog_error(),
            }));
        }
        Poll::Pending
    }

    fn watchdog_error(&self) -> Error {
        let d = self.lane.watchdog;
        if let Some(&i) = self.backlogged.first() {
            let sector = self.first_sector + i as u64;
            Error::Device(DeviceError::ContractViolation(format!(
                "{}: the request for sector {sector} was backlogged but never promoted within {d:?} \
                 (a backlogged request must be kept and promoted exactly once; this engine dropped it)",
                self.lane.describe
            )))
        } else {
            Error::Device(DeviceError::Timeout(d, "sector completions from the engine"))
        }
    }

    /// Registers `waker` to be woken by the next engine event.
    pub fn set_waker(&self, waker: &Waker) {
        *self.lane.inbox.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
    }

    /// Runs the op to the end on this thread.
    pub fn run(mut self) -> Result<()> {
        let mut waiter = EventWaiter::new();
        let result = loop {
            match self.step() {
                Poll::Ready(r) => break r,
                Poll::Pending => waiter.wait(&mut self),
            }
        };
        stop_polling(self.lane.queue.as_mut());
        result
    }
}

/// How [`CryptOp::run`] waits between two steps that made no progress.
struct EventWaiter {
    spin: SpinBudget,
    idle: u32,
    wake: Waker,
}

impl EventWaiter {
    fn new() -> Self {
        Self {
            spin: SpinBudget::new(Duration::from_micros(1), ADAPTIVE_MAX_SPIN),
            idle: 0,
            wake: Waker::from(Arc::new(Unparker(std::thread::current()))),
        }
    }

    /// A polled engine delivers nothing unless this thread polls: spin briefly (completions
    /// usually come within microseconds), then yield. An engine that delivers on its own thread
    /// is waited for as in its adaptive mode: poll it for the budget, its completion thread kept
    /// asleep meanwhile ([`Queue::begin_polling`]: a wake-up per coalesced interrupt cost more
    /// than the sectors' AES), then sleep until the inbox's waker (registered before the last
    /// look, so an event in between unparks at once) or, at the latest, the watchdog's next
    /// look.
    fn wait<E: Engine>(&mut self, op: &mut CryptOp<'_, '_, E>) {
        if op.lane.self_driven {
            self.idle += 1;
            if self.idle < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
            return;
        }
        // With everything submitted and many sectors still on the device, no single event lets
        // the op go on: spinning for them would only take the CPU from the device (on a small
        // machine, the emulated device's worker). Sleep at once; the engine's interrupts are
        // coalesced, so the op wakes a few times per I/O rather than per sector.
        let long_wait = op.next == op.count
            && op.retry.is_none()
            && op.reruns.is_empty()
            && op.next - op.completed > SUBMIT_BATCH;
        let (inbox, queue) = (&op.lane.inbox, &mut op.lane.queue);
        let start = Instant::now();
        let has_event = || !inbox.events.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
        if long_wait
            || !{
                queue.begin_polling();
                self.spin.spin(|| queue.poll() > 0 || has_event())
            }
        {
            *inbox.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.wake.clone());
            if queue.end_polling() {
                if !has_event() {
                    std::thread::park_timeout(op.lane.watchdog.min(Duration::from_millis(100)));
                }
            } else {
                // Completions already wait on the ring, and with the interrupt unarmed no one
                // else will take them: stay the queue's poller, and the next step reaps them.
                queue.begin_polling();
            }
            // A sleep taken without spinning says nothing of how long a spin would have waited.
            if !long_wait {
                self.spin.record(start.elapsed());
            }
        }
    }
}

/// Hands the reaping of `queue` back to its engine's completion thread. What is already on the
/// ring (it may be another lane's on a shared queue) is reaped here while the engine says so,
/// a few times at most: a device queue also wakes its completion thread for them, so a
/// delivery another thread holds up cannot keep this one here.
fn stop_polling<S>(queue: &mut dyn Queue<S>) {
    for _ in 0..3 {
        if queue.end_polling() {
            return;
        }
        queue.begin_polling();
        queue.poll();
    }
    queue.end_polling();
}

/// Wakes the thread running a blocking op.
struct Unparker(std::thread::Thread);

impl std::task::Wake for Unparker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// The future of an op: each poll is one step; it wakes itself to keep driving a polled engine,
/// and waits for its waker with an engine that delivers events on its own.
pub struct CryptFuture<'a, 'd, E: Engine> {
    op: CryptOp<'a, 'd, E>,
}

impl<'a, 'd, E: Engine> CryptFuture<'a, 'd, E> {
    /// Wraps `op`.
    pub fn new(op: CryptOp<'a, 'd, E>) -> Self {
        Self { op }
    }
}

// The op holds no self-references: moving it between polls is fine.
impl<E: Engine> Unpin for CryptFuture<'_, '_, E> {}

impl<E: Engine> std::future::Future for CryptFuture<'_, '_, E>
where
    E::Session: Send + 'static,
{
    type Output = Result<()>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        this.op.set_waker(cx.waker());
        match this.op.step() {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => {
                // Engines in polling mode deliver nothing unless someone polls: keep being polled.
                // Others wake the registered waker when an event arrives.
                if this.op.lane.self_driven {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    }
}
