//! Dirty tracking through the public API against the built-in emulated device (which follows
//! the uAPI's DMA logging rules: range limits, alignment, read-and-clear).

use vfio_migration::device::MigrationDevice;
use vfio_migration::dirty::{
    Candidates, DeviceLogConfig, DeviceLogTracker, DirtyRange, DirtyTracker, Method, Policy, RangeTable, SelectOptions,
    TrackErrorKind, select,
};
use vfio_migration::emulated::EmulatedDevice;

const PAGE: u64 = 4096;

/// Twelve 1 MiB areas with gaps of different sizes, the shape of a guest memory map.
fn memory_map() -> RangeTable {
    let mut at = 0u64;
    RangeTable::from_ranges((0..12u64).map(|i| {
        let r = DirtyRange::new(at, 1 << 20);
        at += (1 << 20) + (i % 4 + 1) * 0x10_0000;
        r
    }))
}

fn pages(addrs: &[u64]) -> RangeTable {
    RangeTable::from_ranges(addrs.iter().map(|a| DirtyRange::new(a & !(PAGE - 1), PAGE)))
}

#[test]
fn device_logging_on_emulated_devices_is_page_exact() {
    let memory = memory_map();
    // Device a takes only 3 ranges: the tracker merges the map over its smallest gaps.
    let a = EmulatedDevice::from_spec("size=64K,seed=1,max-ranges=3,name=a").unwrap();
    let b = EmulatedDevice::from_spec("size=64K,seed=2,name=b").unwrap();
    let (ha, hb) = (a.handle(), b.handle());
    let mut t = DeviceLogTracker::new([Box::new(a), Box::new(b)], DeviceLogConfig::default());
    t.start(&memory).unwrap();
    let logged = t.logged_ranges();
    assert!(logged[0].1.len() <= 3, "{logged:?}");
    assert_eq!(logged[1].1.len(), 12);
    assert!(t.report().unwrap().is_empty());

    let r = memory.as_slice();
    // Writes: a page in the first area, a write across a page boundary, the last byte of an
    // area, and one write into a gap (not guest memory: never reported).
    ha.dma_write(r[0].gpa + 0x1234, 8).unwrap();
    ha.dma_write(r[5].gpa + PAGE - 4, 8).unwrap();
    hb.dma_write(r[11].end() - 1, 1).unwrap();
    hb.dma_write(r[5].gpa + PAGE, 8).unwrap();
    ha.dma_write(r[2].end() + 0x100, 16).unwrap();
    let got = t.report().unwrap();
    let want = pages(&[r[0].gpa + 0x1000, r[5].gpa, r[5].gpa + PAGE, r[11].end() - 1]);
    assert_eq!(got, want);
    assert_eq!(got.effective_size(), 4 * PAGE);
    // Read and cleared.
    assert!(t.report().unwrap().is_empty());
    t.stop().unwrap();
    assert_eq!(ha.dma_log_page_size(), None);
    assert_eq!(hb.dma_log_page_size(), None);
}

#[test]
fn select_takes_device_logging_when_every_device_has_it() {
    let memory = memory_map();
    let mut devices: Vec<Box<dyn MigrationDevice>> = (0..3)
        .map(|i| Box::new(EmulatedDevice::from_spec(&format!("size=64K,seed={i},name=d{i}")).unwrap()) as _)
        .collect();
    let log = DeviceLogTracker::new(devices.iter_mut().map(|d| d.as_mut()), DeviceLogConfig::default());
    let mut s = select(
        Candidates {
            device_log: Ok(Box::new(log)),
            iommu: Err("no IOMMU dirty tracking".into()),
        },
        &memory,
        SelectOptions {
            allow_all_dirty: false,
            policy: Policy::FailMigration,
        },
    )
    .unwrap();
    assert_eq!(s.method, Method::DeviceLog);
    assert!(s.tracker.report().unwrap().is_empty());
    s.tracker.stop().unwrap();
}

#[test]
fn refusal_names_every_reason() {
    let e = select(
        Candidates {
            device_log: Err("device 0000:01:00.0 has no DMA logging".into()),
            iommu: Err("container without the migration capability".into()),
        },
        &memory_map(),
        SelectOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e.kind, TrackErrorKind::Refused(ref r) if r.len() == 3));
    let msg = e.to_string();
    for part in [
        "device 0000:01:00.0 has no DMA logging",
        "container without the migration capability",
        "all-dirty: not allowed",
    ] {
        assert!(msg.contains(part), "{msg}");
    }
}
