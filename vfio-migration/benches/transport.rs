//! Transport throughput, three ways, every ratio from runs measured in the same run.
//!
//! 1. **Against a plain socket copy** (uncapped loopback TCP): `send` / `Receiver::receive` of one
//!    emulated device (stop-copy only, so the whole state crosses the socket as fast as it can)
//!    against the same state copied device to device through a plain socket (no framing,
//!    checksums or protocol: the baseline), a plain memory-to-memory socket copy of as many bytes,
//!    and the same migration in one process (`LocalMigration`, no socket) to show what the devices
//!    cost. `SUMMARY transport:` gives R = baseline time / transport time (target >= 0.9), from
//!    the means and as the median of runs paired back to back (the fairer figure on a shared
//!    machine).
//! 2. **Scaling through a per-connection rate cap**: on 2 shared cores a loopback run is
//!    CPU-bound on both ends at once, so more connections can only help where each connection is
//!    the bottleneck, as on real links with a per-flow cap. A local proxy
//!    (`tests/support/rate_proxy.rs`) caps every connection at `TRANSPORT_BENCH_CAP_MIB` MiB/s
//!    (default 16); 4 emulated devices move over 1 and over 4 connections, without and with TLS.
//!    `SUMMARY transport-capped:` gives time(1) / time(4) (target >= 3.2).
//! 3. **Uncapped scaling**: the same 4 devices over uncapped loopback with 1, 2 and 4 connections,
//!    without and with TLS. `SUMMARY transport-scaling:` gives time(1) / time(N) (target >= 1: more
//!    connections are never slower).
//!
//! `TRANSPORT_BENCH_MIB=N` sets the single device's size for (1) and the total of the 4 devices
//! for (3) (default 128 MiB); `TRANSPORT_BENCH_CAPPED_MIB=N` the total for (2) (default 16 MiB).

#[path = "../tests/support/rate_proxy.rs"]
mod rate_proxy;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, criterion_group, criterion_main};
use rate_proxy::RateProxy;
use vfio_migration::device::{ReadOutcome, TransferSession};
use vfio_migration::emulated::EmulatedDevice;
use vfio_migration::live::LocalMigration;
use vfio_migration::transport::{self, ReceiveOptions, Receiver, SendOptions};
use vfio_migration::{DeviceState, MigrationDevice};

fn env_mib(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
        .max(1)
        << 20
}

fn size() -> u64 {
    env_mib("TRANSPORT_BENCH_MIB", 128)
}

/// Devices of the scaling runs.
const DEVICES: usize = 4;

static RESULTS: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());
/// Per kind of pair: the ratios baseline time / measured time of runs made back to back.
static PAIRS: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());

fn pair(name: &'static str, baseline: Duration, measured: Duration) {
    PAIRS
        .lock()
        .unwrap()
        .push((name, baseline.as_secs_f64() / measured.as_secs_f64().max(1e-9)));
}

/// The median of the pairs `name` and how many there are.
fn median(name: &str) -> (f64, usize) {
    let mut v: Vec<f64> = PAIRS
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.0 == name)
        .map(|p| p.1)
        .collect();
    v.sort_by(f64::total_cmp);
    (v.get(v.len() / 2).copied().unwrap_or(0.0), v.len())
}

fn record(name: &'static str, d: Duration, bytes: u64) {
    RESULTS.lock().unwrap().push((name, d, bytes));
}

fn mean(name: &str) -> (Duration, u64) {
    let r = RESULTS.lock().unwrap();
    let v: Vec<_> = r.iter().filter(|x| x.0 == name).collect();
    let n = v.len().max(1) as u32;
    (
        v.iter().map(|x| x.1).sum::<Duration>() / n,
        v.first().map_or(0, |x| x.2),
    )
}

fn devices(size: u64) -> (EmulatedDevice, EmulatedDevice) {
    let s = EmulatedDevice::from_spec(&format!("size={size},seed=5,block=64K")).unwrap();
    let d = EmulatedDevice::from_spec(&format!("size={size},seed=5,block=64K")).unwrap();
    (s, d)
}

