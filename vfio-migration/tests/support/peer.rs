//! The libvfio-user peers of the vfio-user tests (`tests/vfio-user-peer/`): `migr-device`, a small
//! device written in C on libvfio-user, and `migr-client`, a client on its message framing. Both
//! are built from `../shared/upstream/libvfio-user-*.tar.xz` by `tests/vfio-user-peer/build.sh`
//! (cached), unless `VFIO_USER_PEER_BIN` / `VFIO_USER_PEER_CLIENT_BIN` name ready binaries.
//!
//! Without the build prerequisites (meson, ninja, pkg-config, json-c, cmocka, the tarball) the
//! binaries are `None` after a loud SKIPPED message, and the tests return early (they pass), unless
//! `VFIO_USER_PEER_REQUIRED=1` (what `scripts/test-all` sets), which makes a missing prerequisite
//! panic. Any other build failure panics.
//!
//! Shared by `vfio_user_peer.rs`, `vfio_user_vmm_client.rs` and `vfio_user_peer_client.rs`
//! (`#[path]`-included, so not every item is used by every includer).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use vfio_migration::vfio_user::VfioUserDevice;

/// How long [`Peer::wait_for`] waits for its line.
const WAIT: Duration = Duration::from_secs(60);

/// The lines `child` prints on its (piped) stdout, read by a thread as they come.
pub fn line_reader(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().expect("the child's stdout is piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// `VAR` as a path, if it is set (it must name a file).
fn given(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).map(|p| {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{var}={} is not a file", p.display());
        p
    })
}

/// Run `build.sh`: its stdout (the client's path, then the device's as the last line); `None`
/// (after a loud message) when a build prerequisite is missing and `VFIO_USER_PEER_REQUIRED` is
/// not `1`.
fn build() -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vfio-user-peer/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let required = std::env::var("VFIO_USER_PEER_REQUIRED").is_ok_and(|v| v == "1");
    match out.status.code() {
        Some(0) => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        Some(3) if !required => {
            eprintln!(
                "\n##########\n## SKIPPED: the libvfio-user peer tests ({}.rs): a build prerequisite is missing \
                 (see the MISSING line above; scripts/test-all installs them)\n##########\n",
                env!("CARGO_CRATE_NAME")
            );
            None
        }
        _ => panic!("{} failed ({})", script.display(), out.status),
    }
}

/// The `migr-device` binary, built once per test process: `VFIO_USER_PEER_BIN`, else the last
/// line `build.sh` prints; `None` when a prerequisite is missing (see [`build`]).
pub fn device_bin() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = given("VFIO_USER_PEER_BIN") {
            return Some(p);
        }
        let stdout = build()?;
        let bin = PathBuf::from(stdout.lines().last().expect("build.sh printed no path").trim());
        assert!(bin.is_file(), "build.sh printed {}, not a file", bin.display());
        Some(bin)
    })
    .as_deref()
}

/// Both peers built by `build.sh`: the client, and the device.
#[derive(Debug)]
pub struct Bins {
    pub client: PathBuf,
    pub device: PathBuf,
}

/// Both binaries, built once per test process: `VFIO_USER_PEER_CLIENT_BIN` and
/// `VFIO_USER_PEER_BIN` when both are set, else what `build.sh` prints (either variable still
/// wins); `None` when a prerequisite is missing (see [`build`]).
pub fn bins() -> Option<&'static Bins> {
    static BINS: OnceLock<Option<Bins>> = OnceLock::new();
    BINS.get_or_init(|| {
        if let (Some(client), Some(device)) = (given("VFIO_USER_PEER_CLIENT_BIN"), given("VFIO_USER_PEER_BIN")) {
            return Some(Bins { client, device });
        }
        let stdout = build()?;
        let printed = |name: &str| {
            let bin = stdout
                .lines()
                .map(|l| PathBuf::from(l.trim()))
                .find(|p| p.file_name().is_some_and(|n| n == name))
                .unwrap_or_else(|| panic!("build.sh printed no {name} path: {stdout:?}"));
            assert!(bin.is_file(), "build.sh printed {}, not a file", bin.display());
            bin
        };
        Some(Bins {
            client: given("VFIO_USER_PEER_CLIENT_BIN").unwrap_or_else(|| printed("migr-client")),
            device: given("VFIO_USER_PEER_BIN").unwrap_or_else(|| printed("migr-device")),
        })
    })
    .as_ref()
}

/// A running `migr-device` (in a temporary directory of its own) and the lines it printed.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Peer {
    /// Start `bin` with `size` bytes of state generated from `seed` (a source), or, with `dest`,
    /// empty and checking what it is given against `seed`; returns once it printed `PEER-READY`.
    pub fn start(bin: &Path, seed: u64, size: u64, dest: bool) -> Peer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("peer.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--seed", &seed.to_string(), "--size", &size.to_string()]);
        if dest {
            cmd.arg("--dest");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let lines = line_reader(&mut child);
        let mut peer = Peer {
            child,
            lines,
            seen: Vec::new(),
            socket,
            _dir: dir,
        };
        peer.wait_for("PEER-READY");
        peer
    }

    /// The first line (from now on, or seen before) that starts with `prefix`.
    pub fn wait_for(&mut self, prefix: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {prefix} line from the peer in {WAIT:?}: {:?}", self.seen),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "the peer exited ({:?}) without a {prefix} line: {:?}",
                        self.child.try_wait(),
                        self.seen
                    )
                }
            }
        }
    }

    /// The lines the peer printed so far (as far as [`Peer::wait_for`] read them).
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// The peer's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The peer's socket, as a command-line argument.
    pub fn sock(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// Our migration client, connected to the peer.
    pub fn connect(&self) -> VfioUserDevice {
        VfioUserDevice::connect(&self.socket).unwrap_or_else(|e| panic!("connecting to the peer: {e}"))
    }

    /// After our client disconnected: the peer's `PEER-EXIT` line, every line it printed, and its
    /// exit status.
    pub fn finish(mut self) -> (String, Vec<String>, i32) {
        let exit = self.wait_for("PEER-EXIT");
        let status = self.child.wait().unwrap();
        (exit, std::mem::take(&mut self.seen), status.code().unwrap_or(-1))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `crc=XXXXXXXX` of a peer line.
pub fn crc_of(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("crc="))
        .unwrap_or_else(|| panic!("no crc= in {line:?}"))
        .to_string()
}
