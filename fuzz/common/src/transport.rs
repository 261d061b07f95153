//! Fuzz checks and seeds for the network transport's parsers: the record reader and the end
//! marker (`transport_records`), the preamble, the hello and the control messages
//! (`transport_control`), and the receiver's record state machine (`transport_receiver`).
//!
//! Everything runs from memory through the crate's public API (`transport::wire`) and its
//! sockets-free entry points (`transport::fuzz`); no socket is opened.

use std::io::{self, Read};

use vfio_migration::device::MigrationDevice;
use vfio_migration::emulated::EmulatedDevice;
use vfio_migration::live::{DestinationOptions, SeqSink, SinkEvent, Source, SourceOptions};
use vfio_migration::state::DeviceState;
use vfio_migration::stream::{DeviceEntry, Header, MAX_CHUNK_LEN, RECORD_HEADER_LEN, StreamReader, StreamWriter, crc32c};
use vfio_migration::transport::fuzz as tf;
use vfio_migration::transport::wire::{
    self, KIND_CHECK, KIND_END, KIND_INITIAL_SENT, KIND_KEEPALIVE, KIND_PRE_COPY, KIND_STOP_COPY, MAX_REASON_LEN,
    MSG_COMMIT, MSG_FAILED, NO_DEVICE, PREAMBLE_LEN, Preamble, ROLE_CONTROL, ROLE_DATA, ReadError,
};

/// The largest read the record reader may ask of its source at once: a header, or the 1 MiB
/// step its buffer grows by (never the announced length up front).
pub const MAX_READ_ASK: usize = 1 << 20;

/// The largest control message the control link accepts (a reason plus some room).
pub const MAX_CONTROL_MESSAGE: usize = MAX_REASON_LEN + 64;

/// A reader over a slice that remembers the largest read it was asked for and how much it gave.
struct Watched<'a> {
    data: &'a [u8],
    given: usize,
    largest_ask: usize,
}

impl Read for Watched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.largest_ask = self.largest_ask.max(buf.len());
        let n = self.data.read(buf)?;
        self.given += n;
        Ok(n)
    }
}

