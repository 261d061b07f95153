//! The transport's parallel data path: a device's reorder window that fills up pushes back on
//! the connection that is ahead instead of failing the migration; a lone device's readers load
//! it in order; a sender that never sends the chunk every window waits for is caught; several
//! connections through a per-connection rate cap move the state faster than one.

#[path = "support/rate_proxy.rs"]
mod rate_proxy;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rate_proxy::{Caps, RateProxy};
use vfio_migration::device::{DeviceIdentity, DmaRange, PrecopyInfo, ReadOutcome};
use vfio_migration::emulated::{EmulatedDevice, EmulatedHandle};
use vfio_migration::live::{DestinationOptions, MigrationReport};
use vfio_migration::state::SessionKind;
use vfio_migration::stream::{DeviceEntry, Header, StreamWriter};
use vfio_migration::transport::wire::{self, Preamble};
use vfio_migration::transport::{self, CheckFn, MigrationUrl, ReceiveOptions, ReceiveReport, Receiver, SendOptions};
use vfio_migration::{DeviceError, DeviceState, MigrationDevice, MigrationFlags, TransferSession};

const MIB: u64 = 1 << 20;

fn devices(prefix: &str, n: usize, size: u64, extra: &str) -> (Vec<Box<dyn MigrationDevice>>, Vec<EmulatedHandle>) {
    let devs: Vec<EmulatedDevice> = (0..n)
        .map(|i| {
            EmulatedDevice::from_spec(&format!(
                "name={prefix}{i},size={size},seed={},block=16K{extra}",
                30 + i
            ))
            .expect("valid spec")
        })
        .collect();
    let handles = devs.iter().map(EmulatedDevice::handle).collect();
    (
        devs.into_iter()
            .map(|d| Box::new(d) as Box<dyn MigrationDevice>)
            .collect(),
        handles,
    )
}

fn tcp_addr(url: &MigrationUrl) -> String {
    match url {
        MigrationUrl::Tcp { host, port } => format!("{host}:{port}"),
        MigrationUrl::Unix { .. } => unreachable!("tcp only"),
    }
}

/// Send `src` into `dst` over `connections` data connections through a [`RateProxy`] that caps
/// them as `caps` says: no pre-copy, chunks of 64 KiB into reorder windows that hold two
/// (128 KiB), the sender's source check `check`. The sender's and the receiver's reports.
fn send_through_proxy(
    src: Vec<Box<dyn MigrationDevice>>,
    dst: Vec<Box<dyn MigrationDevice>>,
    caps: Caps,
    connections: usize,
    check: Option<CheckFn>,
) -> (MigrationReport, ReceiveReport) {
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let proxy = RateProxy::start(tcp_addr(receiver.url()), caps);
    let ro = ReceiveOptions {
        accept_timeout: Some(Duration::from_secs(20)),
        destination: DestinationOptions {
            max_reorder_bytes: 128 << 10,
            ..DestinationOptions::default()
        },
        ..ReceiveOptions::default()
    };
    let rh = std::thread::spawn(move || receiver.receive(dst, &ro, &mut |_| {}));
    let mut so = SendOptions {
        connections,
        ..SendOptions::default()
    };
    so.source.precopy = false;
    so.source.chunk_size = 64 << 10;
    so.check = check;
    let report = transport::send(&proxy.url.parse().unwrap(), src, &so, &mut |_| {}).expect("send");
    let rr = rh.join().unwrap().expect("receive");
    (report, rr)
}

/// Issue 13, part 4: chunks arrive far out of order (one data connection is slow) into
/// reorder windows that hold two chunks; before, the first chunk that did not fit aborted the
/// migration ("... still missing and ... bytes are already held"), now the connection that is
/// ahead waits, and every device arrives byte for byte.
#[test]
fn a_full_reorder_window_pushes_back_instead_of_failing() {
    let (src, sh) = devices("src", 3, 2 * MIB, "");
    let (dst, dh) = devices("dst", 3, 2 * MIB, "");
    let h = sh.clone();
    // Accept order: the control connection, then data connections 0..4; data connection 0 is
    // slow, the others are not capped.
    let (report, rr) = send_through_proxy(
        src,
        dst,
        Arc::new(|i| (i == 1).then_some(4 * MIB)),
        4,
        Some(Arc::new(move |i| h.get(i).map(EmulatedHandle::digest))),
    );
    let sd: Vec<u64> = sh.iter().map(EmulatedHandle::digest).collect();
    assert_eq!(dh.iter().map(EmulatedHandle::digest).collect::<Vec<_>>(), sd);
    assert_eq!(rr.source_checks, sd.iter().map(|d| Some(*d)).collect::<Vec<_>>());
    assert!(dh.iter().all(|d| d.device_state() == DeviceState::Running));
    assert!(sh.iter().all(|d| d.device_state() == DeviceState::Stop));
    assert_eq!(report.stop_copy_bytes, rr.stop_copy_bytes);
    assert!(rr.stop_copy_bytes.iter().all(|&b| b >= 2 * MIB), "{rr:?}");
}

