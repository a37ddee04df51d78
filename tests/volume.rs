//! The volume layer: dm-crypt plain mode against an independent implementation, I/O of any size
//! and alignment, the async API, several threads, and the pipeline against engines that complete
//! out of order, fail sectors, backlog constantly, or drop backlogged requests (the watchdog).

mod common;
mod support;

use std::fs::{File, OpenOptions};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::Engine;
use crypt_vfio::transport::emulated::EmulatedConfig;
use crypt_vfio::virtio_crypto::DeviceOptions;
use crypt_vfio::volume::{BlockDevice, CipherSpec, Volume, VolumeParams};
use crypt_vfio::{CoreKind, DeviceError, Error, VolumeError};
use support::engines::{Behaviour, Wrapped};
use support::{have_python_cryptography, pattern, run, scratch, tool_script};

const KEY64: [u8; 64] = {
    let mut k = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        k[i] = (i as u8).wrapping_mul(37).wrapping_add(11);
        i += 1;
    }
    k
};

fn backing(dir: &std::path::Path, len: u64) -> File {
    let f =
        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join("disk")).unwrap();
    f.set_len(len).unwrap();
    f
}

fn params(spec: &str, sector_size: u32) -> VolumeParams {
    VolumeParams { sector_size, ..VolumeParams::plain(spec.parse().unwrap()) }
}

#[test]
fn plain_mode_matches_an_independent_implementation_for_every_spec() {
    if !have_python_cryptography() {
        return;
    }
    // The device takes the sectors as requests; the software engine runs a whole I/O in place
    // (the inline path): both must agree with the reference.
    matches_the_reference(Arc::new(common::device()));
    matches_the_reference(Arc::new(SoftwareEngine::new(CoreKind::Fast)));
}

fn matches_the_reference<E: Engine>(engine: Arc<E>) {
    let cases = [
        ("aes-xts-plain64", 64, 512, 0, 0, false),
        ("aes-xts-plain64", 32, 4096, 8192, 0, false),
        ("aes-xts-plain64", 64, 4096, 0, 24, true),
        ("aes-xts-plain", 64, 512, 4096, (1u64 << 32) - 3, false),
        ("aes-xts-plain64be", 64, 512, 0, 5, false),
        ("aes-cbc-essiv:sha256", 32, 512, 0, 0, false),
        ("aes-cbc-plain64", 16, 1024, 0, 7, false),
        ("aes-ctr-plain64", 32, 512, 512, 0, false),
    ];
    for (spec, key_len, ss, data_offset, iv_offset, large) in cases {
        let dir = scratch();
        let plain = pattern(256 << 10, key_len as u64 + u64::from(ss));
        let f = backing(dir.path(), data_offset + plain.len() as u64);
        let p = VolumeParams { data_offset, iv_offset, iv_large_sectors: large, ..params(spec, ss) };
        let key = &KEY64[..key_len];
        let v = Volume::open(engine.clone(), f, true, key, p).unwrap();
        v.write_at(0, &plain).unwrap();
        v.flush().unwrap();
        drop(v);
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, key).unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg(tool_script("dmcrypt_ref.py"))
            .args(["decrypt", "--cipher", spec, "--key-file"])
            .arg(&key_file)
            .args(["--sector-size", &ss.to_string(), "--offset", &data_offset.to_string()])
            .args(["--iv-offset", &iv_offset.to_string()]);
        if large {
            cmd.arg("--iv-large-sectors");
        }
        run(cmd.arg(dir.path().join("disk")).arg(dir.path().join("out")));
        let case = format!(
            "{}: {spec} key {key_len} sector {ss} iv_offset {iv_offset} large {large}",
            engine.describe()
        );
        assert!(std::fs::read(dir.path().join("out")).unwrap() == plain, "{case}: the reference disagrees");

        // And the other way: the reference encrypts, the volume decrypts.
        let mut cmd = Command::new("python3");
        cmd.arg(tool_script("dmcrypt_ref.py"))
            .args(["encrypt", "--cipher", spec, "--key-file"])
            .arg(&key_file)
            .args(["--sector-size", &ss.to_string(), "--iv-offset", &iv_offset.to_string()]);
        if large {
            cmd.arg("--iv-large-sectors");
        }
        std::fs::write(dir.path().join("plain"), &plain).unwrap();
        run(cmd.arg(dir.path().join("plain")).arg(dir.path().join("enc")));
        let v = Volume::open(
            engine.clone(),
            File::open(dir.path().join("enc")).unwrap(),
            false,
            key,
            VolumeParams { data_offset: 0, ..p },
        )
        .unwrap();
        let mut back = vec![0u8; plain.len()];
        v.read_at(0, &mut back).unwrap();
        assert!(back == plain, "{case}: the volume cannot read the reference's output");
    }
}

