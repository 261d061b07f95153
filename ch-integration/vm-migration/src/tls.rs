//! TLS for migration connections: only the error type, which [`crate::MigratableError::Tls`]
//! carries.
//!
//! Cloud Hypervisor's variants carry `rustls` errors; here they carry boxed errors so this
//! stand-in needs no TLS library.

use std::io;

use thiserror::Error;

/// A boxed error from the TLS library.
pub type TlsLibraryError = Box<dyn std::error::Error + Send + Sync>;

/// Errors establishing a TLS-encrypted migration channel.
#[derive(Error, Debug)]
pub enum TlsError {
    /// The host name could not be parsed.
    #[error("The provided hostname could not be parsed")]
    InvalidDnsName(#[source] TlsLibraryError),
    /// A TLS protocol error.
    #[error("Rustls protocol error")]
    RustlsError(#[source] TlsLibraryError),
    /// The certificate verifier could not be configured.
    #[error("Rustls verifier configuration error")]
    RustlsVerifierBuilderError(#[source] TlsLibraryError),
    /// I/O on the TLS connection failed.
    #[error("Rustls protocol IO error")]
    RustlsIoError(#[from] io::Error),
    /// The handshake made no progress.
    #[error("TLS handshake stalled: no read/write progress while handshake is still in progress")]
    HandshakeError,
    /// A PEM file could not be handled.
    #[error("Error handling PEM file")]
    RustlsPemError(#[source] TlsLibraryError),
}
