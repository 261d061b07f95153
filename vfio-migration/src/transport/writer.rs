//! The sender's data connections: one writer thread per connection, fed by a bounded queue, so
//! that the framing, the checksums and the TLS encryption of several connections run in
//! parallel while the migration thread reads the devices.
//!
//! On a plain (non-TLS) connection whose queue is empty and whose writer is not writing, the
//! migration thread writes the record itself, straight from the device's buffer (no copy, no
//! thread woken). With several connections the sockets are non-blocking: while one is full,
//! the migration thread waits for it only when no other connection would take data now
//! (waiting then costs nothing: every connection is busy); otherwise it copies the rest of the
//! record for the connection's writer, which waits for the socket, and goes on to feed the
//! others, so a connection that cannot keep up (a rate cap, a slow peer) never holds up the
//! others. A lone connection has no other to feed: its socket stays blocking (bounded by the
//! write timeout), and the kernel waits for room inside the write, as a plain copy does,
//! instead of the migration thread polling it. On a busy connection,
//! and on every TLS connection (whose encryption runs on its writer), a record is copied
//! (checksummed as it is copied) into a recycled buffer and queued.
//!
//! A writer takes everything queued at each wake-up, and is woken only when it sleeps. Each
//! connection counts what it carried per device (for its end marker); a writer flushes
//! whenever its queue runs empty and sends a keepalive after [`KEEPALIVE`] without traffic. A
//! connection that fails keeps its error for the migration thread, which learns it at its next
//! record (or from [`Writers::check`]).

