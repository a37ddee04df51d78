//! `crypt-vfio bench` end to end: JSON that parses, numbers that agree with each other and with
//! the table, sweeps and plots, and bad arguments refused by name.

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crypt-vfio")).arg("bench").args(args).output().expect("run crypt-vfio")
}

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn json_has_the_documented_keys_and_consistent_numbers() {
    let out = ok(&bench(&["--json", "--engine", "both", "--count", "3000", "--qd", "16", "--size", "1024"]));
    let runs: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    assert_eq!(runs.len(), 2, "{out}");
    for r in &runs {
        for key in ["alg", "size", "qd", "queues", "ops", "seconds", "gbps", "mops"] {
            assert!(r.get(key).is_some(), "missing {key}: {r}");
        }
        for q in ["p50", "p99", "p999"] {
            assert!(r["lat_us"][q].as_f64().is_some_and(|v| v > 0.0), "lat_us.{q}: {r}");
        }
        let (ops, secs, size) =
            (r["ops"].as_f64().unwrap(), r["seconds"].as_f64().unwrap(), r["size"].as_f64().unwrap());
        assert_eq!(ops, 3000.0, "--count 3000 per queue: {r}");
        let gbps = ops * size / secs / 1e9;
        assert!((r["gbps"].as_f64().unwrap() - gbps).abs() < 1e-9 * gbps.max(1.0), "{r}");
        assert!((r["mops"].as_f64().unwrap() - ops / secs / 1e6).abs() < 1e-9, "{r}");
        assert_eq!(r["alg"], "aes-256-gcm");
        assert_eq!(
            (r["size"].as_u64(), r["qd"].as_u64(), r["queues"].as_u64()),
            (Some(1024), Some(16), Some(1))
        );
        assert_eq!(r["batch"].as_u64(), Some(16), "the default batch of 32, capped at qd 16: {r}");
    }
}

#[test]
fn batched_and_per_request_runs_do_the_same_work() {
    // --count is exact whatever the batch, on the device and on the software engine, and the
    // result samples are checked against the AES core in both modes.
    for batch in ["1", "5"] {
        let out = ok(&bench(&[
            "--json", "--engine", "both", "--count", "2001", "--qd", "12", "--size", "512", "--batch", batch,
        ]));
        for line in out.lines() {
            let r: serde_json::Value = serde_json::from_str(line).expect("a JSON object per line");
            assert_eq!(r["ops"].as_u64(), Some(2001), "{r}");
            assert_eq!(r["batch"].as_u64(), batch.parse().ok(), "{r}");
        }
    }
}

#[test]
fn the_table_shows_the_same_run_as_json_would() {
    let out = ok(&bench(&[
        "--count",
        "2000",
        "--alg",
        "aes-512-xts",
        "--size",
        "512",
        "--qd",
        "8",
        "--queues",
        "2",
    ]));
    let row = out.lines().find(|l| l.starts_with("virtio-crypto")).unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    // engine (3 words), alg, size, qd, queues, GB/s, Mops/s, p50, p99, p99.9, cpu, batch
    assert_eq!(&cols[3..7], ["aes-512-xts", "512", "8", "2"], "{row}");
    let (gbps, mops): (f64, f64) = (cols[7].parse().unwrap(), cols[8].parse().unwrap());
    assert!((gbps - mops * 512.0 / 1000.0).abs() < 0.002 + gbps * 0.01, "GB/s and Mops/s disagree: {row}");
}

