//! Client and server over real UNIX sockets in a temporary directory.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::codec::{self, HEADER_LEN, Header};
use super::*;
use crate::MigrationDevice;
use crate::device::{DmaRange, Operation, ReadOutcome};
use crate::emulated::{EmulatedDevice, EmulatedHandle};
use crate::live::{Convergence, LocalMigration};
use crate::session::{self, LoadOptions, SaveOptions};
use crate::state::{DeviceState, MigrationFlags};

/// Serve `emulated:{spec}` at `dir/name` in a thread (forever); returns its handle and path.
fn serve(dir: &Path, name: &str, spec: &str, max_xfer: u32) -> (EmulatedHandle, PathBuf) {
    serve_with(
        dir,
        name,
        spec,
        ServerOptions {
            max_data_xfer_size: max_xfer,
            ..Default::default()
        },
    )
}

fn serve_with(dir: &Path, name: &str, spec: &str, opts: ServerOptions) -> (EmulatedHandle, PathBuf) {
    let dev = EmulatedDevice::from_spec(spec).unwrap();
    let handle = dev.handle();
    let path = dir.join(name);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut server = Server::with_options(dev, opts);
        let _ = server.serve(&listener);
    });
    (handle, path)
}

#[test]
fn probe_reports_flags_without_p2p_and_no_size() {
    let dir = tempfile::tempdir().unwrap();
    let (handle, path) = serve(dir.path(), "a.sock", "size=256K,flags=stop-copy+p2p+pre-copy", 1 << 20);
    let dev = VfioUserDevice::connect(&path).unwrap();
    assert_eq!(dev.name(), format!("vfio-user:{}", path.display()));
    assert_eq!(dev.flags().unwrap(), MigrationFlags::from_bits(5), "P2P masked out");
    assert_eq!(dev.state().unwrap(), DeviceState::Running);
    let direct = EmulatedDevice::from_spec("size=256K,flags=stop-copy+p2p+pre-copy").unwrap();
    assert_eq!(dev.identity(), direct.identity());
    assert!(handle.digest() != 0);
    let e = dev.stop_copy_size().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
    assert!(e.to_string().contains("a.sock"), "{e}");
    assert_eq!(dev.max_data_xfer_size(), 1 << 20);
    let e = VfioUserDevice::connect(&dir.path().join("none.sock")).unwrap_err();
    assert_eq!(e.op, Operation::Open);
    assert!(e.to_string().contains("none.sock"), "{e}");
}

#[test]
fn save_from_one_served_device_loads_into_another_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (src_h, src) = serve(dir.path(), "src.sock", "size=1M,seed=7,block=4K", 64 << 10);
    let (dst_h, dst) = serve(dir.path(), "dst.sock", "size=1M,seed=7,block=4K", 64 << 10);
    src_h.touch_blocks(100).unwrap();
    assert_ne!(src_h.digest(), dst_h.digest());
    let mut a = VfioUserDevice::connect(&src).unwrap();
    let mut b = VfioUserDevice::connect(&dst).unwrap();
    let mut saved = Vec::new();
    let r = session::save(&mut a, &mut saved, SaveOptions::default()).unwrap();
    assert_eq!(r.bytes, saved.len() as u64);
    assert!(saved.len() > 1 << 20, "{}", saved.len());
    assert_eq!(r.final_state, DeviceState::Running);
    let r = session::load(&mut b, &mut &saved[..], LoadOptions::default()).unwrap();
    assert_eq!(r.bytes, saved.len() as u64);
    drop(b);
    assert_eq!(src_h.digest(), dst_h.digest(), "content differs after load");
    // The destination saves exactly what it loaded.
    let mut b2 = VfioUserDevice::connect(&dst).unwrap();
    let mut again = Vec::new();
    session::save(&mut b2, &mut again, SaveOptions::default()).unwrap();
    assert_eq!(again, saved, "the destination saves exactly what it loaded");
}

