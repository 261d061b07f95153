//! Device state inside the downtime, with the proposed `DeviceState` message (protocol version 1)
//! against version 0, in the same run (issue 11, part 5).
//!
//! Two emulated devices of 512 MiB state each (1 GiB in all), with PRE_COPY and a low dirty rate
//! (1 MiB/s each), migrate through the API Cloud Hypervisor uses (`VfioMigrationGroup`,
//! `MigratableVfioDevice` and the `vm-migration` traits, in Cloud Hypervisor's call order) from a
//! source thread to a destination thread over a unix socket pair, framed as Cloud Hypervisor frames
//! its messages (`benches/common`): `Start`, `Config`, `Memory` per iteration, `State`, `Complete`.
//! The version-1 bytes (`Start` negotiation, the `DeviceState` command, the switchover
//! acknowledgement) come from `ch_integration::protocol`. In both modes the destination prepares
//! its devices at `Config` (`VfioMigrationGroup::prepare`) and its device model adopts them at
//! `State` (`MigratableVfioDevice::new` under the same ids), then `restore`, and `resume` at
//! `Complete`.
//!
//! - **v1**: after each `Memory` message while the VM runs, the source sends the group's pre-copy
//!   data (`take_precopy`), one `DeviceState` message per `PrecopyItem::encode` payload; the
//!   destination decodes and `load_precopy`s each and answers `Ok` with `padding[0] = 1` once
//!   `switchover_ready()`. The source pauses when memory has converged, every device's initial
//!   data went out (`initial_data_sent`), the last answer acknowledged switchover and the devices'
//!   pending pre-copy data is small (or at a bound), so `State` carries only the rest.
//! - **v0**: no `DeviceState` (the source's `Start` offers no version, as Cloud Hypervisor's does,
//!   so the destination chooses 0): the source pauses when memory has converged and
//!   every byte of device state travels in `State` (each device's snapshot JSON, as Cloud
//!   Hypervisor's `State` carries it). The group's options are the same as for v1 (pre-copy on):
//!   only the protocol differs.
//!
//! Criterion measures the downtime (`iter_custom`: from the source's first `pause` to the
//! destination's last `resume`), and counts the socket bytes (both ways) inside it. Every run
//! checks that the destination devices hold the sources' content (`EmulatedHandle::digest`, after
//! the destination devices were reset so every block differs before the migration). The summary
//! line, printed once per run:
//!
//! `DEVSTATE-BENCH downtime_bytes v1/v0 = X (...); downtime_time v1/v0 = Y (...)` (target: both
//! at most 0.1). Nothing here asserts on time.
//!
//! `DEVSTATE_BENCH_SCALE=N` divides the device size by N for a quick run.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ch_integration::protocol::{self, Peer};
use ch_integration::{DeviceConfig, GroupOptions, MigratableVfioDevice, PrecopyItem, Transferred, VfioMigrationGroup};
use common::Conn;
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use vfio_migration::MigrationDevice;
use vfio_migration::emulated::{EmulatedConfig, EmulatedDevice, EmulatedHandle};
use vfio_migration::state::{DeviceState, MigrationFlags};
use vm_migration::protocol::{MemoryRange, MemoryRangeTable};
use vm_migration::{Migratable, Pausable, Snapshot, Snapshottable};

