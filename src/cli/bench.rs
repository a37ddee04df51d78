//! `crypt-vfio bench`: throughput and latency of an engine, pipelined the way the backlog
//! contract allows, or waiting for each request (the 2015 dm-crypt behaviour) for comparison.
//!
//! Each submitting thread owns one queue and `qd` buffers (DMA memory for a device, so the run
//! measures zero-copy submission). It submits while requests go `InProgress`; after a
//! `Backlogged` it waits for that request's `Promoted`; completions recycle buffers. With
//! `--batch N` (the default) it submits up to N requests per `submit_batch` call and takes its
//! events in runs; `--batch 1` submits and takes events one at a time, for comparison. Every
//! 256th request (`--check-every`; 1 checks them all) is checked against the AES core called
//! directly, so a fast wrong answer fails the run instead of being reported.
//!
//! Every option that could make a run measure nothing, never end or exhaust memory is refused
//! with its reason before anything runs or is allocated: durations take units (a bare number is
//! seconds), counts and sizes are bounded, and sizes are checked against the engine's largest
//! request once it is open.

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{
    Buf, Direction, Engine, Event, Iv, MemberStats, PoolEngine, Queue, Request, SubmitErrorKind, Submitted,
};
use crypt_vfio::virtio_crypto::ADAPTIVE_MAX_SPIN;
use crypt_vfio::{CoreKind, Mode};
use crypt_vfio_cores::new_cipher;
use crypt_vfio_wait::SpinBudget;
use hdrhistogram::Histogram;

use super::device::DeviceArgs;
use super::duration::{parse_within, Bounds};

/// The shortest run worth measuring: below it, thread start-up dominates.
const MIN_DURATION: Duration = Duration::from_millis(1);
/// The longest run: longer measurements are made of several runs (`--repeat`).
const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Requests per queue with `--count`: a billion runs for many minutes even on the fast engines.
const MAX_COUNT: u64 = 1_000_000_000;
/// Requests in flight per queue: far beyond any ring; the rest would only sit in the backlog.
const MAX_QD: usize = 65_536;
/// Submitting threads.
const MAX_QUEUES: usize = 256;
/// Runs per configuration.
const MAX_REPEAT: usize = 1000;
/// Requests per submit call: a ring holds no more.
const MAX_BATCH: usize = 4096;
/// Buffer memory of a run (size × qd × queues): the bench must not exhaust the machine.
const MAX_BUFFER_BYTES: u128 = 1 << 30;

/// Parses the length of a run (`500ms`, `2s`, `1m`; a bare number is seconds).
pub fn parse_run_duration(s: &str) -> Result<Duration, String> {
    parse_within(
        s,
        Bounds {
            min: MIN_DURATION,
            max: MAX_DURATION,
            too_short: "a run that short measures nothing",
            too_long: "for longer measurements, use --repeat",
        },
    )
}

/// Parses a whole number in `1..=max`; `zero` says in the error why zero is refused.
fn parse_bounded(s: &str, max: u64, zero: &str) -> Result<u64, String> {
    let v: u64 = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if v == 0 {
        return Err(format!("must be at least 1: {zero}"));
    }
    if v > max {
        return Err(format!("{v} is more than the {max} allowed"));
    }
    Ok(v)
}

/// Parses `--count`: requests per queue, 1 to a billion.
pub fn parse_count(s: &str) -> Result<u64, String> {
    parse_bounded(s, MAX_COUNT, "a run of no requests measures nothing")
}

/// Parses `--qd`: requests in flight per queue.
pub fn parse_qd(s: &str) -> Result<usize, String> {
    parse_bounded(s, MAX_QD as u64, "nothing would ever be in flight").map(|v| v as usize)
}

/// Parses `--queues`: submitting threads.
pub fn parse_queues(s: &str) -> Result<usize, String> {
    parse_bounded(s, MAX_QUEUES as u64, "no thread would submit anything").map(|v| v as usize)
}

/// Parses `--batch`: requests per submit call.
pub fn parse_batch(s: &str) -> Result<usize, String> {
    parse_bounded(s, MAX_BATCH as u64, "a batch of no requests submits nothing").map(|v| v as usize)
}

/// Parses `--repeat`: runs per configuration.
pub fn parse_repeat(s: &str) -> Result<usize, String> {
    parse_bounded(s, MAX_REPEAT as u64, "there would be no run to report").map(|v| v as usize)
}

