//! The fast core's XTS for every key size it takes: IEEE 1619-2007 vectors (including ciphertext
//! stealing) and a randomized cross-check against the reference core (RustCrypto `xts-mode`)
//! over many keys, tweaks and lengths, both directions. Wycheproof and NIST XTSGenAES vectors run
//! through the engines in the main crate's `tests/kat.rs`.

use crypt_vfio_cores::{new_cipher, CoreError, CoreKind, Mode};
use rand::{Rng, RngCore, SeedableRng};

/// IEEE Std 1619-2007 Annex B: vectors 2, 3 and 15 to 18 (AES-128; vector 1 has equal key
/// halves, which the cores refuse). (key, data unit number, plaintext, ciphertext)
const IEEE_1619: &[(&str, u64, &str, &str)] = &[
    (
        "1111111111111111111111111111111122222222222222222222222222222222",
        0x3333333333,
        "4444444444444444444444444444444444444444444444444444444444444444",
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
    ),
    (
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f022222222222222222222222222222222",
        0x3333333333,
        "4444444444444444444444444444444444444444444444444444444444444444",
        "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
    ),
    (
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0",
        0x123456789a,
        "000102030405060708090a0b0c0d0e0f10",
        "6c1625db4671522d3d7599601de7ca09ed",
    ),
    (
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0",
        0x123456789a,
        "000102030405060708090a0b0c0d0e0f1011",
        "d069444b7a7e0cab09e24447d24deb1fedbf",
    ),
    (
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0",
        0x123456789a,
        "000102030405060708090a0b0c0d0e0f101112",
        "e5df1351c0544ba1350b3363cd8ef4beedbf9d",
    ),
    (
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0",
        0x123456789a,
        "000102030405060708090a0b0c0d0e0f10111213",
        "9d84c813f719aa2c7be3f66171c7c5c2edbf9dac",
    ),
];

#[test]
fn ieee_1619_vectors_on_both_cores() {
    for kind in [CoreKind::Fast, CoreKind::Reference] {
        for (key, unit, pt, ct) in IEEE_1619 {
            let c = new_cipher(kind, Mode::Xts, &hex::decode(key).unwrap()).unwrap();
            let mut iv = [0u8; 16];
            iv[..8].copy_from_slice(&unit.to_le_bytes());
            let mut data = hex::decode(pt).unwrap();
            c.encrypt(&iv, &[], &mut data, &mut []).unwrap();
            assert_eq!(hex::encode(&data), *ct, "{kind} encrypt, unit {unit:#x}, {} bytes", data.len());
            c.decrypt(&iv, &[], &mut data, &[]).unwrap();
            assert_eq!(hex::encode(&data), *pt, "{kind} decrypt, unit {unit:#x}");
        }
    }
}

#[test]
fn fast_xts_matches_the_reference_for_random_keys_tweaks_and_lengths() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1619);
    // Every length up to a few batches, then sector sizes, then random lengths with partial blocks.
    let mut lengths: Vec<usize> = (16..=1100).collect();
    lengths.extend([4095, 4096, 4097, 4111, 8192, 65536, 65536 + 15]);
    lengths.extend((0..200).map(|_| rng.random_range(16..20_000)));
    for &key_len in Mode::Xts.key_lengths() {
        for (i, &len) in lengths.iter().enumerate() {
            let mut key = vec![0u8; key_len];
            rng.fill_bytes(&mut key);
            let fast = new_cipher(CoreKind::Fast, Mode::Xts, &key).unwrap();
            let reference = new_cipher(CoreKind::Reference, Mode::Xts, &key).unwrap();
            let mut iv = [0u8; 16];
            // Random tweaks have the top bit set half the time, which exercises the reduction.
            if i % 2 == 0 {
                rng.fill_bytes(&mut iv);
            } else {
                iv[..8].copy_from_slice(&(i as u64).to_le_bytes());
            }
            let mut plain = vec![0u8; len];
            rng.fill_bytes(&mut plain);
            let (mut a, mut b) = (plain.clone(), plain.clone());
            fast.encrypt(&iv, &[], &mut a, &mut []).unwrap();
            reference.encrypt(&iv, &[], &mut b, &mut []).unwrap();
            assert!(a == b, "{}-bit key, {len} bytes: the encryptions differ", key_len * 4);
            reference.decrypt(&iv, &[], &mut a, &[]).unwrap();
            assert!(a == plain, "{}-bit key, {len} bytes: reference decrypt of fast", key_len * 4);
            fast.decrypt(&iv, &[], &mut b, &[]).unwrap();
            assert!(b == plain, "{}-bit key, {len} bytes: fast decrypt of reference", key_len * 4);
        }
    }
}

#[test]
fn short_data_and_equal_key_halves_are_refused_for_every_key_size() {
    for &key_len in Mode::Xts.key_lengths() {
        for kind in [CoreKind::Fast, CoreKind::Reference] {
            assert!(matches!(
                new_cipher(kind, Mode::Xts, &vec![0x42; key_len]),
                Err(CoreError::KeyRejected { .. })
            ));
            let key: Vec<u8> = (0..key_len as u8).collect();
            let c = new_cipher(kind, Mode::Xts, &key).unwrap();
            assert!(matches!(
                c.encrypt(&[0; 16], &[], &mut [0; 15], &mut []),
                Err(CoreError::DataLength { .. })
            ));
            assert!(matches!(c.decrypt(&[0; 12], &[], &mut [0; 32], &[]), Err(CoreError::IvLength { .. })));
        }
    }
}
