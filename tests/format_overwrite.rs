//! `format` over an existing LUKS header, as `cryptsetup luksFormat`: a warning, then `YES`
//! typed on a terminal, or `-q`; without a terminal and without `-q` it refuses and the image
//! is left as it was.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use support::{have, run, scratch};

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
}

fn format_args(pass: &Path) -> Vec<String> {
    ["format", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file"]
        .into_iter()
        .map(String::from)
        .chain([pass.display().to_string()])
        .collect()
}

/// Runs `cli format` on a pseudo-terminal (util-linux `script`) with `typed` as the user's input.
fn on_terminal(pass: &Path, img: &Path, typed: &str) -> std::process::Output {
    let cmd =
        format!("{} {} {}", env!("CARGO_BIN_EXE_crypt-vfio"), format_args(pass).join(" "), img.display());
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(typed.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn formatting_over_a_luks_header_asks_first() {
    let dir = scratch();
    let d = dir.path();
    let pass = d.join("pass");
    std::fs::write(&pass, "first").unwrap();
    let img = d.join("v.img");
    run(cli().args(format_args(&pass)).args(["--size", "1048576"]).arg(&img));
    let before = std::fs::read(&img).unwrap();

    // No terminal, no -q: refused, nothing written.
    let out = cli().args(format_args(&pass)).arg(&img).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("WARNING") && err.contains("-q"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), before, "the image is untouched");

    if have("script") {
        // On a terminal, anything but YES aborts; YES goes on.
        let out = on_terminal(&pass, &img, "yes\n");
        assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(String::from_utf8_lossy(&out.stdout).contains("Are you sure?"));
        assert_eq!(std::fs::read(&img).unwrap(), before, "the image is untouched");
        let out = on_terminal(&pass, &img, "YES\n");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        assert_ne!(std::fs::read(&img).unwrap(), before, "a new header");
    }

    // -q (and --batch-mode) skip the question.
    let again = std::fs::read(&img).unwrap();
    let out = cli().args(format_args(&pass)).arg("-q").arg(&img).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(std::fs::read(&img).unwrap(), again);
    run(cli().args(format_args(&pass)).arg("--batch-mode").arg(&img).stdin(Stdio::null()));

    // A file that holds no LUKS header is formatted without a question, as before.
    let plain = d.join("plain.img");
    std::fs::write(&plain, vec![0u8; 17 << 20]).unwrap();
    run(cli().args(format_args(&pass)).arg(&plain).stdin(Stdio::null()));
}
