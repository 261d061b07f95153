//! Writing a stream: [`StreamWriter`] and its [`ChunkSink`] adapter.

use std::io::{self, Read, Write};

use crate::state::MigrationFlags;

use super::{
    DEFAULT_CHUNK_SIZE, END_DEVICE, FLAG_OPTIONAL, FORMAT_VERSION, Header, KIND_END, MAGIC, MAX_CHUNK_LEN, SectionKind,
    StreamError, StreamErrorKind, crc32c_of, record_header,
};

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    records: u64,
    bytes: u64,
    stop_copy_started: bool,
}

/// Writes a device-state stream into any [`Write`]: the header, then chunks and config sections
/// in any order the format allows, then (in [`StreamWriter::finish`]) the end marker.
///
/// The writer refuses anything that would make an invalid stream (an unknown device index, a
/// pre-copy chunk after stop-copy data or for a device without PRE_COPY, a payload above
/// [`super::MAX_CHUNK_LEN`]). It does not buffer: wrap a file or socket in a
/// [`std::io::BufWriter`].
///
/// ```
/// use vfio_migration::{device::DeviceIdentity, state::MigrationFlags, stream::*};
/// let header = Header::single(DeviceIdentity::Unknown, MigrationFlags::STOP_COPY);
/// let mut w = StreamWriter::new(Vec::new(), header).unwrap();
/// w.write_config(0, b"pci config").unwrap();
/// w.write_chunk(SectionKind::StopCopy, 0, b"device state").unwrap();
/// let bytes = w.finish().unwrap();
/// assert_eq!(&bytes[..8], b"VFIOMIGS");
/// ```
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    out: W,
    header: Header,
    devices: Vec<Counters>,
    total_records: u64,
    total_bytes: u64,
    offset: u64,
    /// Set when a write failed part-way (or a dropped [`ChunkSink`] could not write its last
    /// chunk): the stream is then incomplete and [`StreamWriter::finish`] refuses to end it.
    broken: Option<String>,
    /// The chunk buffer [`ChunkSink`]s borrow, kept to be reused.
    spare_buf: Vec<u8>,
}

