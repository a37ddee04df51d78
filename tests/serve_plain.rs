//! `serve --plain` (a headerless dm-crypt image, as `cryptsetup open --type plain`) and
//! `format --type authenticated`: nbdcopy reads what `encrypt --plain` wrote, a qemu-io write
//! through NBD is what `decrypt --plain` then sees, and every bad key or size is refused by name
//! before anything listens or is written. Skipped (saying why) when a tool is missing.

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
    let err = fails(
        serve().arg("--key-file").arg(&short).arg("--volume-key-file").arg(&short).arg(d.join("enc.img")),
    );
    assert!(
        err.contains("--volume-key-file goes with --plain"),
        "a raw key without --plain is not ignored: {err}"
    );
}

#[test]
fn format_authenticated_makes_a_zeroed_volume() {
    let dir = scratch();
    let d = dir.path();
    let key = d.join("vk32.bin");
    std::fs::write(&key, pattern(32, 3)).unwrap();
    let vk = ["--type", "authenticated", "--sector-size", "4096", "--volume-key-file"];

    // A new image of --size bytes of data.
    run(cli().arg("format").args(vk).arg(&key).args(["--size", "1048576"]).arg(d.join("auth.img")));
    run(cli()
        .arg("decrypt")
        .arg("--volume-key-file")
        .arg(&key)
        .arg(d.join("auth.img"))
        .arg(d.join("out.raw")));
    assert!(std::fs::read(d.join("out.raw")).unwrap() == vec![0u8; 1 << 20], "not 1 MiB of zeroes");

    // Over an existing file: it fills the file and never grows it; its superblock is not
    // overwritten unasked.
    std::fs::write(d.join("old.img"), pattern(3 << 20, 5)).unwrap();
    run(cli().arg("format").args(vk).arg(&key).arg(d.join("old.img")));
    assert_eq!(std::fs::metadata(d.join("old.img")).unwrap().len(), 3 << 20);
    run(cli()
        .arg("decrypt")
        .arg("--volume-key-file")
        .arg(&key)
        .arg(d.join("old.img"))
        .arg(d.join("old.raw")));
    let data = std::fs::read(d.join("old.raw")).unwrap();
    assert!(
        !data.is_empty() && data.len() % 4096 == 0 && data.len() > (3 << 20) - 64 * 4096,
        "{}",
        data.len()
    );
    assert!(data.iter().all(|&b| b == 0), "not all zeroes");
    let err = fails(cli().arg("format").args(vk).arg(&key).arg(d.join("old.img")));
    assert!(err.contains("authenticated volume's superblock"), "{err}");
    run(cli().arg("format").args(vk).arg(&key).arg("-q").arg(d.join("old.img")));

    // Bad keys and sizes: refused by name, nothing created.
    let bad = d.join("vk24.bin");
    std::fs::write(&bad, [9u8; 24]).unwrap();
    let err = fails(cli().arg("format").args(vk).arg(&bad).args(["--size", "1048576"]).arg(d.join("a.img")));
    assert!(err.contains("24 bytes"), "{err}");
    for size in ["0", "1000", "6144"] {
        let err = fails(cli().arg("format").args(vk).arg(&key).args(["--size", size]).arg(d.join("a.img")));
        assert!(err.contains("multiple of the sector size"), "--size {size}: {err}");
    }
    let err = fails(cli().args(["format", "--type", "authenticated", "--size", "4096"]).arg(d.join("a.img")));
    assert!(err.contains("--volume-key-file"), "{err}");
    assert!(!d.join("a.img").exists(), "a refused format left a file behind");
}
