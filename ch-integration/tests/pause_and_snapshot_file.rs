//! `pause` stops the whole group on the last device (plain pause: STOP; during a migration: the
//! save), `resume` brings it back in two phases, a plain snapshot goes to a file beside the
//! snapshot with `GroupOptions::snapshot_to_file`, and a restore into a device left in another
//! migration state resets it first.

mod fake;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ch_integration::encoding::{self, DeviceStateRecord, state_file_name};
use ch_integration::{DeviceConfig, GroupOptions, MigratableVfioDevice, VfioMigrationGroup};
use fake::{FakeDevice, FaultMode, Handle};
use vfio_migration::device::MigrationDevice;
use vfio_migration::emulated::{EmulatedConfig, EmulatedDevice, EmulatedHandle};
use vfio_migration::state::{DeviceState, MigrationFlags};
use vm_migration::protocol::MemoryRange;
use vm_migration::{Migratable, Pausable, Snapshot, Snapshottable, Transportable};

const ALL: MigrationFlags = MigrationFlags::from_bits(7);
const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    length: 1 << 24,
};

fn fakes(n: usize, opts: GroupOptions) -> (Vec<MigratableVfioDevice>, Vec<Handle>) {
    let group = VfioMigrationGroup::new(opts);
    let mut devs = Vec::new();
    let mut hs = Vec::new();
    for i in 0..n {
        let (d, h) = FakeDevice::new(&format!("f{i}"), ALL, 60 + i as u64, 2000 + 500 * i, 700);
        devs.push(
            MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new(format!("_vfio{i}"), vec![RAM])).unwrap(),
        );
        hs.push(h);
    }
    (devs, hs)
}

fn states(hs: &[Handle]) -> Vec<DeviceState> {
    hs.iter().map(Handle::state).collect()
}

#[test]
fn a_plain_pause_stops_every_device_on_the_last_pause_and_resume_runs_them_in_two_phases() {
    let (mut devs, hs) = fakes(3, GroupOptions::default());
    devs[2].pause().unwrap();
    devs[0].pause().unwrap();
    assert_eq!(
        states(&hs),
        [DeviceState::RunningP2p, DeviceState::Running, DeviceState::RunningP2p],
        "a non-last pause only quiesces"
    );
    devs[1].pause().unwrap();
    assert_eq!(states(&hs), [DeviceState::Stop; 3], "the last pause stops every device");
    for h in &hs {
        assert_eq!(h.lock().transitions, [DeviceState::RunningP2p, DeviceState::Stop]);
    }
    // Nothing was read: no migration, no snapshot yet.
    assert!(!devs[0].group().migration_in_progress());
    // A second pause changes nothing.
    devs[1].pause().unwrap();
    assert_eq!(states(&hs), [DeviceState::Stop; 3]);
    // The first resume: every device to RUNNING_P2P, then all to RUNNING.
    devs[1].resume().unwrap();
    assert_eq!(states(&hs), [DeviceState::Running; 3]);
    for h in &hs {
        assert_eq!(
            h.lock().transitions,
            [
                DeviceState::RunningP2p,
                DeviceState::Stop,
                DeviceState::RunningP2p,
                DeviceState::Running
            ]
        );
    }
    devs[0].resume().unwrap();
    devs[2].resume().unwrap();
    assert_eq!(states(&hs), [DeviceState::Running; 3]);
    // And again: pause/resume cycles repeat.
    for d in &mut devs {
        d.pause().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Stop; 3]);
    for d in &mut devs {
        d.resume().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Running; 3]);
}

#[test]
fn a_device_without_migration_support_is_not_counted() {
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let (a, ha) = FakeDevice::new("a", ALL, 1, 100, 10);
    let (b, hb) = FakeDevice::new("b", MigrationFlags::empty(), 2, 100, 10);
    let mut da = MigratableVfioDevice::new(&group, Box::new(a), DeviceConfig::new("_vfio0", vec![RAM])).unwrap();
    let mut db = MigratableVfioDevice::new(&group, Box::new(b), DeviceConfig::new("_vfio1", vec![RAM])).unwrap();
    da.pause().unwrap();
    assert_eq!(
        ha.state(),
        DeviceState::Stop,
        "the only device with migration support was paused"
    );
    db.pause().unwrap();
    assert!(hb.lock().transitions.is_empty());
    db.resume().unwrap();
    assert_eq!(ha.state(), DeviceState::Running);
    da.resume().unwrap();
    assert_eq!(ha.state(), DeviceState::Running);
}