/// `n` source and destination pairs of `size` bytes each.
fn device_pairs(n: usize, size: u64) -> (Vec<EmulatedDevice>, Vec<EmulatedDevice>) {
    (0..n)
        .map(|i| {
            let spec = format!("size={size},seed={},block=64K", 5 + i);
            (
                EmulatedDevice::from_spec(&spec).unwrap(),
                EmulatedDevice::from_spec(&spec).unwrap(),
            )
        })
        .unzip()
}

/// A tls_dir with a CA, server and client certificates.
fn tls_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.path().join("ca-cert.pem"), ca.pem()).unwrap();
    for stem in ["server", "client"] {
        let p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.path().join(format!("{stem}-cert.pem")), cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{stem}-key.pem")), key.serialize_pem()).unwrap();
    }
    dir
}

/// One migration of one device over loopback TCP; returns the wall time and the bytes moved.
fn over_tcp(size: u64, connections: usize) -> (Duration, u64) {
    let (src, dst) = devices(size);
    migrate(vec![src], vec![dst], connections, None, None)
}

/// A migration of `src` into `dst` over loopback TCP with `connections` data connections,
/// with TLS from `tls`, through a proxy capping each connection at `cap` bytes/s when given;
/// returns the wall time and the bytes moved, after checking every device arrived.
fn migrate(
    src: Vec<EmulatedDevice>,
    dst: Vec<EmulatedDevice>,
    connections: usize,
    tls: Option<&Path>,
    cap: Option<u64>,
) -> (Duration, u64) {
    let (sh, dh): (Vec<_>, Vec<_>) = src.iter().zip(&dst).map(|(s, d)| (s.handle(), d.handle())).unzip();
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let mut url = receiver.url().clone();
    let proxy = cap.map(|rate| {
        let p = RateProxy::uniform(url.to_string().trim_start_matches("tcp:").to_string(), rate);
        url = p.url.parse().unwrap();
        p
    });
    let server = tls.map(|d| transport::server_config(d).unwrap());
    let rt = std::thread::spawn(move || {
        let opts = ReceiveOptions {
            accept_timeout: Some(Duration::from_secs(30)),
            tls: server,
            ..ReceiveOptions::default()
        };
        let dst: Vec<Box<dyn MigrationDevice>> = dst.into_iter().map(|d| Box::new(d) as _).collect();
        receiver.receive(dst, &opts, &mut |_| {}).expect("receive")
    });
    let mut opts = SendOptions {
        connections,
        tls: tls.map(|d| transport::client_config(d).unwrap()),
        ..SendOptions::default()
    };
    opts.source.precopy = false;
    let src: Vec<Box<dyn MigrationDevice>> = src.into_iter().map(|d| Box::new(d) as _).collect();
    let t = Instant::now();
    let r = transport::send(&url, src, &opts, &mut |_| {}).expect("send");
    rt.join().unwrap();
    let d = t.elapsed();
    drop(proxy);
    for (s, d) in sh.iter().zip(&dh) {
        assert_eq!(s.digest(), d.digest(), "benchmark migration must verify");
    }
    (d, r.stop_copy_bytes.iter().sum())
}

/// The scaling runs' migration: [`DEVICES`] devices of `total` bytes in all.
fn scaled(total: u64, connections: usize, tls: Option<&Path>, cap: Option<u64>) -> (Duration, u64) {
    let (src, dst) = device_pairs(DEVICES, (total / DEVICES as u64).max(64 << 10));
    migrate(src, dst, connections, tls, cap)
}

/// The same migration in one process (no socket).
fn local(size: u64) -> (Duration, u64) {
    let (mut src, mut dst) = devices(size);
    let mut m = LocalMigration::default();
    m.source.precopy = false;
    let t = Instant::now();
    let r = m
        .run(
            vec![Box::new(&mut src) as Box<dyn MigrationDevice>],
            vec![Box::new(&mut dst) as Box<dyn MigrationDevice>],
            &mut |_| {},
        )
        .expect("local migration");
    (t.elapsed(), r.stop_copy_bytes.iter().sum())
}

/// Walk `dev` to `to`, returning the last session opened.
fn walk(dev: &mut EmulatedDevice, to: DeviceState) -> Option<Box<dyn TransferSession>> {
    let from = dev.state().unwrap();
    let flags = dev.flags().unwrap();
    let mut session = None;
    for s in vfio_migration::state::path(from, to, flags)
        .unwrap()
        .into_iter()
        .skip(1)
    {
        if let Some(x) = dev.set_state(s).unwrap() {
            session = Some(x);
        }
    }
    session
}

