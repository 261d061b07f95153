//! Our vfio-user client against an independent peer: `tests/vfio-user-peer/migr-device`, a small
//! device written in C on libvfio-user (built from `../shared/upstream/libvfio-user-*.tar.xz` by
//! `tests/vfio-user-peer/build.sh`, cached). A source peer holds 4 MiB generated from a seed; a
//! destination peer (`--dest`) starts empty and checks every byte it is given against the same
//! seed when its load ends, printing `PEER-STATE ok crc=...` or `PEER-STATE BAD ...`.
//!
//! `VFIO_USER_PEER_BIN` names a ready binary instead of building one. Without the build
//! prerequisites (meson, ninja, pkg-config, json-c, cmocka, the tarball) the tests print a loud
//! SKIPPED message and pass, unless `VFIO_USER_PEER_REQUIRED=1` (what `scripts/test-all` sets,
//! after installing the Debian packages), which makes a missing prerequisite fail.
//!
//! What libvfio-user expects of a client that our own server did not (a padded short
//! `MIG_DATA_READ` reply, `MIG_DATA_WRITE` bodies small enough for its one `recv()`, RUNNING set
//! after a reset) was found by these tests: tests/vfio-user-peer/README.md.

#[path = "support/peer.rs"]
mod peer;

use vfio_migration::device::DeviceIdentity;
use vfio_migration::live::LocalMigration;
use vfio_migration::session::{LoadOptions, SaveOptions, load_from_stream, save_to_stream};
use vfio_migration::{DeviceState, MigrationDevice};

use peer::{Peer, crc_of, device_bin};

const SIZE: u64 = 4 << 20;
/// What `migr-device` puts in its PCI config space.
const PEER_IDENTITY: DeviceIdentity = DeviceIdentity::Pci {
    vendor: 0x1b36,
    device: 0x10ff,
    subsystem_vendor: 0x1b36,
    subsystem_device: 0x0001,
};

fn assert_loaded(dst: Peer, source_crc: &str) {
    let (exit, lines, status) = dst.finish();
    let state = lines
        .iter()
        .find(|l| l.starts_with("PEER-STATE"))
        .cloned()
        .unwrap_or_default();
    assert!(state.starts_with("PEER-STATE ok"), "destination peer: {lines:?}");
    assert_eq!(crc_of(&state), source_crc, "destination peer: {lines:?}");
    assert_eq!(
        exit,
        format!("PEER-EXIT verdict=ok crc={source_crc}"),
        "destination peer: {lines:?}"
    );
    assert_eq!(status, 0, "destination peer: {lines:?}");
}

#[test]
fn live_migration_with_precopy_into_a_libvfio_user_destination() {
    let Some(bin) = device_bin() else { return };
    let mut src = Peer::start(bin, 41, SIZE, false);
    let source_crc = crc_of(&src.wait_for("PEER-READY"));
    let dst = Peer::start(bin, 41, SIZE, true);

    let a = src.connect();
    let b = dst.connect();
    let flags = a.flags().unwrap();
    assert!(flags.contains(vfio_migration::MigrationFlags::PRE_COPY), "{flags:?}");
    // Identities are checked (no force): the client reads them from the peer's PCI config space.
    assert_eq!(a.identity(), PEER_IDENTITY);
    assert_eq!(b.identity(), PEER_IDENTITY);
    let report = LocalMigration::default()
        .run(vec![Box::new(a)], vec![Box::new(b)], &mut |_| {})
        .unwrap_or_else(|e| panic!("migration failed: {e}"));
    // The peer hands out the header and half of its state in PRE_COPY, the rest in STOP_COPY.
    assert_eq!(report.precopy_bytes[0], 32 + SIZE / 2, "{report:?}");
    assert_eq!(
        report.precopy_bytes[0] + report.stop_copy_bytes[0],
        32 + SIZE + 8,
        "{report:?}"
    );
    drop(report);

    let saved = src.wait_for("PEER-SAVED");
    assert_eq!(
        saved,
        format!(
            "PEER-SAVED precopy={} stopcopy={} total={}",
            32 + SIZE / 2,
            SIZE / 2 + 8,
            SIZE + 40
        )
    );
    assert_loaded(dst, &source_crc);
    let (exit, lines, status) = src.finish();
    assert!(exit.starts_with("PEER-EXIT verdict=none"), "source peer: {lines:?}");
    assert_eq!(status, 0);
}