#[test]
fn precopy_iterates_until_a_short_read() {
    let dir = tempfile::tempdir().unwrap();
    let (src_h, src) = serve(dir.path(), "src.sock", "size=512K,seed=3", 16 << 10);
    let (dst_h, dst) = serve(dir.path(), "dst.sock", "size=512K,seed=3", 16 << 10);
    let mut a = VfioUserDevice::connect(&src).unwrap();
    let mut s = a.set_state(DeviceState::PreCopy).unwrap().expect("a saving session");
    assert_eq!(s.precopy_info().unwrap().initial_bytes, 1, "unknown until a short read");
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pass = |s: &mut Box<dyn crate::TransferSession>, stream: &mut Vec<u8>| {
        let mut reads = 0;
        loop {
            match s.read(&mut buf).unwrap() {
                ReadOutcome::Data(n) => {
                    assert!(n <= 16 << 10);
                    stream.extend_from_slice(&buf[..n]);
                    reads += 1;
                }
                ReadOutcome::NothingNow => return reads,
                ReadOutcome::End => panic!("end in PRE_COPY"),
            }
        }
    };
    assert!(a.stop_copy_size().is_err(), "no estimate before a complete pass");
    let first = pass(&mut s, &mut stream);
    assert_eq!(
        a.stop_copy_size().unwrap(),
        stream.len() as u64,
        "the last pass's bytes"
    );
    assert!(first >= 32, "{first} reads for 512K in 16K chunks");
    let info = s.precopy_info().unwrap();
    assert_eq!((info.initial_bytes, info.dirty_bytes), (0, 0));
    // New changes during pre-copy: another pass reads them, then stops at a short read.
    let before = stream.len();
    src_h.touch_blocks(10).unwrap();
    let second = pass(&mut s, &mut stream);
    assert!(second >= 1 && stream.len() > before, "{second}");
    assert_eq!(pass(&mut s, &mut stream), 0, "nothing new: the first read is short");
    assert_eq!(a.stop_copy_size().unwrap(), 0);
    src_h.touch_blocks(5).unwrap();
    assert!(a.set_state(DeviceState::StopCopy).unwrap().is_none());
    loop {
        match s.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => stream.extend_from_slice(&buf[..n]),
            ReadOutcome::End => break,
            ReadOutcome::NothingNow => panic!("nothing-now in STOP_COPY"),
        }
    }
    assert!(matches!(s.read(&mut buf).unwrap(), ReadOutcome::End));
    assert!(s.precopy_info().is_err(), "no pre-copy info outside PRE_COPY");
    a.set_state(DeviceState::Stop).unwrap();
    assert!(s.read(&mut buf).is_err(), "session closed");
    let mut b = VfioUserDevice::connect(&dst).unwrap();
    session::load(&mut b, &mut &stream[..], LoadOptions::default()).unwrap();
    assert_eq!(src_h.digest(), dst_h.digest());
}

