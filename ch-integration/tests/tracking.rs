//! The group's dirty tracking in Cloud Hypervisor's call order: QEMU's choice among device DMA
//! logging, the IOMMU trackers of the containers and all-dirty; one report per container, not
//! one per device; the failure policy; refusals.

mod common;
mod fake;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ch_integration::tracking::Method;
use ch_integration::{
    ContainerTracker, DeviceConfig, GroupOptions, MigratableVfioDevice, Policy, Tracking, VfioMigrationGroup,
};
use common::{Rng, failure_path};
use fake::{FakeDevice, Handle};
use vfio_migration::DeviceError;
use vfio_migration::device::{DeviceIdentity, DmaRange, ErrorKind, MigrationDevice, Operation, TransferSession};
use vfio_migration::dirty::{DirtyError, DirtyRange, DirtyTracker, RangeTable, TrackErrorKind, TrackOp};
use vfio_migration::state::{DeviceState, MigrationFlags};
use vm_migration::protocol::{MemoryRange, MemoryRangeTable};
use vm_migration::{Migratable, Pausable, Snapshottable};

const ALL: MigrationFlags = MigrationFlags::from_bits(7);
const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    length: 1 << 24,
};

/// A device whose DMA logging START or REPORT fails on demand (the fake and the emulated
/// device cannot fail REPORT alone).
struct FlakyLog {
    inner: FakeDevice,
    fail_start: bool,
    fail_report: Arc<AtomicBool>,
}

impl MigrationDevice for FlakyLog {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn identity(&self) -> DeviceIdentity {
        self.inner.identity()
    }
    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        self.inner.flags()
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        self.inner.state()
    }
    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        self.inner.set_state(to)
    }
    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        self.inner.stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.inner.reset()
    }
    fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError> {
        if self.fail_start {
            return Err(DeviceError::new(
                self.name(),
                Operation::DmaLogStart,
                ErrorKind::Os(std::io::Error::from_raw_os_error(libc::ENOTTY)),
            ));
        }
        self.inner.dma_log_start(ranges, page_size)
    }
    fn dma_log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        if self.fail_report.load(Ordering::SeqCst) {
            return Err(DeviceError::new(
                self.name(),
                Operation::DmaLogReport,
                ErrorKind::Os(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
            ));
        }
        self.inner.dma_log_report(iova, length, page_size, bitmap)
    }
    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        self.inner.dma_log_stop()
    }
}

/// Calls made to a container tracker: (starts, reports, stops).
type Calls = Arc<Mutex<(u32, u32, u32)>>;

/// A container's IOMMU tracker that reports one fixed range dirty and counts its calls.
struct CountingContainer {
    name: String,
    dirty: DirtyRange,
    started: bool,
    calls: Calls,
}

fn container(name: &str, dirty: DirtyRange) -> (ContainerTracker, Calls) {
    let calls = Calls::default();
    let c = CountingContainer {
        name: name.into(),
        dirty,
        started: false,
        calls: calls.clone(),
    };
    (ContainerTracker::new(c), calls)
}

impl DirtyTracker for CountingContainer {
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
        self.calls.lock().unwrap().0 += 1;
        Ok(())
    }
    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        self.calls.lock().unwrap().1 += 1;
        Ok(RangeTable::from_ranges([self.dirty]))
    }
    fn stop(&mut self) -> Result<(), DirtyError> {
        self.started = false;
        self.calls.lock().unwrap().2 += 1;
        Ok(())
    }
}

struct Vm {
    group: VfioMigrationGroup,
    devs: Vec<MigratableVfioDevice>,
    handles: Vec<Handle>,
    fail_report: Vec<Arc<AtomicBool>>,
}

