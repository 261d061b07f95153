//! Migration scenarios on the mtty devices, through the engine's public API only.
//!
//! Some drive the engine's save/load; the others drive the [`MigrationDevice`] and
//! [`TransferSession`] traits directly, which tests the kernel backend most directly.

use std::sync::atomic::{AtomicBool, Ordering};

use vfio_migration::device::{ErrorKind, ReadOutcome};
use vfio_migration::kernel::OpenMode;
use vfio_migration::session::{self, After, LoadOptions, SaveOptions, SessionError};
use vfio_migration::state::{ALL_STATES, SessionKind};
use vfio_migration::{DeviceState, MigrationDevice, MigrationFlags, TransferSession};

use crate::mtty::Mtty;
use crate::{Outcome, ensure};

/// mtty's state header magic (first 8 bytes, little endian).
const MTTY_MAGIC: u64 = 0x7e9d_0989_8c3e_2c4e;
/// mtty's header: magic, major, minor, nr_ports, flags.
const HEADER_BYTES: usize = 24;
/// mtty's state per port.
const PORT_BYTES: usize = 36;
/// Never buffer more than this from a session.
const MAX_STATE: usize = 1 << 20;
/// How many "nothing now" answers a STOP_COPY read loop accepts in a row.
const MAX_IDLE: u32 = 1000;

fn state_size(ports: u32) -> usize {
    HEADER_BYTES + PORT_BYTES * ports as usize
}

/// Read a session until `until` says stop (End in STOP_COPY, NothingNow in PRE_COPY), `chunk`
/// bytes at a time.
fn read_session(s: &mut dyn TransferSession, chunk: usize, stop_on_nothing: bool) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    let mut idle = 0;
    loop {
        match s.read(&mut buf).map_err(|e| e.to_string())? {
            ReadOutcome::Data(n) => {
                ensure!(n <= chunk, "read returned {n} bytes for a {chunk}-byte buffer");
                out.extend_from_slice(&buf[..n]);
                ensure!(out.len() <= MAX_STATE, "more than {MAX_STATE} bytes of device state");
                idle = 0;
            }
            ReadOutcome::NothingNow if stop_on_nothing => return Ok(out),
            ReadOutcome::NothingNow => {
                idle += 1;
                ensure!(
                    idle < MAX_IDLE,
                    "no data for {MAX_IDLE} reads after {} bytes",
                    out.len()
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            ReadOutcome::End => {
                ensure!(!stop_on_nothing, "End in a pre-copy read after {} bytes", out.len());
                return Ok(out);
            }
        }
    }
}

/// Write all of `data` into a session, `chunk` bytes at a time, accepting short writes.
fn write_session(s: &mut dyn TransferSession, data: &[u8], chunk: usize) -> Result<(), String> {
    let mut done = 0;
    while done < data.len() {
        let end = (done + chunk).min(data.len());
        let n = s
            .write(&data[done..end])
            .map_err(|e| format!("after {done} bytes: {e}"))?;
        ensure!(n > 0 && n <= end - done, "write took {n} of {} bytes", end - done);
        done += n;
    }
    Ok(())
}

/// Save through the engine's stop-copy save, leaving the device in `after`.
pub fn save(m: &mut Mtty, after: After) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let opts = SaveOptions {
        after,
        ..SaveOptions::default()
    };
    let report = session::save(m.dev(), &mut out, opts).map_err(|e| format!("save {}: {e}", m.label))?;
    ensure!(
        report.bytes == out.len() as u64,
        "save reported {} bytes, wrote {}",
        report.bytes,
        out.len()
    );
    ensure!(
        report.final_state == after_state(after),
        "save left {}",
        report.final_state
    );
    Ok(out)
}

fn after_state(after: After) -> DeviceState {
    match after {
        After::Running => DeviceState::Running,
        After::Stop => DeviceState::Stop,
    }
}

