//! One client connection to a vfio-user server: version negotiation, then requests strictly one
//! at a time, each waiting for its reply. [`super::VfioUserDevice`] and [`super::VfioUserClient`]
//! (and the migration devices it hands out) share one behind a mutex, so their requests
//! interleave safely.

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};

use super::client::{REPLY_TIMEOUT, device_error};
use super::codec::{self, Capabilities, HEADER_LEN, Header, ProtocolError};
use crate::device::{DeviceError, ErrorKind, Operation};

/// One connection to a server; requests are strictly one at a time.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: UnixStream,
    next_id: u16,
    /// Set when a reply could not be parsed: the stream may be out of step, so no further
    /// request is sent.
    broken: Option<String>,
}

/// What version negotiation settled.
#[derive(Debug)]
pub(crate) struct Negotiated {
    /// The capabilities the server announced.
    pub caps: Capabilities,
    /// The largest data chunk per message (`max_data_xfer_size`, capped at
    /// [`codec::MAX_DATA_XFER_LIMIT`]).
    pub max_xfer: u32,
}

impl Conn {
    /// Set the reply timeouts on `stream` and negotiate the version (`VFIO_USER_VERSION`, always
    /// the first message). Errors name the device `name` with [`Operation::Open`].
    pub(crate) fn open(name: &str, stream: UnixStream) -> Result<(Self, Negotiated), DeviceError> {
        let open = |e| device_error(name, Operation::Open, e);
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(|e| DeviceError::io(name, Operation::Open, e))?;
        let mut conn = Conn {
            stream,
            next_id: 0,
            broken: None,
        };
        let ours = Capabilities {
            max_data_xfer_size: codec::DEFAULT_MAX_DATA_XFER,
            ..Default::default()
        };
        let reply = conn
            .request(
                codec::CMD_VERSION,
                &[&codec::encode_version(&ours)],
                codec::MAX_CONTROL_MSG,
            )
            .map_err(open)?;
        let (major, minor, caps) = codec::decode_version(&reply).map_err(open)?;
        if major != codec::VERSION_MAJOR {
            return Err(DeviceError::new(
                name,
                Operation::Open,
                ErrorKind::InvalidAnswer(format!("unsupported protocol version {major}.{minor}")),
            ));
        }
        let max_xfer = caps.max_data_xfer_size.min(codec::MAX_DATA_XFER_LIMIT);
        Ok((conn, Negotiated { caps, max_xfer }))
    }

    /// Send a command and wait for its reply; returns the reply's payload. The reply may be at
    /// most `max_reply` bytes in all (checked before it is read). File descriptors sent with the
    /// reply are closed.
    pub(crate) fn request(
        &mut self,
        command: u16,
        payload: &[&[u8]],
        max_reply: u32,
    ) -> Result<Vec<u8>, ProtocolError> {
        self.request_fds(command, payload, &[], max_reply).map(|(body, _)| body)
    }

    /// [`Conn::request`] that sends `fds` with the command (`SCM_RIGHTS`) and returns the file
    /// descriptors that came with the reply (at most [`codec::MAX_MSG_FDS`]; owned, so dropping
    /// them closes them).
    pub(crate) fn request_fds(
        &mut self,
        command: u16,
        payload: &[&[u8]],
        fds: &[RawFd],
        max_reply: u32,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), ProtocolError> {
        if let Some(why) = &self.broken {
            return Err(ProtocolError::Malformed(format!(
                "the connection is unusable after an earlier failure ({why})"
            )));
        }
        let r = self.exchange(command, payload, fds, max_reply);
        if let Err(e) = &r
            && !matches!(e, ProtocolError::Remote { .. })
        {
            self.broken = Some(e.to_string());
        }
        r
    }

    /// Mark the connection unusable: a reply came in step but could not be parsed, so what the
    /// server thinks happened is unknown.
    pub(crate) fn mark_broken(&mut self, why: &str) {
        if self.broken.is_none() {
            self.broken = Some(why.to_string());
        }
    }

    /// Shut the socket down in both directions (the server sees the client leave); later
    /// requests fail.
    pub(crate) fn shutdown(&mut self) -> std::io::Result<()> {
        self.mark_broken("the connection was shut down");
        match self.stream.shutdown(std::net::Shutdown::Both) {
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
            r => r,
        }
    }

    fn exchange(
        &mut self,
        command: u16,
        payload: &[&[u8]],
        fds: &[RawFd],
        max_reply: u32,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), ProtocolError> {
        let msg_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let h = Header {
            msg_id,
            command,
            size: 0,
            flags: codec::FLAG_TYPE_COMMAND,
            error_no: 0,
        };
        codec::write_message_with_fds(&self.stream, h, payload, fds)?;
        let (reply, got_fds) = codec::read_header_with_fds(&self.stream)?.ok_or(ProtocolError::Closed)?;
        if reply.msg_id != msg_id || reply.command != command || reply.msg_type() != codec::FLAG_TYPE_REPLY {
            return Err(ProtocolError::Mismatch {
                expected_id: msg_id,
                expected_command: command,
                got_id: reply.msg_id,
                got_command: reply.command,
            });
        }
        // An error reply's payload is read too (and dropped), so the stream stays in step.
        let body = codec::read_payload(&mut self.stream, &reply, max_reply.max(HEADER_LEN as u32 + 64))?;
        if reply.is_error() {
            return Err(ProtocolError::Remote {
                errno: if reply.error_no == 0 {
                    libc::EIO as u32
                } else {
                    reply.error_no
                },
            });
        }
        Ok((body, got_fds))
    }
}

/// Lock a shared connection (a panic in another holder does not make it unusable: every request
/// leaves it in step or marked broken).
pub(crate) fn lock(conn: &Mutex<Conn>) -> MutexGuard<'_, Conn> {
    conn.lock().unwrap_or_else(|e| e.into_inner())
}
