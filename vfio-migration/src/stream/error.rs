//! Stream errors: what went wrong, and at which byte of the stream.

use std::fmt;
use std::io;

use crate::device::DeviceIdentity;
use crate::state::MigrationFlags;

use super::SectionKind;

/// A stream that cannot be written or read, with the byte offset where the problem is.
///
/// The offset is that of the first byte of the offending record or field; for a truncated stream
/// it is the stream's length (where the bytes ran out). [`StreamError::message`] gives the reason
/// without the offset, for output formats that show both separately.
#[derive(Debug, thiserror::Error)]
#[error("device-state stream, byte offset {offset}: {kind}")]
pub struct StreamError {
    /// Byte offset in the stream.
    pub offset: u64,
    /// What is wrong.
    #[source]
    pub kind: StreamErrorKind,
}

impl StreamError {
    /// A new error at `offset`.
    pub fn new(offset: u64, kind: StreamErrorKind) -> Self {
        Self { offset, kind }
    }

    /// The byte offset of the problem.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The reason, without the offset (e.g. for `{"error": ..., "offset": N}`).
    pub fn message(&self) -> String {
        self.kind.to_string()
    }

    /// Whether the stream simply ended too early (as opposed to holding wrong bytes).
    pub fn is_truncation(&self) -> bool {
        matches!(self.kind, StreamErrorKind::Truncated { .. })
    }

    /// Wrap into an [`io::Error`] whose message names the offset; [`StreamError::from_io`] gets the
    /// typed error back. Truncation maps to [`io::ErrorKind::UnexpectedEof`], an I/O error of the
    /// underlying reader or writer keeps its kind, everything else is [`io::ErrorKind::InvalidData`].
    pub fn into_io(self) -> io::Error {
        let kind = match &self.kind {
            StreamErrorKind::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            StreamErrorKind::Io(e) => e.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }

    /// The stream error inside an [`io::Error`] made by [`StreamError::into_io`], if it is one.
    ///
    /// ```
    /// use vfio_migration::stream::{StreamError, StreamErrorKind};
    ///
    /// let io = StreamError::new(7, StreamErrorKind::TrailingData).into_io();
    /// assert!(io.to_string().contains("offset 7"));
    /// assert_eq!(StreamError::from_io(&io).unwrap().offset, 7);
    /// ```
    pub fn from_io(err: &io::Error) -> Option<&StreamError> {
        err.get_ref().and_then(|e| e.downcast_ref::<StreamError>())
    }

    /// Take the stream error out of an [`io::Error`] made by [`StreamError::into_io`]; other
    /// errors are given back unchanged.
    pub fn try_from_io(err: io::Error) -> Result<StreamError, io::Error> {
        if StreamError::from_io(&err).is_none() {
            return Err(err);
        }
        match err.into_inner() {
            Some(inner) => match inner.downcast::<StreamError>() {
                Ok(e) => Ok(*e),
                Err(other) => Err(io::Error::other(other)),
            },
            None => Err(io::Error::other("not a stream error")),
        }
    }
}

impl From<StreamError> for io::Error {
    fn from(e: StreamError) -> Self {
        e.into_io()
    }
}

/// Why a stream is refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamErrorKind {
    /// The underlying reader or writer failed.
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
    /// The stream ended inside something.
    #[error("the stream is truncated: it ends inside {what}")]
    Truncated {
        /// What was being read (e.g. "a record header").
        what: &'static str,
    },
    /// The first eight bytes are not the magic.
    #[error("not a device-state stream (magic {found:02x?}, expected {expected:02x?})")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
        /// The magic ([`super::MAGIC`]).
        expected: [u8; 8],
    },
    /// A format version this reader does not know.
    #[error("unsupported format version {0} (this reader knows version {known})", known = super::FORMAT_VERSION)]
    UnsupportedVersion(u32),
    /// A length above its cap; refused before anything is allocated.
    #[error("{what} claims {len} bytes, above the cap of {cap}")]
    TooLarge {
        /// What the length is of.
        what: &'static str,
        /// The claimed length.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// The header's checksum does not match its bytes.
    #[error("header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// CRC32C stored in the stream.
        stored: u32,
        /// CRC32C of the bytes read.
        computed: u32,
    },
    /// The header is well framed but its content is invalid.
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    /// A record's checksum does not match its header fields and payload.
    #[error(
        "checksum mismatch in a record (kind {kind:#06x}, device {device}, sequence {sequence}, {len} bytes): \
         stored {stored:#010x}, computed {computed:#010x}"
    )]
    ChunkChecksum {
        /// The record's kind code as read (possibly corrupt).
        kind: u16,
        /// The record's device index as read.
        device: u32,
        /// The record's sequence number as read.
        sequence: u64,
        /// The record's payload length as read.
        len: u32,
        /// CRC32C stored in the stream.
        stored: u32,
        /// CRC32C of the bytes read.
        computed: u32,
    },
    /// A section kind this reader does not know, marked mandatory.
    #[error("unknown mandatory section kind {0:#06x}")]
    UnknownMandatorySection(u16),
    /// Reserved record flag bits are set (or OPTIONAL on a kind this version defines).
    #[error("record of kind {kind:#06x} has invalid flags {flags:#06x}")]
    BadFlags {
        /// The record's kind code.
        kind: u16,
        /// The record's flags.
        flags: u16,
    },
    /// A device index the header does not list.
    #[error("device index {device} is not in the stream (it carries {count} device(s))")]
    BadDeviceIndex {
        /// The index found.
        device: u32,
        /// The number of devices in the header.
        count: usize,
    },
    /// A sequence number out of order: a duplicated, reordered or lost record.
    #[error("{}", sequence_message(*.device, *.expected, *.found))]
    Sequence {
        /// The device index.
        device: u32,
        /// The sequence number expected next.
        expected: u64,
        /// The sequence number found.
        found: u64,
    },
    /// A pre-copy chunk after the device's first stop-copy chunk.
    #[error("pre-copy chunk of device {0} after its stop-copy data began")]
    PreCopyAfterStopCopy(u32),
    /// A pre-copy chunk for a device whose flags lack PRE_COPY.
    #[error("pre-copy chunk of device {device}, whose migration flags {flags} lack pre-copy")]
    PreCopyNotSupported {
        /// The device index.
        device: u32,
        /// The device's flags in the header.
        flags: MigrationFlags,
    },
    /// The end marker is malformed.
    #[error("invalid end marker: {0}")]
    BadEndMarker(String),
    /// A total in the end marker differs from what the stream carried: records were lost.
    #[error("end marker says {what} is {in_marker}, the stream carried {counted}")]
    TotalsMismatch {
        /// Which total (e.g. "device 0 records").
        what: String,
        /// The value in the end marker.
        in_marker: u64,
        /// The value counted while reading.
        counted: u64,
    },
    /// Bytes follow the end marker.
    #[error("data after the end marker")]
    TrailingData,
    /// The reader already failed; it refuses to go on.
    #[error("the stream already failed earlier: {0}")]
    AlreadyFailed(String),
    /// The writer was asked for something that would make an invalid stream.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

