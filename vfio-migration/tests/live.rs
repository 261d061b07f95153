//! The live engine's source side: the two-phase return to RUNNING (abort and
//! `resume_source`), recorded arc by arc, a paused VM's devices (STOP to STOP_COPY, back to STOP
//! on abort), and convergence over devices of unequal dirty rates
//! (full passes, a rotating first device, the switchover reason).

use std::sync::{Arc, Mutex};

use vfio_migration::device::{DeviceError, DeviceIdentity, DmaRange, TransferSession};
use vfio_migration::emulated::EmulatedDevice;
use vfio_migration::live::{LocalMigration, SeqSink, SinkEvent, Source, SourceOptions, resume_source};
use vfio_migration::state::{self, MigrationFlags};
use vfio_migration::{DeviceState, MigrationDevice};

type Log = Arc<Mutex<Vec<(String, DeviceState, DeviceState)>>>;

/// An emulated device that records every arc the kernel would take for its transitions.
struct Recorder {
    dev: EmulatedDevice,
    log: Log,
    /// Report [`DeviceIdentity::Unknown`], as a kernel device whose sysfs cannot be read does.
    unknown: bool,
}

impl MigrationDevice for Recorder {
    fn name(&self) -> &str {
        self.dev.name()
    }
    fn identity(&self) -> DeviceIdentity {
        if self.unknown {
            DeviceIdentity::Unknown
        } else {
            self.dev.identity()
        }
    }
    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        self.dev.flags()
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        MigrationDevice::state(&self.dev)
    }
    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        let from = MigrationDevice::state(&self.dev)?;
        let path = state::path(from, to, self.dev.flags()?).unwrap_or_default();
        let r = self.dev.set_state(to)?;
        let mut log = self.log.lock().unwrap();
        for arc in path.windows(2) {
            log.push((self.dev.name().to_string(), arc[0], arc[1]));
        }
        Ok(r)
    }
    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        self.dev.stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.dev.reset()
    }
    fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError> {
        self.dev.dma_log_start(ranges, page_size)
    }
    fn dma_log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.dev.dma_log_report(iova, length, page_size, bitmap)
    }
    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        self.dev.dma_log_stop()
    }
}

fn recorded(n: usize, log: &Log) -> Vec<Box<dyn MigrationDevice>> {
    (0..n)
        .map(|i| {
            let dev = EmulatedDevice::from_spec(&format!("name=d{i},size=256K,seed={i}")).unwrap();
            Box::new(Recorder {
                dev,
                log: log.clone(),
                unknown: false,
            }) as Box<dyn MigrationDevice>
        })
        .collect()
}

/// No device reaches RUNNING before every device has left its stopped state for RUNNING_P2P.
fn assert_two_phases(log: &[(String, DeviceState, DeviceState)], devices: usize) {
    let last_p2p = log
        .iter()
        .rposition(|(_, _, to)| *to == DeviceState::RunningP2p)
        .expect("the devices went through RUNNING_P2P");
    let first_running = log
        .iter()
        .position(|(_, _, to)| *to == DeviceState::Running)
        .expect("the devices reached RUNNING");
    assert!(
        last_p2p < first_running,
        "a device ran while a peer was stopped: {log:?}"
    );
    let p2p: std::collections::BTreeSet<&str> = log
        .iter()
        .filter(|(_, _, to)| *to == DeviceState::RunningP2p)
        .map(|(d, _, _)| d.as_str())
        .collect();
    assert_eq!(p2p.len(), devices, "{log:?}");
}

fn discard(counters: &mut [u64]) -> SeqSink<'_, impl FnMut(SinkEvent<'_>) -> std::io::Result<()>> {
    SeqSink::new(counters, |_| Ok(()))
}

