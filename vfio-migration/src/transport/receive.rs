//! The receiving side: runs [`Destination`] on what arrives.

use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rustls::ServerConfig;

use super::conn::{self, Conn, Listening, Sock};
use super::control::{self, ControlLink, KEEPALIVE};
use super::wire::{self, PREAMBLE_LEN, Preamble, ReadError, Record};
use super::{MigrationUrl, TransportError};
use crate::device::MigrationDevice;
use crate::live::{Destination, DestinationOptions, LiveError};
use crate::state::MigrationFlags;
use crate::stream::{Header, MAX_CHUNK_LEN, StreamReader};

/// Options of [`Receiver::receive`].
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// Destination options (reorder limit).
    pub destination: DestinationOptions,
    /// Mutual TLS (see [`super::server_config`]).
    pub tls: Option<Arc<ServerConfig>>,
    /// How long to wait for a sender (None: forever).
    pub accept_timeout: Option<Duration>,
    /// How long the TLS handshake, the hello and the data connections may take to arrive.
    pub connect_timeout: Duration,
    /// How long the sender may stay silent (it sends keepalives twice a second).
    pub idle_timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            destination: DestinationOptions::default(),
            tls: None,
            accept_timeout: None,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// What [`Receiver::receive`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiveReport {
    /// The sender, as the socket names it.
    pub peer: String,
    /// Device names, destination side.
    pub devices: Vec<String>,
    /// Pre-copy bytes loaded per device.
    pub precopy_bytes: Vec<u64>,
    /// Stop-copy bytes loaded per device.
    pub stop_copy_bytes: Vec<u64>,
    /// Data connections used.
    pub connections: usize,
    /// Whether the connections were TLS.
    pub tls: bool,
    /// The sender's check values per device, when it sent them (see [`super::CheckFn`]).
    pub source_checks: Vec<Option<u64>>,
    /// From the accepted hello to the devices running.
    pub total: Duration,
    /// The sender's pre-copy iterations (from its COMMIT).
    pub source_iterations: Option<u64>,
    /// The sender's downtime estimate at switchover (from its COMMIT).
    pub source_est_downtime: Option<Duration>,
    /// From the first stop-copy chunk to the devices running (the receiver's view of the downtime).
    pub downtime: Duration,
}

/// Events a receiver reports while it runs.
#[derive(Clone, Debug)]
pub enum ReceiveProgress {
    /// A sender was accepted.
    Accepted {
        /// Who.
        peer: String,
        /// Data connections.
        connections: usize,
    },
    /// Bytes loaded so far, all devices.
    Loaded {
        /// Bytes.
        bytes: u64,
    },
}

/// A receiver listening on a migration URL; serves one sender per [`Receiver::receive`].
pub struct Receiver {
    listening: Listening,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").field("url", self.listening.url()).finish()
    }
}

enum Ev {
    ReaderDone,
    DataFailed(TransportError),
    Control(Result<Record, TransportError>),
}

impl Receiver {
    /// Listen on `url` (a `tcp:` port 0 gets a free port: see [`Receiver::url`]). A unix socket
    /// file left over is replaced; the file is removed when the receiver is dropped.
    pub fn bind(url: &MigrationUrl) -> Result<Self, TransportError> {
        Ok(Self {
            listening: Listening::bind(url)?,
        })
    }

    /// The URL senders connect to.
    pub fn url(&self) -> &MigrationUrl {
        self.listening.url()
    }

