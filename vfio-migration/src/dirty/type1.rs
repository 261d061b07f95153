//! Type1 container dirty tracking (`VFIO_IOMMU_DIRTY_PAGES` on the container fd).
//!
//! The kernel tracks writes per DMA mapping: START, then GET_BITMAP once per mapping (the range
//! of a query must cover whole mappings), STOP. The page size is the smallest one of the
//! migration capability (`VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`), and a query's bitmap may not
//! exceed the capability's `max_dirty_bitmap_size`. A mapping removed during migration is removed
//! with `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP` ([`Type1Tracker::unmap`]): its dirty pages are kept
//! and returned by the next report, so none is lost.
//!
//! Behind a real IOMMU the kernel cannot see device writes and reports every mapped page dirty
//! on every query (correct, as costly as all-dirty); only page-pinning mdev drivers are precise.
//!
//! The ioctls themselves are behind [`Type1Ops`]: [`KernelType1`] implements it on a real
//! type1v2 container fd (through [`crate::kernel::ioctls`]), tests use a fake.

use std::io;
use std::os::fd::AsFd;

use super::{DirtyError, DirtyRange, DirtyTracker, RangeTable, TrackErrorKind, TrackOp};
use crate::kernel::ioctls;
pub use crate::kernel::ioctls::Type1MigrationCap;

/// The container operations type1 dirty tracking needs (implemented on the container fd by the
/// kernel backend; by a fake in tests). Errors carry the errno.
pub trait Type1Ops: Send {
    /// The container's name for messages.
    fn name(&self) -> &str;

    /// The migration capability, or `None` when the container has none (type1 v1, old kernel).
    fn migration_cap(&self) -> io::Result<Option<Type1MigrationCap>>;

    /// `VFIO_IOMMU_DIRTY_PAGES_FLAG_START`.
    fn dirty_start(&mut self) -> io::Result<()>;

    /// `VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP`.
    fn dirty_stop(&mut self) -> io::Result<()>;

    /// `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP` over `[iova, iova + size)` (whole mappings):
    /// reads and clears; only sets bits of the (zeroed) `bitmap`.
    fn get_bitmap(&mut self, iova: u64, size: u64, pgsize: u64, bitmap: &mut [u64]) -> io::Result<()>;

    /// `VFIO_IOMMU_UNMAP_DMA` with `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`: unmap whole mappings
    /// and return their dirty pages in the (zeroed) `bitmap`.
    fn unmap_get_bitmap(&mut self, iova: u64, size: u64, pgsize: u64, bitmap: &mut [u64]) -> io::Result<()>;
}

/// [`Type1Ops`] on a real type1v2 container fd (`F`: an `OwnedFd`, a `BorrowedFd`, a `File`...).
#[derive(Debug)]
pub struct KernelType1<F> {
    container: F,
    name: String,
}

impl<F: AsFd + Send> KernelType1<F> {
    /// The container `container`, named `name` in messages (e.g. `/dev/vfio/vfio`).
    pub fn new(container: F, name: impl Into<String>) -> Self {
        Self {
            container,
            name: name.into(),
        }
    }
}

impl<F: AsFd + Send> Type1Ops for KernelType1<F> {
    fn name(&self) -> &str {
        &self.name
    }

    fn migration_cap(&self) -> io::Result<Option<Type1MigrationCap>> {
        ioctls::type1_migration_cap(self.container.as_fd())
    }

    fn dirty_start(&mut self) -> io::Result<()> {
        ioctls::type1_dirty_start(self.container.as_fd())
    }

    fn dirty_stop(&mut self) -> io::Result<()> {
        ioctls::type1_dirty_stop(self.container.as_fd())
    }

    fn get_bitmap(&mut self, iova: u64, size: u64, pgsize: u64, bitmap: &mut [u64]) -> io::Result<()> {
        ioctls::type1_dirty_get_bitmap(self.container.as_fd(), iova, size, pgsize, bitmap)
    }

    fn unmap_get_bitmap(&mut self, iova: u64, size: u64, pgsize: u64, bitmap: &mut [u64]) -> io::Result<()> {
        let unmapped = ioctls::type1_dma_unmap(self.container.as_fd(), iova, size, Some((pgsize, bitmap)))?;
        if unmapped != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unmapped {unmapped:#x} bytes of {size:#x}"),
            ));
        }
        Ok(())
    }
}