#[test]
fn abort_after_stop_copy_returns_every_device_to_running_p2p_before_any_runs() {
    let log = Log::default();
    let opts = SourceOptions {
        parallel: false,
        ..SourceOptions::default()
    };
    let mut src = Source::new(recorded(3, &log), opts).unwrap();
    src.start().unwrap();
    let mut counters = vec![0; 3];
    src.iterate(&mut discard(&mut counters), 64 << 10).unwrap();
    src.stop_copy(&mut discard(&mut counters)).unwrap();
    log.lock().unwrap().clear();
    let recoveries = src.abort();
    assert_eq!(recoveries.len(), 3, "{recoveries:?}");
    assert!(
        recoveries
            .iter()
            .all(|(_, r)| r.final_state() == Some(DeviceState::Running))
    );
    assert_two_phases(&log.lock().unwrap(), 3);
    for i in 0..3 {
        assert_eq!(src.device(i).unwrap().state().unwrap(), DeviceState::Running);
    }
}

#[test]
fn abort_after_quiescing_also_takes_two_phases() {
    let log = Log::default();
    let mut src = Source::new(recorded(2, &log), SourceOptions::default()).unwrap();
    src.start().unwrap();
    src.quiesce().unwrap();
    // Both devices are PRE_COPY_P2P: neither may run before the other is back in RUNNING_P2P.
    log.lock().unwrap().clear();
    src.abort();
    assert_two_phases(&log.lock().unwrap(), 2);
}

#[test]
fn resume_source_takes_two_phases_and_refuses_a_destination() {
    let log = Log::default();
    let mut devs = recorded(3, &log);
    for d in &mut devs {
        d.set_state(DeviceState::Stop).unwrap();
    }
    log.lock().unwrap().clear();
    resume_source(&mut devs).unwrap();
    assert_two_phases(&log.lock().unwrap(), 3);
    assert!(devs.iter().all(|d| d.state().unwrap() == DeviceState::Running));

    let mut dst = recorded(1, &log);
    dst[0].set_state(DeviceState::Resuming).unwrap();
    let err = resume_source(&mut dst).unwrap_err();
    assert!(err.to_string().contains("RESUMING"), "{err}");
    assert_eq!(
        dst[0].state().unwrap(),
        DeviceState::Resuming,
        "refused before touching it"
    );
}

// ---------------------------------------------------------------------------------------------
// A paused VM's devices (all STOP when the migration starts).

fn stopped(log: &Log, n: usize) -> Vec<Box<dyn MigrationDevice>> {
    let mut devs = recorded(n, log);
    for d in &mut devs {
        d.set_state(DeviceState::Stop).unwrap();
    }
    log.lock().unwrap().clear();
    devs
}

/// Whether any arc in `log` makes a device run (RUNNING, RUNNING_P2P or a pre-copy state).
fn ran(log: &Log) -> bool {
    log.lock().unwrap().iter().any(|(_, _, to)| {
        matches!(
            to,
            DeviceState::Running | DeviceState::RunningP2p | DeviceState::PreCopy | DeviceState::PreCopyP2p
        )
    })
}

#[test]
fn a_paused_vms_devices_go_stop_to_stop_copy_and_never_run() {
    let log = Log::default();
    let mut src = Source::new(stopped(&log, 2), SourceOptions::default()).unwrap();
    src.start().unwrap();
    assert!(!src.precopy_active(), "a stopped device has no pre-copy");
    let mut counters = vec![0; 2];
    assert_eq!(src.iterate(&mut discard(&mut counters), 64 << 10).unwrap(), 0);
    let report = src.stop_copy(&mut discard(&mut counters)).unwrap();
    assert!(report.bytes.iter().all(|&b| b > 256 << 10), "{report:?}");
    src.finish().unwrap();
    let arcs = log.lock().unwrap().clone();
    let want: Vec<(String, DeviceState, DeviceState)> = ["emulated:d0", "emulated:d1"]
        .iter()
        .flat_map(|d| {
            [
                (d.to_string(), DeviceState::Stop, DeviceState::StopCopy),
                (d.to_string(), DeviceState::StopCopy, DeviceState::Stop),
            ]
        })
        .collect();
    let mut sorted = arcs.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(sorted, want, "{arcs:?}");
}

