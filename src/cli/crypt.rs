//! `crypt-vfio encrypt` and `crypt-vfio decrypt`: whole images through the engine.
//!
//! Like `qemu-img convert` between raw and LUKS, and like cryptsetup's plain mode for headerless
//! dm-crypt images (`--plain --cipher SPEC --volume-key-file F`). The data goes through the
//! volume layer, so every sector is a pipelined engine request exactly as in a served volume.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::luks::{self, Header};
use crypt_vfio::volume::{authenticated, AuthVolume, BlockDevice, CipherSpec, Volume, VolumeParams};
use crypt_vfio::Error;

use super::device::DeviceArgs;
use super::luks_opts::{progress, read_key_file, NewImageArgs};
use super::output::PendingOutput;

/// Bytes per step: large enough to keep the pipeline full, small enough for a smooth progress
/// bar.
const CHUNK: usize = 4 << 20;

/// Plain dm-crypt (no header) options, as cryptsetup's `open --type plain`.
#[derive(Args, Debug, Clone)]
pub struct PlainArgs {
    /// The image is plain dm-crypt: no header, the key given by --volume-key-file.
    #[arg(long)]
    pub plain: bool,
    /// File holding the raw volume key (plain mode and authenticated volumes).
    #[arg(long, value_name = "FILE")]
    pub volume_key_file: Option<PathBuf>,
    /// Plain mode: start of the data in the image, in 512-byte sectors.
    #[arg(long, short = 'o', default_value_t = 0, requires = "plain")]
    pub offset: u64,
    /// Plain mode: IV offset, in 512-byte sectors.
    #[arg(long, short = 'p', default_value_t = 0, requires = "plain")]
    pub skip: u64,
    /// Plain mode: count IVs in sectors of --sector-size instead of 512 bytes.
    #[arg(long, requires = "plain")]
    pub iv_large_sectors: bool,
}

impl PlainArgs {
    fn volume(
        &self,
        cipher: &str,
        sector_size: u32,
    ) -> anyhow::Result<(zeroize::Zeroizing<Vec<u8>>, VolumeParams)> {
        let Some(path) = &self.volume_key_file else {
            bail!("--plain needs --volume-key-file (the raw key)");
        };
        let key = read_key_file(path)?;
        let spec: CipherSpec = cipher.parse()?;
        spec.check_key_len(key.len())
            .with_context(|| format!("the volume key file {} holds {} bytes", path.display(), key.len()))?;
        let params = VolumeParams {
            sector_size,
            data_offset: self.offset * 512,
            iv_offset: self.skip,
            iv_large_sectors: self.iv_large_sectors,
            ..VolumeParams::plain(spec)
        };
        Ok((key, params))
    }
}

/// Arguments of `crypt-vfio encrypt`.
#[derive(Args, Debug)]
pub struct EncryptArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    image: NewImageArgs,
    #[command(flatten)]
    plain: PlainArgs,
    /// File holding the passphrase of the new image's key slot (`-`: standard input).
    #[arg(long, short = 'd', value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// The plaintext (raw) image.
    input: PathBuf,
    /// The encrypted image to write (replaced only when complete).
    output: PathBuf,
}

/// Arguments of `crypt-vfio decrypt`.
#[derive(Args, Debug)]
pub struct DecryptArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    plain: PlainArgs,
    /// Plain mode: the cipher spec.
    #[arg(long, short = 'c', default_value = "aes-xts-plain64")]
    cipher: String,
    /// Plain mode: sector size in bytes.
    #[arg(long, default_value_t = 512)]
    sector_size: u32,
    /// File holding the passphrase (`-`: standard input).
    #[arg(long, short = 'd', value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// The encrypted image (LUKS1, LUKS2, authenticated, or plain with --plain).
    input: PathBuf,
    /// The plaintext image to write (replaced only when complete).
    output: PathBuf,
}

/// `crypt-vfio encrypt`.
pub fn encrypt(args: EncryptArgs) -> anyhow::Result<()> {
    let input = File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
    let in_len = input.metadata()?.len();
    if in_len == 0 {
        bail!("{} is empty: there is nothing to encrypt", args.input.display());
    }
    let out = PendingOutput::create(&args.output)?;
    let engine = Arc::new(args.device.open(&args.device.options())?);
    let volume: Box<dyn BlockDevice> = if args.plain.plain {
        let (key, params) = args.plain.volume(&args.image.cipher, args.image.sector_size)?;
        let data_len = in_len.next_multiple_of(u64::from(params.sector_size));
        out.file().set_len(params.data_offset + data_len)?;
        Box::new(Volume::open(engine, out.file().try_clone()?, true, &key, params)?)
    } else if args.image.luks_type == "authenticated" {
        let key = authenticated_key(&args.plain)?;
        let data_len = in_len.next_multiple_of(u64::from(args.image.sector_size));
        Box::new(AuthVolume::format(engine, out.file().try_clone()?, &key, args.image.sector_size, data_len)?)
    } else {
        let opts = args.image.options()?;
        let data_len = in_len.next_multiple_of(u64::from(opts.sector_size));
        out.file().set_len(opts.data_offset() + data_len)?;
        let pass = read_key_file(args.key_file.as_deref().context("--key-file is needed")?)?;
        let (key, params) = luks::format(&*engine, out.file(), &opts, &pass, None)?;
        Box::new(Volume::open(engine, out.file().try_clone()?, true, &key, params)?)
    };
    copy(&input, in_len, &*volume, Direction::Encrypt, &args.input, &args.output)?;
    volume.flush()?;
    drop(volume);
    out.commit()
}

