//! The device-state stream, format version 1: what crosses hosts and what sits in snapshot files.
//!
//! A stream carries the saved state of one or more devices. It starts with a header naming each
//! device (its [`DeviceIdentity`] and [`MigrationFlags`]), so a load into an incompatible device
//! is refused before the device is touched ([`Header::check_compatible`]). Then come records: the
//! device state in *chunks* (pre-copy chunks, then stop-copy chunks), opaque VMM configuration
//! sections, and finally an end marker with totals.
//!
//! Every byte is covered by a CRC32C, hardware accelerated (the `crc-fast` crate; see
//! [`CRC32C_IMPLEMENTATION`]): the header by its own, each record by one over its header fields
//! *and* payload. Every record of a
//! device carries a sequence number, 0, 1, 2, ... in write order, so duplicated, reordered and
//! lost records are found (and a future multi-connection transport can put chunks back in
//! order); the end marker's totals catch records lost at the end, and bytes after the end marker
//! are refused. Lengths are capped ([`MAX_CHUNK_LEN`], [`MAX_HEADER_LEN`]) and checked before
//! anything is allocated; the reader keeps one payload buffer that it reuses.
//!
//! - [`StreamWriter`] writes a stream into any [`std::io::Write`]; its [`ChunkSink`] adapter is
//!   itself an [`std::io::Write`] that cuts any byte stream into chunks, so generic save code can
//!   `io::copy` into it.
//! - [`StreamReader`] reads and checks a stream from any [`std::io::Read`]; its [`PayloadReader`]
//!   adapter is an [`std::io::Read`] (and [`std::io::BufRead`]) giving one device's state bytes,
//!   so generic load code can `io::copy` from it. It returns end-of-file only once the whole
//!   stream, end marker included, has been checked.
//! - [`inspect`] checks a stream and describes it ([`InspectReport`]), for humans and JSON.
//!
//! ```
//! use std::io;
//! use vfio_migration::device::DeviceIdentity;
//! use vfio_migration::state::MigrationFlags;
//! use vfio_migration::stream::{Header, SectionKind, StreamReader, StreamWriter};
//!
//! let identity = DeviceIdentity::Emulated { params: "size=4096".into() };
//! let header = Header::single(identity.clone(), MigrationFlags::STOP_COPY);
//! let mut writer = StreamWriter::new(Vec::new(), header).unwrap();
//! let state = vec![7u8; 10_000];
//! let mut sink = writer.chunk_sink(SectionKind::StopCopy, 0).unwrap().with_chunk_size(4096);
//! io::copy(&mut &state[..], &mut sink).unwrap();
//! sink.finish().unwrap();
//! let bytes = writer.finish().unwrap();
//!
//! let mut reader = StreamReader::new(&bytes[..]).unwrap();
//! reader.header().check_compatible(0, &identity, MigrationFlags::STOP_COPY, false).unwrap();
//! let mut loaded = Vec::new();
//! io::copy(&mut reader.device_payload(0), &mut loaded).unwrap();
//! assert_eq!(loaded, state);
//! assert!(reader.is_finished());
//! ```
//!
//! # Byte layout (format version 1)
//!
//! All integers are little-endian. CRC32C is the Castagnoli CRC as in iSCSI and ext4
//! (`crc32c(b"123456789") == 0xe3069283`). Offsets are in bytes.
//!
//! ## Stream header
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 8    | magic: ASCII `VFIOMIGS` ([`MAGIC`]) |
//! | 8      | 4    | format version: `1` ([`FORMAT_VERSION`]) |
//! | 12     | 4    | body length `H`, at most [`MAX_HEADER_LEN`] (1 MiB) |
//! | 16     | `H`  | header body, below |
//! | 16+`H` | 4    | CRC32C of bytes `0 .. 16+H` (magic, version, length and body) |
//!
//! Header body (fields follow each other without padding):
//!
//! | size | field |
//! |------|-------|
//! | 2    | writer version length `V`, at most [`MAX_NAME_LEN`] (1024) |
//! | `V`  | writer version, UTF-8, e.g. `vfio-migration 0.1.0` |
//! | 4    | device count `N`, 1 ..= [`MAX_DEVICES`] (256) |
//! | ...  | `N` device entries, below; a device's *index* is its position, 0 .. `N` |
//!
//! Device entry:
//!
//! | size | field |
//! |------|-------|
//! | 8    | migration flags, the `VFIO_MIGRATION_*` bits the source device reported (STOP_COPY = 1 must be set; unknown bits are kept) |
//! | 1    | identity kind: 0 unknown, 1 PCI, 2 mdev, 3 emulated |
//! | 8    | kind 1 (PCI) only: vendor, device, subsystem vendor, subsystem device, a `u16` each |
//! | 2+`L`| kinds 2 and 3 only: length `L` (at most 1024), then the mdev type name or the emulated parameters, UTF-8 |
//!
//! The body must be used up exactly by these fields.
//!
//! ## Records
//!
//! After the header come records, each a 24-byte record header and a payload:
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 2    | kind: 1 pre-copy chunk, 2 stop-copy chunk, 3 VMM config section, `0x00ff` end marker; other values are reserved for later versions |
//! | 2      | 2    | flags: bit 0 OPTIONAL; all other bits must be 0 |
//! | 4      | 4    | device index (`< N`); `0xffff_ffff` in the end marker |
//! | 8      | 8    | sequence number; 0 in the end marker |
//! | 16     | 4    | payload length `L`, at most [`MAX_CHUNK_LEN`] (16 MiB) |
//! | 20     | 4    | CRC32C of bytes `0 .. 20` of this record header followed by the `L` payload bytes |
//! | 24     | `L`  | payload |
//!
//! - Kinds 1 and 2 carry the device state exactly as read from the device's transfer session;
//!   the state is the concatenation of the device's pre-copy payloads, then its stop-copy
//!   payloads, in sequence order. Kind 3 carries bytes the VMM wants saved with the device (e.g.
//!   its emulated PCI configuration space); this crate does not interpret them.
//! - The OPTIONAL flag is only meaningful on kinds this version does not define (writers must not
//!   set it on kinds 1, 2, 3 and `0xff`). A reader skips a record of an unknown kind with OPTIONAL
//!   set (after checking its checksum and sequence number) and refuses one without it.
//! - Sequence numbers count all records of one device (every kind but the end marker), starting
//!   at 0 and increasing by 1. Records of different devices may interleave.
//! - A device's pre-copy chunks all come before its first stop-copy chunk, and only a device
//!   whose flags include PRE_COPY (4) has pre-copy chunks.
//!
//! ## End marker
//!
//! The last record has kind `0x00ff`, flags 0, device index `0xffff_ffff`, sequence number 0 and
//! a payload of `24 + 16 N` bytes:
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 8    | total number of records before the end marker |
//! | 8      | 8    | total payload bytes of those records |
//! | 16     | 4    | device count `N`, as in the header |
//! | 20     | 4    | reserved, 0 |
//! | 24     | 16 `N` | per device, in index order: its number of records (`u64`) and its payload bytes (`u64`) |
//!
//! Nothing may follow the end marker (unless the reader was told otherwise with
//! [`StreamReader::allow_trailing_data`]).
//!
//! ## Compatibility
//!
//! A reader refuses any other format version. Additions that old readers may ignore are made with
//! new OPTIONAL record kinds; anything else needs a new format version.
//!
//! [`DeviceIdentity`]: crate::device::DeviceIdentity
//! [`MigrationFlags`]: crate::state::MigrationFlags