/// Parses a request size: bytes, or with a binary unit (`512`, `4KiB`, `1MiB`; `K`, `M`, `G` are
/// read as KiB, MiB, GiB). Zero and sizes over 1 GiB are refused.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return Err(format!("unknown unit `{unit}` in `{s}` (use bytes, KiB, MiB or GiB)")),
    };
    let v: u64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (try 4096, 64KiB, 1MiB)"))?;
    if v == 0 {
        return Err(format!("`{s}` is zero: a request of no bytes measures nothing"));
    }
    let bytes = v.checked_shl(shift).filter(|b| b >> shift == v && *b <= MAX_BUFFER_BYTES as u64);
    bytes.map(|b| b as usize).ok_or_else(|| format!("`{s}` is more than the 1 GiB a bench request may be"))
}

/// An algorithm with its key size, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alg {
    /// Mode.
    pub mode: Mode,
    /// Key bytes.
    pub key_len: usize,
}

impl FromStr for Alg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mode, key_len) = match s {
            "aes-128-gcm" => (Mode::Gcm, 16),
            "aes-256-gcm" | "aes-gcm" => (Mode::Gcm, 32),
            "aes-256-xts" => (Mode::Xts, 32),
            "aes-384-xts" => (Mode::Xts, 48),
            "aes-512-xts" | "aes-xts" => (Mode::Xts, 64),
            "aes-128-cbc" => (Mode::Cbc, 16),
            "aes-192-cbc" => (Mode::Cbc, 24),
            "aes-256-cbc" | "aes-cbc" => (Mode::Cbc, 32),
            "aes-128-ctr" => (Mode::Ctr, 16),
            "aes-192-ctr" => (Mode::Ctr, 24),
            "aes-256-ctr" | "aes-ctr" => (Mode::Ctr, 32),
            _ => {
                return Err(format!(
                    "unknown algorithm `{s}` (aes-128-gcm, aes-256-gcm, aes-256-xts, aes-384-xts, aes-512-xts, aes-cbc, aes-ctr, \
                     aes-128/192/256-cbc, aes-128/192/256-ctr)"
                ))
            }
        };
        Ok(Self { mode, key_len })
    }
}

impl std::fmt::Display for Alg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.mode {
            Mode::Gcm => write!(f, "aes-{}-gcm", self.key_len * 8),
            Mode::Xts => write!(f, "aes-{}-xts", self.key_len * 8),
            m => write!(f, "aes-{}-{}", self.key_len * 8, &m.to_string()[4..]),
        }
    }
}

/// Arguments of `crypt-vfio bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// `device`, `software` (the same AES core on the calling thread), or `both` (one run each,
    /// with their ratio).
    #[arg(long, default_value = "device", value_parser = ["device", "software", "both"])]
    engine: String,
    /// Algorithm and key size.
    #[arg(long, default_value = "aes-256-gcm")]
    alg: Alg,
    /// Bytes per request (4096, 64KiB, 1MiB; at most the engine's largest request).
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    size: usize,
    /// Requests in flight per queue (1 to 65536).
    #[arg(long, default_value = "64", value_parser = parse_qd)]
    qd: usize,
    /// Submitting threads, one data queue each (1 to 256).
    #[arg(long, default_value = "1", value_parser = parse_queues)]
    queues: usize,
    /// How long each run lasts: 500ms, 2s, 1m (a bare number is seconds; 1ms to 1h).
    #[arg(long, default_value = "2s", value_parser = parse_run_duration)]
    duration: Duration,
    /// Stop after this many requests per queue instead of after --duration (1 to a billion).
    #[arg(long, value_parser = parse_count)]
    count: Option<u64>,
    /// Submit one request and wait for it before the next (the 2015 dm-crypt behaviour).
    #[arg(long)]
    wait_each: bool,
    /// Check one request in N against the AES core called directly (1: every request, as a
    /// test that runs through failures and unplugs does; each check copies its input).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    check_every: u64,
    /// Requests per submit call, with events taken in runs (1 to 4096); 1 submits and takes
    /// events one at a time.
    #[arg(long, default_value = "32", value_parser = parse_batch)]
    batch: usize,
    /// Runs per configuration; the median run is reported (1 to 1000).
    #[arg(long, default_value = "1", value_parser = parse_repeat)]
    repeat: usize,
    /// Print one JSON object per run instead of a table.
    #[arg(long)]
    json: bool,
    /// Run a series: `qd=1,2,4,...` or `size=512,4096,...`.
    #[arg(long)]
    sweep: Option<Sweep>,
    /// Draw the sweep's throughput to this SVG file.
    #[arg(long, requires = "sweep")]
    plot: Option<std::path::PathBuf>,
    /// Run N CPU-bound processes beside the bench (0 to 64), to measure on a busy machine;
    /// they are killed when the bench ends.
    #[arg(long, default_value = "0", value_name = "N", value_parser = super::competitor::parse_competitors)]
    competitor: usize,
}

