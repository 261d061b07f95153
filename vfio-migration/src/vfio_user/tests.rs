//! Client and server over real UNIX sockets in a temporary directory.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::codec::{self, HEADER_LEN, Header};
use super::*;
use super::{dma, pci, regs};
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
    let model = EmulatedModel::new(handle.clone());
    std::thread::spawn(move || {
        let mut server = Server::with_options(dev, opts).with_model(model);
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
fn a_server_without_migration_refuses_every_migration_message() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ServerOptions {
        no_migration: true,
        ..Default::default()
    };
    let (handle, path) = serve_with(dir.path(), "a.sock", "size=256K,flags=stop-copy+pre-copy", opts);
    let mut dev = VfioUserDevice::connect(&path).unwrap();
    let e = dev.flags().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
    let e = dev.set_state(DeviceState::Stop).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
    drop(dev); // one client at a time
    let mut raw = Raw::connect(&path);
    assert_eq!(raw.errno(codec::CMD_MIG_DATA_READ, &[0u8; 8]), libc::ENOTTY);
    assert_eq!(raw.errno(codec::CMD_MIG_DATA_WRITE, &[0u8; 8]), libc::ENOTTY);
    drop(raw);
    // The device itself was never touched: its content is the seed's.
    let fresh = EmulatedDevice::from_spec("size=256K,flags=stop-copy+pre-copy").unwrap();
    assert_eq!(handle.digest(), fresh.handle().digest());
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

/// A raw client on one connection (version negotiated) that sends commands with file
/// descriptors and returns the replies, error replies included.
struct Raw {
    s: UnixStream,
    id: u16,
}

impl Raw {
    fn connect(path: &Path) -> Self {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        raw_version(&mut s);
        Self { s, id: 1 }
    }

    fn call(&mut self, command: u16, payload: &[u8], fds: &[std::os::fd::RawFd]) -> (Header, Vec<u8>) {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        self.id += 1;
        let h = Header {
            msg_id: self.id,
            command,
            size: (HEADER_LEN + payload.len()) as u32,
            ..Default::default()
        };
        let mut msg = h.to_bytes().to_vec();
        msg.extend_from_slice(payload);
        if fds.is_empty() {
            self.s.write_all(&msg).unwrap();
        } else {
            assert_eq!(self.s.send_with_fds(&[&msg[..]], fds).unwrap(), msg.len());
        }
        let r = codec::read_header(&mut self.s).unwrap().unwrap();
        assert_eq!((r.msg_id, r.command), (self.id, command));
        let body = codec::read_payload(&mut self.s, &r, 1 << 20).unwrap();
        (r, body)
    }

    /// A call that must succeed; returns the reply body.
    fn ok(&mut self, command: u16, payload: &[u8], fds: &[std::os::fd::RawFd]) -> Vec<u8> {
        let (h, body) = self.call(command, payload, fds);
        assert!(!h.is_error(), "command {command}: errno {}", h.error_no);
        body
    }

    /// A call that must fail; returns the errno.
    fn errno(&mut self, command: u16, payload: &[u8]) -> i32 {
        let (h, _) = self.call(command, payload, &[]);
        assert!(h.is_error(), "command {command} succeeded");
        h.error_no as i32
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) {
        self.ok(
            codec::CMD_REGION_WRITE,
            &region_access(offset, region, data.len() as u32, data),
            &[],
        );
    }

    fn region_read(&mut self, region: u32, offset: u64, count: u32) -> Vec<u8> {
        let body = self.ok(codec::CMD_REGION_READ, &region_access(offset, region, count, &[]), &[]);
        assert_eq!(
            body[..16],
            region_access(offset, region, count, &[])[..],
            "the access is echoed"
        );
        body[16..].to_vec()
    }

    fn feature(&mut self, flags: u32, data: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        codec::put_u32(&mut p, 8 + data.len() as u32);
        codec::put_u32(&mut p, flags);
        p.extend_from_slice(data);
        self.ok(codec::CMD_DEVICE_FEATURE, &p, &[])[8..].to_vec()
    }
}

fn region_access(offset: u64, region: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    codec::put_u64(&mut p, offset);
    codec::put_u32(&mut p, region);
    codec::put_u32(&mut p, count);
    p.extend_from_slice(data);
    p
}

fn dma_map_payload(flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
    let mut p = Vec::new();
    codec::put_u32(&mut p, 32);
    codec::put_u32(&mut p, flags);
    codec::put_u64(&mut p, offset);
    codec::put_u64(&mut p, iova);
    codec::put_u64(&mut p, size);
    p
}

fn dma_unmap_payload(flags: u32, iova: u64, size: u64) -> Vec<u8> {
    let mut p = Vec::new();
    codec::put_u32(&mut p, 24);
    codec::put_u32(&mut p, flags);
    codec::put_u64(&mut p, iova);
    codec::put_u64(&mut p, size);
    p
}

/// A pipe: (read end, write end).
fn pipe() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded: both descriptors are new and owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// Whether every write end of the pipe whose read end is `r` is closed (a read sees EOF).
fn write_ends_closed(r: &mut std::fs::File) -> bool {
    let mut b = [0u8; 1];
    matches!(r.read(&mut b), Ok(0))
}

#[test]
fn device_dma_writes_are_exactly_the_logged_pages() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    const IOVA: u64 = 0x4000_0000;
    let dir = tempfile::tempdir().unwrap();
    // 4 MiB/s of DMA: about a thousand page writes a second.
    let (h, path) = serve(dir.path(), "a.sock", "size=256K,dirty-rate=4M", 1 << 20);
    let mem = tempfile::tempfile().unwrap();
    mem.set_len(64 * PAGE).unwrap();
    let mut c = Raw::connect(&path);
    // Map 64 pages; the device writes in pages 8..40 (its window) once bus mastering is on; the
    // log covers pages 0..48.
    c.ok(
        codec::CMD_DMA_MAP,
        &dma_map_payload(3, 0, IOVA, 64 * PAGE),
        &[mem.as_raw_fd()],
    );
    c.region_write(7, 4, &pci::COMMAND_BUS_MASTER.to_le_bytes());
    c.region_write(0, regs::REG_DMA_ADDR, &(IOVA + 8 * PAGE).to_le_bytes());
    c.region_write(0, regs::REG_DMA_LEN, &(32 * PAGE).to_le_bytes());
    let mut start = Vec::new();
    codec::put_u64(&mut start, PAGE);
    codec::put_u32(&mut start, 1);
    codec::put_u32(&mut start, 0);
    codec::put_u64(&mut start, IOVA);
    codec::put_u64(&mut start, 48 * PAGE);
    c.feature(codec::FEATURE_SET | codec::FEATURE_DMA_LOGGING_START, &start);
    assert_eq!(h.dma_log_page_size(), Some(PAGE));
    let snapshot = |m: &std::fs::File| {
        let mut b = vec![0u8; 64 * PAGE as usize];
        m.read_exact_at(&mut b, 0).unwrap();
        b
    };
    let mut total = 0;
    for round in 0..3 {
        let before = snapshot(&mem);
        std::thread::sleep(Duration::from_millis(30));
        let mut report = Vec::new();
        codec::put_u64(&mut report, IOVA);
        codec::put_u64(&mut report, 48 * PAGE);
        codec::put_u64(&mut report, PAGE);
        let bitmap = c.feature(codec::FEATURE_GET | codec::FEATURE_DMA_LOGGING_REPORT, &report);
        let after = snapshot(&mem);
        let reported: Vec<u64> = (0..48u64)
            .filter(|&p| bitmap[24 + (p / 8) as usize] >> (p % 8) & 1 == 1)
            .collect();
        let changed: Vec<u64> = (0..64)
            .filter(|&p| {
                let r = (p * PAGE) as usize..((p + 1) * PAGE) as usize;
                before[r.clone()] != after[r]
            })
            .collect();
        assert_eq!(
            reported, changed,
            "round {round}: the pages reported are the pages written"
        );
        assert!(changed.iter().all(|p| (8..40).contains(p)), "{changed:?}");
        for &p in &changed {
            let at = p * PAGE;
            let seq = u64::from_le_bytes(after[at as usize..at as usize + 8].try_into().unwrap());
            let iova = u64::from_le_bytes(after[at as usize + 8..at as usize + 16].try_into().unwrap());
            assert!(seq > 0 && iova == IOVA + at, "page {p}: {seq} {iova:#x}");
        }
        total += changed.len();
    }
    assert!(total > 10, "{total} pages written in 90 ms at 1000 pages/s");
    let writes = u64::from_le_bytes(c.region_read(0, regs::REG_DMA_WRITES, 8).try_into().unwrap());
    assert!(writes >= total as u64);
    // Unmapped: the device writes nothing more, and the memory stays as it is.
    c.ok(codec::CMD_DMA_UNMAP, &dma_unmap_payload(0, IOVA, 64 * PAGE), &[]);
    let before = snapshot(&mem);
    std::thread::sleep(Duration::from_millis(30));
    let again = u64::from_le_bytes(c.region_read(0, regs::REG_DMA_WRITES, 8).try_into().unwrap());
    assert!(
        again <= writes + dma::MAX_WRITES_PER_TICK,
        "{again} {writes}: one message between"
    );
    std::thread::sleep(Duration::from_millis(30));
    let last = u64::from_le_bytes(c.region_read(0, regs::REG_DMA_WRITES, 8).try_into().unwrap());
    assert_eq!(last, again, "no DMA after the unmap");
    assert!(snapshot(&mem) == before, "no DMA after the unmap");
}

#[test]
fn without_bus_mastering_or_a_window_the_device_does_no_dma() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let (_h, path) = serve(dir.path(), "a.sock", "size=256K,dirty-rate=16M", 1 << 20);
    let mem = tempfile::tempfile().unwrap();
    mem.set_len(1 << 20).unwrap();
    let mut c = Raw::connect(&path);
    c.ok(
        codec::CMD_DMA_MAP,
        &dma_map_payload(3, 0, 0, 1 << 20),
        &[mem.as_raw_fd()],
    );
    c.region_write(0, regs::REG_DMA_LEN, &(1u64 << 20).to_le_bytes());
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        c.region_read(0, regs::REG_DMA_WRITES, 8),
        [0; 8],
        "bus mastering is off"
    );
    c.region_write(7, 4, &pci::COMMAND_BUS_MASTER.to_le_bytes());
    c.region_write(0, regs::REG_DMA_LEN, &0u64.to_le_bytes());
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(c.region_read(0, regs::REG_DMA_WRITES, 8), [0; 8], "no window");
    let mut b = vec![0u8; 1 << 20];
    mem.read_exact_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn descriptors_sent_to_the_server_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, path) = serve(dir.path(), "a.sock", "size=64K", 1 << 20);
    let mut c = Raw::connect(&path);
    // SET_IRQS with two "eventfds": accepted, both closed.
    let (mut r1, w1) = pipe();
    let (mut r2, w2) = pipe();
    let mut set = Vec::new();
    for v in [20, 4 | 32, 2, 0, 2] {
        codec::put_u32(&mut set, v);
    }
    use std::os::fd::AsRawFd;
    c.ok(codec::CMD_DEVICE_SET_IRQS, &set, &[w1.as_raw_fd(), w2.as_raw_fd()]);
    drop((w1, w2));
    assert!(write_ends_closed(&mut r1) && write_ends_closed(&mut r2));
    // DMA_MAP with a descriptor that is not a regular file: recorded as unmapped, closed.
    let (mut r, w) = pipe();
    c.ok(codec::CMD_DMA_MAP, &dma_map_payload(3, 0, 0, 1 << 16), &[w.as_raw_fd()]);
    drop(w);
    assert!(write_ends_closed(&mut r));
    // A descriptor with a command that takes none, and with a failing DMA_MAP: closed.
    let (mut r, w) = pipe();
    let mut info = Vec::new();
    codec::put_u32(&mut info, 16);
    codec::put_u32(&mut info, 0);
    codec::put_u32(&mut info, 0);
    codec::put_u32(&mut info, 0);
    c.ok(codec::CMD_DEVICE_GET_INFO, &info, &[w.as_raw_fd()]);
    let (h, _) = c.call(codec::CMD_DMA_MAP, &dma_map_payload(3, 0, 1, 4096), &[w.as_raw_fd()]);
    assert!(h.is_error());
    drop(w);
    assert!(write_ends_closed(&mut r));
    // A DMA_MAP without a descriptor is accepted (unmapped memory); UNMAP_ALL removes all.
    c.ok(codec::CMD_DMA_MAP, &dma_map_payload(3, 0, 1 << 20, 1 << 16), &[]);
    let echo = c.ok(codec::CMD_DMA_UNMAP, &dma_unmap_payload(1 << 2, 0, 0), &[]);
    assert_eq!(echo, dma_unmap_payload(1 << 2, 0, 0));
    c.ok(codec::CMD_DMA_MAP, &dma_map_payload(3, 0, 1 << 20, 1 << 16), &[]);
}

