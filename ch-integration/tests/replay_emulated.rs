//! Cloud Hypervisor's call order replayed on both sides with the engine's emulated devices
//! (`vfio_migration::emulated`): content that changes during pre-copy, page-accurate DMA logging,
//! and the device's own fault injection on every arc a migration takes, on the source and on the
//! destination, falling into ERROR or not.

mod common;

use std::collections::BTreeMap;

use ch_integration::{DeviceConfig, GroupOptions, MigratableVfioDevice, VfioMigrationGroup};
use common::{Rng, SOURCE_ORDER, STATE_SENT_AFTER, SrcStep, failure_path, visit};
use vfio_migration::emulated::{ArcFault, EmulatedConfig, EmulatedDevice, EmulatedHandle, Faults, WriteFault};
use vfio_migration::state::{DeviceState, MigrationFlags};
use vm_migration::protocol::MemoryRange;
use vm_migration::{Migratable, MigratableError, Pausable, Snapshot, Snapshottable};

const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    length: 1 << 24,
};

fn config(i: usize, flags: MigrationFlags) -> EmulatedConfig {
    EmulatedConfig {
        size: (48 << 10) + (i as u64) * (20 << 10),
        block_size: 4096,
        seed: 40 + i as u64,
        flags,
        name: Some(format!("dev{i}")),
        ..EmulatedConfig::default()
    }
}

fn group_of(n: usize, flags: MigrationFlags, opts: GroupOptions) -> (Vec<MigratableVfioDevice>, Vec<EmulatedHandle>) {
    let group = VfioMigrationGroup::new(opts);
    let mut devs = Vec::new();
    let mut hs = Vec::new();
    for i in 0..n {
        let d = EmulatedDevice::new(config(i, flags)).unwrap();
        hs.push(d.handle());
        devs.push(
            MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new(format!("_vfio{i}"), vec![RAM])).unwrap(),
        );
    }
    (devs, hs)
}

/// Where a fault is injected.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// An arc of source device `dev` fails once.
    SourceArc {
        dev: usize,
        from: DeviceState,
        to: DeviceState,
        to_error: bool,
    },
    /// Source device `dev` ends its STOP_COPY data early (a short state).
    EarlyEnd { dev: usize },
    /// An arc of destination device `dev` fails once.
    DestArc {
        dev: usize,
        from: DeviceState,
        to: DeviceState,
        to_error: bool,
    },
    /// Destination device `dev` refuses writes past a few bytes.
    WriteFail { dev: usize },
    /// Cloud Hypervisor itself fails after source step `k`.
    AfterStep(usize),
}

/// Run one migration; returns whether it completed. Asserts the invariants either way.
fn run(n: usize, flags: MigrationFlags, precopy: bool, seed: u64, fault: Option<Fault>) -> bool {
    let mut rng = Rng(seed | 1);
    let opts = GroupOptions {
        precopy,
        chunk_size: 8192,
        buffer_cap: 16 << 10,
        ..GroupOptions::default()
    };
    let (mut src, sh) = group_of(n, flags, opts);
    match fault {
        Some(Fault::SourceArc {
            dev,
            from,
            to,
            to_error,
        }) => sh[dev % n].set_faults(Faults {
            fail_arc: Some(ArcFault {
                from,
                to,
                errno: libc::EIO,
                to_error,
                once: true,
            }),
            ..Faults::default()
        }),
        Some(Fault::EarlyEnd { dev }) => sh[dev % n].set_faults(Faults {
            // One byte of STOP_COPY data: with pre-copy only the trailer is left by then.
            early_end: Some(1),
            ..Faults::default()
        }),
        _ => {}
    }
    let mut snaps = BTreeMap::new();
    let mut paused = false;
    let mut failed = false;
    let mut digests = Vec::new();
    for (k, step) in SOURCE_ORDER.iter().enumerate() {
        if *step == SrcStep::Pause {
            paused = true;
        }
        if *step == SrcStep::DirtyLog && !paused {
            // The guest runs: device activity changes the device state and writes memory.
            for (i, h) in sh.iter().enumerate() {
                let _ = h.touch_blocks(2 + i as u64);
                let _ = h.dma_write(0x10000 * (i as u64 + 1), 0x1000);
            }
        }
        if visit(&mut src, *step, &mut rng, &mut snaps).is_err() {
            failed = true;
            break;
        }
        if matches!(fault, Some(Fault::AfterStep(s)) if s == k) {
            failed = true;
            break;
        }
        if *step == SrcStep::Snapshot {
            digests = sh.iter().map(|h| h.digest()).collect();
        }
        if k == STATE_SENT_AFTER {
            let json = serde_json::to_string(&snaps).unwrap();
            match destination(n, flags, &json, &mut rng, fault) {
                Ok(dh) => {
                    for (i, h) in dh.iter().enumerate() {
                        assert_eq!(h.device_state(), DeviceState::Running, "destination {i}");
                        assert_eq!(h.digest(), digests[i], "destination {i}: content differs");
                    }
                }
                Err(dh) => {
                    for h in &dh {
                        assert!(
                            h.is_usable(),
                            "a dropped failed destination left {} {}",
                            h.name(),
                            h.device_state()
                        );
                    }
                    failed = true;
                    break;
                }
            }
        }
    }
    if failed {
        failure_path(&mut src, paused, &mut rng);
        for h in &sh {
            assert_eq!(
                h.device_state(),
                DeviceState::Running,
                "{}: after failure {fault:?} (n={n} precopy={precopy})",
                h.name()
            );
            assert_eq!(h.dma_log_page_size(), None, "{}: DMA logging left on", h.name());
        }
        assert!(!src[0].group().migration_in_progress());
        false
    } else {
        for h in &sh {
            assert_eq!(h.device_state(), DeviceState::Stop);
            assert_eq!(h.dma_log_page_size(), None);
        }
        true
    }
}

