//! Snapshots to disk (inline and beside the snapshot), Cloud Hypervisor's in-tree blob, and the
//! proposed iterative device-state protocol end to end over a socket.

mod fake;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use base64::Engine;
use ch_integration::encoding::{
    self, DeviceStateRecord, SentAhead, StateSource, check_stream, decode_base64, state_file_name,
};
use ch_integration::{DeviceConfig, GroupOptions, MigratableVfioDevice, PrecopyItem, VfioMigrationGroup};
use fake::{FakeDevice, Handle};
use vfio_migration::state::{DeviceState, MigrationFlags};
use vm_migration::protocol::MemoryRange;
use vm_migration::{Migratable, Pausable, Snapshot, Snapshottable, Transportable};

const ALL: MigrationFlags = MigrationFlags::from_bits(7);
const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    length: 1 << 24,
};

fn vm(n: usize, opts: GroupOptions, seed: u64, size: usize) -> (Vec<MigratableVfioDevice>, Vec<Handle>) {
    let group = VfioMigrationGroup::new(opts);
    let mut devs = Vec::new();
    let mut hs = Vec::new();
    for i in 0..n {
        let (d, h) = FakeDevice::new(&format!("f{i}"), ALL, seed + i as u64, size + 1000 * i, size / 2);
        devs.push(
            MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new(format!("_vfio{i}"), vec![RAM])).unwrap(),
        );
        hs.push(h);
    }
    (devs, hs)
}

fn leaf(s: &Snapshot) -> DeviceStateRecord {
    s.to_state().unwrap()
}

#[test]
fn snapshot_to_disk_beside_the_snapshot_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let opts = GroupOptions {
        external_state_threshold: Some(100),
        ..GroupOptions::default()
    };
    let (mut src, sh) = vm(2, opts, 1, 4000);
    // `ch-remote snapshot`: pause, snapshot, send; no migration calls.
    let mut snaps = Vec::new();
    for d in &mut src {
        d.pause().unwrap();
    }
    // The last pause stopped every device (no migration: nothing read yet).
    assert!(sh.iter().all(|h| h.state() == DeviceState::Stop));
    assert!(
        sh.iter()
            .all(|h| h.lock().transitions == [DeviceState::RunningP2p, DeviceState::Stop])
    );
    for d in &mut src {
        snaps.push(d.snapshot().unwrap());
    }
    // Read from STOP: the devices never ran again on the way.
    for h in &sh {
        assert_eq!(
            h.lock().transitions,
            [
                DeviceState::RunningP2p,
                DeviceState::Stop,
                DeviceState::StopCopy,
                DeviceState::Stop
            ]
        );
    }
    for (d, s) in src.iter().zip(&snaps) {
        let l = leaf(s);
        assert!(l.data.is_none(), "a large state is not inlined");
        assert_eq!(l.file.as_deref(), Some(state_file_name(&d.id()).as_str()));
        d.send(s, &url).unwrap();
        assert!(dir.path().join(state_file_name(&d.id())).exists());
    }
    let json = serde_json::to_string(&snaps).unwrap();
    assert!(
        json.len() < 2000,
        "the JSON holds no device bytes ({} bytes)",
        json.len()
    );
    // The snapshotted VM resumes.
    for d in &mut src {
        d.resume().unwrap();
    }
    assert!(sh.iter().all(|h| h.state() == DeviceState::Running));

    // Restore from the snapshot and the files beside it.
    let (mut dst, dh) = vm(2, GroupOptions::default(), 50, 10);
    let snaps: Vec<Snapshot> = serde_json::from_str(&json).unwrap();
    for (d, s) in dst.iter_mut().zip(&snaps) {
        assert!(d.restore(s).is_err(), "a file-backed state needs the directory");
    }
    // The failed attempts left nothing half-loaded.
    assert!(dh.iter().all(|h| h.state() == DeviceState::Running));
    for (d, s) in dst.iter_mut().zip(&snaps) {
        d.restore_from(s, Some(dir.path())).unwrap();
    }
    for d in &mut dst {
        d.resume().unwrap();
    }
    for (a, b) in sh.iter().zip(&dh) {
        assert_eq!(b.state(), DeviceState::Running);
        assert_eq!(a.content(), b.content());
    }

    // A damaged file (its end marker) is caught while it streams into the device, which is
    // then reset: it never runs on a state whose every byte was not checked.
    let f = dir.path().join(state_file_name("_vfio1"));
    let mut bytes = std::fs::read(&f).unwrap();
    let keep = bytes.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&f, &bytes).unwrap();
    let (mut dst3, dh3) = vm(2, GroupOptions::default(), 90, 10);
    let e = dst3[1].restore_from(&snaps[1], Some(dir.path())).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(msg.contains("_vfio1") && msg.contains("byte offset"), "{msg}");
    assert_eq!(dh3[1].state(), DeviceState::Running);
    assert!(dh3[1].lock().resets >= 1);
    // A truncated file is refused, with the offset where it ends, before the device is touched.
    std::fs::write(&f, &keep[..keep.len() - 100]).unwrap();
    let (mut dst4, dh4) = vm(2, GroupOptions::default(), 91, 10);
    let e = dst4[1].restore_from(&snaps[1], Some(dir.path())).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(
        msg.contains("truncated") && msg.contains(&format!("byte offset {}", keep.len() - 100)),
        "{msg}"
    );
    assert_eq!(dh4[1].state(), DeviceState::Running);
    assert!(dh4[1].lock().transitions.is_empty(), "the device was not touched");
    // recv() of a truncated file is refused too, with the offset.
    let Err(e) = dst4[1].recv(&url) else {
        panic!("a truncated file was received")
    };
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(msg.contains("truncated") && msg.contains("byte offset"), "{msg}");
    std::fs::write(&f, &keep).unwrap();

    // recv() gives an inline snapshot of the same state.
    let (mut dst2, dh2) = vm(2, GroupOptions::default(), 70, 10);
    for d in &mut dst2 {
        let s = d.recv(&url).unwrap();
        assert!(leaf(&s).data.is_some());
        d.restore(&s).unwrap();
    }
    for d in &mut dst2 {
        d.resume().unwrap();
    }
    for (a, b) in sh.iter().zip(&dh2) {
        assert_eq!(a.content(), b.content());
    }
    assert!(src[0].send(&snaps[0], "tcp:127.0.0.1:1").is_err());
}

