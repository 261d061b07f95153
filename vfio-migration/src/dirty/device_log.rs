//! Device DMA logging: the device itself records the pages it writes.
//!
//! [`DeviceLogTracker`] drives `VFIO_DEVICE_FEATURE_DMA_LOGGING_START/REPORT/STOP` through
//! [`MigrationDevice`] on one or several devices:
//! - **ranges**: the guest memory map, widened to whole pages; when a device refuses the count
//!   (E2BIG; the kernel only guarantees PAGE_SIZE/16 = 256 ranges), the ranges are merged
//!   filling the smallest gaps first ([`RangeTable::coarsen`]) and START is tried again with
//!   half as many, down to one;
//! - **page size**: the requested size is offered, the device's answer is used for its reports
//!   (it must be a power of two);
//! - **reports**: one REPORT per memory range (never over the gaps a merge filled), split in
//!   chunks so the bitmap never exceeds [`DeviceLogConfig::bitmap_cap`]; the bitmap is zeroed
//!   before each REPORT (the device only sets bits) and converted with
//!   [`RangeTable::extend_from_bitmap_clamped`]; the tables of all devices are merged.
//!
//! Any failed REPORT fails the whole report (REPORT reads *and clears*: a partial answer is not
//! "the rest is clean"). Wrap the tracker in a [`super::PolicyTracker`] to choose between failing
//! the migration and degrading to all-dirty.

use std::ops::DerefMut;

use super::{DirtyError, DirtyRange, DirtyTracker, RangeTable, TrackErrorKind, TrackOp};
use crate::device::{DmaRange, MigrationDevice};

/// The name [`DeviceLogTracker`] uses in messages.
pub const DEVICE_LOG: &str = "device-log";

/// Settings of a [`DeviceLogTracker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLogConfig {
    /// The page size asked for (a power of two; the device may choose another).
    pub page_size: u64,
    /// The most ranges offered to START; fewer are tried on E2BIG.
    pub max_ranges: usize,
    /// The largest bitmap of one REPORT, in bytes (at least 8); larger ranges are read in
    /// chunks.
    pub bitmap_cap: usize,
}

impl Default for DeviceLogConfig {
    /// 4 KiB pages, 256 ranges (PAGE_SIZE/16, what the kernel guarantees), 4 MiB bitmaps (one
    /// REPORT covers 128 GiB of 4 KiB pages).
    fn default() -> Self {
        Self {
            page_size: 4096,
            max_ranges: 256,
            bitmap_cap: 4 << 20,
        }
    }
}

/// One device's DMA logging, with the device lent to each call: for owners that keep the device
/// themselves (a device group, a VMM's device manager). [`DeviceLogTracker`] is this plus the
/// devices.
#[derive(Clone, Debug)]
pub struct DeviceLog {
    config: DeviceLogConfig,
    /// The page size the device chose; `None` while not logging.
    page_size: Option<u64>,
    /// The ranges START accepted.
    ranges: Vec<DmaRange>,
    /// The memory tracked (reports stay inside it).
    memory: Option<RangeTable>,
    /// The memory widened to whole pages: what REPORT reads.
    aligned: RangeTable,
    /// Whether the memory is made of whole pages (`aligned` is the memory): the pages read are
    /// then the report, without cutting.
    whole_pages: bool,
    /// The pages read, kept between rounds, when they must be cut to the memory.
    pages: RangeTable,
    scratch: Vec<u64>,
}

impl DeviceLog {
    /// Not logging yet.
    pub fn new(config: DeviceLogConfig) -> Self {
        Self {
            config,
            page_size: None,
            ranges: Vec::new(),
            memory: None,
            aligned: RangeTable::new(),
            whole_pages: false,
            pages: RangeTable::new(),
            scratch: Vec::new(),
        }
    }

    /// Whether the device logs.
    pub fn is_started(&self) -> bool {
        self.page_size.is_some()
    }

    /// The page size the device chose (None while not logging).
    pub fn page_size(&self) -> Option<u64> {
        self.page_size
    }

