//! The `crypt-vfio` command end to end: the self-test the guest test runs on a real vfio-pci
//! function, here on the emulated device, and the device tooling on a machine without VFIO.

use std::process::{Command, Output};

fn crypt_vfio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crypt-vfio")).args(args).output().expect("run crypt-vfio")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn selftest_passes_on_the_emulated_device() {
    let o = crypt_vfio(&["selftest", "--device", "emulated"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.lines().any(|l| l.starts_with("selftest: PASS (11 algorithm/key combinations")), "{out}");
    for alg in ["aes-256-gcm", "aes-384-xts", "aes-512-xts", "aes-192-cbc", "aes-128-ctr"] {
        assert!(out.contains(&format!("  {alg:<12} ok:")), "{alg} not checked:\n{out}");
    }
}

#[test]
fn selftest_runs_through_a_pool_and_shows_each_members_share() {
    let o = crypt_vfio(&["selftest", "--device", "emulated,emulated,software"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.lines().any(|l| l.starts_with("selftest: PASS (11 algorithm/key combinations")), "{out}");
    let members: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with("member ")).collect();
    assert_eq!(members.len(), 3, "{out}");
    for (line, name) in members.iter().zip(["emulated#0", "emulated#1", "software"]) {
        assert!(line.contains(name) && line.contains('%'), "{out}");
    }
    assert!(members[2].contains(" 0.0%"), "the software member stands by while devices work: {out}");
}

#[test]
fn selftest_fails_when_a_result_is_wrong() {
    let o = crypt_vfio(&["selftest", "--corrupt-one"]);
    let out = stdout(&o);
    assert!(!o.status.success(), "{out}");
    let fail = out.lines().find(|l| l.starts_with("selftest: FAIL")).unwrap_or_else(|| panic!("{out}"));
    assert!(fail.contains("differs from the software implementation"), "{fail}");
}

#[test]
fn selftest_refuses_an_algorithm_the_device_lacks_cleanly() {
    let o = crypt_vfio(&["selftest", "--device-algs", "cbc,xts"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("aes-128-gcm  not accepted by the device"), "{out}");
    assert!(out.contains("bad input: aes-gcm session (unsupported) -> refused cleanly"), "{out}");
    assert!(out.contains("selftest: PASS (6 algorithm/key combinations"), "{out}");
}

#[test]
fn info_takes_the_device_as_a_positional_address_and_checks_it() {
    let o = crypt_vfio(&["info", "emulated"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("virtio-crypto on emulated"));
    let o = crypt_vfio(&["info", "00:1f"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not a PCI address"));
    let o = crypt_vfio(&["info", "0000:00:02.0", "--device", "0000:00:03.0"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("two devices given"));
}

#[test]
fn list_explains_a_machine_without_vfio_and_succeeds() {
    let o = crypt_vfio(&["list"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    if !std::path::Path::new("/dev/vfio/vfio").exists() {
        assert!(out.starts_with("VFIO is not usable on this machine: "), "{out}");
    }
}

/// Block commands default to `--device auto`: with no virtio-crypto function bound to vfio-pci
/// (none is, on the machines the tests run on) that is the software engine, and the command says
/// so on standard error; `--device emulated` still picks the emulated device, and both engines
/// produce the same ciphertext.
#[test]
fn block_commands_default_to_the_software_engine_here_and_say_which_engine_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plain: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(d.join("plain.raw"), &plain).unwrap();
    std::fs::write(d.join("vk"), (0..64u8).collect::<Vec<_>>()).unwrap();
    let vk = d.join("vk").display().to_string();
    let plain_opts = ["--plain", "--cipher", "aes-xts-plain64", "--volume-key-file", vk.as_str()];
    let run = |args: &[&str], out: &str| {
        let p = |f: &str| d.join(f).display().to_string();
        let (input, output) = (p(if args[0] == "encrypt" { "plain.raw" } else { "sw.img" }), p(out));
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&plain_opts);
        all.push(&input);
        all.push(&output);
        let o = crypt_vfio(&all);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{all:?}: {err}");
        err
    };
    let err = run(&["encrypt"], "sw.img");
    assert!(err.contains("engine: software") && err.contains("--device auto"), "{err}");
    let err = run(&["encrypt", "--device", "emulated"], "emu.img");
    assert!(err.contains("engine: virtio-crypto on emulated"), "{err}");
    assert_eq!(std::fs::read(d.join("sw.img")).unwrap(), std::fs::read(d.join("emu.img")).unwrap());
    let err = run(&["decrypt", "--device", "software"], "back.raw");
    assert!(err.contains("engine: software") && !err.contains("auto"), "{err}");
    assert_eq!(std::fs::read(d.join("back.raw")).unwrap(), plain);
}

#[test]
fn emulated_device_options_without_the_emulated_device_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.img");
    std::fs::write(&input, [0u8; 4096]).unwrap();
    let (input, output) = (input.display().to_string(), dir.path().join("out.raw").display().to_string());
    let o = crypt_vfio(&["decrypt", "--device-workers", "2", "--plain", &input, &output]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("--device-workers") && err.contains("--device emulated"), "{err}");
    let o = crypt_vfio(&["info", "--device", "software"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("emulated"), "{err}");
}
