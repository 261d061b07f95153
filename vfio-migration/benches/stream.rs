//! Device-state stream throughput: 1 GiB written and read through memory, against a plain copy
//! of the same bytes measured in the same run.
//!
//! Nothing holds 1 GiB. The device state comes from a [`CycleSource`] (a 4 MiB pattern served
//! round and round, as a device's data_fd would give it), and everything written goes into a
//! [`RingSink`] (a 64 MiB ring, larger than the last-level cache, standing in for a socket or a
//! file). The stream read side is fed by a [`StreamGen`], which produces a valid 1 GiB stream on
//! the fly (1024 chunks of 1 MiB, checksums combined from precomputed payload CRCs).
//!
//! - write: device state -> [`ChunkSink::copy_from`] -> [`StreamWriter`] -> ring; plain: device
//!   state -> 1 MiB buffer -> ring (the same buffering as the stream's 1 MiB chunks, so the ratio
//!   is the cost of framing and checksums). `std::io::copy`, whose 8 KiB buffer stays in L1, is
//!   printed too, for context.
//! - read: generated stream -> [`StreamReader`] -> [`PayloadReader`] (`BufRead`) -> ring; plain:
//!   the same generated stream bytes -> 1 MiB buffer -> ring.
//!
//! Run with `cargo bench -p vfio-migration --bench stream` (`-- ratio` skips the criterion
//! groups); it ends with lines such as
//! `stream write: X GB/s, plain copy: Y GB/s, ratio Z`. Under `cargo test` (no `--bench`) it
//! streams 16 MiB once as a smoke test.

use std::hint::black_box;
use std::io::{self, BufRead, Read, Write};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use vfio_migration::device::DeviceIdentity;
use vfio_migration::state::MigrationFlags;
use vfio_migration::stream::{self, ChunkSink, Header, PayloadReader, SectionKind, StreamReader, StreamWriter};

const GIB: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;
const PATTERN: usize = 4 << 20;
const RING: usize = 64 << 20;

fn pattern() -> Vec<u8> {
    // Cheap pseudo-random bytes (xorshift), so nothing is trivially compressible or constant.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..PATTERN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `total` bytes of device state, served from a pattern round and round.
struct CycleSource<'a> {
    pattern: &'a [u8],
    pos: usize,
    left: u64,
}

impl<'a> CycleSource<'a> {
    fn new(pattern: &'a [u8], total: u64) -> Self {
        Self {
            pattern,
            pos: 0,
            left: total,
        }
    }
}

impl Read for CycleSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(self.pattern.len() - self.pos)
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&self.pattern[self.pos..self.pos + n]);
        self.pos = (self.pos + n) % self.pattern.len();
        self.left -= n as u64;
        Ok(n)
    }
}

/// Copies everything written into a ring buffer and counts it.
struct RingSink {
    ring: Vec<u8>,
    pos: usize,
    total: u64,
}

impl RingSink {
    fn new() -> Self {
        Self {
            ring: vec![0; RING],
            pos: 0,
            total: 0,
        }
    }
}

impl Write for RingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.ring.len() - self.pos);
        self.ring[self.pos..self.pos + n].copy_from_slice(&buf[..n]);
        self.pos = (self.pos + n) % self.ring.len();
        self.total += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn header() -> Header {
    Header::single(
        DeviceIdentity::Emulated {
            params: "size=1073741824".into(),
        },
        MigrationFlags::STOP_COPY,
    )
}

/// A valid stream of `total` bytes of stop-copy state in 1 MiB chunks, generated as it is read.
struct StreamGen<'a> {
    pattern: &'a [u8],
    /// CRC32C of each 1 MiB slice of the pattern.
    slice_crcs: Vec<u32>,
    chunks: u64,
    next_chunk: u64,
    /// Bytes of the current piece (header, record header, end marker) not yet served.
    small: Vec<u8>,
    small_pos: usize,
    /// The current chunk's payload: pattern slice and bytes already served.
    payload: Option<(usize, usize)>,
    ended: bool,
}

