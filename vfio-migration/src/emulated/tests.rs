//! Tests of the emulated device through the [`MigrationDevice`] and [`TransferSession`] traits.

use std::time::Duration;

use proptest::prelude::*;

use super::format::{HEADER_LEN, RECORD_HEAD_LEN, TRAILER_LEN, full_len, initial_len};
use super::*;
use crate::device::{DeviceError, ErrorKind, MigrationDevice, ReadOutcome, TransferSession};
use crate::state::DeviceState::*;

/// A device on a manual clock (no time-driven changes unless the test moves the clock).
fn dev(spec: &str) -> (EmulatedDevice, ManualClock) {
    let clock = ManualClock::new();
    let d = EmulatedDevice::from_spec(spec)
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    (d, clock)
}

fn errno(e: &DeviceError) -> i32 {
    e.raw_os_error().unwrap_or_else(|| panic!("no errno in {e}"))
}

fn write_all(inp: &mut dyn TransferSession, mut data: &[u8]) -> Result<(), DeviceError> {
    while !data.is_empty() {
        let n = inp.write(data)?;
        assert!(n > 0, "write took nothing");
        data = &data[n..];
    }
    Ok(())
}

/// Read until something other than data; every chunk is written to `inp` when given, and kept.
fn pump(
    out: &mut dyn TransferSession,
    mut inp: Option<&mut dyn TransferSession>,
    read: usize,
) -> (Vec<u8>, ReadOutcome) {
    let mut buf = vec![0u8; read];
    let mut all = Vec::new();
    loop {
        match out.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => {
                assert!(n > 0 && n <= read);
                if let Some(i) = inp.as_deref_mut() {
                    write_all(i, &buf[..n]).unwrap();
                }
                all.extend_from_slice(&buf[..n]);
            }
            other => return (all, other),
        }
    }
}

/// Stop-copy migrate `src` into `dst` with reads of `read` bytes; returns the bytes moved.
fn migrate(src: &mut EmulatedDevice, dst: &mut EmulatedDevice, read: usize) -> u64 {
    let expect = src.stop_copy_size().unwrap();
    let mut out = src.set_state(StopCopy).unwrap().expect("saving session");
    let mut inp = dst.set_state(Resuming).unwrap().expect("resuming session");
    let mut buf = vec![0u8; read];
    let mut moved = 0u64;
    loop {
        match out.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => {
                assert!(n <= read);
                write_all(inp.as_mut(), &buf[..n]).unwrap();
                moved += n as u64;
            }
            ReadOutcome::End => break,
            ReadOutcome::NothingNow => panic!("NothingNow in STOP_COPY"),
        }
    }
    assert_eq!(moved, expect, "stop_copy_size was not exact");
    src.set_state(Stop).unwrap();
    dst.set_state(Running).unwrap();
    assert_eq!(dst.device_state(), Running);
    moved
}

/// The whole stream of a fresh device (stop-copy, no pre-copy), then back to RUNNING.
fn stream_of(spec: &str) -> Vec<u8> {
    let (mut src, _) = dev(spec);
    let mut out = src.set_state(StopCopy).unwrap().unwrap();
    let (bytes, end) = pump(out.as_mut(), None, 65536);
    assert_eq!(end, ReadOutcome::End);
    src.set_state(Running).unwrap();
    bytes
}

#[test]
fn save_load_round_trip_small_sizes_and_read_sizes() {
    for spec in [
        "size=1",
        "size=2,block=1",
        "size=7,block=4",
        "size=4095",
        "size=4096",
        "size=4097",
        "size=100000,block=512",
        "size=300000,block=64K",
    ] {
        for read in [1, 7, 4096, 1 << 20] {
            let (mut src, _) = dev(spec);
            let (mut dst, _) = dev(spec);
            let blocks = src.config().blocks();
            src.touch_block(blocks - 1).unwrap();
            src.touch_blocks(3).unwrap();
            src.touch_block(0).unwrap();
            let before = dst.digest();
            assert_ne!(src.digest(), before, "{spec}");
            let moved = migrate(&mut src, &mut dst, read);
            assert_eq!(moved, full_len(src.config()), "{spec} read {read}");
            assert_eq!(src.digest(), dst.digest(), "{spec} read {read}");
            for i in 0..blocks {
                assert_eq!(src.version(i), dst.version(i));
            }
            assert_eq!(src.block_content(blocks - 1), dst.block_content(blocks - 1));
            // A change on either side shows in the digest.
            dst.touch_block(0).unwrap();
            assert_ne!(src.digest(), dst.digest(), "{spec}");
        }
    }
}

#[test]
fn save_load_round_trip_64_mib() {
    for read in [4096, 1 << 20] {
        let (mut src, _) = dev("size=64M,seed=99");
        let (mut dst, _) = dev("size=64M,seed=99");
        src.touch_blocks(1000).unwrap();
        let moved = migrate(&mut src, &mut dst, read);
        assert_eq!(moved, (64 << 20) + 16384 * 16 + HEADER_LEN + TRAILER_LEN);
        assert_eq!(src.digest(), dst.digest());
    }
}

#[test]
fn writes_of_one_byte_load_too() {
    let spec = "size=10000,block=1000,seed=5";
    let (src, _) = dev(spec);
    src.touch_block(4).unwrap();
    drop(src);
    let bytes = {
        let (mut s, _) = dev(spec);
        s.touch_block(4).unwrap();
        let mut out = s.set_state(StopCopy).unwrap().unwrap();
        pump(out.as_mut(), None, 333).0
    };
    let (mut dst, _) = dev(spec);
    let mut inp = dst.set_state(Resuming).unwrap().unwrap();
    for b in &bytes {
        assert_eq!(inp.write(std::slice::from_ref(b)).unwrap(), 1);
    }
    dst.set_state(Stop).unwrap();
    assert_eq!(dst.version(4), Some(1));
    assert_eq!(dst.version(3), Some(0));
}

