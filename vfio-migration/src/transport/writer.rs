//! The sender's data connections: one writer thread per connection, fed by a bounded queue, so
//! that the framing, the checksums and the TLS encryption of several connections run in
//! parallel while the migration thread reads the devices.
//!
//! Each writer counts what it wrote per device (for its end marker), flushes whenever its
//! queue runs empty and sends a keepalive after [`KEEPALIVE`] without traffic. A writer that
//! fails keeps its error for the migration thread, which learns it at its next record (or from
//! [`Writers::check`]).

use std::io::{self, BufWriter, Write};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::TransportError;
use super::conn::{self, Conn, Sock};
use super::control::KEEPALIVE;
use super::pool::BufPool;
use super::wire::{self, Framed};

/// Records queued per connection, at most (each at most one chunk).
const QUEUE: usize = 2;

enum Job {
    Record(Framed),
    End,
}

/// One data connection and its writer thread.
struct Writer {
    tx: Option<SyncSender<Job>>,
    /// A message once the end marker is written (closed without one when the writer failed).
    ended: mpsc::Receiver<()>,
    thread: Option<JoinHandle<Result<(), ()>>>,
    handle: Sock,
    peer: String,
    /// The writer's error, once it failed (taken by [`Writers::check`]).
    failed: Arc<Mutex<Failure>>,
}

/// A writer's failure.
#[derive(Default)]
struct Failure {
    failed: bool,
    error: Option<TransportError>,
}

impl Writer {
    fn failure_state(&self) -> std::sync::MutexGuard<'_, Failure> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the writer stopped, for the migration thread's sink.
    fn failure(&self) -> io::Error {
        match &self.failure_state().error {
            Some(e) => io::Error::other(e.to_string()),
            None => io::Error::other(format!("{}: the connection's writer stopped", self.peer)),
        }
    }

