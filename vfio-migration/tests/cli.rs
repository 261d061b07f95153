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

#[test]
fn save_inspect_load_and_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.bin");
    let f = file.to_str().unwrap();
    let out = vfio_mig(&["save", "emulated:size=8M", "-o", f, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["final_state"], "RUNNING");
    let out = vfio_mig(&["inspect", f, "--json"]);
    assert!(out.status.success());
    assert_eq!(json(&out)["valid"], true);
    let out = vfio_mig(&["load", "emulated:size=8M", "-i", f, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let loaded = json(&out);
    assert_eq!(loaded["final_state"], "RUNNING");
    // The same digest as a source built the same way.
    let saved_digest = {
        let mut d = vfio_migration::emulated::EmulatedDevice::from_spec("size=8M").unwrap();
        let mut v = Vec::new();
        vfio_migration::session::save(&mut d, &mut v, Default::default()).unwrap();
        format!("{:016x}", d.digest())
    };
    assert_eq!(loaded["digest"], saved_digest);

    let good = std::fs::read(&file).unwrap();
    let bad = dir.path().join("bad.bin");
    let b = bad.to_str().unwrap();
    // A flipped bit, a cut, and a mismatched device: inspect and load refuse, naming the offset.
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 4;
    for (what, bytes) in [("flipped", flipped), ("truncated", good[..good.len() - 3].to_vec())] {
        std::fs::write(&bad, &bytes).unwrap();
        let out = vfio_mig(&["inspect", b, "--json"]);
        assert!(!out.status.success(), "{what}");
        let v = json(&out);
        assert_eq!(v["valid"], false, "{what}");
        assert!(
            v["offset"].as_u64().is_some() && v["error"].as_str().is_some(),
            "{what}: {v}"
        );
        let out = vfio_mig(&["load", "emulated:size=8M", "-i", b, "--json"]);
        assert!(!out.status.success(), "{what}");
        let e = json(&out)["error"].as_str().unwrap().to_string();
        assert!(e.contains("offset") && e.contains("RUNNING"), "{what}: {e}");
    }
    let out = vfio_mig(&["load", "emulated:size=4M", "-i", f, "--json"]);
    assert!(!out.status.success());
    assert!(json(&out)["error"].as_str().unwrap().contains("not touched"));
    // A failed save leaves no file behind.
    let missing = dir.path().join("nodir/x.bin");
    let out = vfio_mig(&["save", "emulated:size=1M", "-o", missing.to_str().unwrap(), "--json"]);
    assert!(!out.status.success());
    assert!(!missing.exists());
}

#[test]
fn dma_demo_verifies_and_a_dropped_dirty_page_fails_it() {
    let out = vfio_mig(&[
        "demo", "--dma", "--memory", "8M", "--size", "1M", "--rounds", "3", "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    assert_eq!(v["verified"], true);
    let per_round = v["dirty_bytes_per_iteration"].as_array().unwrap();
    assert_eq!(per_round.len(), 4, "3 rounds while running + the final one: {v}");
    assert_eq!(per_round[0], 8 << 20);
    let out = vfio_mig(&[
        "demo",
        "--dma",
        "--memory",
        "8M",
        "--size",
        "1M",
        "--drop-dirty-page",
        "--json",
    ]);
    assert!(!out.status.success());
    let v = json(&out);
    assert_eq!(v["verified"], false);
    assert_eq!(v["mismatch"]["pages"], 1);
    assert_eq!(v["mismatch"]["first_gpa"], v["dropped_page"]);
}

/// Issue 12, part 1: opening never changes a device; a reset is an explicit command or flag.
#[test]
fn reset_is_explicit_and_probe_says_when_a_device_is_not_running() {
    let out = vfio_mig(&["reset", "emulated:size=1M", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    assert_eq!(v["state_before"], "RUNNING", "{v}");
    assert_eq!(v["state"], "RUNNING", "{v}");
    let out = vfio_mig(&["reset", "emulated:size=1M"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("is RUNNING"));

    let out = vfio_mig(&["probe", "emulated:size=1M", "--json"]);
    let v = json(&out);
    assert_eq!(v["running"], true, "{v}");
    assert!(v["note"].is_null(), "{v}");

    // --reset-first is accepted by the commands that open devices; with load it comes after the
    // header check, so a mismatched stream is still refused before the device is touched.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.bin");
    let f = file.to_str().unwrap();
    let out = vfio_mig(&["--reset-first", "save", "emulated:size=1M", "-o", f, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = vfio_mig(&["probe", "--reset-first", "emulated:size=1M", "--json"]);
    assert_eq!(json(&out)["state"], "RUNNING");
    let out = vfio_mig(&["load", "--reset-first", "emulated:size=2M", "-i", f, "--json"]);
    assert!(!out.status.success());
    assert!(json(&out)["error"].as_str().unwrap().contains("not touched"));
    let out = vfio_mig(&["load", "--reset-first", "emulated:size=1M", "-i", f, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Run `vfio-mig ARGS` with stdout a pipe whose reader is already gone.
fn vfio_mig_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(args)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run vfio-mig")
}

/// Issue 12, part 6: every command exits quietly (no panic, nothing on stderr, status 141 as
/// SIGPIPE) when stdout is closed, as with `vfio-mig inspect --json FILE | head -c1`.
#[test]
fn every_command_exits_quietly_on_a_closed_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.bin");
    let f = file.to_str().unwrap();
    let out = vfio_mig(&["save", "emulated:size=1M", "-o", f]);
    assert!(out.status.success());
    let commands: &[&[&str]] = &[
        &["inspect", "--json", f],
        &["inspect", f],
        &["inspect", "--chunks", f],
        &["plan", "RUNNING", "STOP_COPY"],
        &["plan", "RUNNING", "NOPE", "--json"],
        &["probe", "emulated:size=1M"],
        &["probe", "emulated:size=1M", "--json"],
        &["reset", "emulated:size=1M"],
        &["save", "emulated:size=1M", "-o", f],
        &["load", "emulated:size=1M", "-i", f, "--json"],
        &["migrate", "emulated:size=1M", "emulated:size=1M"],
        &["demo", "--size", "1M"],
        &["--help"],
    ];
    for args in commands {
        let out = vfio_mig_closed_stdout(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.trim().is_empty(), "{args:?} was not quiet: {stderr}");
        if args != &["--help"] {
            assert_eq!(out.status.code(), Some(141), "{args:?}: {}", out.status);
        }
    }
}

/// Issue 12, part 6: `inspect --json` is a summary unless `--chunks` asks for the records.
#[test]
fn inspect_lists_records_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.bin");
    let f = file.to_str().unwrap();
    assert!(vfio_mig(&["save", "emulated:size=4M", "-o", f]).status.success());
    let v = json(&vfio_mig(&["inspect", "--json", f]));
    assert_eq!(v["valid"], true);
    assert!(v.get("chunks").is_none(), "{v}");
    assert!(v["sections"].as_array().is_some_and(|s| !s.is_empty()), "{v}");
    let total = v["end"]["total_chunks"].as_u64().unwrap();
    assert!(total > 1);
    let v = json(&vfio_mig(&["inspect", "--json", "--chunks", f]));
    assert_eq!(v["chunks"].as_array().map(Vec::len), Some(total as usize), "{v}");
    let text = vfio_mig(&["inspect", f]);
    assert!(!String::from_utf8_lossy(&text.stdout).contains("    offset"));
    let text = vfio_mig(&["inspect", "--chunks", f]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("    offset"));
}

#[test]
fn load_refuses_a_stream_of_unknown_identity_unless_forced() {
    use vfio_migration::device::{DeviceIdentity, MigrationDevice};
    use vfio_migration::stream::{Header, SectionKind, StreamWriter};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unknown.bin");
    let f = file.to_str().unwrap();
    let mut src = vfio_migration::emulated::EmulatedDevice::from_spec("size=1M,seed=5").unwrap();
    src.touch_blocks(4).unwrap();
    let mut w = StreamWriter::new(
        Vec::new(),
        Header::single(DeviceIdentity::Unknown, src.flags().unwrap()),
    )
    .unwrap();
    let mut sink = w.chunk_sink(SectionKind::StopCopy, 0).unwrap();
    vfio_migration::session::save(&mut src, &mut sink, Default::default()).unwrap();
    sink.finish().unwrap();
    std::fs::write(&file, w.finish().unwrap()).unwrap();

    let out = vfio_mig(&["load", "emulated:size=1M,seed=5", "-i", f, "--json"]);
    assert!(!out.status.success());
    let e = json(&out)["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("unknown identity") && e.contains("--force-unknown-identity"),
        "{e}"
    );
    let out = vfio_mig(&[
        "load",
        "emulated:size=1M,seed=5",
        "-i",
        f,
        "--force-unknown-identity",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(json(&out)["digest"], format!("{:016x}", src.digest()));
}