/// Devices per VM.
const DEVICES: usize = 2;
/// State bytes per device (before `DEVSTATE_BENCH_SCALE`).
const DEVICE_SIZE: u64 = 512 << 20;
/// Device state block (the emulated device's unit of change).
const BLOCK: u32 = 4096;
/// Bytes per second of device state that change while the VM runs, per device.
const DIRTY_RATE: u64 = 1 << 20;
/// The guest memory the devices reach (no guest memory is modelled: the devices do no DMA).
const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    length: 1 << 24,
};
/// Memory iterations until guest memory has converged (the model VM's memory).
const MEMORY_ITERATIONS: u32 = 3;
/// Device bytes still pending below which v1 may switch over.
const DEVICE_DOWNTIME_BYTES: u64 = 4 << 20;
/// Bounds on v1's pre-copy: iterations and time.
const MAX_ITERATIONS: u32 = 1000;
const MAX_PRECOPY: Duration = Duration::from_secs(120);
/// Most bytes of device state taken per iteration (all drained data fits: no spill in v1).
const PER_ITERATION: u64 = 128 << 20;
/// Largest request the destination accepts (a v0 `State`: 1 GiB in base64 inside JSON).
const MAX_REQUEST: u64 = 4 << 30;

fn scale() -> u64 {
    std::env::var("DEVSTATE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn device_size() -> u64 {
    DEVICE_SIZE / scale()
}

/// The group's options, the same on both sides and in both modes.
fn group_options() -> GroupOptions {
    GroupOptions {
        precopy: true,
        chunk_size: 1 << 20,
        drain_budget: 32 << 20,
        buffer_cap: 128 << 20,
        ..GroupOptions::default()
    }
}

fn device_config(i: usize, dirty_rate: u64) -> EmulatedConfig {
    EmulatedConfig {
        size: device_size(),
        block_size: BLOCK,
        seed: 0xd5 + i as u64,
        flags: MigrationFlags::KNOWN,
        dirty_rate,
        name: Some(format!("dev{i}")),
        ..EmulatedConfig::default()
    }
}

fn device_id(i: usize) -> String {
    format!("_vfio{i}")
}

/// The source VM's VFIO devices: one group, `DEVICES` emulated devices.
fn source_vm() -> (Vec<MigratableVfioDevice>, Vec<EmulatedHandle>) {
    let group = VfioMigrationGroup::new(group_options());
    let mut devs = Vec::new();
    let mut handles = Vec::new();
    for i in 0..DEVICES {
        let d = EmulatedDevice::new(device_config(i, DIRTY_RATE)).expect("emulated device");
        handles.push(d.handle());
        devs.push(
            MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new(device_id(i), vec![RAM]))
                .expect("register"),
        );
    }
    (devs, handles)
}

/// Destination at `Config`: the group, and the devices prepared in it before Cloud Hypervisor
/// builds its device model (`VfioMigrationGroup::prepare`), as protocol version 1 needs. Each
/// device is reset first, so its content differs from the source's in every block.
fn prepare_destination() -> (VfioMigrationGroup, Vec<EmulatedHandle>) {
    let group = VfioMigrationGroup::new(group_options());
    let mut handles = Vec::new();
    for i in 0..DEVICES {
        let mut d = EmulatedDevice::new(device_config(i, 0)).expect("emulated device");
        d.reset().expect("reset");
        handles.push(d.handle());
        group
            .prepare(Box::new(d), DeviceConfig::new(device_id(i), Vec::new()))
            .expect("prepare");
    }
    (group, handles)
}

/// Destination at `State`: Cloud Hypervisor's device model registers its devices under the same
/// ids, which adopts the prepared members (the second handle each brings is dropped unused).
fn adopt(group: &VfioMigrationGroup) -> Vec<MigratableVfioDevice> {
    (0..DEVICES)
        .map(|i| {
            let model = EmulatedDevice::new(device_config(i, 0)).expect("emulated device");
            let d = MigratableVfioDevice::new(group, Box::new(model), DeviceConfig::new(device_id(i), vec![RAM]))
                .expect("register");
            assert!(!group.is_prepared(&device_id(i)), "adopted");
            d
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    V0,
    V1,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::V0 => "v0",
            Mode::V1 => "v1",
        }
    }

    /// `Start`'s headers: v1 offers protocol version 1; v0 sends Cloud Hypervisor's zero headers.
    fn start_headers(self) -> [u8; 6] {
        match self {
            Mode::V0 => [0; 6],
            Mode::V1 => protocol::start_headers(),
        }
    }

    fn version(self) -> u16 {
        match self {
            Mode::V0 => 0,
            Mode::V1 => 1,
        }
    }
}