#[test]
fn precopy_accounting_and_one_session_across_pc_pcp2p_sc() {
    let (mut src, _) = dev("size=64K,block=4K");
    let (mut dst, _) = dev("size=64K,block=4K");
    let cfg = src.config().clone();
    let mut s = src
        .set_state(PreCopy)
        .unwrap()
        .expect("RUNNING -> PRE_COPY opens a session");
    let mut inp = dst.set_state(Resuming).unwrap().unwrap();
    let info = s.precopy_info().unwrap();
    assert_eq!(info.initial_bytes, initial_len(&cfg));
    assert_eq!(info.initial_bytes, 32 + 16 * (16 + 4096));
    assert_eq!(info.dirty_bytes, 0);
    assert_eq!(src.stop_copy_size().unwrap(), full_len(&cfg));

    // Initial bytes fall exactly as they are read.
    let mut buf = vec![0u8; 1000];
    let mut left = info.initial_bytes;
    while left > 0 {
        let ReadOutcome::Data(n) = s.read(&mut buf).unwrap() else {
            panic!("initial data missing")
        };
        write_all(inp.as_mut(), &buf[..n]).unwrap();
        left -= n as u64;
        assert_eq!(s.precopy_info().unwrap().initial_bytes, left);
        assert_eq!(s.precopy_info().unwrap().dirty_bytes, 0);
    }
    assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::NothingNow);
    assert_eq!(src.stop_copy_size().unwrap(), TRAILER_LEN);

    // Dirty bytes follow touched blocks (one record per block however often it is touched).
    src.touch_block(3).unwrap();
    src.touch_block(3).unwrap();
    src.touch_block(15).unwrap();
    let rec = RECORD_HEAD_LEN + 4096;
    assert_eq!(
        s.precopy_info().unwrap(),
        PrecopyInfo {
            initial_bytes: 0,
            dirty_bytes: 2 * rec,
            reinit: false,
        }
    );
    assert_eq!(src.stop_copy_size().unwrap(), 2 * rec + TRAILER_LEN);
    let mut small = [0u8; 10];
    let ReadOutcome::Data(10) = s.read(&mut small).unwrap() else {
        panic!()
    };
    write_all(inp.as_mut(), &small).unwrap();
    assert_eq!(s.precopy_info().unwrap().dirty_bytes, 2 * rec - 10);
    let (bytes, outcome) = pump(s.as_mut(), Some(inp.as_mut()), 777);
    assert_eq!(bytes.len() as u64, 2 * rec - 10);
    assert_eq!(outcome, ReadOutcome::NothingNow);
    assert_eq!(s.precopy_info().unwrap().dirty_bytes, 0);

    // PRE_COPY -> PRE_COPY_P2P keeps the session; the content is frozen there.
    src.touch_block(7).unwrap();
    assert!(src.set_state(PreCopyP2p).unwrap().is_none());
    assert_eq!(s.precopy_info().unwrap().dirty_bytes, rec);
    assert!(src.touch_block(8).is_err());
    // PRE_COPY_P2P -> STOP_COPY keeps it too; precopy_info is refused there.
    assert!(src.set_state(StopCopy).unwrap().is_none());
    assert_eq!(errno(&s.precopy_info().unwrap_err()), libc::EINVAL);
    assert_eq!(src.stop_copy_size().unwrap(), rec + TRAILER_LEN);
    let (bytes, outcome) = pump(s.as_mut(), Some(inp.as_mut()), 4096);
    assert_eq!(bytes.len() as u64, rec + TRAILER_LEN);
    assert_eq!(outcome, ReadOutcome::End);
    assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::End);
    src.set_state(Stop).unwrap();
    assert!(matches!(s.read(&mut buf).unwrap_err().kind, ErrorKind::SessionClosed));
    dst.set_state(Running).unwrap();
    assert_eq!(src.digest(), dst.digest());
    assert_eq!(dst.version(3), Some(2));
    assert_eq!(dst.version(7), Some(1));
}

#[test]
fn leaving_precopy_ends_the_session_and_a_new_one_starts_over() {
    let (mut src, _) = dev("size=8K,block=4K");
    let mut s = src.set_state(PreCopy).unwrap().unwrap();
    let mut buf = [0u8; 100];
    assert!(matches!(s.read(&mut buf).unwrap(), ReadOutcome::Data(100)));
    assert!(src.stop_copy_size().unwrap() < full_len(src.config()));
    assert!(src.set_state(Running).unwrap().is_none());
    assert_eq!(
        src.stop_copy_size().unwrap(),
        full_len(src.config()),
        "the session's progress is gone"
    );
    assert!(matches!(s.read(&mut buf).unwrap_err().kind, ErrorKind::SessionClosed));
    assert!(matches!(s.precopy_info().unwrap_err().kind, ErrorKind::SessionClosed));
    let mut s2 = src.set_state(PreCopy).unwrap().unwrap();
    assert_eq!(s2.precopy_info().unwrap().initial_bytes, initial_len(src.config()));
    assert!(matches!(s.read(&mut buf).unwrap_err().kind, ErrorKind::SessionClosed));
    // PRE_COPY -> STOP_COPY with P2P goes through PRE_COPY_P2P, on the same session.
    assert!(src.set_state(StopCopy).unwrap().is_none());
    let (bytes, end) = pump(s2.as_mut(), None, 4096);
    assert_eq!(bytes.len() as u64, full_len(src.config()));
    assert_eq!(end, ReadOutcome::End);
    assert_eq!(src.stop_copy_size().unwrap(), 0);
    src.set_state(Stop).unwrap();
    assert_eq!(src.stop_copy_size().unwrap(), full_len(src.config()));
}

#[test]
fn stop_copy_without_precopy_sends_everything_and_size_is_exact() {
    let (mut src, _) = dev("size=1M,flags=stop-copy");
    src.touch_blocks(50).unwrap();
    let size = src.stop_copy_size().unwrap();
    assert_eq!(size, full_len(src.config()));
    // Without P2P: RUNNING -> STOP -> STOP_COPY.
    let mut s = src.set_state(StopCopy).unwrap().unwrap();
    assert_eq!(src.stop_copy_size().unwrap(), size);
    assert_eq!(errno(&s.precopy_info().unwrap_err()), libc::EINVAL);
    let mut buf = vec![0u8; 5000];
    let ReadOutcome::Data(n) = s.read(&mut buf).unwrap() else {
        panic!()
    };
    assert_eq!(src.stop_copy_size().unwrap(), size - n as u64);
    let (rest, end) = pump(s.as_mut(), None, 65536);
    assert_eq!(n as u64 + rest.len() as u64, size);
    assert_eq!(end, ReadOutcome::End);
    // PRE_COPY is unsupported on this device.
    src.set_state(Running).unwrap();
    assert!(matches!(src.set_state(PreCopy).unwrap_err().kind, ErrorKind::State(_)));
}

