//! Bad input gets a typed error that names the problem, and leaves the device usable.

mod common;

use common::{crypt, device, device_with, SyncQueue};
use crypt_vfio::engine::software::SoftwareEngine;
use crypt_vfio::engine::{Buf, Direction, Engine, Iv, Request, SubmitErrorKind};
use crypt_vfio::transport::emulated::EmulatedConfig;
use crypt_vfio::virtio_crypto::DeviceOptions;
use crypt_vfio::{CoreKind, CryptoError, Error, Mode, VfioError};
use crypt_vfio_spec::crypto::cipher;

const KEY: [u8; 32] = [9; 32];

/// After a failure, a good request still works on the same queue.
fn still_works<E: Engine>(engine: &E, q: &mut SyncQueue<E::Session>)
where
    E::Session: Send,
{
    let s = engine.create_session(Mode::Cbc, &KEY).unwrap();
    let (ct, _) =
        crypt(q, s.clone(), Direction::Encrypt, &[1; 16], &[], Buf::Host(vec![5; 64]), [0; 16]).unwrap();
    let (pt, _) = crypt(q, s.clone(), Direction::Decrypt, &[1; 16], &[], Buf::Host(ct), [0; 16]).unwrap();
    assert_eq!(pt, vec![5; 64]);
    engine.destroy_session(&s).unwrap();
}

#[test]
fn wrong_key_lengths_are_refused_with_the_lengths_named() {
    let dev = device();
    let sw = SoftwareEngine::new(CoreKind::Fast);
    for (mode, len) in
        [(Mode::Gcm, 24), (Mode::Gcm, 8), (Mode::Xts, 16), (Mode::Xts, 40), (Mode::Cbc, 17), (Mode::Ctr, 0)]
    {
        let key = vec![1u8; len];
        for r in [dev.create_session(mode, &key).err(), sw.create_session(mode, &key).err()] {
            match r {
                Some(Error::Crypto(CryptoError::KeyLength { mode: m, len: l, expected })) => {
                    assert_eq!((m, l), (mode, len));
                    assert!(!expected.is_empty());
                    let msg = Error::Crypto(CryptoError::KeyLength { mode: m, len: l, expected }).to_string();
                    assert!(msg.contains(&format!("{len}-byte key")), "{msg}");
                }
                other => panic!("{mode} with {len} bytes: {other:?}"),
            }
        }
    }
    let mut q = SyncQueue::open(&dev, 0);
    still_works(&dev, &mut q);
}

#[test]
fn xts_key_with_equal_halves_is_rejected() {
    let dev = device();
    assert!(matches!(
        dev.create_session(Mode::Xts, &[7; 64]),
        Err(Error::Crypto(CryptoError::KeyRejected(_)))
    ));
    let mut q = SyncQueue::open(&dev, 0);
    still_works(&dev, &mut q);
}

#[test]
fn an_algorithm_the_device_does_not_offer_is_not_supported() {
    let config =
        EmulatedConfig { aead_algos: vec![], cipher_algos: vec![cipher::AES_CBC], ..Default::default() };
    let (dev, _t) = device_with(config, &DeviceOptions::default());
    assert!(!dev.info().advertises(Mode::Gcm));
    for mode in [Mode::Gcm, Mode::Xts, Mode::Ctr] {
        let key: Vec<u8> = (0..mode.key_lengths()[0] as u8).collect();
        let r = dev.create_session(mode, &key);
        assert!(matches!(r, Err(Error::Crypto(CryptoError::NotSupported(_)))), "{mode}: {r:?}");
        assert!(!dev.probe(mode, key.len()).unwrap());
    }
    assert!(dev.probe(Mode::Cbc, 16).unwrap());
    let mut q = SyncQueue::open(&dev, 0);
    still_works(&dev, &mut q);
}

#[test]
fn a_destroyed_session_is_an_invalid_session() {
    let dev = device();
    let mut q = SyncQueue::open(&dev, 0);
    let s = dev.create_session(Mode::Ctr, &KEY).unwrap();
    dev.destroy_session(&s).unwrap();
    let r = crypt(&mut q, s.clone(), Direction::Encrypt, &[0; 16], &[], Buf::Host(vec![0; 32]), [0; 16]);
    assert!(matches!(r, Err(Error::Crypto(CryptoError::InvalidSession))), "{r:?}");
    assert!(matches!(dev.destroy_session(&s), Err(Error::Crypto(CryptoError::InvalidSession))));
    still_works(&dev, &mut q);
}