/// `crypt-vfio decrypt`.
pub fn decrypt(args: DecryptArgs) -> anyhow::Result<()> {
    let input = File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
    let engine = Arc::new(args.device.open(&args.device.options())?);
    let volume: Box<dyn BlockDevice> = if args.plain.plain {
        let (key, params) = args.plain.volume(&args.cipher, args.sector_size)?;
        Box::new(Volume::open(engine, input, false, &key, params)?)
    } else if is_authenticated(&input) {
        let key = authenticated_key(&args.plain)?;
        Box::new(AuthVolume::open(engine, input, false, &key)?)
    } else {
        let header = match Header::read(&input) {
            Err(Error::NotLuks(why)) => bail!(
                "{} is not a LUKS image ({why}); for a plain dm-crypt image use --plain --cipher SPEC \
                 --volume-key-file FILE",
                args.input.display()
            ),
            other => other?,
        };
        let pass = read_key_file(args.key_file.as_deref().context("--key-file is needed")?)?;
        let (slot, key) = header.unlock(&*engine, &input, &pass)?;
        log::info!("key slot {slot} opened");
        Box::new(Volume::open(engine, input, false, &key, header.volume_params())?)
    };
    let out = PendingOutput::create(&args.output)?;
    let size = volume.size();
    copy(out.file(), size, &*volume, Direction::Decrypt, &args.input, &args.output)?;
    drop(volume);
    out.commit()
}

enum Direction {
    Encrypt,
    Decrypt,
}

/// Whether `file` starts with the magic of an authenticated volume.
fn is_authenticated(file: &File) -> bool {
    let mut magic = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut magic, 0).is_ok() && magic == authenticated::MAGIC
}

/// The raw key of an authenticated volume (AES-128 or AES-256 for GCM).
fn authenticated_key(plain: &PlainArgs) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    let Some(path) = &plain.volume_key_file else {
        bail!("an authenticated volume needs --volume-key-file (a raw 16- or 32-byte AES-GCM key)");
    };
    let key = read_key_file(path)?;
    if key.len() != 16 && key.len() != 32 {
        bail!(
            "{} holds {} bytes; an authenticated volume takes a 16- or 32-byte key",
            path.display(),
            key.len()
        );
    }
    Ok(key)
}

/// Buffers in flight between the file thread and the thread driving the engine.
const DEPTH: usize = 3;

/// Moves `len` bytes between a plain file and the volume, in chunks. The plain file is read
/// (encrypt) or written (decrypt) on a thread of its own, so that its I/O overlaps the
/// cryptography instead of alternating with it.
fn copy(
    file: &File,
    len: u64,
    volume: &dyn BlockDevice,
    direction: Direction,
    from: &std::path::Path,
    to: &std::path::Path,
) -> anyhow::Result<()> {
    let what = match direction {
        Direction::Encrypt => "encrypting",
        Direction::Decrypt => "decrypting",
    };
    let bar = progress(len, what);
    let ss = u64::from(volume.block_size());
    let (full_tx, full_rx) = mpsc::sync_channel::<(u64, Vec<u8>, usize)>(DEPTH);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..DEPTH {
        free_tx.send(vec![0u8; CHUNK]).expect("the receiver is alive");
    }
    let result = std::thread::scope(|scope| -> anyhow::Result<()> {
        match direction {
            Direction::Encrypt => {
                let reader = scope.spawn(move || -> anyhow::Result<()> {
                    let mut input = file;
                    let mut pos = 0u64;
                    while pos < len {
                        // The other side stopped (an error): stop too.
                        let Ok(mut buf) = free_rx.recv() else { return Ok(()) };
                        let n = (len - pos).min(CHUNK as u64) as usize;
                        input
                            .read_exact(&mut buf[..n])
                            .with_context(|| format!("reading {}", from.display()))?;
                        if full_tx.send((pos, buf, n)).is_err() {
                            return Ok(());
                        }
                        pos += n as u64;
                    }
                    Ok(())
                });
                let mut result = Ok(());
                for (pos, mut buf, n) in full_rx.iter() {
                    // The last sector of an input that ends mid-sector is padded with zeroes.
                    let whole = (n as u64).next_multiple_of(ss) as usize;
                    buf[n..whole].fill(0);
                    if let Err(e) = volume.write_at(pos, &buf[..whole]) {
                        result = Err(e.into());
                        break;
                    }
                    bar.set_position(pos + n as u64);
                    let _ = free_tx.send(buf);
                }
                drop(full_rx);
                drop(free_tx);
                let read =
                    reader.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the reader thread panicked")));
                result.and(read)
            }
            Direction::Decrypt => {
                let bar = bar.clone();
                let writer = scope.spawn(move || -> anyhow::Result<()> {
                    let mut output = file;
                    for (pos, buf, n) in full_rx.iter() {
                        output.write_all(&buf[..n]).with_context(|| format!("writing {}", to.display()))?;
                        bar.set_position(pos + n as u64);
                        if free_tx.send(buf).is_err() {
                            break;
                        }
                    }
                    Ok(())
                });
                let mut result = Ok(());
                let mut pos = 0u64;
                while pos < len {
                    let Ok(mut buf) = free_rx.recv() else { break };
                    let n = (len - pos).min(CHUNK as u64) as usize;
                    if let Err(e) = volume.read_at(pos, &mut buf[..n]) {
                        result = Err(e.into());
                        break;
                    }
                    if full_tx.send((pos, buf, n)).is_err() {
                        break;
                    }
                    pos += n as u64;
                }
                drop(full_tx);
                drop(free_rx);
                let written =
                    writer.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the writer thread panicked")));
                result.and(written)
            }
        }
    });
    bar.finish_and_clear();
    result
}
