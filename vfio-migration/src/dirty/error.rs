//! Errors of dirty page tracking, naming the tracker (or device) and the operation.

use std::fmt;
use std::io;

use super::DirtyRange;
use crate::device::DeviceError;

/// What a tracker was doing when something failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackOp {
    /// Starting dirty tracking.
    Start,
    /// Reading (and clearing) the dirty state.
    Report,
    /// Stopping dirty tracking.
    Stop,
    /// Removing a DMA mapping while keeping its dirty pages.
    Unmap,
    /// Translating IOVA ranges to guest-physical ranges (vIOMMU).
    Translate,
    /// Re-arming after a vIOMMU mapping change.
    Rearm,
    /// Choosing a tracker at migration start.
    Select,
}

impl fmt::Display for TrackOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrackOp::Start => "start dirty tracking",
            TrackOp::Report => "report dirty pages",
            TrackOp::Stop => "stop dirty tracking",
            TrackOp::Unmap => "unmap with dirty bitmap",
            TrackOp::Translate => "translate IOVA to guest-physical",
            TrackOp::Rearm => "re-arm after a mapping change",
            TrackOp::Select => "choose a dirty tracker",
        })
    }
}

/// One tracking method that cannot be used, and why (see [`TrackErrorKind::Refused`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The device or tracker concerned.
    pub who: String,
    /// Why it cannot be used.
    pub why: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.who, self.why)
    }
}

/// Why a tracking operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackErrorKind {
    /// A device operation failed (the error names the device and its operation).
    #[error("{0}")]
    Device(#[from] DeviceError),
    /// The kernel answered with an errno (type1 container, iommufd).
    #[error("{0}")]
    Os(#[from] io::Error),
    /// The tracker was not started.
    #[error("not started")]
    NotStarted,
    /// The tracker was already started.
    #[error("already started")]
    AlreadyStarted,
    /// A range the tracker cannot use.
    #[error("invalid range {range}: {reason}")]
    InvalidRange {
        /// The range.
        range: DirtyRange,
        /// Why it is invalid.
        reason: String,
    },
    /// A bitmap larger than allowed.
    #[error("a dirty bitmap of {bytes} bytes is larger than the limit of {limit} bytes")]
    BitmapTooLarge {
        /// Bytes needed.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The device or kernel answered with something the uAPI does not allow.
    #[error("invalid answer: {0}")]
    InvalidAnswer(String),
    /// A request that does not fit the configuration (described).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Dirty IOVA that the vIOMMU does not translate: its guest pages cannot be named.
    #[error("{bytes} dirty bytes at IOVA {first} and after have no guest-physical translation")]
    Untranslated {
        /// The first untranslated dirty IOVA range.
        first: DirtyRange,
        /// How many dirty bytes had no translation.
        bytes: u64,
    },
    /// No usable dirty tracking: every method was rejected.
    #[error("no usable dirty page tracking: {}", join(.0))]
    Refused(Vec<Rejection>),
}

fn join(r: &[Rejection]) -> String {
    r.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; ")
}

/// A failed tracking operation, naming the tracker and the operation.
#[derive(Debug, thiserror::Error)]
#[error("{tracker}: {op}: {kind}")]
pub struct DirtyError {
    /// The tracker's name (e.g. `device-log`, `type1:/dev/vfio/vfio`).
    pub tracker: String,
    /// The operation that failed.
    pub op: TrackOp,
    /// Why it failed.
    #[source]
    pub kind: TrackErrorKind,
}

impl DirtyError {
    /// A new error.
    pub fn new(tracker: impl Into<String>, op: TrackOp, kind: impl Into<TrackErrorKind>) -> Self {
        Self {
            tracker: tracker.into(),
            op,
            kind: kind.into(),
        }
    }

    /// The errno, when the failure came with one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match &self.kind {
            TrackErrorKind::Device(e) => e.raw_os_error(),
            TrackErrorKind::Os(e) => e.raw_os_error(),
            _ => None,
        }
    }
}