/// The destination: each device created and restored in turn, then resumed. On failure the
/// destination VM is dropped; its devices' handles are returned for inspection.
fn destination(
    n: usize,
    flags: MigrationFlags,
    json: &str,
    rng: &mut Rng,
    fault: Option<Fault>,
) -> Result<Vec<EmulatedHandle>, Vec<EmulatedHandle>> {
    let snaps: BTreeMap<String, Snapshot> = serde_json::from_str(json).unwrap();
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let mut devs: Vec<Option<MigratableVfioDevice>> = (0..n).map(|_| None).collect();
    let mut hs: Vec<Option<EmulatedHandle>> = (0..n).map(|_| None).collect();
    let mut result: Result<(), MigratableError> = Ok(());
    for i in rng.order(n) {
        let d = EmulatedDevice::new(config(i, flags)).unwrap();
        match fault {
            Some(Fault::DestArc {
                dev,
                from,
                to,
                to_error,
            }) if dev % n == i => d.set_faults(Faults {
                fail_arc: Some(ArcFault {
                    from,
                    to,
                    errno: libc::EIO,
                    to_error,
                    once: true,
                }),
                ..Faults::default()
            }),
            Some(Fault::WriteFail { dev }) if dev % n == i => d.set_faults(Faults {
                write_fail: Some(WriteFault {
                    at: 64,
                    errno: libc::EFAULT,
                }),
                ..Faults::default()
            }),
            _ => {}
        }
        hs[i] = Some(d.handle());
        let mut dev =
            MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new(format!("_vfio{i}"), vec![RAM])).unwrap();
        let r = dev.restore(&snaps[&dev.id()]);
        devs[i] = Some(dev);
        if let Err(e) = r {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        for i in rng.order(n) {
            if let Some(d) = devs[i].as_mut()
                && let Err(e) = d.resume()
            {
                result = Err(e);
                break;
            }
        }
    }
    let hs: Vec<EmulatedHandle> = hs.into_iter().flatten().collect();
    drop(devs);
    match result {
        Ok(()) => Ok(hs),
        Err(_) => Err(hs),
    }
}

const ALL: MigrationFlags = MigrationFlags::KNOWN;

#[test]
fn migrations_of_one_and_three_emulated_devices_with_and_without_precopy() {
    for n in [1, 3] {
        for precopy in [false, true] {
            for flags in [ALL, MigrationFlags::from_bits(3)] {
                if n == 1 || flags.contains(MigrationFlags::P2P) {
                    assert!(
                        run(n, flags, precopy, 5 + n as u64, None),
                        "n={n} precopy={precopy} flags={flags}"
                    );
                }
            }
        }
    }
    // A single device without P2P migrates too (nothing to quiesce against).
    assert!(run(1, MigrationFlags::STOP_COPY, true, 3, None));
}

