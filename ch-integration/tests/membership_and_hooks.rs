//! A device leaving its group (hot-unplug, `Drop`), the VMM's reset hook, and the DMA ranges
//! recomputed when tracking starts.

mod fake;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use ch_integration::{DeviceConfig, GroupOptions, MigratableVfioDevice, VfioMigrationGroup};
use fake::{FakeDevice, FaultMode, Handle};
use vfio_migration::device::DmaRange;
use vfio_migration::state::{DeviceState, MigrationFlags};
use vm_migration::protocol::MemoryRange;
use vm_migration::{Migratable, Pausable, Snapshot, Snapshottable};

const ALL: MigrationFlags = MigrationFlags::from_bits(7);
const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    length: 1 << 24,
};

fn add(group: &VfioMigrationGroup, id: &str, seed: u64) -> (MigratableVfioDevice, Handle) {
    let (d, h) = FakeDevice::new(id, ALL, seed, 3000, 1000);
    let dev = MigratableVfioDevice::new(group, Box::new(d), DeviceConfig::new(id, vec![RAM])).unwrap();
    (dev, h)
}

/// Migrate `devs` (Cloud Hypervisor's order) into fresh devices; returns the destination handles.
fn migrate(devs: &mut [&mut MigratableVfioDevice]) -> Vec<Handle> {
    for d in devs.iter_mut() {
        d.start_migration().unwrap();
    }
    for d in devs.iter_mut() {
        d.start_dirty_log().unwrap();
        d.dirty_log().unwrap();
    }
    for d in devs.iter_mut() {
        d.pause().unwrap();
    }
    let mut snaps = BTreeMap::new();
    for d in devs.iter_mut() {
        snaps.insert(d.id(), d.snapshot().unwrap());
    }
    for d in devs.iter_mut() {
        d.stop_dirty_log().unwrap();
        d.complete_migration().unwrap();
    }
    let json = serde_json::to_string(&snaps).unwrap();
    let snaps: BTreeMap<String, Snapshot> = serde_json::from_str(&json).unwrap();
    let dgroup = VfioMigrationGroup::new(GroupOptions::default());
    let mut dst = Vec::new();
    for (k, (id, s)) in snaps.iter().enumerate() {
        let (mut d, h) = add(&dgroup, id, 900 + k as u64);
        d.restore(s).unwrap();
        dst.push((d, h));
    }
    for (d, _) in &mut dst {
        d.resume().unwrap();
    }
    dst.into_iter()
        .map(|(d, h)| {
            assert_eq!(h.state(), DeviceState::Running);
            // The destination VM keeps running; its devices leave with it.
            std::mem::forget(d);
            h
        })
        .collect()
}

#[test]
fn a_device_leaves_and_the_same_id_registers_again() {
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let (mut a, ha) = add(&group, "_vfio0", 1);
    let (b, hb) = add(&group, "_vfio1", 2);
    assert_eq!(group.len(), 2);
    // The same id twice is refused while the first is a member.
    let (dup, _) = FakeDevice::new("dup", ALL, 3, 10, 0);
    assert!(MigratableVfioDevice::new(&group, Box::new(dup), DeviceConfig::new("_vfio1", vec![RAM])).is_err());
    drop(b);
    assert_eq!(group.len(), 1);
    assert_eq!(Arc::strong_count(&hb.0), 1, "the group dropped the device it left with");
    assert_eq!(
        hb.state(),
        DeviceState::Running,
        "a device that leaves outside a migration is untouched"
    );
    assert!(hb.lock().transitions.is_empty());
    // The index of the other member stays valid.
    assert_eq!(a.device_state().unwrap(), DeviceState::Running);
    // Re-plugged under the same id.
    let (mut b2, hb2) = add(&group, "_vfio1", 4);
    assert_eq!(group.len(), 2);
    let dst = migrate(&mut [&mut a, &mut b2]);
    assert_eq!(dst[0].content(), ha.content());
    assert_eq!(dst[1].content(), hb2.content());
    assert_eq!(ha.state(), DeviceState::Stop);
    assert_eq!(hb2.state(), DeviceState::Stop);
    drop(b2);
    // A migration of the one that remains.
    let group2 = VfioMigrationGroup::new(GroupOptions::default());
    let (c, _) = add(&group2, "_vfio0", 5);
    let (mut d, hd) = add(&group2, "_vfio1", 6);
    drop(c);
    let dst = migrate(&mut [&mut d]);
    assert_eq!(dst.len(), 1);
    assert_eq!(dst[0].content(), hd.content());
}

#[test]
fn a_device_that_leaves_during_a_migration_runs_again_and_the_others_migrate() {
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let (mut a, ha) = add(&group, "_vfio0", 11);
    let (b, hb) = add(&group, "_vfio1", 12);
    let (mut c, hc) = add(&group, "_vfio2", 13);
    for d in [&mut a, &mut c] {
        d.start_migration().unwrap();
    }
    a.start_dirty_log().unwrap();
    a.dirty_log().unwrap();
    assert_eq!(hb.state(), DeviceState::PreCopy);
    assert!(hb.lock().log.is_some());
    drop(b);
    assert_eq!(hb.state(), DeviceState::Running, "put back to RUNNING as it leaves");
    assert!(hb.lock().log.is_none(), "its DMA logging stopped");
    assert!(group.migration_in_progress());
    assert_eq!(group.len(), 2);
    // The migration goes on without it: the first device present reports the dirty pages.
    for d in [&mut c, &mut a] {
        d.start_dirty_log().unwrap();
        d.dirty_log().unwrap();
    }
    // Its transfer session ended at the engine's next read: nothing holds the device any more.
    assert_eq!(Arc::strong_count(&hb.0), 1);
    for d in [&mut a, &mut c] {
        d.pause().unwrap();
    }
    let sa = a.snapshot().unwrap();
    let sc = c.snapshot().unwrap();
    for d in [&mut a, &mut c] {
        d.stop_dirty_log().unwrap();
        d.complete_migration().unwrap();
    }
    assert!(!group.migration_in_progress());
    assert_eq!(ha.state(), DeviceState::Stop);
    assert_eq!(hc.state(), DeviceState::Stop);
    let dgroup = VfioMigrationGroup::new(GroupOptions::default());
    let (mut da, dha) = add(&dgroup, "_vfio0", 91);
    let (mut dc, dhc) = add(&dgroup, "_vfio2", 93);
    da.restore(&sa).unwrap();
    dc.restore(&sc).unwrap();
    da.resume().unwrap();
    dc.resume().unwrap();
    assert_eq!(dha.content(), ha.content());
    assert_eq!(dhc.content(), hc.content());
    assert_eq!(dha.state(), DeviceState::Running);
}

