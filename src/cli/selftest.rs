//! `crypt-vfio selftest`: every algorithm and key size the device accepts, bit-exact against the
//! software implementation, plus bad input that must be refused cleanly.
//!
//! It is what the guest test runs on QEMU's virtio-crypto device behind a real vfio-pci, and what
//! `cargo test` runs on the emulated device, so the same checks guard both. Expected results come
//! from the RustCrypto core, not aws-lc, so that the emulated device (which runs aws-lc) is checked
//! against an independent implementation. Each request runs in ordinary memory (bounced through
//! DMA memory) and in a DMA buffer (zero copy), at sizes from one block to several pages.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use crypt_vfio::engine::{Buf, Direction, Engine, Event, Iv, Queue, Request, SubmitErrorKind, Submitted};
use crypt_vfio::{CoreKind, CryptoError, Error, Mode};
use crypt_vfio_cores::new_cipher;

use super::device::DeviceArgs;

/// Arguments of `crypt-vfio selftest`.
#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// PCI address of a function bound to vfio-pci (the same as --device).
    #[arg(value_name = "BDF")]
    target: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Flip one bit of one device result before it is compared, to show that the comparison
    /// catches a wrong result (the run must then FAIL).
    #[arg(long)]
    corrupt_one: bool,
}

/// Payload sizes: one block, a sector, a page, several pages with a partial one, and 64 KiB.
const SIZES: [usize; 5] = [16, 512, 4096, 3 * 4096 + 16, 65536];
/// Extra sizes that are not whole blocks, for the modes that take them.
const ODD_SIZES: [usize; 2] = [1000, 3 * 4096 + 5];
/// How long one request may take (QEMU under TCG takes up to a few hundred microseconds).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const MODES: [Mode; 4] = [Mode::Gcm, Mode::Xts, Mode::Cbc, Mode::Ctr];

fn alg_name(mode: Mode, key_len: usize) -> String {
    match mode {
        Mode::Xts => format!("aes-{}-xts", key_len * 8),
        m => format!("aes-{}-{}", key_len * 8, &m.to_string()[4..]),
    }
}

/// Deterministic bytes that differ per seed and position (no two requests see the same data).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A key of `len` bytes whose halves differ (XTS refuses equal halves).
fn key(len: usize, seed: u64) -> Vec<u8> {
    pattern(len, seed ^ 0x006b_6579)
}

/// One queue run synchronously: submit, then poll until that request's final completion.
struct SyncQueue<S> {
    queue: Box<dyn Queue<S>>,
    events: Arc<Mutex<Vec<Event<S>>>>,
    next_id: u64,
}

impl<S: Clone + Send + 'static> SyncQueue<S> {
    fn open<E: Engine<Session = S>>(dev: &E) -> anyhow::Result<Self> {
        let events: Arc<Mutex<Vec<Event<S>>>> = Arc::default();
        let sink = events.clone();
        let queue =
            dev.open_queue(0, Arc::new(move |e| sink.lock().unwrap_or_else(|p| p.into_inner()).push(e)))?;
        Ok(Self { queue, events, next_id: 1 })
    }

    /// Runs one request; returns its data and tag, or the error it was refused or failed with.
    fn run(
        &mut self,
        session: &S,
        direction: Direction,
        iv: &[u8],
        data: Buf,
        tag: [u8; 16],
    ) -> anyhow::Result<Result<(Buf, [u8; 16]), Error>> {
        let id = self.next_id;
        self.next_id += 1;
        let iv = Iv::new(iv).ok_or_else(|| anyhow!("IV longer than 16 bytes"))?;
        let mut req = Request::new(session.clone(), direction, iv, data, id);
        req.tag = tag;
        match self.queue.submit(req, true) {
            Ok(Submitted::InProgress | Submitted::Backlogged) => {}
            Err(e) => match e.kind {
                SubmitErrorKind::Rejected(err) => return Ok(Err(err)),
                SubmitErrorKind::Busy => bail!("an idle queue answered busy"),
            },
        }
        let start = Instant::now();
        loop {
            self.queue.poll();
            {
                let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
                let pos =
                    ev.iter().position(|e| matches!(e, Event::Completed(c) if c.request.user_data == id));
                if let Some(pos) = pos {
                    if let Event::Completed(c) = ev.remove(pos) {
                        return Ok(c.result.map(|()| (c.request.data, c.request.tag)));
                    }
                }
                ev.retain(|e| !matches!(e, Event::Promoted { .. }));
            }
            if start.elapsed() > REQUEST_TIMEOUT {
                bail!("request {id} did not complete within {REQUEST_TIMEOUT:?}");
            }
            std::thread::yield_now();
        }
    }
}

/// Totals of a run.
#[derive(Default)]
struct Tally {
    combinations: usize,
    requests: usize,
    corrupt_pending: bool,
}

