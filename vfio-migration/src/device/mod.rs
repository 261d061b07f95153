//! The backend seam: a migratable device and its transfer sessions.
//!
//! A [`MigrationDevice`] is anything that speaks the VFIO migration uAPI v2: the real kernel
//! ([`crate::kernel`]) or the built-in emulated device ([`crate::emulated`]). Everything above this
//! module (save/load, live migration, dirty tracking, the CLI) works through this trait only.
//!
//! A transition that opens a transfer session returns a [`TransferSession`]: the owner of the
//! kernel's `data_fd` (or the emulated equivalent). One saving session lives across
//! PRE_COPY -> PRE_COPY_P2P -> STOP_COPY; it ends on STOP_COPY -> STOP, PRE_COPY -> RUNNING,
//! PRE_COPY_P2P -> RUNNING_P2P, RESUMING -> STOP, a fall into ERROR, or a reset. After that every
//! call on it fails with [`ErrorKind::SessionClosed`].

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::state::{DeviceState, MigrationFlags, SessionKind, StateError};

/// What the engine was doing with a device when something failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Opening the device (sysfs, group, container, cdev, iommufd).
    Open,
    /// Reading the migration flags (`VFIO_DEVICE_FEATURE_MIGRATION`).
    GetFlags,
    /// Reading the device state (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` GET).
    GetState,
    /// Requesting a device state (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET).
    SetState {
        /// The state the device was in.
        from: DeviceState,
        /// The requested state.
        to: DeviceState,
    },
    /// Reading pre-copy info (`VFIO_MIG_GET_PRECOPY_INFO`).
    PrecopyInfo,
    /// Probing and opting in to PRE_COPY info v2 (`VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`).
    PrecopyInfoV2,
    /// Reading the stop-copy size estimate (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`).
    StopCopySize,
    /// Resetting the device (`VFIO_DEVICE_RESET`).
    Reset,
    /// Reading device state from the transfer session.
    Read,
    /// Writing device state into the transfer session.
    Write,
    /// Starting device DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START`).
    DmaLogStart,
    /// Reading the device DMA log (`VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`).
    DmaLogReport,
    /// Stopping device DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`).
    DmaLogStop,
    /// Reading the device identity (sysfs attributes).
    Identity,
    /// Reading a device region (`VFIO_DEVICE_GET_REGION_INFO`, then `pread`).
    RegionRead {
        /// The region index (BAR0 is 0).
        index: u32,
        /// The offset inside the region.
        offset: u64,
    },
    /// Writing a device region (`VFIO_DEVICE_GET_REGION_INFO`, then `pwrite`).
    RegionWrite {
        /// The region index (BAR0 is 0).
        index: u32,
        /// The offset inside the region.
        offset: u64,
    },
    /// Reading the device info: flags, regions and IRQ indexes (`VFIO_USER_DEVICE_GET_INFO`).
    DeviceInfo,
    /// Reading a region's info and capabilities (`VFIO_USER_DEVICE_GET_REGION_INFO`).
    RegionInfo {
        /// The region index.
        index: u32,
    },
    /// Reading an IRQ index's info (`VFIO_USER_DEVICE_GET_IRQ_INFO`).
    IrqInfo {
        /// The IRQ index.
        index: u32,
    },
    /// Setting up or tearing down interrupts (`VFIO_USER_DEVICE_SET_IRQS`).
    SetIrqs {
        /// The IRQ index.
        index: u32,
    },
    /// Mapping memory for the device's DMA (`VFIO_USER_DMA_MAP`).
    DmaMap {
        /// The range's start (IOVA).
        iova: u64,
        /// The range's length in bytes.
        size: u64,
    },
    /// Unmapping memory mapped for DMA (`VFIO_USER_DMA_UNMAP`).
    DmaUnmap {
        /// The range's start (IOVA).
        iova: u64,
        /// The range's length in bytes.
        size: u64,
    },
    /// Shutting down the connection to the device's server.
    Shutdown,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::Open => f.write_str("open"),
            Operation::GetFlags => f.write_str("get migration flags"),
            Operation::GetState => f.write_str("get device state"),
            Operation::SetState { from, to } => write!(f, "set device state {from} -> {to}"),
            Operation::PrecopyInfo => f.write_str("get pre-copy info"),
            Operation::PrecopyInfoV2 => f.write_str("opt in to pre-copy info v2"),
            Operation::StopCopySize => f.write_str("get stop-copy size"),
            Operation::Reset => f.write_str("reset"),
            Operation::Read => f.write_str("read device state"),
            Operation::Write => f.write_str("write device state"),
            Operation::DmaLogStart => f.write_str("start DMA logging"),
            Operation::DmaLogReport => f.write_str("read DMA log"),
            Operation::DmaLogStop => f.write_str("stop DMA logging"),
            Operation::Identity => f.write_str("read device identity"),
            Operation::RegionRead { index, offset } => write!(f, "read region {index} at {offset:#x}"),
            Operation::RegionWrite { index, offset } => write!(f, "write region {index} at {offset:#x}"),
            Operation::DeviceInfo => f.write_str("get device info"),
            Operation::RegionInfo { index } => write!(f, "get region {index} info"),
            Operation::IrqInfo { index } => write!(f, "get IRQ index {index} info"),
            Operation::SetIrqs { index } => write!(f, "set IRQs of index {index}"),
            Operation::DmaMap { iova, size } => write!(f, "DMA map {iova:#x}+{size:#x}"),
            Operation::DmaUnmap { iova, size } => write!(f, "DMA unmap {iova:#x}+{size:#x}"),
            Operation::Shutdown => f.write_str("shut down the connection"),
        }
    }
}

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// The kernel (or the emulated device) answered with an errno.
    #[error("{0}")]
    Os(io::Error),
    /// The request is impossible in the state model (checked before touching the device).
    #[error("{0}")]
    State(#[from] StateError),
    /// The transfer session was ended by a transition, a reset or an error.
    #[error("the transfer session is closed")]
    SessionClosed,
    /// The device answered with something the uAPI does not allow.
    #[error("invalid answer from the device: {0}")]
    InvalidAnswer(String),
    /// The caller passed something unusable (described).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

/// A failed device operation, naming the device and the operation.
#[derive(Debug, thiserror::Error)]
#[error("{device}: {op}: {kind}")]
pub struct DeviceError {
    /// The device's name (sysfs path, mdev UUID, or `emulated:...`).
    pub device: String,
    /// The operation that failed.
    pub op: Operation,
    /// Why it failed.
    pub kind: ErrorKind,
}

impl DeviceError {
    /// A new error.
    pub fn new(device: impl Into<String>, op: Operation, kind: ErrorKind) -> Self {
        Self {
            device: device.into(),
            op,
            kind,
        }
    }

    /// An error carrying an errno.
    pub fn errno(device: impl Into<String>, op: Operation, errno: i32) -> Self {
        Self::new(device, op, ErrorKind::Os(io::Error::from_raw_os_error(errno)))
    }

    /// An error carrying an [`io::Error`].
    pub fn io(device: impl Into<String>, op: Operation, err: io::Error) -> Self {
        Self::new(device, op, ErrorKind::Os(err))
    }

    /// A transition that should have opened a transfer session did not (a device bug).
    pub fn no_session(device: impl Into<String>, from: DeviceState, to: DeviceState) -> Self {
        Self::new(
            device,
            Operation::SetState { from, to },
            ErrorKind::InvalidAnswer(format!("{from} -> {to} opened no transfer session")),
        )
    }

    /// The errno, when the failure came with one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match &self.kind {
            ErrorKind::Os(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// The result of one read from a transfer session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes were read (never 0).
    Data(usize),
    /// No data now, more may come later (PRE_COPY: ENOMSG, or 0 from drivers such as mtty).
    NothingNow,
    /// The end of the device state (STOP_COPY: read returned 0).
    End,
}

/// Pre-copy accounting (`struct vfio_precopy_info`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrecopyInfo {
    /// Initial data still to be read; falls to 0 as it is read.
    pub initial_bytes: u64,
    /// Data that changed since it was read; rises and falls.
    pub dirty_bytes: u64,
    /// New initial data appeared since the last query (`VFIO_PRECOPY_INFO_REINIT`, PRE_COPY info
    /// v2): `initial_bytes` started over from a new value and counts down again. Reported once
    /// per re-init, and only by a device that was opted in with
    /// [`MigrationDevice::enable_precopy_info_v2`]; always `false` otherwise.
    pub reinit: bool,
}

impl PrecopyInfo {
    /// Initial plus dirty bytes.
    pub fn pending(&self) -> u64 {
        self.initial_bytes.saturating_add(self.dirty_bytes)
    }
}

/// A range of device-visible addresses (IOVA) for DMA logging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmaRange {
    /// First address.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
}

