//! The receiving side: runs [`Destination`] on what arrives.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rustls::ServerConfig;

use super::conn::{self, Accepted, Conn, Listening, Sock};
use super::control::{self, ControlLink, KEEPALIVE};
use super::wait::Waiter;
use super::wire::{self, PREAMBLE_LEN, Preamble, Record};
use super::{MigrationUrl, TransportError};
use crate::device::MigrationDevice;
use crate::live::{Destination, DestinationOptions, LiveError};
use crate::state::MigrationFlags;
use crate::stream::{Header, StreamReader};
use load::{Acks, DeviceLoad, Flow, Inline, Loading, Tally};

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

/// What the threads of a migration tell the thread that runs it.
enum Ev {
    /// A data connection's reader got its end marker; what the connection carried.
    ReaderDone(Tally),
    /// A data connection failed.
    DataFailed(TransportError),
    /// A device's loader failed.
    LoaderFailed(TransportError),
    /// A control message from the sender, or the error that ended the control connection.
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
    ///
    /// The receiver's states, in order: a sender's hello arrives, it is accepted (or refused)
    /// and its data connections arrive, the devices load (one reader per connection, one
    /// loader per device), LOADED, COMMIT, the devices run, RESUMED.
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
        let mine = Mine::of(&devices)?;
        if let Some(w) = self.plaintext_warning(opts) {
            log::warn!("{w}");
        }
        self.listening.clear_wake();
        let gate = self.gate(opts);
        let hello = self.await_hello(&gate, opts)?;
        let accepted = self.accept(hello, &mine, opts, &gate)?;
        progress(&ReceiveProgress::Accepted {
            peer: accepted.peer.clone(),
            connections: accepted.data.len(),
        });
        self.serve(accepted, devices, &mine, opts, &gate, progress)
    }

    /// The handshake gate of one [`Receiver::receive`].
    fn gate(&self, opts: &ReceiveOptions) -> Gate {
        Gate {
            tx: self.arrive_tx.clone(),
            waker: self.listening.waker(),
            pending: Arc::new(AtomicUsize::new(0)),
            tls: opts.tls.clone(),
            timeout: opts.handshake_timeout,
            idle: opts.idle_timeout,
        }
    }

    /// The first control connection through its handshake and hello (stray data connections
    /// dropped meanwhile), or the accept timeout.
    fn await_hello(&self, gate: &Gate, opts: &ReceiveOptions) -> Result<Hello, TransportError> {
        let deadline = opts.accept_timeout.map(|t| Instant::now() + t);
        loop {
            let Some(a) = self.next_arrival(gate, deadline)? else {
                return Err(TransportError::Timeout {
                    peer: self.url().to_string(),
                    what: "waiting for a sender",
                    secs: opts.accept_timeout.map_or(0.0, |t| t.as_secs_f64()),
                });
            };
            match a.header {
                Some(header) => {
                    return Ok(Hello {
                        ctrl: a.conn,
                        pre: a.pre,
                        header,
                    });
                }
                None => log::warn!("{}: data connection without a migration dropped", a.conn.peer),
            }
        }
    }

    /// Check the hello against the devices (REFUSE on a mismatch, before touching them), answer
    /// ACCEPT and wait for the data connections.
    fn accept(
        &self,
        hello: Hello,
        mine: &Mine,
        opts: &ReceiveOptions,
        gate: &Gate,
    ) -> Result<AcceptedSender, TransportError> {
        let Hello { mut ctrl, pre, header } = hello;
        let peer = ctrl.peer.clone();
        if let Err(reason) = check_header(&header, &mine.devices, opts.destination.force_unknown_identity) {
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
        let data = self.accept_data(pre, &peer, opts, gate)?;
        Ok(AcceptedSender {
            peer,
            ctrl,
            header,
            data,
        })
    }

    /// Run the accepted migration, refusing other senders ("busy") until it ends.
    fn serve(
        &self,
        accepted: AcceptedSender,
        devices: Vec<Box<dyn MigrationDevice + '_>>,
        mine: &Mine,
        opts: &ReceiveOptions,
        gate: &Gate,
        progress: &mut dyn FnMut(&ReceiveProgress),
    ) -> Result<ReceiveReport, TransportError> {
        let done = AtomicBool::new(false);
        let peer = accepted.peer.clone();
        std::thread::scope(|s| {
            s.spawn(|| self.refuse_others(&done, &peer, gate));
            let r = accepted.run(devices, mine, opts, &done, progress);
            done.store(true, Ordering::Release);
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

/// The destination devices' names, identities and flags, read before anything arrives.
struct Mine {
    devices: Vec<(String, crate::device::DeviceIdentity, MigrationFlags)>,
}

impl Mine {
    fn of(devices: &[Box<dyn MigrationDevice + '_>]) -> Result<Self, TransportError> {
        let mut out = Vec::with_capacity(devices.len());
        for d in devices {
            out.push((d.name().to_string(), d.identity(), d.flags().map_err(LiveError::from)?));
        }
        Ok(Self { devices: out })
    }

    fn names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.0.clone()).collect()
    }

    fn flags(&self) -> Vec<MigrationFlags> {
        self.devices.iter().map(|d| d.2).collect()
    }
}

/// A control connection through its hello.
struct Hello {
    ctrl: Conn,
    pre: Preamble,
    header: Header,
}

/// A sender whose hello was accepted, with its data connections.
struct AcceptedSender {
    peer: String,
    ctrl: Conn,
    header: Header,
    data: Vec<Conn>,
}

impl AcceptedSender {
    /// Load the devices, wait for COMMIT, resume them; on failure reset them and tell the
    /// sender. `done` is set before RESUMED leaves (from then on a new sender waits for the
    /// next [`Receiver::receive`] instead of being refused as busy).
    fn run(
        self,
        devices: Vec<Box<dyn MigrationDevice + '_>>,
        mine: &Mine,
        opts: &ReceiveOptions,
        done: &AtomicBool,
        progress: &mut dyn FnMut(&ReceiveProgress),
    ) -> Result<ReceiveReport, TransportError> {
        let began = Instant::now();
        let AcceptedSender {
            peer,
            ctrl,
            header,
            data,
        } = self;
        let tls = ctrl.is_tls();
        let (tx, events) = mpsc::channel::<Ev>();
        let ctl_tx = tx.clone();
        let link = ControlLink::spawn(ctrl, opts.idle_timeout, move |m| ctl_tx.send(Ev::Control(m)).is_ok())?;
        let mut m = Migration {
            report: Commit::report(peer.clone(), mine.names(), data.len(), tls),
            peer,
            link,
            events,
            idle: opts.idle_timeout,
        };
        let mut dst = match Destination::new(devices, opts.destination.clone()) {
            Ok(d) => d,
            Err(e) => return Err(m.fail_early(e.into())),
        };
        if let Err(e) = dst.start() {
            return Err(m.fail_early(e.into()));
        }
        let loaded = m.load(&mut dst, data, &header, mine, opts, tx, progress);
        match loaded.and_then(|(expected, stop_began)| m.commit(&mut dst, &expected).map(|()| stop_began)) {
            Ok(stop_began) => {
                done.store(true, Ordering::Release);
                Ok(m.resumed(began, stop_began))
            }
            Err(e) => Err(m.fail(&mut dst, e)),
        }
    }
}

/// A migration under way on the receiver: the control link, the events of its threads and
/// the report so far.
struct Migration {
    peer: String,
    link: ControlLink,
    events: mpsc::Receiver<Ev>,
    report: ReceiveReport,
    idle: Duration,
}

impl Migration {
    /// Load every data connection into the devices: one reader per connection, one loader per
    /// device ([`load`]). Returns the chunks the end markers announce per device and when the
    /// first stop-copy chunk arrived.
    #[allow(clippy::too_many_arguments)]
    fn load(
        &mut self,
        dst: &mut Destination<'_>,
        data: Vec<Conn>,
        header: &Header,
        mine: &Mine,
        opts: &ReceiveOptions,
        tx: mpsc::Sender<Ev>,
        progress: &mut dyn FnMut(&ReceiveProgress),
    ) -> Result<(Vec<u64>, Option<Instant>), TransportError> {
        let names = mine.names();
        let flags = mine.flags();
        let n_conns = data.len();
        let (flow, queues) = Flow::new(
            header,
            &names,
            n_conns,
            opts.destination.max_reorder_bytes,
            opts.idle_timeout,
        );
        let acks = Acks::new(&flags);
        let sockets: Vec<Sock> = data.iter().filter_map(|c| c.handle().ok()).collect();
        let link = &self.link;
        let ack = |total: u64| {
            link.send(wire::MSG_SWITCHOVER_ACK, total.to_le_bytes().to_vec());
        };
        let loading: Vec<Mutex<Loading<'_>>> = dst
            .loaders()
            .into_iter()
            .enumerate()
            .map(|(i, loader)| Mutex::new(Loading::new(DeviceLoad::new(i, loader, flags[i]), &acks, &ack)))
            .collect();
        // A lone device's readers may load it themselves (see `load`).
        let inline = match &loading[..] {
            [lone] => Some(Inline {
                loading: lone,
                acks: &acks,
                ack: &ack,
            }),
            _ => None,
        };
        let read = std::thread::scope(|s| {
            let mut loaders = Vec::with_capacity(names.len());
            for ((i, loading), queue) in loading.iter().enumerate().zip(queues) {
                let (tx, flow, acks, ack) = (tx.clone(), &flow, &acks, &ack);
                let spawned = std::thread::Builder::new()
                    .name("vfio-mig-loader".into())
                    .spawn_scoped(s, move || {
                        load::run_loader(loading, queue, flow, i, acks, ack).map_err(|e| {
                            // Told at once: the readers only see the loader's queue close.
                            let _ = tx.send(Ev::LoaderFailed(e));
                        })
                    });
                // A loader that could not start fails the migration: its queue is closed.
                loaders.push(spawned.ok());
            }
            for c in data {
                let (tx, flow) = (tx.clone(), &flow);
                let tally = Tally::new(c.peer.clone(), names.len());
                let peer = c.peer.clone();
                let failed = tx.clone();
                let spawned = std::thread::Builder::new()
                    .name("vfio-mig-reader".into())
                    .spawn_scoped(s, move || {
                        let _ = tx.send(match flow.read(c, tally, inline) {
                            Ok(t) => Ev::ReaderDone(t),
                            Err(e) => Ev::DataFailed(e),
                        });
                    });
                if let Err(e) = spawned {
                    let _ = failed.send(Ev::DataFailed(TransportError::io(
                        peer,
                        "spawn the connection's reader",
                        e,
                    )));
                }
            }
            drop(tx);
            let read = self.wait_readers(n_conns, &flow, progress);
            if read.is_err() {
                flow.fail();
                load::shut(&sockets);
            } else {
                flow.close();
            }
            // Every loader ends once its queue is empty and closed.
            let mut loaded = true;
            for h in loaders {
                loaded &= matches!(h.map(|h| h.join()), Some(Ok(Ok(()))));
            }
            let read = read?;
            if loaded { Ok(read) } else { Err(self.loader_error()) }
        })?;
        if let Some(e) = flow.missing() {
            return Err(e.into());
        }
        (self.report.switchover_acks, self.report.acked_markers) = acks.report();
        let expected = Commit::add_tallies(&mut self.report, &read);
        Ok((expected, flow.stop_began.get().copied()))
    }

    /// Wait until every reader got its end marker (or something failed), reporting progress.
    fn wait_readers(
        &self,
        n: usize,
        flow: &Flow<'_>,
        progress: &mut dyn FnMut(&ReceiveProgress),
    ) -> Result<Vec<Tally>, TransportError> {
        let mut done = Vec::with_capacity(n);
        while done.len() < n {
            match self.events.recv_timeout(Duration::from_millis(100)) {
                Ok(Ev::ReaderDone(t)) => done.push(t),
                Ok(Ev::DataFailed(e)) => return Err(self.prefer_loader_error(e)),
                Ok(Ev::LoaderFailed(e)) => return Err(e),
                Ok(Ev::Control(r)) => Commit::during_load(&self.peer, r?)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(TransportError::Closed {
                        peer: self.peer.clone(),
                        when: "during the migration",
                    });
                }
            }
            progress(&ReceiveProgress::Loaded {
                bytes: flow.received.load(Ordering::Relaxed),
            });
        }
        Ok(done)
    }

    /// The error a loader reported (a loader that failed reports it before it ends).
    fn loader_error(&self) -> TransportError {
        while let Ok(ev) = self.events.try_recv() {
            if let Ev::LoaderFailed(e) = ev {
                return e;
            }
        }
        TransportError::Live(LiveError::Refused("a loader thread panicked".into()))
    }

    /// A reader's error may only be the echo of a loader's (its queue closed): prefer the
    /// loader's own when it follows at once.
    fn prefer_loader_error(&self, e: TransportError) -> TransportError {
        let deadline = Instant::now() + Duration::from_millis(50);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(Ev::LoaderFailed(l)) => return l,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        e
    }

    /// Everything arrived: complete the load, tell the sender (LOADED), wait for its COMMIT,
    /// resume the devices.
    fn commit(&mut self, dst: &mut Destination<'_>, expected: &[u64]) -> Result<(), TransportError> {
        dst.complete(Some(expected))?;
        self.link.send(wire::MSG_LOADED, Vec::new());
        loop {
            let ev = self
                .events
                .recv_timeout(self.idle + Duration::from_secs(1))
                .map_err(|_| TransportError::Timeout {
                    peer: self.peer.clone(),
                    what: "waiting for the sender's COMMIT",
                    secs: self.idle.as_secs_f64(),
                })?;
            if let Ev::Control(r) = ev
                && Commit::on_control(&mut self.report, &self.peer, r?)?
            {
                break;
            }
        }
        dst.resume()?;
        Ok(())
    }

    /// The devices run: tell the sender (RESUMED) and close.
    fn resumed(self, began: Instant, stop_began: Option<Instant>) -> ReceiveReport {
        let Migration {
            link,
            events,
            mut report,
            ..
        } = self;
        drop(events);
        link.send(wire::MSG_RESUMED, Vec::new());
        link.close();
        report.total = began.elapsed();
        report.downtime = stop_began.map_or(Duration::ZERO, |t| t.elapsed());
        report
    }

    /// The migration failed before the devices were touched: tell the sender and close.
    fn fail_early(self, e: TransportError) -> TransportError {
        let Migration { link, events, .. } = self;
        drop(events);
        link.send(wire::MSG_FAILED, wire::reason_payload(&e.to_string()));
        link.close();
        e
    }

    /// The migration failed: reset the devices, tell the sender and close.
    fn fail(self, dst: &mut Destination<'_>, e: TransportError) -> TransportError {
        let recoveries = dst.abort();
        let e = if recoveries.is_empty() && matches!(e, TransportError::Live(LiveError::Aborted { .. })) {
            e
        } else {
            TransportError::Aborted {
                cause: Box::new(e),
                side: "destination",
                recoveries,
            }
        };
        let Migration { link, events, .. } = self;
        drop(events);
        link.send(wire::MSG_FAILED, wire::reason_payload(&e.to_string()));
        link.close();
        e
    }
}

/// The receiver's report and control messages, the same in a live migration and in the fuzz
/// entry point.
struct Commit;

impl Commit {
    /// The report of a migration from `peer` into the devices `devices` over `connections`
    /// data connections, before anything arrived.
    fn report(peer: String, devices: Vec<String>, connections: usize, tls: bool) -> ReceiveReport {
        let n = devices.len();
        ReceiveReport {
            peer,
            devices,
            precopy_bytes: vec![0; n],
            stop_copy_bytes: vec![0; n],
            connections,
            tls,
            source_checks: vec![None; n],
            ..ReceiveReport::default()
        }
    }

    /// Add what the data connections carried to `report`; returns the chunks their end markers
    /// announce per device.
    fn add_tallies(report: &mut ReceiveReport, tallies: &[Tally]) -> Vec<u64> {
        let mut expected = vec![0u64; report.devices.len()];
        for t in tallies {
            for (d, e) in expected.iter_mut().enumerate() {
                *e += t.announced.as_ref().and_then(|a| a.get(d)).copied().unwrap_or(0);
                report.precopy_bytes[d] += t.precopy[d];
                report.stop_copy_bytes[d] += t.stop_copy[d];
                if let Some(c) = t.checks[d] {
                    report.source_checks[d] = Some(c);
                }
            }
        }
        expected
    }

    /// A control message while the devices load: only FAILED may come.
    fn during_load(peer: &str, rec: Record) -> Result<(), TransportError> {
        match rec.kind {
            wire::MSG_FAILED => Err(TransportError::PeerFailed {
                peer: peer.into(),
                reason: control::reason(&rec),
            }),
            k => Err(TransportError::protocol(
                peer,
                format!("unexpected {} from the sender", wire::kind_name(k)),
            )),
        }
    }

    /// A control message once the devices are loaded: whether it is the COMMIT (its figures go
    /// into `report`).
    fn on_control(report: &mut ReceiveReport, peer: &str, rec: Record) -> Result<bool, TransportError> {
        if rec.kind != wire::MSG_COMMIT {
            return Self::during_load(peer, rec).map(|()| false);
        }
        if let Some(p) = rec.payload.get(..16) {
            let mut a = [0u8; 8];
            a.copy_from_slice(&p[..8]);
            report.source_iterations = Some(u64::from_le_bytes(a));
            a.copy_from_slice(&p[8..16]);
            let est = u64::from_le_bytes(a);
            report.source_est_downtime = (est != u64::MAX).then(|| Duration::from_micros(est));
        }
        Ok(true)
    }
}

/// Sockets-free entry points for the fuzz targets (see [`super::fuzz`]).
pub mod fuzz;
mod load;

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
