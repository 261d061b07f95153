//! Dirty ranges and sorted, coalesced range tables.
//!
//! A [`DirtyRange`] is `{ gpa, length }` with the layout of Cloud Hypervisor's `MemoryRange`. A
//! [`RangeTable`] keeps its ranges sorted by address, non-empty, non-overlapping and coalesced (no
//! two ranges touch), so its [`effective_size`](RangeTable::effective_size) is the number of dirty
//! bytes and two tables merge in one linear pass ([`RangeTable::merge`]).
//!
//! Ranges are half-open `[gpa, gpa + length)`. A range whose end would pass `u64::MAX` is cut at
//! `u64::MAX` (no such memory exists).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;

use super::bitmap;

/// A range of guest-physical (or, before translation, IOVA) addresses: `[gpa, gpa + length)`.
///
/// `#[repr(C)]` with the same fields and order as Cloud Hypervisor's `MemoryRange`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirtyRange {
    /// First address.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
}

impl DirtyRange {
    /// A new range.
    ///
    /// ```
    /// use vfio_migration::dirty::DirtyRange;
    /// let r = DirtyRange::new(0x1000, 0x2000);
    /// assert_eq!(r.end(), 0x3000);
    /// ```
    pub const fn new(gpa: u64, length: u64) -> Self {
        Self { gpa, length }
    }

    /// The range `[start, end)` (empty when `end <= start`).
    pub const fn from_bounds(start: u64, end: u64) -> Self {
        Self {
            gpa: start,
            length: end.saturating_sub(start),
        }
    }

    /// One past the last address (cut at `u64::MAX`).
    pub const fn end(&self) -> u64 {
        self.gpa.saturating_add(self.length)
    }

    /// Whether the range holds no byte.
    pub const fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Whether `addr` lies inside the range.
    pub const fn contains(&self, addr: u64) -> bool {
        addr >= self.gpa && addr < self.end()
    }

    /// The common part of two ranges, if any.
    pub fn intersect(&self, other: &DirtyRange) -> Option<DirtyRange> {
        let start = self.gpa.max(other.gpa);
        let end = self.end().min(other.end());
        (start < end).then(|| DirtyRange::from_bounds(start, end))
    }

    /// The range widened to whole pages of `page_size` (a power of two); the end is cut at the
    /// last whole page below `u64::MAX`.
    pub fn align_out(&self, page_size: u64) -> DirtyRange {
        debug_assert!(page_size.is_power_of_two());
        let mask = page_size - 1;
        let start = self.gpa & !mask;
        let end = match self.end().checked_add(mask) {
            Some(e) => e & !mask,
            None => !mask,
        };
        DirtyRange::from_bounds(start, end)
    }
}

impl fmt::Display for DirtyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.gpa, self.end())
    }
}

/// A sorted, coalesced, deduplicated table of dirty ranges.
///
/// Invariants (kept by every method): ranges are non-empty, sorted by address, and each range
/// ends strictly before the next one starts (overlapping or touching ranges are merged).
///
/// ```
/// use vfio_migration::dirty::{DirtyRange, RangeTable};
/// let mut t = RangeTable::new();
/// t.push(DirtyRange::new(0x3000, 0x1000));
/// t.push(DirtyRange::new(0x0000, 0x1000));
/// t.push(DirtyRange::new(0x1000, 0x1000)); // touches both neighbours: one range
/// t.push(DirtyRange::new(0x2000, 0x2000));
/// assert_eq!(t.as_slice(), &[DirtyRange::new(0, 0x4000)]);
/// assert_eq!(t.effective_size(), 0x4000);
/// ```
#[derive(Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeTable {
    ranges: Vec<DirtyRange>,
}

impl Clone for RangeTable {
    fn clone(&self) -> Self {
        Self {
            ranges: self.ranges.clone(),
        }
    }

    /// Copies `source` into this table's allocation (grown only when too small): what the
    /// all-dirty tracker does every round.
    fn clone_from(&mut self, source: &Self) {
        self.ranges.clone_from(&source.ranges);
    }
}

impl RangeTable {
    /// An empty table.
    pub const fn new() -> Self {
        Self { ranges: Vec::new() }
    }