/// Issue 13, part 4: a lone device over several connections, into a reorder window of two
/// chunks. Its readers load the chunks they have next themselves while its loader is idle, and
/// hand the others to it (queued behind what a reader is loading): every chunk in order, byte
/// for byte, also while a slow connection keeps the window full.
#[test]
fn a_lone_device_over_several_connections_loads_in_order() {
    for slow in [false, true] {
        let (src, sh) = devices("src", 1, 6 * MIB, "");
        let (dst, dh) = devices("dst", 1, 6 * MIB, "");
        let (report, rr) = send_through_proxy(
            src,
            dst,
            Arc::new(move |i| (slow && i == 2).then_some(8 * MIB)),
            3,
            None,
        );
        assert_eq!(dh[0].digest(), sh[0].digest(), "slow connection: {slow}");
        assert_eq!(dh[0].device_state(), DeviceState::Running);
        assert_eq!(report.stop_copy_bytes, rr.stop_copy_bytes);
    }
}

/// A fake sender: its hello for `header`, then `data` connections (preamble each).
fn fake_sender(url: &MigrationUrl, header: Header, data: usize) -> (TcpStream, Vec<TcpStream>) {
    let session = 0x5eed;
    let mut ctrl = TcpStream::connect(tcp_addr(url)).unwrap();
    let mut hello = Preamble {
        role: wire::ROLE_CONTROL,
        index: 0,
        connections: data as u16,
        session,
    }
    .encode()
    .to_vec();
    StreamWriter::new(&mut hello, header).unwrap();
    ctrl.write_all(&hello).unwrap();
    let mut answer = [0u8; 24];
    ctrl.read_exact(&mut answer).unwrap();
    assert_eq!(u16::from_le_bytes([answer[0], answer[1]]), wire::MSG_ACCEPT);
    let conns = (0..data)
        .map(|i| {
            let mut c = TcpStream::connect(tcp_addr(url)).unwrap();
            let p = Preamble {
                role: wire::ROLE_DATA,
                index: i as u16,
                connections: data as u16,
                session,
            };
            c.write_all(&p.encode()).unwrap();
            c
        })
        .collect();
    (ctrl, conns)
}

/// A sender that never sends chunk 0 while every connection carries a later one into a full
/// window: every reader waits, nothing moves, and the receiver fails (devices reset and
/// RUNNING) instead of waiting forever.
#[test]
fn a_chunk_that_never_comes_while_every_connection_waits_fails_the_migration() {
    let (dst, dh) = devices("dst", 1, 256 << 10, "");
    let header = Header::new(vec![DeviceEntry {
        identity: dst[0].identity(),
        flags: dst[0].flags().unwrap(),
    }]);
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let ro = ReceiveOptions {
        accept_timeout: Some(Duration::from_secs(20)),
        destination: DestinationOptions {
            max_reorder_bytes: 0,
            ..DestinationOptions::default()
        },
        ..ReceiveOptions::default()
    };
    let t = Instant::now();
    let rh = std::thread::spawn(move || receiver.receive(dst, &ro, &mut |_| {}));
    let (_ctrl, mut conns) = fake_sender(&url, header, 2);
    for (seq, c) in [1u64, 2].into_iter().zip(&mut conns) {
        let mut rec = Vec::new();
        wire::write_record(&mut rec, wire::KIND_STOP_COPY, 0, seq, &[7u8; 100]).unwrap();
        c.write_all(&rec).unwrap();
    }
    let err = rh.join().unwrap().unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    let text = err.to_string();
    assert!(
        text.contains("chunk 0 is missing") && text.contains("reorder window is full"),
        "{text}"
    );
    assert!(err.devices_recovered(), "{err}");
    assert_eq!(dh[0].device_state(), DeviceState::Running);
    assert!(dh[0].is_usable());
}

