//! `vfio-mig serve` and `vfio-user:SOCKET` devices, run as users run them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Output, Stdio};

fn vfio_mig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(args)
        .output()
        .expect("run vfio-mig")
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// `vfio-mig serve SPEC --socket PATH --connections N --json`, once it listens.
fn serve(spec: &str, socket: &Path, connections: u32) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(["serve", spec, "--socket"])
        .arg(socket)
        .args(["--connections", &connections.to_string(), "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run vfio-mig serve");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let v = json(line.as_bytes());
    assert_eq!(v["socket"], socket.display().to_string());
    (child, out)
}

/// The server's final report, once it served its connections.
fn finish(mut child: Child, mut out: BufReader<ChildStdout>) -> serde_json::Value {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(child.wait().unwrap().success());
    json(line.as_bytes())
}

#[test]
fn probe_save_and_load_through_served_devices() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    let (sa, oa) = serve("emulated:size=1M,seed=5,dirty-rate=4M", &a, 2);
    let (sb, ob) = serve("emulated:size=1M,seed=5", &b, 1);
    let dev_a = format!("vfio-user:{}", a.display());
    let dev_b = format!("vfio-user:{}", b.display());

    let out = vfio_mig(&["probe", &dev_a, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let v = json(&out.stdout);
    assert_eq!(v["flags"], 5, "stop-copy + pre-copy, P2P never offered: {v}");
    assert_eq!(v["state"], "RUNNING");
    assert!(v["stop_copy_size"].is_null(), "{v}");
    assert!(v["identity"].as_str().unwrap().starts_with("emulated"), "{v}");

    let file = dir.path().join("a.state");
    let file_s = file.to_str().unwrap();
    let out = vfio_mig(&["save", &dev_a, "-o", file_s, "--stop", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = vfio_mig(&["load", &dev_b, "-i", file_s, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    let ra = finish(sa, oa);
    let rb = finish(sb, ob);
    assert_eq!(ra["state"], "STOP");
    assert_eq!(rb["state"], "RUNNING");
    assert_eq!(ra["dropped"], 0);
    assert_eq!(ra["digest"], rb["digest"], "{ra} {rb}");
}

#[test]
fn migrate_between_served_devices() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    let (sa, oa) = serve("emulated:size=2M,seed=6,dirty-rate=1M", &a, 1);
    let (sb, ob) = serve("emulated:size=2M,seed=6", &b, 1);
    let out = vfio_mig(&[
        "migrate",
        &format!("vfio-user:{}", a.display()),
        &format!("vfio-user:{}", b.display()),
        "--max-iterations",
        "5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let ra = finish(sa, oa);
    let rb = finish(sb, ob);
    assert_eq!(rb["state"], "RUNNING");
    assert_eq!(ra["digest"], rb["digest"], "{ra} {rb}");
    // The content fixed at STOP_COPY on the source is what the destination's load brought.
    assert!(ra["saved_digest"].is_string(), "{ra}");
    assert_eq!(ra["saved_digest"], rb["loaded_digest"], "{ra} {rb}");
    assert_eq!(rb["loaded_digest"], rb["digest"], "{rb}");
    assert!(
        ra["loaded_digest"].is_null() && rb["saved_digest"].is_null(),
        "{ra} {rb}"
    );
}

#[test]
fn serve_refuses_a_socket_in_use_and_non_emulated_devices() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sock");
    let (sa, oa) = serve("emulated:size=64K", &a, 2);
    let out = vfio_mig(&["serve", "emulated:size=64K", "--socket", a.to_str().unwrap(), "--json"]);
    assert!(!out.status.success());
    assert!(
        json(&out.stdout)["error"]
            .as_str()
            .unwrap()
            .contains("already listening")
    );
    let out = vfio_mig(&[
        "serve",
        &format!("vfio-user:{}", a.display()),
        "--socket",
        "/nonexistent/x",
        "--json",
    ]);
    assert!(!out.status.success());
    assert!(
        json(&out.stdout)["error"].as_str().unwrap().contains("only emulated"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Both commands above connected once each: the server counted them.
    let r = finish(sa, oa);
    assert_eq!(r["connections"], 2);
}

#[test]
fn send_and_receive_between_served_devices() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    let m = dir.path().join("m.sock");
    let (sa, oa) = serve("emulated:size=2M,seed=8,dirty-rate=1M", &a, 1);
    let (sb, ob) = serve("emulated:size=2M,seed=8", &b, 1);
    let mut r = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(["receive", &format!("vfio-user:{}", b.display()), "--listen"])
        .arg(format!("unix:{}", m.display()))
        .args(["--accept-timeout", "30", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(r.stderr.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{line}");
    let out = vfio_mig(&[
        "send",
        &format!("vfio-user:{}", a.display()),
        "--to",
        &format!("unix:{}", m.display()),
        "--max-iterations",
        "5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let received = r.wait_with_output().unwrap();
    assert!(
        received.status.success(),
        "{}",
        String::from_utf8_lossy(&received.stdout)
    );
    let ra = finish(sa, oa);
    let rb = finish(sb, ob);
    assert_eq!(rb["state"], "RUNNING");
    assert_eq!(ra["digest"], rb["digest"], "{ra} {rb}");
}