/// Arbitrary bytes as a data connection's records, then as end markers.
///
/// Invariants: no panic; the reader never asks its source for more than [`MAX_READ_ASK`] bytes
/// at once whatever length a header announces; a record is never above the cap given; an
/// accepted record is exactly what `write_record` writes for it; the reused buffer never
/// outgrows the bytes received plus one step; an end marker `decode_end` accepts re-encodes
/// to the same bytes.
pub fn check_records(data: &[u8]) {
    // The cap comes from the input too, so small caps are exercised as well as the real one.
    let (cap, data) = match data.split_first() {
        Some((&c, rest)) if c & 1 == 1 => (usize::from(c) * 16, rest),
        Some((_, rest)) => (MAX_CHUNK_LEN, rest),
        None => (MAX_CHUNK_LEN, data),
    };
    let mut r = Watched {
        data,
        given: 0,
        largest_ask: 0,
    };
    let mut buf = Vec::new();
    loop {
        let before = r.given;
        let result = wire::read_record(&mut r, buf, cap);
        assert!(
            r.largest_ask <= MAX_READ_ASK.max(RECORD_HEADER_LEN),
            "the reader asked for {} bytes at once",
            r.largest_ask
        );
        let rec = match result {
            Ok(rec) => rec,
            Err(ReadError::Eof) => {
                assert_eq!(r.given, data.len(), "end of file before the end of the input");
                break;
            }
            Err(ReadError::Io(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
                break;
            }
            Err(ReadError::Bad(why)) => {
                assert!(!why.is_empty());
                break;
            }
        };
        assert!(rec.payload.len() <= cap.min(MAX_CHUNK_LEN), "a record of {} bytes", rec.payload.len());
        let mut again = Vec::new();
        wire::write_record(&mut again, rec.kind, rec.device, rec.sequence, &rec.payload).expect("re-encode");
        assert_eq!(&again[..], &data[before..r.given], "an accepted record re-encodes differently");
        let _ = wire::kind_name(rec.kind);
        if rec.kind == KIND_END {
            check_end(&rec.payload);
        }
        // Vec growth may double, so twice the bytes received plus a step bounds the buffer.
        assert!(
            rec.payload.capacity() <= 2 * (r.given + MAX_READ_ASK),
            "buffer of {} bytes after {} received",
            rec.payload.capacity(),
            r.given
        );
        buf = rec.payload;
    }
    // The end marker's payload parser on the raw bytes too (no checksum in the way).
    check_end(data);
}

/// An end-marker payload, parsed for the device count its length implies and for one other.
fn check_end(p: &[u8]) {
    let implied = p.len().saturating_sub(24) / 16;
    for devices in [implied, implied + 1, 1] {
        if let Ok(totals) = wire::decode_end(p, devices) {
            assert_eq!(totals.len(), devices);
            assert_eq!(wire::encode_end(&totals), p, "an accepted end marker re-encodes differently");
        }
    }
}

/// Arbitrary bytes as a control connection: byte 0 is the read size the control link sees;
/// then a preamble, the hello's stream header and control messages.
///
/// Invariants: no panic; a preamble `Preamble::decode` accepts re-encodes to the same bytes
/// (bar the reserved field, which decode ignores), and so does one with its checksum fixed
/// up; the control framing gives the same messages and the same error whatever the read size;
/// no message is above [`MAX_CONTROL_MESSAGE`].
pub fn check_control(data: &[u8]) {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1) * 16;
    let mut rest = data;
    if data.len() >= PREAMBLE_LEN {
        let mut b = [0u8; PREAMBLE_LEN];
        b.copy_from_slice(&data[..PREAMBLE_LEN]);
        check_preamble(&b);
        // The same with a valid checksum, to reach the field checks behind it.
        let crc = crc32c(&b[..28]);
        b[28..].copy_from_slice(&crc.to_le_bytes());
        check_preamble(&b);
        rest = &data[PREAMBLE_LEN..];
    }
    // The hello: a stream header, read exactly (the control messages follow it).
    let mut after = rest;
    if StreamReader::new(&mut after).is_err() {
        after = rest;
    }
    for bytes in [after, rest, data] {
        let whole = tf::control_messages(bytes, 4096);
        let pieces = tf::control_messages(bytes, step);
        let one = tf::control_messages(bytes, 1);
        assert_eq!(messages_of(&whole), messages_of(&pieces), "read size {step}");
        assert_eq!(messages_of(&whole), messages_of(&one), "read size 1");
        if let Ok((msgs, left)) = &whole {
            assert!(*left <= bytes.len());
            for m in msgs {
                assert!(m.payload.len() <= MAX_CONTROL_MESSAGE, "a message of {} bytes", m.payload.len());
                let _ = (wire::kind_name(m.kind), String::from_utf8_lossy(&m.payload));
            }
        }
    }
}

/// What the framing returned, comparable.
type Framed = Result<(Vec<(u16, u32, u64, Vec<u8>)>, usize), String>;

fn messages_of(r: &Result<(Vec<wire::Record>, usize), String>) -> Framed {
    r.as_ref()
        .map(|(m, left)| {
            (
                m.iter()
                    .map(|m| (m.kind, m.device, m.sequence, m.payload.clone()))
                    .collect(),
                *left,
            )
        })
        .map_err(Clone::clone)
}

fn check_preamble(b: &[u8; PREAMBLE_LEN]) {
    if let Ok(p) = Preamble::decode(b) {
        assert!(p.role == ROLE_CONTROL || p.role == ROLE_DATA);
        assert!(p.connections >= 1 && usize::from(p.connections) <= wire::MAX_CONNECTIONS);
        assert!(p.index < p.connections);
        let again = p.encode();
        assert_eq!(&again[..18], &b[..18]);
        assert_eq!(&again[20..28], &b[20..28]);
        if b[18..20] == [0, 0] {
            assert_eq!(&again, b);
        }
    }
}

/// The devices the `transport_receiver` target loads into (source and destination alike).
pub const RECEIVER_DEVICES: [&str; 2] = ["size=2K,block=256,seed=5", "size=1K,block=128,seed=9"];

/// Split a `transport_receiver` input into connections: each is a little-endian `u16` length
/// then that many bytes (the last one takes what is left). The first is the control
/// connection, the others the data connections. (The fuzz harness's framing, not the
/// protocol's.)
pub fn split_connections(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() <= wire::MAX_CONNECTIONS {
        let n = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
        out.push(&data[2..2 + n]);
        data = &data[2 + n..];
    }
    out
}