#[test]
fn set_state_follows_the_kernel_path_and_session_rules() {
    let (mut d, _) = dev("size=4K");
    // STOP_COPY -> PRE_COPY has no path.
    let _s = d.set_state(StopCopy).unwrap().unwrap();
    assert!(matches!(d.set_state(PreCopy).unwrap_err().kind, ErrorKind::State(_)));
    assert_eq!(d.device_state(), StopCopy);
    // ERROR can never be requested.
    assert!(matches!(d.set_state(Error).unwrap_err().kind, ErrorKind::State(_)));
    // Same state: no session, no change.
    assert!(d.set_state(StopCopy).unwrap().is_none());
    assert!(d.set_state(Running).unwrap().is_none());
    // Saving sessions are read-only, resuming ones write-only.
    let mut s = d.set_state(PreCopy).unwrap().unwrap();
    assert_eq!(s.kind(), SessionKind::Saving);
    assert_eq!(errno(&s.write(b"x").unwrap_err()), libc::EBADF);
    d.set_state(Running).unwrap();
    let mut r = d.set_state(Resuming).unwrap().unwrap();
    assert_eq!(r.kind(), SessionKind::Resuming);
    assert_eq!(errno(&r.read(&mut [0u8; 4]).unwrap_err()), libc::EBADF);
    assert_eq!(errno(&r.precopy_info().unwrap_err()), libc::ENOTTY);
    // Leaving RESUMING without a load is refused; the device stays there.
    assert_eq!(errno(&d.set_state(Running).unwrap_err()), libc::EINVAL);
    assert_eq!(d.device_state(), Resuming);
    assert!(!d.is_usable());
    d.reset().unwrap();
    assert_eq!(d.device_state(), Running);
    assert!(d.is_usable());
    assert!(matches!(r.write(b"x").unwrap_err().kind, ErrorKind::SessionClosed));
    assert_eq!(
        d.identity(),
        DeviceIdentity::Emulated {
            params: "format=1,size=4096,block=4096,seed=1".into()
        }
    );
    assert_eq!(d.name(), "emulated:format=1,size=4096,block=4096,seed=1");
    let (named, _) = dev("size=4K,name=gpu0");
    assert_eq!(named.name(), "emulated:gpu0");
    assert_eq!(named.flags().unwrap(), MigrationFlags::KNOWN);
}

#[test]
fn dirty_rate_follows_the_clock_only_while_running_or_precopy() {
    let (mut d, clock) = dev("size=64K,block=4K,dirty-rate=8K");
    let d0 = d.digest();
    clock.advance(Duration::from_millis(499)); // 3.99 KiB: no whole block yet
    assert_eq!(d.digest(), d0);
    clock.advance(Duration::from_millis(1)); // 4 KiB: one block change
    let d1 = d.digest();
    assert_ne!(d1, d0);
    let total = |d: &EmulatedDevice| (0..16).map(|i| d.version(i).unwrap() as u64).sum::<u64>();
    assert_eq!(total(&d), 1);
    assert_eq!(d.advance(Duration::from_secs(2)), 4);
    assert_eq!(total(&d), 5);
    // Stopped: time passes, nothing changes.
    d.set_state(Stop).unwrap();
    let stopped = d.digest();
    clock.advance(Duration::from_secs(10));
    assert_eq!(d.advance(Duration::from_secs(10)), 0);
    assert_eq!(d.digest(), stopped);
    assert!(d.touch_blocks(1).is_err());
    // RUNNING_P2P is frozen too.
    d.set_state(RunningP2p).unwrap();
    clock.advance(Duration::from_secs(10));
    assert_eq!(d.digest(), stopped);
    // PRE_COPY changes content and the changes show as dirty bytes.
    let mut s = d.set_state(PreCopy).unwrap().unwrap();
    let (_, outcome) = pump(s.as_mut(), None, 65536);
    assert_eq!(outcome, ReadOutcome::NothingNow);
    clock.advance(Duration::from_secs(1));
    let info = s.precopy_info().unwrap();
    assert_eq!(info.initial_bytes, 0);
    assert!(
        info.dirty_bytes == 2 * (16 + 4096) || info.dirty_bytes == 16 + 4096,
        "{info:?}"
    );
    assert_eq!(total(&d), 7);
}

#[test]
fn arc_faults_stay_or_fall_to_error_and_reset_recovers() {
    let (mut d, _) = dev("size=4K");
    d.set_faults(Faults {
        fail_arc: Some(ArcFault {
            from: RunningP2p,
            to: Stop,
            errno: libc::EIO,
            to_error: false,
            once: true,
        }),
        ..Faults::default()
    });
    // RUNNING -> STOP_COPY walks RUNNING, RUNNING_P2P, STOP, STOP_COPY: it stops at the fault.
    let e = d.set_state(StopCopy).unwrap_err();
    assert_eq!(errno(&e), libc::EIO);
    assert!(e.to_string().contains("RUNNING -> STOP_COPY"), "{e}");
    assert_eq!(d.device_state(), RunningP2p);
    // Once: the retry works.
    assert!(d.set_state(StopCopy).unwrap().is_some());
    assert_eq!(d.faults().fail_arc, None);

    // Falling into ERROR ends the session; only a reset leaves ERROR.
    d.set_state(Running).unwrap();
    let mut s = d.set_state(PreCopy).unwrap().unwrap();
    d.set_faults(Faults {
        fail_arc: Some(ArcFault {
            from: PreCopy,
            to: PreCopyP2p,
            errno: libc::EFAULT,
            to_error: true,
            once: false,
        }),
        ..Faults::default()
    });
    assert_eq!(errno(&d.set_state(StopCopy).unwrap_err()), libc::EFAULT);
    assert_eq!(d.device_state(), Error);
    assert!(!d.is_usable());
    assert!(matches!(
        s.read(&mut [0u8; 8]).unwrap_err().kind,
        ErrorKind::SessionClosed
    ));
    assert!(matches!(d.set_state(Running).unwrap_err().kind, ErrorKind::State(_)));
    d.reset().unwrap();
    assert_eq!(d.device_state(), Running);
    // The fault is not "once": it fires again.
    let _s = d.set_state(PreCopy).unwrap().unwrap();
    assert!(d.set_state(PreCopyP2p).is_err());
}

#[test]
fn reset_and_stop_copy_size_faults() {
    let (mut d, _) = dev("size=4K");
    d.set_faults(Faults {
        stop_copy_size_errno: Some(libc::ENOTTY),
        reset_fails_once: Some(libc::EIO),
        ..Faults::default()
    });
    assert_eq!(errno(&d.stop_copy_size().unwrap_err()), libc::ENOTTY);
    let _s = d.set_state(StopCopy).unwrap().unwrap();
    assert_eq!(errno(&d.reset().unwrap_err()), libc::EIO);
    assert_eq!(d.device_state(), StopCopy);
    d.reset().unwrap();
    assert_eq!(d.device_state(), Running);
}

