//! [`KernelDevice`]: a VFIO device fd driven through the migration uAPI v2, and [`KernelSession`]:
//! the `data_fd` of one transfer session.
//!
//! The device keeps its migration flags (read once) and a [`SessionPhase`] shared with its open
//! session. A state request is checked against the kernel's path finding ([`crate::state::path`])
//! before the one `MIG_DEVICE_STATE` SET that makes the kernel walk the whole path, so impossible
//! requests fail without touching the device. After every SET the phase records the new state (on
//! failure, the state the device reports), which is how a session knows a 0-byte read means "nothing
//! now" (PRE_COPY) or "end" (STOP_COPY) and when it has been ended.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::ioctls::{self, Readiness, RegionInfo};
use crate::device::{
    DeviceError, DeviceIdentity, DmaRange, ErrorKind, MigrationDevice, Operation, PrecopyInfo, ReadOutcome,
    SessionPhase, TransferSession, classify_read,
};
use crate::state::{DeviceState, MigrationFlags, SessionKind, path};

/// `VFIO_REGION_INFO_FLAG_READ`.
const REGION_READ: u32 = vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_READ;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
const REGION_WRITE: u32 = vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_WRITE;
/// The smallest page size `DMA_LOGGING_REPORT` accepts.
const MIN_REPORT_PAGE: u64 = 4096;

/// A VFIO device opened by the kernel (group or cdev path), driven through the migration uAPI v2.
///
/// ```no_run
/// use std::os::fd::OwnedFd;
/// use vfio_migration::device::{DeviceIdentity, MigrationDevice};
/// use vfio_migration::kernel::KernelDevice;
/// use vfio_migration::DeviceState;
///
/// # fn get_fd() -> OwnedFd { unimplemented!() }
/// let fd: OwnedFd = get_fd(); // e.g. handed in by the VMM
/// let mut dev = KernelDevice::from_fd(fd, "0000:00:04.0".into(), DeviceIdentity::Unknown);
/// println!("{}", dev.flags()?);
/// let session = dev.set_state(DeviceState::StopCopy)?;
/// # Ok::<(), vfio_migration::DeviceError>(())
/// ```
#[derive(Debug)]
pub struct KernelDevice {
    file: File,
    name: String,
    identity: DeviceIdentity,
    flags: OnceLock<MigrationFlags>,
    phase: SessionPhase,
    /// Whether `phase` holds the device's real state (false until read, and after a failure the
    /// state could not be read back).
    synced: AtomicBool,
    /// Whether the device offers PRE_COPY info v2 (probed once).
    precopy_v2_offered: OnceLock<bool>,
    /// Whether the device was opted in to PRE_COPY info v2: sessions opened from now on read
    /// the REINIT flag of `VFIO_MIG_GET_PRECOPY_INFO`.
    precopy_v2: bool,
}

impl KernelDevice {
    /// Wrap an open VFIO device fd (from `VFIO_GROUP_GET_DEVICE_FD`, a bound and attached cdev, or
    /// a VMM). `name` is used in messages; `identity` tells what the device is. Nothing is asked of
    /// the device yet: the flags and state are read when first needed.
    ///
    /// The device takes ownership of the fd and closes it on drop; to keep using a fd another
    /// owner holds (a VMM's own VFIO device object), pass a duplicate
    /// (`BorrowedFd::try_clone_to_owned`). Whatever keeps the device's IOMMU context alive (group
    /// and container, or iommufd) must outlive this device.
    pub fn from_fd(fd: OwnedFd, name: String, identity: DeviceIdentity) -> Self {
        Self {
            file: File::from(fd),
            name,
            identity,
            flags: OnceLock::new(),
            phase: SessionPhase::new(DeviceState::Running),
            synced: AtomicBool::new(false),
            precopy_v2_offered: OnceLock::new(),
            precopy_v2: false,
        }
    }

