//! The `vfio-mig` command-line tool inside the guest, on the real mtty devices.
//!
//! The devices are given by their sysfs paths. A VFIO group can be open in one process at a time,
//! so every [`Mtty`] handle is dropped before the tool runs and reopened afterwards to check.

use std::process::{Command, Output};

use vfio_migration::kernel::OpenMode;
use vfio_migration::{DeviceState, MigrationDevice};

use crate::mtty::{Mtty, PortState};
use crate::{Outcome, ensure};

/// Where `/init` put the tool (it is also on PATH).
const VFIO_MIG: &str = "/rig/vfio-mig";

fn env(var: &str) -> Result<String, String> {
    std::env::var(var).map_err(|_| format!("{var} is not set"))
}

/// Run `vfio-mig ARGS`; returns the output whatever the exit status.
fn vfio_mig(args: &[&str]) -> Result<Output, String> {
    let out = Command::new(VFIO_MIG)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {VFIO_MIG}: {e}"))?;
    println!(
        "rig-guest: vfio-mig {}: {} | stdout: {} | stderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

/// Run `vfio-mig --json ARGS`, require success, and parse stdout.
fn vfio_mig_json(args: &[&str]) -> Result<serde_json::Value, String> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = vfio_mig(&all)?;
    ensure!(
        out.status.success(),
        "vfio-mig {} failed: {}",
        args.join(" "),
        out.status
    );
    serde_json::from_slice(&out.stdout).map_err(|e| format!("vfio-mig {}: stdout is not JSON: {e}", args.join(" ")))
}

/// `vfio-mig probe` on an mtty-2 and an mtty-1.
pub fn probe() -> Outcome {
    for (var, size, ty) in [("MTTY_A", 96, "mtty-2"), ("MTTY_C", 60, "mtty-1")] {
        let path = env(var)?;
        let v = vfio_mig_json(&["probe", &path])?;
        ensure!(v["flags"] == 7, "{var}: flags {}", v["flags"]);
        ensure!(v["state"] == "RUNNING", "{var}: state {}", v["state"]);
        ensure!(
            v["stop_copy_size"] == size,
            "{var}: stop-copy size {}",
            v["stop_copy_size"]
        );
        let identity = v["identity"].as_str().unwrap_or_default();
        ensure!(identity.contains(ty), "{var}: identity {identity:?}, want {ty}");
    }
    Ok(())
}

/// Imprint devices, drop the handles, and return what was written.
fn imprint(vars: &[(&'static str, u8)]) -> Result<Vec<Vec<PortState>>, String> {
    vars.iter()
        .map(|&(var, seed)| Mtty::open(var, OpenMode::Group)?.imprint(seed))
        .collect()
}

/// Reopen a device and check its state and observable state.
fn check(var: &'static str, state: DeviceState, want: &[PortState]) -> Outcome {
    let m = Mtty::open_keep_state(var)?;
    m.expect_state(state)?;
    m.expect_observed(want)
}

/// `vfio-mig migrate A B` (live: pre-copy, stop-copy) with `--open-mode mode`.
pub fn migrate(mode: &'static str) -> Outcome {
    let want = imprint(&[("MTTY_A", 0x29), ("MTTY_B", 0xb7)])?;
    let (a, b) = (env("MTTY_A")?, env("MTTY_B")?);
    let v = vfio_mig_json(&["--open-mode", mode, "migrate", &a, &b])?;
    ensure!(v["devices"] == 1, "report: {v}");
    ensure!(v["precopy_bytes"] == 24, "pre-copy bytes {}", v["precopy_bytes"]);
    ensure!(v["stop_copy_bytes"] == 72, "stop-copy bytes {}", v["stop_copy_bytes"]);
    check("MTTY_B", DeviceState::Running, &want[0])?;
    // The source was stopped by the migration; it still holds its state.
    check("MTTY_A", DeviceState::Stop, &want[0])
}

/// Two devices at once: `vfio-mig migrate A,C B,D`.
pub fn migrate_multi() -> Outcome {
    let want = imprint(&[("MTTY_A", 0x15), ("MTTY_C", 0x51), ("MTTY_B", 0x0f), ("MTTY_D", 0xf0)])?;
    let src = format!("{},{}", env("MTTY_A")?, env("MTTY_C")?);
    let dst = format!("{},{}", env("MTTY_B")?, env("MTTY_D")?);
    let v = vfio_mig_json(&["migrate", &src, &dst])?;
    ensure!(v["devices"] == 2, "report: {v}");
    ensure!(
        v["stop_copy_bytes"] == 72 + 36,
        "stop-copy bytes {}",
        v["stop_copy_bytes"]
    );
    check("MTTY_B", DeviceState::Running, &want[0])?;
    check("MTTY_D", DeviceState::Running, &want[1])
}

/// `vfio-mig migrate A C` (mtty-2 into mtty-1) fails with a non-zero status and an error naming
/// the device; both devices end RUNNING with their state.
pub fn migrate_wrong_type() -> Outcome {
    let want = imprint(&[("MTTY_A", 0x3c), ("MTTY_C", 0xc3)])?;
    let (a, c) = (env("MTTY_A")?, env("MTTY_C")?);
    let out = vfio_mig(&["migrate", &a, &c])?;
    ensure!(!out.status.success(), "an mtty-2 was migrated into an mtty-1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("error"), "no error message: {stderr:?}");
    check("MTTY_A", DeviceState::Running, &want[0])?;
    check("MTTY_C", DeviceState::Running, &want[1])
}

/// `vfio-mig save A`, `inspect`, `load B`: B saves byte for byte what A saved and shows A's
/// registers; the same file is refused for the mtty-1 (untouched) and, corrupted, by inspect and
/// load (B reset to RUNNING).
pub fn save_inspect_load() -> Outcome {
    let want = imprint(&[("MTTY_A", 0x44), ("MTTY_B", 0x88)])?[0].clone();
    let want_c = imprint(&[("MTTY_C", 0x22)])?.remove(0);
    let raw_a = {
        let mut a = Mtty::open_keep_state("MTTY_A")?;
        crate::migration::save(&mut a, vfio_migration::session::After::Running)?
    };
    let raw_c = {
        let mut c = Mtty::open_keep_state("MTTY_C")?;
        crate::migration::save(&mut c, vfio_migration::session::After::Running)?
    };
    let (a, b, c) = (env("MTTY_A")?, env("MTTY_B")?, env("MTTY_C")?);
    let file = "/tmp/rig-a.vmig";

    let v = vfio_mig_json(&["save", &a, "-o", file])?;
    ensure!(v["state_bytes"] == 96, "saved {} state bytes", v["state_bytes"]);
    ensure!(v["final_state"] == "RUNNING", "source left {}", v["final_state"]);
    let v = vfio_mig_json(&["inspect", file])?;
    ensure!(v["valid"] == true, "inspect: {v}");
    let identity = v["header"]["devices"][0]["identity"].as_str().unwrap_or_default();
    ensure!(identity == "mdev mtty-2", "stream identity {identity:?}");
    ensure!(
        v["end"]["total_bytes"] == 96,
        "stream carries {}",
        v["end"]["total_bytes"]
    );

    let v = vfio_mig_json(&["--open-mode", "cdev", "load", &b, "-i", file])?;
    ensure!(v["state_bytes"] == 96 && v["final_state"] == "RUNNING", "load: {v}");
    {
        let mut bm = Mtty::open_keep_state("MTTY_B")?;
        bm.expect_state(DeviceState::Running)?;
        crate::migration::same_state(&mut bm, &raw_a)?;
        bm.expect_observed(&want)?;
    }

    // The mtty-1 is refused before it is touched.
    let out = vfio_mig(&["load", &c, "-i", file])?;
    ensure!(!out.status.success(), "an mtty-2 stream was loaded into an mtty-1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("mtty-1") && stderr.contains("mtty-2"),
        "refusal names no types: {stderr}"
    );
    {
        let mut cm = Mtty::open_keep_state("MTTY_C")?;
        cm.expect_state(DeviceState::Running)?;
        crate::migration::same_state(&mut cm, &raw_c)?;
        cm.expect_observed(&want_c)?;
    }

    // One flipped bit near the end: inspect and load refuse it; B is reset and RUNNING.
    let mut bytes = std::fs::read(file).map_err(|e| format!("read {file}: {e}"))?;
    let at = bytes.len() - 70;
    bytes[at] ^= 0x01;
    std::fs::write(file, &bytes).map_err(|e| format!("write {file}: {e}"))?;
    let out = vfio_mig(&["inspect", file])?;
    ensure!(!out.status.success(), "inspect accepted a corrupted stream");
    let out = vfio_mig(&["load", &b, "-i", file])?;
    ensure!(!out.status.success(), "load accepted a corrupted stream");
    Mtty::open_keep_state("MTTY_B")?.expect_state(DeviceState::Running)?;
    std::fs::remove_file(file).map_err(|e| format!("remove {file}: {e}"))
}

/// Opening never changes a device: `vfio-mig save A --stop` leaves A in STOP, `vfio-mig probe A`
/// shows STOP (and says it is not RUNNING), and `vfio-mig reset A` returns it to RUNNING with its
/// registers (mtty's reset resets only the migration state).
pub fn save_stop_probe() -> Outcome {
    let want = imprint(&[("MTTY_A", 0x61)])?.remove(0);
    let a = env("MTTY_A")?;
    let file = "/tmp/rig-stop.vmig";
    let v = vfio_mig_json(&["save", &a, "-o", file, "--stop"])?;
    ensure!(v["final_state"] == "STOP", "save --stop left {}", v["final_state"]);
    let v = vfio_mig_json(&["probe", &a])?;
    ensure!(v["state"] == "STOP", "probe after save --stop: state {}", v["state"]);
    ensure!(v["running"] == false, "probe: running {}", v["running"]);
    ensure!(
        v["note"].as_str().is_some_and(|n| n.contains("not RUNNING")),
        "probe says nothing about STOP: {v}"
    );
    // A second probe still sees STOP: probing changed nothing.
    let v = vfio_mig_json(&["probe", &a])?;
    ensure!(v["state"] == "STOP", "second probe: state {}", v["state"]);
    let v = vfio_mig_json(&["reset", &a])?;
    ensure!(v["state_before"] == "STOP" && v["state"] == "RUNNING", "reset: {v}");
    check("MTTY_A", DeviceState::Running, &want)?;
    std::fs::remove_file(file).map_err(|e| format!("remove {file}: {e}"))
}

/// A refused `vfio-mig load` never touches the device: C (an mtty-1) is left in STOP by
/// `save --stop`, an mtty-2 stream is refused, and C is still STOP and saves byte for byte what
/// it saved before.
pub fn load_mismatch_keeps_state() -> Outcome {
    imprint(&[("MTTY_A", 0x17)])?;
    let want_c = imprint(&[("MTTY_C", 0x71)])?.remove(0);
    let (a, c) = (env("MTTY_A")?, env("MTTY_C")?);
    let (file_a, file_c) = ("/tmp/rig-mm-a.vmig", "/tmp/rig-mm-c.vmig");
    vfio_mig_json(&["save", &a, "-o", file_a])?;
    let v = vfio_mig_json(&["save", &c, "-o", file_c, "--stop"])?;
    ensure!(v["final_state"] == "STOP", "save --stop left {}", v["final_state"]);
    let before = {
        let mut cm = Mtty::open_keep_state("MTTY_C")?;
        cm.expect_state(DeviceState::Stop)?;
        crate::migration::save(&mut cm, vfio_migration::session::After::Stop)?
    };
    for extra in [&[][..], &["--reset-first"][..]] {
        let mut args = vec!["load", &c, "-i", file_a];
        args.extend_from_slice(extra);
        let out = vfio_mig(&args)?;
        ensure!(
            !out.status.success(),
            "{extra:?}: an mtty-2 stream was loaded into an mtty-1"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(stderr.contains("not touched"), "{extra:?}: refusal: {stderr}");
    }
    let mut cm = Mtty::open_keep_state("MTTY_C")?;
    cm.expect_state(DeviceState::Stop)?;
    crate::migration::same_state(&mut cm, &before)?;
    cm.expect_observed(&want_c)?;
    for f in [file_a, file_c] {
        std::fs::remove_file(f).map_err(|e| format!("remove {f}: {e}"))?;
    }
    Ok(())
}

/// A device left in RESUMING: `save` refuses it untouched and points at the reset; with
/// `--reset-first` it is reset and saved, and keeps its registers.
pub fn reset_first() -> Outcome {
    let want = imprint(&[("MTTY_A", 0x5e)])?.remove(0);
    {
        let mut m = Mtty::open_keep_state("MTTY_A")?;
        let session = m
            .dev()
            .set_state(DeviceState::Resuming)
            .map_err(|e| format!("RUNNING -> RESUMING: {e}"))?;
        drop(session);
    }
    let a = env("MTTY_A")?;
    let file = "/tmp/rig-reset-first.vmig";
    let out = vfio_mig(&["save", &a, "-o", file])?;
    ensure!(!out.status.success(), "save started from RESUMING");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("RESUMING") && stderr.contains("--reset-first"),
        "refusal: {stderr}"
    );
    Mtty::open_keep_state("MTTY_A")?.expect_state(DeviceState::Resuming)?;
    let v = vfio_mig_json(&["save", &a, "-o", file, "--reset-first"])?;
    ensure!(
        v["state_bytes"] == 96 && v["final_state"] == "RUNNING",
        "save --reset-first: {v}"
    );
    check("MTTY_A", DeviceState::Running, &want)?;
    std::fs::remove_file(file).map_err(|e| format!("remove {file}: {e}"))
}
