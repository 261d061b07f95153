//! The receiving side: runs [`Destination`] on what arrives.

use std::collections::VecDeque;
use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rustls::ServerConfig;

use super::conn::{self, Accepted, Conn, Listening, Sock};
use super::control::{self, ControlLink, KEEPALIVE};
use super::wait::Waiter;
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
    /// How long to wait for a sender (None: forever). Connections that fail their handshake,
    /// preamble or hello are dropped (and logged) meanwhile; only this ends the wait.
    pub accept_timeout: Option<Duration>,
    /// How long each connection may take, in all, for its TLS handshake, its preamble and (on a
    /// control connection) the hello, however the peer paces its bytes. A connection that does
    /// not make it is dropped.
    pub handshake_timeout: Duration,
    /// How long the data connections may take to arrive once the hello is accepted.
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
            handshake_timeout: Duration::from_secs(10),
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
    /// SWITCHOVER_ACKs sent (more than one when a source device re-initialised its initial data,
    /// PRE_COPY info v2, after an acknowledgement).
    pub switchover_acks: u64,
    /// The initial-data markers (all devices) the last SWITCHOVER_ACK covered.
    pub acked_markers: u64,
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

/// Connections accepted but not yet through their handshake, at most (more are dropped).
const MAX_PENDING_HANDSHAKES: usize = 32;

/// A receiver listening on a migration URL; serves one sender per [`Receiver::receive`].
///
/// Strangers cannot stop it: every connection gets [`ReceiveOptions::handshake_timeout`] for
/// its TLS handshake, preamble and hello, on a thread of its own, and a connection that fails
/// any of them is dropped and logged while the receiver keeps accepting until its
/// [`ReceiveOptions::accept_timeout`]. During a migration, further senders are refused
/// ("busy") without holding up the migration or its end.
pub struct Receiver {
    listening: Listening,
    /// Where the handshake threads hand their connections over (kept across migrations, so a
    /// sender that connects while one ends is served by the next [`Receiver::receive`]).
    arrive_tx: mpsc::Sender<Arrival>,
    arrivals: Mutex<mpsc::Receiver<Arrival>>,
    /// Connections taken from `arrivals` after a migration ended, for the next one.
    held: Mutex<VecDeque<Arrival>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").field("url", self.listening.url()).finish()
    }
}

/// A connection through its handshake and preamble (and, on a control connection, the hello).
struct Arrival {
    conn: Conn,
    pre: Preamble,
    /// The stream header of a control connection's hello.
    header: Option<Header>,
}

/// Runs each accepted connection's handshake on its own thread, within the deadline, and
/// hands the survivors over through a channel (waking the accepting thread).
#[derive(Clone)]
struct Gate {
    tx: mpsc::Sender<Arrival>,
    waker: Arc<Waiter>,
    pending: Arc<AtomicUsize>,
    tls: Option<Arc<ServerConfig>>,
    timeout: Duration,
    idle: Duration,
}

impl Gate {
    fn admit(&self, sock: Sock) {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING_HANDSHAKES {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            log::warn!("connection dropped: {MAX_PENDING_HANDSHAKES} handshakes already under way");
            return;
        }
        let gate = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vfio-mig-handshake".into())
            .spawn(move || {
                match gate.handshake(sock) {
                    Ok(a) => {
                        if gate.tx.send(a).is_ok() {
                            gate.waker.wake();
                        }
                    }
                    Err(e) => log::warn!("connection dropped: {e}"),
                }
                gate.pending.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            log::warn!("connection dropped: cannot spawn its handshake thread: {e}");
        }
    }

    /// TLS handshake, preamble and (control) hello, all by one deadline.
    fn handshake(&self, sock: Sock) -> Result<Arrival, TransportError> {
        let deadline = Instant::now() + self.timeout;
        let mut conn = conn::server_conn(sock, self.tls.as_ref(), deadline)?;
        let pre = read_preamble(&mut conn)?;
        let header = if pre.role == wire::ROLE_CONTROL {
            Some(read_header(&mut conn, self.timeout)?)
        } else {
            None
        };
        conn.set_deadline(None, self.idle)
            .map_err(|e| TransportError::io(&conn.peer, "set timeouts", e))?;
        Ok(Arrival { conn, pre, header })
    }
}

enum Ev {
    ReaderDone,
    DataFailed(TransportError),
    Control(Result<Record, TransportError>),
}

impl Receiver {
    /// Listen on `url` (a `tcp:` port 0 gets a free port: see [`Receiver::url`]). A unix socket
    /// is created with mode 0600; a socket file nobody listens on is replaced, a live one (where
    /// a connection succeeds) never is. The file is removed when the receiver is dropped.
    pub fn bind(url: &MigrationUrl) -> Result<Self, TransportError> {
        let (arrive_tx, arrivals) = mpsc::channel();
        Ok(Self {
            listening: Listening::bind(url)?,
            arrive_tx,
            arrivals: Mutex::new(arrivals),
            held: Mutex::new(VecDeque::new()),
        })
    }

