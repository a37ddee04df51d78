//! Opening a device or choosing an engine from command-line arguments, and `crypt-vfio info`.
//!
//! Device commands (`info`, `selftest`, `bench`) drive a virtio-crypto device: `emulated` (the
//! default) or a PCI address bound to vfio-pci. Block commands (`encrypt`, `decrypt`, `serve`,
//! `format`, `add-key`, `remove-key`) only need AES done somewhere, so they default to `auto`:
//! the device if exactly one is bound to vfio-pci, else the software engine; which one runs is
//! printed on standard error.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{AnyEngine, Engine, PoolEngine, PoolOptions};
use crypt_vfio::pci_sysfs::{Bdf, PciFunction, Sysfs};
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedFault, EmulatedTransport};
use crypt_vfio::transport::vfio::VfioTransport;
use crypt_vfio::transport::Transport;
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions, VirtioCrypto};
use crypt_vfio::{CoreKind, DeviceName, Mode};
use crypt_vfio_spec::crypto::{aead, cipher};

use super::duration::{parse_delay, parse_device_latency, parse_period, parse_request_timeout};

/// Which device to open and how.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `emulated` (the software device model), a PCI address bound to vfio-pci, and for block
    /// commands also `software` (the AES cores on the calling threads) or `auto`: the one
    /// virtio-crypto function bound to vfio-pci if there is one, else the software engine (with
    /// several bound, name one). Default: `auto` for block commands (encrypt, decrypt, serve,
    /// format, add-key, remove-key), `emulated` for the others. A comma-separated list
    /// (`0000:00:04.0,0000:00:05.0`, `emulated,emulated,software`) runs them as one pool that
    /// spreads the work and carries on when a member fails (`software` stands by for when no
    /// device is left).
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
    /// How completions are waited for: `adaptive` spins for a budget learnt from recent
    /// completion times, then sleeps until an MSI-X interrupt (holds up on a busy machine);
    /// `poll` spins in the caller (fastest on an idle machine, collapses on a busy one); `irq`
    /// spins a couple of microseconds, then sleeps until an interrupt.
    #[arg(long, default_value = "adaptive", value_parser = ["adaptive", "poll", "irq"])]
    pub mode: String,
    /// Emulated device: latency added to every request (e.g. 20us, 1ms).
    #[arg(long, default_value = "0us", value_parser = parse_device_latency)]
    pub device_latency: Duration,
    /// Emulated device: worker threads (1 to 256).
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub device_workers: usize,
    /// Emulated device: maximum queue size (a power of two up to 32768).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub device_queue_size: u16,
    /// Emulated device: number of data queues (1 to 1023).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1023))]
    pub device_queues: u16,
    /// Emulated device: complete requests without doing AES (measures the driver alone; `bench`
    /// only).
    #[arg(long)]
    pub device_null: bool,
    /// Emulated device: the algorithms it offers, comma-separated from gcm, xts, cbc, ctr (to
    /// see how the driver handles a device that lacks some).
    #[arg(long, value_delimiter = ',', default_value = "gcm,xts,cbc,ctr", value_parser = ["gcm", "xts", "cbc", "ctr"])]
    pub device_algs: Vec<String>,
    /// AES core of the emulated device and of the software engine: aws-lc or rustcrypto.
    #[arg(long, default_value = "aws-lc")]
    pub core: CoreKind,
    /// How long a request may wait for the device before the device is declared failed (and
    /// reset and recovered).
    #[arg(long, default_value = "10s", value_parser = parse_request_timeout)]
    pub request_timeout: Duration,
    /// Emulated device, for testing the driver: a scripted fault `KIND@START[+LENGTH]`, armed
    /// START after the device is created and disarmed LENGTH later (e.g. never-answer@2s+3s).
    /// Kinds: never-answer, answer-late, duplicate-used, free-slot-id, short-length,
    /// status-unwritten, extra-used, early-completion, ignore-reset, ignore-all-resets, ctrl-late,
    /// and unplug (the device asks for itself back, as vfio-pci does before an unbind; LENGTH is
    /// ignored). In a pool (`--device a,b`), `:MEMBER` arms it on one member only (its index in
    /// the list, which must name `emulated`), `:all` (the default) on every emulated member.
    #[arg(long, hide = true, value_parser = parse_fault)]
    pub device_fault: Vec<FaultPlan>,
    /// When the kernel wants the device back (an unbind or a hot-unplug): how long requests on
    /// it may take to finish before they fail and it is given back.
    #[arg(long, default_value = "1s", value_parser = parse_delay)]
    pub release_drain: Duration,
    /// Ignore the kernel's requests to give the device back (to see an unbind or unplug wait
    /// for crypt-vfio to exit).
    #[arg(long, hide = true)]
    pub no_release_listener: bool,
    /// A pool (`--device a,b`): how long requests wait while every member is down before they
    /// fail (default: the --request-timeout).
    #[arg(long, value_name = "DURATION", value_parser = parse_request_timeout)]
    pub member_wait: Option<Duration>,
}

