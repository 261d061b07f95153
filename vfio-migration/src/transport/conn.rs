//! Connections: TCP or unix sockets, optionally wrapped in mutual TLS.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};

use super::wait::Waiter;
use super::{MigrationUrl, TransportError};

/// A plain socket.
#[derive(Debug)]
pub(crate) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub(crate) fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Make reads and writes fail with [`io::ErrorKind::WouldBlock`] instead of waiting (for
    /// every handle on the socket: clones share the flag).
    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_nonblocking(on),
            Sock::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Shut both directions down (wakes a thread blocked on the socket).
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn peer(&self) -> String {
        match self {
            Sock::Tcp(s) => s.peer_addr().map_or_else(|_| "tcp peer".into(), |a| format!("tcp:{a}")),
            Sock::Unix(_) => "unix peer".into(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.flush(),
            Sock::Unix(s) => s.flush(),
        }
    }
}

/// The socket under TLS: rustls loops over reads inside one call (a handshake, a record), so
/// the connection's deadline is checked here, on every read and write of the socket.
struct Wire {
    sock: Sock,
    deadline: Option<Instant>,
}

impl Wire {
    fn arm(&self, read: bool) -> io::Result<()> {
        let Some(d) = self.deadline else { return Ok(()) };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection's deadline passed",
            ));
        }
        if read {
            self.sock.set_read_timeout(Some(left))
        } else {
            self.sock.set_write_timeout(Some(left))
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(true)?;
        self.sock.read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(false)?;
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

enum Io {
    Plain(Sock),
    Client(Box<StreamOwned<ClientConnection, Wire>>),
    Server(Box<StreamOwned<ServerConnection, Wire>>),
}

/// One connection of a migration: the (possibly TLS) byte stream and a handle on the socket
/// for timeouts and shutdown.
pub(crate) struct Conn {
    io: Io,
    handle: Sock,
    /// Who is at the other end, for messages.
    pub(crate) peer: String,
    /// When set, every read and write must finish by then (whatever the peer's pace).
    deadline: Option<Instant>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl Conn {
    fn plain(sock: Sock, peer: String) -> io::Result<Self> {
        let handle = sock.try_clone()?;
        Ok(Self {
            io: Io::Plain(sock),
            handle,
            peer,
            deadline: None,
        })
    }

    /// `sock` under TLS, either side: `wrap` puts the rustls connection over the socket (as a
    /// [`Wire`], no deadline yet); the handle is a clone of the socket.
    fn tls(sock: Sock, peer: String, wrap: impl FnOnce(Wire) -> Io) -> io::Result<Self> {
        let handle = sock.try_clone()?;
        Ok(Self {
            io: wrap(Wire { sock, deadline: None }),
            handle,
            peer,
            deadline: None,
        })
    }

    /// Bound everything from now on by `deadline` (the socket timeouts follow it), or lift the
    /// bound (None) and go back to per-operation timeouts of `idle`.
    pub(crate) fn set_deadline(&mut self, deadline: Option<Instant>, idle: Duration) -> io::Result<()> {
        self.deadline = deadline;
        match &mut self.io {
            Io::Plain(_) => {}
            Io::Client(s) => s.sock.deadline = deadline,
            Io::Server(s) => s.sock.deadline = deadline,
        }
        if deadline.is_none() {
            self.set_timeouts(Some(idle), Some(idle))?;
        }
        Ok(())
    }

    /// Before an operation under a deadline: point the socket timeouts at it, or fail when it
    /// has passed.
    fn arm(&self) -> io::Result<()> {
        let Some(d) = self.deadline else { return Ok(()) };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection's deadline passed",
            ));
        }
        self.set_timeouts(Some(left), Some(left))
    }

    /// A handle on the socket (shutdown, timeouts) usable while another thread owns the conn.
    pub(crate) fn handle(&self) -> io::Result<Sock> {
        self.handle.try_clone()
    }

    pub(crate) fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.handle.set_read_timeout(read)?;
        self.handle.set_write_timeout(write)
    }

    /// The socket's file descriptor (for waiting on it).
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        match &self.handle {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Whether TLS holds decrypted bytes not read yet (waiting on the socket cannot see them).
    pub(crate) fn has_buffered(&mut self) -> bool {
        let state = match &mut self.io {
            Io::Plain(_) => return false,
            Io::Client(s) => s.conn.process_new_packets(),
            Io::Server(s) => s.conn.process_new_packets(),
        };
        // An error is reported by the next read.
        state.map_or(true, |st| st.plaintext_bytes_to_read() > 0)
    }

    /// Whether the connection is TLS.
    pub(crate) fn is_tls(&self) -> bool {
        !matches!(self.io, Io::Plain(_))
    }

    /// Run the TLS handshake to its end (no-op without TLS), within the socket's timeouts and
    /// the connection's deadline when one is set.
    fn handshake(&mut self) -> io::Result<()> {
        loop {
            let handshaking = match &self.io {
                Io::Plain(_) => false,
                Io::Client(s) => s.conn.is_handshaking(),
                Io::Server(s) => s.conn.is_handshaking(),
            };
            if !handshaking {
                return Ok(());
            }
            self.arm()?;
            match &mut self.io {
                Io::Plain(_) => return Ok(()),
                Io::Client(s) => s.conn.complete_io(&mut s.sock)?,
                Io::Server(s) => s.conn.complete_io(&mut s.sock)?,
            };
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        match &mut self.io {
            Io::Plain(s) => s.read(buf),
            Io::Client(s) => s.read(buf),
            Io::Server(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        match &mut self.io {
            Io::Plain(s) => s.write(buf),
            Io::Client(s) => s.write(buf),
            Io::Server(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.io {
            Io::Plain(Sock::Tcp(s)) => s.write_vectored(bufs),
            Io::Plain(Sock::Unix(s)) => s.write_vectored(bufs),
            Io::Client(s) => s.write_vectored(bufs),
            Io::Server(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.io {
            Io::Plain(s) => s.flush(),
            Io::Client(s) => s.flush(),
            Io::Server(s) => s.flush(),
        }
    }
}

/// Connect to `url` within `timeout`, then run the TLS handshake when `tls` is given.
pub(crate) fn connect(
    url: &MigrationUrl,
    tls: Option<&Arc<ClientConfig>>,
    timeout: Duration,
    idle: Duration,
) -> Result<Conn, TransportError> {
    let peer = url.to_string();
    let sock = match url {
        MigrationUrl::Tcp { .. } => {
            let addr = url.socket_addr_string().unwrap_or_default();
            let addrs: Vec<_> = addr
                .to_socket_addrs()
                .map_err(|e| TransportError::io(&peer, "resolve", e))?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
            let mut found = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or_else(|| TransportError::io(&peer, "connect", last))?;
            let _ = s.set_nodelay(true);
            Sock::Tcp(s)
        }
        MigrationUrl::Unix { path } => {
            Sock::Unix(UnixStream::connect(path).map_err(|e| TransportError::io(&peer, "connect", e))?)
        }
    };
    sock.set_read_timeout(Some(timeout))
        .and_then(|()| sock.set_write_timeout(Some(timeout)))
        .map_err(|e| TransportError::io(&peer, "set timeouts", e))?;
    let mut conn = match tls {
        None => Conn::plain(sock, peer.clone()).map_err(|e| TransportError::io(&peer, "clone socket", e))?,
        Some(cfg) => {
            let name = ServerName::try_from(url.tls_server_name()).map_err(|e| {
                TransportError::Tls(format!("{}: not a valid TLS server name: {e}", url.tls_server_name()))
            })?;
            let tls = ClientConnection::new(cfg.clone(), name).map_err(|e| TransportError::Tls(e.to_string()))?;
            Conn::tls(sock, peer.clone(), |w| Io::Client(Box::new(StreamOwned::new(tls, w))))
                .map_err(|e| TransportError::io(&peer, "clone socket", e))?
        }
    };
    conn.handshake().map_err(|e| handshake_error(&peer, e, timeout))?;
    conn.set_timeouts(Some(idle), Some(idle))
        .map_err(|e| TransportError::io(&peer, "set timeouts", e))?;
    Ok(conn)
}

fn handshake_error(peer: &str, e: io::Error, timeout: Duration) -> TransportError {
    if is_timeout(&e) {
        TransportError::Timeout {
            peer: peer.into(),
            what: "in the TLS handshake",
            secs: timeout.as_secs_f64(),
        }
    } else {
        TransportError::io(peer, "TLS handshake", e)
    }
}

/// Whether an I/O error is a socket timeout.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

enum ListenSock {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// What [`Listening::accept_sock`] got.
pub(crate) enum Accepted {
    /// A connection (blocking, no timeouts yet, not authenticated).
    Sock(Sock),
    /// The deadline passed.
    TimedOut,
    /// [`Listening::wake`] was called.
    Woken,
}

/// A bound listening socket of a receiver (see [`super::Receiver`]).
pub(crate) struct Listening {
    sock: ListenSock,
    url: MigrationUrl,
    /// Wakes a waiting `accept_sock`.
    waiter: Arc<Waiter>,
    /// A TCP socket on an address other hosts can reach.
    exposed: bool,
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let ListenSock::Unix(_, path) = &self.sock {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listening {
    pub(crate) fn bind(url: &MigrationUrl) -> Result<Self, TransportError> {
        let peer = url.to_string();
        let mut exposed = false;
        let (sock, bound) = match url {
            MigrationUrl::Tcp { host, .. } => {
                let addr = url.socket_addr_string().unwrap_or_default();
                let l = TcpListener::bind(&addr).map_err(|e| TransportError::io(&peer, "listen", e))?;
                let local = l.local_addr().map_err(|e| TransportError::io(&peer, "listen", e))?;
                exposed = !local.ip().is_loopback();
                let bound = MigrationUrl::Tcp {
                    host: host.clone(),
                    port: local.port(),
                };
                (ListenSock::Tcp(l), bound)
            }
            MigrationUrl::Unix { path } => {
                let l = crate::unix_socket::bind_private(path, "a receiver")
                    .map_err(|e| TransportError::io(&peer, "listen", e))?;
                (ListenSock::Unix(l, path.clone()), url.clone())
            }
        };
        let fd = match &sock {
            ListenSock::Tcp(l) => l.as_raw_fd(),
            ListenSock::Unix(l, _) => l.as_raw_fd(),
        };
        let waiter = Waiter::new(fd).map_err(|e| TransportError::io(&peer, "set up polling", e))?;
        let set_nb = match &sock {
            ListenSock::Tcp(l) => l.set_nonblocking(true),
            ListenSock::Unix(l, _) => l.set_nonblocking(true),
        };
        set_nb.map_err(|e| TransportError::io(&peer, "listen", e))?;
        Ok(Self {
            sock,
            url: bound,
            waiter: Arc::new(waiter),
            exposed,
        })
    }

    pub(crate) fn url(&self) -> &MigrationUrl {
        &self.url
    }

    /// Whether this is a TCP socket on an address that is not a loopback address.
    pub(crate) fn exposed(&self) -> bool {
        self.exposed
    }

    /// Wake a thread waiting in [`Listening::accept_sock`].
    pub(crate) fn wake(&self) {
        self.waiter.wake();
    }

    /// A handle that wakes [`Listening::accept_sock`] from another thread.
    pub(crate) fn waker(&self) -> Arc<Waiter> {
        Arc::clone(&self.waiter)
    }

    /// Forget wake-ups left over from an earlier migration.
    pub(crate) fn clear_wake(&self) {
        self.waiter.clear();
    }

    /// Accept one socket before `deadline` (None: no deadline), unless woken first. Transient
    /// accept failures (a connection reset while queued, out of descriptors) are logged and
    /// waited out.
    pub(crate) fn accept_sock(&self, deadline: Option<Instant>) -> Result<Accepted, TransportError> {
        loop {
            let r = match &self.sock {
                ListenSock::Tcp(l) => l.accept().map(|(s, _)| Sock::Tcp(s)),
                ListenSock::Unix(l, _) => l.accept().map(|(s, _)| Sock::Unix(s)),
            };
            match r {
                Ok(s) => {
                    let nb = match &s {
                        Sock::Tcp(t) => {
                            let _ = t.set_nodelay(true);
                            t.set_nonblocking(false)
                        }
                        Sock::Unix(u) => u.set_nonblocking(false),
                    };
                    match nb {
                        Ok(()) => return Ok(Accepted::Sock(s)),
                        Err(e) => log::warn!("{}: connection dropped: {e}", s.peer()),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    let left = match deadline {
                        None => Duration::from_secs(1),
                        Some(d) => {
                            let left = d.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                return Ok(Accepted::TimedOut);
                            }
                            left
                        }
                    };
                    if self.waiter.wait(left.min(Duration::from_millis(100))).woken {
                        return Ok(Accepted::Woken);
                    }
                }
                Err(e) if transient_accept_error(&e) => {
                    log::warn!("{}: accept failed, retrying: {e}", self.url);
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(TransportError::io(self.url.to_string(), "accept", e)),
            }
        }
    }
}

fn transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

/// The receiving end of an accepted socket: TLS when `tls` is given, the handshake finished
/// by `deadline`. The connection keeps the deadline (for the preamble and the hello) until
/// [`Conn::set_deadline`] lifts it.
pub(crate) fn server_conn(
    sock: Sock,
    tls: Option<&Arc<ServerConfig>>,
    deadline: Instant,
) -> Result<Conn, TransportError> {
    let peer = sock.peer();
    let mut conn = match tls {
        None => Conn::plain(sock, peer.clone()).map_err(|e| TransportError::io(&peer, "clone socket", e))?,
        Some(cfg) => {
            let tls = ServerConnection::new(cfg.clone()).map_err(|e| TransportError::Tls(e.to_string()))?;
            Conn::tls(sock, peer.clone(), |w| Io::Server(Box::new(StreamOwned::new(tls, w))))
                .map_err(|e| TransportError::io(&peer, "clone socket", e))?
        }
    };
    conn.set_deadline(Some(deadline), Duration::ZERO)
        .map_err(|e| TransportError::io(&peer, "set timeouts", e))?;
    let total = deadline.saturating_duration_since(Instant::now());
    conn.handshake().map_err(|e| handshake_error(&peer, e, total))?;
    Ok(conn)
}