/// Writes at odd offsets and lengths against an in-memory model, then compares everything.
fn exercise<E: Engine>(v: &Volume<E>, seed: u64) {
    let size = v.size() as usize;
    let mut model = vec![0u8; size];
    v.write_at(0, &model).unwrap();
    let mut x = seed | 1;
    let mut next = |m: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % m as u64) as usize
    };
    for round in 0..40 {
        let off = next(size - 1);
        let len = 1 + next((size - off).min(70_000));
        let data = pattern(len, seed + round);
        v.write_at(off as u64, &data).unwrap();
        model[off..off + len].copy_from_slice(&data);
        let roff = next(size - 1);
        let rlen = 1 + next((size - roff).min(70_000));
        let mut got = vec![0u8; rlen];
        v.read_at(roff as u64, &mut got).unwrap();
        assert!(got == model[roff..roff + rlen], "round {round}: read {rlen} at {roff} differs");
    }
    let mut all = vec![0u8; size];
    v.read_at(0, &mut all).unwrap();
    assert!(all == model);
}

#[test]
fn reads_and_writes_of_any_size_and_alignment() {
    let engine = Arc::new(common::device());
    for ss in [512, 4096] {
        let dir = scratch();
        let v = Volume::open(
            engine.clone(),
            backing(dir.path(), 1 << 20),
            true,
            &KEY64,
            params("aes-xts-plain64", ss),
        )
        .unwrap();
        exercise(&v, u64::from(ss));
    }
}

#[test]
fn the_async_api_gives_the_same_bytes() {
    let engine = Arc::new(common::device());
    let dir = scratch();
    let v = Volume::open(engine, backing(dir.path(), 1 << 20), true, &KEY64, params("aes-xts-plain64", 512))
        .unwrap();
    let data = pattern(300_000, 9);
    futures::executor::block_on(async {
        v.write_at_async(4096, &data).await.unwrap();
        v.write_at_async(1, &data[..1000]).await.unwrap();
        let mut back = vec![0u8; data.len()];
        v.read_at_async(4096, &mut back).await.unwrap();
        assert!(back == data);
        let mut head = vec![0u8; 1000];
        v.read_at_async(1, &mut head).await.unwrap();
        assert_eq!(head, data[..1000]);
    });
    let mut sync = vec![0u8; 1000];
    v.read_at(1, &mut sync).unwrap();
    assert_eq!(sync, data[..1000]);
}