/// Settings of a [`Type1Tracker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Type1Config {
    /// Our own limit on one bitmap, in bytes (the capability's limit applies too).
    pub bitmap_cap: u64,
}

impl Default for Type1Config {
    /// 64 MiB bitmaps: a 2 TiB mapping of 4 KiB pages.
    fn default() -> Self {
        Self { bitmap_cap: 64 << 20 }
    }
}

/// Dirty tracking by a type1 container.
#[derive(Debug)]
pub struct Type1Tracker<O> {
    ops: O,
    name: String,
    config: Type1Config,
    /// The DMA mappings, sorted, not coalesced (each is queried on its own).
    mappings: Vec<DirtyRange>,
    /// Whether the mappings were declared (else the memory map is taken at start).
    declared: bool,
    pgsize: u64,
    /// The bitmap limit in force (capability and config).
    limit: u64,
    /// Dirty pages of mappings removed since the last report.
    pending: RangeTable,
    started: bool,
    scratch: Vec<u64>,
}

impl<O: Type1Ops> Type1Tracker<O> {
    /// A tracker on a container (not started). Unless [`set_mappings`](Self::set_mappings) is
    /// called, each range of the memory given to `start` is taken as one DMA mapping (the
    /// identity map a VMM without vIOMMU sets up).
    pub fn new(ops: O, config: Type1Config) -> Self {
        let name = format!("type1:{}", ops.name());
        Self {
            ops,
            name,
            config,
            mappings: Vec::new(),
            declared: false,
            pgsize: 0,
            limit: 0,
            pending: RangeTable::new(),
            started: false,
            scratch: Vec::new(),
        }
    }

    /// Declare the container's DMA mappings (before start).
    pub fn set_mappings(&mut self, mappings: impl IntoIterator<Item = DirtyRange>) {
        self.mappings = mappings.into_iter().filter(|m| !m.is_empty()).collect();
        self.mappings.sort_unstable();
        self.declared = true;
    }

    /// The DMA mappings tracked.
    pub fn mappings(&self) -> &[DirtyRange] {
        &self.mappings
    }

    /// The container operations.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// The container operations, mutably.
    pub fn ops_mut(&mut self) -> &mut O {
        &mut self.ops
    }

    fn error(&self, op: TrackOp, kind: impl Into<TrackErrorKind>) -> DirtyError {
        DirtyError::new(&self.name, op, kind)
    }

    /// Check that `m` can be queried in one bitmap; returns its size in words.
    fn check_mapping(&self, op: TrackOp, m: &DirtyRange) -> Result<usize, DirtyError> {
        let mask = self.pgsize - 1;
        if m.gpa & mask != 0 || m.length & mask != 0 || m.gpa.checked_add(m.length).is_none() {
            return Err(self.error(
                op,
                TrackErrorKind::InvalidRange {
                    range: *m,
                    reason: format!("not aligned to the dirty page size {:#x}", self.pgsize),
                },
            ));
        }
        let words = (m.length / self.pgsize).div_ceil(64);
        let bytes = words * 8;
        if bytes > self.limit {
            return Err(self.error(
                op,
                TrackErrorKind::BitmapTooLarge {
                    bytes,
                    limit: self.limit,
                },
            ));
        }
        Ok(words as usize)
    }

    /// A zeroed scratch bitmap of `words` words.
    fn bitmap(scratch: &mut Vec<u64>, words: usize) -> &mut [u64] {
        if scratch.len() < words {
            scratch.resize(words, 0);
        }
        let b = &mut scratch[..words];
        b.fill(0);
        b
    }

    /// Record a DMA mapping added during migration; the kernel tracks it from its creation.
    pub fn add_mapping(&mut self, mapping: DirtyRange) -> Result<(), DirtyError> {
        if self.started {
            self.check_mapping(TrackOp::Start, &mapping)?;
        }
        if self.mappings.iter().any(|m| m.intersect(&mapping).is_some()) {
            return Err(self.error(
                TrackOp::Start,
                TrackErrorKind::InvalidRange {
                    range: mapping,
                    reason: "overlaps a mapping".into(),
                },
            ));
        }
        let at = self.mappings.partition_point(|m| m.gpa < mapping.gpa);
        self.mappings.insert(at, mapping);
        Ok(())
    }

