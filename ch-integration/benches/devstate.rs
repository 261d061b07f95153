//! Device state inside the downtime, with the proposed `DeviceState` message (protocol version 1)
//! against version 0, in the same run (issue 11, part 5).
//!
//! Two emulated devices of 512 MiB state each (1 GiB in all), with PRE_COPY and a low dirty rate
//! (1 MiB/s each), in groups with Cloud Hypervisor's options, migrate through the API Cloud
//! Hypervisor uses (`VfioMigrationGroup`, `MigratableVfioDevice` and the `vm-migration` traits, in
//! Cloud Hypervisor's call order) from a source thread to a destination thread over a unix socket
//! pair, framed as Cloud Hypervisor frames its messages (`benches/common`): `Start`, `Config`,
//! `Memory` per iteration, `State`, `Complete`. The version-1 bytes (`Start` negotiation, the
//! `DeviceState` command, the switchover acknowledgement) come from `ch_integration::protocol`. In
//! both modes the destination prepares its devices at `Config` (`VfioMigrationGroup::prepare`) and
//! its device model adopts them at `State` (`MigratableVfioDevice::new` under the same ids), then
//! `restore`, and `resume` at `Complete`.
//!
//! - **v1**: as Cloud Hypervisor's patch 0007 does, the source sends the group's pre-copy data
//!   (`take_precopy`) once right after `start_dirty_log` and then after each `Memory` message
//!   while the VM runs, one `DeviceState` message per `PrecopyItem::encode` payload; the
//!   destination decodes and `load_precopy`s each and answers `Ok` with `padding[0] = 1` once
//!   `switchover_ready()`. The source pauses when memory has converged (here: at the third
//!   iteration), every device's initial data went out (`initial_data_sent`) and the last answer
//!   acknowledged switchover (or after waiting 10 s for it), so `State` carries only the rest.
//! - **v0**: no `DeviceState` (the source's `Start` offers no version, as an unpatched Cloud
//!   Hypervisor's does, so the destination chooses 0): the source pauses when memory has converged
//!   and every byte of device state travels in `State` (each device's snapshot JSON, as Cloud
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
/// The memory iteration at which guest memory has converged (the model VM's memory).
const MEMORY_CONVERGED_AT: u32 = 3;
/// Most device state bytes sent after one memory iteration (Cloud Hypervisor's
/// `BUDGET_PER_ITERATION`, patch 0007).
const BUDGET_PER_ITERATION: u64 = 256 << 20;
/// How long the source waits, once memory has converged, for the switchover acknowledgement
/// (Cloud Hypervisor's `SWITCHOVER_ACK_WAIT`).
const SWITCHOVER_ACK_WAIT: Duration = Duration::from_secs(10);
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

/// The group's options, as Cloud Hypervisor's device manager sets them (`vfio_precopy=on`), the
/// same on both sides and in both modes.
fn group_options() -> GroupOptions {
    GroupOptions {
        precopy: true,
        snapshot_to_file: true,
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

/// Every device's `dirty_log` (the group's first device returns the group's ranges).
fn dirty_log(src: &mut [MigratableVfioDevice]) -> MemoryRangeTable {
    let mut table = MemoryRangeTable::default();
    for d in src.iter_mut() {
        table.extend(d.dirty_log().expect("dirty_log"));
    }
    table
}

/// The `Memory` message with `table` (no page data: no guest memory is modelled).
fn send_memory(conn: &mut Conn, table: &MemoryRangeTable) {
    let mut payload = Vec::new();
    table.write_to(&mut payload).expect("table");
    conn.call(common::MEMORY, &payload).expect("Memory");
}

/// The source side of protocol version 1, as Cloud Hypervisor's `DeviceStateSender` (patch 0007)
/// does it.
struct DeviceStateSender {
    group: VfioMigrationGroup,
    /// Version 1 was negotiated.
    active: bool,
    sent_items: bool,
    acknowledged: bool,
    converged_at: Option<Instant>,
    messages: u64,
    wire_bytes: u64,
}

impl DeviceStateSender {
    /// After a memory iteration: a `DeviceState` message per item the devices have.
    fn send(&mut self, conn: &mut Conn) {
        if !self.active {
            return;
        }
        for item in self.group.take_precopy(BUDGET_PER_ITERATION).expect("take_precopy") {
            let payload = item.encode();
            let padding = conn.call(common::DEVICE_STATE, &payload).expect("DeviceState");
            self.sent_items = true;
            self.acknowledged = protocol::switchover_acknowledged(&padding);
            self.messages += 1;
            self.wire_bytes += 32 + payload.len() as u64;
        }
    }

    /// Every device's initial data went ahead and the destination acknowledged loading it.
    fn switchover_ok(&self) -> bool {
        !self.active || (self.group.initial_data_sent() && (!self.sent_items || self.acknowledged))
    }

    /// Memory has converged: whether to stop waiting for the acknowledgement.
    fn give_up_waiting(&mut self) -> bool {
        self.converged_at.get_or_insert_with(Instant::now).elapsed() >= SWITCHOVER_ACK_WAIT
    }
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
    let mut sender = DeviceStateSender {
        group: group.clone(),
        active: peer.device_state(),
        sent_items: false,
        acknowledged: false,
        converged_at: None,
        messages: 0,
        wire_bytes: 0,
    };
    // The devices' initial data goes first, so it loads while the memory streams.
    sender.send(&mut conn);
    let mut iterations = 0;
    let (remaining, reason) = loop {
        iterations += 1;
        let table = dirty_log(&mut src);
        if iterations >= MEMORY_CONVERGED_AT {
            if sender.switchover_ok() {
                break (table, "converged");
            }
            if sender.give_up_waiting() {
                break (table, "ack-wait-limit");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        send_memory(&mut conn, &table);
        sender.send(&mut conn);
    };
    let (precopy_bytes, device_state_messages) = (sender.wire_bytes, sender.messages);

    // The downtime starts with the first pause.
    let paused_at = Instant::now();
    let bytes_at_pause = conn.total();
    for d in src.iter_mut() {
        d.pause().expect("pause");
    }
    let stopped = paused_at.elapsed();
    let mut last = dirty_log(&mut src);
    last.extend(remaining);
    send_memory(&mut conn, &last);
    let mut snaps = BTreeMap::new();
    for d in src.iter_mut() {
        snaps.insert(d.id(), d.snapshot().expect("snapshot"));
    }
    let snapshotted = paused_at.elapsed();
    send_memory(&mut conn, &dirty_log(&mut src));
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
