//! Transport throughput: `send` / `Receiver::receive` of an emulated device over loopback TCP
//! (stop-copy only, so the whole state crosses the socket as fast as it can) against, in the
//! same run: a plain socket copy of the same bytes from the source device's STOP_COPY session
//! into the destination's RESUMING session (no framing, checksums or protocol: the target
//! ratio's baseline), a plain memory-to-memory socket copy of as many bytes, and the same
//! migration in one process (`LocalMigration`, no socket) to show what the devices cost.
//! Prints `SUMMARY transport: ... ratio R (...; target >= 0.8)` with R = baseline time /
//! transport time (the throughput ratio), from the means and as the median of runs paired
//! back to back (the fairer figure on a shared machine).
//!
//! `TRANSPORT_BENCH_MIB=N` sets the device size (default 128 MiB).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use vfio_migration::device::{ReadOutcome, TransferSession};
use vfio_migration::emulated::EmulatedDevice;
use vfio_migration::live::LocalMigration;
use vfio_migration::transport::{self, ReceiveOptions, Receiver, SendOptions};
use vfio_migration::{DeviceState, MigrationDevice};

fn size() -> u64 {
    std::env::var("TRANSPORT_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128u64)
        .max(1)
        << 20
}

static RESULTS: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());
/// Per paired run: plain device copy time / transport time.
static PAIRS: Mutex<Vec<f64>> = Mutex::new(Vec::new());

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

/// One migration over loopback TCP; returns the wall time and the bytes moved.
fn over_tcp(size: u64, connections: usize) -> (Duration, u64) {
    over_tcp_tls(size, connections, None)
}

fn over_tcp_tls(size: u64, connections: usize, tls: Option<&std::path::Path>) -> (Duration, u64) {
    let (src, dst) = devices(size);
    let (sh, dh) = (src.handle(), dst.handle());
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let server = tls.map(|d| transport::server_config(d).unwrap());
    let rt = std::thread::spawn(move || {
        let opts = ReceiveOptions {
            accept_timeout: Some(Duration::from_secs(30)),
            tls: server,
            ..ReceiveOptions::default()
        };
        receiver
            .receive(vec![Box::new(dst) as Box<dyn MigrationDevice>], &opts, &mut |_| {})
            .expect("receive")
    });
    let mut opts = SendOptions {
        connections,
        tls: tls.map(|d| transport::client_config(d).unwrap()),
        ..SendOptions::default()
    };
    opts.source.precopy = false;
    let t = Instant::now();
    let r = transport::send(
        &url,
        vec![Box::new(src) as Box<dyn MigrationDevice>],
        &opts,
        &mut |_| {},
    )
    .expect("send");
    rt.join().unwrap();
    let d = t.elapsed();
    assert_eq!(sh.digest(), dh.digest(), "benchmark migration must verify");
    (d, r.stop_copy_bytes.iter().sum())
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

fn throughput(c: &mut Criterion) {
    let size = size();
    let mut g = c.benchmark_group("transport");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("send-receive-tcp-1conn", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (d, bytes) = over_tcp(size, 1);
                record("tcp1", d, bytes);
                total += d;
                // A paired baseline run right after, under the same machine load (untimed here).
                let (p, _) = plain_device_copy(size);
                PAIRS.lock().unwrap().push(p.as_secs_f64() / d.as_secs_f64().max(1e-9));
            }
            total
        })
    });
    g.bench_function("send-receive-tcp-2conn", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (d, bytes) = over_tcp(size, 2);
                record("tcp2", d, bytes);
                total += d;
            }
            total
        })
    });
    let dir = tls_dir();
    g.bench_function("send-receive-tls-2conn", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (d, bytes) = over_tcp_tls(size, 2, Some(dir.path()));
                record("tls2", d, bytes);
                total += d;
            }
            total
        })
    });
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
    g.bench_function("plain-device-socket-copy", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (d, bytes) = plain_device_copy(size);
                record("plain-device", d, bytes);
                total += d;
            }
            total
        })
    });
    g.finish();
    let (t1, b1) = mean("tcp1");
    let (tpd, _) = mean("plain-device");
    let (t2, _) = mean("tcp2");
    let (ttls, _) = mean("tls2");
    let (tl, _) = mean("local");
    let (tp, _) = mean("plain");
    let mut pairs = PAIRS.lock().unwrap().clone();
    pairs.sort_by(f64::total_cmp);
    let median = pairs.get(pairs.len() / 2).copied().unwrap_or(0.0);
    let mibs = |d: Duration| b1 as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9);
    println!(
        "SUMMARY transport: {} MiB device to device over loopback TCP in {:.1} ms ({:.0} MiB/s; 2 connections {:.1} ms; TLS over 2 connections {:.1} ms) \
         vs a plain device-to-device socket copy {:.1} ms ({:.0} MiB/s): ratio {:.3} (median of {} paired runs {:.3}; target >= 0.8); \
         memory-to-memory socket copy {:.1} ms ({:.0} MiB/s): ratio {:.3}; same migration without a socket {:.1} ms ({:.0} MiB/s)",
        b1 >> 20,
        t1.as_secs_f64() * 1e3,
        mibs(t1),
        t2.as_secs_f64() * 1e3,
        ttls.as_secs_f64() * 1e3,
        tpd.as_secs_f64() * 1e3,
        mibs(tpd),
        tpd.as_secs_f64() / t1.as_secs_f64().max(1e-9),
        pairs.len(),
        median,
        tp.as_secs_f64() * 1e3,
        mibs(tp),
        tp.as_secs_f64() / t1.as_secs_f64().max(1e-9),
        tl.as_secs_f64() * 1e3,
        mibs(tl),
    );
}

criterion_group!(benches, throughput);
criterion_main!(benches);