/// What a device is, so a device state is loaded only into a compatible device.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DeviceIdentity {
    /// A PCI function (vfio-pci and variant drivers).
    Pci {
        /// PCI vendor ID.
        vendor: u16,
        /// PCI device ID.
        device: u16,
        /// PCI subsystem vendor ID.
        subsystem_vendor: u16,
        /// PCI subsystem device ID.
        subsystem_device: u16,
    },
    /// A mediated device of a given type (e.g. `mtty-2`).
    Mdev {
        /// The mdev type name.
        mdev_type: String,
    },
    /// The built-in emulated device; the string holds the parameters that must match.
    Emulated {
        /// Canonical parameters, e.g. `size=67108864,block=4096`.
        params: String,
    },
    /// Nothing known.
    Unknown,
}

impl fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceIdentity::Pci {
                vendor,
                device,
                subsystem_vendor,
                subsystem_device,
            } => write!(
                f,
                "pci {vendor:04x}:{device:04x} subsystem {subsystem_vendor:04x}:{subsystem_device:04x}"
            ),
            DeviceIdentity::Mdev { mdev_type } => write!(f, "mdev {mdev_type}"),
            DeviceIdentity::Emulated { params } => write!(f, "emulated {params}"),
            DeviceIdentity::Unknown => f.write_str("unknown"),
        }
    }
}