#[test]
fn several_threads_share_a_volume_including_writes_into_the_same_sectors() {
    let engine = Arc::new(common::device());
    let dir = scratch();
    let v = Arc::new(
        Volume::open(engine, backing(dir.path(), 1 << 20), true, &KEY64, params("aes-xts-plain64", 4096))
            .unwrap(),
    );
    let dev: Arc<dyn BlockDevice> = v.clone();
    // Eight threads write interleaved 1000-byte stripes, so neighbours share sectors and go
    // through read-modify-write at the same time.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for i in 0..40u64 {
                    let off = (i * 8 + t) * 1000;
                    dev.write_at(off, &pattern(1000, off)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    dev.flush().unwrap();
    let mut all = vec![0u8; 320_000];
    dev.read_at(0, &mut all).unwrap();
    for (i, chunk) in all.chunks(1000).enumerate() {
        assert_eq!(chunk, pattern(1000, i as u64 * 1000), "stripe {i}");
    }
    assert_eq!(dev.block_size(), 4096);
    assert!(!dev.read_only());
}

#[test]
fn out_of_order_completion_through_a_small_ring_keeps_every_sector_in_place() {
    let config = EmulatedConfig {
        max_queue_size: 8,
        out_of_order: true,
        latency: Duration::from_micros(20),
        latency_jitter: Duration::from_micros(40),
        workers: 2,
        ..EmulatedConfig::default()
    };
    let options = DeviceOptions { queue_size: 8, backlog_limit: 16, ..DeviceOptions::default() };
    let (dev, _t) = common::device_with(config, &options);
    let dir = scratch();
    let v = Volume::open(
        Arc::new(dev),
        backing(dir.path(), 1 << 20),
        true,
        &KEY64,
        params("aes-xts-plain64", 512),
    )
    .unwrap();
    exercise(&v, 77);
}

#[test]
fn a_failed_sector_fails_the_io_and_names_the_sector() {
    let dir = scratch();
    let good = Volume::open(
        Arc::new(common::device()),
        backing(dir.path(), 1 << 20),
        true,
        &KEY64,
        params("aes-xts-plain64", 512),
    )
    .unwrap();
    good.write_at(0, &pattern(1 << 20, 1)).unwrap();
    drop(good);
    let config = EmulatedConfig { error_rate: 0.01, ..EmulatedConfig::default() };
    let (dev, _t) = common::device_with(config, &DeviceOptions::default());
    let v = Volume::open(
        Arc::new(dev),
        OpenOptions::new().read(true).write(true).open(dir.path().join("disk")).unwrap(),
        true,
        &KEY64,
        params("aes-xts-plain64", 512),
    )
    .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    match v.read_at(0, &mut buf) {
        Err(Error::Volume(VolumeError::Sector { sector, source })) => {
            assert!(sector < 2048, "sector {sector}");
            assert!(!matches!(*source, Error::Volume(VolumeError::Sector { .. })));
            let msg = Error::Volume(VolumeError::Sector { sector, source }).to_string();
            assert!(msg.starts_with(&format!("sector {sector}:")), "{msg}");
        }
        other => panic!("a 1% error rate over 2048 sectors gave {other:?}"),
    }
}

#[test]
fn an_engine_that_always_backlogs_is_pipelined_correctly() {
    let dir = scratch();
    let engine = Arc::new(Wrapped::new(common::device(), Behaviour::AlwaysBacklog));
    let (backlogged, impatient) = (engine.backlogged.clone(), engine.impatient.clone());
    let v = Volume::open(
        engine,
        backing(dir.path(), 1 << 19),
        true,
        &KEY64[..32],
        params("aes-cbc-essiv:sha256", 512),
    )
    .unwrap();
    exercise(&v, 5);
    assert!(backlogged.load(Ordering::Relaxed) > 1000, "every request went through the backlog");
    assert_eq!(
        impatient.load(Ordering::Relaxed),
        0,
        "the volume submitted before a Promoted it had to wait for"
    );
}

#[test]
fn a_backlogged_sector_promoted_and_failed_before_submit_returns_runs_again() {
    // Promoted and MemberFailed arrive before `submit` returns Backlogged: the sector must be
    // run again, not waited for as still backlogged (which only the watchdog would end).
    let engine = Arc::new(Wrapped::new(SoftwareEngine::new(CoreKind::Fast), Behaviour::PromoteAndFailOnce));
    let backlogged = engine.backlogged.clone();
    let dir = scratch();
    let mut v =
        Volume::open(engine, backing(dir.path(), 1 << 20), true, &KEY64, params("aes-xts-plain64", 512))
            .unwrap();
    v.set_watchdog(Duration::from_secs(20));
    let start = Instant::now();
    let data = pattern(256 << 10, 9);
    v.write_at(4096, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    v.read_at(4096, &mut back).unwrap();
    assert!(back == data, "the re-run sectors came back wrong");
    assert!(backlogged.load(Ordering::Relaxed) >= 1024, "every sector failed once and ran again");
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}: a watchdog ended a wait", start.elapsed());
}

#[test]
fn the_watchdog_fails_an_io_whose_backlogged_request_is_never_promoted() {
    let engine =
        Arc::new(Wrapped::new(SoftwareEngine::new(CoreKind::Fast), Behaviour::DropBacklogged { ring: 16 }));
    let dir = scratch();
    let mut v =
        Volume::open(engine, backing(dir.path(), 1 << 20), true, &KEY64, params("aes-xts-plain64", 512))
            .unwrap();
    v.set_watchdog(Duration::from_millis(300));
    // Small I/O fits the "ring": it works.
    v.write_at(0, &[1u8; 4096]).unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    let e = v.read_at(0, &mut buf).unwrap_err();
    let took = start.elapsed();
    match &e {
        Error::Device(DeviceError::ContractViolation(msg)) => {
            assert!(msg.contains("sector 16") && msg.contains("never promoted"), "{msg}");
            assert!(msg.contains("test wrapper"), "the engine is named: {msg}");
        }
        other => panic!("expected a contract violation, got {other:?}"),
    }
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "{took:?}");
    // The volume is still usable for I/O the engine handles.
    let mut small = [0u8; 4096];
    v.read_at(0, &mut small).unwrap();
    assert_eq!(small, [1u8; 4096]);
}

