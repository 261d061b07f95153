//! The transport's byte layouts: the connection preamble, records and control messages (see the
//! [module documentation](super) for the protocol).

use std::io::{self, Read, Write};

use super::crc;
use crate::stream::{
    MAX_CHUNK_LEN, READ_STEP, RECORD_HEADER_LEN, RecordError, RecordHead, crc32c, grow_for_read, record_fields,
    record_header_copying,
};

/// The first eight bytes of every transport connection.
pub const PREAMBLE_MAGIC: [u8; 8] = *b"VFIOMIGT";
/// The transport protocol version.
pub const TRANSPORT_VERSION: u32 = 1;
/// The length of the connection preamble.
pub const PREAMBLE_LEN: usize = 32;
/// The most connections of one migration.
pub const MAX_CONNECTIONS: usize = 16;
/// The longest reason string in a control message.
pub const MAX_REASON_LEN: usize = 4096;

/// Preamble role: the control connection.
pub const ROLE_CONTROL: u16 = 0;
/// Preamble role: a data connection.
pub const ROLE_DATA: u16 = 1;

/// Data record: a pre-copy chunk (as in the stream format).
pub const KIND_PRE_COPY: u16 = 1;
/// Data record: a stop-copy chunk (as in the stream format).
pub const KIND_STOP_COPY: u16 = 2;
/// Data record: this connection's end marker with its totals (the stream format's end marker).
pub const KIND_END: u16 = 0x00ff;
/// Data record: the device's initial pre-copy data was `sequence` chunks.
pub const KIND_INITIAL_SENT: u16 = 0x0101;
/// Data record: a check value of the source device after stop-copy (8 bytes, e.g. a digest).
pub const KIND_CHECK: u16 = 0x0102;
/// Data or control record: nothing to say, the peer is alive.
pub const KIND_KEEPALIVE: u16 = 0x0103;

/// Control, receiver to sender: the header matches, go on.
pub const MSG_ACCEPT: u16 = 0x0201;
/// Control, receiver to sender: refused (payload: the reason, UTF-8).
pub const MSG_REFUSE: u16 = 0x0202;
/// Control, receiver to sender: every device's initial pre-copy data is loaded (switchover-ack).
pub const MSG_SWITCHOVER_ACK: u16 = 0x0203;
/// Control, receiver to sender: every device is loaded and validated (STOP).
pub const MSG_LOADED: u16 = 0x0204;
/// Control, sender to receiver: resume the devices.
pub const MSG_COMMIT: u16 = 0x0205;
/// Control, receiver to sender: the devices run.
pub const MSG_RESUMED: u16 = 0x0206;
/// Control, either way: the migration failed on this side (payload: the reason, UTF-8).
pub const MSG_FAILED: u16 = 0x0207;

/// The device index of records that concern no device.
pub const NO_DEVICE: u32 = u32::MAX;

/// The preamble every connection starts with, sender to receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    /// [`ROLE_CONTROL`] or [`ROLE_DATA`].
    pub role: u16,
    /// The data connection's index (0 on the control connection).
    pub index: u16,
    /// The number of data connections of the migration.
    pub connections: u16,
    /// The migration's session identifier (the same on all its connections).
    pub session: u64,
}