/// Why a device state may not go from a device of one identity into a device of another
/// ([`DeviceIdentity::check_compatible`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityMismatch {
    /// The identities are known and differ.
    #[error("the state comes from {source_identity}, the destination is {destination}")]
    Different {
        /// The identity the state was saved from.
        source_identity: DeviceIdentity,
        /// The destination's identity.
        destination: DeviceIdentity,
    },
    /// One side's identity is unknown, so nothing says the state fits the destination: refused
    /// unless forced.
    #[error(
        "the state comes from {source_identity}, the destination is {destination}: an unknown identity cannot be \
         checked, so the state is refused (force it with --force-unknown-identity / force_unknown_identity only if \
         you know both are the same device model)"
    )]
    Unknown {
        /// The identity the state was saved from.
        source_identity: DeviceIdentity,
        /// The destination's identity.
        destination: DeviceIdentity,
    },
}

impl DeviceIdentity {
    /// Whether a state saved from a device with this identity may be loaded into a device with
    /// `destination`'s. The one check every path uses (stream loads, local and transport live
    /// migration, the Cloud Hypervisor integration's restore), before the destination is touched.
    ///
    /// Known identities must be equal. [`DeviceIdentity::Unknown`] on either side (a device whose
    /// sysfs could not be read, or a stream written without an identity) proves nothing and is
    /// refused unless `force_unknown` is set (then it matches anything: the caller vouches for it).
    ///
    /// ```
    /// use vfio_migration::device::{DeviceIdentity, IdentityMismatch};
    ///
    /// let mtty = DeviceIdentity::Mdev { mdev_type: "mtty-2".into() };
    /// assert!(mtty.check_compatible(&mtty, false).is_ok());
    /// let other = DeviceIdentity::Mdev { mdev_type: "mtty-1".into() };
    /// assert!(matches!(mtty.check_compatible(&other, true), Err(IdentityMismatch::Different { .. })));
    /// let unknown = DeviceIdentity::Unknown;
    /// assert!(matches!(unknown.check_compatible(&unknown, false), Err(IdentityMismatch::Unknown { .. })));
    /// assert!(matches!(mtty.check_compatible(&unknown, false), Err(IdentityMismatch::Unknown { .. })));
    /// assert!(unknown.check_compatible(&mtty, true).is_ok());
    /// ```
    pub fn check_compatible(&self, destination: &DeviceIdentity, force_unknown: bool) -> Result<(), IdentityMismatch> {
        let unknown = *self == DeviceIdentity::Unknown || *destination == DeviceIdentity::Unknown;
        if unknown {
            if force_unknown {
                return Ok(());
            }
            return Err(IdentityMismatch::Unknown {
                source_identity: self.clone(),
                destination: destination.clone(),
            });
        }
        if self != destination {
            return Err(IdentityMismatch::Different {
                source_identity: self.clone(),
                destination: destination.clone(),
            });
        }
        Ok(())
    }
}

