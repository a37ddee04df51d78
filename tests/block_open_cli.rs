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

/// Whether `module` is loaded, built in, or among the modules the running kernel can load.
fn kernel_may_load(module: &str) -> bool {
    if Path::new("/sys/module").join(module).exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = Path::new("/lib/modules").join(release.trim());
    let ko = format!("/{module}.ko");
    ["modules.dep", "modules.builtin"].iter().any(|f| match std::fs::read_to_string(dir.join(f)) {
        Ok(list) => list.lines().any(|l| l.split(':').next().is_some_and(|p| p.contains(&ko))),
        // No list: modprobe has nothing to load from either.
        Err(_) => false,
    })
}

fn plain_args<'a>(img: &'a str, key: &'a str) -> Vec<&'a str> {
    vec!["--plain", "--volume-key-file", key, "--sector-size", "4096", "--device", "software", img]
}

#[test]
fn the_daemon_reports_a_missing_ublk_driver_to_the_caller() {
    if Path::new("/dev/ublk-control").exists() || kernel_may_load("ublk_drv") {
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
    // The netlink family lookup loads nbd.ko if the kernel has it: then a device would be made.
    if kernel_may_load("nbd") {
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

/// Runs crypt-vfio with `stdin` as its standard input, killing it (and failing) if it has not
/// ended after 60 s: a daemon whose parent never hears a verdict hangs.
fn crypt_vfio_fed(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run crypt-vfio");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{args:?} did not end within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_pidfile_that_cannot_be_written_fails_the_open_before_any_device() {
    let dir = tempfile::tempdir().unwrap();
    let (img, key) = plain_image(dir.path());
    let pidfile = dir.path().join("no/such/dir/pid");
    let mut args = vec!["open", "--pidfile", pidfile.to_str().unwrap()];
    args.extend(plain_args(&img, &key));
    let o = crypt_vfio_fed(&args, b"");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("writing the pidfile"), "{}", stderr(&o));
    assert!(o.stdout.is_empty(), "printed a device although the open failed");
}

#[test]
fn an_image_another_server_holds_is_refused() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let (img, key) = plain_image(dir.path());
    let held = std::fs::File::open(&img).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    // The running server's pidfile, which a refused open must leave alone.
    let pidfile = dir.path().join("pid");
    std::fs::write(&pidfile, "12345\n").unwrap();
    for mode in [vec!["open", "--foreground"], vec!["open"], vec!["open", "--nbd", "any"]] {
        let mut args = mode.clone();
        args.extend(["--pidfile", pidfile.to_str().unwrap()]);
        args.extend(plain_args(&img, &key));
        let o = crypt_vfio_fed(&args, b"");
        assert!(!o.status.success(), "{mode:?} opened a held image");
        assert!(stderr(&o).contains("is in use by another program"), "{mode:?}: {}", stderr(&o));
        assert_eq!(std::fs::read_to_string(&pidfile).ok().as_deref(), Some("12345\n"), "{mode:?}");
    }
}

#[test]
fn the_key_from_standard_input_is_read_before_the_daemon_forks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("vk"), [0x5au8; 32]).unwrap();
    let img = d.join("auth.img");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let o = crypt_vfio(&[
        "format",
        "--type",
        "authenticated",
        "--sector-size",
        "512",
        "--volume-key-file",
        d.join("vk").to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Another key: the daemon must see it (and refuse it), not an empty standard input.
    let o = crypt_vfio_fed(
        &["open", "--key-file", "-", "--device", "software", img.to_str().unwrap()],
        &[0x11u8; 32],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("the key does not open this volume"), "{}", stderr(&o));
}

#[test]
fn a_plain_volume_key_from_standard_input_is_read_before_the_daemon_forks() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("plain.img");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    // A key of the wrong length: the daemon must refuse these 7 bytes, not the 0 bytes of
    // the /dev/null its standard input becomes.
    let o = crypt_vfio_fed(
        &["open", "--plain", "--volume-key-file", "-", "--device", "software", img.to_str().unwrap()],
        &[0x11u8; 7],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("holds 7 bytes"), "{}", stderr(&o));
}

#[test]
fn the_daemon_works_from_the_root_and_still_finds_relative_paths() {
    // The daemon changes to / (it must keep no file system busy); the image and the pidfile,
    // named relative to where `open` ran, must still be found there.
    let dir = tempfile::tempdir().unwrap();
    plain_image(dir.path());
    // `sub` is a file: the pidfile cannot be written, which ends the open before any device
    // and shows the path the daemon used.
    std::fs::write(dir.path().join("sub"), b"").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
        .current_dir(dir.path())
        .args(["open", "--pidfile", "sub/pid"])
        .args(plain_args("plain.img", "vk.bin"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    // As the daemon's directory was when it made the path absolute: symbolic links resolved.
    let here = std::fs::canonicalize(dir.path()).unwrap();
    let want = format!("writing the pidfile {}", here.join("sub/pid").display());
    assert!(err.contains(&want), "the daemon lost its relative paths: {err}");
}