fn sequence_message(device: u32, expected: u64, found: u64) -> String {
    if found < expected {
        format!("record {found} of device {device} is duplicated or out of order (expected sequence number {expected})")
    } else {
        format!(
            "record(s) {expected}..{found} of device {device} are missing or out of order (found sequence number {found})"
        )
    }
}

/// Why a saved stream may not be loaded into a device; found before the device is touched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// The stream has no device with this index.
    #[error("the stream has no device {index} (it carries {count})")]
    NoSuchDevice {
        /// The requested index.
        index: u32,
        /// The number of devices in the stream.
        count: usize,
    },
    /// The device is of another kind or model than the one saved.
    #[error("device {index} of the stream was saved from {stream}, the destination is {device}")]
    Identity {
        /// The device index in the stream.
        index: u32,
        /// The identity in the stream.
        stream: DeviceIdentity,
        /// The destination's identity.
        device: DeviceIdentity,
    },
    /// The stream's or the destination's identity is unknown, so nothing shows the state fits:
    /// refused unless forced (`force_unknown_identity`, `--force-unknown-identity`).
    #[error(
        "device {index} of the stream was saved from {stream}, the destination is {device}: an unknown identity \
         cannot be checked, so the state is refused (force it with --force-unknown-identity / \
         force_unknown_identity only if you know both are the same device model)"
    )]
    UnknownIdentity {
        /// The device index in the stream.
        index: u32,
        /// The identity in the stream.
        stream: DeviceIdentity,
        /// The destination's identity.
        device: DeviceIdentity,
    },
    /// The destination lacks migration flags the saved state may need.
    #[error(
        "device {index} of the stream was saved with migration flags {stream}, the destination has {device} \
         (missing {missing})"
    )]
    Flags {
        /// The device index in the stream.
        index: u32,
        /// The flags in the stream.
        stream: MigrationFlags,
        /// The destination's flags.
        device: MigrationFlags,
        /// The flags the destination lacks.
        missing: MigrationFlags,
    },
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectionKind::PreCopy => f.write_str("pre-copy"),
            SectionKind::StopCopy => f.write_str("stop-copy"),
            SectionKind::Config => f.write_str("config"),
            SectionKind::Unknown(code) => write!(f, "unknown {code:#06x}"),
        }
    }
}