/// A device that supports VFIO migration uAPI v2.
///
/// Implementations must follow the uAPI exactly: `set_state` carries out the whole path the kernel
/// would take ([`crate::state::path`]), returns a session when the final arc opens one, and on
/// failure leaves the device in its original state, a state on the path, or ERROR (which
/// [`MigrationDevice::state`] then tells).
pub trait MigrationDevice: Send {
    /// The device's name for messages (sysfs path, mdev UUID, `emulated:...`).
    fn name(&self) -> &str;

    /// What the device is ([`DeviceIdentity`]).
    fn identity(&self) -> DeviceIdentity;

    /// The migration flags the device supports.
    fn flags(&self) -> Result<MigrationFlags, DeviceError>;

    /// The current device state, as the device reports it.
    fn state(&self) -> Result<DeviceState, DeviceError>;

    /// Request `to`. Returns the new transfer session when the transition opens one.
    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError>;

    /// The device's estimate of the STOP_COPY data size in bytes.
    fn stop_copy_size(&self) -> Result<u64, DeviceError>;

    /// Reset the device (`VFIO_DEVICE_RESET`): it returns to RUNNING and any session ends.
    fn reset(&mut self) -> Result<(), DeviceError>;

    /// Start device DMA logging over `ranges` with the requested `page_size`; returns the page
    /// size the device chose.
    fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError>;

    /// Read and clear the DMA log of `[iova, iova + length)` into `bitmap` (one bit per
    /// `page_size` page, bit n in word n / 64 at bit n % 64). Bits are only set: zero it first.
    fn dma_log_report(&mut self, iova: u64, length: u64, page_size: u64, bitmap: &mut [u64])
    -> Result<(), DeviceError>;

    /// Stop device DMA logging.
    fn dma_log_stop(&mut self) -> Result<(), DeviceError>;

    /// Opt in to PRE_COPY info v2 when the device offers it (`VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`:
    /// a PROBE, then a SET without data). Returns whether the device is opted in: then
    /// [`TransferSession::precopy_info`] reports [`PrecopyInfo::reinit`] when new initial data
    /// appears. A device that does not offer it answers `false` and behaves exactly as before.
    /// Called before the saving session opens (RUNNING -> PRE_COPY); the default offers nothing.
    fn enable_precopy_info_v2(&mut self) -> Result<bool, DeviceError> {
        Ok(false)
    }
}