/// Load through the engine's load; the device ends RUNNING.
fn load(m: &mut Mtty, data: &[u8]) -> Result<(), SessionError> {
    let mut input = data;
    session::load(m.dev(), &mut input, LoadOptions::default()).map(|_| ())
}

/// Byte for byte: `m` now saves exactly `want` (mtty copies its whole state, so a loaded device
/// saves what it was given). Catches corruption of state the registers do not show.
pub fn same_state(m: &mut Mtty, want: &[u8]) -> Outcome {
    let got = save(m, After::Running)?;
    if got == want {
        return Ok(());
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Err(format!(
        "{} saves {} bytes differing from the {} loaded (first at byte {first})",
        m.label,
        got.len(),
        want.len()
    ))
}

fn check_header(data: &[u8], ports: u32) -> Outcome {
    ensure!(
        data.len() == state_size(ports),
        "state of {} bytes, want {}",
        data.len(),
        state_size(ports)
    );
    let magic = u64::from_le_bytes(data[..8].try_into().map_err(|_| "short header")?);
    ensure!(magic == MTTY_MAGIC, "magic {magic:#x}, want {MTTY_MAGIC:#x}");
    let nr_ports = u32::from_le_bytes(data[16..20].try_into().map_err(|_| "short header")?);
    ensure!(nr_ports == ports, "header says {nr_ports} ports, want {ports}");
    Ok(())
}

/// Flags 0x7, the stop-copy size of both mtty types, RUNNING.
pub fn probe() -> Outcome {
    for (var, ports) in [("MTTY_A", 2), ("MTTY_C", 1)] {
        let m = Mtty::open(var, OpenMode::Group)?;
        let flags = m.opened.device.flags().map_err(|e| e.to_string())?;
        ensure!(
            flags.bits() == 0x7,
            "{var}: flags {flags} ({:#x}), want 0x7",
            flags.bits()
        );
        let size = m.opened.device.stop_copy_size().map_err(|e| e.to_string())?;
        ensure!(
            size == state_size(ports) as u64,
            "{var}: stop-copy size {size}, want {}",
            state_size(ports)
        );
        m.expect_state(DeviceState::Running)?;
        println!("rig-guest: probe {var}: flags {flags}, stop-copy size {size}, state RUNNING");
    }
    Ok(())
}

/// Stop-copy migration A -> B (each opened as given) with observable state.
pub fn stop_copy(src_mode: OpenMode, dst_mode: OpenMode) -> Outcome {
    let mut a = Mtty::open("MTTY_A", src_mode)?;
    let mut b = Mtty::open("MTTY_B", dst_mode)?;
    let want = a.imprint(0x31)?;
    let before_b = b.imprint(0x9c)?;
    ensure!(want != before_b, "source and destination imprints are the same");

    let data = save(&mut a, After::Stop)?;
    check_header(&data, 2)?;
    a.expect_state(DeviceState::Stop)?;
    load(&mut b, &data).map_err(|e| format!("load B: {e}"))?;
    b.expect_state(DeviceState::Running)?;
    same_state(&mut b, &data)?;
    b.expect_observed(&want)?;
    // The source, restarted, still has its state.
    a.dev().set_state(DeviceState::Running).map_err(|e| e.to_string())?;
    a.expect_state(DeviceState::Running)?;
    a.expect_observed(&want)?;
    Ok(())
}

/// Pre-copy on one session: PRE_COPY, info 24/0, the header, "nothing now", PRE_COPY_P2P,
/// STOP_COPY, the ports, End; then the stream loads into B.
pub fn pre_copy(src_mode: OpenMode, dst_mode: OpenMode) -> Outcome {
    let mut a = Mtty::open("MTTY_A", src_mode)?;
    let mut b = Mtty::open("MTTY_B", dst_mode)?;
    let want = a.imprint(0x47)?;
    b.imprint(0xe2)?;

    let mut s = a
        .dev()
        .set_state(DeviceState::PreCopy)
        .map_err(|e| e.to_string())?
        .ok_or("RUNNING -> PRE_COPY opened no session")?;
    ensure!(s.kind() == SessionKind::Saving, "PRE_COPY session kind {:?}", s.kind());
    a.expect_state(DeviceState::PreCopy)?;
    let info = s.precopy_info().map_err(|e| e.to_string())?;
    ensure!(
        info.initial_bytes == HEADER_BYTES as u64 && info.dirty_bytes == 0,
        "pre-copy info {info:?}, want initial 24, dirty 0"
    );
    let mut data = read_session(s.as_mut(), 4096, true)?;
    ensure!(
        data.len() == HEADER_BYTES,
        "pre-copy gave {} bytes before nothing-now, want {HEADER_BYTES}",
        data.len()
    );
    let info = s.precopy_info().map_err(|e| e.to_string())?;
    ensure!(info.pending() == 0, "pre-copy info after the header: {info:?}");
    // A second read after the end of pre-copy data is again "nothing now".
    let mut buf = [0u8; 16];
    let again = s.read(&mut buf).map_err(|e| e.to_string())?;
    ensure!(again == ReadOutcome::NothingNow, "second pre-copy read: {again:?}");

    let none = a.dev().set_state(DeviceState::PreCopyP2p).map_err(|e| e.to_string())?;
    ensure!(none.is_none(), "PRE_COPY -> PRE_COPY_P2P opened a new session");
    a.expect_state(DeviceState::PreCopyP2p)?;
    let info = s
        .precopy_info()
        .map_err(|e| format!("pre-copy info in PRE_COPY_P2P: {e}"))?;
    ensure!(info.pending() == 0, "pre-copy info in PRE_COPY_P2P: {info:?}");
    let none = a.dev().set_state(DeviceState::StopCopy).map_err(|e| e.to_string())?;
    ensure!(none.is_none(), "PRE_COPY_P2P -> STOP_COPY opened a new session");
    a.expect_state(DeviceState::StopCopy)?;
    data.extend(read_session(s.as_mut(), 4096, false)?);
    check_header(&data, 2)?;

    a.dev().set_state(DeviceState::Stop).map_err(|e| e.to_string())?;
    a.expect_state(DeviceState::Stop)?;
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind, ErrorKind::SessionClosed) => {}
        other => return Err(format!("read after STOP_COPY -> STOP: {other:?}, want SessionClosed")),
    }
    drop(s);

    load(&mut b, &data).map_err(|e| format!("load B: {e}"))?;
    same_state(&mut b, &data)?;
    b.expect_observed(&want)?;
    a.dev().set_state(DeviceState::Running).map_err(|e| e.to_string())?;
    a.expect_observed(&want)?;
    Ok(())
}