/// The leaf `l` with the bytes of its inline stream changed by `f`.
fn damaged(l: &DeviceStateRecord, f: impl FnOnce(&mut Vec<u8>)) -> Snapshot {
    let mut bytes = decode_base64(l.data.as_ref().unwrap(), 1 << 20).unwrap();
    f(&mut bytes);
    let mut l = l.clone();
    l.data = Some(base64::engine::general_purpose::STANDARD.encode(&bytes));
    Snapshot::new_from_state(&l).unwrap()
}

#[test]
fn damaged_states_are_refused_and_the_device_is_not_left_resuming() {
    let (mut src, _) = vm(1, GroupOptions::default(), 3, 3000);
    src[0].pause().unwrap();
    let s = src[0].snapshot().unwrap();
    let l = leaf(&s);
    assert_eq!(l.format, encoding::STREAM_FORMAT);
    let (mut dst, dh) = vm(1, GroupOptions::default(), 9, 10);
    // One bit flipped in the device state, inside the base64 blob: found with its offset before
    // the device is touched.
    let bad = damaged(&l, |b| b[1000] ^= 0x08);
    let e = dst[0].restore(&bad).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(
        msg.contains("_vfio0") && msg.contains("byte offset") && msg.contains("checksum"),
        "{msg}"
    );
    assert_eq!(dh[0].state(), DeviceState::Running);
    assert!(dh[0].lock().transitions.is_empty(), "the device was not touched");
    // Truncated inline: the same.
    let bad = damaged(&l, |b| b.truncate(b.len() - 10));
    let msg = format!("{:#}", anyhow::Error::from(dst[0].restore(&bad).unwrap_err()));
    assert!(msg.contains("truncated") && msg.contains("byte offset"), "{msg}");
    assert!(dh[0].lock().transitions.is_empty());

    // A state the device itself rejects (a valid stream, invalid device data): RESUMING -> STOP
    // fails, the engine resets the device.
    let junk = b"not a device state";
    let mut copy = |w: &mut dyn Write| w.write_all(junk).map(|_| junk.len() as u64);
    let raw = encoding::write_state_stream(
        Vec::new(),
        StateSource {
            identity: vfio_migration::device::DeviceIdentity::Emulated { params: "fake".into() },
            flags: ALL,
            sent: SentAhead::default(),
            pre_copy: 0,
            chunk_size: 4096,
            copy: &mut copy,
        },
    )
    .unwrap();
    let l = encoding::inline_leaf("_vfio0", "emulated fake", &raw);
    let e = dst[0].restore(&Snapshot::new_from_state(&l).unwrap()).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(msg.contains("_vfio0") && msg.contains("restore"), "{msg}");
    assert_eq!(dh[0].state(), DeviceState::Running);
    assert!(dh[0].lock().resets >= 1);
}

