//! Helpers for the volume and interop tests: scratch files, external tools, reference scripts.

#![allow(dead_code)]

pub mod engines;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The program `name`: from `PATH`, or from the sbin directories a non-login shell may leave out
/// of it (Debian installs cryptsetup in /usr/sbin).
pub fn tool(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !on_path {
        for dir in ["/usr/sbin", "/sbin", "/usr/local/sbin"] {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from(name)
}

/// Whether `tool` can be run; prints why the test is skipped when not.
pub fn have(name: &str) -> bool {
    let ok = Command::new(tool(name)).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: `{name}` is not installed (apt-get install qemu-utils cryptsetup-bin nbdkit libnbd-bin)");
    }
    ok
}

/// Whether Python with the `cryptography` package can be run (the independent reference).
pub fn have_python_cryptography() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: python3 with the `cryptography` package is not available");
    }
    ok
}

/// Runs `cmd`, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The path of a script under tools/.
pub fn tool_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools").join(name)
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A fresh scratch directory, removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("crypt-vfio-test").tempdir().expect("temp dir")
}

/// Starts `cmd`, a `crypt-vfio serve`, with its standard output piped, and waits up to
/// `timeout` for the first line, which names the address. Returns the child and the URI
/// (`nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`). The line is read on a thread,
/// so a server that never prints fails the test instead of hanging it.
pub fn start_server(cmd: &mut Command, timeout: std::time::Duration) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child =
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(timeout).expect("the server prints its address");
    let uri = line
        .strip_prefix("listening on ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, uri)
}
