//! Cloud Hypervisor's migration calls (`ch-integration`) on real mtty devices, in Cloud
//! Hypervisor's order: the source VM's two VFIO devices (an mtty-2 and an mtty-1) go through
//! start_migration, start_dirty_log, dirty_log rounds, pause, snapshot, stop_dirty_log and
//! complete_migration; the snapshot travels as JSON; the destination VM's devices are restored
//! from it one by one and resumed.

use std::collections::BTreeMap;

use ch_integration::{DeviceConfig, GroupOptions, MigratableVfioDevice, VfioMigrationGroup};
use vfio_migration::DeviceState;
use vfio_migration::kernel::{Handles, OpenMode, OpenedDevice, open_device};
use vm_migration::protocol::MemoryRange;
use vm_migration::{Migratable, Pausable, Snapshot, Snapshottable};

use crate::migration;
use crate::mtty::Mtty;
use crate::{Outcome, ensure};

/// The guest memory the devices could reach (mtty never writes it).
const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    length: 1 << 20,
};

/// Open `vars` as one VM's VFIO devices in a fresh group; the handles must outlive the devices.
fn vm(vars: &[&'static str], opts: GroupOptions) -> Result<(Vec<MigratableVfioDevice>, Vec<Handles>), String> {
    let group = VfioMigrationGroup::new(opts);
    let mut devs = Vec::new();
    let mut handles = Vec::new();
    for (i, var) in vars.iter().enumerate() {
        let path = std::env::var_os(var).ok_or_else(|| format!("{var} is not set"))?;
        let OpenedDevice { mut device, handles: h } =
            open_device(path.as_ref(), OpenMode::Group).map_err(|e| format!("{var}: open: {e}"))?;
        device
            .reset_if_not_running()
            .map_err(|e| format!("{var}: reset: {e}"))?;
        let config = DeviceConfig::new(format!("_vfio{i}"), vec![RAM]);
        devs.push(MigratableVfioDevice::new(&group, Box::new(device), config).map_err(|e| format!("{var}: {e}"))?);
        handles.push(h);
    }
    Ok((devs, handles))
}

/// Imprint the devices and close them again (a group is open in one place at a time).
fn imprint(vars: &[(&'static str, u8)]) -> Result<Vec<Vec<crate::mtty::PortState>>, String> {
    vars.iter()
        .map(|&(var, seed)| Mtty::open(var, OpenMode::Group)?.imprint(seed))
        .collect()
}

/// A whole migration through Cloud Hypervisor's calls.
pub fn migrate() -> Outcome {
    let want = imprint(&[("MTTY_A", 0x61), ("MTTY_C", 0x16), ("MTTY_B", 0xd9), ("MTTY_D", 0x9d)])?;
    let sources = ["MTTY_A", "MTTY_C"];
    let state_json = {
        let (mut src, _handles) = vm(&sources, GroupOptions::default())?;
        let e = |step: &str, err: vm_migration::MigratableError| format!("source {step}: {err}");
        for d in &mut src {
            d.start_migration().map_err(|x| e("start_migration", x))?;
        }
        for d in &mut src {
            d.start_dirty_log().map_err(|x| e("start_dirty_log", x))?;
        }
        for round in 0..2 {
            for d in &mut src {
                let table = d.dirty_log().map_err(|x| e("dirty_log", x))?;
                ensure!(
                    table.regions().is_empty(),
                    "round {round}: mtty reported dirty memory {:?}",
                    table.regions()
                );
            }
        }
        for d in &mut src {
            d.pause().map_err(|x| e("pause", x))?;
        }
        for d in &mut src {
            d.dirty_log().map_err(|x| e("final dirty_log", x))?;
        }
        let mut snaps: BTreeMap<String, Snapshot> = BTreeMap::new();
        for d in &mut src {
            let s = d.snapshot().map_err(|x| e("snapshot", x))?;
            snaps.insert(d.id(), s);
        }
        for d in &mut src {
            d.dirty_log().map_err(|x| e("dirty_log after the snapshot", x))?;
        }
        for d in &mut src {
            d.stop_dirty_log().map_err(|x| e("stop_dirty_log", x))?;
        }
        for d in &mut src {
            d.complete_migration().map_err(|x| e("complete_migration", x))?;
        }
        for d in &src {
            let st = d.device_state().map_err(|x| x.to_string())?;
            ensure!(st == DeviceState::Stop, "{}: source ends {st}, want STOP", d.id());
        }
        serde_json::to_string(&snaps).map_err(|x| format!("snapshot to JSON: {x}"))?
    };
    println!("rig-guest: ch-migrate: State message of {} bytes", state_json.len());

    let snaps: BTreeMap<String, Snapshot> =
        serde_json::from_str(&state_json).map_err(|x| format!("snapshot from JSON: {x}"))?;
    {
        let (mut dst, _handles) = vm(&["MTTY_B", "MTTY_D"], GroupOptions::default())?;
        for d in &mut dst {
            let snap = snaps
                .get(&d.id())
                .ok_or_else(|| format!("no snapshot for {}", d.id()))?;
            d.restore(snap).map_err(|x| format!("restore {}: {x}", d.id()))?;
        }
        for d in &mut dst {
            d.resume().map_err(|x| format!("resume {}: {x}", d.id()))?;
        }
        for d in &dst {
            let st = d.device_state().map_err(|x| x.to_string())?;
            ensure!(st == DeviceState::Running, "{}: destination ends {st}", d.id());
        }
    }
    // Byte for byte and by the registers: B holds A's state, D holds C's.
    for (src, dst, w) in [("MTTY_A", "MTTY_B", &want[0]), ("MTTY_C", "MTTY_D", &want[1])] {
        let mut s = Mtty::open_keep_state(src)?;
        s.expect_state(DeviceState::Stop)?;
        let data = migration::save(&mut s, vfio_migration::session::After::Running)?;
        let mut d = Mtty::open_keep_state(dst)?;
        migration::same_state(&mut d, &data)?;
        d.expect_observed(w)?;
        s.expect_observed(w)?;
    }
    Ok(())
}
