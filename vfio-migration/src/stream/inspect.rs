//! Checking and describing a stream without a device: [`inspect`].

use std::collections::HashMap;
use std::fmt;
use std::io::Read;

use crate::device::DeviceIdentity;

use super::{FORMAT_VERSION, SectionKind, StreamError, StreamReader};

/// At most this many chunks are listed one by one in a report (all are counted).
pub const MAX_LISTED_CHUNKS: usize = 4096;

/// Options of [`inspect_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InspectOptions {
    /// List at most this many records one by one in [`InspectReport::chunks`] (all are counted
    /// in the sections and [`InspectReport::chunks_not_listed`]); 0 for a summary only.
    pub max_listed_chunks: usize,
}

impl Default for InspectOptions {
    fn default() -> Self {
        Self {
            max_listed_chunks: MAX_LISTED_CHUNKS,
        }
    }
}

/// Everything [`inspect`] found in a stream. Serializable with the `serde` feature; its
/// [`fmt::Display`] is the text form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct InspectReport {
    /// The header, once read and checked.
    pub header: Option<HeaderReport>,
    /// Per device and kind, in order of first appearance.
    pub sections: Vec<SectionReport>,
    /// The records one by one, in stream order (at most [`MAX_LISTED_CHUNKS`]).
    pub chunks: Vec<ChunkReport>,
    /// Records not listed in `chunks` because of the cap.
    pub chunks_not_listed: u64,
    /// The end marker, once read and checked.
    pub end: Option<EndReport>,
    /// Bytes read and checked (the whole stream when valid).
    pub checked_bytes: u64,
}

/// The stream header.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HeaderReport {
    /// The format version.
    pub format_version: u32,
    /// The writer's version string.
    pub writer: String,
    /// The header's length in bytes.
    pub length: u64,
    /// The header's CRC32C.
    pub crc32c: u32,
    /// The devices, in index order.
    pub devices: Vec<DeviceReport>,
}

/// One device listed in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DeviceReport {
    /// The device index.
    pub index: u32,
    /// `pci`, `mdev`, `emulated` or `unknown`.
    pub identity_kind: String,
    /// The identity as text, e.g. `pci 15b3:101e subsystem 15b3:0001`.
    pub identity: String,
    /// The migration flags' raw bits.
    pub flags: u64,
    /// The migration flags as text, e.g. `stop-copy+pre-copy`.
    pub flag_names: String,
}

/// All records of one kind of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SectionReport {
    /// The device index.
    pub device_index: u32,
    /// `pre-copy`, `stop-copy`, `config` or `unknown 0x....`.
    pub kind: String,
    /// The kind code.
    pub code: u16,
    /// Whether these are unknown OPTIONAL records, skipped by loads.
    pub skipped: bool,
    /// Number of records.
    pub chunks: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// Byte offset of the first record.
    pub first_offset: u64,
}

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ChunkReport {
    /// Byte offset of its record header.
    pub offset: u64,
    /// Its kind, as in [`SectionReport::kind`].
    pub kind: String,
    /// The device index.
    pub device_index: u32,
    /// Its sequence number.
    pub sequence: u64,
    /// Payload bytes.
    pub length: u64,
    /// Its CRC32C (checked).
    pub crc32c: u32,
}

/// The end marker.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct EndReport {
    /// Byte offset of the end marker.
    pub offset: u64,
    /// Records before it.
    pub total_chunks: u64,
    /// Payload bytes of those records.
    pub total_bytes: u64,
    /// Per device, in index order.
    pub devices: Vec<DeviceTotalsReport>,
    /// Its CRC32C (checked).
    pub crc32c: u32,
    /// The stream's length.
    pub stream_len: u64,
}

/// One device's totals in the end marker.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DeviceTotalsReport {
    /// The device index.
    pub device_index: u32,
    /// Records of the device.
    pub chunks: u64,
    /// Their payload bytes.
    pub bytes: u64,
}

/// [`inspect`] found the stream invalid: the error, and what it had read until then.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct InspectFailure {
    /// Why the stream is invalid, and where.
    pub error: StreamError,
    /// What was read and checked before the error.
    pub partial: Box<InspectReport>,
}

impl InspectFailure {
    /// The byte offset of the problem.
    pub fn offset(&self) -> u64 {
        self.error.offset
    }

    /// The reason, without the offset.
    pub fn message(&self) -> String {
        self.error.message()
    }
}

/// Read a whole stream, checking every byte, and describe it. The stream is valid exactly when
/// this returns `Ok`.
///
/// ```
/// use vfio_migration::{device::DeviceIdentity, state::MigrationFlags, stream::*};
/// let header = Header::single(DeviceIdentity::Mdev { mdev_type: "mtty-2".into() }, MigrationFlags::STOP_COPY);
/// let mut w = StreamWriter::new(Vec::new(), header).unwrap();
/// w.write_chunk(SectionKind::StopCopy, 0, &[1u8; 100]).unwrap();
/// let bytes = w.finish().unwrap();
///
/// let report = inspect(&bytes[..]).unwrap();
/// assert_eq!(report.end.as_ref().unwrap().total_bytes, 100);
/// assert!(report.to_string().contains("mdev mtty-2"));
///
/// let failure = inspect(&bytes[..bytes.len() - 3]).unwrap_err();
/// assert_eq!(failure.offset(), bytes.len() as u64 - 3);
/// assert!(failure.partial.header.is_some());
/// ```
pub fn inspect<R: Read>(reader: R) -> Result<InspectReport, InspectFailure> {
    inspect_with(reader, InspectOptions::default())
}