/// A series of runs over one parameter.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// `qd` or `size`.
    pub param: SweepParam,
    /// The values, in order.
    pub values: Vec<usize>,
}

/// The parameter a sweep varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepParam {
    /// Requests in flight per queue.
    Qd,
    /// Bytes per request.
    Size,
}

impl FromStr for Sweep {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, list) =
            s.split_once('=').ok_or_else(|| format!("`{s}`: expected qd=1,2,4 or size=512,4096"))?;
        let param = match name {
            "qd" => SweepParam::Qd,
            "size" => SweepParam::Size,
            _ => return Err(format!("cannot sweep `{name}` (qd or size)")),
        };
        let values = list
            .split(',')
            .map(|v| match param {
                SweepParam::Qd => parse_qd(v),
                SweepParam::Size => parse_size(v),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(Self { param, values })
    }
}

/// The size and queue depth of one run.
#[derive(Clone, Copy, Debug)]
struct Point {
    size: usize,
    qd: usize,
}

/// The outcome of one run.
#[derive(Debug, Clone)]
struct RunResult {
    engine: String,
    alg: Alg,
    size: usize,
    qd: usize,
    queues: usize,
    ops: u64,
    seconds: f64,
    cpu_seconds: f64,
    lat: Histogram<u64>,
    wait_each: bool,
    batch: usize,
    promoted: u64,
    /// Estimated time the submitting threads spent in the engine's submit and (non-empty) poll.
    driver_ns: u64,
    /// CPU-bound processes that ran beside it.
    competitors: usize,
    /// How the device's completions were waited for (`poll`, `irq`, `adaptive`; `-` for software).
    mode: String,
    /// A pool's members during the run: their state at its end and their work in it.
    members: Vec<MemberStats>,
}

impl RunResult {
    fn gbps(&self) -> f64 {
        self.ops as f64 * self.size as f64 / self.seconds / 1e9
    }
    fn mops(&self) -> f64 {
        self.ops as f64 / self.seconds / 1e6
    }
    fn lat_us(&self, q: f64) -> f64 {
        self.lat.value_at_quantile(q) as f64 / 1000.0
    }
    fn cpu_ns_per_op(&self) -> f64 {
        self.cpu_seconds * 1e9 / self.ops.max(1) as f64
    }
    fn driver_ns_per_op(&self) -> f64 {
        self.driver_ns as f64 / self.ops.max(1) as f64
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "engine": self.engine,
            "alg": self.alg.to_string(),
            "size": self.size,
            "qd": self.qd,
            "queues": self.queues,
            "wait_each": self.wait_each,
            "batch": self.batch,
            "ops": self.ops,
            "seconds": self.seconds,
            "gbps": self.gbps(),
            "mops": self.mops(),
            "lat_us": { "p50": self.lat_us(0.5), "p99": self.lat_us(0.99), "p999": self.lat_us(0.999) },
            "cpu_ns_per_op": self.cpu_ns_per_op(),
            "driver_ns_per_op": self.driver_ns_per_op(),
            "backlogged": self.promoted,
            "competitors": self.competitors,
            "mode": self.mode,
            "members": self.members.iter().map(|m| serde_json::json!({
                "name": m.name,
                "state": m.state.to_string(),
                "share": m.share,
                "requests": m.requests,
                "bytes": m.bytes,
                "reruns_out": m.reruns_out,
                "reruns_in": m.reruns_in,
                "recoveries": m.recoveries,
            })).collect::<Vec<_>>(),
        })
    }

    /// One line per pool member, under the row.
    fn member_lines(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                format!(
                    "    member {:<14} {:<5} {:>5.1}%  {} requests, reruns out {} in {}, recoveries {}\n",
                    m.name,
                    m.state.to_string(),
                    m.share * 100.0,
                    m.requests,
                    m.reruns_out,
                    m.reruns_in,
                    m.recoveries
                )
            })
            .collect()
    }

    fn row(&self) -> String {
        format!(
            "{:<34} {:>12} {:>6} {:>4} {:>3} {:>8.3} {:>8.3} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>5} {:>9.0}",
            self.engine,
            self.alg.to_string(),
            self.size,
            if self.wait_each { "1*".to_string() } else { self.qd.to_string() },
            self.queues,
            self.gbps(),
            self.mops(),
            self.lat_us(0.5),
            self.lat_us(0.99),
            self.lat_us(0.999),
            self.cpu_ns_per_op(),
            self.batch,
            self.driver_ns_per_op()
        )
    }
}