#[test]
fn a_failure_while_the_last_pause_stops_the_group_returns_every_device_to_running() {
    for during_migration in [false, true] {
        let (mut devs, hs) = fakes(3, GroupOptions::default());
        if during_migration {
            for d in &mut devs {
                d.start_migration().unwrap();
                d.start_dirty_log().unwrap();
                d.dirty_log().unwrap();
            }
        }
        devs[0].pause().unwrap();
        devs[1].pause().unwrap();
        // Device 0, already quiesced, fails to stop (and falls into ERROR) when the last pause
        // stops the group.
        hs[0].arm(FaultMode::Error);
        let e = devs[2].pause().unwrap_err();
        hs[0].disarm();
        assert!(hs[0].lock().resets >= 1);
        let msg = format!("{:#}", anyhow::Error::from(e));
        assert!(msg.contains("pause"), "{msg}");
        assert_eq!(
            states(&hs),
            [DeviceState::Running; 3],
            "migration {during_migration}: {msg}"
        );
        assert!(!devs[0].group().migration_in_progress());
        // Cloud Hypervisor's failure path.
        for d in &mut devs {
            d.resume().unwrap();
        }
        for d in &mut devs {
            let _ = d.stop_dirty_log();
        }
        assert_eq!(states(&hs), [DeviceState::Running; 3]);
        // The device is usable again: a new pause cycle stops the group.
        for d in &mut devs {
            d.pause().unwrap();
        }
        assert_eq!(states(&hs), [DeviceState::Stop; 3]);
        for d in &mut devs {
            d.resume().unwrap();
        }
        assert_eq!(states(&hs), [DeviceState::Running; 3]);
    }
}

#[test]
fn during_a_migration_the_last_pause_saves_and_the_leaf_stays_inline() {
    let opts = GroupOptions {
        snapshot_to_file: true,
        ..GroupOptions::default()
    };
    let (mut devs, hs) = fakes(2, opts);
    for d in &mut devs {
        d.start_migration().unwrap();
        d.start_dirty_log().unwrap();
        d.dirty_log().unwrap();
    }
    devs[1].pause().unwrap();
    assert_eq!(hs[1].state(), DeviceState::PreCopyP2p);
    assert_eq!(hs[0].state(), DeviceState::PreCopy);
    devs[0].pause().unwrap();
    assert_eq!(states(&hs), [DeviceState::Stop; 2]);
    assert_read_out_and_stopped(&hs);
    for d in &mut devs {
        let l: DeviceStateRecord = d.snapshot().unwrap().to_state().unwrap();
        assert!(
            l.data.is_some() && l.file.is_none(),
            "a live migration's state is inline"
        );
    }
    for d in &mut devs {
        d.stop_dirty_log().unwrap();
        d.complete_migration().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Stop; 2]);
}

/// A migration that started no dirty tracking (Cloud Hypervisor's local migration): the pauses
/// before the last quiesce the devices (RUNNING_P2P), the last one saves them from there.
#[test]
fn an_untracked_migration_saves_devices_the_earlier_pauses_quiesced() {
    let (mut devs, hs) = fakes(2, GroupOptions::default());
    for d in &mut devs {
        d.start_migration().unwrap();
    }
    devs[0].pause().unwrap();
    assert_eq!(states(&hs), [DeviceState::RunningP2p, DeviceState::Running]);
    devs[1].pause().unwrap();
    assert_eq!(states(&hs), [DeviceState::Stop; 2]);
    assert_read_out_and_stopped(&hs);
    for d in &mut devs {
        let l: DeviceStateRecord = d.snapshot().unwrap().to_state().unwrap();
        assert!(l.data.is_some(), "the state is saved");
    }
    for d in &mut devs {
        d.complete_migration().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Stop; 2]);
}

/// Every device's last transitions are STOP_COPY -> STOP: its state was read out, then it stopped.
fn assert_read_out_and_stopped(hs: &[Handle]) {
    for h in hs {
        let t = h.lock().transitions.clone();
        assert!(t.ends_with(&[DeviceState::StopCopy, DeviceState::Stop]), "{t:?}");
    }
}

/// The transitions each device made since `from` of them were recorded.
fn since(hs: &[Handle], from: usize) -> Vec<Vec<DeviceState>> {
    hs.iter().map(|h| h.lock().transitions[from..].to_vec()).collect()
}

/// `n` fake devices of a VM that a plain pause stopped (every device STOP).
fn paused_vm(n: usize) -> (Vec<MigratableVfioDevice>, Vec<Handle>) {
    let (mut devs, hs) = fakes(n, GroupOptions::default());
    for d in &mut devs {
        d.pause().unwrap();
    }
    assert_eq!(states(&hs), vec![DeviceState::Stop; n]);
    (devs, hs)
}

