//! Guest memory ranges as the migration protocol carries them.
//!
//! [`MemoryRange`] is `repr(C)` (two native-endian `u64`s on the wire, as Cloud Hypervisor sends
//! it); [`MemoryRangeTable`] is a list of them, built from dirty bitmaps and concatenated from
//! several components.

use std::io::{Read, Write};

use anyhow::anyhow;
use serde::{Deserialize, Serialize};

use crate::MigratableError;

/// A range of guest physical memory.
#[repr(C)]
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
}

const RANGE_BYTES: usize = std::mem::size_of::<MemoryRange>();

impl MemoryRange {
    fn to_bytes(self) -> [u8; RANGE_BYTES] {
        let mut b = [0u8; RANGE_BYTES];
        b[..8].copy_from_slice(&self.gpa.to_ne_bytes());
        b[8..].copy_from_slice(&self.length.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8; RANGE_BYTES]) -> Self {
        let mut gpa = [0u8; 8];
        let mut length = [0u8; 8];
        gpa.copy_from_slice(&b[..8]);
        length.copy_from_slice(&b[8..]);
        MemoryRange {
            gpa: u64::from_ne_bytes(gpa),
            length: u64::from_ne_bytes(length),
        }
    }

    /// Read one range (its in-memory bytes) from `fd`.
    pub fn read_from(fd: &mut dyn Read) -> Result<MemoryRange, MigratableError> {
        let mut b = [0u8; RANGE_BYTES];
        fd.read_exact(&mut b).map_err(MigratableError::MigrateSocket)?;
        Ok(Self::from_bytes(&b))
    }

    /// Write the range (its in-memory bytes) to `fd`.
    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        fd.write_all(&self.to_bytes()).map_err(MigratableError::MigrateSocket)
    }
}

/// A set of guest memory ranges, sent as one migration payload.
#[derive(Clone, Default, Debug, Serialize, Deserialize)]
pub struct MemoryRangeTable {
    data: Vec<MemoryRange>,
}

impl MemoryRangeTable {
    /// The ranges.
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.data
    }

    /// The ranges (same as [`MemoryRangeTable::ranges`]).
    pub fn regions(&self) -> &[MemoryRange] {
        &self.data
    }

    /// Split into tables of at most `chunk_size` bytes each, splitting ranges where needed.
    /// The order of the chunks and of the ranges in them is unspecified.
    pub fn partition(self, chunk_size: u64) -> impl Iterator<Item = MemoryRangeTable> {
        let chunk_size = chunk_size.max(1);
        let mut rest = self.data;
        std::iter::from_fn(move || {
            let mut out = Vec::new();
            let mut size = 0u64;
            while size < chunk_size {
                let Some(r) = rest.pop() else { break };
                let room = chunk_size - size;
                if r.length > room {
                    // Keep the head for later, send the tail now.
                    rest.push(MemoryRange {
                        gpa: r.gpa,
                        length: r.length - room,
                    });
                    out.push(MemoryRange {
                        gpa: r.gpa + (r.length - room),
                        length: room,
                    });
                    size += room;
                } else {
                    size += r.length;
                    out.push(r);
                }
            }
            (!out.is_empty()).then_some(MemoryRangeTable { data: out })
        })
    }

    /// The dirty pages of a bitmap as ranges, adjacent pages merged: bit `n` (word `n / 64`,
    /// bit `n % 64`) set means the page at `start_addr + n * page_size` is dirty.
    pub fn from_dirty_bitmap(bitmap: impl IntoIterator<Item = u64>, start_addr: u64, page_size: u64) -> Self {
        let mut data: Vec<MemoryRange> = Vec::new();
        let mut run: Option<(u64, u64)> = None; // first page, page count
        for (w, mut word) in bitmap.into_iter().enumerate() {
            let base = w as u64 * 64;
            if word == 0 {
                continue;
            }
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                let ones = u64::from((word >> bit).trailing_ones());
                let page = base + bit;
                run = match run {
                    Some((first, count)) if first + count == page => Some((first, count + ones)),
                    Some((first, count)) => {
                        data.push(range_of(first, count, start_addr, page_size));
                        Some((page, ones))
                    }
                    None => Some((page, ones)),
                };
                // Clear the run just consumed (ones may be 64 when bit is 0).
                word = if bit + ones >= 64 {
                    0
                } else {
                    word & !(((1u64 << ones) - 1) << bit)
                };
            }
        }
        if let Some((first, count)) = run {
            data.push(range_of(first, count, start_addr, page_size));
        }
        Self { data }
    }

    /// Append a range.
    pub fn push(&mut self, range: MemoryRange) {
        self.data.push(range);
    }

    /// Read a table of `length` bytes (a whole number of ranges) from `fd`.
    pub fn read_from(fd: &mut dyn Read, length: u64) -> Result<MemoryRangeTable, MigratableError> {
        if !length.is_multiple_of(RANGE_BYTES as u64) {
            return Err(MigratableError::MigrateReceive(anyhow!(
                "memory range table of {length} bytes is not a whole number of {RANGE_BYTES}-byte ranges"
            )));
        }
        let mut data = Vec::new();
        let mut b = [0u8; RANGE_BYTES];
        for _ in 0..length / RANGE_BYTES as u64 {
            fd.read_exact(&mut b).map_err(MigratableError::MigrateSocket)?;
            data.push(MemoryRange::from_bytes(&b));
        }
        Ok(Self { data })
    }

    /// The table's size on the wire in bytes.
    pub fn length(&self) -> u64 {
        (RANGE_BYTES * self.data.len()) as u64
    }

    /// Write the table (its ranges' in-memory bytes) to `fd`.
    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        let mut out = Vec::with_capacity(RANGE_BYTES * self.data.len());
        for r in &self.data {
            out.extend_from_slice(&r.to_bytes());
        }
        fd.write_all(&out).map_err(MigratableError::MigrateSocket)
    }

    /// Whether the table has no ranges.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Append the ranges of `table`.
    pub fn extend(&mut self, table: Self) {
        self.data.extend(table.data);
    }

    /// The concatenation of `tables` (no merging, no deduplication).
    pub fn new_from_tables(tables: Vec<Self>) -> Self {
        let mut data = Vec::new();
        for table in tables {
            data.extend(table.data);
        }
        Self { data }
    }

    /// The sum of the ranges' lengths in bytes.
    pub fn effective_size(&self) -> u64 {
        self.data.iter().map(|r| r.length).sum()
    }
}

