//! Live migration between a sender and a receiver over loopback TCP and unix sockets, with and
//! without TLS and pre-copy, over one and several connections; refusals; connections cut at each
//! phase (source devices RUNNING with their state intact, destination devices reset and RUNNING);
//! and, when the machine allows it, two network namespaces joined by a veth pair with netem.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vfio_migration::emulated::{EmulatedDevice, EmulatedHandle, Faults, WriteFault};
use vfio_migration::live::MigrationReport;
use vfio_migration::transport::{
    self, MigrationUrl, ReceiveOptions, ReceiveReport, Receiver, SendOptions, TransportError, wire,
};
use vfio_migration::{DeviceState, MigrationDevice};

const MIB: u64 = 1 << 20;

fn dev(name: &str, size: u64, seed: u64, extra: &str) -> EmulatedDevice {
    EmulatedDevice::from_spec(&format!("name={name},size={size},seed={seed}{extra}")).expect("valid spec")
}

struct Group {
    devs: Vec<EmulatedDevice>,
    handles: Vec<EmulatedHandle>,
}

fn group(prefix: &str, n: usize, size: u64, extra: &str) -> Group {
    let devs: Vec<EmulatedDevice> = (0..n)
        .map(|i| dev(&format!("{prefix}{i}"), size, 10 + i as u64, extra))
        .collect();
    let handles = devs.iter().map(|d| d.handle()).collect();
    Group { devs, handles }
}

fn boxed(devs: Vec<EmulatedDevice>) -> Vec<Box<dyn MigrationDevice>> {
    devs.into_iter()
        .map(|d| Box::new(d) as Box<dyn MigrationDevice>)
        .collect()
}

fn send_opts(connections: usize, precopy: bool) -> SendOptions {
    let mut o = SendOptions {
        connections,
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(4),
        ..SendOptions::default()
    };
    o.source.precopy = precopy;
    o
}

fn recv_opts() -> ReceiveOptions {
    ReceiveOptions {
        accept_timeout: Some(Duration::from_secs(20)),
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(4),
        ..ReceiveOptions::default()
    }
}

fn spawn_receiver(
    rx: Receiver,
    dst: Vec<EmulatedDevice>,
    opts: ReceiveOptions,
) -> JoinHandle<Result<ReceiveReport, TransportError>> {
    std::thread::spawn(move || rx.receive(boxed(dst), &opts, &mut |_| {}))
}

fn digests(h: &[EmulatedHandle]) -> Vec<u64> {
    h.iter().map(|d| d.digest()).collect()
}

fn states(h: &[EmulatedHandle]) -> Vec<DeviceState> {
    h.iter().map(|d| d.device_state()).collect()
}

fn check_fn(h: &[EmulatedHandle]) -> transport::CheckFn {
    let h = h.to_vec();
    Arc::new(move |i| h.get(i).map(|d| d.digest()))
}

/// Migrate `n` devices over `url` and check every destination equals its source.
fn migrate_ok(
    url: &str,
    n: usize,
    connections: usize,
    precopy: bool,
    tls: Option<&Path>,
) -> (MigrationReport, ReceiveReport) {
    migrate_sized(url, n, 2 * MIB, connections, precopy, tls)
}

/// [`migrate_ok`] with devices of `size` bytes.
fn migrate_sized(
    url: &str,
    n: usize,
    size: u64,
    connections: usize,
    precopy: bool,
    tls: Option<&Path>,
) -> (MigrationReport, ReceiveReport) {
    let src = group("src", n, size, ",dirty-rate=256K");
    let dst = group("dst", n, size, "");
    let url: MigrationUrl = url.parse().unwrap();
    let receiver = Receiver::bind(&url).expect("bind");
    let url = receiver.url().clone();
    let mut ro = recv_opts();
    let mut so = send_opts(connections, precopy);
    so.check = Some(check_fn(&src.handles));
    if let Some(dir) = tls {
        ro.tls = Some(transport::server_config(dir).expect("server TLS"));
        so.tls = Some(transport::client_config(dir).expect("client TLS"));
    }
    let rh = spawn_receiver(receiver, dst.devs, ro);
    let report = transport::send(&url, boxed(src.devs), &so, &mut |_| {}).expect("send");
    let rr = rh.join().unwrap().expect("receive");
    assert_eq!(states(&src.handles), vec![DeviceState::Stop; n], "sources end STOP");
    assert_eq!(states(&dst.handles), vec![DeviceState::Running; n], "destinations run");
    let sd = digests(&src.handles);
    assert_eq!(digests(&dst.handles), sd, "every destination equals its source");
    assert_eq!(rr.source_checks, sd.iter().map(|d| Some(*d)).collect::<Vec<_>>());
    assert_eq!(rr.connections, connections);
    assert_eq!(rr.tls, tls.is_some());
    let pre: u64 = report.precopy_bytes.iter().sum();
    let stop: u64 = report.stop_copy_bytes.iter().sum();
    assert_eq!(rr.precopy_bytes.iter().sum::<u64>(), pre);
    assert_eq!(rr.stop_copy_bytes.iter().sum::<u64>(), stop);
    if precopy {
        assert!(pre >= size * n as u64, "pre-copy moved the initial data: {pre}");
        assert!(report.iterations() >= 1);
    } else {
        assert_eq!(pre, 0);
        assert!(stop >= size * n as u64);
    }
    (report, rr)
}