#[test]
fn a_paused_vms_devices_go_back_to_stop_when_the_migration_aborts() {
    let log = Log::default();
    let mut src = Source::new(stopped(&log, 2), SourceOptions::default()).unwrap();
    src.start().unwrap();
    let mut counters = vec![0; 2];
    src.stop_copy(&mut discard(&mut counters)).unwrap();
    let recoveries = src.abort();
    assert_eq!(recoveries.len(), 2, "{recoveries:?}");
    assert!(
        recoveries
            .iter()
            .all(|(_, r)| r.final_state() == Some(DeviceState::Stop)),
        "{recoveries:?}"
    );
    assert!(!ran(&log), "a paused VM's device ran: {:?}", log.lock().unwrap());
    for i in 0..2 {
        assert_eq!(src.device(i).unwrap().state().unwrap(), DeviceState::Stop);
    }
}

/// A snapshot of a paused VM reads its devices with `stop_copy` straight from idle (no
/// `start`): they go STOP -> STOP_COPY -> STOP, never through RUNNING_P2P.
#[test]
fn a_paused_vms_devices_stop_copy_straight_from_idle_without_running() {
    let log = Log::default();
    let mut src = Source::new(stopped(&log, 2), SourceOptions::default()).unwrap();
    let mut counters = vec![0; 2];
    let report = src.stop_copy(&mut discard(&mut counters)).unwrap();
    assert!(report.bytes.iter().all(|&b| b > 256 << 10), "{report:?}");
    src.finish().unwrap();
    assert!(!ran(&log), "a paused VM's device ran: {:?}", log.lock().unwrap());
    assert_eq!(log.lock().unwrap().len(), 4, "{:?}", log.lock().unwrap());
}

/// A paused VM's snapshot that fails while the devices are read leaves them STOP (the VM is
/// still paused): the engine's own recovery never starts them.
#[test]
fn a_paused_vms_failed_save_straight_from_idle_leaves_its_devices_stopped() {
    for parallel in [false, true] {
        let log = Log::default();
        let opts = SourceOptions {
            parallel,
            ..SourceOptions::default()
        };
        let mut src = Source::new(stopped(&log, 2), opts).unwrap();
        let mut counters = vec![0; 2];
        let mut seen = 0;
        let mut sink = SeqSink::new(&mut counters, |_| {
            seen += 1;
            if seen > 1 {
                Err(std::io::Error::other("snapshot disk full"))
            } else {
                Ok(())
            }
        });
        let err = src.stop_copy(&mut sink).unwrap_err().to_string();
        assert!(err.contains("snapshot disk full"), "{err}");
        assert!(!ran(&log), "a paused VM's device ran: {:?}", log.lock().unwrap());
        for i in 0..2 {
            assert_eq!(
                src.device(i).unwrap().state().unwrap(),
                DeviceState::Stop,
                "parallel={parallel}"
            );
        }
    }
}

/// Straight from idle, devices the VMM's pause already quiesced (RUNNING_P2P) are read as they
/// are: a migration without pre-copy stops them at stop-copy (Cloud Hypervisor's local
/// migration takes this path).
#[test]
fn a_stop_copy_straight_from_idle_takes_devices_already_quiesced() {
    let log = Log::default();
    let mut devs = recorded(2, &log);
    for d in &mut devs {
        d.set_state(DeviceState::RunningP2p).unwrap();
    }
    log.lock().unwrap().clear();
    let mut src = Source::new(devs, SourceOptions::default()).unwrap();
    let mut counters = vec![0; 2];
    src.stop_copy(&mut discard(&mut counters)).unwrap();
    src.finish().unwrap();
    for i in 0..2 {
        assert_eq!(src.device(i).unwrap().state().unwrap(), DeviceState::Stop);
    }
}

