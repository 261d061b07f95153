//! Our vfio-user server (`vfio-mig serve`) driven by an independent client:
//! `tests/vfio-user-peer/migr-client`, a small C client on libvfio-user's own message framing
//! (`lib/tran_sock.c`, `tran_parse_version_json`) and its protocol structs, built from
//! `../shared/upstream/libvfio-user-*.tar.xz` by `tests/vfio-user-peer/build.sh` (cached). The
//! client migrates one served emulated device into another (PRE_COPY until a short read,
//! STOP_COPY until a short read, RESUMING in chunks) and throws damaged messages at a server; the
//! servers' final reports (state, content digest, dropped connections) tell what happened.
//! `vfio_user_peer.rs` is the other half: our client against a device on libvfio-user.
//!
//! A calibration test runs the client between two `migr-device`s on libvfio-user's own server.
//!
//! `VFIO_USER_PEER_CLIENT_BIN` and `VFIO_USER_PEER_BIN` name a ready client and device instead of
//! building them. Without the build prerequisites (meson, ninja, pkg-config, json-c, cmocka, the
//! tarball) the tests print a loud SKIPPED message and pass, unless `VFIO_USER_PEER_REQUIRED=1`
//! (what `scripts/test-all` sets, after installing the Debian packages), which makes a missing
//! prerequisite fail.

#[path = "support/peer.rs"]
mod peer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use peer::{Peer, bins};

const WAIT: Duration = Duration::from_secs(60);

/// The client binary (see [`bins`]).
fn client_bin() -> Option<&'static Path> {
    bins().map(|b| b.client.as_path())
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// A running `vfio-mig serve SPEC --socket PATH --connections N --json`.
struct Served {
    child: Child,
    lines: Receiver<String>,
    socket: PathBuf,
    spec: String,
}