    /// A warning when `opts` would serve migrations in plaintext on a TCP address other hosts
    /// can reach ([`Receiver::receive`] logs it too).
    pub fn plaintext_warning(&self, opts: &ReceiveOptions) -> Option<String> {
        (opts.tls.is_none() && self.listening.exposed()).then(|| {
            format!(
                "{}: listening without TLS on an address other hosts can reach: anyone who can connect \
                 can send device state; use TLS or a loopback or unix socket address",
                self.url()
            )
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
        if let Some(w) = self.plaintext_warning(opts) {
            log::warn!("{w}");
        }
        self.listening.clear_wake();
        let deadline = opts.accept_timeout.map(|t| Instant::now() + t);
        let gate = Gate {
            tx: self.arrive_tx.clone(),
            waker: self.listening.waker(),
            pending: Arc::new(AtomicUsize::new(0)),
            tls: opts.tls.clone(),
            timeout: opts.handshake_timeout,
            idle: opts.idle_timeout,
        };
        let (mut ctrl, pre, header) = loop {
            let Some(a) = self.next_arrival(&gate, deadline)? else {
                return Err(TransportError::Timeout {
                    peer: self.url().to_string(),
                    what: "waiting for a sender",
                    secs: opts.accept_timeout.map_or(0.0, |t| t.as_secs_f64()),
                });
            };
            match a.header {
                Some(h) => break (a.conn, a.pre, h),
                None => log::warn!("{}: data connection without a migration dropped", a.conn.peer),
            }
        };
        let peer = ctrl.peer.clone();
        if let Err(reason) = check_header(&header, &mine, opts.destination.force_unknown_identity) {
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
        let data = self.accept_data(pre, &peer, opts, &gate)?;
        progress(&ReceiveProgress::Accepted {
            peer: peer.clone(),
            connections: n_conns,
        });
        let began = Instant::now();
        let is_tls = ctrl.is_tls();
        let (tx, rx) = mpsc::sync_channel::<Ev>(8 * n_conns + 8);
        let ctl_tx = tx.clone();
        let link = ControlLink::spawn(ctrl, opts.idle_timeout, move |m| ctl_tx.send(Ev::Control(m)).is_ok())?;
        let mut dst = match Destination::new(devices, opts.destination.clone()) {
            Ok(d) => d,
            Err(e) => return Err(fail_early(link, e.into())),
        };
        if let Err(e) = dst.start() {
            return Err(fail_early(link, e.into()));
        }
        let names = mine.iter().map(|m| m.0.clone()).collect();
        let mut st = State::new(peer.clone(), names, header, n_conns, is_tls, opts.idle_timeout);
        // Other senders are refused ("busy") until this migration ends.
        let busy_stop = AtomicBool::new(false);
        std::thread::scope(|outer| {
            let (gate, peer_ref, busy) = (&gate, &peer, &busy_stop);
            outer.spawn(move || self.refuse_others(busy, peer_ref, gate));
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
                // Done: from now on new senders wait for the next receive instead of "busy".
                busy_stop.store(true, Ordering::Release);
                link.send(wire::MSG_RESUMED, Vec::new());
                link.close();
                let mut report = st.report;
                report.total = began.elapsed();
                report.downtime = st.stop_began.map_or(Duration::ZERO, |t| t.elapsed());
                Ok(report)
            })();
            busy_stop.store(true, Ordering::Release);
            self.listening.wake();
            r
        })
    }

    /// The next connection through its handshake, accepting (and handing to `gate`) meanwhile;
    /// None when `deadline` passed first.
    fn next_arrival(&self, gate: &Gate, deadline: Option<Instant>) -> Result<Option<Arrival>, TransportError> {
        loop {
            if let Some(a) = self.take_arrival() {
                return Ok(Some(a));
            }
            match self.listening.accept_sock(deadline)? {
                Accepted::Sock(s) => gate.admit(s),
                Accepted::Woken => {}
                Accepted::TimedOut => return Ok(self.take_arrival()),
            }
        }
    }

    /// A connection through its handshake, if one is waiting.
    fn take_arrival(&self) -> Option<Arrival> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        held.or_else(|| self.arrivals.lock().unwrap_or_else(|e| e.into_inner()).try_recv().ok())
    }

