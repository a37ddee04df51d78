//! The entry points a newcomer uses: opening by name, the blocking queue, opening images by path.

mod support;

use std::sync::Arc;

use crypt_vfio::engine::{Buf, Direction, Engine, Iv, Queue, Request, SubmitErrorKind};
use crypt_vfio::luks::{self, FormatOptions, LuksKdfOptions, LuksVersion};
use crypt_vfio::volume::{AnyVolume, AuthVolume};
use crypt_vfio::{BlockingQueue, CryptoError, DeviceName, Error, LuksError, Mode, VfioError, VolumeError};

fn fast_luks(version: LuksVersion) -> FormatOptions {
    let mut opts = FormatOptions::new(version);
    opts.kdf = LuksKdfOptions::pbkdf2_iterations(1000);
    opts
}

#[test]
fn device_names_parse_and_bad_ones_say_what_is_expected() {
    assert_eq!(" emulated ".parse::<DeviceName>().unwrap(), DeviceName::Emulated);
    assert!(matches!("0000:00:04.0".parse::<DeviceName>().unwrap(), DeviceName::Pci(_)));
    let e = crypt_vfio::open("emulatd").unwrap_err();
    assert!(matches!(e, Error::Vfio(VfioError::InvalidAddress(_))), "{e:?}");
    assert!(e.to_string().contains("is not a PCI address"), "{e}");
    let e = DeviceName::Software.transport(Default::default()).err().expect("software has no transport");
    assert!(matches!(e, Error::Crypto(CryptoError::NotSupported(_))), "{e:?}");
}

#[test]
fn a_session_of_the_other_engine_is_refused_with_its_request_back() {
    let device = crypt_vfio::open("emulated").unwrap();
    let software = crypt_vfio::open("software").unwrap();
    let foreign = software.create_session(Mode::Ctr, &[3; 16]).unwrap();
    assert!(matches!(device.destroy_session(&foreign), Err(Error::Crypto(CryptoError::InvalidSession))));
    let mut q: Box<dyn Queue<_>> = device.open_queue(0, Arc::new(|_| {})).unwrap();
    let req = Request::new(foreign, Direction::Encrypt, Iv::from([0; 16]), Buf::Host(vec![9; 32]), 77);
    let e = q.submit(req, true).expect_err("refused");
    assert!(
        matches!(e.kind, SubmitErrorKind::Rejected(Error::Crypto(CryptoError::InvalidSession))),
        "{:?}",
        e.kind
    );
    assert_eq!(e.request.user_data, 77);
    assert_eq!(e.request.data.as_slice().as_ref(), &[9; 32][..]);
}

#[test]
fn blocking_queue_matches_the_software_engine_on_a_device_and_keeps_data_on_auth_failure() {
    let device = crypt_vfio::open("emulated").unwrap();
    let software = crypt_vfio::open("software").unwrap();
    let (mut dq, mut sq) = (BlockingQueue::open(&device).unwrap(), BlockingQueue::open(&software).unwrap());
    let key: Vec<u8> = (0..32).collect();
    let (ds, ss) =
        (device.create_session(Mode::Cbc, &key).unwrap(), software.create_session(Mode::Cbc, &key).unwrap());
    let (mut a, mut b) = (vec![5u8; 4096], vec![5u8; 4096]);
    dq.encrypt(&ds, &[1; 16], &mut a).unwrap();
    sq.encrypt(&ss, &[1; 16], &mut b).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, vec![5u8; 4096]);

    let gcm = device.create_session(Mode::Gcm, &key).unwrap();
    let mut data = b"sealed".to_vec();
    let tag = dq.seal(&gcm, &[2; 12], b"aad", &mut data).unwrap();
    let ciphertext = data.clone();
    let e = dq.open_sealed(&gcm, &[2; 12], b"other aad", &mut data, &tag).unwrap_err();
    assert!(matches!(e, Error::Crypto(CryptoError::AuthFailed)), "{e:?}");
    assert_eq!(data, ciphertext, "a failed check must not release anything");
    let e = dq.encrypt(&ds, &[0; 17], &mut data).unwrap_err();
    assert!(matches!(e, Error::Crypto(CryptoError::InvalidRequest(_))), "{e:?}");
}