/// [`inspect`] with options: how many records to list one by one.
///
/// Each record costs one hash-map lookup of its (device, kind) section, so the time grows with
/// the stream's length, however many sections a crafted stream declares.
pub fn inspect_with<R: Read>(reader: R, opts: InspectOptions) -> Result<InspectReport, InspectFailure> {
    let mut report = InspectReport::default();
    // (device index, kind code) -> index into `report.sections`.
    let mut section_of: HashMap<(u32, u16), usize> = HashMap::new();
    let fail = |error: StreamError, mut report: InspectReport| {
        report.checked_bytes = error.offset;
        InspectFailure {
            error,
            partial: Box::new(report),
        }
    };
    let mut r = match StreamReader::new(reader) {
        Ok(r) => r,
        Err(e) => return Err(fail(e, report)),
    };
    let h = r.header();
    report.header = Some(HeaderReport {
        format_version: FORMAT_VERSION,
        writer: h.writer.clone(),
        length: r.header_len(),
        crc32c: r.header_checksum(),
        devices: h
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| DeviceReport {
                index: i as u32,
                identity_kind: identity_kind(&d.identity).to_string(),
                identity: d.identity.to_string(),
                flags: d.flags.bits(),
                flag_names: d.flags.to_string(),
            })
            .collect(),
    });
    loop {
        let chunk = match r.next_record() {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Err(fail(e, report)),
        };
        let len = chunk.payload.len() as u64;
        let key = (chunk.device_index, chunk.kind.code());
        match section_of.get(&key).and_then(|&i| report.sections.get_mut(i)) {
            Some(s) => {
                s.chunks += 1;
                s.bytes += len;
            }
            None => {
                section_of.insert(key, report.sections.len());
                report.sections.push(SectionReport {
                    device_index: chunk.device_index,
                    kind: chunk.kind.to_string(),
                    code: chunk.kind.code(),
                    skipped: matches!(chunk.kind, SectionKind::Unknown(_)),
                    chunks: 1,
                    bytes: len,
                    first_offset: chunk.offset,
                });
            }
        }
        if report.chunks.len() < opts.max_listed_chunks {
            report.chunks.push(ChunkReport {
                offset: chunk.offset,
                kind: chunk.kind.to_string(),
                device_index: chunk.device_index,
                sequence: chunk.sequence,
                length: len,
                crc32c: chunk.checksum,
            });
        } else {
            report.chunks_not_listed += 1;
        }
    }
    // `next_record` returned `None`, so the end marker was read and checked.
    if let Some(end) = r.end_summary() {
        report.checked_bytes = end.stream_len;
        report.end = Some(EndReport {
            offset: end.offset,
            total_chunks: end.total_chunks,
            total_bytes: end.total_bytes,
            devices: end
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| DeviceTotalsReport {
                    device_index: i as u32,
                    chunks: d.chunks,
                    bytes: d.bytes,
                })
                .collect(),
            crc32c: end.checksum,
            stream_len: end.stream_len,
        });
    }
    Ok(report)
}

fn identity_kind(id: &DeviceIdentity) -> &'static str {
    match id {
        DeviceIdentity::Pci { .. } => "pci",
        DeviceIdentity::Mdev { .. } => "mdev",
        DeviceIdentity::Emulated { .. } => "emulated",
        DeviceIdentity::Unknown => "unknown",
    }
}

impl fmt::Display for InspectReport {
    /// A human-readable description, with the records listed in [`InspectReport::chunks`]
    /// (none for a summary: [`InspectOptions::max_listed_chunks`] 0).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.header {
            writeln!(
                f,
                "format version {}, written by {:?}; header {} bytes, crc32c {:#010x}",
                h.format_version, h.writer, h.length, h.crc32c
            )?;
            for d in &h.devices {
                writeln!(
                    f,
                    "device {}: {} (migration flags {})",
                    d.index, d.identity, d.flag_names
                )?;
            }
        }
        for s in &self.sections {
            writeln!(
                f,
                "  device {} {}: {} chunk(s), {} bytes, first at offset {}{}",
                s.device_index,
                s.kind,
                s.chunks,
                s.bytes,
                s.first_offset,
                if s.skipped { " (optional, skipped)" } else { "" }
            )?;
        }
        for c in &self.chunks {
            writeln!(
                f,
                "    offset {:>10}: device {} {} #{} {} bytes crc32c {:#010x}",
                c.offset, c.device_index, c.kind, c.sequence, c.length, c.crc32c
            )?;
        }
        if !self.chunks.is_empty() && self.chunks_not_listed > 0 {
            writeln!(f, "    ({} more record(s) not listed)", self.chunks_not_listed)?;
        }
        if let Some(e) = &self.end {
            writeln!(
                f,
                "end marker at offset {}: {} chunk(s), {} payload bytes, crc32c {:#010x}; stream {} bytes",
                e.offset, e.total_chunks, e.total_bytes, e.crc32c, e.stream_len
            )?;
        }
        Ok(())
    }
}
