//! Tests of the stream format: round trips, corruption of every kind, limits.

use std::io::{self, Read, Write};

use proptest::prelude::*;

use super::*;
use crate::device::DeviceIdentity;
use crate::state::MigrationFlags as F;

fn pci() -> DeviceIdentity {
    DeviceIdentity::Pci {
        vendor: 0x15b3,
        device: 0x101e,
        subsystem_vendor: 0x15b3,
        subsystem_device: 0x0001,
    }
}

fn two_devices() -> Header {
    Header::new(vec![
        DeviceEntry {
            identity: pci(),
            flags: F::STOP_COPY | F::PRE_COPY | F::P2P,
        },
        DeviceEntry {
            identity: DeviceIdentity::Mdev {
                mdev_type: "mtty-2".into(),
            },
            flags: F::STOP_COPY,
        },
    ])
}

/// One record as the tests describe it.
type Rec = (SectionKind, u32, Vec<u8>);

fn write_stream(header: Header, recs: &[Rec]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), header).unwrap();
    for (kind, dev, payload) in recs {
        w.write_chunk(*kind, *dev, payload).unwrap();
    }
    w.finish().unwrap()
}

/// Read a whole stream, collecting the records.
/// A record as read: kind, device, sequence number, payload.
type ReadRec = (SectionKind, u32, u64, Vec<u8>);

fn read_all(bytes: &[u8]) -> Result<Vec<ReadRec>, StreamError> {
    let mut r = StreamReader::new(bytes)?;
    let mut out = Vec::new();
    while let Some(c) = r.next_chunk()? {
        out.push((c.kind, c.device_index, c.sequence, c.payload.to_vec()));
    }
    assert!(r.is_finished());
    Ok(out)
}

/// The record offsets (record headers and the end marker) of a valid stream.
fn record_offsets(bytes: &[u8]) -> Vec<(u64, usize)> {
    let mut r = StreamReader::new(bytes).unwrap();
    let mut v = Vec::new();
    while let Some(c) = r.next_record().unwrap() {
        v.push((c.offset, RECORD_HEADER_LEN + c.payload.len()));
    }
    let end = r.end_summary().unwrap();
    v.push((end.offset, (end.stream_len - end.offset) as usize));
    v
}

fn sample_records() -> Vec<Rec> {
    vec![
        (SectionKind::PreCopy, 0, b"pre-0".to_vec()),
        (SectionKind::StopCopy, 1, b"mtty state".to_vec()),
        (SectionKind::PreCopy, 0, vec![]),
        (SectionKind::Config, 0, b"config space".to_vec()),
        (SectionKind::StopCopy, 0, vec![0xa5; 33]),
        (SectionKind::Config, 1, b"c1".to_vec()),
        (SectionKind::StopCopy, 0, b"tail".to_vec()),
    ]
}

fn sample() -> Vec<u8> {
    write_stream(two_devices(), &sample_records())
}

fn err_kind(r: Result<impl Sized, StreamError>) -> StreamError {
    match r {
        Ok(_) => panic!("the stream was accepted"),
        Err(e) => e,
    }
}

#[test]
fn round_trip_keeps_every_record_and_totals() {
    let bytes = sample();
    assert_eq!(&bytes[..8], b"VFIOMIGS");
    let got = read_all(&bytes).unwrap();
    let want = sample_records();
    assert_eq!(got.len(), want.len());
    let mut seqs = [0u64; 2];
    for ((k, d, s, p), (wk, wd, wp)) in got.iter().zip(&want) {
        assert_eq!((k, d, p), (wk, wd, wp));
        assert_eq!(*s, seqs[*d as usize]);
        seqs[*d as usize] += 1;
    }
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    assert_eq!(r.header(), &two_devices());
    let end = r.skip_to_end().unwrap().clone();
    assert_eq!(end.total_chunks, 7);
    assert_eq!(end.total_bytes, want.iter().map(|r| r.2.len() as u64).sum::<u64>());
    assert_eq!(end.devices[0].chunks, 5);
    assert_eq!(end.devices[1].chunks, 2);
    assert_eq!(end.devices[1].bytes, 12);
    assert_eq!(end.stream_len, bytes.len() as u64);
    assert_eq!(r.offset(), bytes.len() as u64);
}