    /// Unmap `range` (whole mappings) from the container while tracking, keeping its dirty
    /// pages for the next report (`VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`).
    pub fn unmap(&mut self, range: DirtyRange) -> Result<(), DirtyError> {
        if !self.started {
            return Err(self.error(TrackOp::Unmap, TrackErrorKind::NotStarted));
        }
        let lo = self.mappings.partition_point(|m| m.end() <= range.gpa);
        let hi = self.mappings.partition_point(|m| m.gpa < range.end());
        let whole = lo < hi && self.mappings[lo].gpa == range.gpa && self.mappings[hi - 1].end() == range.end();
        if !whole {
            return Err(self.error(
                TrackOp::Unmap,
                TrackErrorKind::InvalidRange {
                    range,
                    reason: "does not cover whole DMA mappings".into(),
                },
            ));
        }
        let words = self.check_mapping(TrackOp::Unmap, &range)?;
        let bitmap = Self::bitmap(&mut self.scratch, words);
        self.ops
            .unmap_get_bitmap(range.gpa, range.length, self.pgsize, bitmap)
            .map_err(|e| DirtyError::new(&self.name, TrackOp::Unmap, e))?;
        self.pending
            .extend_from_bitmap_clamped(bitmap, range.gpa, self.pgsize, range.end());
        self.mappings.drain(lo..hi);
        Ok(())
    }
}

impl<O: Type1Ops> DirtyTracker for Type1Tracker<O> {
    fn name(&self) -> &str {
        &self.name
    }

    fn page_size(&self) -> u64 {
        self.pgsize
    }