/// Where two results first differ.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("length {} instead of {}", a.len(), b.len());
    }
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
    format!("first difference at byte {i}: {:#04x} instead of {:#04x}", a[i], b[i])
}

/// Encrypts and decrypts `size` bytes with one session in one kind of buffer, and compares both
/// with the software implementation. Returns `Ok(false)` when the device cleanly refuses a length
/// that is not a whole number of blocks (QEMU's device has no XTS ciphertext stealing): a
/// limitation to report, not a wrong result.
#[allow(clippy::too_many_arguments)]
fn check_one<E: Engine>(
    dev: &E,
    q: &mut SyncQueue<E::Session>,
    session: &E::Session,
    mode: Mode,
    key: &[u8],
    size: usize,
    dma: bool,
    tally: &mut Tally,
) -> anyhow::Result<bool> {
    let alg = alg_name(mode, key.len());
    let what = format!("{alg}, {size} bytes in {} memory", if dma { "DMA" } else { "host" });
    let plain = pattern(size, (size as u64) << 8 | key.len() as u64);
    let iv = pattern(mode.iv_len(), size as u64 ^ 0x1f);
    let reference = new_cipher(CoreKind::Reference, mode, key)?;
    let mut expected = plain.clone();
    let mut tag = [0u8; 16];
    let t: &mut [u8] = if mode.is_aead() { &mut tag } else { &mut [] };
    reference
        .encrypt(&iv, &[], &mut expected, t)
        .with_context(|| format!("{what}: software implementation"))?;

    let buf = |bytes: &[u8]| -> anyhow::Result<Buf> {
        if dma {
            let mut b = dev.alloc_buffer(bytes.len())?;
            b.as_mut_slice().copy_from_slice(bytes);
            Ok(b)
        } else {
            Ok(Buf::Host(bytes.to_vec()))
        }
    };
    let (out, out_tag) = match q.run(session, Direction::Encrypt, &iv, buf(&plain)?, [0; 16])? {
        Err(e @ (Error::Crypto(CryptoError::Status(_)) | Error::Crypto(CryptoError::NotSupported(_))))
            if size % 16 != 0 =>
        {
            println!("  {alg:<12} note: the device refuses {size} bytes (not whole blocks): {e}");
            return Ok(false);
        }
        r => r.with_context(|| format!("{what}: encryption failed on the device"))?,
    };
    let mut got = out.as_slice().to_vec();
    if tally.corrupt_pending {
        tally.corrupt_pending = false;
        got[size / 2] ^= 0x01;
        println!("  (--corrupt-one: flipped bit 0 of byte {} of the {what} ciphertext)", size / 2);
    }
    if got != expected {
        bail!(
            "{what}: the device's ciphertext differs from the software implementation ({})",
            first_difference(&got, &expected)
        );
    }
    if mode.is_aead() && out_tag != tag {
        bail!("{what}: the device's tag differs from the software implementation");
    }
    let (back, _) = q
        .run(session, Direction::Decrypt, &iv, buf(&expected)?, tag)?
        .with_context(|| format!("{what}: decryption failed on the device"))?;
    if back.as_slice() != plain {
        bail!(
            "{what}: decryption does not give the plaintext back ({})",
            first_difference(&back.as_slice(), &plain)
        );
    }
    tally.requests += 2;
    Ok(true)
}

