//! Encrypts and decrypts one buffer with AES-256-XTS and one with AES-256-GCM.
//!
//! `cargo run --example encrypt_buffer` uses the emulated device; give another device name as
//! the argument: `software`, or the PCI address of a virtio-crypto function bound to vfio-pci
//! (`cargo run --example encrypt_buffer -- 0000:00:04.0`, as root or with access to VFIO).

use crypt_vfio::engine::{BlockingQueue, Engine};
use crypt_vfio::Mode;

fn main() -> Result<(), crypt_vfio::Error> {
    let device = std::env::args().nth(1).unwrap_or_else(|| "emulated".into());
    let engine = crypt_vfio::open(&device)?;
    println!("engine: {}", engine.describe());
    let mut queue = BlockingQueue::open(&engine)?;

    // XTS: a 64-byte key (two AES-256 keys that must differ), a 16-byte tweak, 16 bytes or more.
    let key: Vec<u8> = (0u8..64).collect();
    let xts = engine.create_session(Mode::Xts, &key)?;
    let plaintext = b"one sector's worth of secrets, more or less".to_vec();
    let mut data = plaintext.clone();
    queue.encrypt(&xts, &[0u8; 16], &mut data)?;
    println!("xts ciphertext: {}", hex(&data));
    queue.decrypt(&xts, &[0u8; 16], &mut data)?;
    assert_eq!(data, plaintext);

    // GCM: a 12-byte nonce that never repeats under one key, data that is authenticated but not
    // encrypted (the AAD), and a 16-byte tag.
    let gcm = engine.create_session(Mode::Gcm, &[0x42; 32])?;
    let mut data = plaintext.clone();
    let nonce = [1u8; 12];
    let tag = queue.seal(&gcm, &nonce, b"message 1", &mut data)?;
    println!("gcm ciphertext: {} tag {}", hex(&data), hex(&tag));

    // A modified ciphertext is refused, and the buffer keeps the ciphertext.
    let mut forged = data.clone();
    forged[0] ^= 1;
    match queue.open_sealed(&gcm, &nonce, b"message 1", &mut forged, &tag) {
        Err(crypt_vfio::Error::Crypto(crypt_vfio::CryptoError::AuthFailed)) => {
            println!("forged message refused")
        }
        other => panic!("a forged message was not refused: {other:?}"),
    }
    queue.open_sealed(&gcm, &nonce, b"message 1", &mut data, &tag)?;
    assert_eq!(data, plaintext);
    println!("round trips OK");

    engine.destroy_session(&xts)?;
    engine.destroy_session(&gcm)?;
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
