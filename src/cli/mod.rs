//! Command-line interface: argument parsing and the subcommands.

mod bench;
mod close;
mod competitor;
mod crypt;
mod devbind;
mod device;
mod dump;
mod duration;
mod format;
mod keys;
mod luks_opts;
mod open;
mod output;
mod overwrite_check;
mod plain_opts;
mod plot;
mod progress;
mod selftest;
mod serve;
mod soak;

use clap::{Parser, Subcommand};

pub use bench::BenchArgs;
pub use device::InfoArgs;
pub use selftest::SelftestArgs;
pub use serve::ServeArgs;

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
    Info(InfoArgs),
    /// List the crypto PCI functions, their driver and IOMMU group, and whether they are ready.
    List,
    /// Hand a crypto PCI function to vfio-pci (driver_override, unbind, drivers_probe).
    Bind(devbind::BdfArg),
    /// Give a function back from vfio-pci to the host's own driver.
    Unbind(devbind::BdfArg),
    /// Run every algorithm and key size the device accepts against the software implementation,
    /// and bad input that must be refused.
    Selftest(SelftestArgs),
    /// Export the decrypted view of a volume (LUKS, authenticated, or plain dm-crypt with --plain; or, with --raw, an image as it is) over NBD.
    Serve(ServeArgs),
    /// The decrypted view of a volume as a kernel block device (/dev/ublkbN or /dev/nbdN), like `cryptsetup open`.
    Open(open::OpenArgs),
    /// Detach a block device that `open` made, like `cryptsetup close`.
    Close(close::CloseArgs),
    /// Write a new LUKS1 or LUKS2 header on an image (like `cryptsetup luksFormat`).
    Format(format::FormatArgs),
    /// Encrypt a raw image into a new LUKS (or, with --plain, dm-crypt plain) image.
    Encrypt(crypt::EncryptArgs),
    /// Decrypt a LUKS (or, with --plain, dm-crypt plain) image into a raw image.
    Decrypt(crypt::DecryptArgs),
    /// Show a LUKS header without secrets (like `cryptsetup luksDump`).
    Dump(dump::DumpArgs),
    /// Add a passphrase to a LUKS image (like `cryptsetup luksAddKey`).
    #[command(alias = "luksAddKey")]
    AddKey(keys::AddKeyArgs),
    /// Remove the passphrase given from a LUKS image (like `cryptsetup luksRemoveKey`).
    #[command(alias = "luksRemoveKey")]
    RemoveKey(keys::RemoveKeyArgs),
    /// Push millions of requests through a faulty emulated device and check every promise
    /// (for developers; see issue 8).
    #[command(hide = true)]
    Soak(soak::SoakArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Info(a) => device::info(a),
        Command::List => devbind::list(),
        Command::Bind(a) => devbind::bind(a),
        Command::Unbind(a) => devbind::unbind(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Open(a) => open::run(a),
        Command::Close(a) => close::run(a),
        Command::Format(a) => format::run(a),
        Command::Encrypt(a) => crypt::encrypt(a),
        Command::Decrypt(a) => crypt::decrypt(a),
        Command::Dump(a) => dump::run(a),
        Command::AddKey(a) => keys::add(a),
        Command::RemoveKey(a) => keys::remove(a),
        Command::Soak(a) => soak::run(a),
    }
}