#[test]
fn a_vm_paused_before_its_migration_migrates_and_its_devices_never_run() {
    let (mut devs, hs) = paused_vm(2);
    let before = hs[0].lock().transitions.len();
    // Cloud Hypervisor's send-migration of a paused VM: no pause (it is paused), the rest as usual.
    for d in &mut devs {
        d.start_migration().unwrap();
        d.start_dirty_log().unwrap();
        d.dirty_log().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Stop; 2], "no pre-copy from STOP");
    assert!(
        devs[0].group().initial_data_sent(),
        "no initial data to wait for: the switchover need not wait for an acknowledgement"
    );
    for d in &mut devs {
        let l: DeviceStateRecord = d.snapshot().unwrap().to_state().unwrap();
        assert!(
            l.data.as_ref().is_some_and(|b| !b.is_empty()),
            "the state is in the snapshot"
        );
    }
    for d in &mut devs {
        d.stop_dirty_log().unwrap();
        d.complete_migration().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Stop; 2]);
    assert_eq!(
        since(&hs, before),
        vec![vec![DeviceState::StopCopy, DeviceState::Stop]; 2],
        "STOP -> STOP_COPY -> STOP only: the paused VM's devices never ran"
    );
}

#[test]
fn a_paused_vms_failed_migration_leaves_its_devices_stopped_until_resume() {
    let (mut devs, hs) = paused_vm(2);
    let before = hs[0].lock().transitions.len();
    for d in &mut devs {
        d.start_migration().unwrap();
        d.start_dirty_log().unwrap();
    }
    // The migration fails before the save: Cloud Hypervisor stops the dirty log.
    for d in &mut devs {
        d.stop_dirty_log().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Stop; 2], "still paused");
    assert_eq!(since(&hs, before), vec![Vec::<DeviceState>::new(); 2], "untouched");
    // The operator resumes the VM: every device runs again, in two phases.
    for d in &mut devs {
        d.resume().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Running; 2]);
    assert_eq!(
        since(&hs, before),
        vec![vec![DeviceState::RunningP2p, DeviceState::Running]; 2]
    );
}

#[test]
fn a_paused_vm_whose_migration_failed_after_the_save_runs_its_devices_on_resume() {
    let (mut devs, hs) = paused_vm(2);
    for d in &mut devs {
        d.start_migration().unwrap();
        d.start_dirty_log().unwrap();
        d.dirty_log().unwrap();
    }
    for d in &mut devs {
        d.snapshot().unwrap();
    }
    // The state went out but the migration failed after it (the destination died): Cloud
    // Hypervisor stops the log, the VM stays paused with its devices STOP.
    for d in &mut devs {
        d.stop_dirty_log().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Stop; 2]);
    // The operator resumes the VM here: its devices run again, all of them on the first resume
    // (the device resumed first brings the whole group back, in two phases).
    devs[1].resume().unwrap();
    assert_eq!(states(&hs), [DeviceState::Running; 2]);
    devs[0].resume().unwrap();
    assert_eq!(states(&hs), [DeviceState::Running; 2]);
}

fn emulated(seed: u64) -> (EmulatedDevice, EmulatedHandle) {
    let d = EmulatedDevice::new(EmulatedConfig {
        size: 40 << 10,
        block_size: 4096,
        seed,
        flags: ALL,
        ..EmulatedConfig::default()
    })
    .unwrap();
    let h = d.handle();
    (d, h)
}

#[test]
fn a_plain_snapshot_goes_to_a_file_beside_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let group = VfioMigrationGroup::new(GroupOptions {
        snapshot_to_file: true,
        ..GroupOptions::default()
    });
    let (d, src_h) = emulated(5);
    let identity = d.identity();
    let mut src = MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new("_vfio0", vec![RAM])).unwrap();
    src_h.touch_blocks(3).unwrap();
    src.pause().unwrap();
    assert_eq!(src_h.device_state(), DeviceState::Stop);
    let snap = src.snapshot().unwrap();
    let leaf: DeviceStateRecord = snap.to_state().unwrap();
    assert!(leaf.data.is_none(), "no base64 state in the JSON");
    assert_eq!(leaf.file.as_deref(), Some(state_file_name("_vfio0").as_str()));
    assert_eq!(leaf.format, encoding::STREAM_FORMAT);
    // Cloud Hypervisor writes state.json, then the device writes its file.
    let json = serde_json::to_string(&snap).unwrap();
    src.send(&snap, &url).unwrap();
    let path = dir.path().join(state_file_name("_vfio0"));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, leaf.len);
    // The engine's stream reader accepts every record of it, up to the end marker.
    let mut r = vfio_migration::stream::StreamReader::new(&bytes[..]).unwrap();
    let mut state_bytes = 0u64;
    while let Some(c) = r.next_chunk().unwrap() {
        state_bytes += c.payload.len() as u64;
    }
    assert!(state_bytes >= 40 << 10);
    let sum = encoding::check_stream(&bytes[..]).unwrap();
    assert_eq!(sum.identity, identity);
    // The VM resumes; the stream stays with the group until the next pause.
    src.resume().unwrap();
    assert_eq!(src_h.device_state(), DeviceState::Running);
    src.send(&snap, &url).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // Restore on a fresh emulated device from the snapshot and its directory.
    let dgroup = VfioMigrationGroup::new(GroupOptions::default());
    // The same device model; its content differs (the source's guest touched blocks).
    let (d, dst_h) = emulated(5);
    assert_ne!(dst_h.digest(), src_h.digest());
    let mut dst = MigratableVfioDevice::new(&dgroup, Box::new(d), DeviceConfig::new("_vfio0", vec![RAM])).unwrap();
    let snap: Snapshot = serde_json::from_str(&json).unwrap();
    dst.restore_from(&snap, Some(dir.path())).unwrap();
    dst.resume().unwrap();
    assert_eq!(dst_h.device_state(), DeviceState::Running);
    assert_eq!(dst_h.digest(), src_h.digest());

    // The next pause drops the kept stream: a send now has nothing to write.
    src.pause().unwrap();
    let e = src.send(&snap, &url).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(msg.contains("state is gone"), "{msg}");
    src.resume().unwrap();
}