const HEADER: &str = "engine                                      alg   size   qd   q     GB/s   Mops/s   p50(us)   p99(us) p99.9(us)  cpu(ns/op) batch drv(ns/op)";

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let points: Vec<Point> = match &args.sweep {
        None => vec![Point { size: args.size, qd: args.qd }],
        Some(sw) => sw
            .values
            .iter()
            .map(|&v| match sw.param {
                SweepParam::Qd => Point { size: args.size, qd: v },
                SweepParam::Size => Point { size: v, qd: args.qd },
            })
            .collect(),
    };
    for p in &points {
        if let Err(e) = args.alg.mode.check_data_len(p.size) {
            bail!("size {}: {e}", p.size);
        }
        let qd = if args.wait_each { 1 } else { p.qd };
        let bytes = p.size as u128 * qd as u128 * args.queues as u128;
        if bytes > MAX_BUFFER_BYTES {
            bail!(
                "size {} × qd {qd} × {} queues is {bytes} bytes of buffers, more than the 1 GiB a bench may \
                 allocate: lower --size, --qd or --queues",
                p.size,
                args.queues
            );
        }
    }
    // Both engines are open and every size checked against them before any buffer exists.
    let device = matches!(args.engine.as_str(), "device" | "both");
    let pool = match device && args.device.is_pool() {
        true => Some(args.device.open_pool(&args.device.options())?),
        false => None,
    };
    let dev = match device && pool.is_none() {
        true => Some(args.device.open_for_bench(&args.device.options())?),
        false => None,
    };
    let sw = match args.engine.as_str() {
        "software" | "both" => Some(SoftwareEngine::new(args.device.core)),
        _ => None,
    };
    if let Some(dev) = &dev {
        check_sizes(dev, &points)?;
    }
    if let Some(pool) = &pool {
        check_sizes(pool, &points)?;
    }
    if let Some(sw) = &sw {
        check_sizes(sw, &points)?;
    }
    let competitors = super::competitor::Competitors::start(args.competitor)?;
    if !args.json {
        if competitors.len() > 0 {
            println!("with {} CPU-bound competitor process(es) running", competitors.len());
        }
        println!("{HEADER}");
    }
    let mut series: Vec<(String, Vec<RunResult>)> = Vec::new();
    if let Some(dev) = &dev {
        series.push((
            dev.describe(),
            points.iter().map(|&p| repeat(&args, dev, p, None)).collect::<anyhow::Result<_>>()?,
        ));
    }
    if let Some(pool) = &pool {
        series.push((
            pool.describe(),
            points.iter().map(|&p| repeat(&args, pool, p, Some(pool))).collect::<anyhow::Result<_>>()?,
        ));
    }
    if let Some(sw) = &sw {
        series.push((
            sw.describe(),
            points.iter().map(|&p| repeat(&args, sw, p, None)).collect::<anyhow::Result<_>>()?,
        ));
    }
    if let [(_, dev), (_, sw)] = &series[..] {
        if !args.json {
            for (d, s) in dev.iter().zip(sw) {
                println!(
                    "device / software throughput at size {} qd {}: {:.2}",
                    d.size,
                    d.qd,
                    d.gbps() / s.gbps()
                );
            }
        }
    }
    if let (Some(path), Some(sweep)) = (&args.plot, &args.sweep) {
        super::plot::throughput_svg(
            path,
            &args.alg.to_string(),
            sweep.param == SweepParam::Qd,
            &series_points(&series, sweep.param),
        )?;
        if !args.json {
            println!("plot written to {}", path.display());
        }
    }
    Ok(())
}

/// Refuses a size the engine cannot carry in one request, before its buffers are allocated.
fn check_sizes<E: Engine>(engine: &E, points: &[Point]) -> anyhow::Result<()> {
    let max = engine.max_request_len();
    if let Some(p) = points.iter().find(|p| p.size > max) {
        bail!(
            "size {} is larger than the {max} bytes one request may carry on {}: lower --size",
            p.size,
            engine.describe()
        );
    }
    Ok(())
}

fn series_points(series: &[(String, Vec<RunResult>)], param: SweepParam) -> Vec<(String, Vec<(f64, f64)>)> {
    series
        .iter()
        .map(|(name, runs)| {
            let pts = runs
                .iter()
                .map(|r| (if param == SweepParam::Qd { r.qd } else { r.size } as f64, r.gbps()))
                .collect();
            (name.clone(), pts)
        })
        .collect()
}

