//! `crypt-vfio serve` over TLS, checked with the clients people use: qemu-img and libnbd's
//! nbdinfo and nbdcopy over `nbds://`, with x509 certificates made here by the openssl command
//! and with a psktool-style PSK file. A client that does not start TLS is refused when TLS is
//! required, both by a real client and by a raw one that tries every option first.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crypt_vfio::nbd::proto::{self, be_u32, be_u64, opt, rep};
use support::{have, pattern, run, scratch, start_server};

const SIZE: usize = 4 << 20;

struct Served {
    child: Child,
    uri: String,
}

impl Served {
    /// `serve --raw` of `image` with `extra` options; the log goes to `log`.
    fn start(image: &Path, extra: &[&str], log: &Path) -> Served {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crypt-vfio"));
        cmd.args(["serve", "--raw", "--listen", "127.0.0.1:0", "--export", "disk"])
            .args(extra)
            .arg(image)
            .stderr(std::fs::File::create(log).unwrap());
        let (child, uri) = start_server(&mut cmd, Duration::from_secs(30));
        Served { child, uri }
    }

    fn port(&self) -> u16 {
        let rest = self.uri.split("://").nth(1).unwrap();
        rest.split('/').next().unwrap().rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have_openssl_cli() -> bool {
    let ok = Command::new("openssl").arg("version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: the openssl command is not installed");
    }
    ok
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, in the layout
/// qemu and libnbd read (ca-cert.pem, server-*.pem, client-*.pem).
fn make_pki(dir: &Path) {
    let ossl = |args: &[&str]| {
        run(Command::new("openssl").args(args).current_dir(dir));
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "[srv]\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n\
         [cli]\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=crypt-vfio test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    for (who, ext, cn) in [("server", "srv", "localhost"), ("client", "cli", "client")] {
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let cert = format!("{who}-cert.pem");
        ossl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ]);
        ossl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-extensions",
            ext,
        ]);
    }
}

/// A sparse image with data in two places.
fn image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("disk.img");
    let mut expected = vec![0u8; SIZE];
    expected[1 << 20..(1 << 20) + 65536].copy_from_slice(&pattern(65536, 1));
    expected[3 << 20..(3 << 20) + 4096].copy_from_slice(&pattern(4096, 2));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE as u64).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&expected[1 << 20..(1 << 20) + 65536], 1 << 20).unwrap();
    f.write_all_at(&expected[3 << 20..(3 << 20) + 4096], 3 << 20).unwrap();
    (path, expected)
}

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn x509_tls_serves_qemu_img_nbdinfo_and_nbdcopy_and_refuses_plain_clients() {
    if !have("qemu-img") || !have("nbdinfo") || !have("nbdcopy") || !have_openssl_cli() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let pki = d.join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_pki(&pki);
    let (img, expected) = image(d);
    let served = Served::start(&img, &["--tls-certificates", pki.to_str().unwrap()], &d.join("log"));
    assert!(served.uri.starts_with("nbds://"), "{}", served.uri);
    // No client certificate is asked for: the operator is told that anyone may connect.
    let log = std::fs::read_to_string(d.join("log")).unwrap();
    assert!(log.contains("authenticates no client"), "no warning about unauthenticated clients: {log}");
    let uri = format!("{}?tls-certificates={}", served.uri, pki.display());

    // libnbd: the map shows the holes, the copy is exact.
    let map = String::from_utf8(run(Command::new("nbdinfo").args(["--map", &uri]))).unwrap();
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");
    run(Command::new("nbdcopy").arg(&uri).arg(d.join("copy.raw")));
    assert!(std::fs::read(d.join("copy.raw")).unwrap() == expected, "nbdcopy read different data");

    // qemu-img with its own x509 credentials object.
    let port = served.port().to_string();
    let opts = format!("driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0");
    let creds = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", pki.display());
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw", "--object", &creds, "--image-opts", &opts])
        .arg(d.join("qemu.raw")));
    assert!(std::fs::read(d.join("qemu.raw")).unwrap() == expected, "qemu-img read different data");

    // A client without TLS gets nothing.
    let plain = served.uri.replacen("nbds://", "nbd://", 1);
    // (libnbd reports NBD_REP_ERR_TLS_REQD as "requires TLS" or "not supported".)
    let err = fails(Command::new("nbdinfo").arg(&plain));
    assert!(err.contains("TLS") || err.contains("not supported"), "{err}");
    fails(Command::new("qemu-img").args(["info", "-f", "raw", &plain]));
}