/// The inverse of [`split_connections`] (each connection shorter than 64 KiB).
pub fn join_connections(conns: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in conns {
        out.extend_from_slice(&(c.len() as u16).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

/// Fix every checksum a connection carries (its preamble, and each record's on a data
/// connection or after the hello on the control connection), so the fuzzer's changes reach
/// the checks behind them. Lengths are clamped to what is there.
pub fn fix_checksums(conn: &[u8], control: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(conn.len() + 64);
    let mut rest = conn;
    if rest.len() < PREAMBLE_LEN {
        return conn.to_vec();
    }
    let mut pre = [0u8; PREAMBLE_LEN];
    pre.copy_from_slice(&rest[..PREAMBLE_LEN]);
    let crc = crc32c(&pre[..28]);
    pre[28..].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&pre);
    rest = &rest[PREAMBLE_LEN..];
    if control {
        // The hello is kept as it is (the stream_reader target covers headers).
        let mut after = rest;
        if StreamReader::new(&mut after).is_err() {
            out.extend_from_slice(rest);
            return out;
        }
        out.extend_from_slice(&rest[..rest.len() - after.len()]);
        rest = after;
    }
    while rest.len() >= RECORD_HEADER_LEN {
        let h = &rest[..RECORD_HEADER_LEN];
        let kind = u16::from_le_bytes([h[0], h[1]]);
        let device = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&h[8..16]);
        let len = (u32::from_le_bytes([h[16], h[17], h[18], h[19]]) as usize).min(rest.len() - RECORD_HEADER_LEN);
        let payload = &rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len];
        wire::write_record(&mut out, kind, device, u64::from_le_bytes(s), payload).expect("write into a Vec");
        rest = &rest[RECORD_HEADER_LEN + len..];
    }
    out.extend_from_slice(rest);
    out
}

/// Arbitrary bytes as one migration into a receiver with the [`RECEIVER_DEVICES`], both as
/// they are and with every checksum fixed up (see [`fix_checksums`]).
///
/// Invariants: no panic; whatever happens, every device ends RUNNING and usable (a failed
/// load resets it); an accepted migration loaded exactly the bytes its report counts.
pub fn check_receiver(data: &[u8]) {
    let conns = split_connections(data);
    if conns.is_empty() {
        return;
    }
    run_receiver(&conns);
    let fixed: Vec<Vec<u8>> = conns
        .iter()
        .enumerate()
        .map(|(i, c)| fix_checksums(c, i == 0))
        .collect();
    let fixed: Vec<&[u8]> = fixed.iter().map(|c| &c[..]).collect();
    run_receiver(&fixed);
}

/// One run of the receiver on `conns` (control first); returns whether it succeeded.
pub fn run_receiver(conns: &[&[u8]]) -> bool {
    let devs: Vec<EmulatedDevice> = RECEIVER_DEVICES
        .iter()
        .map(|s| EmulatedDevice::from_spec(s).expect("valid spec"))
        .collect();
    let handles: Vec<_> = devs.iter().map(EmulatedDevice::handle).collect();
    let boxed: Vec<Box<dyn MigrationDevice>> = devs.into_iter().map(|d| Box::new(d) as _).collect();
    let opts = DestinationOptions {
        // Small, so the reorder limit is reached too.
        max_reorder_bytes: 4096,
        ..DestinationOptions::default()
    };
    let result = tf::receive(boxed, &opts, conns[0], &conns[1..]);
    for h in &handles {
        assert!(h.is_usable(), "device {} left unusable: {result:?}", h.name());
        assert_eq!(h.device_state(), DeviceState::Running, "after {result:?}");
    }
    if let Ok(report) = &result {
        assert_eq!(report.devices.len(), RECEIVER_DEVICES.len());
        let data_bytes: usize = conns[1..].iter().map(|c| c.len()).sum();
        let loaded: u64 = report.precopy_bytes.iter().chain(&report.stop_copy_bytes).sum();
        assert!(loaded <= data_bytes as u64, "{loaded} bytes loaded from {data_bytes}");
    }
    result.is_ok()
}

/// What a source sends: per device, its chunks (phase pre-copy?, sequence, bytes) and its
/// initial-data marker.
struct Sent {
    chunks: Vec<(usize, bool, u64, Vec<u8>)>,
    initial: Vec<(usize, u64)>,
}