    /// The ranges the device accepted at START (empty while not logging).
    pub fn logged_ranges(&self) -> &[DmaRange] {
        &self.ranges
    }

    fn check_config(&self) -> Result<(), DirtyError> {
        let c = &self.config;
        let bad = |why: String| DirtyError::new(DEVICE_LOG, TrackOp::Start, TrackErrorKind::InvalidRequest(why));
        if !c.page_size.is_power_of_two() {
            return Err(bad(format!("page size {:#x} is not a power of two", c.page_size)));
        }
        if c.bitmap_cap < 8 || c.max_ranges == 0 {
            return Err(bad("bitmap cap below 8 bytes or no range allowed".into()));
        }
        Ok(())
    }

    /// Start logging writes of `device` to `memory`: START with the memory map widened to pages,
    /// merged over its smallest gaps to at most [`DeviceLogConfig::max_ranges`] ranges and to
    /// half as many each time the device answers E2BIG.
    pub fn start<M>(&mut self, device: &mut M, memory: &RangeTable) -> Result<(), DirtyError>
    where
        M: MigrationDevice + ?Sized,
    {
        if self.is_started() {
            return Err(DirtyError::new(
                DEVICE_LOG,
                TrackOp::Start,
                TrackErrorKind::AlreadyStarted,
            ));
        }
        self.check_config()?;
        if memory.is_empty() {
            return Err(DirtyError::new(
                DEVICE_LOG,
                TrackOp::Start,
                TrackErrorKind::InvalidRequest("no memory to track".into()),
            ));
        }
        let aligned = memory.align_out(self.config.page_size);
        if let Some(r) = aligned.iter().find(|r| r.end() == u64::MAX) {
            return Err(DirtyError::new(
                DEVICE_LOG,
                TrackOp::Start,
                TrackErrorKind::InvalidRange {
                    range: *r,
                    reason: "reaches the end of the address space".into(),
                },
            ));
        }
        let mut max = self.config.max_ranges.min(aligned.len()).max(1);
        loop {
            let ranges: Vec<DmaRange> = aligned
                .coarsen(max)
                .iter()
                .map(|r| DmaRange {
                    iova: r.gpa,
                    length: r.length,
                })
                .collect();
            match device.dma_log_start(&ranges, self.config.page_size) {
                Ok(ps) if ps.is_power_of_two() => {
                    if ps != self.config.page_size {
                        log::info!(
                            "{}: DMA logging page size {ps:#x} instead of {:#x}",
                            device.name(),
                            self.config.page_size
                        );
                    }
                    self.page_size = Some(ps);
                    self.ranges = ranges;
                    self.whole_pages = aligned == *memory;
                    self.aligned = aligned;
                    self.memory = Some(memory.clone());
                    return Ok(());
                }
                Ok(ps) => {
                    let _ = device.dma_log_stop();
                    return Err(DirtyError::new(
                        DEVICE_LOG,
                        TrackOp::Start,
                        TrackErrorKind::InvalidAnswer(format!(
                            "{}: DMA logging page size {ps:#x} is not a power of two",
                            device.name()
                        )),
                    ));
                }
                Err(e) if e.raw_os_error() == Some(libc::E2BIG) && max > 1 => {
                    log::info!(
                        "{}: DMA logging refuses {max} ranges, trying {}",
                        device.name(),
                        max / 2
                    );
                    max /= 2;
                }
                Err(e) => return Err(DirtyError::new(DEVICE_LOG, TrackOp::Start, e)),
            }
        }
    }

    /// Read and clear the device's log: one REPORT per memory range (in chunks of at most
    /// [`DeviceLogConfig::bitmap_cap`] bytes of bitmap, zeroed first), cut to the memory.
    pub fn report<M>(&mut self, device: &mut M) -> Result<RangeTable, DirtyError>
    where
        M: MigrationDevice + ?Sized,
    {
        let mut out = RangeTable::new();
        self.report_into(device, &mut out)?;
        Ok(out)
    }

