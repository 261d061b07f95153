//! Dirty page tracking for a group of devices, on the engine's [`vfio_migration::dirty`].
//!
//! The engine does the tracking: device DMA logging ([`DeviceLog`], one device lent per call),
//! type1 containers and iommufd HWPTs ([`vfio_migration::dirty::Type1Tracker`],
//! [`vfio_migration::dirty::HwptTracker`]), vIOMMU translation ([`ViommuTracker`]), the choice
//! as QEMU makes it ([`select`](vfio_migration::dirty::select())) and the failure [`Policy`]. This module adds what Cloud
//! Hypervisor's call order needs on top:
//!
//! - what each device offers ([`Tracking`]): its DMA logging and/or the IOMMU tracker of its
//!   container, shared by the container's devices ([`ContainerTracker`]);
//! - the two candidates the group hands to [`select`](vfio_migration::dirty::select()) at the first `start_dirty_log`: device
//!   logging on every device (each over the memory it can reach, translated through its vIOMMU),
//!   and the IOMMU trackers of the group's containers, each container started, reported and
//!   stopped **once**, however many of the group's devices it holds;
//! - a refusal before anything is touched when neither can cover the group and all-dirty is not
//!   allowed;
//! - reports into the caller's table ([`DirtyTracker::report_into`]): the group keeps one
//!   table between rounds, a container's tracker and device logging convert into it, and a
//!   group of several containers or devices keeps one table per part, merged into it;
//! - the conversion to Cloud Hypervisor's [`MemoryRangeTable`].
//!
//! A failing report is never "no dirty pages": [`select`](vfio_migration::dirty::select()) wraps the chosen tracker in a
//! [`PolicyTracker`](vfio_migration::dirty::PolicyTracker), whose policy (fail the migration or
//! degrade to all-dirty, [`crate::GroupOptions::dirty_policy`]) decides.

use std::sync::{Arc, Mutex, MutexGuard};

use vfio_migration::dirty::{
    Candidates, DeviceLog, DeviceLogConfig, DirtyError, DirtyRange, DirtyTracker, IovaTranslator, RangeTable,
    ViommuTracker,
};
use vm_migration::protocol::{MemoryRange, MemoryRangeTable};

use crate::shared::SharedDevice;

pub use vfio_migration::dirty::{Method, Policy};

/// What a device offers for finding its dirty pages. The group chooses for all its devices at
/// once, as QEMU does: device DMA logging when every device offers it and it starts on every
/// one, else the IOMMU trackers when every device has one, else all-dirty when
/// [`crate::GroupOptions::allow_all_dirty`], else the migration is refused.
#[derive(Clone, Debug, Default)]
pub struct Tracking {
    /// The device's own DMA logging with these settings (`None`: the device has none).
    pub device_log: Option<DeviceLogConfig>,
    /// The IOMMU dirty tracker of the device's container or HWPT (`None`: none).
    pub container: Option<ContainerTracker>,
}

impl Tracking {
    /// Device DMA logging with the engine's defaults (4 KiB pages).
    pub fn device_log() -> Self {
        Self {
            device_log: Some(DeviceLogConfig::default()),
            container: None,
        }
    }

    /// The IOMMU tracker of the device's container only.
    pub fn container(container: ContainerTracker) -> Self {
        Self {
            device_log: None,
            container: Some(container),
        }
    }

    /// Nothing: the device's pages can only be reported all dirty.
    pub fn none() -> Self {
        Self::default()
    }
}

/// An IOMMU dirty tracker for a whole VFIO container (type1) or iommufd HWPT, shared by the
/// devices attached to it: clone it into the [`Tracking`] of each. The group starts, reports and
/// stops it once, not once per device.
///
/// For a type1 container: `ContainerTracker::new(Type1Tracker::new(KernelType1::new(fd,
/// "/dev/vfio/vfio"), Type1Config::default()))`; for iommufd: `HwptTracker::new(KernelHwpt::new(fd,
/// hwpt, ioas), HwptConfig::default())`.
#[derive(Clone)]
pub struct ContainerTracker {
    tracker: Arc<Mutex<Box<dyn DirtyTracker>>>,
    name: String,
}