fn range_of(first: u64, count: u64, start_addr: u64, page_size: u64) -> MemoryRange {
    MemoryRange {
        gpa: start_addr + first * page_size,
        length: count * page_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(bitmap: &[u64], start: u64, ps: u64) -> Vec<MemoryRange> {
        let mut out: Vec<MemoryRange> = Vec::new();
        for n in 0..bitmap.len() as u64 * 64 {
            if bitmap[(n / 64) as usize] >> (n % 64) & 1 == 1 {
                let gpa = start + n * ps;
                match out.last_mut() {
                    Some(r) if r.gpa + r.length == gpa => r.length += ps,
                    _ => out.push(MemoryRange { gpa, length: ps }),
                }
            }
        }
        out
    }

    #[test]
    fn bitmap_to_ranges_matches_a_bit_by_bit_walk() {
        let cases: [&[u64]; 7] = [
            &[0b1111_1110_1110, 0b1_0000],
            &[u64::MAX, u64::MAX, 1],
            &[1 << 63, 1],
            &[0, 0],
            &[0x8000_0000_0000_0001, 0x8000_0000_0000_0001],
            &[0x5555_5555_5555_5555],
            &[u64::MAX << 1, u64::MAX >> 1],
        ];
        for c in cases {
            let t = MemoryRangeTable::from_dirty_bitmap(c.iter().copied(), 0x1000, 0x1000);
            assert_eq!(t.regions(), naive(c, 0x1000, 0x1000).as_slice(), "{c:x?}");
        }
        let t = MemoryRangeTable::from_dirty_bitmap([0b1111_1110_1110u64, 0b1_0000], 0x1000, 0x1000);
        assert_eq!(
            t.regions(),
            &[
                MemoryRange {
                    gpa: 0x2000,
                    length: 0x3000
                },
                MemoryRange {
                    gpa: 0x6000,
                    length: 0x7000
                },
                MemoryRange {
                    gpa: 0x1000 + 68 * 0x1000,
                    length: 0x1000
                },
            ]
        );
    }

    #[test]
    fn partition_covers_every_byte_within_the_chunk_size() {
        let t = MemoryRangeTable::from_dirty_bitmap([0b11_0011_0011_0011u64, 0b111], 0, 0x1000);
        let total = t.effective_size();
        let chunks: Vec<_> = t.clone().partition(5 * 0x1000).collect();
        assert!(chunks.iter().all(|c| c.effective_size() <= 5 * 0x1000));
        assert_eq!(chunks.iter().map(|c| c.effective_size()).sum::<u64>(), total);
        let mut pages: Vec<u64> = chunks
            .iter()
            .flat_map(|c| {
                c.regions()
                    .iter()
                    .flat_map(|r| (r.gpa..r.gpa + r.length).step_by(0x1000))
            })
            .collect();
        pages.sort_unstable();
        let mut want: Vec<u64> = t
            .regions()
            .iter()
            .flat_map(|r| (r.gpa..r.gpa + r.length).step_by(0x1000))
            .collect();
        want.sort_unstable();
        assert_eq!(pages, want);
    }

    #[test]
    fn tables_concatenate_and_round_trip_on_the_wire() {
        let a = MemoryRangeTable::from_dirty_bitmap([0b1u64], 0, 4096);
        let mut b = MemoryRangeTable::default();
        b.push(MemoryRange { gpa: 0, length: 4096 });
        let mut t = MemoryRangeTable::new_from_tables(vec![a.clone(), b]);
        t.extend(a);
        assert_eq!(t.regions().len(), 3);
        assert_eq!(t.effective_size(), 3 * 4096);
        let mut wire = Vec::new();
        t.write_to(&mut wire).unwrap();
        assert_eq!(wire.len() as u64, t.length());
        let back = MemoryRangeTable::read_from(&mut wire.as_slice(), t.length()).unwrap();
        assert_eq!(back.ranges(), t.ranges());
        assert!(MemoryRangeTable::read_from(&mut wire.as_slice(), 17).is_err());
    }
}