/// A fault of the emulated device armed over a window of time.
#[derive(Clone, Debug)]
pub struct FaultPlan {
    kind: String,
    start: Duration,
    length: Option<Duration>,
    /// The pool member it is armed on (`None`: every emulated member).
    member: Option<usize>,
}

const FAULT_KINDS: [&str; 12] = [
    "never-answer",
    "answer-late",
    "duplicate-used",
    "free-slot-id",
    "short-length",
    "status-unwritten",
    "extra-used",
    "early-completion",
    "ignore-reset",
    "ignore-all-resets",
    "ctrl-late",
    "unplug",
];

fn parse_fault(s: &str) -> Result<FaultPlan, String> {
    let (plan, member) = match s.rsplit_once(':') {
        Some((plan, "all")) => (plan, None),
        Some((plan, m)) => (
            plan,
            Some(
                m.parse::<usize>()
                    .map_err(|_| format!("`{s}`: the member after `:` is an index or `all`"))?,
            ),
        ),
        None => (s, None),
    };
    let s = plan;
    let (kind, when) =
        s.split_once('@').ok_or_else(|| format!("`{s}`: expected KIND@START[+LENGTH][:MEMBER]"))?;
    if !FAULT_KINDS.contains(&kind) {
        return Err(format!("unknown fault `{kind}` (one of {})", FAULT_KINDS.join(", ")));
    }
    let (start, length) = match when.split_once('+') {
        Some((a, b)) => (parse_delay(a)?, Some(parse_period(b)?)),
        None => (parse_delay(when)?, None),
    };
    Ok(FaultPlan { kind: kind.into(), start, length, member })
}

impl FaultPlan {
    fn fault(&self, timeout: Duration) -> EmulatedFault {
        match self.kind.as_str() {
            "never-answer" => EmulatedFault::NeverAnswer,
            "answer-late" => EmulatedFault::AnswerAfter(timeout * 2),
            "duplicate-used" => EmulatedFault::DuplicateUsed,
            "free-slot-id" => EmulatedFault::FreeSlotId,
            "short-length" => EmulatedFault::ShortLength,
            "status-unwritten" => EmulatedFault::StatusUnwritten,
            "extra-used" => EmulatedFault::ExtraUsed,
            "early-completion" => EmulatedFault::EarlyCompletion,
            "ignore-reset" => EmulatedFault::IgnoreReset { flr_too: false },
            "ignore-all-resets" => EmulatedFault::IgnoreReset { flr_too: true },
            _ => EmulatedFault::CtrlLate(timeout * 2),
        }
    }

    /// Arms the fault on `t` at its start and disarms it at its end, from a thread of its own.
    fn schedule(&self, t: &Arc<EmulatedTransport>, timeout: Duration) -> anyhow::Result<()> {
        let (t, plan, fault) = (Arc::downgrade(t), self.clone(), self.fault(timeout));
        std::thread::Builder::new()
            .name("crypt-vfio-fault-plan".into())
            .spawn(move || {
                std::thread::sleep(plan.start);
                let Some(dev) = t.upgrade() else { return };
                if plan.kind == "unplug" {
                    log::warn!("the emulated device asks to be given back");
                    dev.request_release();
                    return;
                }
                log::warn!("arming emulated device fault {}", plan.kind);
                dev.inject(fault);
                drop(dev);
                if let Some(len) = plan.length {
                    std::thread::sleep(len);
                    if let Some(dev) = t.upgrade() {
                        log::warn!("disarming emulated device faults");
                        dev.clear_faults();
                    }
                }
            })
            .context("starting the fault plan thread")?;
        Ok(())
    }
}