macro_rules! forward_device {
    ($($t:tt)*) => {
        impl<T: MigrationDevice + ?Sized> MigrationDevice for $($t)* {
            fn name(&self) -> &str {
                (**self).name()
            }
            fn identity(&self) -> DeviceIdentity {
                (**self).identity()
            }
            fn flags(&self) -> Result<MigrationFlags, DeviceError> {
                (**self).flags()
            }
            fn state(&self) -> Result<DeviceState, DeviceError> {
                (**self).state()
            }
            fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
                (**self).set_state(to)
            }
            fn stop_copy_size(&self) -> Result<u64, DeviceError> {
                (**self).stop_copy_size()
            }
            fn reset(&mut self) -> Result<(), DeviceError> {
                (**self).reset()
            }
            fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError> {
                (**self).dma_log_start(ranges, page_size)
            }
            fn dma_log_report(
                &mut self,
                iova: u64,
                length: u64,
                page_size: u64,
                bitmap: &mut [u64],
            ) -> Result<(), DeviceError> {
                (**self).dma_log_report(iova, length, page_size, bitmap)
            }
            fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
                (**self).dma_log_stop()
            }
            fn enable_precopy_info_v2(&mut self) -> Result<bool, DeviceError> {
                (**self).enable_precopy_info_v2()
            }
        }
    };
}

// A borrowed or boxed device is a device: callers can lend devices to a migration and keep them.
forward_device!(&mut T);
forward_device!(Box<T>);

/// An open transfer session: the `data_fd` of the uAPI or the emulated equivalent.
pub trait TransferSession: Send + fmt::Debug {
    /// Saving or resuming.
    fn kind(&self) -> SessionKind;

    /// Read device state. Short reads are normal; EINTR is retried inside.
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError>;

    /// Write device state; returns how many bytes were taken (short writes are normal).
    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError>;

    /// Write device state, waiting at most about `wait` for the device to take any: `Ok(None)`
    /// when it took nothing in that time (the caller checks its cancel flag and its own time
    /// bound, then writes again), else as [`write`](Self::write). The load path writes this way,
    /// as the save path reads ([`ReadOutcome::NothingNow`]).
    ///
    /// The default is [`write`](Self::write), which may wait longer (the emulated device never
    /// waits; the kernel backend bounds both).
    fn write_within(&mut self, buf: &[u8], wait: std::time::Duration) -> Result<Option<usize>, DeviceError> {
        let _ = wait;
        self.write(buf).map(Some)
    }

    /// Pre-copy accounting; only valid in PRE_COPY and PRE_COPY_P2P.
    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError>;
}

/// The device state and session generation a device shares with its open sessions.
///
/// The kernel backend and the emulated device both keep one: the device updates it after every
/// transition, and a session checks it to interpret a 0-byte read (nothing now in PRE_COPY, end in
/// STOP_COPY) and to refuse use after its session ended.
#[derive(Clone, Debug)]
pub struct SessionPhase(Arc<AtomicU64>);

impl SessionPhase {
    /// A phase cell for a device currently in `state`, generation 0.
    pub fn new(state: DeviceState) -> Self {
        Self(Arc::new(AtomicU64::new(state.as_raw() as u64)))
    }

    fn load(&self) -> (u32, DeviceState) {
        let v = self.0.load(Ordering::Acquire);
        // The low half only ever holds a valid state number written by `store`.
        let state = DeviceState::from_raw(v as u32).unwrap_or(DeviceState::Error);
        ((v >> 32) as u32, state)
    }

    fn store(&self, generation: u32, state: DeviceState) {
        self.0
            .store(((generation as u64) << 32) | state.as_raw() as u64, Ordering::Release);
    }

    /// The last known device state.
    pub fn state(&self) -> DeviceState {
        self.load().1
    }

    /// The generation of the current (or last) session.
    pub fn generation(&self) -> u32 {
        self.load().0
    }

    /// Record a new state without opening a session. A state without a session (or a
    /// different kind of session) ends the current one.
    pub fn set_state(&self, state: DeviceState) {
        let (generation, old) = self.load();
        let generation = if old.session_kind().is_some() && old.session_kind() != state.session_kind() {
            generation.wrapping_add(1)
        } else {
            generation
        };
        self.store(generation, state);
    }

