//! Reading and checking a stream: [`StreamReader`] and its [`PayloadReader`] adapter.

use std::fmt;
use std::io::{self, BufRead, Read};

use crate::state::MigrationFlags;

use super::header::Cursor;
use super::{
    END_DEVICE, FLAG_OPTIONAL, FORMAT_VERSION, Header, KIND_END, MAGIC, MAX_CHUNK_LEN, MAX_HEADER_LEN,
    RECORD_HEADER_LEN, SectionKind, StreamError, StreamErrorKind, crc32c_of, record_crc,
};

/// The first read of a payload of unknown honesty in a stream; the buffer then doubles as data
/// arrives.
pub(crate) const FIRST_READ: usize = 64 * 1024;
/// The most a payload read asks of its source at once, and how far at most the buffer grows
/// ahead of the bytes received.
pub(crate) const READ_STEP: usize = 1 << 20;

/// A reader that counts the bytes it passed on: the stream offset.
#[derive(Debug)]
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

impl<R: Read> Counting<R> {
    /// Fill `buf` completely; the stream ending first is a truncation at the current offset.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        self.read_exact(buf).map_err(|e| self.io_error(e, what))
    }

    /// An I/O error at the current offset (end of file: a truncation of `what`).
    fn io_error(&self, e: io::Error, what: &'static str) -> StreamError {
        let kind = if e.kind() == io::ErrorKind::UnexpectedEof {
            StreamErrorKind::Truncated { what }
        } else {
            StreamErrorKind::Io(e)
        };
        StreamError::new(self.count, kind)
    }
}

/// Make `buf` at least `want` bytes long (`want <= len`) for the next read of a `len`-byte
/// payload: the capacity doubles within `len`, which keeps the number of reallocations
/// logarithmic and the capacity below twice the bytes received plus one step; only growth is
/// zeroed.
pub(crate) fn grow_for_read(buf: &mut Vec<u8>, want: usize, len: usize) {
    if buf.len() < want {
        if buf.capacity() < want {
            let target = want.max(buf.capacity().saturating_mul(2)).min(len);
            buf.reserve_exact(target - buf.len());
        }
        buf.resize(want, 0);
    }
}

