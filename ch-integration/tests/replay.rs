//! Cloud Hypervisor's exact call order (facts section 4) replayed on both sides, with fake
//! devices: random visiting order, 1 and 3 devices, with and without pre-copy, a failure at
//! every step (Cloud Hypervisor's own, or a device fault), cancel.

mod common;
mod fake;

use std::collections::BTreeMap;

use ch_integration::{DeviceConfig, GroupOptions, MigratableVfioDevice, Tracking, VfioMigrationGroup};
use common::{Rng, SOURCE_ORDER, STATE_SENT_AFTER, SrcStep, failure_path, visit};
use fake::{FakeDevice, FaultMode, Handle};
use proptest::prelude::*;
use vfio_migration::state::{DeviceState, MigrationFlags};
use vm_migration::protocol::MemoryRange;
use vm_migration::{Migratable, MigratableError, Pausable, Snapshot, Snapshottable};

const ALL: MigrationFlags = MigrationFlags::from_bits(7);
const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    length: 1 << 24,
};

struct Vm {
    devs: Vec<MigratableVfioDevice>,
    handles: Vec<Handle>,
}

fn source_vm(n: usize, flags: MigrationFlags, opts: GroupOptions, sizes: &[usize]) -> Vm {
    let group = VfioMigrationGroup::new(opts);
    let mut devs = Vec::new();
    let mut handles = Vec::new();
    for i in 0..n {
        let size = sizes[i % sizes.len()];
        let (d, h) = FakeDevice::new(&format!("fake{i}"), flags, 100 + i as u64, size, size / 3);
        devs.push(
            MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new(format!("_vfio{i}"), vec![RAM])).unwrap(),
        );
        handles.push(h);
    }
    Vm { devs, handles }
}

fn dest_vm(n: usize, flags: MigrationFlags) -> Vm {
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let mut devs = Vec::new();
    let mut handles = Vec::new();
    for i in 0..n {
        // A different content: the load must replace it.
        let (d, h) = FakeDevice::new(&format!("dst{i}"), flags, 999 + i as u64, 10, 0);
        devs.push(
            MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new(format!("_vfio{i}"), vec![RAM])).unwrap(),
        );
        handles.push(h);
    }
    Vm { devs, handles }
}

fn assert_all(vm: &Vm, want: DeviceState, what: &str) {
    for h in &vm.handles {
        let d = h.lock();
        assert_eq!(
            d.state, want,
            "{what}: {} is {} (transitions {:?})",
            d.name, d.state, d.transitions
        );
    }
}

/// Destination: devices created one at a time from the snapshot, each restored as it is created
/// (Cloud Hypervisor restores in the device's constructor), then resume on Complete.
fn destination(
    n: usize,
    state_json: &str,
    rng: &mut Rng,
    fault: Option<(usize, FaultMode)>,
) -> (Vm, Result<(), MigratableError>) {
    let snaps: BTreeMap<String, Snapshot> = serde_json::from_str(state_json).unwrap();
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let mut devs: Vec<Option<MigratableVfioDevice>> = (0..n).map(|_| None).collect();
    let mut handles: Vec<Option<Handle>> = (0..n).map(|_| None).collect();
    let mut result = Ok(());
    for i in rng.order(n) {
        // A different content: the load must replace it.
        let (d, h) = FakeDevice::new(&format!("dst{i}"), ALL, 999 + i as u64, 10, 0);
        let id = format!("_vfio{i}");
        let mut dev = MigratableVfioDevice::new(&group, Box::new(d), DeviceConfig::new(&id, vec![RAM])).unwrap();
        let snap = snaps.get(&id).expect("a snapshot for every device");
        if fault.is_some_and(|(f, _)| f == i) {
            h.arm(fault.unwrap().1);
        }
        let r = dev.restore(snap);
        h.disarm();
        devs[i] = Some(dev);
        handles[i] = Some(h);
        if let Err(e) = r {
            result = Err(e);
            break;
        }
    }
    let mut vm = Vm {
        devs: devs.into_iter().flatten().collect(),
        handles: handles.into_iter().flatten().collect(),
    };
    if result.is_ok() {
        for i in rng.order(n) {
            if let Err(e) = vm.devs[i].resume() {
                result = Err(e);
                break;
            }
        }
    }
    (vm, result)
}