/// Run a live source over fresh [`RECEIVER_DEVICES`] in chunks of `chunk` bytes.
fn source_chunks(chunk: usize) -> Sent {
    let devs: Vec<Box<dyn MigrationDevice>> = RECEIVER_DEVICES
        .iter()
        .map(|s| Box::new(EmulatedDevice::from_spec(s).expect("valid spec")) as _)
        .collect();
    let opts = SourceOptions {
        chunk_size: chunk,
        // One device after the other, so the seeds are the same on every run.
        parallel: false,
        ..SourceOptions::default()
    };
    let mut src = Source::new(devs, opts).expect("source");
    let mut counters = vec![0u64; src.len()];
    let mut sent = Sent {
        chunks: Vec::new(),
        initial: Vec::new(),
    };
    src.start().expect("start");
    let mut f = |ev: SinkEvent<'_>| -> io::Result<()> {
        match ev {
            SinkEvent::Chunk {
                device,
                seq,
                phase,
                data,
            } => sent
                .chunks
                .push((device, phase == vfio_migration::live::Phase::PreCopy, seq, data.to_vec())),
            SinkEvent::InitialSent { device, chunks } => sent.initial.push((device, chunks)),
        }
        Ok(())
    };
    for _ in 0..4 {
        if !src.precopy_active() || src.initial_drained() {
            break;
        }
        src.iterate(&mut SeqSink::new(&mut counters, &mut f), 1 << 20).expect("pre-copy");
    }
    src.quiesce().expect("quiesce");
    src.stop_copy(&mut SeqSink::new(&mut counters, &mut f)).expect("stop-copy");
    src.finish().expect("finish");
    sent
}

/// A valid migration of the [`RECEIVER_DEVICES`] over `n` data connections, as the sender
/// writes it: control connection (preamble, hello, a keepalive, COMMIT), data connections
/// (preamble, chunks spread over them, initial-data markers, a keepalive, check values, end
/// markers).
pub fn migration_seed(n: usize, chunk: usize) -> Vec<Vec<u8>> {
    let session = 0x5eed_0000 + n as u64;
    let sent = source_chunks(chunk);
    let entries: Vec<DeviceEntry> = RECEIVER_DEVICES
        .iter()
        .map(|s| {
            let d = EmulatedDevice::from_spec(s).expect("valid spec");
            DeviceEntry {
                identity: d.identity(),
                flags: d.flags().expect("flags"),
            }
        })
        .collect();
    let w = StreamWriter::new(Vec::new(), Header::new(entries)).expect("header");
    let header_len = w.offset() as usize;
    let hello = w.finish().expect("write into a Vec");
    let pre = |role, index: usize| {
        Preamble {
            role,
            index: index as u16,
            connections: n as u16,
            session,
        }
        .encode()
        .to_vec()
    };
    let mut control = pre(ROLE_CONTROL, 0);
    control.extend_from_slice(&hello[..header_len]);
    wire::write_record(&mut control, KIND_KEEPALIVE, NO_DEVICE, 0, &[]).expect("vec");
    let mut commit = 3u64.to_le_bytes().to_vec();
    commit.extend_from_slice(&1500u64.to_le_bytes());
    wire::write_record(&mut control, MSG_COMMIT, NO_DEVICE, 0, &commit).expect("vec");

    let mut data: Vec<Vec<u8>> = (0..n).map(|i| pre(ROLE_DATA, i)).collect();
    let mut totals = vec![vec![(0u64, 0u64); RECEIVER_DEVICES.len()]; n];
    let mut pre_copy_chunks = vec![0u64; RECEIVER_DEVICES.len()];
    for (k, (dev, pre_copy, seq, bytes)) in sent.chunks.iter().enumerate() {
        // Each device's chunks spread over the connections, so they arrive out of order.
        let c = (*seq as usize + *dev) % n;
        let kind = if *pre_copy { KIND_PRE_COPY } else { KIND_STOP_COPY };
        wire::write_record(&mut data[c], kind, *dev as u32, *seq, bytes).expect("vec");
        totals[c][*dev].0 += 1;
        totals[c][*dev].1 += bytes.len() as u64;
        if *pre_copy {
            pre_copy_chunks[*dev] += 1;
        }
        if k == 1 {
            wire::write_record(&mut data[c], KIND_KEEPALIVE, NO_DEVICE, 0, &[]).expect("vec");
        }
        // The initial-data marker once the device's initial chunks are all out.
        for &(d, chunks) in &sent.initial {
            if d == *dev && *pre_copy && pre_copy_chunks[d] == chunks {
                wire::write_record(&mut data[c], KIND_INITIAL_SENT, d as u32, chunks, &[]).expect("vec");
            }
        }
    }
    for (d, handle) in RECEIVER_DEVICES.iter().enumerate() {
        let digest = EmulatedDevice::from_spec(handle).expect("valid spec").digest();
        wire::write_record(&mut data[d % n], KIND_CHECK, d as u32, 0, &digest.to_le_bytes()).expect("vec");
    }
    for (c, conn) in data.iter_mut().enumerate() {
        wire::write_record(conn, KIND_END, NO_DEVICE, 0, &wire::encode_end(&totals[c])).expect("vec");
    }
    let mut all = vec![control];
    all.extend(data);
    all
}

