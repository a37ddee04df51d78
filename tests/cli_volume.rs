//! The storage subcommands as a user runs them: format, encrypt, decrypt, dump, add-key,
//! remove-key; with qemu-img reading what `encrypt` writes, and every kind of bad input getting a
//! clear error while the files stay as they were.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::{have, have_python_cryptography, pattern, run, scratch, tool, tool_script};

const PASS: &str = "cli passphrase";

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
}

/// Runs the CLI and expects failure; returns standard error.
fn fails(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn encrypt_to_luks1_is_read_by_qemu_img_and_decrypts_back() {
    let dir = scratch();
    let d = dir.path();
    let plain = pattern((3 << 20) + 1234, 1);
    std::fs::write(d.join("plain.raw"), &plain).unwrap();
    std::fs::write(d.join("pass"), PASS).unwrap();
    run(cli()
        .args(["encrypt", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--key-file"])
        .arg(d.join("pass"))
        .arg(d.join("plain.raw"))
        .arg(d.join("enc.luks")));
    // The last, partial sector is padded with zeroes.
    let mut padded = plain.clone();
    padded.resize(plain.len().next_multiple_of(512), 0);
    if have("qemu-img") {
        run(Command::new("qemu-img")
            .args(["convert", "--object"])
            .arg(format!("secret,id=s0,data={PASS}"))
            .arg("--image-opts")
            .arg(format!("driver=luks,key-secret=s0,file.filename={}", d.join("enc.luks").display()))
            .args(["-O", "raw"])
            .arg(d.join("qemu.raw")));
        assert!(std::fs::read(d.join("qemu.raw")).unwrap() == padded, "qemu-img decrypts different data");
    }
    // The passphrase from standard input, read whole as cryptsetup reads it (as `echo -n` or
    // `printf %s` send it: a newline would be part of the passphrase).
    let mut child = cli()
        .args(["decrypt", "--key-file", "-"])
        .arg(d.join("enc.luks"))
        .arg(d.join("back.raw"))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(PASS.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(std::fs::read(d.join("back.raw")).unwrap() == padded);
}

#[test]
fn luks2_with_4096_byte_sectors_round_trips_and_dumps_without_secrets() {
    let dir = scratch();
    let d = dir.path();
    let plain = pattern(1 << 20, 2);
    std::fs::write(d.join("plain.raw"), &plain).unwrap();
    std::fs::write(d.join("pass"), PASS).unwrap();
    run(cli()
        .args(["encrypt", "--type", "luks2", "--sector-size", "4096", "--pbkdf", "argon2id"])
        .args([
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "8192",
            "--pbkdf-parallel",
            "1",
            "--key-file",
        ])
        .arg(d.join("pass"))
        .arg(d.join("plain.raw"))
        .arg(d.join("enc.img")));
    run(cli()
        .args(["decrypt", "--key-file"])
        .arg(d.join("pass"))
        .arg(d.join("enc.img"))
        .arg(d.join("back.raw")));
    assert!(std::fs::read(d.join("back.raw")).unwrap() == plain);
    let dump = String::from_utf8(run(cli().arg("dump").arg(d.join("enc.img")))).unwrap();
    assert!(dump.contains("Version:       \t2") && dump.contains("sector: 4096 [bytes]"), "{dump}");
    assert!(dump.contains("PBKDF:      argon2id") && dump.contains("cipher: aes-xts-plain64"), "{dump}");
    if have("cryptsetup") {
        let vk = d.join("vk.bin");
        run(Command::new(tool("cryptsetup"))
            .args(["luksDump", "-q", "--dump-volume-key", "--volume-key-file"])
            .arg(&vk)
            .arg("--key-file")
            .arg(d.join("pass"))
            .arg(d.join("enc.img")));
        let key: String = std::fs::read(&vk).unwrap().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!dump.contains(&key[..16]), "dump shows the volume key");
    }
}

#[test]
fn format_then_add_and_remove_passphrases() {
    let dir = scratch();
    let d = dir.path();
    std::fs::write(d.join("pass"), PASS).unwrap();
    std::fs::write(d.join("pass2"), "another").unwrap();
    let img = d.join("new.img");
    run(cli()
        .args([
            "format",
            "--type",
            "luks1",
            "--cipher",
            "aes-cbc-essiv:sha256",
            "--pbkdf-force-iterations",
            "1000",
        ])
        .args(["--size", "1048576", "--key-file"])
        .arg(d.join("pass"))
        .arg(&img));
    run(cli()
        .args(["add-key", "--pbkdf-force-iterations", "1000", "--key-file"])
        .arg(d.join("pass"))
        .arg("--new-key-file")
        .arg(d.join("pass2"))
        .arg(&img));
    let dump = String::from_utf8(run(cli().arg("dump").arg(&img))).unwrap();
    assert!(dump.contains("Key Slot 1: ENABLED") && dump.contains("MK bits:       \t256"), "{dump}");
    run(cli().args(["remove-key", "--key-file"]).arg(d.join("pass")).arg(&img));
    let e = fails(cli().args(["decrypt", "--key-file"]).arg(d.join("pass")).arg(&img).arg(d.join("out")));
    assert!(e.contains("wrong passphrase"), "{e}");
    run(cli().args(["decrypt", "--key-file"]).arg(d.join("pass2")).arg(&img).arg(d.join("out")));
    assert_eq!(std::fs::metadata(d.join("out")).unwrap().len(), 1 << 20);
    let e = fails(cli().args(["remove-key", "--key-file"]).arg(d.join("pass2")).arg(&img));
    assert!(e.contains("last one"), "{e}");
}

#[test]
fn plain_mode_round_trips_and_matches_the_reference() {
    let dir = scratch();
    let d = dir.path();
    let plain = pattern(256 << 10, 3);
    std::fs::write(d.join("plain.raw"), &plain).unwrap();
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7)).collect();
    std::fs::write(d.join("vk"), &key).unwrap();
    run(cli()
        .args(["encrypt", "--plain", "--cipher", "aes-cbc-essiv:sha256", "--volume-key-file"])
        .arg(d.join("vk"))
        .arg(d.join("plain.raw"))
        .arg(d.join("enc.raw")));
    run(cli()
        .args(["decrypt", "--plain", "--cipher", "aes-cbc-essiv:sha256", "--volume-key-file"])
        .arg(d.join("vk"))
        .arg(d.join("enc.raw"))
        .arg(d.join("back.raw")));
    assert!(std::fs::read(d.join("back.raw")).unwrap() == plain);
    if have_python_cryptography() {
        run(Command::new("python3")
            .arg(tool_script("dmcrypt_ref.py"))
            .args(["decrypt", "--cipher", "aes-cbc-essiv:sha256", "--key-file"])
            .arg(d.join("vk"))
            .arg(d.join("enc.raw"))
            .arg(d.join("ref.raw")));
        assert!(std::fs::read(d.join("ref.raw")).unwrap() == plain);
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_files_untouched() {
    let dir = scratch();
    let d = dir.path();
    std::fs::write(d.join("pass"), PASS).unwrap();
    std::fs::write(d.join("plain.raw"), pattern(64 << 10, 4)).unwrap();
    run(cli()
        .args(["encrypt", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--key-file"])
        .arg(d.join("pass"))
        .arg(d.join("plain.raw"))
        .arg(d.join("good.luks")));
    let good = std::fs::read(d.join("good.luks")).unwrap();
    let before = files_in(d);
    std::fs::write(d.join("wrong"), "not it").unwrap();

    // Wrong passphrase: no output appears, the image is unchanged.
    let e = fails(
        cli()
            .args(["decrypt", "--key-file"])
            .arg(d.join("wrong"))
            .arg(d.join("good.luks"))
            .arg(d.join("out")),
    );
    assert!(e.contains("wrong passphrase"), "{e}");
    let e = fails(
        cli()
            .args(["add-key", "--pbkdf-force-iterations", "1000", "--key-file"])
            .arg(d.join("wrong"))
            .arg("--new-key-file")
            .arg(d.join("pass"))
            .arg(d.join("good.luks")),
    );
    assert!(e.contains("wrong passphrase"), "{e}");

    // Corrupt header: the field is named.
    let mut bad = good.clone();
    bad[208..212].copy_from_slice(&[0, 0, 0x12, 0x34]);
    std::fs::write(d.join("corrupt.luks"), &bad).unwrap();
    let e = fails(
        cli()
            .args(["decrypt", "--key-file"])
            .arg(d.join("pass"))
            .arg(d.join("corrupt.luks"))
            .arg(d.join("out")),
    );
    assert!(e.contains("corrupt LUKS header: key slot 0 active"), "{e}");

    // Truncated image: the key material is cut off.
    std::fs::write(d.join("short.luks"), &good[..100_000]).unwrap();
    let e = fails(
        cli()
            .args(["decrypt", "--key-file"])
            .arg(d.join("pass"))
            .arg(d.join("short.luks"))
            .arg(d.join("out")),
    );
    assert!(e.contains("truncated image"), "{e}");

    // Not LUKS at all.
    let e = fails(
        cli().args(["decrypt", "--key-file"]).arg(d.join("pass")).arg(d.join("plain.raw")).arg(d.join("out")),
    );
    assert!(e.contains("not a LUKS image") && e.contains("--plain"), "{e}");

    // Unsupported cipher.
    let e = fails(
        cli()
            .args(["encrypt", "--cipher", "twofish-xts-plain64", "--key-file"])
            .arg(d.join("pass"))
            .arg(d.join("plain.raw"))
            .arg(d.join("out")),
    );
    assert!(e.contains("unsupported cipher spec `twofish-xts-plain64`"), "{e}");

    // A file too small for the header: formatting refuses before writing anything.
    std::fs::write(d.join("tiny.img"), [7u8; 4096]).unwrap();
    let e = fails(
        cli()
            .args([
                "format",
                "--type",
                "luks2",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
            ])
            .arg(d.join("pass"))
            .arg(d.join("tiny.img")),
    );
    assert!(e.contains("too small"), "{e}");
    assert_eq!(std::fs::read(d.join("tiny.img")).unwrap(), [7u8; 4096]);

    assert_eq!(std::fs::read(d.join("good.luks")).unwrap(), good);
    let mut expected = before;
    expected.extend(["corrupt.luks", "short.luks", "tiny.img", "wrong"].map(String::from));
    expected.sort();
    assert_eq!(files_in(d), expected, "no output or temporary file is left behind");
}

#[test]
fn authenticated_images_round_trip_and_a_tampered_sector_is_named() {
    let dir = scratch();
    let d = dir.path();
    let plain = pattern(200_000, 5);
    std::fs::write(d.join("plain.raw"), &plain).unwrap();
    std::fs::write(d.join("vk"), [0x5au8; 32]).unwrap();
    run(cli()
        .args(["encrypt", "--type", "authenticated", "--sector-size", "4096", "--volume-key-file"])
        .arg(d.join("vk"))
        .arg(d.join("plain.raw"))
        .arg(d.join("auth.img")));
    run(cli()
        .args(["decrypt", "--volume-key-file"])
        .arg(d.join("vk"))
        .arg(d.join("auth.img"))
        .arg(d.join("back")));
    let mut padded = plain.clone();
    padded.resize(plain.len().next_multiple_of(4096), 0);
    assert!(std::fs::read(d.join("back")).unwrap() == padded);
    // Flip a byte in the data of sector 3.
    let mut img = std::fs::read(d.join("auth.img")).unwrap();
    let data_offset = u64::from_le_bytes(img[32..40].try_into().unwrap()) as usize;
    img[data_offset + 3 * 4096 + 10] ^= 1;
    std::fs::write(d.join("auth.img"), &img).unwrap();
    let e = fails(
        cli()
            .args(["decrypt", "--volume-key-file"])
            .arg(d.join("vk"))
            .arg(d.join("auth.img"))
            .arg(d.join("out")),
    );
    assert!(e.contains("sector 3: authentication failed"), "{e}");
    assert!(!d.join("out").exists(), "nothing of a failed decrypt is left");
    std::fs::write(d.join("vk2"), [0x5bu8; 32]).unwrap();
    let e = fails(
        cli()
            .args(["decrypt", "--volume-key-file"])
            .arg(d.join("vk2"))
            .arg(d.join("auth.img"))
            .arg(d.join("out")),
    );
    assert!(e.contains("the key does not open this volume"), "{e}");
}

#[test]
fn the_software_engine_writes_what_the_device_reads_and_device_commands_refuse_it() {
    let dir = scratch();
    let d = dir.path();
    let plain = pattern(100_000, 3);
    std::fs::write(d.join("plain.raw"), &plain).unwrap();
    std::fs::write(d.join("pass"), PASS).unwrap();
    run(cli()
        .args(["encrypt", "--device", "software", "--type", "luks2", "--pbkdf", "pbkdf2"])
        .args(["--pbkdf-force-iterations", "1000", "--key-file"])
        .arg(d.join("pass"))
        .arg(d.join("plain.raw"))
        .arg(d.join("enc.luks")));
    run(cli()
        .args(["decrypt", "--device", "emulated", "--key-file"])
        .arg(d.join("pass"))
        .arg(d.join("enc.luks"))
        .arg(d.join("back.raw")));
    let back = std::fs::read(d.join("back.raw")).unwrap();
    assert!(back[..plain.len()] == plain[..] && back[plain.len()..].iter().all(|&b| b == 0));

    let e = fails(cli().args(["info", "software"]));
    assert!(e.contains("--device software chooses an engine for the block commands"), "{e}");
}
