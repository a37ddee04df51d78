//! Holes in backing files: finding them (`SEEK_DATA`/`SEEK_HOLE`) and making them
//! (`fallocate(PUNCH_HOLE)`).
//!
//! Trim frees space in the image by punching holes, and block status tells clients where the
//! holes are so that `qemu-img convert` and `nbdcopy` skip them. A hole reads as zero bytes from
//! the file; the encrypted views turn that into zero *plaintext* (see [`super::Volume`] and
//! [`super::AuthVolume`]), because decrypting zeroes would give garbage.
//!
//! Filesystems without hole support report the whole file as data and refuse to punch; both are
//! taken as "no holes here", never as an error: trim is a hint.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::Errno;

use crate::error::{Error, Result};

/// The granularity assumed when the filesystem reports a block size that is no use
/// (not a power of two, or huge).
const FALLBACK_BLOCK: u64 = 4096;

/// One run of a file range: `[start, end)` is all data or all hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Whether the run is a hole (reads as zeroes, takes no space).
    pub hole: bool,
}

/// The filesystem's allocation unit for `file`: holes begin and end on multiples of it.
pub fn block_granularity(file: &File) -> u64 {
    match file.metadata() {
        Ok(m) if m.blksize().is_power_of_two() && (512..=1 << 20).contains(&m.blksize()) => m.blksize(),
        _ => FALLBACK_BLOCK,
    }
}

/// The runs of data and holes that cover `[start, end)` of `file`, in order, at most
/// `max_runs` of them (the last one may then end before `end`). A filesystem that cannot tell
/// reports one data run.
pub fn runs(file: &File, start: u64, end: u64, max_runs: usize) -> Result<Vec<Run>> {
    Ok(runs_and_data(file, start, end, max_runs)?.0)
}

/// `[start, end)` of a file, in bytes.
type Span = (u64, u64);

/// [`runs`], and the first data run found as the filesystem reported it (not cut at `end`).
fn runs_and_data(file: &File, start: u64, end: u64, max_runs: usize) -> Result<(Vec<Run>, Option<Span>)> {
    let mut found = None;
    let mut out: Vec<Run> = Vec::new();
    let mut at = start;
    while at < end && out.len() < max_runs.max(1) {
        let data = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(d) => d,
            // No data at or after `at`: the rest is a hole (or lies past the end of the file,
            // which reads as zeroes too).
            Err(Errno::NXIO) => u64::MAX,
            Err(Errno::INVAL | Errno::NOTSUP) => {
                out.push(Run { start: at, end, hole: false });
                break;
            }
            Err(e) => return Err(Error::os("finding data in the image (SEEK_DATA)", e.into())),
        };
        if data > at {
            let stop = data.min(end);
            out.push(Run { start: at, end: stop, hole: true });
            at = stop;
            continue;
        }
        let hole = match rustix::fs::seek(file, SeekFrom::Hole(at)) {
            Ok(h) => h,
            Err(Errno::NXIO) => u64::MAX,
            Err(e) => return Err(Error::os("finding holes in the image (SEEK_HOLE)", e.into())),
        };
        // SEEK_HOLE never returns `at` itself here (SEEK_DATA just said `at` is data), but a
        // file changing under us must not make this loop spin.
        let stop = hole.max(at + 1).min(end);
        found.get_or_insert((at, hole.max(at + 1)));
        out.push(Run { start: at, end: stop, hole: false });
        at = stop;
    }
    Ok((out, found))
}

/// A range of a file known to be all data, so that reads of a dense image need not ask the
/// filesystem on every I/O: tmpfs answers `SEEK_HOLE` by walking the page cache from the
/// offset to the next hole (the end of a dense file) under the inode lock, and a profile of
/// `serve` on tmpfs spent most of its time there.
///
/// Data only turns into a hole by a punch, so the owner of the file calls [`forget`]
/// (Self::forget) after each of its punches, while it still holds the punched range against
/// readers; a change by another process is not seen (as with any cached view of the file).
#[derive(Debug, Default)]
pub struct KnownData {
    state: std::sync::Mutex<Known>,
    /// Signalled when a lookup ends.
    looked: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct Known {
    /// Bumped by every `forget`: an answer the filesystem gave before it is not kept.
    generation: u64,
    data: Option<Span>,
    /// The first lookup (nothing known yet) is asking the filesystem: others wait for its
    /// answer instead of asking too, as the first reads of a server's workers (all at once)
    /// each walked the whole dense file on tmpfs.
    looking: bool,
}

impl KnownData {
    /// Knows nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`runs`] of `[start, end)` of `file`, from what is known when that covers the range,
    /// else from the filesystem (and then the data run at `start` is remembered).
    pub fn runs(&self, file: &File, start: u64, end: u64) -> Result<Vec<Run>> {
        let (generation, first) = {
            let mut k = self.lock();
            loop {
                if k.data.is_some_and(|(a, b)| a <= start && end <= b) {
                    return Ok(vec![Run { start, end, hole: false }]);
                }
                // Only a lookup with nothing known yet is waited for (the first reads of a
                // server's workers, all at once); later ones (reads of holes) run side by side.
                if !k.looking || k.data.is_some() {
                    break;
                }
                k = self.looked.wait(k).unwrap_or_else(|p| p.into_inner());
            }
            let first = k.data.is_none();
            if first {
                k.looking = true;
            }
            (k.generation, first)
        };
        // Ends the lookup also if it fails or unwinds, so waiters do not wait forever.
        struct Looked<'a>(&'a KnownData);
        impl Drop for Looked<'_> {
            fn drop(&mut self) {
                self.0.lock().looking = false;
                self.0.looked.notify_all();
            }
        }
        let _looked = first.then_some(Looked(self));
        let (out, found) = runs_and_data(file, start, end, usize::MAX)?;
        if let Some(found) = found {
            self.remember(generation, found);
        }
        Ok(out)
    }

    /// Keeps `data`, found by the filesystem after `generation` was current, unless a punch
    /// came since (the answer may predate the punch).
    fn remember(&self, generation: u64, data: Span) {
        let mut k = self.lock();
        if k.generation == generation {
            k.data = Some(data);
        }
    }

    /// Forgets what is known: some of it may be a hole now.
    pub fn forget(&self) {
        let mut k = self.lock();
        k.generation = k.generation.wrapping_add(1);
        k.data = None;
    }
}