#[test]
fn every_identity_kind_round_trips() {
    let ids = [
        pci(),
        DeviceIdentity::Mdev {
            mdev_type: "i915-GVTg_V5_4".into(),
        },
        DeviceIdentity::Emulated {
            params: "size=8388608,block=4096".into(),
        },
        DeviceIdentity::Unknown,
    ];
    let header = Header::new(
        ids.iter()
            .map(|id| DeviceEntry {
                identity: id.clone(),
                flags: F::from_bits(0x101),
            })
            .collect(),
    )
    .with_writer("another writer 9.9");
    let bytes = write_stream(header.clone(), &[]);
    let r = StreamReader::new(&bytes[..]).unwrap();
    assert_eq!(r.header(), &header);
    assert_eq!(r.header().devices[0].flags.unknown_bits(), 0x100);
}

#[test]
fn payload_reader_concatenates_one_device_and_checks_the_end() {
    let bytes = sample();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut others = Vec::new();
    let mut state = Vec::new();
    let mut p = r.device_payload(0).on_other(|c| {
        others.push((c.kind, c.device_index, c.payload.to_vec()));
        Ok(())
    });
    io::copy(&mut p, &mut state).unwrap();
    assert!(p.is_finished());
    assert_eq!(p.state_bytes(), state.len() as u64);
    drop(p);
    let mut want = b"pre-0".to_vec();
    want.extend_from_slice(&[0xa5; 33]);
    want.extend_from_slice(b"tail");
    assert_eq!(state, want);
    assert_eq!(
        others,
        vec![
            (SectionKind::StopCopy, 1, b"mtty state".to_vec()),
            (SectionKind::Config, 0, b"config space".to_vec()),
            (SectionKind::Config, 1, b"c1".to_vec()),
        ]
    );
    assert!(r.is_finished());

    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut s = String::new();
    r.device_payload(1).read_to_string(&mut s).unwrap();
    assert_eq!(s, "mtty state");

    // An error from the callback stops the read.
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let e = io::copy(
        &mut r.device_payload(0).on_other(|_| Err(io::Error::other("no thanks"))),
        &mut io::sink(),
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "no thanks");
}

#[test]
fn chunk_sink_cuts_bytes_into_chunks() {
    let header = Header::single(DeviceIdentity::Unknown, F::STOP_COPY | F::PRE_COPY);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut w = StreamWriter::new(Vec::new(), header).unwrap();
    // io::copy writes in pieces; the sink buffers them into 1000-byte chunks.
    let mut sink = w.chunk_sink(SectionKind::PreCopy, 0).unwrap().with_chunk_size(1000);
    assert_eq!(sink.chunk_size(), 1000);
    io::copy(&mut &data[..2500], &mut sink).unwrap();
    assert_eq!(sink.finish().unwrap(), 2500);
    // Large writes go straight through, whole chunks at a time.
    let mut sink = w.chunk_sink(SectionKind::StopCopy, 0).unwrap().with_chunk_size(1000);
    sink.write_all(&data[2500..6000]).unwrap();
    // Zero-copy filling, and copy_from.
    let spare = sink.spare();
    assert_eq!(spare.len(), 500);
    spare[..100].copy_from_slice(&data[6000..6100]);
    sink.commit(100).unwrap();
    assert!(sink.commit(401).is_err(), "only 400 bytes were free");
    assert_eq!(sink.copy_from(&mut &data[6100..]).unwrap(), 3900);
    assert_eq!(sink.bytes(), 7500);
    // Dropping the sink writes its last partial chunk.
    drop(sink);
    let bytes = w.finish().unwrap();
    let recs = read_all(&bytes).unwrap();
    let sizes: Vec<usize> = recs.iter().map(|r| r.3.len()).collect();
    assert_eq!(
        sizes,
        vec![1000, 1000, 500, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 500]
    );
    assert_eq!(recs[..3].iter().filter(|r| r.0 == SectionKind::PreCopy).count(), 3);
    let all: Vec<u8> = recs.iter().flat_map(|r| r.3.clone()).collect();
    assert_eq!(all, data);
}

