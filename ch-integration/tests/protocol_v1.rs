//! What Cloud Hypervisor's migration protocol version 1 needs from the group: devices prepared at
//! `Config` and adopted at `State`, the switchover acknowledgement, the byte counts, and the
//! in-tree format for an unpatched destination.

mod fake;

use std::collections::BTreeMap;

use ch_integration::encoding::{AnyDeviceState, decode_base64};
use ch_integration::protocol::{self, Peer};
use ch_integration::{DeviceConfig, GroupOptions, MigratableVfioDevice, Transferred, VfioMigrationGroup};
use fake::{FakeDevice, Handle};
use vfio_migration::state::{DeviceState, MigrationFlags};
use vm_migration::protocol::MemoryRange;
use vm_migration::{Migratable, Pausable, Snapshot, Snapshottable};

const ALL: MigrationFlags = MigrationFlags::from_bits(7);
const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    length: 1 << 24,
};

fn source(n: usize, seed: u64, size: usize) -> (Vec<MigratableVfioDevice>, Vec<Handle>) {
    let group = VfioMigrationGroup::new(GroupOptions {
        chunk_size: 4096,
        ..GroupOptions::default()
    });
    let mut devs = Vec::new();
    let mut hs = Vec::new();
    for i in 0..n {
        let (d, h) = FakeDevice::new(&format!("s{i}"), ALL, seed + i as u64, size + 1000 * i, size / 2);
        devs.push(
            MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new(format!("_vfio{i}"), vec![RAM])).unwrap(),
        );
        hs.push(h);
    }
    (devs, hs)
}

/// Cloud Hypervisor's source order up to the pause, sending the device state ahead.
fn precopy_until_acknowledged(src: &mut [MigratableVfioDevice], dst: &VfioMigrationGroup) -> usize {
    for d in src.iter_mut() {
        d.start_migration().unwrap();
    }
    for d in src.iter_mut() {
        d.start_dirty_log().unwrap();
    }
    let group = src[0].group().clone();
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 100, "never acknowledged");
        for d in src.iter_mut() {
            d.dirty_log().unwrap();
        }
        let mut ack = false;
        for item in group.take_precopy(8 << 10).unwrap() {
            let item = ch_integration::PrecopyItem::decode(&item.encode()).unwrap();
            dst.load_precopy(&item).unwrap();
            ack = protocol::switchover_acknowledged(&protocol::device_state_response_padding(dst.switchover_ready()));
        }
        if group.initial_data_sent() && ack {
            return rounds;
        }
    }
}

fn snapshot_all(src: &mut [MigratableVfioDevice]) -> BTreeMap<String, Snapshot> {
    for d in src.iter_mut() {
        d.pause().unwrap();
    }
    let mut snaps = BTreeMap::new();
    for d in src.iter_mut().rev() {
        snaps.insert(d.id(), d.snapshot().unwrap());
    }
    snaps
}

#[test]
fn devices_prepared_at_config_load_ahead_and_are_adopted_at_state() {
    let (mut src, sh) = source(2, 3, 20000);
    let contents: Vec<Vec<u8>> = sh.iter().map(|h| h.content()).collect();

    // Destination at `Config`: the group exists before the device model; devices are prepared.
    let dst = VfioMigrationGroup::new(GroupOptions::default());
    let mut dh = Vec::new();
    for i in 0..2 {
        let (d, h) = FakeDevice::new(&format!("d{i}"), ALL, 90 + i, 10, 0);
        dst.prepare(Box::new(d), DeviceConfig::new(format!("_vfio{i}"), Vec::new()))
            .unwrap();
        assert!(dst.is_prepared(&format!("_vfio{i}")));
        dh.push(h);
    }
    // Preparing touches no device.
    assert!(dh.iter().all(|h| h.lock().transitions.is_empty()));
    assert!(
        !src[0].group().initial_data_sent(),
        "nothing sent before the migration starts"
    );

    let rounds = precopy_until_acknowledged(&mut src, &dst);
    assert!(rounds > 1, "the initial data took several rounds");
    assert!(src[0].group().initial_data_sent());
    assert!(dh.iter().all(|h| h.state() == DeviceState::Resuming));
    let sent = src[0].group().transferred();
    assert!(sent.precopy_bytes > 0);
    assert_eq!(sent.stop_copy_bytes, 0);

    let snaps = snapshot_all(&mut src);
    let t = src[0].group().transferred();
    assert!(t.stop_copy_bytes > 0);
    let total: u64 = contents.iter().map(|c| c.len() as u64).sum();
    assert_eq!(
        t.precopy_bytes + t.stop_copy_bytes,
        total,
        "device data, without stream headers"
    );

    // At `State`, Cloud Hypervisor's device model registers the same ids: each adopts its
    // prepared member (the second handle it brings is never used).
    let mut adopted = Vec::new();
    let mut unused = Vec::new();
    for i in 0..2 {
        let (d, h) = FakeDevice::new(&format!("model{i}"), ALL, 200 + i, 10, 0);
        let m =
            MigratableVfioDevice::new(&dst, Box::new(d), DeviceConfig::new(format!("_vfio{i}"), vec![RAM])).unwrap();
        assert!(!dst.is_prepared(&format!("_vfio{i}")));
        adopted.push(m);
        unused.push(h);
    }
    assert_eq!(dst.len(), 2, "adoption adds no member");
    for d in &mut adopted {
        d.restore(&snaps[&d.id()]).unwrap();
    }
    for d in adopted.iter_mut().rev() {
        d.resume().unwrap();
    }
    for (i, h) in dh.iter().enumerate() {
        assert_eq!(h.state(), DeviceState::Running);
        assert_eq!(h.content(), contents[i], "device {i}");
    }
    assert!(unused.iter().all(|h| h.lock().transitions.is_empty()));
    // A second registration of an adopted id is refused as before.
    let (d, _) = FakeDevice::new("again", ALL, 1, 10, 0);
    assert!(MigratableVfioDevice::new(&dst, Box::new(d), DeviceConfig::new("_vfio0", vec![RAM])).is_err());
}