impl std::fmt::Debug for ContainerTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerTracker").field("name", &self.name).finish()
    }
}

impl ContainerTracker {
    /// Share `tracker` (not started).
    pub fn new(tracker: impl DirtyTracker + 'static) -> Self {
        let name = tracker.name().to_string();
        Self {
            tracker: Arc::new(Mutex::new(Box::new(tracker))),
            name,
        }
    }

    /// The tracker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `other` is the same container.
    pub fn same(&self, other: &ContainerTracker) -> bool {
        Arc::ptr_eq(&self.tracker, &other.tracker)
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn DirtyTracker>> {
        // Every tracker call is a single operation: a panic elsewhere cannot leave it half done.
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DirtyTracker for ContainerTracker {
    fn name(&self) -> &str {
        &self.name
    }
    fn page_size(&self) -> u64 {
        self.lock().page_size()
    }
    fn is_started(&self) -> bool {
        self.lock().is_started()
    }
    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError> {
        self.lock().start(memory)
    }
    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        self.lock().report()
    }
    /// The container's tracker reports straight into `out` (the engine's trackers convert their
    /// bitmaps into its allocation).
    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        let r = self.lock().report_into(out);
        if r.is_err() {
            out.clear();
        }
        r
    }
    fn stop(&mut self) -> Result<(), DirtyError> {
        self.lock().stop()
    }
}

/// A vIOMMU translation shared by the devices behind it (the VMM's [`IovaTranslator`]).
#[derive(Clone)]
pub struct SharedTranslator(pub Arc<dyn IovaTranslator + Sync>);

impl std::fmt::Debug for SharedTranslator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedTranslator")
    }
}

impl SharedTranslator {
    /// Whether both are the same translation.
    pub fn same(&self, other: &SharedTranslator) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl IovaTranslator for SharedTranslator {
    fn translate(&self, iova: DirtyRange, out: &mut Vec<DirtyRange>) -> u64 {
        self.0.translate(iova, out)
    }
    fn iova_space(&self) -> RangeTable {
        self.0.iova_space()
    }
}

/// Whether a device sits behind a virtual IOMMU.
#[derive(Clone, Default)]
pub enum Viommu {
    /// No vIOMMU: device addresses are guest physical addresses.
    #[default]
    None,
    /// Behind a vIOMMU, with its translation: the device's dirty IOVA is reported as guest
    /// physical ranges (the engine's [`ViommuTracker`]).
    Translated(SharedTranslator),
    /// Behind a vIOMMU without a translation: migration is refused.
    Untranslated,
}

impl std::fmt::Debug for Viommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Viommu::None => "None",
            Viommu::Translated(_) => "Translated",
            Viommu::Untranslated => "Untranslated",
        })
    }
}

/// One device as the tracking sees it.
pub(crate) struct TrackedDevice<'a> {
    /// Cloud Hypervisor's device id.
    pub id: &'a str,
    /// The device.
    pub dev: &'a SharedDevice,
    /// The guest memory it can reach by DMA (guest physical).
    pub memory: RangeTable,
    /// What it offers.
    pub tracking: &'a Tracking,
    /// Its vIOMMU.
    pub viommu: &'a Viommu,
}

/// The guest memory of Cloud Hypervisor ranges.
pub fn memory_of(ranges: &[MemoryRange]) -> RangeTable {
    RangeTable::from_ranges(
        ranges
            .iter()
            .filter(|r| r.length > 0)
            .map(|r| DirtyRange::new(r.gpa, r.length)),
    )
}

/// A table in Cloud Hypervisor's type (same fields, sorted and coalesced).
pub fn to_memory_range_table(table: &RangeTable) -> MemoryRangeTable {
    let mut out = MemoryRangeTable::default();
    for r in table {
        out.push(MemoryRange {
            gpa: r.gpa,
            length: r.length,
        });
    }
    out
}

