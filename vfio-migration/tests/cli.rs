//! The `vfio-mig` command line, run as users run it.

use std::process::{Command, Output};

fn vfio_mig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(args)
        .output()
        .expect("run vfio-mig")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn plan_prints_the_kernel_path() {
    let out = vfio_mig(&["plan", "RUNNING", "STOP_COPY", "--flags", "stop-copy,p2p", "--json"]);
    assert!(out.status.success());
    assert_eq!(
        json(&out),
        serde_json::json!({"path": ["RUNNING", "RUNNING_P2P", "STOP", "STOP_COPY"]})
    );
    let out = vfio_mig(&["plan", "running", "stop-copy", "--flags", "stop-copy"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "RUNNING -> STOP -> STOP_COPY"
    );
}

#[test]
fn plan_errors_are_json_with_a_failing_exit() {
    for args in [
        &["plan", "STOP_COPY", "PRE_COPY", "--json"][..],
        &["plan", "RUNNING", "ERROR", "--json"][..],
        &["plan", "RUNNING", "PRE_COPY", "--flags", "stop-copy,p2p", "--json"][..],
        &["plan", "RUNNING", "NOPE", "--json"][..],
        &["plan", "RUNNING", "STOP", "--flags", "warp", "--json"][..],
    ] {
        let out = vfio_mig(args);
        assert!(!out.status.success(), "{args:?}");
        let v = json(&out);
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{args:?}: {v}");
    }
}

#[test]
fn probe_reports_flags_states_and_size() {
    let out = vfio_mig(&["probe", "emulated:size=1M,flags=stop-copy+p2p", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    assert_eq!(v["flags"], 3);
    assert_eq!(v["state"], "RUNNING");
    assert_eq!(
        v["states"],
        serde_json::json!(["STOP", "RUNNING", "STOP_COPY", "RESUMING", "RUNNING_P2P"])
    );
    assert!(v["stop_copy_size"].as_u64().unwrap() > 1 << 20);
    let out = vfio_mig(&["probe", "emulated:size=-1", "--json"]);
    assert!(!out.status.success());
    assert!(json(&out)["error"].as_str().unwrap().contains("size"));
}

#[test]
fn demo_verifies_with_and_without_precopy() {
    for extra in [&[][..], &["--no-precopy"][..], &["--devices", "3"][..]] {
        let mut args = vec!["demo", "--size", "4M", "--dirty-rate", "1M", "--json"];
        args.extend_from_slice(extra);
        let out = vfio_mig(&args);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = json(&out);
        assert_eq!(v["verified"], true, "{v}");
        for key in [
            "devices",
            "precopy_bytes",
            "stop_copy_bytes",
            "iterations",
            "downtime_ms",
            "est_downtime_ms",
        ] {
            assert!(v.get(key).is_some(), "missing {key}: {v}");
        }
        if extra.contains(&"--no-precopy") {
            assert_eq!(v["precopy_bytes"], 0);
            assert!(v["stop_copy_bytes"].as_u64().unwrap() > 4 << 20);
        } else {
            assert!(v["precopy_bytes"].as_u64().unwrap() >= 4 << 20, "{v}");
        }
    }
}

#[test]
fn migrate_between_emulated_devices_and_refuses_mismatches() {
    let out = vfio_mig(&[
        "migrate",
        "emulated:size=2M,seed=3",
        "emulated:size=2M,seed=3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["verified"], true);
    // A destination of another size refuses the state; the error says so.
    let out = vfio_mig(&["migrate", "emulated:size=2M", "emulated:size=3M", "--json"]);
    assert!(!out.status.success());
    assert!(json(&out)["error"].as_str().unwrap().contains("emulated"));
    let out = vfio_mig(&["migrate", "emulated,emulated", "emulated", "--json"]);
    assert!(!out.status.success());
}