use std::collections::VecDeque;
use std::io::{self, BufWriter, IoSlice, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::TransportError;
use super::conn::{self, Conn, Sock};
use super::control::KEEPALIVE;
use super::pool::BufPool;
use super::wait::Waiter;
use super::wire::{self, Framed};

/// Records queued or being written per connection, at most (each at most one chunk; two: one
/// is written while the next waits).
const QUEUE: usize = 2;
/// How often the migration thread, waiting for a full socket, looks whether another
/// connection would take data.
const OTHERS: Duration = Duration::from_millis(1);
/// How long the migration thread keeps writing a record on a connection that filled up before it
/// hands the rest to the connection's writer to feed another: a connection that is only
/// momentarily full (its peer drains it at memory speed, as on an uncapped link) takes the rest
/// within this, without a copy of it and a writer woken; a connection that cannot keep up does
/// not, and then costs the others at most this per record.
const SPILL_AFTER: Duration = Duration::from_millis(1);

enum Job {
    /// A framed record.
    Record(Framed),
    /// The rest of a record the migration thread began to write itself (framed bytes).
    Rest(Vec<u8>),
    /// The end marker.
    End,
}

/// One connection's queue and its writer's state, under the [`Hub`]'s lock.
#[derive(Default)]
struct Lane {
    jobs: VecDeque<Job>,
    /// Records queued or being written (the end marker aside).
    inflight: usize,
    /// The writer sleeps until a job comes (queuing one must wake it).
    asleep: bool,
    /// The end marker is written.
    ended: bool,
    /// The connection failed (its error, until taken, in `error`).
    failed: bool,
    error: Option<TransportError>,
    /// The writer is to stop (the migration ended or failed).
    closed: bool,
    /// The writer thread returned (or panicked).
    gone: bool,
}

struct Lanes {
    lanes: Vec<Lane>,
    /// The migration thread sleeps until a queue has room or every end marker is written.
    waiting: bool,
}

/// What the migration thread and the writers share.
struct Hub {
    state: Mutex<Lanes>,
    /// Per connection: wakes its writer.
    work: Vec<Condvar>,
    /// Wakes the migration thread.
    room: Condvar,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Lanes> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake the migration thread if it waits (a queue has room, an end marker left, a writer
    /// stopped).
    fn wake_producer(&self, st: &mut Lanes) {
        if st.waiting {
            st.waiting = false;
            self.room.notify_one();
        }
    }

    /// Queue `job` on connection `i`, waking its writer if it sleeps.
    fn push(&self, i: usize, job: Job) {
        let mut st = self.lock();
        let lane = &mut st.lanes[i];
        if !matches!(job, Job::End) {
            lane.inflight += 1;
        }
        lane.jobs.push_back(job);
        if lane.asleep {
            lane.asleep = false;
            self.work[i].notify_one();
        }
    }
}

/// The writing end of a connection, used by its writer and (for a direct write) by the
/// migration thread; whoever holds it writes.
struct Out {
    w: BufWriter<Patient>,
    /// Per device: chunk records and payload bytes written on this connection.
    totals: Vec<(u64, u64)>,
    /// When something was last written.
    last: Instant,
}

impl Out {
    /// Count a record written (or queued behind its beginning).
    fn count(&mut self, kind: u16, device: u32, len: usize) {
        if (kind == wire::KIND_PRE_COPY || kind == wire::KIND_STOP_COPY)
            && let Some(t) = self.totals.get_mut(device as usize)
        {
            t.0 += 1;
            t.1 += len as u64;
        }
    }

    /// Write as much of `header` then `payload`, from byte `from` of the two, as the
    /// non-blocking socket takes now, without waiting; returns the bytes of the two written
    /// (from their start). Only when nothing is buffered.
    fn write_now(&mut self, header: &[u8], payload: &[u8], from: usize) -> io::Result<usize> {
        let conn = &mut self.w.get_mut().conn;
        let mut bufs = [
            IoSlice::new(header.get(from..).unwrap_or_default()),
            IoSlice::new(&payload[from.saturating_sub(header.len())..]),
        ];
        let mut bufs = &mut bufs[..];
        // Drops empty slices (a header written whole, an empty payload).
        IoSlice::advance_slices(&mut bufs, 0);
        let mut written = from;
        while !bufs.is_empty() {
            match conn.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    written += n;
                    IoSlice::advance_slices(&mut bufs, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// Whether the connection would take a record now: nothing queued or being written on it,
    /// and its (non-blocking) socket writable.
    fn takes_more(&self, queued: bool) -> bool {
        !queued && self.w.buffer().is_empty() && self.w.get_ref().ready.as_ref().is_some_and(Waiter::ready_now)
    }
}

/// A connection whose writes wait: on a non-blocking socket (plain connections) a write that
/// would block waits until the socket takes more, at most the idle timeout per write.
struct Patient {
    conn: Conn,
    /// Waits until the non-blocking socket is writable (None: a blocking socket).
    ready: Option<Waiter>,
    idle: Duration,
}

impl Patient {
    fn retry(&mut self, mut f: impl FnMut(&mut Conn) -> io::Result<usize>) -> io::Result<usize> {
        let Some(ready) = &self.ready else {
            return f(&mut self.conn);
        };
        let deadline = Instant::now() + self.idle;
        loop {
            match f(&mut self.conn) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "the socket took nothing"));
                    }
                    ready.wait(left);
                }
                r => return r,
            }
        }
    }
}

