//! The device state inside Cloud Hypervisor's snapshot tree.
//!
//! A device's part of a snapshot is a JSON leaf ([`DeviceStateRecord`]) holding the device's
//! state as the engine's versioned, checksummed stream ([`vfio_migration::stream`], format
//! [`STREAM_FORMAT`]) either inline (base64, since the JSON needs text) or as the name of a file
//! beside the snapshot (written by `Transportable::send`, so a large state skips base64 and
//! JSON). The stream's header names the device's identity and migration flags, so a state is
//! checked against the destination device before the device is touched
//! ([`vfio_migration::stream::Header::check_compatible`]), and every byte of it is covered by a
//! CRC32C; a damaged stream is refused with the byte offset of the damage.
//!
//! The stream holds one device (index 0): optionally a VMM config record ([`SentAhead`]) saying
//! how many chunks and bytes of the device's state the destination received before it through
//! the iterative protocol ([`crate::iterative`]), then the rest of the device's state as
//! pre-copy chunks and stop-copy chunks, then the end marker.
//!
//! A snapshot written by Cloud Hypervisor's in-tree VFIO code (`{"blob": "<base64>"}` under
//! `vfio_migration`: the raw STOP_COPY bytes, with neither identity nor checksum) is read too.

use std::io::{self, Read, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use vfio_migration::device::DeviceIdentity;
use vfio_migration::state::MigrationFlags;
use vfio_migration::stream::{
    Header, MAX_CHUNK_LEN, SectionKind, StreamError, StreamErrorKind, StreamReader, StreamWriter,
};

/// The id under which Cloud Hypervisor's `VfioCommon` keeps a device's migration state.
pub const SNAPSHOT_ID: &str = "vfio_migration";

/// The `format` of the leaves written by this crate: the engine's stream, format version 1.
pub const STREAM_FORMAT: &str = "vfio-migration-stream/v1";

/// The first bytes of the config record that carries [`SentAhead`].
pub const SENT_AHEAD_TAG: [u8; 8] = *b"CHSENTAH";

/// What the destination received before this stream (iterative protocol): the stream continues
/// the device's state after `chunks` chunks and `bytes` bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SentAhead {
    /// Chunks delivered before the stream.
    pub chunks: u64,
    /// Bytes delivered before the stream.
    pub bytes: u64,
}

impl SentAhead {
    /// The config record payload: [`SENT_AHEAD_TAG`], chunks `u64`, bytes `u64` (little-endian).
    pub fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&SENT_AHEAD_TAG);
        out[8..16].copy_from_slice(&self.chunks.to_le_bytes());
        out[16..24].copy_from_slice(&self.bytes.to_le_bytes());
        out
    }

    /// Parse a config record: `Ok(None)` when it is not ours (another tag), an error when it is
    /// ours and malformed.
    pub fn decode(payload: &[u8]) -> Result<Option<Self>, String> {
        if payload.get(..8) != Some(&SENT_AHEAD_TAG[..]) {
            return Ok(None);
        }
        let b: &[u8; 24] = payload
            .try_into()
            .map_err(|_| format!("sent-ahead record of {} bytes, expected 24", payload.len()))?;
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        Ok(Some(Self {
            chunks: u64_at(8),
            bytes: u64_at(16),
        }))
    }
}

/// The largest stream accepted for a device state of at most `max_state` bytes: the state, one
/// record header per 4 KiB chunk at worst, and 1 MiB for the header and the end marker.
pub fn stream_cap(max_state: u64) -> u64 {
    max_state.saturating_add(max_state / 128).saturating_add(1 << 20)
}

/// Cuts a device state into stream chunks: the first `pre_copy` bytes as pre-copy chunks, the
/// rest as stop-copy chunks, each at most `chunk` bytes.
struct StateChunker<'a, W: Write> {
    writer: &'a mut StreamWriter<W>,
    pre_copy: u64,
    chunk: usize,
    buf: Vec<u8>,
    kind: SectionKind,
}

impl<W: Write> StateChunker<'_, W> {
    fn flush_chunk(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.writer
                .write_chunk(self.kind, 0, &self.buf)
                .map_err(StreamError::into_io)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl<W: Write> Write for StateChunker<'_, W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            if self.kind == SectionKind::PreCopy && self.pre_copy == 0 {
                self.flush_chunk()?;
                self.kind = SectionKind::StopCopy;
            }
            let mut n = data.len().min(self.chunk - self.buf.len());
            if self.kind == SectionKind::PreCopy {
                n = n.min(usize::try_from(self.pre_copy).unwrap_or(usize::MAX));
                self.pre_copy -= n as u64;
            }
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.chunk {
                self.flush_chunk()?;
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a device state stream is written from.
pub struct StateSource<'a> {
    /// The source device's identity.
    pub identity: DeviceIdentity,
    /// The source device's migration flags.
    pub flags: MigrationFlags,
    /// What went ahead through the iterative protocol.
    pub sent: SentAhead,
    /// How many of the bytes `copy` writes were read in PRE_COPY (the rest in STOP_COPY).
    pub pre_copy: u64,
    /// Largest chunk.
    pub chunk_size: usize,
    /// Writes the device state (what was not sent ahead) into the writer it is given.
    pub copy: &'a mut dyn FnMut(&mut dyn Write) -> io::Result<u64>,
}

