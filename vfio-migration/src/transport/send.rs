//! The sending side: runs [`Source`] and puts its chunks on the wire.

use std::io::{self, BufWriter, Write};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rustls::ClientConfig;

use super::conn::{self, Conn, Sock};
use super::control::{self, ControlLink, KEEPALIVE};
use super::wire::{self, Preamble, Record};
use super::{MigrationUrl, TransportError};
use crate::device::MigrationDevice;
use crate::live::{
    ChunkSink, Convergence, LiveError, LiveProgress, MigrationReport, Phase, Precopy, SeqSink, SinkEvent, Source,
    SourceOptions, SwitchReason,
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
pub fn send<'a>(
    url: &MigrationUrl,
    devices: Vec<Box<dyn MigrationDevice + 'a>>,
    opts: &SendOptions,
    progress: &mut dyn FnMut(&LiveProgress),
) -> Result<MigrationReport, TransportError> {
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
    let began = Instant::now();
    let mut entries = Vec::with_capacity(devices.len());
    for d in &devices {
        entries.push(DeviceEntry {
            identity: d.identity(),
            flags: d.flags().map_err(LiveError::from)?,
        });
    }
    let header = Header::new(entries);
    let mut hello = Vec::new();
    let session = session_id();
    hello.extend_from_slice(
        &Preamble {
            role: wire::ROLE_CONTROL,
            index: 0,
            connections: n_conns as u16,
            session,
        }
        .encode(),
    );
    StreamWriter::new(&mut hello, header.clone()).map_err(|e| TransportError::Options(e.to_string()))?;
    // Checked before connecting, so a refused configuration never reaches the receiver.
    let n_dev = devices.len();
    let src = Source::new(devices, opts.source.clone())?;

    // Hello: preamble + stream header; the answer is ACCEPT or REFUSE. No device touched yet.
    let peer = url.to_string();
    let mut ctrl = conn::connect(url, opts.tls.as_ref(), opts.connect_timeout, opts.idle_timeout)?;
    ctrl.write_all(&hello)
        .and_then(|()| ctrl.flush())
        .map_err(|e| TransportError::io(&peer, "send the hello", e))?;
    let answer = read_answer(&mut ctrl, &peer, opts.idle_timeout)?;
    match answer.kind {
        wire::MSG_ACCEPT => {}
        wire::MSG_REFUSE => {
            return Err(TransportError::Refused {
                peer,
                reason: control::reason(&answer),
            });
        }
        k => {
            return Err(TransportError::protocol(
                &peer,
                format!("expected ACCEPT or REFUSE, got {}", wire::kind_name(k)),
            ));
        }
    }
    let mut data = Vec::with_capacity(n_conns);
    for i in 0..n_conns {
        let mut c = conn::connect(url, opts.tls.as_ref(), opts.connect_timeout, opts.idle_timeout)?;
        c.peer = format!("{url} (data connection {i})");
        let p = Preamble {
            role: wire::ROLE_DATA,
            index: i as u16,
            connections: n_conns as u16,
            session,
        };
        c.write_all(&p.encode())
            .map_err(|e| TransportError::io(&c.peer, "send the preamble", e))?;
        data.push(c);
    }
    let (in_tx, in_rx) = mpsc::channel::<Result<Record, TransportError>>();
    let link = ControlLink::spawn(ctrl, opts.idle_timeout, move |m| in_tx.send(m).is_ok())?;

    let mut run = Run {
        src,
        link,
        rx: in_rx,
        peer,
        idle: opts.idle_timeout,
        acked_markers: None,
    };
    let writers = data
        .into_iter()
        .map(|c| DataConn::new(c, n_dev))
        .collect::<Result<Vec<_>, _>>()?;
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let result = std::thread::scope(|s| {
        // Keepalives on data connections that stayed quiet (pre-copy may have nothing to send).
        let ws = &writers;
        s.spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(KEEPALIVE / 2) {
                for w in ws {
                    w.keepalive();
                }
            }
        });
        let r = run.migrate(opts, &writers, progress).and_then(|r| {
            for w in &writers {
                w.end()?;
            }
            Ok(r)
        });
        drop(stop_tx);
        if r.is_err() {
            for w in &writers {
                w.handle.shutdown();
            }
        }
        r
    });
    let (mut report, down) = match result {
        Ok(r) => r,
        Err(e) => return Err(run.fail(e)),
    };
    // Two-phase end: the receiver has everything; wait until it loaded and validated it, stop
    // the source devices (STOP_COPY -> STOP), then tell the receiver to resume, and wait until
    // it runs. Until COMMIT is handed to a live link, any failure returns the source to RUNNING.
    if let Err(e) = run.wait_for(wire::MSG_LOADED, "waiting for the receiver to load the devices") {
        return Err(run.fail(e));
    }
    if let Err(e) = run.src.finish() {
        return Err(run.fail(e.into()));
    }
    if let Err(e) = run.poll_control() {
        return Err(run.fail(e));
    }
    let mut commit = Vec::with_capacity(16);
    commit.extend_from_slice(&(report.iterations() as u64).to_le_bytes());
    let est = report
        .est_downtime
        .map_or(u64::MAX, |d| d.as_micros().min(u64::MAX as u128 - 1) as u64);
    commit.extend_from_slice(&est.to_le_bytes());
    if !run.link.send(wire::MSG_COMMIT, commit) {
        // The link was already down: COMMIT never left this process.
        let e = TransportError::Closed {
            peer: run.peer.clone(),
            when: "before COMMIT could be sent",
        };
        return Err(run.fail(e));
    }
    // The commit point: from here on the destination may run the devices.
    match run.wait_for(wire::MSG_RESUMED, "waiting for the receiver to resume the devices") {
        Ok(()) => {}
        // The receiver says it failed: it reset its devices, so the source may run again.
        Err(e @ TransportError::PeerFailed { .. }) => return Err(run.fail(e)),
        Err(e) => {
            let Run { link, src, peer, .. } = run;
            link.close();
            return Err(TransportError::Unconfirmed {
                peer,
                reason: e.to_string(),
                devices: src.names(),
            });
        }
    }
    let Run { link, .. } = run;
    link.close();
    report.downtime = down.elapsed();
    report.total = began.elapsed();
    Ok(report)
}