impl<W: Write> StreamWriter<W> {
    /// Write the header of a stream carrying `header`'s devices into `out`.
    pub fn new(mut out: W, header: Header) -> Result<Self, StreamError> {
        let body = header
            .encode_body()
            .map_err(|e| StreamError::new(0, StreamErrorKind::InvalidRequest(e)))?;
        let mut bytes = Vec::with_capacity(body.len() + 20);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // The body is bounded by the header limits checked in `encode_body` (< MAX_HEADER_LEN).
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&body);
        let crc = crc32c_of(&[&bytes]);
        bytes.extend_from_slice(&crc.to_le_bytes());
        out.write_all(&bytes)
            .map_err(|e| StreamError::new(0, StreamErrorKind::Io(e)))?;
        let devices = vec![Counters::default(); header.devices.len()];
        Ok(Self {
            out,
            header,
            devices,
            total_records: 0,
            total_bytes: 0,
            offset: bytes.len() as u64,
            broken: None,
            spare_buf: Vec::new(),
        })
    }

    /// The header written.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Payload bytes written so far for `device_index` (all its records).
    pub fn device_bytes(&self, device_index: u32) -> u64 {
        self.devices.get(device_index as usize).map_or(0, |c| c.bytes)
    }

    /// Write one chunk of `kind` for device `device_index` (its next sequence number is used).
    ///
    /// `kind` may be [`SectionKind::PreCopy`], [`SectionKind::StopCopy`] or
    /// [`SectionKind::Config`]. An empty payload is allowed and makes an empty record.
    pub fn write_chunk(&mut self, kind: SectionKind, device_index: u32, payload: &[u8]) -> Result<(), StreamError> {
        if let SectionKind::Unknown(code) = kind {
            return Err(self.refuse(format!(
                "section kind {code:#06x} is not defined by format version {FORMAT_VERSION}"
            )));
        }
        self.write_record(kind.code(), 0, device_index, payload)
    }

    /// Write an opaque VMM configuration section for device `device_index`.
    pub fn write_config(&mut self, device_index: u32, payload: &[u8]) -> Result<(), StreamError> {
        self.write_chunk(SectionKind::Config, device_index, payload)
    }

    /// An [`io::Write`] that cuts everything written into it into `kind` chunks of device
    /// `device_index` ([`super::DEFAULT_CHUNK_SIZE`] bytes each unless changed).
    pub fn chunk_sink(&mut self, kind: SectionKind, device_index: u32) -> Result<ChunkSink<'_, W>, StreamError> {
        self.check_record(kind.code(), 0, device_index, 0)?;
        if let SectionKind::Unknown(code) = kind {
            return Err(self.refuse(format!(
                "section kind {code:#06x} is not defined by format version {FORMAT_VERSION}"
            )));
        }
        let buf = std::mem::take(&mut self.spare_buf);
        Ok(ChunkSink {
            writer: self,
            kind,
            device: device_index,
            buf,
            filled: 0,
            chunk_size: DEFAULT_CHUNK_SIZE,
            accepted: 0,
        })
    }

    /// Write the end marker with the totals, flush, and give the inner writer back.
    pub fn finish(mut self) -> Result<W, StreamError> {
        if let Some(why) = &self.broken {
            return Err(StreamError::new(
                self.offset,
                StreamErrorKind::InvalidRequest(format!("the stream is incomplete and cannot be ended: {why}")),
            ));
        }
        let mut payload = Vec::with_capacity(24 + 16 * self.devices.len());
        payload.extend_from_slice(&self.total_records.to_le_bytes());
        payload.extend_from_slice(&self.total_bytes.to_le_bytes());
        payload.extend_from_slice(&(self.devices.len() as u32).to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        for d in &self.devices {
            payload.extend_from_slice(&d.records.to_le_bytes());
            payload.extend_from_slice(&d.bytes.to_le_bytes());
        }
        let h = record_header(KIND_END, 0, END_DEVICE, 0, &payload);
        self.put(&h)?;
        self.put(&payload)?;
        let offset = self.offset;
        self.out
            .flush()
            .map_err(|e| StreamError::new(offset, StreamErrorKind::Io(e)))?;
        Ok(self.out)
    }

    fn refuse(&self, why: String) -> StreamError {
        StreamError::new(self.offset, StreamErrorKind::InvalidRequest(why))
    }

    /// Check that a record could be written, without writing it.
    fn check_record(&self, kind: u16, flags: u16, device: u32, len: usize) -> Result<(), StreamError> {
        if let Some(why) = &self.broken {
            return Err(self.refuse(format!("an earlier write failed: {why}")));
        }
        if len > MAX_CHUNK_LEN {
            return Err(StreamError::new(
                self.offset,
                StreamErrorKind::TooLarge {
                    what: "a chunk",
                    len: len as u64,
                    cap: MAX_CHUNK_LEN as u64,
                },
            ));
        }
        let Some(counters) = self.devices.get(device as usize) else {
            return Err(StreamError::new(
                self.offset,
                StreamErrorKind::BadDeviceIndex {
                    device,
                    count: self.devices.len(),
                },
            ));
        };
        if kind == SectionKind::PreCopy.code() {
            let flags = self.header.devices[device as usize].flags;
            if !flags.contains(MigrationFlags::PRE_COPY) {
                return Err(StreamError::new(
                    self.offset,
                    StreamErrorKind::PreCopyNotSupported { device, flags },
                ));
            }
            if counters.stop_copy_started {
                return Err(StreamError::new(
                    self.offset,
                    StreamErrorKind::PreCopyAfterStopCopy(device),
                ));
            }
        }
        if flags & !FLAG_OPTIONAL != 0 {
            return Err(StreamError::new(self.offset, StreamErrorKind::BadFlags { kind, flags }));
        }
        Ok(())
    }

    /// Write one record (any kind but the end marker). Crate-internal so tests can write
    /// sections of kinds this version does not define.
    pub(crate) fn write_record(
        &mut self,
        kind: u16,
        flags: u16,
        device: u32,
        payload: &[u8],
    ) -> Result<(), StreamError> {
        self.check_record(kind, flags, device, payload.len())?;
        let c = &mut self.devices[device as usize];
        let h = record_header(kind, flags, device, c.records, payload);
        self.put(&h)?;
        self.put(payload)?;
        let c = &mut self.devices[device as usize];
        c.records += 1;
        c.bytes += payload.len() as u64;
        if kind == SectionKind::StopCopy.code() {
            c.stop_copy_started = true;
        }
        self.total_records += 1;
        self.total_bytes += payload.len() as u64;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        match self.out.write_all(bytes) {
            Ok(()) => {
                self.offset += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.broken = Some(format!("write at offset {} failed: {e}", self.offset));
                Err(StreamError::new(self.offset, StreamErrorKind::Io(e)))
            }
        }
    }
}

