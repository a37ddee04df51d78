//! `crypt-vfio soak` (hidden): millions of requests through a faulty emulated device.
//!
//! Tests show each fault once; a soak shows that nothing accumulates: no request lost or
//! answered twice over millions of faults and recoveries, no wrong data, no contract broken,
//! no memory growing. 8 threads push requests through 4 queues (two threads per queue) with
//! backlog, while a fault thread arms a random scripted fault of the emulated device (lying
//! completions, lost answers, resets behind the driver's back) every few milliseconds. Each
//! thread checks its requests with its own `ContractChecker`, renewed every few thousand
//! requests once its requests have all come back, so the check costs no unbounded memory.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::engine::contract::ContractChecker;
use crypt_vfio::engine::{Buf, Direction, Engine, Event, Iv, Request, SubmitErrorKind, Submitted};
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedFault, EmulatedTransport};
use crypt_vfio::transport::Transport;
use crypt_vfio::virtio_crypto::{DeviceOptions, DeviceSession, VirtioCrypto};
use crypt_vfio::{CoreKind, DeviceError, Error, Mode};
use crypt_vfio_cores::new_cipher;
use rand::{Rng, SeedableRng};

use super::duration::parse_period;

/// Arguments of `crypt-vfio soak`.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Requests to push in all.
    #[arg(long, default_value_t = 10_000_000)]
    pub requests: u64,
    /// Submitting threads.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Data queues (threads share them).
    #[arg(long, default_value_t = 4)]
    pub queues: u16,
    /// Mean time between two injected faults.
    #[arg(long, default_value = "20ms", value_parser = parse_period)]
    pub fault_every: Duration,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

const KEY: [u8; 32] = [0x3c; 32];
/// Requests a thread keeps in flight at most.
const PIPELINE: usize = 24;
/// Requests per thread between two renewals of its contract checker.
const EPOCH: u64 = 20_000;

#[derive(Default)]
struct Totals {
    submitted: AtomicU64,
    refused: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    wrong: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    violations: AtomicU64,
}

/// Resident set size in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `crypt-vfio soak`.
pub fn run(args: SoakArgs) -> anyhow::Result<()> {
    if args.threads == 0 || args.queues == 0 {
        bail!("--threads and --queues must be at least 1");
    }
    let config = EmulatedConfig {
        data_queues: args.queues,
        max_queue_size: 64,
        workers: 2,
        latency_jitter: Duration::from_micros(20),
        out_of_order: true,
        seed: args.seed,
        ..EmulatedConfig::default()
    };
    let t = Arc::new(EmulatedTransport::new(config).context("creating the emulated device")?);
    let options = DeviceOptions {
        queue_size: 64,
        backlog_limit: 256,
        request_timeout: Duration::from_millis(100),
        // Faults come every few milliseconds here: never give the device up.
        failure_budget: (usize::MAX, Duration::from_secs(1)),
        ..DeviceOptions::default()
    };
    let dev = VirtioCrypto::open(t.clone() as Arc<dyn Transport>, &options).context("opening the device")?;
    let session = dev.create_session(Mode::Ctr, &KEY)?;
    let rss_start = rss_kib();
    let totals = Totals::default();
    let faults = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let next = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        let faulter = s.spawn(|| inject_faults(&t, &args, &done, &faults));
        let workers: Vec<_> = (0..args.threads)
            .map(|i| {
                let (dev, session, totals, next) = (&dev, session.clone(), &totals, &next);
                let total = args.requests;
                s.spawn(move || push(dev, session, i, total, next, totals, args.seed))
            })
            .collect();
        for w in workers {
            if let Err(e) = w.join().expect("soak thread panicked") {
                eprintln!("soak thread: {e}");
            }
        }
        done.store(true, Ordering::Release);
        faulter.join().expect("fault thread panicked");
    });
    let elapsed = started.elapsed();
    t.clear_faults();
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let stats = t.stats();
    println!("requests submitted   {}", get(&totals.submitted));
    println!("  completed ok       {}", get(&totals.ok));
    println!("  completed failed   {}", get(&totals.failed));
    println!("  refused at submit  {}", get(&totals.refused));
    println!("faults injected      {} (device counted {})", get(&faults), stats.faults_injected);
    println!("recoveries           {}", dev.recoveries());
    println!("lost                 {}", get(&totals.lost));
    println!("duplicated           {}", get(&totals.duplicated));
    println!("contract violations  {}", get(&totals.violations));
    println!("wrong data           {}", get(&totals.wrong));
    println!("RSS start            {} KiB", rss_start);
    println!("RSS end              {} KiB", rss_kib());
    println!("elapsed              {:.1} s", elapsed.as_secs_f64());
    let bad = get(&totals.lost) + get(&totals.duplicated) + get(&totals.violations) + get(&totals.wrong);
    if bad > 0 {
        bail!("the soak found {bad} broken promises");
    }
    Ok(())
}

