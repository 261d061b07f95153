//! The receiver's data path: one reader per data connection, one loader per destination
//! device, and between them one reorder window per device. No lock covers more than one
//! device.
//!
//! ```text
//!  data connection 0 ──reader──┐            ┌── window 0 ──queue── loader 0 ── device 0
//!  data connection 1 ──reader──┼─(device)──>┼── window 1 ──queue── loader 1 ── device 1
//!  ...                         ┘            └── ...
//! ```
//!
//! A reader checks each record against its connection ([`Tally`]) and offers each chunk to its
//! device's [`Window`], which passes chunks on to the device's loader in sequence order and
//! holds those that arrive early, up to the reorder limit
//! ([`crate::live::DestinationOptions::max_reorder_bytes`]). When a chunk arrives early and
//! the window is full, its reader waits (and stops reading its connection: backpressure) until
//! the window moves. That never deadlocks a correct sender: the chunk sent first among those
//! not yet taken is the next one of its device, it is at the front of its connection, and a
//! device's next chunk is always taken. A sender that never sends a missing chunk is caught:
//! when every connection still open waits on a full window with nothing moving, the migration
//! fails.
//!
//! A lone device is the exception to the hand-off: a reader that has the device's next chunk
//! while the device's loader is idle loads it itself, as long as it keeps up with its
//! connection (after a chunk, the next bytes are not there yet, most of the time). The loader
//! would only add a thread wake-up and a trip of the chunk (and of the device's own buffers) to
//! another core there, while the reader waited for data. Once the data comes faster than one
//! thread reads and loads it (the next bytes are there, chunk after chunk), the reader hands off
//! again so that reading and loading overlap, if the host has a core for each: with two CPUs or
//! fewer (where the sender, the VMM or the guest also want one) it keeps loading. With several
//! devices it always hands off, which keeps a slow device from holding up the others.
//!
//! The same parts run sequentially, from memory, in the fuzz entry point ([`super::fuzz`]).

use std::collections::BTreeMap;
use std::io::BufReader;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, mpsc};
use std::time::{Duration, Instant};

use super::super::conn::{self, Conn, Sock};
use super::super::pool::BufPool;
use super::super::wait::Waiter;
use super::super::wire::{self, ReadError, Record};
use super::TransportError;
use crate::live::{LiveError, Loader};
use crate::state::MigrationFlags;
use crate::stream::{Header, MAX_CHUNK_LEN};

/// Chunks queued per destination device between its window and its loader.
pub(super) const LOAD_QUEUE: usize = 2;
/// How often a reader waiting on a full window looks whether the migration failed or stalled.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// How long every open connection may wait on a full window, with no window moving, before the
/// migration is declared stalled (a chunk every window waits for never comes).
const STALL: Duration = Duration::from_secs(1);

/// A record of a data connection, once its connection checked it.
#[derive(Debug)]
pub(super) enum Item {
    /// A chunk for `device`'s window.
    Chunk {
        /// The device index.
        device: usize,
        /// Its sequence number.
        seq: u64,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// The initial-data marker of `device`, after `chunks` chunks.
    Marker {
        /// The device index.
        device: usize,
        /// Chunks of the device's initial data.
        chunks: u64,
    },
    /// Nothing to pass on (a keepalive, a check value): the buffer back.
    Other(Vec<u8>),
    /// The connection's end marker matched what arrived on it.
    End(Vec<u8>),
}

/// What one data connection carried, checked against its end marker.
#[derive(Clone, Debug)]
pub(super) struct Tally {
    /// The connection, for errors.
    peer: String,
    /// Per device: chunk records and payload bytes that arrived.
    arrived: Vec<(u64, u64)>,
    /// Per device: pre-copy bytes.
    pub(super) precopy: Vec<u64>,
    /// Per device: stop-copy bytes.
    pub(super) stop_copy: Vec<u64>,
    /// Per device: the sender's check value, when it sent one here.
    pub(super) checks: Vec<Option<u64>>,
    /// Per device: the chunk records the end marker announced, once it arrived.
    pub(super) announced: Option<Vec<u64>>,
}

impl Tally {
    /// Nothing arrived yet on data connection `peer`, of a migration of `devices` devices.
    pub(super) fn new(peer: String, devices: usize) -> Self {
        Self {
            peer,
            arrived: vec![(0, 0); devices],
            precopy: vec![0; devices],
            stop_copy: vec![0; devices],
            checks: vec![None; devices],
            announced: None,
        }
    }