#[derive(Clone, Copy, Debug)]
enum Failure {
    /// Cloud Hypervisor fails after step k (network, another device...).
    AfterStep(usize),
    /// Device `dev` faults during step k.
    DeviceFault { step: usize, dev: usize, mode: FaultMode },
    /// A destination device faults while restoring.
    DestinationFault { dev: usize, mode: FaultMode },
}

/// Run one whole migration; returns whether it succeeded. Asserts the invariants either way.
fn run(n: usize, precopy: bool, seed: u64, failure: Option<Failure>) -> bool {
    let mut rng = Rng(seed | 1);
    let opts = GroupOptions {
        precopy,
        chunk_size: 4096,
        buffer_cap: 700, // small: exercise the spill file
        ..GroupOptions::default()
    };
    let mut src = source_vm(n, ALL, opts, &[3000, 50, 5000]);
    let before: Vec<Vec<u8>> = src.handles.iter().map(|h| h.content()).collect();
    let mut snaps = BTreeMap::new();
    let mut paused = false;
    let mut failed = false;
    for (k, step) in SOURCE_ORDER.iter().enumerate() {
        if *step == SrcStep::Pause {
            paused = true;
        }
        let armed = match failure {
            Some(Failure::DeviceFault { step, dev, mode }) if step == k => {
                src.handles[dev % n].arm(mode);
                true
            }
            _ => false,
        };
        let r = visit(&mut src.devs, *step, &mut rng, &mut snaps);
        if armed {
            src.handles.iter().for_each(|h| h.disarm());
        }
        if r.is_err() {
            failed = true;
            break;
        }
        if let Some(Failure::AfterStep(s)) = failure
            && s == k
        {
            failed = true;
            break;
        }
        if k == STATE_SENT_AFTER {
            // The State message; the destination answers OK or Error.
            let json = serde_json::to_string(&snaps).unwrap();
            let dfault = match failure {
                Some(Failure::DestinationFault { dev, mode }) => Some((dev % n, mode)),
                _ => None,
            };
            let (dst, r) = destination(n, &json, &mut rng, dfault);
            match r {
                Ok(()) => {
                    assert_all(&dst, DeviceState::Running, "destination after resume");
                    for (i, h) in dst.handles.iter().enumerate() {
                        assert_eq!(h.content(), before[i], "device {i}: destination state differs");
                    }
                }
                Err(_) => {
                    drop(dst.devs);
                    for h in &dst.handles {
                        let s = h.state();
                        assert!(
                            s == DeviceState::Running,
                            "a failed destination, once dropped, left a device {s}"
                        );
                    }
                    failed = true;
                    break;
                }
            }
        }
    }
    if failed {
        failure_path(&mut src.devs, paused, &mut rng);
        assert_all(&src, DeviceState::Running, &format!("source after failure {failure:?}"));
        for (i, h) in src.handles.iter().enumerate() {
            // Intact whether or not recovery reset the device: the fake's reset keeps its content,
            // like mtty (reset=keep). A device whose reset wipes (an FLR) loses it: the emulated
            // device's default, checked in vfio-migration/tests/faults.rs.
            assert_eq!(h.content(), before[i], "device {i} ({} resets)", h.lock().resets);
            assert!(h.lock().log.is_none(), "DMA logging left on after failure");
        }
        assert!(!src.devs[0].group().migration_in_progress());
        false
    } else {
        assert_all(&src, DeviceState::Stop, "source after a completed migration");
        assert!(!src.devs[0].group().migration_in_progress());
        true
    }
}

