//! Live migration scenarios: the engine's [`LocalMigration`] (pre-copy, P2P quiescing, parallel
//! stop-copy, two-phase resume) between real mtty devices.

use vfio_migration::kernel::OpenMode;
use vfio_migration::live::{LiveError, LocalMigration};
use vfio_migration::session::After;
use vfio_migration::{DeviceState, MigrationDevice};

use crate::migration;
use crate::mtty::Mtty;
use crate::{Outcome, ensure};

/// mtty's pre-copy data: the header.
const PRECOPY_BYTES: u64 = 24;
/// mtty's stop-copy data per port.
const PORT_BYTES: u64 = 36;

/// Open the named devices.
fn open_all(vars: &[&'static str], mode: OpenMode) -> Result<Vec<Mtty>, String> {
    vars.iter().map(|v| Mtty::open(v, mode)).collect()
}

/// Live-migrate `src[i]` into `dst[i]` and check the report, the states and the observable state.
fn live(src_vars: &[&'static str], dst_vars: &[&'static str], mode: OpenMode) -> Outcome {
    let mut src = open_all(src_vars, mode)?;
    let mut dst = open_all(dst_vars, mode)?;
    let mut want = Vec::new();
    for (i, m) in src.iter().enumerate() {
        want.push(m.imprint(0x10 + 0x21 * i as u8)?);
    }
    for (i, m) in dst.iter().enumerate() {
        m.imprint(0xc0 + 0x13 * i as u8)?;
    }
    let ports: Vec<u32> = src.iter().map(|m| m.ports).collect();
    let report = {
        let sources: Vec<Box<dyn MigrationDevice + '_>> = src
            .iter_mut()
            .map(|m| Box::new(m.dev()) as Box<dyn MigrationDevice>)
            .collect();
        let destinations: Vec<Box<dyn MigrationDevice + '_>> = dst
            .iter_mut()
            .map(|m| Box::new(m.dev()) as Box<dyn MigrationDevice>)
            .collect();
        LocalMigration::default()
            .run(sources, destinations, &mut |_| {})
            .map_err(|e| format!("live migration: {e}"))?
    };
    println!(
        "rig-guest: live {src_vars:?} -> {dst_vars:?}: pre-copy {:?}, stop-copy {:?}, {} iterations, switch {}, downtime {:?}",
        report.precopy_bytes,
        report.stop_copy_bytes,
        report.iterations(),
        report.switch_reason,
        report.downtime
    );
    let want_pre: Vec<u64> = ports.iter().map(|_| PRECOPY_BYTES).collect();
    let want_stop: Vec<u64> = ports.iter().map(|&p| PORT_BYTES * p as u64).collect();
    ensure!(
        report.precopy_bytes == want_pre,
        "pre-copy bytes {:?}, want {want_pre:?}",
        report.precopy_bytes
    );
    ensure!(
        report.stop_copy_bytes == want_stop,
        "stop-copy bytes {:?}, want {want_stop:?}",
        report.stop_copy_bytes
    );
    for (s, d) in src.iter_mut().zip(dst.iter_mut()) {
        s.expect_state(DeviceState::Stop)?;
        let data = migration::save(s, After::Stop)?;
        migration::same_state(d, &data)?;
    }
    for (m, w) in dst.iter().zip(&want) {
        m.expect_state(DeviceState::Running)?;
        m.expect_observed(w)?;
    }
    // The stopped sources still hold their state.
    for (m, w) in src.iter_mut().zip(&want) {
        m.dev().set_state(DeviceState::Running).map_err(|e| e.to_string())?;
        m.expect_observed(w)?;
    }
    Ok(())
}

/// One device, group path.
pub fn one() -> Outcome {
    live(&["MTTY_A"], &["MTTY_B"], OpenMode::Group)
}

/// Two devices of different types at once (P2P quiescing, parallel stop-copy), cdev path.
pub fn multi() -> Outcome {
    live(&["MTTY_A", "MTTY_C"], &["MTTY_B", "MTTY_D"], OpenMode::Cdev)
}

/// An mtty-2 source with an mtty-1 destination: refused before either device moves; both end
/// RUNNING with their state.
pub fn wrong_pair() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let mut c = Mtty::open("MTTY_C", OpenMode::Group)?;
    let want_a = a.imprint(0x4d)?;
    let want_c = c.imprint(0xd4)?;
    let result = LocalMigration::default().run(vec![Box::new(a.dev())], vec![Box::new(c.dev())], &mut |_| {});
    match result {
        Ok(r) => return Err(format!("an mtty-2 was live-migrated into an mtty-1: {r:?}")),
        Err(e) => {
            println!("rig-guest: live-wrong-pair: refused as expected: {e}");
            // Refused from the identities, before either device moved.
            ensure!(matches!(e, LiveError::Refused(_)), "not refused up front: {e:?}");
        }
    }
    a.expect_state(DeviceState::Running)?;
    c.expect_state(DeviceState::Running)?;
    a.expect_observed(&want_a)?;
    c.expect_observed(&want_c)
}