#[test]
fn chunk_sink_default_and_clamped_sizes() {
    let mut w = StreamWriter::new(io::sink(), Header::single(DeviceIdentity::Unknown, F::STOP_COPY)).unwrap();
    let sink = w.chunk_sink(SectionKind::StopCopy, 0).unwrap();
    assert_eq!(sink.chunk_size(), DEFAULT_CHUNK_SIZE);
    let sink = sink.with_chunk_size(0);
    assert_eq!(sink.chunk_size(), 1);
    let sink = sink.with_chunk_size(usize::MAX);
    assert_eq!(sink.chunk_size(), MAX_CHUNK_LEN);
    drop(sink);
    assert!(w.chunk_sink(SectionKind::StopCopy, 1).is_err());
    assert!(w.chunk_sink(SectionKind::PreCopy, 0).is_err(), "no PRE_COPY flag");
}

/// A writer that fails after `left` bytes.
#[derive(Debug)]
struct FailingWriter {
    left: usize,
}

impl Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("disk full"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_write_poisons_the_writer() {
    let header = Header::single(DeviceIdentity::Unknown, F::STOP_COPY);
    let mut w = StreamWriter::new(FailingWriter { left: 100 }, header.clone()).unwrap();
    let e = w.write_chunk(SectionKind::StopCopy, 0, &[0; 200]).unwrap_err();
    assert!(matches!(e.kind, StreamErrorKind::Io(_)), "{e}");
    assert!(w.write_chunk(SectionKind::StopCopy, 0, b"x").is_err());
    assert!(matches!(
        w.finish().unwrap_err().kind,
        StreamErrorKind::InvalidRequest(_)
    ));

    // A sink dropped with a chunk it cannot write makes finish() refuse.
    let mut w = StreamWriter::new(FailingWriter { left: 90 }, header).unwrap();
    let mut sink = w.chunk_sink(SectionKind::StopCopy, 0).unwrap();
    sink.write_all(&[1; 100]).unwrap();
    drop(sink);
    assert!(w.finish().is_err());
}

#[test]
fn the_writer_refuses_invalid_streams() {
    let mut w = StreamWriter::new(Vec::new(), two_devices()).unwrap();
    let e = w.write_chunk(SectionKind::StopCopy, 2, b"x").unwrap_err();
    assert!(matches!(
        e.kind,
        StreamErrorKind::BadDeviceIndex { device: 2, count: 2 }
    ));
    let e = w.write_chunk(SectionKind::PreCopy, 1, b"x").unwrap_err();
    assert!(matches!(e.kind, StreamErrorKind::PreCopyNotSupported { device: 1, .. }));
    w.write_chunk(SectionKind::StopCopy, 0, b"x").unwrap();
    let e = w.write_chunk(SectionKind::PreCopy, 0, b"x").unwrap_err();
    assert!(matches!(e.kind, StreamErrorKind::PreCopyAfterStopCopy(0)));
    let e = w.write_chunk(SectionKind::Unknown(9), 0, b"x").unwrap_err();
    assert!(matches!(e.kind, StreamErrorKind::InvalidRequest(_)));
    let big = vec![0u8; MAX_CHUNK_LEN + 1];
    let e = w.write_chunk(SectionKind::StopCopy, 0, &big).unwrap_err();
    assert!(matches!(e.kind, StreamErrorKind::TooLarge { .. }));
    // Refusals do not break the writer.
    let bytes = w.finish().unwrap();
    assert_eq!(read_all(&bytes).unwrap().len(), 1);

    for bad in [
        Header::new(vec![]),
        Header::single(DeviceIdentity::Unknown, F::P2P),
        Header::single(
            DeviceIdentity::Emulated {
                params: "x".repeat(MAX_NAME_LEN + 1),
            },
            F::STOP_COPY,
        ),
        Header::single(DeviceIdentity::Unknown, F::STOP_COPY).with_writer("w".repeat(MAX_NAME_LEN + 1)),
        Header::new(vec![
            DeviceEntry {
                identity: DeviceIdentity::Unknown,
                flags: F::STOP_COPY
            };
            MAX_DEVICES + 1
        ]),
    ] {
        let e = StreamWriter::new(Vec::new(), bad).unwrap_err();
        assert!(matches!(e.kind, StreamErrorKind::InvalidRequest(_)), "{e}");
    }
    // The largest header fits under the cap.
    let biggest = Header::new(vec![
        DeviceEntry {
            identity: DeviceIdentity::Mdev {
                mdev_type: "m".repeat(MAX_NAME_LEN)
            },
            flags: F::STOP_COPY
        };
        MAX_DEVICES
    ])
    .with_writer("w".repeat(MAX_NAME_LEN));
    let bytes = write_stream(biggest.clone(), &[]);
    assert!(bytes.len() < MAX_HEADER_LEN);
    assert_eq!(StreamReader::new(&bytes[..]).unwrap().header(), &biggest);
}

#[test]
fn reordered_duplicated_and_lost_records_are_refused() {
    let bytes = sample();
    let recs = record_offsets(&bytes);
    let header_end = recs[0].0 as usize;
    let piece = |i: usize| &bytes[recs[i].0 as usize..recs[i].0 as usize + recs[i].1];
    let rebuild = |order: &[usize]| {
        let mut v = bytes[..header_end].to_vec();
        for &i in order {
            v.extend_from_slice(piece(i));
        }
        v
    };
    let end = recs.len() - 1; // the end marker
    let all: Vec<usize> = (0..=end).collect();
    assert_eq!(rebuild(&all), bytes);

    // Swapping two records of device 0 (indexes 0 and 2).
    let e = err_kind(read_all(&rebuild(&[2, 1, 0, 3, 4, 5, 6, end])));
    assert!(
        matches!(
            e.kind,
            StreamErrorKind::Sequence {
                device: 0,
                expected: 0,
                found: 1
            }
        ),
        "{e}"
    );
    assert_eq!(e.offset, header_end as u64 + 8);
    // Duplicating one.
    let e = err_kind(read_all(&rebuild(&[0, 1, 2, 2, 3, 4, 5, 6, end])));
    assert!(
        matches!(
            e.kind,
            StreamErrorKind::Sequence {
                device: 0,
                expected: 2,
                found: 1
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("duplicated or out of order"), "{e}");
    // Losing one in the middle.
    let e = err_kind(read_all(&rebuild(&[0, 1, 3, 4, 5, 6, end])));
    assert!(
        matches!(
            e.kind,
            StreamErrorKind::Sequence {
                device: 0,
                expected: 1,
                found: 2
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("missing"), "{e}");
    // Losing the last record of a device: only the end marker's totals tell.
    let e = err_kind(read_all(&rebuild(&[0, 1, 2, 3, 4, 5, end])));
    assert!(matches!(e.kind, StreamErrorKind::TotalsMismatch { .. }), "{e}");
    let e = err_kind(read_all(&rebuild(&[0, 1, 2, 3, 4, 6, end])));
    assert!(matches!(e.kind, StreamErrorKind::TotalsMismatch { .. }), "{e}");
    // Losing the end marker.
    let e = err_kind(read_all(&rebuild(&[0, 1, 2, 3, 4, 5, 6])));
    assert!(e.is_truncation(), "{e}");
    assert_eq!(e.offset, recs[end].0);
    // Two end markers: data after the end.
    let e = err_kind(read_all(&rebuild(&[0, 1, 2, 3, 4, 5, 6, end, end])));
    assert!(matches!(e.kind, StreamErrorKind::TrailingData), "{e}");
    assert_eq!(e.offset, bytes.len() as u64);
    // Records of different devices may interleave differently: that is not an error.
    assert!(read_all(&rebuild(&[1, 0, 2, 3, 4, 5, 6, end])).is_ok());
}

#[test]
fn trailing_data_can_be_allowed() {
    let mut bytes = sample();
    bytes.extend_from_slice(b"more");
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.allow_trailing_data(true);
    r.skip_to_end().unwrap();
    let mut rest = Vec::new();
    r.into_inner().read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"more");
}

#[test]
fn huge_lengths_are_refused_before_allocating() {
    let good = write_stream(Header::single(DeviceIdentity::Unknown, F::STOP_COPY), &[]);
    let header_len = StreamReader::new(&good[..]).unwrap().header_len() as usize;
    for len in [MAX_CHUNK_LEN as u32 + 1, u32::MAX] {
        let mut bytes = good[..header_len].to_vec();
        bytes.extend_from_slice(&record_header(KIND_STOP_COPY, 0, 0, 0, &[])[..16]);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        let e = r.next_chunk().unwrap_err();
        assert!(
            matches!(e.kind, StreamErrorKind::TooLarge { len: l, cap, .. } if l == len as u64 && cap == MAX_CHUNK_LEN as u64),
            "{e}"
        );
        assert_eq!(e.offset, header_len as u64 + 16);
        assert_eq!(r.buffer_capacity(), 0, "nothing was allocated");
        // The reader refuses to go on.
        assert!(matches!(
            r.next_chunk().unwrap_err().kind,
            StreamErrorKind::AlreadyFailed(_)
        ));
    }
    // A length within the cap on a short stream allocates only what arrives.
    let mut bytes = good[..header_len].to_vec();
    bytes.extend_from_slice(&record_header(KIND_STOP_COPY, 0, 0, 0, &[])[..16]);
    bytes.extend_from_slice(&(MAX_CHUNK_LEN as u32).to_le_bytes());
    bytes.extend_from_slice(&[0; 4 + 100]);
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let e = r.next_chunk().unwrap_err();
    assert!(e.is_truncation(), "{e}");
    assert_eq!(e.offset, bytes.len() as u64);
    assert!(r.buffer_capacity() <= 64 * 1024, "{}", r.buffer_capacity());
    // A huge header length.
    let mut bytes = good.clone();
    bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = StreamReader::new(&bytes[..]).unwrap_err();
    assert!(matches!(e.kind, StreamErrorKind::TooLarge { .. }), "{e}");
    assert_eq!(e.offset, 12);
}

#[test]
fn the_buffer_is_reused_and_stays_under_the_cap() {
    let header = Header::single(DeviceIdentity::Unknown, F::STOP_COPY);
    let big = vec![0x5au8; MAX_CHUNK_LEN];
    let mut w = StreamWriter::new(Vec::new(), header).unwrap();
    w.write_chunk(SectionKind::StopCopy, 0, &big[..1000]).unwrap();
    w.write_chunk(SectionKind::StopCopy, 0, &big).unwrap();
    w.write_chunk(SectionKind::StopCopy, 0, &big[..MAX_CHUNK_LEN - 1])
        .unwrap();
    w.write_chunk(SectionKind::StopCopy, 0, &big).unwrap();
    let bytes = w.finish().unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut n = 0;
    while let Some(c) = r.next_chunk().unwrap() {
        assert!(c.payload.iter().all(|&b| b == 0x5a));
        n += 1;
    }
    assert_eq!(n, 4);
    assert!(r.buffer_capacity() <= MAX_CHUNK_LEN, "{}", r.buffer_capacity());
    assert!(r.buffer_capacity() >= MAX_CHUNK_LEN - 1);
}

#[test]
fn unknown_optional_sections_are_skipped_mandatory_refused() {
    let mut w = StreamWriter::new(Vec::new(), two_devices()).unwrap();
    w.write_chunk(SectionKind::StopCopy, 1, b"a").unwrap();
    w.write_record(0x1234, FLAG_OPTIONAL, 1, b"from the future").unwrap();
    w.write_chunk(SectionKind::StopCopy, 1, b"b").unwrap();
    let bytes = w.finish().unwrap();
    let recs = read_all(&bytes).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(
        (recs[1].2, &recs[1].3[..]),
        (2, &b"b"[..]),
        "the skipped section used sequence 1"
    );
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut s = Vec::new();
    r.device_payload(1).read_to_end(&mut s).unwrap();
    assert_eq!(s, b"ab");
    assert_eq!(r.skipped_sections(), 1);
    let report = inspect(&bytes[..]).unwrap();
    let unknown = report.sections.iter().find(|s| s.code == 0x1234).unwrap();
    assert!(unknown.skipped);
    assert_eq!(unknown.bytes, 15);
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.next_record().unwrap();
    assert_eq!(r.next_record().unwrap().unwrap().kind, SectionKind::Unknown(0x1234));

    let mut w = StreamWriter::new(Vec::new(), two_devices()).unwrap();
    w.write_record(0x1234, 0, 1, b"must understand").unwrap();
    let bytes = w.finish().unwrap();
    let e = err_kind(read_all(&bytes));
    assert!(
        matches!(e.kind, StreamErrorKind::UnknownMandatorySection(0x1234)),
        "{e}"
    );
    assert!(inspect(&bytes[..]).is_err());

    // Reserved flag bits, and OPTIONAL on a defined kind, are refused.
    let mut w = StreamWriter::new(Vec::new(), two_devices()).unwrap();
    w.write_record(KIND_STOP_COPY, FLAG_OPTIONAL, 1, b"x").unwrap();
    let e = err_kind(read_all(&w.finish().unwrap()));
    assert!(matches!(e.kind, StreamErrorKind::BadFlags { .. }), "{e}");
    let w = StreamWriter::new(Vec::new(), two_devices()).unwrap();
    let mut w = w;
    assert!(w.write_record(0x1234, 2, 1, b"x").is_err());
}

#[test]
fn bad_magic_version_and_checksums_name_the_offset() {
    let bytes = sample();
    let mut b = bytes.clone();
    b[0] = b'X';
    let e = err_kind(read_all(&b));
    assert!(matches!(e.kind, StreamErrorKind::BadMagic { .. }));
    assert_eq!(e.offset, 0);
    let mut b = bytes.clone();
    b[8] = 2;
    let e = err_kind(read_all(&b));
    assert!(matches!(e.kind, StreamErrorKind::UnsupportedVersion(2)));
    assert_eq!(e.offset, 8);
    let mut b = bytes.clone();
    b[20] ^= 1;
    let e = err_kind(read_all(&b));
    assert!(matches!(e.kind, StreamErrorKind::HeaderChecksum { .. }), "{e}");
    let recs = record_offsets(&bytes);
    let (off, _) = recs[3];
    let mut b = bytes.clone();
    b[off as usize + RECORD_HEADER_LEN + 2] ^= 0x80;
    let e = err_kind(read_all(&b));
    assert!(matches!(e.kind, StreamErrorKind::ChunkChecksum { .. }), "{e}");
    assert_eq!(e.offset, off);
    assert!(
        e.to_string()
            .starts_with(&format!("device-state stream, byte offset {off}: checksum mismatch"))
    );
    assert!(e.message().starts_with("checksum mismatch"));
    // A flipped header field is caught by the checksum too.
    let mut b = bytes.clone();
    b[off as usize + 8] ^= 1;
    let e = err_kind(read_all(&b));
    assert!(matches!(e.kind, StreamErrorKind::ChunkChecksum { .. }), "{e}");
}

#[test]
fn io_errors_carry_the_stream_error() {
    let e = StreamError::new(42, StreamErrorKind::TrailingData);
    let io = e.into_io();
    assert_eq!(io.kind(), io::ErrorKind::InvalidData);
    assert!(io.to_string().contains("byte offset 42"), "{io}");
    assert_eq!(StreamError::from_io(&io).unwrap().offset, 42);
    let back = StreamError::try_from_io(io).unwrap();
    assert!(matches!(back.kind, StreamErrorKind::TrailingData));
    let plain = io::Error::other("x");
    assert!(StreamError::from_io(&plain).is_none());
    assert_eq!(StreamError::try_from_io(plain).unwrap_err().to_string(), "x");
}

#[test]
fn compatibility_is_checked_on_the_header() {
    let bytes = sample();
    let r = StreamReader::new(&bytes[..]).unwrap();
    let h = r.header();
    assert!(h.check_compatible(0, &pci(), F::STOP_COPY | F::PRE_COPY, false).is_ok());
    let other_pci = DeviceIdentity::Pci {
        vendor: 0x15b3,
        device: 0x101e,
        subsystem_vendor: 0x15b3,
        subsystem_device: 0x0002,
    };
    let e = h
        .check_compatible(0, &other_pci, F::STOP_COPY | F::PRE_COPY, false)
        .unwrap_err();
    assert!(e.to_string().contains("subsystem 15b3:0001"), "{e}");
    let e = h.check_compatible(0, &pci(), F::STOP_COPY | F::P2P, false).unwrap_err();
    assert_eq!(
        e,
        Mismatch::Flags {
            index: 0,
            stream: F::STOP_COPY | F::PRE_COPY | F::P2P,
            device: F::STOP_COPY | F::P2P,
            missing: F::PRE_COPY
        }
    );
    let mtty = DeviceIdentity::Mdev {
        mdev_type: "mtty-2".into(),
    };
    assert!(h.check_compatible(1, &mtty, F::STOP_COPY, false).is_ok());
    assert!(matches!(
        h.check_compatible(1, &mtty, F::P2P, false),
        Err(Mismatch::Flags { .. })
    ));
    assert!(matches!(
        h.check_compatible(1, &pci(), F::STOP_COPY, false),
        Err(Mismatch::Identity { .. })
    ));
    assert!(matches!(
        h.check_compatible(7, &mtty, F::STOP_COPY, false),
        Err(Mismatch::NoSuchDevice { index: 7, count: 2 })
    ));
    // An unknown identity on either side is refused unless forced; Unknown == Unknown too.
    let unknown = Header::single(DeviceIdentity::Unknown, F::STOP_COPY);
    for (h, dev) in [
        (&unknown, DeviceIdentity::Unknown),
        (&unknown, pci()),
        (h, DeviceIdentity::Unknown),
    ] {
        let e = h.check_compatible(0, &dev, F::KNOWN, false).unwrap_err();
        assert!(matches!(e, Mismatch::UnknownIdentity { index: 0, .. }), "{e}");
        assert!(e.to_string().contains("--force-unknown-identity"), "{e}");
        assert!(h.check_compatible(0, &dev, F::KNOWN, true).is_ok());
    }
    // Forcing never lets two known, different identities through.
    assert!(matches!(
        h.check_compatible(0, &other_pci, F::KNOWN, true),
        Err(Mismatch::Identity { .. })
    ));
}

#[test]
fn inspect_describes_a_valid_stream() {
    let bytes = sample();
    let rep = inspect(&bytes[..]).unwrap();
    let h = rep.header.as_ref().unwrap();
    assert_eq!(h.devices.len(), 2);
    assert_eq!(h.devices[0].identity_kind, "pci");
    assert_eq!(h.devices[1].flag_names, "stop-copy");
    assert_eq!(rep.chunks.len(), 7);
    assert_eq!(rep.checked_bytes, bytes.len() as u64);
    let kinds: Vec<(u32, &str, u64, u64)> = rep
        .sections
        .iter()
        .map(|s| (s.device_index, s.kind.as_str(), s.chunks, s.bytes))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, "pre-copy", 2, 5),
            (1, "stop-copy", 1, 10),
            (0, "config", 1, 12),
            (0, "stop-copy", 2, 37),
            (1, "config", 1, 2)
        ]
    );
    let end = rep.end.as_ref().unwrap();
    assert_eq!((end.total_chunks, end.stream_len), (7, bytes.len() as u64));
    let text = rep.to_string();
    assert!(text.contains("device 0: pci 15b3:101e subsystem 15b3:0001 (migration flags stop-copy+p2p+pre-copy)"));
    assert!(text.contains("device 0 stop-copy: 2 chunk(s), 37 bytes"), "{text}");
    assert!(text.contains("end marker at offset"), "{text}");
}

#[cfg(feature = "serde")]
#[test]
fn inspect_report_serializes_to_json() {
    let rep = inspect(&sample()[..]).unwrap();
    let v = serde_json::to_value(&rep).unwrap();
    assert_eq!(v["header"]["devices"][1]["identity"], "mdev mtty-2");
    assert_eq!(v["end"]["total_chunks"], 7);
    let f = inspect(&sample()[..50]).unwrap_err();
    let v = serde_json::json!({"valid": false, "error": f.message(), "offset": f.offset()});
    assert_eq!(v["offset"], 50);
}

/// Whether `bytes` is accepted by every way of reading it.
fn check_all_ways(bytes: &[u8]) -> [bool; 3] {
    let by_chunks = read_all(bytes).is_ok();
    let by_inspect = inspect(bytes).is_ok();
    let by_payload = StreamReader::new(bytes)
        .map_err(StreamError::into_io)
        .and_then(|mut r| io::copy(&mut r.device_payload(0), &mut io::sink()))
        .is_ok();
    [by_chunks, by_inspect, by_payload]
}

fn arb_stream() -> impl Strategy<Value = Vec<u8>> {
    let rec = (0u8..4, 0u32..2, prop::collection::vec(any::<u8>(), 0..24));
    (prop::collection::vec(rec, 0..6), any::<bool>()).prop_map(|(recs, precopy)| {
        let mut header = two_devices();
        if !precopy {
            header.devices[0].flags = F::STOP_COPY;
        }
        let mut w = StreamWriter::new(Vec::new(), header).unwrap();
        for (k, dev, payload) in recs {
            let kind = match k {
                0 => SectionKind::PreCopy,
                1 | 2 => SectionKind::StopCopy,
                _ => SectionKind::Config,
            };
            // Records the writer refuses (pre-copy where not allowed) are simply left out.
            let _ = w.write_chunk(kind, dev, &payload);
        }
        w.finish().unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_valid_stream_is_accepted_and_every_truncation_refused(bytes in arb_stream()) {
        prop_assert_eq!(check_all_ways(&bytes), [true; 3]);
        for cut in 0..bytes.len() {
            let t = &bytes[..cut];
            prop_assert_eq!(check_all_ways(t), [false; 3], "truncated at {}", cut);
            let e = err_kind(read_all(t));
            prop_assert!(e.is_truncation(), "cut {}: {}", cut, e);
            prop_assert_eq!(e.offset, cut as u64);
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused(bytes in arb_stream()) {
        let mut b = bytes.clone();
        for i in 0..b.len() * 8 {
            b[i / 8] ^= 1 << (i % 8);
            prop_assert_eq!(check_all_ways(&b), [false; 3], "bit {} of byte {}", i % 8, i / 8);
            b[i / 8] ^= 1 << (i % 8);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..200), prefix in any::<bool>()) {
        if prefix {
            // Start with a valid header so the record parser gets exercised.
            let mut v = write_stream(two_devices(), &[]);
            let keep = StreamReader::new(&v[..]).unwrap().header_len() as usize;
            v.truncate(keep);
            v.append(&mut bytes);
            bytes = v;
        }
        let _ = check_all_ways(&bytes);
    }
}

#[test]
fn the_checksum_is_crc32c_whatever_the_implementation() {
    assert_eq!(crc32c_of(&[b"123456789"]), 0xe306_9283);
    assert_eq!(crc32c_of(&[b"1234", b"", b"56789"]), 0xe306_9283);
    let data: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    // Against a bit-at-a-time reference (reflected Castagnoli polynomial 0x82F63B78).
    let reference = |bytes: &[u8]| {
        let mut r = u32::MAX;
        for &b in bytes {
            r ^= u32::from(b);
            for _ in 0..8 {
                r = if r & 1 != 0 { (r >> 1) ^ 0x82F6_3B78 } else { r >> 1 };
            }
        }
        !r
    };
    let want = reference(&data);
    assert_eq!(crc32c(&data), want);
    for split in [0, 1, 20, 77, 1023, 1024, 4096, 65_537, data.len()] {
        assert_eq!(crc32c_of(&[&data[..split], &data[split..]]), want, "split at {split}");
        assert_eq!(
            crc32c_append(crc32c(&data[..split]), &data[split..]),
            want,
            "split at {split}"
        );
        assert_eq!(
            crc32c_combine(
                crc32c(&data[..split]),
                crc32c(&data[split..]),
                (data.len() - split) as u64
            ),
            want,
            "split at {split}"
        );
    }
}

/// Issue 12, part 6: a crafted stream of a few MB declaring 65536 distinct sections (256 devices
/// x 256 optional kinds, one empty record each) is inspected in one pass; looking sections up
/// one by one per record made this quadratic (minutes).
#[test]
fn inspect_of_many_sections_is_one_lookup_per_record() {
    let devices = super::MAX_DEVICES as u32;
    let entries = (0..devices)
        .map(|_| DeviceEntry {
            identity: pci(),
            flags: F::STOP_COPY,
        })
        .collect();
    let mut w = StreamWriter::new(Vec::new(), Header::new(entries)).unwrap();
    for code in 0..256u16 {
        for d in 0..devices {
            w.write_record(0x4000 + code, FLAG_OPTIONAL, d, b"").unwrap();
        }
    }
    let bytes = w.finish().unwrap();
    assert!(bytes.len() > 1 << 20, "{}", bytes.len());
    let report = inspect(&bytes[..]).unwrap();
    assert_eq!(report.sections.len(), 256 * devices as usize);
    assert!(report.sections.iter().all(|s| s.chunks == 1 && s.skipped));
    assert_eq!(report.chunks.len(), MAX_LISTED_CHUNKS);
    assert_eq!(
        report.chunks_not_listed,
        256 * devices as u64 - MAX_LISTED_CHUNKS as u64
    );
    // A summary only: every record counted, none listed.
    let summary = inspect_with(&bytes[..], InspectOptions { max_listed_chunks: 0 }).unwrap();
    assert!(summary.chunks.is_empty());
    assert_eq!(summary.chunks_not_listed, 256 * devices as u64);
    assert_eq!(summary.sections, report.sections);
}