#[test]
fn one_and_three_devices_with_and_without_precopy() {
    for n in [1, 3] {
        for precopy in [false, true] {
            for seed in 1..6 {
                assert!(run(n, precopy, seed, None), "n={n} precopy={precopy} seed={seed}");
            }
            // The source devices went through PRE_COPY exactly when asked to.
            let mut vm = source_vm(
                n,
                ALL,
                GroupOptions {
                    precopy,
                    ..GroupOptions::default()
                },
                &[3000],
            );
            let mut snaps = BTreeMap::new();
            let mut rng = Rng(3);
            for step in &SOURCE_ORDER[..7] {
                visit(&mut vm.devs, *step, &mut rng, &mut snaps).unwrap();
            }
            for h in &vm.handles {
                assert_eq!(h.lock().transitions.contains(&DeviceState::PreCopy), precopy);
                assert!(h.lock().transitions.contains(&DeviceState::StopCopy));
            }
        }
    }
}

#[test]
fn a_failure_after_every_step_returns_every_source_device_to_running() {
    for n in [1, 3] {
        for precopy in [false, true] {
            for k in 0..SOURCE_ORDER.len() {
                // After complete_migration the source VM is gone: nothing to fail.
                if k == SOURCE_ORDER.len() - 1 {
                    continue;
                }
                let ok = run(n, precopy, 7 + k as u64, Some(Failure::AfterStep(k)));
                assert!(!ok);
            }
        }
    }
}

#[test]
fn a_device_fault_at_every_step_never_leaves_a_device_stopped() {
    let (mut completed, mut failed) = (0, 0);
    for n in [1, 3] {
        for precopy in [false, true] {
            for k in 0..SOURCE_ORDER.len() {
                for mode in [FaultMode::Stay, FaultMode::Error] {
                    for dev in 0..n {
                        // `run` asserts either a correct completed migration or every source
                        // device RUNNING after the failure path.
                        if run(
                            n,
                            precopy,
                            11 + k as u64,
                            Some(Failure::DeviceFault { step: k, dev, mode }),
                        ) {
                            completed += 1;
                        } else {
                            failed += 1;
                        }
                    }
                }
            }
        }
    }
    // Faults during start_migration (no device operation) and complete_migration do not fail the
    // migration; faults in every other step do.
    assert!(
        completed > 0 && failed > completed,
        "completed {completed}, failed {failed}"
    );
}

