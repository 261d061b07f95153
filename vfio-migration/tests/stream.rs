//! The device-state stream around real save and load: an emulated device saved into a stream,
//! checked by `inspect`, loaded into a fresh device; and every truncation and every single-bit
//! flip of that stream refused by both, with the destination left RUNNING and usable.

use std::io;

use vfio_migration::device::MigrationDevice;
use vfio_migration::emulated::EmulatedDevice;
use vfio_migration::session::{self, LoadOptions, SaveOptions};
use vfio_migration::state::DeviceState;
use vfio_migration::stream::{Header, SectionKind, StreamError, StreamReader, StreamWriter, inspect};

const SPEC: &str = "size=600,block=128,seed=9";

fn save_stream(spec: &str, chunk: usize) -> Vec<u8> {
    let mut dev = EmulatedDevice::from_spec(spec).unwrap();
    let header = Header::single(dev.identity(), dev.flags().unwrap());
    let mut w = StreamWriter::new(Vec::new(), header).unwrap();
    let mut sink = w.chunk_sink(SectionKind::StopCopy, 0).unwrap().with_chunk_size(chunk);
    let report = session::save(&mut dev, &mut sink, SaveOptions::default()).unwrap();
    assert_eq!(sink.finish().unwrap(), report.bytes);
    assert_eq!(dev.state().unwrap(), DeviceState::Running);
    w.write_config(0, b"vmm config").unwrap();
    w.finish().unwrap()
}

/// Load `bytes` into `dev` as the CLI does: header and compatibility first, then the state.
fn load_stream(dev: &mut EmulatedDevice, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut r = StreamReader::new(bytes).map_err(|e| e.to_string())?;
    r.header()
        .check_compatible(0, &dev.identity(), dev.flags().unwrap(), false)
        .map_err(|e| e.to_string())?;
    let mut config = Vec::new();
    let mut state = r.device_payload(0).on_other(|c| {
        if c.kind == SectionKind::Config {
            config.extend_from_slice(c.payload);
        }
        Ok(())
    });
    session::load(dev, &mut state, LoadOptions::default()).map_err(|e| e.to_string())?;
    drop(state);
    assert!(r.is_finished());
    Ok(config)
}

#[test]
fn saved_stream_is_valid_and_loads() {
    let bytes = save_stream(SPEC, 200);
    let report = inspect(&bytes[..]).unwrap();
    let h = report.header.as_ref().unwrap();
    assert_eq!(h.devices[0].identity_kind, "emulated");
    assert!(report.sections[0].chunks >= 3, "{report}");
    let mut dst = EmulatedDevice::from_spec(SPEC).unwrap();
    let config = load_stream(&mut dst, &bytes).unwrap();
    assert_eq!(config, b"vmm config");
    assert_eq!(dst.digest(), EmulatedDevice::from_spec(SPEC).unwrap().digest());
    assert_eq!(dst.state().unwrap(), DeviceState::Running);
}

#[test]
fn an_incompatible_device_is_refused_before_it_is_touched() {
    let bytes = save_stream(SPEC, 200);
    let mut other = EmulatedDevice::from_spec("size=1200,block=128,seed=9").unwrap();
    let before = other.digest();
    let e = load_stream(&mut other, &bytes).unwrap_err();
    assert!(e.contains("was saved from emulated"), "{e}");
    assert_eq!(other.digest(), before);
    assert_eq!(other.state().unwrap(), DeviceState::Running);
}

#[test]
fn every_truncation_and_bit_flip_is_refused_by_inspect_and_load() {
    let bytes = save_stream(SPEC, 256);
    let reference = EmulatedDevice::from_spec(SPEC).unwrap().digest();
    let check_refused = |b: &[u8], what: &str| {
        let failure = inspect(b).expect_err(what);
        assert!(failure.offset() <= b.len() as u64, "{what}");
        // reset=keep: a refused load that got as far as the device is undone by a reset, and
        // this checks nothing else changed (a wiping reset would change the content anyway).
        let mut dst = EmulatedDevice::from_spec(&format!("{SPEC},reset=keep")).unwrap();
        let e = load_stream(&mut dst, b).expect_err(what);
        assert!(!e.is_empty());
        assert!(dst.is_usable(), "{what}: device left unusable");
        assert_eq!(dst.state().unwrap(), DeviceState::Running, "{what}");
        assert_eq!(dst.digest(), reference, "{what}: a refused load changed the content");
    };
    for cut in 0..bytes.len() {
        check_refused(&bytes[..cut], &format!("truncated at {cut}"));
    }
    let mut b = bytes.clone();
    for bit in 0..b.len() * 8 {
        b[bit / 8] ^= 1 << (bit % 8);
        check_refused(&b, &format!("bit {} of byte {}", bit % 8, bit / 8));
        b[bit / 8] ^= 1 << (bit % 8);
    }
}

#[test]
fn stream_errors_reach_the_loader_with_their_offset() {
    let bytes = save_stream(SPEC, 200);
    let cut = bytes.len() - 10;
    let mut r = StreamReader::new(&bytes[..cut]).unwrap();
    let err = io::copy(&mut r.device_payload(0), &mut io::sink()).unwrap_err();
    assert!(err.to_string().contains(&format!("byte offset {cut}")), "{err}");
    let typed = StreamError::try_from_io(err).unwrap();
    assert!(typed.is_truncation());
}

/// A stream whose device identity is unknown proves nothing about the device it goes into: the
/// load is refused before the device is touched, unless forced.
#[test]
fn a_stream_of_unknown_identity_is_refused_unless_forced() {
    let mut src = EmulatedDevice::from_spec(SPEC).unwrap();
    src.touch_blocks(3).unwrap();
    let mut w = StreamWriter::new(
        Vec::new(),
        Header::single(vfio_migration::device::DeviceIdentity::Unknown, src.flags().unwrap()),
    )
    .unwrap();
    let mut sink = w.chunk_sink(SectionKind::StopCopy, 0).unwrap();
    session::save(&mut src, &mut sink, SaveOptions::default()).unwrap();
    sink.finish().unwrap();
    let bytes = w.finish().unwrap();

    let mut dst = EmulatedDevice::from_spec(SPEC).unwrap();
    let before = dst.digest();
    let e = session::load_from_stream(&mut dst, &bytes[..], LoadOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            session::StreamIoError::Mismatch {
                error: vfio_migration::stream::Mismatch::UnknownIdentity { .. },
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains(dst.name()) && msg.contains("--force-unknown-identity"),
        "{msg}"
    );
    assert_eq!(
        (dst.digest(), dst.reset_generation()),
        (before, 0),
        "the device was touched"
    );

    let opts = LoadOptions {
        force_unknown_identity: true,
        ..LoadOptions::default()
    };
    session::load_from_stream(&mut dst, &bytes[..], opts).unwrap();
    assert_eq!(dst.digest(), src.digest());
}