    /// An empty table with room for `capacity` ranges.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            ranges: Vec::with_capacity(capacity),
        }
    }

    /// The ranges in `ranges`, in any order, possibly overlapping: sorted and coalesced.
    pub fn from_ranges(ranges: impl IntoIterator<Item = DirtyRange>) -> Self {
        let mut v: Vec<DirtyRange> = ranges.into_iter().filter(|r| !r.is_empty()).collect();
        v.sort_unstable_by_key(|r| r.gpa);
        let mut t = Self::with_capacity(v.len());
        for r in v {
            t.push_sorted(r);
        }
        t
    }

    /// The table of the set bits of a dirty bitmap: bit `n` (word `n / 64`, bit `n % 64`) marks
    /// the page `[start + n * page_size, start + (n + 1) * page_size)`.
    ///
    /// Whole words are scanned at once, words without a run boundary are skipped without a
    /// branch per word, and the ranges are written straight into the table's vector (no
    /// capacity check per range; see [`bitmap`] for how, and [`bitmap::conversion_path`] for
    /// the SIMD level picked at run time). A large, dense output is allocated once, at its exact
    /// size (past 1 MiB of ranges the rest of the bitmap is counted), in transparent huge pages
    /// up to 256 MiB on Linux: page faults are most of what writing millions of ranges into
    /// fresh memory costs. A `page_size` of 0 gives an empty table. To convert into an existing allocation (a tracker
    /// does this every round), use [`fill_from_bitmap`](Self::fill_from_bitmap).
    ///
    /// ```
    /// use vfio_migration::dirty::{DirtyRange, RangeTable};
    /// let t = RangeTable::from_bitmap(&[0b0110, 1 << 63, 1], 0x10000, 0x1000);
    /// assert_eq!(
    ///     t.as_slice(),
    ///     &[DirtyRange::new(0x11000, 0x2000), DirtyRange::new(0x10000 + 127 * 0x1000, 0x2000)]
    /// );
    /// ```
    pub fn from_bitmap(words: &[u64], start: u64, page_size: u64) -> Self {
        let mut t = Self::new();
        t.extend_from_bitmap(words, start, page_size);
        t
    }

    /// Replace the table's ranges with the set bits of a dirty bitmap (as in
    /// [`from_bitmap`](Self::from_bitmap)), keeping the allocation: converting every round into
    /// the same table writes into memory that is already mapped, with no page fault (a fresh
    /// table of millions of ranges takes one per 2 MiB at best, per 4 KiB at worst).
    ///
    /// ```
    /// use vfio_migration::dirty::{DirtyRange, RangeTable};
    /// let mut t = RangeTable::with_capacity(1024);
    /// t.fill_from_bitmap(&[0b1011], 0, 0x1000);
    /// assert_eq!(t.as_slice(), &[DirtyRange::new(0, 0x2000), DirtyRange::new(0x3000, 0x1000)]);
    /// t.fill_from_bitmap(&[0, 1], 0, 0x1000);
    /// assert_eq!(t.as_slice(), &[DirtyRange::new(64 * 0x1000, 0x1000)]);
    /// ```
    pub fn fill_from_bitmap(&mut self, words: &[u64], start: u64, page_size: u64) {
        self.ranges.clear();
        self.extend_from_bitmap(words, start, page_size);
    }

    /// Add the set bits of a dirty bitmap (as in [`from_bitmap`](Self::from_bitmap)).
    pub fn extend_from_bitmap(&mut self, words: &[u64], start: u64, page_size: u64) {
        self.extend_from_bitmap_clamped(words, start, page_size, u64::MAX);
    }

    /// Add the set bits of a dirty bitmap, cutting the ranges at `limit` (exclusive): bits for
    /// pages at or past `limit` are ignored, a page that straddles it is cut.
    pub fn extend_from_bitmap_clamped(&mut self, words: &[u64], start: u64, page_size: u64, limit: u64) {
        if page_size == 0 || limit <= start {
            return;
        }
        if self.ranges.last().is_some_and(|last| last.end() > start) {
            // The bitmap lies before (or inside) what the table holds: convert apart and merge.
            let mut t = RangeTable::new();
            t.extend_from_bitmap_clamped(words, start, page_size, limit);
            self.merge_in(&t);
            return;
        }
        // Words wholly past the limit hold nothing to add.
        let pages = (limit - start).div_ceil(page_size);
        let words = match usize::try_from(bitmap::words_for_pages(pages)) {
            Ok(n) if n < words.len() => &words[..n],
            _ => words,
        };
        let bits = words.len() as u64 * 64;
        if bits.checked_mul(page_size).and_then(|b| b.checked_add(start)).is_some() {
            // No address can overflow: plain arithmetic, and the limit only concerns the last
            // ranges (addresses only grow), so it is applied once at the end. A last range that
            // ends where the bitmap starts is taken out and handed over as an open run: the first
            // run continues it, or it is put back as it was.
            let join = match self.ranges.last() {
                Some(last) if last.end() == start => self.ranges.pop().map(|last| last.gpa),
                _ => None,
            };
            bitmap::append_ranges(&mut self.ranges, words, start, page_size, join);
            while self.ranges.last().is_some_and(|r| r.gpa >= limit) {
                self.ranges.pop();
            }
            if let Some(last) = self.ranges.last_mut()
                && last.end() > limit
            {
                last.length = limit - last.gpa;
            }
        } else {
            let addr = move |bit: u64| bit.saturating_mul(page_size).saturating_add(start);
            self.append_runs(words, move |[first, end]| {
                DirtyRange::from_bounds(addr(first), addr(end).min(limit))
            });
            // Runs cut to nothing by the limit or the top of the address space are all at the
            // end: addresses only grow.
            while self.ranges.last().is_some_and(DirtyRange::is_empty) {
                self.ranges.pop();
            }
        }
    }

    /// Append the runs of `words` at the end of the table, `range` turning a run `[first, end)`
    /// of bit numbers into a range (increasing with the run, possibly empty). The table's last
    /// range ends at or before the first range's address. (The path for bitmaps whose addresses
    /// may pass `u64::MAX`; the others go through [`bitmap::append_ranges`].)
    #[inline(always)]
    fn append_runs(&mut self, words: &[u64], range: impl Fn([u64; 2]) -> DirtyRange) {
        // Runs of one bitmap are separated by at least one clear page, so only the first one can
        // touch the table's last range.
        let mut join = !self.ranges.is_empty();
        let ranges = &mut self.ranges;
        bitmap::for_each_run_batch(words, |mut runs| {
            if join {
                join = false;
                if let Some((&first, rest)) = runs.split_first() {
                    push_checked(ranges, range(first));
                    runs = rest;
                }
            }
            ranges.extend(runs.iter().map(|&run| range(run)));
        });
    }

    /// The number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The number of ranges the table holds without reallocating.
    pub fn capacity(&self) -> usize {
        self.ranges.capacity()
    }

    /// Whether the table holds no range.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges, sorted and coalesced.
    pub fn as_slice(&self) -> &[DirtyRange] {
        &self.ranges
    }

    /// An iterator over the ranges.
    pub fn iter(&self) -> std::slice::Iter<'_, DirtyRange> {
        self.ranges.iter()
    }

    /// The ranges as a vector.
    pub fn into_vec(self) -> Vec<DirtyRange> {
        self.ranges
    }

    /// Remove every range (keeps the allocation).
    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// The number of bytes covered (each byte once).
    pub fn effective_size(&self) -> u64 {
        self.ranges.iter().fold(0u64, |acc, r| acc.saturating_add(r.length))
    }

    /// Whether `addr` is inside one of the ranges.
    pub fn contains(&self, addr: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.gpa <= addr);
        i > 0 && self.ranges[i - 1].contains(addr)
    }

    /// Add a range, keeping the invariants. Appending in address order costs O(1); an insertion
    /// before the end costs O(n) at worst.
    pub fn push(&mut self, range: DirtyRange) {
        push_checked(&mut self.ranges, range);
    }

    /// Append a non-empty range that starts at or after the last range's start.
    #[inline]
    fn push_sorted(&mut self, range: DirtyRange) {
        push_sorted(&mut self.ranges, range);
    }

    /// Merge several tables into one sorted, coalesced, deduplicated table.
    ///
    /// A linear k-way merge (two-pointer for two tables, a heap over the table heads for more):
    /// O(n) for two tables, O(n log k) for k, never a sort of the concatenation.
    ///
    /// ```
    /// use vfio_migration::dirty::{DirtyRange, RangeTable};
    /// let a = RangeTable::from_ranges([DirtyRange::new(0, 0x2000), DirtyRange::new(0x8000, 0x1000)]);
    /// let b = RangeTable::from_ranges([DirtyRange::new(0x1000, 0x2000)]);
    /// let m = RangeTable::merge(&[&a, &b]);
    /// assert_eq!(m.as_slice(), &[DirtyRange::new(0, 0x3000), DirtyRange::new(0x8000, 0x1000)]);
    /// ```
    pub fn merge(tables: &[&RangeTable]) -> RangeTable {
        let mut out = RangeTable::new();
        Self::merge_into(tables, &mut out);
        out
    }

    /// [`merge`](Self::merge) into `out` (its ranges replaced, its allocation kept: a tracker
    /// merging the reports of several devices every round does it into the same table).
    ///
    /// ```
    /// use vfio_migration::dirty::{DirtyRange, RangeTable};
    /// let a = RangeTable::from_ranges([DirtyRange::new(0, 0x1000)]);
    /// let b = RangeTable::from_ranges([DirtyRange::new(0x1000, 0x1000)]);
    /// let mut out = RangeTable::from_ranges([DirtyRange::new(0x9000, 0x1000)]);
    /// RangeTable::merge_into(&[&a, &b], &mut out);
    /// assert_eq!(out.as_slice(), &[DirtyRange::new(0, 0x2000)]);
    /// ```
    pub fn merge_into(tables: &[&RangeTable], out: &mut RangeTable) {
        match tables {
            [] => out.clear(),
            [one] => out.clone_from(one),
            [a, b] => merge_two(a.as_slice(), b.as_slice(), &mut out.ranges),
            _ => merge_many(tables, out),
        }
    }

    /// Merge the tables of an iterator (see [`merge`](Self::merge)).
    pub fn merge_from<'a>(tables: impl IntoIterator<Item = &'a RangeTable>) -> RangeTable {
        let v: Vec<&RangeTable> = tables.into_iter().collect();
        Self::merge(&v)
    }

    /// Merge `other` into this table (linear).
    pub fn merge_in(&mut self, other: &RangeTable) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() {
            self.ranges.extend_from_slice(&other.ranges);
            return;
        }
        let mut out = Vec::new();
        merge_two(&self.ranges, &other.ranges, &mut out);
        self.ranges = out;
    }

    /// The table covered with at most `max` ranges (at least one): the smallest gaps between
    /// neighbours are filled first, which adds the fewest bytes possible. Ties go to the lower
    /// address. Used when a device accepts fewer DMA logging ranges than the memory map has.
    ///
    /// ```
    /// use vfio_migration::dirty::{DirtyRange, RangeTable};
    /// let t = RangeTable::from_ranges([
    ///     DirtyRange::new(0, 10),
    ///     DirtyRange::new(100, 10), // gap of 90 before
    ///     DirtyRange::new(115, 10), // gap of 5 before
    /// ]);
    /// assert_eq!(t.coarsen(2).as_slice(), &[DirtyRange::new(0, 10), DirtyRange::new(100, 25)]);
    /// ```
    pub fn coarsen(&self, max: usize) -> RangeTable {
        let max = max.max(1);
        let n = self.ranges.len();
        if n <= max {
            return self.clone();
        }
        // Gap i lies between range i and range i + 1.
        let mut gaps: Vec<(u64, usize)> = self
            .ranges
            .windows(2)
            .enumerate()
            .map(|(i, w)| (w[1].gpa - w[0].end(), i))
            .collect();
        let fill = n - max;
        gaps.select_nth_unstable(fill - 1);
        let mut filled = vec![false; n - 1];
        for &(_, i) in &gaps[..fill] {
            filled[i] = true;
        }
        let mut out = RangeTable::with_capacity(max);
        let mut start = self.ranges[0].gpa;
        for (i, r) in self.ranges.iter().enumerate() {
            match filled.get(i) {
                Some(true) => {}
                Some(false) => {
                    out.ranges.push(DirtyRange::from_bounds(start, r.end()));
                    start = self.ranges[i + 1].gpa;
                }
                None => out.ranges.push(DirtyRange::from_bounds(start, r.end())),
            }
        }
        out
    }

    /// The table with every range widened to whole pages of `page_size` (a power of two).
    pub fn align_out(&self, page_size: u64) -> RangeTable {
        let mut out = RangeTable::with_capacity(self.len());
        for r in &self.ranges {
            out.push_sorted(r.align_out(page_size));
        }
        out
    }

    /// The parts of this table inside `bounds` (also a sorted, coalesced table).
    pub fn intersect(&self, bounds: &RangeTable) -> RangeTable {
        let mut out = RangeTable::new();
        self.intersect_into(bounds, &mut out);
        out
    }

    /// [`intersect`](Self::intersect) into `out` (its ranges replaced, its allocation kept).
    pub fn intersect_into(&self, bounds: &RangeTable, out: &mut RangeTable) {
        out.clear();
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.ranges, &bounds.ranges);
        while i < a.len() && j < b.len() {
            if let Some(r) = a[i].intersect(&b[j]) {
                out.push_sorted(r);
            }
            if a[i].end() <= b[j].end() {
                i += 1;
            } else {
                j += 1;
            }
        }
    }
}