#[test]
fn a_destination_fault_fails_the_migration_and_the_source_recovers() {
    for n in [1, 3] {
        for mode in [FaultMode::Stay, FaultMode::Error] {
            assert!(!run(n, true, 5, Some(Failure::DestinationFault { dev: n - 1, mode })));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_orders_and_failures(
        seed in any::<u64>(),
        three in any::<bool>(),
        precopy in any::<bool>(),
        fail in proptest::option::of((0usize..SOURCE_ORDER.len(), 0usize..3, any::<bool>(), any::<bool>())),
    ) {
        let n = if three { 3 } else { 1 };
        let failure = fail.map(|(step, dev, device, err)| {
            if device {
                Failure::DeviceFault { step, dev, mode: if err { FaultMode::Error } else { FaultMode::Stay } }
            } else {
                Failure::AfterStep(step.min(SOURCE_ORDER.len() - 2))
            }
        });
        let ok = run(n, precopy, seed, failure);
        if failure.is_none() {
            prop_assert!(ok);
        }
    }
}

#[test]
fn pause_quiesces_and_the_last_pause_stops_and_saves_the_whole_group() {
    let mut vm = source_vm(3, ALL, GroupOptions::default(), &[2000]);
    for d in &mut vm.devs {
        d.start_migration().unwrap();
        d.start_dirty_log().unwrap();
    }
    assert_all(&vm, DeviceState::PreCopy, "after start_dirty_log");
    for d in &mut vm.devs {
        d.dirty_log().unwrap();
    }
    vm.devs[1].pause().unwrap();
    assert_eq!(vm.handles[1].state(), DeviceState::PreCopyP2p);
    assert_eq!(vm.handles[0].state(), DeviceState::PreCopy);
    vm.devs[0].pause().unwrap();
    assert_eq!(vm.handles[0].state(), DeviceState::PreCopyP2p);
    assert_eq!(
        vm.handles[1].state(),
        DeviceState::PreCopyP2p,
        "a non-last pause stops nothing"
    );
    assert_eq!(vm.handles[2].state(), DeviceState::PreCopy);
    // The last pause stops and reads every device before it returns: nothing runs once Cloud
    // Hypervisor saves its vCPUs.
    vm.devs[2].pause().unwrap();
    assert_all(&vm, DeviceState::Stop, "after the last pause");
    for h in &vm.handles {
        assert!(
            h.lock()
                .transitions
                .ends_with(&[DeviceState::StopCopy, DeviceState::Stop])
        );
    }
    // The snapshots only hand out each device's part.
    let s2 = vm.devs[2].snapshot().unwrap();
    let s0 = vm.devs[0].snapshot().unwrap();
    let s1 = vm.devs[1].snapshot().unwrap();
    assert_all(&vm, DeviceState::Stop, "after the snapshots");
    // Each snapshot holds its own device's state.
    let mut dst = dest_vm(3, ALL);
    for (i, s) in [(0, &s0), (1, &s1), (2, &s2)] {
        dst.devs[i].restore(s).unwrap();
    }
    assert_all(&dst, DeviceState::Stop, "destination after restore");
    dst.devs[1].resume().unwrap();
    assert_eq!(dst.handles[1].state(), DeviceState::RunningP2p);
    assert_eq!(dst.handles[0].state(), DeviceState::Stop);
    dst.devs[0].resume().unwrap();
    assert_eq!(dst.handles[0].state(), DeviceState::RunningP2p);
    dst.devs[2].resume().unwrap();
    assert_all(&dst, DeviceState::Running, "after the last resume");
    for i in 0..3 {
        assert_eq!(dst.handles[i].content(), vm.handles[i].content());
    }
}

#[test]
fn cancel_during_precopy_and_after_pause() {
    // Cancelled while iterating (the VM runs): only stop_dirty_log is called.
    let mut vm = source_vm(3, ALL, GroupOptions::default(), &[5000]);
    for d in &mut vm.devs {
        d.start_migration().unwrap();
        d.start_dirty_log().unwrap();
        d.dirty_log().unwrap();
    }
    vm.devs[2].stop_dirty_log().unwrap();
    assert_all(&vm, DeviceState::Running, "cancel during pre-copy");
    vm.devs[0].stop_dirty_log().unwrap();
    vm.devs[1].stop_dirty_log().unwrap();
    assert!(!vm.devs[0].group().migration_in_progress());
    // A new migration works afterwards.
    for d in &mut vm.devs {
        d.start_migration().unwrap();
        d.start_dirty_log().unwrap();
    }
    // Cancelled after pause: resume then stop_dirty_log.
    for d in &mut vm.devs {
        d.pause().unwrap();
    }
    vm.devs[1].resume().unwrap();
    assert_all(&vm, DeviceState::Running, "cancel after pause");
    vm.devs[0].resume().unwrap();
    vm.devs[2].resume().unwrap();
    for d in &mut vm.devs {
        d.stop_dirty_log().unwrap();
    }
    assert_all(&vm, DeviceState::Running, "after the failure path");
}

#[test]
fn refusals_are_clear_and_touch_no_device() {
    // Several devices, one without P2P.
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let (a, ha) = FakeDevice::new("a", ALL, 1, 100, 10);
    let (b, hb) = FakeDevice::new("b", MigrationFlags::STOP_COPY, 2, 100, 10);
    let mut da = MigratableVfioDevice::new(&group, Box::new(a), DeviceConfig::new("_vfio0", vec![RAM])).unwrap();
    let _db = MigratableVfioDevice::new(&group, Box::new(b), DeviceConfig::new("_vfio1", vec![RAM])).unwrap();
    let e = da.start_migration().unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(msg.contains("lack P2P") && msg.contains("_vfio1"), "{msg}");
    assert!(da.start_dirty_log().is_err());
    assert!(ha.lock().transitions.is_empty() && hb.lock().transitions.is_empty());

    // No migration support at all.
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let (c, _) = FakeDevice::new("c", MigrationFlags::empty(), 3, 100, 10);
    let mut dc = MigratableVfioDevice::new(&group, Box::new(c), DeviceConfig::new("_vfio2", vec![RAM])).unwrap();
    let msg = format!("{:#}", anyhow::Error::from(dc.start_migration().unwrap_err()));
    assert!(msg.contains("does not support VFIO migration"), "{msg}");
    // Pause and resume of a VM with such a device still work.
    dc.pause().unwrap();
    dc.resume().unwrap();

    // Behind a vIOMMU without translation.
    let group = VfioMigrationGroup::new(GroupOptions::default());
    let (d, hd) = FakeDevice::new("d", ALL, 4, 100, 10);
    let mut cfg = DeviceConfig::new("_vfio3", vec![RAM]);
    cfg.viommu = ch_integration::Viommu::Untranslated;
    let mut dd = MigratableVfioDevice::new(&group, Box::new(d), cfg).unwrap();
    let msg = format!("{:#}", anyhow::Error::from(dd.start_migration().unwrap_err()));
    assert!(msg.contains("virtual IOMMU"), "{msg}");
    assert!(hd.lock().transitions.is_empty());

    // No dirty tracking, all-dirty not allowed; then allowed.
    for allow in [false, true] {
        let group = VfioMigrationGroup::new(GroupOptions {
            allow_all_dirty: allow,
            ..GroupOptions::default()
        });
        let (e, _) = FakeDevice::new("e", ALL, 5, 100, 10);
        let mut cfg = DeviceConfig::new("_vfio4", vec![RAM]);
        cfg.tracking = Tracking::none();
        let mut de = MigratableVfioDevice::new(&group, Box::new(e), cfg).unwrap();
        let r = de.start_migration();
        if allow {
            r.unwrap();
            de.start_dirty_log().unwrap();
            let t = de.dirty_log().unwrap();
            assert_eq!(t.regions(), &[RAM], "all-dirty reports all DMA-reachable memory");
            de.stop_dirty_log().unwrap();
        } else {
            let msg = format!("{:#}", anyhow::Error::from(r.unwrap_err()));
            assert!(
                msg.contains("all pages dirty is not allowed") || msg.contains("all-pages-dirty"),
                "{msg}"
            );
        }
    }
}

#[test]
fn dirty_log_reports_device_dma_and_stops() {
    let mut vm = source_vm(1, ALL, GroupOptions::default(), &[100]);
    let d = &mut vm.devs[0];
    d.start_migration().unwrap();
    d.start_dirty_log().unwrap();
    assert!(vm.handles[0].lock().log.is_some());
    vm.handles[0].lock().dma_writes = vec![0x1000, 0x1800, 0x2000, 0x9000];
    let t = vm.devs[0].dirty_log().unwrap();
    assert_eq!(
        t.regions(),
        &[
            MemoryRange {
                gpa: 0x1000,
                length: 0x2000
            },
            MemoryRange {
                gpa: 0x9000,
                length: 0x1000
            }
        ]
    );
    assert!(vm.devs[0].dirty_log().unwrap().is_empty(), "reports clear the log");
    vm.devs[0].stop_dirty_log().unwrap();
    assert!(vm.handles[0].lock().log.is_none());
    assert_all(&vm, DeviceState::Running, "stop_dirty_log before the snapshot cancels");
}