#[test]
fn a_backlogged_request_completed_without_promoted_fails_the_io_at_once() {
    let engine =
        Arc::new(Wrapped::new(SoftwareEngine::new(CoreKind::Fast), Behaviour::CompleteBackloggedUnpromoted));
    let dir = scratch();
    let mut v =
        Volume::open(engine, backing(dir.path(), 1 << 20), true, &KEY64, params("aes-xts-plain64", 512))
            .unwrap();
    // Far longer than the I/O takes: an op left waiting for the Promoted fails only here.
    v.set_watchdog(Duration::from_secs(10));
    let start = Instant::now();
    let e = v.write_at(0, &[1u8; 4096]).unwrap_err();
    let took = start.elapsed();
    match &e {
        Error::Device(DeviceError::ContractViolation(msg)) => {
            assert!(msg.contains("sector 0") && msg.contains("without Promoted"), "{msg}");
        }
        other => panic!("expected a contract violation, got {other:?}"),
    }
    assert!(took < Duration::from_secs(5), "the I/O took {took:?}: it waited for the watchdog");
}

#[test]
fn an_encrypted_volume_says_it_holds_a_copy_of_every_io() {
    // The NBD server charges its memory budget by this: a volume encrypts a copy of the data
    // (reads of partial sectors too), so an I/O of n bytes holds about 2n.
    let dir = scratch();
    let v = Volume::open(
        Arc::new(SoftwareEngine::new(CoreKind::Fast)),
        backing(dir.path(), 1 << 20),
        true,
        &KEY64,
        params("aes-xts-plain64", 512),
    )
    .unwrap();
    for len in [1u64, 512, 4096, 1 << 20] {
        assert!(BlockDevice::working_set(&v, len) >= 2 * len + 2 * 512, "{len}");
    }
}

#[test]
fn bad_parameters_get_clear_errors() {
    let engine = Arc::new(SoftwareEngine::new(CoreKind::Fast));
    let dir = scratch();
    let e = Volume::open(
        engine.clone(),
        backing(dir.path(), 1 << 16),
        true,
        &KEY64,
        params("aes-xts-plain64", 300),
    )
    .unwrap_err();
    assert!(e.to_string().contains("sector size 300"), "{e}");
    let e =
        Volume::open(engine.clone(), backing(dir.path(), 100), true, &KEY64, params("aes-xts-plain64", 512))
            .unwrap_err();
    assert!(matches!(e, Error::Volume(VolumeError::Truncated { .. })), "{e}");
    let e = Volume::open(
        engine.clone(),
        backing(dir.path(), 1 << 16),
        true,
        &KEY64[..24],
        params("aes-xts-plain64", 512),
    )
    .unwrap_err();
    assert!(e.to_string().contains("192-bit"), "{e}");
    let v = Volume::open(engine, backing(dir.path(), 1 << 16), false, &KEY64, params("aes-xts-plain64", 512))
        .unwrap();
    assert!(matches!(v.write_at(0, b"x"), Err(Error::Volume(VolumeError::ReadOnly))));
    let mut buf = [0u8; 10];
    let e = v.read_at((1 << 16) - 5, &mut buf).unwrap_err();
    assert!(
        matches!(e, Error::Volume(VolumeError::OutOfRange { offset: 65531, len: 10, size: 65536 })),
        "{e}"
    );
    assert!("aes-xts-essiv:sha256".parse::<CipherSpec>().is_err());
}

#[test]
fn the_watchdog_also_ends_an_async_io() {
    let engine =
        Arc::new(Wrapped::new(SoftwareEngine::new(CoreKind::Fast), Behaviour::DropBacklogged { ring: 4 }));
    let dir = scratch();
    let mut v =
        Volume::open(engine, backing(dir.path(), 1 << 16), true, &KEY64, params("aes-xts-plain64", 512))
            .unwrap();
    v.set_watchdog(Duration::from_millis(200));
    let mut buf = vec![0u8; 8192];
    let e = futures::executor::block_on(v.read_at_async(0, &mut buf)).unwrap_err();
    assert!(matches!(&e, Error::Device(DeviceError::ContractViolation(m)) if m.contains("sector 4")), "{e}");
}