/// Read `len` bytes (already checked against a cap) into `buf[..len]`, growing `buf` only as
/// the bytes actually arrive (`first` bytes first, at most [`READ_STEP`], then doubling, never
/// more than [`READ_STEP`] ahead of the data and never above `len`), so a lying length on a
/// short source allocates little. A reused buffer keeps its length: only growth is zeroed. Each
/// read asks for at most [`READ_STEP`] bytes. The source ending first is
/// [`io::ErrorKind::UnexpectedEof`].
fn read_growing(r: &mut dyn Read, buf: &mut Vec<u8>, len: usize, first: usize) -> io::Result<()> {
    let first = first.clamp(1, READ_STEP);
    let mut filled = 0;
    while filled < len {
        let step = filled.clamp(first, READ_STEP);
        let want = (filled + step).min(len);
        grow_for_read(buf, want, len);
        while filled < want {
            match r.read(&mut buf[filled..want]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n.min(want - filled),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// A record header as it stands in a stream and on the transport's connections: kind, flags,
/// device index, sequence number, payload length, CRC32C. [`RecordHead::read`] and
/// [`RecordHead::read_payload`] are the crate's one record parser: [`StreamReader`] and the
/// transport's record reader (`transport::wire::read_record`) both read through them and add
/// their own checks (caps, flags, sequence) in between.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordHead {
    /// The kind code.
    pub(crate) kind: u16,
    /// The flags.
    pub(crate) flags: u16,
    /// The device index.
    pub(crate) device: u32,
    /// The sequence number.
    pub(crate) sequence: u64,
    /// The payload length announced (not yet checked against any cap).
    pub(crate) len: usize,
    /// The stored CRC32C.
    pub(crate) crc: u32,
    /// The 20 header bytes the checksum covers.
    fields: [u8; 20],
}

/// Why reading a record through [`RecordHead`] failed.
#[derive(Debug)]
pub(crate) enum RecordError {
    /// The source ended before the first byte of the record.
    Eof,
    /// The source ended inside the record: in its header (`payload` false) or its payload.
    Truncated {
        /// Whether the header was complete.
        payload: bool,
    },
    /// An I/O error other than end of file.
    Io(io::Error),
    /// The payload does not match the stored checksum.
    Checksum {
        /// The CRC32C computed over the header fields and the payload.
        computed: u32,
    },
}

impl RecordHead {
    /// Parse a 24-byte record header (no check: the caller checks the length against its cap
    /// before reading the payload).
    pub(crate) fn parse(h: &[u8; RECORD_HEADER_LEN]) -> Self {
        let mut fields = [0u8; 20];
        fields.copy_from_slice(&h[0..20]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&h[8..16]);
        Self {
            kind: u16::from_le_bytes([h[0], h[1]]),
            flags: u16::from_le_bytes([h[2], h[3]]),
            device: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
            sequence: u64::from_le_bytes(seq),
            len: u32::from_le_bytes([h[16], h[17], h[18], h[19]]) as usize,
            crc: u32::from_le_bytes([h[20], h[21], h[22], h[23]]),
            fields,
        }
    }

    /// Read and parse the next record header from `r`.
    pub(crate) fn read(r: &mut dyn Read) -> Result<Self, RecordError> {
        let mut h = [0u8; RECORD_HEADER_LEN];
        let mut got = 0;
        while got < h.len() {
            match r.read(&mut h[got..]) {
                Ok(0) if got == 0 => return Err(RecordError::Eof),
                Ok(0) => return Err(RecordError::Truncated { payload: false }),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RecordError::Io(e)),
            }
        }
        Ok(Self::parse(&h))
    }

    /// Read the payload into `buf[..self.len]` (see [`read_growing`], which grows a buffer by
    /// `first` bytes first; a longer reused buffer keeps its length) and check the checksum. The
    /// caller has checked `self.len` against its cap.
    pub(crate) fn read_payload(&self, r: &mut dyn Read, buf: &mut Vec<u8>, first: usize) -> Result<(), RecordError> {
        read_growing(r, buf, self.len, first).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => RecordError::Truncated { payload: true },
            _ => RecordError::Io(e),
        })?;
        let computed = record_crc(&self.fields, &buf[..self.len]);
        if computed == self.crc {
            Ok(())
        } else {
            Err(RecordError::Checksum { computed })
        }
    }
}

/// A record as read: where it is and what it holds (its payload is in the reader's buffer).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordMeta {
    pub(crate) kind: SectionKind,
    pub(crate) flags: u16,
    pub(crate) device: u32,
    pub(crate) sequence: u64,
    pub(crate) len: usize,
    pub(crate) crc: u32,
    pub(crate) offset: u64,
}

/// A record handed out by [`StreamReader::next_chunk`]; its payload borrows the reader's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// What the record holds.
    pub kind: SectionKind,
    /// The device it belongs to.
    pub device_index: u32,
    /// Its sequence number among the device's records.
    pub sequence: u64,
    /// The byte offset of its record header in the stream.
    pub offset: u64,
    /// Its CRC32C (already checked).
    pub checksum: u32,
    /// The payload.
    pub payload: &'a [u8],
}

/// One device's totals in the end marker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceTotals {
    /// Records (chunks and config sections) of the device.
    pub chunks: u64,
    /// Payload bytes of those records.
    pub bytes: u64,
}