    fn is_started(&self) -> bool {
        self.started
    }

    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError> {
        if self.started {
            return Err(self.error(TrackOp::Start, TrackErrorKind::AlreadyStarted));
        }
        let cap = self
            .ops
            .migration_cap()
            .map_err(|e| self.error(TrackOp::Start, e))?
            .ok_or_else(|| {
                self.error(
                    TrackOp::Start,
                    TrackErrorKind::InvalidAnswer("no migration capability (type1 v1 or no dirty tracking)".into()),
                )
            })?;
        if cap.pgsize_bitmap == 0 {
            return Err(self.error(
                TrackOp::Start,
                TrackErrorKind::InvalidAnswer("migration capability without page sizes".into()),
            ));
        }
        self.pgsize = 1 << cap.pgsize_bitmap.trailing_zeros();
        self.limit = cap.max_dirty_bitmap_size.min(self.config.bitmap_cap);
        if !self.declared {
            self.mappings = memory.iter().copied().collect();
        }
        for m in &self.mappings {
            self.check_mapping(TrackOp::Start, m)?;
        }
        self.ops.dirty_start().map_err(|e| self.error(TrackOp::Start, e))?;
        self.pending.clear();
        self.started = true;
        Ok(())
    }

    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        super::tracker::report_by_into(self)
    }

    /// The bitmap of each mapping converted straight into `out` (the mappings are sorted and do
    /// not overlap, so each conversion appends), then the pages of removed mappings merged in.
    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        out.clear();
        if !self.started {
            return Err(self.error(TrackOp::Report, TrackErrorKind::NotStarted));
        }
        for i in 0..self.mappings.len() {
            let m = self.mappings[i];
            let read = self.check_mapping(TrackOp::Report, &m).and_then(|words| {
                let bitmap = Self::bitmap(&mut self.scratch, words);
                self.ops
                    .get_bitmap(m.gpa, m.length, self.pgsize, bitmap)
                    .map_err(|e| DirtyError::new(&self.name, TrackOp::Report, e))?;
                out.extend_from_bitmap_clamped(bitmap, m.gpa, self.pgsize, m.end());
                Ok(())
            });
            if let Err(e) = read {
                out.clear();
                return Err(e);
            }
        }
        // Only now that the whole report worked are the pages of removed mappings handed over.
        if !self.pending.is_empty() {
            out.merge_in(&self.pending);
            self.pending.clear();
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if !self.started {
            return Err(self.error(TrackOp::Stop, TrackErrorKind::NotStarted));
        }
        self.started = false;
        self.scratch = Vec::new();
        self.ops.dirty_stop().map_err(|e| self.error(TrackOp::Stop, e))
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// A type1 container with the kernel's rules: queries and unmaps cover whole mappings,
    /// bitmaps are big enough, GET_BITMAP reads and clears.
    #[derive(Debug, Default)]
    pub(crate) struct FakeType1 {
        pub cap: Option<Type1MigrationCap>,
        pub mappings: BTreeMap<u64, u64>,
        pub dirty: BTreeSet<u64>,
        pub tracking: bool,
        /// A real IOMMU: every mapped page is dirty on every query.
        pub behind_iommu: bool,
        pub fail_get: Option<i32>,
        pub queries: Vec<(u64, u64)>,
    }

    impl FakeType1 {
        pub fn new(mappings: &[(u64, u64)]) -> Self {
            Self {
                cap: Some(Type1MigrationCap {
                    flags: 0,
                    pgsize_bitmap: 0x4000_1000 | 0x20_0000,
                    max_dirty_bitmap_size: 1 << 20,
                }),
                mappings: mappings.iter().copied().collect(),
                ..Self::default()
            }
        }

        /// The device writes `addr` (only mapped addresses can be written).
        pub fn dma_write(&mut self, addr: u64) {
            let mapped = self
                .mappings
                .range(..=addr)
                .next_back()
                .is_some_and(|(a, l)| addr < a + l);
            assert!(mapped, "DMA to unmapped {addr:#x} would fault");
            if self.tracking {
                self.dirty.insert(addr & !0xfff);
            }
        }

        fn whole(&self, iova: u64, size: u64) -> bool {
            let starts = self.mappings.contains_key(&iova);
            let ends = self
                .mappings
                .range(..iova + size)
                .next_back()
                .is_some_and(|(a, l)| a + l == iova + size);
            starts && ends
        }

        fn fill(&mut self, iova: u64, size: u64, pgsize: u64, bitmap: &mut [u64]) -> io::Result<()> {
            if !self.tracking || !self.whole(iova, size) || pgsize != 4096 {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            if (bitmap.len() as u64) < (size / pgsize).div_ceil(64) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let pages: Vec<u64> = if self.behind_iommu {
                self.mappings
                    .range(iova..iova + size)
                    .flat_map(|(a, l)| (*a..a + l).step_by(4096))
                    .collect()
            } else {
                self.dirty.range(iova..iova + size).copied().collect()
            };
            for p in pages {
                let n = (p - iova) / pgsize;
                bitmap[(n / 64) as usize] |= 1 << (n % 64);
                self.dirty.remove(&p);
            }
            Ok(())
        }
    }

    impl Type1Ops for FakeType1 {
        fn name(&self) -> &str {
            "fake-container"
        }
        fn migration_cap(&self) -> io::Result<Option<Type1MigrationCap>> {
            Ok(self.cap)
        }
        fn dirty_start(&mut self) -> io::Result<()> {
            self.tracking = true;
            Ok(())
        }
        fn dirty_stop(&mut self) -> io::Result<()> {
            self.tracking = false;
            self.dirty.clear();
            Ok(())
        }
        fn get_bitmap(&mut self, iova: u64, size: u64, pgsize: u64, bitmap: &mut [u64]) -> io::Result<()> {
            if let Some(errno) = self.fail_get {
                return Err(io::Error::from_raw_os_error(errno));
            }
            self.queries.push((iova, size));
            self.fill(iova, size, pgsize, bitmap)
        }
        fn unmap_get_bitmap(&mut self, iova: u64, size: u64, pgsize: u64, bitmap: &mut [u64]) -> io::Result<()> {
            self.fill(iova, size, pgsize, bitmap)?;
            let gone: Vec<u64> = self.mappings.range(iova..iova + size).map(|(a, _)| *a).collect();
            for a in gone {
                self.mappings.remove(&a);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeType1;
    use super::*;

    const MAPS: [(u64, u64); 3] = [(0, 0x10_0000), (0x10_0000, 0x10_0000), (0x4000_0000, 0x100_0000)];

    fn tracker(fake: FakeType1) -> Type1Tracker<FakeType1> {
        let mut t = Type1Tracker::new(fake, Type1Config::default());
        t.set_mappings(MAPS.iter().map(|&(a, l)| DirtyRange::new(a, l)));
        t
    }

    fn memory() -> RangeTable {
        RangeTable::from_ranges(MAPS.iter().map(|&(a, l)| DirtyRange::new(a, l)))
    }

    #[test]
    fn reports_into_the_same_table_every_round() {
        use crate::dirty::tracker::report_reusing;
        let mut t = tracker(FakeType1::new(&MAPS));
        t.start(&memory()).unwrap();
        let mut out = RangeTable::with_capacity(256);
        for round in 0..4u64 {
            let writes = [0xf_f000, 0x10_0000 + round * 0x1000, 0x4000_0000 + (round + 3) * 0x5000];
            for a in writes {
                t.ops_mut().dma_write(a);
            }
            let want = RangeTable::from_ranges(writes.map(|a| DirtyRange::new(a, 0x1000)));
            assert_eq!(report_reusing(&mut t, &mut out), want, "round {round}");
        }
        // The pages of an unmapped mapping come with the next report, into the same table.
        t.ops_mut().dma_write(0x10_0000);
        t.unmap(DirtyRange::new(0x10_0000, 0x10_0000)).unwrap();
        t.ops_mut().dma_write(0x4000_0000);
        t.report_into(&mut out).unwrap();
        assert_eq!(
            out.as_slice(),
            &[DirtyRange::new(0x10_0000, 0x1000), DirtyRange::new(0x4000_0000, 0x1000)]
        );
        // A failed query clears the table: no stale ranges look like a report.
        t.ops_mut().fail_get = Some(libc::EIO);
        assert!(t.report_into(&mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn queries_each_mapping_with_the_smallest_page_size() {
        let mut t = tracker(FakeType1::new(&MAPS));
        t.start(&memory()).unwrap();
        assert_eq!(t.page_size(), 4096);
        // Adjacent mappings: the write at the end of the first and the start of the second
        // coalesce into one range.
        t.ops_mut().dma_write(0xf_f000);
        t.ops_mut().dma_write(0x10_0123);
        t.ops_mut().dma_write(0x40ff_ffff);
        let got = t.report().unwrap();
        assert_eq!(
            got.as_slice(),
            &[DirtyRange::new(0xf_f000, 0x2000), DirtyRange::new(0x40ff_f000, 0x1000)]
        );
        assert_eq!(t.ops().queries, MAPS.to_vec());
        assert!(t.report().unwrap().is_empty());
        t.stop().unwrap();
        assert!(!t.ops().tracking);
    }

    #[test]
    fn without_declared_mappings_the_memory_ranges_are_the_mappings() {
        let mut t = Type1Tracker::new(FakeType1::new(&[(0, 0x10_0000)]), Type1Config::default());
        t.start(&RangeTable::from_ranges([DirtyRange::new(0, 0x10_0000)]))
            .unwrap();
        t.ops_mut().dma_write(0x5000);
        assert_eq!(t.report().unwrap().as_slice(), &[DirtyRange::new(0x5000, 0x1000)]);
    }

    #[test]
    fn unmap_keeps_the_dirty_pages_for_the_next_report() {
        let mut t = tracker(FakeType1::new(&MAPS));
        t.start(&memory()).unwrap();
        t.ops_mut().dma_write(0x4000_2000);
        t.ops_mut().dma_write(0x3000);
        // Unmapping part of a mapping is refused (the kernel would refuse too).
        let e = t.unmap(DirtyRange::new(0x4000_0000, 0x1000)).unwrap_err();
        assert!(matches!(e.kind, TrackErrorKind::InvalidRange { .. }), "{e}");
        t.unmap(DirtyRange::new(0x4000_0000, 0x100_0000)).unwrap();
        assert!(!t.ops().mappings.contains_key(&0x4000_0000));
        assert_eq!(t.mappings().len(), 2);
        // The removed mapping is no longer queried, its dirty page still comes out, once.
        t.ops_mut().queries.clear();
        let got = t.report().unwrap();
        assert_eq!(
            got.as_slice(),
            &[DirtyRange::new(0x3000, 0x1000), DirtyRange::new(0x4000_2000, 0x1000)]
        );
        assert_eq!(t.ops().queries, vec![MAPS[0], MAPS[1]]);
        assert!(t.report().unwrap().is_empty());
        // A new mapping is queried from then on.
        t.ops_mut().mappings.insert(0x8000_0000, 0x1_0000);
        t.add_mapping(DirtyRange::new(0x8000_0000, 0x1_0000)).unwrap();
        t.ops_mut().dma_write(0x8000_0000);
        assert_eq!(t.report().unwrap().as_slice(), &[DirtyRange::new(0x8000_0000, 0x1000)]);
        assert!(t.add_mapping(DirtyRange::new(0x8000_0000, 0x1000)).is_err());
    }

    #[test]
    fn unmaps_in_descending_order_keep_every_page() {
        let mut t = tracker(FakeType1::new(&MAPS));
        t.start(&memory()).unwrap();
        for a in [0x4000_1000, 0x10_1000, 0x10_3000, 0x10_5000] {
            t.ops_mut().dma_write(a);
        }
        t.unmap(DirtyRange::new(0x4000_0000, 0x100_0000)).unwrap();
        t.unmap(DirtyRange::new(0x10_0000, 0x10_0000)).unwrap();
        let got = t.report().unwrap();
        assert_eq!(
            got.as_slice(),
            &[
                DirtyRange::new(0x10_1000, 0x1000),
                DirtyRange::new(0x10_3000, 0x1000),
                DirtyRange::new(0x10_5000, 0x1000),
                DirtyRange::new(0x4000_1000, 0x1000),
            ]
        );
    }

    #[test]
    fn a_failed_query_keeps_the_unmapped_pages() {
        let mut t = tracker(FakeType1::new(&MAPS));
        t.start(&memory()).unwrap();
        t.ops_mut().dma_write(0x4000_2000);
        t.unmap(DirtyRange::new(0x4000_0000, 0x100_0000)).unwrap();
        t.ops_mut().fail_get = Some(libc::EIO);
        let e = t.report().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(
            e.to_string().starts_with("type1:fake-container: report dirty pages"),
            "{e}"
        );
        t.ops_mut().fail_get = None;
        assert_eq!(t.report().unwrap().as_slice(), &[DirtyRange::new(0x4000_2000, 0x1000)]);
    }

    #[test]
    fn behind_a_real_iommu_every_mapped_page_is_dirty() {
        let mut fake = FakeType1::new(&MAPS);
        fake.behind_iommu = true;
        let mut t = tracker(fake);
        t.start(&memory()).unwrap();
        assert_eq!(t.report().unwrap(), memory());
        assert_eq!(t.report().unwrap(), memory());
    }

    #[test]
    fn the_kernel_seam_issues_the_container_ioctls() {
        use crate::kernel::ioctls::sys;
        use std::os::fd::BorrowedFd;
        sys::reset();
        // SAFETY: the syscall twin never uses the descriptor; 0 only names it in the records.
        let fd = unsafe { BorrowedFd::borrow_raw(0) };
        let mut k = KernelType1::new(fd, "/dev/vfio/vfio");
        sys::reply_ok(0);
        sys::reply_errno(libc::EINVAL);
        let mut bitmap = [0u64; 1];
        k.dirty_start().unwrap();
        let e = k.get_bitmap(0, 64 * 4096, 4096, &mut bitmap).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // A bitmap too small is refused before any ioctl.
        assert!(k.get_bitmap(0, 65 * 4096, 4096, &mut bitmap).is_err());
        let calls = sys::take_calls();
        assert_eq!(calls.len(), 2);
        let sys::Call::Ioctl { arg, .. } = &calls[1] else {
            panic!("{calls:?}")
        };
        // argsz, flags = GET_BITMAP (4), then iova 0 and size 64 pages.
        assert_eq!(u32::from_ne_bytes(arg[4..8].try_into().unwrap()), 4);
        assert_eq!(u64::from_ne_bytes(arg[16..24].try_into().unwrap()), 64 * 4096);
        // A container without the migration capability: the tracker refuses to start.
        sys::reply_ok(0);
        let mut t = Type1Tracker::new(k, Type1Config::default());
        let e = t.start(&memory()).unwrap_err();
        assert!(
            e.to_string().starts_with("type1:/dev/vfio/vfio: start dirty tracking"),
            "{e}"
        );
        sys::take_calls();
    }

    #[test]
    fn capability_and_limits_are_checked_at_start() {
        let mut fake = FakeType1::new(&MAPS);
        fake.cap = None;
        let e = tracker(fake).start(&memory()).unwrap_err();
        assert!(matches!(e.kind, TrackErrorKind::InvalidAnswer(_)), "{e}");

        let mut fake = FakeType1::new(&MAPS);
        fake.cap.as_mut().unwrap().max_dirty_bitmap_size = 256; // 2048 pages = 8 MiB
        let mut t = tracker(fake);
        let e = t.start(&memory()).unwrap_err();
        assert!(
            matches!(e.kind, TrackErrorKind::BitmapTooLarge { bytes: 512, limit: 256 }),
            "{e}"
        );
        assert!(!t.ops().tracking && !t.is_started());

        let mut t = Type1Tracker::new(FakeType1::new(&[]), Type1Config::default());
        t.set_mappings([DirtyRange::new(0x800, 0x1000)]);
        assert!(matches!(
            t.start(&memory()).unwrap_err().kind,
            TrackErrorKind::InvalidRange { .. }
        ));
    }
}