    /// Serve one sender: check its header against `devices` before touching them, load them,
    /// resume them when the sender commits. On any failure the devices are reset (RUNNING).
    pub fn receive<'a>(
        &self,
        devices: Vec<Box<dyn MigrationDevice + 'a>>,
        opts: &ReceiveOptions,
        progress: &mut dyn FnMut(&ReceiveProgress),
    ) -> Result<ReceiveReport, TransportError> {
        if opts.idle_timeout <= KEEPALIVE * 2 {
            return Err(TransportError::Options(format!(
                "idle timeout {:?} must be above {:?}",
                opts.idle_timeout,
                KEEPALIVE * 2
            )));
        }
        let mut mine = Vec::with_capacity(devices.len());
        for d in &devices {
            mine.push((d.name().to_string(), d.identity(), d.flags().map_err(LiveError::from)?));
        }
        self.listening.clear_wake();
        let deadline = opts.accept_timeout.map(|t| Instant::now() + t);
        let tls = opts.tls.as_ref();
        let mut ctrl = self
            .listening
            .accept(deadline, tls, opts.connect_timeout, opts.idle_timeout)?;
        let peer = ctrl.peer.clone();
        let pre = read_preamble(&mut ctrl)?;
        if pre.role != wire::ROLE_CONTROL {
            return Err(TransportError::protocol(
                &peer,
                "the first connection is not a control connection",
            ));
        }
        let header = StreamReader::new(&mut ctrl)
            .map(|r| r.header().clone())
            .map_err(|e| match e.kind {
                crate::stream::StreamErrorKind::Io(io) if conn::is_timeout(&io) => TransportError::Timeout {
                    peer: peer.clone(),
                    what: "waiting for the stream header",
                    secs: opts.idle_timeout.as_secs_f64(),
                },
                crate::stream::StreamErrorKind::Truncated { .. } => TransportError::Closed {
                    peer: peer.clone(),
                    when: "before the end of the stream header",
                },
                _ => TransportError::protocol(&peer, format!("bad stream header: {e}")),
            })?;
        if let Err(reason) = check_header(&header, &mine) {
            let _ = wire::write_record(
                &mut ctrl,
                wire::MSG_REFUSE,
                wire::NO_DEVICE,
                0,
                &wire::reason_payload(&reason),
            )
            .and_then(|()| ctrl.flush());
            return Err(TransportError::Mismatch { peer, reason });
        }
        wire::write_record(&mut ctrl, wire::MSG_ACCEPT, wire::NO_DEVICE, 0, &[])
            .and_then(|()| ctrl.flush())
            .map_err(|e| TransportError::io(&peer, "accept the sender", e))?;
        let n_conns = usize::from(pre.connections);
        let data = self.accept_data(pre, &peer, opts)?;
        progress(&ReceiveProgress::Accepted {
            peer: peer.clone(),
            connections: n_conns,
        });
        let began = Instant::now();
        let is_tls = ctrl.is_tls();
        let (tx, rx) = mpsc::sync_channel::<Ev>(8 * n_conns + 8);
        let ctl_tx = tx.clone();
        let link = ControlLink::spawn(ctrl, opts.idle_timeout, move |m| ctl_tx.send(Ev::Control(m)).is_ok())?;
        let n_dev = devices.len();
        let mut dst = match Destination::new(devices, opts.destination.clone()) {
            Ok(d) => d,
            Err(e) => return Err(fail_early(link, e.into())),
        };
        if let Err(e) = dst.start() {
            return Err(fail_early(link, e.into()));
        }
        let mut st = State {
            report: ReceiveReport {
                peer: peer.clone(),
                devices: mine.iter().map(|m| m.0.clone()).collect(),
                precopy_bytes: vec![0; n_dev],
                stop_copy_bytes: vec![0; n_dev],
                connections: n_conns,
                tls: is_tls,
                source_checks: vec![None; n_dev],
                ..ReceiveReport::default()
            },
            header,
            per_conn: vec![vec![(0, 0); n_dev]; n_conns],
            expected: vec![0; n_dev],
            ended: vec![false; n_conns],
            acked: false,
            stop_began: None,
            peer: peer.clone(),
            idle: opts.idle_timeout,
        };
        // Other senders are refused ("busy") until this migration ends.
        let busy_stop = AtomicBool::new(false);
        std::thread::scope(|outer| {
            outer.spawn(|| self.refuse_others(&busy_stop, &peer, opts));
            let r = (|| {
                let loaded = AtomicU64::new(0);
                let shared = Mutex::new((&mut dst, &mut st));
                let loading = std::thread::scope(|s| {
                    let mut handles: Vec<Sock> = Vec::new();
                    for (i, c) in data.into_iter().enumerate() {
                        if let Ok(h) = c.handle() {
                            handles.push(h);
                        }
                        let (tx, shared, link, loaded) = (tx.clone(), &shared, &link, &loaded);
                        s.spawn(move || reader(i, c, tx, shared, link, loaded));
                    }
                    drop(tx);
                    let r = wait_readers(&rx, n_conns, &loaded, &peer, progress);
                    for h in &handles {
                        h.shutdown();
                    }
                    r
                });
                let _ = shared.into_inner();
                let result = loading.and_then(|()| st.finish(rx, &mut dst, &link));
                if let Err(e) = result {
                    let recoveries = dst.abort();
                    link.send(wire::MSG_FAILED, wire::reason_payload(&e.to_string()));
                    link.close();
                    if recoveries.is_empty() && matches!(e, TransportError::Live(LiveError::Aborted { .. })) {
                        return Err(e);
                    }
                    return Err(TransportError::Aborted {
                        cause: Box::new(e),
                        side: "destination",
                        recoveries,
                    });
                }
                link.send(wire::MSG_RESUMED, Vec::new());
                link.close();
                let mut report = st.report;
                report.total = began.elapsed();
                report.downtime = st.stop_began.map_or(Duration::ZERO, |t| t.elapsed());
                Ok(report)
            })();
            busy_stop.store(true, Ordering::Relaxed);
            self.listening.wake();
            r
        })
    }

    /// Answer every other sender with REFUSE until `stop`.
    fn refuse_others(&self, stop: &AtomicBool, peer: &str, opts: &ReceiveOptions) {
        let quick = opts.connect_timeout.min(Duration::from_secs(2));
        while !stop.load(Ordering::Relaxed) {
            let deadline = Instant::now() + Duration::from_secs(1);
            let Ok(mut c) = self.listening.accept(Some(deadline), opts.tls.as_ref(), quick, quick) else {
                continue;
            };
            // Read what the sender sent (its hello), so closing does not reset the connection
            // before it reads the answer.
            if read_preamble(&mut c).is_ok_and(|p| p.role == wire::ROLE_CONTROL) {
                let _ = StreamReader::new(&mut c);
            }
            let why = format!("busy: serving the migration from {peer}");
            let _ = wire::write_record(&mut c, wire::MSG_REFUSE, wire::NO_DEVICE, 0, why.as_bytes())
                .and_then(|()| c.flush());
        }
    }

    /// Accept the `pre.connections` data connections of the session `pre.session`.
    fn accept_data(&self, pre: Preamble, peer: &str, opts: &ReceiveOptions) -> Result<Vec<Conn>, TransportError> {
        let n = usize::from(pre.connections);
        let mut slots: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
        let deadline = Instant::now() + opts.connect_timeout;
        while slots.iter().any(Option::is_none) {
            let mut c = self
                .listening
                .accept(
                    Some(deadline),
                    opts.tls.as_ref(),
                    opts.connect_timeout,
                    opts.idle_timeout,
                )
                .map_err(|e| match e {
                    TransportError::Timeout { .. } => TransportError::Timeout {
                        peer: peer.into(),
                        what: "waiting for the data connections",
                        secs: opts.connect_timeout.as_secs_f64(),
                    },
                    e => e,
                })?;
            let p = match read_preamble(&mut c) {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("{}: connection dropped: {e}", c.peer);
                    continue;
                }
            };
            if p.role == wire::ROLE_CONTROL {
                let why = format!("busy: serving the migration from {peer}");
                let _ = wire::write_record(&mut c, wire::MSG_REFUSE, wire::NO_DEVICE, 0, why.as_bytes())
                    .and_then(|()| c.flush());
                continue;
            }
            if p.session != pre.session || p.connections != pre.connections {
                log::warn!("{}: data connection of another migration dropped", c.peer);
                continue;
            }
            let i = usize::from(p.index);
            if slots[i].is_some() {
                return Err(TransportError::protocol(
                    peer,
                    format!("data connection {i} opened twice"),
                ));
            }
            c.peer = format!("{peer} (data connection {i})");
            slots[i] = Some(c);
        }
        Ok(slots.into_iter().flatten().collect())
    }
}