    /// Check one record of this connection (device index, kind, the device's flags in the
    /// stream `header`, the end marker's totals) and count it.
    pub(super) fn on_record(
        &mut self,
        rec: Record,
        header: &Header,
        stop_began: &OnceLock<Instant>,
    ) -> Result<Item, TransportError> {
        let n_dev = self.arrived.len();
        let dev = rec.device as usize;
        let need_dev = |what: &str| {
            if dev < n_dev {
                Ok(())
            } else {
                Err(TransportError::protocol(
                    &self.peer,
                    format!("{what} for device {dev}; the stream has {n_dev}"),
                ))
            }
        };
        match rec.kind {
            wire::KIND_KEEPALIVE => Ok(Item::Other(rec.payload)),
            wire::KIND_PRE_COPY | wire::KIND_STOP_COPY => {
                need_dev("a chunk")?;
                if rec.payload.is_empty() {
                    return Err(TransportError::protocol(
                        &self.peer,
                        format!("an empty chunk for device {dev} (sequence {})", rec.sequence),
                    ));
                }
                let len = rec.payload.len() as u64;
                if rec.kind == wire::KIND_PRE_COPY {
                    let flags = header.devices[dev].flags;
                    if !flags.contains(MigrationFlags::PRE_COPY) {
                        return Err(TransportError::protocol(
                            &self.peer,
                            format!("a pre-copy chunk for device {dev}, whose flags {flags} lack PRE_COPY"),
                        ));
                    }
                    self.precopy[dev] += len;
                } else {
                    stop_began.get_or_init(Instant::now);
                    self.stop_copy[dev] += len;
                }
                let t = &mut self.arrived[dev];
                t.0 += 1;
                t.1 += len;
                Ok(Item::Chunk {
                    device: dev,
                    seq: rec.sequence,
                    data: rec.payload,
                })
            }
            wire::KIND_INITIAL_SENT => {
                need_dev("an initial-data marker")?;
                Ok(Item::Marker {
                    device: dev,
                    chunks: rec.sequence,
                })
            }
            wire::KIND_CHECK => {
                need_dev("a check value")?;
                let v: [u8; 8] = rec.payload[..]
                    .try_into()
                    .map_err(|_| TransportError::protocol(&self.peer, "a check value that is not 8 bytes"))?;
                self.checks[dev] = Some(u64::from_le_bytes(v));
                Ok(Item::Other(rec.payload))
            }
            wire::KIND_END => {
                let totals =
                    wire::decode_end(&rec.payload, n_dev).map_err(|why| TransportError::protocol(&self.peer, why))?;
                for (d, (t, got)) in totals.iter().zip(&self.arrived).enumerate() {
                    if t != got {
                        return Err(TransportError::protocol(
                            &self.peer,
                            format!(
                                "device {d}: the end marker counts {} records / {} bytes, {} / {} arrived",
                                t.0, t.1, got.0, got.1
                            ),
                        ));
                    }
                }
                self.announced = Some(totals.iter().map(|t| t.0).collect());
                Ok(Item::End(rec.payload))
            }
            k => Err(TransportError::protocol(
                &self.peer,
                format!("unexpected {} on a data connection", wire::kind_name(k)),
            )),
        }
    }
}

/// A device's reorder window: passes chunks on in sequence order, holds those that arrive
/// early up to `max` bytes.
#[derive(Debug)]
pub(super) struct Window {
    next: u64,
    ahead: BTreeMap<u64, Vec<u8>>,
    ahead_bytes: u64,
    max: u64,
}

/// What [`Window::offer`] did with a chunk.
#[derive(Debug)]
pub(super) enum Offer {
    /// Taken. These chunks (none when it was held) are next in sequence order now: load them in
    /// this order.
    Taken(Vec<(u64, Vec<u8>)>),
    /// Not taken: it is not the next chunk and the window is full. Offer it again once the
    /// window moved.
    Full(Vec<u8>),
}

impl Window {
    /// An empty window holding at most `max` bytes of early chunks.
    pub(super) fn new(max: u64) -> Self {
        Self {
            next: 0,
            ahead: BTreeMap::new(),
            ahead_bytes: 0,
            max,
        }
    }

