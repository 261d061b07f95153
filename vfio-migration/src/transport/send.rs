//! The sending side: runs [`Source`] and puts its chunks on the wire.

use std::io::{self, Write};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rustls::ClientConfig;

use super::conn::{self, Conn};
use super::control::{self, ControlLink, KEEPALIVE};
use super::wire::{self, Preamble, Record};
use super::writer::Writers;
use super::{MigrationUrl, TransportError};
use crate::device::MigrationDevice;
use crate::live::precopy_loop::{self, PrecopyPeer};
use crate::live::{
    ChunkSink, Convergence, LiveError, LiveProgress, MigrationReport, Phase, SeqSink, SinkEvent, Source, SourceOptions,
};
use crate::stream::{DeviceEntry, Header, StreamWriter};

/// A value the sender computes per device after stop-copy (e.g. an emulated device's digest)
/// and sends, so the receiver can verify its device against it.
pub type CheckFn = Arc<dyn Fn(usize) -> Option<u64> + Send + Sync>;

/// Options of [`send`].
#[derive(Clone)]
pub struct SendOptions {
    /// Source options (pre-copy, P2P forcing, parallel stop-copy, chunk size).
    pub source: SourceOptions,
    /// The convergence policy (as [`crate::live::LocalMigration`]'s).
    pub convergence: Convergence,
    /// Data connections to spread the chunks over, 1 to [`wire::MAX_CONNECTIONS`].
    pub connections: usize,
    /// Mutual TLS (see [`super::client_config`]).
    pub tls: Option<Arc<ClientConfig>>,
    /// How long connecting (and the TLS handshake) may take.
    pub connect_timeout: Duration,
    /// How long the receiver may stay silent (it sends keepalives twice a second).
    pub idle_timeout: Duration,
    /// Check values sent after stop-copy.
    pub check: Option<CheckFn>,
}

impl std::fmt::Debug for SendOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendOptions")
            .field("source", &self.source)
            .field("convergence", &self.convergence)
            .field("connections", &self.connections)
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("check", &self.check.is_some())
            .finish()
    }
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            source: SourceOptions::default(),
            convergence: Convergence::default(),
            connections: 1,
            tls: None,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            check: None,
        }
    }
}

/// Live-migrate `devices` to the receiver at `url`.
///
/// On success the source devices are STOP and the destination runs them. On a failure before
/// COMMIT was sent, the devices are back in RUNNING with their state intact (the error lists
/// what recovery did). After COMMIT (the commit point, see the [protocol](super)) the source
/// never resumes on its own: when RESUMED does not arrive the result is
/// [`TransportError::Unconfirmed`] ("handed over, not confirmed"), the devices stay STOP with
/// their state, and only the caller may resume them ([`super::resume_source`]) once it knows
/// the destination does not run them. An explicit FAILED from the receiver after COMMIT means
/// it reset its devices: the source then returns to RUNNING.
///
/// The sender's states, in order: the hello is accepted (no device touched yet), the data
/// connections are open (one writer thread each), pre-copy, stop-copy and the end markers, the
/// receiver has loaded everything, COMMIT, RESUMED.
pub fn send<'a>(
    url: &MigrationUrl,
    devices: Vec<Box<dyn MigrationDevice + 'a>>,
    opts: &SendOptions,
    progress: &mut dyn FnMut(&LiveProgress),
) -> Result<MigrationReport, TransportError> {
    let began = Instant::now();
    let hello = Hello::new(devices, opts)?;
    let accepted = hello.offer(url, opts)?;
    let mut run = accepted.open_data(url, opts)?;
    match run.transfer(opts, progress) {
        Ok((report, down)) => run.hand_over(report, down, began),
        Err(e) => Err(run.fail(e)),
    }
}

/// Checked options, the stream header and the source, before anything is connected.
struct Hello<'a> {
    src: Source<'a>,
    /// Preamble and stream header, as sent on the control connection.
    bytes: Vec<u8>,
    session: u64,
    connections: usize,
}

