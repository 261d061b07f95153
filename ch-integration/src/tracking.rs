//! Dirty page tracking for one device: which guest memory did it write.
//!
//! PLACEHOLDER SEAM: `vfio_migration::dirty` (trackers for device DMA logging, the type1
//! container, iommufd and all-dirty, with range tables) is being written on the `dirty` branch.
//! Until it is on main this module keeps the tracking behind the small [`DirtyTracker`] trait with
//! two implementations: [`AllDirty`] (every DMA-reachable page, every time) and [`DeviceDmaLog`]
//! (the device's own DMA logging through [`MigrationDevice`]). To wire: implement
//! [`DirtyTracker`] for the engine's tracker trait objects (device log, type1 container and iommufd
//! HWPT trackers, with one container-level tracker shared by the devices of a container so IOMMU
//! dirty pages are reported once per container), and let [`Tracking`] choose them the way QEMU
//! does (device logging if every device has it, else the IOMMU, else all-dirty if allowed).

use std::sync::{Arc, Mutex};

use vfio_migration::device::{DeviceError, DmaRange, ErrorKind, MigrationDevice, Operation};
use vm_migration::protocol::{MemoryRange, MemoryRangeTable};

/// Largest dirty bitmap read per range (words): 2^24 words = 128 MiB = 4 TiB of 4 KiB pages.
pub const MAX_BITMAP_WORDS: u64 = 1 << 24;

/// A source of the guest memory a device wrote.
pub trait DirtyTracker: Send {
    /// The method's name for messages ("device DMA logging", "all pages dirty", ...).
    fn method(&self) -> &str;

    /// Whether it reports only written pages (false: it reports everything, every time).
    fn precise(&self) -> bool;

    /// Start tracking.
    fn start(&mut self, dev: &mut dyn MigrationDevice) -> Result<(), DeviceError>;

    /// The ranges written since the last report (or the start), in device addresses (IOVA).
    fn report(&mut self, dev: &mut dyn MigrationDevice) -> Result<MemoryRangeTable, DeviceError>;

    /// Stop tracking.
    fn stop(&mut self, dev: &mut dyn MigrationDevice) -> Result<(), DeviceError>;
}

/// Every DMA-reachable page is reported dirty on every query (QEMU's fallback; must be allowed
/// explicitly, see [`crate::GroupOptions::allow_all_dirty`]).
#[derive(Clone, Debug)]
pub struct AllDirty {
    ranges: Vec<MemoryRange>,
}

impl AllDirty {
    /// All of `ranges`, always.
    pub fn new(ranges: Vec<MemoryRange>) -> Self {
        Self { ranges }
    }
}

