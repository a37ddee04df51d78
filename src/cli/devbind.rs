//! `crypt-vfio list`, `bind` and `unbind`: the device tooling, in the habits of dpdk-devbind and
//! driverctl. The rules (what is ours, when a group is viable, what to write where) live in
//! [`crypt_vfio::pci_sysfs`]; this file only prints.

use anyhow::Context;
use clap::Args;
use crypt_vfio::pci_sysfs::{Bdf, CryptoKind, PciFunction, Sysfs};

/// A PCI address argument.
#[derive(Args, Debug)]
pub struct BdfArg {
    /// PCI address of the function (DDDD:BB:DD.F or BB:DD.F), as `crypt-vfio list` shows it.
    #[arg(value_name = "BDF")]
    bdf: String,
}

impl BdfArg {
    fn parse(&self) -> anyhow::Result<Bdf> {
        Ok(self.bdf.parse()?)
    }
}

fn id(f: &PciFunction) -> String {
    format!("{:04x}:{:04x}", f.vendor, f.device)
}

fn status(sysfs: &Sysfs, f: &PciFunction) -> (String, Option<String>) {
    if f.kind() == CryptoKind::LegacyVirtioCrypto {
        return ("unsupported (legacy)".into(), sysfs.check_ready(f).err().map(|e| e.to_string()));
    }
    match sysfs.check_ready(f) {
        Ok(()) => ("ready".into(), None),
        Err(e) => ("not ready".into(), Some(e.to_string())),
    }
}

/// `crypt-vfio list`: crypto functions, their driver and IOMMU group, and whether crypt-vfio can
/// open them. Says plainly when the machine has no VFIO, and succeeds all the same.
pub fn list() -> anyhow::Result<()> {
    let sysfs = Sysfs::system();
    let support = sysfs.vfio_support();
    if let Some(problem) = support.problem() {
        println!("VFIO is not usable on this machine: {problem}.");
    }
    if !support.pci_bus {
        return Ok(());
    }
    let found = sysfs.crypto_functions().context("listing PCI functions")?;
    if found.is_empty() {
        println!("No virtio-crypto functions (1af4:1054, or legacy 1af4:1014) on this machine.");
        return Ok(());
    }
    println!("{:<14} {:<10} {:<12} {:<12} status", "BDF", "ID", "driver", "IOMMU group");
    let mut notes = Vec::new();
    for f in &found {
        let group = f.iommu_group.map_or("none".to_string(), |g| g.to_string());
        let (state, why) = status(&sysfs, f);
        println!("{:<14} {:<10} {:<12} {:<12} {state}", f.bdf.to_string(), id(f), f.driver_name(), group);
        if let Some(why) = why {
            notes.push(format!("  {}: {why}", f.bdf));
        }
    }
    for n in notes {
        println!("{n}");
    }
    Ok(())
}

/// `crypt-vfio bind BDF`.
pub fn bind(arg: BdfArg) -> anyhow::Result<()> {
    let bdf = arg.parse()?;
    let sysfs = Sysfs::system();
    let out = sysfs.bind(&bdf)?;
    let node = sysfs.group_node(out.group);
    if out.already {
        println!("{bdf}: already bound to vfio-pci (IOMMU group {}, {})", out.group, node.display());
    } else {
        let was = out.previous.as_deref().unwrap_or("no driver");
        println!("{bdf}: bound to vfio-pci (was {was}); IOMMU group {}, {}", out.group, node.display());
    }
    Ok(())
}

/// `crypt-vfio unbind BDF`.
pub fn unbind(arg: BdfArg) -> anyhow::Result<()> {
    let bdf = arg.parse()?;
    let out = Sysfs::system().unbind(&bdf)?;
    match (out.was_vfio, out.driver) {
        (false, Some(d)) => println!("{bdf}: bound to {d}, not vfio-pci; left as it is"),
        (_, Some(d)) if d == crypt_vfio::pci_sysfs::VFIO_PCI => {
            anyhow::bail!("{bdf}: still bound to vfio-pci after unbind (is a process holding it?)")
        }
        (_, Some(d)) => println!("{bdf}: released from vfio-pci; now driven by {d}"),
        (_, None) => println!("{bdf}: released from vfio-pci; no host driver took it"),
    }
    Ok(())
}
