//! Known-answer tests: NIST CAVP and Wycheproof vectors through the emulated device (with each
//! AES core) and through the software engine, so that every path and both cores are checked
//! against published answers, including the cases that must fail authentication.

mod common;

use common::{crypt, device_with, nist, SyncQueue};
use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{Buf, Direction, Engine};
use crypt_vfio::transport::emulated::EmulatedConfig;
use crypt_vfio::virtio_crypto::DeviceOptions;
use crypt_vfio::{CoreKind, CryptoError, Error, Mode};
use wycheproof::TestResult;

/// Alternates ordinary memory (bounced) and DMA buffers (zero copy).
fn buf<E: Engine>(engine: &E, data: &[u8], n: usize) -> Buf {
    if n % 2 == 0 {
        Buf::Host(data.to_vec())
    } else {
        let mut b = engine.alloc_buffer(data.len()).unwrap();
        b.as_mut_slice().copy_from_slice(data);
        b
    }
}

#[derive(Default, Debug)]
struct Tally {
    passed: usize,
    skipped: usize,
}

fn gcm_nist<E: Engine>(engine: &E, q: &mut SyncQueue<E::Session>, t: &mut Tally) {
    for bits in [128, 256] {
        for r in nist(&format!("gcm-encrypt-{bits}.rsp")) {
            let s = engine.create_session(Mode::Gcm, &r.hex("KEY")).unwrap();
            let pt = r.hex("PT");
            let (ct, tag) = crypt(
                q,
                s.clone(),
                Direction::Encrypt,
                &r.hex("IV"),
                &r.hex("AAD"),
                buf(engine, &pt, t.passed),
                [0; 16],
            )
            .unwrap();
            assert_eq!(ct, r.hex("CT"), "GCM-{bits} encrypt {:?}", r.fields);
            assert_eq!(tag.to_vec(), r.hex("TAG"), "GCM-{bits} tag {:?}", r.fields);
            engine.destroy_session(&s).unwrap();
            t.passed += 1;
        }
        for r in nist(&format!("gcm-decrypt-{bits}.rsp")) {
            let s = engine.create_session(Mode::Gcm, &r.hex("KEY")).unwrap();
            let tag: [u8; 16] = r.hex("TAG").try_into().unwrap();
            let out = crypt(
                q,
                s.clone(),
                Direction::Decrypt,
                &r.hex("IV"),
                &r.hex("AAD"),
                buf(engine, &r.hex("CT"), t.passed),
                tag,
            );
            if r.fail {
                assert!(
                    matches!(out, Err(Error::Crypto(CryptoError::AuthFailed))),
                    "GCM-{bits} must fail authentication: {:?}",
                    r.fields
                );
            } else {
                assert_eq!(out.unwrap().0, r.hex("PT"), "GCM-{bits} decrypt {:?}", r.fields);
            }
            engine.destroy_session(&s).unwrap();
            t.passed += 1;
        }
    }
}

fn block_nist<E: Engine>(engine: &E, q: &mut SyncQueue<E::Session>, t: &mut Tally) {
    let mut files = vec![];
    for bits in [128, 256] {
        files.push((Mode::Xts, format!("xts-{bits}.rsp"), "KEY", "I", "PT", "CT"));
    }
    for bits in [128, 192, 256] {
        files.push((Mode::Cbc, format!("cbc-mmt-{bits}.rsp"), "KEY", "IV", "PLAINTEXT", "CIPHERTEXT"));
        files.push((Mode::Ctr, format!("ctr-{bits}.rsp"), "KEY", "IV", "PLAINTEXT", "CIPHERTEXT"));
    }
    for (mode, file, k, iv, p, c) in files {
        for r in nist(&file) {
            let key = r.hex(k);
            if mode == Mode::Xts && key[..key.len() / 2] == key[key.len() / 2..] {
                t.skipped += 1;
                continue;
            }
            let s = engine.create_session(mode, &key).unwrap();
            let decrypt = r.section.contains("DECRYPT");
            let (dir, input, expect) = if decrypt {
                (Direction::Decrypt, r.hex(c), r.hex(p))
            } else {
                (Direction::Encrypt, r.hex(p), r.hex(c))
            };
            let (out, _) = crypt(q, s.clone(), dir, &r.hex(iv), &[], buf(engine, &input, t.passed), [0; 16])
                .unwrap_or_else(|e| panic!("{file} {:?}: {e}", r.fields));
            assert_eq!(out, expect, "{file} {:?}", r.fields);
            engine.destroy_session(&s).unwrap();
            t.passed += 1;
        }
    }
}