/// Refuse, before anything is touched, a group that no method can cover: some device without
/// DMA logging, some device without an IOMMU tracker, and all-dirty not allowed.
pub(crate) fn check_group(devices: &[TrackedDevice<'_>], allow_all_dirty: bool) -> Result<(), String> {
    let no_log: Vec<&str> = devices
        .iter()
        .filter(|d| d.tracking.device_log.is_none())
        .map(|d| d.id)
        .collect();
    let no_iommu: Vec<&str> = devices
        .iter()
        .filter(|d| d.tracking.container.is_none())
        .map(|d| d.id)
        .collect();
    if allow_all_dirty || no_log.is_empty() || no_iommu.is_empty() {
        return Ok(());
    }
    Err(format!(
        "no dirty page tracking covers the group: device DMA logging is missing on {}, IOMMU dirty \
         tracking on {}, and reporting all pages dirty is not allowed (GroupOptions::allow_all_dirty)",
        no_log.join(", "),
        no_iommu.join(", ")
    ))
}

/// Device DMA logging of one device of the group, the device lent to each call.
struct MemberLog {
    dev: SharedDevice,
    log: DeviceLog,
}

impl DirtyTracker for MemberLog {
    fn name(&self) -> &str {
        vfio_migration::dirty::device_log::DEVICE_LOG
    }
    fn page_size(&self) -> u64 {
        self.log.page_size().unwrap_or(0)
    }
    fn is_started(&self) -> bool {
        self.log.is_started()
    }
    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError> {
        self.log.start(&mut self.dev, memory)
    }
    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        self.log.report(&mut self.dev)
    }
    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        self.log.report_into(&mut self.dev, out)
    }
    fn stop(&mut self) -> Result<(), DirtyError> {
        self.log.stop(&mut self.dev)
    }
}

/// One tracker of a [`Union`] and the guest memory it covers.
struct Part {
    tracker: Box<dyn DirtyTracker>,
    memory: RangeTable,
    /// The part's last report, kept between rounds (its allocation is reused) when the union
    /// has several parts to merge.
    table: RangeTable,
}

impl Part {
    fn new(tracker: Box<dyn DirtyTracker>, memory: RangeTable) -> Self {
        Self {
            tracker,
            memory,
            table: RangeTable::new(),
        }
    }
}

/// Several trackers as one: each over its own part of the memory, reports merged. Any failure
/// fails the whole (a partial report is not "the rest is clean"); a failed start stops the
/// parts already started.
struct Union {
    name: String,
    parts: Vec<Part>,
    started: bool,
}

