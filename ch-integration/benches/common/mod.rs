//! Cloud Hypervisor's migration framing, as its `vm-migration` crate (`protocol.rs`) writes it, for
//! the benches: a 16-byte request (`command: u16`, `command_headers: [u8; 6]`, `length: u64`, all
//! little-endian, then `length` payload bytes) answered by a 16-byte response (`status: u16`,
//! `padding: [u8; 6]`, `length: u64`, then `length` payload bytes), over a socket whose bytes are
//! counted.

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
/// The proposed `Command::DeviceState` (protocol version 1).
pub const DEVICE_STATE: u16 = 10;

/// `Status::Ok`.
pub const OK: u16 = 1;

/// Marks the version-1 fields of `Start` and of its response ("vm"), as the proposal does.
pub const MAGIC: [u8; 2] = *b"vm";

/// `Start`'s `command_headers` from a source offering up to `version` (0: an unpatched source,
/// whose headers are all zero).
pub fn start_headers(version: u16) -> [u8; 6] {
    if version == 0 {
        return [0; 6];
    }
    let v = version.to_le_bytes();
    [0, 0, v[0], v[1], MAGIC[0], MAGIC[1]]
}

/// Destination: the version a source offers in `Start`'s headers (0 when it offers none).
pub fn offered_version(headers: &[u8; 6]) -> u16 {
    if headers[4..6] == MAGIC {
        u16::from_le_bytes([headers[2], headers[3]])
    } else {
        0
    }
}

/// The `padding` of the `Start` response naming the chosen `version`.
pub fn start_response_padding(version: u16) -> [u8; 6] {
    let v = version.to_le_bytes();
    [v[0], v[1], MAGIC[0], MAGIC[1], 0, 0]
}

/// Source: the version the destination chose, from the `Start` response's padding.
pub fn chosen_version(padding: &[u8; 6]) -> u16 {
    if padding[2..4] == MAGIC {
        u16::from_le_bytes([padding[0], padding[1]])
    } else {
        0
    }
}

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