impl std::fmt::Debug for StateSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSource")
            .field("identity", &self.identity)
            .field("flags", &self.flags)
            .field("sent", &self.sent)
            .field("pre_copy", &self.pre_copy)
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

/// Write one device's state as a stream into `out`; returns `out`.
pub fn write_state_stream<W: Write>(out: W, src: StateSource<'_>) -> Result<W, StreamError> {
    let mut writer = StreamWriter::new(out, Header::single(src.identity, src.flags))?;
    if src.sent != SentAhead::default() {
        writer.write_config(0, &src.sent.encode())?;
    }
    let mut chunker = StateChunker {
        writer: &mut writer,
        pre_copy: src.pre_copy,
        chunk: src.chunk_size.clamp(4096, MAX_CHUNK_LEN),
        buf: Vec::new(),
        kind: SectionKind::PreCopy,
    };
    let copied = (src.copy)(&mut chunker).and_then(|_| chunker.flush_chunk());
    if let Err(e) = copied {
        return Err(
            StreamError::try_from_io(e).unwrap_or_else(|e| StreamError::new(writer.offset(), StreamErrorKind::Io(e)))
        );
    }
    writer.finish()
}

/// A device state stream, checked from its first byte to its end marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateSummary {
    /// The source device's identity.
    pub identity: DeviceIdentity,
    /// The source device's migration flags.
    pub flags: MigrationFlags,
    /// What went ahead through the iterative protocol.
    pub sent: SentAhead,
    /// Bytes of device state in the stream.
    pub state_bytes: u64,
}

/// Read and check a whole stream (every checksum, sequence number and the end marker) without
/// loading it anywhere.
pub fn check_stream<R: Read>(input: R) -> Result<StateSummary, StreamError> {
    let mut reader = StreamReader::new(input)?;
    let header = reader.header().clone();
    let Some(entry) = header.devices.first().filter(|_| header.devices.len() == 1) else {
        return Err(StreamError::new(
            0,
            StreamErrorKind::InvalidHeader(format!(
                "{} devices in a device's snapshot, expected 1",
                header.devices.len()
            )),
        ));
    };
    let mut sent = SentAhead::default();
    let mut state_bytes = 0u64;
    while let Some(c) = reader.next_chunk()? {
        match c.kind {
            SectionKind::Config => {
                let s = SentAhead::decode(c.payload)
                    .map_err(|e| StreamError::new(c.offset, StreamErrorKind::InvalidHeader(e)))?;
                if let Some(s) = s {
                    sent = s;
                }
            }
            _ => state_bytes += c.payload.len() as u64,
        }
    }
    Ok(StateSummary {
        identity: entry.identity.clone(),
        flags: entry.flags,
        sent,
        state_bytes,
    })
}

/// A device's JSON leaf in the snapshot tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStateRecord {
    /// The format of the binary state ([`STREAM_FORMAT`]).
    pub format: String,
    /// The device's id.
    pub device: String,
    /// What the device is, for humans (the stream's header is what is checked).
    pub identity: String,
    /// Length of the stream in bytes.
    pub len: u64,
    /// The stream, base64, when inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The file beside the snapshot holding the stream, when not inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// Cloud Hypervisor's in-tree leaf: the raw STOP_COPY bytes, base64. Written for a destination
/// that reads nothing else (an unpatched Cloud Hypervisor, [`crate::protocol::Peer::Upstream`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LegacyBlob {
    /// base64 of the raw device state.
    pub blob: String,
}

/// Any device leaf this crate can read or write.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AnyDeviceState {
    /// Written by this crate.
    Record(DeviceStateRecord),
    /// Written by Cloud Hypervisor's in-tree VFIO migration.
    Legacy(LegacyBlob),
}

/// The leaf for `stream`, inline.
pub fn inline_leaf(device: &str, identity: &str, stream: &[u8]) -> DeviceStateRecord {
    DeviceStateRecord {
        format: STREAM_FORMAT.into(),
        device: device.into(),
        identity: identity.into(),
        len: stream.len() as u64,
        data: Some(BASE64.encode(stream)),
        file: None,
    }
}