    /// Offer chunk `seq`. A chunk offered twice is an error (its reason).
    pub(super) fn offer(&mut self, seq: u64, data: Vec<u8>) -> Result<Offer, String> {
        if seq < self.next || self.ahead.contains_key(&seq) {
            return Err(format!("chunk {seq} arrived twice"));
        }
        if seq > self.next {
            let len = data.len() as u64;
            if self.ahead_bytes.saturating_add(len) > self.max {
                return Ok(Offer::Full(data));
            }
            self.ahead_bytes += len;
            self.ahead.insert(seq, data);
            return Ok(Offer::Taken(Vec::new()));
        }
        let mut ready = vec![(seq, data)];
        self.next += 1;
        while let Some(d) = self.ahead.remove(&self.next) {
            self.ahead_bytes -= d.len() as u64;
            ready.push((self.next, d));
            self.next += 1;
        }
        Ok(Offer::Taken(ready))
    }

    /// Why a chunk waiting on this full window can be refused as a stall.
    pub(super) fn stall_reason(&self, name: &str, seq: u64) -> String {
        format!(
            "{name}: chunk {seq} waits while chunk {} is missing and the reorder window is full ({} bytes held, \
             limit {}); no data connection still open delivers it",
            self.next, self.ahead_bytes, self.max
        )
    }

    /// The error when chunks are still missing at the end.
    pub(super) fn missing(&self, device: usize, name: &str) -> Option<LiveError> {
        (!self.ahead.is_empty()).then(|| LiveError::Sequence {
            device,
            reason: format!(
                "{name}: chunks missing: chunk {} never arrived, {} later ones held out of order",
                self.next,
                self.ahead.len()
            ),
        })
    }
}

/// What a device's window passes on to its loader.
#[derive(Debug)]
pub(super) enum Load {
    /// The next chunk in sequence order.
    Chunk(u64, Vec<u8>),
    /// An initial-data marker after this many chunks.
    Marker(u64),
}

/// One destination device's loading: what its window passes on, written to the device.
#[derive(Debug)]
pub(super) struct DeviceLoad<'l> {
    device: usize,
    loader: &'l mut Loader,
    /// Whether the device takes pre-copy data (its switchover-ack waits for its initial data).
    precopy: bool,
    /// The largest initial-data marker count so far.
    marker: Option<u64>,
}

impl<'l> DeviceLoad<'l> {
    /// Load into `loader`, device `device` with `flags`.
    pub(super) fn new(device: usize, loader: &'l mut Loader, flags: MigrationFlags) -> Self {
        Self {
            device,
            loader,
            precopy: flags.contains(MigrationFlags::PRE_COPY),
            marker: None,
        }
    }

    /// Write a chunk (in order) or take a marker; the chunk's buffer goes back to `pool`.
    ///
    /// Markers travel on any connection, so a later one (new initial data after a re-init,
    /// PRE_COPY info v2) can overtake an earlier one: a marker counting fewer chunks than one
    /// before it still counts as a marker, for no fewer chunks.
    pub(super) fn apply(&mut self, msg: Load, pool: &BufPool) -> Result<(), TransportError> {
        match msg {
            Load::Chunk(seq, data) => {
                let r = self.loader.load(seq, &data);
                pool.give(data);
                r.map_err(|e| with_device(e, self.device))?;
            }
            Load::Marker(chunks) => {
                let chunks = self.marker.map_or(chunks, |m| m.max(chunks));
                self.marker = Some(chunks);
                self.loader.initial_sent(chunks);
            }
        }
        Ok(())
    }

    /// Whether the device's initial data is loaded (always, for a device without pre-copy),
    /// and the initial-data markers it received.
    pub(super) fn status(&self) -> (bool, u64) {
        (
            !self.precopy || self.loader.initial_loaded(),
            self.loader.initial_markers(),
        )
    }
}

fn with_device(e: LiveError, device: usize) -> LiveError {
    match e {
        LiveError::Sequence { reason, .. } => LiveError::Sequence { device, reason },
        e => e,
    }
}