/// Every direct arc of mtty's state machine (flags 0x7).
pub fn arcs() -> Vec<(DeviceState, DeviceState)> {
    let flags = MigrationFlags::from_bits(0x7);
    let mut arcs = Vec::new();
    for &from in &ALL_STATES {
        for &to in &ALL_STATES {
            if from == to || from == DeviceState::Error || to == DeviceState::Error {
                continue;
            }
            if vfio_migration::state::next_step(from, to, flags) == Ok(to) {
                arcs.push((from, to));
            }
        }
    }
    arcs
}

/// Take A to `from`, request `to` (one arc), and check the state read back and the sessions.
pub fn arc(from: DeviceState, to: DeviceState) -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    // A valid stream of A, for leaving RESUMING.
    let stream = save(&mut a, After::Running)?;
    let result = arc_inner(&mut a, from, to, &stream);
    a.dev().reset().map_err(|e| format!("reset after the arc: {e}"))?;
    a.expect_state(DeviceState::Running)?;
    result
}

fn arc_inner(a: &mut Mtty, from: DeviceState, to: DeviceState, stream: &[u8]) -> Outcome {
    let mut held = a.dev().set_state(from).map_err(|e| format!("reaching {from}: {e}"))?;
    a.expect_state(from)?;
    ensure!(
        held.is_some() == from.session_kind().is_some(),
        "reaching {from}: session {}",
        if held.is_some() { "opened" } else { "missing" }
    );
    if from == DeviceState::Resuming {
        let s = held.as_mut().ok_or("no RESUMING session")?;
        write_session(s.as_mut(), stream, 4096)?;
    }
    let new = a.dev().set_state(to).map_err(|e| format!("{from} -> {to}: {e}"))?;
    a.expect_state(to)?;
    let opens = from.arc_opens(to);
    ensure!(
        new.as_ref().map(|s| s.kind()) == opens,
        "{from} -> {to}: session {:?}, want {opens:?}",
        new.as_ref().map(|s| s.kind())
    );
    if let Some(s) = held.as_mut() {
        let mut buf = [0u8; 8];
        let res = match s.kind() {
            SessionKind::Saving => s.read(&mut buf).map(|_| ()),
            SessionKind::Resuming => s.write(&buf).map(|_| ()),
        };
        let closed = matches!(&res, Err(e) if matches!(e.kind, ErrorKind::SessionClosed));
        if from.arc_closes(to) || new.is_some() {
            ensure!(closed, "{from} -> {to}: the old session is still usable: {res:?}");
        } else if s.kind() == SessionKind::Saving {
            // The saving session carries on (PRE_COPY <-> PRE_COPY_P2P -> STOP_COPY).
            ensure!(!closed, "{from} -> {to}: the saving session was closed");
        }
    }
    Ok(())
}

