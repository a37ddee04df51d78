//! `crypt-vfio serve` of encrypted volumes: NBD clients (nbdcopy, qemu-io, qemu-img) read the
//! decrypted data and write through it, and what they write is proper LUKS1 that qemu-img
//! decrypts on its own afterwards; an authenticated volume's tampered sector reaches the client
//! as an I/O error. Skipped (saying why) when a tool is missing.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{have, pattern, run, scratch, start_server};

const PASS: &str = "served passphrase";

struct Served {
    child: Child,
    uri: String,
}

impl Served {
    fn start(image: &Path, key_file: &Path) -> Served {
        let (child, uri) = start_server(
            Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
                .args(["serve", "--listen", "127.0.0.1:0", "--export", "vol", "--key-file"])
                .arg(key_file)
                .arg(image)
                .stderr(Stdio::inherit()),
            Duration::from_secs(30),
        );
        Served { child, uri }
    }

    /// SIGTERM, then wait: the server flushes the volume before it exits.
    fn stop(mut self) {
        run(Command::new("kill").args(["-TERM", &self.child.id().to_string()]));
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "serve exited with {status}");
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "serve did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbd_clients_read_and_write_a_served_luks1_volume() {
    if !have("nbdcopy") || !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let plain = pattern(4 << 20, 11);
    std::fs::write(d.join("plain.raw"), &plain).unwrap();
    std::fs::write(d.join("pass"), PASS).unwrap();
    run(Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
        .args(["encrypt", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--key-file"])
        .arg(d.join("pass"))
        .arg(d.join("plain.raw"))
        .arg(d.join("vol.luks")));

    let served = Served::start(&d.join("vol.luks"), &d.join("pass"));
    // nbdcopy reads the decrypted view over two connections.
    run(Command::new("nbdcopy").args(["--connections", "2", &served.uri]).arg(d.join("copy.raw")));
    assert!(std::fs::read(d.join("copy.raw")).unwrap() == plain, "nbdcopy read different data");
    // qemu-io writes an unaligned pattern and reads it back through the server.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1000 10000",
        "-c",
        "read -P 0xab 1000 10000",
        &served.uri,
    ]));
    let mut expected = plain.clone();
    expected[1000..11000].fill(0xab);
    // qemu-img reads the whole export, including what qemu-io wrote.
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &served.uri])
        .arg(d.join("qemu.raw")));
    assert!(std::fs::read(d.join("qemu.raw")).unwrap() == expected, "qemu-img read different data");
    // nbdcopy writes a region of new data into the export.
    let fresh = pattern(1 << 20, 13);
    std::fs::write(d.join("fresh.raw"), &fresh).unwrap();
    run(Command::new("nbdcopy").arg(d.join("fresh.raw")).arg(&served.uri));
    expected[..fresh.len()].copy_from_slice(&fresh);
    served.stop();

    // qemu-img decrypts the image on its own: the writes are proper LUKS1.
    run(Command::new("qemu-img")
        .args(["convert", "--object"])
        .arg(format!("secret,id=s0,data={PASS}"))
        .arg("--image-opts")
        .arg(format!("driver=luks,key-secret=s0,file.filename={}", d.join("vol.luks").display()))
        .args(["-O", "raw"])
        .arg(d.join("after.raw")));
    assert!(std::fs::read(d.join("after.raw")).unwrap() == expected, "qemu-img sees different data");
}

#[test]
fn a_tampered_authenticated_sector_is_an_io_error_for_the_client() {
    if !have("nbdcopy") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let plain = pattern(1 << 20, 12);
    std::fs::write(d.join("plain.raw"), &plain).unwrap();
    std::fs::write(d.join("vk"), [0x11u8; 32]).unwrap();
    run(Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
        .args(["encrypt", "--type", "authenticated", "--volume-key-file"])
        .arg(d.join("vk"))
        .arg(d.join("plain.raw"))
        .arg(d.join("auth.img")));
    let served = Served::start(&d.join("auth.img"), &d.join("vk"));
    run(Command::new("nbdcopy").arg(&served.uri).arg(d.join("copy.raw")));
    assert!(std::fs::read(d.join("copy.raw")).unwrap() == plain);
    // Flip a bit of sector 100 behind the server's back.
    let mut img = std::fs::read(d.join("auth.img")).unwrap();
    let data_offset = u64::from_le_bytes(img[32..40].try_into().unwrap()) as usize;
    img[data_offset + 100 * 512] ^= 4;
    std::fs::write(d.join("auth.img"), &img).unwrap();
    let out = Command::new("nbdcopy").arg(&served.uri).arg(d.join("copy2.raw")).output().unwrap();
    assert!(!out.status.success(), "the tampered sector was served");
    served.stop();
}