#[test]
fn a_client_certificate_is_required_with_verify_peer() {
    if !have("nbdinfo") || !have_openssl_cli() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let pki = d.join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_pki(&pki);
    let (img, _) = image(d);
    let served = Served::start(
        &img,
        &["--tls-certificates", pki.to_str().unwrap(), "--tls-verify-peer"],
        &d.join("log"),
    );
    // libnbd presents client-cert.pem when the directory has one.
    let with_cert = format!("{}?tls-certificates={}", served.uri, pki.display());
    run(Command::new("nbdinfo").arg(&with_cert));
    let ca_only = d.join("ca-only");
    std::fs::create_dir(&ca_only).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    fails(Command::new("nbdinfo").arg(format!("{}?tls-certificates={}", served.uri, ca_only.display())));
}

#[test]
fn psk_tls_serves_nbdinfo_nbdcopy_and_qemu_img_and_refuses_a_wrong_key() {
    if !have("qemu-img") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let (img, expected) = image(d);
    let key: String = pattern(32, 9).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir(d.join("psk")).unwrap();
    let keys = d.join("psk").join("keys.psk");
    std::fs::write(&keys, format!("alice:{key}\n")).unwrap();
    let served = Served::start(&img, &["--tls-psk", keys.to_str().unwrap()], &d.join("log"));
    let hostport = served.uri.trim_start_matches("nbds://").split('/').next().unwrap().to_string();
    let uri =
        |user: &str, file: &Path| format!("nbds://{user}@{hostport}/disk?tls-psk-file={}", file.display());

    let map = String::from_utf8(run(Command::new("nbdinfo").args(["--map", &uri("alice", &keys)]))).unwrap();
    assert!(map.contains("hole,zero"), "{map}");
    run(Command::new("nbdcopy").arg(uri("alice", &keys)).arg(d.join("copy.raw")));
    assert!(std::fs::read(d.join("copy.raw")).unwrap() == expected, "nbdcopy read different data");

    let port = served.port().to_string();
    let opts = format!("driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0");
    let creds =
        format!("tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice", d.join("psk").display());
    let json = String::from_utf8(run(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "--object",
        &creds,
        "--image-opts",
        &opts,
    ])))
    .unwrap();
    assert!(json.contains("\"data\": false") && json.contains("\"data\": true"), "{json}");

    // Same user, another key: the handshake fails.
    let wrong = d.join("wrong.psk");
    std::fs::write(&wrong, format!("alice:{}\n", "00".repeat(32))).unwrap();
    fails(Command::new("nbdinfo").arg(uri("alice", &wrong)));
}

/// Reads one option reply: (option, type, data).
fn option_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be_u64(&h), proto::OPTION_REPLY_MAGIC);
    let mut data = vec![0u8; be_u32(&h[16..]) as usize];
    s.read_exact(&mut data).unwrap();
    (be_u32(&h[8..]), be_u32(&h[12..]), data)
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

