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

/// A proxy that forwards its first connection (the control connection) at once and holds every
/// later one (the data connections) until `data` of them are open, then forwards them all: a
/// sender that waited for each TLS handshake before opening the next connection never gets its
/// first handshake's answer.
fn barrier_proxy(target: String, data: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp:{}", l.local_addr().unwrap());
    let forward = move |a: TcpStream| {
        let b = TcpStream::connect(&target).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let (mut a, mut b) = (a, b);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut a, &mut b);
            let _ = b.shutdown(Shutdown::Write);
        });
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
            let _ = a2.shutdown(Shutdown::Write);
        });
    };
    std::thread::spawn(move || {
        let mut conns = l.incoming().map_while(Result::ok);
        let Some(ctrl) = conns.next() else { return };
        forward(ctrl);
        let held: Vec<TcpStream> = conns.by_ref().take(data).collect();
        held.into_iter().for_each(&forward);
    });
    url
}

#[test]
fn the_data_connections_are_opened_at_once() {
    let ca = new_ca("test CA");
    let dir = tls_dir(&ca, None);
    let n = 3;
    let src = group("src", n, MIB, "");
    let dst = group("dst", n, MIB, "");
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).expect("bind");
    let target = receiver.url().to_string().trim_start_matches("tcp:").to_string();
    let mut ro = recv_opts();
    ro.tls = Some(transport::server_config(dir.path()).unwrap());
    let mut so = send_opts(n, false);
    so.tls = Some(transport::client_config(dir.path()).unwrap());
    let url: MigrationUrl = barrier_proxy(target, n).parse().unwrap();
    let rh = spawn_receiver(receiver, dst.devs, ro);
    let report = transport::send(&url, boxed(src.devs), &so, &mut |_| {}).expect("send through the barrier");
    let rr = rh.join().unwrap().expect("receive");
    assert_eq!(rr.connections, n);
    assert_eq!(states(&dst.handles), vec![DeviceState::Running; n]);
    assert_eq!(digests(&dst.handles), digests(&src.handles));
    assert_eq!(
        report.stop_copy_bytes.iter().sum::<u64>(),
        rr.stop_copy_bytes.iter().sum::<u64>()
    );
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
    /// Forward this control message of the receiver, then cut the receiver's side.
    AfterControl(u16),
    /// When the sender sends this control message: forward it and cut the sender's side
    /// (`deliver`), or cut everything without forwarding it.
    SenderControl { kind: u16, deliver: bool },
    /// Flip one bit of the byte at this offset of the sender's bytes (all connections together).
    FlipBitAt(u64),
    /// After this many bytes from the sender, stop reading the sender's data connections (they
    /// stay open: the sender's writes find no room).
    StallAfterSenderBytes(u64),
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

/// The sockets of a proxy: those facing the sender and those facing the receiver.
#[derive(Clone, Default)]
struct Sides {
    sender: Arc<Mutex<Vec<TcpStream>>>,
    receiver: Arc<Mutex<Vec<TcpStream>>>,
    cut: Arc<AtomicBool>,
}