/// What one migration measured.
#[derive(Clone, Debug)]
struct Outcome {
    mode: Mode,
    downtime: Duration,
    /// From the first pause: every device stopped (stop-copy read), snapshot taken, `State`
    /// answered (restored on the destination).
    phases: [Duration; 3],
    downtime_bytes: u64,
    state_bytes: u64,
    precopy_bytes: u64,
    device_state_messages: u64,
    transferred: Transferred,
    iterations: u32,
    reason: &'static str,
}

/// What the destination reports when `Complete` resumed its devices.
struct Resumed {
    at: Instant,
    version: u16,
    digests: Vec<u64>,
    states: Vec<DeviceState>,
    loaded_items: u64,
}

/// Destination VMM: answers the source until `Complete`.
fn destination(sock: UnixStream) -> Resumed {
    let mut conn = Conn::new(sock);
    let mut version = 0;
    let mut prepared: Option<(VfioMigrationGroup, Vec<EmulatedHandle>)> = None;
    let mut devs: Vec<MigratableVfioDevice> = Vec::new();
    let mut loaded_items = 0u64;
    loop {
        let (cmd, headers, payload) = conn.read_request(MAX_REQUEST).expect("request");
        match cmd {
            common::START => {
                // This destination prepares its devices at `Config`: it can load ahead.
                version = protocol::choose_version(protocol::offered_version(&headers), true);
                conn.respond(common::OK, protocol::start_response_padding(version))
            }
            common::CONFIG => {
                let devices: usize = String::from_utf8(payload).expect("config").parse().expect("config");
                assert_eq!(devices, DEVICES, "config");
                prepared = Some(prepare_destination());
                conn.respond(common::OK, [0; 6])
            }
            common::MEMORY => {
                let table = MemoryRangeTable::read_from(&mut &payload[..], payload.len() as u64).expect("memory table");
                // No guest memory is modelled: the devices do no DMA.
                assert!(table.is_empty(), "no DMA, no dirty memory");
                conn.respond(common::OK, [0; 6])
            }
            common::DEVICE_STATE => {
                assert_eq!(version, 1, "DeviceState in version {version}");
                assert!(payload.len() as u64 <= protocol::MAX_DEVICE_STATE_PAYLOAD);
                let (group, _) = prepared.as_ref().expect("Config before DeviceState");
                let item = PrecopyItem::decode(&payload).expect("device-state payload");
                group.load_precopy(&item).expect("load_precopy");
                loaded_items += 1;
                let padding = protocol::device_state_response_padding(group.switchover_ready());
                conn.respond(common::OK, padding)
            }
            common::STATE => {
                let snaps: BTreeMap<String, Snapshot> = serde_json::from_slice(&payload).expect("state");
                drop(payload);
                let (group, _) = prepared.as_ref().expect("Config before State");
                devs = adopt(group);
                for d in devs.iter_mut() {
                    d.restore(&snaps[&d.id()]).expect("restore");
                }
                conn.respond(common::OK, [0; 6])
            }
            common::COMPLETE => {
                for d in devs.iter_mut() {
                    d.resume().expect("resume");
                }
                let at = Instant::now();
                conn.respond(common::OK, [0; 6]).expect("respond");
                let (_, handles) = prepared.take().expect("Config before Complete");
                return Resumed {
                    at,
                    version,
                    digests: handles.iter().map(EmulatedHandle::digest).collect(),
                    states: handles.iter().map(EmulatedHandle::device_state).collect(),
                    loaded_items,
                };
            }
            c => panic!("unexpected command {c}"),
        }
        .expect("respond");
    }
}