impl Preamble {
    /// The 32 bytes on the wire.
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[0..8].copy_from_slice(&PREAMBLE_MAGIC);
        b[8..12].copy_from_slice(&TRANSPORT_VERSION.to_le_bytes());
        b[12..14].copy_from_slice(&self.role.to_le_bytes());
        b[14..16].copy_from_slice(&self.index.to_le_bytes());
        b[16..18].copy_from_slice(&self.connections.to_le_bytes());
        b[20..28].copy_from_slice(&self.session.to_le_bytes());
        let crc = crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse and check 32 bytes.
    pub fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Self, String> {
        if b[0..8] != PREAMBLE_MAGIC {
            return Err(format!(
                "not a vfio-migration transport connection (magic {:02x?})",
                &b[0..8]
            ));
        }
        let crc = u32::from_le_bytes([b[28], b[29], b[30], b[31]]);
        if crc != crc32c(&b[0..28]) {
            return Err("preamble checksum mismatch".into());
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != TRANSPORT_VERSION {
            return Err(format!(
                "transport version {version}, this side speaks {TRANSPORT_VERSION}"
            ));
        }
        let p = Preamble {
            role: u16::from_le_bytes([b[12], b[13]]),
            index: u16::from_le_bytes([b[14], b[15]]),
            connections: u16::from_le_bytes([b[16], b[17]]),
            session: u64::from_le_bytes([b[20], b[21], b[22], b[23], b[24], b[25], b[26], b[27]]),
        };
        if p.role != ROLE_CONTROL && p.role != ROLE_DATA {
            return Err(format!("unknown connection role {}", p.role));
        }
        if p.connections == 0 || usize::from(p.connections) > MAX_CONNECTIONS {
            return Err(format!("{} connections; 1 to {MAX_CONNECTIONS} allowed", p.connections));
        }
        if p.index >= p.connections {
            return Err(format!("connection index {} of {}", p.index, p.connections));
        }
        Ok(p)
    }
}

/// A record as read from a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The kind (`KIND_*` or `MSG_*`).
    pub kind: u16,
    /// The device index ([`NO_DEVICE`] for none).
    pub device: u32,
    /// The sequence number (per device for chunks; a count for [`KIND_INITIAL_SENT`]).
    pub sequence: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Write one record (stream-format record header, then the payload).
pub fn write_record(w: &mut dyn Write, kind: u16, device: u32, sequence: u64, payload: &[u8]) -> io::Result<()> {
    let h = header(kind, device, sequence, payload)?;
    write_all_vectored(w, &h, payload)
}

/// The record header of a record (its checksum over the header fields and `payload`), after
/// checking the payload against the length cap.
pub(crate) fn header(kind: u16, device: u32, sequence: u64, payload: &[u8]) -> io::Result<[u8; RECORD_HEADER_LEN]> {
    check_len(payload.len())?;
    let mut h = record_fields(kind, 0, device, sequence, payload.len());
    let sum = crc::append(crc32c(&h[..20]), payload);
    h[20..24].copy_from_slice(&sum.to_le_bytes());
    Ok(h)
}

fn check_len(len: usize) -> io::Result<()> {
    if len > MAX_CHUNK_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("record of {len} bytes, above the cap of {MAX_CHUNK_LEN}"),
        ));
    }
    Ok(())
}

/// A record framed for writing later (by another thread): its header, and its payload copied
/// into a buffer (checksummed block by block right after each block is copied, while it is in
/// the cache).
#[derive(Debug)]
pub(crate) struct Framed {
    /// The record header.
    pub(crate) header: [u8; RECORD_HEADER_LEN],
    /// The payload.
    pub(crate) payload: Vec<u8>,
}

impl Framed {
    /// Frame a record, copying `payload` into `buf`.
    pub(crate) fn copy(kind: u16, device: u32, sequence: u64, payload: &[u8], mut buf: Vec<u8>) -> io::Result<Self> {
        const BLOCK: usize = 64 << 10;
        check_len(payload.len())?;
        if !crc::folds(BLOCK.min(payload.len())) {
            // The stream format's own copying checksum (the `crc32c` crate's).
            let header = record_header_copying(kind, 0, device, sequence, payload, &mut buf);
            return Ok(Self { header, payload: buf });
        }
        let mut header = record_fields(kind, 0, device, sequence, payload.len());
        let mut sum = crc32c(&header[..20]);
        buf.clear();
        buf.reserve(payload.len());
        for block in payload.chunks(BLOCK) {
            let at = buf.len();
            buf.extend_from_slice(block);
            sum = crc::append(sum, &buf[at..]);
        }
        header[20..24].copy_from_slice(&sum.to_le_bytes());
        Ok(Self { header, payload: buf })
    }

    /// The record's kind.
    pub(crate) fn kind(&self) -> u16 {
        u16::from_le_bytes([self.header[0], self.header[1]])
    }

    /// The record's device index.
    pub(crate) fn device(&self) -> u32 {
        u32::from_le_bytes([self.header[4], self.header[5], self.header[6], self.header[7]])
    }

    /// Write it.
    pub(crate) fn write(&self, w: &mut dyn Write) -> io::Result<()> {
        write_all_vectored(w, &self.header, &self.payload)
    }
}