/// Parses `--device-queue-size`: a power of two up to 32768 (virtio's largest split queue).
fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(v) if v.is_power_of_two() && v <= 32768 => Ok(v),
        _ => Err(format!("`{s}` is not a power of two from 1 to 32768")),
    }
}

impl DeviceArgs {
    /// The device a device command drives: `--device`, or the emulated device.
    fn device_name(&self) -> &str {
        self.device.as_deref().unwrap_or("emulated")
    }

    /// The names of `--device`, a list for a pool. Refused: empty items, a PCI address or
    /// `software` twice, `auto` in a list, and fault plans for a member that is not `emulated`.
    pub fn names(&self) -> anyhow::Result<Vec<String>> {
        let given = self.device_name();
        let names: Vec<String> = given.split(',').map(|n| n.trim().to_string()).collect();
        if names.len() > 1 {
            if names.iter().any(|n| n == "auto") {
                bail!("--device {given}: `auto` chooses one engine; it cannot be a member of a list");
            }
            crypt_vfio::parse_list(given)?;
        }
        for plan in &self.device_fault {
            if let Some(m) = plan.member {
                match names.get(m) {
                    Some(n) if n == "emulated" => {}
                    Some(n) => {
                        bail!("--device-fault {}:{m}: member {m} is {n}, not an emulated device", plan.kind)
                    }
                    None => bail!(
                        "--device-fault {}:{m}: --device names {} member(s), counted from 0",
                        plan.kind,
                        names.len()
                    ),
                }
            }
        }
        Ok(names)
    }

    /// Whether `--device` names a list (a pool).
    pub fn is_pool(&self) -> bool {
        self.device_name().contains(',')
    }

    /// Opens the pool `--device` lists (the null device included, for `bench`).
    pub fn open_pool(&self, options: &DeviceOptions) -> anyhow::Result<PoolEngine> {
        let names = self.names()?;
        let mut members = Vec::with_capacity(names.len());
        // PCI members share one container (functions of one IOMMU group must).
        let mut container = None;
        for (m, name) in names.iter().enumerate() {
            let parsed: DeviceName = name.parse()?;
            let engine = match parsed {
                DeviceName::Software => AnyEngine::Software(SoftwareEngine::new(self.core)),
                DeviceName::Emulated => {
                    let t = self.emulated_transport(Some(m))?;
                    AnyEngine::Device(
                        VirtioCrypto::open(t, options).with_context(|| format!("opening member {m}"))?,
                    )
                }
                DeviceName::Pci(bdf) => {
                    let container = match &container {
                        Some(c) => c,
                        None => container.insert(crypt_vfio::transport::vfio::VfioContainer::open()?),
                    };
                    let t: Arc<dyn Transport> = Arc::new(VfioTransport::open_in(container, &bdf)?);
                    AnyEngine::Device(
                        VirtioCrypto::open(t, options).with_context(|| format!("opening {bdf}"))?,
                    )
                }
            };
            members.push((crypt_vfio::member_name(m, &parsed), engine));
        }
        let pool = PoolOptions {
            member_wait: self.member_wait.unwrap_or(self.request_timeout),
            ..PoolOptions::default()
        };
        Ok(PoolEngine::new(members, pool)?)
    }

    /// The transport the arguments name: the emulated device, or the function at a PCI address
    /// through VFIO.
    pub fn transport(&self) -> anyhow::Result<Arc<dyn Transport>> {
        let name = self.device_name();
        if self.is_pool() {
            bail!("--device {name}: this command drives one device; give one name, not a list");
        }
        self.names()?;
        if name == "auto" || name == "software" {
            bail!(
                "--device {name} chooses an engine for the block commands (encrypt, decrypt, serve, format, \
                 add-key, remove-key); this command drives a virtio-crypto device: give `emulated` or the \
                 PCI address of a function bound to vfio-pci (see `crypt-vfio list`)"
            );
        }
        if name != "emulated" {
            let bdf: Bdf = name.parse()?;
            // The library's errors already say what to do; no context to add.
            return Ok(Arc::new(VfioTransport::open(&bdf)?));
        }
        self.emulated_transport(None)
    }

