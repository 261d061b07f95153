//! `vfio-mig send` and `vfio-mig receive` as two processes: unix and TCP sockets, several
//! connections, TLS, and a peer killed in the middle.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Start a receiver; returns it and the URL it listens on (read from its stderr).
fn receiver(devices: &[&str], listen: &str, extra: &[&str]) -> (Child, String) {
    let mut c = bin()
        .arg("receive")
        .args(devices)
        .args([
            "--listen",
            listen,
            "--accept-timeout",
            "30",
            "--idle-timeout",
            "5",
            "--json",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vfio-mig receive");
    let mut line = String::new();
    BufReader::new(c.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("vfio-mig: listening on ")
        .unwrap_or_else(|| panic!("unexpected first stderr line {line:?}"))
        .to_string();
    (c, url)
}

fn send(devices: &[&str], to: &str, extra: &[&str]) -> Output {
    bin()
        .arg("send")
        .args(devices)
        .args(["--to", to, "--idle-timeout", "5", "--json"])
        .args(extra)
        .output()
        .expect("run vfio-mig send")
}

fn migrate(listen: &str, conns: &str, tls: Option<&Path>, precopy: bool) {
    let src = ["emulated:size=4M,seed=3,dirty-rate=512K", "emulated:size=2M,seed=4"];
    let dst = ["emulated:size=4M,seed=3", "emulated:size=2M,seed=4"];
    let tls_args: Vec<&str> = tls.map_or(vec![], |d| vec!["--tls-dir", d.to_str().unwrap()]);
    let (r, url) = receiver(&dst, listen, &tls_args);
    let mut extra = vec!["--connections", conns];
    extra.extend(&tls_args);
    if !precopy {
        extra.push("--no-precopy");
    }
    let s = send(&src, &url, &extra);
    let rout = r.wait_with_output().unwrap();
    assert!(s.status.success(), "send: {}", String::from_utf8_lossy(&s.stdout));
    assert!(
        rout.status.success(),
        "receive: {}",
        String::from_utf8_lossy(&rout.stdout)
    );
    let (sv, rv) = (json(&s), json(&rout));
    for key in [
        "devices",
        "precopy_bytes",
        "stop_copy_bytes",
        "iterations",
        "downtime_ms",
        "est_downtime_ms",
    ] {
        assert!(sv.get(key).is_some(), "send JSON lacks {key}: {sv}");
        assert!(rv.get(key).is_some(), "receive JSON lacks {key}: {rv}");
    }
    assert_eq!(sv["devices"], 2);
    assert_eq!(rv["verified"], true, "{rv}");
    assert_eq!(rv["tls"], tls.is_some());
    assert_eq!(rv["connections"].as_u64().unwrap().to_string(), conns);
    assert_eq!(sv["precopy_bytes"], rv["precopy_bytes"]);
    assert_eq!(sv["stop_copy_bytes"], rv["stop_copy_bytes"]);
    assert_eq!(sv["iterations"], rv["iterations"]);
    for i in 0..2 {
        assert_eq!(
            sv["per_device"][i]["source_digest"], rv["per_device"][i]["digest"],
            "device {i}: {sv} {rv}"
        );
    }
    if precopy {
        assert!(sv["precopy_bytes"].as_u64().unwrap() >= 6 << 20, "{sv}");
    } else {
        assert_eq!(sv["precopy_bytes"], 0);
    }
}

#[test]
fn send_and_receive_over_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix:{}", dir.path().join("m.sock").display());
    migrate(&sock, "1", None, true);
    migrate(&sock, "3", None, false);
    migrate("tcp:127.0.0.1:0", "2", None, true);
}

#[test]
fn send_and_receive_with_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, "cli test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.path().join("ca-cert.pem"), ca.pem()).unwrap();
    for stem in ["server", "client"] {
        let p = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.path().join(format!("{stem}-cert.pem")), cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{stem}-key.pem")), key.serialize_pem()).unwrap();
    }
    migrate("tcp:127.0.0.1:0", "2", Some(dir.path()), true);
    // A sender without TLS is not understood by a TLS receiver: it fails, and the receiver
    // drops it and goes on serving the next sender.
    let tls = ["--tls-dir", dir.path().to_str().unwrap()];
    let (r, url) = receiver(&["emulated:size=1M"], "tcp:127.0.0.1:0", &tls);
    let s = send(&["emulated:size=1M"], &url, &[]);
    assert!(!s.status.success());
    assert!(json(&s)["error"].is_string());
    let good = send(&["emulated:size=1M"], &url, &tls);
    let rout = r.wait_with_output().unwrap();
    assert!(good.status.success(), "{}", json(&good));
    assert_eq!(json(&good)["outcome"], "completed");
    assert!(rout.status.success(), "{}", json(&rout));
    assert_eq!(json(&rout)["verified"], true, "{}", json(&rout));
}

#[test]
fn killing_the_receiver_mid_migration_returns_the_source_to_running() {
    // A slow device (4 MiB/s) keeps pre-copy going for seconds; the receiver dies in it.
    let (mut r, url) = receiver(&["emulated:size=16M"], "tcp:127.0.0.1:0", &[]);
    let sender = bin()
        .args([
            "send",
            "emulated:size=16M,read-rate=4M",
            "--to",
            &url,
            "--idle-timeout",
            "5",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    r.kill().unwrap();
    let _ = r.wait();
    let t = std::time::Instant::now();
    let s = sender.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the sender noticed in {:?}",
        t.elapsed()
    );
    assert!(!s.status.success());
    let e = json(&s)["error"].as_str().unwrap().to_string();
    assert!(e.contains("returned to RUNNING"), "{e}");
}

#[test]
fn killing_the_sender_mid_migration_resets_the_destination() {
    let (r, url) = receiver(&["emulated:size=16M"], "tcp:127.0.0.1:0", &[]);
    let mut sender = bin()
        .args(["send", "emulated:size=16M,read-rate=4M", "--to", &url, "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    sender.kill().unwrap();
    let _ = sender.wait();
    let t = std::time::Instant::now();
    let out = r.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(!out.status.success());
    let e = json(&out)["error"].as_str().unwrap().to_string();
    assert!(e.contains("reset and is RUNNING"), "{e}");
}