/// The end marker, checked against what the stream carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndSummary {
    /// Byte offset of the end marker.
    pub offset: u64,
    /// Records before the end marker.
    pub total_chunks: u64,
    /// Payload bytes of those records.
    pub total_bytes: u64,
    /// Per device, in index order.
    pub devices: Vec<DeviceTotals>,
    /// The end marker's CRC32C.
    pub checksum: u32,
    /// The length of the whole stream.
    pub stream_len: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct DeviceProgress {
    totals: DeviceTotals,
    stop_copy_started: bool,
}

/// Reads a device-state stream from any [`Read`], checking everything as it goes.
///
/// [`StreamReader::new`] reads and checks the header; [`StreamReader::next_chunk`] then hands
/// out records one by one and returns `None` once the end marker and its totals are checked
/// (and nothing follows it). Payloads are read into one buffer, reused, that never grows above
/// [`super::MAX_CHUNK_LEN`]. After an error the reader refuses to go on.
///
/// ```
/// use vfio_migration::{device::DeviceIdentity, state::MigrationFlags, stream::*};
/// let header = Header::single(DeviceIdentity::Unknown, MigrationFlags::STOP_COPY);
/// let mut w = StreamWriter::new(Vec::new(), header).unwrap();
/// w.write_chunk(SectionKind::StopCopy, 0, b"state").unwrap();
/// let bytes = w.finish().unwrap();
///
/// let mut r = StreamReader::new(&bytes[..]).unwrap();
/// let c = r.next_chunk().unwrap().unwrap();
/// assert_eq!((c.kind, c.device_index, c.sequence, c.payload), (SectionKind::StopCopy, 0, 0, &b"state"[..]));
/// assert!(r.next_chunk().unwrap().is_none());
///
/// // One flipped bit anywhere is refused, with its offset.
/// let mut bad = bytes.clone();
/// bad[60] ^= 4;
/// let err = StreamReader::new(&bad[..]).and_then(|mut r| { while r.next_chunk()?.is_some() {} Ok(()) });
/// assert!(err.is_err());
/// ```
pub struct StreamReader<R: Read> {
    src: Counting<R>,
    header: Header,
    header_len: u64,
    header_crc: u32,
    buf: Vec<u8>,
    devices: Vec<DeviceProgress>,
    total_chunks: u64,
    total_bytes: u64,
    skipped: u64,
    end: Option<EndSummary>,
    failed: Option<(u64, String)>,
    allow_trailing: bool,
}

