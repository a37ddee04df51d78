//! `encrypt`, `decrypt` and `format` must never lose, truncate or expose a user's data: whole
//! images well above the 4 MiB copy chunk, byte for byte, on a synchronous file system and on a
//! full one; outputs that are the input; block devices as input and output; failures and
//! signals part way; the null device; key files; numbers out of range (issue 9, items 1, 4, 5,
//! 6, 7, 9 and 11).
//!
//! Mounts, loop devices and `chattr` need root; those parts skip, saying why, when they cannot
//! be set up.

mod support;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{have, pattern, run, scratch, tool};

const PASS: &str = "data safety passphrase";
/// Well above the CLI's 4 MiB chunk and not a multiple of it, nor of a sector.
const BIG: usize = (37 << 20) + 3 * 512 + 123;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
}

/// Runs the CLI and expects a clean failure (an error message, not a panic); returns stderr.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    assert!(matches!(out.status.code(), Some(1 | 2)), "{cmd:?} exited with {}: {err}", out.status);
    assert!(!err.contains("panicked"), "{cmd:?} panicked: {err}");
    err
}

/// The files in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The image formats `encrypt` writes, with the arguments that make and open each.
#[derive(Clone, Copy, Debug)]
enum Format {
    Luks1,
    Luks2,
    Plain,
    Authenticated,
}

impl Format {
    fn encrypt_args(self, d: &Path) -> Vec<String> {
        let mut v: Vec<String> = match self {
            Format::Luks1 => vec!["--type", "luks1", "--pbkdf-force-iterations", "1000", "--key-file"],
            Format::Luks2 => {
                vec!["--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file"]
            }
            Format::Plain => vec!["--plain", "--cipher", "aes-cbc-essiv:sha256", "--volume-key-file"],
            Format::Authenticated => {
                vec!["--type", "authenticated", "--sector-size", "4096", "--volume-key-file"]
            }
        }
        .into_iter()
        .map(String::from)
        .collect();
        v.push(d.join(self.key_name()).display().to_string());
        v
    }

    fn decrypt_args(self, d: &Path) -> Vec<String> {
        let mut v: Vec<String> = match self {
            Format::Luks1 | Format::Luks2 => vec!["--key-file"],
            Format::Plain => vec!["--plain", "--cipher", "aes-cbc-essiv:sha256", "--volume-key-file"],
            Format::Authenticated => vec!["--volume-key-file"],
        }
        .into_iter()
        .map(String::from)
        .collect();
        v.push(d.join(self.key_name()).display().to_string());
        v
    }

    fn key_name(self) -> &'static str {
        match self {
            Format::Luks1 | Format::Luks2 => "pass",
            Format::Plain | Format::Authenticated => "vk",
        }
    }

    fn sector(self) -> usize {
        match self {
            Format::Authenticated => 4096,
            _ => 512,
        }
    }
}

/// Writes the keys of every format into `d`.
fn keys(d: &Path) {
    std::fs::write(d.join("pass"), PASS).unwrap();
    std::fs::write(d.join("vk"), pattern(32, 99)).unwrap();
}

/// `plain` padded with zeroes to whole sectors, as encrypt pads the last one.
fn padded(plain: &[u8], sector: usize) -> Vec<u8> {
    let mut v = plain.to_vec();
    v.resize(plain.len().next_multiple_of(sector), 0);
    v
}

/// Encrypts `len` pattern bytes in format `f` into `d/enc.img`; returns the padded plaintext.
fn make_image(d: &Path, f: Format, len: usize, seed: u64) -> Vec<u8> {
    keys(d);
    let plain = pattern(len, seed);
    std::fs::write(d.join("plain.raw"), &plain).unwrap();
    run(cli().arg("encrypt").args(f.encrypt_args(d)).arg(d.join("plain.raw")).arg(d.join("enc.img")));
    padded(&plain, f.sector())
}

