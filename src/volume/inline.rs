//! A whole I/O on an engine that runs its cipher on the caller's thread (the software engine;
//! see [`Engine::inline_cipher`](crate::engine::Engine::inline_cipher)).
//!
//! Such an engine would compute each sector inside `submit` anyway; going through its queue a
//! sector at a time adds a request, a copy in, a copy out and an event per sector, which cost
//! more than AES itself on 512-byte sectors. Here the sectors are transformed where they lie in
//! the caller's buffer, each under its own IV, in one call of the core
//! ([`CipherCore::crypt_units`]), with no copy and no allocation. A device keeps
//! the pipelined queue path ([`super::pipeline`]), which overlaps its sectors on the device.

use crypt_vfio_cores::CipherCore;

use super::iv::IvGenerator;
use super::pipeline::IvNumbering;
use crate::engine::Direction;
use crate::error::{Error, Result, VolumeError};

/// Encrypts or decrypts `data` (whole sectors of `sector_size` bytes, the first being volume
/// sector `first_sector`) in place with `cipher`. A failing sector fails the I/O, named as the
/// pipeline names it.
pub fn crypt_in_place(
    cipher: &dyn CipherCore,
    ivgen: &IvGenerator,
    numbering: IvNumbering,
    sector_size: usize,
    direction: Direction,
    first_sector: u64,
    data: &mut [u8],
) -> Result<()> {
    debug_assert_eq!(data.len() % sector_size, 0);
    let iv_of = |i: usize| ivgen.iv(numbering.iv_sector(first_sector + i as u64));
    // One call for the run: the core sets up once (aws-lc's XTS context), not per sector.
    cipher.crypt_units(direction == Direction::Encrypt, sector_size, &iv_of, data).map_err(|(i, e)| {
        Error::Volume(VolumeError::Sector { sector: first_sector + i as u64, source: Box::new(e.into()) })
    })
}