#[test]
fn prepared_devices_of_a_failed_migration_leave_and_a_loading_one_is_reset() {
    let (mut src, _sh) = source(1, 5, 20000);
    let dst = VfioMigrationGroup::new(GroupOptions::default());
    let (d, h) = FakeDevice::new("d0", ALL, 1, 10, 0);
    dst.prepare(Box::new(d), DeviceConfig::new("_vfio0", Vec::new()))
        .unwrap();
    precopy_until_acknowledged(&mut src, &dst);
    assert_eq!(h.state(), DeviceState::Resuming);
    // The source went away: the destination drops what it prepared.
    dst.drop_prepared();
    assert!(dst.is_empty());
    assert_eq!(h.lock().resets, 1);
    assert_eq!(h.state(), DeviceState::Running);
}

#[test]
fn a_handle_kept_with_a_prepared_device_is_taken_once_or_dropped_after_the_device() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Records, when dropped, whether the device it came with had left its group by then.
    struct Conn {
        group: VfioMigrationGroup,
        dropped_after_leaving: Arc<AtomicBool>,
    }
    impl Drop for Conn {
        fn drop(&mut self) {
            self.dropped_after_leaving
                .store(self.group.is_empty(), Ordering::SeqCst);
        }
    }

    let dst = VfioMigrationGroup::new(GroupOptions::default());
    let (d, _h) = FakeDevice::new("d0", ALL, 1, 10, 0);
    let flag = Arc::new(AtomicBool::new(false));
    let conn = Conn {
        group: dst.clone(),
        dropped_after_leaving: flag.clone(),
    };
    dst.prepare_with_handle(Box::new(d), DeviceConfig::new("vu0", Vec::new()), Box::new(conn))
        .unwrap();
    assert!(dst.take_prepared_handle("other").is_none());
    // A failed migration: the device leaves first, then its handle goes.
    dst.drop_prepared();
    assert!(flag.load(Ordering::SeqCst), "the handle outlived its device's leaving");

    // Adopted at `State`: the device model takes the handle back, once.
    let (d, _h) = FakeDevice::new("d1", ALL, 1, 10, 0);
    dst.prepare_with_handle(Box::new(d), DeviceConfig::new("vu1", Vec::new()), Box::new(7u32))
        .unwrap();
    let h = dst.take_prepared_handle("vu1").expect("the handle");
    assert_eq!(*h.downcast::<u32>().unwrap(), 7);
    assert!(dst.take_prepared_handle("vu1").is_none());
}

#[test]
fn an_unpatched_destination_gets_cloud_hypervisors_in_tree_blob() {
    let (mut src, sh) = source(2, 7, 9000);
    let contents: Vec<Vec<u8>> = sh.iter().map(|h| h.content()).collect();
    // Start's response had zero padding.
    assert_eq!(Peer::from_start_response(&[0; 6]), Peer::Upstream);
    src[0].group().set_legacy_peer(true);
    for d in &mut src {
        d.start_migration().unwrap();
    }
    for d in &mut src {
        d.start_dirty_log().unwrap();
    }
    for _ in 0..3 {
        for d in &mut src {
            d.dirty_log().unwrap();
        }
    }
    let snaps = snapshot_all(&mut src);
    let mut bytes = 0;
    for (i, d) in src.iter().enumerate() {
        let leaf: serde_json::Value = snaps[&d.id()].to_state().unwrap();
        let keys: Vec<&String> = leaf.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["blob"], "exactly the in-tree VfioMigrationData");
        let raw = decode_base64(leaf["blob"].as_str().unwrap(), 1 << 20).unwrap();
        assert_eq!(raw, contents[i], "the raw device data, pre-copy part first");
        bytes += raw.len() as u64;
    }
    assert_eq!(
        src[0].group().transferred(),
        Transferred {
            precopy_bytes: 0,
            stop_copy_bytes: bytes
        }
    );
    // Our destination reads it too (an unpatched source sends the same).
    let dst = VfioMigrationGroup::new(GroupOptions::default());
    let (d, h) = FakeDevice::new("d", ALL, 1, 10, 0);
    let mut m = MigratableVfioDevice::new(&dst, Box::new(d), DeviceConfig::new("_vfio1", vec![RAM])).unwrap();
    let s = &snaps["_vfio1"];
    assert!(matches!(
        s.to_state::<AnyDeviceState>().unwrap(),
        AnyDeviceState::Legacy(_)
    ));
    m.restore(s).unwrap();
    m.resume().unwrap();
    assert_eq!(h.content(), contents[1]);
    for d in &mut src {
        d.stop_dirty_log().unwrap();
    }
    for d in &mut src {
        d.complete_migration().unwrap();
    }
    // The next migration speaks our format again unless told otherwise.
    let (mut again, _) = source(1, 9, 3000);
    let snaps = snapshot_all(&mut again);
    assert!(matches!(
        snaps["_vfio0"].to_state::<AnyDeviceState>().unwrap(),
        AnyDeviceState::Record(_)
    ));
}