    /// [`report`](Self::report) into `out` (its ranges replaced, its allocation kept): the
    /// bitmaps are converted straight into `out` when the memory is made of whole pages, else
    /// into a table kept between rounds and cut to the memory into `out`. On failure `out` is
    /// cleared and the error returned.
    pub fn report_into<M>(&mut self, device: &mut M, out: &mut RangeTable) -> Result<(), DirtyError>
    where
        M: MigrationDevice + ?Sized,
    {
        let (Some(ps), Some(memory)) = (self.page_size, self.memory.as_ref()) else {
            out.clear();
            return Err(DirtyError::new(DEVICE_LOG, TrackOp::Report, TrackErrorKind::NotStarted));
        };
        let cap_words = (self.config.bitmap_cap / 8) as u64;
        let mut read = |pages: &mut RangeTable, scratch: &mut Vec<u64>| -> Result<(), DirtyError> {
            pages.clear();
            // A chunk is a whole number of bitmap words so chunks line up with pages.
            let chunk_len = cap_words.saturating_mul(64).saturating_mul(ps);
            for r in self.aligned.iter() {
                let mut at = r.gpa;
                while at < r.end() {
                    let len = chunk_len.min(r.end() - at);
                    let words = len.div_ceil(ps).div_ceil(64).min(cap_words) as usize;
                    if scratch.len() < words {
                        scratch.resize(words, 0);
                    }
                    let bitmap = &mut scratch[..words];
                    bitmap.fill(0);
                    device
                        .dma_log_report(at, len, ps, bitmap)
                        .map_err(|e| DirtyError::new(DEVICE_LOG, TrackOp::Report, e))?;
                    pages.extend_from_bitmap_clamped(bitmap, at, ps, at + len);
                    at += len;
                }
            }
            Ok(())
        };
        let result = if self.whole_pages {
            read(out, &mut self.scratch)
        } else {
            // Pages are reported whole: cut what lies outside guest memory.
            let r = read(&mut self.pages, &mut self.scratch);
            if r.is_ok() {
                self.pages.intersect_into(memory, out);
            }
            r
        };
        if result.is_err() {
            out.clear();
        }
        result
    }

    /// Stop logging.
    pub fn stop<M>(&mut self, device: &mut M) -> Result<(), DirtyError>
    where
        M: MigrationDevice + ?Sized,
    {
        if self.page_size.take().is_none() {
            return Err(DirtyError::new(DEVICE_LOG, TrackOp::Stop, TrackErrorKind::NotStarted));
        }
        self.ranges.clear();
        self.memory = None;
        self.aligned = RangeTable::new();
        self.pages = RangeTable::new();
        self.scratch = Vec::new();
        device
            .dma_log_stop()
            .map_err(|e| DirtyError::new(DEVICE_LOG, TrackOp::Stop, e))
    }
}

#[derive(Debug)]
struct Logged<D> {
    device: D,
    log: DeviceLog,
    /// The device's last report, kept between rounds (several devices: merged into the caller's
    /// table).
    table: RangeTable,
}

/// Dirty tracking by device DMA logging over one or several devices.
///
/// `D` is any mutable handle to a device: `&mut dyn MigrationDevice`, `Box<dyn
/// MigrationDevice>`, `&mut KernelDevice`... (Owners that lend the device per call use
/// [`DeviceLog`] directly.)
#[derive(Debug)]
pub struct DeviceLogTracker<D> {
    devices: Vec<Logged<D>>,
    /// The memory being tracked.
    memory: Option<RangeTable>,
}