/// Save with 7-byte reads and load with 7-byte writes, through the traits directly.
pub fn small_io() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let mut b = Mtty::open("MTTY_B", OpenMode::Group)?;
    let want = a.imprint(0x5e)?;
    b.imprint(0x11)?;

    let mut s = a
        .dev()
        .set_state(DeviceState::StopCopy)
        .map_err(|e| e.to_string())?
        .ok_or("-> STOP_COPY opened no session")?;
    let data = read_session(s.as_mut(), 7, false)?;
    drop(s);
    a.dev().set_state(DeviceState::Running).map_err(|e| e.to_string())?;
    check_header(&data, 2)?;
    // The same device state saved in one go gives the same bytes.
    let whole = save(&mut a, After::Running)?;
    ensure!(data == whole, "7-byte reads gave other bytes than one save");

    let mut s = b
        .dev()
        .set_state(DeviceState::Resuming)
        .map_err(|e| e.to_string())?
        .ok_or("-> RESUMING opened no session")?;
    write_session(s.as_mut(), &data, 7)?;
    b.dev()
        .set_state(DeviceState::Running)
        .map_err(|e| format!("RESUMING -> RUNNING after 7-byte writes: {e}"))?;
    drop(s);
    b.expect_state(DeviceState::Running)?;
    same_state(&mut b, &data)?;
    b.expect_observed(&want)?;
    a.expect_observed(&want)?;
    Ok(())
}

/// A good migration A -> B with fresh observable state, used after a failure.
fn good_migration(a: &mut Mtty, b: &mut Mtty, seed: u8) -> Outcome {
    let want = a.imprint(seed)?;
    let data = save(a, After::Running)?;
    load(b, &data).map_err(|e| format!("good load after the failure: {e}"))?;
    same_state(b, &data)?;
    b.expect_observed(&want)
}