    /// A new emulated device of the `--device-*` shape, with the fault plans for pool member
    /// `member` (every plan when it is not in a pool).
    fn emulated_transport(&self, member: Option<usize>) -> anyhow::Result<Arc<dyn Transport>> {
        let config = EmulatedConfig {
            data_queues: self.device_queues,
            max_queue_size: self.device_queue_size,
            workers: self.device_workers,
            latency: self.device_latency,
            null_crypto: self.device_null,
            core: self.core,
            cipher_algos: [("xts", cipher::AES_XTS), ("cbc", cipher::AES_CBC), ("ctr", cipher::AES_CTR)]
                .into_iter()
                .filter(|(name, _)| self.device_algs.iter().any(|a| a == name))
                .map(|(_, id)| id)
                .collect(),
            aead_algos: if self.device_algs.iter().any(|a| a == "gcm") { vec![aead::GCM] } else { vec![] },
            ..EmulatedConfig::default()
        };
        let t = Arc::new(EmulatedTransport::new(config).context("creating the emulated device")?);
        for plan in &self.device_fault {
            if member.is_none() || plan.member.is_none() || plan.member == member {
                plan.schedule(&t, self.request_timeout)?;
            }
        }
        Ok(t)
    }

    /// The completion mode `--mode` names.
    pub fn completion(&self) -> CompletionMode {
        match self.mode.as_str() {
            "poll" => CompletionMode::Poll,
            "irq" => CompletionMode::Interrupt,
            _ => CompletionMode::Adaptive,
        }
    }

    /// Driver options from the arguments.
    pub fn options(&self) -> DeviceOptions {
        DeviceOptions {
            completion: self.completion(),
            request_timeout: self.request_timeout,
            watch_release: !self.no_release_listener,
            release_drain: self.release_drain,
            ..DeviceOptions::default()
        }
    }

    /// Opens the device for a command that keeps its results: the null device, which completes
    /// requests without encrypting, is refused (it would store the plaintext as the ciphertext).
    pub fn open(&self, options: &DeviceOptions) -> anyhow::Result<VirtioCrypto> {
        self.refuse_null()?;
        self.open_for_bench(options)
    }

    fn refuse_null(&self) -> anyhow::Result<()> {
        if self.device_null {
            bail!(
                "--device-null is for `crypt-vfio bench` only: it completes requests without doing \
                 AES, so the data would be written unencrypted or decrypted to garbage"
            );
        }
        Ok(())
    }

    /// Opens the device, the null device included (for `bench`, which measures the driver and
    /// keeps no data).
    pub fn open_for_bench(&self, options: &DeviceOptions) -> anyhow::Result<VirtioCrypto> {
        let t = self.transport()?;
        let name = t.name();
        VirtioCrypto::open(t, options).with_context(|| format!("opening {name}"))
    }
}

/// The engine a block command runs on: a virtio-crypto device (emulated or bound to vfio-pci)
/// or the software engine. Run generic code on it with [`with_block_engine!`].
pub enum BlockEngine {
    /// A virtio-crypto device.
    Device(VirtioCrypto),
    /// The AES cores on the calling threads.
    Software(SoftwareEngine),
    /// Several engines as one (`--device a,b,software`).
    Pool(PoolEngine),
}

/// Runs `$body` with `$e` bound to the engine inside a [`BlockEngine`], whichever it is (the
/// body is compiled once per engine type, so the hot path has no dynamic dispatch).
macro_rules! with_block_engine {
    ($engine:expr, |$e:ident| $body:expr) => {
        match $engine {
            $crate::cli::device::BlockEngine::Device($e) => $body,
            $crate::cli::device::BlockEngine::Software($e) => $body,
            $crate::cli::device::BlockEngine::Pool($e) => $body,
        }
    };
}
pub(crate) use with_block_engine;

/// What `--device auto` runs on.
#[derive(Debug, PartialEq, Eq)]
pub enum AutoChoice {
    /// The one virtio-crypto function bound to vfio-pci.
    Device(Bdf),
    /// The software engine: no function is bound.
    Software,
}