mod error;
mod header;
mod inspect;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

pub use error::{Mismatch, StreamError, StreamErrorKind};
pub use header::{DeviceEntry, Header};
pub use inspect::{
    ChunkReport, DeviceReport, DeviceTotalsReport, EndReport, HeaderReport, InspectFailure, InspectOptions,
    InspectReport, MAX_LISTED_CHUNKS, SectionReport, inspect, inspect_with,
};
pub use reader::{Chunk, DeviceTotals, EndSummary, PayloadReader, StreamReader};
pub(crate) use reader::{READ_STEP, RecordError, RecordHead, grow_for_read};
pub use writer::{ChunkSink, StreamWriter};

/// The first eight bytes of every stream.
pub const MAGIC: [u8; 8] = *b"VFIOMIGS";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The largest record payload, enforced by the writer and by the reader before allocating.
pub const MAX_CHUNK_LEN: usize = 16 << 20;
/// The chunk size [`ChunkSink`] cuts the device state into unless told otherwise.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// The largest header body.
pub const MAX_HEADER_LEN: usize = 1 << 20;
/// The most devices one stream carries.
pub const MAX_DEVICES: usize = 256;
/// The longest writer version, mdev type name or emulated parameter string.
pub const MAX_NAME_LEN: usize = 1024;
/// The size of a record header.
pub const RECORD_HEADER_LEN: usize = 24;
/// Record flag: a reader that does not know the record's kind may skip it.
pub const FLAG_OPTIONAL: u16 = 1;

const KIND_PRE_COPY: u16 = 1;
const KIND_STOP_COPY: u16 = 2;
const KIND_CONFIG: u16 = 3;
const KIND_END: u16 = 0x00ff;
const END_DEVICE: u32 = u32::MAX;

/// The kind of a record that carries data (the end marker is not one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// Device state read in PRE_COPY / PRE_COPY_P2P.
    PreCopy,
    /// Device state read in STOP_COPY.
    StopCopy,
    /// Opaque bytes the VMM saves with the device.
    Config,
    /// A kind this version does not define, marked OPTIONAL (only the reader produces it).
    Unknown(u16),
}