    /// Record `state` and open a new session; returns the new session's generation.
    pub fn open_session(&self, state: DeviceState) -> u32 {
        let generation = self.generation().wrapping_add(1);
        self.store(generation, state);
        generation
    }

    /// End whatever session is open (reset, error) and record `state`.
    pub fn close_session(&self, state: DeviceState) {
        let generation = self.generation().wrapping_add(1);
        self.store(generation, state);
    }

    /// Whether the session of `generation` and `kind` is still open; returns the state if so.
    pub fn session_state(&self, generation: u32, kind: SessionKind) -> Option<DeviceState> {
        let (g, state) = self.load();
        (g == generation && state.session_kind() == Some(kind)).then_some(state)
    }
}

/// Interpret the result of one `read()` on a saving session in `state`.
///
/// `Ok(n > 0)` is data; `Ok(0)` is the end in STOP_COPY and "nothing now" in PRE_COPY(_P2P);
/// ENOMSG is "nothing now" in PRE_COPY(_P2P). Anything else is returned as the errno.
/// (EINTR must be retried by the caller before this.)
pub fn classify_read(result: io::Result<usize>, state: DeviceState) -> io::Result<ReadOutcome> {
    let precopy = matches!(state, DeviceState::PreCopy | DeviceState::PreCopyP2p);
    match result {
        Ok(0) if precopy => Ok(ReadOutcome::NothingNow),
        Ok(0) => Ok(ReadOutcome::End),
        Ok(n) => Ok(ReadOutcome::Data(n)),
        Err(e) if precopy && e.raw_os_error() == Some(libc::ENOMSG) => Ok(ReadOutcome::NothingNow),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_tracks_sessions() {
        let p = SessionPhase::new(DeviceState::Running);
        let g = p.open_session(DeviceState::PreCopy);
        assert_eq!(p.session_state(g, SessionKind::Saving), Some(DeviceState::PreCopy));
        p.set_state(DeviceState::PreCopyP2p);
        p.set_state(DeviceState::StopCopy);
        assert_eq!(p.session_state(g, SessionKind::Saving), Some(DeviceState::StopCopy));
        p.set_state(DeviceState::Stop);
        assert_eq!(p.session_state(g, SessionKind::Saving), None);
        let g2 = p.open_session(DeviceState::StopCopy);
        assert_ne!(g, g2);
        assert_eq!(p.session_state(g, SessionKind::Saving), None);
        p.close_session(DeviceState::Running);
        assert_eq!(p.session_state(g2, SessionKind::Saving), None);
        assert_eq!(p.state(), DeviceState::Running);
    }

    #[test]
    fn read_results_are_classified_by_state() {
        use DeviceState::*;
        assert_eq!(classify_read(Ok(5), StopCopy).unwrap(), ReadOutcome::Data(5));
        assert_eq!(classify_read(Ok(0), StopCopy).unwrap(), ReadOutcome::End);
        assert_eq!(classify_read(Ok(0), PreCopy).unwrap(), ReadOutcome::NothingNow);
        assert_eq!(classify_read(Ok(0), PreCopyP2p).unwrap(), ReadOutcome::NothingNow);
        let enomsg = || Err(io::Error::from_raw_os_error(libc::ENOMSG));
        assert_eq!(classify_read(enomsg(), PreCopy).unwrap(), ReadOutcome::NothingNow);
        assert_eq!(
            classify_read(enomsg(), StopCopy).unwrap_err().raw_os_error(),
            Some(libc::ENOMSG)
        );
    }

    #[test]
    fn errors_name_device_and_operation() {
        let e = DeviceError::errno(
            "mtty-a",
            Operation::SetState {
                from: DeviceState::Running,
                to: DeviceState::StopCopy,
            },
            libc::EINVAL,
        );
        let s = e.to_string();
        assert!(s.starts_with("mtty-a: set device state RUNNING -> STOP_COPY: "), "{s}");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }
}