/// The in-tree leaf for raw device data `raw`.
pub fn legacy_leaf(raw: &[u8]) -> LegacyBlob {
    LegacyBlob {
        blob: BASE64.encode(raw),
    }
}

/// Decode base64 text whose decoded size must not exceed `max` bytes.
pub fn decode_base64(text: &str, max: u64) -> Result<Vec<u8>, String> {
    // Every 4 characters give at most 3 bytes: refuse before allocating.
    if (text.len() as u64 / 4).saturating_mul(3) > max.saturating_add(3) {
        return Err(format!("base64 device state larger than the {max}-byte limit"));
    }
    BASE64.decode(text).map_err(|e| format!("bad base64 device state: {e}"))
}

/// The file name (beside the snapshot) of device `id`'s stream.
pub fn state_file_name(id: &str) -> String {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("vfio-state-{safe}.bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> DeviceIdentity {
        DeviceIdentity::Emulated { params: "t".into() }
    }

    fn stream(sent: SentAhead, pre_copy: u64, state: &[u8]) -> Vec<u8> {
        let mut copy = |w: &mut dyn Write| w.write_all(state).map(|_| state.len() as u64);
        write_state_stream(
            Vec::new(),
            StateSource {
                identity: identity(),
                flags: MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY,
                sent,
                pre_copy,
                chunk_size: 4096,
                copy: &mut copy,
            },
        )
        .unwrap()
    }

    #[test]
    fn streams_carry_the_state_in_pre_copy_then_stop_copy_chunks() {
        let state: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let sent = SentAhead { chunks: 3, bytes: 300 };
        let s = stream(sent, 5000, &state);
        let sum = check_stream(&s[..]).unwrap();
        assert_eq!((sum.sent, sum.state_bytes, sum.identity), (sent, 10_000, identity()));
        let mut r = StreamReader::new(&s[..]).unwrap();
        let mut kinds = Vec::new();
        let mut bytes = Vec::new();
        while let Some(c) = r.next_chunk().unwrap() {
            if c.kind != SectionKind::Config {
                kinds.push((c.kind, c.payload.len()));
                bytes.extend_from_slice(c.payload);
            }
        }
        assert_eq!(bytes, state);
        use SectionKind::{PreCopy, StopCopy};
        assert_eq!(
            kinds,
            [(PreCopy, 4096), (PreCopy, 904), (StopCopy, 4096), (StopCopy, 904)]
        );
        // Nothing sent ahead: no config record.
        let s = stream(SentAhead::default(), 0, b"abc");
        let mut r = StreamReader::new(&s[..]).unwrap();
        assert_eq!(r.next_chunk().unwrap().unwrap().kind, SectionKind::StopCopy);
    }

    #[test]
    fn damage_is_found_with_its_offset() {
        let s = stream(SentAhead::default(), 0, &[5u8; 9000]);
        let mut bad = s.clone();
        bad[200] ^= 0x10;
        let e = check_stream(&bad[..]).unwrap_err();
        assert!(e.offset <= 200, "{e}");
        assert!(e.to_string().contains("offset"), "{e}");
        let e = check_stream(&s[..s.len() - 3]).unwrap_err();
        assert!(e.is_truncation(), "{e}");
        assert_eq!(e.offset, s.len() as u64 - 3);
    }

    #[test]
    fn sent_ahead_records() {
        let s = SentAhead { chunks: 1, bytes: 2 };
        assert_eq!(SentAhead::decode(&s.encode()).unwrap(), Some(s));
        assert_eq!(SentAhead::decode(b"other config").unwrap(), None);
        assert!(SentAhead::decode(&s.encode()[..20]).is_err());
    }

    #[test]
    fn leaves_parse_ours_and_cloud_hypervisors() {
        let leaf = inline_leaf("_vfio0", "emulated x", &stream(SentAhead::default(), 0, b"abc"));
        let text = serde_json::to_string(&leaf).unwrap();
        match serde_json::from_str::<AnyDeviceState>(&text).unwrap() {
            AnyDeviceState::Record(r) => assert_eq!(r, leaf),
            AnyDeviceState::Legacy(_) => panic!("parsed as legacy"),
        }
        match serde_json::from_str::<AnyDeviceState>(r#"{"blob":"YWJj"}"#).unwrap() {
            AnyDeviceState::Legacy(l) => assert_eq!(decode_base64(&l.blob, 3).unwrap(), b"abc"),
            AnyDeviceState::Record(_) => panic!("parsed as ours"),
        }
        assert!(decode_base64("YWJjYWJjYWJj", 3).is_err());
        assert_eq!(state_file_name("a/b c"), "vfio-state-a_b_c.bin");
    }
}