/// [`RangeTable::push`] on the vector of a table.
#[inline]
fn push_checked(ranges: &mut Vec<DirtyRange>, range: DirtyRange) {
    if range.is_empty() {
        return;
    }
    match ranges.last() {
        None => ranges.push(range),
        Some(last) if range.gpa >= last.gpa => push_sorted(ranges, range),
        Some(_) => insert_slow(ranges, range),
    }
}

/// Append a non-empty range that starts at or after the last range's start, coalescing.
#[inline]
fn push_sorted(ranges: &mut Vec<DirtyRange>, range: DirtyRange) {
    if let Some(last) = ranges.last_mut() {
        let last_end = last.end();
        if range.gpa <= last_end {
            if range.end() > last_end {
                last.length = range.end() - last.gpa;
            }
            return;
        }
    }
    ranges.push(range);
}

/// Insert a non-empty range anywhere, merging with what it overlaps or touches.
fn insert_slow(ranges: &mut Vec<DirtyRange>, range: DirtyRange) {
    // First range that could touch: the first whose end is >= range.gpa.
    let lo = ranges.partition_point(|r| r.end() < range.gpa);
    // One past the last range that could touch: ranges starting at or before range.end().
    let hi = ranges.partition_point(|r| r.gpa <= range.end());
    if lo == hi {
        ranges.insert(lo, range);
        return;
    }
    let start = range.gpa.min(ranges[lo].gpa);
    let end = range.end().max(ranges[hi - 1].end());
    ranges[lo] = DirtyRange::from_bounds(start, end);
    ranges.drain(lo + 1..hi);
}