#[test]
fn live_migration_between_served_devices() {
    let dir = tempfile::tempdir().unwrap();
    let (src_h, src) = serve(dir.path(), "src.sock", "size=1M,seed=9", 64 << 10);
    let (dst_h, dst) = serve(dir.path(), "dst.sock", "size=1M,seed=9", 64 << 10);
    src_h.touch_blocks(50).unwrap();
    let a = VfioUserDevice::connect(&src).unwrap();
    let b = VfioUserDevice::connect(&dst).unwrap();
    let m = LocalMigration {
        convergence: Convergence {
            max_iterations: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    let began = std::time::Instant::now();
    let report = m.run(vec![Box::new(a)], vec![Box::new(b)], &mut |_| {}).unwrap();
    assert!(began.elapsed() < Duration::from_secs(20), "{report:?}");
    assert_eq!(report.switch_reason, "converged", "{report:?}");
    assert!(report.precopy_bytes[0] > 1 << 20, "{report:?}");
    assert_eq!(report.initial_markers, vec![1]);
    assert_eq!(src_h.digest(), dst_h.digest());
    assert_eq!(dst_h.device_state(), DeviceState::Running);
}

#[test]
fn dma_logging_reports_and_clears() {
    let dir = tempfile::tempdir().unwrap();
    let (h, path) = serve(dir.path(), "a.sock", "size=64K", 1 << 20);
    let mut dev = VfioUserDevice::connect(&path).unwrap();
    let ranges = [DmaRange {
        iova: 0,
        length: 1 << 20,
    }];
    let page = dev.dma_log_start(&ranges, 4096).unwrap();
    assert_eq!(page, 4096);
    assert_eq!(h.dma_log_page_size(), Some(4096));
    h.dma_write(0x2000, 0x2000).unwrap();
    h.dma_write(0x80000, 1).unwrap();
    let mut bitmap = vec![0u64; 4];
    dev.dma_log_report(0, 1 << 20, 4096, &mut bitmap).unwrap();
    assert_eq!(bitmap[0], 0b1100);
    assert_eq!(bitmap[2], 1, "page 128 is word 2 bit 0");
    let mut again = vec![0u64; 4];
    dev.dma_log_report(0, 1 << 20, 4096, &mut again).unwrap();
    assert_eq!(again, vec![0; 4], "a report clears what it returned");
    let e = dev.dma_log_report(0, 1 << 20, 4096, &mut [0u64; 1]).unwrap_err();
    assert_eq!(e.op, Operation::DmaLogReport);
    dev.dma_log_stop().unwrap();
    assert_eq!(h.dma_log_page_size(), None);
}

fn raw_version(stream: &mut UnixStream) {
    let caps = codec::encode_version(&codec::Capabilities::default());
    let h = Header {
        msg_id: 1,
        command: codec::CMD_VERSION,
        ..Default::default()
    };
    codec::write_message(stream, h, &[&caps]).unwrap();
    let r = codec::read_header(stream).unwrap().unwrap();
    assert!(!r.is_error());
    codec::read_payload(stream, &r, 1 << 16).unwrap();
}

/// Whether the server closed `stream` (reads end) within a second.
fn closed(stream: &mut UnixStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).is_ok()
}

#[test]
fn garbage_clients_are_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, path) = serve(dir.path(), "a.sock", "size=64K", 64 << 10);

    // A header shorter than a header: dropped.
    let mut c = UnixStream::connect(&path).unwrap();
    let bad = Header {
        size: 4,
        command: codec::CMD_VERSION,
        ..Default::default()
    };
    c.write_all(&bad.to_bytes()).unwrap();
    assert!(closed(&mut c));

    // A length over the cap: an E2BIG error reply, then dropped (nothing was read or allocated).
    let mut c = UnixStream::connect(&path).unwrap();
    raw_version(&mut c);
    let huge = Header {
        msg_id: 2,
        command: codec::CMD_MIG_DATA_WRITE,
        size: u32::MAX,
        ..Default::default()
    };
    c.write_all(&huge.to_bytes()).unwrap();
    let r = codec::read_header(&mut c).unwrap().unwrap();
    assert!(r.is_error() && r.error_no == libc::E2BIG as u32 && r.msg_id == 2);
    assert!(closed(&mut c));

    // An unknown command: an ENOSYS error reply; the connection stays usable.
    let mut c = UnixStream::connect(&path).unwrap();
    raw_version(&mut c);
    let unknown = Header {
        msg_id: 3,
        command: 99,
        ..Default::default()
    };
    codec::write_message(&mut c, unknown, &[b"junk"]).unwrap();
    let r = codec::read_header(&mut c).unwrap().unwrap();
    assert!(
        r.is_error() && r.error_no == libc::ENOSYS as u32 && r.msg_id == 3,
        "{r:?}"
    );
    codec::read_payload(&mut c, &r, 1 << 16).unwrap();
    let info = Header {
        msg_id: 4,
        command: codec::CMD_DEVICE_GET_INFO,
        ..Default::default()
    };
    codec::write_message(&mut c, info, &[&[0u8; 16]]).unwrap();
    let r = codec::read_header(&mut c).unwrap().unwrap();
    assert!(!r.is_error() && r.size as usize == HEADER_LEN + 16);
    drop(c);

    // A command before the version negotiation: refused and dropped.
    let mut c = UnixStream::connect(&path).unwrap();
    codec::write_message(&mut c, info, &[&[0u8; 16]]).unwrap();
    let r = codec::read_header(&mut c).unwrap().unwrap();
    assert!(r.is_error());
    assert!(closed(&mut c));

    // A good client is served after all that.
    let dev = VfioUserDevice::connect(&path).unwrap();
    assert_eq!(dev.state().unwrap(), DeviceState::Running);
    assert!(dev.flags().unwrap().contains(MigrationFlags::STOP_COPY));
}

