//! Cloud Hypervisor's migration framing, as its `vm-migration` crate (`protocol.rs`) writes it, for
//! the benches: a 16-byte request (`command: u16`, `command_headers: [u8; 6]`, `length: u64`, all
//! little-endian, then `length` payload bytes) answered by a 16-byte response (`status: u16`,
//! `padding: [u8; 6]`, `length: u64`, then `length` payload bytes), over a socket whose bytes are
//! counted. The version-1 bytes inside these headers come from `ch_integration::protocol`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// `Command::Start`.
pub const START: u16 = 1;
/// `Command::Config`.
pub const CONFIG: u16 = 2;
/// `Command::State`.
pub const STATE: u16 = 3;
/// `Command::Memory`.
pub const MEMORY: u16 = 4;
/// `Command::Complete`.
pub const COMPLETE: u16 = 5;
/// `Command::DeviceState` (protocol version 1).
pub const DEVICE_STATE: u16 = ch_integration::protocol::DEVICE_STATE_COMMAND;

/// `Status::Ok`.
pub const OK: u16 = 1;

/// A unix socket that counts the bytes it writes and reads.
#[derive(Debug)]
pub struct Conn {
    sock: UnixStream,
    /// Bytes written so far.
    pub written: u64,
    /// Bytes read so far.
    pub read: u64,
}

impl Conn {
    /// Wrap `sock`.
    pub fn new(sock: UnixStream) -> Self {
        Self {
            sock,
            written: 0,
            read: 0,
        }
    }

    /// Bytes moved either way so far.
    pub fn total(&self) -> u64 {
        self.written + self.read
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.sock.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn read_exact(&mut self, b: &mut [u8]) -> io::Result<()> {
        self.sock.read_exact(b)?;
        self.read += b.len() as u64;
        Ok(())
    }

    fn read_payload(&mut self, len: u64, max: u64) -> io::Result<Vec<u8>> {
        if len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("payload of {len} bytes exceeds {max}"),
            ));
        }
        let mut p = vec![0u8; len as usize];
        self.read_exact(&mut p)?;
        Ok(p)
    }

    /// Send a request: header, then `payload`.
    pub fn request(&mut self, command: u16, headers: [u8; 6], payload: &[u8]) -> io::Result<()> {
        let mut h = [0u8; 16];
        h[0..2].copy_from_slice(&command.to_le_bytes());
        h[2..8].copy_from_slice(&headers);
        h[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        self.write_all(&h)?;
        self.write_all(payload)
    }

    /// Receive a request: command, headers, payload (at most `max` bytes).
    pub fn read_request(&mut self, max: u64) -> io::Result<(u16, [u8; 6], Vec<u8>)> {
        let mut h = [0u8; 16];
        self.read_exact(&mut h)?;
        let command = u16::from_le_bytes([h[0], h[1]]);
        let headers: [u8; 6] = h[2..8].try_into().expect("6 bytes");
        let len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        Ok((command, headers, self.read_payload(len, max)?))
    }

    /// Send a response with no payload.
    pub fn respond(&mut self, status: u16, padding: [u8; 6]) -> io::Result<()> {
        let mut h = [0u8; 16];
        h[0..2].copy_from_slice(&status.to_le_bytes());
        h[2..8].copy_from_slice(&padding);
        self.write_all(&h)
    }

    /// Receive a response; an `Error` status or a response carrying a payload is an error.
    /// Returns the padding.
    pub fn read_response(&mut self) -> io::Result<[u8; 6]> {
        let mut h = [0u8; 16];
        self.read_exact(&mut h)?;
        let status = u16::from_le_bytes([h[0], h[1]]);
        let len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        if status != OK || len != 0 {
            return Err(io::Error::other(format!(
                "response status {status}, payload {len} bytes"
            )));
        }
        Ok(h[2..8].try_into().expect("6 bytes"))
    }

    /// Send a request with no special headers and wait for its `Ok` response.
    pub fn call(&mut self, command: u16, payload: &[u8]) -> io::Result<[u8; 6]> {
        self.request(command, [0; 6], payload)?;
        self.read_response()
    }
}