/// Merge two sorted, coalesced slices. Written without data-dependent branches (the choice of
/// input and the choice between extending the last range and starting a new one are selects),
/// so interleaved inputs cost no branch mispredictions.
fn merge_two(a: &[DirtyRange], b: &[DirtyRange], out: &mut Vec<DirtyRange>) {
    let total = a.len() + b.len();
    out.clear();
    if a.is_empty() || b.is_empty() {
        out.extend_from_slice(if a.is_empty() { b } else { a });
        return;
    }
    // Every output slot is written before it is read; a fresh zeroed vector is a fresh mapping
    // for large sizes (no extra pass).
    if out.capacity() == 0 {
        *out = vec![DirtyRange::default(); total];
    } else {
        out.resize(total, DirtyRange::default());
    }
    let (mut i, mut j) = (0usize, 0usize);
    let first = if a[0].gpa <= b[0].gpa {
        i = 1;
        a[0]
    } else {
        j = 1;
        b[0]
    };
    out[0] = first;
    let mut k = 0usize; // index of the last output range
    let mut cur_start = first.gpa;
    let mut cur_end = first.end();
    let mut step = |r: DirtyRange, out: &mut Vec<DirtyRange>| {
        let r_end = r.end();
        let extend = r.gpa <= cur_end;
        let next = k + usize::from(!extend);
        let start = if extend { cur_start } else { r.gpa };
        let end = if extend { cur_end.max(r_end) } else { r_end };
        out[next] = DirtyRange::from_bounds(start, end);
        k = next;
        cur_start = start;
        cur_end = end;
    };
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        let take_a = x.gpa <= y.gpa;
        let r = if take_a { x } else { y };
        i += usize::from(take_a);
        j += usize::from(!take_a);
        step(r, out);
    }
    for &r in a[i..].iter().chain(&b[j..]) {
        step(r, out);
    }
    out.truncate(k + 1);
}

