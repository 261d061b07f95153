//! iommufd HWPT dirty tracking (`IOMMU_HWPT_SET_DIRTY_TRACKING` / `IOMMU_HWPT_GET_DIRTY_BITMAP`).
//!
//! The IOMMU itself records device writes in its page tables, on a hardware page table (HWPT)
//! allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` when the hardware reports
//! `IOMMU_HW_CAP_DIRTY_TRACKING`. Tracking is switched on for the HWPT, and GET_DIRTY_BITMAP
//! reads and clears the dirty bits of any IOVA range at the chosen page size (the IOMMU page size
//! or a multiple; the selftest mock domain uses 2 KiB).
//!
//! A mapping removed during migration: iommufd has no unmap that returns the dirty bitmap, so
//! [`HwptTracker::unmap`] reads the range's dirty bits first, then unmaps, and keeps the pages for
//! the next report. A device write between the two calls cannot be seen: quiesce the device's DMA
//! to that range first (the guest's unmap normally has).
//!
//! The ioctls are behind [`HwptOps`]: [`KernelHwpt`] implements it on `/dev/iommu` (through
//! [`crate::kernel::ioctls`]), tests use a fake.

use std::io;
use std::os::fd::AsFd;

use crate::kernel::ioctls;

use super::{DirtyError, DirtyRange, DirtyTracker, RangeTable, TrackErrorKind, TrackOp};

/// The iommufd operations HWPT dirty tracking needs. Errors carry the errno.
pub trait HwptOps: Send {
    /// The HWPT's name for messages (e.g. `iommufd:hwpt3`).
    fn name(&self) -> &str;

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` with or without `IOMMU_HWPT_DIRTY_TRACKING_ENABLE`.
    fn set_dirty_tracking(&mut self, enable: bool) -> io::Result<()>;

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` over `[iova, iova + length)` at `page_size` (reads and
    /// clears; only sets bits of the zeroed `bitmap`).
    fn get_dirty_bitmap(&mut self, iova: u64, length: u64, page_size: u64, bitmap: &mut [u64]) -> io::Result<()>;

    /// `IOMMU_IOAS_UNMAP` of `[iova, iova + length)`.
    fn unmap(&mut self, iova: u64, length: u64) -> io::Result<()>;
}

/// [`HwptOps`] on a real iommufd: a HWPT allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` and the
/// IOAS it translates (`F`: an `OwnedFd`, a `BorrowedFd`, a `File`...).
#[derive(Debug)]
pub struct KernelHwpt<F> {
    iommufd: F,
    hwpt_id: u32,
    ioas_id: u32,
    name: String,
}

impl<F: AsFd + Send> KernelHwpt<F> {
    /// The HWPT `hwpt_id` over the IOAS `ioas_id` of `iommufd`.
    pub fn new(iommufd: F, hwpt_id: u32, ioas_id: u32) -> Self {
        Self {
            iommufd,
            hwpt_id,
            ioas_id,
            name: format!("hwpt{hwpt_id}"),
        }
    }
}

impl<F: AsFd + Send> HwptOps for KernelHwpt<F> {
    fn name(&self) -> &str {
        &self.name
    }

    fn set_dirty_tracking(&mut self, enable: bool) -> io::Result<()> {
        ioctls::hwpt_set_dirty_tracking(self.iommufd.as_fd(), self.hwpt_id, enable)
    }

    fn get_dirty_bitmap(&mut self, iova: u64, length: u64, page_size: u64, bitmap: &mut [u64]) -> io::Result<()> {
        ioctls::hwpt_get_dirty_bitmap(self.iommufd.as_fd(), self.hwpt_id, iova, length, page_size, 0, bitmap)
    }

    fn unmap(&mut self, iova: u64, length: u64) -> io::Result<()> {
        let unmapped = ioctls::ioas_unmap(self.iommufd.as_fd(), self.ioas_id, iova, length)?;
        if unmapped != length {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unmapped {unmapped:#x} bytes of {length:#x}"),
            ));
        }
        Ok(())
    }
}

/// Settings of a [`HwptTracker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwptConfig {
    /// The page size of the bitmaps (a power of two the IOMMU supports).
    pub page_size: u64,
    /// The largest bitmap of one GET_DIRTY_BITMAP, in bytes (at least 8); larger ranges are
    /// read in chunks.
    pub bitmap_cap: usize,
}

impl Default for HwptConfig {
    /// 4 KiB pages, 4 MiB bitmaps.
    fn default() -> Self {
        Self {
            page_size: 4096,
            bitmap_cap: 4 << 20,
        }
    }
}

