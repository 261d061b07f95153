//! Save and load through the device-state stream format ([`crate::stream`]).
//!
//! [`save_to_stream`] wraps [`save`](super::save) in a stream: a header with the device's
//! identity and flags, an optional opaque VMM config section, the state as stop-copy chunks with
//! checksums, and the end marker with totals. [`load_from_stream`] checks the header against the
//! destination BEFORE touching it, then loads; the device sees the last bytes only after the end
//! marker was verified, so any damage anywhere in the stream fails the load (and resets the device).

use std::io::{Read, Write};

use super::{LoadOptions, LoadReport, SaveOptions, SaveReport, SessionError, load, save};
use crate::device::{DeviceError, MigrationDevice};
use crate::stream::{Header, Mismatch, SectionKind, StreamError, StreamReader, StreamWriter};

/// A failed stream save or load.
#[derive(Debug, thiserror::Error)]
pub enum StreamIoError {
    /// The stream could not be written or read (with the byte offset).
    #[error("{device}: {error}")]
    Stream {
        /// The device.
        device: String,
        /// The stream error.
        error: StreamError,
    },
    /// The stream was saved from another kind of device; the device was not touched.
    #[error("{device}: refusing to load: {error}; the device was not touched")]
    Mismatch {
        /// The device.
        device: String,
        /// Why.
        error: Mismatch,
    },
    /// The device could not be queried.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Save or load failed (with what was done to the device).
    #[error(transparent)]
    Session(#[from] SessionError),
}

impl StreamIoError {
    /// The stream error (with its offset) behind this failure, if a damaged stream caused it.
    pub fn stream_error(&self) -> Option<&StreamError> {
        match self {
            StreamIoError::Stream { error, .. } => Some(error),
            StreamIoError::Session(SessionError::Io { error, .. }) => StreamError::from_io(error),
            _ => None,
        }
    }
}

/// Save `dev` into `out` as a stream; returns the report and the writer.
pub fn save_to_stream<W: Write>(
    dev: &mut dyn MigrationDevice,
    out: W,
    config: Option<&[u8]>,
    opts: SaveOptions<'_>,
) -> Result<(SaveReport, W), StreamIoError> {
    let name = dev.name().to_string();
    let stream_err = |error| StreamIoError::Stream {
        device: name.clone(),
        error,
    };
    let header = Header::single(dev.identity(), dev.flags()?);
    let mut writer = StreamWriter::new(out, header).map_err(stream_err)?;
    if let Some(cfg) = config {
        writer.write_config(0, cfg).map_err(stream_err)?;
    }
    let report = {
        let mut sink = writer.chunk_sink(SectionKind::StopCopy, 0).map_err(stream_err)?;
        let report = save(dev, &mut sink, opts)?;
        sink.finish().map_err(stream_err)?;
        report
    };
    let out = writer.finish().map_err(stream_err)?;
    Ok((report, out))
}

/// What [`load_from_stream`] found besides the device state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLoad {
    /// The load itself.
    pub report: LoadReport,
    /// The VMM config section, when the stream has one.
    pub config: Option<Vec<u8>>,
    /// The stream's writer version.
    pub writer: String,
}

/// The most config bytes kept from a stream (the format caps a section at 16 MiB anyway).
const MAX_CONFIG: usize = 16 << 20;

/// Load device 0 of the stream in `input` into `dev`. The header is checked against the device
/// first ([`crate::stream::Header::check_compatible`]; an unknown identity is refused unless
/// `opts.force_unknown_identity`); nothing is written to a device that would not accept the state.
pub fn load_from_stream<R: Read>(
    dev: &mut dyn MigrationDevice,
    input: R,
    opts: LoadOptions<'_>,
) -> Result<StreamLoad, StreamIoError> {
    let name = dev.name().to_string();
    let mut reader = StreamReader::new(input).map_err(|error| StreamIoError::Stream {
        device: name.clone(),
        error,
    })?;
    let identity = dev.identity();
    let flags = dev.flags()?;
    reader
        .header()
        .check_compatible(0, &identity, flags, opts.force_unknown_identity)
        .map_err(|error| StreamIoError::Mismatch {
            device: name.clone(),
            error,
        })?;
    let writer = reader.header().writer.clone();
    let mut config: Option<Vec<u8>> = None;
    let report = {
        let config = &mut config;
        let mut payload = reader.device_payload(0).on_other(move |chunk| {
            if chunk.kind == SectionKind::Config && chunk.device_index == 0 {
                let c = config.get_or_insert_with(Vec::new);
                if c.len() + chunk.payload.len() > MAX_CONFIG {
                    return Err(std::io::Error::other("config section larger than 16 MiB"));
                }
                c.extend_from_slice(chunk.payload);
            }
            Ok(())
        });
        load(dev, &mut payload, opts)?
    };
    Ok(StreamLoad { report, config, writer })
}
