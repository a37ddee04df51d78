//! The emulated device seen from a driver: registers, negotiation, sessions, data requests,
//! and what happens when the driver gets things wrong.

mod common;

use std::time::{Duration, Instant};

use common::*;
use crypt_vfio_cores::{new_cipher, CoreKind, Mode};
use crypt_vfio_hw::{DeviceConfig, VirtioCryptoPci};
use crypt_vfio_spec::crypto::{self, aead, cipher, status as st, DataParams, DataRequest};
use crypt_vfio_spec::pci::{self, cap, cap_type, cfg, common as cc, feature, status};
use crypt_vfio_spec::ring::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

fn small() -> DeviceConfig {
    DeviceConfig { data_queues: 2, ..Default::default() }
}

fn key(len: usize, seed: u8) -> Vec<u8> {
    pattern(len, seed)
}

#[test]
fn config_space_identifies_the_function_and_its_capabilities() {
    let dev = VirtioCryptoPci::new(small()).unwrap();
    let rd = |off: u16, n: usize| {
        let mut b = [0u8; 4];
        dev.config_read(off, &mut b[..n]);
        u32::from_le_bytes(b)
    };
    assert_eq!(rd(cfg::VENDOR_ID, 2), 0x1af4);
    assert_eq!(rd(cfg::DEVICE_ID, 2), 0x1054);
    assert_eq!(rd(cfg::REVISION, 1), 1);
    assert_eq!(rd(cfg::CLASS, 3), 0x10_80_00);
    assert_eq!(rd(cfg::SUBSYSTEM_VENDOR_ID, 2), 0x1af4);
    assert_eq!(rd(cfg::SUBSYSTEM_ID, 2), 0x1100);
    assert_ne!(rd(cfg::STATUS, 2) as u16 & pci::STATUS_CAP_LIST, 0);

    let mut virtio = Vec::new();
    let mut msix = None;
    let mut at = rd(cfg::CAPABILITIES, 1) as u16;
    let mut hops = 0;
    while at != 0 {
        hops += 1;
        assert!(hops < 48, "capability list loops");
        match rd(at, 1) as u8 {
            pci::CAP_ID_MSIX => msix = Some(at),
            pci::CAP_ID_VENDOR => virtio.push((
                rd(at + cap::CFG_TYPE, 1) as u8,
                rd(at + cap::BAR, 1) as u8,
                rd(at + cap::OFFSET, 4),
                rd(at + cap::LENGTH, 4),
                at,
            )),
            other => panic!("unexpected capability {other:#x}"),
        }
        at = rd(at + cap::NEXT, 1) as u16;
    }
    let msix = msix.expect("MSI-X capability");
    assert_eq!((rd(msix + pci::MSIX_MSG_CTRL, 2) as u16 & pci::MSIX_TABLE_SIZE_MASK) + 1, dev.msix_vectors());
    assert_eq!(dev.msix_vectors(), 4, "config + control + 2 data queues");
    assert_eq!(rd(msix + pci::MSIX_TABLE, 4) & 7, 1, "table in BAR1");
    assert_eq!(rd(msix + pci::MSIX_PBA, 4) & 7, 1, "PBA in BAR1");

    let find = |t: u8| *virtio.iter().find(|c| c.0 == t).unwrap_or_else(|| panic!("virtio cap {t}"));
    let common = find(cap_type::COMMON);
    assert_eq!((common.1, common.2), (4, 0x0));
    assert!(u64::from(common.3) >= cc::SIZE);
    let notify = find(cap_type::NOTIFY);
    assert_eq!((notify.1, notify.2), (4, 0x3000));
    assert_eq!(rd(notify.4 + cap::LEN, 1), u32::from(cap::NOTIFY_SIZE));
    assert_eq!(rd(notify.4 + cap::NOTIFY_OFF_MULTIPLIER, 4), 4);
    let isr = find(cap_type::ISR);
    assert_eq!((isr.1, isr.2), (4, 0x1000));
    let device = find(cap_type::DEVICE);
    assert_eq!((device.1, device.2), (4, 0x2000));
    assert!(u64::from(device.3) >= crypto::config::SIZE);
    assert_eq!(virtio.len(), 4);

    assert_eq!(dev.bar_size(4), 0x4000);
    assert!(dev.bar_size(1) >= 0x1000);
    assert_eq!(dev.bar_size(0), 0);
    // BAR sizing through config space.
    dev.config_write(cfg::BAR0 + 16, &u32::MAX.to_le_bytes());
    assert_eq!(rd(cfg::BAR0 + 16, 4), 0xffff_c00c);
    // Out of range or odd accesses read as all ones.
    let mut b = [0u8; 4];
    dev.config_read(255, &mut b);
    assert_eq!(b[1..], [0xff; 3]);
    let mut b = [0u8; 3];
    dev.bar_read(4, 0, &mut b);
    assert_eq!(b, [0xff; 3]);
    let mut b = [0u8; 4];
    dev.bar_read(4, 0x4000, &mut b);
    assert_eq!(b, [0xff; 4]);
    dev.bar_read(2, 0, &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn registers_read_at_any_width() {
    let rig = Rig::new(small());
    assert_eq!(rig.cr(cc::NUM_QUEUES, 2), 3);
    rig.cw(cc::QUEUE_SELECT, 2, 2);
    assert_eq!(rig.cr(cc::QUEUE_NOTIFY_OFF, 2), 2);
    assert_eq!(rig.cr(cc::QUEUE_SIZE, 2), 64);
    assert_eq!(rig.cr(cc::QUEUE_ENABLE, 2), 1);
    assert_eq!(rig.cr(cc::QUEUE_DESC, 8), rig.queues[2].desc);
    assert_eq!(rig.cr(cc::QUEUE_DESC + 4, 4), rig.queues[2].desc >> 32);
    // Writes are refused while the queue is enabled.
    rig.cw(cc::QUEUE_DESC, 8, 0x1230);
    assert_eq!(rig.cr(cc::QUEUE_DESC, 8), rig.queues[2].desc);
    rig.cw(cc::QUEUE_MSIX_VECTOR, 2, 100);
    assert_eq!(rig.cr(cc::QUEUE_MSIX_VECTOR, 2), u64::from(pci::VIRTIO_MSI_NO_VECTOR), "no vector 100");
    rig.cw(cc::CONFIG_MSIX_VECTOR, 2, 3);
    assert_eq!(rig.cr(cc::CONFIG_MSIX_VECTOR, 2), 3);
    rig.cw(cc::QUEUE_SELECT, 2, 9);
    assert_eq!(rig.cr(cc::QUEUE_SIZE, 2), 0, "no such queue");
    // Queue sizes: a smaller power of two is taken, anything else is not.
    rig.set_status(0);
    rig.cw(cc::QUEUE_SELECT, 2, 0);
    assert_eq!(rig.cr(cc::QUEUE_SIZE, 2), 256, "max_queue_size after reset");
    rig.cw(cc::QUEUE_SIZE, 2, 100);
    assert_eq!(rig.cr(cc::QUEUE_SIZE, 2), 256);
    rig.cw(cc::QUEUE_SIZE, 2, 512);
    assert_eq!(rig.cr(cc::QUEUE_SIZE, 2), 256);
    rig.cw(cc::QUEUE_SIZE, 2, 16);
    assert_eq!(rig.cr(cc::QUEUE_SIZE, 2), 16);

    let dc = |off: u64, w: usize| rig.cr(0x2000 + off, w);
    assert_eq!(dc(crypto::config::STATUS, 4), u64::from(crypto::VIRTIO_CRYPTO_S_HW_READY));
    assert_eq!(dc(crypto::config::MAX_DATAQUEUES, 4), 2);
    assert_eq!(dc(crypto::config::MAX_DATAQUEUES, 1), 2);
    assert_eq!(
        dc(crypto::config::CIPHER_ALGO_L, 4),
        (1 << cipher::AES_CBC) | (1 << cipher::AES_CTR) | (1 << cipher::AES_XTS)
    );
    assert_eq!(dc(crypto::config::AEAD_ALGO, 2), 1 << aead::GCM);
    assert_eq!(dc(crypto::config::MAX_CIPHER_KEY_LEN, 4), 64);
    assert_eq!(dc(crypto::config::MAX_SIZE, 8), 1 << 20);
    assert_eq!(dc(crypto::config::MAX_SIZE + 2, 2), (1 << 20) >> 16);
    // The ISR is read-to-clear; nothing happened yet.
    assert_eq!(rig.cr(0x1000, 1), 0);
}

#[test]
fn feature_negotiation_refuses_what_was_not_offered() {
    let rig = Rig::new(small());
    let offered = rig.device_features();
    let bit = |b: u32| 1u64 << b;
    assert_eq!(
        offered,
        bit(feature::VERSION_1)
            | bit(feature::ACCESS_PLATFORM)
            | bit(feature::RING_EVENT_IDX)
            | bit(feature::RING_INDIRECT_DESC)
    );
    let attempt = |accepted: u64| {
        rig.set_status(0);
        assert_eq!(rig.status(), 0);
        rig.set_status(status::ACKNOWLEDGE | status::DRIVER);
        rig.write_driver_features(accepted);
        rig.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        rig.status() & status::FEATURES_OK != 0
    };
    assert!(!attempt(offered | bit(feature::RING_PACKED)), "unknown feature accepted");
    assert!(!attempt(offered | 1), "device-specific bit 0 is not offered");
    assert!(!attempt(offered & !bit(feature::VERSION_1)), "VERSION_1 is required");
    assert!(!attempt(offered & !bit(feature::ACCESS_PLATFORM)), "addresses are IOVAs");
    assert!(attempt(offered & !bit(feature::RING_EVENT_IDX)), "a subset is fine");
    // Once FEATURES_OK is set, the features are frozen.
    rig.cw(cc::DRIVER_FEATURE_SELECT, 4, 0);
    rig.cw(cc::DRIVER_FEATURE, 4, 0);
    assert_ne!(rig.cr(cc::DRIVER_FEATURE, 4), 0);
}

#[test]
fn sessions_are_created_and_destroyed_with_the_right_answers() {
    let cfg =
        DeviceConfig { cipher_algos: vec![cipher::AES_CBC, cipher::AES_XTS], max_sessions: 3, ..small() };
    let mut rig = Rig::new(cfg);
    let s1 = rig.create_cipher(cipher::AES_CBC, &key(16, 1), true);
    assert_eq!((s1.status, s1.session_id), (u32::from(st::OK), 1));
    assert_eq!(rig.create_cipher(cipher::AES_CTR, &key(16, 1), true).status, u32::from(st::NOTSUPP));
    assert_eq!(rig.create_cipher(cipher::AES_CBC, &key(20, 1), true).status, u32::from(st::NOTSUPP));
    assert_eq!(rig.create_cipher(cipher::AES_CBC, &key(64, 1), true).status, u32::from(st::NOTSUPP));
    assert_eq!(
        rig.create_cipher(cipher::AES_XTS, &[7; 64], false).status,
        u32::from(st::ERR),
        "equal halves"
    );
    let s2 = rig.create_aead(aead::GCM, &key(32, 2), true, 64);
    assert_eq!((s2.status, s2.session_id), (u32::from(st::OK), 2));
    assert_eq!(rig.create_aead(aead::GCM, &key(24, 2), true, 64).status, u32::from(st::NOTSUPP));
    assert_eq!(rig.create_aead(aead::CCM, &key(16, 2), true, 64).status, u32::from(st::NOTSUPP));
    let s3 = rig.create_cipher(cipher::AES_XTS, &key(64, 3), false);
    assert_eq!((s3.status, s3.session_id), (u32::from(st::OK), 3));
    assert_eq!(rig.create_cipher(cipher::AES_CBC, &key(16, 4), true).status, u32::from(st::NOSPC));
    assert_eq!(rig.destroy(2, true), st::OK);
    assert_eq!(rig.destroy(2, true), st::INVSESS);
    assert_eq!(rig.destroy(999, false), st::INVSESS);
    let s4 = rig.create_cipher(cipher::AES_CBC, &key(16, 4), true);
    assert_eq!((s4.status, s4.session_id), (u32::from(st::OK), 4), "ids are not reused");
    // An opcode the device does not know.
    let mut raw = [0u8; 72];
    raw[..4].copy_from_slice(&0x7777u32.to_le_bytes());
    let (answer, len) = rig.ctrl_raw(&raw, &[], 1);
    assert_eq!((answer[0], len), (st::NOTSUPP, 1));
    let stats = rig.dev.stats();
    assert_eq!((stats.sessions_created, stats.sessions_destroyed), (4, 1));
    assert_eq!(rig.status() & status::DEVICE_NEEDS_RESET, 0);
}

/// The reference core's answer for a cipher operation.
fn reference(mode: Mode, key: &[u8], encrypt: bool, iv: &[u8], data: &[u8]) -> Vec<u8> {
    let c = new_cipher(CoreKind::Reference, mode, key).unwrap();
    let mut d = data.to_vec();
    if encrypt {
        c.encrypt(iv, &[], &mut d, &mut []).unwrap();
    } else {
        c.decrypt(iv, &[], &mut d, &[]).unwrap();
    }
    d
}

#[test]
fn cipher_requests_match_the_cores() {
    let mut rig = Rig::with_sizes(small(), 16, 16384);
    for (algo, mode, klen, len) in [
        (cipher::AES_CBC, Mode::Cbc, 32, 4096),
        (cipher::AES_CBC, Mode::Cbc, 16, 16),
        (cipher::AES_CTR, Mode::Ctr, 24, 1000),
        (cipher::AES_XTS, Mode::Xts, 64, 4096),
        (cipher::AES_XTS, Mode::Xts, 32, 17),
    ] {
        let k = key(klen, algo as u8);
        let enc = rig.create_cipher(algo, &k, true).session_id;
        let dec = rig.create_cipher(algo, &k, false).session_id;
        let iv = pattern(16, 9);
        let plain = pattern(len, 3);
        let (s, used, ct) = rig.run_data(0, &cipher_hdr(enc, true, algo, 16, len), &iv, &plain, &[], len);
        assert_eq!((s, used), (st::OK, len as u32 + 1), "{mode}");
        assert_eq!(ct, reference(mode, &k, true, &iv, &plain), "{mode} {klen} {len}");
        let (s, _, back) = rig.run_data(1, &cipher_hdr(dec, false, algo, 16, len), &iv, &ct, &[], len);
        assert_eq!(s, st::OK);
        assert_eq!(back, plain);
    }
    assert_eq!(rig.dev.stats().data_ok, 10);
}

#[test]
fn gcm_round_trip_and_bad_tag() {
    let mut rig = Rig::new(small());
    let k = key(32, 5);
    let enc = rig.create_aead(aead::GCM, &k, true, 32).session_id;
    let dec = rig.create_aead(aead::GCM, &k, false, 32).session_id;
    let iv = pattern(12, 1);
    let aad = pattern(20, 2);
    let plain = pattern(1500, 3);
    let n = plain.len();
    let (s, used, out) =
        rig.run_data(0, &aead_hdr(enc, true, aad.len(), n, n + 16), &iv, &plain, &aad, n + 16);
    assert_eq!((s, used), (st::OK, n as u32 + 17));
    let core = new_cipher(CoreKind::Reference, Mode::Gcm, &k).unwrap();
    let mut expect = plain.clone();
    let mut tag = [0u8; 16];
    core.encrypt(&iv, &aad, &mut expect, &mut tag).unwrap();
    expect.extend_from_slice(&tag);
    assert_eq!(out, expect);

    let (s, _, back) = rig.run_data(0, &aead_hdr(dec, false, aad.len(), n + 16, n), &iv, &out, &aad, n);
    assert_eq!(s, st::OK);
    assert_eq!(back, plain);

    let mut forged = out.clone();
    forged[n + 3] ^= 1;
    let (s, used, dst) = rig.run_data(1, &aead_hdr(dec, false, aad.len(), n + 16, n), &iv, &forged, &aad, n);
    assert_eq!((s, used), (st::BADMSG, 1));
    assert!(dst.iter().all(|&b| b == 0), "no plaintext may be left behind");
    assert_eq!(rig.dev.stats().data_badmsg, 1);

    // AAD longer than the session announced, and an encrypt request on a decrypt session.
    let long = pattern(33, 0);
    let (s, _, _) = rig.run_data(0, &aead_hdr(enc, true, long.len(), n, n + 16), &iv, &plain, &long, n + 16);
    assert_eq!(s, st::ERR);
    let (s, _, _) = rig.run_data(0, &aead_hdr(dec, true, aad.len(), n, n + 16), &iv, &plain, &aad, n + 16);
    assert_eq!(s, st::ERR);
}

#[test]
fn invalid_data_requests_get_status_codes_and_the_device_keeps_working() {
    let cfg = DeviceConfig { max_size: 4096, ..small() };
    let mut rig = Rig::new(cfg);
    let k = key(16, 1);
    let enc = rig.create_cipher(cipher::AES_CBC, &k, true).session_id;
    let iv = [0u8; 16];
    let data = pattern(64, 0);
    let mut cases: Vec<(DataRequest, Vec<u8>, usize, u8)> = vec![
        (cipher_hdr(enc, true, cipher::AES_CBC, 12, 64), iv[..12].to_vec(), 64, st::ERR),
        (cipher_hdr(enc, false, cipher::AES_CBC, 16, 64), iv.to_vec(), 64, st::ERR),
        (cipher_hdr(77, true, cipher::AES_CBC, 16, 64), iv.to_vec(), 64, st::INVSESS),
        (cipher_hdr(enc, true, cipher::AES_CBC, 16, 60), iv.to_vec(), 60, st::ERR),
    ];
    let mut mismatched = cipher_hdr(enc, true, cipher::AES_CBC, 16, 64);
    mismatched.params = DataParams::Cipher { iv_len: 16, src_len: 64, dst_len: 48 };
    cases.push((mismatched, iv.to_vec(), 48, st::ERR));
    let mut aead_on_cipher = aead_hdr(enc, true, 0, 64, 80);
    aead_on_cipher.params =
        DataParams::Aead { iv_len: 12, aad_len: 0, src_len: 64, dst_len: 80, tag_len: 16 };
    cases.push((aead_on_cipher, iv[..12].to_vec(), 80, st::ERR));
    let mut unknown = cipher_hdr(enc, true, cipher::AES_CBC, 16, 64);
    unknown.opcode = crypto::opcode(crypto::service::HASH, 0);
    cases.push((unknown, iv.to_vec(), 64, st::NOTSUPP));
    for (hdr, iv, dst_len, want) in cases {
        let src = &data[..match hdr.params {
            DataParams::Cipher { src_len, .. } | DataParams::Aead { src_len, .. } => src_len as usize,
        }];
        let (s, used, _) = rig.run_data(0, &hdr, &iv, src, &[], dst_len);
        assert_eq!((s, used), (want, 1), "{hdr:?}");
    }
    // Larger than max_size: use scratch memory since it does not fit a slot.
    let big = pattern(8192, 1);
    let out = rig.alloc(8192 + 128, 16);
    let hdr = cipher_hdr(enc, true, cipher::AES_CBC, 16, big.len());
    let mut req = hdr.encode().to_vec();
    req.extend_from_slice(&iv);
    req.extend_from_slice(&big);
    let inb = rig.alloc(8193, 16);
    rig.write(out, &req);
    let head = rig
        .add_chain(
            0,
            &[
                Buf { iova: out, len: req.len() as u32, write: false },
                Buf { iova: inb, len: 8193, write: true },
            ],
        )
        .unwrap();
    assert_eq!(rig.wait_used(0), (head, 1));
    assert_eq!(rig.read(inb + 8192, 1)[0], st::ERR);
    // And a good one still works.
    let (s, _, ct) = rig.run_data(0, &cipher_hdr(enc, true, cipher::AES_CBC, 16, 64), &iv, &data, &[], 64);
    assert_eq!(s, st::OK);
    assert_eq!(ct, reference(Mode::Cbc, &k, true, &iv, &data));
    assert_eq!(rig.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn unmapped_buffer_fails_the_request_not_the_device() {
    let mut rig = Rig::new(small());
    let k = key(16, 1);
    let enc = rig.create_cipher(cipher::AES_CTR, &k, true).session_id;
    let iv = [1u8; 16];
    let src = pattern(256, 4);
    let slot = rig.slot(0, 0);
    let mut hdr = cipher_hdr(enc, true, cipher::AES_CTR, 16, 256).encode().to_vec();
    hdr.extend_from_slice(&iv);
    rig.write(slot, &hdr);
    let dst = slot + 1024;
    rig.write(dst, &[0xaa; 257]);
    let head = rig
        .add_chain(
            0,
            &[
                Buf { iova: slot, len: hdr.len() as u32, write: false },
                Buf { iova: 0x7000_0000, len: 256, write: false }, // not mapped
                Buf { iova: dst, len: 256, write: true },
                Buf { iova: dst + 256, len: 1, write: true },
            ],
        )
        .unwrap();
    assert_eq!(rig.wait_used(0), (head, 1));
    assert_eq!(rig.read(dst + 256, 1)[0], st::ERR);
    assert_eq!(rig.read(dst, 256), vec![0xaa; 256], "no data written");
    let (s, _, ct) = rig.run_data(0, &cipher_hdr(enc, true, cipher::AES_CTR, 16, 256), &iv, &src, &[], 256);
    assert_eq!(s, st::OK);
    assert_eq!(ct, reference(Mode::Ctr, &k, true, &iv, &src));
    assert_eq!(rig.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(rig.dev.stats().data_err, 1);
}

/// Puts something malformed on data queue 0 and checks the device asks for a reset, raises a
/// configuration interrupt, and works again after one.
fn expect_needs_reset(rig: &mut Rig, what: &str, break_it: impl FnOnce(&mut Rig)) {
    let ev = EventFd::new();
    rig.dev.set_irq_eventfd(0, Some(ev.dup())).unwrap();
    rig.cw(cc::CONFIG_MSIX_VECTOR, 2, 0);
    let broken_before = rig.dev.stats().rings_broken;
    break_it(rig);
    rig.kick(0);
    assert!(
        rig.wait_for(Duration::from_secs(5), |r| r.status() & status::DEVICE_NEEDS_RESET != 0),
        "{what}: DEVICE_NEEDS_RESET not set"
    );
    assert!(rig.wait_for(Duration::from_secs(1), |_| ev.take() > 0), "{what}: no config interrupt");
    assert_ne!(rig.cr(0x1000, 1) as u8 & pci::ISR_CONFIG, 0, "{what}: ISR config bit");
    assert_eq!(rig.dev.stats().rings_broken, broken_before + 1, "{what}");
    // The driver's answer: reset and start over.
    rig.init();
    rig.reset_scratch();
    let k = key(16, 2);
    let enc = rig.create_cipher(cipher::AES_CBC, &k, true).session_id;
    let src = pattern(32, 1);
    let (s, _, ct) =
        rig.run_data(0, &cipher_hdr(enc, true, cipher::AES_CBC, 16, 32), &[0; 16], &src, &[], 32);
    assert_eq!(s, st::OK, "{what}: device unusable after reset");
    assert_eq!(ct, reference(Mode::Cbc, &k, true, &[0; 16], &src));
    rig.dev.set_irq_eventfd(0, None).unwrap();
}

#[test]
fn malformed_rings_need_a_reset_and_never_panic() {
    let mut rig = Rig::new(small());
    let size = rig.queue_size;
    expect_needs_reset(&mut rig, "head out of range", |r| r.publish_only(0, size + 5));
    expect_needs_reset(&mut rig, "chain loop", |r| {
        let slot = r.slot(0, 0);
        r.raw_desc(0, 0, slot, 72, DESC_F_NEXT, 1);
        r.raw_desc(0, 1, slot, 8, DESC_F_NEXT, 0);
        r.publish_only(0, 0);
    });
    expect_needs_reset(&mut rig, "next out of range", |r| {
        r.raw_desc(0, 0, r.slot(0, 0), 72, DESC_F_NEXT, size);
        r.publish_only(0, 0);
    });
    expect_needs_reset(&mut rig, "readable after writable", |r| {
        let slot = r.slot(0, 0);
        r.raw_desc(0, 0, slot, 72, DESC_F_WRITE | DESC_F_NEXT, 1);
        r.raw_desc(0, 1, slot, 8, 0, 0);
        r.publish_only(0, 0);
    });
    expect_needs_reset(&mut rig, "indirect length not a multiple of 16", |r| {
        r.raw_desc(0, 0, r.slot(0, 0), 40, DESC_F_INDIRECT, 0);
        r.publish_only(0, 0);
    });
    expect_needs_reset(&mut rig, "nested indirect", |r| {
        let table = r.slot(0, 1);
        r.raw_desc(0, 0, table, 32, DESC_F_INDIRECT, 0);
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&table.to_le_bytes());
        d[8..12].copy_from_slice(&32u32.to_le_bytes());
        d[12..14].copy_from_slice(&DESC_F_INDIRECT.to_le_bytes());
        r.write(table, &d);
        r.publish_only(0, 0);
    });
    expect_needs_reset(&mut rig, "indirect table unmapped", |r| {
        r.raw_desc(0, 0, 0x5000_0000, 64, DESC_F_INDIRECT, 0);
        r.publish_only(0, 0);
    });
    expect_needs_reset(&mut rig, "status byte unmapped", |r| {
        let slot = r.slot(0, 0);
        r.raw_desc(0, 0, slot, 72, DESC_F_NEXT, 1);
        r.raw_desc(0, 1, 0x5000_0000, 1, DESC_F_WRITE, 0);
        r.publish_only(0, 0);
    });
    expect_needs_reset(&mut rig, "no writable part", |r| {
        r.raw_desc(0, 0, r.slot(0, 0), 72, 0, 0);
        r.publish_only(0, 0);
    });
    expect_needs_reset(&mut rig, "avail index jumps", |r| {
        let q = &r.queues[0];
        let at = q.avail + 2;
        let jump = q.next_avail.wrapping_add(size + 1);
        r.write(at, &jump.to_le_bytes());
    });
    expect_needs_reset(&mut rig, "ring unmapped under the device", |r| {
        // Re-place queue 0's rings at an unmapped IOVA and restart.
        r.set_status(0);
        r.enable_bus_master();
        r.set_status(status::ACKNOWLEDGE | status::DRIVER);
        r.write_driver_features(r.offered);
        r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        r.cw(cc::CONFIG_MSIX_VECTOR, 2, 0);
        r.cw(cc::QUEUE_SELECT, 2, 0);
        r.cw(cc::QUEUE_DESC, 8, 0x6000_0000);
        r.cw(cc::QUEUE_ENABLE, 2, 1);
        r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    });
}

#[test]
fn garbage_descriptors_and_headers_never_panic() {
    let cfg = DeviceConfig { data_queues: 2, workers: 2, ..Default::default() };
    let mut rig = Rig::with_sizes(cfg, 32, 4096);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mem_len = rig.mem.len() as u64;
    let mut descriptors = 0;
    for round in 0..300 {
        let k = key(16, round as u8);
        let session = rig.create_cipher(cipher::AES_CBC, &k, round % 2 == 0).session_id;
        let gcm = rig.create_aead(aead::GCM, &key(32, 1), true, 16).session_id;
        for q in 0..2usize {
            let size = rig.queue_size;
            if round % 2 == 0 {
                // Random descriptors, biased towards plausible addresses and flags.
                for i in 0..size {
                    let r = next();
                    let addr = match r % 4 {
                        0 => next(),
                        _ => IOVA_BASE + next() % mem_len,
                    };
                    let len = match (r >> 8) % 4 {
                        0 => next() as u32,
                        1 => 72,
                        _ => (next() % 300) as u32,
                    };
                    let flags = match (r >> 16) % 8 {
                        0 => next() as u16,
                        1 => DESC_F_INDIRECT,
                        2 | 3 => DESC_F_WRITE | DESC_F_NEXT,
                        4 => DESC_F_WRITE,
                        _ => DESC_F_NEXT,
                    };
                    let nxt = if r % 5 == 0 { next() as u16 } else { (next() % u64::from(size)) as u16 };
                    rig.raw_desc(q, i, addr, len, flags, nxt);
                    descriptors += 1;
                }
            } else {
                // Well-formed chains of three (request, destination, status) with random
                // lengths and addresses, so that requests get as far as validation.
                for k in 0..size / 3 {
                    let slot = rig.slot(q, k);
                    let r = next();
                    let src_len = 16 * (next() % 12) as u32;
                    let mut hdr = [0u8; 72];
                    let (mut out_len, mut dst_len) = (72 + 16 + src_len, src_len);
                    match r % 4 {
                        0 | 1 => {
                            let h =
                                cipher_hdr(session, round % 4 == 1, cipher::AES_CBC, 16, src_len as usize);
                            hdr = h.encode();
                        }
                        2 => {
                            let aad = (next() % 24) as usize;
                            hdr = aead_hdr(gcm, true, aad, src_len as usize, src_len as usize + 16).encode();
                            out_len += aad as u32;
                            dst_len += 16;
                        }
                        _ => hdr.iter_mut().for_each(|b| *b = next() as u8),
                    }
                    // Now and then, one field off by a little.
                    match (r >> 8) % 8 {
                        0 => out_len = out_len.wrapping_add((next() % 3) as u32).wrapping_sub(1),
                        1 => dst_len = (next() % 300) as u32,
                        2 => hdr[(next() % 72) as usize] ^= 1 << (next() % 8),
                        _ => {}
                    }
                    rig.write(slot, &hdr);
                    let dst = if r % 11 == 0 { 0x7000_0000 } else { slot + 2048 };
                    let status_at = if r % 13 == 0 { IOVA_BASE + next() % mem_len } else { slot + 4000 };
                    rig.raw_desc(q, 3 * k, slot, out_len, DESC_F_NEXT, 3 * k + 1);
                    rig.raw_desc(q, 3 * k + 1, dst, dst_len, DESC_F_WRITE | DESC_F_NEXT, 3 * k + 2);
                    rig.raw_desc(q, 3 * k + 2, status_at, 1, DESC_F_WRITE, 0);
                    descriptors += 3;
                }
            }
            // Plausible headers in the slots the descriptors may point at.
            for h in (0..size).filter(|_| round % 2 == 0) {
                let slot = rig.slot(q, h);
                let r = next();
                let src_len = (next() % 200) as u32;
                let hdr = if r % 3 == 0 {
                    aead_hdr(gcm, true, (next() % 20) as usize, src_len as usize, src_len as usize + 16)
                } else {
                    DataRequest {
                        opcode: [crypto::op::CIPHER_ENCRYPT, crypto::op::CIPHER_DECRYPT, next() as u32]
                            [r as usize % 3],
                        algo: cipher::AES_CBC,
                        session_id: if r % 7 == 0 { next() } else { session },
                        flag: 0,
                        params: DataParams::Cipher { iv_len: 16, src_len, dst_len: src_len },
                    }
                };
                rig.write(slot, &hdr.encode());
            }
            // Random heads, and sometimes a wild index.
            let n = 1 + next() % u64::from(size);
            for i in 0..n {
                let head = if round % 2 == 1 {
                    3 * (i as u16 % (size / 3))
                } else if next() % 10 == 0 {
                    next() as u16
                } else {
                    (next() % u64::from(size)) as u16
                };
                rig.publish_only(q, head);
            }
            rig.kick(q);
        }
        // Let the device chew, then start over as a driver would after DEVICE_NEEDS_RESET.
        rig.wait_for(Duration::from_millis(20), |r| {
            r.status() & status::DEVICE_NEEDS_RESET != 0
                || (0..2).all(|q| r.used_idx(q) == r.queues[q].next_avail)
        });
        rig.init();
    }
    assert!(descriptors >= 9000);
    let stats = rig.dev.stats();
    eprintln!("garbage: {stats:?}");
    assert!(stats.rings_broken > 10, "the garbage should break rings");
    assert!(stats.data_ok > 100 && stats.data_err > 100, "and still reach request validation");
    // Still a working device.
    let k = key(32, 9);
    let enc = rig.create_cipher(cipher::AES_CBC, &k, true).session_id;
    let src = pattern(96, 2);
    let (s, _, ct) =
        rig.run_data(1, &cipher_hdr(enc, true, cipher::AES_CBC, 16, 96), &[3; 16], &src, &[], 96);
    assert_eq!(s, st::OK);
    assert_eq!(ct, reference(Mode::Cbc, &k, true, &[3; 16], &src));
}

#[test]
fn out_of_order_latency_and_inflight_limit_complete_everything_once() {
    let cfg = DeviceConfig {
        data_queues: 2,
        workers: 2,
        latency: Duration::from_micros(20),
        latency_jitter: Duration::from_micros(300),
        inflight_limit: 5,
        out_of_order: true,
        seed: 42,
        ..Default::default()
    };
    let mut rig = Rig::with_sizes(cfg, 16, 1024);
    let k = key(32, 7);
    let session = rig.create_cipher(cipher::AES_CTR, &k, true).session_id;
    let total = 1500usize;
    let mut submitted = 0usize;
    let mut done = 0usize;
    let mut expect: [std::collections::HashMap<u16, (usize, u64)>; 2] = Default::default();
    let mut completion_order = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < total {
        assert!(Instant::now() < deadline, "stalled at {done}/{total}");
        for (q, expect) in expect.iter_mut().enumerate() {
            while submitted < total {
                let n = submitted;
                let iv = pattern(16, n as u8);
                let src = pattern(64 + n % 128, (n >> 3) as u8);
                let hdr = cipher_hdr(session, true, cipher::AES_CTR, 16, src.len());
                let Some((head, dst)) = rig.submit_data(q, &hdr, &iv, &src, &[], src.len()) else { break };
                assert!(expect.insert(head, (n, dst)).is_none());
                submitted += 1;
            }
            while let Some((head, len)) = rig.try_used(q) {
                let (n, dst) = expect.remove(&head).expect("completed twice or never submitted");
                let iv = pattern(16, n as u8);
                let src = pattern(64 + n % 128, (n >> 3) as u8);
                assert_eq!(len as usize, src.len() + 1);
                let out = rig.read(dst, src.len() + 1);
                assert_eq!(out[src.len()], st::OK);
                assert_eq!(out[..src.len()], reference(Mode::Ctr, &k, true, &iv, &src)[..], "request {n}");
                completion_order.push(n);
                done += 1;
            }
        }
        std::thread::yield_now();
    }
    assert!(expect.iter().all(|m| m.is_empty()));
    let stats = rig.dev.stats();
    assert_eq!(stats.data_completed, total as u64);
    assert!(stats.max_in_flight <= 5, "in flight {}", stats.max_in_flight);
    assert!(stats.max_in_flight >= 2);
    let overtaken = completion_order.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(overtaken > 0, "no request completed out of order");
}

#[test]
fn reset_drops_requests_in_flight_without_completing_them() {
    // The request would take a second; a reset must not wait for it (bounds are loose so that
    // a loaded CI machine cannot fail the test by scheduling alone).
    let cfg = DeviceConfig { latency: Duration::from_millis(1000), ..small() };
    let mut rig = Rig::new(cfg);
    let enc = rig.create_cipher(cipher::AES_CBC, &key(16, 1), true).session_id;
    let (_, dst) = rig
        .submit_data(0, &cipher_hdr(enc, true, cipher::AES_CBC, 16, 32), &[0; 16], &[1; 32], &[], 32)
        .unwrap();
    assert!(rig.wait_for(Duration::from_secs(2), |r| r.dev.stats().max_in_flight == 1));
    let t = Instant::now();
    rig.set_status(0);
    assert!(t.elapsed() < Duration::from_millis(500), "reset waited for the request");
    assert_eq!(rig.status(), 0);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(rig.used_idx(0), 0, "a request completed after reset");
    let stats = rig.dev.stats();
    assert_eq!((stats.data_completed, stats.dropped_by_reset), (0, 1));
    let _ = dst;
    // Function-level reset also turns bus mastering off.
    rig.init();
    rig.dev.reset();
    let mut cmd = [0u8; 2];
    rig.dev.config_read(cfg::COMMAND, &mut cmd);
    assert_eq!(u16::from_le_bytes(cmd), 0);
    assert_eq!(rig.status(), 0);
}

#[test]
fn no_dma_without_bus_mastering() {
    let mut rig = Rig::new(small());
    let enc = rig.create_cipher(cipher::AES_CBC, &key(16, 1), true).session_id;
    rig.dev.config_write(cfg::COMMAND, &pci::COMMAND_MEMORY.to_le_bytes());
    let (head, dst) = rig
        .submit_data(0, &cipher_hdr(enc, true, cipher::AES_CBC, 16, 32), &[0; 16], &[1; 32], &[], 32)
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.used_idx(0), 0);
    assert_eq!(rig.read(dst, 33), vec![0xaa; 33]);
    rig.enable_bus_master();
    assert_eq!(rig.wait_used(0), (head, 33));
}

#[test]
fn interrupts_follow_the_event_index() {
    let mut rig = Rig::new(small());
    let ev = EventFd::new();
    rig.dev.set_irq_eventfd(1, Some(ev.dup())).unwrap();
    assert!(rig.dev.set_irq_eventfd(9, None).is_err());
    let enc = rig.create_cipher(cipher::AES_CBC, &key(16, 1), true).session_id;
    // try_used sets used_event to "next element", so every completion batch interrupts.
    for _ in 0..5 {
        let (s, _, _) =
            rig.run_data(0, &cipher_hdr(enc, true, cipher::AES_CBC, 16, 32), &[0; 16], &[1; 32], &[], 32);
        assert_eq!(s, st::OK);
    }
    assert!(rig.wait_for(Duration::from_secs(1), |_| ev.take() > 0));
    assert!(rig.dev.stats().interrupts >= 1);
    assert_ne!(rig.cr(0x1000, 1) as u8 & pci::ISR_QUEUE, 0);
    assert_eq!(rig.cr(0x1000, 1), 0, "ISR is read-to-clear");
    // With used_event far ahead, completions do not interrupt.
    let q = &rig.queues[0];
    let far = q.last_used.wrapping_add(1000);
    let at = q.avail + crypt_vfio_spec::ring::used_event_offset(q.size);
    rig.write(at, &far.to_le_bytes());
    std::thread::sleep(Duration::from_millis(20));
    ev.take();
    let before = rig.dev.stats().interrupts;
    let (head, _) = rig
        .submit_data(0, &cipher_hdr(enc, true, cipher::AES_CBC, 16, 32), &[0; 16], &[1; 32], &[], 32)
        .unwrap();
    assert!(rig.wait_for(Duration::from_secs(5), |r| r.used_idx(0) == r.queues[0].next_avail));
    assert_eq!(rig.harvest_raw(0).map(|u| u.0), Some(head));
    assert_eq!(rig.dev.stats().interrupts, before);
}

#[test]
fn scattered_indirect_and_cross_mapping_buffers() {
    let mut rig = Rig::new(small());
    let k = key(32, 4);
    let enc = rig.create_cipher(cipher::AES_CBC, &k, true).session_id;
    let iv = pattern(16, 8);
    let plain = pattern(4096, 6);
    let expect = reference(Mode::Cbc, &k, true, &iv, &plain);
    let mut out = cipher_hdr(enc, true, cipher::AES_CBC, 16, plain.len()).encode().to_vec();
    out.extend_from_slice(&iv);
    out.extend_from_slice(&plain);

    // Header, IV and source split over several descriptors; destination in three pieces (the
    // bounce path); status on its own.
    let a = rig.alloc(out.len(), 16);
    rig.write(a, &out);
    let d = rig.alloc(4097, 16);
    let pieces = [(0u64, 50u32), (50, 38), (88, 1000), (1088, out.len() as u32 - 1088)];
    let mut bufs: Vec<Buf> = pieces.iter().map(|&(o, l)| Buf { iova: a + o, len: l, write: false }).collect();
    bufs.push(Buf { iova: d, len: 1000, write: true });
    bufs.push(Buf { iova: d + 1000, len: 3000, write: true });
    bufs.push(Buf { iova: d + 4000, len: 96, write: true });
    bufs.push(Buf { iova: d + 4096, len: 1, write: true });
    let head = rig.add_chain(0, &bufs).unwrap();
    assert_eq!(rig.wait_used(0), (head, 4097));
    assert_eq!(rig.read(d + 4096, 1)[0], st::OK);
    assert_eq!(rig.read(d, 4096), expect);

    // The same through an indirect table.
    let table = rig.alloc(16 * bufs.len(), 16);
    rig.write(d, &[0; 4097]);
    let head = rig.add_indirect(1, table, &bufs).unwrap();
    assert_eq!(rig.wait_used(1), (head, 4097));
    assert_eq!(rig.read(d, 4096), expect);

    // Buffers that straddle two separate IOMMU mappings which are adjacent in IOVA space.
    let lo = DmaMem::new(2 * PAGE);
    let hi = DmaMem::new(2 * PAGE);
    let base = 0x8_0000_0000u64;
    lo.map(&rig.dev, base);
    hi.map(&rig.dev, base + 2 * PAGE as u64);
    let src_at = base + 2 * PAGE as u64 - 100 - out.len() as u64 + 2000; // crosses at byte ~1900
    let dst_at = base + 2 * PAGE as u64 - 1000;
    // `lo` and `hi` are contiguous in IOVA space only, so the test copies byte by byte.
    let write_split = |iova: u64, data: &[u8]| {
        for (i, &b) in data.iter().enumerate() {
            let at = iova + i as u64 - base;
            let (m, off) = if at < 2 * PAGE as u64 { (&lo, at) } else { (&hi, at - 2 * PAGE as u64) };
            // SAFETY: inside the allocation.
            unsafe { *m.ptr(off as usize) = b };
        }
    };
    let read_split = |iova: u64, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| {
                let at = iova + i as u64 - base;
                let (m, off) = if at < 2 * PAGE as u64 { (&lo, at) } else { (&hi, at - 2 * PAGE as u64) };
                // SAFETY: inside the allocation.
                unsafe { *m.ptr(off as usize) }
            })
            .collect()
    };
    write_split(src_at, &out);
    let head = rig
        .add_chain(
            0,
            &[
                Buf { iova: src_at, len: out.len() as u32, write: false },
                Buf { iova: dst_at, len: 4097, write: true },
            ],
        )
        .unwrap();
    assert_eq!(rig.wait_used(0), (head, 4097));
    let got = read_split(dst_at, 4097);
    assert_eq!(got[4096], st::OK);
    assert_eq!(got[..4096], expect[..]);
    rig.dev.dma_unmap(base, 2 * PAGE as u64).unwrap();
    rig.dev.dma_unmap(base + 2 * PAGE as u64, 2 * PAGE as u64).unwrap();
    assert!(rig.dev.dma_unmap(base, 2 * PAGE as u64).is_err());
}

#[test]
fn null_crypto_and_injected_errors() {
    let mut rig = Rig::new(DeviceConfig { null_crypto: true, ..small() });
    let enc = rig.create_cipher(cipher::AES_CBC, &key(16, 1), true).session_id;
    let (s, used, dst) =
        rig.run_data(0, &cipher_hdr(enc, true, cipher::AES_CBC, 16, 64), &[0; 16], &[1; 64], &[], 64);
    assert_eq!((s, used), (st::OK, 65));
    assert_eq!(dst, vec![0xaa; 64], "null crypto writes no data");
    // Validation still applies.
    let (s, _, _) =
        rig.run_data(0, &cipher_hdr(99, true, cipher::AES_CBC, 16, 64), &[0; 16], &[1; 64], &[], 64);
    assert_eq!(s, st::INVSESS);

    let mut rig = Rig::new(DeviceConfig { error_rate: 1.0, ..small() });
    let enc = rig.create_cipher(cipher::AES_CBC, &key(16, 1), true).session_id;
    for _ in 0..3 {
        let (s, used, dst) =
            rig.run_data(1, &cipher_hdr(enc, true, cipher::AES_CBC, 16, 64), &[0; 16], &[1; 64], &[], 64);
        assert_eq!((s, used), (st::ERR, 1));
        assert_eq!(dst, vec![0xaa; 64]);
    }
    let stats = rig.dev.stats();
    assert_eq!((stats.data_err, stats.data_injected_errors), (3, 3));
}

#[test]
fn without_event_idx_the_flags_suppress_notifications() {
    let mut rig = Rig::new(small());
    rig.accept = !(1 << feature::RING_EVENT_IDX | 1 << feature::RING_INDIRECT_DESC);
    rig.init();
    let ev = EventFd::new();
    rig.dev.set_irq_eventfd(1, Some(ev.dup())).unwrap();
    let enc = rig.create_cipher(cipher::AES_CTR, &key(16, 1), true).session_id;
    for i in 0..20 {
        let (s, _, _) =
            rig.run_data(0, &cipher_hdr(enc, true, cipher::AES_CTR, 16, 40), &[i; 16], &[i; 40], &[], 40);
        assert_eq!(s, st::OK);
        if i % 5 == 0 {
            // Let the worker go to sleep, which it announces by clearing NO_NOTIFY.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(rig.wait_for(Duration::from_secs(1), |_| ev.take() > 0), "interrupts without NO_INTERRUPT");
    // The driver turns interrupts off with the flag.
    rig.write(rig.queues[0].avail, &crypt_vfio_spec::ring::AVAIL_F_NO_INTERRUPT.to_le_bytes());
    std::thread::sleep(Duration::from_millis(20));
    ev.take();
    let before = rig.dev.stats().interrupts;
    let (s, _, _) =
        rig.run_data(0, &cipher_hdr(enc, true, cipher::AES_CTR, 16, 40), &[0; 16], &[0; 40], &[], 40);
    assert_eq!(s, st::OK);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.dev.stats().interrupts, before);
    // Indirect descriptors were not negotiated.
    rig.raw_desc(0, 0, rig.slot(0, 5), 32, DESC_F_INDIRECT, 0);
    rig.publish_only(0, 0);
    rig.kick(0);
    assert!(rig.wait_for(Duration::from_secs(5), |r| r.status() & status::DEVICE_NEEDS_RESET != 0));
}