/// A fake server: answers the version, then every command with `answer`.
fn fake_server(path: &Path, answer: fn(&Header) -> (Header, Vec<u8>)) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        while let Ok(Some(h)) = codec::read_header(&mut s) {
            let Ok(_) = codec::read_payload(&mut s, &h, 1 << 20) else {
                return;
            };
            let (rh, body) = if h.command == codec::CMD_VERSION {
                let reply = Header {
                    flags: codec::FLAG_TYPE_REPLY,
                    ..h
                };
                (reply, codec::encode_version(&codec::Capabilities::default()))
            } else {
                answer(&h)
            };
            if codec::write_message(&mut s, rh, &[&body]).is_err() {
                return;
            }
        }
    });
}

#[test]
fn an_error_reply_names_the_device_and_the_operation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("err.sock");
    fake_server(&path, |h| {
        let reply = Header {
            flags: codec::FLAG_TYPE_REPLY | codec::FLAG_ERROR,
            error_no: libc::EBUSY as u32,
            ..*h
        };
        (reply, Vec::new())
    });
    let mut dev = VfioUserDevice::connect(&path).unwrap();
    let e = dev.flags().unwrap_err();
    assert_eq!(e.op, Operation::GetFlags);
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
    let s = e.to_string();
    assert!(
        s.starts_with(&format!("vfio-user:{}: get migration flags: ", path.display())),
        "{s}"
    );
    let e = dev.reset().unwrap_err();
    assert_eq!((e.op, e.raw_os_error()), (Operation::Reset, Some(libc::EBUSY)));
    let e = dev
        .dma_log_start(&[DmaRange { iova: 0, length: 4096 }], 4096)
        .unwrap_err();
    assert_eq!(e.op, Operation::DmaLogStart);
    assert!(e.to_string().contains("err.sock"), "{e}");
}

#[test]
fn a_reply_to_another_message_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("liar.sock");
    fake_server(&path, |h| {
        let reply = Header {
            msg_id: h.msg_id.wrapping_add(7),
            flags: codec::FLAG_TYPE_REPLY,
            ..*h
        };
        (reply, vec![0; 16])
    });
    let dev = VfioUserDevice::connect(&path).unwrap();
    let e = dev.state().unwrap_err();
    assert_eq!(e.op, Operation::GetState);
    assert!(e.to_string().contains("reply mismatch"), "{e}");
    let e = dev.state().unwrap_err();
    assert!(e.to_string().contains("unusable"), "{e}");
}

#[test]
fn padded_short_reads_and_large_writes_move_the_state() {
    let dir = tempfile::tempdir().unwrap();
    // A source that pads short read replies (as libvfio-user does), a destination that accepts
    // 1 MiB writes (the client still writes at most MAX_WRITE_CHUNK at once).
    let padded = ServerOptions {
        max_data_xfer_size: 256 << 10,
        pad_short_reads: true,
        ..Default::default()
    };
    let (src_h, src) = serve_with(dir.path(), "src.sock", "size=1M,seed=4,block=64K", padded);
    let (dst_h, dst) = serve(dir.path(), "dst.sock", "size=1M,seed=4,block=64K", 1 << 20);
    src_h.touch_blocks(3).unwrap();
    let mut a = VfioUserDevice::connect(&src).unwrap();
    let mut s = a.set_state(DeviceState::PreCopy).unwrap().unwrap();
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    while let ReadOutcome::Data(n) = s.read(&mut buf).unwrap() {
        stream.extend_from_slice(&buf[..n]);
    }
    assert!(a.set_state(DeviceState::StopCopy).unwrap().is_none());
    while let ReadOutcome::Data(n) = s.read(&mut buf).unwrap() {
        stream.extend_from_slice(&buf[..n]);
    }
    a.set_state(DeviceState::Stop).unwrap();
    let mut b = VfioUserDevice::connect(&dst).unwrap();
    b.set_state(DeviceState::Stop).unwrap();
    let mut w = b.set_state(DeviceState::Resuming).unwrap().unwrap();
    assert_eq!(w.write(&stream).unwrap(), client::MAX_WRITE_CHUNK.min(stream.len()));
    let mut done = client::MAX_WRITE_CHUNK.min(stream.len());
    while done < stream.len() {
        done += w.write(&stream[done..]).unwrap();
    }
    b.set_state(DeviceState::Running).unwrap();
    assert_eq!(src_h.digest(), dst_h.digest());
}