/// A table's head in the k-way merge heap (smallest address first).
#[derive(PartialEq, Eq)]
struct Head {
    gpa: u64,
    table: usize,
    index: usize,
}

impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse for the smallest address first.
        other.gpa.cmp(&self.gpa).then(other.table.cmp(&self.table))
    }
}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn merge_many(tables: &[&RangeTable], out: &mut RangeTable) {
    let total = tables.iter().map(|t| t.len()).sum();
    out.clear();
    out.ranges.reserve(total);
    let mut heap: BinaryHeap<Head> = tables
        .iter()
        .enumerate()
        .filter_map(|(table, t)| {
            t.ranges.first().map(|r| Head {
                gpa: r.gpa,
                table,
                index: 0,
            })
        })
        .collect();
    while let Some(mut head) = heap.peek_mut() {
        let ranges = &tables[head.table].ranges;
        out.push_sorted(ranges[head.index]);
        head.index += 1;
        match ranges.get(head.index) {
            Some(r) => head.gpa = r.gpa,
            None => {
                std::collections::binary_heap::PeekMut::pop(head);
            }
        }
    }
}

impl<'a> IntoIterator for &'a RangeTable {
    type Item = &'a DirtyRange;
    type IntoIter = std::slice::Iter<'a, DirtyRange>;