/// A file system on an image file mounted at a directory (loop device), unmounted and removed
/// when dropped, also when the test fails.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    /// An ext4 file system of `mib` MiB mounted with `options` at `base/mnt`; `None` (saying
    /// why) when that is not allowed here.
    fn ext4(base: &Path, mib: u64, options: &str) -> Option<Mount> {
        let img = base.join("fs.ext4");
        std::fs::File::create(&img).unwrap().set_len(mib << 20).unwrap();
        let mkfs = Command::new(tool("mkfs.ext4")).args(["-q", "-F"]).arg(&img).output();
        if !matches!(&mkfs, Ok(o) if o.status.success()) {
            eprintln!("SKIPPED (file system part): mkfs.ext4 failed or is missing: {mkfs:?}");
            return None;
        }
        let dir = base.join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount").args(["-o", &format!("loop,{options}")]).arg(&img).arg(&dir).output();
        match out {
            Ok(o) if o.status.success() => Some(Mount { dir }),
            other => {
                eprintln!(
                    "SKIPPED (file system part): `mount -o loop,{options}` is not allowed here: {other:?}"
                );
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// A loop device over a file, detached when dropped.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn over(file: &Path) -> Option<Loop> {
        let out = Command::new(tool("losetup")).args(["-f", "--show"]).arg(file).output();
        match out {
            Ok(o) if o.status.success() => {
                let dev = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
                Some(Loop { dev })
            }
            other => {
                eprintln!("SKIPPED (loop device part): `losetup -f --show` failed: {other:?}");
                None
            }
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new(tool("losetup")).arg("-d").arg(&self.dev).status();
    }
}

/// Encrypts a 37 MiB (and a bit) image in format `f`, then decrypts it several times, into the
/// scratch directory and onto a synchronous file system (where writing is slower than
/// decrypting), and checks every output byte for byte.
fn round_trip(f: Format) {
    let dir = scratch();
    let d = dir.path();
    let want = make_image(d, f, BIG, f as u64 + 10);
    let mut outputs = vec![d.to_path_buf()];
    let mount = Mount::ext4(d, 96, "sync");
    if let Some(m) = &mount {
        outputs.push(m.dir.clone());
    }
    for out_dir in &outputs {
        for i in 0..3 {
            let out = out_dir.join("back.raw");
            run(cli().arg("decrypt").args(f.decrypt_args(d)).arg(d.join("enc.img")).arg(&out));
            let got = std::fs::read(&out).unwrap();
            assert!(
                got.len() == want.len() && got == want,
                "{f:?}, run {i}, into {}: {} bytes decrypted, {} expected, or different bytes",
                out_dir.display(),
                got.len(),
                want.len()
            );
            std::fs::remove_file(&out).unwrap();
        }
    }
    // And encrypting onto the synchronous file system writes the same image.
    if let Some(m) = &mount {
        run(cli().arg("encrypt").args(f.encrypt_args(d)).arg(d.join("plain.raw")).arg(m.dir.join("enc.img")));
        run(cli().arg("decrypt").args(f.decrypt_args(d)).arg(m.dir.join("enc.img")).arg(d.join("back2.raw")));
        assert!(std::fs::read(d.join("back2.raw")).unwrap() == want, "{f:?}: encrypt onto a sync mount");
    }
}

#[test]
fn luks1_round_trip_of_37_mib_is_byte_exact() {
    round_trip(Format::Luks1);
}

#[test]
fn luks2_round_trip_of_37_mib_is_byte_exact() {
    round_trip(Format::Luks2);
}

#[test]
fn plain_round_trip_of_37_mib_is_byte_exact() {
    round_trip(Format::Plain);
}

#[test]
fn authenticated_round_trip_of_37_mib_is_byte_exact() {
    round_trip(Format::Authenticated);
}

#[test]
fn a_full_file_system_fails_the_command_and_leaves_nothing() {
    let dir = scratch();
    let d = dir.path();
    make_image(d, Format::Luks2, BIG, 20);
    let Some(m) = Mount::ext4(d, 16, "sync") else { return };
    let before = files_in(&m.dir);
    let e = fails(
        cli()
            .arg("decrypt")
            .args(Format::Luks2.decrypt_args(d))
            .arg(d.join("enc.img"))
            .arg(m.dir.join("out")),
    );
    assert!(e.contains("No space left on device"), "{e}");
    assert_eq!(files_in(&m.dir), before, "nothing of a failed decrypt is left");
    let e = fails(
        cli()
            .arg("encrypt")
            .args(Format::Luks2.encrypt_args(d))
            .arg(d.join("plain.raw"))
            .arg(m.dir.join("enc")),
    );
    assert!(e.contains("No space left on device"), "{e}");
    assert_eq!(files_in(&m.dir), before, "nothing of a failed encrypt is left");
}

#[test]
fn an_output_that_is_the_input_is_refused_by_any_path() {
    let dir = scratch();
    let d = dir.path();
    make_image(d, Format::Luks2, 1 << 20, 30);
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink(d.join("enc.img"), d.join("link.img")).unwrap();
    std::fs::hard_link(d.join("enc.img"), d.join("hard.img")).unwrap();
    std::os::unix::fs::symlink(d.join("plain.raw"), d.join("link.raw")).unwrap();
    let image = std::fs::read(d.join("enc.img")).unwrap();
    let plain = std::fs::read(d.join("plain.raw")).unwrap();
    let files = files_in(d);
    for out in [
        d.join("enc.img"),
        d.join("sub").join("..").join("enc.img"),
        d.join(".").join("enc.img"),
        d.join("link.img"),
        d.join("hard.img"),
    ] {
        let e =
            fails(cli().arg("decrypt").args(Format::Luks2.decrypt_args(d)).arg(d.join("enc.img")).arg(&out));
        assert!(e.contains("is the input"), "decrypt into {}: {e}", out.display());
        assert!(std::fs::read(d.join("enc.img")).unwrap() == image, "decrypt into {}", out.display());
    }
    for out in [d.join("plain.raw"), d.join("link.raw"), d.join("sub/../plain.raw")] {
        let e = fails(
            cli().arg("encrypt").args(Format::Luks2.encrypt_args(d)).arg(d.join("plain.raw")).arg(&out),
        );
        assert!(e.contains("is the input"), "encrypt into {}: {e}", out.display());
        assert!(std::fs::read(d.join("plain.raw")).unwrap() == plain, "encrypt into {}", out.display());
    }
    assert_eq!(files_in(d), files, "no output or temporary file appeared");
    assert!(std::fs::symlink_metadata(d.join("link.img")).unwrap().file_type().is_symlink());
}

#[test]
fn block_devices_are_read_and_written_in_place() {
    let dir = scratch();
    let d = dir.path();
    let len = (9 << 20) + 3 * 512 + 7;
    let want = make_image(d, Format::Luks2, len, 40);
    let Some(input) = Loop::over(&d.join("enc.img")) else { return };

    // A device as input reads as the device, not as an empty file.
    run(cli().arg("decrypt").args(Format::Luks2.decrypt_args(d)).arg(&input.dev).arg(d.join("back.raw")));
    assert!(std::fs::read(d.join("back.raw")).unwrap() == want, "decrypting a device");

    // A device as output is written in place: the rest of it stays, the node stays a device.
    let spare = 1 << 20;
    std::fs::write(d.join("out.back"), vec![0xeeu8; want.len() + spare]).unwrap();
    {
        let Some(out) = Loop::over(&d.join("out.back")) else { return };
        run(cli().arg("decrypt").args(Format::Luks2.decrypt_args(d)).arg(d.join("enc.img")).arg(&out.dev));
        assert!(std::fs::metadata(&out.dev).unwrap().file_type().is_block_device(), "still a device");
    }
    let back = std::fs::read(d.join("out.back")).unwrap();
    assert_eq!(back.len(), want.len() + spare);
    assert!(back[..want.len()] == want[..], "the device holds the plaintext");
    assert!(back[want.len()..].iter().all(|&b| b == 0xee), "the rest of the device is untouched");

    // A device too small is refused before anything is written.
    std::fs::write(d.join("small.back"), vec![0x11u8; 4 << 20]).unwrap();
    {
        let Some(small) = Loop::over(&d.join("small.back")) else { return };
        let e = fails(
            cli().arg("decrypt").args(Format::Luks2.decrypt_args(d)).arg(d.join("enc.img")).arg(&small.dev),
        );
        assert!(e.contains("too small"), "{e}");
        let e = fails(
            cli().arg("encrypt").args(Format::Luks2.encrypt_args(d)).arg(d.join("plain.raw")).arg(&small.dev),
        );
        assert!(e.contains("too small"), "{e}");
        assert!(std::fs::metadata(&small.dev).unwrap().file_type().is_block_device());
    }
    assert!(
        std::fs::read(d.join("small.back")).unwrap().iter().all(|&b| b == 0x11),
        "small device untouched"
    );

    // Encrypting onto a device and decrypting it back.
    std::fs::write(d.join("enc.back"), vec![0u8; (16 << 20) + want.len()]).unwrap();
    {
        let Some(enc) = Loop::over(&d.join("enc.back")) else { return };
        run(cli().arg("encrypt").args(Format::Luks2.encrypt_args(d)).arg(d.join("plain.raw")).arg(&enc.dev));
        assert!(std::fs::metadata(&enc.dev).unwrap().file_type().is_block_device());
        run(cli().arg("decrypt").args(Format::Luks2.decrypt_args(d)).arg(&enc.dev).arg(d.join("back2.raw")));
        let got = std::fs::read(d.join("back2.raw")).unwrap();
        assert!(got.len() >= want.len() && got[..want.len()] == want[..], "encrypted onto a device");
        // And a plain file encrypted from a device input.
        run(cli().arg("encrypt").args(Format::Plain.encrypt_args(d)).arg(&input.dev).arg(d.join("p.img")));
        run(cli()
            .arg("decrypt")
            .args(Format::Plain.decrypt_args(d))
            .arg(d.join("p.img"))
            .arg(d.join("p.raw")));
        assert!(std::fs::read(d.join("p.raw")).unwrap() == std::fs::read(d.join("enc.img")).unwrap());
    }
}

/// `chattr +i` on a file, undone when dropped.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn a_failed_decrypt_leaves_no_plaintext_and_outputs_are_private() {
    let dir = scratch();
    let d = dir.path();
    make_image(d, Format::Luks2, BIG, 50);
    let dec = |out: &Path| {
        let mut c = cli();
        c.arg("decrypt").args(Format::Luks2.decrypt_args(d)).arg(d.join("enc.img")).arg(out);
        c
    };

    // A new output is readable by its owner only; an existing one keeps its mode.
    run(&mut dec(&d.join("new.raw")));
    assert_eq!(mode(&d.join("new.raw")), 0o600, "a new plaintext output is private");
    std::fs::write(d.join("old.raw"), "old").unwrap();
    std::fs::set_permissions(d.join("old.raw"), std::fs::Permissions::from_mode(0o640)).unwrap();
    run(&mut dec(&d.join("old.raw")));
    assert_eq!(mode(&d.join("old.raw")), 0o640, "an existing output keeps its mode");
    std::fs::remove_file(d.join("new.raw")).unwrap();
    std::fs::remove_file(d.join("old.raw")).unwrap();
    let files = files_in(d);

    // The output is a directory.
    std::fs::create_dir(d.join("outdir")).unwrap();
    let e = fails(&mut dec(&d.join("outdir")));
    assert!(e.contains("is a directory"), "{e}");
    assert!(files_in(&d.join("outdir")).is_empty());
    std::fs::remove_dir(d.join("outdir")).unwrap();
    assert_eq!(files_in(d), files, "nothing left beside a directory output");

    // The output is immutable: the finished plaintext cannot be renamed over it.
    std::fs::write(d.join("locked.raw"), "locked").unwrap();
    let ok = Command::new("chattr").arg("+i").arg(d.join("locked.raw")).status();
    if !matches!(&ok, Ok(s) if s.success()) {
        eprintln!("SKIPPED (immutable part): chattr +i failed here: {ok:?}");
        return;
    }
    let guard = Immutable(d.join("locked.raw"));
    let e = fails(&mut dec(&d.join("locked.raw")));
    assert!(e.contains("locked.raw"), "{e}");
    assert_eq!(std::fs::read(d.join("locked.raw")).unwrap(), b"locked");
    drop(guard);
    std::fs::remove_file(d.join("locked.raw")).unwrap();
    assert_eq!(files_in(d), files, "no temporary plaintext is left after a failed rename");
}

/// Kills a running decrypt with `signal` once part of the plaintext is written; the temporary
/// file must be private while it exists and gone after, and the exit status must say the
/// process was interrupted.
fn interrupted(signal: i32) {
    let dir = scratch();
    let d = dir.path();
    make_image(d, Format::Luks2, 12 << 20, 60);
    let files = files_in(d);
    let mut child = cli()
        .args(["decrypt", "--device", "emulated", "--device-latency", "50ms"])
        .args(Format::Luks2.decrypt_args(d))
        .arg(d.join("enc.img"))
        .arg(d.join("out.raw"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let temp = loop {
        let found = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| !files.contains(&p.file_name().unwrap().to_string_lossy().into_owned()));
        if let Some(p) = found {
            if std::fs::metadata(&p).map(|m| m.len() >= 4 << 20).unwrap_or(false) {
                break p;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "decrypt ended before it could be interrupted");
        assert!(start.elapsed() < Duration::from_secs(60), "no plaintext appeared within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(mode(&temp), 0o600, "the temporary plaintext {} is private", temp.display());
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let status = child.wait().unwrap();
    assert!(
        status.signal() == Some(signal) || status.code() == Some(128 + signal),
        "signal {signal}: exit status {status} does not say it was interrupted"
    );
    assert_eq!(files_in(d), files, "signal {signal}: the temporary plaintext is removed");
}

#[test]
fn sigint_during_decrypt_removes_the_temporary_plaintext() {
    interrupted(libc::SIGINT);
}

#[test]
fn sigterm_during_decrypt_removes_the_temporary_plaintext() {
    interrupted(libc::SIGTERM);
}

#[test]
fn sighup_during_decrypt_removes_the_temporary_plaintext() {
    interrupted(libc::SIGHUP);
}

#[test]
fn the_null_device_is_refused_by_every_block_command() {
    let dir = scratch();
    let d = dir.path();
    make_image(d, Format::Luks1, 1 << 20, 70);
    let image = std::fs::read(d.join("enc.img")).unwrap();
    let files = files_in(d);
    let commands: Vec<Vec<String>> = vec![
        [
            vec!["encrypt".into()],
            Format::Luks1.encrypt_args(d),
            vec![d.join("plain.raw").display().to_string(), d.join("o").display().to_string()],
        ]
        .concat(),
        [
            vec!["decrypt".into()],
            Format::Luks1.decrypt_args(d),
            vec![d.join("enc.img").display().to_string(), d.join("o").display().to_string()],
        ]
        .concat(),
        [
            vec!["format".into(), "--type".into(), "luks1".into(), "--size".into(), "1048576".into()],
            Format::Luks1.decrypt_args(d),
            vec![d.join("o").display().to_string()],
        ]
        .concat(),
        [
            vec![
                "add-key".into(),
                "--pbkdf-force-iterations".into(),
                "1000".into(),
                "--new-key-file".into(),
                d.join("vk").display().to_string(),
            ],
            Format::Luks1.decrypt_args(d),
            vec![d.join("enc.img").display().to_string()],
        ]
        .concat(),
        [
            vec!["remove-key".into()],
            Format::Luks1.decrypt_args(d),
            vec![d.join("enc.img").display().to_string()],
        ]
        .concat(),
    ];
    for args in commands {
        let e = fails(cli().args(&args).arg("--device-null"));
        assert!(e.contains("--device-null") && e.contains("bench"), "{args:?}: {e}");
        assert_eq!(files_in(d), files, "{args:?} wrote nothing");
        assert!(std::fs::read(d.join("enc.img")).unwrap() == image, "{args:?} changed the image");
    }
}

/// Runs the CLI with `input` on standard input; returns whether it succeeded, and stderr.
fn with_stdin(cmd: &mut Command, input: &[u8]) -> (bool, String) {
    let mut child = cmd.stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The command may refuse before reading: a broken pipe here is then expected.
    let _ = child.stdin.take().unwrap().write_all(input);
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn key_files_are_bounded_and_standard_input_is_read_whole() {
    let dir = scratch();
    let d = dir.path();
    std::fs::write(d.join("plain.raw"), pattern(1 << 20, 80)).unwrap();
    let enc = |key: &Path, out: &str| {
        let mut c = cli();
        c.args([
            "encrypt",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
        ])
        .arg(key)
        .arg(d.join("plain.raw"))
        .arg(d.join(out));
        c
    };
    // cryptsetup reads at most 8192 KiB of a key file: exactly that much is a key, one byte more
    // is refused.
    std::fs::write(d.join("max.key"), pattern(8192 << 10, 81)).unwrap();
    run(&mut enc(&d.join("max.key"), "max.img"));
    run(cli()
        .args(["decrypt", "--key-file"])
        .arg(d.join("max.key"))
        .arg(d.join("max.img"))
        .arg(d.join("max.raw")));
    std::fs::write(d.join("big.key"), pattern((8192 << 10) + 1, 82)).unwrap();
    let e = fails(&mut enc(&d.join("big.key"), "big.img"));
    assert!(e.contains("8192 KiB"), "{e}");
    assert!(!d.join("big.img").exists());
    // /dev/zero never ends: refused after 8 MiB, within a memory limit the unbounded read breaks.
    let mut c = cli();
    c.args(["decrypt", "--key-file", "/dev/zero"]).arg(d.join("max.img")).arg(d.join("zero.raw"));
    // SAFETY: setrlimit in the child between fork and exec touches no shared state.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 2 << 30, rlim_max: 2 << 30 };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let e = fails(&mut c);
    assert!(e.contains("8192 KiB") && e.contains("/dev/zero"), "{e}");
    assert!(!d.join("zero.raw").exists());

    // `--key-file -` reads standard input whole, a trailing newline included, as cryptsetup does:
    // a passphrase piped with a newline is the same key as a file holding the same bytes.
    std::fs::write(d.join("nl.key"), "pw\n").unwrap();
    let (ok, e) = with_stdin(&mut enc(Path::new("-"), "nl.img"), b"pw\n");
    assert!(ok, "{e}");
    run(cli()
        .args(["decrypt", "--key-file"])
        .arg(d.join("nl.key"))
        .arg(d.join("nl.img"))
        .arg(d.join("nl.raw")));
    std::fs::write(d.join("no-nl.key"), "pw").unwrap();
    let e = fails(
        cli().args(["decrypt", "--key-file"]).arg(d.join("no-nl.key")).arg(d.join("nl.img")).arg(d.join("x")),
    );
    assert!(e.contains("wrong passphrase"), "{e}");

    if !have("cryptsetup") {
        return;
    }
    // cryptsetup opens what we made from standard input, and we open what it made.
    let mut c = Command::new(tool("cryptsetup"));
    c.args(["luksOpen", "--test-passphrase", "--key-file", "-"]).arg(d.join("nl.img"));
    let (ok, e) = with_stdin(&mut c, b"pw\n");
    assert!(ok, "cryptsetup does not open our image with the same standard input: {e}");
    std::fs::File::create(d.join("cs.img")).unwrap().set_len(20 << 20).unwrap();
    let mut c = Command::new(tool("cryptsetup"));
    c.args(["luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
        .args(["--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1m", "--key-file", "-"])
        .arg(d.join("cs.img"));
    let (ok, e) = with_stdin(&mut c, b"pw\n");
    assert!(ok, "cryptsetup luksFormat: {e}");
    let mut c = cli();
    c.args(["decrypt", "--key-file", "-"]).arg(d.join("cs.img")).arg(d.join("cs.raw"));
    let (ok, e) = with_stdin(&mut c, b"pw\n");
    assert!(ok, "our decrypt does not open cryptsetup's image with the same standard input: {e}");
}

#[test]
fn numbers_out_of_range_get_a_clear_error_and_write_nothing() {
    let dir = scratch();
    let d = dir.path();
    make_image(d, Format::Luks1, 1 << 20, 90);
    let image = std::fs::read(d.join("enc.img")).unwrap();
    let files = files_in(d);
    let p = |name: &str| d.join(name).display().to_string();
    // A command line: the words, then the paths (`@name` is a file in the scratch directory).
    let line = |words: &[&str], format: Option<(Format, bool)>| -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for w in words {
            v.push(w.strip_prefix('@').map_or_else(|| w.to_string(), p));
        }
        if let Some((f, encrypt)) = format {
            let (args, io) = if encrypt {
                (f.encrypt_args(d), [p("plain.raw"), p("o")])
            } else {
                (f.decrypt_args(d), [p("enc.img"), p("o")])
            };
            v.extend(args);
            v.extend(io);
        }
        v
    };
    let luks1_key = ["--key-file", "@pass", "@plain.raw", "@o"];
    let with = |head: &[&str], tail: &[&str]| line(&[head, tail].concat(), None);
    let format_size = |size: &str| {
        with(
            &["format", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--size", size],
            &["--key-file", "@pass", "@o"],
        )
    };
    let mut cases: Vec<(Vec<String>, &str)> = vec![
        (line(&["encrypt", "--sector-size", "0"], Some((Format::Luks2, true))), "sector size"),
        (line(&["encrypt", "--sector-size", "1000"], Some((Format::Plain, true))), "sector size"),
        (
            with(
                &["encrypt", "--type", "authenticated", "--sector-size", "8192"],
                &["--volume-key-file", "@vk", "@plain.raw", "@o"],
            ),
            "sector size",
        ),
        (line(&["decrypt", "--sector-size", "0"], Some((Format::Plain, false))), "sector size"),
        (line(&["encrypt", "--offset", "36028797018963969"], Some((Format::Plain, true))), "--offset"),
        (line(&["decrypt", "--offset", "36028797018963969"], Some((Format::Plain, false))), "--offset"),
        (format_size("9223372036854775808"), "--size"),
        (format_size("18446744073709551104"), "--size"),
        (format_size("4611686018427387904"), "--size"),
        (with(&["encrypt", "--type", "luks1", "--pbkdf-force-iterations", "0"], &luks1_key), "1000"),
        (
            with(
                &["encrypt", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "999"],
                &luks1_key,
            ),
            "1000",
        ),
        (
            with(
                &["encrypt", "--type", "luks2", "--pbkdf", "argon2id", "--pbkdf-force-iterations", "3"],
                &[&["--pbkdf-memory", "8192"][..], &luks1_key].concat(),
            ),
            "4",
        ),
        (with(&["encrypt", "--type", "luks2", "--pbkdf-memory", "0"], &luks1_key), "pbkdf-memory"),
        (with(&["encrypt", "--type", "luks2", "--pbkdf-parallel", "0"], &luks1_key), "pbkdf-parallel"),
        (with(&["encrypt", "--type", "luks2", "--pbkdf-parallel", "5"], &luks1_key), "pbkdf-parallel"),
        (with(&["encrypt", "--type", "luks1", "--iter-time", "0"], &luks1_key), "iter-time"),
        (
            with(
                &["add-key", "--pbkdf-force-iterations", "0", "--new-key-file", "@vk"],
                &["--key-file", "@pass", "@enc.img"],
            ),
            "1000",
        ),
    ];
    for (flag, value) in [("--device-workers", "0"), ("--device-queue-size", "3"), ("--device-queues", "0")] {
        cases.push((line(&["encrypt", flag, value], Some((Format::Plain, true))), flag));
    }
    for (args, needle) in cases {
        let e = fails(cli().args(&args));
        assert!(e.contains(needle), "{args:?}: `{needle}` not in: {e}");
        assert_eq!(files_in(d), files, "{args:?} left a file");
        assert!(std::fs::read(d.join("enc.img")).unwrap() == image, "{args:?} changed the image");
    }
}

#[test]
fn a_finished_output_is_flushed_renamed_and_its_directory_flushed() {
    let dir = scratch();
    let d = dir.path();
    make_image(d, Format::Luks2, 1 << 20, 95);
    let log = d.join("strace.log");
    let traced = Command::new("strace")
        .args(["-f", "-e", "trace=openat,rename,renameat,renameat2,fsync,fdatasync", "-o"])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_crypt-vfio"))
        .arg("decrypt")
        .args(Format::Luks2.decrypt_args(d))
        .arg(d.join("enc.img"))
        .arg(d.join("out.raw"))
        .output();
    match &traced {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("SKIPPED: strace cannot trace the command here: {other:?}");
            return;
        }
    }
    let log = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let fd_of = |line: &str| line.rsplit_once("= ").and_then(|(_, fd)| fd.trim().parse::<i32>().ok());
    let temp = lines.iter().position(|l| l.contains("openat(") && l.contains(".out.raw.crypt-vfio-"));
    let temp = temp.unwrap_or_else(|| panic!("no temporary file opened:\n{log}"));
    let temp_fd = fd_of(lines[temp]).unwrap();
    let out = d.join("out.raw").display().to_string();
    let rename = lines.iter().position(|l| l.contains("rename") && l.contains(&format!("\"{out}\"")));
    let rename = rename.unwrap_or_else(|| panic!("no rename to {out}:\n{log}"));
    assert!(
        lines[temp..rename].iter().any(|l| l.contains(&format!("fsync({temp_fd})"))),
        "the temporary file is not flushed before the rename:\n{log}"
    );
    let dir_name = format!("\"{}\"", d.display());
    let dir_open = lines[rename..].iter().position(|l| l.contains("openat(") && l.contains(&dir_name));
    let dir_open =
        rename + dir_open.unwrap_or_else(|| panic!("the directory is not opened after the rename:\n{log}"));
    let dir_fd = fd_of(lines[dir_open]).unwrap();
    assert!(
        lines[dir_open..].iter().any(|l| l.contains(&format!("fsync({dir_fd})"))),
        "the directory is not flushed after the rename:\n{log}"
    );
}

/// A mounted file system on a block device is never overwritten: the output device is claimed
/// with O_EXCL, which the kernel refuses while the device is mounted (also when the input lives
/// on that very file system).
#[test]
fn a_mounted_block_device_is_refused_as_output() {
    let dir = scratch();
    let d = dir.path();
    make_image(d, Format::Luks2, 1 << 20, 41);
    std::fs::File::create(d.join("fs.back")).unwrap().set_len(32 << 20).unwrap();
    let Some(dev) = Loop::over(&d.join("fs.back")) else { return };
    let mkfs = Command::new(tool("mkfs.ext4")).args(["-q", "-F"]).arg(&dev.dev).output();
    if !matches!(&mkfs, Ok(o) if o.status.success()) {
        eprintln!("SKIPPED: mkfs.ext4 failed or is missing: {mkfs:?}");
        return;
    }
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount").arg(&dev.dev).arg(&mnt).output();
    if !matches!(&mounted, Ok(o) if o.status.success()) {
        eprintln!("SKIPPED: mounting a loop device is not allowed here: {mounted:?}");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let guard = Unmount(mnt.clone());
    std::fs::write(mnt.join("keep.txt"), b"still here").unwrap();
    std::fs::copy(d.join("enc.img"), mnt.join("enc.img")).unwrap();
    let _ = Command::new("sync").status();

    for input in [d.join("enc.img"), mnt.join("enc.img")] {
        let err = fails(cli().arg("decrypt").args(Format::Luks2.decrypt_args(d)).arg(&input).arg(&dev.dev));
        assert!(err.contains("is in use"), "{}: {err}", input.display());
    }
    let err = fails(
        cli().arg("encrypt").args(Format::Luks2.encrypt_args(d)).arg(d.join("plain.raw")).arg(&dev.dev),
    );
    assert!(err.contains("is in use"), "{err}");

    // The file system is intact: unmount, mount again, read the file back.
    drop(guard);
    let again = Command::new("mount").arg(&dev.dev).arg(&mnt).status().unwrap();
    assert!(again.success(), "the file system no longer mounts");
    let guard = Unmount(mnt.clone());
    assert_eq!(std::fs::read(mnt.join("keep.txt")).unwrap(), b"still here");
    drop(guard);
}

/// An output that is a symbolic link to a missing file is refused: the rename would replace the
/// link, not create the file it names.
#[test]
fn a_dangling_symlink_output_is_refused_and_kept() {
    let dir = scratch();
    let d = dir.path();
    make_image(d, Format::Luks2, 64 << 10, 42);
    std::os::unix::fs::symlink(d.join("missing/out.raw"), d.join("link.raw")).unwrap();
    let err = fails(
        cli()
            .arg("decrypt")
            .args(Format::Luks2.decrypt_args(d))
            .arg(d.join("enc.img"))
            .arg(d.join("link.raw")),
    );
    assert!(err.contains("symbolic link") && err.contains("does not exist"), "{err}");
    assert!(std::fs::symlink_metadata(d.join("link.raw")).unwrap().file_type().is_symlink());
}