#[test]
fn reset_returns_the_device_to_running_and_ends_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let (h, path) = serve(dir.path(), "a.sock", "size=64K,reset=keep", 1 << 20);
    let mut dev = VfioUserDevice::connect(&path).unwrap();
    dev.set_state(DeviceState::Stop).unwrap();
    let mut w = dev.set_state(DeviceState::Resuming).unwrap().unwrap();
    w.write(&[1, 2, 3]).unwrap();
    dev.reset().unwrap();
    assert_eq!(dev.state().unwrap(), DeviceState::Running);
    assert_eq!(h.device_state(), DeviceState::Running);
    assert!(w.write(&[4]).is_err(), "the session ended with the reset");
}

/// Frame `(command, flags, payload)` triples as messages after a valid version negotiation.
fn messages(msgs: &[(u16, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let caps = codec::encode_version(&codec::Capabilities::default());
    let h = Header {
        command: codec::CMD_VERSION,
        ..Default::default()
    };
    codec::write_message(&mut out, h, &[&caps]).unwrap();
    for (i, (command, flags, payload)) in msgs.iter().enumerate() {
        let h = Header {
            msg_id: i as u16 + 1,
            command: *command,
            flags: *flags,
            ..Default::default()
        };
        codec::write_message(&mut out, h, &[payload]).unwrap();
    }
    out
}

/// Run a server connection over a socket pair fed with `input`; returns what the server sent
/// and whether it ended the connection cleanly. Panics if the server panicked.
fn feed(input: Vec<u8>) -> (Vec<u8>, bool) {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let dev = EmulatedDevice::from_spec("size=64K,block=4K").unwrap();
        let mut server = Server::with_options(
            dev,
            ServerOptions {
                max_data_xfer_size: 64 << 10,
                message_timeout: Duration::from_millis(200),
                ..Default::default()
            },
        );
        server.serve_connection(theirs).is_ok()
    });
    let mut writer = ours.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        let _ = writer.write_all(&input);
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let mut got = Vec::new();
    let _ = ours.read_to_end(&mut got);
    w.join().unwrap();
    (got, server.join().expect("the server panicked"))
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Random messages with valid headers (any command, any flags, any payload) never make the
    /// server panic.
    #[test]
    fn random_messages_never_panic_the_server(
        msgs in proptest::collection::vec(
            (0u16..24, proptest::prop_oneof![proptest::strategy::Just(0u32), 0u32..64], proptest::collection::vec(proptest::num::u8::ANY, 0..80)),
            0..12,
        )
    ) {
        let _ = feed(messages(&msgs));
    }

    /// Random bytes never make the server panic.
    #[test]
    fn random_bytes_never_panic_the_server(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let _ = feed(bytes);
    }
}

#[test]
fn feature_payloads_that_lie_get_error_replies() {
    // MIG_DEVICE_STATE SET without data, a P2P state, DMA_LOGGING_START with more ranges than
    // bytes, a REPORT asking for a bitmap over the cap: each an error reply, the connection
    // stays up (the last message, a good GET, is answered).
    let feature = |flags: u32, data: &[u8]| {
        let mut p = Vec::new();
        codec::put_u32(&mut p, 8 + data.len() as u32);
        codec::put_u32(&mut p, flags);
        p.extend_from_slice(data);
        (codec::CMD_DEVICE_FEATURE, 0, p)
    };
    let mut start = Vec::new();
    codec::put_u64(&mut start, 4096);
    codec::put_u32(&mut start, u32::MAX);
    codec::put_u32(&mut start, 0);
    let mut report = Vec::new();
    codec::put_u64(&mut report, 0);
    codec::put_u64(&mut report, u64::MAX);
    codec::put_u64(&mut report, 4096);
    let msgs = vec![
        feature(codec::FEATURE_SET | codec::FEATURE_MIG_DEVICE_STATE, &[]),
        feature(
            codec::FEATURE_SET | codec::FEATURE_MIG_DEVICE_STATE,
            &[5, 0, 0, 0, 0, 0, 0, 0],
        ),
        feature(codec::FEATURE_SET | codec::FEATURE_DMA_LOGGING_START, &start),
        feature(codec::FEATURE_GET | codec::FEATURE_DMA_LOGGING_REPORT, &report),
        feature(codec::FEATURE_GET | 12, &[]),
        feature(codec::FEATURE_GET | codec::FEATURE_MIG_DEVICE_STATE, &[0; 8]),
    ];
    let (out, clean) = feed(messages(&msgs));
    assert!(clean);
    let mut r = &out[..];
    let mut replies = Vec::new();
    while let Some(h) = codec::read_header(&mut r).unwrap() {
        let body = codec::read_payload(&mut r, &h, 1 << 20).unwrap();
        replies.push((h, body));
    }
    assert_eq!(replies.len(), 7);
    let errnos: Vec<u32> = replies[1..6].iter().map(|(h, _)| h.error_no).collect();
    let einval = libc::EINVAL as u32;
    assert_eq!(
        errnos,
        vec![einval, einval, einval, libc::E2BIG as u32, libc::ENOTTY as u32]
    );
    let (last, body) = &replies[6];
    assert!(!last.is_error() && body.len() == 16, "{last:?}");
}

