//! The emulated device's DMA log (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`).
//!
//! Dirty pages are kept as a sorted set of page numbers, so the log costs memory in proportion
//! to the pages written, not to the size of the logged ranges.

use std::collections::BTreeSet;

use crate::device::DmaRange;

/// The smallest page size the device logs at.
pub const MIN_PAGE_SIZE: u64 = 4096;

/// A refused logging request: the errno and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) errno: i32,
    pub(crate) reason: String,
}

fn refuse(errno: i32, reason: String) -> Refused {
    Refused { errno, reason }
}

/// An active DMA log.
#[derive(Clone, Debug)]
pub(crate) struct DmaLog {
    page_size: u64,
    /// Sorted, non-overlapping, page-aligned.
    ranges: Vec<DmaRange>,
    dirty: BTreeSet<u64>,
}

impl DmaLog {
    /// Start logging `ranges` at `page_size` (negotiated: a power of two below
    /// [`MIN_PAGE_SIZE`] is raised to it). Checks what the uAPI requires: at least one and at
    /// most `max_ranges` ranges (E2BIG), each non-empty, aligned to the page size and not
    /// overlapping another (EINVAL).
    pub(crate) fn start(ranges: &[DmaRange], page_size: u64, max_ranges: u32) -> Result<Self, Refused> {
        if !page_size.is_power_of_two() {
            return Err(refuse(
                libc::EINVAL,
                format!("page size {page_size} is not a power of two"),
            ));
        }
        let page_size = page_size.max(MIN_PAGE_SIZE);
        if ranges.is_empty() {
            return Err(refuse(libc::EINVAL, "no ranges".to_string()));
        }
        if ranges.len() > max_ranges as usize {
            return Err(refuse(
                libc::E2BIG,
                format!("{} ranges, the device takes at most {max_ranges}", ranges.len()),
            ));
        }
        let mut sorted = ranges.to_vec();
        sorted.sort();
        for r in &sorted {
            if r.length == 0 {
                return Err(refuse(libc::EINVAL, format!("empty range at {:#x}", r.iova)));
            }
            if r.iova % page_size != 0 || r.length % page_size != 0 {
                return Err(refuse(
                    libc::EINVAL,
                    format!(
                        "range {:#x}+{:#x} is not aligned to the page size {page_size:#x}",
                        r.iova, r.length
                    ),
                ));
            }
            if r.iova.checked_add(r.length).is_none() {
                return Err(refuse(
                    libc::EINVAL,
                    format!("range {:#x}+{:#x} wraps around", r.iova, r.length),
                ));
            }
        }
        for w in sorted.windows(2) {
            if w[0].iova + w[0].length > w[1].iova {
                return Err(refuse(
                    libc::EINVAL,
                    format!(
                        "ranges {:#x}+{:#x} and {:#x}+{:#x} overlap",
                        w[0].iova, w[0].length, w[1].iova, w[1].length
                    ),
                ));
            }
        }
        Ok(Self {
            page_size,
            ranges: sorted,
            dirty: BTreeSet::new(),
        })
    }

    /// The page size the log works at.
    pub(crate) fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The device wrote `[iova, iova + len)`: mark the logged pages it touches.
    pub(crate) fn mark(&mut self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = iova.saturating_add(len);
        for r in &self.ranges {
            let lo = iova.max(r.iova);
            let hi = end.min(r.iova + r.length);
            if lo < hi {
                let first = lo / self.page_size;
                let last = (hi - 1) / self.page_size;
                self.dirty.extend(first..=last);
            }
        }
    }