impl DirtyTracker for AllDirty {
    fn method(&self) -> &str {
        "all pages dirty"
    }
    fn precise(&self) -> bool {
        false
    }
    fn start(&mut self, _dev: &mut dyn MigrationDevice) -> Result<(), DeviceError> {
        Ok(())
    }
    fn report(&mut self, _dev: &mut dyn MigrationDevice) -> Result<MemoryRangeTable, DeviceError> {
        let mut t = MemoryRangeTable::default();
        for r in &self.ranges {
            t.push(*r);
        }
        Ok(t)
    }
    fn stop(&mut self, _dev: &mut dyn MigrationDevice) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// The device's own DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`).
#[derive(Clone, Debug)]
pub struct DeviceDmaLog {
    ranges: Vec<DmaRange>,
    page_size: u64,
    negotiated: Option<u64>,
}

impl DeviceDmaLog {
    /// Log `ranges` (device addresses) with the requested `page_size` (the device may choose
    /// another; the one it chose is used for reports).
    pub fn new(ranges: &[MemoryRange], page_size: u64) -> Self {
        Self {
            ranges: ranges
                .iter()
                .filter(|r| r.length > 0)
                .map(|r| DmaRange {
                    iova: r.gpa,
                    length: r.length,
                })
                .collect(),
            page_size,
            negotiated: None,
        }
    }
}

impl DirtyTracker for DeviceDmaLog {
    fn method(&self) -> &str {
        "device DMA logging"
    }
    fn precise(&self) -> bool {
        true
    }
    fn start(&mut self, dev: &mut dyn MigrationDevice) -> Result<(), DeviceError> {
        if self.negotiated.is_some() || self.ranges.is_empty() {
            return Ok(());
        }
        let ps = dev.dma_log_start(&self.ranges, self.page_size)?;
        if !ps.is_power_of_two() || ps < 4096 {
            let _ = dev.dma_log_stop();
            return Err(DeviceError::new(
                dev.name(),
                Operation::DmaLogStart,
                ErrorKind::InvalidAnswer(format!("page size {ps} is not a power of two >= 4096")),
            ));
        }
        self.negotiated = Some(ps);
        Ok(())
    }
    fn report(&mut self, dev: &mut dyn MigrationDevice) -> Result<MemoryRangeTable, DeviceError> {
        let Some(ps) = self.negotiated else {
            return Ok(MemoryRangeTable::default());
        };
        let mut tables = Vec::with_capacity(self.ranges.len());
        for r in &self.ranges {
            let words = r.length.div_ceil(ps).div_ceil(64);
            if words > MAX_BITMAP_WORDS {
                return Err(DeviceError::new(
                    dev.name(),
                    Operation::DmaLogReport,
                    ErrorKind::InvalidRequest(format!(
                        "range {:#x}+{:#x} needs a {words}-word bitmap (limit {MAX_BITMAP_WORDS})",
                        r.iova, r.length
                    )),
                ));
            }
            let mut bitmap = vec![0u64; words as usize];
            dev.dma_log_report(r.iova, r.length, ps, &mut bitmap)?;
            tables.push(MemoryRangeTable::from_dirty_bitmap(bitmap, r.iova, ps));
        }
        Ok(MemoryRangeTable::new_from_tables(tables))
    }
    fn stop(&mut self, dev: &mut dyn MigrationDevice) -> Result<(), DeviceError> {
        if self.negotiated.take().is_some() {
            dev.dma_log_stop()?;
        }
        Ok(())
    }
}

/// Dirty tracking done by an IOMMU for a whole container (a type1 container or an iommufd
/// hardware page table): it sees the DMA of every device attached to it.
pub trait ContainerDirty: Send {
    /// The method's name for messages.
    fn method(&self) -> &str;
    /// Whether it reports only written pages (type1 behind a real IOMMU reports everything).
    fn precise(&self) -> bool;
    /// Start tracking.
    fn start(&mut self) -> Result<(), DeviceError>;
    /// The ranges written since the last report, in IOVA.
    fn report(&mut self) -> Result<MemoryRangeTable, DeviceError>;
    /// Stop tracking.
    fn stop(&mut self) -> Result<(), DeviceError>;
}

struct ContainerState {
    tracker: Box<dyn ContainerDirty>,
    members: usize,
    started: usize,
}

/// One container-level tracker shared by the devices of the container: started with the first
/// device, stopped with the last, and its dirty pages reported once per query round, through the
/// first device handed out ([`ContainerTracker::for_device`]), not once per device.
#[derive(Clone)]
pub struct ContainerTracker {
    state: Arc<Mutex<ContainerState>>,
}

impl std::fmt::Debug for ContainerTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("ContainerTracker")
            .field("method", &s.tracker.method())
            .field("members", &s.members)
            .field("started", &s.started)
            .finish()
    }
}