/// Seeds of `transport_receiver`: valid migrations over 1 to 3 connections.
pub fn receiver_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("one-connection", join_connections(&migration_seed(1, 1024))),
        ("two-connections", join_connections(&migration_seed(2, 700))),
        ("three-connections", join_connections(&migration_seed(3, 512))),
    ]
}

/// Seeds of `transport_records`: the data connections of a valid migration, without their
/// preamble (byte 0 picks the real cap), and an end marker alone.
pub fn records_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mig = migration_seed(2, 700);
    let mut out = Vec::new();
    for (i, name) in [(1, "data-connection-0"), (2, "data-connection-1")] {
        let mut s = vec![0u8];
        s.extend_from_slice(&mig[i][PREAMBLE_LEN..]);
        out.push((name, s));
    }
    let mut end = vec![0u8];
    wire::write_record(&mut end, KIND_END, NO_DEVICE, 0, &wire::encode_end(&[(3, 4000), (1, 10)])).expect("vec");
    out.push(("end-marker", end));
    out
}

/// Seeds of `transport_control`: a control connection as the sender writes it, and the
/// receiver's side (ACCEPT, SWITCHOVER_ACK, LOADED, RESUMED; a REFUSE; a FAILED).
pub fn control_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mig = migration_seed(2, 700);
    let mut sender = vec![16u8];
    sender.extend_from_slice(&mig[0]);
    let mut receiver = vec![1u8];
    for kind in [
        wire::MSG_ACCEPT,
        wire::MSG_SWITCHOVER_ACK,
        KIND_KEEPALIVE,
        wire::MSG_LOADED,
        wire::MSG_RESUMED,
    ] {
        wire::write_record(&mut receiver, kind, NO_DEVICE, 0, &[]).expect("vec");
    }
    let mut refused = vec![3u8];
    let why = wire::reason_payload("busy: serving the migration from 10.0.0.1:4000");
    wire::write_record(&mut refused, wire::MSG_REFUSE, NO_DEVICE, 0, &why).expect("vec");
    wire::write_record(&mut refused, MSG_FAILED, NO_DEVICE, 0, &wire::reason_payload(&"é".repeat(3000)))
        .expect("vec");
    vec![("sender", sender), ("receiver", receiver), ("refused-failed", refused)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_seeds_migrate_and_damage_is_refused_cleanly() {
        for (name, seed) in receiver_seeds() {
            let conns = split_connections(&seed);
            assert!(run_receiver(&conns), "seed {name} does not migrate");
            check_receiver(&seed);
            let fixed: Vec<Vec<u8>> = conns.iter().enumerate().map(|(i, c)| fix_checksums(c, i == 0)).collect();
            assert_eq!(fixed.iter().map(|c| &c[..]).collect::<Vec<_>>(), conns, "{name}");
            // Cuts and flips: refused, devices fine (checked inside).
            for cut in (0..seed.len()).step_by(97) {
                check_receiver(&seed[..cut]);
            }
            let mut b = seed.clone();
            for i in (0..b.len()).step_by(41) {
                b[i] ^= 0x04;
                check_receiver(&b);
                b[i] ^= 0x04;
            }
        }
    }

    #[test]
    fn records_and_control_seeds_hold_the_invariants() {
        for (_, s) in records_seeds() {
            check_records(&s);
            for cut in 0..s.len().min(300) {
                check_records(&s[..cut]);
            }
        }
        for (_, s) in control_seeds() {
            check_control(&s);
            for cut in 0..s.len().min(400) {
                check_control(&s[..cut]);
            }
        }
        check_records(&[]);
        check_control(&[]);
    }

    /// A control connection's messages come out whatever the read size.
    #[test]
    fn control_seed_frames_every_message() {
        let (_, s) = &control_seeds()[1];
        let (msgs, left) = tf::control_messages(&s[1..], 7).unwrap();
        assert_eq!((msgs.len(), left), (5, 0));
    }
}