#[test]
fn a_snapshot_of_another_device_type_is_refused_before_the_device_is_touched() {
    use vfio_migration::emulated::{EmulatedConfig, EmulatedDevice};
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let emu = EmulatedDevice::new(EmulatedConfig {
        size: 8 << 10,
        block_size: 4096,
        flags: ALL,
        ..EmulatedConfig::default()
    })
    .unwrap();
    let mut src = MigratableVfioDevice::new(&group, Box::new(emu), DeviceConfig::new("_vfio0", vec![RAM])).unwrap();
    src.pause().unwrap();
    let s = src.snapshot().unwrap();
    let (mut dst, dh) = vm(1, GroupOptions::default(), 9, 10);
    let msg = format!("{:#}", anyhow::Error::from(dst[0].restore(&s).unwrap_err()));
    assert!(
        msg.contains("refused") && msg.contains("not touched") && msg.contains("fake"),
        "{msg}"
    );
    assert_eq!(dh[0].state(), DeviceState::Running);
    assert!(dh[0].lock().transitions.is_empty(), "the device was not touched");
}

#[test]
fn a_damaged_state_after_pre_copy_data_resets_the_destination() {
    let opts = GroupOptions {
        chunk_size: 4096,
        ..GroupOptions::default()
    };
    let (mut src, sh) = vm(1, opts, 31, 20000);
    let (dst, dh) = vm(1, GroupOptions::default(), 32, 10);
    let dgroup = dst[0].group().clone();
    src[0].start_migration().unwrap();
    src[0].start_dirty_log().unwrap();
    src[0].dirty_log().unwrap();
    let items = src[0].group().take_precopy(1 << 20).unwrap();
    assert!(!items.is_empty());
    for item in &items {
        dgroup.load_precopy(item).unwrap();
    }
    assert_eq!(dh[0].state(), DeviceState::Resuming);
    src[0].pause().unwrap();
    let l = leaf(&src[0].snapshot().unwrap());
    let sum = check_stream(&decode_base64(l.data.as_ref().unwrap(), 1 << 20).unwrap()[..]).unwrap();
    assert!(sum.sent.chunks > 0);
    assert_eq!(sum.sent.bytes + sum.state_bytes, sh[0].content().len() as u64);
    let bad = damaged(&l, |b| {
        let n = b.len();
        b[n - 60] ^= 1
    });
    let mut dst = dst;
    let msg = format!("{:#}", anyhow::Error::from(dst[0].restore(&bad).unwrap_err()));
    assert!(msg.contains("byte offset"), "{msg}");
    assert_eq!(dh[0].state(), DeviceState::Running, "reset, not left RESUMING");
    assert!(dh[0].lock().resets >= 1);
    src[0].resume().unwrap();
    src[0].stop_dirty_log().unwrap();
    assert_eq!(sh[0].state(), DeviceState::Running);
}