    /// The device fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn err(&self, op: Operation, kind: ErrorKind) -> DeviceError {
        DeviceError::new(self.name.clone(), op, kind)
    }

    fn os(&self, op: Operation, e: io::Error) -> DeviceError {
        DeviceError::io(self.name.clone(), op, e)
    }

    /// Record a state the device reported.
    fn record(&self, state: DeviceState) {
        if state == DeviceState::Error {
            self.phase.close_session(state);
        } else if state != self.phase.state() || !self.synced.load(Ordering::Acquire) {
            self.phase.set_state(state);
        }
        self.synced.store(true, Ordering::Release);
    }

    /// GET the device state and record it.
    fn get_state(&self) -> Result<DeviceState, DeviceError> {
        let raw = ioctls::get_device_state(self.fd()).map_err(|e| self.os(Operation::GetState, e))?;
        let state = DeviceState::from_raw(raw).map_err(|e| {
            self.err(
                Operation::GetState,
                ErrorKind::InvalidAnswer(format!("device reported {e}")),
            )
        })?;
        self.record(state);
        Ok(state)
    }

    /// The current state: the recorded one when it is known, else read from the device.
    fn current_state(&self) -> Result<DeviceState, DeviceError> {
        if self.synced.load(Ordering::Acquire) {
            Ok(self.phase.state())
        } else {
            self.get_state()
        }
    }

    /// After a failed SET: read back where the device ended up. When even that fails, end any
    /// session and mark the state unknown, so the next request reads it again.
    fn resync_after_failure(&self) {
        if let Err(e) = self.get_state() {
            log::warn!("{}: state unknown after a failed transition: {e}", self.name);
            self.phase.close_session(DeviceState::Error);
            self.synced.store(false, Ordering::Release);
        }
    }

    /// Reset the device when it is not RUNNING (mtty, for one, keeps its migration state across
    /// close and open). Returns the state it was in when a reset was needed.
    pub fn reset_if_not_running(&mut self) -> Result<Option<DeviceState>, DeviceError> {
        let state = self.get_state()?;
        if state == DeviceState::Running {
            return Ok(None);
        }
        log::info!("{}: device is in {state} after open: resetting it", self.name);
        self.reset()?;
        Ok(Some(state))
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index`.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, DeviceError> {
        ioctls::get_region_info(self.fd(), index).map_err(|e| self.os(Operation::RegionRead { index, offset: 0 }, e))
    }

    /// Check `[offset, offset + len)` against region `index` and return the absolute fd offset.
    fn region_offset(&self, op: Operation, index: u32, offset: u64, len: usize, need: u32) -> Result<u64, DeviceError> {
        let info = ioctls::get_region_info(self.fd(), index).map_err(|e| self.os(op, e))?;
        if info.flags & need != need {
            let what = if need == REGION_READ { "readable" } else { "writable" };
            return Err(self.err(
                op,
                ErrorKind::InvalidRequest(format!("region {index} is not {what} (flags {:#x})", info.flags)),
            ));
        }
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > info.size) {
            return Err(self.err(
                op,
                ErrorKind::InvalidRequest(format!(
                    "{len} bytes at {offset:#x} exceed region {index} of {:#x} bytes",
                    info.size
                )),
            ));
        }
        info.offset.checked_add(offset).ok_or_else(|| {
            self.err(
                op,
                ErrorKind::InvalidAnswer(format!("region {index} offset {:#x} overflows", info.offset)),
            )
        })
    }

    /// Read `buf.len()` bytes of region `index` at `offset` (`pread` at the region's offset in the
    /// device fd). mtty's BARs take 1-byte accesses.
    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let op = Operation::RegionRead { index, offset };
        let base = self.region_offset(op, index, offset, buf.len(), REGION_READ)?;
        let mut done = 0;
        while done < buf.len() {
            match ioctls::pread(self.fd(), &mut buf[done..], base + done as u64) {
                Ok(0) => {
                    return Err(self.err(
                        op,
                        ErrorKind::InvalidAnswer(format!("read returned 0 after {done} of {} bytes", buf.len())),
                    ));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.os(op, e)),
            }
        }
        Ok(())
    }

    /// Write `buf` into region `index` at `offset` (`pwrite` at the region's offset in the device
    /// fd).
    pub fn region_write(&self, index: u32, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        let op = Operation::RegionWrite { index, offset };
        let base = self.region_offset(op, index, offset, buf.len(), REGION_WRITE)?;
        let mut done = 0;
        while done < buf.len() {
            match ioctls::pwrite(self.fd(), &buf[done..], base + done as u64) {
                Ok(0) => {
                    return Err(self.err(
                        op,
                        ErrorKind::InvalidAnswer(format!("write took 0 after {done} of {} bytes", buf.len())),
                    ));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.os(op, e)),
            }
        }
        Ok(())
    }
}

impl AsFd for KernelDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Check DMA logging ranges as the kernel will: at least one, each non-empty, aligned to
/// `page_size` (a power of two), not wrapping, and not overlapping another.
fn validate_dma_ranges(ranges: &[DmaRange], page_size: u64) -> Result<(), String> {
    if !page_size.is_power_of_two() {
        return Err(format!("page size {page_size:#x} is not a power of two"));
    }
    if ranges.is_empty() {
        return Err("no ranges".into());
    }
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut prev_end: Option<u64> = None;
    for r in &sorted {
        if r.length == 0 {
            return Err(format!("range at {:#x} is empty", r.iova));
        }
        if r.iova % page_size != 0 || r.length % page_size != 0 {
            return Err(format!(
                "range {:#x}+{:#x} is not aligned to the page size {page_size:#x}",
                r.iova, r.length
            ));
        }
        let end = r
            .iova
            .checked_add(r.length)
            .ok_or_else(|| format!("range {:#x}+{:#x} wraps around", r.iova, r.length))?;
        if prev_end.is_some_and(|p| r.iova < p) {
            return Err(format!("range {:#x}+{:#x} overlaps another range", r.iova, r.length));
        }
        prev_end = Some(end);
    }
    Ok(())
}

impl MigrationDevice for KernelDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> DeviceIdentity {
        self.identity.clone()
    }

    /// `VFIO_DEVICE_FEATURE` GET `MIGRATION`, read once and cached.
    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        if let Some(f) = self.flags.get() {
            return Ok(*f);
        }
        let bits = ioctls::get_migration_flags(self.fd()).map_err(|e| self.os(Operation::GetFlags, e))?;
        let flags = MigrationFlags::from_bits(bits);
        Ok(*self.flags.get_or_init(|| flags))
    }

    /// `VFIO_DEVICE_FEATURE` GET `MIG_DEVICE_STATE`.
    fn state(&self) -> Result<DeviceState, DeviceError> {
        self.get_state()
    }

    /// One `VFIO_DEVICE_FEATURE` SET `MIG_DEVICE_STATE`, after checking the path.
    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        let flags = self.flags()?;
        let from = self.current_state()?;
        let op = Operation::SetState { from, to };
        let steps = path(from, to, flags).map_err(|e| self.err(op, ErrorKind::State(e)))?;
        let opens = steps.windows(2).last().and_then(|arc| arc[0].arc_opens(arc[1]));

        let data_fd = match ioctls::set_device_state(self.fd(), to.as_raw()) {
            Ok(fd) => fd,
            Err(e) => {
                self.resync_after_failure();
                return Err(self.os(op, e));
            }
        };
        self.synced.store(true, Ordering::Release);
        match (data_fd, to.session_kind()) {
            (Some(fd), Some(kind)) => {
                if opens != Some(kind) {
                    log::warn!(
                        "{}: {from} -> {to} returned a data_fd the path did not predict",
                        self.name
                    );
                }
                let generation = self.phase.open_session(to);
                if kind == SessionKind::Resuming
                    && let Err(e) = ioctls::set_nonblocking(fd.as_fd())
                {
                    // Writes still wait for room with poll(2) first; only a data_fd that polls
                    // writable and then blocks in write(2) is not bounded.
                    log::warn!("{}: data_fd left blocking: {e}", self.name);
                }
                Ok(Some(Box::new(KernelSession {
                    file: File::from(fd),
                    device: self.name.clone(),
                    kind,
                    generation,
                    phase: self.phase.clone(),
                    precopy_v2: self.precopy_v2,
                })))
            }
            (Some(_fd), None) => {
                // The fd is closed as `_fd` drops.
                self.phase.set_state(to);
                Err(self.err(
                    op,
                    ErrorKind::InvalidAnswer(format!("a data_fd was returned for {to}, which has no session")),
                ))
            }
            (None, _) if opens.is_some() => {
                // The device opened a session we cannot reach: end the old one anyway.
                self.phase.open_session(to);
                Err(self.err(
                    op,
                    ErrorKind::InvalidAnswer("no data_fd was returned for a transition that opens a session".into()),
                ))
            }
            (None, _) => {
                self.phase.set_state(to);
                Ok(None)
            }
        }
    }

    /// `VFIO_DEVICE_FEATURE` GET `MIG_DATA_SIZE`.
    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        ioctls::get_mig_data_size(self.fd()).map_err(|e| self.os(Operation::StopCopySize, e))
    }

    /// `VFIO_DEVICE_RESET`: the device returns to RUNNING and any session ends.
    fn reset(&mut self) -> Result<(), DeviceError> {
        match ioctls::device_reset(self.fd()) {
            Ok(()) => {
                self.phase.close_session(DeviceState::Running);
                self.synced.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.synced.store(false, Ordering::Release);
                Err(self.os(Operation::Reset, e))
            }
        }
    }

    /// `VFIO_DEVICE_FEATURE` SET `DMA_LOGGING_START`; bad ranges are refused before the ioctl.
    fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError> {
        validate_dma_ranges(ranges, page_size)
            .map_err(|why| self.err(Operation::DmaLogStart, ErrorKind::InvalidRequest(why)))?;
        let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.iova, r.length)).collect();
        ioctls::dma_logging_start(self.fd(), page_size, &pairs).map_err(|e| self.os(Operation::DmaLogStart, e))
    }

    /// `VFIO_DEVICE_FEATURE` GET `DMA_LOGGING_REPORT`; the bitmap is not zeroed here, but it must
    /// be large enough (checked before the ioctl).
    fn dma_log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        let op = Operation::DmaLogReport;
        if !page_size.is_power_of_two() || page_size < MIN_REPORT_PAGE {
            return Err(self.err(
                op,
                ErrorKind::InvalidRequest(format!(
                    "page size {page_size:#x} is not a power of two of at least 4 KiB"
                )),
            ));
        }
        if length == 0 || iova.checked_add(length).is_none() {
            return Err(self.err(
                op,
                ErrorKind::InvalidRequest(format!("range {iova:#x}+{length:#x} is empty or wraps around")),
            ));
        }
        let words = ioctls::bitmap_words(length, page_size).unwrap_or(u64::MAX);
        if (bitmap.len() as u64) < words {
            return Err(self.err(
                op,
                ErrorKind::InvalidRequest(format!(
                    "bitmap of {} words is too small: {words} needed for {length:#x} bytes of {page_size:#x}-byte pages",
                    bitmap.len()
                )),
            ));
        }
        ioctls::dma_logging_report(self.fd(), iova, length, page_size, bitmap).map_err(|e| self.os(op, e))
    }

    /// `VFIO_DEVICE_FEATURE` SET `DMA_LOGGING_STOP`.
    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        ioctls::dma_logging_stop(self.fd()).map_err(|e| self.os(Operation::DmaLogStop, e))
    }

    /// `VFIO_DEVICE_FEATURE` PROBE | SET `MIG_PRECOPY_INFOv2` (once per device; only with
    /// PRE_COPY), then SET `MIG_PRECOPY_INFOv2` when offered. Kernels and drivers without it
    /// (ENOTTY or EINVAL on the probe) are not asked anything else and behave as before; so does
    /// a device whose probe or opt-in fails otherwise (logged): the REINIT flag is then ignored.
    fn enable_precopy_info_v2(&mut self) -> Result<bool, DeviceError> {
        if !self.flags()?.contains(MigrationFlags::PRE_COPY) {
            return Ok(false);
        }
        let offered = match self.precopy_v2_offered.get() {
            Some(offered) => *offered,
            None => {
                let offered = ioctls::probe_precopy_info_v2(self.fd()).unwrap_or_else(|e| {
                    log::warn!("{}: pre-copy info v2 not used", self.os(Operation::PrecopyInfoV2, e));
                    false
                });
                *self.precopy_v2_offered.get_or_init(|| offered)
            }
        };
        if !offered {
            return Ok(false);
        }
        match ioctls::enable_precopy_info_v2(self.fd()) {
            Ok(()) => self.precopy_v2 = true,
            Err(e) => {
                log::warn!("{}: pre-copy info v2 not used", self.os(Operation::PrecopyInfoV2, e));
                self.precopy_v2 = false;
            }
        }
        Ok(self.precopy_v2)
    }
}

/// One transfer session of a [`KernelDevice`]: owns the kernel's `data_fd` (closed on drop).
///
/// How long one [`KernelSession`] read waits for the data_fd before answering
/// [`ReadOutcome::NothingNow`]: the granularity at which cancel and the stall bound act on a
/// silent kernel device.
pub const READ_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// How long one [`KernelSession::write_within`](TransferSession::write_within) of the load path
/// waits at most for the data_fd to take data: the granularity at which cancel and the time
/// bound act on a kernel device that takes nothing in RESUMING.
pub const WRITE_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// The most bytes one `write(2)` on a data_fd is given (a longer buffer is a short write).
pub const MAX_WRITE: usize = 1 << 20;

/// How long one [`KernelSession`] [`write`](TransferSession::write) (the call without a wait of
/// its own) waits in all for the data_fd to take any data before it fails.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Valid from the transition that opened it until the one that ends it (or a reset, or a fall into
/// ERROR); after that every call fails with [`ErrorKind::SessionClosed`].
#[derive(Debug)]
pub struct KernelSession {
    file: File,
    device: String,
    kind: SessionKind,
    generation: u32,
    phase: SessionPhase,
    /// The device was opted in to PRE_COPY info v2 when this session opened: the REINIT flag
    /// of `VFIO_MIG_GET_PRECOPY_INFO` counts.
    precopy_v2: bool,
}

impl KernelSession {
    /// The state of the device while this session is open, or `SessionClosed`.
    fn open_state(&self, op: Operation) -> Result<DeviceState, DeviceError> {
        self.phase
            .session_state(self.generation, self.kind)
            .ok_or_else(|| DeviceError::new(self.device.clone(), op, ErrorKind::SessionClosed))
    }
}

impl AsFd for KernelSession {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl TransferSession for KernelSession {
    fn kind(&self) -> SessionKind {
        self.kind
    }

    /// `poll(2)` on the data_fd for at most [`READ_WAIT`], then `read(2)`, EINTR retried, the result
    /// classified by the device state ([`classify_read`]).
    ///
    /// A data_fd with nothing to read within [`READ_WAIT`] (or a read answering EAGAIN) gives
    /// [`ReadOutcome::NothingNow`], so the caller's cancel flag and stall bound are checked while a
    /// device is silent instead of blocking in `read(2)` forever. A driver without a `poll` method
    /// is reported ready by the kernel; a read that then blocks inside such a driver cannot be
    /// bounded from user space.
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        let state = self.open_state(Operation::Read)?;
        if buf.is_empty() {
            return Err(DeviceError::new(
                self.device.clone(),
                Operation::Read,
                ErrorKind::InvalidRequest("empty read buffer".into()),
            ));
        }
        match ioctls::wait_readable(self.file.as_fd(), READ_WAIT) {
            Ok(Readiness::Ready) => {}
            Ok(Readiness::TimedOut) => return Ok(ReadOutcome::NothingNow),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(ReadOutcome::NothingNow),
            Err(e) => return Err(DeviceError::io(self.device.clone(), Operation::Read, e)),
        }
        let result = loop {
            match ioctls::read(self.file.as_fd(), buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadOutcome::NothingNow),
                r => break r,
            }
        };
        classify_read(result, state).map_err(|e| DeviceError::io(self.device.clone(), Operation::Read, e))
    }

    /// [`write_within`](TransferSession::write_within) [`WRITE_WAIT`] at a time, for at most
    /// [`WRITE_TIMEOUT`] in all: a data_fd that takes nothing for that long is an error naming
    /// the device, the state and the time waited (a `TimedOut` I/O error).
    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let began = std::time::Instant::now();
        loop {
            if let Some(n) = self.write_within(buf, WRITE_WAIT)? {
                return Ok(n);
            }
            let waited = began.elapsed();
            if waited >= WRITE_TIMEOUT {
                let state = self.open_state(Operation::Write)?;
                let why = format!(
                    "the data_fd took no device state in {state} for {} ms",
                    waited.as_millis()
                );
                return Err(DeviceError::io(
                    self.device.clone(),
                    Operation::Write,
                    io::Error::new(io::ErrorKind::TimedOut, why),
                ));
            }
        }
    }

    /// `poll(2)` for room on the data_fd for at most `wait`, then one `write(2)` of at most
    /// [`MAX_WRITE`] bytes, EINTR retried. The data_fd of a RESUMING session is non-blocking
    /// (`O_NONBLOCK`, which VFIO drivers ignore), so the write takes what fits and never waits:
    /// no room within `wait`, or a write answering EAGAIN, is `Ok(None)`. A driver without a
    /// `poll` method is reported writable by the kernel; a write that then blocks inside such a
    /// driver cannot be bounded from user space.
    fn write_within(&mut self, buf: &[u8], wait: std::time::Duration) -> Result<Option<usize>, DeviceError> {
        self.open_state(Operation::Write)?;
        if buf.is_empty() {
            return Ok(Some(0));
        }
        match ioctls::wait_writable(self.file.as_fd(), wait) {
            Ok(Readiness::Ready) => {}
            Ok(Readiness::TimedOut) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
            Err(e) => return Err(DeviceError::io(self.device.clone(), Operation::Write, e)),
        }
        let chunk = &buf[..buf.len().min(MAX_WRITE)];
        loop {
            match ioctls::write(self.file.as_fd(), chunk) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                r => {
                    return r
                        .map(Some)
                        .map_err(|e| DeviceError::io(self.device.clone(), Operation::Write, e));
                }
            }
        }
    }

    /// `VFIO_MIG_GET_PRECOPY_INFO` on the data_fd. `VFIO_PRECOPY_INFO_REINIT` is reported only
    /// when the device was opted in to PRE_COPY info v2 before this session opened; otherwise the
    /// answer's flags are ignored (drivers echo what was passed: 0).
    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        self.open_state(Operation::PrecopyInfo)?;
        let answer = ioctls::get_precopy_info(self.file.as_fd(), self.precopy_v2)
            .map_err(|e| DeviceError::io(self.device.clone(), Operation::PrecopyInfo, e))?;
        Ok(PrecopyInfo {
            initial_bytes: answer.initial_bytes,
            dirty_bytes: answer.dirty_bytes,
            reinit: answer.reinit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ioctls::sys::{self, Call, reply, reply_errno, reply_ok, take_calls};
    use crate::state::StateError;
    use DeviceState::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    const FEATURE: std::os::raw::c_ulong = 0x3B75;

    fn null() -> File {
        File::open("/dev/null").unwrap()
    }

    fn device() -> KernelDevice {
        sys::reset();
        KernelDevice::from_fd(null().into(), "mtty-test".into(), DeviceIdentity::Unknown)
    }

    fn script_flags(bits: u64) {
        reply(move |arg| {
            arg[8..16].copy_from_slice(&bits.to_ne_bytes());
            Ok(0)
        });
    }

    fn script_state(state: DeviceState) {
        reply(move |arg| {
            arg[8..12].copy_from_slice(&state.as_raw().to_ne_bytes());
            Ok(0)
        });
    }

    /// A successful SET returning `data_fd` (a real, leaked fd, or -1).
    fn script_set(data_fd: i32) {
        reply(move |arg| {
            arg[12..16].copy_from_slice(&data_fd.to_ne_bytes());
            Ok(0)
        });
    }

    fn new_data_fd() -> i32 {
        null().into_raw_fd()
    }

    /// The (flags, payload) of every VFIO_DEVICE_FEATURE call, in order.
    fn features(calls: &[Call]) -> Vec<(u32, Vec<u8>)> {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::Ioctl { req, arg, .. } if *req == FEATURE => {
                    let argsz = u32::from_ne_bytes(arg[0..4].try_into().unwrap());
                    assert_eq!(argsz as usize, arg.len(), "argsz must be the buffer length");
                    Some((u32::from_ne_bytes(arg[4..8].try_into().unwrap()), arg[8..].to_vec()))
                }
                _ => None,
            })
            .collect()
    }

    fn set_payload(state: DeviceState) -> Vec<u8> {
        [state.as_raw().to_ne_bytes(), (-1i32).to_ne_bytes()].concat()
    }

    fn session_read(s: &mut dyn TransferSession, n: usize) -> Result<ReadOutcome, DeviceError> {
        let mut buf = vec![0u8; n];
        s.read(&mut buf)
    }

    #[test]
    fn stop_copy_is_one_set_and_the_session_reads_to_the_end() {
        let mut dev = device();
        script_flags(7);
        script_state(Running);
        let data = new_data_fd();
        script_set(data);
        let mut session = dev.set_state(StopCopy).unwrap().expect("a saving session");
        assert_eq!(session.kind(), SessionKind::Saving);
        let calls = take_calls();
        assert_eq!(
            features(&calls),
            vec![
                (0x0001_0001, vec![0; 8]),
                (
                    0x0001_0002,
                    set_payload(Error)[..4]
                        .iter()
                        .chain(&(-1i32).to_ne_bytes())
                        .copied()
                        .collect()
                ),
                (0x0002_0002, set_payload(StopCopy)),
            ]
        );

        reply(|buf| {
            buf[..3].copy_from_slice(b"abc");
            Ok(3)
        });
        let mut buf = [0u8; 16];
        assert_eq!(session.read(&mut buf).unwrap(), ReadOutcome::Data(3));
        assert_eq!(&buf[..3], b"abc");
        reply_ok(0);
        assert_eq!(session_read(session.as_mut(), 16).unwrap(), ReadOutcome::End);
        assert_eq!(
            take_calls(),
            vec![Call::Read { fd: data, len: 16 }, Call::Read { fd: data, len: 16 }]
        );

        // STOP_COPY -> STOP: one SET (the state is known: no GET), and the session is over.
        script_set(-1);
        assert!(dev.set_state(Stop).unwrap().is_none());
        assert_eq!(features(&take_calls()), vec![(0x0002_0002, set_payload(Stop))]);
        let e = session_read(session.as_mut(), 16).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::SessionClosed), "{e}");
        assert!(matches!(
            session.write(b"x").unwrap_err().kind,
            ErrorKind::SessionClosed
        ));
        assert!(matches!(
            session.precopy_info().unwrap_err().kind,
            ErrorKind::SessionClosed
        ));
        assert!(take_calls().is_empty(), "a closed session touches nothing");
    }

    #[test]
    fn precopy_session_survives_into_stop_copy() {
        let mut dev = device();
        script_flags(7);
        script_state(Running);
        let data = new_data_fd();
        script_set(data);
        let mut session = dev.set_state(PreCopy).unwrap().unwrap();
        take_calls();

        // 0 and ENOMSG mean "nothing now" in PRE_COPY; EINTR is retried.
        reply_ok(0);
        assert_eq!(session_read(session.as_mut(), 8).unwrap(), ReadOutcome::NothingNow);
        reply_errno(libc::ENOMSG);
        assert_eq!(session_read(session.as_mut(), 8).unwrap(), ReadOutcome::NothingNow);
        reply_errno(libc::EINTR);
        reply_ok(8);
        assert_eq!(session_read(session.as_mut(), 8).unwrap(), ReadOutcome::Data(8));
        assert_eq!(take_calls().len(), 4);

        reply(|arg| {
            arg[8..16].copy_from_slice(&24u64.to_ne_bytes());
            arg[16..24].copy_from_slice(&0u64.to_ne_bytes());
            Ok(0)
        });
        assert_eq!(
            session.precopy_info().unwrap(),
            PrecopyInfo {
                initial_bytes: 24,
                dirty_bytes: 0,
                reinit: false,
            }
        );
        match &take_calls()[..] {
            [Call::Ioctl { fd, req, arg }] => {
                assert_eq!((*fd, *req), (data, 0x3B79));
                assert_eq!(&arg[..8], &[24, 0, 0, 0, 0, 0, 0, 0]);
            }
            other => panic!("{other:?}"),
        }

        // PRE_COPY -> STOP_COPY keeps the fd (data_fd -1), and 0 now means the end.
        script_set(-1);
        assert!(dev.set_state(StopCopy).unwrap().is_none());
        take_calls();
        reply_ok(0);
        assert_eq!(session_read(session.as_mut(), 8).unwrap(), ReadOutcome::End);
        take_calls();
    }

    /// Open a PRE_COPY session on a device with flags 0x7, scripting the opt-in: `probe` answers
    /// the PROBE (Ok or an errno), `set` the SET when one is expected.
    fn precopy_with_v2(probe: Result<(), i32>, set: Option<Result<(), i32>>) -> (KernelDevice, bool, i32) {
        let mut dev = device();
        script_flags(7);
        match probe {
            Ok(()) => reply_ok(0),
            Err(errno) => reply_errno(errno),
        }
        match set {
            Some(Ok(())) => reply_ok(0),
            Some(Err(errno)) => reply_errno(errno),
            None => {}
        }
        let on = dev.enable_precopy_info_v2().unwrap();
        script_state(Running);
        let data = new_data_fd();
        script_set(data);
        (dev, on, data)
    }

    fn script_info(flags: u32, initial: u64, dirty: u64) {
        reply(move |arg| {
            arg[4..8].copy_from_slice(&flags.to_ne_bytes());
            arg[8..16].copy_from_slice(&initial.to_ne_bytes());
            arg[16..24].copy_from_slice(&dirty.to_ne_bytes());
            Ok(0)
        });
    }

    #[test]
    fn precopy_info_v2_offered_is_opted_in_and_reinit_surfaces() {
        let (mut dev, on, _) = precopy_with_v2(Ok(()), Some(Ok(())));
        assert!(on);
        let mut session = dev.set_state(PreCopy).unwrap().unwrap();
        let f = features(&take_calls());
        assert_eq!(
            f.iter()
                .map(|(flags, payload)| (*flags, payload.len()))
                .collect::<Vec<_>>(),
            vec![
                (0x0001_0001, 8),
                (0x0006_000c, 0),
                (0x0002_000c, 0),
                (0x0001_0002, 8),
                (0x0002_0002, 8)
            ],
            "flags, PROBE|SET 12, SET 12 (no data), then the transition"
        );
        script_info(1, 4096, 0);
        assert_eq!(
            session.precopy_info().unwrap(),
            PrecopyInfo {
                initial_bytes: 4096,
                dirty_bytes: 0,
                reinit: true
            }
        );
        script_info(0, 0, 0);
        assert!(!session.precopy_info().unwrap().reinit);
        take_calls();
        // The probe is asked once per device; the opt-in is renewed for every session.
        reply_ok(0);
        assert!(dev.enable_precopy_info_v2().unwrap());
        assert_eq!(features(&take_calls()), vec![(0x0002_000c, vec![])]);
    }

    #[test]
    fn precopy_info_v2_refused_means_no_set_and_flags_ignored() {
        for errno in [libc::ENOTTY, libc::EINVAL] {
            let (mut dev, on, _) = precopy_with_v2(Err(errno), None);
            assert!(!on);
            let mut session = dev.set_state(PreCopy).unwrap().unwrap();
            let f = features(&take_calls());
            assert!(
                !f.iter().any(|(flags, _)| *flags == 0x0002_000c),
                "no opt-in without the feature: {f:?}"
            );
            // A driver echoing flags (or garbage) reports no re-init.
            script_info(1, 24, 0);
            assert_eq!(
                session.precopy_info().unwrap(),
                PrecopyInfo {
                    initial_bytes: 24,
                    dirty_bytes: 0,
                    reinit: false
                }
            );
            take_calls();
            // Not probed again.
            assert!(!dev.enable_precopy_info_v2().unwrap());
            assert!(take_calls().is_empty());
        }
        // A failed opt-in after a successful probe: behave as without it.
        let (mut dev, on, _) = precopy_with_v2(Ok(()), Some(Err(libc::EIO)));
        assert!(!on);
        let mut session = dev.set_state(PreCopy).unwrap().unwrap();
        take_calls();
        script_info(1, 24, 0);
        assert!(!session.precopy_info().unwrap().reinit);
        take_calls();
        // A device without PRE_COPY is not asked.
        let mut dev = device();
        script_flags(1);
        assert!(!dev.enable_precopy_info_v2().unwrap());
        assert_eq!(features(&take_calls()).len(), 1);
    }

    #[test]
    fn impossible_requests_fail_before_the_set() {
        let mut dev = device();
        script_flags(1);
        script_state(Running);
        let e = dev.set_state(PreCopy).err().unwrap();
        assert!(
            matches!(e.kind, ErrorKind::State(StateError::Unsupported { .. })),
            "{e}"
        );
        let e = dev.set_state(Error).err().unwrap();
        assert!(
            matches!(e.kind, ErrorKind::State(StateError::ErrorNotRequestable(_))),
            "{e}"
        );
        // Only the two GETs were issued.
        let f = features(&take_calls());
        assert_eq!(
            f.iter().map(|(flags, _)| *flags).collect::<Vec<_>>(),
            vec![0x0001_0001, 0x0001_0002]
        );

        let mut dev = device();
        script_flags(7);
        script_state(StopCopy);
        let e = dev.set_state(PreCopy).err().unwrap();
        assert_eq!(
            e.op,
            Operation::SetState {
                from: StopCopy,
                to: PreCopy
            }
        );
        assert!(matches!(e.kind, ErrorKind::State(StateError::NoPath { .. })), "{e}");
        assert_eq!(features(&take_calls()).len(), 2);
    }

    #[test]
    fn a_failed_set_records_the_real_state_and_error_closes_the_session() {
        let mut dev = device();
        script_flags(7);
        script_state(Stop);
        script_set(new_data_fd());
        let mut session = dev.set_state(Resuming).unwrap().unwrap();
        assert_eq!(session.kind(), SessionKind::Resuming);
        reply_errno(libc::EINTR);
        reply_ok(4);
        assert_eq!(session.write(b"abcd").unwrap(), 4);
        take_calls();

        // RESUMING -> RUNNING fails EINVAL and the device stays RESUMING: the session lives on.
        reply_errno(libc::EINVAL);
        script_state(Resuming);
        let e = dev.set_state(Running).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(
            e.op,
            Operation::SetState {
                from: Resuming,
                to: Running
            }
        );
        reply_ok(2);
        assert_eq!(session.write(b"ef").unwrap(), 2);
        take_calls();

        // Now it falls into ERROR: the session is closed and nothing but a reset is allowed.
        reply_errno(libc::EFAULT);
        script_state(Error);
        assert_eq!(dev.set_state(Stop).err().unwrap().raw_os_error(), Some(libc::EFAULT));
        assert!(matches!(
            session.write(b"x").unwrap_err().kind,
            ErrorKind::SessionClosed
        ));
        let e = dev.set_state(Running).err().unwrap();
        assert!(matches!(e.kind, ErrorKind::State(StateError::NoPath { .. })), "{e}");
        take_calls();
        reply_ok(0);
        dev.reset().unwrap();
        assert_eq!(
            take_calls(),
            vec![Call::None {
                fd: dev.fd().as_raw_fd(),
                req: 0x3B6F
            }]
        );
        // Known RUNNING after the reset: the next SET needs no GET.
        script_set(-1);
        dev.set_state(Stop).unwrap();
        assert_eq!(features(&take_calls()), vec![(0x0002_0002, set_payload(Stop))]);
    }

    #[test]
    fn a_failed_set_mid_path_is_recorded() {
        let mut dev = device();
        script_flags(7);
        script_state(Running);
        reply_errno(libc::EIO);
        script_state(Stop); // RUNNING -> RUNNING_P2P -> STOP worked, STOP -> STOP_COPY did not
        let e = dev.set_state(StopCopy).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        take_calls();
        // The next request starts from STOP without another GET.
        script_set(-1);
        dev.set_state(Running).unwrap();
        assert_eq!(features(&take_calls()), vec![(0x0002_0002, set_payload(Running))]);
    }

    #[test]
    fn reset_closes_the_session_and_reset_if_not_running() {
        let mut dev = device();
        script_flags(7);
        script_state(Running);
        script_set(new_data_fd());
        let mut session = dev.set_state(StopCopy).unwrap().unwrap();
        reply_ok(0);
        dev.reset().unwrap();
        assert!(matches!(
            session_read(session.as_mut(), 4).unwrap_err().kind,
            ErrorKind::SessionClosed
        ));
        take_calls();

        script_state(Resuming);
        reply_ok(0);
        assert_eq!(dev.reset_if_not_running().unwrap(), Some(Resuming));
        let calls = take_calls();
        assert_eq!(calls.len(), 2);
        assert!(matches!(calls[1], Call::None { req: 0x3B6F, .. }));

        script_state(Running);
        assert_eq!(dev.reset_if_not_running().unwrap(), None);
        assert_eq!(take_calls().len(), 1);

        reply_errno(libc::EBUSY);
        let e = dev.reset().unwrap_err();
        assert_eq!((e.op, e.raw_os_error()), (Operation::Reset, Some(libc::EBUSY)));
        take_calls();
    }

    #[test]
    fn answers_outside_the_uapi_are_invalid() {
        let dev = device();
        reply(|arg| {
            arg[8..12].copy_from_slice(&9u32.to_ne_bytes());
            Ok(0)
        });
        let e = dev.state().unwrap_err();
        assert!(matches!(e.kind, ErrorKind::InvalidAnswer(_)), "{e}");
        take_calls();

        let mut dev = device();
        script_flags(7);
        script_state(Running);
        script_set(-1); // RUNNING -> STOP_COPY must return a data_fd
        let e = dev.set_state(StopCopy).err().unwrap();
        assert!(matches!(e.kind, ErrorKind::InvalidAnswer(_)), "{e}");
        take_calls();
    }

    #[test]
    fn errno_of_queries_is_mapped() {
        let dev = device();
        reply_errno(libc::ENOTTY);
        let e = dev.flags().unwrap_err();
        assert_eq!((e.op, e.raw_os_error()), (Operation::GetFlags, Some(libc::ENOTTY)));
        assert!(e.to_string().starts_with("mtty-test: get migration flags: "), "{e}");
        reply_errno(libc::ENOTTY);
        let e = dev.stop_copy_size().unwrap_err();
        assert_eq!((e.op, e.raw_os_error()), (Operation::StopCopySize, Some(libc::ENOTTY)));
        take_calls();
        script_flags(5);
        assert_eq!(dev.flags().unwrap().bits(), 5);
        assert_eq!(dev.flags().unwrap().bits(), 5, "cached");
        assert_eq!(take_calls().len(), 1);
        reply(|arg| {
            arg[8..16].copy_from_slice(&96u64.to_ne_bytes());
            Ok(0)
        });
        assert_eq!(dev.stop_copy_size().unwrap(), 96);
        assert_eq!(features(&take_calls()), vec![(0x0001_0009, vec![0; 8])]);
    }

    fn r(iova: u64, length: u64) -> DmaRange {
        DmaRange { iova, length }
    }

    #[test]
    fn dma_logging_refuses_bad_ranges_before_the_ioctl() {
        let mut dev = device();
        for (ranges, page) in [
            (vec![], 4096),
            (vec![r(0, 0)], 4096),
            (vec![r(0x800, 4096)], 4096),
            (vec![r(0, 6000)], 4096),
            (vec![r(0, 8192), r(4096, 4096)], 4096),
            (vec![r(0x10000, 4096), r(0, 0x20000)], 4096),
            (vec![r(0, 4096)], 3000),
            (vec![r(u64::MAX - 4095, 8192)], 4096),
        ] {
            let e = dev.dma_log_start(&ranges, page).unwrap_err();
            assert_eq!(e.op, Operation::DmaLogStart);
            assert!(matches!(e.kind, ErrorKind::InvalidRequest(_)), "{ranges:?}: {e}");
        }
        assert!(take_calls().is_empty());

        reply(|arg| {
            arg[8..16].copy_from_slice(&4096u64.to_ne_bytes());
            Ok(0)
        });
        // Adjacent ranges are fine.
        assert_eq!(
            dev.dma_log_start(&[r(0x10000, 4096), r(0, 0x10000)], 4096).unwrap(),
            4096
        );
        assert_eq!(features(&take_calls())[0].0, 0x0002_0006);

        let mut small = vec![0u64; 1];
        for (iova, len, page) in [
            (0, 65 * 4096, 4096),
            (0, 4096, 2048),
            (0, 0, 4096),
            (u64::MAX, 4096, 4096),
        ] {
            let e = dev.dma_log_report(iova, len, page, &mut small).unwrap_err();
            assert!(matches!(e.kind, ErrorKind::InvalidRequest(_)), "{e}");
        }
        assert!(take_calls().is_empty());
        reply_errno(libc::EOPNOTSUPP);
        let e = dev.dma_log_report(0, 64 * 4096, 4096, &mut small).unwrap_err();
        assert_eq!(
            (e.op, e.raw_os_error()),
            (Operation::DmaLogReport, Some(libc::EOPNOTSUPP))
        );
        reply_ok(0);
        dev.dma_log_stop().unwrap();
        assert_eq!(features(&take_calls())[1], (0x0002_0007, vec![]));
    }

    fn script_region(flags: u32, size: u64, offset: u64) {
        reply(move |arg| {
            arg[4..8].copy_from_slice(&flags.to_ne_bytes());
            arg[16..24].copy_from_slice(&size.to_ne_bytes());
            arg[24..32].copy_from_slice(&offset.to_ne_bytes());
            Ok(0)
        });
    }

    #[test]
    fn region_access_uses_the_region_offset() {
        let dev = device();
        let fd = dev.fd().as_raw_fd();
        script_region(3, 8, 1 << 40);
        reply(|buf| {
            buf[0] = 0x5a;
            Ok(1)
        });
        let mut b = [0u8; 1];
        dev.region_read(0, 7, &mut b).unwrap();
        assert_eq!(b, [0x5a]);
        let calls = take_calls();
        assert_eq!(
            calls[1],
            Call::Pread {
                fd,
                len: 1,
                off: (1 << 40) + 7
            }
        );

        script_region(3, 8, 2 << 40);
        reply_ok(1);
        reply_errno(libc::EINTR);
        reply_ok(1);
        dev.region_write(1, 0, b"hi").unwrap();
        let calls = take_calls();
        assert_eq!(
            calls[1..],
            [
                Call::Pwrite {
                    fd,
                    data: b"hi".to_vec(),
                    off: 2 << 40
                },
                Call::Pwrite {
                    fd,
                    data: b"i".to_vec(),
                    off: (2 << 40) + 1
                },
                Call::Pwrite {
                    fd,
                    data: b"i".to_vec(),
                    off: (2 << 40) + 1
                },
            ]
        );

        script_region(3, 8, 0);
        let e = dev.region_read(0, 8, &mut b).unwrap_err();
        assert_eq!(e.op, Operation::RegionRead { index: 0, offset: 8 });
        assert!(matches!(e.kind, ErrorKind::InvalidRequest(_)), "{e}");
        script_region(1, 8, 0);
        let e = dev.region_write(0, 0, b"x").unwrap_err();
        assert!(matches!(e.kind, ErrorKind::InvalidRequest(_)), "{e}");
        reply_errno(libc::EINVAL);
        let e = dev.region_read(9, 0, &mut b).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(take_calls().len(), 3, "only the region-info ioctls");
    }

    // Issue 12, part 2: bounded waits on a data_fd that never answers. A socketpair stands in for
    // the data_fd: nothing is ever written to its other end. Run off the test thread, so a read
    // that blocks forever fails the test instead of hanging it.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the call blocked: no bounded wait on the data_fd")
    }

    /// A silent data_fd: (the fd the device hands out, the peer kept open so it never ends).
    fn silent_data_fd() -> (i32, std::os::unix::net::UnixStream) {
        let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
        (OwnedFd::from(ours).into_raw_fd(), peer)
    }

    fn script_data_size(bytes: u64) {
        reply(move |arg| {
            arg[8..16].copy_from_slice(&bytes.to_ne_bytes());
            Ok(0)
        });
    }

    #[test]
    fn a_silent_data_fd_reads_as_nothing_now_after_a_bounded_wait() {
        within_10s(|| {
            let mut dev = device();
            script_flags(7);
            script_state(Running);
            let (data, _peer) = silent_data_fd();
            script_set(data);
            let mut session = dev.set_state(StopCopy).unwrap().expect("a saving session");
            take_calls();
            sys::take_polls();
            assert_eq!(session_read(session.as_mut(), 16).unwrap(), ReadOutcome::NothingNow);
            assert!(take_calls().is_empty(), "no read(2) on a data_fd with nothing to read");
            let wait = READ_WAIT.as_millis() as i32;
            assert_eq!(sys::take_polls(), vec![(data, wait)]);
        });
    }

    /// Script a save of a silent device up to its reads: size, state, flags, SET -> data_fd.
    fn script_save_start() -> std::os::unix::net::UnixStream {
        script_data_size(96);
        script_state(Running);
        script_flags(7);
        let (data, peer) = silent_data_fd();
        script_set(data);
        peer
    }

    /// What restore_to does after the failure: GET (STOP_COPY), then SET RUNNING.
    fn script_restore() {
        script_state(StopCopy);
        script_set(-1);
    }

    #[test]
    fn a_save_of_a_silent_kernel_device_stalls_within_its_time_bound() {
        use crate::session::{Recovery, SaveOptions, SessionError, save};
        within_10s(|| {
            let mut dev = device();
            let _peer = script_save_start();
            script_restore();
            let opts = SaveOptions {
                max_idle_time: std::time::Duration::from_millis(100),
                ..SaveOptions::default()
            };
            let err = save(&mut dev, &mut Vec::new(), opts).expect_err("a silent device stalls");
            let msg = err.to_string();
            match err {
                SessionError::Stalled {
                    device,
                    state,
                    polls,
                    waited,
                    bytes,
                    recovery,
                } => {
                    assert_eq!((device.as_str(), state, bytes), ("mtty-test", StopCopy, 0));
                    assert!(waited >= std::time::Duration::from_millis(100), "{msg}");
                    assert!(matches!(recovery, Recovery::MovedTo(Running)), "{recovery}");
                    // Each poll waited READ_WAIT: the bound is time, not a busy count.
                    let waits = sys::take_polls();
                    assert_eq!(waits.len() as u32, polls, "{msg}");
                    assert!(polls >= 2 && polls <= 100 / READ_WAIT.as_millis() as u32 + 1, "{msg}");
                }
                other => panic!("want Stalled, got {other}"),
            }
            assert!(
                msg.contains("mtty-test") && msg.contains("STOP_COPY") && msg.contains(" ms "),
                "{msg}"
            );
            take_calls();
        });
    }

    #[test]
    fn a_save_waiting_on_a_silent_kernel_device_is_cancelled_from_another_thread() {
        use crate::session::{Recovery, SaveOptions, SessionError, save};
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        within_10s(|| {
            let mut dev = device();
            let _peer = script_save_start();
            script_restore();
            let cancel = Arc::new(AtomicBool::new(false));
            let setter = {
                let cancel = cancel.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    cancel.store(true, Ordering::Relaxed);
                })
            };
            let opts = SaveOptions {
                cancel: Some(&cancel),
                max_idle_time: std::time::Duration::from_secs(3600),
                max_idle_polls: u32::MAX,
                ..SaveOptions::default()
            };
            let err = save(&mut dev, &mut Vec::new(), opts).expect_err("cancelled");
            setter.join().unwrap();
            match err {
                SessionError::Cancelled {
                    device,
                    bytes,
                    recovery,
                    ..
                } => {
                    assert_eq!((device.as_str(), bytes), ("mtty-test", 0));
                    assert!(matches!(recovery, Recovery::MovedTo(Running)), "{recovery}");
                }
                other => panic!("want Cancelled, got {other}"),
            }
            take_calls();
        });
    }

    // Issue 12: RESUMING writes bounded as the reads are. A pipe whose reader never reads stands
    // in for the data_fd; the scripted write(2) is a real write on it, so a write that would
    // block in the kernel blocks here too (and `within_10s` fails the test instead of hanging).

    /// A data_fd whose reader never reads: (the write end handed out, a clone of it for the real
    /// writes of the script, the read end kept open so writes never fail with EPIPE).
    fn unread_pipe() -> (i32, std::io::PipeWriter, std::io::PipeReader) {
        let (reader, writer) = std::io::pipe().unwrap();
        let clone = writer.try_clone().unwrap();
        (OwnedFd::from(writer).into_raw_fd(), clone, reader)
    }

    /// Script a load up to its writes: state, flags, SET -> `data_fd`.
    fn script_load_start(data_fd: i32) {
        script_state(Running);
        script_flags(7);
        script_set(data_fd);
    }

    /// The next write(2) really writes to `pipe` (what the kernel would do with the data_fd).
    fn script_real_write(mut pipe: std::io::PipeWriter) {
        use std::io::Write;
        reply(move |buf| pipe.write(buf).map(|n| n as i32));
    }

    #[test]
    fn a_load_into_a_data_fd_that_takes_nothing_stalls_within_its_time_bound() {
        use crate::session::{LoadOptions, Recovery, SessionError, WRITE_WAIT, load};
        within_10s(|| {
            let mut dev = device();
            let (data, pipe, _reader) = unread_pipe();
            script_load_start(data);
            script_real_write(pipe);
            reply_ok(0); // VFIO_DEVICE_RESET after the failure
            let state = vec![0x5au8; 256 << 10];
            let opts = LoadOptions {
                max_idle_time: std::time::Duration::from_millis(100),
                ..LoadOptions::default()
            };
            let err = load(&mut dev, &mut &state[..], opts).expect_err("a data_fd that takes nothing stalls");
            let msg = err.to_string();
            match err {
                SessionError::Stalled {
                    device,
                    state: in_state,
                    polls,
                    waited,
                    bytes,
                    recovery,
                } => {
                    assert_eq!((device.as_str(), in_state), ("mtty-test", Resuming));
                    // The pipe took what fit (non-blocking), then nothing.
                    assert!(bytes > 0 && bytes < state.len() as u64, "{msg}");
                    assert!(waited >= std::time::Duration::from_millis(100), "{msg}");
                    assert!(matches!(recovery, Recovery::Reset), "{recovery}");
                    // One poll for the write that went through, then one per WRITE_WAIT.
                    let waits = sys::take_polls();
                    assert_eq!(waits.len() as u32, polls + 1, "{msg}");
                    let wait = WRITE_WAIT.as_millis() as i32;
                    assert!(waits.iter().all(|&w| w == (data, wait)), "{waits:?}");
                    assert!(polls >= 2 && polls <= 100 / wait as u32 + 1, "{msg}");
                }
                other => panic!("want Stalled, got {other}"),
            }
            assert!(
                msg.contains("mtty-test") && msg.contains("took no state in RESUMING") && msg.contains(" ms "),
                "{msg}"
            );
            let writes: Vec<usize> = take_calls()
                .into_iter()
                .filter_map(|c| match c {
                    Call::Write { data: d, .. } => Some(d.len()),
                    _ => None,
                })
                .collect();
            assert_eq!(writes, vec![state.len()], "one write(2), then only waits");
        });
    }

    #[test]
    fn a_load_waiting_on_a_full_data_fd_is_cancelled_from_another_thread() {
        use crate::session::{LoadOptions, Recovery, SessionError, load};
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        within_10s(|| {
            let mut dev = device();
            let (data, pipe, _reader) = unread_pipe();
            script_load_start(data);
            script_real_write(pipe);
            reply_ok(0);
            let cancel = Arc::new(AtomicBool::new(false));
            let setter = {
                let cancel = cancel.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    cancel.store(true, Ordering::Relaxed);
                })
            };
            let opts = LoadOptions {
                cancel: Some(&cancel),
                max_idle_time: std::time::Duration::from_secs(3600),
                ..LoadOptions::default()
            };
            let state = vec![1u8; 256 << 10];
            let err = load(&mut dev, &mut &state[..], opts).expect_err("cancelled");
            setter.join().unwrap();
            match err {
                SessionError::Cancelled {
                    device, op, recovery, ..
                } => {
                    assert_eq!((device.as_str(), op), ("mtty-test", "load"));
                    assert!(matches!(recovery, Recovery::Reset), "{recovery}");
                }
                other => panic!("want Cancelled, got {other}"),
            }
            take_calls();
        });
    }

    #[test]
    fn a_session_write_is_bounded_in_size_and_in_time() {
        within_10s(|| {
            let mut dev = device();
            script_flags(7);
            script_state(Stop);
            let (data, pipe, _reader) = unread_pipe();
            script_set(data);
            let mut session = dev.set_state(Resuming).unwrap().expect("a resuming session");
            take_calls();
            // One write(2) is given at most MAX_WRITE bytes.
            script_real_write(pipe);
            let big = vec![7u8; 3 * MAX_WRITE];
            let taken = session.write(&big).unwrap();
            assert!(taken > 0 && taken <= MAX_WRITE, "{taken}");
            let writes: Vec<(i32, usize)> = take_calls()
                .into_iter()
                .map(|c| match c {
                    Call::Write { fd, data: d } => (fd, d.len()),
                    other => panic!(
                        "only write(2) wanted, got a call to {:?}",
                        std::mem::discriminant(&other)
                    ),
                })
                .collect();
            assert_eq!(writes, vec![(data, MAX_WRITE)]);
            // The pipe is full now: a write with no wait of its own gives up after WRITE_TIMEOUT,
            // naming the device, the state and the time waited.
            let began = std::time::Instant::now();
            let e = session.write(b"more").unwrap_err();
            assert!(began.elapsed() >= WRITE_TIMEOUT, "{e}");
            assert_eq!(e.op, Operation::Write);
            let msg = e.to_string();
            assert!(
                msg.contains("mtty-test") && msg.contains("RESUMING") && msg.contains(" ms"),
                "{msg}"
            );
            assert!(take_calls().is_empty(), "no write(2) on a data_fd without room");
            sys::take_polls();
        });
    }
}