#[test]
fn short_reads_cap_every_read() {
    let spec = "size=20000,block=3000";
    let (mut src, _) = dev(spec);
    let (mut dst, _) = dev(spec);
    src.set_faults(Faults {
        short_read: Some(5),
        ..Faults::default()
    });
    src.touch_block(2).unwrap();
    let moved = migrate(&mut src, &mut dst, 4096); // asserts every read <= 4096 ...
    assert_eq!(moved, full_len(src.config()));
    assert_eq!(src.digest(), dst.digest());
    // ... and here that each is at most 5.
    src.set_state(Running).unwrap();
    let mut s = src.set_state(StopCopy).unwrap().unwrap();
    let mut buf = [0u8; 100];
    for _ in 0..50 {
        assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::Data(5));
    }
}

#[test]
fn nothing_now_bursts_in_precopy_never_look_like_end_in_stop_copy() {
    let spec = "size=16K,block=1K";
    let (mut src, _) = dev(spec);
    let (mut dst, _) = dev(spec);
    src.set_faults(Faults {
        nothing_now: Some(Burst { count: 2, every: 5 }),
        ..Faults::default()
    });
    let mut s = src.set_state(PreCopy).unwrap().unwrap();
    let mut inp = dst.set_state(Resuming).unwrap().unwrap();
    let mut buf = [0u8; 100];
    let mut pattern = Vec::new();
    for _ in 0..10 {
        let r = s.read(&mut buf).unwrap();
        pattern.push(matches!(r, ReadOutcome::NothingNow));
        if let ReadOutcome::Data(n) = r {
            write_all(inp.as_mut(), &buf[..n]).unwrap();
        }
    }
    assert_eq!(
        pattern,
        [true, true, false, false, false, true, true, false, false, false]
    );
    // In STOP_COPY the burst reads give one byte, and End comes only at the true end.
    assert!(src.set_state(StopCopy).unwrap().is_none());
    let remaining = src.stop_copy_size().unwrap();
    let mut got = 0u64;
    let mut ones = 0;
    loop {
        match s.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => {
                ones += usize::from(n == 1);
                write_all(inp.as_mut(), &buf[..n]).unwrap();
                got += n as u64;
            }
            ReadOutcome::End => break,
            ReadOutcome::NothingNow => panic!("NothingNow in STOP_COPY"),
        }
    }
    assert_eq!(got, remaining);
    assert!(ones > 10, "{ones}");
    dst.set_state(Running).unwrap();
    assert_eq!(src.digest(), dst.digest());
}

#[test]
fn early_end_gives_a_short_state_the_destination_refuses() {
    let spec = "size=64K";
    let (mut src, _) = dev(spec);
    // reset=keep: what the reset keeps is the content before the refused load.
    let (mut dst, _) = dev("size=64K,reset=keep");
    dst.touch_block(1).unwrap();
    let before = dst.digest();
    src.set_faults(Faults {
        early_end: Some(10000),
        ..Faults::default()
    });
    let mut s = src.set_state(StopCopy).unwrap().unwrap();
    let mut inp = dst.set_state(Resuming).unwrap().unwrap();
    let (bytes, end) = pump(s.as_mut(), Some(inp.as_mut()), 3000);
    assert_eq!(bytes.len(), 10000);
    assert_eq!(end, ReadOutcome::End);
    let e = dst.set_state(Running).unwrap_err();
    assert_eq!(errno(&e), libc::EINVAL);
    assert_eq!(dst.device_state(), Resuming);
    assert!(
        dst.load_problem().unwrap().contains("short"),
        "{:?}",
        dst.load_problem()
    );
    dst.reset().unwrap();
    assert_eq!(dst.device_state(), Running);
    assert_eq!(dst.digest(), before, "a reset discards the partial load");
}

#[test]
fn write_refused_at_a_byte() {
    let spec = "size=8K";
    let bytes = stream_of(spec);
    let (mut dst, _) = dev(spec);
    dst.set_faults(Faults {
        write_fail: Some(WriteFault {
            at: 100,
            errno: libc::EIO,
        }),
        ..Faults::default()
    });
    let mut inp = dst.set_state(Resuming).unwrap().unwrap();
    assert_eq!(inp.write(&bytes[..60]).unwrap(), 60);
    assert_eq!(
        inp.write(&bytes[60..]).unwrap(),
        40,
        "the write crossing the fault is short"
    );
    assert_eq!(errno(&inp.write(&bytes[100..]).unwrap_err()), libc::EIO);
    assert_eq!(errno(&dst.set_state(Stop).unwrap_err()), libc::EINVAL);
    // Lifting the fault lets the same session finish the stream.
    dst.set_faults(Faults::default());
    write_all(inp.as_mut(), &bytes[100..]).unwrap();
    dst.set_state(Stop).unwrap();
}

/// Load `bytes` into a fresh device of `spec`; returns the result of RESUMING -> RUNNING and
/// the first write error.
fn try_load(spec: &str, bytes: &[u8], chunk: usize) -> (EmulatedDevice, Option<DeviceError>, Result<(), DeviceError>) {
    let (mut dst, _) = dev(spec);
    let mut inp = dst.set_state(Resuming).unwrap().unwrap();
    let mut werr = None;
    for c in bytes.chunks(chunk) {
        if let Err(e) = write_all(inp.as_mut(), c) {
            werr = Some(e);
            break;
        }
    }
    let r = dst.set_state(Running).map(|_| ());
    (dst, werr, r)
}