#[test]
fn write_zeroes_and_trim_as_the_nbd_server_uses_them() {
    let engine = Arc::new(common::device());
    let dir = scratch();
    let v = Volume::open(engine, backing(dir.path(), 1 << 16), true, &KEY64, params("aes-xts-plain64", 512))
        .unwrap();
    let dev: &dyn BlockDevice = &v;
    let data = pattern(1 << 16, 8);
    dev.write_at(0, &data).unwrap();
    dev.write_zeroes(1000, 5000).unwrap();
    let mut back = vec![0u8; 1 << 16];
    dev.read_at(0, &mut back).unwrap();
    let mut expected = data.clone();
    expected[1000..6000].fill(0);
    assert!(back == expected);
    // The zeroes are encrypted: the backing file holds no run of them.
    let raw = std::fs::read(dir.path().join("disk")).unwrap();
    assert!(!raw[1024..5632].windows(64).any(|w| w.iter().all(|&b| b == 0)));
    dev.trim(0, 4096).unwrap();
    assert!(matches!(dev.trim(1 << 16, 1), Err(Error::Volume(VolumeError::OutOfRange { .. }))));
    dev.read_at(0, &mut back).unwrap();
    // Trim punches the block: it reads as zeroes (on a filesystem that can punch holes).
    let punched = dev.block_status(0, 4096, 4).unwrap()[0].hole;
    if punched {
        expected[..4096].fill(0);
    }
    assert!(back == expected, "trim changes nothing but the trimmed range");
}

#[test]
fn a_duplicate_completion_fails_the_io_and_writes_no_plaintext() {
    // The engine reports sector 0 twice while the last sector is still in flight. Counting
    // completions would end the write early with that sector still plaintext, and write it.
    let engine =
        Arc::new(Wrapped::new(SoftwareEngine::new(CoreKind::Fast), Behaviour::DuplicateFirstHoldLast));
    let dir = scratch();
    let file = backing(dir.path(), 1 << 16);
    let disk = file.try_clone().unwrap();
    let v = Volume::open(engine, file, true, &KEY64, params("aes-xts-plain64", 512)).unwrap();
    let plain = pattern(8 * 512, 7);
    let err = v.write_at(0, &plain).expect_err("a duplicate completion must fail the write");
    assert!(
        matches!(err, Error::Device(DeviceError::ContractViolation(ref m)) if m.contains("completed twice")),
        "{err}"
    );
    let mut raw = vec![0u8; plain.len()];
    std::os::unix::fs::FileExt::read_exact_at(&disk, &mut raw, 0).unwrap();
    for (i, (r, p)) in raw.chunks(512).zip(plain.chunks(512)).enumerate() {
        assert_ne!(r, p, "sector {i} reached the disk as plaintext");
    }
    assert!(raw.iter().all(|&b| b == 0), "nothing of a failed write reaches the disk");
}

#[test]
fn offsets_and_sizes_near_u64_max_give_errors_not_overflows() {
    let dir = scratch();
    for (data_offset, size) in [(u64::MAX - 511, None), (512, Some(u64::MAX - 511)), (!511, Some(512))] {
        let p = VolumeParams { data_offset, size, ..params("aes-xts-plain64", 512) };
        let engine = Arc::new(SoftwareEngine::new(CoreKind::Fast));
        let r = Volume::open(engine, backing(dir.path(), 1 << 16), true, &KEY64, p);
        assert!(
            matches!(r, Err(Error::Volume(VolumeError::Invalid(ref m))) if m.contains("beyond")),
            "offset {data_offset}, size {size:?}: {:?}",
            r.err()
        );
    }
}