fn repeat<E: Engine>(
    args: &BenchArgs,
    engine: &E,
    point: Point,
    pool: Option<&PoolEngine>,
) -> anyhow::Result<RunResult> {
    let mut runs = Vec::with_capacity(args.repeat);
    for _ in 0..args.repeat {
        let before = pool.map(PoolEngine::member_stats);
        let mut r = run_once(args, engine, point)?;
        if let (Some(pool), Some(before)) = (pool, before) {
            r.members = shares(&before, &pool.member_stats());
        }
        if args.json {
            println!("{}", r.json());
        } else {
            println!("{}", r.row());
            print!("{}", r.member_lines());
        }
        runs.push(r);
    }
    runs.sort_by(|a, b| a.gbps().total_cmp(&b.gbps()));
    let median = runs[runs.len() / 2].clone();
    if args.repeat > 1 && !args.json {
        println!("{} (median of {})", median.row(), args.repeat);
        print!("{}", median.member_lines());
    }
    Ok(median)
}

/// Each member's work between two snapshots, with its share of it.
fn shares(before: &[MemberStats], after: &[MemberStats]) -> Vec<MemberStats> {
    let mut run: Vec<MemberStats> = after
        .iter()
        .zip(before)
        .map(|(a, b)| MemberStats {
            requests: a.requests - b.requests,
            bytes: a.bytes - b.bytes,
            reruns_out: a.reruns_out - b.reruns_out,
            reruns_in: a.reruns_in - b.reruns_in,
            member_failed: a.member_failed - b.member_failed,
            recoveries: a.recoveries - b.recoveries,
            since_rejoin: a.since_rejoin.min(a.requests - b.requests),
            ..a.clone()
        })
        .collect();
    let total: u64 = run.iter().map(|m| m.requests).sum();
    for m in &mut run {
        m.share = if total == 0 { 0.0 } else { m.requests as f64 / total as f64 };
    }
    run
}

fn cpu_time() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a complete rusage into the pointer it is given.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

const KEY: [u8; 64] = {
    let mut k = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        k[i] = (i as u8).wrapping_mul(37).wrapping_add(11);
        i += 1;
    }
    k
};

fn run_once<E: Engine>(args: &BenchArgs, engine: &E, point: Point) -> anyhow::Result<RunResult> {
    let key = &KEY[..args.alg.key_len];
    let session = engine
        .create_session(args.alg.mode, key)
        .with_context(|| format!("creating a {} session", args.alg))?;
    let stop = AtomicBool::new(false);
    let cpu0 = cpu_time();
    let start = Instant::now();
    let deadline = start + args.duration;
    let progress = super::progress::RunProgress::start(args.duration, args.count.is_none() && !args.json);
    let results: Vec<anyhow::Result<ThreadResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.queues)
            .map(|q| {
                let session = session.clone();
                let stop = &stop;
                s.spawn(move || {
                    let r = worker(engine, session, q, args, point, deadline, stop);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("bench thread panicked"))))
            .collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    progress.finish();
    let cpu_seconds = cpu_time() - cpu0;
    let _ = engine.destroy_session(&session);
    let mut lat = Histogram::<u64>::new(3).map_err(|e| anyhow!("histogram: {e}"))?;
    let (mut ops, mut promoted, mut driver_ns) = (0, 0, 0);
    for r in results {
        let r = r?;
        ops += r.ops;
        promoted += r.promoted;
        driver_ns += r.driver_ns;
        lat.add(&r.lat).map_err(|e| anyhow!("histogram: {e}"))?;
    }
    Ok(RunResult {
        engine: engine.describe(),
        alg: args.alg,
        size: point.size,
        qd: point.qd,
        queues: args.queues,
        ops,
        seconds,
        cpu_seconds,
        lat,
        wait_each: args.wait_each,
        batch: batch_of(args, point),
        promoted,
        driver_ns,
        competitors: args.competitor,
        mode: if engine.describe().starts_with("software") { "-".into() } else { args.device.mode.clone() },
        members: Vec::new(),
    })
}

struct ThreadResult {
    ops: u64,
    promoted: u64,
    lat: Histogram<u64>,
    driver_ns: u64,
}

/// One call in this many into the engine is timed for [`DriverClock`].
const SAMPLE_ONE_IN: u64 = 8;

/// Estimates the time a submitting thread spends inside the engine doing work: submits, and
/// polls that delivered something (an empty poll is waiting for the device, not driver cost).
/// Timing every call would add two clock reads per request in per-request mode, so a random
/// one call in [`SAMPLE_ONE_IN`] is timed and the sum scaled up; random rather than every
/// eighth so that a periodic pattern of busy and empty polls cannot alias with the sampling.
/// Unlike throughput, this holds up on a machine where other processes compete for the CPUs:
/// a timed call is rarely preempted, while the waits between calls stretch with the load.
struct DriverClock {
    rng: u64,
    sampled_ns: u64,
}