#[test]
fn the_reset_hook_runs_after_every_reset() {
    let calls = Arc::new(AtomicUsize::new(0));
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let (d, h) = FakeDevice::new("dst", ALL, 21, 10, 0);
    let mut cfg = DeviceConfig::new("_vfio0", vec![RAM]);
    let seen = calls.clone();
    let hh = h.clone();
    cfg.on_reset = Some(Arc::new(move || {
        // Called after the reset: the device is RUNNING again (or failed to reset).
        assert_eq!(hh.state(), DeviceState::Running);
        seen.fetch_add(1, Ordering::SeqCst);
    }));
    let mut dev = MigratableVfioDevice::new(&group, Box::new(d), cfg).unwrap();
    // A valid stream holding a state the device rejects: RESUMING -> STOP fails, the engine
    // resets the device, the hook follows.
    let sgroup = VfioMigrationGroup::new(GroupOptions::default());
    let (mut s, _sh) = add(&sgroup, "_vfio0", 22);
    s.pause().unwrap();
    let snap = s.snapshot().unwrap();
    h.arm(FaultMode::Error);
    assert!(dev.restore(&snap).is_err());
    h.disarm();
    let resets = h.lock().resets as usize;
    assert!(resets >= 1);
    assert_eq!(calls.load(Ordering::SeqCst), resets, "one hook call per reset");
    assert_eq!(h.state(), DeviceState::Running);
    // The next restore works, with no reset.
    dev.restore(&snap).unwrap();
    dev.resume().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), resets);
    // A source recovery that resets calls it too.
    let calls2 = Arc::new(AtomicUsize::new(0));
    let g = VfioMigrationGroup::new(GroupOptions::default());
    let (x, hx) = FakeDevice::new("x", ALL, 23, 3000, 1000);
    let mut cfg = DeviceConfig::new("_vfio0", vec![RAM]);
    let seen = calls2.clone();
    cfg.on_reset = Some(Arc::new(move || {
        seen.fetch_add(1, Ordering::SeqCst);
    }));
    let mut x = MigratableVfioDevice::new(&g, Box::new(x), cfg).unwrap();
    x.start_migration().unwrap();
    x.start_dirty_log().unwrap();
    hx.arm(FaultMode::Error);
    assert!(x.pause().is_err());
    hx.disarm();
    x.resume().unwrap();
    // The reset ended the device's DMA logging: stopping it fails, and is only logged by
    // Cloud Hypervisor on its failure path.
    assert!(x.stop_dirty_log().is_err());
    assert_eq!(hx.state(), DeviceState::Running);
    assert!(hx.lock().resets >= 1);
    assert_eq!(calls2.load(Ordering::SeqCst), hx.lock().resets as usize);
}

#[test]
fn dma_ranges_come_from_the_provider_each_time_tracking_starts() {
    let ranges = Arc::new(Mutex::new(vec![MemoryRange {
        gpa: 0,
        length: 1 << 20,
    }]));
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let (d, h) = FakeDevice::new("p", ALL, 31, 100, 10);
    // The ranges given at register are stale as soon as a provider is given.
    let mut cfg = DeviceConfig::new("_vfio0", vec![RAM]);
    let r = ranges.clone();
    cfg.dma_ranges_provider = Some(Arc::new(move || r.lock().unwrap().clone()));
    let mut dev = MigratableVfioDevice::new(&group, Box::new(d), cfg).unwrap();
    let logged = |h: &Handle| h.lock().log.as_ref().map(|(r, _)| r.clone());
    dev.start_migration().unwrap();
    dev.start_dirty_log().unwrap();
    assert_eq!(
        logged(&h),
        Some(vec![DmaRange {
            iova: 0,
            length: 1 << 20
        }])
    );
    dev.stop_dirty_log().unwrap();
    // Memory hotplug: the next migration tracks the new memory too.
    ranges.lock().unwrap().push(MemoryRange {
        gpa: 1 << 32,
        length: 1 << 21,
    });
    dev.start_migration().unwrap();
    dev.start_dirty_log().unwrap();
    assert_eq!(
        logged(&h),
        Some(vec![
            DmaRange {
                iova: 0,
                length: 1 << 20
            },
            DmaRange {
                iova: 1 << 32,
                length: 1 << 21
            }
        ])
    );
    h.lock().dma_writes = vec![(1 << 32) + 0x3000];
    let t = dev.dirty_log().unwrap();
    assert_eq!(
        t.regions(),
        &[MemoryRange {
            gpa: (1 << 32) + 0x3000,
            length: 0x1000
        }]
    );
    dev.stop_dirty_log().unwrap();
    assert_eq!(h.state(), DeviceState::Running);
}