impl Sides {
    fn cut_sender(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.sender.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn cut_receiver(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.receiver.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn cut_all(&self) {
        self.cut_sender();
        self.cut_receiver();
    }
}

/// Forward the sender's control connection record by record (after its preamble and stream
/// header), acting on `cut`.
fn forward_sender_control(mut a: TcpStream, mut b: TcpStream, cut: Cut, sides: Sides) {
    let mut pre = [0u8; 32 + 16];
    if a.read_exact(&mut pre).is_err() || b.write_all(&pre).is_err() {
        return;
    }
    let body = u32::from_le_bytes([pre[44], pre[45], pre[46], pre[47]]) as usize;
    let mut rest = vec![0u8; body + 4];
    if a.read_exact(&mut rest).is_err() || b.write_all(&rest).is_err() {
        return;
    }
    loop {
        let mut h = [0u8; 24];
        if a.read_exact(&mut h).is_err() {
            return;
        }
        let kind = u16::from_le_bytes([h[0], h[1]]);
        let len = u32::from_le_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut p = vec![0u8; len];
        if a.read_exact(&mut p).is_err() {
            return;
        }
        match cut {
            Cut::SenderControl { kind: k, deliver } if k == kind => {
                if deliver {
                    let _ = b.write_all(&h).and_then(|()| b.write_all(&p));
                    sides.cut_sender();
                } else {
                    sides.cut_all();
                }
                return;
            }
            _ => {}
        }
        if b.write_all(&h).and_then(|()| b.write_all(&p)).is_err() {
            return;
        }
    }
}

fn proxy(target: MigrationUrl, cut: Cut) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sides = Sides::default();
    let sent = Arc::new(AtomicU64::new(0));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let target = match target {
            MigrationUrl::Tcp { host, port } => format!("{host}:{port}"),
            MigrationUrl::Unix { .. } => unreachable!(),
        };
        let mut first = true;
        while !stop2.load(Ordering::SeqCst) {
            let Ok((a, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            a.set_nonblocking(false).unwrap();
            let b = TcpStream::connect(&target).unwrap();
            if sides.cut.load(Ordering::SeqCst) {
                continue;
            }
            sides.sender.lock().unwrap().push(a.try_clone().unwrap());
            sides.receiver.lock().unwrap().push(b.try_clone().unwrap());
            let control = std::mem::replace(&mut first, false);
            // Sender to receiver.
            {
                let (mut a, mut b) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                let (sent, sides) = (sent.clone(), sides.clone());
                std::thread::spawn(move || {
                    if control && matches!(cut, Cut::SenderControl { .. }) {
                        forward_sender_control(a, b, cut, sides);
                        return;
                    }
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
                                sides.cut_all();
                                return;
                            }
                        }
                        // Only the connection whose bytes cross the limit stalls (the control
                        // connection goes on, so the receiver hears of the sender's failure).
                        if let Cut::StallAfterSenderBytes(limit) = cut {
                            let before = sent.fetch_add(n, Ordering::SeqCst);
                            if before < limit && limit <= before + n {
                                let _ = b.write_all(&buf[..n as usize]);
                                // Read nothing more until either side gives up (bounded).
                                let until = std::time::Instant::now() + Duration::from_secs(30);
                                while !sides.cut.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                                    std::thread::sleep(Duration::from_millis(20));
                                }
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
                let sides = sides.clone();
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
                            sides.cut_all();
                            return;
                        }
                        if a.write_all(&h).and_then(|()| a.write_all(&p)).is_err() {
                            return;
                        }
                        if matches!(cut, Cut::AfterControl(k) if k == kind) {
                            sides.cut_receiver();
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
    // LOADED never reaches the sender: it never sends COMMIT, so it returns to RUNNING.
    let (err, rerr) = cut_case(Cut::OnControl(wire::MSG_LOADED), false, 2);
    assert!(err.to_string().contains("control"), "{err}");
    assert!(!err.is_unconfirmed(), "{err}");
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

/// The proxy stops reading the lone data connection (it stays open) after 2 MiB; the sender
/// and the receiver time out after `send_idle` and `recv_idle`. Both fail, the source devices
/// run again with their state, the destination's are reset. Returns both errors and how long
/// the sender took.
fn stalled_lone_connection(send_idle: u64, recv_idle: u64) -> (TransportError, TransportError, Duration) {
    let src = group("src", 1, 64 * MIB, "");
    let dst = group("dst", 1, 64 * MIB, "");
    let sd = digests(&src.handles);
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let p = proxy(receiver.url().clone(), Cut::StallAfterSenderBytes(2 * MIB));
    let mut ro = recv_opts();
    ro.idle_timeout = Duration::from_secs(recv_idle);
    let rh = spawn_receiver(receiver, dst.devs, ro);
    let mut o = send_opts(1, false);
    o.idle_timeout = Duration::from_secs(send_idle);
    let t = std::time::Instant::now();
    let err = transport::send(&p.url, boxed(src.devs), &o, &mut |_| {}).unwrap_err();
    let took = t.elapsed();
    assert!(err.devices_recovered(), "{err}");
    assert_eq!(states(&src.handles), vec![DeviceState::Running], "{err}");
    assert_eq!(digests(&src.handles), sd, "source state intact");
    let rerr = rh.join().unwrap().unwrap_err();
    assert!(rerr.devices_recovered(), "{rerr}");
    assert_eq!(states(&dst.handles), vec![DeviceState::Running], "{rerr}");
    drop(p);
    (err, rerr, took)
}

/// A lone data connection's writes block in the kernel (as a plain copy's do), bounded by the
/// idle timeout: a receiver side that stops reading fails the sender with a write timeout, not
/// a hang, and the receiver learns it over the control connection.
#[test]
fn a_stalled_lone_connection_times_out_the_sender() {
    let (err, rerr, took) = stalled_lone_connection(2, 30);
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "took {took:?}: {err}"
    );
    assert!(
        err.to_string().contains("timed out writing") && err.to_string().contains("nothing for 2.0 s"),
        "{err}"
    );
    assert!(
        matches!(rerr, TransportError::PeerFailed { .. }) || rerr.to_string().contains("aborted"),
        "{rerr}"
    );
}

/// The same stall seen first by the receiver: its error names its own timeout, and the sender
/// learns of it.
#[test]
fn a_stalled_lone_connection_times_out_the_receiver_naming_its_timeout() {
    let (err, rerr, took) = stalled_lone_connection(30, 2);
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    assert!(
        rerr.to_string()
            .contains("timed out waiting for data (nothing for 2.0 s)"),
        "{rerr}"
    );
    assert!(err.to_string().contains("timed out waiting for data"), "{err}");
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

// ---------------------------------------------------------------------------------------------
// The commit point: after COMMIT the source never resumes on its own.

/// Migrate 2 devices through a proxy that cuts at `cut`; the sources are lent, so they can be
/// resumed afterwards. Returns both results, the source devices and the handles.
#[allow(clippy::type_complexity)]
fn commit_case(
    cut: Cut,
) -> (
    Result<MigrationReport, TransportError>,
    Result<ReceiveReport, TransportError>,
    Vec<EmulatedDevice>,
    Group,
    Vec<u64>,
) {
    let mut src = group("src", 2, 2 * MIB, "");
    let dst = group("dst", 2, 2 * MIB, "");
    let sd = digests(&src.handles);
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let p = proxy(receiver.url().clone(), cut);
    let dh = Group {
        devs: Vec::new(),
        handles: dst.handles.clone(),
    };
    let rh = spawn_receiver(receiver, dst.devs, recv_opts());
    let mut devs = std::mem::take(&mut src.devs);
    let lent: Vec<Box<dyn MigrationDevice + '_>> = devs
        .iter_mut()
        .map(|d| Box::new(d) as Box<dyn MigrationDevice + '_>)
        .collect();
    let r = transport::send(&p.url, lent, &send_opts(2, false), &mut |_| {});
    let rr = rh.join().unwrap();
    assert_eq!(digests(&src.handles), sd, "{cut:?}: source state intact");
    (
        r,
        rr,
        devs,
        Group {
            devs: Vec::new(),
            handles: src.handles,
        },
        dh.handles.iter().map(|h| h.digest()).collect(),
    )
}

#[test]
fn commit_lost_on_the_way_leaves_both_sides_stopped_until_the_operator_resumes() {
    let (r, rr, mut devs, src, _) = commit_case(Cut::SenderControl {
        kind: wire::MSG_COMMIT,
        deliver: false,
    });
    let sd = digests(&src.handles);
    let err = r.unwrap_err();
    assert!(err.is_unconfirmed(), "{err}");
    assert!(err.to_string().contains("handed over, not confirmed"), "{err}");
    assert!(err.to_string().contains("stay stopped"), "{err}");
    assert_eq!(states(&src.handles), vec![DeviceState::Stop; 2], "{err}");
    // The receiver never got COMMIT: it reset its devices.
    let rerr = rr.unwrap_err();
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
    // The operator knows the destination does not run them: resume the source.
    transport::resume_source(&mut devs).expect("resume");
    assert_eq!(states(&src.handles), vec![DeviceState::Running; 2]);
    assert_eq!(digests(&src.handles), sd, "state intact after resuming");
}

#[test]
fn commit_delivered_then_cut_never_resumes_the_source() {
    let (r, rr, _devs, src, dd) = commit_case(Cut::SenderControl {
        kind: wire::MSG_COMMIT,
        deliver: true,
    });
    let err = r.unwrap_err();
    assert!(err.is_unconfirmed(), "{err}");
    assert!(err.devices_recovered(), "{err}");
    // The destination runs the devices: the source must not.
    rr.expect("the receiver got COMMIT and resumed");
    assert_eq!(states(&src.handles), vec![DeviceState::Stop; 2], "{err}");
    assert_eq!(dd, digests(&src.handles), "the destination equals the source");
}

#[test]
fn a_cut_after_resumed_is_a_completed_migration() {
    let (r, rr, _devs, src, dd) = commit_case(Cut::AfterControl(wire::MSG_RESUMED));
    r.expect("RESUMED arrived");
    rr.expect("receive");
    assert_eq!(states(&src.handles), vec![DeviceState::Stop; 2]);
    assert_eq!(dd, digests(&src.handles));
}

// ---------------------------------------------------------------------------------------------
// A receiver strangers cannot stop.

fn tcp_addr(url: &MigrationUrl) -> String {
    url.to_string().trim_start_matches("tcp:").to_string()
}

/// Whether the receiver dropped this connection: reading ends (EOF or reset), not a timeout.
fn dropped(mut c: TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

/// Send `bytes` one at a time, 50 ms apart, until the receiver drops the connection. Returns
/// whether it did (false: every byte went through and it still listens).
fn slowloris(addr: &str, bytes: &[u8]) -> bool {
    let mut c = TcpStream::connect(addr).unwrap();
    for b in bytes.iter().cycle().take(400) {
        if c.write_all(std::slice::from_ref(b)).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn strict_recv_opts() -> ReceiveOptions {
    ReceiveOptions {
        handshake_timeout: Duration::from_millis(300),
        ..recv_opts()
    }
}

/// A good sender into `url` after the strangers: it succeeds and the devices verify.
fn good_sender(url: &MigrationUrl, dst: &[EmulatedHandle], tls: Option<&Path>) {
    let src = group("src", 1, MIB, ",dirty-rate=64K");
    let mut so = send_opts(1, true);
    so.check = Some(check_fn(&src.handles));
    if let Some(d) = tls {
        so.tls = Some(transport::client_config(d).unwrap());
    }
    transport::send(url, boxed(src.devs), &so, &mut |_| {}).expect("the good sender is served");
    assert_eq!(digests(dst), digests(&src.handles));
    assert_eq!(states(dst), vec![DeviceState::Running]);
}

#[test]
fn a_tls_receiver_outlasts_strangers_then_serves_a_good_sender() {
    let ca = new_ca("test CA");
    let rogue = new_ca("rogue CA");
    let good = tls_dir(&ca, None);
    let bad = tls_dir(&ca, Some(&rogue));
    let dst = group("dst", 1, MIB, "");
    let dh = dst.handles.clone();
    let dd = digests(&dh);
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let addr = tcp_addr(&url);
    let mut ro = strict_recv_opts();
    ro.tls = Some(transport::server_config(good.path()).unwrap());
    let rh = spawn_receiver(receiver, dst.devs, ro);

    // Garbage.
    let mut g = TcpStream::connect(&addr).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(dropped(g), "garbage dropped");
    // A handshake that trickles in a byte at a time.
    assert!(slowloris(
        &addr,
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]
    ));
    // A client certificate from another CA.
    let src = group("src", 1, MIB, "");
    let sd = digests(&src.handles);
    let mut so = send_opts(1, true);
    so.tls = Some(transport::client_config(bad.path()).unwrap());
    let err = transport::send(&url, boxed(src.devs), &so, &mut |_| {}).unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("tls") || err.to_string().contains("alert"),
        "{err}"
    );
    assert_eq!(states(&src.handles), vec![DeviceState::Running]);
    assert_eq!(digests(&src.handles), sd);
    // A plaintext sender.
    let src = group("src", 1, MIB, "");
    let err = transport::send(&url, boxed(src.devs), &send_opts(1, true), &mut |_| {}).unwrap_err();
    assert!(!err.is_unconfirmed(), "{err}");
    assert_eq!(states(&src.handles), vec![DeviceState::Running]);
    assert_eq!(digests(&dh), dd, "the destination is untouched so far");

    good_sender(&url, &dh, Some(good.path()));
    let rr = rh.join().unwrap().expect("receive");
    assert!(rr.tls);
}

#[test]
fn a_sender_that_distrusts_the_receiver_leaves_it_serving() {
    // The receiver's certificate is from a CA the sender does not trust.
    let ca = new_ca("test CA");
    let other_ca = new_ca("other CA");
    let good = tls_dir(&ca, None);
    let other = tls_dir(&other_ca, None);
    let dst = group("dst", 1, MIB, "");
    let dh = dst.handles.clone();
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let mut ro = strict_recv_opts();
    ro.tls = Some(transport::server_config(other.path()).unwrap());
    let rh = spawn_receiver(receiver, dst.devs, ro);
    let src = group("src", 1, MIB, "");
    let mut so = send_opts(1, true);
    so.tls = Some(transport::client_config(good.path()).unwrap());
    let err = transport::send(&url, boxed(src.devs), &so, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    assert_eq!(states(&src.handles), vec![DeviceState::Running]);
    // A sender that trusts it is then served.
    good_sender(&url, &dh, Some(other.path()));
    rh.join().unwrap().expect("receive");
}

#[test]
fn a_plaintext_receiver_outlasts_strangers_then_serves_a_good_sender() {
    let dst = group("dst", 1, MIB, "");
    let dh = dst.handles.clone();
    let dd = digests(&dh);
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let addr = tcp_addr(&url);
    let rh = spawn_receiver(receiver, dst.devs, strict_recv_opts());

    // A silent connection.
    assert!(dropped(TcpStream::connect(&addr).unwrap()), "silent peer dropped");
    // A bad preamble.
    let mut g = TcpStream::connect(&addr).unwrap();
    g.write_all(&[0xa5; 32]).unwrap();
    assert!(dropped(g), "bad preamble dropped");
    // A valid preamble, a byte at a time.
    let pre = wire::Preamble {
        role: wire::ROLE_CONTROL,
        index: 0,
        connections: 1,
        session: 7,
    }
    .encode();
    assert!(slowloris(&addr, &pre));
    // A data connection when no migration runs.
    let mut d = TcpStream::connect(&addr).unwrap();
    d.write_all(
        &wire::Preamble {
            role: wire::ROLE_DATA,
            ..wire::Preamble::decode(&pre).unwrap()
        }
        .encode(),
    )
    .unwrap();
    assert!(dropped(d), "stray data connection dropped");
    assert_eq!(digests(&dh), dd);

    good_sender(&url, &dh, None);
    rh.join().unwrap().expect("receive");
}

#[test]
fn a_cut_before_the_header_leaves_the_receiver_serving() {
    let src = group("src", 2, 4 * MIB, "");
    let sd = digests(&src.handles);
    let dst = group("dst", 1, MIB, "");
    let dh = dst.handles.clone();
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let p = proxy(url.clone(), Cut::AfterSenderBytes(20));
    let rh = spawn_receiver(receiver, dst.devs, strict_recv_opts());
    let err = transport::send(&p.url, boxed(src.devs), &send_opts(1, true), &mut |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("hello") || err.to_string().contains("closed"),
        "{err}"
    );
    assert_eq!(states(&src.handles), vec![DeviceState::Running; 2]);
    assert_eq!(digests(&src.handles), sd);
    good_sender(&url, &dh, None);
    rh.join().unwrap().expect("receive");
}

#[test]
fn a_zero_length_chunk_is_refused() {
    use vfio_migration::stream::{DeviceEntry, Header, StreamWriter};
    let dst = group("dst", 1, MIB, "");
    let dh = dst.handles.clone();
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = tcp_addr(receiver.url());
    let flags = dst.devs[0].flags().unwrap();
    let identity = dev("src0", MIB, 10, "").identity();
    let rh = spawn_receiver(receiver, dst.devs, recv_opts());
    let pre = wire::Preamble {
        role: wire::ROLE_CONTROL,
        index: 0,
        connections: 1,
        session: 42,
    };
    let mut hello = pre.encode().to_vec();
    StreamWriter::new(&mut hello, Header::new(vec![DeviceEntry { identity, flags }])).unwrap();
    let mut ctrl = TcpStream::connect(&addr).unwrap();
    ctrl.write_all(&hello).unwrap();
    let answer = wire::read_record(&mut ctrl, Vec::new(), 1 << 16).unwrap();
    assert_eq!(answer.kind, wire::MSG_ACCEPT);
    let mut data = TcpStream::connect(&addr).unwrap();
    data.write_all(
        &wire::Preamble {
            role: wire::ROLE_DATA,
            ..pre
        }
        .encode(),
    )
    .unwrap();
    wire::write_record(&mut data, wire::KIND_PRE_COPY, 0, 0, &[]).unwrap();
    let rerr = rh.join().unwrap().unwrap_err();
    assert!(rerr.to_string().contains("empty chunk"), "{rerr}");
    assert_eq!(states(&dh), vec![DeviceState::Running]);
    assert!(dh[0].is_usable());
}

#[test]
fn a_unix_socket_is_private_and_a_live_one_is_never_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, url) = sock_path("private.sock");
    let path = dir.path().join("private.sock");
    let url: MigrationUrl = url.parse().unwrap();
    let first = Receiver::bind(&url).expect("bind");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let err = Receiver::bind(&url).unwrap_err();
    assert!(err.to_string().contains("already listening"), "{err}");
    // The first receiver still serves.
    let dst = group("dst", 1, MIB, "");
    let dh = dst.handles.clone();
    let rh = spawn_receiver(first, dst.devs, recv_opts());
    good_sender(&url, &dh, None);
    rh.join().unwrap().expect("receive");
    // A socket file nobody listens on is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let again = Receiver::bind(&url).expect("a stale socket is replaced");
    drop(again);
    assert!(!path.exists());
}

#[test]
fn a_plaintext_listener_on_a_reachable_address_warns() {
    let r = Receiver::bind(&"tcp:0.0.0.0:0".parse().unwrap()).unwrap();
    assert!(r.plaintext_warning(&ReceiveOptions::default()).is_some());
    let l = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    assert!(l.plaintext_warning(&ReceiveOptions::default()).is_none());
}

#[test]
fn three_devices_of_unequal_dirty_rates_converge_after_the_ack() {
    let src: Vec<EmulatedDevice> = [(0, "4M"), (1, "1M"), (2, "0")]
        .iter()
        .map(|(i, rate)| dev(&format!("src{i}"), 2 * MIB, 20 + i, &format!(",dirty-rate={rate}")))
        .collect();
    let sh: Vec<EmulatedHandle> = src.iter().map(|d| d.handle()).collect();
    let dst: Vec<EmulatedDevice> = (0..3).map(|i| dev(&format!("dst{i}"), 2 * MIB, 20 + i, "")).collect();
    let dh: Vec<EmulatedHandle> = dst.iter().map(|d| d.handle()).collect();
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let rh = spawn_receiver(receiver, dst, recv_opts());
    let report = transport::send(&url, boxed(src), &send_opts(2, true), &mut |_| {}).expect("send");
    rh.join().unwrap().expect("receive");
    assert_eq!(report.switch_reason, "converged", "{report:?}");
    assert!(report.precopy_bytes.iter().all(|b| *b >= 2 * MIB), "{report:?}");
    assert_eq!(digests(&dh), digests(&sh));
}