impl ContainerTracker {
    /// Share `tracker`.
    pub fn new(tracker: Box<dyn ContainerDirty>) -> Self {
        Self {
            state: Arc::new(Mutex::new(ContainerState {
                tracker,
                members: 0,
                started: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ContainerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tracker of one device of the container (for [`Tracking::Custom`]).
    pub fn for_device(&self) -> Box<dyn DirtyTracker> {
        let mut s = self.lock();
        let reporter = s.members == 0;
        s.members += 1;
        let method = format!("{} (container)", s.tracker.method());
        Box::new(ContainerMember {
            shared: self.clone(),
            reporter,
            started: false,
            method,
        })
    }
}

struct ContainerMember {
    shared: ContainerTracker,
    reporter: bool,
    started: bool,
    method: String,
}

impl DirtyTracker for ContainerMember {
    fn method(&self) -> &str {
        &self.method
    }
    fn precise(&self) -> bool {
        self.shared.lock().tracker.precise()
    }
    fn start(&mut self, _dev: &mut dyn MigrationDevice) -> Result<(), DeviceError> {
        if self.started {
            return Ok(());
        }
        let mut s = self.shared.lock();
        if s.started == 0 {
            s.tracker.start()?;
        }
        s.started += 1;
        self.started = true;
        Ok(())
    }
    fn report(&mut self, _dev: &mut dyn MigrationDevice) -> Result<MemoryRangeTable, DeviceError> {
        if !self.reporter || !self.started {
            return Ok(MemoryRangeTable::default());
        }
        self.shared.lock().tracker.report()
    }
    fn stop(&mut self, _dev: &mut dyn MigrationDevice) -> Result<(), DeviceError> {
        if !self.started {
            return Ok(());
        }
        self.started = false;
        let mut s = self.shared.lock();
        s.started = s.started.saturating_sub(1);
        if s.started == 0 {
            s.tracker.stop()?;
        }
        Ok(())
    }
}

/// How a device's dirty pages are found.
pub enum Tracking {
    /// The device's DMA logging with this page size.
    DeviceLog {
        /// The requested page size (4096 usually).
        page_size: u64,
    },
    /// A tracker of the caller's choice (IOMMU, container-level...).
    Custom(Box<dyn DirtyTracker>),
    /// No tracking: all pages dirty, only when [`crate::GroupOptions::allow_all_dirty`].
    None,
}

impl std::fmt::Debug for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tracking::DeviceLog { page_size } => write!(f, "DeviceLog {{ page_size: {page_size} }}"),
            Tracking::Custom(t) => write!(f, "Custom({})", t.method()),
            Tracking::None => f.write_str("None"),
        }
    }
}

/// Translates device addresses (IOVA) into guest physical addresses for a device behind a
/// virtual IOMMU.
pub trait IovaTranslation: Send + Sync {
    /// The guest physical ranges behind `[iova, iova + length)` (empty when unmapped).
    fn to_gpa(&self, iova: u64, length: u64) -> Vec<MemoryRange>;
}

/// Whether a device sits behind a virtual IOMMU.
#[derive(Clone, Default)]
pub enum Viommu {
    /// No vIOMMU: device addresses are guest physical addresses.
    #[default]
    None,
    /// Behind a vIOMMU, with the translation for dirty ranges.
    Translated(Arc<dyn IovaTranslation>),
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

/// Map a table of device addresses to guest physical addresses.
pub fn translate(table: MemoryRangeTable, viommu: &Viommu) -> MemoryRangeTable {
    match viommu {
        Viommu::Translated(t) => {
            let mut out = MemoryRangeTable::default();
            for r in table.regions() {
                for g in t.to_gpa(r.gpa, r.length) {
                    out.push(g);
                }
            }
            out
        }
        _ => table,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_migration::device::{DeviceIdentity, TransferSession};
    use vfio_migration::state::{DeviceState, MigrationFlags};

    #[derive(Default)]
    struct Counting {
        starts: Arc<Mutex<(u32, u32, u32)>>,
    }

    impl ContainerDirty for Counting {
        fn method(&self) -> &str {
            "test iommu"
        }
        fn precise(&self) -> bool {
            true
        }
        fn start(&mut self) -> Result<(), DeviceError> {
            self.starts.lock().unwrap().0 += 1;
            Ok(())
        }
        fn report(&mut self) -> Result<MemoryRangeTable, DeviceError> {
            self.starts.lock().unwrap().1 += 1;
            Ok(MemoryRangeTable::from_dirty_bitmap([1u64], 0x1000, 0x1000))
        }
        fn stop(&mut self) -> Result<(), DeviceError> {
            self.starts.lock().unwrap().2 += 1;
            Ok(())
        }
    }

    /// A device that is never touched by a container tracker.
    struct Untouched;
    impl MigrationDevice for Untouched {
        fn name(&self) -> &str {
            "untouched"
        }
        fn identity(&self) -> DeviceIdentity {
            DeviceIdentity::Unknown
        }
        fn flags(&self) -> Result<MigrationFlags, DeviceError> {
            unreachable!()
        }
        fn state(&self) -> Result<DeviceState, DeviceError> {
            unreachable!()
        }
        fn set_state(&mut self, _: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
            unreachable!()
        }
        fn stop_copy_size(&self) -> Result<u64, DeviceError> {
            unreachable!()
        }
        fn reset(&mut self) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn dma_log_start(&mut self, _: &[DmaRange], _: u64) -> Result<u64, DeviceError> {
            unreachable!()
        }
        fn dma_log_report(&mut self, _: u64, _: u64, _: u64, _: &mut [u64]) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
            unreachable!()
        }
    }

    #[test]
    fn a_container_is_started_once_reported_once_and_stopped_with_the_last_device() {
        let c = Counting::default();
        let counts = c.starts.clone();
        let shared = ContainerTracker::new(Box::new(c));
        let mut ts: Vec<Box<dyn DirtyTracker>> = (0..3).map(|_| shared.for_device()).collect();
        let mut dev = Untouched;
        for t in &mut ts {
            t.start(&mut dev).unwrap();
            t.start(&mut dev).unwrap();
        }
        assert_eq!(*counts.lock().unwrap(), (1, 0, 0));
        let total: u64 = ts
            .iter_mut()
            .map(|t| t.report(&mut dev).unwrap().effective_size())
            .sum();
        assert_eq!(total, 0x1000, "reported once, not once per device");
        assert_eq!(counts.lock().unwrap().1, 1);
        ts[0].stop(&mut dev).unwrap();
        ts[2].stop(&mut dev).unwrap();
        assert_eq!(counts.lock().unwrap().2, 0);
        ts[1].stop(&mut dev).unwrap();
        ts[1].stop(&mut dev).unwrap();
        assert_eq!(*counts.lock().unwrap(), (1, 1, 1));
        assert!(ts[0].precise());
    }

    #[test]
    fn all_dirty_and_translation() {
        struct Shift;
        impl IovaTranslation for Shift {
            fn to_gpa(&self, iova: u64, length: u64) -> Vec<MemoryRange> {
                vec![MemoryRange {
                    gpa: iova + 0x10000,
                    length,
                }]
            }
        }
        let mut a = AllDirty::new(vec![MemoryRange { gpa: 0, length: 0x2000 }]);
        let t = a.report(&mut Untouched).unwrap();
        assert!(!a.precise());
        let t = translate(t, &Viommu::Translated(Arc::new(Shift)));
        assert_eq!(
            t.regions(),
            &[MemoryRange {
                gpa: 0x10000,
                length: 0x2000
            }]
        );
    }
}
