//! Fuzz inputs and invariant checks for vfio-migration, shared by the fuzz targets.
//!
//! Each `check_*` function takes one fuzz input and panics only when an invariant breaks (the
//! library itself must never panic). They are plain functions so they are unit-tested on stable
//! here and reused unchanged by the libFuzzer targets in `fuzz_targets/`.
#![deny(missing_docs)]

use std::io::{self, Read};

pub mod transport;
pub mod vfio_user;

use arbitrary::{Arbitrary, Unstructured};
use vfio_migration::device::{DeviceIdentity, MigrationDevice};
use vfio_migration::emulated::EmulatedDevice;
use vfio_migration::session::{self, LoadOptions, SaveOptions};
use vfio_migration::state::{ALL_STATES, DeviceState, MigrationFlags, next_step, path};
use vfio_migration::stream::{
    DeviceEntry, FLAG_OPTIONAL, Header, MAX_CHUNK_LEN, SectionKind, StreamError, StreamReader, StreamWriter, crc32c,
    inspect,
};

/// Feed arbitrary bytes to every way of reading a stream and check that they agree.
///
/// Invariants: no panic; the record reader, [`inspect`] and the payload reader accept exactly the
/// same inputs; errors point inside the input; the payload buffer stays under the cap; and an
/// accepted stream is exactly what [`StreamWriter`] writes for the same header and records (the
/// format has one encoding), unless it holds unknown optional sections.
pub fn check_stream(data: &[u8]) {
    let by_records = read_records(data);
    let by_inspect = inspect(data);
    let by_payload = read_payload(data);
    assert_eq!(
        by_records.is_ok(),
        by_inspect.is_ok(),
        "reader and inspect disagree: {:?} vs {:?}",
        by_records.as_ref().err(),
        by_inspect.as_ref().err()
    );
    assert_eq!(
        by_records.is_ok(),
        by_payload.is_ok(),
        "reader and payload reader disagree: {:?} vs {:?}",
        by_records.as_ref().err(),
        by_payload.as_ref().err()
    );
    match (by_records, by_inspect, by_payload) {
        (Ok(parsed), Ok(report), Ok(state)) => {
            assert_eq!(report.checked_bytes, data.len() as u64);
            let want: Vec<u8> = parsed
                .records
                .iter()
                .filter(|r| r.1 == 0 && r.0.is_device_state())
                .flat_map(|r| r.2.iter().copied())
                .collect();
            assert_eq!(state, want, "the payload reader gave other bytes than the records");
            if parsed.skipped == 0 {
                let mut w = StreamWriter::new(Vec::new(), parsed.header).expect("a read header is writable");
                for (kind, dev, payload) in &parsed.records {
                    w.write_chunk(*kind, *dev, payload).expect("a read record is writable");
                }
                let again = w.finish().expect("finish into a Vec");
                assert_eq!(again, data, "an accepted stream has another encoding");
            }
        }
        (Err(a), Err(b), Err(c)) => {
            assert!(a.offset <= data.len() as u64, "offset {} beyond the input", a.offset);
            assert_eq!(a.offset, b.offset(), "reader and inspect report other offsets");
            assert_eq!(Some(a.offset), c.map(|e| e.offset), "payload reader reports another offset");
        }
        _ => unreachable!("checked above"),
    }
}

/// The `stream_reader` target: `data` as raw stream bytes, and `data` decoded as a
/// [`StreamRecipe`] (a stream with correct checksums but possibly wrong structure), both through
/// [`check_stream`]. The second half lets the fuzzer reach the checks behind the CRCs.
pub fn check_stream_input(data: &[u8]) {
    check_stream(data);
    if let Ok(recipe) = StreamRecipe::arbitrary_take_rest(Unstructured::new(data)) {
        check_stream(&recipe.encode());
    }
}

/// A stream described structurally; [`StreamRecipe::encode`] writes it with valid checksums,
/// whatever else is wrong with it (sequence numbers, device indexes, kinds, flags, totals).
#[derive(Arbitrary, Debug, Clone)]
pub struct StreamRecipe {
    /// The devices of the header (1 to 3 are used).
    pub devices: Vec<RecipeDevice>,
    /// The records.
    pub records: Vec<RecipeRecord>,
    /// `None`: a correct end marker; else one field overwritten.
    pub end_tweak: Option<(u8, u64)>,
    /// Leave the end marker out.
    pub omit_end: bool,
    /// Bytes after the end.
    pub trailing: Vec<u8>,
}