#[test]
fn an_oversized_request_comes_back_whole_with_the_limit() {
    let config = EmulatedConfig { max_size: 64 * 1024, ..Default::default() };
    let (dev, _t) = device_with(config, &DeviceOptions::default());
    let mut q = SyncQueue::open(&dev, 0);
    let s = dev.create_session(Mode::Ctr, &KEY).unwrap();
    let req =
        Request::new(s, Direction::Encrypt, Iv::from([0; 16]), Buf::Host(vec![0xaa; 64 * 1024 + 16]), 1);
    let e = q.try_submit(req).unwrap_err();
    match e.kind {
        SubmitErrorKind::Rejected(Error::Crypto(CryptoError::TooLarge { len, max })) => {
            assert_eq!((len, max), (64 * 1024 + 16, 64 * 1024))
        }
        k => panic!("{k:?}"),
    }
    assert_eq!(
        e.request.data.as_slice(),
        &vec![0xaa; 64 * 1024 + 16][..],
        "the request comes back untouched"
    );
    still_works(&dev, &mut q);
}

#[test]
fn a_buffer_not_mapped_for_the_device_is_refused() {
    let dev = device();
    let other = device();
    let mut q = SyncQueue::open(&dev, 0);
    let s = dev.create_session(Mode::Ctr, &KEY).unwrap();
    let foreign = other.alloc_buffer(4096).unwrap();
    let req = Request::new(s, Direction::Encrypt, Iv::from([0; 16]), foreign, 1);
    let e = q.try_submit(req).unwrap_err();
    assert!(
        matches!(e.kind, SubmitErrorKind::Rejected(Error::Vfio(VfioError::Dma(ref m))) if m.contains("not mapped")),
        "{:?}",
        e.kind
    );
    still_works(&dev, &mut q);
}

#[test]
fn wrong_iv_and_data_lengths_are_invalid_requests() {
    let dev = device();
    let mut q = SyncQueue::open(&dev, 0);
    let cbc = dev.create_session(Mode::Cbc, &KEY).unwrap();
    let gcm = dev.create_session(Mode::Gcm, &KEY).unwrap();
    let cases = [
        (cbc.clone(), &[0u8; 12][..], 32usize, "16-byte IV"),
        (cbc.clone(), &[0u8; 16][..], 30, "multiple of 16"),
        (gcm, &[0u8; 16][..], 32, "12-byte IV"),
    ];
    for (s, iv, len, words) in cases {
        let req = Request::new(s, Direction::Encrypt, Iv::new(iv).unwrap(), Buf::Host(vec![0; len]), 1);
        let e = q.try_submit(req).unwrap_err();
        match e.kind {
            SubmitErrorKind::Rejected(Error::Crypto(CryptoError::InvalidRequest(m))) => {
                assert!(m.contains(words), "{m}")
            }
            k => panic!("{k:?}"),
        }
    }
    let mut req = Request::new(cbc, Direction::Encrypt, Iv::from([0; 16]), Buf::Host(vec![0; 32]), 1);
    req.aad = vec![1, 2, 3];
    assert!(matches!(
        q.try_submit(req).unwrap_err().kind,
        SubmitErrorKind::Rejected(Error::Crypto(CryptoError::InvalidRequest(_)))
    ));
    still_works(&dev, &mut q);
}

#[test]
fn a_modified_gcm_tag_fails_authentication_without_releasing_plaintext() {
    let dev = device();
    let mut q = SyncQueue::open(&dev, 0);
    let s = dev.create_session(Mode::Gcm, &KEY).unwrap();
    let secret = b"attack at dawn, bring snacks....".to_vec();
    let (ct, mut tag) =
        crypt(&mut q, s.clone(), Direction::Encrypt, &[4; 12], b"hdr", Buf::Host(secret.clone()), [0; 16])
            .unwrap();
    tag[0] ^= 1;
    let mut req = Request::new(
        s.clone(),
        Direction::Decrypt,
        Iv::from([4; 12]),
        dev.alloc_buffer(ct.len()).unwrap(),
        2,
    );
    req.data.as_mut_slice().copy_from_slice(&ct);
    req.aad = b"hdr".to_vec();
    req.tag = tag;
    let c = q.run(req);
    assert!(matches!(c.result, Err(Error::Crypto(CryptoError::AuthFailed))), "{:?}", c.result);
    assert!(c.request.data.as_slice().iter().all(|&b| b == 0), "no plaintext after a failed tag check");
    let r = crypt(&mut q, s, Direction::Decrypt, &[4; 12], b"hdx", Buf::Host(ct), {
        tag[0] ^= 1;
        tag
    });
    assert!(matches!(r, Err(Error::Crypto(CryptoError::AuthFailed))), "modified AAD must fail too");
    still_works(&dev, &mut q);
}