impl DriverClock {
    fn new(seed: u64) -> Self {
        Self { rng: seed | 1, sampled_ns: 0 }
    }

    /// Runs `call`, timing it if sampled; `worked` says whether the call did driver work.
    #[inline]
    fn time<T>(&mut self, call: impl FnOnce() -> T, worked: impl FnOnce(&T) -> bool) -> T {
        // xorshift64: cheap and good enough to pick calls.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        if self.rng % SAMPLE_ONE_IN != 0 {
            return call();
        }
        let t = Instant::now();
        let r = call();
        let ns = t.elapsed().as_nanos() as u64;
        if worked(&r) {
            self.sampled_ns += ns;
        }
        r
    }

    /// The estimated total.
    fn total_ns(&self) -> u64 {
        self.sampled_ns * SAMPLE_ONE_IN
    }
}

/// Events delivered to this thread's callback, and a way to sleep until one arrives.
struct Inbox<S> {
    events: Mutex<Vec<Event<S>>>,
    /// Events pushed and not yet taken, for a waiter that spins without taking the lock.
    count: AtomicUsize,
    /// The worker waits on `ready` (set and read under `events`' lock, so no notification is
    /// lost and none is sent while nobody waits).
    sleeping: AtomicBool,
    ready: Condvar,
}

impl<S> Inbox<S> {
    /// Takes a run of events from the engine (one event, or a batch).
    fn deliver(&self, events: impl Iterator<Item = Event<S>>) {
        let mut inbox = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let before = inbox.len();
        inbox.extend(events);
        self.count.fetch_add(inbox.len() - before, Ordering::Release);
        // Only a sleeping worker is woken: a futex call per event would cost more than the event.
        if self.sleeping.load(Ordering::Relaxed) {
            self.ready.notify_one();
        }
    }
}

/// A request whose result is checked against the AES core called directly.
struct Sample {
    input: Vec<u8>,
    iv: Iv,
}

fn iv_for(mode: Mode, seq: u64) -> Iv {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    // The fixed-size constructors: no variable-length copy per request.
    match mode.iv_len() {
        12 => Iv::from([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], 0, 0, 0, 0]),
        16 => Iv::from(b),
        n => Iv::new(&b[..n]).unwrap_or_default(),
    }
}

/// Requests per submit call in a run: never more than are in flight.
fn batch_of(args: &BenchArgs, point: Point) -> usize {
    if args.wait_each {
        1
    } else {
        args.batch.min(point.qd)
    }
}

/// Waits for an event from an engine that delivers on its own thread: polls the queue itself
/// for the spin budget (the engine's completion thread sleeps meanwhile: `begin_polling`), then
/// hands the queue back to that thread and sleeps on the inbox's condition variable until it
/// delivers (with a timeout, which only bounds the wait if an engine never answers).
fn wait_for_events<S>(inbox: &Inbox<S>, q: &mut dyn Queue<S>, spin: &mut SpinBudget) {
    let start = Instant::now();
    q.begin_polling();
    if spin.spin(|| q.poll() > 0 || inbox.count.load(Ordering::Acquire) > 0) {
        return;
    }
    if !q.end_polling() {
        // Completions came in just before the interrupt was armed: none will be raised for them.
        q.poll();
        return;
    }
    let mut ev = inbox.events.lock().unwrap_or_else(|e| e.into_inner());
    if ev.is_empty() {
        inbox.sleeping.store(true, Ordering::Relaxed);
        ev = inbox
            .ready
            .wait_timeout(ev, Duration::from_millis(5))
            .map(|r| r.0)
            .unwrap_or_else(|e| e.into_inner().0);
        inbox.sleeping.store(false, Ordering::Relaxed);
    }
    drop(ev);
    spin.record(start.elapsed());
}