impl<'a> StreamGen<'a> {
    fn new(pattern: &'a [u8], slice_crcs: &[u32], total: u64) -> Self {
        let start = StreamWriter::new(Vec::new(), header())
            .expect("header")
            .finish()
            .expect("finish");
        // The header is everything but the 64-byte end marker of the empty stream.
        let header_len = start.len() - 64;
        Self {
            pattern,
            slice_crcs: slice_crcs.to_vec(),
            chunks: total / CHUNK as u64,
            next_chunk: 0,
            small: start[..header_len].to_vec(),
            small_pos: 0,
            payload: None,
            ended: false,
        }
    }

    fn record(kind: u16, device: u32, seq: u64, len: u32, payload_crc: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&device.to_le_bytes());
        h.extend_from_slice(&seq.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        let crc = stream::crc32c_combine(stream::crc32c(&h), payload_crc, u64::from(len));
        h.extend_from_slice(&crc.to_le_bytes());
        h
    }

    /// Prepare the next piece; false at the end.
    fn advance(&mut self) -> bool {
        self.small.clear();
        self.small_pos = 0;
        if self.next_chunk < self.chunks {
            let slice = (self.next_chunk as usize) % (self.pattern.len() / CHUNK);
            let crc = self.slice_crcs[slice];
            self.small = Self::record(2, 0, self.next_chunk, CHUNK as u32, crc);
            self.payload = Some((slice * CHUNK, 0));
            self.next_chunk += 1;
            true
        } else if !self.ended {
            self.ended = true;
            let total_bytes = self.chunks * CHUNK as u64;
            let mut p = Vec::new();
            p.extend_from_slice(&self.chunks.to_le_bytes());
            p.extend_from_slice(&total_bytes.to_le_bytes());
            p.extend_from_slice(&1u32.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            p.extend_from_slice(&self.chunks.to_le_bytes());
            p.extend_from_slice(&total_bytes.to_le_bytes());
            self.small = Self::record(0xff, u32::MAX, 0, p.len() as u32, stream::crc32c(&p));
            self.small.extend_from_slice(&p);
            true
        } else {
            false
        }
    }
}

impl Read for StreamGen<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.small_pos < self.small.len() {
                let n = buf.len().min(self.small.len() - self.small_pos);
                buf[..n].copy_from_slice(&self.small[self.small_pos..self.small_pos + n]);
                self.small_pos += n;
                return Ok(n);
            }
            if let Some((start, done)) = self.payload {
                if done < CHUNK {
                    let n = buf.len().min(CHUNK - done);
                    buf[..n].copy_from_slice(&self.pattern[start + done..start + done + n]);
                    self.payload = Some((start, done + n));
                    return Ok(n);
                }
                self.payload = None;
            }
            if !self.advance() {
                return Ok(0);
            }
        }
    }
}

/// The plain copy: read into one 1 MiB buffer, write it out.
fn plain_copy(src: &mut impl Read, dst: &mut impl Write, buf: &mut [u8]) -> u64 {
    let mut total = 0;
    loop {
        let n = src.read(buf).expect("read");
        if n == 0 {
            return total;
        }
        dst.write_all(&buf[..n]).expect("write");
        total += n as u64;
    }
}

struct Fixture {
    pattern: Vec<u8>,
    slice_crcs: Vec<u32>,
    total: u64,
}

impl Fixture {
    fn new(total: u64) -> Self {
        let pattern = pattern();
        let slice_crcs = pattern.chunks(CHUNK).map(stream::crc32c).collect();
        Self {
            pattern,
            slice_crcs,
            total,
        }
    }

    /// Bytes of the generated stream: header, records, end marker.
    fn stream_len(&self) -> u64 {
        let mut g = StreamGen::new(&self.pattern, &self.slice_crcs, 0);
        let mut empty = Vec::new();
        g.read_to_end(&mut empty).expect("generate");
        empty.len() as u64 + (self.total / CHUNK as u64) * (24 + CHUNK as u64)
    }

    /// CRC32C of the same bytes, nothing else (for context).
    fn crc_only(&self) -> u64 {
        let mut crc = 0;
        let mut n = 0;
        while n < self.total {
            for slice in self.pattern.chunks(CHUNK) {
                crc ^= stream::crc32c(slice);
                n += slice.len() as u64;
            }
        }
        black_box(crc);
        n
    }

    fn plain_write(&self, sink: &mut RingSink, buf: &mut [u8]) -> u64 {
        plain_copy(&mut CycleSource::new(&self.pattern, self.total), sink, buf)
    }