#[test]
fn images_open_by_path_whatever_their_format() {
    let engine = Arc::new(crypt_vfio::open("software").unwrap());
    let dir = tempfile::tempdir().unwrap();
    for (name, version) in [("v1.img", LuksVersion::Luks1), ("v2.img", LuksVersion::Luks2)] {
        let path = dir.path().join(name);
        luks::create(&*engine, &path, &fast_luks(version), b"pw", 1 << 20).unwrap();
        let e = luks::create(&*engine, &path, &fast_luks(version), b"pw", 1 << 20).unwrap_err();
        assert!(
            matches!(&e, Error::Os { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
            "{e:?}"
        );
        let v = AnyVolume::open(engine.clone(), &path, b"pw", true).unwrap();
        assert_eq!(v.size(), 1 << 20);
        v.write_at(511, b"across a sector edge").unwrap();
        drop(v);
        let v = AnyVolume::open(engine.clone(), &path, b"pw", false).unwrap();
        let mut back = [0u8; 20];
        v.read_at(511, &mut back).unwrap();
        assert_eq!(&back, b"across a sector edge");
        assert!(matches!(
            AnyVolume::open(engine.clone(), &path, b"nope", false),
            Err(Error::Luks(LuksError::WrongPassphrase))
        ));
    }

    // A failed create leaves no file behind.
    let bad = dir.path().join("bad.img");
    let e = luks::create(&*engine, &bad, &fast_luks(LuksVersion::Luks1), b"pw", 1000).unwrap_err();
    assert!(matches!(e, Error::Volume(VolumeError::Invalid(_))), "{e:?}");
    assert!(!bad.exists());

    let auth = dir.path().join("auth.img");
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&auth).unwrap();
    drop(AuthVolume::format(engine.clone(), file, &[4; 32], 512, 64 << 10).unwrap());
    let v = AnyVolume::open(engine.clone(), &auth, &[4; 32], true).unwrap();
    assert!(matches!(v, AnyVolume::Authenticated(_)));
    v.write_at(100, b"tagged").unwrap();
    let mut back = [0u8; 6];
    v.read_at(100, &mut back).unwrap();
    assert_eq!(&back, b"tagged");
    // Served through the BlockDevice trait (as `nbd::Server` does), block status and zeroing
    // are the volume's own: the never-written sectors past the first are authenticated zeroes.
    let dev: &dyn crypt_vfio::volume::BlockDevice = &v;
    let st = dev.block_status(512, (64 << 10) - 512, 16).unwrap();
    assert!(st.iter().all(|e| e.zero), "{st:?}");
    dev.zero_or_punch(0, 4096).unwrap();
    assert!(dev.block_status(0, 4096, 16).unwrap().iter().all(|e| e.zero));
    assert!(matches!(
        AnyVolume::open(engine.clone(), &auth, &[5; 32], false),
        Err(Error::Volume(VolumeError::WrongKey))
    ));

    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, vec![0u8; 1 << 16]).unwrap();
    assert!(matches!(AnyVolume::open(engine, &junk, b"pw", false), Err(Error::Luks(LuksError::NotLuks(_)))));
}

#[test]
fn blocking_queue_waits_for_an_engine_that_completes_on_its_own_thread() {
    use crypt_vfio::virtio_crypto::CompletionMode;
    let mut options = crypt_vfio::OpenOptions::default();
    options.driver.completion = CompletionMode::Interrupt;
    let engine = crypt_vfio::open_with(&DeviceName::Emulated, &options).unwrap();
    assert!(engine.completes_by_itself());
    // The default (adaptive) mode delivers events from the engine's thread too; only `Poll`
    // leaves reaping to the caller.
    assert!(crypt_vfio::open("emulated").unwrap().completes_by_itself());
    let mut polled = crypt_vfio::OpenOptions::default();
    polled.driver.completion = CompletionMode::Poll;
    assert!(!crypt_vfio::open_with(&DeviceName::Emulated, &polled).unwrap().completes_by_itself());
    let session = engine.create_session(Mode::Ctr, &[8; 16]).unwrap();
    let mut q = BlockingQueue::open(&engine).unwrap();
    for len in [1usize, 4096, 65536] {
        let mut data = vec![0x5a; len];
        q.encrypt(&session, &[0; 16], &mut data).unwrap();
        q.decrypt(&session, &[0; 16], &mut data).unwrap();
        assert_eq!(data, vec![0x5a; len]);
    }
}

#[test]
fn blocking_queue_gives_up_on_an_engine_that_never_answers() {
    use support::engines::{Behaviour, Wrapped};
    // Every request is answered Backlogged and dropped: no completion ever comes.
    let engine = Wrapped::new(crypt_vfio::open("software").unwrap(), Behaviour::DropBacklogged { ring: 0 });
    let session = engine.create_session(Mode::Ctr, &[8; 16]).unwrap();
    let mut q = BlockingQueue::open(&engine).unwrap();
    q.set_wait(std::time::Duration::from_millis(50));
    let mut data = vec![1u8; 64];
    let e = q.encrypt(&session, &[0; 16], &mut data).unwrap_err();
    assert!(matches!(e, Error::Device(crypt_vfio::DeviceError::Timeout(..))), "{e:?}");
    assert_eq!(data, vec![1u8; 64], "nothing came back, so nothing was written");
}