/// The same device state copied device to device through a plain loopback TCP socket: no
/// framing, no checksums, no protocol (the baseline the transport is measured against).
fn plain_device_copy(size: u64) -> (Duration, u64) {
    let (mut src, mut dst) = devices(size);
    let (sh, dh) = (src.handle(), dst.handle());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = Instant::now();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut session = walk(&mut dst, DeviceState::Resuming).expect("RESUMING session");
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            let mut off = 0;
            while off < n {
                off += session.write(&buf[off..n]).unwrap();
            }
        }
        drop(session);
        walk(&mut dst, DeviceState::Running);
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let mut session = walk(&mut src, DeviceState::StopCopy).expect("STOP_COPY session");
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        match session.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => {
                s.write_all(&buf[..n]).unwrap();
                bytes += n as u64;
            }
            ReadOutcome::NothingNow => {}
            ReadOutcome::End => break,
        }
    }
    drop(session);
    drop(s);
    reader.join().unwrap();
    walk(&mut src, DeviceState::Stop);
    let d = t.elapsed();
    assert_eq!(sh.digest(), dh.digest(), "plain device copy must verify");
    (d, bytes)
}

/// `bytes` through a loopback TCP socket in 1 MiB writes, read into a 1 MiB buffer.
fn plain_copy(bytes: u64) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = Instant::now();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "plain copy ended early");
            got += n as u64;
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let buf = vec![0x5au8; 1 << 20];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).unwrap();
        sent += n as u64;
    }
    reader.join().unwrap();
    t.elapsed()
}

/// A benchmark whose every iteration also runs `baseline` right before it (untimed here),
/// recording the pair `name` (baseline time / measured time) and both times.
fn paired(
    g: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    name: &'static str,
    baseline: (&'static str, &dyn Fn() -> (Duration, u64)),
    measured: (&'static str, &dyn Fn() -> (Duration, u64)),
) {
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (base, bytes) = baseline.1();
                record(baseline.0, base, bytes);
                let (d, bytes) = measured.1();
                record(measured.0, d, bytes);
                pair(name, base, d);
                total += d;
            }
            total
        })
    });
}

fn throughput(c: &mut Criterion) {
    let size = size();
    let mut g = c.benchmark_group("transport");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    paired(
        &mut g,
        "send-receive-tcp-1conn",
        "device-copy",
        ("plain-device", &|| plain_device_copy(size)),
        ("tcp1", &|| over_tcp(size, 1)),
    );
    g.bench_function("local-no-socket", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (d, bytes) = local(size);
                record("local", d, bytes);
                total += d;
            }
            total
        })
    });
    let bytes = over_tcp(size, 1).1;
    g.bench_function("plain-socket-copy", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = plain_copy(bytes);
                record("plain", d, bytes);
                total += d;
            }
            total
        })
    });
    g.finish();

    let dir = tls_dir();
    let tls = Some(dir.path());
    let capped = env_mib("TRANSPORT_BENCH_CAPPED_MIB", 16);
    let cap = env_mib("TRANSPORT_BENCH_CAP_MIB", 16);
    let mut g = c.benchmark_group("transport-capped");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(1));
    paired(
        &mut g,
        "tcp-4dev-4conn",
        "capped",
        ("capped-tcp1", &|| scaled(capped, 1, None, Some(cap))),
        ("capped-tcp4", &|| scaled(capped, 4, None, Some(cap))),
    );
    paired(
        &mut g,
        "tls-4dev-4conn",
        "capped-tls",
        ("capped-tls1", &|| scaled(capped, 1, tls, Some(cap))),
        ("capped-tls4", &|| scaled(capped, 4, tls, Some(cap))),
    );
    g.finish();

    let mut g = c.benchmark_group("transport-scaling");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(2));
    paired(
        &mut g,
        "tcp-4dev-2conn",
        "scale-tcp2",
        ("scale-tcp1", &|| scaled(size, 1, None, None)),
        ("scale-tcp2", &|| scaled(size, 2, None, None)),
    );
    paired(
        &mut g,
        "tcp-4dev-4conn",
        "scale-tcp4",
        ("scale-tcp1", &|| scaled(size, 1, None, None)),
        ("scale-tcp4", &|| scaled(size, 4, None, None)),
    );
    paired(
        &mut g,
        "tls-4dev-4conn",
        "scale-tls4",
        ("scale-tls1", &|| scaled(size, 1, tls, None)),
        ("scale-tls4", &|| scaled(size, 4, tls, None)),
    );
    g.finish();
    summary(size, capped, cap);
}