fn worker<E: Engine>(
    engine: &E,
    session: E::Session,
    queue: usize,
    args: &BenchArgs,
    point: Point,
    deadline: Instant,
    stop: &AtomicBool,
) -> anyhow::Result<ThreadResult> {
    let inbox: Arc<Inbox<E::Session>> = Arc::new(Inbox {
        events: Mutex::new(Vec::new()),
        count: AtomicUsize::new(0),
        sleeping: AtomicBool::new(false),
        ready: Condvar::new(),
    });
    let sink_inbox = inbox.clone();
    let poll_mode = !engine.delivers_events();
    let batch = batch_of(args, point);
    let mut q = if batch == 1 {
        engine.open_queue(queue, Arc::new(move |ev| sink_inbox.deliver(std::iter::once(ev))))?
    } else {
        engine.open_batch_queue(queue, Arc::new(move |events| sink_inbox.deliver(events)))?
    };
    // `irq` measures interrupt delivery alone: the thread sleeps at once.
    let max_spin = if args.device.mode == "irq" { Duration::ZERO } else { ADAPTIVE_MAX_SPIN };
    let mut spin = SpinBudget::new(Duration::ZERO, max_spin);
    let qd = if args.wait_each { 1 } else { point.qd };
    let mode = args.alg.mode;
    let reference = new_cipher(CoreKind::Fast, mode, &KEY[..args.alg.key_len])?;
    let mut slots: Vec<Option<Buf>> = Vec::with_capacity(qd);
    for i in 0..qd {
        let mut b = engine.alloc_buffer(point.size)?;
        b.as_mut_slice().iter_mut().enumerate().for_each(|(j, x)| *x = (i * 31 + j) as u8);
        slots.push(Some(b));
    }
    let mut st = Submitter {
        free: (0..qd).rev().collect(),
        slots,
        submitted_at: vec![Instant::now(); qd],
        seq: 0,
        in_flight: 0,
        promoted: 0,
        blocked: None,
        samples: (0..qd).map(|_| None).collect(),
        check_every: if args.device.device_null && args.engine != "software" { 0 } else { args.check_every },
        mode,
        batch: VecDeque::with_capacity(batch),
        ids: Vec::with_capacity(batch),
        clock: DriverClock::new(0x9e37_79b9_7f4a_7c15 ^ queue as u64),
    };
    let mut lat = Histogram::<u64>::new(3).map_err(|e| anyhow!("histogram: {e}"))?;
    let mut local: Vec<Event<E::Session>> = Vec::new();
    let mut ops = 0u64;
    let limit = args.count.unwrap_or(u64::MAX);
    let mut out_of_time = false;
    loop {
        // Submit while the pipeline allows: not waiting for a promotion, buffers free.
        while st.blocked.is_none() && !out_of_time && st.seq < limit && !st.free.is_empty() {
            // The clock is read once per batch, or every 64 requests one at a time.
            if (batch > 1 || st.seq % 64 == 0)
                && (Instant::now() >= deadline && args.count.is_none() || stop.load(Ordering::Relaxed))
            {
                out_of_time = true;
                break;
            }
            let n = batch.min(st.free.len()).min((limit - st.seq).try_into().unwrap_or(usize::MAX));
            let more = if batch == 1 {
                st.submit_one(&mut *q, &session)?
            } else {
                st.submit_batch(&mut *q, &session, n)?
            };
            if !more {
                break;
            }
        }
        if st.in_flight == 0 && (out_of_time || st.seq >= limit) {
            break;
        }
        if poll_mode && st.clock.time(|| q.poll(), |&n| n > 0) == 0 {
            // Nothing came back: pause briefly before polling again, so that a spinning poller
            // leaves the core's execution resources (and the ring's cache lines) to the device.
            for _ in 0..32 {
                std::hint::spin_loop();
            }
        }
        if !poll_mode {
            wait_for_events(&inbox, &mut *q, &mut spin);
        }
        {
            let mut ev = inbox.events.lock().unwrap_or_else(|e| e.into_inner());
            inbox.count.store(0, Ordering::Relaxed);
            std::mem::swap(&mut *ev, &mut local);
        }
        // One clock read per run of events (none while spinning on an empty inbox).
        let now = if local.is_empty() { continue } else { Instant::now() };
        for ev in local.drain(..) {
            match ev {
                Event::Promoted { user_data } => {
                    if st.blocked == Some(user_data) {
                        st.blocked = None;
                    }
                }
                Event::Completed(c) => {
                    let slot = c.request.user_data as usize;
                    c.result.with_context(|| format!("request on queue {queue} failed"))?;
                    let _ =
                        lat.record(now.saturating_duration_since(st.submitted_at[slot]).as_nanos() as u64);
                    if let Some(s) = st.samples[slot].take() {
                        let mut expect = s.input;
                        let mut tag = [0u8; 16];
                        let t: &mut [u8] = if mode.is_aead() { &mut tag } else { &mut [] };
                        reference.encrypt(s.iv.as_slice(), &[], &mut expect, t)?;
                        if *expect != *c.request.data.as_slice() || (mode.is_aead() && tag != c.request.tag) {
                            bail!(
                                "{}: result differs from the AES core called directly (request {})",
                                engine.describe(),
                                ops
                            );
                        }
                    }
                    st.slots[slot] = Some(c.request.data);
                    st.free.push(slot);
                    st.in_flight -= 1;
                    ops += 1;
                }
            }
        }
    }
    Ok(ThreadResult { ops, promoted: st.promoted, lat, driver_ns: st.clock.total_ns() })
}

