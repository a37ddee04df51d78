//! Two key slot updates of one image at the same time, as two processes and as two threads:
//! neither may undo the other. Two `remove-key` on a two-slot volume: exactly one succeeds and
//! the other passphrase still opens; two `add-key`: two different slots, every passphrase opens.

mod common;
mod support;

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Barrier};

use crypt_vfio::luks::{self, FormatOptions, LuksKdfOptions, LuksVersion};
use support::scratch;

const ROUNDS: usize = 20;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
}

/// A LUKS image with `passes` in slots 0, 1, ... (cheap PBKDF2).
fn image(path: &Path, version: LuksVersion, passes: &[&[u8]]) {
    let mut opts = FormatOptions::new(version);
    opts.kdf = LuksKdfOptions::pbkdf2_iterations(1000);
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
    f.set_len(opts.data_offset() + 4096).unwrap();
    let engine = common::device();
    luks::format(&engine, &f, &opts, passes[0], None).unwrap();
    let mut h = luks::Header::read(&f).unwrap();
    for p in &passes[1..] {
        h.add_passphrase(&engine, &f, passes[0], p, &opts.kdf).unwrap();
    }
}

/// Which of `passes` open the image now.
fn opening(path: &Path, passes: &[&[u8]]) -> Vec<bool> {
    let f = File::open(path).unwrap();
    let h = luks::Header::read(&f).unwrap();
    let engine = common::device();
    passes.iter().map(|p| h.unlock(&engine, &f, p).is_ok()).collect()
}

fn both(a: &mut Command, b: &mut Command) -> (Output, Output) {
    let ca = a.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let cb = b.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    (ca.wait_with_output().unwrap(), cb.wait_with_output().unwrap())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn version(round: usize) -> LuksVersion {
    if round % 2 == 0 {
        LuksVersion::Luks1
    } else {
        LuksVersion::Luks2
    }
}

#[test]
fn two_remove_key_processes_at_once_leave_one_passphrase() {
    let dir = scratch();
    let d = dir.path();
    std::fs::write(d.join("a"), "passphrase a").unwrap();
    std::fs::write(d.join("b"), "passphrase b").unwrap();
    for round in 0..ROUNDS {
        let img = d.join("v.img");
        image(&img, version(round), &[b"passphrase a", b"passphrase b"]);
        let rm = |pass: &str| {
            let mut c = cli();
            c.args(["remove-key", "--key-file"]).arg(d.join(pass)).arg(&img);
            c
        };
        let (oa, ob) = both(&mut rm("a"), &mut rm("b"));
        let ok = [oa.status.success(), ob.status.success()];
        assert_eq!(
            ok.iter().filter(|&&s| s).count(),
            1,
            "round {round}: exactly one removal succeeds: {ok:?}\n{}\n{}",
            stderr(&oa),
            stderr(&ob)
        );
        let failed = if ok[0] { &ob } else { &oa };
        assert!(stderr(failed).contains("last one"), "round {round}: {}", stderr(failed));
        let open = opening(&img, &[b"passphrase a", b"passphrase b"]);
        assert_eq!(open, [!ok[0], !ok[1]], "round {round}: the passphrase not removed opens");
    }
}

#[test]
fn two_add_key_processes_at_once_fill_two_slots() {
    let dir = scratch();
    let d = dir.path();
    std::fs::write(d.join("p0"), "first").unwrap();
    std::fs::write(d.join("p1"), "second").unwrap();
    std::fs::write(d.join("p2"), "third").unwrap();
    for round in 0..ROUNDS {
        let img = d.join("v.img");
        image(&img, version(round), &[b"first"]);
        let add = |new: &str| {
            let mut c = cli();
            c.args(["add-key", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file"])
                .arg(d.join("p0"))
                .arg("--new-key-file")
                .arg(d.join(new))
                .arg(&img);
            c
        };
        let (o1, o2) = both(&mut add("p1"), &mut add("p2"));
        assert!(o1.status.success() && o2.status.success(), "{}\n{}", stderr(&o1), stderr(&o2));
        assert_ne!(stderr(&o1), stderr(&o2), "round {round}: two different slots");
        assert_eq!(opening(&img, &[b"first", b"second", b"third"]), [true; 3], "round {round}");
    }
}

#[test]
fn two_threads_removing_at_once_leave_one_passphrase() {
    let dir = scratch();
    for round in 0..ROUNDS {
        let img = dir.path().join("v.img");
        image(&img, version(round), &[b"passphrase a", b"passphrase b"]);
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = [b"passphrase a", b"passphrase b"]
            .into_iter()
            .map(|pass| {
                let (img, barrier) = (img.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let engine = common::device();
                    // Each thread its own open file, as two programs would have.
                    let f = OpenOptions::new().read(true).write(true).open(&img).unwrap();
                    let mut h = luks::Header::read(&f).unwrap();
                    barrier.wait();
                    h.remove_passphrase(&engine, &f, pass).is_ok()
                })
            })
            .collect();
        let ok: Vec<bool> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(ok.iter().filter(|&&s| s).count(), 1, "round {round}: {ok:?}");
        let open = opening(&img, &[b"passphrase a", b"passphrase b"]);
        assert_eq!(open, [!ok[0], !ok[1]], "round {round}");
    }
}

#[test]
fn two_threads_adding_at_once_fill_two_slots() {
    let dir = scratch();
    for round in 0..ROUNDS {
        let img = dir.path().join("v.img");
        image(&img, version(round), &[b"first"]);
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = [&b"second"[..], &b"third"[..]]
            .into_iter()
            .map(|new| {
                let (img, barrier) = (img.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let engine = common::device();
                    let f = OpenOptions::new().read(true).write(true).open(&img).unwrap();
                    let mut h = luks::Header::read(&f).unwrap();
                    barrier.wait();
                    let kdf = LuksKdfOptions::pbkdf2_iterations(1000);
                    h.add_passphrase(&engine, &f, b"first", new, &kdf).unwrap()
                })
            })
            .collect();
        let slots: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_ne!(slots[0], slots[1], "round {round}");
        assert_eq!(opening(&img, &[b"first", b"second", b"third"]), [true; 3], "round {round}");
    }
}