/// The `SUMMARY` lines.
fn summary(size: u64, capped: u64, cap: u64) {
    let means: HashMap<&str, (Duration, u64)> = [
        "tcp1",
        "plain-device",
        "plain",
        "local",
        "capped-tcp1",
        "capped-tcp4",
        "capped-tls1",
        "capped-tls4",
        "scale-tcp1",
        "scale-tcp2",
        "scale-tcp4",
        "scale-tls1",
        "scale-tls4",
    ]
    .into_iter()
    .map(|n| (n, mean(n)))
    .collect();
    let ms = |n: &str| means[n].0.as_secs_f64() * 1e3;
    let ratio = |base: &str, n: &str| means[base].0.as_secs_f64() / means[n].0.as_secs_f64().max(1e-9);
    let (b1, mib) = (means["tcp1"].1, |n: &str| {
        means[n].1 as f64 / (1 << 20) as f64 / means[n].0.as_secs_f64().max(1e-9)
    });
    let (m, k) = median("device-copy");
    println!(
        "SUMMARY transport: {} MiB device to device over loopback TCP in {:.1} ms ({:.0} MiB/s) vs a plain \
         device-to-device socket copy {:.1} ms ({:.0} MiB/s): ratio {:.3} (median of {k} paired runs {m:.3}; \
         target >= 0.9); memory-to-memory socket copy {:.1} ms ({:.0} MiB/s): ratio {:.3}; same migration \
         without a socket {:.1} ms ({:.0} MiB/s)",
        b1 >> 20,
        ms("tcp1"),
        mib("tcp1"),
        ms("plain-device"),
        mib("plain-device"),
        ratio("plain-device", "tcp1"),
        ms("plain"),
        mib("plain"),
        ratio("plain", "tcp1"),
        ms("local"),
        mib("local"),
    );
    let (mc, kc) = median("capped");
    let (mt, kt) = median("capped-tls");
    println!(
        "SUMMARY transport-capped: {DEVICES} devices, {} MiB in all, through a proxy capping each connection at \
         {} MiB/s: 1 connection {:.1} ms, 4 connections {:.1} ms: ratio {:.2} (median of {kc} paired runs \
         {mc:.2}; target >= 3.2); TLS: 1 connection {:.1} ms, 4 connections {:.1} ms: ratio {:.2} (median \
         of {kt} paired runs {mt:.2}; target >= 3.2)",
        capped >> 20,
        cap >> 20,
        ms("capped-tcp1"),
        ms("capped-tcp4"),
        ratio("capped-tcp1", "capped-tcp4"),
        ms("capped-tls1"),
        ms("capped-tls4"),
        ratio("capped-tls1", "capped-tls4"),
    );
    let (m2, k2) = median("scale-tcp2");
    let (m4, k4) = median("scale-tcp4");
    let (ms4, ks4) = median("scale-tls4");
    println!(
        "SUMMARY transport-scaling: {DEVICES} devices, {} MiB in all, uncapped loopback TCP: 1 connection \
         {:.1} ms ({:.0} MiB/s), 2 connections {:.1} ms: ratio {:.2} (median of {k2} paired runs {m2:.2}), \
         4 connections {:.1} ms: ratio {:.2} (median of {k4} paired runs {m4:.2}); TLS: 1 connection {:.1} ms \
         ({:.0} MiB/s), 4 connections {:.1} ms: ratio {:.2} (median of {ks4} paired runs {ms4:.2}); target \
         >= 1.0 (more connections never slower)",
        size >> 20,
        ms("scale-tcp1"),
        mib("scale-tcp1"),
        ms("scale-tcp2"),
        ratio("scale-tcp1", "scale-tcp2"),
        ms("scale-tcp4"),
        ratio("scale-tcp1", "scale-tcp4"),
        ms("scale-tls1"),
        mib("scale-tls1"),
        ms("scale-tls4"),
        ratio("scale-tls1", "scale-tls4"),
    );
}

criterion_group!(benches, throughput);
criterion_main!(benches);