    /// Until `stop`: refuse other senders ("busy") and drop stray data connections, without
    /// ever blocking on a peer (handshakes run on the gate's threads).
    fn refuse_others(&self, stop: &AtomicBool, peer: &str, gate: &Gate) {
        while !stop.load(Ordering::Acquire) {
            while let Some(a) = self.take_arrival() {
                if stop.load(Ordering::Acquire) {
                    // The migration ended meanwhile: the next receive serves it.
                    self.held.lock().unwrap_or_else(|e| e.into_inner()).push_front(a);
                    break;
                }
                refuse_busy(a, peer);
            }
            match self
                .listening
                .accept_sock(Some(Instant::now() + Duration::from_secs(1)))
            {
                Ok(Accepted::Sock(s)) => gate.admit(s),
                Ok(Accepted::Woken | Accepted::TimedOut) => {}
                Err(e) => {
                    log::warn!("{e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Accept the `pre.connections` data connections of the session `pre.session`. Connections
    /// of anything else are refused or dropped without failing the migration; only the
    /// deadline does.
    fn accept_data(
        &self,
        pre: Preamble,
        peer: &str,
        opts: &ReceiveOptions,
        gate: &Gate,
    ) -> Result<Vec<Conn>, TransportError> {
        let n = usize::from(pre.connections);
        let mut slots: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
        let deadline = Instant::now() + opts.connect_timeout;
        while slots.iter().any(Option::is_none) {
            let Some(a) = self.next_arrival(gate, Some(deadline))? else {
                return Err(TransportError::Timeout {
                    peer: peer.into(),
                    what: "waiting for the data connections",
                    secs: opts.connect_timeout.as_secs_f64(),
                });
            };
            if a.pre.role == wire::ROLE_CONTROL {
                refuse_busy(a, peer);
                continue;
            }
            let mut c = a.conn;
            if a.pre.session != pre.session || a.pre.connections != pre.connections {
                log::warn!("{}: data connection of another migration dropped", c.peer);
                continue;
            }
            let i = usize::from(a.pre.index);
            let Some(slot) = slots.get_mut(i).filter(|s| s.is_none()) else {
                log::warn!("{}: data connection {i} opened twice: the second one dropped", c.peer);
                continue;
            };
            c.peer = format!("{peer} (data connection {i})");
            *slot = Some(c);
        }
        Ok(slots.into_iter().flatten().collect())
    }
}

/// Answer a control connection that arrived during a migration with REFUSE; drop anything else.
fn refuse_busy(a: Arrival, peer: &str) {
    let mut c = a.conn;
    if a.pre.role != wire::ROLE_CONTROL {
        log::warn!("{}: stray data connection dropped", c.peer);
        return;
    }
    // A small record: the socket buffer takes it at once; the timeout bounds a pathological peer.
    let _ = c.set_timeouts(Some(Duration::from_secs(1)), Some(Duration::from_secs(1)));
    let why = format!("busy: serving the migration from {peer}");
    let _ = wire::write_record(&mut c, wire::MSG_REFUSE, wire::NO_DEVICE, 0, why.as_bytes()).and_then(|()| c.flush());
}

/// The stream header of a control connection's hello.
fn read_header(c: &mut Conn, timeout: Duration) -> Result<Header, TransportError> {
    let peer = c.peer.clone();
    StreamReader::new(c)
        .map(|r| r.header().clone())
        .map_err(|e| match e.kind {
            crate::stream::StreamErrorKind::Io(io) if conn::is_timeout(&io) => TransportError::Timeout {
                peer: peer.clone(),
                what: "waiting for the stream header",
                secs: timeout.as_secs_f64(),
            },
            crate::stream::StreamErrorKind::Truncated { .. } => TransportError::Closed {
                peer: peer.clone(),
                when: "before the end of the stream header",
            },
            _ => TransportError::protocol(&peer, format!("bad stream header: {e}")),
        })
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
fn check_header(
    h: &Header,
    mine: &[(String, crate::device::DeviceIdentity, MigrationFlags)],
    force_unknown_identity: bool,
) -> Result<(), String> {
    if h.devices.len() != mine.len() {
        return Err(format!(
            "the stream carries {} device(s), this receiver was started for {}",
            h.devices.len(),
            mine.len()
        ));
    }
    for (i, (name, id, flags)) in mine.iter().enumerate() {
        h.check_compatible(i as u32, id, *flags, force_unknown_identity)
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
                    let markers = dst.initial_markers();
                    st.report.switchover_acks += 1;
                    st.report.acked_markers = markers;
                    link.send(wire::MSG_SWITCHOVER_ACK, markers.to_le_bytes().to_vec());
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
    /// A migration from `peer` into the devices named `devices`, announced by `header`, over
    /// `n_conns` data connections, before any record arrived.
    pub(super) fn new(
        peer: String,
        devices: Vec<String>,
        header: Header,
        n_conns: usize,
        tls: bool,
        idle: Duration,
    ) -> Self {
        let n_dev = devices.len();
        Self {
            report: ReceiveReport {
                peer: peer.clone(),
                devices,
                precopy_bytes: vec![0; n_dev],
                stop_copy_bytes: vec![0; n_dev],
                connections: n_conns,
                tls,
                source_checks: vec![None; n_dev],
                ..ReceiveReport::default()
            },
            header,
            per_conn: vec![vec![(0, 0); n_dev]; n_conns],
            expected: vec![0; n_dev],
            ended: vec![false; n_conns],
            acked: false,
            stop_began: None,
            peer,
            idle,
        }
    }

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
                if rec.payload.is_empty() {
                    return Err(TransportError::protocol(
                        where_(),
                        format!("an empty chunk for device {dev} (sequence {})", rec.sequence),
                    ));
                }
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
                // A second marker of a device (new initial data, PRE_COPY info v2) means
                // "re-acknowledge": the next SWITCHOVER_ACK waits until it is loaded too.
                self.acked = false;
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

/// Sockets-free entry points for the fuzz targets (see [`super::fuzz`]).
pub mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceIdentity;
    use crate::stream::DeviceEntry;

    #[test]
    fn the_header_check_refuses_an_unknown_identity_unless_forced() {
        let mtty = DeviceIdentity::Mdev {
            mdev_type: "mtty-2".into(),
        };
        let header = |id: DeviceIdentity| {
            Header::new(vec![DeviceEntry {
                identity: id,
                flags: MigrationFlags::STOP_COPY,
            }])
        };
        let mine = |id: DeviceIdentity| vec![("dst0".to_string(), id, MigrationFlags::STOP_COPY)];
        assert!(check_header(&header(mtty.clone()), &mine(mtty.clone()), false).is_ok());
        for (h, d) in [
            (DeviceIdentity::Unknown, DeviceIdentity::Unknown),
            (DeviceIdentity::Unknown, mtty.clone()),
            (mtty.clone(), DeviceIdentity::Unknown),
        ] {
            let e = check_header(&header(h.clone()), &mine(d.clone()), false).unwrap_err();
            assert!(e.starts_with("dst0: ") && e.contains("--force-unknown-identity"), "{e}");
            assert!(check_header(&header(h), &mine(d), true).is_ok());
        }
        let other = DeviceIdentity::Mdev {
            mdev_type: "mtty-1".into(),
        };
        assert!(check_header(&header(other), &mine(mtty), true).is_err());
    }
}