/// Cuts a byte stream into chunks of one kind for one device; made by
/// [`StreamWriter::chunk_sink`].
///
/// It is an [`io::Write`], so generic save code can `io::copy` into it. Full chunks are written
/// as soon as they fill; [`ChunkSink::finish`] (or [`Write::flush`]) writes the last, partial
/// one. Dropping the sink writes it too, and if that fails the [`StreamWriter`] refuses to
/// finish, so no data is lost silently. For zero-copy reads from a device, fill
/// [`ChunkSink::spare`] and [`ChunkSink::commit`] what was read.
///
/// ```
/// use std::io::Write;
/// use vfio_migration::{device::DeviceIdentity, state::MigrationFlags, stream::*};
/// let header = Header::single(DeviceIdentity::Unknown, MigrationFlags::STOP_COPY);
/// let mut w = StreamWriter::new(Vec::new(), header).unwrap();
/// let mut sink = w.chunk_sink(SectionKind::StopCopy, 0).unwrap().with_chunk_size(4);
/// sink.write_all(b"0123456789").unwrap();
/// assert_eq!(sink.finish().unwrap(), 10); // three chunks: 4 + 4 + 2 bytes
/// let bytes = w.finish().unwrap();
/// let report = inspect(&bytes[..]).unwrap();
/// assert_eq!(report.sections[0].chunks, 3);
/// ```
#[derive(Debug)]
pub struct ChunkSink<'a, W: Write> {
    writer: &'a mut StreamWriter<W>,
    kind: SectionKind,
    device: u32,
    /// The chunk being filled: `buf[..filled]`; `buf.len() >= chunk_size` once used.
    buf: Vec<u8>,
    filled: usize,
    chunk_size: usize,
    accepted: u64,
}

impl<W: Write> ChunkSink<'_, W> {
    /// Use chunks of `size` bytes, clamped to `1 ..=` [`super::MAX_CHUNK_LEN`]. Has no effect
    /// once a partial chunk is buffered.
    pub fn with_chunk_size(mut self, size: usize) -> Self {
        if self.filled == 0 {
            self.chunk_size = size.clamp(1, MAX_CHUNK_LEN);
        }
        self
    }

    /// The chunk size in use.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Bytes taken so far (written or buffered).
    pub fn bytes(&self) -> u64 {
        self.accepted
    }

    /// The free part of the current chunk, to read device data into directly; tell how much was
    /// filled with [`ChunkSink::commit`]. Never empty.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.buf.len() < self.chunk_size {
            self.buf.reserve_exact(self.chunk_size - self.buf.len());
            self.buf.resize(self.chunk_size, 0);
        }
        &mut self.buf[self.filled..self.chunk_size]
    }

    /// Count the first `n` bytes of [`ChunkSink::spare`] as filled, writing the chunk when it is
    /// full.
    pub fn commit(&mut self, n: usize) -> Result<(), StreamError> {
        if n > self.chunk_size - self.filled || self.filled + n > self.buf.len() {
            return Err(self.writer.refuse(format!(
                "commit of {n} bytes, but only {} bytes of the chunk were free",
                self.buf.len().min(self.chunk_size).saturating_sub(self.filled)
            )));
        }
        self.filled += n;
        self.accepted += n as u64;
        if self.filled == self.chunk_size {
            self.emit()?;
        }
        Ok(())
    }

    /// Write the last, partial chunk (if any); returns the bytes taken in total.
    pub fn finish(mut self) -> Result<u64, StreamError> {
        self.emit()?;
        Ok(self.accepted)
    }

    /// Read `src` to its end into chunks, reading straight into the chunk buffer; returns the
    /// bytes read. The last, partial chunk stays buffered until [`ChunkSink::finish`].
    pub fn copy_from<R: Read + ?Sized>(&mut self, src: &mut R) -> Result<u64, StreamError> {
        let mut total = 0u64;
        loop {
            let spare = self.spare();
            match src.read(spare) {
                Ok(0) => return Ok(total),
                Ok(n) => {
                    self.commit(n)?;
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamError::new(self.writer.offset, StreamErrorKind::Io(e))),
            }
        }
    }

    fn emit(&mut self) -> Result<(), StreamError> {
        if self.filled == 0 {
            return Ok(());
        }
        let n = std::mem::take(&mut self.filled);
        self.writer
            .write_record(self.kind.code(), 0, self.device, &self.buf[..n])
    }
}

impl<W: Write> Write for ChunkSink<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.filled == 0 && data.len() >= self.chunk_size {
            // A whole chunk straight from the caller's buffer: no copy.
            let chunk = &data[..self.chunk_size];
            self.writer
                .write_record(self.kind.code(), 0, self.device, chunk)
                .map_err(StreamError::into_io)?;
            self.accepted += chunk.len() as u64;
            return Ok(chunk.len());
        }
        let spare = self.spare();
        let n = data.len().min(spare.len());
        spare[..n].copy_from_slice(&data[..n]);
        self.commit(n).map_err(StreamError::into_io)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit().map_err(StreamError::into_io)?;
        self.writer.out.flush()
    }
}

impl<W: Write> Drop for ChunkSink<'_, W> {
    fn drop(&mut self) {
        if let Err(e) = self.emit()
            && self.writer.broken.is_none()
        {
            self.writer.broken = Some(format!("a dropped chunk sink could not write its last chunk: {e}"));
        }
        self.writer.spare_buf = std::mem::take(&mut self.buf);
    }
}