    /// Stop at once: close the queue, wake a blocked write, wait for the thread.
    fn stop(&mut self) {
        self.tx = None;
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The data connections of one migration, each with its writer thread.
pub(crate) struct Writers {
    conns: Vec<Writer>,
    /// Per connection: payload bytes given to it so far.
    given: Vec<u64>,
    pool: Arc<BufPool>,
}

impl std::fmt::Debug for Writers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writers")
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Writers {
    /// Hand each connection to a writer thread; `devices` sizes the end markers, `idle` is the
    /// write timeout (for errors).
    pub(crate) fn start(conns: Vec<Conn>, devices: usize, idle: Duration) -> Result<Self, TransportError> {
        let pool = Arc::new(BufPool::new(conns.len() * (QUEUE + 2)));
        let mut out = Self {
            conns: Vec::with_capacity(conns.len()),
            given: Vec::new(),
            pool,
        };
        for c in conns {
            let peer = c.peer.clone();
            let handle = c.handle().map_err(|e| TransportError::io(&peer, "clone socket", e))?;
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            let (ended_tx, ended) = mpsc::sync_channel(1);
            let failed = Arc::new(Mutex::new(Failure::default()));
            let run = WriteLoop {
                w: BufWriter::with_capacity(256 << 10, c),
                totals: vec![(0, 0); devices],
                pool: out.pool.clone(),
                peer: peer.clone(),
                idle,
            };
            let f = failed.clone();
            let thread = std::thread::Builder::new()
                .name("vfio-mig-writer".into())
                .spawn(move || {
                    let r = run.run(&rx, ended_tx);
                    if let Err(e) = r {
                        let mut g = f.lock().unwrap_or_else(|e| e.into_inner());
                        g.failed = true;
                        g.error = Some(e);
                        return Err(());
                    }
                    Ok(())
                })
                .map_err(|e| TransportError::io(&peer, "spawn the connection's writer", e))?;
            out.given.push(0);
            out.conns.push(Writer {
                tx: Some(tx),
                ended,
                thread: Some(thread),
                handle,
                peer,
                failed,
            });
        }
        Ok(out)
    }

    /// Queue one record on the connection that was given the fewest bytes so far among those
    /// with room in their queue (so connections of equal speed end together), or wait for the
    /// one given the fewest when every queue is full.
    pub(crate) fn record(&mut self, kind: u16, device: u32, sequence: u64, data: &[u8]) -> io::Result<()> {
        let mut job = Job::Record(Framed::copy(kind, device, sequence, data, self.pool.take())?);
        let len = data.len() as u64;
        let mut order: Vec<usize> = (0..self.conns.len()).collect();
        order.sort_by_key(|&i| self.given[i]);
        for &i in &order {
            let w = &self.conns[i];
            let Some(tx) = &w.tx else { return Err(w.failure()) };
            match tx.try_send(job) {
                Ok(()) => {
                    self.given[i] += len;
                    return Ok(());
                }
                Err(TrySendError::Full(j)) => job = j,
                Err(TrySendError::Disconnected(_)) => return Err(w.failure()),
            }
        }
        self.send_on(order[0], job)?;
        self.given[order[0]] += len;
        Ok(())
    }

    /// Queue one record on connection `i`.
    pub(crate) fn record_on(&mut self, i: usize, kind: u16, device: u32, sequence: u64, data: &[u8]) -> io::Result<()> {
        let job = Job::Record(Framed::copy(kind, device, sequence, data, self.pool.take())?);
        self.send_on(i, job)
    }

    fn send_on(&self, i: usize, job: Job) -> io::Result<()> {
        let w = &self.conns[i];
        match &w.tx {
            Some(tx) if tx.send(job).is_ok() => Ok(()),
            _ => Err(w.failure()),
        }
    }

    /// The first writer's error, if one failed.
    pub(crate) fn check(&self) -> Result<(), TransportError> {
        for w in &self.conns {
            let mut g = w.failure_state();
            if g.failed {
                return Err(g.error.take().unwrap_or_else(|| {
                    TransportError::io(&w.peer, "write", io::Error::other("the connection's writer failed"))
                }));
            }
        }
        Ok(())
    }

    /// End every connection with its end marker and wait until every writer wrote it; the
    /// first error. The connections stay open (the receiver reads to their end) until the
    /// writers are dropped.
    pub(crate) fn finish(&mut self) -> Result<(), TransportError> {
        for w in &self.conns {
            if let Some(tx) = &w.tx {
                let _ = tx.send(Job::End);
            }
        }
        for w in &mut self.conns {
            if w.ended.recv().is_err() {
                // Failed (its error is kept) or panicked.
                let mut g = w.failure_state();
                if !g.failed {
                    g.failed = true;
                    g.error = Some(TransportError::io(
                        &w.peer,
                        "write",
                        io::Error::other("the connection's writer stopped before the end marker"),
                    ));
                }
            }
        }
        self.check()
    }

    /// Stop every writer at once (the migration failed): the connections are shut down.
    pub(crate) fn abort(&mut self) {
        for w in &mut self.conns {
            w.stop();
        }
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        for w in &mut self.conns {
            w.stop();
        }
    }
}

/// A writer thread's state.
struct WriteLoop {
    w: BufWriter<Conn>,
    /// Per device: chunk records and payload bytes written on this connection.
    totals: Vec<(u64, u64)>,
    pool: Arc<BufPool>,
    peer: String,
    idle: Duration,
}

impl WriteLoop {
    /// Write what the queue brings until the end marker (or until the queue closes: an abort),
    /// tell `ended`, and keep the connection open until the queue closes.
    fn run(mut self, rx: &mpsc::Receiver<Job>, ended: SyncSender<()>) -> Result<(), TransportError> {
        let mut last = Instant::now();
        loop {
            let job = match rx.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Disconnected) => return Ok(()),
                Err(TryRecvError::Empty) => {
                    // Everything queued is written: the receiver gets it now.
                    self.w.flush().map_err(|e| self.error(e))?;
                    match rx.recv_timeout(KEEPALIVE / 2) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Disconnected) => return Ok(()),
                        Err(RecvTimeoutError::Timeout) => {
                            if last.elapsed() >= KEEPALIVE {
                                self.write(wire::KIND_KEEPALIVE, wire::NO_DEVICE, 0, &[])?;
                                last = Instant::now();
                            }
                            continue;
                        }
                    }
                }
            };
            match job {
                Job::Record(rec) => {
                    rec.write(&mut self.w).map_err(|e| self.error(e))?;
                    let kind = rec.kind();
                    if (kind == wire::KIND_PRE_COPY || kind == wire::KIND_STOP_COPY)
                        && let Some(t) = self.totals.get_mut(rec.device() as usize)
                    {
                        t.0 += 1;
                        t.1 += rec.payload.len() as u64;
                    }
                    self.pool.give(rec.payload);
                    last = Instant::now();
                }
                Job::End => {
                    let payload = wire::encode_end(&self.totals);
                    self.write(wire::KIND_END, wire::NO_DEVICE, 0, &payload)?;
                    self.w.flush().map_err(|e| self.error(e))?;
                    let _ = ended.send(());
                    // Closing now could reset the connection under data the receiver has not
                    // read yet (TLS sends it session tickets the sender never reads).
                    while rx.recv().is_ok() {}
                    return Ok(());
                }
            }
        }
    }

    fn write(&mut self, kind: u16, device: u32, sequence: u64, payload: &[u8]) -> Result<(), TransportError> {
        wire::write_record(&mut self.w, kind, device, sequence, payload).map_err(|e| self.error(e))
    }

    fn error(&self, e: io::Error) -> TransportError {
        if conn::is_timeout(&e) {
            TransportError::Timeout {
                peer: self.peer.clone(),
                what: "writing (the receiver stopped reading)",
                secs: self.idle.as_secs_f64(),
            }
        } else {
            TransportError::io(&self.peer, "write", e)
        }
    }
}