impl<R: Read> fmt::Debug for StreamReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamReader")
            .field("offset", &self.src.count)
            .field("header", &self.header)
            .field("total_chunks", &self.total_chunks)
            .field("finished", &self.end.is_some())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<R: Read> StreamReader<R> {
    /// Read and check the stream header.
    pub fn new(reader: R) -> Result<Self, StreamError> {
        let mut src = Counting {
            inner: reader,
            count: 0,
        };
        let mut fixed = [0u8; 16];
        src.fill(&mut fixed, "the stream header")?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&fixed[0..8]);
        if magic != MAGIC {
            return Err(StreamError::new(
                0,
                StreamErrorKind::BadMagic {
                    found: magic,
                    expected: MAGIC,
                },
            ));
        }
        let version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
        if version != FORMAT_VERSION {
            return Err(StreamError::new(8, StreamErrorKind::UnsupportedVersion(version)));
        }
        let len = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]) as usize;
        if len > MAX_HEADER_LEN {
            return Err(StreamError::new(
                12,
                StreamErrorKind::TooLarge {
                    what: "the header",
                    len: len as u64,
                    cap: MAX_HEADER_LEN as u64,
                },
            ));
        }
        let mut body = Vec::new();
        read_growing(&mut src, &mut body, len, FIRST_READ).map_err(|e| src.io_error(e, "the stream header"))?;
        let mut stored = [0u8; 4];
        src.fill(&mut stored, "the header checksum")?;
        let stored = u32::from_le_bytes(stored);
        let computed = crc32c_of(&[&fixed, &body[..len]]);
        if stored != computed {
            return Err(StreamError::new(
                16 + len as u64,
                StreamErrorKind::HeaderChecksum { stored, computed },
            ));
        }
        let header = Header::decode_body(&body[..len])
            .map_err(|(pos, why)| StreamError::new(16 + pos as u64, StreamErrorKind::InvalidHeader(why)))?;
        let devices = vec![DeviceProgress::default(); header.devices.len()];
        Ok(Self {
            header_len: src.count,
            src,
            header,
            header_crc: stored,
            buf: Vec::new(),
            devices,
            total_chunks: 0,
            total_bytes: 0,
            skipped: 0,
            end: None,
            failed: None,
            allow_trailing: false,
        })
    }

    /// Accept bytes after the end marker (they are left unread), for a stream embedded in a
    /// longer one. By default they are an error ([`StreamErrorKind::TrailingData`]): after the end
    /// marker the reader reads once more and expects end-of-file, so on a socket it waits for
    /// the peer to close (or shut down writing).
    pub fn allow_trailing_data(&mut self, allow: bool) -> &mut Self {
        self.allow_trailing = allow;
        self
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The header's length in bytes (magic to checksum).
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// The header's CRC32C.
    pub fn header_checksum(&self) -> u32 {
        self.header_crc
    }

    /// Bytes read from the stream so far.
    pub fn offset(&self) -> u64 {
        self.src.count
    }

    /// Whether the end marker was read and checked.
    pub fn is_finished(&self) -> bool {
        self.end.is_some()
    }

    /// The checked end marker, once read.
    pub fn end_summary(&self) -> Option<&EndSummary> {
        self.end.as_ref()
    }

    /// How many records of unknown OPTIONAL kinds were skipped.
    pub fn skipped_sections(&self) -> u64 {
        self.skipped
    }

    /// The payload buffer's capacity: never above [`super::MAX_CHUNK_LEN`].
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.src.inner
    }

    /// The next chunk or config section, or `None` after the end marker. Records of unknown
    /// OPTIONAL kinds are skipped.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk<'_>>, StreamError> {
        loop {
            match self.advance()? {
                None => return Ok(None),
                Some(m) if matches!(m.kind, SectionKind::Unknown(_)) => continue,
                Some(m) => return Ok(Some(self.chunk(m))),
            }
        }
    }

    /// Like [`StreamReader::next_chunk`], but also hands out records of unknown OPTIONAL kinds
    /// (as [`SectionKind::Unknown`]).
    pub fn next_record(&mut self) -> Result<Option<Chunk<'_>>, StreamError> {
        Ok(self.advance()?.map(|m| self.chunk(m)))
    }

    /// Read and check every remaining record, up to and including the end marker.
    pub fn skip_to_end(&mut self) -> Result<&EndSummary, StreamError> {
        while self.advance()?.is_some() {}
        self.end.as_ref().ok_or_else(|| {
            StreamError::new(
                self.src.count,
                StreamErrorKind::BadEndMarker("no end marker was read".to_string()),
            )
        })
    }

    /// An [`io::Read`] / [`BufRead`] giving the device state of device `device_index`: the
    /// payloads of its pre-copy chunks, then of its stop-copy chunks, in sequence order.
    ///
    /// It reads the stream to its end: other records (config sections, other devices' chunks)
    /// are checked and skipped, or handed to [`PayloadReader::on_other`]. End-of-file therefore
    /// means the whole stream, end marker included, was checked. Stream errors come as
    /// [`io::Error`]s whose message names the offset; [`StreamError::try_from_io`] gives the
    /// typed error back.
    pub fn device_payload(&mut self, device_index: u32) -> PayloadReader<'_, R> {
        PayloadReader {
            reader: self,
            device: device_index,
            pos: 0,
            len: 0,
            done: false,
            bytes: 0,
            on_other: None,
        }
    }

    fn chunk(&self, m: RecordMeta) -> Chunk<'_> {
        Chunk {
            kind: m.kind,
            device_index: m.device,
            sequence: m.sequence,
            offset: m.offset,
            checksum: m.crc,
            payload: &self.buf[..m.len],
        }
    }

    /// The next record (`None` after the end marker), remembering failure.
    pub(crate) fn advance(&mut self) -> Result<Option<RecordMeta>, StreamError> {
        if let Some((offset, why)) = &self.failed {
            return Err(StreamError::new(*offset, StreamErrorKind::AlreadyFailed(why.clone())));
        }
        if self.end.is_some() {
            return Ok(None);
        }
        match self.read_record() {
            Ok(m) => Ok(m),
            Err(e) => {
                self.failed = Some((e.offset, e.message()));
                Err(e)
            }
        }
    }

    fn read_record(&mut self) -> Result<Option<RecordMeta>, StreamError> {
        let start = self.src.count;
        let head = RecordHead::read(&mut self.src).map_err(|e| self.record_error(e, start, None))?;
        let RecordHead {
            kind,
            flags,
            device,
            sequence,
            len,
            crc: stored,
            ..
        } = head;
        if len > MAX_CHUNK_LEN {
            return Err(StreamError::new(
                start + 16,
                StreamErrorKind::TooLarge {
                    what: "a record payload",
                    len: len as u64,
                    cap: MAX_CHUNK_LEN as u64,
                },
            ));
        }
        if let Err(e) = head.read_payload(&mut self.src, &mut self.buf, FIRST_READ) {
            return Err(self.record_error(e, start, Some(&head)));
        }
        let meta = RecordMeta {
            kind: SectionKind::from_code(kind),
            flags,
            device,
            sequence,
            len,
            crc: stored,
            offset: start,
        };
        if kind == KIND_END {
            self.read_end(meta)?;
            return Ok(None);
        }
        let known = !matches!(meta.kind, SectionKind::Unknown(_));
        if flags & !FLAG_OPTIONAL != 0 || (known && flags != 0) {
            return Err(StreamError::new(start + 2, StreamErrorKind::BadFlags { kind, flags }));
        }
        if !known && flags & FLAG_OPTIONAL == 0 {
            return Err(StreamError::new(start, StreamErrorKind::UnknownMandatorySection(kind)));
        }
        let count = self.devices.len();
        let Some(dev) = self.devices.get_mut(device as usize) else {
            return Err(StreamError::new(
                start + 4,
                StreamErrorKind::BadDeviceIndex { device, count },
            ));
        };
        if sequence != dev.totals.chunks {
            return Err(StreamError::new(
                start + 8,
                StreamErrorKind::Sequence {
                    device,
                    expected: dev.totals.chunks,
                    found: sequence,
                },
            ));
        }
        match meta.kind {
            SectionKind::PreCopy => {
                let dev_flags = self.header.devices[device as usize].flags;
                if !dev_flags.contains(MigrationFlags::PRE_COPY) {
                    return Err(StreamError::new(
                        start,
                        StreamErrorKind::PreCopyNotSupported {
                            device,
                            flags: dev_flags,
                        },
                    ));
                }
                if dev.stop_copy_started {
                    return Err(StreamError::new(start, StreamErrorKind::PreCopyAfterStopCopy(device)));
                }
            }
            SectionKind::StopCopy => dev.stop_copy_started = true,
            SectionKind::Config => {}
            SectionKind::Unknown(_) => self.skipped += 1,
        }
        dev.totals.chunks += 1;
        dev.totals.bytes += len as u64;
        self.total_chunks += 1;
        self.total_bytes += len as u64;
        Ok(Some(meta))
    }

    /// A [`RecordError`] of the record that began at `start` (`head`: its header, once read),
    /// as a stream error.
    fn record_error(&self, e: RecordError, start: u64, head: Option<&RecordHead>) -> StreamError {
        let kind = match (e, head) {
            (RecordError::Io(e), _) => StreamErrorKind::Io(e),
            (RecordError::Checksum { computed }, Some(h)) => {
                return StreamError::new(
                    start,
                    StreamErrorKind::ChunkChecksum {
                        kind: h.kind,
                        device: h.device,
                        sequence: h.sequence,
                        len: h.len as u32,
                        stored: h.crc,
                        computed,
                    },
                );
            }
            (RecordError::Truncated { payload: true }, _) => StreamErrorKind::Truncated {
                what: "a record payload",
            },
            (RecordError::Eof | RecordError::Truncated { payload: false } | RecordError::Checksum { .. }, _) => {
                StreamErrorKind::Truncated {
                    what: "a record header (no end marker)",
                }
            }
        };
        StreamError::new(self.src.count, kind)
    }

    fn read_end(&mut self, m: RecordMeta) -> Result<(), StreamError> {
        let start = m.offset;
        let bad = |at: u64, why: String| StreamError::new(at, StreamErrorKind::BadEndMarker(why));
        if m.flags != 0 {
            return Err(StreamError::new(
                start + 2,
                StreamErrorKind::BadFlags {
                    kind: KIND_END,
                    flags: m.flags,
                },
            ));
        }
        if m.device != END_DEVICE {
            return Err(bad(
                start + 4,
                format!("device index {:#x}, expected 0xffffffff", m.device),
            ));
        }
        if m.sequence != 0 {
            return Err(bad(start + 8, format!("sequence number {}, expected 0", m.sequence)));
        }
        let n = self.devices.len();
        let want = 24 + 16 * n;
        if m.len != want {
            return Err(bad(
                start + 16,
                format!("payload of {} bytes, expected {want} for {n} device(s)", m.len),
            ));
        }
        let payload_at = start + RECORD_HEADER_LEN as u64;
        let mut c = Cursor {
            data: &self.buf[..m.len],
            pos: 0,
        };
        // The length was checked above, so the cursor cannot run out.
        let field = |c: &mut Cursor<'_>| c.u64("end marker field").unwrap_or(u64::MAX);
        let check = |what: String, at: usize, in_marker: u64, counted: u64| {
            if in_marker == counted {
                Ok(())
            } else {
                Err(StreamError::new(
                    payload_at + at as u64,
                    StreamErrorKind::TotalsMismatch {
                        what,
                        in_marker,
                        counted,
                    },
                ))
            }
        };
        let at = c.pos;
        let total_chunks = field(&mut c);
        check(
            "the total number of records".into(),
            at,
            total_chunks,
            self.total_chunks,
        )?;
        let at = c.pos;
        let total_bytes = field(&mut c);
        check("the total payload bytes".into(), at, total_bytes, self.total_bytes)?;
        let at = c.pos;
        let count = c.u32("device count").unwrap_or(u32::MAX);
        check("the device count".into(), at, count as u64, n as u64)?;
        let at = c.pos;
        let reserved = c.u32("reserved").unwrap_or(u32::MAX);
        if reserved != 0 {
            return Err(bad(
                payload_at + at as u64,
                format!("reserved field is {reserved:#x}, expected 0"),
            ));
        }
        let mut devices = Vec::with_capacity(n);
        for (i, d) in self.devices.iter().enumerate() {
            let at = c.pos;
            let chunks = field(&mut c);
            check(format!("device {i}'s number of records"), at, chunks, d.totals.chunks)?;
            let at = c.pos;
            let bytes = field(&mut c);
            check(format!("device {i}'s payload bytes"), at, bytes, d.totals.bytes)?;
            devices.push(DeviceTotals { chunks, bytes });
        }
        let end_offset = self.src.count;
        if !self.allow_trailing {
            let mut one = [0u8; 1];
            loop {
                match self.src.read(&mut one) {
                    Ok(0) => break,
                    Ok(_) => return Err(StreamError::new(end_offset, StreamErrorKind::TrailingData)),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(StreamError::new(end_offset, StreamErrorKind::Io(e))),
                }
            }
        }
        self.end = Some(EndSummary {
            offset: start,
            total_chunks,
            total_bytes,
            devices,
            checksum: m.crc,
            stream_len: end_offset,
        });
        Ok(())
    }
}

