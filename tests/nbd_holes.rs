//! Trim and block status through `crypt-vfio serve` of encrypted volumes, seen by qemu-img,
//! qemu-io and nbdinfo: a sparse image's holes are reported as holes and read as zeroes (not
//! as decrypted zero bytes), a discard punches holes that `nbdinfo --map` and `qemu-img map`
//! then show, and the data read back is exact. On an authenticated volume trimmed sectors stay
//! authenticated.

mod support;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use support::{have, run, scratch, start_server};

struct Served {
    child: Child,
    uri: String,
}

impl Served {
    fn start(image: &Path, key_file: &Path, log: &Path) -> Served {
        Self::start_with(image, key_file, log, &[])
    }

    fn start_with(image: &Path, key_file: &Path, log: &Path, extra: &[&str]) -> Served {
        let (child, uri) = start_server(
            Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
                .args(["serve", "--listen", "127.0.0.1:0", "--export", "vol"])
                .args(extra)
                .arg("--key-file")
                .arg(key_file)
                .arg(image)
                .stderr(std::fs::File::create(log).unwrap()),
            Duration::from_secs(30),
        );
        Served { child, uri }
    }

    /// SIGTERM and wait: the server flushes before it exits.
    fn stop(mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nbdinfo --map` as (offset, length, description) rows.
fn nbd_map(uri: &str) -> Vec<(u64, u64, String)> {
    let out = String::from_utf8(run(Command::new("nbdinfo").args(["--map", uri]))).unwrap();
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[3..].join(" "))
        })
        .collect()
}

/// Whether `[start, end)` is inside one row of `map` described as `what`.
fn covered(map: &[(u64, u64, String)], start: u64, end: u64, what: &str) -> bool {
    map.iter().any(|(o, l, d)| *o <= start && o + l >= end && d == what)
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = String::from_utf8(run(c.arg(uri))).unwrap();
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

fn qemu_read(uri: &str, to: &Path) -> Vec<u8> {
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", uri]).arg(to));
    std::fs::read(to).unwrap()
}

/// An 8 MiB LUKS2 image made by qemu-img (sparse: its data area is one hole), passphrase in
/// `dir/pass`.
fn sparse_luks(d: &Path) -> std::path::PathBuf {
    std::fs::write(d.join("pass"), "hole punch").unwrap();
    let img = d.join("vol.luks");
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        "secret,id=s0,data=hole punch",
        "-o",
        "key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=10",
        img.to_str().unwrap(),
        "8M",
    ]));
    img
}

/// Whether the image has a hole in `[start, end)` (`SEEK_HOLE`).
fn has_hole(img: &Path, start: u64, end: u64) -> bool {
    let f = std::fs::File::open(img).unwrap();
    rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(start)).unwrap() < end
}

#[test]
fn without_allow_discards_a_luks_export_punches_no_holes() {
    if !have("qemu-img") || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let img = sparse_luks(d);
    let served = Served::start(&img, &d.join("pass"), &d.join("log"));
    const M: u64 = 1 << 20;
    // The LUKS2 header takes the first 16 MiB of the file; the data area follows it.
    let data = std::fs::metadata(&img).unwrap().len() - 8 * M;
    qemu_io(&served.uri, &["write -P 0xcd 0 4M"]);
    assert!(!has_hole(&img, data, data + 4 * M));
    // A discard is accepted and changes nothing; a zeroing that may unmap writes zeroes.
    qemu_io(&served.uri, &["discard 1M 1M", "read -P 0xcd 1M 1M", "write -z -u 2M 1M", "read -P 0 2M 1M"]);
    assert!(!has_hole(&img, data, data + 4 * M), "a hole was punched without --allow-discards");
    let map = nbd_map(&served.uri);
    assert!(covered(&map, 0, 4 * M, "data"), "{map:?}");
    served.stop();
}

#[test]
fn a_sparse_luks_volume_reads_zeroes_and_discard_punches_holes_clients_see() {
    if !have("qemu-img") || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let img = sparse_luks(d);
    let served = Served::start_with(&img, &d.join("pass"), &d.join("log"), &["--allow-discards"]);
    const M: u64 = 1 << 20;

    // A fresh qemu-img image is sparse: all of it is a hole, and it reads as zeroes.
    assert_eq!(nbd_map(&served.uri), vec![(0, 8 * M, "hole,zero".to_string())]);
    // A sector written into a hole: its neighbours in the same filesystem block still read
    // as zeroes (the rest of the block is written with encrypted zeroes).
    qemu_io(&served.uri, &["write -P 0xab 4096 512", "read -P 0 0 4096", "read -P 0 4608 3584"]);
    qemu_io(&served.uri, &["write -P 0xcd 1M 2M"]);
    let allocated = std::fs::metadata(&img).unwrap().blocks();
    qemu_io(&served.uri, &["discard 1M 1M", "read -P 0 1M 1M", "read -P 0xcd 2M 1M"]);
    assert!(std::fs::metadata(&img).unwrap().blocks() < allocated, "the discard freed no space");

    // Write-zeroes, even one that may unmap (no NBD_CMD_FLAG_NO_HOLE), writes encrypted
    // zeroes: dm-crypt would read a hole as garbage.
    qemu_io(
        &served.uri,
        &["write -z -u 2M 512k", "write -z 2560k 256k", "read -P 0 2M 768k", "read -P 0xcd 2816k 256k"],
    );
    let map = nbd_map(&served.uri);
    assert!(covered(&map, M, 2 * M, "hole,zero"), "{map:?}");
    assert!(covered(&map, 2 * M, 3 * M, "data"), "{map:?}");
    assert!(covered(&map, 4096, 4608, "data"), "{map:?}");
    assert!(covered(&map, 3 * M, 8 * M, "hole,zero"), "{map:?}");

    // qemu-img map sees the same: [1M, 2M) is zero and holds no data.
    let json = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &served.uri]));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&json).unwrap();
    let hole = rows.iter().any(|r| {
        let (start, len) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        start <= M && start + len >= 2 * M && r["zero"] == true && r["data"] == false
    });
    assert!(hole, "{}", String::from_utf8_lossy(&json));

    let mut expected = vec![0u8; 8 << 20];
    expected[4096..4608].fill(0xab);
    expected[2816 << 10..3 << 20].fill(0xcd);
    assert!(qemu_read(&served.uri, &d.join("out.raw")) == expected, "the export reads different data");
    served.stop();
    let log = std::fs::read_to_string(d.join("log")).unwrap();
    assert!(log.contains("without any TLS"), "no warning about plaintext over TCP: {log}");
}

#[test]
fn trimmed_authenticated_sectors_read_as_zeroes_and_stay_authenticated() {
    if !have("qemu-io") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    std::fs::write(d.join("vk"), [0x5au8; 32]).unwrap();
    let img = d.join("auth.img");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    run(Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
        .args(["format", "--type", "authenticated", "--sector-size", "512", "--volume-key-file"])
        .arg(d.join("vk"))
        .arg(&img));
    // Formatting leaves the data area sparse: the metadata area (32 bytes a sector) and the
    // superblock are all that is written.
    assert!(std::fs::metadata(&img).unwrap().blocks() * 512 < 1 << 20, "the format wrote the data area");

    let served = Served::start(&img, &d.join("vk"), &d.join("log"));
    let map = nbd_map(&served.uri);
    assert_eq!(map.len(), 1, "{map:?}");
    assert_eq!(map[0].2, "hole,zero");
    let size = map[0].1;
    qemu_io(
        &served.uri,
        &["write -P 0x77 0 2M", "discard 512k 512k", "read -P 0 512k 512k", "read -P 0x77 1M 1M"],
    );
    // A trim of part of a sector leaves that sector alone.
    qemu_io(
        &served.uri,
        &["discard 100 1000", "read -P 0x77 0 512", "read -P 0 512 512", "read -P 0x77 1024 1024"],
    );
    let map = nbd_map(&served.uri);
    assert!(covered(&map, 512 << 10, 1 << 20, "hole,zero"), "{map:?}");
    assert!(covered(&map, 1 << 20, 2 << 20, "data"), "{map:?}");
    assert!(covered(&map, 512, 1024, "zero"), "{map:?}");
    run(Command::new("nbdcopy").arg(&served.uri).arg(d.join("copy.raw")));
    let mut expected = vec![0u8; size as usize];
    expected[..2 << 20].fill(0x77);
    expected[512 << 10..1 << 20].fill(0);
    expected[512..1024].fill(0);
    assert!(std::fs::read(d.join("copy.raw")).unwrap() == expected, "nbdcopy read different data");

    // The tag of a trimmed sector is still checked: change one bit of sector 1500's entry
    // (trimmed above) behind the server's back and its read fails.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let at = 4096 + 1500 * 32 + 20;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 1], at).unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0 1500*512 512"].map(|s| s.replace("1500*512", "768000")))
        .arg(&served.uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Input/output error") || !out.status.success(),
        "the forged entry was served: {text}"
    );
    // Its neighbours still read as zeroes.
    qemu_io(&served.uri, &["read -P 0 767488 512", "read -P 0 768512 512"]);
    served.stop();
}

/// A fresh 8 MiB authenticated volume with 512-byte sectors, keyed by `dir/vk`.
fn auth_image(d: &Path) -> std::path::PathBuf {
    std::fs::write(d.join("vk"), [0x5au8; 32]).unwrap();
    let img = d.join("auth.img");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    run(Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
        .args(["format", "--type", "authenticated", "--sector-size", "512", "--volume-key-file"])
        .arg(d.join("vk"))
        .arg(&img));
    img
}

#[test]
fn nbdcopy_of_an_authenticated_volume_with_a_forged_trimmed_mark_fails() {
    if !have("qemu-io") || !have("nbdcopy") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let img = auth_image(d);
    let served = Served::start(&img, &d.join("vk"), &d.join("log"));
    qemu_io(&served.uri, &["write -P 0xaa 0 4M"]);
    served.stop();
    // Only the image is the attacker's: the mark (outside the tag) on sectors of [1M, 2M),
    // which hold 0xaa: a range as large as nbdcopy's requests, which it would then not read.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    for s in 2048..4096u64 {
        f.write_all_at(&1u32.to_le_bytes(), 4096 + s * 32 + 28).unwrap();
    }
    drop(f);
    let served = Served::start(&img, &d.join("vk"), &d.join("log2"));
    let out = Command::new("nbdcopy").arg(&served.uri).arg(d.join("copy.raw")).output().unwrap();
    assert!(!out.status.success(), "nbdcopy copied a sector with a forged trimmed mark without an error");
    served.stop();
}

#[test]
fn an_authenticated_trim_makes_its_marks_durable_before_it_punches() {
    // A crash between the two must not leave old entries over a hole: the marks reach the disk
    // (fdatasync) before fallocate(PUNCH_HOLE). strace shows the order of the calls.
    if !have("qemu-io") || !have("strace") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let img = auth_image(d);
    let trace = d.join("trace");
    let (child, uri) = start_server(
        Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=pwrite64,pwritev,fdatasync,fsync,fallocate", "-o"])
            .arg(&trace)
            .arg(env!("CARGO_BIN_EXE_crypt-vfio"))
            .args(["serve", "--listen", "127.0.0.1:0", "--export", "vol", "--key-file"])
            .arg(d.join("vk"))
            .arg(&img)
            .stderr(std::fs::File::create(d.join("log")).unwrap()),
        Duration::from_secs(30),
    );
    let mut served = Served { child, uri };
    qemu_io(&served.uri, &["write -P 0x11 0 2M", "discard 1M 1M", "read -P 0 1M 1M"]);
    // strace holds off SIGTERM while it traces: stop the server itself, its child.
    let pid = served.child.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    for server in children.split_whitespace() {
        let _ = Command::new("kill").arg(server).status();
    }
    let _ = served.child.wait();
    let text = std::fs::read_to_string(&trace).unwrap();
    let calls: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            ["pwrite64", "pwritev", "fdatasync", "fsync", "fallocate"]
                .into_iter()
                .find(|c| l.contains(&format!("{c}(")))
        })
        .collect();
    let punch = calls.iter().position(|&c| c == "fallocate").expect("the trim punched nothing");
    // The trim's metadata writes come just before; the last call before the punch is a sync.
    assert!(
        punch > 0 && ["fdatasync", "fsync"].contains(&calls[punch - 1]),
        "the punch follows a write with no sync between: {:?}",
        &calls[punch.saturating_sub(4)..=punch]
    );
}