/// A VM with one device per entry of `tracking` (with `fail_start` its DMA logging cannot start).
fn vm(opts: GroupOptions, tracking: Vec<(Tracking, bool)>) -> Vm {
    let group = VfioMigrationGroup::new(opts);
    let mut vm = Vm {
        group: group.clone(),
        devs: Vec::new(),
        handles: Vec::new(),
        fail_report: Vec::new(),
    };
    for (i, (t, fail_start)) in tracking.into_iter().enumerate() {
        let (d, h) = FakeDevice::new(&format!("f{i}"), ALL, 10 + i as u64, 3000, 1000);
        let fail_report = Arc::new(AtomicBool::new(false));
        let dev = FlakyLog {
            inner: d,
            fail_start,
            fail_report: fail_report.clone(),
        };
        let mut cfg = DeviceConfig::new(format!("_vfio{i}"), vec![RAM]);
        cfg.tracking = t;
        vm.devs
            .push(MigratableVfioDevice::new(&group, Box::new(dev), cfg).unwrap());
        vm.handles.push(h);
        vm.fail_report.push(fail_report);
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

fn start(vm: &mut Vm) {
    for d in &mut vm.devs {
        d.start_migration().unwrap();
    }
    for d in &mut vm.devs {
        d.start_dirty_log().unwrap();
    }
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

fn both(c: &ContainerTracker) -> Tracking {
    Tracking {
        container: Some(c.clone()),
        ..Tracking::device_log()
    }
}

#[test]
fn device_logging_when_every_device_offers_it_and_it_starts_on_every_one() {
    let (c, calls) = container("type1:c", DirtyRange::new(0, 4096));
    let mut vm = vm(GroupOptions::default(), vec![(both(&c), false), (both(&c), false)]);
    start(&mut vm);
    assert_eq!(vm.group.dirty_tracking(), Some(Method::DeviceLog));
    assert!(vm.handles.iter().all(|h| h.lock().log.is_some()));
    assert_eq!(*calls.lock().unwrap(), (0, 0, 0), "the container's tracker is not used");
    vm.handles[1].lock().dma_writes = vec![0x5000, 0x5100];
    vm.handles[0].lock().dma_writes = vec![0x1000];
    let got = round(&mut vm, &mut Rng(7)).unwrap();
    assert_eq!(
        got,
        [
            MemoryRange {
                gpa: 0x1000,
                length: 0x1000
            },
            MemoryRange {
                gpa: 0x5000,
                length: 0x1000
            }
        ]
    );
    finish(&mut vm);
    assert!(vm.handles.iter().all(|h| h.lock().log.is_none()));
}

#[test]
fn the_iommu_when_one_device_cannot_log_and_the_others_stop_logging() {
    let (c, calls) = container("type1:c", DirtyRange::new(0x8000, 4096));
    let mut vm = vm(GroupOptions::default(), vec![(both(&c), false), (both(&c), true)]);
    start(&mut vm);
    assert_eq!(vm.group.dirty_tracking(), Some(Method::Iommu));
    assert!(vm.handles[0].lock().log.is_none(), "device 0 no longer logs");
    assert_eq!(
        round(&mut vm, &mut Rng(3)).unwrap(),
        [MemoryRange {
            gpa: 0x8000,
            length: 4096
        }]
    );
    finish(&mut vm);
    assert_eq!(*calls.lock().unwrap(), (1, 1, 1));
}

#[test]
fn a_container_is_started_reported_and_stopped_once_per_container_not_per_device() {
    let (a, calls_a) = container("type1:a", DirtyRange::new(0x1000, 4096));
    let (b, calls_b) = container("hwpt7", DirtyRange::new(0x9000, 4096));
    let mut vm = vm(
        GroupOptions::default(),
        vec![
            (Tracking::container(a.clone()), false),
            (Tracking::container(b.clone()), false),
            (Tracking::container(a.clone()), false),
        ],
    );
    start(&mut vm);
    assert_eq!(vm.group.dirty_tracking(), Some(Method::Iommu));
    assert_eq!(*calls_a.lock().unwrap(), (1, 0, 0));
    assert_eq!(*calls_b.lock().unwrap(), (1, 0, 0));
    let mut rng = Rng(11);
    for r in 1..=3 {
        let got = round(&mut vm, &mut rng).unwrap();
        assert_eq!(
            got,
            [
                MemoryRange {
                    gpa: 0x1000,
                    length: 4096
                },
                MemoryRange {
                    gpa: 0x9000,
                    length: 4096
                }
            ]
        );
        assert_eq!(calls_a.lock().unwrap().1, r, "container a reported once in round {r}");
        assert_eq!(calls_b.lock().unwrap().1, r, "container b reported once in round {r}");
    }
    finish(&mut vm);
    assert_eq!(*calls_a.lock().unwrap(), (1, 3, 1));
    assert_eq!(*calls_b.lock().unwrap(), (1, 3, 1));
}

#[test]
fn a_failing_dma_log_report_degrades_to_all_dirty_under_that_policy() {
    let opts = GroupOptions {
        dirty_policy: Policy::DegradeToAllDirty,
        ..GroupOptions::default()
    };
    let mut vm = vm(
        opts,
        vec![(Tracking::device_log(), false), (Tracking::device_log(), false)],
    );
    start(&mut vm);
    let mut rng = Rng(5);
    vm.handles[1].lock().dma_writes = vec![0x3000];
    assert_eq!(
        round(&mut vm, &mut rng).unwrap(),
        [MemoryRange {
            gpa: 0x3000,
            length: 4096
        }]
    );
    // REPORT fails on device 1: that round and every later one report all memory, never nothing.
    vm.fail_report[1].store(true, Ordering::SeqCst);
    assert_eq!(round(&mut vm, &mut rng).unwrap(), [RAM]);
    vm.fail_report[1].store(false, Ordering::SeqCst);
    assert_eq!(
        round(&mut vm, &mut rng).unwrap(),
        [RAM],
        "a degraded tracker is not trusted again"
    );
    finish(&mut vm);
    assert!(vm.handles.iter().all(|h| h.lock().log.is_none()), "logging stopped");
}

#[test]
fn a_failing_dma_log_report_fails_the_migration_by_default_and_the_source_recovers() {
    let mut vm = vm(
        GroupOptions::default(),
        vec![(Tracking::device_log(), false), (Tracking::device_log(), false)],
    );
    start(&mut vm);
    let mut rng = Rng(9);
    round(&mut vm, &mut rng).unwrap();
    vm.fail_report[1].store(true, Ordering::SeqCst);
    let e = round(&mut vm, &mut rng).unwrap_err();
    assert!(
        e.contains("f1: read DMA log") && e.contains("report dirty pages"),
        "{e}"
    );
    failure_path(&mut vm.devs, false, &mut rng);
    assert!(vm.handles.iter().all(|h| h.state() == DeviceState::Running));
    assert!(vm.handles.iter().all(|h| h.lock().log.is_none()), "logging stopped");
    assert_eq!(vm.group.dirty_tracking(), None);
}

#[test]
fn no_tracking_for_the_group_is_refused_naming_the_devices() {
    // Statically: one device offers nothing, all-dirty not allowed.
    let mut vm1 = vm(
        GroupOptions::default(),
        vec![(Tracking::device_log(), false), (Tracking::none(), false)],
    );
    let e = msg(vm1.devs[0].start_migration().unwrap_err());
    assert!(
        e.contains("refused") && e.contains("_vfio1") && e.contains("all pages dirty is not allowed"),
        "{e}"
    );
    assert!(vm1.devs[0].start_dirty_log().is_err());
    assert!(
        vm1.handles
            .iter()
            .all(|h| h.lock().transitions.is_empty() && h.lock().log.is_none())
    );

    // At start: device 1's logging does not start, and there is no container.
    let mut vm2 = vm(
        GroupOptions::default(),
        vec![(Tracking::device_log(), false), (Tracking::device_log(), true)],
    );
    vm2.devs[1].start_migration().unwrap();
    let e = msg(vm2.devs[1].start_dirty_log().unwrap_err());
    assert!(
        e.contains("no usable dirty page tracking") && e.contains("f1: start DMA logging") && e.contains("all-dirty"),
        "{e}"
    );
    assert!(
        vm2.handles
            .iter()
            .all(|h| h.lock().transitions.is_empty() && h.lock().log.is_none()),
        "nothing started, nothing left logging"
    );

    // Allowed: all-dirty for the group.
    let opts = GroupOptions {
        allow_all_dirty: true,
        ..GroupOptions::default()
    };
    let mut vm3 = vm(
        opts,
        vec![(Tracking::device_log(), false), (Tracking::device_log(), true)],
    );
    start(&mut vm3);
    assert_eq!(vm3.group.dirty_tracking(), Some(Method::AllDirty));
    assert_eq!(round(&mut vm3, &mut Rng(1)).unwrap(), [RAM]);
    finish(&mut vm3);
}

/// A vIOMMU mapping IOVA `[iova, iova + len)` to guest `[gpa, gpa + len)`.
struct Window {
    iova: u64,
    gpa: u64,
    len: u64,
}

impl vfio_migration::dirty::IovaTranslator for Window {
    fn translate(&self, r: DirtyRange, out: &mut Vec<DirtyRange>) -> u64 {
        match r.intersect(&DirtyRange::new(self.iova, self.len)) {
            Some(x) => {
                out.push(DirtyRange::new(x.gpa - self.iova + self.gpa, x.length));
                r.length - x.length
            }
            None => r.length,
        }
    }
    fn iova_space(&self) -> RangeTable {
        RangeTable::from_ranges([DirtyRange::new(self.iova, self.len)])
    }
}

#[test]
fn behind_a_viommu_dirty_iova_is_reported_as_guest_pages() {
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let (d, h) = FakeDevice::new("f0", ALL, 1, 3000, 1000);
    let mut cfg = DeviceConfig::new("_vfio0", vec![RAM]);
    cfg.viommu = ch_integration::Viommu::Translated(ch_integration::SharedTranslator(Arc::new(Window {
        iova: 0x10_0000,
        gpa: 0x40_0000,
        len: 0x1_0000,
    })));
    let mut dev = MigratableVfioDevice::new(&group, Box::new(d), cfg).unwrap();
    dev.start_migration().unwrap();
    dev.start_dirty_log().unwrap();
    let logged = h.lock().log.clone().unwrap().0;
    assert_eq!(
        logged,
        [DmaRange {
            iova: 0x10_0000,
            length: 0x1_0000
        }],
        "the device logs its IOVA space"
    );
    h.lock().dma_writes = vec![0x10_2000, 0x10_2800];
    assert_eq!(
        dev.dirty_log().unwrap().regions(),
        &[MemoryRange {
            gpa: 0x40_2000,
            length: 4096
        }]
    );
    dev.stop_dirty_log().unwrap();
    assert!(h.lock().log.is_none());
    assert_eq!(h.state(), DeviceState::Running);
}