impl Union {
    fn stop_parts(&mut self) -> Result<(), DirtyError> {
        let mut first = None;
        for p in &mut self.parts {
            if p.tracker.is_started()
                && let Err(e) = p.tracker.stop()
            {
                log::warn!("{e}");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl DirtyTracker for Union {
    fn name(&self) -> &str {
        &self.name
    }
    fn page_size(&self) -> u64 {
        self.parts.iter().map(|p| p.tracker.page_size()).max().unwrap_or(0)
    }
    fn is_started(&self) -> bool {
        self.started
    }
    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError> {
        for i in 0..self.parts.len() {
            let p = &mut self.parts[i];
            let mine = p.memory.intersect(memory);
            if mine.is_empty() {
                continue;
            }
            if let Err(e) = p.tracker.start(&mine) {
                let _ = self.stop_parts();
                return Err(e);
            }
        }
        self.started = true;
        Ok(())
    }
    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        let mut out = RangeTable::new();
        self.report_into(&mut out)?;
        Ok(out)
    }
    /// One started part reports straight into `out`; several report each into its own table
    /// (kept between rounds), merged into `out`. A failing part fails the whole and clears `out`.
    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        let started = self.parts.iter().filter(|p| p.tracker.is_started()).count();
        if started <= 1 {
            let Some(p) = self.parts.iter_mut().find(|p| p.tracker.is_started()) else {
                out.clear();
                return Ok(());
            };
            let r = p.tracker.report_into(out);
            if r.is_err() {
                out.clear();
            }
            return r;
        }
        for p in self.parts.iter_mut().filter(|p| p.tracker.is_started()) {
            if let Err(e) = p.tracker.report_into(&mut p.table) {
                out.clear();
                return Err(e);
            }
        }
        let tables: Vec<&RangeTable> = self
            .parts
            .iter()
            .filter(|p| p.tracker.is_started())
            .map(|p| &p.table)
            .collect();
        RangeTable::merge_into(&tables, out);
        Ok(())
    }
    fn stop(&mut self) -> Result<(), DirtyError> {
        self.started = false;
        self.stop_parts()
    }
}

fn translated(tracker: Box<dyn DirtyTracker>, viommu: &Viommu) -> Box<dyn DirtyTracker> {
    match viommu {
        Viommu::Translated(t) => Box::new(ViommuTracker::new(tracker, t.clone())),
        _ => tracker,
    }
}

/// Device DMA logging on every device, or why not.
fn device_log_candidate(devices: &[TrackedDevice<'_>]) -> Result<Box<dyn DirtyTracker>, String> {
    let missing: Vec<&str> = devices
        .iter()
        .filter(|d| d.tracking.device_log.is_none())
        .map(|d| d.id)
        .collect();
    if !missing.is_empty() {
        return Err(format!("not available on {}", missing.join(", ")));
    }
    let parts = devices
        .iter()
        .filter_map(|d| {
            let config = d.tracking.device_log?;
            let log = MemberLog {
                dev: d.dev.clone(),
                log: DeviceLog::new(config),
            };
            Some(Part::new(translated(Box::new(log), d.viommu), d.memory.clone()))
        })
        .collect();
    Ok(Box::new(Union {
        name: "device-log".into(),
        parts,
        started: false,
    }))
}

/// The IOMMU trackers of the group's containers (each once), or why not.
fn iommu_candidate(devices: &[TrackedDevice<'_>]) -> Result<Box<dyn DirtyTracker>, String> {
    let missing: Vec<&str> = devices
        .iter()
        .filter(|d| d.tracking.container.is_none())
        .map(|d| d.id)
        .collect();
    if !missing.is_empty() {
        return Err(format!("not available on {}", missing.join(", ")));
    }
    // (container, its memory, its devices' vIOMMU, its first device)
    let mut containers: Vec<(ContainerTracker, RangeTable, &Viommu, &str)> = Vec::new();
    for d in devices {
        let Some(c) = &d.tracking.container else { continue };
        match containers.iter_mut().find(|(k, ..)| k.same(c)) {
            Some((_, memory, viommu, first)) => {
                let agree = match (&**viommu, d.viommu) {
                    (Viommu::None, Viommu::None) => true,
                    (Viommu::Translated(a), Viommu::Translated(b)) => a.same(b),
                    _ => false,
                };
                if !agree {
                    return Err(format!(
                        "{} and {} share container {} behind different vIOMMU translations",
                        first,
                        d.id,
                        c.name()
                    ));
                }
                memory.merge_in(&d.memory);
            }
            None => containers.push((c.clone(), d.memory.clone(), d.viommu, d.id)),
        }
    }
    let parts = containers
        .into_iter()
        .map(|(c, memory, viommu, _)| Part::new(translated(Box::new(c), viommu), memory))
        .collect();
    Ok(Box::new(Union {
        name: "iommu".into(),
        parts,
        started: false,
    }))
}

/// The candidates for [`select`](vfio_migration::dirty::select())(vfio_migration::dirty::select) over the group's devices.
pub(crate) fn candidates(devices: &[TrackedDevice<'_>]) -> Candidates<'static> {
    Candidates {
        device_log: device_log_candidate(devices),
        iommu: iommu_candidate(devices),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_migration::dirty::TrackErrorKind;

    #[test]
    fn tables_convert_to_cloud_hypervisors() {
        let t = memory_of(&[
            MemoryRange {
                gpa: 0x2000,
                length: 0x1000,
            },
            MemoryRange { gpa: 0, length: 0x1000 },
            MemoryRange {
                gpa: 0x1000,
                length: 0x1000,
            },
            MemoryRange { gpa: 0x9000, length: 0 },
        ]);
        let m = to_memory_range_table(&t);
        assert_eq!(m.regions(), &[MemoryRange { gpa: 0, length: 0x3000 }]);
    }

    /// A tracker that fails every start.
    struct Refuses;
    impl DirtyTracker for Refuses {
        fn name(&self) -> &str {
            "refuses"
        }
        fn page_size(&self) -> u64 {
            4096
        }
        fn is_started(&self) -> bool {
            false
        }
        fn start(&mut self, _: &RangeTable) -> Result<(), DirtyError> {
            Err(DirtyError::new(
                "refuses",
                vfio_migration::dirty::TrackOp::Start,
                TrackErrorKind::InvalidRequest("no".into()),
            ))
        }
        fn report(&mut self) -> Result<RangeTable, DirtyError> {
            unreachable!()
        }
        fn stop(&mut self) -> Result<(), DirtyError> {
            unreachable!()
        }
    }

    #[test]
    fn a_union_that_fails_to_start_stops_what_it_started() {
        let ok = ContainerTracker::new(vfio_migration::dirty::AllDirty::new());
        let mem = RangeTable::from_ranges([DirtyRange::new(0, 0x10000)]);
        let mut u = Union {
            name: "u".into(),
            parts: vec![
                Part::new(Box::new(ok.clone()), mem.clone()),
                Part::new(Box::new(Refuses), mem.clone()),
            ],
            started: false,
        };
        assert!(u.start(&mem).is_err());
        assert!(!ok.is_started(), "the part that started was stopped");
        assert!(!u.is_started());
    }

    /// A tracker whose reports follow a script (`Err`: that report fails with EIO); it reports
    /// into the table it is handed.
    struct Scripted {
        started: bool,
        script: Vec<Result<RangeTable, ()>>,
    }

    impl DirtyTracker for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn page_size(&self) -> u64 {
            4096
        }
        fn is_started(&self) -> bool {
            self.started
        }
        fn start(&mut self, _: &RangeTable) -> Result<(), DirtyError> {
            self.started = true;
            Ok(())
        }
        fn report(&mut self) -> Result<RangeTable, DirtyError> {
            let mut out = RangeTable::new();
            self.report_into(&mut out)?;
            Ok(out)
        }
        fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
            out.clear();
            match self.script.remove(0) {
                Ok(t) => {
                    t.iter().for_each(|r| out.push(*r));
                    Ok(())
                }
                Err(()) => Err(DirtyError::new(
                    "scripted",
                    vfio_migration::dirty::TrackOp::Report,
                    std::io::Error::from_raw_os_error(5),
                )),
            }
        }
        fn stop(&mut self) -> Result<(), DirtyError> {
            self.started = false;
            Ok(())
        }
    }

    fn table(spec: &[(u64, u64)]) -> RangeTable {
        RangeTable::from_ranges(spec.iter().map(|&(gpa, length)| DirtyRange::new(gpa, length)))
    }

    /// Where a table's ranges live and how many it holds without growing.
    fn allocation(t: &RangeTable) -> (*const DirtyRange, usize) {
        (t.as_slice().as_ptr(), t.capacity())
    }

    #[test]
    fn a_union_of_several_parts_reports_into_the_callers_table_and_its_own() {
        let mem_a = table(&[(0, 0x10_0000)]);
        let mem_b = table(&[(0x100_0000, 0x10_0000)]);
        let b = table(&[(0x100_3000, 0x1000), (0x100_9000, 0x3000)]);
        let script = vec![Ok(b.clone()), Ok(RangeTable::new()), Ok(b.clone()), Err(())];
        let mut u = Union {
            name: "u".into(),
            parts: vec![
                Part::new(
                    Box::new(ContainerTracker::new(vfio_migration::dirty::AllDirty::new())),
                    mem_a.clone(),
                ),
                Part::new(Box::new(Scripted { started: false, script }), mem_b.clone()),
                // Outside the tracked memory: never started, never asked.
                Part::new(Box::new(Refuses), table(&[(0x900_0000, 0x1000)])),
            ],
            started: false,
        };
        u.start(&RangeTable::merge(&[&mem_a, &mem_b])).unwrap();
        let mut out = RangeTable::with_capacity(16);
        let at = allocation(&out);
        let mut parts = None;
        for (round, want_b) in [&b, &RangeTable::new(), &b].into_iter().enumerate() {
            u.report_into(&mut out).unwrap();
            assert_eq!(out, RangeTable::merge(&[&mem_a, want_b]), "round {round}");
            assert_eq!(
                allocation(&out),
                at,
                "round {round}: the caller's table was reallocated"
            );
            let now: Vec<_> = u.parts[..2].iter().map(|p| allocation(&p.table)).collect();
            if round > 0 {
                assert_eq!(
                    Some(&now),
                    parts.as_ref(),
                    "round {round}: a part's table was reallocated"
                );
            }
            parts = Some(now);
        }
        // A failing part fails the whole, and nothing stale is left behind.
        let e = u.report_into(&mut out).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(5));
        assert!(out.is_empty());
        u.stop().unwrap();
    }

    #[test]
    fn a_union_of_one_started_part_reports_straight_into_the_callers_table() {
        let mem = table(&[(0, 0x10_0000)]);
        let one = table(&[(0x2000, 0x1000)]);
        let mut u = Union {
            name: "u".into(),
            parts: vec![
                Part::new(Box::new(Refuses), table(&[(0x900_0000, 0x1000)])),
                Part::new(
                    Box::new(Scripted {
                        started: false,
                        script: vec![Ok(one.clone()), Ok(one.clone()), Err(())],
                    }),
                    mem.clone(),
                ),
            ],
            started: false,
        };
        u.start(&mem).unwrap();
        let mut out = table(&[(0x500_0000, 0x1000), (0x600_0000, 0x1000)]);
        let at = allocation(&out);
        for round in 0..2 {
            u.report_into(&mut out).unwrap();
            assert_eq!(out, one, "round {round}");
            assert_eq!(allocation(&out), at, "round {round}");
        }
        assert!(u.parts[1].table.capacity() == 0, "no table of its own");
        assert_eq!(u.report_into(&mut out).unwrap_err().raw_os_error(), Some(5));
        assert!(out.is_empty());
    }

    #[test]
    fn device_logging_reports_into_the_callers_table() {
        use vfio_migration::dirty::{DeviceLog, DeviceLogConfig};
        use vfio_migration::emulated::EmulatedDevice;
        let dev = EmulatedDevice::from_spec("size=64K").unwrap();
        let h = dev.handle();
        let mut m = MemberLog {
            dev: SharedDevice::new(Box::new(dev)),
            log: DeviceLog::new(DeviceLogConfig::default()),
        };
        // Room for what the bitmap conversion reserves (a few dozen ranges per marked word).
        let mut out = RangeTable::with_capacity(1024);
        let e = m.report_into(&mut out).unwrap_err();
        assert!(matches!(e.kind, TrackErrorKind::NotStarted), "{e}");
        let memory = table(&[(0, 0x10_0000), (0x20_0000, 0x10_0000)]);
        m.start(&memory).unwrap();
        let at = allocation(&out);
        let rounds: [&[(u64, u64)]; 3] = [&[(0x3000, 0x2000)], &[(0x1_0000, 0x1000), (0x20_5000, 0x800)], &[]];
        for (round, writes) in rounds.into_iter().enumerate() {
            for &(iova, len) in writes {
                h.dma_write(iova, len).unwrap();
            }
            m.report_into(&mut out).unwrap();
            let want = RangeTable::from_ranges(
                writes
                    .iter()
                    .map(|&(gpa, len)| DirtyRange::new(gpa, len).align_out(4096)),
            );
            assert_eq!(out, want, "round {round}");
            assert_eq!(
                allocation(&out),
                at,
                "round {round}: the caller's table was reallocated"
            );
        }
        m.stop().unwrap();
        out.push(DirtyRange::new(0, 0x1000));
        assert!(m.report_into(&mut out).is_err());
        assert!(out.is_empty(), "a failed report leaves no stale ranges behind");
    }
}
