//! Creates a LUKS2 image in a temporary directory, writes to it and reads back through the
//! decrypted view, then reopens it with the passphrase.
//!
//! `cargo run --example luks_volume [DEVICE] [IMAGE]`: DEVICE defaults to `emulated`; with
//! IMAGE, an existing LUKS1, LUKS2 or authenticated image is opened instead (its passphrase,
//! or raw key, in the `PASSPHRASE` environment variable), and its first sector is printed.

use std::sync::Arc;

use crypt_vfio::engine::Engine;
use crypt_vfio::luks::{self, FormatOptions, LuksKdfOptions, LuksVersion};
use crypt_vfio::volume::AnyVolume;

fn main() -> Result<(), crypt_vfio::Error> {
    let mut args = std::env::args().skip(1);
    let device = args.next().unwrap_or_else(|| "emulated".into());
    let engine = Arc::new(crypt_vfio::open(&device)?);
    println!("engine: {}", engine.describe());

    if let Some(image) = args.next() {
        let secret = std::env::var("PASSPHRASE").unwrap_or_default();
        let volume = AnyVolume::open(engine, &image, secret.as_bytes(), false)?;
        let mut first = vec![0u8; 512.min(volume.size() as usize)];
        volume.read_at(0, &mut first)?;
        println!("{image}: {} bytes of data; the first {} bytes:", volume.size(), first.len());
        println!("{}", String::from_utf8_lossy(&first).escape_debug());
        return Ok(());
    }

    let dir = std::env::temp_dir().join(format!("crypt-vfio-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| crypt_vfio::Error::os("creating a temporary directory", e))?;
    let path = dir.join("disk.img");
    let result = round_trip(engine, &path);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn round_trip(engine: Arc<crypt_vfio::AnyEngine>, path: &std::path::Path) -> Result<(), crypt_vfio::Error> {
    // cryptsetup's LUKS2 defaults (aes-xts-plain64, 512-bit key), with a PBKDF2 key slot of few
    // iterations so that the example runs at once: a real image keeps the default Argon2id.
    let mut opts = FormatOptions::new(LuksVersion::Luks2);
    opts.kdf = LuksKdfOptions::pbkdf2_iterations(1000);
    let params = luks::create(&*engine, path, &opts, b"correct horse", 4 << 20)?;
    println!("created {} ({}, data at byte {})", path.display(), params.spec, params.data_offset);

    let volume = AnyVolume::open(engine.clone(), path, b"correct horse", true)?;
    println!("opened: {} bytes of data", volume.size());
    // Any offset and length: the volume reads, patches and rewrites the sectors at the edges.
    volume.write_at(1000, b"hello, encrypted world")?;
    volume.flush()?;
    drop(volume);

    // The bytes on disk are not the plaintext.
    let raw = std::fs::read(path).map_err(|e| crypt_vfio::Error::os("reading the image", e))?;
    let on_disk = &raw[params.data_offset as usize + 1000..][..22];
    assert_ne!(on_disk, b"hello, encrypted world");

    match AnyVolume::open(engine.clone(), path, b"wrong", false) {
        Err(crypt_vfio::Error::Luks(crypt_vfio::LuksError::WrongPassphrase)) => {
            println!("wrong passphrase refused")
        }
        other => panic!("a wrong passphrase was not refused: {other:?}"),
    }
    let volume = AnyVolume::open(engine, path, b"correct horse", false)?;
    let mut back = [0u8; 22];
    volume.read_at(1000, &mut back)?;
    assert_eq!(&back, b"hello, encrypted world");
    println!("read back: {}", String::from_utf8_lossy(&back));
    Ok(())
}
