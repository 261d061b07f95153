//! The device state inside Cloud Hypervisor's snapshot tree.
//!
//! A device's part of a snapshot is a JSON leaf ([`DeviceStateRecord`]) holding a binary record
//! either inline (base64, since the JSON needs text) or as the name of a file beside the
//! snapshot (written by `Transportable::send`, so a large state skips base64 and JSON).
//!
//! PLACEHOLDER FORMAT, TO BE REPLACED: the binary record is a 48-byte header of this crate's own
//! followed by the raw device bytes. The versioned stream format (`vfio_migration::stream`, branch
//! `stream`) replaces it once on main: [`encode_record`] / [`decode_record`] are the only two
//! functions to change, and [`RECORD_FORMAT`] names the format so old records stay readable.
//!
//! Header (little-endian): magic `CHVFIOST` (8) | version u16 = 1 | header length u16 = 48 |
//! flags u32 (0) | chunks already sent u64 | bytes already sent u64 | payload length u64 |
//! CRC-32C of the payload u32 | reserved u32 (0). "Already sent" counts the device-state chunks
//! and bytes the destination received before this record through the iterative protocol
//! ([`crate::iterative`]); the payload continues the device's stream after them.
//!
//! A snapshot written by Cloud Hypervisor's in-tree VFIO code (`{"blob": "<base64>"}` under
//! `vfio_migration`: the raw STOP_COPY bytes) is read too.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

/// The id under which Cloud Hypervisor's `VfioCommon` keeps a device's migration state.
pub const SNAPSHOT_ID: &str = "vfio_migration";

/// The `format` of records written by this crate.
pub const RECORD_FORMAT: &str = "ch-integration/raw-v1";

/// Magic at the start of a binary record.
pub const MAGIC: [u8; 8] = *b"CHVFIOST";

/// Length of the binary record header.
pub const HEADER_LEN: usize = 48;

/// A decoded binary record: where the payload continues the device's stream, and the payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateRecord {
    /// Chunks of this device's state delivered before the payload (iterative protocol).
    pub sent_chunks: u64,
    /// Bytes of this device's state delivered before the payload.
    pub sent_bytes: u64,
    /// The device bytes that follow.
    pub payload: Vec<u8>,
}

/// The header of a binary record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Chunks delivered before the payload.
    pub sent_chunks: u64,
    /// Bytes delivered before the payload.
    pub sent_bytes: u64,
    /// Payload length.
    pub payload_len: u64,
    /// CRC-32C of the payload.
    pub crc: u32,
}

impl RecordHeader {
    /// The 48 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&1u16.to_le_bytes());
        h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        h[16..24].copy_from_slice(&self.sent_chunks.to_le_bytes());
        h[24..32].copy_from_slice(&self.sent_bytes.to_le_bytes());
        h[32..40].copy_from_slice(&self.payload_len.to_le_bytes());
        h[40..44].copy_from_slice(&self.crc.to_le_bytes());
        h
    }

    /// Parse and check the 48 header bytes.
    pub fn parse(h: &[u8]) -> Result<Self, String> {
        let h: &[u8; HEADER_LEN] = h
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| format!("record shorter than its {HEADER_LEN}-byte header"))?;
        if h[..8] != MAGIC {
            return Err("not a device state record (bad magic)".into());
        }
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if u16_at(8) != 1 || u16_at(10) as usize != HEADER_LEN {
            return Err(format!(
                "record version {} / header length {} not supported",
                u16_at(8),
                u16_at(10)
            ));
        }
        if u32_at(12) != 0 || u32_at(44) != 0 {
            return Err("record flags or reserved bits set".into());
        }
        Ok(Self {
            sent_chunks: u64_at(16),
            sent_bytes: u64_at(24),
            payload_len: u64_at(32),
            crc: u32_at(40),
        })
    }
}

/// Encode a binary record.
pub fn encode_record(sent_chunks: u64, sent_bytes: u64, payload: &[u8]) -> Vec<u8> {
    let header = RecordHeader {
        sent_chunks,
        sent_bytes,
        payload_len: payload.len() as u64,
        crc: crc32c::crc32c(payload),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decode and check a binary record.
pub fn decode_record(bytes: &[u8]) -> Result<StateRecord, String> {
    let h = RecordHeader::parse(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != h.payload_len {
        return Err(format!(
            "record payload is {} bytes, its header says {}",
            payload.len(),
            h.payload_len
        ));
    }
    if crc32c::crc32c(payload) != h.crc {
        return Err("record payload CRC-32C mismatch".into());
    }
    Ok(StateRecord {
        sent_chunks: h.sent_chunks,
        sent_bytes: h.sent_bytes,
        payload: payload.to_vec(),
    })
}

/// A device's JSON leaf in the snapshot tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStateRecord {
    /// The record format ([`RECORD_FORMAT`]).
    pub format: String,
    /// The device's id.
    pub device: String,
    /// What the device is (checked against the destination device).
    pub identity: String,
    /// Length of the binary record in bytes.
    pub len: u64,
    /// CRC-32C of the binary record.
    pub crc32c: u32,
    /// The binary record, base64, when inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The file beside the snapshot holding the binary record, when not inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// Cloud Hypervisor's in-tree leaf: the raw STOP_COPY bytes, base64.
#[derive(Clone, Debug, Deserialize)]
pub struct LegacyBlob {
    /// base64 of the raw device state.
    pub blob: String,
}

/// Any device leaf this crate can read.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum AnyDeviceState {
    /// Written by this crate.
    Record(DeviceStateRecord),
    /// Written by Cloud Hypervisor's in-tree VFIO migration.
    Legacy(LegacyBlob),
}

/// The leaf for `record` (binary), inline.
pub fn inline_leaf(device: &str, identity: &str, record: &[u8]) -> DeviceStateRecord {
    DeviceStateRecord {
        format: RECORD_FORMAT.into(),
        device: device.into(),
        identity: identity.into(),
        len: record.len() as u64,
        crc32c: crc32c::crc32c(record),
        data: Some(BASE64.encode(record)),
        file: None,
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

/// The file name (beside the snapshot) of device `id`'s binary record.
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

    #[test]
    fn records_round_trip_and_reject_damage() {
        let r = encode_record(3, 300, b"hello device");
        let d = decode_record(&r).unwrap();
        assert_eq!(
            (d.sent_chunks, d.sent_bytes, d.payload.as_slice()),
            (3, 300, &b"hello device"[..])
        );
        let mut bad = r.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(decode_record(&bad).unwrap_err().contains("CRC"));
        assert!(decode_record(&r[..r.len() - 1]).unwrap_err().contains("header says"));
        assert!(decode_record(&r[..10]).is_err());
        let mut bad = r.clone();
        bad[0] = b'X';
        assert!(decode_record(&bad).unwrap_err().contains("magic"));
    }

    #[test]
    fn leaves_parse_ours_and_cloud_hypervisors() {
        let leaf = inline_leaf("_vfio0", "emulated x", &encode_record(0, 0, b"abc"));
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
