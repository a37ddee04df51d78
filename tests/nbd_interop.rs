//! `crypt-vfio serve --raw` against real NBD clients: qemu-img, qemu-io, nbdcopy, nbdinfo.
//!
//! These are the clients people will point at the server, and each exercises it differently
//! (qemu's block layer with its alignment and flushes, libnbd with multi-conn and pipelining).
//! Data is always checked, through the tool and on the image itself. A missing tool skips its
//! test with the reason printed (`apt-get install qemu-utils libnbd-bin`). The server listens
//! on a random loopback port or a Unix socket; every wait is bounded.

mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::start_server;

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
const SERVER_TIMEOUT: Duration = Duration::from_secs(20);
const IMAGE_SIZE: usize = 4 << 20;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    // A cheap generator whose blocks all differ, so a misplaced block cannot pass.
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// True when `tool` runs; otherwise says why the test is skipped.
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: `{tool}` is not installed (apt-get install qemu-utils libnbd-bin)");
    }
    ok
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs a client tool to completion within [`TOOL_TIMEOUT`], output captured in files so a
/// chatty tool cannot block on a full pipe.
fn run(dir: &Path, program: &str, args: &[&str]) -> Run {
    let out = dir.join(format!("{program}.stdout"));
    let err = dir.join(format!("{program}.stderr"));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let status = wait(&mut child, TOOL_TIMEOUT)
        .unwrap_or_else(|| panic!("{program} {args:?} took over {TOOL_TIMEOUT:?}"));
    let r = Run {
        status,
        stdout: std::fs::read_to_string(out).unwrap(),
        stderr: std::fs::read_to_string(err).unwrap(),
    };
    assert!(r.status.success(), "{program} {args:?} failed ({}):\n{}\n{}", r.status, r.stdout, r.stderr);
    r
}