/// Garbage written straight into B's RESUMING session: a clear error, then reset gives RUNNING.
pub fn bad_input_raw() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let mut b = Mtty::open("MTTY_B", OpenMode::Group)?;
    let garbage: Vec<u8> = (0..state_size(2)).map(|i| (i as u8).wrapping_mul(37) ^ 0xa5).collect();
    let mut s = b
        .dev()
        .set_state(DeviceState::Resuming)
        .map_err(|e| e.to_string())?
        .ok_or("-> RESUMING opened no session")?;
    let failure = match write_session(s.as_mut(), &garbage, 4096) {
        Err(e) => format!("write: {e}"),
        Ok(()) => match b.dev().set_state(DeviceState::Stop) {
            Err(e) => format!("RESUMING -> STOP: {e}"),
            Ok(_) => return Err("garbage was accepted".into()),
        },
    };
    println!("rig-guest: bad-input-raw: refused as expected: {failure}");
    ensure!(
        failure.contains("MTTY_B") || failure.contains("0e5d7a1c"),
        "error names no device: {failure}"
    );
    drop(s);
    let st = b.state()?;
    ensure!(
        matches!(st, DeviceState::Resuming | DeviceState::Error),
        "after refused garbage the state is {st}"
    );
    b.dev().reset().map_err(|e| format!("reset: {e}"))?;
    b.expect_state(DeviceState::Running)?;
    good_migration(&mut a, &mut b, 0x6b)
}

/// Garbage through the engine's load: an error, B reset to RUNNING, then a good migration.
pub fn bad_input_load() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let mut b = Mtty::open("MTTY_B", OpenMode::Group)?;
    let garbage = vec![0xeeu8; state_size(2)];
    match load(&mut b, &garbage) {
        Ok(()) => return Err("garbage was loaded".into()),
        Err(e) => {
            println!("rig-guest: bad-input-load: refused as expected: {e}");
            let rec = e.recovery().ok_or_else(|| format!("no recovery reported: {e}"))?;
            ensure!(
                rec.final_state() == Some(DeviceState::Running),
                "recovery {rec:?} does not end RUNNING"
            );
        }
    }
    b.expect_state(DeviceState::Running)?;
    good_migration(&mut a, &mut b, 0x2d)
}

/// A raw mtty-2 state into the mtty-1 device is refused (by mtty: nothing in a raw state names
/// its device) and C stays RUNNING with its state. `stream-wrong-type` shows the engine refusing
/// the same from the stream header before the device is touched.
pub fn wrong_type() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let mut c = Mtty::open("MTTY_C", OpenMode::Group)?;
    let want_c = c.imprint(0x73)?;
    a.imprint(0x19)?;
    let data = save(&mut a, After::Running)?;
    match load(&mut c, &data) {
        Ok(()) => return Err("an mtty-2 state was loaded into mtty-1".into()),
        Err(e) => println!("rig-guest: wrong-type: refused as expected: {e}"),
    }
    c.expect_state(DeviceState::Running)?;
    c.expect_observed(&want_c)
}

/// Cancel a save after its first chunk: the source ends RUNNING with its state intact.
pub fn cancel_save() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let mut b = Mtty::open("MTTY_B", OpenMode::Group)?;
    let want = a.imprint(0x84)?;
    let cancel = AtomicBool::new(false);
    let mut chunks = 0u32;
    let mut progress = |_: u64, _: Option<u64>| {
        chunks += 1;
        cancel.store(true, Ordering::Relaxed);
    };
    let mut out = Vec::new();
    let opts = SaveOptions {
        after: After::Stop,
        buffer_size: 7,
        cancel: Some(&cancel),
        progress: Some(&mut progress),
        ..SaveOptions::default()
    };
    match session::save(a.dev(), &mut out, opts) {
        Ok(r) => return Err(format!("save finished despite the cancel: {r:?}")),
        Err(SessionError::Cancelled { bytes, recovery, .. }) => {
            println!("rig-guest: cancel-save: cancelled after {bytes} bytes; {recovery}");
            ensure!(
                bytes > 0 && bytes < state_size(2) as u64,
                "cancelled after {bytes} bytes"
            );
        }
        Err(e) => return Err(format!("save failed otherwise than cancelled: {e}")),
    }
    ensure!(chunks == 1, "{chunks} chunks before the cancel took effect");
    a.expect_state(DeviceState::Running)?;
    a.expect_observed(&want)?;
    good_migration(&mut a, &mut b, 0x3a)
}