/// A device whose identity is unknown (Cloud Hypervisor could not read its sysfs node), on either
/// side, proves nothing about the state: the restore is refused before the device is touched,
/// unless `GroupOptions::force_unknown_identity` is set.
#[test]
fn an_unknown_identity_is_refused_on_restore_unless_forced() {
    // The identity is read when the device joins its group.
    let vm_of = |opts: GroupOptions, size: usize, unknown: bool| {
        let group = VfioMigrationGroup::new(opts);
        let (d, h) = FakeDevice::new("f0", ALL, 4, size, size / 2);
        h.lock().unknown_identity = unknown;
        let dev = MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new("_vfio0", vec![RAM])).unwrap();
        (vec![dev], vec![h])
    };
    for (src_unknown, dst_unknown) in [(true, false), (false, true), (true, true)] {
        let label = format!("source unknown {src_unknown}, destination unknown {dst_unknown}");
        let snapshot = || {
            let (mut src, sh) = vm_of(GroupOptions::default(), 2000, src_unknown);
            src[0].pause().unwrap();
            (src[0].snapshot().unwrap(), sh)
        };
        let (s, _sh) = snapshot();
        let (mut dst, dh) = vm_of(GroupOptions::default(), 10, dst_unknown);
        let msg = format!("{:#}", anyhow::Error::from(dst[0].restore(&s).unwrap_err()));
        assert!(
            msg.contains("unknown identity") && msg.contains("force_unknown_identity") && msg.contains("not touched"),
            "{label}: {msg}"
        );
        assert_eq!(dh[0].state(), DeviceState::Running, "{label}");
        assert!(dh[0].lock().transitions.is_empty(), "{label}: the device was touched");

        let (s, sh) = snapshot();
        let forced = GroupOptions {
            force_unknown_identity: true,
            ..GroupOptions::default()
        };
        let (mut dst, dh) = vm_of(forced, 10, dst_unknown);
        dst[0].restore(&s).unwrap_or_else(|e| panic!("{label}, forced: {e}"));
        dst[0].resume().unwrap();
        assert_eq!(dh[0].content(), sh[0].content(), "{label}, forced");
    }
}

#[test]
fn cloud_hypervisors_in_tree_blob_is_restored() {
    let (_, sh) = vm(1, GroupOptions::default(), 4, 2000);
    let blob = base64::engine::general_purpose::STANDARD.encode(sh[0].content());
    let s = Snapshot::new_from_state(&serde_json::json!({ "blob": blob })).unwrap();
    let (mut dst, dh) = vm(1, GroupOptions::default(), 8, 10);
    dst[0].restore(&s).unwrap();
    assert_eq!(dh[0].state(), DeviceState::Stop);
    dst[0].resume().unwrap();
    assert_eq!(dh[0].content(), sh[0].content());
    assert_eq!(dh[0].state(), DeviceState::Running);
}

/// Frames of our own transport: tag byte, u32 length, payload.
fn send_frame(s: &mut UnixStream, tag: u8, payload: &[u8]) {
    s.write_all(&[tag]).unwrap();
    s.write_all(&(payload.len() as u32).to_le_bytes()).unwrap();
    s.write_all(payload).unwrap();
}

fn recv_frame(s: &mut UnixStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 5];
    s.read_exact(&mut h).unwrap();
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    assert!(len <= 64 << 20);
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (h[0], p)
}

const DEVICE_STATE: u8 = b'D';
const READY_QUERY: u8 = b'Q';
const READY_ANSWER: u8 = b'A';
const STATE: u8 = b'S';
const OK: u8 = b'K';