/// Arms a random fault every `fault_every` on average until `done`.
fn inject_faults(t: &EmulatedTransport, args: &SoakArgs, done: &AtomicBool, count: &AtomicU64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ 0xfa17);
    let every = args.fault_every.as_micros().max(1) as u64;
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_micros(rng.random_range(every / 2..=every * 3 / 2)));
        let fault = match rng.random_range(0..9) {
            0 => EmulatedFault::DuplicateUsed,
            1 => EmulatedFault::FreeSlotId,
            2 => EmulatedFault::ShortLength,
            3 => EmulatedFault::StatusUnwritten,
            4 => EmulatedFault::ExtraUsed,
            5 => {
                // Answers lost for a moment: the watchdog fails the device, then it recovers.
                t.inject(EmulatedFault::NeverAnswer);
                std::thread::sleep(Duration::from_millis(5));
                t.clear_faults();
                count.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            6 => EmulatedFault::AnswerAfter(Duration::from_millis(1)),
            7 => EmulatedFault::EarlyCompletion,
            _ => {
                // A reset behind the driver's back: everything in flight vanishes.
                let _ = t.reset();
                count.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        t.inject(fault);
        count.fetch_add(1, Ordering::Relaxed);
        if matches!(fault, EmulatedFault::AnswerAfter(_)) {
            std::thread::sleep(Duration::from_millis(2));
            t.clear_faults();
        }
    }
}

/// One submitting thread: pipelines requests on queue `index`, checks every result and the
/// contract, until `total` requests were taken from `next` by all threads.
fn push(
    dev: &VirtioCrypto,
    session: DeviceSession,
    index: usize,
    total: u64,
    next: &AtomicU64,
    totals: &Totals,
    seed: u64,
) -> anyhow::Result<()> {
    let reference = new_cipher(CoreKind::Reference, Mode::Ctr, &KEY)?;
    let checker: Arc<Mutex<Arc<ContractChecker>>> = Arc::new(Mutex::new(Arc::new(ContractChecker::new())));
    let inbox: Arc<Mutex<Vec<Event<DeviceSession>>>> = Arc::default();
    let (c, i) = (checker.clone(), inbox.clone());
    let mut q = dev.open_queue(
        index,
        Arc::new(move |ev| {
            c.lock().unwrap_or_else(|e| e.into_inner()).event(&ev);
            i.lock().unwrap_or_else(|e| e.into_inner()).push(ev);
        }),
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(index as u64));
    let mut in_flight: HashSet<u64> = HashSet::new();
    let mut blocked: Option<u64> = None;
    let mut since_renewal = 0u64;
    let mut exhausted = false;
    let mut idle_since: Option<Instant> = None;
    while !exhausted || !in_flight.is_empty() {
        while !exhausted && blocked.is_none() && in_flight.len() < PIPELINE && since_renewal < EPOCH {
            let id = next.fetch_add(1, Ordering::Relaxed);
            if id >= total {
                exhausted = true;
                break;
            }
            let len = 16 * rng.random_range(1..=16usize);
            let data: Vec<u8> = (0..len).map(|k| (id as usize).wrapping_add(k) as u8).collect();
            let req =
                Request::new(session.clone(), Direction::Encrypt, Iv::from(iv(id)), Buf::Host(data), id);
            let ck = checker.lock().unwrap_or_else(|e| e.into_inner()).clone();
            ck.begin_submit(index, id);
            let r = q.submit(req, true);
            ck.submitted(id, &r);
            totals.submitted.fetch_add(1, Ordering::Relaxed);
            since_renewal += 1;
            match r {
                Ok(Submitted::InProgress) => {
                    in_flight.insert(id);
                }
                Ok(Submitted::Backlogged) => {
                    in_flight.insert(id);
                    blocked = Some(id);
                }
                Err(e) => {
                    totals.refused.fetch_add(1, Ordering::Relaxed);
                    match e.kind {
                        SubmitErrorKind::Rejected(Error::Device(DeviceError::Failed(_)))
                        | SubmitErrorKind::Busy => {
                            // Recovering: let it finish.
                            std::thread::sleep(Duration::from_micros(200));
                            break;
                        }
                        SubmitErrorKind::Rejected(e) => bail!("request {id} refused: {e}"),
                    }
                }
            }
        }
        q.poll();
        let events = std::mem::take(&mut *inbox.lock().unwrap_or_else(|e| e.into_inner()));
        if events.is_empty() {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(30) {
                totals.lost.fetch_add(in_flight.len() as u64, Ordering::Relaxed);
                bail!("thread {index}: {} requests got no completion for 30 s", in_flight.len());
            }
            std::thread::yield_now();
        } else {
            idle_since = None;
        }
        for ev in events {
            match ev {
                Event::Promoted { user_data } => {
                    if blocked == Some(user_data) {
                        blocked = None;
                    }
                }
                Event::Completed(c) => {
                    let id = c.request.user_data;
                    if !in_flight.remove(&id) {
                        totals.duplicated.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    match c.result {
                        Ok(()) => {
                            let mut want: Vec<u8> = (0..c.request.data.len())
                                .map(|k| (id as usize).wrapping_add(k) as u8)
                                .collect();
                            reference.encrypt(&iv(id), &[], &mut want, &mut [])?;
                            if *want != *c.request.data.as_slice() {
                                totals.wrong.fetch_add(1, Ordering::Relaxed);
                            }
                            totals.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            totals.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        if since_renewal >= EPOCH && in_flight.is_empty() {
            // Everything of this epoch came back: judge it and start a fresh checker.
            let mut guard = checker.lock().unwrap_or_else(|e| e.into_inner());
            let report = guard.report();
            totals.violations.fetch_add(report.violations.len() as u64, Ordering::Relaxed);
            for v in report.violations.iter().take(5) {
                eprintln!("thread {index}: {v}");
            }
            *guard = Arc::new(ContractChecker::new());
            since_renewal = 0;
        }
    }
    let report = checker.lock().unwrap_or_else(|e| e.into_inner()).report();
    totals.violations.fetch_add(report.violations.len() as u64, Ordering::Relaxed);
    totals.lost.fetch_add(report.pending, Ordering::Relaxed);
    for v in report.violations.iter().take(5) {
        eprintln!("thread {index}: {v}");
    }
    Ok(())
}

fn iv(id: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&id.to_le_bytes());
    iv
}
