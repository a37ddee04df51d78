//! Command-line interface: argument parsing and the subcommands.

mod bench;
mod device;
mod plot;
mod progress;

use clap::{Parser, Subcommand};

pub use bench::BenchArgs;
pub use device::DeviceArgs;

/// Userspace driver for PCIe crypto accelerators (virtio-crypto over VFIO).
#[derive(Parser, Debug)]
#[command(name = "crypt-vfio", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure throughput and latency of an engine.
    Bench(BenchArgs),
    /// Show a device: features, services, algorithms (advertised and usable), queues, limits.
    Info(DeviceArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Info(a) => device::info(a),
    }
}