#[test]
fn corrupt_truncated_extra_and_mismatched_streams_are_refused() {
    let spec = "size=10000,block=1000,seed=4";
    let good = stream_of(spec);
    assert_eq!(good.len() as u64, 32 + 10 * 1016 + 24);
    let (ok, werr, r) = try_load(spec, &good, 999);
    assert!(werr.is_none() && r.is_ok());
    assert!(ok.is_usable());

    // One flipped byte anywhere after the header: accepted on write, refused on RESUMING -> STOP.
    let content_byte = 32 + 3 * 1016 + 16 + 500;
    let tag_byte = 32 + 5 * 1016;
    let index_byte = 32 + 5 * 1016 + 8;
    let trailer_count = good.len() - 16;
    let trailer_digest = good.len() - 1;
    for (at, what) in [
        (content_byte, "block 3"),
        (tag_byte, "tag"),
        (index_byte, "block"),
        (trailer_count, "trailer"),
        (trailer_digest, "digest"),
    ] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        for chunk in [1, 4096] {
            // reset=keep: what the reset keeps is the content before the refused load.
            let (mut dst, werr, r) = try_load(&format!("{spec},reset=keep"), &bad, chunk);
            assert!(werr.is_none(), "byte {at}: {werr:?}");
            assert_eq!(errno(&r.unwrap_err()), libc::EINVAL, "byte {at}");
            assert_eq!(dst.device_state(), Resuming);
            let problem = dst.load_problem().unwrap();
            assert!(problem.contains(what), "byte {at}: {problem}");
            dst.reset().unwrap();
            assert_eq!(dst.digest(), ok.digest(), "the partial load was discarded");
        }
    }

    // A record for a block that does not exist.
    let mut bad = good.clone();
    bad[32 + 8..32 + 16].copy_from_slice(&77u64.to_le_bytes());
    let (dst, _, r) = try_load(spec, &bad, 4096);
    assert!(r.is_err());
    assert!(dst.load_problem().unwrap().contains("block 77"));

    // Truncated: refused; completing the stream in the same session then loads.
    for cut in [1, 24, 25, 1000, good.len() - 32, good.len() - 10] {
        let (mut dst, werr, r) = try_load(spec, &good[..good.len() - cut], 512);
        assert!(werr.is_none());
        assert_eq!(errno(&r.unwrap_err()), libc::EINVAL, "cut {cut}");
        assert!(dst.load_problem().unwrap().contains("short"));
        assert_eq!(dst.device_state(), Resuming);
        drop(dst.reset());
    }
    {
        let (mut dst, _) = dev(spec);
        let mut inp = dst.set_state(Resuming).unwrap().unwrap();
        write_all(inp.as_mut(), &good[..good.len() - 5]).unwrap();
        assert!(dst.set_state(Stop).is_err());
        write_all(inp.as_mut(), &good[good.len() - 5..]).unwrap();
        dst.set_state(Stop).unwrap();
        assert!(dst.load_problem().is_none());
    }

    // Extra bytes: the write holding the end is short, the next one fails; the load is good.
    {
        let (mut dst, _) = dev(spec);
        let mut inp = dst.set_state(Resuming).unwrap().unwrap();
        let mut extra = good.clone();
        extra.extend_from_slice(b"more");
        assert_eq!(inp.write(&extra).unwrap(), good.len());
        assert_eq!(errno(&inp.write(b"more").unwrap_err()), libc::ENOSPC);
        dst.set_state(Running).unwrap();
        assert_eq!(dst.digest(), ok.digest());
    }

    // Header mismatches are refused on write.
    for (other, what) in [
        ("size=10000,block=1000,seed=5", "seed"),
        ("size=10001,block=1000,seed=4", "size"),
        ("size=10000,block=500,seed=4", "block"),
    ] {
        let (mut dst, werr, r) = try_load(other, &good, 7);
        let werr = werr.expect("header mismatch must fail the write");
        assert_eq!(errno(&werr), libc::EINVAL);
        assert!(dst.load_problem().unwrap().contains(what), "{what}");
        assert!(r.is_err());
        assert_eq!(dst.device_state(), Resuming);
        dst.reset().unwrap();
        assert!(dst.is_usable());
    }
    let mut bad = good.clone();
    bad[0] = b'X';
    let (dst, werr, _) = try_load(spec, &bad, 4096);
    assert!(werr.is_some());
    assert!(dst.load_problem().unwrap().contains("magic"));
    let mut bad = good.clone();
    bad[8] = 2;
    let (dst, werr, _) = try_load(spec, &bad, 4096);
    assert!(werr.is_some());
    assert!(dst.load_problem().unwrap().contains("format version"));
}

#[test]
fn a_gibibyte_device_costs_about_a_mebibyte() {
    let (mut src, _) = dev("size=1G");
    assert_eq!(src.config().blocks(), 262_144);
    assert!(src.heap_bytes() <= 2 << 20, "{}", src.heap_bytes());
    let mut s = src.set_state(PreCopy).unwrap().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    assert!(matches!(s.read(&mut buf).unwrap(), ReadOutcome::Data(_)));
    assert_eq!(
        s.precopy_info().unwrap().initial_bytes,
        (1 << 30) + 262_144 * 16 + 32 - (1 << 20)
    );
    assert!(src.heap_bytes() <= 2 << 20, "{}", src.heap_bytes());
    let (mut dst, _) = dev("size=1G");
    let _inp = dst.set_state(Resuming).unwrap().unwrap();
    assert!(dst.heap_bytes() <= 3 << 20, "{}", dst.heap_bytes());
}

#[test]
fn dma_logging_through_the_trait() {
    let (mut d, _) = dev("size=4K,max-ranges=2");
    let ranges = [
        DmaRange {
            iova: 0x100000,
            length: 0x10000,
        },
        DmaRange {
            iova: 0x200000,
            length: 0x2000,
        },
    ];
    let mut bm = [0u64; 1];
    assert_eq!(
        errno(&d.dma_log_report(0x100000, 0x10000, 4096, &mut bm).unwrap_err()),
        libc::EINVAL
    );
    let three = [
        ranges[0],
        ranges[1],
        DmaRange {
            iova: 0x300000,
            length: 0x1000,
        },
    ];
    assert_eq!(errno(&d.dma_log_start(&three, 4096).unwrap_err()), libc::E2BIG);
    assert_eq!(d.dma_log_start(&ranges, 512).unwrap(), 4096);
    assert_eq!(d.dma_log_page_size(), Some(4096));
    assert_eq!(errno(&d.dma_log_start(&ranges, 4096).unwrap_err()), libc::EBUSY);
    d.dma_write(0x100000 + 5 * 4096 + 17, 4096).unwrap(); // pages 5 and 6
    d.dma_write(0x201000, 1).unwrap();
    d.dma_log_report(0x100000, 0x10000, 4096, &mut bm).unwrap();
    assert_eq!(bm[0], 0b110_0000);
    let mut bm2 = [0u64; 1];
    d.dma_log_report(0x100000, 0x10000, 4096, &mut bm2).unwrap();
    assert_eq!(bm2[0], 0, "report clears");
    d.dma_log_report(0x200000, 0x2000, 4096, &mut bm2).unwrap();
    assert_eq!(bm2[0], 0b10);
    // A stopped device does no DMA.
    d.set_state(Stop).unwrap();
    assert!(d.dma_write(0x100000, 1).is_err());
    d.set_state(RunningP2p).unwrap();
    d.dma_write(0x100000, 1).unwrap();
    d.dma_log_stop().unwrap();
    assert_eq!(d.dma_log_page_size(), None);
    d.dma_write(0x100000, 1).unwrap();
    assert!(d.dma_log_report(0x100000, 0x1000, 4096, &mut bm).is_err());
    d.dma_log_stop().unwrap();
}

