//! Errors of save and load.

use std::io;

use super::recovery::{Recovery, TransitionError};
use crate::device::DeviceError;
use crate::state::DeviceState;

/// A failed save or load, with what was done to the device afterwards.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The device was not in a state this operation starts from.
    #[error("{device}: cannot {op} from state {state} (needs {needs}); the device was not touched")]
    BadStartState {
        /// The device.
        device: String,
        /// "save" or "load".
        op: &'static str,
        /// The state it was in.
        state: DeviceState,
        /// What is needed.
        needs: &'static str,
    },
    /// A transition failed.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// Reading or writing the transfer session failed.
    #[error("{error} after {bytes} bytes; {recovery}")]
    Transfer {
        /// The device error.
        error: DeviceError,
        /// Bytes moved before the failure.
        bytes: u64,
        /// What was done afterwards.
        recovery: Recovery,
    },
    /// The destination of a save (or the source of a load) failed.
    #[error("{device}: {what} failed after {bytes} bytes: {error}; {recovery}")]
    Io {
        /// The device.
        device: String,
        /// What was being done, e.g. "writing the saved state".
        what: &'static str,
        /// Bytes moved before the failure.
        bytes: u64,
        /// The I/O error.
        error: io::Error,
        /// What was done afterwards.
        recovery: Recovery,
    },
    /// The caller cancelled the operation.
    #[error("{device}: {op} cancelled after {bytes} bytes; {recovery}")]
    Cancelled {
        /// The device.
        device: String,
        /// "save" or "load".
        op: &'static str,
        /// Bytes moved before the cancel.
        bytes: u64,
        /// What was done afterwards.
        recovery: Recovery,
    },
    /// The device produced no data for too long in STOP_COPY, or took none for too long in
    /// RESUMING.
    #[error("{device}: {}; {recovery}", stall_text(*state, *polls, *waited, *bytes))]
    Stalled {
        /// The device.
        device: String,
        /// The state it was read (STOP_COPY) or written (RESUMING) in.
        state: DeviceState,
        /// How many consecutive polls found nothing to read (no room to write).
        polls: u32,
        /// How long it gave (took) nothing.
        waited: std::time::Duration,
        /// Bytes moved before.
        bytes: u64,
        /// What was done afterwards.
        recovery: Recovery,
    },
    /// The device's state could not be read at all.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl SessionError {
    /// What was done to the device after the failure, when anything was.
    pub fn recovery(&self) -> Option<&Recovery> {
        match self {
            SessionError::Transition(t) => Some(&t.recovery),
            SessionError::Transfer { recovery, .. }
            | SessionError::Io { recovery, .. }
            | SessionError::Cancelled { recovery, .. }
            | SessionError::Stalled { recovery, .. } => Some(recovery),
            SessionError::BadStartState { .. } | SessionError::Device(_) => None,
        }
    }
}

/// The wording of a stall, shared by [`SessionError::Stalled`] and the live source's stop-copy:
/// reading in STOP_COPY (or PRE_COPY), writing in RESUMING.
pub(crate) fn stall_text(state: DeviceState, polls: u32, waited: std::time::Duration, bytes: u64) -> String {
    let what = if state == DeviceState::Resuming {
        "the device took no state"
    } else {
        "no device state"
    };
    format!(
        "{what} in {state} for {} ms ({polls} polls) after {bytes} bytes",
        waited.as_millis()
    )
}
