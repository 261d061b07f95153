//! Guest memory the client maps for the device's DMA (`VFIO_USER_DMA_MAP` / `UNMAP`), and the
//! device's writes to it.
//!
//! A DMA_MAP carries the memory's file descriptor (`SCM_RIGHTS`); the server maps it shared
//! (`MAP_SHARED`, at the message's file offset) after checking that the file is a regular one
//! (a memfd, a hugetlbfs or tmpfs file) long enough for the range, and closes the descriptor. A
//! DMA_MAP without a descriptor (memory the client cannot share), or with one that is not a
//! regular file, is accepted and recorded as unmapped: the device's writes to it are skipped.
//! At most [`MAX_MAPPINGS`] ranges, none over [`MAX_MAPPING_SIZE`], none overlapping another.
//!
//! Limit: a client that shrinks a mapped file afterwards makes the device's next write to the
//! lost part fault (`SIGBUS`), as with any vfio-user server that maps guest memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::time::Instant;

use memmap2::{MmapOptions, MmapRaw};

/// The most DMA ranges mapped at once.
pub const MAX_MAPPINGS: usize = 64;
/// The largest DMA range (1 TiB).
pub const MAX_MAPPING_SIZE: u64 = 1 << 40;
/// The granularity of the device's DMA writes (and of DMA_MAP addresses and sizes).
pub const DMA_PAGE: u64 = 4096;
/// The bytes one device DMA write puts at the start of a page (`u64` sequence number, `u64`
/// IOVA).
pub const WRITE_LEN: u64 = 16;
/// The most DMA writes the device makes between two messages (a long idle time does not turn
/// into a burst).
pub const MAX_WRITES_PER_TICK: u64 = 256;

/// A refused DMA_MAP or DMA_UNMAP.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// [`MAX_MAPPINGS`] ranges are mapped already.
    #[error("too many DMA mappings (at most {MAX_MAPPINGS})")]
    TooMany,
    /// A range that is empty, unaligned, wraps around or is too large.
    #[error("bad DMA range {iova:#x}+{size:#x}: {why}")]
    BadRange {
        /// The range's start.
        iova: u64,
        /// The range's length.
        size: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A range that overlaps a mapped one.
    #[error("DMA range {iova:#x}+{size:#x} overlaps a mapped one")]
    Overlap {
        /// The range's start.
        iova: u64,
        /// The range's length.
        size: u64,
    },
    /// An unmap that would split a mapped range.
    #[error("DMA unmap {iova:#x}+{size:#x} would split a mapped range")]
    Split {
        /// The range's start.
        iova: u64,
        /// The range's length.
        size: u64,
    },
    /// The file is shorter than the file offset plus the size.
    #[error("the file of {len} bytes does not hold {size:#x} bytes at offset {offset:#x}")]
    FileTooShort {
        /// The file's length.
        len: u64,
        /// The message's file offset.
        offset: u64,
        /// The range's length.
        size: u64,
    },
    /// `fstat` or `mmap` failed.
    #[error("map the DMA range's file: {0}")]
    Io(#[from] io::Error),
}

impl DmaError {
    /// The errno of the error reply.
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::TooMany => libc::ENOSPC,
            DmaError::Overlap { .. } => libc::EEXIST,
            DmaError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EINVAL,
        }
    }
}

/// One mapped range; `mem` is `None` for a range recorded without usable memory.
#[derive(Debug)]
struct Mapping {
    size: u64,
    mem: Option<MmapRaw>,
}

/// The DMA ranges of one connection, by IOVA. Dropping it unmaps them all.
#[derive(Debug, Default)]
pub struct DmaMappings {
    maps: BTreeMap<u64, Mapping>,
}

impl DmaMappings {
    /// How many ranges are recorded (mapped or not).
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether no range is recorded.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// How many ranges have memory the device can write.
    pub fn mapped(&self) -> usize {
        self.maps.values().filter(|m| m.mem.is_some()).count()
    }

    /// Record `[iova, iova + size)`, backed by `fd` at `offset` when given (see the [module
    /// documentation](self)). The descriptor is closed in every case.
    pub fn map(&mut self, iova: u64, size: u64, offset: u64, fd: Option<OwnedFd>) -> Result<(), DmaError> {
        let bad = |why| DmaError::BadRange { iova, size, why };
        if size == 0 {
            return Err(bad("empty"));
        }
        if size > MAX_MAPPING_SIZE {
            return Err(bad("larger than 1 TiB"));
        }
        if !iova.is_multiple_of(DMA_PAGE) || !size.is_multiple_of(DMA_PAGE) {
            return Err(bad("not aligned to 4 KiB"));
        }
        let end = iova.checked_add(size).ok_or_else(|| bad("wraps around"))?;
        if self.maps.len() >= MAX_MAPPINGS {
            return Err(DmaError::TooMany);
        }
        let before = self.maps.range(..end).next_back();
        if before.is_some_and(|(&start, m)| start + m.size > iova) {
            return Err(DmaError::Overlap { iova, size });
        }
        let mem = match fd {
            None => None,
            Some(fd) => map_file(File::from(fd), offset, size)?,
        };
        self.maps.insert(iova, Mapping { size, mem });
        Ok(())
    }