impl Write for Patient {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(|c| c.write(buf))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.retry(|c| c.write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

/// One data connection: its writing end and its writer thread.
struct Writer {
    out: Arc<Mutex<Out>>,
    /// The migration thread may write on it itself (a plain, non-blocking socket).
    direct: bool,
    thread: Option<JoinHandle<()>>,
    handle: Sock,
    peer: String,
}

/// The data connections of one migration, each with its writer thread.
pub(crate) struct Writers {
    conns: Vec<Writer>,
    hub: Arc<Hub>,
    /// Per connection: payload bytes given to it so far.
    given: Vec<u64>,
    pool: Arc<BufPool>,
    /// The write timeout (for errors).
    idle: Duration,
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
        let n = conns.len();
        let hub = Arc::new(Hub {
            state: Mutex::new(Lanes {
                lanes: (0..n).map(|_| Lane::default()).collect(),
                waiting: false,
            }),
            work: (0..n).map(|_| Condvar::new()).collect(),
            room: Condvar::new(),
        });
        let mut out = Self {
            conns: Vec::with_capacity(n),
            given: vec![0; n],
            hub,
            pool: Arc::new(BufPool::new(n * QUEUE + 1)),
            idle,
        };
        for (i, c) in conns.into_iter().enumerate() {
            let peer = c.peer.clone();
            let handle = c.handle().map_err(|e| TransportError::io(&peer, "clone socket", e))?;
            // Non-blocking only where another connection may take data meanwhile.
            let ready = if c.is_tls() || n == 1 {
                None
            } else {
                nonblocking(&c, &handle)
            };
            let direct = !c.is_tls() && (n == 1 || ready.is_some());
            let w = Arc::new(Mutex::new(Out {
                w: BufWriter::with_capacity(256 << 10, Patient { conn: c, ready, idle }),
                totals: vec![(0, 0); devices],
                last: Instant::now(),
            }));
            let run = WriteLoop {
                i,
                hub: out.hub.clone(),
                out: w.clone(),
                pool: out.pool.clone(),
                peer: peer.clone(),
                idle,
            };
            let thread = std::thread::Builder::new()
                .name("vfio-mig-writer".into())
                .spawn(move || run.run())
                .map_err(|e| TransportError::io(&peer, "spawn the connection's writer", e))?;
            out.conns.push(Writer {
                out: w,
                direct,
                thread: Some(thread),
                handle,
                peer,
            });
        }
        Ok(out)
    }

    /// Put one record on the connection that was given the fewest bytes so far among those
    /// that take it at once (so connections of equal speed end together, and a slow one never
    /// holds up the others), the device's own (its index modulo the connections) among equals
    /// (so that a device's chunks arrive in order, and the receiver holds none back, when the
    /// connections keep up); waiting while none takes it. A connection the migration thread
    /// writes on itself takes a record only when idle (a copy otherwise: better wait, every
    /// connection is busy then), and then the device's own goes first whatever it was given: an
    /// idle connection is one that keeps up. A writer's queue (TLS) takes a record while it has
    /// room.
    pub(crate) fn record(&mut self, kind: u16, device: u32, sequence: u64, data: &[u8]) -> io::Result<()> {
        let i = {
            let mut st = self.hub.lock();
            loop {
                self.failure(&st)?;
                let own = device as usize % st.lanes.len();
                let takes = |i: usize| st.lanes[i].inflight < if self.conns[i].direct { 1 } else { QUEUE };
                let choice = if self.conns[own].direct && takes(own) {
                    Some(own)
                } else {
                    (0..st.lanes.len())
                        .filter(|&i| takes(i))
                        .min_by_key(|&i| (self.given[i], i != own))
                };
                if let Some(i) = choice {
                    break i;
                }
                st = self.wait(st);
            }
        };
        self.put(i, kind, device, sequence, data)
    }

    /// Put one record on connection `i` (waiting for room in its queue).
    pub(crate) fn record_on(&mut self, i: usize, kind: u16, device: u32, sequence: u64, data: &[u8]) -> io::Result<()> {
        {
            let mut st = self.hub.lock();
            loop {
                self.failure(&st)?;
                if st.lanes[i].inflight < QUEUE {
                    break;
                }
                st = self.wait(st);
            }
        }
        self.put(i, kind, device, sequence, data)
    }

    /// Sleep until a writer says something changed.
    fn wait<'a>(&self, mut st: MutexGuard<'a, Lanes>) -> MutexGuard<'a, Lanes> {
        st.waiting = true;
        let (mut st, _) = self
            .hub
            .room
            .wait_timeout(st, KEEPALIVE)
            .unwrap_or_else(|e| e.into_inner());
        st.waiting = false;
        st
    }

    /// The error to give the migration thread when a connection failed.
    fn failure(&self, st: &Lanes) -> io::Result<()> {
        for (lane, w) in st.lanes.iter().zip(&self.conns) {
            if lane.failed || lane.gone || lane.closed {
                return Err(match &lane.error {
                    Some(e) => io::Error::other(e.to_string()),
                    None => io::Error::other(format!("{}: the connection's writer stopped", w.peer)),
                });
            }
        }
        Ok(())
    }

    /// Write the record on connection `i` now when it is idle, else queue a copy for its
    /// writer. The queue has room.
    fn put(&mut self, i: usize, kind: u16, device: u32, sequence: u64, data: &[u8]) -> io::Result<()> {
        let header = wire::header(kind, device, sequence, data)?;
        self.given[i] += data.len() as u64;
        if self.conns[i].direct {
            let out = try_lock(&self.conns[i].out);
            // Holding the writing end with nothing queued: everything queued before is written.
            let idle = out
                .filter(|o| o.w.buffer().is_empty())
                .filter(|_| self.hub.lock().lanes[i].inflight == 0);
            if let Some(mut out) = idle {
                out.count(kind, device, data.len());
                let r = self.write_direct(i, &mut out, &header, data);
                out.last = Instant::now();
                return r;
            }
        }
        let rec = Framed::copy(kind, device, sequence, data, self.pool.take())?;
        self.hub.push(i, Job::Record(rec));
        Ok(())
    }

    /// Write a record on idle connection `i` from the caller's buffer. While its socket is
    /// full, wait for it, unless it stayed full for [`SPILL_AFTER`] and another connection would
    /// take data now: then copy the rest for connection `i`'s writer (queued before the writing
    /// end is released, so it goes first) and return to feed the others. A copy costs CPU time;
    /// waiting costs nothing when every connection is full anyway.
    fn write_direct(&self, i: usize, out: &mut Out, header: &[u8], data: &[u8]) -> io::Result<()> {
        let total = header.len() + data.len();
        let mut written = 0;
        let mut progress = Instant::now();
        // The socket's write timeout was shortened (restored to the idle timeout when done).
        let mut shortened = false;
        // When the socket first took only part of the record.
        let mut full_since: Option<Instant> = None;
        loop {
            let now = match out.write_now(header, data, written) {
                Ok(n) => n,
                Err(e) => return Err(self.fail(i, e)),
            };
            if now == total {
                if shortened {
                    let _ = self.conns[i].handle.set_write_timeout(Some(self.idle));
                }
                return Ok(());
            }
            if now > written {
                written = now;
                progress = Instant::now();
            }
            let full_for = full_since.get_or_insert_with(Instant::now).elapsed();
            if full_for >= SPILL_AFTER && self.another_takes_more(i) {
                let mut rest = self.pool.take();
                rest.clear();
                rest.extend_from_slice(header.get(written..).unwrap_or_default());
                rest.extend_from_slice(&data[written.saturating_sub(header.len())..]);
                self.hub.push(i, Job::Rest(rest));
                return Ok(());
            }
            let left = self.idle.saturating_sub(progress.elapsed());
            if left.is_zero() {
                let e = io::Error::new(io::ErrorKind::TimedOut, "the socket took nothing");
                return Err(self.fail(i, e));
            }
            match &out.w.get_ref().ready {
                // Until the socket takes more, looking at the others now and then (first
                // once the record has been waiting for SPILL_AFTER).
                Some(ready) => {
                    let patience = SPILL_AFTER.saturating_sub(full_for);
                    ready.wait(if patience.is_zero() {
                        OTHERS
                    } else {
                        patience.min(OTHERS)
                    });
                }
                // A blocking socket's write returned early (its timeout, a signal): the next
                // one waits only what is left of the idle timeout since the last progress.
                None => {
                    let _ = self.conns[i]
                        .handle
                        .set_write_timeout(Some(left.max(Duration::from_millis(1))));
                    shortened = true;
                }
            }
        }
    }

    /// Whether a connection other than `i` would take a record now.
    fn another_takes_more(&self, i: usize) -> bool {
        (0..self.conns.len()).filter(|&j| j != i).any(|j| {
            let queued = self.hub.lock().lanes[j].inflight > 0;
            !queued && try_lock(&self.conns[j].out).is_some_and(|o| o.takes_more(queued))
        })
    }

    /// Connection `i` failed under the migration thread's own write: kept as its error.
    fn fail(&self, i: usize, e: io::Error) -> io::Error {
        let err = write_error(&self.conns[i].peer, self.idle, e);
        let msg = err.to_string();
        let mut st = self.hub.lock();
        let lane = &mut st.lanes[i];
        if !lane.failed {
            lane.failed = true;
            lane.error = Some(err);
        }
        io::Error::other(msg)
    }

    /// Handles on the data connections' sockets, to shut them from another thread.
    pub(crate) fn shutters(&self) -> Vec<Sock> {
        self.conns.iter().filter_map(|w| w.handle.try_clone().ok()).collect()
    }

    /// The first writer's error, if one failed.
    pub(crate) fn check(&self) -> Result<(), TransportError> {
        let mut st = self.hub.lock();
        for (lane, w) in st.lanes.iter_mut().zip(&self.conns) {
            if lane.failed || (lane.gone && !lane.ended) {
                lane.failed = true;
                return Err(lane.error.take().unwrap_or_else(|| {
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
        for i in 0..self.conns.len() {
            self.hub.push(i, Job::End);
        }
        let mut st = self.hub.lock();
        while !st.lanes.iter().all(|l| l.ended || l.failed || l.gone) {
            st.waiting = true;
            st = self.hub.room.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        for (lane, w) in st.lanes.iter_mut().zip(&self.conns) {
            if !lane.ended && !lane.failed {
                // Panicked.
                lane.failed = true;
                lane.error = Some(TransportError::io(
                    &w.peer,
                    "write",
                    io::Error::other("the connection's writer stopped before the end marker"),
                ));
            }
        }
        drop(st);
        self.check()
    }

    /// Stop every writer at once (the migration failed): the connections are shut down.
    pub(crate) fn abort(&mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        {
            let mut st = self.hub.lock();
            for (i, lane) in st.lanes.iter_mut().enumerate() {
                lane.closed = true;
                self.hub.work[i].notify_one();
            }
        }
        for w in &mut self.conns {
            w.handle.shutdown();
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The mutex's guard unless another thread holds it.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Put a plain connection's socket in non-blocking mode for direct writes, with a waiter for
/// its writer; None (it stays blocking, written by its writer only) when that fails.
fn nonblocking(c: &Conn, handle: &Sock) -> Option<Waiter> {
    let ready = Waiter::writable(c.raw_fd()).ok()?;
    handle.set_nonblocking(true).ok()?;
    Some(ready)
}

fn write_error(peer: &str, idle: Duration, e: io::Error) -> TransportError {
    if conn::is_timeout(&e) {
        TransportError::Timeout {
            peer: peer.to_string(),
            what: "writing (the receiver stopped reading)",
            secs: idle.as_secs_f64(),
        }
    } else {
        TransportError::io(peer, "write", e)
    }
}

/// A writer thread's state.
struct WriteLoop {
    i: usize,
    hub: Arc<Hub>,
    out: Arc<Mutex<Out>>,
    pool: Arc<BufPool>,
    peer: String,
    idle: Duration,
}

/// Marks the writer gone when its thread returns or panics.
struct Gone<'a>(&'a Hub, usize);

impl Drop for Gone<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.lanes[self.1].gone = true;
        self.0.wake_producer(&mut st);
    }
}

impl WriteLoop {
    fn run(self) {
        let _gone = Gone(&self.hub, self.i);
        if let Err(e) = self.serve() {
            let mut st = self.hub.lock();
            let lane = &mut st.lanes[self.i];
            if !lane.failed {
                lane.failed = true;
                lane.error = Some(e);
            }
            self.hub.wake_producer(&mut st);
        }
    }

    fn lock_out(&self) -> MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write what the queue brings until the end marker (or until the connection is closed:
    /// an abort), then keep the connection open until it is closed.
    fn serve(&self) -> Result<(), TransportError> {
        let mut batch = VecDeque::new();
        loop {
            if !self.wait_for_jobs()? {
                return Ok(());
            }
            let mut out = self.lock_out();
            loop {
                {
                    let mut st = self.hub.lock();
                    if st.lanes[self.i].failed {
                        return Ok(());
                    }
                    std::mem::swap(&mut st.lanes[self.i].jobs, &mut batch);
                }
                if batch.is_empty() {
                    break;
                }
                while let Some(job) = batch.pop_front() {
                    let record = !matches!(job, Job::End);
                    if !self.write(&mut out, job)? {
                        drop(out);
                        self.linger();
                        return Ok(());
                    }
                    if record {
                        // Room for the next (the migration thread may wait for it).
                        let mut st = self.hub.lock();
                        st.lanes[self.i].inflight -= 1;
                        self.hub.wake_producer(&mut st);
                    }
                }
            }
            // Everything queued is written: the receiver gets it now (and a direct write finds
            // nothing buffered).
            out.w.flush().map_err(|e| self.error(e))?;
            out.last = Instant::now();
        }
    }

    /// Sleep until jobs are queued, sending keepalives meanwhile; false when closed.
    fn wait_for_jobs(&self) -> Result<bool, TransportError> {
        let mut st = self.hub.lock();
        loop {
            let lane = &mut st.lanes[self.i];
            if lane.closed || lane.failed {
                return Ok(false);
            }
            if !lane.jobs.is_empty() {
                return Ok(true);
            }
            lane.asleep = true;
            let (g, t) = self.hub.work[self.i]
                .wait_timeout(st, KEEPALIVE / 2)
                .unwrap_or_else(|e| e.into_inner());
            st = g;
            st.lanes[self.i].asleep = false;
            if t.timed_out() && st.lanes[self.i].jobs.is_empty() {
                drop(st);
                self.keepalive()?;
                st = self.hub.lock();
            }
        }
    }

    /// A keepalive, when nothing was written for [`KEEPALIVE`] (and nobody writes now).
    fn keepalive(&self) -> Result<(), TransportError> {
        let Some(mut out) = try_lock(&self.out) else {
            return Ok(());
        };
        // Not in the middle of a record whose rest is queued.
        if out.last.elapsed() < KEEPALIVE || !self.hub.lock().lanes[self.i].jobs.is_empty() {
            return Ok(());
        }
        wire::write_record(&mut out.w, wire::KIND_KEEPALIVE, wire::NO_DEVICE, 0, &[])
            .and_then(|()| out.w.flush())
            .map_err(|e| self.error(e))?;
        out.last = Instant::now();
        Ok(())
    }

    /// Write one job; false once the end marker is written.
    fn write(&self, out: &mut Out, job: Job) -> Result<bool, TransportError> {
        match job {
            Job::Record(rec) => {
                rec.write(&mut out.w).map_err(|e| self.error(e))?;
                out.count(rec.kind(), rec.device(), rec.payload.len());
                self.pool.give(rec.payload);
            }
            Job::Rest(rest) => {
                out.w.write_all(&rest).map_err(|e| self.error(e))?;
                self.pool.give(rest);
            }
            Job::End => {
                let payload = wire::encode_end(&out.totals);
                wire::write_record(&mut out.w, wire::KIND_END, wire::NO_DEVICE, 0, &payload)
                    .and_then(|()| out.w.flush())
                    .map_err(|e| self.error(e))?;
                let mut st = self.hub.lock();
                st.lanes[self.i].ended = true;
                self.hub.wake_producer(&mut st);
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// After the end marker: keep the connection open until the migration closes it (closing
    /// now could reset the connection under data the receiver has not read yet; TLS sends it
    /// session tickets the sender never reads).
    fn linger(&self) {
        let mut st = self.hub.lock();
        while !st.lanes[self.i].closed {
            st = self.hub.work[self.i].wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn error(&self, e: io::Error) -> TransportError {
        write_error(&self.peer, self.idle, e)
    }
}