/// Cancel a save on the real mtty before its first read, the flag set from another thread (as a
/// VMM's cancel would be): the save ends Cancelled after 0 bytes, the source is back in RUNNING,
/// and it saves byte for byte what it saved before and shows its registers.
pub fn cancel_save_before_read() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let want = a.imprint(0x9d)?;
    let before = save(&mut a, After::Running)?;
    let cancel = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| cancel.store(true, Ordering::Release));
    });
    let mut out = Vec::new();
    let opts = SaveOptions {
        after: After::Stop,
        cancel: Some(&cancel),
        ..SaveOptions::default()
    };
    match session::save(a.dev(), &mut out, opts) {
        Ok(r) => return Err(format!("save finished despite the cancel: {r:?}")),
        Err(SessionError::Cancelled { bytes, recovery, .. }) => {
            println!("rig-guest: cancel-save-before-read: cancelled after {bytes} bytes; {recovery}");
            ensure!(bytes == 0 && out.is_empty(), "cancelled after {bytes} bytes");
            ensure!(
                matches!(recovery, session::Recovery::MovedTo(DeviceState::Running)),
                "recovery: {recovery} (want a move back to RUNNING, no reset)"
            );
        }
        Err(e) => return Err(format!("save failed otherwise than cancelled: {e}")),
    }
    a.expect_state(DeviceState::Running)?;
    same_state(&mut a, &before)?;
    a.expect_observed(&want)
}

/// mtty's stub DMA logging through the device trait: START and STOP succeed; REPORT either fails
/// with EOPNOTSUPP (kernels without iova_bitmap support, e.g. Debian's stock kernel) or succeeds
/// with no page set (this rig's kernel, which has IOMMUFD built in: the stub never logs anything).
/// Either way the engine passes on exactly what the kernel said.
///
/// TODO(dirty): the tracker policy for such a device (never trust an always-clean log) is for the
/// engine's trackers to prove, not this device-level scenario.
pub fn dma_log_stub() -> Outcome {
    use vfio_migration::device::DmaRange;
    const EOPNOTSUPP: i32 = 95;
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let ranges = [DmaRange {
        iova: 0,
        length: 1 << 20,
    }];
    let page = a
        .dev()
        .dma_log_start(&ranges, 4096)
        .map_err(|e| format!("start: {e}"))?;
    ensure!(page.is_power_of_two() && page >= 4096, "DMA logging page size {page}");
    // Pre-set bits must survive: REPORT only ever sets bits.
    let mut bitmap = vec![0u64; ((1u64 << 20) / page).div_ceil(64) as usize];
    bitmap[0] = 1 << 5;
    let report = a.dev().dma_log_report(0, 1 << 20, page, &mut bitmap);
    let stop = a.dev().dma_log_stop();
    match report {
        Ok(()) => {
            println!(
                "rig-guest: dma-log-stub: REPORT succeeded with {} bits set",
                count(&bitmap)
            );
            ensure!(
                bitmap[0] == 1 << 5 && count(&bitmap) == 1,
                "mtty never writes guest memory, yet REPORT changed the bitmap"
            );
        }
        Err(e) => {
            println!("rig-guest: dma-log-stub: REPORT refused: {e}");
            ensure!(e.raw_os_error() == Some(EOPNOTSUPP), "REPORT: want EOPNOTSUPP, got {e}");
        }
    }
    stop.map_err(|e| format!("stop: {e}"))?;
    // A second START after STOP works (one START until STOP).
    a.dev()
        .dma_log_start(&ranges, 4096)
        .map_err(|e| format!("second start: {e}"))?;
    a.dev().dma_log_stop().map_err(|e| format!("second stop: {e}"))?;
    a.expect_state(DeviceState::Running)
}

fn count(bitmap: &[u64]) -> u32 {
    bitmap.iter().map(|w| w.count_ones()).sum()
}