fn fail_early(link: ControlLink, e: TransportError) -> TransportError {
    link.send(wire::MSG_FAILED, wire::reason_payload(&e.to_string()));
    link.close();
    e
}

fn read_preamble(c: &mut Conn) -> Result<Preamble, TransportError> {
    let mut b = [0u8; PREAMBLE_LEN];
    c.read_exact(&mut b).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TransportError::Closed {
                peer: c.peer.clone(),
                when: "before its preamble",
            }
        } else if conn::is_timeout(&e) {
            TransportError::Timeout {
                peer: c.peer.clone(),
                what: "waiting for the preamble",
                secs: 0.0,
            }
        } else {
            TransportError::io(&c.peer, "read the preamble", e)
        }
    })?;
    Preamble::decode(&b).map_err(|why| TransportError::protocol(&c.peer, why))
}

/// Whether a stream header may be loaded into these devices (name, identity, flags).
fn check_header(h: &Header, mine: &[(String, crate::device::DeviceIdentity, MigrationFlags)]) -> Result<(), String> {
    if h.devices.len() != mine.len() {
        return Err(format!(
            "the stream carries {} device(s), this receiver was started for {}",
            h.devices.len(),
            mine.len()
        ));
    }
    for (i, (name, id, flags)) in mine.iter().enumerate() {
        h.check_compatible(i as u32, id, *flags)
            .map_err(|m| format!("{name}: {m}"))?;
    }
    Ok(())
}