/// Dirty tracking by an iommufd HWPT.
#[derive(Debug)]
pub struct HwptTracker<O> {
    ops: O,
    name: String,
    config: HwptConfig,
    /// The tracked IOVA ranges.
    memory: Option<RangeTable>,
    /// Whether the tracked ranges are made of whole pages: the pages read are then the report,
    /// without cutting.
    whole_pages: bool,
    /// The pages read, kept between rounds, when they must be cut to the tracked ranges.
    pages: RangeTable,
    /// Dirty pages of ranges unmapped since the last report.
    pending: RangeTable,
    scratch: Vec<u64>,
}

impl<O: HwptOps> HwptTracker<O> {
    /// A tracker on a dirty-tracking-capable HWPT (not started).
    pub fn new(ops: O, config: HwptConfig) -> Self {
        let name = format!("iommufd:{}", ops.name());
        Self {
            ops,
            name,
            config,
            memory: None,
            whole_pages: false,
            pages: RangeTable::new(),
            pending: RangeTable::new(),
            scratch: Vec::new(),
        }
    }

    /// The iommufd operations.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// The iommufd operations, mutably.
    pub fn ops_mut(&mut self) -> &mut O {
        &mut self.ops
    }

    fn error(&self, op: TrackOp, kind: impl Into<TrackErrorKind>) -> DirtyError {
        DirtyError::new(&self.name, op, kind)
    }

    /// Read and clear the dirty bits of `range` into `out`, in capped chunks.
    fn read(&mut self, op: TrackOp, range: DirtyRange, out: &mut RangeTable) -> Result<(), DirtyError> {
        let ps = self.config.page_size;
        let cap_words = (self.config.bitmap_cap / 8) as u64;
        let chunk_len = cap_words.saturating_mul(64).saturating_mul(ps);
        let aligned = range.align_out(ps);
        let mut at = aligned.gpa;
        while at < aligned.end() {
            let len = chunk_len.min(aligned.end() - at);
            let words = len.div_ceil(ps).div_ceil(64) as usize;
            if self.scratch.len() < words {
                self.scratch.resize(words, 0);
            }
            let bitmap = &mut self.scratch[..words];
            bitmap.fill(0);
            self.ops
                .get_dirty_bitmap(at, len, ps, bitmap)
                .map_err(|e| DirtyError::new(&self.name, op, e))?;
            out.extend_from_bitmap_clamped(bitmap, at, ps, at + len);
            at += len;
        }
        Ok(())
    }

    /// Unmap `range` from the IOAS while tracking, keeping its dirty pages for the next report
    /// (read first, then unmapped; see the module documentation for the window in between).
    pub fn unmap(&mut self, range: DirtyRange) -> Result<(), DirtyError> {
        if self.memory.is_none() {
            return Err(self.error(TrackOp::Unmap, TrackErrorKind::NotStarted));
        }
        let mut got = RangeTable::new();
        self.read(TrackOp::Unmap, range, &mut got)?;
        // Whole pages were read: keep only the unmapped range's part.
        let got = got.intersect(&RangeTable::from_ranges([range]));
        self.pending.merge_in(&got);
        self.ops
            .unmap(range.gpa, range.length)
            .map_err(|e| DirtyError::new(&self.name, TrackOp::Unmap, e))
    }
}

impl<O: HwptOps> DirtyTracker for HwptTracker<O> {
    fn name(&self) -> &str {
        &self.name
    }

    fn page_size(&self) -> u64 {
        self.config.page_size
    }

