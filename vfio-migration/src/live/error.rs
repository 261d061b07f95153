//! Errors of live migration.

use std::io;

use crate::device::DeviceError;
use crate::session::{Recovery, TransitionError};

/// A failed live-migration step.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The migration cannot start as configured (checked before any device is touched).
    #[error("migration refused: {0}")]
    Refused(String),
    /// A device operation failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A transition failed (with what recovery did to that device).
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// The sink (stream, connection) failed.
    #[error("sending device state failed: {0}")]
    Sink(#[source] io::Error),
    /// A chunk broke the sequence rules (duplicate, gap, too much out of order, unknown device).
    #[error("device {device}: {reason}")]
    Sequence {
        /// The device index.
        device: usize,
        /// What is wrong.
        reason: String,
    },
    /// The step is not valid in the current phase of the migration.
    #[error("cannot {step} while the migration is {phase}")]
    WrongPhase {
        /// The step asked for.
        step: &'static str,
        /// The current phase.
        phase: &'static str,
    },
    /// The migration was aborted after a failure; the recoveries say what was done per device.
    #[error("{cause}; aborted: {}", format_recoveries(.recoveries))]
    Aborted {
        /// What went wrong first.
        cause: Box<LiveError>,
        /// What was done to each device (by index).
        recoveries: Vec<(String, Recovery)>,
    },
}

fn format_recoveries(r: &[(String, Recovery)]) -> String {
    if r.is_empty() {
        return "no device needed recovery".into();
    }
    r.iter()
        .map(|(d, rec)| format!("{d}: {rec}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl LiveError {
    /// Whether every device ended in a known, usable state after this error.
    pub fn devices_recovered(&self) -> bool {
        match self {
            LiveError::Aborted { recoveries, .. } => recoveries.iter().all(|(_, r)| r.succeeded()),
            LiveError::Transition(t) => t.recovery.succeeded(),
            _ => true,
        }
    }
}