/// Every device's `dirty_log` (the group's first device returns the group's ranges), then the
/// `Memory` message with the merged table (no page data: no guest memory is modelled).
fn memory_iteration(conn: &mut Conn, src: &mut [MigratableVfioDevice]) {
    let mut table = MemoryRangeTable::default();
    for d in src.iter_mut() {
        table.extend(d.dirty_log().expect("dirty_log"));
    }
    let mut payload = Vec::new();
    table.write_to(&mut payload).expect("table");
    conn.call(common::MEMORY, &payload).expect("Memory");
}

/// One migration, Cloud Hypervisor's call order on both sides.
fn migrate(mode: Mode) -> Outcome {
    let (a, b) = UnixStream::pair().expect("socket pair");
    let (mut src, handles) = source_vm();
    let dest = std::thread::spawn(move || destination(b));
    let mut conn = Conn::new(a);

    conn.request(common::START, mode.start_headers(), &[]).expect("Start");
    let peer = Peer::from_start_response(&conn.read_response().expect("Start response"));
    assert_eq!(peer, Peer::Ours(mode.version()));
    conn.call(common::CONFIG, DEVICES.to_string().as_bytes())
        .expect("Config");

    for d in src.iter_mut() {
        d.start_migration().expect("start_migration");
    }
    for d in src.iter_mut() {
        d.start_dirty_log().expect("start_dirty_log");
    }
    let group = src[0].group().clone();
    let started = Instant::now();
    let mut iterations = 0;
    let mut acked = false;
    let mut precopy_bytes = 0u64;
    let mut device_state_messages = 0u64;
    let reason = loop {
        iterations += 1;
        memory_iteration(&mut conn, &mut src);
        if !peer.device_state() {
            if iterations >= MEMORY_ITERATIONS {
                break "memory-converged";
            }
            continue;
        }
        for item in group.take_precopy(PER_ITERATION).expect("take_precopy") {
            let payload = item.encode();
            precopy_bytes += payload.len() as u64 + 32;
            device_state_messages += 1;
            acked = protocol::switchover_acknowledged(&conn.call(common::DEVICE_STATE, &payload).expect("DeviceState"));
        }
        let (pending, _) = group.precopy_pending().expect("precopy_pending");
        if iterations >= MEMORY_ITERATIONS && group.initial_data_sent() && acked && pending <= DEVICE_DOWNTIME_BYTES {
            break "converged";
        }
        if iterations >= MAX_ITERATIONS {
            break "iteration-limit";
        }
        if started.elapsed() >= MAX_PRECOPY {
            break "time-limit";
        }
    };

    // The downtime starts with the first pause.
    let paused_at = Instant::now();
    let bytes_at_pause = conn.total();
    for d in src.iter_mut() {
        d.pause().expect("pause");
    }
    let stopped = paused_at.elapsed();
    memory_iteration(&mut conn, &mut src);
    let mut snaps = BTreeMap::new();
    for d in src.iter_mut() {
        snaps.insert(d.id(), d.snapshot().expect("snapshot"));
    }
    let snapshotted = paused_at.elapsed();
    memory_iteration(&mut conn, &mut src);
    let state = serde_json::to_vec(&snaps).expect("State");
    drop(snaps);
    let state_bytes = state.len() as u64;
    conn.call(common::STATE, &state).expect("State");
    drop(state);
    let restored = paused_at.elapsed();
    conn.call(common::COMPLETE, &[]).expect("Complete");
    let downtime_bytes = conn.total() - bytes_at_pause;
    let transferred = group.transferred();
    for d in src.iter_mut() {
        d.stop_dirty_log().expect("stop_dirty_log");
    }
    for d in src.iter_mut() {
        d.complete_migration().expect("complete_migration");
    }
    let resumed = dest.join().expect("destination");

    // A benchmark that moves the wrong bytes is worthless.
    assert_eq!(resumed.version, mode.version());
    assert!(handles.iter().all(|h| h.device_state() == DeviceState::Stop));
    assert!(resumed.states.iter().all(|s| *s == DeviceState::Running));
    let src_digests: Vec<u64> = handles.iter().map(EmulatedHandle::digest).collect();
    assert_eq!(
        src_digests,
        resumed.digests,
        "{}: destination content differs",
        mode.name()
    );
    assert_eq!(resumed.loaded_items, device_state_messages);
    match mode {
        Mode::V0 => assert_eq!((device_state_messages, transferred.precopy_bytes), (0, 0)),
        Mode::V1 => assert!(
            precopy_bytes >= DEVICES as u64 * device_size(),
            "v1 sent the initial data ahead"
        ),
    }
    Outcome {
        mode,
        downtime: resumed.at.duration_since(paused_at),
        phases: [stopped, snapshotted, restored],
        downtime_bytes,
        state_bytes,
        precopy_bytes,
        device_state_messages,
        transferred,
        iterations,
        reason,
    }
}

