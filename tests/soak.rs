//! The short soak: `crypt-vfio soak` with 100,000 requests from 8 threads through 4 queues
//! while the emulated device commits a random fault every 20 ms (lying completions, lost
//! answers, resets behind the driver's back). Nothing may be lost, answered twice, wrong or
//! against the contract, and the device must have been recovered along the way. The full
//! soak is `crypt-vfio soak` (10 million requests by default).

use std::process::Command;

fn figure(out: &str, name: &str) -> u64 {
    let line = out.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no `{name}` in:\n{out}"));
    line[name.len()..].split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn short_soak_loses_nothing_and_recovers() {
    let out = Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
        .args(["soak", "--requests", "100000", "--fault-every", "20ms"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "soak failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert_eq!(figure(&text, "requests submitted"), 100_000);
    for zero in ["lost", "duplicated", "contract violations", "wrong data"] {
        assert_eq!(figure(&text, zero), 0, "{zero}:\n{text}");
    }
    let ok = figure(&text, "  completed ok");
    let failed = figure(&text, "  completed failed");
    let refused = figure(&text, "  refused at submit");
    assert_eq!(ok + failed + refused, 100_000, "every request accounted for:\n{text}");
    assert!(figure(&text, "faults injected") > 0);
    assert!(figure(&text, "recoveries") > 0, "the soak must exercise recovery:\n{text}");
}
