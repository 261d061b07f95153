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

enum Io {
    Plain(Sock),
    Client(Box<StreamOwned<ClientConnection, Sock>>),
    Server(Box<StreamOwned<ServerConnection, Sock>>),
}

/// One connection of a migration: the (possibly TLS) byte stream and a handle on the socket
/// for timeouts and shutdown.
pub(crate) struct Conn {
    io: Io,
    handle: Sock,
    /// Who is at the other end, for messages.
    pub(crate) peer: String,
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
        })
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

    /// Run the TLS handshake to its end (no-op without TLS), within the socket's timeouts.
    fn handshake(&mut self) -> io::Result<()> {
        match &mut self.io {
            Io::Plain(_) => Ok(()),
            Io::Client(s) => {
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
                Ok(())
            }
            Io::Server(s) => {
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
                Ok(())
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.io {
            Io::Plain(s) => s.read(buf),
            Io::Client(s) => s.read(buf),
            Io::Server(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
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
            let handle = sock
                .try_clone()
                .map_err(|e| TransportError::io(&peer, "clone socket", e))?;
            Conn {
                io: Io::Client(Box::new(StreamOwned::new(tls, sock))),
                handle,
                peer: peer.clone(),
            }
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

/// A bound listening socket of a receiver (see [`super::Receiver`]).
pub(crate) struct Listening {
    sock: ListenSock,
    url: MigrationUrl,
    /// Wakes a waiting `accept` (it then times out at once).
    waiter: Waiter,
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
        let (sock, bound) = match url {
            MigrationUrl::Tcp { host, .. } => {
                let addr = url.socket_addr_string().unwrap_or_default();
                let l = TcpListener::bind(&addr).map_err(|e| TransportError::io(&peer, "listen", e))?;
                let port = l
                    .local_addr()
                    .map_err(|e| TransportError::io(&peer, "listen", e))?
                    .port();
                let bound = MigrationUrl::Tcp {
                    host: host.clone(),
                    port,
                };
                (ListenSock::Tcp(l), bound)
            }
            MigrationUrl::Unix { path } => {
                // A socket file left by an earlier receiver is replaced; any other file is not.
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                let l = UnixListener::bind(path).map_err(|e| TransportError::io(&peer, "listen", e))?;
                (ListenSock::Unix(l, path.clone()), url.clone())
            }
        };
        let fd = match &sock {
            ListenSock::Tcp(l) => l.as_raw_fd(),
            ListenSock::Unix(l, _) => l.as_raw_fd(),
        };
        let waiter = Waiter::new(fd).map_err(|e| TransportError::io(&peer, "set up polling", e))?;
        Ok(Self {
            sock,
            url: bound,
            waiter,
        })
    }

    pub(crate) fn url(&self) -> &MigrationUrl {
        &self.url
    }

    /// Wake a thread waiting in [`Listening::accept`]: its accept times out now.
    pub(crate) fn wake(&self) {
        self.waiter.wake();
    }

    /// Forget wake-ups left over from an earlier migration.
    pub(crate) fn clear_wake(&self) {
        self.waiter.clear();
    }

    /// Accept one connection before `deadline` (None: wait forever), then run the TLS handshake
    /// within `handshake` when `tls` is given.
    pub(crate) fn accept(
        &self,
        deadline: Option<Instant>,
        tls: Option<&Arc<ServerConfig>>,
        handshake: Duration,
        idle: Duration,
    ) -> Result<Conn, TransportError> {
        let me = self.url.to_string();
        let set_nb = |nb: bool| match &self.sock {
            ListenSock::Tcp(l) => l.set_nonblocking(nb),
            ListenSock::Unix(l, _) => l.set_nonblocking(nb),
        };
        set_nb(deadline.is_some()).map_err(|e| TransportError::io(&me, "accept", e))?;
        let sock = loop {
            let r = match &self.sock {
                ListenSock::Tcp(l) => l.accept().map(|(s, _)| Sock::Tcp(s)),
                ListenSock::Unix(l, _) => l.accept().map(|(s, _)| Sock::Unix(s)),
            };
            match r {
                Ok(s) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    let left = deadline.map_or(Some(Duration::from_secs(1)), |d| {
                        d.checked_duration_since(Instant::now())
                    });
                    let Some(left) = left.filter(|l| !l.is_zero()) else {
                        return Err(TransportError::Timeout {
                            peer: me,
                            what: "waiting for a connection",
                            secs: handshake.as_secs_f64(),
                        });
                    };
                    if self.waiter.wait(left.min(Duration::from_millis(100))).woken {
                        return Err(TransportError::Timeout {
                            peer: me,
                            what: "waiting for a connection (woken)",
                            secs: 0.0,
                        });
                    }
                }
                Err(e) => return Err(TransportError::io(&me, "accept", e)),
            }
        };
        let nb = match &sock {
            Sock::Tcp(s) => {
                let _ = s.set_nodelay(true);
                s.set_nonblocking(false)
            }
            Sock::Unix(s) => s.set_nonblocking(false),
        };
        let peer = sock.peer();
        nb.map_err(|e| TransportError::io(&peer, "accept", e))?;
        sock.set_read_timeout(Some(handshake))
            .and_then(|()| sock.set_write_timeout(Some(handshake)))
            .map_err(|e| TransportError::io(&peer, "set timeouts", e))?;
        let mut conn = match tls {
            None => Conn::plain(sock, peer.clone()).map_err(|e| TransportError::io(&peer, "clone socket", e))?,
            Some(cfg) => {
                let tls = ServerConnection::new(cfg.clone()).map_err(|e| TransportError::Tls(e.to_string()))?;
                let handle = sock
                    .try_clone()
                    .map_err(|e| TransportError::io(&peer, "clone socket", e))?;
                Conn {
                    io: Io::Server(Box::new(StreamOwned::new(tls, sock))),
                    handle,
                    peer: peer.clone(),
                }
            }
        };
        conn.handshake().map_err(|e| handshake_error(&peer, e, handshake))?;
        conn.set_timeouts(Some(idle), Some(idle))
            .map_err(|e| TransportError::io(&peer, "set timeouts", e))?;
        Ok(conn)
    }
}
