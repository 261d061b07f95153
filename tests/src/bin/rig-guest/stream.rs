//! The engine's device-state stream (format v1) around real mtty states: save into a stream,
//! inspect it, load it into a compatible device, refuse it for an incompatible one before that
//! device is touched, and refuse a corrupted stream.

use vfio_migration::kernel::OpenMode;
use vfio_migration::session::{self, After, LoadOptions, SaveOptions};
use vfio_migration::stream::{Header, SectionKind, StreamReader, StreamWriter, inspect};
use vfio_migration::{DeviceState, MigrationDevice};

use crate::migration;
use crate::mtty::Mtty;
use crate::{Outcome, ensure};

/// Save `m` (stop-copy) into a v1 stream with its identity and flags; returns the stream and
/// the raw state.
fn save_stream(m: &mut Mtty) -> Result<(Vec<u8>, Vec<u8>), String> {
    let dev = m.dev();
    let flags = dev.flags().map_err(|e| e.to_string())?;
    let header = Header::single(dev.identity(), flags);
    let mut writer = StreamWriter::new(Vec::new(), header).map_err(|e| format!("stream header: {e}"))?;
    let mut sink = writer
        .chunk_sink(SectionKind::StopCopy, 0)
        .map_err(|e| format!("stream sink: {e}"))?
        .with_chunk_size(40);
    session::save(dev, &mut sink, SaveOptions::default()).map_err(|e| format!("save {}: {e}", m.label))?;
    sink.finish().map_err(|e| format!("stream chunks: {e}"))?;
    let stream = writer.finish().map_err(|e| format!("stream end: {e}"))?;
    let raw = migration::save(m, After::Running)?;
    Ok((stream, raw))
}

/// Check `stream` against `m` and load it; the check comes before the device is touched.
fn load_stream(m: &mut Mtty, stream: &[u8]) -> Result<(), String> {
    let mut reader = StreamReader::new(stream).map_err(|e| format!("stream header: {e}"))?;
    let label = m.label;
    let dev = m.dev();
    let flags = dev.flags().map_err(|e| e.to_string())?;
    reader
        .header()
        .check_compatible(0, &dev.identity(), flags, false)
        .map_err(|e| format!("refused for {label}: {e}"))?;
    let mut payload = reader.device_payload(0);
    session::load(dev, &mut payload, LoadOptions::default()).map_err(|e| format!("load {label}: {e}"))?;
    drop(payload);
    ensure!(reader.is_finished(), "the stream was not read to its end marker");
    Ok(())
}

/// Save A into a stream, inspect it, load it into B.
pub fn round_trip() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let mut b = Mtty::open("MTTY_B", OpenMode::Cdev)?;
    let want = a.imprint(0x7a)?;
    b.imprint(0xa7)?;
    let (stream, raw) = save_stream(&mut a)?;
    let report = inspect(&stream[..]).map_err(|e| format!("inspect: {e}"))?;
    let text = report.to_string();
    ensure!(
        text.contains("mdev mtty-2"),
        "inspect does not name the device type:\n{text}"
    );
    let end = report.end.as_ref().ok_or("inspect found no end marker")?;
    ensure!(
        end.total_bytes == raw.len() as u64,
        "stream carries {} bytes, want {}",
        end.total_bytes,
        raw.len()
    );
    println!(
        "rig-guest: stream-round-trip: {} stream bytes for {} state bytes",
        stream.len(),
        raw.len()
    );
    load_stream(&mut b, &stream)?;
    b.expect_state(DeviceState::Running)?;
    migration::same_state(&mut b, &raw)?;
    b.expect_observed(&want)
}

/// An mtty-2 stream offered to the mtty-1: refused from the header; C is never asked anything
/// that changes it (still RUNNING, same state).
pub fn wrong_type() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let mut c = Mtty::open("MTTY_C", OpenMode::Group)?;
    a.imprint(0x2b)?;
    let want_c = c.imprint(0xb2)?;
    let before = migration::save(&mut c, After::Running)?;
    let (stream, _) = save_stream(&mut a)?;
    match load_stream(&mut c, &stream) {
        Ok(()) => return Err("an mtty-2 stream was loaded into an mtty-1".into()),
        Err(e) => {
            println!("rig-guest: stream-wrong-type: {e}");
            ensure!(e.starts_with("refused for MTTY_C"), "not refused from the header: {e}");
            ensure!(
                e.contains("mtty-2") && e.contains("mtty-1"),
                "the refusal names no types: {e}"
            );
        }
    }
    c.expect_state(DeviceState::Running)?;
    migration::same_state(&mut c, &before)?;
    c.expect_observed(&want_c)
}

/// One flipped bit in a chunk: the load fails on the checksum, B is reset to RUNNING and works.
pub fn corrupt() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let mut b = Mtty::open("MTTY_B", OpenMode::Group)?;
    a.imprint(0x5c)?;
    let (mut stream, _) = save_stream(&mut a)?;
    let at = stream.len() - 100;
    stream[at] ^= 0x10;
    match load_stream(&mut b, &stream) {
        Ok(()) => return Err(format!("a stream with byte {at} flipped was loaded")),
        Err(e) => println!("rig-guest: stream-corrupt: refused as expected: {e}"),
    }
    b.expect_state(DeviceState::Running)?;
    let want = a.imprint(0xc5)?;
    let (stream, raw) = save_stream(&mut a)?;
    load_stream(&mut b, &stream)?;
    migration::same_state(&mut b, &raw)?;
    b.expect_observed(&want)
}