/// A bench thread's submission side: its buffers and what it has in flight.
struct Submitter<S> {
    free: Vec<usize>,
    slots: Vec<Option<Buf>>,
    submitted_at: Vec<Instant>,
    seq: u64,
    in_flight: usize,
    promoted: u64,
    /// The backlogged request whose `Promoted` the thread waits for before submitting more.
    blocked: Option<u64>,
    /// The checked requests in flight, by buffer.
    samples: Vec<Option<Sample>>,
    /// One request in this many is checked; 0: none (a null device does no AES by design).
    check_every: u64,
    mode: Mode,
    batch: VecDeque<Request<S>>,
    /// The ids of the batch being submitted, in order.
    ids: Vec<u64>,
    clock: DriverClock,
}

impl<S: Clone> Submitter<S> {
    /// The request for buffer `slot`, the next in sequence.
    /// Infallible, so that the request is built where it goes rather than moved out of a
    /// `Result`.
    #[inline]
    fn request(&mut self, session: &S, slot: usize, data: Buf, now: Instant) -> Request<S> {
        let iv = iv_for(self.mode, self.seq);
        if self.check_every != 0 && self.seq % self.check_every == 0 {
            self.samples[slot] = Some(Sample { input: data.as_slice().to_vec(), iv });
        }
        self.submitted_at[slot] = now;
        self.seq += 1;
        Request::new(session.clone(), Direction::Encrypt, iv, data, slot as u64)
    }

    /// Free buffer `slot`'s memory.
    fn buffer(&mut self, slot: usize) -> anyhow::Result<Buf> {
        self.slots[slot].take().ok_or_else(|| anyhow!("buffer {slot} missing"))
    }

    /// A refused request's buffer goes back to the free list (and stops being checked).
    fn refused(&mut self, request: Request<S>) {
        let slot = request.user_data as usize;
        self.slots[slot] = Some(request.data);
        self.free.push(slot);
        self.seq -= 1;
        self.samples[slot] = None;
    }

    /// Submits one request with `submit`; returns whether to go on submitting.
    fn submit_one(&mut self, q: &mut dyn Queue<S>, session: &S) -> anyhow::Result<bool> {
        let Some(slot) = self.free.pop() else { return Ok(false) };
        let data = self.buffer(slot)?;
        let req = self.request(session, slot, data, Instant::now());
        // The refused request comes back in the error by design (the contract's "handed back
        // whole"), so the error is as large as a request.
        #[allow(clippy::result_large_err)]
        let submit = || q.submit(req, true);
        match self.clock.time(submit, |_| true) {
            Ok(Submitted::InProgress) => {}
            Ok(Submitted::Backlogged) => {
                self.blocked = Some(slot as u64);
                self.promoted += 1;
            }
            Err(e) => match e.kind {
                SubmitErrorKind::Busy => {
                    self.refused(e.request);
                    return Ok(false);
                }
                SubmitErrorKind::Rejected(err) => return Err(err).context("submit refused"),
            },
        }
        self.in_flight += 1;
        Ok(true)
    }

    /// Submits `n` requests with one `submit_batch`; returns whether to go on submitting.
    fn submit_batch(&mut self, q: &mut dyn Queue<S>, session: &S, n: usize) -> anyhow::Result<bool> {
        let now = Instant::now();
        let mut batch = std::mem::take(&mut self.batch);
        self.ids.clear();
        for _ in 0..n {
            let Some(slot) = self.free.pop() else { break };
            let data = self.buffer(slot)?;
            batch.push_back(self.request(session, slot, data, now));
            self.ids.push(slot as u64);
        }
        // The last taken request's id, to wait for its Promoted if it was backlogged: the
        // promotions come in order, so earlier backlogged ones are promoted by then.
        let r = self.clock.time(|| q.submit_batch(&mut batch, true), |_| true);
        let taken = r.accepted();
        self.in_flight += taken;
        if r.backlogged > 0 {
            self.blocked = Some(self.ids[taken - 1]);
            self.promoted += r.backlogged as u64;
        }
        // Untaken requests are handed back in reverse so that `seq` unwinds in order.
        while let Some(req) = batch.pop_back() {
            self.refused(req);
        }
        self.batch = batch;
        match r.refused {
            Some(SubmitErrorKind::Rejected(err)) => Err(err).context("submit refused"),
            Some(SubmitErrorKind::Busy) => Ok(false),
            None => Ok(taken > 0),
        }
    }
}