    /// Remove the ranges that lie in `[iova, iova + size)` (none is fine: nothing is mapped
    /// there); refuses (removing nothing) when a mapped range sticks out of it.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<usize, DmaError> {
        let end = iova.saturating_add(size);
        let hit: Vec<u64> = self
            .maps
            .range(..end)
            .filter(|(start, m)| **start + m.size > iova)
            .map(|(start, _)| *start)
            .collect();
        for start in &hit {
            if *start < iova || start + self.maps[start].size > end {
                return Err(DmaError::Split { iova, size });
            }
        }
        for start in &hit {
            self.maps.remove(start);
        }
        Ok(hit.len())
    }

    /// Remove every range.
    pub fn clear(&mut self) {
        self.maps.clear();
    }

    /// Write `data` to guest memory at `iova`; `false` (nothing written) unless the whole range
    /// lies in one mapped range with memory.
    pub fn write(&self, iova: u64, data: &[u8]) -> bool {
        let Some((&start, m)) = self.maps.range(..=iova).next_back() else {
            return false;
        };
        let Some(mem) = &m.mem else {
            return false;
        };
        let at = iova - start;
        if at
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > m.size || e > mem.len() as u64)
        {
            return false;
        }
        // SAFETY: `[at, at + data.len())` lies within the live shared mapping (checked above);
        // the guest may access the same memory concurrently, which for plain bytes written with
        // a raw copy (no reference to the memory is ever formed) is what DMA is.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), mem.as_mut_ptr().add(at as usize), data.len());
        }
        true
    }
}

/// Map `size` bytes of `file` at `offset` shared, or `None` when it is not a regular file.
fn map_file(file: File, offset: u64, size: u64) -> Result<Option<MmapRaw>, DmaError> {
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        log::warn!("DMA_MAP with a descriptor that is not a regular file: recorded as unmapped");
        return Ok(None);
    }
    if offset.checked_add(size).is_none_or(|e| e > meta.len()) {
        return Err(DmaError::FileTooShort {
            len: meta.len(),
            offset,
            size,
        });
    }
    let len = usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    let mem = MmapOptions::new().offset(offset).len(len).map_raw(&file)?;
    Ok(Some(mem))
}

/// The device's DMA writes at its rate, applied when a message arrives (like the emulated
/// device's own content changes, lazily from the time that passed).
#[derive(Debug)]
pub struct DmaEngine {
    last: Option<Instant>,
    /// Byte-nanoseconds not yet turned into a whole page write.
    acc: u128,
    rng: u64,
    seq: u64,
}

impl Default for DmaEngine {
    fn default() -> Self {
        Self {
            last: None,
            acc: 0,
            rng: 0x646d_615f_7772_6974,
            seq: 0,
        }
    }
}

impl DmaEngine {
    /// Make the writes of the time since the last call at `rate` bytes per second (one page
    /// per [`DMA_PAGE`] bytes, at most [`MAX_WRITES_PER_TICK`]) into pseudo-randomly chosen
    /// pages of `window`, through `maps`; `written(iova, len)` is told each write made (pages
    /// not mapped are skipped). Returns the writes made. Nothing accrues while `rate` is 0 or
    /// there is no window.
    pub fn tick(
        &mut self,
        rate: u64,
        window: Option<(u64, u64)>,
        maps: &DmaMappings,
        mut written: impl FnMut(u64, u64),
    ) -> u64 {
        let now = Instant::now();
        let elapsed = self.last.map_or(0, |t| now.saturating_duration_since(t).as_nanos());
        self.last = Some(now);
        let pages = window.and_then(|(addr, len)| {
            let first = addr.div_ceil(DMA_PAGE);
            let end = addr.checked_add(len)? / DMA_PAGE;
            (end > first).then_some((first, end - first))
        });
        let Some((first, count)) = pages.filter(|_| rate > 0 && !maps.is_empty()) else {
            self.acc = 0;
            return 0;
        };
        let unit = u128::from(DMA_PAGE) * 1_000_000_000;
        self.acc = self.acc.saturating_add(u128::from(rate) * elapsed);
        let n = u64::try_from(self.acc / unit).unwrap_or(u64::MAX);
        self.acc %= unit;
        let mut made = 0;
        for _ in 0..n.min(MAX_WRITES_PER_TICK) {
            let page = first + self.next() % count;
            let iova = page * DMA_PAGE;
            let mut data = [0u8; WRITE_LEN as usize];
            data[..8].copy_from_slice(&(self.seq + 1).to_le_bytes());
            data[8..].copy_from_slice(&iova.to_le_bytes());
            if maps.write(iova, &data) {
                self.seq += 1;
                made += 1;
                written(iova, WRITE_LEN);
            }
        }
        made
    }