/// The switchover acknowledgement: due when every device's initial data is loaded, again
/// whenever new markers arrived since the last one.
#[derive(Debug)]
pub(super) struct Acks {
    state: Mutex<AckState>,
}

#[derive(Debug)]
struct AckState {
    ready: Vec<bool>,
    markers: Vec<u64>,
    /// The marker total the last acknowledgement covered.
    acked: Option<u64>,
    sent: u64,
}

impl Acks {
    /// Devices of these `flags`, nothing loaded yet.
    pub(super) fn new(flags: &[MigrationFlags]) -> Self {
        Self {
            state: Mutex::new(AckState {
                ready: flags.iter().map(|f| !f.contains(MigrationFlags::PRE_COPY)).collect(),
                markers: vec![0; flags.len()],
                acked: None,
                sent: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, AckState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Device `device` now stands at `status` ([`DeviceLoad::status`]): the marker total to
    /// acknowledge, when an acknowledgement is due (it is then counted as sent).
    pub(super) fn update(&self, device: usize, status: (bool, u64)) -> Option<u64> {
        let mut st = self.lock();
        if let Some(r) = st.ready.get_mut(device) {
            *r = status.0;
        }
        if let Some(m) = st.markers.get_mut(device) {
            *m = status.1;
        }
        let total: u64 = st.markers.iter().sum();
        if st.ready.iter().all(|r| *r) && st.acked != Some(total) {
            st.acked = Some(total);
            st.sent += 1;
            return Some(total);
        }
        None
    }

    /// Acknowledgements sent, and the marker total the last one covered.
    pub(super) fn report(&self) -> (u64, u64) {
        let st = self.lock();
        (st.sent, st.acked.unwrap_or(0))
    }
}

/// The data path of one migration, shared by its reader and loader threads.
pub(super) struct Flow<'h> {
    header: &'h Header,
    windows: Vec<DeviceWindow>,
    pub(super) pool: BufPool,
    pub(super) stop_began: OnceLock<Instant>,
    /// Payload bytes received, all connections.
    pub(super) received: AtomicU64,
    failed: AtomicBool,
    /// Readers still reading.
    active: AtomicUsize,
    /// Readers waiting on a full window.
    waiting: AtomicUsize,
    /// Counts every move of a window.
    moves: AtomicU64,
    /// The read timeout of the data connections (for errors).
    idle: Duration,
}

/// A device's window with its loader's queue, under one lock (so chunks enter the queue in
/// order), and the condition its waiting readers wait on.
struct DeviceWindow {
    name: String,
    state: Mutex<WindowState>,
    moved: Condvar,
    /// Chunks and markers given to the device's loader (or loaded by a reader) and not loaded
    /// yet: raised under the state's lock, lowered once loaded (without it). While the state is
    /// locked and this is 0, nothing is being loaded and nothing waits to be.
    queued: AtomicUsize,
}

struct WindowState {
    window: Window,
    /// The loader's queue (None once closed).
    out: Option<mpsc::SyncSender<Load>>,
}

impl<'h> Flow<'h> {
    /// The data path for devices `names` announced by `header`, read by `readers` connections,
    /// with reorder windows of `max_reorder` bytes and reads timing out after `idle`; returns it
    /// and each device's loader queue.
    pub(super) fn new(
        header: &'h Header,
        names: &[String],
        readers: usize,
        max_reorder: u64,
        idle: Duration,
    ) -> (Self, Vec<mpsc::Receiver<Load>>) {
        let mut windows = Vec::with_capacity(names.len());
        let mut queues = Vec::with_capacity(names.len());
        for name in names {
            let (tx, rx) = mpsc::sync_channel(LOAD_QUEUE);
            windows.push(DeviceWindow {
                name: name.clone(),
                state: Mutex::new(WindowState {
                    window: Window::new(max_reorder),
                    out: Some(tx),
                }),
                moved: Condvar::new(),
                queued: AtomicUsize::new(0),
            });
            queues.push(rx);
        }
        let flow = Self {
            header,
            windows,
            pool: BufPool::new(4 * readers + names.len() * (LOAD_QUEUE + 2)),
            stop_began: OnceLock::new(),
            received: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            active: AtomicUsize::new(readers),
            waiting: AtomicUsize::new(0),
            moves: AtomicU64::new(0),
            idle,
        };
        (flow, queues)
    }

    /// Read data connection `conn` to its end marker, passing its chunks and markers on;
    /// returns what it carried. With `inline` (a lone device), a chunk that is next while the
    /// device's loader is idle is loaded here while the reader keeps up with the connection
    /// (see the [module documentation](self)).
    pub(super) fn read(
        &self,
        conn: Conn,
        mut tally: Tally,
        inline: Option<Inline<'_, '_>>,
    ) -> Result<Tally, TransportError> {
        let _active = Active(&self.active);
        let peer = conn.peer.clone();
        // Whether bytes wait on the socket (beyond those a read took into the buffers), when
        // handing off when behind can pay (see the module documentation).
        let spare = std::thread::available_parallelism().is_ok_and(|n| n.get() > 2);
        let waiter = inline.filter(|_| spare).map(|_| Waiter::new(conn.raw_fd()).ok());
        let inline = inline.filter(|_| !matches!(waiter, Some(None)));
        let mut pace = Pace::default();
        // Small: a record header read pulls at most this much payload through the buffer; the
        // rest of a payload is read straight into its own buffer.
        let mut r = BufReader::with_capacity(16 << 10, conn);
        loop {
            let rec = wire::read_record(&mut r, self.pool.take(), MAX_CHUNK_LEN)
                .map_err(|e| read_error(&peer, e, self.idle))?;
            self.received.fetch_add(rec.payload.len() as u64, Ordering::Relaxed);
            match tally.on_record(rec, self.header, &self.stop_began)? {
                Item::Chunk { device, seq, data } => {
                    let mut keeps_up = || {
                        let Some(Some(w)) = &waiter else { return true };
                        let waiting = !r.buffer().is_empty() || r.get_mut().has_buffered() || w.ready_now();
                        pace.keeps_up(!waiting)
                    };
                    self.chunk(
                        device,
                        seq,
                        data,
                        inline.map(|i| (i, &mut keeps_up as &mut dyn FnMut() -> bool)),
                    )?;
                }
                Item::Marker { device, chunks } => self.pass(device, Load::Marker(chunks))?,
                Item::Other(buf) => self.pool.give(buf),
                Item::End(buf) => {
                    self.pool.give(buf);
                    return Ok(tally);
                }
            }
        }
    }

    /// Offer a chunk to its device's window, waiting while the window is full and the chunk
    /// is not the next one (backpressure on this connection). With `inline` (a lone device's
    /// loading, and whether the reader keeps up with its connection), what the chunk makes
    /// ready is loaded here when the loader is idle and the reader keeps up.
    fn chunk(
        &self,
        device: usize,
        seq: u64,
        data: Vec<u8>,
        mut inline: Option<(Inline<'_, '_>, &mut dyn FnMut() -> bool)>,
    ) -> Result<(), TransportError> {
        let w = &self.windows[device];
        let mut st = w.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut data = data;
        let mut wait: Option<Waiting<'_>> = None;
        loop {
            if self.failed.load(Ordering::Acquire) {
                return Err(self.cancelled());
            }
            let offer = st.window.offer(seq, data).map_err(|why| LiveError::Sequence {
                device,
                reason: format!("{}: {why}", w.name),
            })?;
            match offer {
                Offer::Taken(ready) => {
                    if ready.is_empty() {
                        return Ok(());
                    }
                    self.moves.fetch_add(1, Ordering::AcqRel);
                    w.moved.notify_all();
                    // Nothing queued or being loaded (the state is locked: nothing can be
                    // queued meanwhile), the reader keeps up: load here, in order, ahead of
                    // whatever is queued after (the loader waits for the device's loading).
                    if let Some((i, keeps_up)) = inline.as_mut()
                        && keeps_up()
                        && w.queued.load(Ordering::Acquire) == 0
                        && let Ok(mut loading) = i.loading.try_lock()
                    {
                        w.queued.fetch_add(ready.len(), Ordering::AcqRel);
                        drop(st);
                        let n = ready.len();
                        let r = ready
                            .into_iter()
                            .try_for_each(|(s, d)| loading.apply(Load::Chunk(s, d), &self.pool, i.acks, i.ack));
                        drop(loading);
                        w.queued.fetch_sub(n, Ordering::AcqRel);
                        return r;
                    }
                    for (s, d) in ready {
                        w.queued.fetch_add(1, Ordering::AcqRel);
                        send(&st.out, Load::Chunk(s, d), device, &w.name)?;
                    }
                    return Ok(());
                }
                Offer::Full(d) => {
                    data = d;
                    let waiting = wait.get_or_insert_with(|| Waiting::new(self));
                    st = w.moved.wait_timeout(st, WAIT_POLL).unwrap_or_else(|e| e.into_inner()).0;
                    if waiting.stalled(self) {
                        return Err(LiveError::Sequence {
                            device,
                            reason: st.window.stall_reason(&w.name, seq),
                        }
                        .into());
                    }
                }
            }
        }
    }

    /// Pass `msg` to `device`'s loader.
    fn pass(&self, device: usize, msg: Load) -> Result<(), TransportError> {
        let w = &self.windows[device];
        let st = w.state.lock().unwrap_or_else(|e| e.into_inner());
        w.queued.fetch_add(1, Ordering::AcqRel);
        send(&st.out, msg, device, &w.name)
    }

    fn cancelled(&self) -> TransportError {
        TransportError::Closed {
            peer: "data connection".into(),
            when: "after the migration failed",
        }
    }

    /// The migration failed: wake every waiting reader and close the loaders' queues.
    pub(super) fn fail(&self) {
        self.failed.store(true, Ordering::Release);
        self.close();
    }

    /// Close every loader's queue (the loaders end once they loaded what is queued).
    pub(super) fn close(&self) {
        for w in &self.windows {
            w.state.lock().unwrap_or_else(|e| e.into_inner()).out = None;
            w.moved.notify_all();
        }
    }

    /// The error for the first device whose window still holds chunks (some never arrived).
    pub(super) fn missing(&self) -> Option<LiveError> {
        self.windows.iter().enumerate().find_map(|(i, w)| {
            w.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .window
                .missing(i, &w.name)
        })
    }
}

/// Queue `msg` for device `device`'s loader.
fn send(out: &Option<mpsc::SyncSender<Load>>, msg: Load, device: usize, name: &str) -> Result<(), TransportError> {
    match out {
        Some(tx) if tx.send(msg).is_ok() => Ok(()),
        _ => Err(LiveError::Sequence {
            device,
            reason: format!("{name}: its loader stopped"),
        }
        .into()),
    }
}

/// Whether a reader keeps up with its connection: it does until the next bytes were already
/// there after [`Pace::SWITCH`] chunks in a row, and again once they were not after as many.
/// (A look now and then finds bytes there even when the reader keeps up: the sender wrote
/// meanwhile.)
#[derive(Debug, Default)]
struct Pace {
    behind: bool,
    /// Chunks in a row after which the reader looked the other way.
    streak: u32,
}

impl Pace {
    const SWITCH: u32 = 4;

    /// After a chunk, the next bytes were (not) there yet: whether the reader keeps up now.
    fn keeps_up(&mut self, nothing_there: bool) -> bool {
        if nothing_there == self.behind {
            self.streak += 1;
            if self.streak >= Self::SWITCH {
                self.behind = !self.behind;
                self.streak = 0;
            }
        } else {
            self.streak = 0;
        }
        !self.behind
    }
}

/// A reader counted as reading until dropped.
struct Active<'a>(&'a AtomicUsize);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A reader counted as waiting on a full window until dropped, watching for a stall.
struct Waiting<'a> {
    count: &'a AtomicUsize,
    moves: u64,
    since: Instant,
}

impl<'a> Waiting<'a> {
    fn new(flow: &'a Flow<'_>) -> Self {
        flow.waiting.fetch_add(1, Ordering::AcqRel);
        Self {
            count: &flow.waiting,
            moves: flow.moves.load(Ordering::Acquire),
            since: Instant::now(),
        }
    }

