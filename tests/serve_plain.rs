//! `serve --plain` (a headerless dm-crypt image, as `cryptsetup open --type plain`): nbdcopy
//! reads what `encrypt --plain` wrote, a qemu-io write through NBD is what `decrypt --plain` then
//! sees, and a bad key or option is refused by name before anything listens. Skipped (saying why) when a tool is missing.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{have, pattern, run, scratch, start_server};

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
}

/// The plain-mode options of the image these tests make: cipher, key, offset, IV skip, 4 KiB
/// sectors counted as such.
fn plain_opts(key: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        ["--plain", "--cipher", "aes-xts-plain64", "--offset", "8", "--skip", "3", "--sector-size", "4096"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    v.push("--iv-large-sectors".into());
    v.push("--volume-key-file".into());
    v.push(key.to_str().unwrap().into());
    v
}

/// Runs `cmd`, which must fail, and returns its standard error.
fn fails(cmd: &mut Command) -> String {
    let out: Output = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// SIGTERM, then wait for the flush and a clean exit.
fn stop(mut child: std::process::Child) {
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "serve exited with {status}");
            return;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("serve did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_plain_reads_and_writes_a_headerless_image() {
    if !have("nbdcopy") || !have("qemu-io") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let key = d.join("vk.bin");
    std::fs::write(&key, pattern(64, 7)).unwrap();
    let plain = pattern(1 << 20, 11);
    std::fs::write(d.join("plain.raw"), &plain).unwrap();
    run(cli().arg("encrypt").args(plain_opts(&key)).arg(d.join("plain.raw")).arg(d.join("enc.img")));

    let (child, uri) = start_server(
        cli()
            .args(["serve", "--listen", "127.0.0.1:0", "--export", "vol"])
            .args(plain_opts(&key))
            .arg(d.join("enc.img"))
            .stderr(Stdio::inherit()),
        Duration::from_secs(30),
    );
    run(Command::new(support::tool("nbdcopy")).arg(&uri).arg(d.join("read.raw")));
    assert!(
        std::fs::read(d.join("read.raw")).unwrap() == plain,
        "nbdcopy of serve --plain differs from the plaintext"
    );

    // 8 KiB of 0x5a at 64 KiB, written through NBD.
    run(Command::new(support::tool("qemu-io")).args(["-f", "raw", "-c", "write -P 0x5a 65536 8192", &uri]));
    stop(child);

    run(cli().arg("decrypt").args(plain_opts(&key)).arg(d.join("enc.img")).arg(d.join("back.raw")));
    let mut want = plain.clone();
    want[65536..65536 + 8192].fill(0x5a);
    assert!(std::fs::read(d.join("back.raw")).unwrap() == want, "decrypt --plain does not see the NBD write");
}

#[test]
fn serve_plain_refuses_bad_keys_and_options_before_listening() {
    let dir = scratch();
    let d = dir.path();
    std::fs::write(d.join("enc.img"), vec![0u8; 1 << 20]).unwrap();
    let short = d.join("short.bin");
    std::fs::write(&short, [1u8; 20]).unwrap();
    let serve = || {
        let mut c = cli();
        c.args(["serve", "--listen", "127.0.0.1:0"]);
        c
    };
    let err = fails(serve().args(["--plain", "--volume-key-file"]).arg(&short).arg(d.join("enc.img")));
    assert!(err.contains("20 bytes"), "a 20-byte key is refused naming its length: {err}");
    assert!(!err.contains("listening"), "{err}");
    let err = fails(serve().arg("--plain").arg(d.join("enc.img")));
    assert!(err.contains("--volume-key-file"), "a missing key file is named: {err}");
    let err = fails(serve().args(["--plain", "--raw"]).arg(d.join("enc.img")));
    assert!(err.contains("cannot be used with"), "--plain with --raw: {err}");
    let err = fails(serve().args(["--plain", "--key-file"]).arg(&short).arg(d.join("enc.img")));
    assert!(err.contains("cannot be used with"), "--plain with --key-file: {err}");
}