impl<'a> Hello<'a> {
    /// Check the options and the devices (a refused configuration never reaches the receiver).
    fn new(devices: Vec<Box<dyn MigrationDevice + 'a>>, opts: &SendOptions) -> Result<Self, TransportError> {
        let n_conns = opts.connections;
        if n_conns == 0 || n_conns > wire::MAX_CONNECTIONS {
            return Err(TransportError::Options(format!(
                "{n_conns} connections; 1 to {} allowed",
                wire::MAX_CONNECTIONS
            )));
        }
        if opts.idle_timeout <= KEEPALIVE * 2 {
            return Err(TransportError::Options(format!(
                "idle timeout {:?} must be above {:?}",
                opts.idle_timeout,
                KEEPALIVE * 2
            )));
        }
        let mut entries = Vec::with_capacity(devices.len());
        for d in &devices {
            entries.push(DeviceEntry {
                identity: d.identity(),
                flags: d.flags().map_err(LiveError::from)?,
            });
        }
        let session = session_id();
        let mut bytes = Preamble {
            role: wire::ROLE_CONTROL,
            index: 0,
            connections: n_conns as u16,
            session,
        }
        .encode()
        .to_vec();
        StreamWriter::new(&mut bytes, Header::new(entries)).map_err(|e| TransportError::Options(e.to_string()))?;
        let src = Source::new(devices, opts.source.clone())?;
        Ok(Self {
            src,
            bytes,
            session,
            connections: n_conns,
        })
    }

    /// Connect, send the hello and read the answer: ACCEPT, or REFUSE with the reason. No device
    /// is touched yet.
    fn offer(self, url: &MigrationUrl, opts: &SendOptions) -> Result<Accepted<'a>, TransportError> {
        let peer = url.to_string();
        let mut ctrl = conn::connect(url, opts.tls.as_ref(), opts.connect_timeout, opts.idle_timeout)?;
        ctrl.write_all(&self.bytes)
            .and_then(|()| ctrl.flush())
            .map_err(|e| TransportError::io(&peer, "send the hello", e))?;
        let answer = read_answer(&mut ctrl, &peer, opts.idle_timeout)?;
        match answer.kind {
            wire::MSG_ACCEPT => Ok(Accepted {
                hello: self,
                ctrl,
                peer,
            }),
            wire::MSG_REFUSE => Err(TransportError::Refused {
                peer,
                reason: control::reason(&answer),
            }),
            k => Err(TransportError::protocol(
                &peer,
                format!("expected ACCEPT or REFUSE, got {}", wire::kind_name(k)),
            )),
        }
    }
}

/// The receiver accepted the hello.
struct Accepted<'a> {
    hello: Hello<'a>,
    ctrl: Conn,
    peer: String,
}

impl<'a> Accepted<'a> {
    /// Open the data connections (each with its preamble and writer thread), all at once (their
    /// handshakes overlap: on a link with a long round trip, N connections take as long to open
    /// as one), and hand the control connection to its thread.
    fn open_data(self, url: &MigrationUrl, opts: &SendOptions) -> Result<Run<'a>, TransportError> {
        let Hello {
            src,
            session,
            connections,
            ..
        } = self.hello;
        let open = |i: usize| {
            let mut c = conn::connect(url, opts.tls.as_ref(), opts.connect_timeout, opts.idle_timeout)?;
            c.peer = format!("{url} (data connection {i})");
            let p = Preamble {
                role: wire::ROLE_DATA,
                index: i as u16,
                connections: connections as u16,
                session,
            };
            c.write_all(&p.encode())
                .map_err(|e| TransportError::io(&c.peer, "send the preamble", e))?;
            Ok(c)
        };
        let data = if connections == 1 {
            vec![open(0)?]
        } else {
            std::thread::scope(|s| {
                let opening: Vec<_> = (0..connections)
                    .map(|i| {
                        std::thread::Builder::new()
                            .name("vfio-mig-connect".into())
                            .spawn_scoped(s, move || open(i))
                    })
                    .collect();
                // Every one joined before the first error is returned.
                let opened: Vec<Result<Conn, TransportError>> = opening
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let failed = |e: io::Error| {
                            TransportError::io(format!("{url} (data connection {i})"), "open the connection", e)
                        };
                        match t {
                            Ok(t) => t
                                .join()
                                .unwrap_or_else(|_| Err(failed(io::Error::other("the opening thread panicked")))),
                            Err(e) => Err(failed(e)),
                        }
                    })
                    .collect();
                opened.into_iter().collect::<Result<Vec<_>, TransportError>>()
            })?
        };
        let writers = Writers::start(data, src.len(), opts.idle_timeout)?;
        let (in_tx, rx) = mpsc::channel::<Result<Record, TransportError>>();
        // The receiver failed: shut the data connections at once, so that a write blocked on
        // a connection it no longer reads fails now (the migration thread then finds the
        // receiver's reason) instead of after the idle timeout.
        let shutters = writers.shutters();
        let link = ControlLink::spawn(self.ctrl, opts.idle_timeout, move |m| {
            if matches!(&m, Ok(rec) if rec.kind == wire::MSG_FAILED) {
                for s in &shutters {
                    s.shutdown();
                }
            }
            in_tx.send(m).is_ok()
        })?;
        Ok(Run {
            counters: vec![0; src.len()],
            src,
            link,
            rx,
            peer: self.peer,
            idle: opts.idle_timeout,
            acked_markers: None,
            writers,
        })
    }
}

