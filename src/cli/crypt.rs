//! `crypt-vfio encrypt` and `crypt-vfio decrypt`: whole images through the engine.
//!
//! Like `qemu-img convert` between raw and LUKS, and like cryptsetup's plain mode for headerless
//! dm-crypt images (`--plain --cipher SPEC --volume-key-file F`). The data goes through the
//! volume layer, so every sector is a pipelined engine request exactly as in a served volume.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use anyhow::{bail, Context};
use clap::Args;
use crypt_vfio::engine::Engine;
use crypt_vfio::luks::{self, Header};
use crypt_vfio::volume::file::{ensure_len, storage_len};
use crypt_vfio::volume::{authenticated, AuthVolume, BlockDevice, Volume, VolumeParams};
use crypt_vfio::{Error, LuksError};

use super::device::{with_block_engine, DeviceArgs};
use super::luks_opts::{progress, read_key_file, NewImageArgs};
use super::output::Output;
use super::plain_opts::{authenticated_key, PlainArgs, PlainShapeArgs};

/// Bytes per step: large enough to keep the pipeline full, small enough for a smooth progress
/// bar.
const CHUNK: usize = 4 << 20;

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
    #[command(flatten)]
    shape: PlainShapeArgs,
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
    let input = open_input(&args.input)?;
    let in_len =
        storage_len(&input).with_context(|| format!("reading the size of {}", args.input.display()))?;
    if in_len == 0 {
        bail!("{} is empty: there is nothing to encrypt", args.input.display());
    }
    // Every option and key is checked before the output is touched.
    let new = if args.plain.plain {
        let (key, params) = args.plain.volume(&args.image.cipher, args.image.sector_size)?;
        let data_len = in_len.next_multiple_of(u64::from(params.sector_size));
        let total = checked_end(params.data_offset, data_len, "--offset and the input's size")?;
        NewImage::Plain { key, params, total }
    } else if args.image.luks_type == "authenticated" {
        let key = authenticated_key(args.plain.volume_key_file.as_deref())?;
        let data_len = in_len.next_multiple_of(u64::from(args.image.sector_size));
        NewImage::Authenticated { key, data_len }
    } else {
        let opts = args.image.options()?;
        let data_len = in_len.next_multiple_of(u64::from(opts.sector_size));
        let total = checked_end(opts.data_offset(), data_len, "the LUKS header and the input's size")?;
        let pass = read_key_file(args.key_file.as_deref().context("--key-file is needed")?)?;
        NewImage::Luks { opts, pass, total }
    };
    let engine = args.device.open_block()?;
    with_block_engine!(engine, |e| encrypt_on(Arc::new(e), &args, new, &input, in_len))
}

/// `encrypt` from the engine on: the output, its header and the copy.
fn encrypt_on<E: Engine + 'static>(
    engine: Arc<E>,
    args: &EncryptArgs,
    new: NewImage,
    input: &File,
    in_len: u64,
) -> anyhow::Result<()> {
    let out = Output::open(&args.output, input, &args.input)?;
    let volume: Box<dyn BlockDevice> = match new {
        NewImage::Plain { key, params, total } => {
            out.check_room(total)?;
            ensure_len(out.file(), total)?;
            Box::new(Volume::open(engine, out.file().try_clone()?, true, &key, params)?)
        }
        NewImage::Luks { opts, pass, total } => {
            out.check_room(total)?;
            ensure_len(out.file(), total)?;
            let (key, params) = luks::format(&*engine, out.file(), &opts, &pass, None)?;
            Box::new(Volume::open(engine, out.file().try_clone()?, true, &key, params)?)
        }
        NewImage::Authenticated { key, data_len } => Box::new(AuthVolume::format(
            engine,
            out.file().try_clone()?,
            &key,
            args.image.sector_size,
            data_len,
        )?),
    };
    copy(input, in_len, &*volume, Direction::Encrypt, &args.input, &args.output)?;
    volume.flush()?;
    drop(volume);
    out.commit()
}

/// What `encrypt` makes, with its keys, decided before the output is opened.
enum NewImage {
    Plain { key: zeroize::Zeroizing<Vec<u8>>, params: VolumeParams, total: u64 },
    Luks { opts: luks::FormatOptions, pass: zeroize::Zeroizing<Vec<u8>>, total: u64 },
    Authenticated { key: zeroize::Zeroizing<Vec<u8>>, data_len: u64 },
}

/// `crypt-vfio decrypt`.
pub fn decrypt(args: DecryptArgs) -> anyhow::Result<()> {
    let input = open_input(&args.input)?;
    let engine = args.device.open_block()?;
    with_block_engine!(engine, |e| decrypt_on(Arc::new(e), &args, &input))
}

/// `decrypt` from the engine on: unlocking, the output and the copy.
fn decrypt_on<E: Engine + 'static>(engine: Arc<E>, args: &DecryptArgs, input: &File) -> anyhow::Result<()> {
    // Before the key derivation: an output that is the input is refused at once.
    let out = Output::open(&args.output, input, &args.input)?;
    let volume: Box<dyn BlockDevice> = if args.plain.plain {
        let (key, params) = args.plain.volume(&args.shape.cipher, args.shape.sector_size)?;
        Box::new(Volume::open(engine, input.try_clone()?, false, &key, params)?)
    } else if is_authenticated(input) {
        let key = authenticated_key(args.plain.volume_key_file.as_deref())?;
        Box::new(AuthVolume::open(engine, input.try_clone()?, false, &key)?)
    } else {
        let header = match Header::read(input) {
            Err(Error::Luks(LuksError::NotLuks(why))) => bail!(
                "{} is not a LUKS image ({why}); for a plain dm-crypt image use --plain --cipher SPEC \
                 --volume-key-file FILE",
                args.input.display()
            ),
            other => other?,
        };
        let pass = read_key_file(args.key_file.as_deref().context("--key-file is needed")?)?;
        let (slot, key) = header.unlock(&*engine, input, &pass)?;
        log::info!("key slot {slot} opened");
        Box::new(Volume::open(engine, input.try_clone()?, false, &key, header.volume_params())?)
    };
    let size = volume.size();
    out.check_room(size)?;
    copy(out.file(), size, &*volume, Direction::Decrypt, &args.input, &args.output)?;
    drop(volume);
    out.commit()
}