#[test]
fn a_server_without_our_identity_capability_is_identified_by_its_pci_ids() {
    let dir = tempfile::tempdir().unwrap();
    let pci = dir.path().join("pci.sock");
    fake_server(&pci, |h| {
        let reply = Header {
            flags: codec::FLAG_TYPE_REPLY,
            ..*h
        };
        let mut body = Vec::new();
        codec::put_u64(&mut body, 0);
        codec::put_u32(&mut body, codec::PCI_CONFIG_REGION);
        codec::put_u32(&mut body, 0x30);
        let mut cfg = [0u8; 0x30];
        cfg[0..4].copy_from_slice(&[0x36, 0x1b, 0xff, 0x10]);
        cfg[0x2c..0x30].copy_from_slice(&[0x36, 0x1b, 0x01, 0x00]);
        body.extend_from_slice(&cfg);
        (reply, body)
    });
    let dev = VfioUserDevice::connect(&pci).unwrap();
    assert_eq!(
        dev.identity(),
        crate::device::DeviceIdentity::Pci {
            vendor: 0x1b36,
            device: 0x10ff,
            subsystem_vendor: 0x1b36,
            subsystem_device: 1,
        }
    );
    // A server that answers the config space read with an error: unknown, and still usable.
    let err = dir.path().join("err.sock");
    fake_server(&err, |h| {
        let reply = Header {
            flags: codec::FLAG_TYPE_REPLY | codec::FLAG_ERROR,
            error_no: libc::ENOSYS as u32,
            ..*h
        };
        (reply, Vec::new())
    });
    let dev = VfioUserDevice::connect(&err).unwrap();
    assert_eq!(dev.identity(), crate::device::DeviceIdentity::Unknown);
    assert_eq!(dev.flags().unwrap_err().raw_os_error(), Some(libc::ENOSYS));
}

#[test]
fn a_second_client_is_refused_as_busy_or_served_next() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, path) = serve(dir.path(), "a.sock", "size=64K", 1 << 20);
    let first = VfioUserDevice::connect(&path).unwrap();
    let began = std::time::Instant::now();
    let e = VfioUserDevice::connect(&path).unwrap_err();
    let waited = began.elapsed();
    assert!(
        waited >= server::BUSY_GRACE && waited < server::BUSY_GRACE * 4,
        "{waited:?}"
    );
    assert_eq!((e.op, e.raw_os_error()), (Operation::Open, Some(libc::EBUSY)), "{e}");
    assert!(e.to_string().contains("a.sock"), "{e}");
    assert_eq!(
        first.state().unwrap(),
        DeviceState::Running,
        "the first client is still served"
    );
    // A client that connects while the first is about to leave is served next, not refused.
    let p = path.clone();
    let second = std::thread::spawn(move || VfioUserDevice::connect(&p));
    std::thread::sleep(Duration::from_millis(200));
    drop(first);
    let second = second.join().unwrap().unwrap();
    assert_eq!(second.state().unwrap(), DeviceState::Running);
    drop(second);
    // And after it, the next one at once.
    assert_eq!(
        VfioUserDevice::connect(&path).unwrap().state().unwrap(),
        DeviceState::Running
    );
}