fn wait(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `crypt-vfio serve --raw` process over a fresh image.
struct Served {
    child: Child,
    uri: String,
    image: PathBuf,
    dir: tempfile::TempDir,
}

impl Served {
    fn start(unix: bool, extra: &[&str]) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, pattern(IMAGE_SIZE, 1)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crypt-vfio"));
        cmd.arg("serve").arg("--raw").arg(&image).args(["--export", "disk"]).args(extra);
        if unix {
            cmd.arg("--socket").arg(dir.path().join("nbd.sock"));
        } else {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let (child, uri) =
            start_server(cmd.stderr(File::create(dir.path().join("server.log")).unwrap()), SERVER_TIMEOUT);
        Served { child, uri, image, dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// Sends `signal` and waits for the exit.
    fn stop(mut self, signal: &str) -> (ExitStatus, String) {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(killed.success());
        let status = wait(&mut self.child, SERVER_TIMEOUT).expect("the server stops on a signal");
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap();
        (status, log)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn qemu_img_convert_copies_the_whole_export() {
    if !have("qemu-img") {
        return;
    }
    let s = Served::start(false, &[]);
    let out = s.path("out.raw");
    run(s.dir.path(), "qemu-img", &["convert", "-f", "raw", "-O", "raw", &s.uri, &out]);
    assert_eq!(std::fs::read(&out).unwrap(), pattern(IMAGE_SIZE, 1));
    let (status, _) = s.stop("-TERM");
    assert!(status.success());
}

#[test]
fn qemu_io_writes_and_reads_back_patterns() {
    if !have("qemu-io") {
        return;
    }
    let s = Served::start(false, &[]);
    let r = run(
        s.dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 4k",
            "-c",
            "read -P 0xab 0 4k",
            // Unaligned: qemu read-modify-writes around it.
            "-c",
            "write -P 0xcd 5000 300",
            "-c",
            "read -P 0xcd 5000 300",
            "-c",
            "write -z -f 8k 8k",
            "-c",
            "discard 64k 64k",
            "-c",
            "flush",
            &s.uri,
        ],
    );
    assert!(!r.stdout.contains("Pattern verification failed"), "{}", r.stdout);
    assert!(r.stdout.contains("read 4096/4096 bytes at offset 0"), "{}", r.stdout);
    let disk = std::fs::read(&s.image).unwrap();
    let orig = pattern(IMAGE_SIZE, 1);
    assert!(disk[..4096].iter().all(|&b| b == 0xab));
    assert_eq!(&disk[4096..5000], &orig[4096..5000]);
    assert!(disk[5000..5300].iter().all(|&b| b == 0xcd));
    assert!(disk[8192..16384].iter().all(|&b| b == 0));
    assert_eq!(&disk[16384..65536], &orig[16384..65536]);
    s.stop("-INT");
}

#[test]
fn nbdcopy_in_and_out_over_several_connections() {
    if !have("nbdcopy") {
        return;
    }
    let s = Served::start(false, &[]);
    let src = s.path("src.raw");
    std::fs::write(&src, pattern(IMAGE_SIZE, 2)).unwrap();
    // Several connections at once: only safe because the server offers multi-conn.
    run(s.dir.path(), "nbdcopy", &["--connections=4", "--requests=16", &src, &s.uri]);
    assert_eq!(std::fs::read(&s.image).unwrap(), pattern(IMAGE_SIZE, 2));
    let out = s.path("out.raw");
    run(s.dir.path(), "nbdcopy", &["--connections=2", &s.uri, &out]);
    assert_eq!(std::fs::read(&out).unwrap(), pattern(IMAGE_SIZE, 2));
    let (status, log) = s.stop("-TERM");
    assert!(status.success(), "{log}");
}

#[test]
fn nbdinfo_describes_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let s = Served::start(false, &[]);
    let r = run(s.dir.path(), "nbdinfo", &["--json", &s.uri]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("nbdinfo prints JSON");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["export-size"], IMAGE_SIZE as u64);
    for yes in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(e[yes], true, "{yes}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    let list = run(s.dir.path(), "nbdinfo", &["--list", &s.uri]);
    assert!(list.stdout.contains("export=\"disk\""), "{}", list.stdout);
    s.stop("-TERM");
}

#[test]
fn read_only_serving_is_visible_to_clients() {
    if !have("nbdinfo") {
        return;
    }
    let s = Served::start(false, &["--read-only"]);
    let r = run(s.dir.path(), "nbdinfo", &["--json", &s.uri]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true);
    s.stop("-TERM");
}

#[test]
fn unix_socket_serves_qemu_io_and_nbdinfo() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let s = Served::start(true, &[]);
    assert!(s.uri.starts_with("nbd+unix:///disk?socket="), "{}", s.uri);
    let r = run(s.dir.path(), "nbdinfo", &["--size", &s.uri]);
    assert_eq!(r.stdout.trim(), IMAGE_SIZE.to_string());
    let r = run(
        s.dir.path(),
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k", &s.uri],
    );
    assert!(!r.stdout.contains("Pattern verification failed"), "{}", r.stdout);
    let disk = std::fs::read(&s.image).unwrap();
    assert!(disk[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0x5a));
    let sock = s.uri.split("socket=").nth(1).unwrap().to_string();
    let (status, _) = s.stop("-TERM");
    assert!(status.success());
    assert!(!Path::new(&sock).exists(), "the socket file is removed on exit");
}

#[test]
fn a_signal_stops_the_server_with_exit_status_zero() {
    // No client tool needed: the server alone, idle and then with a connected client.
    let s = Served::start(false, &[]);
    let (status, log) = s.stop("-INT");
    assert!(status.success(), "SIGINT: {status} {log}");
    assert!(log.contains("stopped after 0 connection(s)"), "{log}");

    let s = Served::start(false, &[]);
    let addr = s.uri.trim_start_matches("nbd://").split('/').next().unwrap().to_string();
    // A client idle in the handshake must not hold the stop up.
    let _client = std::net::TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (status, log) = s.stop("-TERM");
    assert!(status.success(), "SIGTERM: {status} {log}");
    assert!(log.contains("stopped after 1 connection(s)"), "{log}");
}

#[test]
fn serving_an_image_that_is_not_encrypted_needs_raw() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img");
    let key = dir.path().join("key");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    std::fs::write(&key, "passphrase").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
        .args(["serve", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(&key)
        .arg(&image)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("neither a LUKS image nor an authenticated volume") && err.contains("--raw"),
        "{err}"
    );
}