/// A boxed callback for the records a [`PayloadReader`] does not yield.
type OtherFn<'r> = Box<dyn FnMut(&Chunk<'_>) -> io::Result<()> + 'r>;

/// One device's state bytes from a stream, as an [`io::Read`] and [`BufRead`]; made by
/// [`StreamReader::device_payload`].
///
/// ```
/// use std::io::{self, Read};
/// use vfio_migration::{device::DeviceIdentity, state::MigrationFlags as F, stream::*};
/// let header = Header::single(DeviceIdentity::Unknown, F::STOP_COPY | F::PRE_COPY);
/// let mut w = StreamWriter::new(Vec::new(), header).unwrap();
/// w.write_chunk(SectionKind::PreCopy, 0, b"early ").unwrap();
/// w.write_config(0, b"cfg").unwrap();
/// w.write_chunk(SectionKind::StopCopy, 0, b"late").unwrap();
/// let bytes = w.finish().unwrap();
///
/// let mut r = StreamReader::new(&bytes[..]).unwrap();
/// let mut config = Vec::new();
/// let mut state = String::new();
/// r.device_payload(0)
///     .on_other(|c| { config.extend_from_slice(c.payload); Ok(()) })
///     .read_to_string(&mut state)
///     .unwrap();
/// assert_eq!((state.as_str(), &config[..]), ("early late", &b"cfg"[..]));
///
/// // A stream error comes as an io::Error naming the offset, with the typed error inside.
/// let mut r = StreamReader::new(&bytes[..bytes.len() - 1]).unwrap();
/// let err = io::copy(&mut r.device_payload(0), &mut io::sink()).unwrap_err();
/// assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
/// let typed = StreamError::try_from_io(err).unwrap();
/// assert_eq!(typed.offset, bytes.len() as u64 - 1);
/// ```
pub struct PayloadReader<'r, R: Read> {
    reader: &'r mut StreamReader<R>,
    device: u32,
    pos: usize,
    len: usize,
    done: bool,
    bytes: u64,
    on_other: Option<OtherFn<'r>>,
}