#[test]
fn devices_and_sessions_are_send() {
    fn is_send<T: Send>() {}
    is_send::<EmulatedDevice>();
    is_send::<EmulatedSession>();
}

/// One step of a pre-copy phase in the property test.
#[derive(Clone, Debug)]
enum Op {
    Read(usize),
    Touch(u64),
    TouchRandom(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..5000).prop_map(Op::Read),
        1 => any::<u64>().prop_map(Op::Touch),
        1 => (0u64..5).prop_map(Op::TouchRandom),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random read sizes and random dirtying during pre-copy always produce a state whose load
    /// gives an equal digest, and the accounting always matches what is read.
    #[test]
    fn precopy_with_random_reads_and_dirtying_loads_equal(
        size in 1u64..40_000,
        block in prop_oneof![Just(1u32), Just(100), Just(512), Just(4096)],
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 0..60),
        final_reads in proptest::collection::vec(1usize..3000, 1..8),
    ) {
        let spec = format!("size={size},block={block},seed={seed}");
        let (mut src, _) = dev(&spec);
        let (mut dst, _) = dev(&spec);
        let blocks = src.config().blocks();
        let mut s = src.set_state(PreCopy).unwrap().unwrap();
        let mut inp = dst.set_state(Resuming).unwrap().unwrap();
        for op in ops {
            match op {
                Op::Read(n) => {
                    let before = s.precopy_info().unwrap();
                    let mut buf = vec![0u8; n];
                    match s.read(&mut buf).unwrap() {
                        ReadOutcome::Data(k) => {
                            prop_assert!(k <= n);
                            write_all(inp.as_mut(), &buf[..k]).unwrap();
                            let after = s.precopy_info().unwrap();
                            prop_assert_eq!(after.pending() + k as u64, before.pending());
                        }
                        ReadOutcome::NothingNow => prop_assert_eq!(before.pending(), 0),
                        ReadOutcome::End => prop_assert!(false, "End in PRE_COPY"),
                    }
                }
                Op::Touch(i) => src.touch_block(i % blocks).unwrap(),
                Op::TouchRandom(n) => src.touch_blocks(n).unwrap(),
            }
        }
        let pending = s.precopy_info().unwrap().pending();
        prop_assert!(src.set_state(StopCopy).unwrap().is_none());
        let remaining = src.stop_copy_size().unwrap();
        prop_assert_eq!(remaining, pending + TRAILER_LEN);
        let mut got = 0u64;
        let mut i = 0usize;
        loop {
            let mut buf = vec![0u8; final_reads[i % final_reads.len()]];
            i += 1;
            match s.read(&mut buf).unwrap() {
                ReadOutcome::Data(k) => {
                    write_all(inp.as_mut(), &buf[..k]).unwrap();
                    got += k as u64;
                }
                ReadOutcome::End => break,
                ReadOutcome::NothingNow => prop_assert!(false, "NothingNow in STOP_COPY"),
            }
        }
        prop_assert_eq!(got, remaining);
        dst.set_state(Running).unwrap();
        prop_assert_eq!(src.digest(), dst.digest());
    }
}

#[test]
fn works_with_the_crate_save_and_load() {
    use crate::session::{LoadOptions, SaveOptions, load, save};
    let spec = "size=3M,block=64K,seed=11";
    let (mut src, _) = dev(spec);
    let (mut dst, _) = dev(spec);
    src.touch_blocks(20).unwrap();
    src.set_faults(Faults {
        short_read: Some(1000),
        nothing_now: Some(Burst { count: 3, every: 7 }),
        ..Faults::default()
    });
    let mut bytes = Vec::new();
    let report = save(&mut src, &mut bytes, SaveOptions::default()).unwrap();
    assert_eq!(report.bytes, bytes.len() as u64);
    assert_eq!(report.estimate, Some(full_len(src.config())));
    assert_eq!(src.device_state(), Running);
    load(&mut dst, &mut &bytes[..], LoadOptions::default()).unwrap();
    assert_eq!(dst.device_state(), Running);
    assert_eq!(src.digest(), dst.digest());

    // A short state is refused by the destination, which the loader resets to a usable device.
    // reset=keep: what the reset keeps is the content before the refused load.
    let (mut fresh, _) = dev(&format!("{spec},reset=keep"));
    let before = fresh.digest();
    src.set_faults(Faults {
        early_end: Some(50_000),
        ..Faults::default()
    });
    let mut short = Vec::new();
    save(&mut src, &mut short, SaveOptions::default()).unwrap();
    assert_eq!(short.len(), 50_000);
    assert!(load(&mut fresh, &mut &short[..], LoadOptions::default()).is_err());
    assert!(fresh.is_usable());
    assert_eq!(fresh.device_state(), Running);
    assert_eq!(fresh.digest(), before);
}

#[test]
fn a_reader_thread_and_device_activity_interleave_safely() {
    let spec = "size=2M,block=4K,seed=8";
    let (mut src, _) = dev(spec);
    let (mut dst, _) = dev(spec);
    let mut s = src.set_state(PreCopy).unwrap().unwrap();
    let mut inp = dst.set_state(Resuming).unwrap().unwrap();
    let stream = std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let mut all = Vec::new();
            let mut buf = vec![0u8; 3000];
            let mut idle = 0;
            while idle < 200 {
                match s.read(&mut buf).unwrap() {
                    ReadOutcome::Data(n) => {
                        all.extend_from_slice(&buf[..n]);
                        idle = 0;
                    }
                    ReadOutcome::NothingNow => {
                        idle += 1;
                        std::thread::yield_now();
                    }
                    ReadOutcome::End => panic!("End in PRE_COPY"),
                }
            }
            (s, all)
        });
        for i in 0..2000u64 {
            src.touch_block(i * 7 % 512).unwrap();
            if i % 64 == 0 {
                std::thread::yield_now();
            }
        }
        reader.join().unwrap()
    });
    let (mut s, mut bytes) = stream;
    assert!(src.set_state(StopCopy).unwrap().is_none());
    let (rest, end) = pump(s.as_mut(), None, 65536);
    assert_eq!(end, ReadOutcome::End);
    bytes.extend_from_slice(&rest);
    write_all(inp.as_mut(), &bytes).unwrap();
    dst.set_state(Running).unwrap();
    assert_eq!(src.digest(), dst.digest());
}

