//! The control connection once the hello is done: one thread owns it (TLS cannot be split),
//! writes what the migration hands it, reads the peer's messages, sends keepalives when idle
//! and notices a silent peer.

use std::io::{self, Read, Write};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::TransportError;
use super::conn::{Conn, Sock, is_timeout};
use super::wait::Waiter;
use super::wire::{self, KIND_KEEPALIVE, NO_DEVICE, ReadError, Record};

/// How often an idle side says it is alive.
pub(crate) const KEEPALIVE: Duration = Duration::from_millis(500);
/// The largest control message accepted.
const MAX_MESSAGE: usize = wire::MAX_REASON_LEN + 64;

enum Cmd {
    Send(u16, Vec<u8>),
    Close,
}

/// The control connection, run by its own thread.
pub(crate) struct ControlLink {
    out: mpsc::Sender<Cmd>,
    /// Wakes the thread when something is queued.
    waiter: Arc<Waiter>,
    handle: Sock,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlLink").finish_non_exhaustive()
    }
}

impl ControlLink {
    /// Hand `conn` to a thread; incoming messages (never keepalives) and the error that ends the
    /// link go to `deliver`, which returns false once nobody listens.
    pub(crate) fn spawn(
        mut conn: Conn,
        idle: Duration,
        deliver: impl Fn(Result<Record, TransportError>) -> bool + Send + 'static,
    ) -> Result<Self, TransportError> {
        let peer = conn.peer.clone();
        let handle = conn
            .handle()
            .map_err(|e| TransportError::io(&peer, "clone socket", e))?;
        conn.set_timeouts(Some(idle), Some(idle))
            .map_err(|e| TransportError::io(&peer, "set timeouts", e))?;
        let waiter = Arc::new(Waiter::new(conn.raw_fd()).map_err(|e| TransportError::io(&peer, "set up polling", e))?);
        let woken = waiter.clone();
        let (out, out_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vfio-mig-control".into())
            .spawn(move || {
                if let Err(e) = run(&mut conn, &out_rx, &woken, idle, &deliver) {
                    deliver(Err(e));
                }
            })
            .map_err(|e| TransportError::io(&peer, "spawn the control thread", e))?;
        Ok(Self {
            out,
            waiter,
            handle,
            thread: Some(thread),
        })
    }

    /// Queue a message. Returns false when the link is already down (the message is dropped;
    /// the link's error was delivered): then the message certainly never left.
    pub(crate) fn send(&self, kind: u16, payload: Vec<u8>) -> bool {
        let queued = self.out.send(Cmd::Send(kind, payload)).is_ok();
        self.wake();
        queued
    }

    fn wake(&self) {
        self.waiter.wake();
    }

    /// Write what is queued, then close.
    pub(crate) fn close(mut self) {
        let _ = self.out.send(Cmd::Close);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.handle.shutdown();
    }
}

impl Drop for ControlLink {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}

fn run(
    conn: &mut Conn,
    out: &mpsc::Receiver<Cmd>,
    waiter: &Waiter,
    idle: Duration,
    deliver: &dyn Fn(Result<Record, TransportError>) -> bool,
) -> Result<(), TransportError> {
    let peer = conn.peer.clone();
    let mut inbuf: Vec<u8> = Vec::new();
    let mut tmp = [0u8; 4096];
    let mut last_rx = Instant::now();
    let mut last_tx = Instant::now();
    let write_err = |e: io::Error| TransportError::io(format!("{peer} (control)"), "write", e);
    loop {
        let mut wrote = false;
        loop {
            match out.try_recv() {
                Ok(Cmd::Send(kind, payload)) => {
                    wire::write_record(conn, kind, NO_DEVICE, 0, &payload).map_err(write_err)?;
                    wrote = true;
                }
                Ok(Cmd::Close) | Err(mpsc::TryRecvError::Disconnected) => {
                    conn.flush().map_err(write_err)?;
                    return Ok(());
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if !wrote && last_tx.elapsed() >= KEEPALIVE {
            wire::write_record(conn, KIND_KEEPALIVE, NO_DEVICE, 0, &[]).map_err(write_err)?;
            wrote = true;
        }
        if wrote {
            conn.flush().map_err(write_err)?;
            last_tx = Instant::now();
        }
        if !conn.has_buffered() {
            let left = idle.saturating_sub(last_rx.elapsed());
            if !waiter.wait(left.min(KEEPALIVE)).socket {
                if last_rx.elapsed() > idle {
                    return Err(TransportError::Timeout {
                        peer: format!("{peer} (control)"),
                        what: "waiting for the peer",
                        secs: idle.as_secs_f64(),
                    });
                }
                continue;
            }
        }
        match conn.read(&mut tmp) {
            Ok(0) => {
                return Err(TransportError::Closed {
                    peer: format!("{peer} (control)"),
                    when: "during the migration",
                });
            }
            Ok(n) => {
                last_rx = Instant::now();
                inbuf.extend_from_slice(&tmp[..n]);
                while let Some(rec) = take_message(&mut inbuf, &peer)? {
                    if rec.kind != KIND_KEEPALIVE && !deliver(Ok(rec)) {
                        return Ok(());
                    }
                }
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                if last_rx.elapsed() > idle {
                    return Err(TransportError::Timeout {
                        peer: format!("{peer} (control)"),
                        what: "waiting for the peer",
                        secs: idle.as_secs_f64(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(TransportError::Closed {
                    peer: format!("{peer} (control)"),
                    when: "during the migration",
                });
            }
            Err(e) => return Err(TransportError::io(format!("{peer} (control)"), "read", e)),
        }
    }
}

/// One complete message from the front of `buf`, if there is one.
pub(super) fn take_message(buf: &mut Vec<u8>, peer: &str) -> Result<Option<Record>, TransportError> {
    const H: usize = crate::stream::RECORD_HEADER_LEN;
    let Some(head) = buf.first_chunk::<H>() else {
        return Ok(None);
    };
    let len = crate::stream::RecordHead::parse(head).len;
    if len > MAX_MESSAGE {
        return Err(TransportError::protocol(
            format!("{peer} (control)"),
            format!("control message of {len} bytes, above the cap of {MAX_MESSAGE}"),
        ));
    }
    if buf.len() < H + len {
        return Ok(None);
    }
    let rec = match wire::read_record(&mut &buf[..H + len], Vec::new(), MAX_MESSAGE) {
        Ok(r) => r,
        Err(ReadError::Bad(why)) => return Err(TransportError::protocol(format!("{peer} (control)"), why)),
        Err(ReadError::Eof | ReadError::Io(_)) => return Ok(None),
    };
    buf.drain(..H + len);
    Ok(Some(rec))
}

/// A reason from a REFUSE or FAILED payload.
pub(crate) fn reason(rec: &Record) -> String {
    String::from_utf8_lossy(&rec.payload).into_owned()
}
