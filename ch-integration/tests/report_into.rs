//! The group's dirty trackers report into the caller's table (`DirtyTracker::report_into`): the
//! group keeps one table between rounds, a container's tracker converts into memory that is
//! already mapped every round, and a group of several containers keeps one table per container;
//! a failed report still fails the migration (or degrades to all memory), never "no dirty pages".

mod common;
mod fake;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use ch_integration::tracking::Method;
use ch_integration::{
    ContainerTracker, DeviceConfig, GroupOptions, MigratableVfioDevice, Policy, Tracking, VfioMigrationGroup,
};
use common::{Rng, failure_path};
use fake::{FakeDevice, Handle};
use vfio_migration::dirty::{AllDirty, DirtyError, DirtyRange, DirtyTracker, RangeTable, TrackErrorKind, TrackOp};
use vfio_migration::state::{DeviceState, MigrationFlags};
use vm_migration::protocol::{MemoryRange, MemoryRangeTable};
use vm_migration::{Migratable, Pausable, Snapshottable};

const ALL: MigrationFlags = MigrationFlags::from_bits(7);
const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    length: 1 << 24,
};

fn ranges(spec: &[(u64, u64)]) -> RangeTable {
    RangeTable::from_ranges(spec.iter().map(|&(gpa, length)| DirtyRange::new(gpa, length)))
}

/// `n` separate 4 KiB ranges from `base`, one every 16 KiB.
fn spaced(base: u64, n: u64) -> RangeTable {
    RangeTable::from_ranges((0..n).map(|i| DirtyRange::new(base + i * 0x4000, 0x1000)))
}

/// The table a tracker was handed, as it arrived: (address of its ranges, capacity).
type Seen = Arc<Mutex<Vec<(usize, usize)>>>;

/// A container's IOMMU tracker that reports from a script (`Err`: that report fails with EIO) and
/// records every table it is handed. Its `report` goes through `report_into` on a new table, as
/// the engine's trackers do.
struct Recorder {
    name: String,
    started: bool,
    script: VecDeque<Result<RangeTable, ()>>,
    seen: Seen,
}

fn recorder(name: &str, script: Vec<Result<RangeTable, ()>>) -> (ContainerTracker, Seen) {
    let seen = Seen::default();
    let r = Recorder {
        name: name.into(),
        started: false,
        script: script.into(),
        seen: seen.clone(),
    };
    (ContainerTracker::new(r), seen)
}

impl DirtyTracker for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    fn page_size(&self) -> u64 {
        4096
    }
    fn is_started(&self) -> bool {
        self.started
    }
    fn start(&mut self, _: &RangeTable) -> Result<(), DirtyError> {
        if self.started {
            return Err(DirtyError::new(
                &self.name,
                TrackOp::Start,
                TrackErrorKind::AlreadyStarted,
            ));
        }
        self.started = true;
        Ok(())
    }
    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        let mut out = RangeTable::new();
        self.report_into(&mut out)?;
        Ok(out)
    }
    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        self.seen
            .lock()
            .unwrap()
            .push((out.as_slice().as_ptr() as usize, out.capacity()));
        out.clear();
        match self.script.pop_front().unwrap_or(Ok(RangeTable::new())) {
            Ok(t) => {
                for r in &t {
                    out.push(*r);
                }
                Ok(())
            }
            Err(()) => Err(DirtyError::new(
                &self.name,
                TrackOp::Report,
                std::io::Error::from_raw_os_error(libc::EIO),
            )),
        }
    }
    fn stop(&mut self) -> Result<(), DirtyError> {
        self.started = false;
        Ok(())
    }
}

/// Asserts that from round `from` on, every table a tracker was handed is the same allocation
/// (non-empty capacity, same address, same capacity: none of its reports outgrew it).
fn assert_reused(seen: &Seen, from: usize, who: &str) {
    let seen = seen.lock().unwrap();
    assert!(seen.len() > from + 1, "{who}: {} reports", seen.len());
    let first = seen[from];
    assert!(
        first.1 > 0,
        "{who}: round {from} was handed a table without room: {seen:?}"
    );
    for (round, s) in seen.iter().enumerate().skip(from) {
        assert_eq!(*s, first, "{who}: round {round} was handed another table: {seen:?}");
    }
}