/// A data connection's reader: loads what arrives (under the lock shared with the other
/// readers) until the end marker, then tells the main thread.
fn reader(
    i: usize,
    c: Conn,
    tx: mpsc::SyncSender<Ev>,
    shared: &Mutex<(&mut Destination<'_>, &mut State)>,
    link: &ControlLink,
    loaded: &AtomicU64,
) {
    let peer = c.peer.clone();
    // Small: a record header read pulls at most this much payload through the buffer; the
    // rest of a payload is read straight into its own buffer.
    let mut r = BufReader::with_capacity(16 << 10, c);
    let mut buf = Vec::new();
    loop {
        let e = match wire::read_record(&mut r, buf, MAX_CHUNK_LEN) {
            Ok(rec) if rec.kind == wire::KIND_KEEPALIVE => {
                buf = rec.payload;
                continue;
            }
            Ok(rec) => {
                let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
                let (dst, st) = &mut *g;
                if let Err(e) = st.on_record(i, &rec, dst) {
                    drop(g);
                    let _ = tx.send(Ev::DataFailed(e));
                    return;
                }
                if !st.acked && dst.switchover_ready() {
                    st.acked = true;
                    link.send(wire::MSG_SWITCHOVER_ACK, Vec::new());
                }
                drop(g);
                loaded.fetch_add(rec.payload.len() as u64, Ordering::Relaxed);
                if rec.kind == wire::KIND_END {
                    let _ = tx.send(Ev::ReaderDone);
                    return;
                }
                buf = rec.payload;
                continue;
            }
            Err(ReadError::Eof) => TransportError::Closed {
                peer: peer.clone(),
                when: "before its end marker",
            },
            Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => TransportError::Closed {
                peer: peer.clone(),
                when: "in the middle of a record",
            },
            Err(ReadError::Io(e)) if conn::is_timeout(&e) => TransportError::Timeout {
                peer: peer.clone(),
                what: "waiting for data",
                secs: 0.0,
            },
            Err(ReadError::Io(e)) => TransportError::io(&peer, "read", e),
            Err(ReadError::Bad(why)) => TransportError::protocol(&peer, why),
        };
        let _ = tx.send(Ev::DataFailed(e));
        return;
    }
}

/// Wait until every reader got its end marker (or something failed), reporting progress.
fn wait_readers(
    rx: &mpsc::Receiver<Ev>,
    n: usize,
    loaded: &AtomicU64,
    peer: &str,
    progress: &mut dyn FnMut(&ReceiveProgress),
) -> Result<(), TransportError> {
    let mut done = 0;
    while done < n {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ev::ReaderDone) => done += 1,
            Ok(Ev::DataFailed(e)) => return Err(e),
            Ok(Ev::Control(Ok(rec))) if rec.kind == wire::MSG_FAILED => {
                return Err(TransportError::PeerFailed {
                    peer: peer.into(),
                    reason: control::reason(&rec),
                });
            }
            Ok(Ev::Control(Ok(rec))) => {
                return Err(TransportError::protocol(
                    peer,
                    format!("unexpected {} from the sender", wire::kind_name(rec.kind)),
                ));
            }
            Ok(Ev::Control(Err(e))) => return Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(TransportError::Closed {
                    peer: peer.into(),
                    when: "during the migration",
                });
            }
        }
        progress(&ReceiveProgress::Loaded {
            bytes: loaded.load(Ordering::Relaxed),
        });
    }
    Ok(())
}

struct State {
    report: ReceiveReport,
    header: Header,
    /// Per connection, per device: (records, bytes) that arrived.
    per_conn: Vec<Vec<(u64, u64)>>,
    /// Per device: records announced by the end markers so far.
    expected: Vec<u64>,
    ended: Vec<bool>,
    acked: bool,
    stop_began: Option<Instant>,
    peer: String,
    idle: Duration,
}