#[test]
fn running_and_stopped_devices_together_are_refused_untouched() {
    let log = Log::default();
    let mut devs = recorded(2, &log);
    devs[1].set_state(DeviceState::Stop).unwrap();
    log.lock().unwrap().clear();
    let mut src = Source::new(devs, SourceOptions::default()).unwrap();
    let err = src.start().unwrap_err().to_string();
    assert!(err.contains("d1: is STOP") && err.contains("RUNNING"), "{err}");
    assert!(log.lock().unwrap().is_empty(), "touched: {:?}", log.lock().unwrap());
    assert_eq!(src.device(0).unwrap().state().unwrap(), DeviceState::Running);
    assert_eq!(src.device(1).unwrap().state().unwrap(), DeviceState::Stop);

    // The other way round: the first device decides that the VM is paused. The same at a
    // stop-copy straight from idle (a snapshot of a paused VM takes that path).
    for stop_copy in [false, true] {
        let mut devs = recorded(2, &log);
        devs[0].set_state(DeviceState::Stop).unwrap();
        log.lock().unwrap().clear();
        let mut src = Source::new(devs, SourceOptions::default()).unwrap();
        let err = if stop_copy {
            src.stop_copy(&mut discard(&mut [0; 2])).unwrap_err()
        } else {
            src.start().unwrap_err()
        };
        assert!(
            err.to_string().contains("emulated:d1: is RUNNING while emulated:d0 is STOP: a migration starts with every device RUNNING, or every device STOP"),
            "stop_copy={stop_copy}: {err}"
        );
        assert!(log.lock().unwrap().is_empty(), "touched: {:?}", log.lock().unwrap());
    }
}

#[test]
fn a_paused_vms_devices_migrate_locally_with_their_state() {
    let mut srcs: Vec<EmulatedDevice> = (0..2)
        .map(|i| EmulatedDevice::from_spec(&format!("name=s{i},size=1M,seed={i}")).unwrap())
        .collect();
    let mut dsts: Vec<EmulatedDevice> = (0..2)
        .map(|i| EmulatedDevice::from_spec(&format!("name=t{i},size=1M,seed={i}")).unwrap())
        .collect();
    for d in &mut srcs {
        d.set_state(DeviceState::Stop).unwrap();
    }
    let report = run(&LocalMigration::default(), &mut srcs, &mut dsts);
    assert!(report.precopy_bytes.iter().all(|&b| b == 0), "{report:?}");
    assert!(report.stop_copy_bytes.iter().all(|&b| b > 0), "{report:?}");
    for d in &srcs {
        assert_eq!(MigrationDevice::state(d).unwrap(), DeviceState::Stop);
    }
}

// ---------------------------------------------------------------------------------------------
// Convergence with three devices of unequal dirty rates.

fn unequal(prefix: &str, dirty: bool) -> Vec<EmulatedDevice> {
    [("8M", 1u64), ("1M", 2), ("0", 3)]
        .iter()
        .map(|(rate, seed)| {
            let extra = if dirty {
                format!(",dirty-rate={rate}")
            } else {
                String::new()
            };
            EmulatedDevice::from_spec(&format!("name={prefix}{seed},size=1M,seed={seed}{extra}")).unwrap()
        })
        .collect()
}

fn run(
    m: &LocalMigration,
    srcs: &mut [EmulatedDevice],
    dsts: &mut [EmulatedDevice],
) -> vfio_migration::live::MigrationReport {
    let report = m
        .run(
            srcs.iter_mut()
                .map(|d| Box::new(d) as Box<dyn MigrationDevice>)
                .collect(),
            dsts.iter_mut()
                .map(|d| Box::new(d) as Box<dyn MigrationDevice>)
                .collect(),
            &mut |_| {},
        )
        .unwrap();
    for (s, d) in srcs.iter().zip(dsts.iter()) {
        assert_eq!(s.digest(), d.digest(), "{report:?}");
    }
    report
}