/// Whether all of `[start, end)` of `file` is one hole.
pub fn is_hole(file: &File, start: u64, end: u64) -> Result<bool> {
    Ok(runs(file, start, end, 1)?.first().is_some_and(|r| r.hole && r.end >= end))
}

/// Punches a hole over `[start, end)` (the file keeps its size). Returns false when the
/// filesystem cannot punch holes, which leaves the data in place.
pub fn punch(file: &File, start: u64, end: u64) -> Result<bool> {
    if end <= start {
        return Ok(true);
    }
    match rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        start,
        end - start,
    ) {
        Ok(()) => Ok(true),
        Err(Errno::OPNOTSUPP | Errno::NOSYS) => Ok(false),
        Err(e) => Err(Error::os(
            format!("punching a hole of {} bytes at {start} in the image", end - start),
            e.into(),
        )),
    }
}

/// The part of `[start, end)` that holes can cover whole: both ends rounded inward to
/// multiples of `granularity` (a power of two). Empty when none is.
pub fn inner_aligned(start: u64, end: u64, granularity: u64) -> (u64, u64) {
    let a = start.div_ceil(granularity).saturating_mul(granularity);
    let b = end / granularity * granularity;
    if a < b {
        (a, b)
    } else {
        (a, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn known_data_is_dropped_by_a_punch_even_one_racing_the_lookup() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&vec![0xa5u8; 1 << 20], 0).unwrap();
        f.sync_all().unwrap();
        if !punch(&f, 0, 0).unwrap() {
            return;
        }
        let known = KnownData::new();
        assert_eq!(known.runs(&f, 4096, 8192).unwrap(), [Run { start: 4096, end: 8192, hole: false }]);
        assert!(known.lock().data.is_some_and(|(a, b)| a <= 4096 && b >= 1 << 20), "learnt the data run");
        if !punch(&f, 64 << 10, 128 << 10).unwrap() {
            return;
        }
        known.forget();
        let r = known.runs(&f, 0, 1 << 20).unwrap();
        assert!(r.iter().any(|r| r.hole && r.start == 64 << 10), "{r:?}");

        // A lookup that started before a punch and ends after it is not kept.
        let generation = known.lock().generation;
        known.forget();
        known.remember(generation, (0, 1 << 20));
        assert!(known.lock().data.is_none());
    }

    #[test]
    fn a_failed_lookup_lets_the_next_one_ask_again() {
        // A pipe cannot seek: every lookup fails. A lookup that failed must not stay "in
        // flight", or the next caller would wait for its answer forever.
        let (r, _w) = std::io::pipe().unwrap();
        let f = File::from(std::os::fd::OwnedFd::from(r));
        let known = std::sync::Arc::new(KnownData::new());
        assert!(known.runs(&f, 0, 4096).is_err());
        let (tx, rx) = std::sync::mpsc::channel();
        let k = known.clone();
        // Not joined: if it hangs, the test fails rather than hangs with it.
        std::thread::spawn(move || tx.send(k.runs(&f, 0, 4096).is_err()));
        let second = rx.recv_timeout(std::time::Duration::from_secs(30));
        assert_eq!(second, Ok(true), "the second lookup waited for the failed first one");
    }

    #[test]
    fn punched_ranges_read_as_holes_and_zeroes() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&vec![0xa5u8; 1 << 20], 0).unwrap();
        f.sync_all().unwrap();
        let g = block_granularity(&f);
        if !punch(&f, 4 * g, 8 * g).unwrap() {
            return; // a filesystem without holes: nothing to check
        }
        let r = runs(&f, 0, 1 << 20, 16).unwrap();
        assert_eq!(
            r,
            vec![
                Run { start: 0, end: 4 * g, hole: false },
                Run { start: 4 * g, end: 8 * g, hole: true },
                Run { start: 8 * g, end: 1 << 20, hole: false },
            ]
        );
        assert!(is_hole(&f, 4 * g, 8 * g).unwrap());
        assert!(!is_hole(&f, 4 * g, 8 * g + 1).unwrap());
        let mut b = vec![1u8; g as usize];
        f.read_exact_at(&mut b, 5 * g).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // The run list is capped, and the cap still makes progress.
        assert_eq!(runs(&f, 0, 1 << 20, 1).unwrap().len(), 1);
    }

    #[test]
    fn a_sparse_file_is_one_hole_up_to_its_data() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let r = runs(&f, 0, 1 << 20, 16).unwrap();
        assert!(r.iter().all(|r| r.hole), "{r:?}");
        assert_eq!(r.last().unwrap().end, 1 << 20);
    }

    #[test]
    fn inner_alignment_rounds_inward() {
        assert_eq!(inner_aligned(1, 8193, 4096), (4096, 8192));
        assert_eq!(inner_aligned(0, 4095, 4096), (0, 0));
        assert_eq!(inner_aligned(4097, 8000, 4096), (8192, 8192));
    }
}