    fn into_iter(self) -> Self::IntoIter {
        self.ranges.iter()
    }
}

impl IntoIterator for RangeTable {
    type Item = DirtyRange;
    type IntoIter = std::vec::IntoIter<DirtyRange>;

    fn into_iter(self) -> Self::IntoIter {
        self.ranges.into_iter()
    }
}

impl FromIterator<DirtyRange> for RangeTable {
    fn from_iter<I: IntoIterator<Item = DirtyRange>>(iter: I) -> Self {
        Self::from_ranges(iter)
    }
}

impl Extend<DirtyRange> for RangeTable {
    fn extend<I: IntoIterator<Item = DirtyRange>>(&mut self, iter: I) {
        for r in iter {
            self.push(r);
        }
    }
}

impl AsRef<[DirtyRange]> for RangeTable {
    fn as_ref(&self) -> &[DirtyRange] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check_invariants(t: &RangeTable) {
        for r in t.iter() {
            assert!(!r.is_empty(), "empty range in {t:?}");
        }
        for w in t.as_slice().windows(2) {
            assert!(w[0].end() < w[1].gpa, "unsorted or uncoalesced: {} {}", w[0], w[1]);
        }
    }

    /// The set of pages (page = 1 byte unit scaled) covered by ranges, the naive way.
    fn covered(ranges: &[DirtyRange], unit: u64, limit: u64) -> Vec<bool> {
        let mut v = vec![false; (limit / unit) as usize];
        for r in ranges {
            let mut a = r.gpa;
            while a < r.end() && a < limit {
                v[(a / unit) as usize] = true;
                a += unit;
            }
        }
        v
    }

    fn arb_ranges(max: usize) -> impl Strategy<Value = Vec<DirtyRange>> {
        proptest::collection::vec((0u64..256, 0u64..16), 0..max)
            .prop_map(|v| v.into_iter().map(|(a, l)| DirtyRange::new(a * 16, l * 16)).collect())
    }

