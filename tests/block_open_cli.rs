//! `open` and `close` on a machine that may lack ublk and nbd: the daemon's verdict reaches the
//! caller (the error happens in the forked server, after the volume is unlocked), and the
//! refusals that need no kernel device.

use std::path::Path;
use std::process::{Command, Output};

fn crypt_vfio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crypt-vfio")).args(args).output().expect("run crypt-vfio")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A 1 MiB plain dm-crypt image and its key, which open unlocks without a header.
fn plain_image(dir: &Path) -> (String, String) {
    let img = dir.join("plain.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let key = dir.join("vk.bin");
    std::fs::write(&key, (0u8..64).collect::<Vec<u8>>()).unwrap();
    (img.display().to_string(), key.display().to_string())
}

fn plain_args<'a>(img: &'a str, key: &'a str) -> Vec<&'a str> {
    vec!["--plain", "--volume-key-file", key, "--sector-size", "4096", "--device", "software", img]
}

#[test]
fn the_daemon_reports_a_missing_ublk_driver_to_the_caller() {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("skipped: this kernel has ublk; the guest test covers it");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, key) = plain_image(dir.path());
    let mut args = vec!["open"];
    args.extend(plain_args(&img, &key));
    let o = crypt_vfio(&args);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("ublk adding a device (is ublk_drv loaded?)"), "{err}");
    assert!(err.contains("No such file or directory"), "the errno is not spelled out: {err}");
    assert!(o.stdout.is_empty(), "printed a device although none was made");
}

#[test]
fn the_daemon_reports_a_missing_nbd_client_to_the_caller() {
    if Path::new("/sys/module/nbd").exists() {
        eprintln!("skipped: this kernel has nbd; the guest test covers it");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, key) = plain_image(dir.path());
    let mut args = vec!["open", "--nbd", "any"];
    args.extend(plain_args(&img, &key));
    let o = crypt_vfio(&args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("the kernel has no NBD client"), "{}", stderr(&o));
}

#[test]
fn a_wrong_key_is_reported_before_any_device_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = plain_image(dir.path());
    let short = dir.path().join("short.bin");
    std::fs::write(&short, [1u8; 20]).unwrap();
    let mut args = vec!["open", "--nbd", "any"];
    args.extend(plain_args(&img, short.to_str().unwrap()));
    let o = crypt_vfio(&args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("20 bytes"), "{}", stderr(&o));
}

#[test]
fn devices_crypt_vfio_does_not_make_are_refused() {
    for (args, text) in [
        (vec!["close", "/dev/sda"], "is not a device crypt-vfio opens"),
        (vec!["close", "/dev/ublkbx"], "is not a ublk device"),
        (vec!["open", "--recover", "/dev/nbd0", "--key-file", "k", "img"], "is not a ublk device"),
        (vec!["open", "--nbd", "/dev/sda", "--key-file", "k", "img"], "is not an NBD device"),
    ] {
        let o = crypt_vfio(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(text), "{args:?}: {}", stderr(&o));
    }
}