    fn is_started(&self) -> bool {
        self.memory.is_some()
    }

    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError> {
        if self.memory.is_some() {
            return Err(self.error(TrackOp::Start, TrackErrorKind::AlreadyStarted));
        }
        if !self.config.page_size.is_power_of_two() || self.config.bitmap_cap < 8 {
            return Err(self.error(
                TrackOp::Start,
                TrackErrorKind::InvalidRequest(format!(
                    "page size {:#x} not a power of two or bitmap cap below 8 bytes",
                    self.config.page_size
                )),
            ));
        }
        self.ops
            .set_dirty_tracking(true)
            .map_err(|e| self.error(TrackOp::Start, e))?;
        self.pending.clear();
        self.whole_pages = memory.align_out(self.config.page_size) == *memory;
        self.memory = Some(memory.clone());
        Ok(())
    }

    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        super::tracker::report_by_into(self)
    }

    /// The bitmaps converted straight into `out` when the tracked ranges are whole pages (else
    /// into a table kept between rounds and cut to them into `out`), then the pages of unmapped
    /// ranges merged in.
    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        out.clear();
        let Some(memory) = self.memory.take() else {
            return Err(self.error(TrackOp::Report, TrackErrorKind::NotStarted));
        };
        let mut pages = if self.whole_pages {
            std::mem::take(out)
        } else {
            std::mem::take(&mut self.pages)
        };
        pages.clear();
        let mut result = Ok(());
        for r in memory.iter() {
            result = self.read(TrackOp::Report, *r, &mut pages);
            if result.is_err() {
                break;
            }
        }
        if self.whole_pages {
            *out = pages;
        } else {
            if result.is_ok() {
                pages.intersect_into(&memory, out);
            }
            self.pages = pages;
        }
        self.memory = Some(memory);
        if let Err(e) = result {
            out.clear();
            return Err(e);
        }
        // Only now that the whole report worked are the pages of unmapped ranges handed over.
        if !self.pending.is_empty() {
            out.merge_in(&self.pending);
            self.pending.clear();
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.memory.take().is_none() {
            return Err(self.error(TrackOp::Stop, TrackErrorKind::NotStarted));
        }
        self.scratch = Vec::new();
        self.pages = RangeTable::new();
        self.ops
            .set_dirty_tracking(false)
            .map_err(|e| self.error(TrackOp::Stop, e))
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::collections::BTreeSet;

    /// A HWPT like the selftest mock domain: 2 KiB IO pages, GET_DIRTY_BITMAP needs aligned
    /// ranges, reads and clears.
    #[derive(Debug, Default)]
    pub(crate) struct FakeHwpt {
        pub tracking: bool,
        pub dirty: BTreeSet<u64>,
        pub mapped: Vec<(u64, u64)>,
        pub fail_enable: Option<i32>,
        pub calls: usize,
    }

    pub(crate) const MOCK_PAGE: u64 = 2048;

    impl FakeHwpt {
        pub fn dma_write(&mut self, addr: u64) {
            assert!(
                self.mapped.iter().any(|&(a, l)| addr >= a && addr < a + l),
                "unmapped {addr:#x}"
            );
            if self.tracking {
                self.dirty.insert(addr & !(MOCK_PAGE - 1));
            }
        }
    }

    impl HwptOps for FakeHwpt {
        fn name(&self) -> &str {
            "hwpt7"
        }
        fn set_dirty_tracking(&mut self, enable: bool) -> io::Result<()> {
            if let Some(e) = self.fail_enable {
                return Err(io::Error::from_raw_os_error(e));
            }
            self.tracking = enable;
            if !enable {
                self.dirty.clear();
            }
            Ok(())
        }
        fn get_dirty_bitmap(&mut self, iova: u64, length: u64, page_size: u64, bitmap: &mut [u64]) -> io::Result<()> {
            self.calls += 1;
            let bad = !self.tracking
                || !page_size.is_multiple_of(MOCK_PAGE)
                || !iova.is_multiple_of(page_size)
                || !length.is_multiple_of(page_size)
                || (bitmap.len() as u64) < (length / page_size).div_ceil(64);
            if bad {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let hits: Vec<u64> = self.dirty.range(iova..iova + length).copied().collect();
            for a in hits {
                let n = (a - iova) / page_size;
                bitmap[(n / 64) as usize] |= 1 << (n % 64);
                self.dirty.remove(&a);
            }
            Ok(())
        }
        fn unmap(&mut self, iova: u64, length: u64) -> io::Result<()> {
            let before = self.mapped.len();
            self.mapped.retain(|&(a, l)| !(a == iova && l == length));
            if self.mapped.len() == before {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeHwpt, MOCK_PAGE};
    use super::*;

    const APERTURE: u64 = 1 << 24;

    fn setup() -> (HwptTracker<FakeHwpt>, RangeTable) {
        let fake = FakeHwpt {
            mapped: vec![(APERTURE, 0x10_0000), (APERTURE + 0x20_0000, 0x8000)],
            ..FakeHwpt::default()
        };
        let memory = RangeTable::from_ranges(fake.mapped.iter().map(|&(a, l)| DirtyRange::new(a, l)));
        let t = HwptTracker::new(
            fake,
            HwptConfig {
                page_size: MOCK_PAGE,
                bitmap_cap: 8, // 64 pages per call: exercises the chunking
            },
        );
        (t, memory)
    }

    #[test]
    fn page_accurate_reports() {
        let (mut t, memory) = setup();
        t.start(&memory).unwrap();
        assert!(t.ops().tracking);
        assert_eq!(t.page_size(), MOCK_PAGE);
        for a in [
            APERTURE,
            APERTURE + 2048,
            APERTURE + 64 * 2048 + 7,
            APERTURE + 0x20_0000 + 0x7fff,
        ] {
            t.ops_mut().dma_write(a);
        }
        let got = t.report().unwrap();
        assert_eq!(
            got.as_slice(),
            &[
                DirtyRange::new(APERTURE, 2 * 2048),
                DirtyRange::new(APERTURE + 64 * 2048, 2048),
                DirtyRange::new(APERTURE + 0x20_0000 + 0x7800, 2048),
            ]
        );
        assert!(t.report().unwrap().is_empty());
        t.stop().unwrap();
        assert!(!t.ops().tracking);
    }

    #[test]
    fn reports_into_the_same_table_every_round() {
        use crate::dirty::tracker::report_reusing;
        // Whole pages (converted straight into the table) and a range cut inside pages
        // (converted apart, cut into the table).
        let ragged = RangeTable::from_ranges([DirtyRange::new(APERTURE + 100, 0x1_0000)]);
        let (_, whole) = setup();
        for memory in [whole, ragged] {
            let (mut t, _) = setup();
            t.start(&memory).unwrap();
            let mut out = RangeTable::with_capacity(256);
            for round in 0..4u64 {
                let writes = [APERTURE + 50, APERTURE + (round + 1) * 3 * MOCK_PAGE + 9];
                for a in writes {
                    t.ops_mut().dma_write(a);
                }
                let want = RangeTable::from_ranges(writes.map(|a| DirtyRange::new(a & !(MOCK_PAGE - 1), MOCK_PAGE)))
                    .intersect(&memory);
                assert_eq!(report_reusing(&mut t, &mut out), want, "round {round}");
            }
            t.stop().unwrap();
        }
    }

    #[test]
    fn unmap_reads_first_and_keeps_the_pages() {
        let (mut t, memory) = setup();
        t.start(&memory).unwrap();
        t.ops_mut().dma_write(APERTURE + 0x20_0000 + 0x1000);
        t.unmap(DirtyRange::new(APERTURE + 0x20_0000, 0x8000)).unwrap();
        assert_eq!(t.ops().mapped.len(), 1);
        assert_eq!(
            t.report().unwrap().as_slice(),
            &[DirtyRange::new(APERTURE + 0x20_0000 + 0x1000, 2048)]
        );
        // An unmap the kernel refuses is an error (the pages read are still kept).
        t.ops_mut().dma_write(APERTURE);
        let e = t.unmap(DirtyRange::new(APERTURE, 0x1000)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(t.report().unwrap().as_slice(), &[DirtyRange::new(APERTURE, 2048)]);
    }

    #[test]
    fn the_kernel_seam_issues_the_hwpt_ioctls() {
        use crate::kernel::ioctls::sys;
        use std::os::fd::BorrowedFd;
        sys::reset();
        // SAFETY: the syscall twin never uses the descriptor; 0 only names it in the records.
        let fd = unsafe { BorrowedFd::borrow_raw(0) };
        let mut t = HwptTracker::new(KernelHwpt::new(fd, 7, 3), HwptConfig::default());
        let memory = RangeTable::from_ranges([DirtyRange::new(1 << 24, 128 * 4096)]);
        sys::reply_ok(0); // SET_DIRTY_TRACKING enable
        sys::reply_ok(0); // GET_DIRTY_BITMAP: nothing dirty
        sys::reply_errno(libc::EIO); // GET_DIRTY_BITMAP fails
        sys::reply_ok(0); // SET_DIRTY_TRACKING disable
        t.start(&memory).unwrap();
        assert!(t.report().unwrap().is_empty());
        let e = t.report().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(e.to_string().starts_with("iommufd:hwpt7: report dirty pages"), "{e}");
        t.stop().unwrap();
        let calls = sys::take_calls();
        let args: Vec<&Vec<u8>> = calls
            .iter()
            .map(|c| match c {
                sys::Call::Ioctl { arg, .. } => arg,
                other => panic!("{other:?}"),
            })
            .collect();
        let u32_at = |a: &[u8], o: usize| u32::from_ne_bytes(a[o..o + 4].try_into().unwrap());
        let u64_at = |a: &[u8], o: usize| u64::from_ne_bytes(a[o..o + 8].try_into().unwrap());
        // set_dirty_tracking {size, flags, hwpt_id, rsvd}: enable then disable.
        assert_eq!((u32_at(args[0], 4), u32_at(args[0], 8)), (1, 7));
        assert_eq!((u32_at(args[3], 4), u32_at(args[3], 8)), (0, 7));
        // get_dirty_bitmap {size, hwpt_id, flags, rsvd, iova, length, page_size, data}.
        assert_eq!(u32_at(args[1], 4), 7);
        assert_eq!(u64_at(args[1], 16), 1 << 24);
        assert_eq!(u64_at(args[1], 24), 128 * 4096);
        assert_eq!(u64_at(args[1], 32), 4096);
    }

    #[test]
    fn a_hwpt_without_dirty_tracking_fails_to_start() {
        let (mut t, memory) = setup();
        t.ops_mut().fail_enable = Some(libc::EOPNOTSUPP);
        let e = t.start(&memory).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
        assert!(e.to_string().starts_with("iommufd:hwpt7: start dirty tracking"), "{e}");
        assert!(!t.is_started());
    }
}