impl<R: Read> fmt::Debug for PayloadReader<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayloadReader")
            .field("device", &self.device)
            .field("bytes", &self.bytes)
            .field("done", &self.done)
            .field("reader", &self.reader)
            .finish_non_exhaustive()
    }
}

impl<'r, R: Read> PayloadReader<'r, R> {
    /// Hand every record that is not this device's state (config sections, other devices'
    /// chunks, unknown OPTIONAL sections) to `f`, in stream order; an error from `f` stops the
    /// read.
    pub fn on_other(mut self, f: impl FnMut(&Chunk<'_>) -> io::Result<()> + 'r) -> Self {
        self.on_other = Some(Box::new(f));
        self
    }

    /// Device state bytes read from the stream so far (including those not yet consumed).
    pub fn state_bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the end marker was reached and checked.
    pub fn is_finished(&self) -> bool {
        self.done
    }

    fn next_record(&mut self) -> io::Result<()> {
        self.pos = 0;
        self.len = 0;
        match self.reader.advance().map_err(StreamError::into_io)? {
            None => self.done = true,
            Some(m) if m.device == self.device && m.kind.is_device_state() => {
                self.len = m.len;
                self.bytes += m.len as u64;
            }
            Some(m) => {
                if let Some(f) = &mut self.on_other {
                    f(&self.reader.chunk(m))?;
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> BufRead for PayloadReader<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.len && !self.done {
            self.next_record()?;
        }
        Ok(&self.reader.buf[self.pos..self.len])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.len);
    }
}

impl<R: Read> Read for PayloadReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}