impl Served {
    fn start(dir: &Path, name: &str, spec: &str, connections: usize) -> Served {
        let socket = dir.join(format!("{name}.sock"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
            .args(["serve", spec, "--socket"])
            .arg(&socket)
            .args(["--connections", &connections.to_string(), "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run vfio-mig serve");
        let lines = peer::line_reader(&mut child);
        let mut s = Served {
            child,
            lines,
            socket,
            spec: spec.to_string(),
        };
        let first = s.next_line();
        assert_eq!(json(&first)["socket"], s.socket.display().to_string(), "{first}");
        s
    }

    fn next_line(&mut self) -> String {
        self.lines.recv_timeout(WAIT).unwrap_or_else(|e| {
            panic!(
                "no line from vfio-mig serve {} in {WAIT:?} ({e}; exited: {:?})",
                self.spec,
                self.child.try_wait()
            )
        })
    }

    fn sock(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// The final report, once the server served its connections.
    fn finish(mut self) -> serde_json::Value {
        let line = self.next_line();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "vfio-mig serve {}: {status}", self.spec);
        json(&line)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The content digest of a fresh device of `spec` (a server that serves no connection).
fn fresh_digest(dir: &Path, spec: &str) -> String {
    Served::start(dir, "fresh", spec, 0).finish()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Run the client; its stdout lines and exit status.
fn client(bin: &Path, args: &[&str]) -> (Vec<String>, Option<i32>) {
    let Output { status, stdout, .. } = Command::new(bin)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let lines = String::from_utf8_lossy(&stdout).lines().map(str::to_string).collect();
    (lines, status.code())
}

/// `key=value` words of a line (after its first `skip` words).
fn fields(line: &str, skip: usize) -> HashMap<String, String> {
    line.split_whitespace()
        .skip(skip)
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The client's `MIGR-CLIENT ok ...` line as numbers (it must have succeeded).
fn ok_report(lines: &[String], status: Option<i32>) -> HashMap<String, u64> {
    assert_eq!(status, Some(0), "client: {lines:?}");
    let last = lines.last().unwrap_or_else(|| panic!("no output from the client"));
    assert!(last.starts_with("MIGR-CLIENT ok "), "client: {lines:?}");
    fields(last, 2)
        .into_iter()
        .filter_map(|(k, v)| v.parse().ok().map(|n| (k, n)))
        .collect()
}

/// Let a source with a dirty rate change its content before it is migrated, so that a matching
/// digest on the destination means the data moved (not that both started from the same seed).
fn let_it_dirty() {
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn a_libvfio_user_client_migrates_between_our_servers_with_precopy() {
    let Some(bin) = client_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    const SIZE: u64 = 4 << 20;
    let src_spec = "emulated:size=4M,seed=11,flags=stop-copy+pre-copy,dirty-rate=8M";
    let dst_spec = "emulated:size=4M,seed=11";
    let fresh = fresh_digest(dir.path(), dst_spec);
    let a = Served::start(dir.path(), "a", src_spec, 1);
    let b = Served::start(dir.path(), "b", dst_spec, 1);
    let_it_dirty();
    let saved = dir.path().join("stream.bin");
    let (lines, status) = client(
        bin,
        &[
            "migrate",
            "--from",
            a.sock(),
            "--to",
            b.sock(),
            "--save",
            saved.to_str().unwrap(),
        ],
    );
    let r = ok_report(&lines, status);
    let ra = a.finish();
    let rb = b.finish();

    assert_eq!(ra["state"], "STOP", "{ra}");
    assert_eq!(rb["state"], "RUNNING", "{rb}");
    assert_eq!((ra["dropped"].as_u64(), rb["dropped"].as_u64()), (Some(0), Some(0)));
    assert_eq!(ra["digest"], rb["digest"], "{ra} {rb}");
    assert_ne!(
        rb["digest"], fresh,
        "the source's content changed before the migration: {rb}"
    );
    // The emulated device hands out every block in its first PRE_COPY pass; STOP_COPY the rest.
    assert!(r["precopy"] > SIZE, "{lines:?}");
    assert!(r["stopcopy"] > 0, "{lines:?}");
    assert_eq!(r["bytes"], r["precopy"] + r["stopcopy"], "{lines:?}");
    assert_eq!(std::fs::metadata(&saved).unwrap().len(), r["bytes"]);
    // The limits: 64 KiB reads, 32 KiB writes (within the 1 MiB the server announces).
    assert_eq!(r["max_data_xfer_size"], 1 << 20, "{lines:?}");
    assert_eq!((r["read_chunk"], r["write_chunk"]), (64 << 10, 32 << 10), "{lines:?}");
    assert_eq!(r["writes"], r["bytes"].div_ceil(32 << 10), "{lines:?}");
}

#[test]
fn a_libvfio_user_client_migrates_stop_copy_only_in_whole_mebibyte_messages() {
    let Some(bin) = client_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = Served::start(dir.path(), "a", "emulated:size=3M,seed=12,dirty-rate=8M", 1);
    let b = Served::start(dir.path(), "b", "emulated:size=3M,seed=12", 1);
    let_it_dirty();
    let (lines, status) = client(
        bin,
        &[
            "migrate",
            "--from",
            a.sock(),
            "--to",
            b.sock(),
            "--no-precopy",
            "--read-chunk",
            "1M",
            "--write-chunk",
            "1M",
        ],
    );
    let r = ok_report(&lines, status);
    let ra = a.finish();
    let rb = b.finish();
    assert_eq!(rb["state"], "RUNNING", "{rb}");
    assert_eq!(ra["digest"], rb["digest"], "{ra} {rb}");
    assert_eq!(r["precopy"], 0, "{lines:?}");
    assert_eq!(r["bytes"], r["stopcopy"], "{lines:?}");
    assert!(r["bytes"] > 3 << 20, "{lines:?}");
    assert_eq!((r["read_chunk"], r["write_chunk"]), (1 << 20, 1 << 20), "{lines:?}");
    assert_eq!(r["reads"], r["bytes"] / (1 << 20) + 1, "{lines:?}");
    assert_eq!(r["writes"], r["bytes"].div_ceil(1 << 20), "{lines:?}");
}

#[test]
fn damaged_messages_leave_our_server_serving() {
    let Some(bin) = client_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (lines, status) = client(bin, &["garbage", "--count"]);
    assert_eq!(status, Some(0), "{lines:?}");
    let garbage_connections: usize = lines[0].parse().unwrap();
    let a = Served::start(
        dir.path(),
        "a",
        "emulated:size=1M,seed=21,flags=stop-copy+pre-copy,dirty-rate=4M",
        1,
    );
    // The garbage connections, then a migration into the same server.
    let g = Served::start(dir.path(), "g", "emulated:size=1M,seed=21", garbage_connections + 1);

    let (lines, status) = client(bin, &["garbage", "--socket", g.sock()]);
    let summary = ok_report(&lines, status);
    let cases: HashMap<String, HashMap<String, String>> = lines
        .iter()
        .filter(|l| l.starts_with("MIGR-CLIENT-CASE "))
        .map(|l| {
            let f = fields(l, 1);
            (f["name"].clone(), f)
        })
        .collect();
    assert_eq!(cases.len() as u64, summary["cases"], "{lines:?}");
    assert_eq!(summary["connections"], garbage_connections as u64, "{lines:?}");
    let outcome = |name: &str| -> String {
        let f = cases.get(name).unwrap_or_else(|| panic!("no case {name}: {lines:?}"));
        match f.get("errno") {
            Some(e) => format!("{} errno={e} conn={}", f["result"], f["conn"]),
            None => format!("{} conn={}", f["result"], f["conn"]),
        }
    };
    // What the server documents: a bad header ends the connection, a message over the cap gets
    // E2BIG and ends it, an unknown command gets ENOSYS and the connection goes on.
    assert_eq!(outcome("reply-flag"), "dropped conn=dropped");
    assert_eq!(outcome("short-size"), "dropped conn=dropped");
    assert_eq!(outcome("oversize"), format!("error errno={} conn=dropped", libc::E2BIG));
    assert_eq!(outcome("truncated"), "dropped conn=dropped");
    assert_eq!(
        outcome("before-version"),
        format!("error errno={} conn=dropped", libc::EINVAL)
    );
    assert_eq!(
        outcome("unknown-command"),
        format!("error errno={} conn=kept", libc::ENOSYS)
    );
    assert_eq!(
        outcome("unknown-feature"),
        format!("error errno={} conn=kept", libc::ENOTTY)
    );
    for name in [
        "bad-state",
        "read-outside-session",
        "write-outside-session",
        "garbage-write-resuming",
        "write-size-mismatch",
    ] {
        assert_eq!(
            outcome(name),
            format!("error errno={} conn=kept", libc::EINVAL),
            "{name}"
        );
    }

    // The server still migrates: the client loads the source's state into it.
    let_it_dirty();
    let (lines, status) = client(bin, &["migrate", "--from", a.sock(), "--to", g.sock()]);
    ok_report(&lines, status);
    let ra = a.finish();
    let rg = g.finish();
    assert_eq!(rg["state"], "RUNNING", "{rg}");
    assert_eq!(ra["digest"], rg["digest"], "{ra} {rg}");
    assert_eq!(rg["connections"], garbage_connections as u64 + 1, "{rg}");
    // The server counts the connections it dropped as the client saw them end.
    assert_eq!(rg["dropped"], summary["dropped"], "{rg} {lines:?}");
}

#[test]
fn our_server_refuses_a_stream_of_another_device_and_a_damaged_one() {
    let Some(bin) = client_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = Served::start(dir.path(), "a", "emulated:size=1M,seed=31,dirty-rate=4M", 1);
    // Another seed: another device, whose stream header the destination refuses on the first write.
    let other = Served::start(dir.path(), "other", "emulated:size=1M,seed=32", 1);
    let other_fresh = fresh_digest(dir.path(), "emulated:size=1M,seed=32");
    let_it_dirty();
    let saved = dir.path().join("stream.bin");
    let (lines, status) = client(
        bin,
        &[
            "migrate",
            "--from",
            a.sock(),
            "--to",
            other.sock(),
            "--save",
            saved.to_str().unwrap(),
        ],
    );
    assert_eq!(status, Some(1), "{lines:?}");
    assert!(
        lines.last().unwrap().starts_with("MIGR-CLIENT FAIL ") && lines.last().unwrap().contains("MIG_DATA_WRITE at 0"),
        "{lines:?}"
    );
    let ra = a.finish();
    let ro = other.finish();
    assert_eq!(ro["state"], "RESUMING", "{ro}");
    assert_eq!(ro["digest"], other_fresh, "{ro}");
    assert_eq!(ro["dropped"], 0, "{ro}");

    // One flipped bit in the middle of the saved stream: RESUMING -> STOP refuses it.
    let mut stream = std::fs::read(&saved).unwrap();
    let mid = stream.len() / 2;
    stream[mid] ^= 1;
    let damaged = dir.path().join("damaged.bin");
    std::fs::write(&damaged, &stream).unwrap();
    let b = Served::start(dir.path(), "b", "emulated:size=1M,seed=31", 2);
    let (lines, status) = client(bin, &["load", "--to", b.sock(), "--in", damaged.to_str().unwrap()]);
    assert_eq!(status, Some(1), "{lines:?}");
    assert!(lines.last().unwrap().starts_with("MIGR-CLIENT FAIL "), "{lines:?}");
    // After a reset the intact stream loads (the refused load left the device RESUMING).
    stream[mid] ^= 1;
    std::fs::write(&damaged, &stream).unwrap();
    let (lines, status) = client(
        bin,
        &[
            "load",
            "--to",
            b.sock(),
            "--in",
            damaged.to_str().unwrap(),
            "--reset-first",
        ],
    );
    let r = ok_report(&lines, status);
    assert_eq!(r["bytes"], stream.len() as u64, "{lines:?}");
    let rb = b.finish();
    assert_eq!(rb["state"], "RUNNING", "{rb}");
    assert_eq!(ra["digest"], rb["digest"], "{ra} {rb}");
    assert_eq!(rb["dropped"], 0, "{rb}");
}

/// Calibration: the client migrates between two devices on libvfio-user's own server (padded
/// short reads, its state machine, its 32 KiB receive limit), so what it finds on our server is
/// what a libvfio-user-framed client finds, not a fault of the client.
#[test]
fn the_client_migrates_between_libvfio_user_devices() {
    let Some(bins) = bins() else { return };
    const SIZE: u64 = 1 << 20;
    let mut src = Peer::start(&bins.device, 51, SIZE, false);
    let mut dst = Peer::start(&bins.device, 51, SIZE, true);
    let crc = fields(&src.wait_for("PEER-READY"), 1)["crc"].clone();
    let (lines, status) = client(&bins.client, &["migrate", "--from", src.sock(), "--to", dst.sock()]);
    let r = ok_report(&lines, status);
    // migr-device hands out its 32-byte header and half its state in PRE_COPY, the rest and an
    // 8-byte trailer in STOP_COPY.
    assert_eq!(
        (r["precopy"], r["stopcopy"]),
        (32 + SIZE / 2, SIZE / 2 + 8),
        "{lines:?}"
    );
    assert_eq!(
        src.wait_for("PEER-SAVED"),
        format!(
            "PEER-SAVED precopy={} stopcopy={} total={}",
            32 + SIZE / 2,
            SIZE / 2 + 8,
            SIZE + 40
        )
    );
    let state = dst.wait_for("PEER-STATE");
    assert_eq!(
        state,
        format!("PEER-STATE ok crc={crc} bytes={SIZE} seed=51"),
        "{:?}",
        dst.seen()
    );
    let (exit, lines, status) = dst.finish();
    assert_eq!(exit, format!("PEER-EXIT verdict=ok crc={crc}"));
    assert_eq!(status, 0, "destination peer: {lines:?}");
}
