//! Migration URLs as Cloud Hypervisor writes them: `tcp:HOST:PORT` and `unix:PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::TransportError;

/// Where a receiver listens and a sender connects.
///
/// ```
/// use vfio_migration::transport::MigrationUrl;
/// let u: MigrationUrl = "tcp:127.0.0.1:6000".parse().unwrap();
/// assert_eq!(u, MigrationUrl::Tcp { host: "127.0.0.1".into(), port: 6000 });
/// let v: MigrationUrl = "tcp:[::1]:6000".parse().unwrap();
/// assert_eq!(v.to_string(), "tcp:[::1]:6000");
/// let w: MigrationUrl = "unix:/run/mig.sock".parse().unwrap();
/// assert_eq!(w.to_string(), "unix:/run/mig.sock");
/// assert!("http://x".parse::<MigrationUrl>().is_err());
/// assert!("tcp:host".parse::<MigrationUrl>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MigrationUrl {
    /// A TCP address; `host` is a name, an IPv4 address or an IPv6 address (without brackets).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port (0 when listening lets the system choose).
        port: u16,
    },
    /// A unix stream socket.
    Unix {
        /// The socket's path.
        path: PathBuf,
    },
}

impl MigrationUrl {
    /// The name TLS checks the receiver's certificate against: the host for TCP, `localhost`
    /// for a unix socket.
    pub fn tls_server_name(&self) -> String {
        match self {
            MigrationUrl::Tcp { host, .. } => host.clone(),
            MigrationUrl::Unix { .. } => "localhost".into(),
        }
    }

    /// The `host:port` form `ToSocketAddrs` takes (IPv6 in brackets).
    pub(crate) fn socket_addr_string(&self) -> Option<String> {
        match self {
            MigrationUrl::Tcp { host, port } if host.contains(':') => Some(format!("[{host}]:{port}")),
            MigrationUrl::Tcp { host, port } => Some(format!("{host}:{port}")),
            MigrationUrl::Unix { .. } => None,
        }
    }
}

impl fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUrl::Tcp { .. } => write!(f, "tcp:{}", self.socket_addr_string().unwrap_or_default()),
            MigrationUrl::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

impl FromStr for MigrationUrl {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, TransportError> {
        let bad = |reason: &str| TransportError::Url {
            url: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("unix: needs a socket path"));
            }
            return Ok(MigrationUrl::Unix { path: path.into() });
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            return Err(bad("expected tcp:HOST:PORT or unix:PATH"));
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed [ in an IPv6 address"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| bad("expected :PORT after the address"))?;
            (host, port)
        } else {
            rest.rsplit_once(':').ok_or_else(|| bad("expected tcp:HOST:PORT"))?
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
        Ok(MigrationUrl::Tcp {
            host: host.to_string(),
            port,
        })
    }
}