fn sock_path(name: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    let url = format!("unix:{}", p.display());
    (dir, url)
}

#[test]
fn tcp_one_device_with_and_without_precopy() {
    migrate_ok("tcp:127.0.0.1:0", 1, 1, true, None);
    migrate_ok("tcp:127.0.0.1:0", 1, 1, false, None);
}

#[test]
fn tcp_several_devices_over_several_connections() {
    let (r, rr) = migrate_ok("tcp:127.0.0.1:0", 3, 4, true, None);
    assert_eq!(r.devices.len(), 3);
    assert_eq!(rr.devices.len(), 3);
    migrate_ok("tcp:127.0.0.1:0", 3, 3, false, None);
}

#[test]
fn unix_socket_one_and_several_devices() {
    let (_d, url) = sock_path("mig.sock");
    migrate_ok(&url, 1, 1, true, None);
    migrate_ok(&url, 2, 3, false, None);
}

// ---------------------------------------------------------------------------------------------
// TLS

struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

fn new_ca(name: &str) -> Ca {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let key = rcgen::KeyPair::generate().unwrap();
    Ca {
        issuer: rcgen::CertifiedIssuer::self_signed(p, key).unwrap(),
    }
}

fn leaf(ca: &Ca, dir: &Path, stem: &str, client: bool) {
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, stem);
    p.extended_key_usages = vec![if client {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    }];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    std::fs::write(dir.join(format!("{stem}-cert.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{stem}-key.pem")), key.serialize_pem()).unwrap();
}

/// A Cloud Hypervisor style tls_dir: CA, server and client certificates from `ca`, or the
/// client certificate from `client_ca` when given.
fn tls_dir(ca: &Ca, client_ca: Option<&Ca>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(transport::CA_CERT), ca.issuer.pem()).unwrap();
    leaf(ca, dir.path(), "server", false);
    leaf(client_ca.unwrap_or(ca), dir.path(), "client", true);
    dir
}

#[test]
fn mutual_tls_over_tcp_and_unix() {
    let ca = new_ca("test CA");
    let dir = tls_dir(&ca, None);
    migrate_ok("tcp:127.0.0.1:0", 2, 2, true, Some(dir.path()));
    let (_d, url) = sock_path("tls.sock");
    migrate_ok(&url, 1, 1, false, Some(dir.path()));
}

#[test]
fn tls_with_larger_devices_over_four_connections() {
    let ca = new_ca("test CA");
    let dir = tls_dir(&ca, None);
    migrate_sized("tcp:127.0.0.1:0", 2, 16 * MIB, 4, true, Some(dir.path()));
    migrate_sized("tcp:127.0.0.1:0", 2, 16 * MIB, 4, false, Some(dir.path()));
}