    /// Whether every reader still reading waits, and no window moved for [`STALL`].
    fn stalled(&mut self, flow: &Flow<'_>) -> bool {
        let moves = flow.moves.load(Ordering::Acquire);
        if moves != self.moves {
            self.moves = moves;
            self.since = Instant::now();
            return false;
        }
        flow.waiting.load(Ordering::Acquire) >= flow.active.load(Ordering::Acquire) && self.since.elapsed() >= STALL
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A record reader's error, as the transport names it (`idle`: the read timeout).
pub(super) fn read_error(peer: &str, e: ReadError, idle: Duration) -> TransportError {
    match e {
        ReadError::Eof => TransportError::Closed {
            peer: peer.into(),
            when: "before its end marker",
        },
        ReadError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => TransportError::Closed {
            peer: peer.into(),
            when: "in the middle of a record",
        },
        ReadError::Io(e) if conn::is_timeout(&e) => TransportError::Timeout {
            peer: peer.into(),
            what: "waiting for data",
            secs: idle.as_secs_f64(),
        },
        ReadError::Io(e) => TransportError::io(peer, "read", e),
        ReadError::Bad(why) => TransportError::protocol(peer, why),
    }
}

/// A device's loading and the switchover status it last reported, shared by its loader and (for
/// a lone device) the readers: see [`Flow::read`].
#[derive(Debug)]
pub(super) struct Loading<'l> {
    load: DeviceLoad<'l>,
    status: (bool, u64),
}

impl<'l> Loading<'l> {
    /// Start loading `load`, reporting its status to `acks` (and acknowledging through `ack`
    /// when due).
    pub(super) fn new(load: DeviceLoad<'l>, acks: &Acks, ack: &dyn Fn(u64)) -> Self {
        let status = load.status();
        if let Some(total) = acks.update(load.device, status) {
            ack(total);
        }
        Self { load, status }
    }

