//! Simulated guest memory, emulated DMA into it, and the iterative copy that proves that no
//! dirty page is lost.
//!
//! [`GuestMemory`] is a real anonymous memory mapping standing for guest RAM. [`DmaEngine`] is the
//! emulated device's DMA: it writes bytes into the memory and marks the pages in the device's DMA
//! log ([`crate::emulated::EmulatedHandle::dma_write`]), only while the device runs. Every DMA
//! write stores words that no earlier write stored at that address, so a page that is written and
//! not copied again always differs on the destination.
//!
//! [`run_dma_demo`] migrates the memory the way a VMM does: copy everything once, then copy the
//! dirty ranges the [`DeviceLogTracker`] reports, round after round, while the device keeps
//! writing (DMA bursts between the copied chunks); then stop the device, copy the last dirty
//! ranges and compare the destination with the source byte for byte. With
//! [`DmaDemoConfig::drop_last_written_page`] one dirty page is left out on purpose and the
//! comparison must fail.

use std::io;

use memmap2::MmapMut;

use crate::device::{DeviceError, MigrationDevice};
use crate::dirty::{DeviceLogConfig, DeviceLogTracker, DirtyError, DirtyRange, DirtyTracker, RangeTable};
use crate::emulated::{ActivityError, EmulatedDevice, EmulatedHandle};
use crate::state::DeviceState;

/// The page size of the comparison and of the demo's DMA log.
pub const PAGE: u64 = 4096;