/// A migration under way: the source, the control link and the data connections' writers.
struct Run<'a> {
    src: Source<'a>,
    link: ControlLink,
    rx: mpsc::Receiver<Result<Record, TransportError>>,
    peer: String,
    idle: Duration,
    /// The initial-data markers the receiver's latest SWITCHOVER_ACK covers (None: no ack yet).
    acked_markers: Option<u64>,
    /// The data connections.
    writers: Writers,
    /// Per device: the next chunk's sequence number.
    counters: Vec<u64>,
}

impl<'a> PrecopyPeer<'a> for Run<'a> {
    type Error = TransportError;

    fn source(&mut self) -> &mut Source<'a> {
        &mut self.src
    }

    fn poll(&mut self) -> Result<(), TransportError> {
        self.poll_control()?;
        self.writers.check()
    }

    fn step(&mut self, budget: u64) -> Result<u64, TransportError> {
        let w = &mut self.writers;
        let mut sink = SeqSink::new(&mut self.counters, |ev: SinkEvent<'_>| forward(ev, w, &mut |_| {}));
        let r = self.src.iterate(&mut sink, budget);
        r.map_err(|e| self.explain(e))
    }

    fn acked(&mut self) -> bool {
        ack_covers(self.acked_markers, self.src.initial_markers_total())
    }
}