    /// Apply `msg`; acknowledge the switchover through `ack` when that makes one due.
    fn apply(&mut self, msg: Load, pool: &BufPool, acks: &Acks, ack: &dyn Fn(u64)) -> Result<(), TransportError> {
        self.load.apply(msg, pool)?;
        let now = self.load.status();
        if now != self.status {
            self.status = now;
            if let Some(total) = acks.update(self.load.device, now) {
                ack(total);
            }
        }
        Ok(())
    }
}

/// What a reader may load itself (a lone device's loading), with the switchover's
/// acknowledgement: see [`Flow::read`].
#[derive(Clone, Copy)]
pub(super) struct Inline<'a, 'l> {
    /// The device's loading.
    pub(super) loading: &'a Mutex<Loading<'l>>,
    /// The switchover status of the devices.
    pub(super) acks: &'a Acks,
    /// Sends an acknowledgement.
    pub(super) ack: &'a (dyn Fn(u64) + Sync),
}

/// Load what `queue` brings for device `device` of `flow` into `loading` until it closes.
pub(super) fn run_loader(
    loading: &Mutex<Loading<'_>>,
    queue: mpsc::Receiver<Load>,
    flow: &Flow<'_>,
    device: usize,
    acks: &Acks,
    ack: &dyn Fn(u64),
) -> Result<(), TransportError> {
    for msg in queue {
        let r = lock(loading).apply(msg, &flow.pool, acks, ack);
        flow.windows[device].queued.fetch_sub(1, Ordering::AcqRel);
        r?;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sockets to shut when the migration fails (wakes readers blocked on them).
pub(super) fn shut(handles: &[Sock]) {
    for h in handles {
        h.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_falls_behind_and_catches_up_only_after_a_streak() {
        let mut p = Pace::default();
        // Bytes there now and then: still keeping up.
        for there in [true, false, true, true, false, true, true, true, false] {
            assert!(p.keeps_up(!there));
        }
        // Chunk after chunk: behind from the fourth.
        assert!(p.keeps_up(false) && p.keeps_up(false) && p.keeps_up(false));
        assert!(!p.keeps_up(false));
        // Caught up again after as many chunks with nothing there, not before.
        assert!(!p.keeps_up(true) && !p.keeps_up(false));
        assert!(!p.keeps_up(true) && !p.keeps_up(true) && !p.keeps_up(true));
        assert!(p.keeps_up(true));
    }
}