/// A failure of the simulated memory or of the demo.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Mapping the memory failed.
    #[error("guest memory of {size:#x} bytes: {source}")]
    Map {
        /// The size asked for.
        size: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A size that is zero, not a whole number of pages, or beyond the address space.
    #[error("guest memory: invalid size {0:#x} (a non-zero multiple of 4 KiB is needed)")]
    Size(u64),
    /// An access outside the memory.
    #[error("guest memory {memory}: access {access} is outside")]
    OutOfBounds {
        /// The memory's range.
        memory: DirtyRange,
        /// The access.
        access: DirtyRange,
    },
    /// The two memories of a copy or comparison differ in placement or size.
    #[error("guest memories {0} and {1} do not match in placement")]
    Layout(DirtyRange, DirtyRange),
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// A device operation failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The device refused DMA (not running).
    #[error(transparent)]
    Activity(#[from] ActivityError),
}

/// Simulated guest RAM at guest-physical address `gpa`: an anonymous private mapping.
#[derive(Debug)]
pub struct GuestMemory {
    gpa: u64,
    map: MmapMut,
}

impl GuestMemory {
    /// `size` bytes (a multiple of 4 KiB) at `gpa`, zeroed.
    pub fn new(gpa: u64, size: u64) -> Result<Self, GuestError> {
        if size == 0 || !size.is_multiple_of(PAGE) || gpa.checked_add(size).is_none() {
            return Err(GuestError::Size(size));
        }
        let len = usize::try_from(size).map_err(|_| GuestError::Size(size))?;
        let map = MmapMut::map_anon(len).map_err(|source| GuestError::Map { size, source })?;
        Ok(Self { gpa, map })
    }

    /// The memory's guest-physical range.
    pub fn range(&self) -> DirtyRange {
        DirtyRange::new(self.gpa, self.map.len() as u64)
    }

    /// The memory as a one-range table (what the tracker tracks).
    pub fn table(&self) -> RangeTable {
        RangeTable::from_ranges([self.range()])
    }

    fn offset(&self, access: DirtyRange) -> Result<std::ops::Range<usize>, GuestError> {
        let mem = self.range();
        if access.gpa < mem.gpa || access.end() > mem.end() || access.gpa.checked_add(access.length).is_none() {
            return Err(GuestError::OutOfBounds { memory: mem, access });
        }
        let start = (access.gpa - mem.gpa) as usize;
        Ok(start..start + access.length as usize)
    }

    /// The bytes of `range`.
    pub fn bytes(&self, range: DirtyRange) -> Result<&[u8], GuestError> {
        let r = self.offset(range)?;
        Ok(&self.map[r])
    }

    /// Write `data` at `gpa`.
    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestError> {
        let r = self.offset(DirtyRange::new(gpa, data.len() as u64))?;
        self.map[r].copy_from_slice(data);
        Ok(())
    }

    /// Copy `range` from `src` (a memory at the same place).
    pub fn copy_from(&mut self, src: &GuestMemory, range: DirtyRange) -> Result<(), GuestError> {
        if src.range() != self.range() {
            return Err(GuestError::Layout(src.range(), self.range()));
        }
        let r = self.offset(range)?;
        self.map[r.clone()].copy_from_slice(&src.map[r]);
        Ok(())
    }

    /// Compare with `other` byte for byte: the pages that differ, or `Ok` when none does.
    pub fn compare(&self, other: &GuestMemory) -> Result<(), Mismatch> {
        if self.range() != other.range() {
            return Err(Mismatch {
                first_gpa: self.gpa,
                pages: u64::MAX,
            });
        }
        let mut first = None;
        let mut pages = 0u64;
        for (i, (a, b)) in self
            .map
            .chunks(PAGE as usize)
            .zip(other.map.chunks(PAGE as usize))
            .enumerate()
        {
            if a != b {
                first.get_or_insert(self.gpa + i as u64 * PAGE);
                pages += 1;
            }
        }
        match first {
            Some(first_gpa) => Err(Mismatch { first_gpa, pages }),
            None => Ok(()),
        }
    }
}

/// Pages that differ between source and destination memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{pages} pages differ, the first at {first_gpa:#x}")]
pub struct Mismatch {
    /// The first differing page.
    pub first_gpa: u64,
    /// How many pages differ (`u64::MAX`: the memories do not even match in layout).
    pub pages: u64,
}

/// The word a DMA write with sequence number `seq` stores at `addr` (seq 0: the initial
/// content). For a given address, different sequence numbers give different words.
fn word(seq: u64, addr: u64) -> u64 {
    seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ addr.rotate_left(17)
}

/// The emulated device's DMA into guest memory.
#[derive(Debug)]
pub struct DmaEngine {
    handle: EmulatedHandle,
    seq: u64,
    rng: u64,
    max_len: u64,
    last_write: Option<DirtyRange>,
    writes: u64,
}

impl DmaEngine {
    /// DMA for the device behind `handle`; writes of up to `max_len` bytes (at least 8), at
    /// places picked from `seed`.
    pub fn new(handle: EmulatedHandle, seed: u64, max_len: u64) -> Self {
        Self {
            handle,
            seq: 0,
            rng: seed,
            max_len: max_len.max(8),
            last_write: None,
            writes: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// One DMA write of `len` bytes (a multiple of 8) at `gpa` (8-byte aligned): the bytes land
    /// in `memory`, then the device logs the pages. Refused when the device is not running.
    pub fn write(&mut self, memory: &mut GuestMemory, gpa: u64, len: u64) -> Result<(), GuestError> {
        let range = DirtyRange::new(gpa & !7, len.div_ceil(8) * 8);
        // Check bounds and the device state before touching memory: a stopped device writes
        // nothing.
        memory.bytes(range)?;
        self.handle.dma_write(range.gpa, range.length)?;
        self.seq += 1;
        let data: Vec<u8> = (0..range.length / 8)
            .flat_map(|i| word(self.seq, range.gpa + i * 8).to_le_bytes())
            .collect();
        memory.write(range.gpa, &data)?;
        self.last_write = Some(range);
        self.writes += 1;
        Ok(())
    }

    /// `n` writes at pseudo-random places of `memory`.
    pub fn burst(&mut self, memory: &mut GuestMemory, n: u64) -> Result<(), GuestError> {
        let mem = memory.range();
        for _ in 0..n {
            let len = 8 * (1 + self.next() % (self.max_len / 8));
            let len = len.min(mem.length);
            let gpa = mem.gpa + (self.next() % ((mem.length - len) / 8 + 1)) * 8;
            self.write(memory, gpa, len)?;
        }
        Ok(())
    }

    /// The last write made.
    pub fn last_write(&self) -> Option<DirtyRange> {
        self.last_write
    }

    /// The number of writes made.
    pub fn writes(&self) -> u64 {
        self.writes
    }
}

/// Settings of [`run_dma_demo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaDemoConfig {
    /// Guest memory size in bytes (a multiple of 4 KiB).
    pub memory: u64,
    /// Copy rounds while the device runs (the first copies everything).
    pub rounds: usize,
    /// DMA writes between two copied chunks.
    pub writes_per_burst: u64,
    /// The largest DMA write in bytes.
    pub max_write: u64,
    /// Bytes copied between two DMA bursts.
    pub chunk: u64,
    /// Seed of the DMA places.
    pub seed: u64,
    /// Leave the last written page out of the final copy, on purpose (the check must fail).
    pub drop_last_written_page: bool,
}

impl Default for DmaDemoConfig {
    /// 64 MiB, 5 rounds, 16 writes of up to 16 KiB between 1 MiB chunks.
    fn default() -> Self {
        Self {
            memory: 64 << 20,
            rounds: 5,
            writes_per_burst: 16,
            max_write: 16 << 10,
            chunk: 1 << 20,
            seed: 1,
            drop_last_written_page: false,
        }
    }
}

/// One copy round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Round {
    /// Bytes copied (all memory in round 0, the dirty bytes after).
    pub copied: u64,
    /// Ranges copied.
    pub ranges: usize,
    /// Whether the device was stopped (the final round).
    pub device_stopped: bool,
}

/// What [`run_dma_demo`] did and found.
#[derive(Debug)]
pub struct DmaDemoReport {
    /// Every copy round, the final one (device stopped) last.
    pub rounds: Vec<Round>,
    /// DMA writes the device made.
    pub dma_writes: u64,
    /// The page left out on purpose, if any.
    pub dropped: Option<DirtyRange>,
    /// The byte-for-byte comparison of destination and source.
    pub verified: Result<(), Mismatch>,
}

/// Copy `ranges` from `src` to `dst` in chunks, with a DMA burst after each chunk (when `dma`
/// is given), leaving out `skip`.
fn copy_round(
    src: &mut GuestMemory,
    dst: &mut GuestMemory,
    ranges: &RangeTable,
    mut dma: Option<&mut DmaEngine>,
    cfg: &DmaDemoConfig,
    skip: Option<DirtyRange>,
) -> Result<u64, GuestError> {
    let chunk = cfg.chunk.max(PAGE);
    let mut copied = 0;
    for r in ranges {
        let mut at = r.gpa;
        while at < r.end() {
            let piece = DirtyRange::from_bounds(at, (at + chunk).min(r.end()));
            let parts = match skip.and_then(|s| s.intersect(&piece)) {
                Some(s) => [
                    DirtyRange::from_bounds(piece.gpa, s.gpa),
                    DirtyRange::from_bounds(s.end(), piece.end()),
                ],
                None => [piece, DirtyRange::default()],
            };
            for p in parts.iter().filter(|p| !p.is_empty()) {
                dst.copy_from(src, *p)?;
                copied += p.length;
            }
            if let Some(dma) = dma.as_deref_mut() {
                dma.burst(src, cfg.writes_per_burst)?;
            }
            at = piece.end();
        }
    }
    Ok(copied)
}

/// Migrate simulated guest memory while `device` writes into it by DMA, tracking with the
/// device's DMA log, and compare destination and source at the end (see the module
/// documentation). `device` must be running; it is stopped before the final round.
pub fn run_dma_demo(device: EmulatedDevice, cfg: &DmaDemoConfig) -> Result<DmaDemoReport, GuestError> {
    let mut src = GuestMemory::new(0, cfg.memory)?;
    let mut dst = GuestMemory::new(0, cfg.memory)?;
    let initial: Vec<u8> = (0..cfg.memory / 8).flat_map(|i| word(0, i * 8).to_le_bytes()).collect();
    src.write(0, &initial)?;
    drop(initial);
    let memory = src.table();

    let mut dma = DmaEngine::new(device.handle(), cfg.seed, cfg.max_write);
    let mut tracker = DeviceLogTracker::new([Box::new(device)], DeviceLogConfig::default());
    tracker.start(&memory)?;
    let mut rounds = Vec::new();

    // Round 0: everything, while the device writes.
    let copied = copy_round(&mut src, &mut dst, &memory, Some(&mut dma), cfg, None)?;
    rounds.push(Round {
        copied,
        ranges: memory.len(),
        device_stopped: false,
    });
    // One table for every round's report: the conversion writes into memory already mapped.
    let mut dirty = RangeTable::new();
    for _ in 1..cfg.rounds.max(1) {
        tracker.report_into(&mut dirty)?;
        let copied = copy_round(&mut src, &mut dst, &dirty, Some(&mut dma), cfg, None)?;
        rounds.push(Round {
            copied,
            ranges: dirty.len(),
            device_stopped: false,
        });
    }
    // A last burst after the last copy, then the device stops: its DMA ends.
    dma.burst(&mut src, cfg.writes_per_burst)?;
    if let Some(dev) = tracker.device_mut(0) {
        dev.set_state(DeviceState::Stop)?;
    }
    tracker.report_into(&mut dirty)?;
    let dropped = match (cfg.drop_last_written_page, dma.last_write()) {
        (true, Some(w)) => Some(DirtyRange::new(w.gpa & !(PAGE - 1), PAGE)),
        _ => None,
    };
    let copied = copy_round(&mut src, &mut dst, &dirty, None, cfg, dropped)?;
    rounds.push(Round {
        copied,
        ranges: dirty.len(),
        device_stopped: true,
    });
    tracker.stop()?;
    Ok(DmaDemoReport {
        rounds,
        dma_writes: dma.writes(),
        dropped,
        verified: dst.compare(&src),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DmaDemoConfig {
        DmaDemoConfig {
            memory: 8 << 20,
            rounds: 4,
            writes_per_burst: 4,
            max_write: 8 << 10,
            chunk: 256 << 10,
            seed: 7,
            drop_last_written_page: false,
        }
    }

    fn device() -> EmulatedDevice {
        EmulatedDevice::from_spec("size=64K,seed=3").unwrap()
    }

    #[test]
    fn destination_equals_source_byte_for_byte() {
        let dev = device();
        let handle = dev.handle();
        let report = run_dma_demo(dev, &config()).unwrap();
        assert_eq!(report.verified, Ok(()));
        assert_eq!(report.rounds.len(), 5);
        assert_eq!(report.rounds[0].copied, 8 << 20);
        // The device kept writing: later rounds copy dirty ranges only, and never nothing.
        for r in &report.rounds[1..] {
            assert!(r.copied > 0 && r.copied < 8 << 20, "{report:?}");
        }
        assert!(report.rounds.last().unwrap().device_stopped);
        // Round 0 alone: a burst of 4 after each of the 32 chunks; then the final burst.
        assert!(report.dma_writes >= 32 * 4 + 4, "{report:?}");
        // Stopped: no more DMA, and logging is off.
        assert!(handle.dma_write(0, 8).is_err());
        assert_eq!(handle.dma_log_page_size(), None);
    }

    #[test]
    fn a_dropped_dirty_page_fails_the_check() {
        let cfg = DmaDemoConfig {
            drop_last_written_page: true,
            ..config()
        };
        let report = run_dma_demo(device(), &cfg).unwrap();
        let dropped = report.dropped.unwrap();
        assert_eq!(
            report.verified,
            Err(Mismatch {
                first_gpa: dropped.gpa,
                pages: 1
            })
        );
    }

    #[test]
    fn dma_lands_in_memory_and_is_refused_when_stopped() {
        let mut dev = device();
        let mut mem = GuestMemory::new(0x10_0000, 0x4000).unwrap();
        let mut dma = DmaEngine::new(dev.handle(), 1, 64);
        dma.write(&mut mem, 0x10_1000, 16).unwrap();
        let b = mem.bytes(DirtyRange::new(0x10_1000, 16)).unwrap();
        assert_eq!(&b[..8], &word(1, 0x10_1000).to_le_bytes());
        assert!(matches!(
            dma.write(&mut mem, 0x10_4000, 8),
            Err(GuestError::OutOfBounds { .. })
        ));
        dev.set_state(DeviceState::Stop).unwrap();
        let before = mem.bytes(mem.range()).unwrap().to_vec();
        assert!(matches!(
            dma.write(&mut mem, 0x10_2000, 8),
            Err(GuestError::Activity(_))
        ));
        assert_eq!(mem.bytes(mem.range()).unwrap(), &before[..]);
        assert!(matches!(GuestMemory::new(0, 100), Err(GuestError::Size(100))));
    }
}