impl Run<'_> {
    /// Pre-copy, stop-copy, check values and end markers; returns the report so far and when
    /// the downtime began.
    fn transfer(
        &mut self,
        opts: &SendOptions,
        progress: &mut dyn FnMut(&LiveProgress),
    ) -> Result<(MigrationReport, Instant), TransportError> {
        let mut report = MigrationReport {
            devices: self.src.names(),
            ..MigrationReport::default()
        };
        self.src.start()?;
        precopy_loop::run(self, &opts.convergence, &mut report, progress)?;
        let down = Instant::now();
        report.stop_copy_bytes = self.stop_copy(progress)?;
        if let Some(check) = &opts.check {
            for i in 0..self.src.len() {
                if let Some(value) = check(i) {
                    self.writers
                        .record_on(0, wire::KIND_CHECK, i as u32, 0, &value.to_le_bytes())
                        .map_err(|e| TransportError::io(&self.peer, "send a check value", e))?;
                }
            }
        }
        self.writers.finish()?;
        Ok((report, down))
    }

    /// Stop-copy into the writers; returns the bytes per device.
    fn stop_copy(&mut self, progress: &mut dyn FnMut(&LiveProgress)) -> Result<Vec<u64>, TransportError> {
        let mut total = 0u64;
        let mut on_chunk = |n: usize| {
            total += n as u64;
            progress(&LiveProgress::StopCopy { bytes: total });
        };
        let w = &mut self.writers;
        let mut sink = SeqSink::new(&mut self.counters, |ev: SinkEvent<'_>| forward(ev, w, &mut on_chunk));
        let r = self.src.stop_copy(&mut sink as &mut dyn ChunkSink);
        r.map(|s| s.bytes).map_err(|e| self.explain(e))
    }

    /// The receiver has everything: wait until it loaded and validated it, stop the source
    /// devices (STOP_COPY -> STOP), then tell it to resume (COMMIT) and wait until it runs.
    /// Until COMMIT is handed to a live link, any failure returns the source to RUNNING.
    fn hand_over(
        mut self,
        mut report: MigrationReport,
        down: Instant,
        began: Instant,
    ) -> Result<MigrationReport, TransportError> {
        if let Err(e) = self.until_loaded() {
            return Err(self.fail(e));
        }
        if !self.link.send(wire::MSG_COMMIT, commit_payload(&report)) {
            // The link was already down: COMMIT never left this process.
            let e = TransportError::Closed {
                peer: self.peer.clone(),
                when: "before COMMIT could be sent",
            };
            return Err(self.fail(e));
        }
        // The commit point: from here on the destination may run the devices.
        self.confirm()?;
        report.downtime = down.elapsed();
        report.total = began.elapsed();
        Ok(report)
    }

    /// LOADED from the receiver, then the source devices STOP.
    fn until_loaded(&mut self) -> Result<(), TransportError> {
        self.wait_for(wire::MSG_LOADED, "waiting for the receiver to load the devices")?;
        self.src.finish()?;
        self.poll_control()
    }

    /// After COMMIT: RESUMED, or the outcome the source may not decide alone.
    fn confirm(mut self) -> Result<(), TransportError> {
        match self.wait_for(wire::MSG_RESUMED, "waiting for the receiver to resume the devices") {
            Ok(()) => {
                self.link.close();
                Ok(())
            }
            // The receiver says it failed: it reset its devices, so the source may run again.
            Err(e @ TransportError::PeerFailed { .. }) => Err(self.fail(e)),
            Err(e) => {
                let Run { link, src, peer, .. } = self;
                link.close();
                Err(TransportError::Unconfirmed {
                    peer,
                    reason: e.to_string(),
                    devices: src.names(),
                })
            }
        }
    }

    /// Take the receiver's messages that arrived so far.
    fn poll_control(&mut self) -> Result<(), TransportError> {
        loop {
            match self.rx.try_recv() {
                Ok(Ok(rec)) => self.on_message(&rec)?,
                Ok(Err(e)) => return Err(e),
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(TransportError::Closed {
                        peer: self.peer.clone(),
                        when: "during the migration",
                    });
                }
            }
        }
    }

    fn on_message(&mut self, rec: &Record) -> Result<(), TransportError> {
        match rec.kind {
            wire::MSG_SWITCHOVER_ACK => {
                let markers = ack_markers(&rec.payload).map_err(|why| TransportError::protocol(&self.peer, why))?;
                self.acked_markers = Some(self.acked_markers.map_or(markers, |m| m.max(markers)));
                Ok(())
            }
            wire::MSG_FAILED => Err(TransportError::PeerFailed {
                peer: self.peer.clone(),
                reason: control::reason(rec),
            }),
            k => Err(TransportError::protocol(
                &self.peer,
                format!("unexpected {} from the receiver", wire::kind_name(k)),
            )),
        }
    }

    /// Wait for message `kind` (acks and keepalives aside).
    fn wait_for(&mut self, kind: u16, what: &'static str) -> Result<(), TransportError> {
        loop {
            match self.rx.recv_timeout(self.idle + Duration::from_secs(1)) {
                Ok(Ok(rec)) if rec.kind == kind => return Ok(()),
                Ok(Ok(rec)) => self.on_message(&rec)?,
                Ok(Err(e)) => return Err(e),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(TransportError::Timeout {
                        peer: self.peer.clone(),
                        what,
                        secs: self.idle.as_secs_f64(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(TransportError::Closed {
                        peer: self.peer.clone(),
                        when: what,
                    });
                }
            }
        }
    }

    /// A sink error is usually the receiver going away: prefer its own explanation when it sent one.
    fn explain(&mut self, e: LiveError) -> TransportError {
        let is_sink = match &e {
            LiveError::Sink(_) => true,
            LiveError::Aborted { cause, .. } => matches!(**cause, LiveError::Sink(_)),
            _ => false,
        };
        if is_sink {
            let deadline = Instant::now() + Duration::from_millis(300);
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match self.rx.recv_timeout(left) {
                    Ok(Ok(rec)) if rec.kind == wire::MSG_FAILED => {
                        let recoveries = match e {
                            LiveError::Aborted { recoveries, .. } => recoveries,
                            _ => self.src.abort(),
                        };
                        return TransportError::Aborted {
                            cause: Box::new(TransportError::PeerFailed {
                                peer: self.peer.clone(),
                                reason: control::reason(&rec),
                            }),
                            side: "source",
                            recoveries,
                        };
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        }
        e.into()
    }

    /// Abort: the data connections shut, devices back to RUNNING, the receiver told why.
    fn fail(mut self, e: TransportError) -> TransportError {
        self.writers.abort();
        let recoveries = self.src.abort();
        self.link.send(wire::MSG_FAILED, wire::reason_payload(&e.to_string()));
        self.link.close();
        if matches!(
            e,
            TransportError::Aborted { .. } | TransportError::Live(LiveError::Aborted { .. })
        ) && recoveries.is_empty()
        {
            return e;
        }
        TransportError::Aborted {
            cause: Box::new(e),
            side: "source",
            recoveries,
        }
    }
}

/// COMMIT's payload: pre-copy iterations and the downtime estimate in µs (all ones: unknown).
fn commit_payload(report: &MigrationReport) -> Vec<u8> {
    let mut commit = Vec::with_capacity(16);
    commit.extend_from_slice(&(report.iterations() as u64).to_le_bytes());
    let est = report
        .est_downtime
        .map_or(u64::MAX, |d| d.as_micros().min(u64::MAX as u128 - 1) as u64);
    commit.extend_from_slice(&est.to_le_bytes());
    commit
}

/// Put one sink event on a data connection.
fn forward(ev: SinkEvent<'_>, w: &mut Writers, on_chunk: &mut dyn FnMut(usize)) -> io::Result<()> {
    match ev {
        SinkEvent::Chunk {
            device,
            seq,
            phase,
            data,
        } => {
            on_chunk(data.len());
            let kind = match phase {
                Phase::PreCopy => wire::KIND_PRE_COPY,
                Phase::StopCopy => wire::KIND_STOP_COPY,
            };
            w.record(kind, device as u32, seq, data)
        }
        SinkEvent::InitialSent { device, chunks } => w.record(wire::KIND_INITIAL_SENT, device as u32, chunks, &[]),
    }
}

/// Read the receiver's answer to the hello (the only message read before the control thread).
fn read_answer(c: &mut Conn, peer: &str, idle: Duration) -> Result<Record, TransportError> {
    match wire::read_record(c, Vec::new(), wire::MAX_REASON_LEN + 64) {
        Ok(r) => Ok(r),
        Err(wire::ReadError::Eof) => Err(TransportError::Closed {
            peer: peer.into(),
            when: "before answering the hello",
        }),
        Err(wire::ReadError::Io(e)) if conn::is_timeout(&e) => Err(TransportError::Timeout {
            peer: peer.into(),
            what: "waiting for the answer to the hello",
            secs: idle.as_secs_f64(),
        }),
        Err(wire::ReadError::Io(e)) => Err(TransportError::io(peer, "read the answer to the hello", e)),
        Err(wire::ReadError::Bad(why)) => Err(TransportError::protocol(peer, why)),
    }
}

/// A session identifier that differs between migrations (not a secret: TLS authenticates).
fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// The initial-data markers a SWITCHOVER_ACK payload covers: the receiver's marker total when it
/// acknowledged (8 bytes), or every marker for an empty payload (older receivers), as before.
fn ack_markers(payload: &[u8]) -> Result<u64, String> {
    match <[u8; 8]>::try_from(payload) {
        Ok(b) => Ok(u64::from_le_bytes(b)),
        Err(_) if payload.is_empty() => Ok(u64::MAX),
        Err(_) => Err(format!("a SWITCHOVER_ACK of {} bytes (expected 0 or 8)", payload.len())),
    }
}

/// Whether the latest acknowledgement (`acked`: the markers it covers) covers the `sent` markers.
fn ack_covers(acked: Option<u64>, sent: u64) -> bool {
    acked.is_some_and(|m| m >= sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_counts_only_for_the_markers_it_covers() {
        assert_eq!(ack_markers(&2u64.to_le_bytes()), Ok(2));
        assert_eq!(ack_markers(&[]), Ok(u64::MAX), "older receivers ack everything");
        assert!(ack_markers(&[1, 2, 3]).unwrap_err().contains("3 bytes"));
        assert!(!ack_covers(None, 0), "no ack yet");
        assert!(
            ack_covers(Some(0), 0),
            "no pre-copy device: the first ack covers nothing to cover"
        );
        assert!(ack_covers(Some(1), 1));
        // A re-init sent a second marker: the ack of the first one no longer counts.
        assert!(!ack_covers(Some(1), 2));
        assert!(ack_covers(Some(2), 2));
        assert!(ack_covers(Some(u64::MAX), 2));
    }
}