/// Bad input that every device must refuse cleanly: each case names what it sent and what came
/// back, and fails the run if the refusal is missing or of the wrong kind.
fn bad_input<E: Engine>(
    dev: &E,
    q: &mut SyncQueue<E::Session>,
    unusable: &[Mode],
    usable: Option<(Mode, usize)>,
) -> anyhow::Result<()> {
    match unusable.first() {
        Some(&mode) => {
            let k = key(mode.key_lengths()[0], 99);
            match dev.create_session(mode, &k) {
                Err(
                    e @ (Error::Crypto(CryptoError::NotSupported(_)) | Error::Crypto(CryptoError::Status(_))),
                ) => {
                    println!("  bad input: {mode} session (unsupported) -> refused cleanly: {e}")
                }
                Err(e) => bail!("bad input: a {mode} session was refused with the wrong error: {e}"),
                Ok(s) => {
                    let _ = dev.destroy_session(&s);
                    bail!(
                        "bad input: the device accepted a {mode} session although probing said it would not"
                    )
                }
            }
        }
        None => {
            println!("  bad input: unsupported algorithm: none to try, the device accepts all four modes")
        }
    }
    match dev.create_session(Mode::Cbc, &[7u8; 17]) {
        Err(e @ Error::Crypto(CryptoError::KeyLength { .. })) => {
            println!("  bad input: 17-byte aes-cbc key -> refused: {e}")
        }
        other => bail!("bad input: a 17-byte AES key gave {other:?}, not a key length error"),
    }
    let Some((mode, key_len)) = usable else { return Ok(()) };
    let session = dev.create_session(mode, &key(key_len, 5))?;
    let iv = vec![0u8; mode.iv_len() - 1];
    match q.run(&session, Direction::Encrypt, &iv, Buf::Host(vec![0; 64]), [0; 16])? {
        Err(e @ Error::Crypto(CryptoError::InvalidRequest(_))) => {
            println!("  bad input: {}-byte IV for {mode} -> refused: {e}", iv.len())
        }
        Err(e) => bail!("bad input: a wrong IV length was refused with the wrong error: {e}"),
        Ok(_) => bail!("bad input: a {}-byte IV for {mode} was accepted", iv.len()),
    }
    // The device must still work after all of that.
    let iv = vec![3u8; mode.iv_len()];
    let (ct, tag) = q
        .run(&session, Direction::Encrypt, &iv, Buf::Host(vec![0x5a; 64]), [0; 16])?
        .context("a good request after the bad input failed")?;
    let (pt, _) = q
        .run(&session, Direction::Decrypt, &iv, ct, tag)?
        .context("a good request after the bad input failed")?;
    if *pt.as_slice() != [0x5a; 64] {
        bail!("after the bad input, a round trip no longer gives the plaintext back");
    }
    dev.destroy_session(&session)?;
    println!("  bad input: the device still works afterwards");
    Ok(())
}

fn run_checks<E: Engine>(dev: &E, corrupt_one: bool) -> anyhow::Result<Tally> {
    let mut q = SyncQueue::open(dev)?;
    let mut tally = Tally { corrupt_pending: corrupt_one, ..Tally::default() };
    let max = dev.max_request_len();
    let mut unusable = Vec::new();
    let mut usable = None;
    for mode in MODES {
        let mut any = false;
        for &key_len in mode.key_lengths() {
            let alg = alg_name(mode, key_len);
            if !dev.probe(mode, key_len).with_context(|| format!("probing {alg}"))? {
                println!("  {alg:<12} not accepted by the device");
                continue;
            }
            any = true;
            usable.get_or_insert((mode, key_len));
            let k = key(key_len, key_len as u64);
            let session =
                dev.create_session(mode, &k).with_context(|| format!("creating a {alg} session"))?;
            let mut sizes: Vec<usize> = SIZES.to_vec();
            if mode != Mode::Cbc {
                sizes.extend(ODD_SIZES);
            }
            sizes.retain(|&s| s <= max);
            let mut checked = Vec::new();
            'sizes: for &size in &sizes {
                for dma in [false, true] {
                    if !check_one(dev, &mut q, &session, mode, &k, size, dma, &mut tally)? {
                        continue 'sizes;
                    }
                }
                checked.push(size);
            }
            dev.destroy_session(&session)?;
            let sizes = checked;
            tally.combinations += 1;
            println!(
                "  {alg:<12} ok: {} sizes ({}..{} bytes) x host and DMA buffers, encrypt and decrypt, bit-exact",
                sizes.len(),
                sizes.iter().min().unwrap_or(&0),
                sizes.iter().max().unwrap_or(&0)
            );
        }
        if !any {
            unusable.push(mode);
        }
    }
    bad_input(dev, &mut q, &unusable, usable)?;
    if tally.combinations == 0 {
        bail!("the device accepts none of the algorithms");
    }
    Ok(tally)
}

/// Runs the self-test. Prints one `selftest: PASS` or `selftest: FAIL` line at the end and
/// returns an error on failure.
pub fn run(args: SelftestArgs) -> anyhow::Result<()> {
    let device = args.device.with_target(args.target)?;
    let start = Instant::now();
    let result = if device.is_pool() {
        // Through the pool, as a volume would use it; then each member's share.
        device.open_pool(&device.options()).and_then(|pool| {
            println!("selftest on {} ({} completion)", pool.describe(), device.mode);
            let t = run_checks(&pool, args.corrupt_one);
            for m in pool.member_stats() {
                println!(
                    "  member {:<14} {:<5} {:>5.1}% of {} requests",
                    m.name,
                    m.state.to_string(),
                    m.share * 100.0,
                    m.requests
                );
            }
            t
        })
    } else {
        device.open(&device.options()).and_then(|dev| {
            println!("selftest on {} ({} completion)", dev.describe(), device.mode);
            run_checks(&dev, args.corrupt_one)
        })
    };
    match result {
        Ok(t) => {
            println!(
                "selftest: PASS ({} algorithm/key combinations, {} requests bit-exact against the software \
                 implementation, {:.1} s)",
                t.combinations,
                t.requests,
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            println!("selftest: FAIL ({e:#})");
            Err(anyhow!("selftest failed"))
        }
    }
}