/// `--device auto` over the virtio-crypto functions bound to vfio-pci: the device when there is
/// exactly one, the software engine when there is none. Several are refused with their
/// addresses rather than one picked: which device encrypts a volume must not depend on the
/// order sysfs lists them in, and the user knows which one is meant.
pub fn auto_choice(bound: &[PciFunction]) -> anyhow::Result<AutoChoice> {
    match bound {
        [] => Ok(AutoChoice::Software),
        [one] => Ok(AutoChoice::Device(one.bdf)),
        several => {
            let list: Vec<String> = several.iter().map(|f| f.bdf.to_string()).collect();
            bail!(
                "--device auto: {} virtio-crypto functions are bound to vfio-pci ({}); choose one with \
                 --device BDF, or --device software",
                several.len(),
                list.join(", ")
            )
        }
    }
}

impl DeviceArgs {
    /// Options that only configure the emulated device and were changed from their defaults.
    fn emulated_only_options(&self) -> Vec<&'static str> {
        let all_algs = ["gcm", "xts", "cbc", "ctr"].iter().all(|a| self.device_algs.iter().any(|b| b == a));
        [
            ("--device-latency", !self.device_latency.is_zero()),
            ("--device-workers", self.device_workers != 1),
            ("--device-queue-size", self.device_queue_size != 256),
            ("--device-queues", self.device_queues != 4),
            ("--device-null", self.device_null),
            ("--device-algs", !all_algs),
            ("--device-fault", !self.device_fault.is_empty()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }

    /// The engine of a block command: `--device` (default `auto`), opened, with one line on
    /// standard error saying which engine runs and, for `auto`, why.
    pub fn open_block(&self) -> anyhow::Result<BlockEngine> {
        self.refuse_null()?;
        let given = self.device.as_deref().unwrap_or("auto");
        if self.is_pool() {
            self.refuse_null()?;
            if !self.names()?.iter().any(|n| n == "emulated") {
                self.refuse_emulated_options("a pool without emulated members")?;
            }
            let pool = self.open_pool(&self.options())?;
            eprintln!("crypt-vfio: engine: {}", crypt_vfio::engine::Engine::describe(&pool));
            return Ok(BlockEngine::Pool(pool));
        }
        let why = match given {
            "software" => String::new(),
            "auto" => match Sysfs::system().vfio_bound_crypto() {
                Ok(bound) => match auto_choice(&bound)? {
                    AutoChoice::Software => {
                        " (--device auto: no virtio-crypto function is bound to vfio-pci)".to_string()
                    }
                    AutoChoice::Device(bdf) => {
                        let mut args = self.clone();
                        args.device = Some(bdf.to_string());
                        return args.open_block_device(
                            " (--device auto: the one virtio-crypto function bound to vfio-pci)",
                        );
                    }
                },
                // A machine whose sysfs cannot be read has no device crypt-vfio could open.
                Err(e) => format!(" (--device auto: could not list PCI functions: {e})"),
            },
            _ => return self.open_block_device(""),
        };
        self.refuse_emulated_options("the software engine")?;
        let engine = SoftwareEngine::new(self.core);
        eprintln!("crypt-vfio: engine: {}{why}", crypt_vfio::engine::Engine::describe(&engine));
        Ok(BlockEngine::Software(engine))
    }

    fn open_block_device(&self, why: &str) -> anyhow::Result<BlockEngine> {
        if self.device_name() != "emulated" {
            self.refuse_emulated_options(self.device_name())?;
        }
        let dev = self.open(&self.options())?;
        eprintln!("crypt-vfio: engine: {}{why}", crypt_vfio::engine::Engine::describe(&dev));
        Ok(BlockEngine::Device(dev))
    }

    /// Options of the emulated device given to a command that runs on `engine` are an error,
    /// not silently dropped: the user meant the emulated device.
    fn refuse_emulated_options(&self, engine: &str) -> anyhow::Result<()> {
        let given = self.emulated_only_options();
        if !given.is_empty() {
            bail!(
                "{} configure(s) the emulated device, but this command runs on {engine}: add --device emulated",
                given.join(", ")
            );
        }
        Ok(())
    }
}

/// Arguments of `crypt-vfio info`: the device as a positional address or with `--device`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// PCI address of a function bound to vfio-pci (the same as --device).
    #[arg(value_name = "BDF")]
    target: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
}