/// A snapshot of a paused VM whose save fails (one device refuses STOP -> STOP_COPY) leaves every
/// device STOP while the VM stays paused (none runs, none is reset), and the VM's resume then
/// runs them all; the next pause and snapshot succeed.
#[test]
fn a_paused_vms_failed_snapshot_leaves_its_devices_stopped_until_resume() {
    let (mut devs, hs) = paused_vm(2);
    let before = hs[0].lock().transitions.len();
    hs[1].arm(FaultMode::Stay);
    let Err(e) = devs[0].snapshot() else {
        panic!("the snapshot succeeded with f1 failing")
    };
    hs[1].disarm();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(msg.contains("f1") && msg.contains("snapshot"), "{msg}");
    assert_eq!(states(&hs), [DeviceState::Stop; 2], "{msg}");
    assert_eq!(
        since(&hs, before),
        [vec![DeviceState::StopCopy, DeviceState::Stop], vec![]],
        "f0 read and back to STOP, f1 untouched: no device ran"
    );
    assert!(hs.iter().all(|h| h.lock().resets == 0), "no device was reset");
    for d in &mut devs {
        d.resume().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Running; 2]);
    for d in &mut devs {
        d.pause().unwrap();
    }
    devs[0].snapshot().unwrap();
    devs[1].snapshot().unwrap();
    for d in &mut devs {
        d.resume().unwrap();
    }
    assert_eq!(states(&hs), [DeviceState::Running; 2]);
}

#[test]
fn a_restore_into_a_device_left_in_another_state_resets_it_first() {
    let (mut src, sh) = fakes(1, GroupOptions::default());
    src[0].pause().unwrap();
    let snap = src[0].snapshot().unwrap();
    for left in [DeviceState::PreCopy, DeviceState::RunningP2p, DeviceState::Resuming] {
        let (mut d, h) = FakeDevice::new("dst", ALL, 77, 10, 0);
        // What a previous user left (mtty keeps its migration state across close).
        drop(d.set_state(left).unwrap());
        h.lock().transitions.clear();
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let group = VfioMigrationGroup::new(GroupOptions::default());
        let mut cfg = DeviceConfig::new("_vfio0", vec![RAM]);
        cfg.on_reset = Some(Arc::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        }));
        let mut dst = MigratableVfioDevice::new(&group, Box::new(d), cfg).unwrap();
        dst.restore(&snap).unwrap();
        assert_eq!(h.lock().resets, 1, "{left}: reset once before the load");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{left}: the reset hook ran");
        assert_eq!(h.state(), DeviceState::Stop);
        dst.resume().unwrap();
        assert_eq!(h.state(), DeviceState::Running);
        assert_eq!(h.content(), sh[0].content());
    }
    // A state of another device is refused before the device is touched, reset or not.
    let (emu, _) = emulated(3);
    let eg = VfioMigrationGroup::new(GroupOptions::default());
    let mut e = MigratableVfioDevice::new(&eg, Box::new(emu), DeviceConfig::new("_vfio0", vec![RAM])).unwrap();
    e.pause().unwrap();
    let foreign = e.snapshot().unwrap();
    let (mut d, h) = FakeDevice::new("dst", ALL, 78, 10, 0);
    drop(d.set_state(DeviceState::PreCopy).unwrap());
    h.lock().transitions.clear();
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let mut dst = MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new("_vfio0", vec![RAM])).unwrap();
    let msg = format!("{:#}", anyhow::Error::from(dst.restore(&foreign).unwrap_err()));
    assert!(msg.contains("not touched"), "{msg}");
    assert_eq!(h.state(), DeviceState::PreCopy);
    assert_eq!(h.lock().resets, 0);
    assert!(h.lock().transitions.is_empty());
}
