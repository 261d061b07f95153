//! Errors of the migration transport.

use std::io;
use std::path::PathBuf;

use crate::live::LiveError;
use crate::session::Recovery;

/// A failed network migration, naming the peer and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A URL that is not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("bad migration URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Bad options (checked before anything is touched).
    #[error("bad transport options: {0}")]
    Options(String),
    /// A socket operation failed.
    #[error("{peer}: {op} failed: {error}")]
    Io {
        /// The URL or connection concerned.
        peer: String,
        /// What was being done (connect, listen, accept, read, write, TLS handshake).
        op: &'static str,
        /// The error (in the message, so not also a `source`).
        error: io::Error,
    },
    /// A TLS file could not be used.
    #[error("TLS: {path}: {reason}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The TLS configuration could not be built.
    #[error("TLS: {0}")]
    Tls(String),
    /// Nothing arrived for too long.
    #[error("{peer}: timed out {what} (nothing for {secs:.1} s)")]
    Timeout {
        /// The URL or connection concerned.
        peer: String,
        /// What was awaited.
        what: &'static str,
        /// The timeout.
        secs: f64,
    },
    /// The receiver refused the migration (its reason).
    #[error("{peer}: the receiver refused the migration: {reason}")]
    Refused {
        /// The receiver.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// The receiver refused a sender whose stream header does not match its devices (before
    /// touching them).
    #[error("{peer}: refused the sender: {reason}")]
    Mismatch {
        /// The sender.
        peer: String,
        /// What does not match.
        reason: String,
    },
    /// The peer broke the protocol (bad record, checksum, sequence, unexpected message).
    #[error("{peer}: bad stream: {reason}")]
    Protocol {
        /// The connection concerned.
        peer: String,
        /// What is wrong.
        reason: String,
    },
    /// The connection ended before the migration did.
    #[error("{peer}: connection closed by the peer {when}")]
    Closed {
        /// The connection concerned.
        peer: String,
        /// In which phase.
        when: &'static str,
    },
    /// The peer reported that the migration failed on its side.
    #[error("{peer}: the peer failed: {reason}")]
    PeerFailed {
        /// The peer.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// Handed over, not confirmed: COMMIT was sent, but RESUMED did not arrive (cut link,
    /// timeout, dead peer). The destination may be running the devices, so the source devices
    /// stay stopped (STOP) with their state; resume them with [`super::resume_source`] only
    /// once the destination is known not to run them.
    #[error(
        "{peer}: handed over, not confirmed: COMMIT was sent but {reason}; the destination may be running the \
         devices, so the source devices ({}) stay stopped (STOP) with their state: resume them only if the \
         destination does not run them",
        .devices.join(", ")
    )]
    Unconfirmed {
        /// The receiver.
        peer: String,
        /// Why the confirmation did not arrive.
        reason: String,
        /// The source devices, all left in STOP.
        devices: Vec<String>,
    },
    /// A device step of the migration failed.
    #[error(transparent)]
    Live(#[from] LiveError),
    /// The migration was aborted; the recoveries say what was done to each local device.
    #[error("{cause}; {side} devices: {}", format_recoveries(.recoveries))]
    Aborted {
        /// What went wrong first.
        cause: Box<TransportError>,
        /// `source` or `destination`.
        side: &'static str,
        /// What was done per device (devices that needed nothing are not listed).
        recoveries: Vec<(String, Recovery)>,
    },
}

fn format_recoveries(r: &[(String, Recovery)]) -> String {
    if r.is_empty() {
        return "untouched or already usable".into();
    }
    r.iter()
        .map(|(d, rec)| format!("{d}: {rec}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl TransportError {
    pub(crate) fn io(peer: impl Into<String>, op: &'static str, error: io::Error) -> Self {
        TransportError::Io {
            peer: peer.into(),
            op,
            error,
        }
    }

    pub(crate) fn protocol(peer: impl Into<String>, reason: impl Into<String>) -> Self {
        TransportError::Protocol {
            peer: peer.into(),
            reason: reason.into(),
        }
    }

    /// Whether this is [`TransportError::Unconfirmed`]: the source handed over and stays
    /// stopped; the operator decides.
    pub fn is_unconfirmed(&self) -> bool {
        matches!(self, TransportError::Unconfirmed { .. })
    }

    /// Whether every local device ended in a known, usable state after this error.
    pub fn devices_recovered(&self) -> bool {
        match self {
            TransportError::Aborted { cause, recoveries, .. } => {
                cause.devices_recovered() && recoveries.iter().all(|(_, r)| r.succeeded())
            }
            TransportError::Live(l) => l.devices_recovered(),
            _ => true,
        }
    }
}