#[test]
fn iterative_device_state_end_to_end_over_a_socket() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let opts = GroupOptions {
        chunk_size: 4096,
        buffer_cap: 3000,
        ..GroupOptions::default()
    };
    let (mut src, sh) = vm(3, opts, 21, 30000);
    let initial: Vec<usize> = sh.iter().map(|h| h.lock().initial_len).collect();
    let contents: Vec<Vec<u8>> = sh.iter().map(|h| h.content()).collect();

    let dest = std::thread::spawn(move || {
        let (mut dst, dh) = vm(3, GroupOptions::default(), 77, 10);
        let group = dst[0].group().clone();
        let mut chunks = 0;
        loop {
            let (tag, p) = recv_frame(&mut b);
            match tag {
                DEVICE_STATE => {
                    let item = PrecopyItem::decode(&p).unwrap();
                    group.load_precopy(&item).unwrap();
                    chunks += 1;
                    // Loading happens while the source runs: the device is RESUMING.
                    let i: usize = item.device()["_vfio".len()..].parse().unwrap();
                    assert_eq!(dh[i].state(), DeviceState::Resuming);
                }
                READY_QUERY => send_frame(&mut b, READY_ANSWER, &[group.switchover_ready() as u8]),
                STATE => {
                    let snaps: BTreeMap<String, Snapshot> = serde_json::from_slice(&p).unwrap();
                    for d in &mut dst {
                        d.restore(&snaps[&d.id()]).unwrap();
                    }
                    for d in dst.iter_mut().rev() {
                        d.resume().unwrap();
                    }
                    send_frame(&mut b, OK, &[]);
                    return (dh.iter().map(|h| (h.state(), h.content())).collect::<Vec<_>>(), chunks);
                }
                t => panic!("unexpected frame {t}"),
            }
        }
    });

    // The source, in Cloud Hypervisor's order, with the proposed message after each memory
    // iteration.
    for d in &mut src {
        d.start_migration().unwrap();
    }
    for d in &mut src {
        d.start_dirty_log().unwrap();
    }
    let group = src[0].group().clone();
    let mut iterations = 0;
    loop {
        iterations += 1;
        for d in &mut src {
            d.dirty_log().unwrap();
        }
        // (Memory message here.) Then the device state gathered so far, a few KiB per iteration.
        for item in group.take_precopy(16 << 10).unwrap() {
            send_frame(&mut a, DEVICE_STATE, &item.encode());
        }
        send_frame(&mut a, READY_QUERY, &[]);
        let (tag, p) = recv_frame(&mut a);
        assert_eq!(tag, READY_ANSWER);
        if p == [1] {
            break;
        }
        assert!(iterations < 100, "never ready for switchover");
    }
    assert!(iterations > 1, "the initial data took several iterations");
    for d in &mut src {
        d.pause().unwrap();
    }
    for d in &mut src {
        d.dirty_log().unwrap();
    }
    let mut snaps = BTreeMap::new();
    for d in src.iter_mut().rev() {
        snaps.insert(d.id(), d.snapshot().unwrap());
    }
    // Each device's part holds only what was not sent ahead.
    for (i, d) in src.iter().enumerate() {
        let l = leaf(&snaps[&d.id()]);
        let sum = check_stream(&decode_base64(l.data.as_ref().unwrap(), 1 << 20).unwrap()[..]).unwrap();
        assert!(sum.sent.chunks > 0);
        assert!(sum.sent.bytes >= initial[i] as u64, "the initial data went ahead");
        assert_eq!(sum.sent.bytes + sum.state_bytes, contents[i].len() as u64);
    }
    send_frame(&mut a, STATE, &serde_json::to_vec(&snaps).unwrap());
    let (tag, _) = recv_frame(&mut a);
    assert_eq!(tag, OK);
    for d in &mut src {
        d.stop_dirty_log().unwrap();
    }
    for d in &mut src {
        d.complete_migration().unwrap();
    }
    let (dst, chunks) = dest.join().unwrap();
    assert!(chunks > 3);
    for (i, (state, content)) in dst.iter().enumerate() {
        assert_eq!(*state, DeviceState::Running);
        assert_eq!(content, &contents[i], "device {i}");
    }
    assert!(sh.iter().all(|h| h.state() == DeviceState::Stop));
}

#[test]
fn pre_copy_data_not_sent_ahead_goes_in_pre_copy_chunks_before_the_stop_copy_ones() {
    use vfio_migration::stream::{SectionKind, StreamReader};
    let opts = GroupOptions {
        chunk_size: 4096,
        ..GroupOptions::default()
    };
    let (mut src, sh) = vm(1, opts, 41, 20000);
    src[0].start_migration().unwrap();
    src[0].start_dirty_log().unwrap();
    src[0].dirty_log().unwrap();
    src[0].pause().unwrap();
    let l = leaf(&src[0].snapshot().unwrap());
    let bytes = decode_base64(l.data.as_ref().unwrap(), 1 << 20).unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let (mut pre, mut stop) = (0usize, 0usize);
    while let Some(c) = r.next_chunk().unwrap() {
        match c.kind {
            SectionKind::PreCopy => {
                assert_eq!(stop, 0, "pre-copy chunks come first");
                pre += c.payload.len();
            }
            SectionKind::StopCopy => stop += c.payload.len(),
            k => panic!("unexpected record {k:?}: nothing was sent ahead"),
        }
    }
    assert!(pre >= sh[0].lock().initial_len, "{pre}");
    assert!(stop > 0);
    assert_eq!(pre + stop, sh[0].content().len());
    let (mut dst, dh) = vm(1, GroupOptions::default(), 42, 10);
    dst[0].restore(&Snapshot::new_from_state(&l).unwrap()).unwrap();
    dst[0].resume().unwrap();
    assert_eq!(dh[0].content(), sh[0].content());
    src[0].stop_dirty_log().unwrap();
    src[0].complete_migration().unwrap();
}