struct Vm {
    group: VfioMigrationGroup,
    devs: Vec<MigratableVfioDevice>,
    handles: Vec<Handle>,
}

/// A VM with one fake device per entry of `tracking`, each reaching all of [`RAM`].
fn vm(opts: GroupOptions, tracking: Vec<Tracking>) -> Vm {
    let group = VfioMigrationGroup::new(opts);
    let mut vm = Vm {
        group: group.clone(),
        devs: Vec::new(),
        handles: Vec::new(),
    };
    for (i, t) in tracking.into_iter().enumerate() {
        let (d, h) = FakeDevice::new(&format!("f{i}"), ALL, 20 + i as u64, 3000, 1000);
        let mut cfg = DeviceConfig::new(format!("_vfio{i}"), vec![RAM]);
        cfg.tracking = t;
        vm.devs
            .push(MigratableVfioDevice::new(&group, Box::new(d), cfg).unwrap());
        vm.handles.push(h);
    }
    for d in &mut vm.devs {
        d.start_migration().unwrap();
    }
    for d in &mut vm.devs {
        d.start_dirty_log().unwrap();
    }
    vm
}

fn msg(e: vm_migration::MigratableError) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

/// One round of `dirty_log` over every device in a random order: the union of the tables.
fn round(vm: &mut Vm, rng: &mut Rng) -> Result<Vec<MemoryRange>, String> {
    let mut tables = Vec::new();
    for i in rng.order(vm.devs.len()) {
        tables.push(vm.devs[i].dirty_log().map_err(msg)?);
    }
    Ok(MemoryRangeTable::new_from_tables(tables).regions().to_vec())
}

fn finish(vm: &mut Vm) {
    for d in &mut vm.devs {
        d.pause().unwrap();
    }
    let mut snaps = BTreeMap::new();
    for d in &mut vm.devs {
        snaps.insert(d.id(), d.snapshot().unwrap());
    }
    for d in &mut vm.devs {
        d.stop_dirty_log().unwrap();
    }
    for d in &mut vm.devs {
        d.complete_migration().unwrap();
    }
    assert!(vm.handles.iter().all(|h| h.state() == DeviceState::Stop));
}

fn regions(t: &RangeTable) -> Vec<MemoryRange> {
    t.iter()
        .map(|r| MemoryRange {
            gpa: r.gpa,
            length: r.length,
        })
        .collect()
}

#[test]
fn a_container_tracker_reports_into_the_callers_table() {
    let memory = ranges(&[(0, 0x10_0000), (0x40_0000, 0x1000)]);
    let mut c = ContainerTracker::new(AllDirty::new());
    let mut out = ranges(&[(0x9000_0000, 0x1000)]);
    let e = c.report_into(&mut out).unwrap_err();
    assert!(matches!(e.kind, TrackErrorKind::NotStarted), "{e}");
    assert!(out.is_empty(), "a failed report leaves no stale ranges behind");

    c.start(&memory).unwrap();
    let mut out = RangeTable::with_capacity(16);
    let at = (out.as_slice().as_ptr(), out.capacity());
    for round in 0..4 {
        c.report_into(&mut out).unwrap();
        assert_eq!(out, memory, "round {round}");
        assert_eq!(
            (out.as_slice().as_ptr(), out.capacity()),
            at,
            "round {round}: a table with room was reallocated"
        );
    }
    // `report` is unchanged: a table of its own.
    assert_eq!(c.report().unwrap(), memory);
    c.stop().unwrap();
    let mut out = RangeTable::with_capacity(16);
    c.report_into(&mut out).unwrap_err();
    assert!(out.is_empty());
}