/// What the destination devices of the slow-device test share: the bytes written to the fast
/// one, and whether the slow one's first write gave up waiting for them.
#[derive(Debug, Default)]
struct Race {
    fast_bytes: AtomicU64,
    gave_up: AtomicBool,
}

/// A destination device whose RESUMING session is either slow (its first write waits until the
/// fast device took `wait_for` bytes, at most 5 s) or fast (it counts what it takes).
struct Watched {
    inner: EmulatedDevice,
    slow: bool,
    wait_for: u64,
    race: Arc<Race>,
}

#[derive(Debug)]
struct WatchedSession {
    inner: Box<dyn TransferSession>,
    slow: bool,
    waited: bool,
    wait_for: u64,
    race: Arc<Race>,
}

impl TransferSession for WatchedSession {
    fn kind(&self) -> SessionKind {
        self.inner.kind()
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        self.inner.read(buf)
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        if self.slow && !std::mem::replace(&mut self.waited, true) {
            let t = Instant::now();
            while self.race.fast_bytes.load(Ordering::SeqCst) < self.wait_for {
                if t.elapsed() > Duration::from_secs(5) {
                    self.race.gave_up.store(true, Ordering::SeqCst);
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let n = self.inner.write(buf)?;
        if !self.slow {
            self.race.fast_bytes.fetch_add(n as u64, Ordering::SeqCst);
        }
        Ok(n)
    }
    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        self.inner.precopy_info()
    }
}

impl MigrationDevice for Watched {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn identity(&self) -> DeviceIdentity {
        self.inner.identity()
    }
    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        self.inner.flags()
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        self.inner.state()
    }
    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        Ok(self.inner.set_state(to)?.map(|s| {
            Box::new(WatchedSession {
                inner: s,
                slow: self.slow,
                waited: false,
                wait_for: self.wait_for,
                race: self.race.clone(),
            }) as Box<dyn TransferSession>
        }))
    }
    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        self.inner.stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.inner.reset()
    }
    fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError> {
        self.inner.dma_log_start(ranges, page_size)
    }
    fn dma_log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.inner.dma_log_report(iova, length, page_size, bitmap)
    }
    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        self.inner.dma_log_stop()
    }
}

/// Issue 13, part 4: one loader per destination device, no lock over all of them. The first
/// write into a slow destination device waits until another device has loaded its whole
/// state; before, every device loaded under one lock, so the other device could not load
/// while the slow one's write held it (the wait gave up after 5 s).
#[test]
fn a_slow_destination_device_does_not_hold_up_the_others() {
    let race = Arc::new(Race::default());
    let spec = |name: &str, size: u64, seed: u64| {
        EmulatedDevice::from_spec(&format!("name={name},size={size},seed={seed},block=16K")).expect("valid spec")
    };
    let (slow_size, fast_size) = (64 << 10, 2 * MIB);
    let src = vec![spec("src0", slow_size, 1), spec("src1", fast_size, 2)];
    let sh: Vec<EmulatedHandle> = src.iter().map(EmulatedDevice::handle).collect();
    let dst = [spec("dst0", slow_size, 1), spec("dst1", fast_size, 2)];
    let dh: Vec<EmulatedHandle> = dst.iter().map(EmulatedDevice::handle).collect();
    let dst: Vec<Box<dyn MigrationDevice>> = dst
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            Box::new(Watched {
                inner: d,
                slow: i == 0,
                wait_for: fast_size,
                race: race.clone(),
            }) as Box<dyn MigrationDevice>
        })
        .collect();
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let ro = ReceiveOptions {
        accept_timeout: Some(Duration::from_secs(20)),
        ..ReceiveOptions::default()
    };
    let rh = std::thread::spawn(move || receiver.receive(dst, &ro, &mut |_| {}));
    let mut so = SendOptions {
        connections: 2,
        ..SendOptions::default()
    };
    so.source.precopy = false;
    so.source.chunk_size = 64 << 10;
    let src: Vec<Box<dyn MigrationDevice>> = src.into_iter().map(|d| Box::new(d) as _).collect();
    transport::send(&url, src, &so, &mut |_| {}).expect("send");
    rh.join().unwrap().expect("receive");
    assert!(
        !race.gave_up.load(Ordering::SeqCst),
        "the fast device could not load while the slow one's write waited ({} bytes)",
        race.fast_bytes.load(Ordering::SeqCst)
    );
    for (s, d) in sh.iter().zip(&dh) {
        assert_eq!(s.digest(), d.digest());
        assert_eq!(d.device_state(), DeviceState::Running);
    }
}