#[test]
fn a_failure_after_every_step() {
    for n in [1, 3] {
        for precopy in [false, true] {
            for k in 0..SOURCE_ORDER.len() - 1 {
                assert!(!run(n, ALL, precopy, 17 + k as u64, Some(Fault::AfterStep(k))));
            }
        }
    }
}

#[test]
fn every_source_arc_failing_with_and_without_error() {
    use DeviceState::*;
    // Every arc a source device takes: RUNNING -> PRE_COPY, the quiescing arcs, the stop-copy
    // path, STOP_COPY -> STOP, and the recovery arcs back to RUNNING.
    let arcs = [
        (Running, PreCopy),
        (PreCopy, PreCopyP2p),
        (Running, RunningP2p),
        (PreCopyP2p, StopCopy),
        (RunningP2p, Stop),
        (Stop, StopCopy),
        (StopCopy, Stop),
        (Stop, RunningP2p),
        (RunningP2p, Running),
        (PreCopy, Running),
    ];
    let (mut completed, mut failed) = (0, 0);
    for n in [1, 3] {
        for precopy in [false, true] {
            for (from, to) in arcs {
                for to_error in [false, true] {
                    for dev in [0, 2] {
                        let f = Fault::SourceArc {
                            dev,
                            from,
                            to,
                            to_error,
                        };
                        if run(n, ALL, precopy, 23, Some(f)) {
                            completed += 1;
                        } else {
                            failed += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(failed > 0 && completed > 0, "completed {completed}, failed {failed}");
}

#[test]
fn a_short_source_state_is_refused_by_the_destination_and_the_source_recovers() {
    for n in [1, 3] {
        for precopy in [false, true] {
            assert!(!run(n, ALL, precopy, 31, Some(Fault::EarlyEnd { dev: n - 1 })));
        }
    }
}

#[test]
fn every_destination_arc_failing_and_refused_writes() {
    use DeviceState::*;
    let arcs = [
        (Running, RunningP2p),
        (RunningP2p, Stop),
        (Stop, Resuming),
        (Resuming, Stop),
        (Stop, RunningP2p),
        (RunningP2p, Running),
    ];
    for n in [1, 3] {
        for (from, to) in arcs {
            for to_error in [false, true] {
                let f = Fault::DestArc {
                    dev: n - 1,
                    from,
                    to,
                    to_error,
                };
                assert!(!run(n, ALL, true, 41, Some(f)), "{f:?} did not fail the migration");
            }
        }
        assert!(!run(n, ALL, true, 43, Some(Fault::WriteFail { dev: 0 })));
    }
}

#[test]
fn dirty_log_reports_the_pages_the_device_wrote() {
    let (mut devs, hs) = group_of(1, ALL, GroupOptions::default());
    devs[0].start_migration().unwrap();
    devs[0].start_dirty_log().unwrap();
    assert_eq!(hs[0].dma_log_page_size(), Some(4096));
    hs[0].dma_write(0x3000, 0x2000).unwrap();
    hs[0].dma_write(0x100000, 1).unwrap();
    let t = devs[0].dirty_log().unwrap();
    assert_eq!(
        t.regions(),
        &[
            MemoryRange {
                gpa: 0x3000,
                length: 0x2000
            },
            MemoryRange {
                gpa: 0x100000,
                length: 0x1000
            }
        ]
    );
    assert!(devs[0].dirty_log().unwrap().is_empty());
    devs[0].pause().unwrap();
    devs[0].snapshot().unwrap();
    devs[0].stop_dirty_log().unwrap();
    assert_eq!(hs[0].dma_log_page_size(), None);
    devs[0].complete_migration().unwrap();
    assert_eq!(hs[0].device_state(), DeviceState::Stop);
}

#[test]
fn a_raw_fd_that_is_no_vfio_device_is_refused_clearly() {
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let fd = std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let mut d = MigratableVfioDevice::from_device_fd(
        &group,
        fd,
        "0000:00:04.0".into(),
        vfio_migration::device::DeviceIdentity::Unknown,
        DeviceConfig::new("_vfio0", vec![RAM]),
    )
    .unwrap();
    let msg = format!("{:#}", anyhow::Error::from(d.start_migration().unwrap_err()));
    assert!(
        msg.contains("_vfio0") && msg.contains("does not support VFIO migration"),
        "{msg}"
    );
    // A VM with such a device still pauses and resumes.
    d.pause().unwrap();
    d.resume().unwrap();
}