impl SectionKind {
    /// The kind code in the record header.
    pub const fn code(self) -> u16 {
        match self {
            SectionKind::PreCopy => KIND_PRE_COPY,
            SectionKind::StopCopy => KIND_STOP_COPY,
            SectionKind::Config => KIND_CONFIG,
            SectionKind::Unknown(code) => code,
        }
    }

    /// The kind for a code; codes this version does not define (and the end marker's) give
    /// [`SectionKind::Unknown`].
    pub const fn from_code(code: u16) -> Self {
        match code {
            KIND_PRE_COPY => SectionKind::PreCopy,
            KIND_STOP_COPY => SectionKind::StopCopy,
            KIND_CONFIG => SectionKind::Config,
            other => SectionKind::Unknown(other),
        }
    }

    /// Whether the record carries device state (pre-copy or stop-copy).
    pub const fn is_device_state(self) -> bool {
        matches!(self, SectionKind::PreCopy | SectionKind::StopCopy)
    }
}

/// Which CRC32C implementation the stream uses: the `crc-fast` crate (carry-less multiplication
/// folding: AVX-512 VPCLMULQDQ or PCLMULQDQ on x86-64, PMULL on aarch64, software elsewhere).
pub const CRC32C_IMPLEMENTATION: &str = "crc-fast";

/// CRC32C of `data`, computed as the stream computes it ([`CRC32C_IMPLEMENTATION`]).
///
/// ```
/// assert_eq!(vfio_migration::stream::crc32c(b"123456789"), 0xe306_9283);
/// ```
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_of(&[data])
}

/// The CRC32C of `data` appended to a message whose CRC32C is `crc` (0 for the empty message).
///
/// ```
/// use vfio_migration::stream::{crc32c, crc32c_append};
/// assert_eq!(crc32c_append(crc32c(b"1234"), b"56789"), crc32c(b"123456789"));
/// ```
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    // The digest's state is the register before the final inversion.
    let mut digest = crc_fast::Digest::new_with_init_state(crc_fast::CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    digest.update(data);
    // A CRC-32 digest's value fits in 32 bits.
    digest.finalize() as u32
}

/// The CRC32C of a message made of one whose CRC32C is `first` followed by `second_len` bytes
/// whose CRC32C is `second`.
pub fn crc32c_combine(first: u32, second: u32, second_len: u64) -> u32 {
    // A CRC-32 combination fits in 32 bits.
    crc_fast::checksum_combine(
        crc_fast::CrcAlgorithm::Crc32Iscsi,
        u64::from(first),
        u64::from(second),
        second_len,
    ) as u32
}

/// CRC32C of the concatenation of `parts`.
fn crc32c_of(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c_append(crc, p))
}

/// CRC32C of a record: its 20 header-field bytes followed by its payload.
pub(crate) fn record_crc(fields: &[u8], payload: &[u8]) -> u32 {
    crc32c_of(&[fields, payload])
}

/// The 24-byte record header for `kind`, `flags`, `device`, `sequence` and `payload`.
pub(crate) fn record_header(
    kind: u16,
    flags: u16,
    device: u32,
    sequence: u64,
    payload: &[u8],
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = record_fields(kind, flags, device, sequence, payload.len());
    let crc = record_crc(&h[0..20], payload);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// [`record_header`] for a copy of `payload` made into `out` (cleared first): the checksum
/// runs over each block right after the block is copied, while it is still in the cache, so
/// the copy and the checksum read the payload from memory once.
pub(crate) fn record_header_copying(
    kind: u16,
    flags: u16,
    device: u32,
    sequence: u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> [u8; RECORD_HEADER_LEN] {
    const BLOCK: usize = 16 << 10;
    let mut h = record_fields(kind, flags, device, sequence, payload.len());
    let mut crc = crc32c(&h[0..20]);
    out.clear();
    out.reserve(payload.len());
    for block in payload.chunks(BLOCK) {
        let at = out.len();
        out.extend_from_slice(block);
        crc = crc32c_append(crc, &out[at..]);
    }
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A record header's 20 checksummed bytes (the checksum field left 0).
pub(crate) fn record_fields(kind: u16, flags: u16, device: u32, sequence: u64, len: usize) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..2].copy_from_slice(&kind.to_le_bytes());
    h[2..4].copy_from_slice(&flags.to_le_bytes());
    h[4..8].copy_from_slice(&device.to_le_bytes());
    h[8..16].copy_from_slice(&sequence.to_le_bytes());
    // The writers check the length against MAX_CHUNK_LEN (< 4 GiB) first.
    h[16..20].copy_from_slice(&(len as u32).to_le_bytes());
    h
}