/// Write `a` then `b`, in one system call when the writer takes both at once.
pub(crate) fn write_all_vectored(w: &mut dyn Write, a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut bufs = [io::IoSlice::new(a), io::IoSlice::new(b)];
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why reading a record failed.
#[derive(Debug)]
pub enum ReadError {
    /// End of file before the first byte of a record.
    Eof,
    /// An I/O error (including end of file inside a record, and timeouts).
    Io(io::Error),
    /// The bytes are not a valid record.
    Bad(String),
}

/// Read one record into `buf` (reused; its old contents do not matter), checking its length
/// cap, its flags (0) and its checksum. The record header is read by the stream format's parser
/// ([`crate::stream`]); the buffer grows as the payload arrives, at most 1 MiB ahead of it
/// (never to the announced length up front, so a peer announcing 16 MiB and sending nothing
/// costs little), and no read asks for more than 1 MiB at once.
pub fn read_record(r: &mut dyn Read, mut buf: Vec<u8>, max_len: usize) -> Result<Record, ReadError> {
    let head = RecordHead::read(r).map_err(read_error)?;
    let RecordHead {
        kind,
        flags,
        device,
        sequence,
        len,
        crc: stored,
        ..
    } = head;
    let cap = max_len.min(MAX_CHUNK_LEN);
    if len > cap {
        return Err(ReadError::Bad(format!(
            "record of kind {kind:#06x} announces {len} bytes, above the cap of {cap}"
        )));
    }
    if flags != 0 {
        return Err(ReadError::Bad(format!(
            "record of kind {kind:#06x} has flags {flags:#x}"
        )));
    }
    let seed = crc32c(&record_fields(kind, flags, device, sequence, len)[..20]);
    let computed = read_payload(r, &mut buf, len, seed).map_err(ReadError::Io)?;
    if computed != stored {
        return Err(ReadError::Bad(format!(
            "checksum mismatch in a record of kind {kind:#06x}, device {device}, sequence {sequence}: stored {stored:#010x}, computed {computed:#010x}"
        )));
    }
    buf.truncate(len);
    Ok(Record {
        kind,
        device,
        sequence,
        payload: buf,
    })
}

/// Read `len` bytes (checked against the cap) into `buf[..len]`, as the stream format's reader
/// does: up to [`READ_STEP`] (1 MiB, the common chunk size) at once, so a payload that arrives
/// is read without reallocations, and the buffer grows (doubling) only as the bytes arrive, so
/// a lying length costs at most a step. A reused buffer keeps its length: only growth is
/// zeroed. The source ending first is [`io::ErrorKind::UnexpectedEof`]. Returns the CRC32C of
/// `seed`'s message followed by the payload, computed as the bytes arrive (each read's bytes
/// right after the read, still in the cache, while the rest is on its way).
fn read_payload(r: &mut dyn Read, buf: &mut Vec<u8>, len: usize, seed: u32) -> io::Result<u32> {
    let mut sum = seed;
    let mut filled = 0;
    while filled < len {
        let want = (filled + READ_STEP).min(len);
        grow_for_read(buf, want, len);
        while filled < want {
            match r.read(&mut buf[filled..want]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    let n = n.min(want - filled);
                    sum = crc::append(sum, &buf[filled..filled + n]);
                    filled += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(sum)
}

fn read_error(e: RecordError) -> ReadError {
    match e {
        RecordError::Eof => ReadError::Eof,
        RecordError::Truncated { .. } => ReadError::Io(io::ErrorKind::UnexpectedEof.into()),
        RecordError::Io(e) => ReadError::Io(e),
        RecordError::Checksum { computed } => ReadError::Bad(format!("checksum mismatch (computed {computed:#010x})")),
    }
}

/// Per-device totals of one data connection: (chunk records, payload bytes).
pub fn encode_end(totals: &[(u64, u64)]) -> Vec<u8> {
    let records: u64 = totals.iter().map(|t| t.0).sum();
    let bytes: u64 = totals.iter().map(|t| t.1).sum();
    let mut p = Vec::with_capacity(24 + 16 * totals.len());
    p.extend_from_slice(&records.to_le_bytes());
    p.extend_from_slice(&bytes.to_le_bytes());
    p.extend_from_slice(&(totals.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for (r, b) in totals {
        p.extend_from_slice(&r.to_le_bytes());
        p.extend_from_slice(&b.to_le_bytes());
    }
    p
}

/// Parse an end marker payload for `devices` devices: per-device (records, bytes).
pub fn decode_end(p: &[u8], devices: usize) -> Result<Vec<(u64, u64)>, String> {
    if p.len() != 24 + 16 * devices {
        return Err(format!(
            "end marker of {} bytes, expected {} for {devices} device(s)",
            p.len(),
            24 + 16 * devices
        ));
    }
    let u64_at = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&p[at..at + 8]);
        u64::from_le_bytes(a)
    };
    let count = u32::from_le_bytes([p[16], p[17], p[18], p[19]]) as usize;
    if count != devices {
        return Err(format!("end marker for {count} devices, expected {devices}"));
    }
    // Reserved, 0, as the stream format's end marker (whose reader refuses anything else).
    let reserved = u32::from_le_bytes([p[20], p[21], p[22], p[23]]);
    if reserved != 0 {
        return Err(format!("end marker reserved field is {reserved:#x}, expected 0"));
    }
    let totals: Vec<(u64, u64)> = (0..devices)
        .map(|i| (u64_at(24 + 16 * i), u64_at(32 + 16 * i)))
        .collect();
    // The per-device counts come from the peer: summed without overflowing (found by the
    // transport_records fuzz target).
    let sum = |f: fn(&(u64, u64)) -> u64| totals.iter().try_fold(0u64, |a, t| a.checked_add(f(t)));
    if sum(|t| t.0) != Some(u64_at(0)) || sum(|t| t.1) != Some(u64_at(8)) {
        return Err("end marker totals do not add up".into());
    }
    Ok(totals)
}

/// A reason string, capped, for a control message payload.
pub fn reason_payload(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

/// The name of a record or message kind, for errors.
pub fn kind_name(kind: u16) -> String {
    match kind {
        KIND_PRE_COPY => "pre-copy chunk".into(),
        KIND_STOP_COPY => "stop-copy chunk".into(),
        KIND_END => "end marker".into(),
        KIND_INITIAL_SENT => "initial-data marker".into(),
        KIND_CHECK => "check value".into(),
        KIND_KEEPALIVE => "keepalive".into(),
        MSG_ACCEPT => "ACCEPT".into(),
        MSG_REFUSE => "REFUSE".into(),
        MSG_SWITCHOVER_ACK => "SWITCHOVER_ACK".into(),
        MSG_LOADED => "LOADED".into(),
        MSG_COMMIT => "COMMIT".into(),
        MSG_RESUMED => "RESUMED".into(),
        MSG_FAILED => "FAILED".into(),
        k => format!("unknown kind {k:#06x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trips_and_refuses_damage() {
        let p = Preamble {
            role: ROLE_DATA,
            index: 2,
            connections: 4,
            session: 0x1234_5678_9abc,
        };
        let b = p.encode();
        assert_eq!(Preamble::decode(&b), Ok(p));
        let mut bad = b;
        bad[21] ^= 1;
        assert!(Preamble::decode(&bad).unwrap_err().contains("checksum"));
        let mut bad = b;
        bad[0] = b'X';
        assert!(Preamble::decode(&bad).unwrap_err().contains("magic"));
    }

    /// Issue 12, part 6: the buffer grows with the data, not to the announced length.
    #[test]
    fn a_record_buffer_grows_as_data_arrives() {
        struct Stingy<'a> {
            data: &'a [u8],
            largest_ask: usize,
        }
        impl Read for Stingy<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.largest_ask = self.largest_ask.max(buf.len());
                self.data.read(buf)
            }
        }
        let mut v = Vec::new();
        write_record(&mut v, KIND_STOP_COPY, 0, 0, &vec![7u8; MAX_CHUNK_LEN]).unwrap();
        // The header announces 16 MiB; only 10 bytes follow.
        let mut r = Stingy {
            data: &v[..RECORD_HEADER_LEN + 10],
            largest_ask: 0,
        };
        let e = read_record(&mut r, Vec::new(), MAX_CHUNK_LEN).unwrap_err();
        assert!(matches!(e, ReadError::Io(ref e) if e.kind() == io::ErrorKind::UnexpectedEof));
        assert!(r.largest_ask <= READ_STEP, "asked for {} bytes", r.largest_ask);
        // The whole record still reads, in steps, into a fresh or a reused buffer.
        for buf in [Vec::new(), vec![1u8; 100], vec![1u8; MAX_CHUNK_LEN + 5]] {
            let rec = read_record(&mut &v[..], buf, MAX_CHUNK_LEN).unwrap();
            assert_eq!(rec.payload.len(), MAX_CHUNK_LEN);
            assert!(rec.payload.iter().all(|&b| b == 7));
        }
    }

    #[test]
    fn records_round_trip_and_refuse_damage() {
        let mut v = Vec::new();
        write_record(&mut v, KIND_STOP_COPY, 3, 7, b"hello").unwrap();
        let r = read_record(&mut &v[..], Vec::new(), 1 << 20).unwrap();
        assert_eq!(
            (r.kind, r.device, r.sequence, &r.payload[..]),
            (KIND_STOP_COPY, 3, 7, &b"hello"[..])
        );
        let mut bad = v.clone();
        bad[26] ^= 1;
        assert!(matches!(
            read_record(&mut &bad[..], Vec::new(), 1 << 20),
            Err(ReadError::Bad(_))
        ));
        assert!(matches!(
            read_record(&mut &v[..20], Vec::new(), 1 << 20),
            Err(ReadError::Io(_))
        ));
        assert!(matches!(
            read_record(&mut &v[..0], Vec::new(), 1 << 20),
            Err(ReadError::Eof)
        ));
        assert!(matches!(
            read_record(&mut &v[..], Vec::new(), 4),
            Err(ReadError::Bad(_))
        ));
    }

    #[test]
    fn a_framed_copy_is_the_record_write_record_writes() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut a = Vec::new();
        write_record(&mut a, KIND_PRE_COPY, 2, 9, &payload).unwrap();
        let f = Framed::copy(KIND_PRE_COPY, 2, 9, &payload, vec![1u8; 10]).unwrap();
        let mut b = Vec::new();
        f.write(&mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!((f.kind(), f.device()), (KIND_PRE_COPY, 2));
    }

    /// The checksums (folded on CPUs that can) are the stream format's, and still catch damage.
    #[test]
    fn headers_are_the_stream_formats_at_any_length() {
        let payload: Vec<u8> = (0..(1u32 << 20) + 77)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [0, 1, 1023, 1024, 65_536, 65_537, 300_001, payload.len()] {
            let p = &payload[..len];
            let h = header(KIND_STOP_COPY, 5, 11, p).unwrap();
            assert_eq!(
                h,
                crate::stream::record_header(KIND_STOP_COPY, 0, 5, 11, p),
                "length {len}"
            );
            assert_eq!(Framed::copy(KIND_STOP_COPY, 5, 11, p, Vec::new()).unwrap().header, h);
            let mut v = Vec::new();
            write_record(&mut v, KIND_STOP_COPY, 5, 11, p).unwrap();
            assert_eq!(read_record(&mut &v[..], Vec::new(), MAX_CHUNK_LEN).unwrap().payload, p);
            if len > 0 {
                let at = RECORD_HEADER_LEN + len / 2;
                v[at] ^= 0x10;
                assert!(matches!(
                    read_record(&mut &v[..], Vec::new(), MAX_CHUNK_LEN),
                    Err(ReadError::Bad(ref why)) if why.contains("checksum")
                ));
            }
        }
    }

    #[test]
    fn end_markers_round_trip() {
        let t = vec![(3, 300), (1, 10)];
        assert_eq!(decode_end(&encode_end(&t), 2), Ok(t.clone()));
        assert!(decode_end(&encode_end(&t), 3).is_err());
        let mut bad = encode_end(&t);
        bad[0] ^= 1;
        assert!(decode_end(&bad, 2).is_err());
    }

    /// Per-device counts whose sum overflows are refused, not a panic (found by the
    /// transport_records fuzz target).
    #[test]
    fn end_marker_totals_that_overflow_are_refused() {
        for t in [[(u64::MAX, 0), (1, 0)], [(0, u64::MAX), (0, 2)]] {
            let mut p = encode_end(&[(0, 0), (0, 0)]);
            for (i, (r, b)) in t.iter().enumerate() {
                p[24 + 16 * i..32 + 16 * i].copy_from_slice(&r.to_le_bytes());
                p[32 + 16 * i..40 + 16 * i].copy_from_slice(&b.to_le_bytes());
            }
            // The wrapped sums, as a peer could write them.
            let records = t[0].0.wrapping_add(t[1].0);
            let bytes = t[0].1.wrapping_add(t[1].1);
            p[0..8].copy_from_slice(&records.to_le_bytes());
            p[8..16].copy_from_slice(&bytes.to_le_bytes());
            assert_eq!(decode_end(&p, 2), Err("end marker totals do not add up".into()));
        }
    }

    /// The reserved field must be 0, as in the stream format (found by the transport_records
    /// fuzz target: an accepted end marker did not re-encode to the same bytes).
    #[test]
    fn an_end_marker_with_a_reserved_field_set_is_refused() {
        let mut p = encode_end(&[(2, 100)]);
        assert!(decode_end(&p, 1).is_ok());
        p[21] = 2;
        assert!(decode_end(&p, 1).unwrap_err().contains("reserved"));
    }
}