#[test]
fn with_tls_required_a_raw_client_gets_nothing_but_tls_reqd() {
    let dir = scratch();
    let d = dir.path();
    let (img, _) = image(d);
    let keys = d.join("keys.psk");
    std::fs::write(&keys, "alice:00112233445566778899aabbccddeeff\n").unwrap();
    let served = Served::start(&img, &["--tls-psk", keys.to_str().unwrap()], &d.join("log"));
    let mut s = TcpStream::connect(("127.0.0.1", served.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&(proto::client::FIXED_NEWSTYLE | proto::client::NO_ZEROES).to_be_bytes()).unwrap();
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0u16.to_be_bytes());
    for (option, data) in [
        (opt::GO, go.clone()),
        (opt::INFO, go.clone()),
        (opt::LIST, vec![]),
        (opt::STRUCTURED_REPLY, vec![]),
        (opt::LIST_META_CONTEXT, vec![0; 8]),
        (4242, vec![1, 2, 3]),
    ] {
        send_option(&mut s, option, &data);
        let (o, kind, _) = option_reply(&mut s);
        assert_eq!((o, kind), (option, rep::ERR_TLS_REQD), "option {option} before TLS");
    }
    // STARTTLS with data is malformed, not a way in.
    send_option(&mut s, opt::STARTTLS, b"x");
    assert_eq!(option_reply(&mut s).1, rep::ERR_INVALID);
    // NBD_OPT_EXPORT_NAME cannot be refused with a reply: the connection is closed.
    send_option(&mut s, opt::EXPORT_NAME, b"disk");
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)), "the server closes the connection");
    drop(served);
}

#[test]
fn tls_options_are_checked_before_anything_is_served() {
    let dir = scratch();
    let d = dir.path();
    let (img, _) = image(d);
    let serve = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
            .args(["serve", "--raw", "--listen", "127.0.0.1:0"])
            .args(extra)
            .arg(&img)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(serve(&["--tls", "require"]).contains("needs credentials"));
    assert!(serve(&["--tls-certificates", d.to_str().unwrap()]).contains("server-cert.pem"));
    std::fs::write(d.join("bad.psk"), "alice:xyz\n").unwrap();
    assert!(serve(&["--tls-psk", d.join("bad.psk").to_str().unwrap()]).contains("line 1"));
    assert!(serve(&["--tls-verify-peer"]).contains("--tls-certificates"));
}

/// A PSK server with a 1 s handshake deadline, and a client connected to it that has had its
/// STARTTLS acknowledged and has not started the TLS handshake yet. The client's reads wait far
/// longer than the deadline: a server that waited for ever would fail them with a timeout
/// instead of closing.
fn psk_server_after_starttls(d: &Path) -> (Served, TcpStream) {
    let (img, _) = image(d);
    let keys = d.join("keys.psk");
    std::fs::write(&keys, "alice:00112233445566778899aabbccddeeff\n").unwrap();
    let served = Served::start(
        &img,
        &["--tls-psk", keys.to_str().unwrap(), "--handshake-timeout", "1s"],
        &d.join("log"),
    );
    let mut s = TcpStream::connect(("127.0.0.1", served.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&proto::client::FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    send_option(&mut s, opt::STARTTLS, &[]);
    assert_eq!(option_reply(&mut s).1, rep::ACK);
    (served, s)
}

#[test]
fn a_client_that_stalls_in_the_tls_handshake_is_dropped_at_the_handshake_deadline() {
    let dir = scratch();
    let (served, mut s) = psk_server_after_starttls(dir.path());
    // Half a ClientHello, then nothing.
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    drop(served);
}

#[test]
fn a_client_that_trickles_its_client_hello_is_dropped_at_the_handshake_deadline() {
    // A byte every 300 ms keeps each receive well inside a 1 s deadline; only a deadline over
    // the whole handshake drops the client.
    let dir = scratch();
    let (served, mut s) = psk_server_after_starttls(dir.path());
    // A record header announcing 512 bytes of handshake, then its body a byte at a time: 60
    // bytes take 18 s, far past the deadline.
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut closed = false;
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(300));
        let mut b = [0u8; 1];
        match s.peek(&mut b) {
            Ok(0) => closed = true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok(_) | Err(_) => closed = true,
        }
        if closed || s.write_all(&[0x01]).is_err() {
            closed = true;
            break;
        }
    }
    assert!(closed, "the server kept reading a trickled ClientHello past the handshake deadline");
    drop(served);
}