#[test]
fn holes_read_as_zeroes_writes_into_them_keep_their_neighbours_and_trim_makes_them() {
    let engine = Arc::new(common::device());
    // A data offset out of step with filesystem blocks too: holes are found in file offsets.
    for data_offset in [0u64, 512, 8192] {
        let dir = scratch();
        let p = VolumeParams { data_offset, ..params("aes-xts-plain64", 512) };
        let mut v = Volume::open(engine.clone(), backing(dir.path(), 1 << 20), true, &KEY64, p).unwrap();
        v.set_allow_discards(true);
        let size = v.size();
        let status = v.block_status(0, size, 100).unwrap();
        assert_eq!(status.len(), 1, "{status:?}");
        assert!(status[0].hole && status[0].zero && status[0].len == size);
        let mut back = vec![1u8; 64 << 10];
        v.read_at(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0), "a never-written volume reads as zeroes");

        // One sector into a hole, synchronously and through the async API: every other
        // sector still reads as zeroes.
        v.write_at(8192 + 512, &[0xaa; 512]).unwrap();
        futures::executor::block_on(v.write_at_async(65536 + 1536, &[0xbb; 512])).unwrap();
        let mut expected = vec![0u8; 128 << 10];
        expected[8704..9216].fill(0xaa);
        expected[67072..67584].fill(0xbb);
        let mut back = vec![1u8; 128 << 10];
        v.read_at(0, &mut back).unwrap();
        assert!(back == expected, "data offset {data_offset}: neighbours of a write into a hole");
        let mut back_async = vec![1u8; 128 << 10];
        futures::executor::block_on(v.read_at_async(0, &mut back_async)).unwrap();
        assert!(back_async == expected);

        // Trim frees whole blocks: they read as zeroes and are reported as holes.
        v.write_at(256 << 10, &pattern(256 << 10, 4)).unwrap();
        v.trim((256 << 10) + 100, 128 << 10).unwrap();
        let mut back = vec![1u8; 256 << 10];
        v.read_at(256 << 10, &mut back).unwrap();
        let st = v.block_status(256 << 10, 256 << 10, 100).unwrap();
        assert!(st.iter().any(|e| e.hole && e.zero), "data offset {data_offset}: {st:?}");
        let mut at = 0usize;
        let want = pattern(256 << 10, 4);
        for e in &st {
            let r = at..at + e.len as usize;
            if e.zero {
                assert!(back[r.clone()].iter().all(|&b| b == 0), "a hole reads as zeroes");
            } else {
                assert!(back[r.clone()] == want[r.clone()], "data outside the holes is unchanged");
            }
            at = r.end;
        }
        assert_eq!(at, 256 << 10);
        // The trimmed range is at most the one asked for.
        assert!(back[..100] == want[..100] && back[(128 << 10) + 100..] == want[(128 << 10) + 100..]);
    }
}

#[test]
fn holes_punched_after_a_dense_read_read_as_zeroes() {
    // A read of a dense image remembers where the data is; a later trim or zeroing must
    // not be hidden by that memory (a hole decrypted would read as garbage).
    let engine = Arc::new(common::device());
    let dir = scratch();
    let mut v =
        Volume::open(engine, backing(dir.path(), 1 << 20), true, &KEY64, params("aes-xts-plain64", 512))
            .unwrap();
    v.set_allow_discards(true);
    let size = v.size() as usize;
    let want = pattern(size, 9);
    v.write_at(0, &want).unwrap();
    let mut back = vec![0u8; size];
    v.read_at(0, &mut back).unwrap();
    assert!(back == want);

    v.trim(256 << 10, 64 << 10).unwrap();
    let st = v.block_status(256 << 10, 64 << 10, 10).unwrap();
    if !st.iter().any(|e| e.hole) {
        eprintln!("this filesystem cannot punch holes; nothing to check");
        return;
    }
    let mut expected = want.clone();
    expected[256 << 10..320 << 10].fill(0);
    v.read_at(0, &mut back).unwrap();
    assert!(back == expected, "a trimmed range read after a dense read is not zeroes");

    v.read_at(0, &mut back).unwrap();
    v.zero_or_punch(512 << 10, 64 << 10).unwrap();
    expected[512 << 10..576 << 10].fill(0);
    let mut part = vec![1u8; 128 << 10];
    v.read_at(512 << 10, &mut part).unwrap();
    assert!(part[..] == expected[512 << 10..640 << 10], "a zeroed range read after a dense read");
}

/// Whether any byte range of the image is a hole (`SEEK_HOLE` before its end).
fn image_has_hole(f: &File) -> bool {
    let len = f.metadata().unwrap().len();
    rustix::fs::seek(f, rustix::fs::SeekFrom::Hole(0)).unwrap() < len
}