#[test]
fn a_sweep_draws_a_plot_and_wait_each_keeps_one_in_flight() {
    let dir = std::env::temp_dir().join(format!("crypt-vfio-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("qd.svg");
    let out = ok(&bench(&["--sweep", "qd=1,4", "--count", "500", "--plot", svg.to_str().unwrap()]));
    assert_eq!(out.lines().filter(|l| l.starts_with("virtio-crypto")).count(), 2, "{out}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg") && text.contains("polyline"),
        "not a plot: {}",
        &text[..text.len().min(200)]
    );
    let out = ok(&bench(&["--wait-each", "--count", "300", "--device-latency", "50us", "--json"]));
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["wait_each"], true);
    assert_eq!(r["batch"], 1, "one request at a time is a batch of one: {r}");
    assert!(
        r["lat_us"]["p50"].as_f64().unwrap() >= 50.0,
        "one request at a time waits the full latency: {r}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Every request checked, through a pool one of whose members is unplugged (given back at its
/// owner's request) under it: the run ends on the other with every result equal to the AES
/// core's.
#[test]
fn every_request_can_be_checked_through_an_unplug() {
    let out = ok(&bench(&[
        "--device",
        "emulated,emulated",
        "--device-fault",
        "unplug@100ms:0",
        "--check-every",
        "1",
        // A time, not a count: a count can be done before the unplug on a fast machine.
        "--duration",
        "1s",
        "--qd",
        "32",
        "--size",
        "4096",
    ]));
    let gone = out.lines().find(|l| l.contains("member emulated#0")).unwrap_or_default();
    assert!(gone.contains("released"), "{out}");
}

#[test]
fn bad_arguments_are_refused_by_name() {
    for (args, words) in [
        (&["--alg", "aes-999-gcm"][..], "unknown algorithm"),
        (&["--alg", "aes-cbc", "--size", "100"][..], "multiple of 16"),
        (&["--sweep", "depth=1,2"][..], "cannot sweep"),
        (&["--device-latency", "5parsecs"][..], "unknown unit"),
        (&["--qd", "0"][..], "at least 1"),
        (&["--batch", "0"][..], "a batch of no requests submits nothing"),
        (&["--batch", "5000"][..], "more than the 4096 allowed"),
        (&["--check-every", "0"][..], "--check-every"),
    ] {
        let o = bench(args);
        assert!(!o.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(words), "{args:?}: {err}");
    }
}

/// What a refused `crypt-vfio bench` run left: its output and its peak memory.
struct Refusal {
    stdout: String,
    stderr: String,
    peak_rss_kib: i64,
}

/// Runs `crypt-vfio bench ARGS`, which must fail within 60 s (an argument that runs forever is
/// killed then, and the test fails instead of hanging).
#[allow(clippy::zombie_processes, reason = "wait4 reaps the child: Child::wait cannot give its peak memory")]
fn refused(args: &[&str]) -> Refusal {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_crypt-vfio"))
        .arg("bench")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run crypt-vfio");
    let pid = child.id() as libc::pid_t;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (status, rusage) = loop {
        let mut status = 0;
        let mut rusage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: wait4 on our own child, with pointers to a status word and a rusage that live
        // across the call; WNOHANG makes it return at once while the child still runs.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, rusage.as_mut_ptr()) };
        if r == pid {
            // SAFETY: wait4 returned the child, so it filled the rusage in.
            break (status, unsafe { rusage.assume_init() });
        }
        assert_eq!(r, 0, "wait4: {}", std::io::Error::last_os_error());
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("bench {args:?} still running after 60 s: it should have been refused at once");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(
        !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0),
        "bench {args:?} accepted:\n{stdout}{stderr}"
    );
    assert!(libc::WIFEXITED(status), "bench {args:?} did not exit but died (status {status:#x}):\n{stderr}");
    Refusal { stdout, stderr, peak_rss_kib: rusage.ru_maxrss }
}

#[test]
fn a_bare_duration_is_seconds_and_the_run_lasts_that_long() {
    let out = ok(&bench(&["--engine", "software", "--size", "512", "--duration", "1", "--json"]));
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    // A lower bound only: a loaded machine may stretch the run, never shorten it.
    assert!(r["seconds"].as_f64().unwrap() >= 0.95, "--duration 1 is one second: {r}");
    assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn options_that_would_measure_nothing_or_never_end_are_refused_with_the_reason() {
    for (args, words) in [
        (&["--duration", "0"][..], "measures nothing"),
        (&["--duration", "0s"][..], "measures nothing"),
        (&["--duration", "10us"][..], "shorter than 1ms"),
        (&["--duration", "2h"][..], "longer than 1h"),
        (&["--duration=-1s"][..], "negative"),
        (&["--duration", "5parsecs"][..], "unknown unit"),
        (&["--duration", "soon"][..], "is not a duration"),
        (&["--count", "0"][..], "no requests measures nothing"),
        (&["--count", "18446744073709551615"][..], "more than the 1000000000 allowed"),
        (&["--qd", "100000"][..], "more than the 65536 allowed"),
        (&["--queues", "0"][..], "at least 1"),
        (&["--repeat", "0"][..], "at least 1"),
        (&["--size", "0"][..], "request of no bytes"),
        (&["--size", "2GiB"][..], "more than the 1 GiB"),
        (&["--sweep", "size=512,0"][..], "request of no bytes"),
        (&["--size", "1MiB", "--qd", "2048"][..], "more than the 1 GiB a bench may allocate"),
        // Every duration option reads a bare number as seconds and refuses the useless ones.
        (&["--request-timeout", "0"][..], "time out at once"),
        (&["--request-timeout", "2h"][..], "longer than 1h"),
        (&["--device-latency", "61"][..], "longer than 1m"),
        (&["--device-latency=-1ms"][..], "negative"),
    ] {
        let r = refused(args);
        assert!(r.stderr.contains(words), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?} ran before being refused: {}", r.stdout);
    }
}

#[test]
fn a_size_over_the_device_limit_is_refused_before_any_buffer_is_allocated() {
    // The emulated device carries at most 1 MiB per request. Refused before allocating, the
    // process stays far below the 1 GiB one buffer of this size would take.
    let r = refused(&["--size", "1073741824", "--qd", "1", "--count", "1"]);
    assert!(
        r.stderr.contains("size 1073741824 is larger than the 1048576 bytes one request may carry"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "a run started before the size was checked: {}", r.stdout);
    assert!(r.peak_rss_kib < 256 * 1024, "peak memory {} KiB: a buffer was allocated", r.peak_rss_kib);
}

#[test]
fn competitors_run_beside_the_bench_are_recorded_and_gone_afterwards() {
    // Competitors the bench left behind would be reparented to this process, where they can be
    // found.
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument and touches no memory.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
    let out = ok(&bench(&["--json", "--engine", "both", "--count", "2000", "--competitor", "2"]));
    let runs: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(runs.len(), 2, "{out}");
    for r in &runs {
        assert_eq!(r["competitors"], 2, "{r}");
    }
    assert_eq!(runs[0]["mode"], "adaptive", "the default mode: {}", runs[0]);
    assert_eq!(runs[1]["mode"], "-", "the software engine has no completion mode: {}", runs[1]);
    // The bench killed and reaped its competitors before it exited: none became this process's.
    let me = std::process::id().to_string();
    let left: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // Fields after the command name: state, then the parent's pid.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace().nth(1) == Some(me.as_str()) && stat.contains("(sh)")
        })
        .collect();
    assert!(left.is_empty(), "competitors left running: {left:?}");

    let o = bench(&["--competitor", "65"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("more than the 64"), "{o:?}");
}

#[test]
fn a_pool_reports_each_members_share_in_json_and_in_the_table() {
    // One queue, two emulated devices: both take work, the shares add up to the whole, and the
    // software member stands by (no device failed).
    let out = ok(&bench(&[
        "--json",
        "--device",
        "emulated,emulated,software",
        "--count",
        "3000",
        "--qd",
        "32",
        "--size",
        "1024",
    ]));
    let r: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(r["ops"].as_u64(), Some(3000), "{r}");
    let members = r["members"].as_array().expect("members");
    let names: Vec<&str> = members.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["emulated#0", "emulated#1", "software"]);
    let requests: Vec<u64> = members.iter().map(|m| m["requests"].as_u64().unwrap()).collect();
    assert_eq!(requests.iter().sum::<u64>(), 3000, "{r}");
    assert!(requests[0] > 0 && requests[1] > 0, "both devices busy: {r}");
    assert_eq!(requests[2], 0, "the software member stands by: {r}");
    let share: f64 = members.iter().map(|m| m["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-9, "{r}");
    let table = ok(&bench(&["--device", "emulated,emulated", "--count", "500", "--qd", "8"]));
    let lines: Vec<&str> = table.lines().filter(|l| l.trim_start().starts_with("member ")).collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].contains("emulated#0") && lines[0].contains('%'), "{table}");
}

#[test]
fn device_lists_refuse_what_cannot_be_a_pool() {
    for (args, needle) in [
        (&["--device", "software,software"][..], "named twice"),
        (&["--device", "emulated,,emulated"], "empty device name"),
        (&["--device", "emulated,auto"], "auto"),
        (&["--device", "emulated,software", "--device-fault", "never-answer@1s:1"], "not an emulated device"),
        (&["--device", "emulated,emulated", "--device-fault", "never-answer@1s:2"], "member(s)"),
    ] {
        let o = bench(&[&["--count", "10"][..], args].concat());
        assert!(!o.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