/// One device of a [`StreamRecipe`].
#[derive(Arbitrary, Debug, Clone)]
pub struct RecipeDevice {
    /// Identity kind selector.
    pub kind: u8,
    /// Whether the device has PRE_COPY.
    pub pre_copy: bool,
    /// mdev type or emulated parameters.
    pub name: String,
}

/// One record of a [`StreamRecipe`].
#[derive(Arbitrary, Debug, Clone)]
pub struct RecipeRecord {
    /// Kind selector: mostly the defined kinds, sometimes the end marker's or an unknown one.
    pub kind: u8,
    /// Set OPTIONAL.
    pub optional: bool,
    /// Raw flags instead (rarely).
    pub raw_flags: Option<u16>,
    /// Device index selector (may be out of range).
    pub device: u8,
    /// A sequence number instead of the correct next one.
    pub sequence: Option<u64>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl StreamRecipe {
    /// Encode: a valid header, the records with correct checksums, an end marker with the
    /// totals the records add up to (unless tweaked or omitted), then the trailing bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut devices: Vec<DeviceEntry> = self
            .devices
            .iter()
            .take(3)
            .map(|d| DeviceEntry {
                identity: match d.kind % 4 {
                    0 => DeviceIdentity::Unknown,
                    1 => DeviceIdentity::Pci {
                        vendor: 0x10de,
                        device: u16::from(d.kind),
                        subsystem_vendor: 0,
                        subsystem_device: 1,
                    },
                    2 => DeviceIdentity::Mdev {
                        mdev_type: d.name.chars().take(32).collect(),
                    },
                    _ => DeviceIdentity::Emulated {
                        params: d.name.chars().take(32).collect(),
                    },
                },
                flags: if d.pre_copy {
                    MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY
                } else {
                    MigrationFlags::STOP_COPY
                },
            })
            .collect();
        if devices.is_empty() {
            devices.push(DeviceEntry {
                identity: DeviceIdentity::Unknown,
                flags: MigrationFlags::STOP_COPY,
            });
        }
        let n = devices.len();
        let mut out = StreamWriter::new(Vec::new(), Header::new(devices))
            .expect("a recipe header is valid")
            .finish()
            .expect("into a Vec");
        // Drop the empty stream's end marker (24-byte record header + 24 + 16 N bytes).
        out.truncate(out.len() - (48 + 16 * n));
        let mut per_device = vec![(0u64, 0u64); n];
        let (mut total_chunks, mut total_bytes) = (0u64, 0u64);
        for r in self.records.iter().take(16) {
            let kind: u16 = match r.kind % 8 {
                0 | 1 => 1,
                2..=4 => 2,
                5 => 3,
                6 => 0x00ff,
                _ => 0x0100 | u16::from(r.kind),
            };
            let flags = r.raw_flags.unwrap_or(if r.optional { FLAG_OPTIONAL } else { 0 });
            let device = u32::from(r.device) % (n as u32 + 1);
            let next = per_device.get(device as usize).map_or(0, |d| d.0);
            let sequence = r.sequence.unwrap_or(next);
            let payload = &r.payload[..r.payload.len().min(4096)];
            push_record(&mut out, kind, flags, device, sequence, payload);
            if let Some(d) = per_device.get_mut(device as usize) {
                d.0 += 1;
                d.1 += payload.len() as u64;
            }
            total_chunks += 1;
            total_bytes += payload.len() as u64;
        }
        if !self.omit_end {
            let mut fields = vec![total_chunks, total_bytes, n as u64];
            for (c, b) in &per_device {
                fields.extend([*c, *b]);
            }
            if let Some((which, value)) = self.end_tweak {
                let i = usize::from(which) % fields.len();
                fields[i] = value;
            }
            let mut p = Vec::new();
            p.extend_from_slice(&fields[0].to_le_bytes());
            p.extend_from_slice(&fields[1].to_le_bytes());
            // Device count (u32) and reserved (u32) share the third slot.
            p.extend_from_slice(&fields[2].to_le_bytes());
            for f in &fields[3..] {
                p.extend_from_slice(&f.to_le_bytes());
            }
            push_record(&mut out, 0x00ff, 0, u32::MAX, 0, &p);
        }
        out.extend_from_slice(&self.trailing[..self.trailing.len().min(64)]);
        out
    }
}