    fn stream_write(&self, sink: &mut RingSink) -> u64 {
        let mut w = StreamWriter::new(sink, header()).expect("header");
        let mut chunks: ChunkSink<'_, _> = w.chunk_sink(SectionKind::StopCopy, 0).expect("sink");
        let n = chunks
            .copy_from(&mut CycleSource::new(&self.pattern, self.total))
            .expect("copy");
        chunks.finish().expect("last chunk");
        w.finish().expect("end marker");
        n
    }

    fn plain_read(&self, sink: &mut RingSink, buf: &mut [u8]) -> u64 {
        plain_copy(
            &mut StreamGen::new(&self.pattern, &self.slice_crcs, self.total),
            sink,
            buf,
        )
    }

    fn stream_read(&self, sink: &mut RingSink) -> u64 {
        let mut r = StreamReader::new(StreamGen::new(&self.pattern, &self.slice_crcs, self.total)).expect("header");
        let mut state: PayloadReader<'_, _> = r.device_payload(0);
        let mut total = 0u64;
        loop {
            let avail = state.fill_buf().expect("valid stream");
            if avail.is_empty() {
                break;
            }
            sink.write_all(avail).expect("write");
            let n = avail.len();
            state.consume(n);
            total += n as u64;
        }
        assert!(state.is_finished());
        total
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let fx = Fixture::new(if bench_mode { GIB } else { 16 << 20 });
    let mut sink = RingSink::new();
    let mut buf = vec![0u8; CHUNK];

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("stream_1GiB");
        g.throughput(Throughput::Bytes(fx.total));
        g.bench_function("plain_copy_write", |b| b.iter(|| fx.plain_write(&mut sink, &mut buf)));
        g.bench_function("stream_write", |b| b.iter(|| fx.stream_write(&mut sink)));
        g.bench_function("plain_copy_read", |b| b.iter(|| fx.plain_read(&mut sink, &mut buf)));
        g.bench_function("stream_read", |b| b.iter(|| fx.stream_read(&mut sink)));
        g.finish();
    }
    c.final_summary();

    // The ratio lines: the variants interleaved, so they see the same machine load; best of N.
    // (`cargo bench --bench stream -- ratio` skips the criterion groups and prints only these.)
    let reps = if bench_mode { 7 } else { 1 };
    let total = fx.total;
    let stream_len = fx.stream_len();
    let mut t = [Duration::MAX; 6];
    for _ in 0..reps {
        let want = [total, total, stream_len, total, total, total];
        for i in 0..want.len() {
            let start = Instant::now();
            let n = black_box(match i {
                0 => fx.plain_write(&mut sink, &mut buf),
                1 => fx.stream_write(&mut sink),
                2 => fx.plain_read(&mut sink, &mut buf),
                3 => fx.stream_read(&mut sink),
                4 => fx.crc_only(),
                _ => io::copy(&mut CycleSource::new(&fx.pattern, total), &mut sink).expect("copy"),
            });
            t[i] = t[i].min(start.elapsed());
            assert_eq!(n, want[i], "moved the wrong number of bytes");
        }
    }
    let [pw, sw, pr, sr, crc, iocopy] = t;
    println!(
        "streamed {} MiB of device state per run ({} chunks of 1 MiB), best of {reps}; \
         for context: CRC32C ({}) alone {:.2} GB/s, std::io::copy (8 KiB buffer) {:.2} GB/s",
        total >> 20,
        total / CHUNK as u64,
        stream::CRC32C_IMPLEMENTATION,
        gbps(total, crc),
        gbps(total, iocopy)
    );
    println!(
        "stream write: {:.2} GB/s, plain copy: {:.2} GB/s, ratio {:.2} (against std::io::copy: {:.2})",
        gbps(total, sw),
        gbps(total, pw),
        pw.as_secs_f64() / sw.as_secs_f64(),
        iocopy.as_secs_f64() / sw.as_secs_f64()
    );
    // The plain copy of the read side moves the whole stream (framing included); its rate is
    // counted in stream bytes, and the ratio compares device-state bytes per second delivered by
    // the reader with stream bytes per second moved by the plain copy.
    println!(
        "stream read: {:.2} GB/s, plain copy: {:.2} GB/s, ratio {:.2}",
        gbps(total, sr),
        gbps(stream_len, pr),
        (total as f64 / sr.as_secs_f64()) / (stream_len as f64 / pr.as_secs_f64())
    );
}