    #[test]
    fn push_coalesces_in_every_direction() {
        let mut t = RangeTable::new();
        t.push(DirtyRange::new(100, 10));
        t.push(DirtyRange::new(0, 10));
        t.push(DirtyRange::new(50, 10));
        t.push(DirtyRange::new(200, 0));
        assert_eq!(t.len(), 3);
        t.push(DirtyRange::new(5, 100)); // swallows 50..60, touches 100..110
        assert_eq!(t.as_slice(), &[DirtyRange::new(0, 110)]);
        t.push(DirtyRange::new(110, 5));
        assert_eq!(t.as_slice(), &[DirtyRange::new(0, 115)]);
        assert_eq!(t.effective_size(), 115);
        assert!(t.contains(0) && t.contains(114) && !t.contains(115));
    }

    #[test]
    fn ranges_near_the_top_are_cut() {
        let mut t = RangeTable::new();
        t.push(DirtyRange::new(u64::MAX - 10, 100));
        t.push(DirtyRange::new(u64::MAX - 20, 100));
        assert_eq!(t.as_slice(), &[DirtyRange::from_bounds(u64::MAX - 20, u64::MAX)]);
        let b = RangeTable::from_bitmap(&[u64::MAX], u64::MAX - 4096, 4096);
        assert_eq!(b.as_slice(), &[DirtyRange::from_bounds(u64::MAX - 4096, u64::MAX)]);
        // Runs past the top of the address space vanish; the limit cuts a straddling page.
        let b = RangeTable::from_bitmap(&[0b1_0101], u64::MAX - 4096, 4096);
        assert_eq!(b.as_slice(), &[DirtyRange::from_bounds(u64::MAX - 4096, u64::MAX)]);
        let mut c = RangeTable::from_ranges([DirtyRange::new(0, 0x1000)]);
        c.extend_from_bitmap_clamped(&[0b1011, u64::MAX], 0x1000, 0x1000, 0x3800);
        assert_eq!(c.as_slice(), &[DirtyRange::new(0, 0x3000)]);
        c.extend_from_bitmap_clamped(&[u64::MAX], 0x8000, 0x1000, 0x8000);
        assert_eq!(c.as_slice(), &[DirtyRange::new(0, 0x3000)]);
    }

    #[test]
    fn merge_of_none_one_and_many() {
        assert!(RangeTable::merge(&[]).is_empty());
        let a = RangeTable::from_ranges([DirtyRange::new(0, 10), DirtyRange::new(40, 10)]);
        let b = RangeTable::from_ranges([DirtyRange::new(10, 10), DirtyRange::new(45, 20)]);
        let c = RangeTable::from_ranges([DirtyRange::new(100, 1), DirtyRange::new(0, 1)]);
        assert_eq!(RangeTable::merge(&[&a]), a);
        let m = RangeTable::merge_from([&a, &b, &c]);
        assert_eq!(
            m.as_slice(),
            &[DirtyRange::new(0, 20), DirtyRange::new(40, 25), DirtyRange::new(100, 1)]
        );
        let mut d = a.clone();
        d.merge_in(&b);
        assert_eq!(d, RangeTable::merge(&[&a, &b]));
    }

    #[test]
    fn intersect_clips_to_bounds() {
        let t = RangeTable::from_ranges([DirtyRange::new(0, 100), DirtyRange::new(200, 100)]);
        let b = RangeTable::from_ranges([DirtyRange::new(50, 200), DirtyRange::new(290, 5)]);
        assert_eq!(
            t.intersect(&b).as_slice(),
            &[
                DirtyRange::new(50, 50),
                DirtyRange::new(200, 50),
                DirtyRange::new(290, 5)
            ]
        );
    }

    #[test]
    fn coarsen_fills_the_smallest_gaps() {
        let t = RangeTable::from_ranges([
            DirtyRange::new(0, 10),
            DirtyRange::new(20, 10),  // gap 10
            DirtyRange::new(35, 10),  // gap 5
            DirtyRange::new(100, 10), // gap 55
            DirtyRange::new(115, 5),  // gap 5
        ]);
        assert_eq!(t.coarsen(5), t);
        assert_eq!(
            t.coarsen(3).as_slice(),
            &[
                DirtyRange::new(0, 10),
                DirtyRange::new(20, 25),
                DirtyRange::new(100, 20)
            ]
        );
        assert_eq!(t.coarsen(0).as_slice(), &[DirtyRange::new(0, 120)]);
        assert_eq!(t.coarsen(1), t.coarsen(0));
        assert!(RangeTable::new().coarsen(3).is_empty());
    }