/// Append one record with a correct checksum.
fn push_record(out: &mut Vec<u8>, kind: u16, flags: u16, device: u32, sequence: u64, payload: &[u8]) {
    let mut rec = Vec::with_capacity(24 + payload.len());
    rec.extend_from_slice(&kind.to_le_bytes());
    rec.extend_from_slice(&flags.to_le_bytes());
    rec.extend_from_slice(&device.to_le_bytes());
    rec.extend_from_slice(&sequence.to_le_bytes());
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut covered = rec.clone();
    covered.extend_from_slice(payload);
    rec.extend_from_slice(&crc32c(&covered).to_le_bytes());
    rec.extend_from_slice(payload);
    out.extend_from_slice(&rec);
}

/// What [`read_records`] found in a valid stream.
#[derive(Debug)]
pub struct Parsed {
    /// The header.
    pub header: Header,
    /// Every record (kind, device index, payload), unknown optional ones left out.
    pub records: Vec<(SectionKind, u32, Vec<u8>)>,
    /// Unknown optional sections skipped.
    pub skipped: u64,
}

/// Read a stream record by record.
pub fn read_records(data: &[u8]) -> Result<Parsed, StreamError> {
    let mut r = StreamReader::new(data)?;
    let mut records = Vec::new();
    while let Some(c) = r.next_chunk()? {
        assert!(c.payload.len() <= MAX_CHUNK_LEN);
        records.push((c.kind, c.device_index, c.payload.to_vec()));
    }
    assert!(r.buffer_capacity() <= MAX_CHUNK_LEN, "buffer grew to {}", r.buffer_capacity());
    Ok(Parsed {
        header: r.header().clone(),
        records,
        skipped: r.skipped_sections(),
    })
}

/// Read device 0's state through the payload reader; a stream error comes back typed.
pub fn read_payload(data: &[u8]) -> Result<Vec<u8>, Option<StreamError>> {
    let mut r = StreamReader::new(data).map_err(Some)?;
    let mut out = Vec::new();
    match r.device_payload(0).read_to_end(&mut out) {
        Ok(_) => Ok(out),
        Err(e) => Err(StreamError::try_from_io(e).ok()),
    }
}

/// The emulated device the `stream_load` target loads into: 2 KiB in 8 blocks.
pub const LOAD_DEVICE: &str = "size=2K,block=256,seed=5";

/// Load arbitrary bytes as a stream into a fresh emulated device, as `vfio-mig load` does:
/// header, compatibility check before the device is touched, then the device state through
/// RESUMING.
///
/// Invariants: no panic; only a stream [`inspect`] accepts is loaded; whatever happens the device
/// ends RUNNING and usable (a failed load resets it).
pub fn check_stream_load(data: &[u8]) {
    let mut dev = EmulatedDevice::from_spec(LOAD_DEVICE).expect("valid spec");
    let result = load_stream(&mut dev, data);
    if result.is_ok() {
        assert!(inspect(data).is_ok(), "an invalid stream was loaded");
    }
    assert!(dev.is_usable(), "the device was left unusable: {result:?}");
    assert_eq!(
        dev.state().expect("emulated state"),
        vfio_migration::state::DeviceState::Running,
        "after {result:?}"
    );
}

/// Check the stream's header against `dev`, then load device 0's state into it.
pub fn load_stream(dev: &mut EmulatedDevice, data: &[u8]) -> Result<(), String> {
    let mut r = StreamReader::new(data).map_err(|e| e.to_string())?;
    let flags = dev.flags().map_err(|e| e.to_string())?;
    r.header()
        .check_compatible(0, &dev.identity(), flags, false)
        .map_err(|e| e.to_string())?;
    session::load(dev, &mut r.device_payload(0), LoadOptions::default()).map_err(|e| e.to_string())?;
    Ok(())
}