impl<D> DeviceLogTracker<D>
where
    D: DerefMut + Send,
    D::Target: MigrationDevice,
{
    /// A tracker over `devices` (not started).
    pub fn new(devices: impl IntoIterator<Item = D>, config: DeviceLogConfig) -> Self {
        Self {
            devices: devices
                .into_iter()
                .map(|device| Logged {
                    device,
                    log: DeviceLog::new(config),
                    table: RangeTable::new(),
                })
                .collect(),
            memory: None,
        }
    }

    /// The devices' names.
    pub fn device_names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.device.name().to_string()).collect()
    }

    /// The ranges each device accepted at START (empty before start).
    pub fn logged_ranges(&self) -> Vec<(String, Vec<DmaRange>)> {
        self.devices
            .iter()
            .map(|d| (d.device.name().to_string(), d.log.logged_ranges().to_vec()))
            .collect()
    }

    /// The page size each device chose (None before start).
    pub fn device_page_sizes(&self) -> Vec<(String, Option<u64>)> {
        self.devices
            .iter()
            .map(|d| (d.device.name().to_string(), d.log.page_size()))
            .collect()
    }

    /// Device `index`, for the other work on it while it logs (state changes, say).
    pub fn device_mut(&mut self, index: usize) -> Option<&mut D> {
        self.devices.get_mut(index).map(|d| &mut d.device)
    }

    /// The device handles back (stop first).
    pub fn into_devices(self) -> Vec<D> {
        self.devices.into_iter().map(|d| d.device).collect()
    }

    fn error(&self, op: TrackOp, kind: impl Into<TrackErrorKind>) -> DirtyError {
        DirtyError::new(DEVICE_LOG, op, kind)
    }

    /// Stop every device that logs; the first failure is returned after trying all.
    fn stop_all(&mut self) -> Result<(), DirtyError> {
        let mut first = None;
        for d in &mut self.devices {
            if d.log.is_started()
                && let Err(e) = d.log.stop(&mut *d.device)
            {
                log::warn!("{e}");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl<D> DirtyTracker for DeviceLogTracker<D>
where
    D: DerefMut + Send,
    D::Target: MigrationDevice,
{
    fn name(&self) -> &str {
        DEVICE_LOG
    }

    /// The coarsest page size the devices chose (the granularity of the merged report).
    fn page_size(&self) -> u64 {
        self.devices.iter().filter_map(|d| d.log.page_size()).max().unwrap_or(0)
    }

    fn is_started(&self) -> bool {
        self.memory.is_some()
    }

    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError> {
        if self.memory.is_some() {
            return Err(self.error(TrackOp::Start, TrackErrorKind::AlreadyStarted));
        }
        if self.devices.is_empty() {
            return Err(self.error(TrackOp::Start, TrackErrorKind::InvalidRequest("no device".into())));
        }
        for i in 0..self.devices.len() {
            let d = &mut self.devices[i];
            if let Err(e) = d.log.start(&mut *d.device, memory) {
                // Leave no device logging behind.
                let _ = self.stop_all();
                return Err(e);
            }
        }
        self.memory = Some(memory.clone());
        Ok(())
    }

    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        super::tracker::report_by_into(self)
    }

    /// One device: its log converted straight into `out`. Several: each into its own table
    /// (kept between rounds), merged into `out`.
    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        if self.memory.is_none() {
            out.clear();
            return Err(self.error(TrackOp::Report, TrackErrorKind::NotStarted));
        }
        if let [one] = self.devices.as_mut_slice() {
            return one.log.report_into(&mut *one.device, out);
        }
        for d in &mut self.devices {
            if let Err(e) = d.log.report_into(&mut *d.device, &mut d.table) {
                out.clear();
                return Err(e);
            }
        }
        let tables: Vec<&RangeTable> = self.devices.iter().map(|d| &d.table).collect();
        RangeTable::merge_into(&tables, out);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.memory.take().is_none() {
            return Err(self.error(TrackOp::Stop, TrackErrorKind::NotStarted));
        }
        self.stop_all()
    }
}

/// A DMA range as a [`DirtyRange`].
impl From<DmaRange> for DirtyRange {
    fn from(r: DmaRange) -> Self {
        DirtyRange::new(r.iova, r.length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::fake::FakeLogDevice;
    use crate::dirty::{Policy, PolicyTracker};

    const K4: u64 = 4096;

    fn memory() -> RangeTable {
        RangeTable::from_ranges([
            DirtyRange::new(0, 0x10_0000),
            DirtyRange::new(0x20_0000, 0x10_0000),
            DirtyRange::new(0x1_0000_0000, 0x40_0000),
        ])
    }

    fn pages(t: &RangeTable) -> Vec<u64> {
        t.iter().flat_map(|r| (r.gpa..r.end()).step_by(K4 as usize)).collect()
    }

    #[test]
    fn reports_written_pages_once() {
        let mut dev = FakeLogDevice::new("dev-a");
        let mut t = DeviceLogTracker::new([&mut dev], DeviceLogConfig::default());
        t.start(&memory()).unwrap();
        assert_eq!(t.page_size(), K4);
        assert_eq!(t.report().unwrap(), RangeTable::new());
        for addr in [
            0x1234,
            0x2000,
            0x20_0000 + 5,
            0x1_0000_0000 + 0x3f_ffff,
            0x1_0000_0000 + 64 * K4,
        ] {
            t.devices[0].device.dma_write(addr);
        }
        let got = t.report().unwrap();
        assert_eq!(
            pages(&got),
            vec![
                0x1000,
                0x2000,
                0x20_0000,
                0x1_0000_0000 + 64 * K4,
                0x1_0000_0000 + 0x3f_f000
            ]
        );
        assert_eq!(got.len(), 4, "0x1000 and 0x2000 coalesce: {got:?}");
        // REPORT clears: nothing the second time, and stale bits never leak.
        assert!(t.report().unwrap().is_empty());
        t.stop().unwrap();
        assert!(t.devices[0].device.logging.is_none());
    }

    #[test]
    fn reports_into_the_same_table_every_round() {
        use crate::dirty::tracker::report_reusing;
        // Whole pages (converted straight into the table), memory cut inside pages (converted
        // apart, cut into the table), and two devices (merged into the table).
        let ragged = RangeTable::from_ranges([DirtyRange::new(0x100, 0x10_0000), DirtyRange::new(0x20_0000, 0x800)]);
        for (memory, devices) in [(memory(), 1), (ragged, 1), (memory(), 2)] {
            let mut devs: Vec<FakeLogDevice> = (0..devices).map(|i| FakeLogDevice::new(&format!("dev-{i}"))).collect();
            let mut t = DeviceLogTracker::new(devs.iter_mut(), DeviceLogConfig::default());
            t.start(&memory).unwrap();
            let mut out = RangeTable::with_capacity(1024);
            for round in 0..4u64 {
                let mut want = Vec::new();
                for (i, addr) in [
                    0x3000 + round * K4,
                    0x20_0000 + 0x400,
                    0x1_0000_0000 + (round + 7) * 3 * K4,
                ]
                .into_iter()
                .enumerate()
                {
                    t.device_mut(i % devices).unwrap().dma_write(addr);
                    want.push(DirtyRange::new(addr & !(K4 - 1), K4));
                }
                let want = RangeTable::from_ranges(want).intersect(&memory);
                assert_eq!(
                    report_reusing(&mut t, &mut out),
                    want,
                    "round {round}, {devices} device(s)"
                );
            }
            t.stop().unwrap();
        }
    }

    #[test]
    fn too_many_ranges_are_merged_over_the_smallest_gaps() {
        // 10 ranges, the device takes at most 3: START is retried with 5, then 2... no: 10, 5, 2.
        let memory = RangeTable::from_ranges((0..10u64).map(|i| {
            let gap = if i % 3 == 0 { 0x100_0000 } else { 0x1000 };
            DirtyRange::new(i * 0x200_0000 + gap, 0x1000)
        }));
        let mut dev = FakeLogDevice::new("dev-a");
        dev.max_ranges = 3;
        let mut t = DeviceLogTracker::new([&mut dev], DeviceLogConfig::default());
        t.start(&memory).unwrap();
        let logged = &t.logged_ranges()[0].1;
        assert!(logged.len() <= 3, "{logged:?}");
        // Every memory range is inside the logged ranges.
        let logged_t = RangeTable::from_ranges(logged.iter().map(|r| DirtyRange::from(*r)));
        assert_eq!(memory.intersect(&logged_t), memory);
        // Writes in every memory range are seen; a write into a filled gap is not memory.
        let d = &mut t.devices[0].device;
        for r in memory.iter() {
            d.dma_write(r.gpa);
        }
        d.dma_write(memory.as_slice()[0].end() + 0x1000);
        let got = t.report().unwrap();
        assert_eq!(got, memory);
        assert_eq!(t.devices[0].device.starts, 3);
        t.stop().unwrap();
    }

    #[test]
    fn device_page_size_is_used_and_clipped_to_memory() {
        let mut dev = FakeLogDevice::new("dev-a");
        dev.choose_page_size = Some(0x1_0000);
        let mem = RangeTable::from_ranges([DirtyRange::new(0x1000, 0x3000), DirtyRange::new(0x10_0000, 0x2_0000)]);
        let mut t = DeviceLogTracker::new([&mut dev], DeviceLogConfig::default());
        t.start(&mem).unwrap();
        assert_eq!(t.page_size(), 0x1_0000);
        t.devices[0].device.dma_write(0x2000);
        t.devices[0].device.dma_write(0x11_0005);
        let got = t.report().unwrap();
        assert_eq!(
            got.as_slice(),
            &[DirtyRange::new(0x1000, 0x3000), DirtyRange::new(0x11_0000, 0x1_0000)]
        );
        t.stop().unwrap();
    }

    #[test]
    fn invalid_page_size_answer_is_refused_and_logging_stopped() {
        let mut dev = FakeLogDevice::new("dev-a");
        dev.choose_page_size = Some(3000);
        let mut t = DeviceLogTracker::new([&mut dev], DeviceLogConfig::default());
        let e = t.start(&memory()).unwrap_err();
        assert!(matches!(e.kind, TrackErrorKind::InvalidAnswer(_)), "{e}");
        assert!(e.to_string().contains("dev-a"), "{e}");
        assert!(!t.is_started());
        assert!(t.devices[0].device.logging.is_none());
    }

    #[test]
    fn large_ranges_are_read_in_capped_chunks() {
        let mut dev = FakeLogDevice::new("dev-a");
        let config = DeviceLogConfig {
            bitmap_cap: 16, // 128 pages per REPORT
            ..DeviceLogConfig::default()
        };
        let mem = RangeTable::from_ranges([DirtyRange::new(0, 1000 * K4)]);
        let mut t = DeviceLogTracker::new([&mut dev], config);
        t.start(&mem).unwrap();
        // A run across the chunk boundary at page 128 and the partial last chunk.
        for p in (120..140).chain(990..1000) {
            t.devices[0].device.dma_write(p * K4);
        }
        let got = t.report().unwrap();
        assert_eq!(
            got.as_slice(),
            &[DirtyRange::new(120 * K4, 20 * K4), DirtyRange::new(990 * K4, 10 * K4)]
        );
        assert_eq!(t.devices[0].device.reports, 8);
        assert!(t.devices[0].log.scratch.len() <= 2);
        t.stop().unwrap();
    }

    #[test]
    fn several_devices_are_merged_and_deduplicated() {
        let (mut a, mut b) = (FakeLogDevice::new("dev-a"), FakeLogDevice::new("dev-b"));
        let mut t = DeviceLogTracker::new(
            [&mut a as &mut dyn MigrationDevice, &mut b as &mut dyn MigrationDevice],
            DeviceLogConfig::default(),
        );
        t.start(&memory()).unwrap();
        t.stop().unwrap();
        drop(t);
        let mut t = DeviceLogTracker::new([&mut a, &mut b], DeviceLogConfig::default());
        t.start(&memory()).unwrap();
        t.devices[0].device.dma_write(0x1000);
        t.devices[0].device.dma_write(0x2000);
        t.devices[1].device.dma_write(0x2000);
        t.devices[1].device.dma_write(0x3000);
        assert_eq!(t.report().unwrap().as_slice(), &[DirtyRange::new(0x1000, 0x3000)]);
        t.stop().unwrap();
    }

    #[test]
    fn a_device_that_cannot_log_stops_the_others() {
        let (mut a, mut b) = (FakeLogDevice::new("dev-a"), FakeLogDevice::new("dev-b"));
        b.fail_start = Some(libc::ENOTTY);
        let mut t = DeviceLogTracker::new([&mut a, &mut b], DeviceLogConfig::default());
        let e = t.start(&memory()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        assert!(e.to_string().contains("dev-b: start DMA logging"), "{e}");
        assert!(t.devices[0].device.logging.is_none(), "dev-a left logging");
        assert!(!t.is_started());
    }

    #[test]
    fn failed_report_is_an_error_not_an_empty_table() {
        // mtty on Debian's kernel: START works, REPORT fails with EOPNOTSUPP.
        let mut dev = FakeLogDevice::new("mtty-a");
        dev.fail_report = Some(libc::EOPNOTSUPP);
        let mut t = DeviceLogTracker::new([&mut dev], DeviceLogConfig::default());
        t.start(&memory()).unwrap();
        let e = t.report().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
        assert_eq!(e.op, TrackOp::Report);
        assert!(e.to_string().contains("mtty-a: read DMA log"), "{e}");
        t.stop().unwrap();
    }

    #[test]
    fn failed_report_under_degrade_reports_all_memory_from_then_on() {
        let mut dev = FakeLogDevice::new("mtty-a");
        let mut t = PolicyTracker::new(
            DeviceLogTracker::new([&mut dev], DeviceLogConfig::default()),
            Policy::DegradeToAllDirty,
        );
        t.start(&memory()).unwrap();
        t.inner_mut().devices[0].device.dma_write(0x5000);
        assert_eq!(t.report().unwrap().as_slice(), &[DirtyRange::new(0x5000, K4)]);
        t.inner_mut().devices[0].device.fail_report = Some(libc::EOPNOTSUPP);
        assert_eq!(t.report().unwrap(), memory());
        t.inner_mut().devices[0].device.fail_report = None;
        assert_eq!(t.report().unwrap(), memory());
        assert!(t.degraded().is_some());
        t.stop().unwrap();
    }

    #[test]
    fn a_lent_device_works_the_same() {
        // An owner that keeps its devices lends one to each call.
        let mut dev = FakeLogDevice::new("dev-a");
        let mut log = DeviceLog::new(DeviceLogConfig::default());
        assert!(matches!(
            log.report(&mut dev).unwrap_err().kind,
            TrackErrorKind::NotStarted
        ));
        log.start(&mut dev, &memory()).unwrap();
        assert_eq!(log.page_size(), Some(K4));
        assert_eq!(log.logged_ranges().len(), 3);
        dev.dma_write(0x20_0000);
        let dyn_dev: &mut dyn MigrationDevice = &mut dev;
        assert_eq!(
            log.report(dyn_dev).unwrap().as_slice(),
            &[DirtyRange::new(0x20_0000, K4)]
        );
        log.stop(&mut dev).unwrap();
        assert!(!log.is_started() && dev.logging.is_none());
        assert!(log.stop(&mut dev).is_err());
    }

    #[test]
    fn misuse_is_refused() {
        let mut dev = FakeLogDevice::new("dev-a");
        let mut t = DeviceLogTracker::new([&mut dev], DeviceLogConfig::default());
        assert!(matches!(t.report().unwrap_err().kind, TrackErrorKind::NotStarted));
        assert!(t.start(&RangeTable::new()).is_err());
        t.start(&memory()).unwrap();
        assert!(matches!(
            t.start(&memory()).unwrap_err().kind,
            TrackErrorKind::AlreadyStarted
        ));
        t.stop().unwrap();
        assert!(t.stop().is_err());
        let mut bad = DeviceLogTracker::new(
            [&mut dev],
            DeviceLogConfig {
                page_size: 3000,
                ..DeviceLogConfig::default()
            },
        );
        assert!(matches!(
            bad.start(&memory()).unwrap_err().kind,
            TrackErrorKind::InvalidRequest(_)
        ));
    }
}