    /// Read and clear the log of `[iova, iova + length)` into `bitmap` at `page_size` per bit.
    /// Only sets bits. A logged page that overlaps the range is reported and cleared whole.
    pub(crate) fn report(&mut self, iova: u64, length: u64, page_size: u64, bitmap: &mut [u64]) -> Result<(), Refused> {
        if !page_size.is_power_of_two() || page_size < MIN_PAGE_SIZE {
            return Err(refuse(
                libc::EINVAL,
                format!("report page size {page_size} is not a power of two >= {MIN_PAGE_SIZE}"),
            ));
        }
        if length == 0 {
            return Err(refuse(libc::EINVAL, "empty report range".to_string()));
        }
        let Some(end) = iova.checked_add(length) else {
            return Err(refuse(
                libc::EINVAL,
                format!("report range {iova:#x}+{length:#x} wraps around"),
            ));
        };
        let bits = length.div_ceil(page_size);
        let words = bits.div_ceil(64);
        if (bitmap.len() as u64) < words {
            return Err(refuse(
                libc::EINVAL,
                format!(
                    "bitmap of {} words, the range needs {words} ({bits} pages)",
                    bitmap.len()
                ),
            ));
        }
        let lps = self.page_size;
        let first = iova / lps;
        let last = end.div_ceil(lps); // exclusive
        let pages: Vec<u64> = self.dirty.range(first..last).copied().collect();
        for p in pages {
            self.dirty.remove(&p);
            let lo = (p * lps).max(iova);
            let hi = ((p + 1).saturating_mul(lps)).min(end);
            let n0 = (lo - iova) / page_size;
            let n1 = (hi - 1 - iova) / page_size;
            for n in n0..=n1 {
                bitmap[(n / 64) as usize] |= 1 << (n % 64);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(iova: u64, length: u64) -> DmaRange {
        DmaRange { iova, length }
    }

    #[test]
    fn start_checks_ranges() {
        assert_eq!(DmaLog::start(&[r(0, 8192)], 4096, 4).unwrap().page_size(), 4096);
        assert_eq!(DmaLog::start(&[r(0, 8192)], 1024, 4).unwrap().page_size(), 4096);
        assert_eq!(
            DmaLog::start(&[r(0, 1 << 21)], 1 << 21, 4).unwrap().page_size(),
            1 << 21
        );
        let errno = |res: Result<DmaLog, Refused>| res.unwrap_err().errno;
        assert_eq!(errno(DmaLog::start(&[r(0, 8192)], 3000, 4)), libc::EINVAL);
        assert_eq!(errno(DmaLog::start(&[r(0, 8192)], 0, 4)), libc::EINVAL);
        assert_eq!(errno(DmaLog::start(&[], 4096, 4)), libc::EINVAL);
        assert_eq!(errno(DmaLog::start(&[r(0, 0)], 4096, 4)), libc::EINVAL);
        assert_eq!(errno(DmaLog::start(&[r(100, 4096)], 4096, 4)), libc::EINVAL);
        assert_eq!(errno(DmaLog::start(&[r(0, 4097)], 4096, 4)), libc::EINVAL);
        assert_eq!(
            errno(DmaLog::start(&[r(0, 8192), r(4096, 4096)], 4096, 4)),
            libc::EINVAL
        );
        assert_eq!(errno(DmaLog::start(&[r(u64::MAX - 4095, 8192)], 4096, 4)), libc::EINVAL);
        let many: Vec<_> = (0..5).map(|i| r(i * 8192, 4096)).collect();
        assert_eq!(errno(DmaLog::start(&many, 4096, 4)), libc::E2BIG);
        assert!(DmaLog::start(&many[..4], 4096, 4).is_ok());
    }

    #[test]
    fn report_reads_and_clears_page_accurately() {
        let mut log = DmaLog::start(&[r(0x10000, 0x10000), r(0x40000, 0x4000)], 4096, 8).unwrap();
        log.mark(0x10000, 1); // page 0 of range 1
        log.mark(0x12fff, 2); // pages 2 and 3
        log.mark(0x30000, 0x1000); // outside every range: ignored
        log.mark(0x43000, 0x10000); // last page of range 2 only
        let mut bm = [0u64; 1];
        log.report(0x10000, 0x10000, 4096, &mut bm).unwrap();
        assert_eq!(bm[0], 0b1101);
        let mut bm = [0u64; 1];
        log.report(0x10000, 0x10000, 4096, &mut bm).unwrap();
        assert_eq!(bm[0], 0, "report clears");
        let mut bm = [0u64; 1];
        log.report(0x40000, 0x4000, 4096, &mut bm).unwrap();
        assert_eq!(bm[0], 0b1000);
        // Coarser report pages and bits only set.
        log.mark(0x10000, 0x10000);
        let mut bm = [1u64 << 40];
        log.report(0x10000, 0x10000, 0x8000, &mut bm).unwrap();
        assert_eq!(bm[0], 0b11 | 1 << 40);
        let errno = |res: Result<(), Refused>| res.unwrap_err().errno;
        assert_eq!(errno(log.report(0, 0, 4096, &mut [0])), libc::EINVAL);
        assert_eq!(errno(log.report(0, 4096, 2048, &mut [0])), libc::EINVAL);
        assert_eq!(errno(log.report(0, 65 * 4096, 4096, &mut [0])), libc::EINVAL);
        assert_eq!(errno(log.report(u64::MAX, 2, 4096, &mut [0])), libc::EINVAL);
    }
}
