//! Test doubles: a device with a DMA log that follows the uAPI's rules.

use std::collections::BTreeSet;

use crate::device::{DeviceError, DeviceIdentity, DmaRange, MigrationDevice, Operation, TransferSession};
use crate::state::{DeviceState, MigrationFlags};

/// A device whose DMA log behaves like the kernel's: START once with at most `max_ranges`
/// aligned, sorted, non-overlapping ranges; REPORT only inside them, reads and clears, only
/// sets bits; writes outside the logged ranges are not logged.
#[derive(Debug)]
pub(crate) struct FakeLogDevice {
    pub name: String,
    pub max_ranges: usize,
    /// The page size the device picks (None: the one asked for).
    pub choose_page_size: Option<u64>,
    /// Errno for START (None: START works).
    pub fail_start: Option<i32>,
    /// Errno for REPORT (None: REPORT works).
    pub fail_report: Option<i32>,
    /// The logged ranges and page size while logging.
    pub logging: Option<(Vec<DmaRange>, u64)>,
    /// Logged dirty addresses (page-aligned to the device page size).
    pub dirty: BTreeSet<u64>,
    /// REPORT calls made.
    pub reports: usize,
    /// START calls made.
    pub starts: usize,
}

impl FakeLogDevice {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            max_ranges: 256,
            choose_page_size: None,
            fail_start: None,
            fail_report: None,
            logging: None,
            dirty: BTreeSet::new(),
            reports: 0,
            starts: 0,
        }
    }

    /// The device writes `addr` by DMA: logged when logging covers it.
    pub fn dma_write(&mut self, addr: u64) {
        if let Some((ranges, ps)) = &self.logging
            && ranges.iter().any(|r| addr >= r.iova && addr - r.iova < r.length)
        {
            self.dirty.insert(addr & !(ps - 1));
        }
    }

    fn err(&self, op: Operation, errno: i32) -> DeviceError {
        DeviceError::errno(&self.name, op, errno)
    }
}

impl MigrationDevice for FakeLogDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity::Unknown
    }
    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        Ok(MigrationFlags::STOP_COPY)
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        Ok(DeviceState::Running)
    }
    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        Err(self.err(
            Operation::SetState {
                from: DeviceState::Running,
                to,
            },
            libc::ENOTTY,
        ))
    }
    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        Ok(0)
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError> {
        self.starts += 1;
        if let Some(errno) = self.fail_start {
            return Err(self.err(Operation::DmaLogStart, errno));
        }
        if self.logging.is_some() {
            return Err(self.err(Operation::DmaLogStart, libc::EBUSY));
        }
        if ranges.is_empty() || !page_size.is_power_of_two() {
            return Err(self.err(Operation::DmaLogStart, libc::EINVAL));
        }
        if ranges.len() > self.max_ranges {
            return Err(self.err(Operation::DmaLogStart, libc::E2BIG));
        }
        let aligned = ranges
            .iter()
            .all(|r| r.length > 0 && r.iova % page_size == 0 && r.length % page_size == 0);
        let ordered = ranges.windows(2).all(|w| w[0].iova + w[0].length <= w[1].iova);
        if !aligned || !ordered {
            return Err(self.err(Operation::DmaLogStart, libc::EINVAL));
        }
        let ps = self.choose_page_size.unwrap_or(page_size);
        self.logging = Some((ranges.to_vec(), ps));
        Ok(ps)
    }

    fn dma_log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.reports += 1;
        if let Some(errno) = self.fail_report {
            return Err(self.err(Operation::DmaLogReport, errno));
        }
        let Some((ranges, ps)) = &self.logging else {
            return Err(self.err(Operation::DmaLogReport, libc::EINVAL));
        };
        if page_size != *ps || length == 0 {
            return Err(self.err(Operation::DmaLogReport, libc::EINVAL));
        }
        // The report must lie inside the logged ranges (which may touch one another).
        let mut covered = iova;
        for r in ranges {
            if r.iova <= covered && covered < r.iova + r.length {
                covered = r.iova + r.length;
            }
        }
        if covered < iova + length {
            return Err(self.err(Operation::DmaLogReport, libc::EINVAL));
        }
        let pages = length.div_ceil(page_size);
        if (bitmap.len() as u64) < pages.div_ceil(64) {
            return Err(self.err(Operation::DmaLogReport, libc::EINVAL));
        }
        let first = iova & !(page_size - 1);
        let hits: Vec<u64> = self.dirty.range(first..iova + length).copied().collect();
        for addr in hits {
            let n = (addr.max(iova) - iova) / page_size;
            bitmap[(n / 64) as usize] |= 1 << (n % 64);
            self.dirty.remove(&addr);
        }
        Ok(())
    }

    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        if self.logging.take().is_none() {
            return Err(self.err(Operation::DmaLogStop, libc::EINVAL));
        }
        self.dirty.clear();
        Ok(())
    }
}
