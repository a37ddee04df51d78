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