    proptest! {
        #[test]
        fn coarsen_covers_everything_with_the_least_extra(ranges in arb_ranges(40), max in 0usize..20) {
            let t = RangeTable::from_ranges(ranges);
            let c = t.coarsen(max);
            check_invariants(&c);
            prop_assert!(c.len() <= max.max(1));
            prop_assert_eq!(c.len(), t.len().min(max.max(1)));
            prop_assert_eq!(t.intersect(&c), t.clone());
            let mut gaps: Vec<u64> = t.as_slice().windows(2).map(|w| w[1].gpa - w[0].end()).collect();
            gaps.sort_unstable();
            let fill = t.len().saturating_sub(max.max(1));
            let least: u64 = gaps[..fill].iter().sum();
            prop_assert_eq!(c.effective_size(), t.effective_size() + least);
        }

        #[test]
        fn extending_a_table_from_bitmaps_in_any_order_keeps_it_sorted(
            bitmaps in proptest::collection::vec(
                (proptest::collection::vec(any::<u64>(), 0..4), 0u64..64),
                0..6,
            ),
            initial in arb_ranges(10),
        ) {
            let mut t = RangeTable::from_ranges(initial.iter().copied());
            let mut want: Vec<DirtyRange> = initial.clone();
            for (words, start_page) in &bitmaps {
                let start = start_page * 16;
                t.extend_from_bitmap(words, start, 16);
                want.extend(RangeTable::from_bitmap(words, start, 16));
            }
            check_invariants(&t);
            prop_assert_eq!(&t, &RangeTable::from_ranges(want));
        }

        #[test]
        fn push_in_any_order_equals_naive_cover(ranges in arb_ranges(40)) {
            let mut t = RangeTable::new();
            for r in &ranges {
                t.push(*r);
            }
            check_invariants(&t);
            prop_assert_eq!(covered(t.as_slice(), 16, 5000), covered(&ranges, 16, 5000));
            prop_assert_eq!(&t, &RangeTable::from_ranges(ranges.iter().copied()));
        }

        #[test]
        fn merge_equals_union(tables in proptest::collection::vec(arb_ranges(20), 0..6)) {
            let tables: Vec<RangeTable> = tables.into_iter().map(RangeTable::from_ranges).collect();
            let refs: Vec<&RangeTable> = tables.iter().collect();
            let merged = RangeTable::merge(&refs);
            check_invariants(&merged);
            let all: Vec<DirtyRange> = tables.iter().flat_map(|t| t.iter().copied()).collect();
            prop_assert_eq!(&merged, &RangeTable::from_ranges(all.iter().copied()));
            prop_assert_eq!(covered(merged.as_slice(), 16, 5000), covered(&all, 16, 5000));
            // Pairwise merging gives the same table.
            let mut acc = RangeTable::new();
            for t in &tables {
                acc.merge_in(t);
            }
            prop_assert_eq!(&merged, &acc);
            // Into a table that held something else, keeping its allocation when it has room.
            let mut into = RangeTable::from_ranges([DirtyRange::new(1 << 40, 16)]);
            into.ranges.reserve(all.len() + 1);
            let at = into.as_slice().as_ptr();
            RangeTable::merge_into(&refs, &mut into);
            prop_assert_eq!(&merged, &into);
            prop_assert_eq!(into.as_slice().as_ptr(), at);
            if let [a, b, ..] = tables.as_slice() {
                let want = a.intersect(b);
                a.intersect_into(b, &mut into);
                prop_assert_eq!(&want, &into);
                prop_assert_eq!(into.as_slice().as_ptr(), at);
                into.clone_from(a);
                prop_assert_eq!(&into, a);
                prop_assert_eq!(into.as_slice().as_ptr(), at);
            }
        }
    }
}
