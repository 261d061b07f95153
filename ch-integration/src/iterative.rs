//! Iterative device state: moving pre-copy data during Cloud Hypervisor's memory iterations.
//!
//! Cloud Hypervisor's protocol carries device state only in the `State` message, inside the
//! downtime. The proposed change (see the crate README for the message and a sequence diagram)
//! adds a `DeviceState` command the source sends after each `Memory` message while the VM runs:
//!
//! - source: [`crate::VfioMigrationGroup::take_precopy`] drains what the devices have and returns
//!   numbered [`PrecopyItem`]s (chunks, and a marker once a device's initial data is all out);
//! - destination: [`crate::VfioMigrationGroup::load_precopy`] loads them (the device enters
//!   RESUMING on the first one), and [`crate::VfioMigrationGroup::switchover_ready`] says when
//!   every device has loaded its initial data (QEMU's switchover acknowledgement);
//! - the device's part of the final `State` then holds only the rest, and says how many chunks
//!   came before it, so a lost message is detected.
//!
//! [`PrecopyItem::encode`] / [`PrecopyItem::decode`] are the proposed payload of one message.

/// Largest chunk payload accepted by [`PrecopyItem::decode`].
pub const MAX_CHUNK: u64 = 16 << 20;

/// Largest device id accepted by [`PrecopyItem::decode`].
pub const MAX_ID: usize = 256;

const KIND_CHUNK: u8 = 1;
const KIND_INITIAL_SENT: u8 = 2;

/// One unit of iterative device state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrecopyItem {
    /// Chunk `seq` (0, 1, 2, ... per device) of device `device`'s state.
    Chunk {
        /// The device id.
        device: String,
        /// The per-device sequence number.
        seq: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Device `device`'s initial pre-copy data ended after `chunks` chunks.
    InitialSent {
        /// The device id.
        device: String,
        /// Chunks sent before the marker.
        chunks: u64,
    },
}

impl PrecopyItem {
    /// The device id.
    pub fn device(&self) -> &str {
        match self {
            PrecopyItem::Chunk { device, .. } | PrecopyItem::InitialSent { device, .. } => device,
        }
    }

    /// The message payload: kind u8 (1 chunk, 2 initial-sent) | 0 u8 | id length u16 | id |
    /// sequence number or chunk count u64 | data length u64 | data (all little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let (kind, device, n, data): (u8, &str, u64, &[u8]) = match self {
            PrecopyItem::Chunk { device, seq, data } => (KIND_CHUNK, device, *seq, data),
            PrecopyItem::InitialSent { device, chunks } => (KIND_INITIAL_SENT, device, *chunks, &[]),
        };
        let mut out = Vec::with_capacity(20 + device.len() + data.len());
        out.push(kind);
        out.push(0);
        out.extend_from_slice(&(device.len() as u16).to_le_bytes());
        out.extend_from_slice(device.as_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    /// Parse one message payload (exactly).
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let take = |at: usize, n: usize| {
            b.get(at..at + n)
                .ok_or_else(|| "truncated device-state message".to_string())
        };
        let head = take(0, 4)?;
        let (kind, id_len) = (head[0], u16::from_le_bytes([head[2], head[3]]) as usize);
        if head[1] != 0 || id_len > MAX_ID {
            return Err(format!("bad device-state message header (id length {id_len})"));
        }
        let device = std::str::from_utf8(take(4, id_len)?)
            .map_err(|_| "device id is not UTF-8".to_string())?
            .to_string();
        let mut u = [0u8; 8];
        u.copy_from_slice(take(4 + id_len, 8)?);
        let n = u64::from_le_bytes(u);
        u.copy_from_slice(take(12 + id_len, 8)?);
        let len = u64::from_le_bytes(u);
        if len > MAX_CHUNK {
            return Err(format!("chunk of {len} bytes exceeds the {MAX_CHUNK}-byte limit"));
        }
        let data = take(20 + id_len, len as usize)?;
        if b.len() != 20 + id_len + len as usize {
            return Err("trailing bytes after a device-state message".into());
        }
        match kind {
            KIND_CHUNK => Ok(PrecopyItem::Chunk {
                device,
                seq: n,
                data: data.to_vec(),
            }),
            KIND_INITIAL_SENT if len == 0 => Ok(PrecopyItem::InitialSent { device, chunks: n }),
            k => Err(format!("unknown device-state message kind {k}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_reject_garbage() {
        let items = [
            PrecopyItem::Chunk {
                device: "_vfio1".into(),
                seq: 7,
                data: vec![1, 2, 3],
            },
            PrecopyItem::InitialSent {
                device: "x".into(),
                chunks: 9,
            },
        ];
        for it in &items {
            let b = it.encode();
            assert_eq!(&PrecopyItem::decode(&b).unwrap(), it);
            for cut in 0..b.len() {
                assert!(PrecopyItem::decode(&b[..cut]).is_err(), "cut {cut}");
            }
            let mut long = b.clone();
            long.push(0);
            assert!(PrecopyItem::decode(&long).is_err());
        }
        let mut b = items[0].encode();
        b[0] = 9;
        assert!(PrecopyItem::decode(&b).is_err());
    }
}