#[test]
fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let ca = new_ca("test CA");
    let rogue = new_ca("rogue CA");
    let good = tls_dir(&ca, None);
    let bad = tls_dir(&ca, Some(&rogue));
    // The sender's certificate is from another CA: the receiver refuses it.
    let src = group("src", 1, MIB, "");
    let dst = group("dst", 1, MIB, "");
    let (sd, dd) = (digests(&src.handles), digests(&dst.handles));
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let mut ro = recv_opts();
    ro.tls = Some(transport::server_config(good.path()).unwrap());
    let rh = spawn_receiver(receiver, dst.devs, ro);
    let mut so = send_opts(1, true);
    so.tls = Some(transport::client_config(bad.path()).unwrap());
    let err = transport::send(&url, boxed(src.devs), &so, &mut |_| {}).unwrap_err();
    let rerr = rh.join().unwrap().unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("tls") || err.to_string().contains("alert"),
        "{err}"
    );
    assert!(rerr.to_string().contains("TLS"), "{rerr}");
    assert_eq!(digests(&src.handles), sd);
    assert_eq!(digests(&dst.handles), dd);
    assert_eq!(states(&src.handles), vec![DeviceState::Running]);
    assert_eq!(states(&dst.handles), vec![DeviceState::Running]);

    // The receiver's certificate is from another CA (the sender trusts only its own).
    let src = group("src", 1, MIB, "");
    let dst = group("dst", 1, MIB, "");
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let other_ca = new_ca("other CA");
    let other = tls_dir(&other_ca, None);
    let mut ro = recv_opts();
    ro.tls = Some(transport::server_config(other.path()).unwrap());
    let rh = spawn_receiver(receiver, dst.devs, ro);
    let mut so = send_opts(1, true);
    so.tls = Some(transport::client_config(good.path()).unwrap());
    let err = transport::send(&url, boxed(src.devs), &so, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    assert!(rh.join().unwrap().is_err());
    assert_eq!(states(&src.handles), vec![DeviceState::Running]);
    assert_eq!(states(&dst.handles), vec![DeviceState::Running]);
}

#[test]
fn a_mismatched_header_is_refused_before_the_devices_are_touched() {
    for (what, dsts) in [
        ("another seed", vec![dev("dst0", MIB, 99, "")]),
        ("another size", vec![dev("dst0", 2 * MIB, 10, "")]),
        (
            "another count",
            vec![dev("dst0", MIB, 10, ""), dev("dst1", MIB, 11, "")],
        ),
    ] {
        let src = group("src", 1, MIB, "");
        let dh: Vec<EmulatedHandle> = dsts.iter().map(|d| d.handle()).collect();
        // Mark the destinations so any touch would show.
        for d in &dh {
            d.touch_blocks(3).unwrap();
        }
        let dd = digests(&dh);
        let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let url = receiver.url().clone();
        let rh = spawn_receiver(receiver, dsts, recv_opts());
        let err = transport::send(&url, boxed(src.devs), &send_opts(1, true), &mut |_| {}).unwrap_err();
        let rerr = rh.join().unwrap().unwrap_err();
        assert!(matches!(err, TransportError::Refused { .. }), "{what}: {err}");
        assert!(matches!(rerr, TransportError::Mismatch { .. }), "{what}: {rerr}");
        assert_eq!(digests(&dh), dd, "{what}: destination untouched");
        assert!(states(&dh).iter().all(|s| *s == DeviceState::Running), "{what}");
        assert_eq!(states(&src.handles), vec![DeviceState::Running], "{what}");
    }
}

#[test]
fn a_destination_failure_is_reported_to_the_sender() {
    let src = group("src", 1, 2 * MIB, "");
    let d = dev("dst0", 2 * MIB, 10, "").with_faults(Faults {
        write_fail: Some(WriteFault { at: MIB, errno: 5 }),
        ..Faults::default()
    });
    let dh = vec![d.handle()];
    let sd = digests(&src.handles);
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let rh = spawn_receiver(receiver, vec![d], recv_opts());
    let err = transport::send(&url, boxed(src.devs), &send_opts(1, false), &mut |_| {}).unwrap_err();
    let rerr = rh.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("the peer failed"), "{err}");
    assert!(err.devices_recovered());
    assert!(rerr.to_string().contains("dst0"), "{rerr}");
    assert_eq!(states(&src.handles), vec![DeviceState::Running]);
    assert_eq!(digests(&src.handles), sd);
    assert_eq!(states(&dh), vec![DeviceState::Running]);
}

// ---------------------------------------------------------------------------------------------
// Connections cut at each phase, through a proxy.

#[derive(Clone, Copy, Debug)]
enum Cut {
    /// After this many bytes from the sender (all connections together).
    AfterSenderBytes(u64),
    /// When the receiver sends this control message (it is not forwarded).
    OnControl(u16),
    /// Flip one bit of the byte at this offset of the sender's bytes (all connections together).
    FlipBitAt(u64),
}