/// Opens an input image: a regular file or a block device (read as the device, not as its node's
/// zero length).
fn open_input(path: &Path) -> anyhow::Result<File> {
    let input = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let kind = input.metadata().with_context(|| format!("looking at {}", path.display()))?.file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        bail!("{} is neither a regular file nor a block device", path.display());
    }
    Ok(input)
}

/// `offset + len`, refused when it overflows or passes the largest file offset (`off_t`).
fn checked_end(offset: u64, len: u64, what: &str) -> anyhow::Result<u64> {
    match offset.checked_add(len) {
        Some(end) if end <= i64::MAX as u64 => Ok(end),
        _ => bail!("{what} add up to more than the largest file offset ({} bytes)", i64::MAX),
    }
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

/// Buffers in flight between the file thread and the thread driving the engine.
const DEPTH: usize = 3;

/// A chunk between the two threads: where it goes, the buffer, and how many of its bytes count.
type Chunk = (u64, Vec<u8>, usize);

/// Moves `len` bytes between a plain file (or device) and the volume, in chunks, with positioned
/// I/O. The plain side is read (encrypt) or written (decrypt) on a thread of its own, so that
/// its I/O overlaps the cryptography instead of alternating with it. Every chunk handed to the
/// other thread is written before it ends, and the bytes written are counted: anything short of
/// `len` is an error, never a shorter output.
fn copy(
    file: &File,
    len: u64,
    volume: &dyn BlockDevice,
    direction: Direction,
    from: &Path,
    to: &Path,
) -> anyhow::Result<()> {
    let what = match direction {
        Direction::Encrypt => "encrypting",
        Direction::Decrypt => "decrypting",
    };
    let bar = progress(len, what);
    let ss = u64::from(volume.block_size());
    let (full_tx, full_rx) = mpsc::sync_channel::<Chunk>(DEPTH);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..DEPTH {
        // Both ends are in this function: the send cannot fail.
        let _ = free_tx.send(vec![0u8; CHUNK]);
    }
    let result = std::thread::scope(|scope| -> anyhow::Result<u64> {
        match direction {
            Direction::Encrypt => {
                let reader = scope.spawn(move || -> anyhow::Result<()> {
                    let mut pos = 0u64;
                    while pos < len {
                        // The engine side stopped (an error, which it reports): stop too.
                        let Ok(mut buf) = free_rx.recv() else { return Ok(()) };
                        let n = (len - pos).min(CHUNK as u64) as usize;
                        file.read_exact_at(&mut buf[..n], pos)
                            .with_context(|| format!("reading {} bytes at {pos} of {}", n, from.display()))?;
                        if full_tx.send((pos, buf, n)).is_err() {
                            return Ok(());
                        }
                        pos += n as u64;
                    }
                    Ok(())
                });
                let mut result = Ok(());
                let mut done = 0u64;
                for (pos, mut buf, n) in full_rx.iter() {
                    // The last sector of an input that ends mid-sector is padded with zeroes.
                    let whole = (n as u64).next_multiple_of(ss) as usize;
                    let Some(padding) = buf.get_mut(n..whole) else {
                        result = Err(anyhow::anyhow!("a chunk of {n} bytes does not fit whole sectors"));
                        break;
                    };
                    padding.fill(0);
                    if let Err(e) = volume.write_at(pos, &buf[..whole]) {
                        result = Err(anyhow::Error::from(e).context(format!("writing {}", to.display())));
                        break;
                    }
                    done += n as u64;
                    bar.set_position(pos + n as u64);
                    // The reader may be finished and gone: the buffer is then simply freed.
                    let _ = free_tx.send(buf);
                }
                drop(full_rx);
                drop(free_tx);
                let read =
                    reader.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the reader thread panicked")));
                result.and(read).map(|()| done)
            }
            Direction::Decrypt => {
                let bar = bar.clone();
                let writer = scope.spawn(move || -> anyhow::Result<u64> {
                    let mut done = 0u64;
                    // Until the decrypting side closes the channel: every chunk it sent is
                    // written.
                    for (pos, buf, n) in full_rx.iter() {
                        file.write_all_at(&buf[..n], pos)
                            .with_context(|| format!("writing {n} bytes at {pos} of {}", to.display()))?;
                        done += n as u64;
                        bar.set_position(pos + n as u64);
                        // The decrypting side may be finished and gone: the buffer is then freed.
                        let _ = free_tx.send(buf);
                    }
                    Ok(done)
                });
                let mut result = Ok(());
                let mut pos = 0u64;
                while pos < len {
                    // The writer stopped (an error, which it reports): stop too.
                    let Ok(mut buf) = free_rx.recv() else { break };
                    let n = (len - pos).min(CHUNK as u64) as usize;
                    if let Err(e) = volume.read_at(pos, &mut buf[..n]) {
                        result = Err(anyhow::Error::from(e).context(format!("reading {}", from.display())));
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
    let done = result?;
    if done != len {
        bail!("only {done} of {len} bytes reached {}: the output is incomplete", to.display());
    }
    Ok(())
}