struct Run<'a> {
    src: Source<'a>,
    link: ControlLink,
    rx: mpsc::Receiver<Result<Record, TransportError>>,
    peer: String,
    idle: Duration,
    /// The initial-data markers the receiver's latest SWITCHOVER_ACK covers (None: no ack yet).
    acked_markers: Option<u64>,
}

impl Run<'_> {
    /// Pre-copy and stop-copy into the writers; returns the report so far and when the
    /// downtime began.
    fn migrate(
        &mut self,
        opts: &SendOptions,
        writers: &[DataConn],
        progress: &mut dyn FnMut(&LiveProgress),
    ) -> Result<(MigrationReport, Instant), TransportError> {
        let mut report = MigrationReport {
            devices: self.src.names(),
            ..MigrationReport::default()
        };
        self.src.start()?;
        let mut counters = vec![0u64; self.src.len()];
        let mut rr = 0usize;
        let conv = &opts.convergence;
        let mut precopy = Precopy::new();
        let reason = loop {
            self.poll_control()?;
            if !self.src.precopy_active() {
                break SwitchReason::NoPrecopy;
            }
            let t = Instant::now();
            let moved = {
                let mut sink = SeqSink::new(&mut counters, |ev: SinkEvent<'_>| {
                    forward(ev, writers, &mut rr, &mut |_| {})
                });
                self.src.iterate(&mut sink, conv.iteration_budget)
            };
            let moved = moved.and_then(|m| {
                for w in writers {
                    w.flush().map_err(LiveError::Sink)?;
                }
                Ok(m)
            });
            let moved = moved.map_err(|e| self.explain(e))?;
            precopy.moved(moved, t.elapsed());
            let pending = self.src.pending()?;
            let estimate = precopy.estimate(pending.stop_copy);
            report.est_downtime = estimate;
            progress(&LiveProgress::Iteration {
                n: self.src.passes() + 1,
                bytes: moved,
                pending: pending.total(),
                est_downtime: estimate,
            });
            self.poll_control()?;
            let drained = self.src.initial_drained();
            if let Some(r) = precopy.decide(conv, self.src.passes(), estimate, drained, self.acked()) {
                // A last look for new initial data (PRE_COPY info v2) before a switchover on
                // convergence: a re-init withdraws the acknowledgement until the receiver
                // acknowledges the marker sent after the new initial data.
                if matches!(r, SwitchReason::Converged | SwitchReason::ConvergedWithoutAck)
                    && self.src.check_reinit()?
                {
                    continue;
                }
                break r;
            }
            if moved == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        report.switch_reason = reason.name();
        report.initial_markers = self.src.initial_markers();
        report.iteration_bytes = self.src.pass_bytes().to_vec();
        report.precopy_bytes = self.src.precopy_bytes();
        let down = Instant::now();
        let mut total = 0u64;
        let stop = {
            let mut on_chunk = |n: usize| {
                total += n as u64;
                progress(&LiveProgress::StopCopy { bytes: total });
            };
            let mut sink = SeqSink::new(&mut counters, |ev: SinkEvent<'_>| {
                forward(ev, writers, &mut rr, &mut on_chunk)
            });
            self.src.stop_copy(&mut sink as &mut dyn ChunkSink)
        };
        let stop = stop.map_err(|e| self.explain(e))?;
        report.stop_copy_bytes = stop.bytes;
        if let Some(check) = &opts.check {
            for i in 0..self.src.len() {
                if let Some(value) = check(i) {
                    writers[0].record(wire::KIND_CHECK, i as u32, 0, &value.to_le_bytes())?;
                }
            }
        }
        Ok((report, down))
    }

    /// Whether the receiver acknowledged every initial-data marker sent so far (a re-init sends
    /// one more, which withdraws the acknowledgement until the receiver covers it).
    fn acked(&self) -> bool {
        ack_covers(self.acked_markers, self.src.initial_markers_total())
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

    /// Abort: devices back to RUNNING, the receiver told why.
    fn fail(&mut self, e: TransportError) -> TransportError {
        let recoveries = self.src.abort();
        self.link.send(wire::MSG_FAILED, wire::reason_payload(&e.to_string()));
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

/// Put one sink event on a data connection, round-robin over the connections.
fn forward(ev: SinkEvent<'_>, writers: &[DataConn], rr: &mut usize, on_chunk: &mut dyn FnMut(usize)) -> io::Result<()> {
    let w = &writers[*rr % writers.len()];
    *rr = rr.wrapping_add(1);
    let r = match ev {
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
    };
    r.map_err(|e| io::Error::other(e.to_string()))
}

/// A data connection, written by the migration thread and, when it stays quiet, by the
/// keepalive thread.
struct DataConn {
    inner: Mutex<DataInner>,
    handle: Sock,
    peer: String,
}

struct DataInner {
    w: BufWriter<Conn>,
    /// Per device: chunk records and payload bytes written on this connection.
    totals: Vec<(u64, u64)>,
    last: Instant,
    failed: Option<String>,
}

impl DataConn {
    fn new(c: Conn, devices: usize) -> Result<Self, TransportError> {
        let peer = c.peer.clone();
        let handle = c.handle().map_err(|e| TransportError::io(&peer, "clone socket", e))?;
        Ok(Self {
            inner: Mutex::new(DataInner {
                w: BufWriter::with_capacity(256 << 10, c),
                totals: vec![(0, 0); devices],
                last: Instant::now(),
                failed: None,
            }),
            handle,
            peer,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DataInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, g: &mut DataInner, e: io::Error) -> TransportError {
        let t = if conn::is_timeout(&e) {
            TransportError::Timeout {
                peer: self.peer.clone(),
                what: "writing (the receiver stopped reading)",
                secs: 0.0,
            }
        } else {
            TransportError::io(&self.peer, "write", e)
        };
        g.failed = Some(t.to_string());
        t
    }

    fn check(&self, g: &DataInner) -> Result<(), TransportError> {
        match &g.failed {
            Some(why) => Err(TransportError::io(&self.peer, "write", io::Error::other(why.clone()))),
            None => Ok(()),
        }
    }

    /// Write one record.
    fn record(&self, kind: u16, device: u32, seq: u64, payload: &[u8]) -> Result<(), TransportError> {
        let mut g = self.lock();
        self.check(&g)?;
        if let Err(e) = wire::write_record(&mut g.w, kind, device, seq, payload) {
            return Err(self.err(&mut g, e));
        }
        if (kind == wire::KIND_PRE_COPY || kind == wire::KIND_STOP_COPY)
            && let Some(t) = g.totals.get_mut(device as usize)
        {
            t.0 += 1;
            t.1 += payload.len() as u64;
        }
        g.last = Instant::now();
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut g = self.lock();
        self.check(&g).map_err(|e| io::Error::other(e.to_string()))?;
        if let Err(e) = g.w.flush() {
            let t = self.err(&mut g, e);
            return Err(io::Error::other(t.to_string()));
        }
        Ok(())
    }

    /// A keepalive when nothing was written for a while (skipped while the migration writes).
    fn keepalive(&self) {
        let Ok(mut g) = self.inner.try_lock() else { return };
        if g.failed.is_some() || g.last.elapsed() < KEEPALIVE {
            return;
        }
        let r = wire::write_record(&mut g.w, wire::KIND_KEEPALIVE, wire::NO_DEVICE, 0, &[]).and_then(|()| g.w.flush());
        match r {
            Ok(()) => g.last = Instant::now(),
            Err(e) => {
                let _ = self.err(&mut g, e);
            }
        }
    }

    /// The end marker with this connection's totals.
    fn end(&self) -> Result<(), TransportError> {
        let mut g = self.lock();
        self.check(&g)?;
        let payload = wire::encode_end(&g.totals);
        let r = wire::write_record(&mut g.w, wire::KIND_END, wire::NO_DEVICE, 0, &payload).and_then(|()| g.w.flush());
        r.map_err(|e| self.err(&mut g, e))
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