#[test]
fn live_migration_with_the_crate_engine_while_devices_dirty() {
    use crate::live::LocalMigration;
    use std::sync::atomic::{AtomicBool, Ordering};
    // One device dirties on the system clock, the other is dirtied by a thread through a handle.
    let a = "size=8M,block=4K,seed=1,dirty-rate=4M,name=clocked";
    let b = "size=2M,block=1K,seed=2,name=touched";
    let src_a = EmulatedDevice::from_spec(a).unwrap();
    let (src_b, _) = dev(b);
    // The dirty rate is no part of the identity: the destination does not dirty once resumed, so
    // the digests can be compared after the run.
    let a_dst = "size=8M,block=4K,seed=1,name=clocked";
    let dst_a = EmulatedDevice::from_spec(a_dst).unwrap();
    let (dst_b, _) = dev(b);
    let handles = [src_a.handle(), src_b.handle(), dst_a.handle(), dst_b.handle()];
    let done = AtomicBool::new(false);
    let touches = std::thread::scope(|scope| {
        let hb = handles[1].clone();
        let toucher = scope.spawn(|| {
            let hb = hb;
            let mut n = 0u64;
            while !done.load(Ordering::Acquire) {
                if hb.touch_block(n % 2048).is_ok() {
                    n += 1;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            n
        });
        let report = LocalMigration::default().run(
            vec![Box::new(src_a), Box::new(src_b)],
            vec![Box::new(dst_a), Box::new(dst_b)],
            &mut |_| {},
        );
        done.store(true, Ordering::Release);
        let report = report.unwrap();
        assert_eq!(report.devices, ["emulated:clocked", "emulated:touched"]);
        assert!(report.precopy_bytes.iter().all(|&b| b > 0), "{report:?}");
        toucher.join().unwrap()
    });
    assert!(touches > 0);
    let [sa, sb, da, db] = handles;
    assert!(da.is_usable() && db.is_usable());
    assert_eq!(sa.digest(), da.digest());
    assert_eq!(sb.digest(), db.digest());
    assert_ne!(da.digest(), EmulatedDevice::from_spec(a_dst).unwrap().digest());
    assert_eq!(sa.device_state(), Stop);
}

#[test]
fn a_reset_wipes_the_content_by_default_and_keeps_it_with_reset_keep() {
    for spec in ["size=64K,block=4K,seed=9", "size=64K,block=4K,seed=9,reset=wipe"] {
        let (mut d, _) = dev(spec);
        d.touch_block(3).unwrap();
        let before: Vec<Vec<u8>> = (0..16).map(|i| d.block_content(i).unwrap()).collect();
        let digest = d.digest();
        let _s = d.set_state(StopCopy).unwrap().unwrap();
        d.reset().unwrap();
        assert_eq!(d.device_state(), Running);
        assert_eq!(d.reset_generation(), 1);
        assert_ne!(d.digest(), digest, "{spec}: a wiping reset loses the state");
        for (i, old) in before.iter().enumerate() {
            assert_ne!(
                &d.block_content(i as u64).unwrap(),
                old,
                "{spec}: block {i} kept its bytes"
            );
        }
        // Every reset is a new generation: the content changes again.
        let after_first = d.digest();
        d.reset().unwrap();
        assert_eq!(d.reset_generation(), 2);
        assert_ne!(d.digest(), after_first);
        // A wiped device still saves and loads: its state is whatever it holds now.
        let (mut src2, _) = dev("size=64K,block=4K,seed=9,reset=keep");
        let mut out = d.set_state(StopCopy).unwrap().unwrap();
        let mut inp = src2.set_state(Resuming).unwrap().unwrap();
        pump(out.as_mut(), Some(inp.as_mut()), 4096);
        src2.set_state(Running).unwrap();
        assert_eq!(src2.digest(), d.digest(), "wipe and keep devices exchange states");
    }
    let (mut d, _) = dev("size=64K,block=4K,seed=9,reset=keep");
    d.touch_block(3).unwrap();
    let digest = d.digest();
    let _s = d.set_state(StopCopy).unwrap().unwrap();
    d.reset().unwrap();
    assert_eq!(d.device_state(), Running);
    assert_eq!(d.reset_generation(), 0);
    assert_eq!(d.digest(), digest, "reset=keep keeps the content, like mtty");
}

#[test]
fn a_failed_reset_changes_nothing() {
    let (mut d, _) = dev("size=16K");
    let digest = d.digest();
    d.set_faults(Faults {
        reset_fails_once: Some(libc::EIO),
        ..Faults::default()
    });
    assert!(d.reset().is_err());
    assert_eq!((d.digest(), d.reset_generation()), (digest, 0));
}

/// Finish a pre-copy migration: stop-copy the rest into `inp`, then load and compare digests.
fn finish_into(
    src: &mut EmulatedDevice,
    dst: &mut EmulatedDevice,
    s: &mut dyn TransferSession,
    inp: &mut dyn TransferSession,
) {
    src.set_state(StopCopy).unwrap();
    let (_, end) = pump(s, Some(inp), 4096);
    assert_eq!(end, ReadOutcome::End);
    dst.set_state(Stop).unwrap();
    assert_eq!(src.digest(), dst.digest());
}

#[test]
fn precopy_v2_opt_in_reports_a_reinit_once_and_initial_bytes_restart() {
    let spec = "size=64K,block=4K,flags=stop-copy+p2p+pre-copy+precopy-v2";
    let (mut src, _c) = dev(spec);
    let (mut dst, _c2) = dev(spec);
    let cfg = src.config().clone();
    assert!(!src.precopy_v2_enabled());
    assert!(src.enable_precopy_info_v2().unwrap(), "offered, so opted in");
    assert!(src.precopy_v2_enabled());
    let mut s = src.set_state(PreCopy).unwrap().unwrap();
    let mut inp = dst.set_state(Resuming).unwrap().unwrap();
    // Read the whole initial data, and make two blocks dirty.
    let (first, end) = pump(s.as_mut(), Some(inp.as_mut()), 1000);
    assert_eq!((first.len() as u64, end), (initial_len(&cfg), ReadOutcome::NothingNow));
    src.touch_block(2).unwrap();
    src.touch_block(9).unwrap();
    let info = s.precopy_info().unwrap();
    assert_eq!((info.initial_bytes, info.reinit), (0, false));
    assert_eq!(info.dirty_bytes, 2 * (RECORD_HEAD_LEN + 4096));

    src.trigger_reinit().unwrap();
    assert_eq!(src.reinits(), 1);
    let again = initial_len(&cfg) - HEADER_LEN;
    assert_eq!(
        s.precopy_info().unwrap(),
        PrecopyInfo {
            initial_bytes: again,
            dirty_bytes: 0,
            reinit: true
        },
        "initial bytes start over, dirty bytes reset"
    );
    let next = s.precopy_info().unwrap();
    assert!(!next.reinit, "REINIT is reported once");
    assert_eq!(next.initial_bytes, again);
    // The new initial data is every block again, with the current versions; the load works.
    let (second, end) = pump(s.as_mut(), Some(inp.as_mut()), 777);
    assert_eq!((second.len() as u64, end), (again, ReadOutcome::NothingNow));
    assert_eq!(s.precopy_info().unwrap().initial_bytes, 0);
    finish_into(&mut src, &mut dst, s.as_mut(), inp.as_mut());
}

#[test]
fn reinit_without_opt_in_is_unannounced_and_outside_pre_copy_refused() {
    // Offered but not opted in, and not offered at all: the new data appears, no flag.
    for spec in ["size=16K,flags=stop-copy+p2p+pre-copy+precopy-v2", "size=16K"] {
        let (mut src, _c) = dev(spec);
        let e = src.trigger_reinit().unwrap_err();
        assert_eq!(e.state, Running);
        let mut s = src.set_state(PreCopy).unwrap().unwrap();
        let (_, _) = pump(s.as_mut(), None, 4096);
        src.trigger_reinit().unwrap();
        let info = s.precopy_info().unwrap();
        assert!(!info.reinit, "{spec}");
        assert!(info.initial_bytes > 0, "{spec}");
        src.set_state(PreCopyP2p).unwrap();
        assert_eq!(src.trigger_reinit().unwrap_err().state, PreCopyP2p);
    }
    let (mut plain, _c) = dev("size=16K");
    assert!(!plain.enable_precopy_info_v2().unwrap(), "not offered");
}

#[test]
fn reinit_after_fires_once_per_session_at_the_next_pre_copy_read() {
    let spec = "size=16K,block=4K,flags=stop-copy+p2p+pre-copy+precopy-v2,reinit-after=100";
    let (mut src, _c) = dev(spec);
    let (mut dst, _c2) = dev(spec);
    let cfg = src.config().clone();
    src.enable_precopy_info_v2().unwrap();
    let mut s = src.set_state(PreCopy).unwrap().unwrap();
    let mut inp = dst.set_state(Resuming).unwrap().unwrap();
    let mut buf = [0u8; 100];
    assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::Data(100));
    write_all(inp.as_mut(), &buf).unwrap();
    assert!(!s.precopy_info().unwrap().reinit, "not before the next read");
    assert_eq!(src.reinits(), 0);
    let (rest, _) = pump(s.as_mut(), Some(inp.as_mut()), 100);
    assert_eq!(src.reinits(), 1);
    // The record of block 0 being sent finishes, then every block again.
    let block0_left = RECORD_HEAD_LEN + 4096 - (100 - HEADER_LEN);
    assert_eq!(rest.len() as u64, block0_left + initial_len(&cfg) - HEADER_LEN);
    let info = s.precopy_info().unwrap();
    assert_eq!((info.initial_bytes, info.reinit), (0, true));
    finish_into(&mut src, &mut dst, s.as_mut(), inp.as_mut());
    assert_eq!(src.reinits(), 1, "once per session");
}

#[test]
fn precopy_v2_spec_parses_and_prints_canonically() {
    let c: EmulatedConfig = "flags=pre-copy+stop-copy+Pre_Copy_V2,reinit-after=64K".parse().unwrap();
    assert!(c.precopy_v2);
    assert_eq!(c.reinit_after, Some(64 << 10));
    assert_eq!(
        c.to_string(),
        "size=64M,flags=stop-copy+pre-copy+precopy-v2,seed=1,block=4K,dirty-rate=0,max-ranges=256,reinit-after=64K"
    );
    assert_eq!(c.to_string().parse::<EmulatedConfig>().unwrap(), c);
    assert_eq!(c.identity_params(), EmulatedConfig::default().identity_params());
    let e = "flags=stop-copy+precopy-v2".parse::<EmulatedConfig>().unwrap_err();
    assert!(e.to_string().contains("precopy-v2 needs pre-copy"), "{e}");
    let e = "flags=stop-copy,reinit-after=1K".parse::<EmulatedConfig>().unwrap_err();
    assert!(e.to_string().contains("reinit-after"), "{e}");
    assert!("reinit-after=0".parse::<EmulatedConfig>().is_err());
}

#[test]
fn a_reserved_block_keeps_the_version_a_driver_set_and_migrates_it() {
    let (mut d, _clock) = dev("size=64K,block=4K,dirty-rate=64K");
    d.reserve_block(Some(0));
    assert_eq!(d.reserved_block(), Some(0));
    d.set_version(0, 0xabc).unwrap();
    d.advance(Duration::from_secs(100));
    assert_eq!(d.version(0), Some(0xabc), "the device's own activity leaves it alone");
    assert!((1..16).any(|i| d.version(i).unwrap() > 0), "and changes the others");
    assert!(d.set_version(16, 1).is_err(), "out of range");
    // In PRE_COPY a new version is sent again, and the destination gets it.
    let mut s = d.set_state(PreCopy).unwrap().unwrap();
    let (_, outcome) = pump(s.as_mut(), None, 65536);
    assert_eq!(outcome, ReadOutcome::NothingNow);
    d.set_version(0, 0xdef).unwrap();
    assert_eq!(s.precopy_info().unwrap().dirty_bytes, 16 + 4096);
    drop(s);
    d.set_state(Stop).unwrap();
    assert!(d.set_version(0, 1).is_err(), "a stopped device changes nothing");
    let (mut dst, _) = dev("size=64K,block=4K");
    migrate(&mut d, &mut dst, 4096);
    assert_eq!(dst.version(0), Some(0xdef));
    assert_eq!(dst.digest(), d.digest());
}