#[test]
fn the_pass_bound_counts_full_passes_over_every_device() {
    let (mut srcs, mut dsts) = (unequal("src", true), unequal("dst", false));
    let mut m = LocalMigration::default();
    // A budget far below one device per step, and a downtime goal nothing meets: only the
    // pass bound ends pre-copy.
    m.convergence.iteration_budget = 64 << 10;
    m.convergence.downtime_limit = std::time::Duration::ZERO;
    m.convergence.max_iterations = 3;
    let report = run(&m, &mut srcs, &mut dsts);
    assert_eq!(report.switch_reason, "pass-limit", "{report:?}");
    assert_eq!(report.iterations(), 3, "{report:?}");
    // Every pass read every device until it had nothing more: all initial data moved in
    // pre-copy, whatever each device's dirty rate, and none was starved.
    for (i, b) in report.precopy_bytes.iter().enumerate() {
        assert!(*b >= 1 << 20, "device {i}: {report:?}");
    }
}

#[test]
fn three_devices_of_unequal_dirty_rates_switch_over_converged() {
    let (mut srcs, mut dsts) = (unequal("src", true), unequal("dst", false));
    let report = run(&LocalMigration::default(), &mut srcs, &mut dsts);
    assert_eq!(report.switch_reason, "converged", "{report:?}");
    assert!(report.precopy_bytes.iter().all(|b| *b >= 1 << 20), "{report:?}");
}

/// One identity check for every path: an unknown identity on either side is refused before any
/// device is touched (it used to be a wildcard here), unless forced; forcing never lets two known,
/// different identities through.
#[test]
fn an_unknown_identity_is_refused_unless_forced() {
    let pair = |src_unknown: bool, dst_unknown: bool, dst_spec: &str, log: &Log| {
        let src = Recorder {
            dev: EmulatedDevice::from_spec("name=s,size=256K,seed=4").unwrap(),
            log: log.clone(),
            unknown: src_unknown,
        };
        let dst = Recorder {
            dev: EmulatedDevice::from_spec(dst_spec).unwrap(),
            log: log.clone(),
            unknown: dst_unknown,
        };
        src.dev.touch_blocks(5).unwrap();
        let handles = (src.dev.handle(), dst.dev.handle());
        (
            vec![Box::new(src) as Box<dyn MigrationDevice>],
            vec![Box::new(dst) as Box<dyn MigrationDevice>],
            handles,
        )
    };
    for (src_unknown, dst_unknown) in [(true, false), (false, true), (true, true)] {
        let label = format!("source unknown {src_unknown}, destination unknown {dst_unknown}");
        let log = Log::default();
        let (srcs, dsts, (sh, dh)) = pair(src_unknown, dst_unknown, "name=d,size=256K,seed=4", &log);
        let before = dh.digest();
        let err = LocalMigration::default()
            .run(srcs, dsts, &mut |_| {})
            .expect_err(&label);
        let msg = err.to_string();
        assert!(
            msg.contains("unknown identity") && msg.contains("--force-unknown-identity") && msg.contains("emulated:s"),
            "{label}: {msg}"
        );
        assert!(log.lock().unwrap().is_empty(), "{label}: a device was touched");
        assert_eq!(
            (sh.device_state(), dh.device_state()),
            (DeviceState::Running, DeviceState::Running)
        );
        assert_eq!(dh.digest(), before, "{label}");

        let (srcs, dsts, (sh, dh)) = pair(src_unknown, dst_unknown, "name=d,size=256K,seed=4", &log);
        let mut m = LocalMigration::default();
        m.destination.force_unknown_identity = true;
        m.run(srcs, dsts, &mut |_| {})
            .unwrap_or_else(|e| panic!("{label}, forced: {e}"));
        assert_eq!(dh.digest(), sh.digest(), "{label}, forced");
    }
    let log = Log::default();
    let (srcs, dsts, _) = pair(false, false, "name=d,size=512K,seed=4", &log);
    let mut m = LocalMigration::default();
    m.destination.force_unknown_identity = true;
    let err = m.run(srcs, dsts, &mut |_| {}).expect_err("different devices");
    assert!(err.to_string().contains("cannot migrate into"), "{err}");
    assert!(log.lock().unwrap().is_empty());
}