struct Proxy {
    url: MigrationUrl,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn proxy(target: MigrationUrl, cut: Cut) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let socks: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let sent = Arc::new(AtomicU64::new(0));
    let cut_now = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let target = match target {
            MigrationUrl::Tcp { host, port } => format!("{host}:{port}"),
            MigrationUrl::Unix { .. } => unreachable!(),
        };
        let mut first = true;
        let do_cut = {
            let socks = socks.clone();
            let cut_now = cut_now.clone();
            move || {
                cut_now.store(true, Ordering::SeqCst);
                for s in socks.lock().unwrap().iter() {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        };
        while !stop2.load(Ordering::SeqCst) {
            let Ok((a, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            a.set_nonblocking(false).unwrap();
            let b = TcpStream::connect(&target).unwrap();
            if cut_now.load(Ordering::SeqCst) {
                continue;
            }
            socks.lock().unwrap().push(a.try_clone().unwrap());
            socks.lock().unwrap().push(b.try_clone().unwrap());
            let control = std::mem::replace(&mut first, false);
            // Sender to receiver.
            {
                let (mut a, mut b) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                let (sent, do_cut) = (sent.clone(), do_cut.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 << 10];
                    loop {
                        let Ok(n) = a.read(&mut buf) else { return };
                        if n == 0 {
                            return;
                        }
                        let mut n = n as u64;
                        if let Cut::FlipBitAt(at) = cut {
                            let before = sent.fetch_add(n, Ordering::SeqCst);
                            if (before..before + n).contains(&at) {
                                buf[(at - before) as usize] ^= 0x10;
                            }
                        }
                        if let Cut::AfterSenderBytes(limit) = cut {
                            let before = sent.fetch_add(n, Ordering::SeqCst);
                            if before + n >= limit {
                                n = limit.saturating_sub(before);
                                let _ = b.write_all(&buf[..n as usize]);
                                do_cut();
                                return;
                            }
                        }
                        if b.write_all(&buf[..n as usize]).is_err() {
                            return;
                        }
                    }
                });
            }
            // Receiver to sender; the control connection's messages are parsed.
            {
                let (mut a, mut b) = (a, b);
                let do_cut = do_cut.clone();
                std::thread::spawn(move || {
                    if !control {
                        let _ = std::io::copy(&mut b, &mut a);
                        return;
                    }
                    loop {
                        let mut h = [0u8; 24];
                        if b.read_exact(&mut h).is_err() {
                            return;
                        }
                        let kind = u16::from_le_bytes([h[0], h[1]]);
                        let len = u32::from_le_bytes([h[16], h[17], h[18], h[19]]) as usize;
                        let mut p = vec![0u8; len];
                        if b.read_exact(&mut p).is_err() {
                            return;
                        }
                        if matches!(cut, Cut::OnControl(k) if k == kind) {
                            do_cut();
                            return;
                        }
                        if a.write_all(&h).and_then(|()| a.write_all(&p)).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    Proxy {
        url: MigrationUrl::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        stop,
        thread: Some(thread),
    }
}

/// Cut the connections at `cut`; both sides must fail, the sources RUNNING with their state
/// intact and the destinations RUNNING (reset when they had been touched).
fn cut_case(cut: Cut, precopy: bool, connections: usize) -> (TransportError, TransportError) {
    let src = group("src", 2, 4 * MIB, "");
    let dst = group("dst", 2, 4 * MIB, "");
    let sd = digests(&src.handles);
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let p = proxy(receiver.url().clone(), cut);
    let rh = spawn_receiver(receiver, dst.devs, recv_opts());
    let t = std::time::Instant::now();
    let err = transport::send(&p.url, boxed(src.devs), &send_opts(connections, precopy), &mut |_| {}).unwrap_err();
    let rerr = rh.join().unwrap().unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(15), "{cut:?}: took {:?}", t.elapsed());
    assert!(err.devices_recovered(), "{cut:?}: {err}");
    assert!(rerr.devices_recovered(), "{cut:?}: {rerr}");
    assert_eq!(states(&src.handles), vec![DeviceState::Running; 2], "{cut:?}: {err}");
    assert_eq!(digests(&src.handles), sd, "{cut:?}: source state intact");
    assert_eq!(states(&dst.handles), vec![DeviceState::Running; 2], "{cut:?}: {rerr}");
    assert!(dst.handles.iter().all(|d| d.is_usable()));
    eprintln!("{cut:?}:\n  sender:   {err}\n  receiver: {rerr}");
    (err, rerr)
}

#[test]
fn cut_before_the_header() {
    let (err, rerr) = cut_case(Cut::AfterSenderBytes(20), true, 1);
    assert!(
        err.to_string().contains("hello") || err.to_string().contains("closed"),
        "{err}"
    );
    assert!(
        rerr.to_string().contains("preamble") || rerr.to_string().contains("closed"),
        "{rerr}"
    );
}

#[test]
fn cut_during_precopy() {
    let (err, rerr) = cut_case(Cut::AfterSenderBytes(3 * MIB), true, 2);
    assert!(!matches!(err, TransportError::Refused { .. }), "{err}");
    assert!(
        matches!(
            rerr,
            TransportError::Aborted {
                side: "destination",
                ..
            }
        ),
        "{rerr}"
    );
}

#[test]
fn cut_during_stop_copy() {
    let (err, rerr) = cut_case(Cut::AfterSenderBytes(3 * MIB), false, 1);
    assert!(
        matches!(err, TransportError::Aborted { .. } | TransportError::Live(_)),
        "{err}"
    );
    assert!(
        matches!(
            rerr,
            TransportError::Aborted {
                side: "destination",
                ..
            }
        ),
        "{rerr}"
    );
}

#[test]
fn cut_before_the_final_result() {
    let (err, rerr) = cut_case(Cut::OnControl(wire::MSG_LOADED), false, 2);
    assert!(err.to_string().contains("control"), "{err}");
    assert!(
        matches!(
            rerr,
            TransportError::Aborted {
                side: "destination",
                ..
            }
        ),
        "{rerr}"
    );
}

#[test]
fn a_corrupted_stream_is_refused_and_both_sides_recover() {
    let (err, rerr) = cut_case(Cut::FlipBitAt(3 * MIB), false, 2);
    assert!(rerr.to_string().contains("checksum mismatch"), "{rerr}");
    assert!(
        err.to_string().contains("checksum mismatch"),
        "the sender learns why: {err}"
    );
}

#[test]
fn a_second_sender_is_not_served_while_one_is() {
    let src = group("src", 1, 8 * MIB, ",read-rate=8M");
    let dst = group("dst", 1, 8 * MIB, "");
    let other = group("src", 1, 8 * MIB, "");
    let od = digests(&other.handles);
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let rh = spawn_receiver(receiver, dst.devs, recv_opts());
    let url2 = url.clone();
    let second = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut o = send_opts(1, true);
        o.idle_timeout = Duration::from_secs(2);
        transport::send(&url2, boxed(other.devs), &o, &mut |_| {})
    });
    transport::send(&url, boxed(src.devs), &send_opts(1, true), &mut |_| {}).expect("the first sender is served");
    rh.join().unwrap().expect("receive");
    let err = second.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("busy"), "{err}");
    assert_eq!(digests(&dst.handles), digests(&src.handles));
    assert_eq!(states(&other.handles), vec![DeviceState::Running], "{err}");
    assert_eq!(digests(&other.handles), od);
}

#[test]
fn a_silent_peer_times_out_without_touching_the_devices() {
    // A plain-socket "sender" that connects and says nothing: the receiver times out on it,
    // and its devices are untouched.
    let dst = group("dst", 1, MIB, "");
    let dd = digests(&dst.handles);
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let mut ro = recv_opts();
    ro.idle_timeout = Duration::from_secs(2);
    let rh = spawn_receiver(receiver, dst.devs, ro);
    let addr = url.to_string().trim_start_matches("tcp:").to_string();
    let _silent = TcpStream::connect(&addr).unwrap();
    let rerr = rh.join().unwrap().unwrap_err();
    assert!(rerr.to_string().contains("timed out"), "{rerr}");
    assert_eq!(digests(&dst.handles), dd);
}

// ---------------------------------------------------------------------------------------------
// Network namespaces with netem, when the machine allows it.

fn sh(args: &[&str]) -> bool {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Two namespaces joined by a veth pair; deleted on drop.
struct Netns {
    a: String,
    b: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        sh(&["ip", "netns", "del", &self.a]);
        sh(&["ip", "netns", "del", &self.b]);
    }
}

fn netns_pair() -> Result<(Netns, bool), String> {
    let id = std::process::id() % 100_000;
    let ns = Netns {
        a: format!("vmig-a-{id}"),
        b: format!("vmig-b-{id}"),
    };
    let (va, vb) = (format!("vma{id}"), format!("vmb{id}"));
    if !sh(&["ip", "netns", "add", &ns.a]) || !sh(&["ip", "netns", "add", &ns.b]) {
        return Err("cannot create network namespaces (needs root and iproute2)".into());
    }
    let steps: Vec<Vec<&str>> = vec![
        vec!["ip", "link", "add", &va, "type", "veth", "peer", "name", &vb],
        vec!["ip", "link", "set", &va, "netns", &ns.a],
        vec!["ip", "link", "set", &vb, "netns", &ns.b],
        vec!["ip", "-n", &ns.a, "addr", "add", "10.213.77.1/24", "dev", &va],
        vec!["ip", "-n", &ns.b, "addr", "add", "10.213.77.2/24", "dev", &vb],
        vec!["ip", "-n", &ns.a, "link", "set", &va, "up"],
        vec!["ip", "-n", &ns.b, "link", "set", &vb, "up"],
    ];
    for s in &steps {
        if !sh(s) {
            return Err(format!("cannot set up the veth pair ({})", s.join(" ")));
        }
    }
    let netem = sh(&[
        "tc", "-n", &ns.a, "qdisc", "add", "dev", &va, "root", "netem", "delay", "5ms", "loss", "0.5%",
    ]) && sh(&[
        "tc", "-n", &ns.b, "qdisc", "add", "dev", &vb, "root", "netem", "delay", "5ms", "loss", "0.5%",
    ]);
    Ok((ns, netem))
}

/// Run `f` on a thread that entered network namespace `name`.
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("namespace file");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

#[test]
fn between_two_network_namespaces_with_netem() {
    let (ns, netem) = match netns_pair() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED between_two_network_namespaces_with_netem: {why}");
            return;
        }
    };
    if !netem {
        eprintln!("netem is not available here (sch_netem missing): migrating over the bare veth pair");
    }
    let src = group("src", 2, 2 * MIB, ",dirty-rate=128K");
    let dst = group("dst", 2, 2 * MIB, "");
    let (sh_, dh) = (src.handles.clone(), dst.handles.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let dst_devs = dst.devs;
    let rh = in_netns(&ns.a, move || {
        let r = Receiver::bind(&"tcp:10.213.77.1:0".parse().unwrap());
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                let _ = ready_tx.send(None);
                return Err(e);
            }
        };
        let _ = ready_tx.send(Some(r.url().clone()));
        r.receive(boxed(dst_devs), &recv_opts(), &mut |_| {})
    });
    let url = ready_rx.recv().unwrap().expect("bind inside the namespace");
    let src_devs = src.devs;
    let sender = in_netns(&ns.b, move || {
        let mut o = send_opts(2, true);
        o.idle_timeout = Duration::from_secs(10);
        transport::send(&url, boxed(src_devs), &o, &mut |_| {})
    });
    let report = sender.join().unwrap().expect("send across namespaces");
    rh.join().unwrap().expect("receive across namespaces");
    assert_eq!(digests(&dh), digests(&sh_));
    assert!(report.total < Duration::from_secs(60));
    drop(ns);
}