#[test]
fn the_group_reports_every_round_into_the_table_it_keeps() {
    // Round 1 sizes the group's table; the later rounds fit in it (one needs far less).
    let script = vec![
        Ok(spaced(0x10_0000, 40)),
        Ok(spaced(0x20_0000, 40)),
        Ok(ranges(&[(0x3000, 0x1000)])),
        Ok(RangeTable::new()),
        Ok(spaced(0x30_0000, 33)),
    ];
    let expected: Vec<RangeTable> = script.iter().map(|r| r.clone().unwrap()).collect();
    let (c, seen) = recorder("type1:c", script);
    let mut vm = vm(
        GroupOptions::default(),
        vec![Tracking::container(c.clone()), Tracking::container(c.clone())],
    );
    assert_eq!(vm.group.dirty_tracking(), Some(Method::Iommu));
    let mut rng = Rng(17);
    for (r, want) in expected.iter().enumerate() {
        assert_eq!(round(&mut vm, &mut rng).unwrap(), regions(want), "round {r}");
    }
    assert_eq!(seen.lock().unwrap().len(), expected.len(), "one report per round");
    assert_reused(&seen, 1, "the group's table");
    finish(&mut vm);
}

#[test]
fn a_group_of_several_containers_reuses_each_containers_table() {
    let (a, seen_a) = recorder(
        "type1:a",
        vec![
            Ok(spaced(0x10_0000, 20)),
            Ok(spaced(0x10_0000, 5)),
            Ok(spaced(0x10_0000, 20)),
        ],
    );
    let (b, seen_b) = recorder(
        "hwpt9",
        vec![
            Ok(spaced(0x80_0000, 10)),
            Ok(RangeTable::new()),
            Ok(ranges(&[(0x80_0000, 0x2000), (0x10_1000, 0x1000)])),
        ],
    );
    let mut vm = vm(
        GroupOptions::default(),
        vec![Tracking::container(a.clone()), Tracking::container(b.clone())],
    );
    let mut rng = Rng(23);
    let want = [
        RangeTable::merge(&[&spaced(0x10_0000, 20), &spaced(0x80_0000, 10)]),
        spaced(0x10_0000, 5),
        RangeTable::merge(&[
            &spaced(0x10_0000, 20),
            &ranges(&[(0x80_0000, 0x2000), (0x10_1000, 0x1000)]),
        ]),
    ];
    for (r, want) in want.iter().enumerate() {
        assert_eq!(round(&mut vm, &mut rng).unwrap(), regions(want), "round {r}");
    }
    assert_reused(&seen_a, 1, "container a's table");
    assert_reused(&seen_b, 1, "container b's table");
    finish(&mut vm);
}

#[test]
fn a_failed_container_report_still_fails_the_migration() {
    for several in [false, true] {
        let (a, _) = recorder("type1:a", vec![Ok(spaced(0x10_0000, 8)), Err(())]);
        let mut tracking = vec![Tracking::container(a)];
        if several {
            let (b, _) = recorder("hwpt9", vec![Ok(spaced(0x80_0000, 8)), Ok(spaced(0x80_0000, 8))]);
            tracking.push(Tracking::container(b));
        }
        let mut vm = vm(GroupOptions::default(), tracking);
        let mut rng = Rng(5);
        assert!(!round(&mut vm, &mut rng).unwrap().is_empty());
        let e = round(&mut vm, &mut rng).unwrap_err();
        assert!(e.contains("type1:a: report dirty pages"), "{e}");
        failure_path(&mut vm.devs, false, &mut rng);
        assert!(vm.handles.iter().all(|h| h.state() == DeviceState::Running));
        assert_eq!(vm.group.dirty_tracking(), None);
    }
}

#[test]
fn a_failed_container_report_degrades_to_all_memory_under_that_policy() {
    let opts = GroupOptions {
        dirty_policy: Policy::DegradeToAllDirty,
        ..GroupOptions::default()
    };
    let (a, seen) = recorder(
        "type1:a",
        vec![Ok(spaced(0x10_0000, 8)), Err(()), Ok(RangeTable::new())],
    );
    let (b, _) = recorder("hwpt9", vec![Ok(RangeTable::new()); 3]);
    let mut vm = vm(opts, vec![Tracking::container(a), Tracking::container(b)]);
    let mut rng = Rng(8);
    assert_eq!(round(&mut vm, &mut rng).unwrap(), regions(&spaced(0x10_0000, 8)));
    assert_eq!(round(&mut vm, &mut rng).unwrap(), [RAM], "never \"no dirty pages\"");
    assert_eq!(round(&mut vm, &mut rng).unwrap(), [RAM], "not trusted again");
    assert_eq!(seen.lock().unwrap().len(), 2, "a degraded tracker is not asked again");
    finish(&mut vm);
}