/// A stream saved from a fresh [`LOAD_DEVICE`] in chunks of `chunk` bytes.
pub fn saved_emulated_stream(chunk: usize) -> Vec<u8> {
    let mut dev = EmulatedDevice::from_spec(LOAD_DEVICE).expect("valid spec");
    let flags = dev.flags().expect("emulated flags");
    let mut w = StreamWriter::new(Vec::new(), Header::single(dev.identity(), flags)).expect("header");
    {
        let mut sink = w
            .chunk_sink(SectionKind::StopCopy, 0)
            .expect("sink")
            .with_chunk_size(chunk);
        session::save(&mut dev, &mut sink, SaveOptions::default()).expect("save the emulated device");
        sink.finish().expect("last chunk");
    }
    w.finish().expect("end marker")
}

/// A request to the state model: raw state numbers, raw flags, and a name to parse.
#[derive(Arbitrary, Debug, Clone)]
pub struct PathInput {
    /// The current state's raw number (any `u32`; only 0..=7 are states).
    pub from: u32,
    /// The requested state's raw number.
    pub to: u32,
    /// Raw migration flag bits.
    pub flags: u64,
    /// A string parsed as a state name and as flags.
    pub name: String,
}

/// Check the state model on one request.
///
/// Invariants: no panic; unknown numbers are refused; a path starts at `from`, ends at `to`,
/// follows [`next_step`] one arc at a time through supported states, never visits a state twice,
/// opens at most one transfer session and only on its last arc; for a state the device can be
/// in, `path` succeeds exactly when `next_step` does; parsed names print back to themselves.
pub fn check_path(input: &PathInput) {
    if let Ok(s) = input.name.parse::<DeviceState>() {
        assert_eq!(s.name().parse::<DeviceState>().ok(), Some(s));
    }
    if let Ok(f) = input.name.parse::<MigrationFlags>() {
        let shown = f.to_string();
        if f.unknown_bits() == 0 && !f.names().is_empty() {
            assert_eq!(shown.parse::<MigrationFlags>().ok(), Some(f), "{shown}");
        }
    }
    let (from, to) = match (DeviceState::from_raw(input.from), DeviceState::from_raw(input.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (f, t) => {
            assert!(f.is_err() == (input.from > 7) && t.is_err() == (input.to > 7));
            return;
        }
    };
    let flags = MigrationFlags::from_bits(input.flags);
    let step = next_step(from, to, flags);
    let whole = path(from, to, flags);
    if let Ok(next) = step {
        assert!(next != DeviceState::Error);
        assert!(next.is_supported_by(flags), "{from}->{to}: step to unsupported {next}");
        assert_eq!(from == to, next == from, "{from}->{to}: step {next}");
    }
    if from == DeviceState::Error || from.is_supported_by(flags) {
        assert_eq!(step.is_ok(), whole.is_ok(), "{from}->{to} with {flags}: {step:?} vs {whole:?}");
    }
    if let Ok(p) = whole {
        assert_eq!(p.first(), Some(&from));
        assert_eq!(p.last(), Some(&to));
        assert!(p.len() <= ALL_STATES.len());
        for (i, pair) in p.windows(2).enumerate() {
            assert_eq!(next_step(pair[0], to, flags).ok(), Some(pair[1]), "{p:?}");
            assert!(pair[1].is_supported_by(flags));
            assert!(!p[..=i].contains(&pair[1]), "{p:?} visits a state twice");
            if pair[0].arc_opens(pair[1]).is_some() {
                assert_eq!(i + 2, p.len(), "{p:?} opens a session before its end");
            }
        }
    }
}

/// Small valid streams covering every record kind, for the fuzz corpus (deterministic).
pub fn seed_streams() -> Vec<(&'static str, Vec<u8>)> {
    let pci = DeviceIdentity::Pci {
        vendor: 0x15b3,
        device: 0x101e,
        subsystem_vendor: 0x15b3,
        subsystem_device: 0x0001,
    };
    let all = MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY;
    let build = |header: Header, recs: &[(SectionKind, u32, &[u8])]| {
        let mut w = StreamWriter::new(Vec::new(), header).expect("valid seed header");
        for (kind, dev, payload) in recs {
            w.write_chunk(*kind, *dev, payload).expect("valid seed record");
        }
        w.finish().expect("write into a Vec")
    };
    vec![
        (
            "empty",
            build(Header::single(DeviceIdentity::Unknown, MigrationFlags::STOP_COPY), &[]),
        ),
        (
            "emulated-stop-copy",
            build(
                Header::single(
                    DeviceIdentity::Emulated {
                        params: "size=4096,block=512".into(),
                    },
                    MigrationFlags::STOP_COPY,
                ),
                &[(SectionKind::StopCopy, 0, &[0x11; 32]), (SectionKind::StopCopy, 0, b"end")],
            ),
        ),
        (
            "pci-pre-copy-config",
            build(
                Header::single(pci, all),
                &[
                    (SectionKind::PreCopy, 0, b"initial"),
                    (SectionKind::PreCopy, 0, b""),
                    (SectionKind::StopCopy, 0, b"final"),
                    (SectionKind::Config, 0, &[0xff; 16]),
                ],
            ),
        ),
        (
            "two-devices",
            build(
                Header::new(vec![
                    DeviceEntry {
                        identity: DeviceIdentity::Mdev {
                            mdev_type: "mtty-2".into(),
                        },
                        flags: all,
                    },
                    DeviceEntry {
                        identity: DeviceIdentity::Mdev {
                            mdev_type: "mtty-1".into(),
                        },
                        flags: MigrationFlags::STOP_COPY,
                    },
                ]),
                &[
                    (SectionKind::PreCopy, 0, b"a"),
                    (SectionKind::StopCopy, 1, b"b"),
                    (SectionKind::Config, 1, b"c"),
                    (SectionKind::StopCopy, 0, b"d"),
                ],
            ),
        ),
    ]
}

/// Named seed inputs of one target.
pub type Seeds = Vec<(&'static str, Vec<u8>)>;

/// Write the seeds of every target into `dir/TARGET/` (created if needed), one file each;
/// returns how many were written.
pub fn write_seeds(dir: &std::path::Path) -> io::Result<usize> {
    let mut n = 0;
    let sets: [(&str, Seeds); 5] = [
        ("stream_reader", seed_streams()),
        (
            "stream_load",
            vec![
                ("emulated-512", saved_emulated_stream(512)),
                ("emulated-1000", saved_emulated_stream(1000)),
            ],
        ),
        ("transport_records", transport::records_seeds()),
        ("transport_control", transport::control_seeds()),
        ("transport_receiver", transport::receiver_seeds()),
    ];
    for (target, seeds) in sets {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        for (name, bytes) in seeds {
            std::fs::write(d.join(format!("{name}.bin")), bytes)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_valid_and_every_damage_is_refused() {
        for (name, bytes) in seed_streams() {
            let parsed = read_records(&bytes).unwrap_or_else(|e| panic!("seed {name}: {e}"));
            assert!(parsed.header.devices.len() <= 2);
            check_stream(&bytes);
            for cut in 0..bytes.len() {
                assert!(read_records(&bytes[..cut]).is_err(), "{name} cut at {cut}");
                check_stream(&bytes[..cut]);
            }
            let mut b = bytes.clone();
            for bit in 0..b.len() * 8 {
                b[bit / 8] ^= 1 << (bit % 8);
                assert!(read_records(&b).is_err(), "{name} bit {bit}");
                check_stream(&b);
                b[bit / 8] ^= 1 << (bit % 8);
            }
        }
    }

    #[test]
    fn saved_emulated_streams_load_and_damaged_ones_do_not() {
        let bytes = saved_emulated_stream(512);
        let report = inspect(&bytes[..]).expect("valid");
        assert!(report.sections[0].chunks >= 4, "{report}");
        let mut dev = EmulatedDevice::from_spec(LOAD_DEVICE).unwrap();
        load_stream(&mut dev, &bytes).expect("loads");
        let src = EmulatedDevice::from_spec(LOAD_DEVICE).unwrap();
        assert_eq!(dev.digest(), src.digest());
        check_stream_load(&bytes);
        // Every truncation, and a flipped bit in every byte, is refused and leaves the device usable.
        for cut in (0..bytes.len()).step_by(7) {
            let mut dev = EmulatedDevice::from_spec(LOAD_DEVICE).unwrap();
            assert!(load_stream(&mut dev, &bytes[..cut]).is_err(), "cut at {cut}");
            check_stream_load(&bytes[..cut]);
        }
        let mut b = bytes.clone();
        for i in (0..b.len()).step_by(5) {
            b[i] ^= 0x10;
            let mut dev = EmulatedDevice::from_spec(LOAD_DEVICE).unwrap();
            assert!(load_stream(&mut dev, &b).is_err(), "flip in byte {i}");
            check_stream_load(&b);
            b[i] ^= 0x10;
        }
        // Another device refuses before being touched.
        let mut other = EmulatedDevice::from_spec("size=4K,block=256,seed=5").unwrap();
        let e = load_stream(&mut other, &bytes).unwrap_err();
        assert!(e.contains("saved from"), "{e}");
    }

    #[test]
    fn recipes_encode_valid_and_invalid_streams() {
        let rec = |kind, device, sequence, payload: &[u8]| RecipeRecord {
            kind,
            optional: false,
            raw_flags: None,
            device,
            sequence,
            payload: payload.to_vec(),
        };
        let mut recipe = StreamRecipe {
            devices: vec![RecipeDevice {
                kind: 3,
                pre_copy: true,
                name: "size=4K".into(),
            }],
            records: vec![rec(0, 0, None, b"pre"), rec(2, 0, None, b"stop"), rec(5, 0, None, b"cfg")],
            end_tweak: None,
            omit_end: false,
            trailing: vec![],
        };
        let parsed = read_records(&recipe.encode()).expect("a clean recipe is a valid stream");
        assert_eq!(parsed.records.len(), 3);
        check_stream(&recipe.encode());
        // Each kind of damage is refused, with valid checksums everywhere.
        let mut bad = recipe.clone();
        bad.records[1].sequence = Some(5);
        assert!(read_records(&bad.encode()).is_err());
        let mut bad = recipe.clone();
        bad.records[1].device = 1;
        assert!(read_records(&bad.encode()).is_err());
        let mut bad = recipe.clone();
        bad.end_tweak = Some((4, 99));
        assert!(read_records(&bad.encode()).is_err());
        let mut bad = recipe.clone();
        bad.omit_end = true;
        assert!(read_records(&bad.encode()).is_err());
        let mut bad = recipe.clone();
        bad.trailing = vec![0];
        assert!(read_records(&bad.encode()).is_err());
        let mut bad = recipe.clone();
        bad.records.swap(0, 1);
        assert!(read_records(&bad.encode()).is_err());
        // An unknown optional record is skipped; an unknown mandatory one refused.
        recipe.records.push(RecipeRecord {
            optional: true,
            ..rec(7, 0, None, b"x")
        });
        assert_eq!(read_records(&recipe.encode()).unwrap().skipped, 1);
        recipe.records.last_mut().unwrap().optional = false;
        assert!(read_records(&recipe.encode()).is_err());
        check_stream_input(&recipe.encode());
    }

    #[test]
    fn garbage_is_refused_consistently() {
        for data in [&b""[..], b"VFIOMIGS", b"VFIOMIGS\x01\0\0\0\xff\xff\xff\xff", &[0u8; 64]] {
            check_stream(data);
            assert!(read_records(data).is_err());
        }
    }

    #[test]
    fn every_state_pair_and_flag_set_holds_the_invariants() {
        for from in 0..10 {
            for to in 0..10 {
                for flags in 0..16 {
                    check_path(&PathInput {
                        from,
                        to,
                        flags,
                        name: String::new(),
                    });
                }
            }
        }
        for name in ["running-p2p", "stop-copy,p2p", "0x7", "STOP_COPY+precopy", "bogus", ""] {
            check_path(&PathInput {
                from: 2,
                to: 3,
                flags: 1,
                name: name.into(),
            });
        }
    }
}