/// Every measured migration, for the summary.
static OUTCOMES: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());

/// Means over the runs of `mode`: downtime, downtime bytes, and the last run.
fn mean(mode: Mode) -> Option<(Duration, u64, Outcome)> {
    let all = OUTCOMES.lock().unwrap();
    let v: Vec<&Outcome> = all.iter().filter(|o| o.mode == mode).collect();
    let n = u32::try_from(v.len()).ok().filter(|n| *n > 0)?;
    let time = v.iter().map(|o| o.downtime).sum::<Duration>() / n;
    let bytes = v.iter().map(|o| o.downtime_bytes).sum::<u64>() / u64::from(n);
    Some((time, bytes, (*v[v.len() - 1]).clone()))
}

fn devstate(c: &mut Criterion) {
    let mut g = c.benchmark_group(format!("devstate_{DEVICES}x{}MiB_low_dirty_rate", device_size() >> 20));
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    for mode in [Mode::V1, Mode::V0] {
        g.bench_function(mode.name(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let o = migrate(mode);
                    total += o.downtime;
                    OUTCOMES.lock().unwrap().push(o);
                }
                total
            })
        });
    }
    g.finish();
    let runs = OUTCOMES.lock().unwrap().len();
    let (Some((t1, b1, o1)), Some((t0, b0, o0))) = (mean(Mode::V1), mean(Mode::V0)) else {
        return;
    };
    for o in [&o1, &o0] {
        println!(
            "DEVSTATE-BENCH {} (last run): {} iterations, switch {}, {} DeviceState messages ({} bytes), \
             device data {} bytes ahead + {} bytes in State, State {} bytes, downtime {} bytes, {:.1} ms \
             (from pause: stopped {:.1} ms, snapshot {:.1} ms, State restored {:.1} ms)",
            o.mode.name(),
            o.iterations,
            o.reason,
            o.device_state_messages,
            o.precopy_bytes,
            o.transferred.precopy_bytes,
            o.transferred.stop_copy_bytes,
            o.state_bytes,
            o.downtime_bytes,
            o.downtime.as_secs_f64() * 1e3,
            o.phases[0].as_secs_f64() * 1e3,
            o.phases[1].as_secs_f64() * 1e3,
            o.phases[2].as_secs_f64() * 1e3,
        );
    }
    println!(
        "DEVSTATE-BENCH downtime_bytes v1/v0 = {:.6} (v1 {b1} bytes, v0 {b0} bytes); \
         downtime_time v1/v0 = {:.4} (v1 {:.1} ms, v0 {:.1} ms) [{DEVICES} x {} MiB, means of {runs} runs, target <= 0.1]",
        b1 as f64 / b0 as f64,
        t1.as_secs_f64() / t0.as_secs_f64(),
        t1.as_secs_f64() * 1e3,
        t0.as_secs_f64() * 1e3,
        device_size() >> 20,
    );
}

criterion_group!(benches, devstate);
criterion_main!(benches);