fn gcm_wycheproof<E: Engine>(engine: &E, q: &mut SyncQueue<E::Session>, t: &mut Tally) {
    let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesGcm).unwrap();
    for g in set.test_groups {
        let usable = g.nonce_size == 96 && g.tag_size == 128 && (g.key_size == 128 || g.key_size == 256);
        for tc in g.tests {
            if !usable || tc.result == TestResult::Acceptable {
                t.skipped += 1;
                continue;
            }
            let s = engine.create_session(Mode::Gcm, &tc.key).unwrap();
            let tag: [u8; 16] = tc.tag[..].try_into().unwrap();
            let dec = crypt(
                q,
                s.clone(),
                Direction::Decrypt,
                &tc.nonce,
                &tc.aad,
                buf(engine, &tc.ct, t.passed),
                tag,
            );
            match tc.result {
                TestResult::Valid => {
                    assert_eq!(dec.unwrap().0, &tc.pt[..], "wycheproof GCM {} {}", tc.tc_id, tc.comment);
                    let (ct, tag2) = crypt(
                        q,
                        s.clone(),
                        Direction::Encrypt,
                        &tc.nonce,
                        &tc.aad,
                        buf(engine, &tc.pt, t.passed),
                        [0; 16],
                    )
                    .unwrap();
                    assert_eq!(
                        (&ct[..], &tag2[..]),
                        (&tc.ct[..], &tc.tag[..]),
                        "wycheproof GCM {}",
                        tc.tc_id
                    );
                }
                _ => assert!(
                    matches!(dec, Err(Error::Crypto(CryptoError::AuthFailed))),
                    "wycheproof GCM {} ({}) must fail authentication, got {dec:?}",
                    tc.tc_id,
                    tc.comment
                ),
            }
            engine.destroy_session(&s).unwrap();
            t.passed += 1;
        }
    }
}

fn xts_wycheproof<E: Engine>(engine: &E, q: &mut SyncQueue<E::Session>, t: &mut Tally) {
    let set = wycheproof::cipher::TestSet::load(wycheproof::cipher::TestName::AesXts).unwrap();
    for g in set.test_groups {
        // AES-192-XTS is not a virtio-crypto or dm-crypt cipher, and the device takes a 16-byte
        // tweak: Wycheproof's groups with shorter IVs pad them their own way.
        let usable = g.nonce_size == 128 && (g.key_size == 256 || g.key_size == 512);
        for tc in g.tests {
            let key = &tc.key[..];
            if !usable || tc.result == TestResult::Acceptable || key[..key.len() / 2] == key[key.len() / 2..]
            {
                t.skipped += 1;
                continue;
            }
            let s = engine.create_session(Mode::Xts, key).unwrap();
            let out = crypt(
                q,
                s.clone(),
                Direction::Encrypt,
                &tc.nonce,
                &[],
                buf(engine, &tc.pt, t.passed),
                [0; 16],
            );
            match tc.result {
                TestResult::Valid => {
                    assert_eq!(out.unwrap().0, &tc.ct[..], "wycheproof XTS {} {}", tc.tc_id, tc.comment);
                    let back = crypt(
                        q,
                        s.clone(),
                        Direction::Decrypt,
                        &tc.nonce,
                        &[],
                        Buf::Host(tc.ct.to_vec()),
                        [0; 16],
                    );
                    assert_eq!(back.unwrap().0, &tc.pt[..]);
                }
                _ => assert!(
                    out.as_ref().map_or(true, |(ct, _)| ct[..] != tc.ct[..]),
                    "wycheproof XTS {} ({}) is invalid but was accepted",
                    tc.tc_id,
                    tc.comment
                ),
            }
            engine.destroy_session(&s).unwrap();
            t.passed += 1;
        }
    }
}

fn all_vectors<E: Engine>(engine: &E) -> Tally
where
    E::Session: Send,
{
    let mut q = SyncQueue::open(engine, 0);
    let mut t = Tally::default();
    gcm_nist(engine, &mut q, &mut t);
    block_nist(engine, &mut q, &mut t);
    gcm_wycheproof(engine, &mut q, &mut t);
    xts_wycheproof(engine, &mut q, &mut t);
    t
}

#[test]
fn emulated_device_with_the_fast_core_matches_every_vector() {
    let (dev, _t) =
        device_with(EmulatedConfig { core: CoreKind::Fast, ..Default::default() }, &DeviceOptions::default());
    let t = all_vectors(&dev);
    assert!(t.passed >= 600, "{t:?}");
}

#[test]
fn emulated_device_with_the_reference_core_matches_every_vector() {
    let (dev, _t) = device_with(
        EmulatedConfig { core: CoreKind::Reference, ..Default::default() },
        &DeviceOptions::default(),
    );
    let t = all_vectors(&dev);
    assert!(t.passed >= 600, "{t:?}");
}

#[test]
fn emulated_device_without_indirect_descriptors_matches_the_vectors() {
    let options = DeviceOptions { indirect: false, event_idx: false, ..Default::default() };
    let (dev, _t) = device_with(EmulatedConfig::default(), &options);
    let mut q = SyncQueue::open(&dev, 0);
    let mut t = Tally::default();
    gcm_nist(&dev, &mut q, &mut t);
    block_nist(&dev, &mut q, &mut t);
    assert!(t.passed > 400, "{t:?}");
}

#[test]
fn software_engine_matches_every_vector_with_both_cores() {
    for core in [CoreKind::Fast, CoreKind::Reference] {
        let t = all_vectors(&SoftwareEngine::new(core));
        assert!(t.passed >= 600, "{core}: {t:?}");
    }
}