#[test]
fn without_allow_discards_trim_punches_nothing_and_zeroing_never_punches() {
    let engine = Arc::new(SoftwareEngine::new(CoreKind::Fast));
    let dir = scratch();
    let file = backing(dir.path(), 1 << 20);
    let disk = file.try_clone().unwrap();
    let mut v = Volume::open(engine, file, true, &KEY64, params("aes-xts-plain64", 512)).unwrap();
    let data = pattern(1 << 20, 3);
    v.write_at(0, &data).unwrap();
    disk.sync_all().unwrap();
    assert!(!image_has_hole(&disk));

    // Zeroing with a hole allowed (NBD WRITE_ZEROES without NO_HOLE) writes encrypted zeroes:
    // dm-crypt must read zeroes back, and it would decrypt a hole into garbage.
    v.zero_or_punch(0, 256 << 10).unwrap();
    assert!(!image_has_hole(&disk), "zeroing punched a hole");
    let mut raw = vec![0u8; 256 << 10];
    std::os::unix::fs::FileExt::read_exact_at(&disk, &mut raw, 0).unwrap();
    assert!(!raw.windows(64).any(|w| w.iter().all(|&b| b == 0)), "the zeroes are encrypted");

    // Trim without --allow-discards: accepted, nothing punched, nothing changed.
    v.trim(256 << 10, 256 << 10).unwrap();
    assert!(!image_has_hole(&disk), "a trim punched a hole without allow_discards");
    let mut back = vec![1u8; 1 << 20];
    v.read_at(0, &mut back).unwrap();
    let mut expected = data.clone();
    expected[..256 << 10].fill(0);
    assert!(back == expected);
    assert!(v.block_status(0, 1 << 20, 16).unwrap().iter().all(|e| !e.hole && !e.zero));

    // With it, the trim punches (where the filesystem can).
    v.set_allow_discards(true);
    v.trim(256 << 10, 256 << 10).unwrap();
    let st = v.block_status(256 << 10, 256 << 10, 16).unwrap();
    assert_eq!(image_has_hole(&disk), st.iter().any(|e| e.hole));
}

/// A loop device over a file in `dir`, detached on drop; `None` where loop devices cannot be
/// set up (not root, no loop driver).
struct Loop(String);

impl Loop {
    fn new(dir: &std::path::Path, len: u64) -> Option<Self> {
        let img = dir.join("loop.img");
        File::create(&img).unwrap().set_len(len).unwrap();
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&img).output().ok()?;
        if !out.status.success() {
            eprintln!("skipped: losetup: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(Loop(String::from_utf8(out.stdout).unwrap().trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn on_a_block_device_zeroes_read_back_as_zeroes_and_trim_never_yields_garbage() {
    let dir = scratch();
    let Some(dev) = Loop::new(dir.path(), 4 << 20) else { return };
    let file = OpenOptions::new().read(true).write(true).open(&dev.0).unwrap();
    let engine = Arc::new(SoftwareEngine::new(CoreKind::Fast));
    let mut v = Volume::open(engine, file, true, &KEY64, params("aes-xts-plain64", 512)).unwrap();
    v.set_allow_discards(true);
    let data = pattern(4 << 20, 9);
    v.write_at(0, &data).unwrap();
    v.flush().unwrap();
    // A loop device accepts PUNCH_HOLE (it zeroes the bytes) but SEEK_HOLE reports it all as
    // data: a punch there would decrypt to garbage.
    v.zero_or_punch(0, 1 << 20).unwrap();
    v.trim(1 << 20, 1 << 20).unwrap();
    let mut back = vec![1u8; 4 << 20];
    v.read_at(0, &mut back).unwrap();
    assert!(back[..1 << 20].iter().all(|&b| b == 0), "zeroed range reads as zeroes");
    let mut at = 1u64 << 20;
    for e in v.block_status(1 << 20, 3 << 20, 64).unwrap() {
        let r = at as usize..(at + e.len) as usize;
        if e.zero {
            assert!(back[r.clone()].iter().all(|&b| b == 0), "a zero extent reads as zeroes");
        } else {
            assert!(back[r.clone()] == data[r.clone()], "a data extent at {at} changed under trim");
        }
        at += e.len;
    }
    drop(v);
}