#[test]
fn bad_region_and_dma_requests_get_error_replies_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (h, path) = serve(dir.path(), "a.sock", "size=64K", 1 << 20);
    let mut c = Raw::connect(&path);
    let read = |offset, region, count| region_access(offset, region, count, &[]);
    let einval = libc::EINVAL;
    // Region accesses out of bounds, of empty regions, with a huge count or lying counts.
    for p in [
        read(4090, 0, 8),
        read(0, 0, 4097),
        read(0, 0, u32::MAX),
        read(u64::MAX, 0, 2),
        read(255, 7, 2),
        read(257, 7, 0),
        read(0, 1, 4),
        read(60, 2, 8),
        read(64, 2, 1),
        read(0, 8, 4),
        read(0, u32::MAX, 4),
        vec![1, 2, 3],
    ] {
        assert_eq!(c.errno(codec::CMD_REGION_READ, &p), einval, "{p:?}");
    }
    for p in [
        region_access(0x18, 0, 4, &[1, 2]),
        region_access(0x18, 0, 2, &[1, 2, 3, 4]),
        region_access(4094, 0, 4, &[1, 2, 3, 4]),
        region_access(254, 7, 4, &[1, 2, 3, 4]),
        region_access(0, 3, 1, &[1]),
        region_access(62, 2, 4, &[1, 2, 3, 4]),
    ] {
        assert_eq!(c.errno(codec::CMD_REGION_WRITE, &p), einval, "{p:?}");
    }
    assert_eq!(h.version(0), Some(0), "no bad write reached SCRATCH");
    // DMA_MAP with bogus ranges and flags.
    for (flags, iova, size) in [
        (3, 0, 0),
        (3, 1, 4096),
        (3, 0, 100),
        (3, u64::MAX - 4095, 8192),
        (3, 0, !4095),
        (3, 0, 2 << 40),
        (8, 0, 4096),
    ] {
        let p = dma_map_payload(flags, 0, iova, size);
        assert_eq!(c.errno(codec::CMD_DMA_MAP, &p), einval, "{flags} {iova:#x} {size:#x}");
    }
    assert_eq!(c.errno(codec::CMD_DMA_MAP, &[0; 20]), einval, "short");
    // Too many mappings; an overlapping one; unmaps that split or ask for dirty pages.
    for i in 0..dma::MAX_MAPPINGS as u64 {
        c.ok(codec::CMD_DMA_MAP, &dma_map_payload(3, 0, i << 20, 8192), &[]);
    }
    let p = dma_map_payload(3, 0, 1 << 40, 4096);
    assert_eq!(c.errno(codec::CMD_DMA_MAP, &p), libc::ENOSPC);
    c.ok(codec::CMD_DMA_UNMAP, &dma_unmap_payload(0, 5 << 20, 8192), &[]);
    let p = dma_map_payload(3, 0, (4 << 20) + 4096, 4096);
    assert_eq!(c.errno(codec::CMD_DMA_MAP, &p), libc::EEXIST);
    assert_eq!(
        c.errno(codec::CMD_DMA_UNMAP, &dma_unmap_payload(0, 4 << 20, 4096)),
        einval
    );
    assert_eq!(
        c.errno(codec::CMD_DMA_UNMAP, &dma_unmap_payload(2, 4 << 20, 8192)),
        einval
    );
    assert_eq!(c.errno(codec::CMD_DMA_UNMAP, &dma_unmap_payload(4, 1, 0)), einval);
    c.ok(codec::CMD_DMA_MAP, &dma_map_payload(3, 0, 5 << 20, 8192), &[]);
    // Still serving: a register read works.
    assert_eq!(c.region_read(0, 0, 4), b"VMIG");
    drop(c);
    // And the next connection starts without mappings.
    let mut c = Raw::connect(&path);
    c.ok(codec::CMD_DMA_MAP, &dma_map_payload(3, 0, 0, 8192), &[]);
}

#[test]
fn config_space_tells_the_identity_the_capability_tells() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, path) = serve(dir.path(), "a.sock", "size=64K,seed=5", 1 << 20);
    let dev = VfioUserDevice::connect(&path).unwrap();
    let id = dev.identity();
    drop(dev);
    let mut c = Raw::connect(&path);
    let cfg = c.region_read(7, 0, 0x40);
    let w = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    assert_eq!((w(0), w(2), w(0x2c), w(0x2e)), pci::pci_ids(&id));
    assert_eq!((cfg[0x0b], cfg[0x0e], w(6) & 0x10, cfg[0x3d]), (0xff, 0, 0, 0));
    // The same device served elsewhere shows the same IDs; another device other ones.
    let (_h2, other) = serve(dir.path(), "b.sock", "size=64K,seed=5", 1 << 20);
    let (_h3, third) = serve(dir.path(), "c.sock", "size=128K,seed=5", 1 << 20);
    assert_eq!(Raw::connect(&other).region_read(7, 0, 0x30), cfg[..0x30]);
    assert_ne!(Raw::connect(&third).region_read(7, 0, 0x30), cfg[..0x30]);
}