    /// SplitMix64.
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file(len: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn map_checks_ranges_and_writes_stay_inside() {
        let mut m = DmaMappings::default();
        let f = file(3 * DMA_PAGE);
        m.map(0x10000, 2 * DMA_PAGE, DMA_PAGE, Some(f.try_clone().unwrap().into()))
            .unwrap();
        let errno = |r: Result<(), DmaError>| r.unwrap_err().errno();
        assert_eq!(errno(m.map(0x11000, DMA_PAGE, 0, None)), libc::EEXIST);
        assert_eq!(errno(m.map(0xf000, 2 * DMA_PAGE, 0, None)), libc::EEXIST);
        assert_eq!(errno(m.map(0, 0, 0, None)), libc::EINVAL);
        assert_eq!(errno(m.map(1, DMA_PAGE, 0, None)), libc::EINVAL);
        assert_eq!(errno(m.map(u64::MAX - 4095, 2 * DMA_PAGE, 0, None)), libc::EINVAL);
        assert_eq!(errno(m.map(0, MAX_MAPPING_SIZE * 2, 0, None)), libc::EINVAL);
        let short = Some(file(DMA_PAGE).into());
        assert_eq!(errno(m.map(0x40000, 2 * DMA_PAGE, 0, short)), libc::EINVAL);
        m.map(0x20000, DMA_PAGE, 0, None).unwrap();
        assert_eq!((m.len(), m.mapped()), (2, 1));
        assert!(m.write(0x11ff0, &[7; 16]));
        assert!(!m.write(0x11ff1, &[7; 16]), "past the end");
        assert!(!m.write(0x20000, &[7; 16]), "unmapped memory");
        assert!(!m.write(0xfff0, &[7; 16]));
        let mut b = [0u8; 16];
        f.read_exact_at(&mut b, 3 * DMA_PAGE - 16).unwrap();
        assert_eq!(b, [7; 16], "written at the file offset");
        assert_eq!(m.unmap(0x10000, DMA_PAGE).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(m.unmap(0x50000, DMA_PAGE).unwrap(), 0);
        assert_eq!(m.unmap(0, 1 << 20).unwrap(), 2);
        assert!(m.is_empty());
        for i in 0..MAX_MAPPINGS as u64 {
            m.map(i * DMA_PAGE, DMA_PAGE, 0, None).unwrap();
        }
        assert_eq!(errno(m.map(1 << 30, DMA_PAGE, 0, None)), libc::ENOSPC);
    }

    #[test]
    fn engine_writes_at_its_rate_inside_the_window() {
        let mut m = DmaMappings::default();
        let f = file(16 * DMA_PAGE);
        m.map(0, 16 * DMA_PAGE, 0, Some(f.try_clone().unwrap().into())).unwrap();
        let mut e = DmaEngine::default();
        let mut seen = Vec::new();
        assert_eq!(e.tick(1 << 30, Some((4 * DMA_PAGE, 4 * DMA_PAGE)), &m, |_, _| {}), 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let n = e.tick(1 << 30, Some((4 * DMA_PAGE, 4 * DMA_PAGE)), &m, |i, l| {
            seen.push((i, l))
        });
        assert_eq!(n, MAX_WRITES_PER_TICK, "capped");
        assert!(
            seen.iter()
                .all(|&(i, l)| (4 * DMA_PAGE..8 * DMA_PAGE).contains(&i) && l == WRITE_LEN)
        );
        for p in 0..16 {
            let mut b = [0u8; 16];
            f.read_exact_at(&mut b, p * DMA_PAGE).unwrap();
            assert_eq!(b != [0; 16], (4..8).contains(&p), "page {p}");
        }
        assert_eq!(e.tick(0, Some((0, DMA_PAGE)), &m, |_, _| {}), 0);
        assert_eq!(e.tick(1 << 30, None, &m, |_, _| {}), 0);
    }
}
