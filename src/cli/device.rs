//! Opening a device from command-line arguments (`emulated` or a PCI address bound to vfio-pci),
//! and `crypt-vfio info`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::pci_sysfs::Bdf;
use crypt_vfio::transport::emulated::{EmulatedConfig, EmulatedFault, EmulatedTransport};
use crypt_vfio::transport::vfio::VfioTransport;
use crypt_vfio::transport::Transport;
use crypt_vfio::virtio_crypto::{CompletionMode, DeviceOptions, VirtioCrypto};
use crypt_vfio::{CoreKind, Mode};
use crypt_vfio_spec::crypto::{aead, cipher};

use super::duration::{parse_delay, parse_device_latency, parse_period, parse_request_timeout};

/// Which device to open and how.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `emulated` (the software device model) or a PCI address bound to vfio-pci.
    #[arg(long, default_value = "emulated")]
    pub device: String,
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
    /// status-unwritten, extra-used, early-completion, ignore-reset, ignore-all-resets, ctrl-late.
    #[arg(long, hide = true, value_parser = parse_fault)]
    pub device_fault: Vec<FaultPlan>,
}

/// A fault of the emulated device armed over a window of time.
#[derive(Clone, Debug)]
pub struct FaultPlan {
    kind: String,
    start: Duration,
    length: Option<Duration>,
}

const FAULT_KINDS: [&str; 11] = [
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
];

fn parse_fault(s: &str) -> Result<FaultPlan, String> {
    let (kind, when) = s.split_once('@').ok_or_else(|| format!("`{s}`: expected KIND@START[+LENGTH]"))?;
    if !FAULT_KINDS.contains(&kind) {
        return Err(format!("unknown fault `{kind}` (one of {})", FAULT_KINDS.join(", ")));
    }
    let (start, length) = match when.split_once('+') {
        Some((a, b)) => (parse_delay(a)?, Some(parse_period(b)?)),
        None => (parse_delay(when)?, None),
    };
    Ok(FaultPlan { kind: kind.into(), start, length })
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
    /// The transport the arguments name: the emulated device, or the function at a PCI address
    /// through VFIO.
    pub fn transport(&self) -> anyhow::Result<Arc<dyn Transport>> {
        if self.device != "emulated" {
            let bdf: Bdf = self.device.parse()?;
            // The library's errors already say what to do; no context to add.
            return Ok(Arc::new(VfioTransport::open(&bdf)?));
        }
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
            plan.schedule(&t, self.request_timeout)?;
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
            ..DeviceOptions::default()
        }
    }

    /// Opens the device for a command that keeps its results: the null device, which completes
    /// requests without encrypting, is refused (it would store the plaintext as the ciphertext).
    pub fn open(&self, options: &DeviceOptions) -> anyhow::Result<VirtioCrypto> {
        if self.device_null {
            bail!(
                "--device-null is for `crypt-vfio bench` only: it completes requests without doing \
                 AES, so the data would be written unencrypted or decrypted to garbage"
            );
        }
        self.open_for_bench(options)
    }

    /// Opens the device, the null device included (for `bench`, which measures the driver and
    /// keeps no data).
    pub fn open_for_bench(&self, options: &DeviceOptions) -> anyhow::Result<VirtioCrypto> {
        let t = self.transport()?;
        let name = t.name();
        VirtioCrypto::open(t, options).with_context(|| format!("opening {name}"))
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
            if self.device != "emulated" && self.device != t {
                bail!("two devices given ({t} and --device {}): give one", self.device);
            }
            self.device = t;
        }
        Ok(self)
    }
}

/// `crypt-vfio info`.
pub fn info(args: InfoArgs) -> anyhow::Result<()> {
    let args = args.device.with_target(args.target)?;
    let dev = args.open(&args.options())?;
    let info = dev.info();
    println!("device:        {}", crypt_vfio::engine::Engine::describe(&dev));
    println!("features:      {:#x}", dev.features());
    println!("ready:         {}", info.ready());
    println!("services:      {}", info.service_names().join(", "));
    println!("advertised:    {}", info.algorithm_names().join(", "));
    println!(
        "data queues:   {} (using {})",
        info.max_dataqueues,
        crypt_vfio::engine::Engine::queue_count(&dev)
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
    Ok(())
}