#[test]
fn save_and_load_through_the_stream_format() {
    let Some(bin) = device_bin() else { return };
    let mut src = Peer::start(bin, 7, SIZE, false);
    let source_crc = crc_of(&src.wait_for("PEER-READY"));
    let dst = Peer::start(bin, 7, SIZE, true);

    let mut a = src.connect();
    let (report, stream) =
        save_to_stream(&mut a, Vec::new(), None, SaveOptions::default()).unwrap_or_else(|e| panic!("save failed: {e}"));
    assert_eq!(report.bytes, SIZE + 40);
    assert_eq!(a.state().unwrap(), DeviceState::Running);
    drop(a);

    let mut b = dst.connect();
    let loaded =
        load_from_stream(&mut b, &stream[..], LoadOptions::default()).unwrap_or_else(|e| panic!("load failed: {e}"));
    assert_eq!(loaded.report.bytes, SIZE + 40);
    assert_eq!(b.state().unwrap(), DeviceState::Running);
    drop(b);
    assert_loaded(dst, &source_crc);
    drop(src);
}

#[test]
fn a_damaged_stream_is_refused_and_the_destination_holds_no_state() {
    let Some(bin) = device_bin() else { return };
    let src = Peer::start(bin, 9, SIZE, false);
    let dst = Peer::start(bin, 9, SIZE, true);

    let mut a = src.connect();
    let (_, mut stream) = save_to_stream(&mut a, Vec::new(), None, SaveOptions::default()).unwrap();
    drop(a);
    // One bit in the middle of the device state.
    let mid = stream.len() / 2;
    stream[mid] ^= 0x10;

    let mut b = dst.connect();
    let err = load_from_stream(&mut b, &stream[..], LoadOptions::default()).expect_err("a damaged stream was loaded");
    assert!(err.stream_error().is_some(), "not refused as a damaged stream: {err}");
    // The destination was left usable, not in RESUMING.
    let state = b.state().unwrap();
    assert!(
        matches!(state, DeviceState::Running | DeviceState::Stop),
        "{state:?} after a refused load: {err}"
    );
    drop(b);
    let (exit, lines, _) = dst.finish();
    assert!(
        !lines.iter().any(|l| l.starts_with("PEER-STATE ok")),
        "destination peer: {lines:?}"
    );
    assert!(!exit.contains("verdict=ok"), "destination peer: {lines:?}");
}

#[test]
fn the_peer_refuses_damaged_device_data_and_our_client_reports_it() {
    let Some(bin) = device_bin() else { return };
    let src = Peer::start(bin, 11, SIZE, false);
    let dst = Peer::start(bin, 11, SIZE, true);

    // The raw device data, without our stream format around it.
    let mut a = src.connect();
    let mut raw = Vec::new();
    vfio_migration::session::save(&mut a, &mut raw, SaveOptions::default()).unwrap();
    drop(a);
    assert_eq!(raw.len() as u64, SIZE + 40);
    raw[40 + 12345] ^= 1;

    let mut b = dst.connect();
    let mut session = b
        .set_state(DeviceState::Resuming)
        .unwrap()
        .expect("RESUMING opens a session");
    let mut off = 0;
    while off < raw.len() {
        off += session
            .write(&raw[off..])
            .unwrap_or_else(|e| panic!("write at {off}: {e}"));
    }
    drop(session);
    let err = b
        .set_state(DeviceState::Stop)
        .expect_err("the peer accepted a damaged state");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    b.reset().unwrap();
    drop(b);
    let (exit, lines, status) = dst.finish();
    assert!(
        lines.iter().any(|l| l.starts_with("PEER-STATE BAD crc32 of the state")),
        "destination peer: {lines:?}"
    );
    assert!(exit.starts_with("PEER-EXIT verdict=BAD"), "destination peer: {lines:?}");
    assert_eq!(status, 1);
}