impl State {
    /// Every end marker arrived: complete the load, tell the sender, wait for its COMMIT, resume.
    fn finish(
        &mut self,
        rx: mpsc::Receiver<Ev>,
        dst: &mut Destination<'_>,
        link: &ControlLink,
    ) -> Result<(), TransportError> {
        let wait = self.idle + Duration::from_secs(1);
        dst.complete(Some(&self.expected))?;
        link.send(wire::MSG_LOADED, Vec::new());
        loop {
            let ev = rx.recv_timeout(wait).map_err(|_| TransportError::Timeout {
                peer: self.peer.clone(),
                what: "waiting for the sender's COMMIT",
                secs: self.idle.as_secs_f64(),
            })?;
            match ev {
                Ev::Control(r) => {
                    if self.on_control(r?, true)? {
                        break;
                    }
                }
                Ev::ReaderDone | Ev::DataFailed(..) => {}
            }
        }
        dst.resume()?;
        Ok(())
    }

    /// Returns whether the message is the COMMIT (allowed when `loaded`).
    fn on_control(&mut self, rec: Record, loaded: bool) -> Result<bool, TransportError> {
        match rec.kind {
            wire::MSG_COMMIT if loaded => {
                if let Some(p) = rec.payload.get(..16) {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&p[..8]);
                    self.report.source_iterations = Some(u64::from_le_bytes(a));
                    a.copy_from_slice(&p[8..16]);
                    let est = u64::from_le_bytes(a);
                    self.report.source_est_downtime = (est != u64::MAX).then(|| Duration::from_micros(est));
                }
                Ok(true)
            }
            wire::MSG_FAILED => Err(TransportError::PeerFailed {
                peer: self.peer.clone(),
                reason: control::reason(&rec),
            }),
            k => Err(TransportError::protocol(
                &self.peer,
                format!("unexpected {} from the sender", wire::kind_name(k)),
            )),
        }
    }

    fn on_record(&mut self, c: usize, rec: &Record, dst: &mut Destination<'_>) -> Result<(), TransportError> {
        let n_dev = self.expected.len();
        let where_ = || format!("{} (data connection {c})", self.peer);
        let dev = rec.device as usize;
        let need_dev = |what: &str| {
            if dev < n_dev {
                Ok(())
            } else {
                Err(TransportError::protocol(
                    where_(),
                    format!("{what} for device {dev}; the stream has {n_dev}"),
                ))
            }
        };
        match rec.kind {
            wire::KIND_PRE_COPY | wire::KIND_STOP_COPY => {
                need_dev("a chunk")?;
                let len = rec.payload.len() as u64;
                if rec.kind == wire::KIND_PRE_COPY {
                    let flags = self.header.devices[dev].flags;
                    if !flags.contains(MigrationFlags::PRE_COPY) {
                        return Err(TransportError::protocol(
                            where_(),
                            format!("a pre-copy chunk for device {dev}, whose flags {flags} lack PRE_COPY"),
                        ));
                    }
                    self.report.precopy_bytes[dev] += len;
                } else {
                    self.stop_began.get_or_insert_with(Instant::now);
                    self.report.stop_copy_bytes[dev] += len;
                }
                let t = &mut self.per_conn[c][dev];
                t.0 += 1;
                t.1 += len;
                dst.load(dev, rec.sequence, &rec.payload)?;
            }
            wire::KIND_INITIAL_SENT => {
                need_dev("an initial-data marker")?;
                dst.initial_sent(dev, rec.sequence)?;
            }
            wire::KIND_CHECK => {
                need_dev("a check value")?;
                let v: [u8; 8] = rec.payload[..]
                    .try_into()
                    .map_err(|_| TransportError::protocol(where_(), "a check value that is not 8 bytes"))?;
                self.report.source_checks[dev] = Some(u64::from_le_bytes(v));
            }
            wire::KIND_END => {
                let totals =
                    wire::decode_end(&rec.payload, n_dev).map_err(|why| TransportError::protocol(where_(), why))?;
                for (d, (t, got)) in totals.iter().zip(&self.per_conn[c]).enumerate() {
                    if t != got {
                        return Err(TransportError::protocol(
                            where_(),
                            format!(
                                "device {d}: the end marker counts {} records / {} bytes, {} / {} arrived",
                                t.0, t.1, got.0, got.1
                            ),
                        ));
                    }
                    self.expected[d] += t.0;
                }
                self.ended[c] = true;
            }
            k => {
                return Err(TransportError::protocol(
                    where_(),
                    format!("unexpected {} on a data connection", wire::kind_name(k)),
                ));
            }
        }
        Ok(())
    }
}