impl DeviceArgs {
    /// Takes a positional device address into `--device`; refuses two different ones.
    pub fn with_target(mut self, target: Option<String>) -> anyhow::Result<Self> {
        if let Some(t) = target {
            if let Some(d) = self.device.as_deref().filter(|&d| d != "emulated" && d != t) {
                bail!("two devices given ({t} and --device {d}): give one");
            }
            self.device = Some(t);
        }
        Ok(self)
    }
}

/// `crypt-vfio info`.
pub fn info(args: InfoArgs) -> anyhow::Result<()> {
    let args = args.device.with_target(args.target)?;
    if args.is_pool() {
        args.refuse_null()?;
        let pool = args.open_pool(&args.options())?;
        for (name, engine) in pool.members() {
            match engine.device() {
                Some(dev) => {
                    println!("member {name}:");
                    device_info(dev);
                }
                None => println!(
                    "member {name}: {} (standby: runs requests only when no device can)",
                    crypt_vfio::engine::Engine::describe(engine)
                ),
            }
            println!();
        }
        println!(
            "pool:          {} queue(s), homes spread over the devices in turn; {}",
            crypt_vfio::engine::Engine::queue_count(&pool),
            if pool.members().any(|(_, e)| e.device().is_none()) {
                "software standby"
            } else {
                "no software standby"
            }
        );
        for m in pool.member_stats() {
            println!(
                "  {:<14} {:<5} recoveries {} share {:.1}% ({} requests since open)",
                m.name,
                m.state.to_string(),
                m.recoveries,
                m.share * 100.0,
                m.requests
            );
        }
        return Ok(());
    }
    let dev = args.open(&args.options())?;
    device_info(&dev);
    Ok(())
}

/// The block `info` prints for one device.
fn device_info(dev: &VirtioCrypto) {
    let info = dev.info();
    println!("device:        {}", crypt_vfio::engine::Engine::describe(dev));
    println!("features:      {:#x}", dev.features());
    println!("ready:         {}", info.ready());
    println!("services:      {}", info.service_names().join(", "));
    println!("advertised:    {}", info.algorithm_names().join(", "));
    println!(
        "data queues:   {} (using {})",
        info.max_dataqueues,
        crypt_vfio::engine::Engine::queue_count(dev)
    );
    println!("max key:       {} bytes", info.max_cipher_key_len);
    println!("max request:   {} bytes", info.max_size);
    println!("usable (probed by creating a session):");
    // Every key length the cores know, so that what `info` lists is what a volume may use.
    for mode in [Mode::Gcm, Mode::Xts, Mode::Cbc, Mode::Ctr] {
        let ok: Vec<String> = mode
            .key_lengths()
            .iter()
            .filter(|&&k| dev.probe(mode, k).unwrap_or(false))
            .map(|k| format!("{}-bit", k * 8))
            .collect();
        let adv = if info.advertises(mode) { "advertised" } else { "not advertised" };
        let usable = if ok.is_empty() { "not usable".to_string() } else { ok.join(" ") };
        println!("  {:<8} {usable:<24} ({adv})", mode.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(bdf: &str) -> PciFunction {
        PciFunction {
            bdf: bdf.parse().unwrap(),
            vendor: 0x1af4,
            device: 0x1054,
            class: 0x100000,
            driver: Some("vfio-pci".into()),
            iommu_group: Some(1),
        }
    }

    #[test]
    fn auto_runs_software_without_a_device_and_the_device_when_there_is_one() {
        assert_eq!(auto_choice(&[]).unwrap(), AutoChoice::Software);
        assert_eq!(
            auto_choice(&[bound("0000:00:04.0")]).unwrap(),
            AutoChoice::Device("0000:00:04.0".parse().unwrap())
        );
    }

    #[test]
    fn auto_refuses_to_guess_between_several_devices_and_names_them() {
        let e = auto_choice(&[bound("0000:00:04.0"), bound("0000:00:05.0")]).unwrap_err().to_string();
        assert!(e.contains("0000:00:04.0") && e.contains("0000:00:05.0") && e.contains("--device"), "{e}");
    }
}