#[test]
fn one_receiver_serves_migrations_one_after_another() {
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let a = group("dst", 1, MIB, "");
    let b = group("dst", 1, MIB, "");
    let (ah, bh) = (a.handles.clone(), b.handles.clone());
    let rh = std::thread::spawn(move || {
        let first = receiver.receive(boxed(a.devs), &recv_opts(), &mut |_| {});
        let second = receiver.receive(boxed(b.devs), &recv_opts(), &mut |_| {});
        (first, second)
    });
    for _ in 0..2 {
        let src = group("src", 1, MIB, ",dirty-rate=64K");
        transport::send(&url, boxed(src.devs), &send_opts(2, true), &mut |_| {}).expect("send");
    }
    let (first, second) = rh.join().unwrap();
    first.expect("first migration");
    second.expect("second migration");
    assert!(ah.iter().chain(&bh).all(|d| d.device_state() == DeviceState::Running));
}

#[test]
fn a_refused_configuration_never_reaches_the_receiver() {
    // Two devices without P2P, not forced: refused before connecting (nobody listens on port 1).
    let src = group("src", 2, MIB, ",flags=stop-copy+pre-copy");
    let err = transport::send(
        &"tcp:127.0.0.1:1".parse().unwrap(),
        boxed(src.devs),
        &send_opts(1, true),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(err, TransportError::Live(vfio_migration::live::LiveError::Refused(_))),
        "{err}"
    );
    let err = transport::send(
        &"tcp:127.0.0.1:1".parse().unwrap(),
        boxed(group("src", 1, MIB, "").devs),
        &send_opts(17, true),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, TransportError::Options(_)), "{err}");
}
