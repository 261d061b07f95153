//! vfio-user message framing: the 16-byte header, the commands and payloads this crate uses,
//! the version negotiation's JSON capabilities, and bounded reads (a message's length is checked
//! against a cap before anything is allocated for it).

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The size of a message header.
pub const HEADER_LEN: usize = 16;

/// `VFIO_USER_VERSION`: version and capability negotiation (always the first message).
pub const CMD_VERSION: u16 = 1;
/// `VFIO_USER_DMA_MAP`.
pub const CMD_DMA_MAP: u16 = 2;
/// `VFIO_USER_DMA_UNMAP`.
pub const CMD_DMA_UNMAP: u16 = 3;
/// `VFIO_USER_DEVICE_GET_INFO`.
pub const CMD_DEVICE_GET_INFO: u16 = 4;
/// `VFIO_USER_DEVICE_GET_REGION_INFO`.
pub const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
/// `VFIO_USER_DEVICE_GET_IRQ_INFO`.
pub const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
/// `VFIO_USER_DEVICE_SET_IRQS`.
pub const CMD_DEVICE_SET_IRQS: u16 = 8;
/// `VFIO_USER_REGION_READ`.
pub const CMD_REGION_READ: u16 = 9;
/// `VFIO_USER_REGION_WRITE`.
pub const CMD_REGION_WRITE: u16 = 10;
/// `VFIO_USER_DEVICE_RESET`.
pub const CMD_DEVICE_RESET: u16 = 13;
/// `VFIO_USER_DEVICE_FEATURE`.
pub const CMD_DEVICE_FEATURE: u16 = 16;
/// `VFIO_USER_MIG_DATA_READ`.
pub const CMD_MIG_DATA_READ: u16 = 17;
/// `VFIO_USER_MIG_DATA_WRITE`.
pub const CMD_MIG_DATA_WRITE: u16 = 18;

/// Header flags: the message type field (bits 0-3).
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Message type: a command.
pub const FLAG_TYPE_COMMAND: u32 = 0;
/// Message type: a reply.
pub const FLAG_TYPE_REPLY: u32 = 1;
/// Header flags: the sender expects no reply.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// Header flags: the reply is an error; `error_no` holds the errno.
pub const FLAG_ERROR: u32 = 1 << 5;

/// `VFIO_DEVICE_FEATURE` flags: the feature index mask.
pub const FEATURE_MASK: u32 = 0xffff;
/// `VFIO_DEVICE_FEATURE_GET`.
pub const FEATURE_GET: u32 = 1 << 16;
/// `VFIO_DEVICE_FEATURE_SET`.
pub const FEATURE_SET: u32 = 1 << 17;
/// `VFIO_DEVICE_FEATURE_PROBE`.
pub const FEATURE_PROBE: u32 = 1 << 18;

/// Feature `VFIO_DEVICE_FEATURE_MIGRATION` (GET: `u64` migration flags).
pub const FEATURE_MIGRATION: u32 = 1;
/// Feature `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (`{device_state u32, data_fd u32}`).
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// Feature `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`.
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
/// Feature `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// Feature `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`.
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;

/// The PCI config space region (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const PCI_CONFIG_REGION: u32 = 7;

/// The protocol version this crate speaks (major).
pub const VERSION_MAJOR: u16 = 0;
/// The protocol version this crate speaks (minor).
pub const VERSION_MINOR: u16 = 1;

/// The spec's default `max_data_xfer_size` (1 MiB), used when a peer does not say.
pub const DEFAULT_MAX_DATA_XFER: u32 = 1 << 20;

/// The largest `max_data_xfer_size` this crate accepts from a peer (16 MiB).
pub const MAX_DATA_XFER_LIMIT: u32 = 16 << 20;

/// The largest message without bulk data (version JSON, region info, feature requests without
/// a bitmap): 64 KiB.
pub const MAX_CONTROL_MSG: u32 = 64 << 10;

/// The capability key under which the server of this crate tells its device identity (a
/// string, e.g. `emulated:size=67108864,block=4096,seed=1`). Other servers do not send it; a
/// client then reports an unknown identity.
pub const CAP_IDENTITY: &str = "vfio_mig_identity";

/// A message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// The message id (a reply carries its command's).
    pub msg_id: u16,
    /// The command.
    pub command: u16,
    /// The size of the whole message, header included.
    pub size: u32,
    /// Type, no-reply and error bits.
    pub flags: u32,
    /// The errno of an error reply.
    pub error_no: u32,
}

impl Header {
    /// Encode as the 16 wire bytes (little endian).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error_no.to_le_bytes());
        b
    }

    /// Decode the 16 wire bytes.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            msg_id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error_no: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// The message type bits.
    pub fn msg_type(&self) -> u32 {
        self.flags & FLAG_TYPE_MASK
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
}

/// What went wrong on the wire or in a peer's message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// A header that cannot be a valid message (size below the header, wrong type bits).
    #[error("bad message header: {0}")]
    BadHeader(String),
    /// A message longer than allowed for it; nothing was allocated for it.
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// The size the header claimed.
        size: u32,
        /// The limit.
        max: u32,
    },
    /// A reply that does not answer the request.
    #[error(
        "reply mismatch: expected id {expected_id} command {expected_command}, got id {got_id} command {got_command}"
    )]
    Mismatch {
        /// The request's id.
        expected_id: u16,
        /// The request's command.
        expected_command: u16,
        /// The reply's id.
        got_id: u16,
        /// The reply's command.
        got_command: u16,
    },
    /// The peer answered with an error reply carrying this errno.
    #[error("the peer answered errno {errno} ({})", io::Error::from_raw_os_error(*errno as i32))]
    Remote {
        /// The errno of the error reply.
        errno: u32,
    },
    /// A payload that does not have the layout its command requires.
    #[error("malformed payload: {0}")]
    Malformed(String),
}

impl ProtocolError {
    /// The errno this error stands for, when it has one (a remote error reply or a socket
    /// error).
    pub fn errno(&self) -> Option<i32> {
        match self {
            ProtocolError::Remote { errno } => Some(*errno as i32),
            ProtocolError::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// Fill `buf` completely; `Ok(false)` when the stream ended before the first byte.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> Result<bool, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Read one header; `Ok(None)` at a clean end of the stream (between messages).
pub fn read_header(r: &mut dyn Read) -> Result<Option<Header>, ProtocolError> {
    let mut b = [0u8; HEADER_LEN];
    if !read_full(r, &mut b)? {
        return Ok(None);
    }
    check_header(Header::from_bytes(&b)).map(Some)
}

/// The most file descriptors one message may carry (announced as `max_msg_fds`); a message
/// with more ends its connection (the kernel truncates the control data and they are closed).
pub const MAX_MSG_FDS: usize = 16;

/// Read one header from a UNIX socket with `recvmsg`, together with the file descriptors sent
/// with it (`SCM_RIGHTS`, at most [`MAX_MSG_FDS`]; they come with the first bytes of the
/// message, as every client sends them). `Ok(None)` at a clean end of the stream. The
/// descriptors are owned: dropping them closes them.
pub fn read_header_with_fds(stream: &UnixStream) -> Result<Option<(Header, Vec<OwnedFd>)>, ProtocolError> {
    let mut b = [0u8; HEADER_LEN];
    let mut got = 0usize;
    let mut fds: Vec<OwnedFd> = Vec::new();
    while got < HEADER_LEN {
        let mut raw: [RawFd; MAX_MSG_FDS] = [-1; MAX_MSG_FDS];
        let rest = &mut b[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec points into `b`, a live byte buffer that recvmsg may overwrite with
        // arbitrary data, for exactly its remaining length.
        let r = unsafe { stream.recv_with_fds(&mut iov, &mut raw) };
        let (n, nfds) = match r {
            Ok(x) => x,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        };
        for &fd in &raw[..nfds.min(MAX_MSG_FDS)] {
            // SAFETY: recvmsg installed these descriptors in this process for us and nothing
            // else owns them; each is wrapped once.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(ProtocolError::Closed);
        }
        got += n;
        if fds.len() > MAX_MSG_FDS {
            return Err(ProtocolError::Malformed(format!(
                "more than {MAX_MSG_FDS} file descriptors with one message"
            )));
        }
    }
    let h = check_header(Header::from_bytes(&b))?;
    Ok(Some((h, fds)))
}

fn check_header(h: Header) -> Result<Header, ProtocolError> {
    if (h.size as usize) < HEADER_LEN {
        return Err(ProtocolError::BadHeader(format!(
            "size {} is below the {HEADER_LEN}-byte header",
            h.size
        )));
    }
    if h.msg_type() > FLAG_TYPE_REPLY {
        return Err(ProtocolError::BadHeader(format!(
            "unknown message type {}",
            h.msg_type()
        )));
    }
    Ok(h)
}

/// Read the payload of a message whose header was read, refusing (before allocating) one
/// longer than `max` bytes in all.
pub fn read_payload(r: &mut dyn Read, h: &Header, max: u32) -> Result<Vec<u8>, ProtocolError> {
    if h.size > max {
        return Err(ProtocolError::TooLong { size: h.size, max });
    }
    let len = (h.size as usize)
        .checked_sub(HEADER_LEN)
        .ok_or_else(|| ProtocolError::BadHeader(format!("size {} is below the {HEADER_LEN}-byte header", h.size)))?;
    let mut payload = vec![0u8; len];
    if !read_full(r, &mut payload)? && !payload.is_empty() {
        return Err(ProtocolError::Closed);
    }
    Ok(payload)
}

/// One message's bytes (header with its `size` set, then the payload). Refuses a payload that
/// does not fit the `u32` size.
fn encode_message(mut h: Header, payload: &[&[u8]]) -> Result<Vec<u8>, ProtocolError> {
    let len: usize = HEADER_LEN + payload.iter().map(|p| p.len()).sum::<usize>();
    h.size = u32::try_from(len).map_err(|_| ProtocolError::TooLong {
        size: u32::MAX,
        max: u32::MAX,
    })?;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&h.to_bytes());
    for p in payload {
        msg.extend_from_slice(p);
    }
    Ok(msg)
}

/// Write one message (header and payload). Refuses a payload that does not fit the `u32` size.
pub fn write_message(w: &mut dyn Write, h: Header, payload: &[&[u8]]) -> Result<(), ProtocolError> {
    w.write_all(&encode_message(h, payload)?)?;
    Ok(())
}

/// Write one message on a UNIX socket with the file descriptors `fds` (`SCM_RIGHTS`, with the
/// message's first bytes; the caller checks their number against the peer's `max_msg_fds`);
/// without descriptors it is [`write_message`]. The descriptors stay the
/// caller's (the peer receives duplicates).
pub fn write_message_with_fds(
    stream: &UnixStream,
    h: Header,
    payload: &[&[u8]],
    fds: &[RawFd],
) -> Result<(), ProtocolError> {
    let msg = encode_message(h, payload)?;
    let mut w = stream;
    if fds.is_empty() {
        w.write_all(&msg)?;
        return Ok(());
    }
    if fds.iter().any(|&fd| fd < 0) {
        return Err(ProtocolError::Io(io::Error::from_raw_os_error(libc::EBADF)));
    }
    let sent = loop {
        match stream.send_with_fds(&[&msg[..]], fds) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    // The descriptors went with the first bytes; the rest (a short send) follows plainly.
    w.write_all(&msg[sent.min(msg.len())..])?;
    Ok(())
}

/// A little-endian reader over a payload that never panics.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                ProtocolError::Malformed(format!(
                    "{what}: needs {n} bytes at offset {}, the payload has {}",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next `u32`.
    pub fn u32(&mut self, what: &str) -> Result<u32, ProtocolError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next `u64`.
    pub fn u64(&mut self, what: &str) -> Result<u64, ProtocolError> {
        let lo = self.u32(what)? as u64;
        let hi = self.u32(what)? as u64;
        Ok(lo | (hi << 32))
    }

    /// The rest of the payload.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

/// The capabilities exchanged in `VFIO_USER_VERSION`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The largest chunk of data one message may carry (`max_data_xfer_size`).
    pub max_data_xfer_size: u32,
    /// The largest number of file descriptors per message (`max_msg_fds`).
    pub max_msg_fds: u32,
    /// The dirty-page granularity the peer uses (`migration.pgsize`).
    pub pgsize: u64,
    /// The largest dirty bitmap in bytes (`migration.max_bitmap_size`).
    pub max_bitmap_size: u64,
    /// The device identity the server of this crate tells ([`CAP_IDENTITY`]).
    pub identity: Option<String>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER,
            max_msg_fds: 0,
            pgsize: 4096,
            max_bitmap_size: 256 << 10,
            identity: None,
        }
    }
}

/// Encode a `VFIO_USER_VERSION` payload: major, minor, then the NUL-terminated JSON.
pub fn encode_version(caps: &Capabilities) -> Vec<u8> {
    let mut obj = serde_json::json!({
        "capabilities": {
            "max_msg_fds": caps.max_msg_fds,
            "max_data_xfer_size": caps.max_data_xfer_size,
            "migration": { "pgsize": caps.pgsize, "max_bitmap_size": caps.max_bitmap_size },
        }
    });
    if let (Some(id), Some(c)) = (
        &caps.identity,
        obj.get_mut("capabilities").and_then(|c| c.as_object_mut()),
    ) {
        c.insert(CAP_IDENTITY.into(), serde_json::Value::String(id.clone()));
    }
    let mut out = Vec::new();
    out.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
    out.extend_from_slice(&VERSION_MINOR.to_le_bytes());
    out.extend_from_slice(obj.to_string().as_bytes());
    out.push(0);
    out
}

/// Decode a `VFIO_USER_VERSION` payload into the version and the capabilities (missing ones
/// take the spec's defaults; unknown ones are ignored).
pub fn decode_version(payload: &[u8]) -> Result<(u16, u16, Capabilities), ProtocolError> {
    let mut c = Cursor::new(payload);
    let v = c.u32("version")?;
    let (major, minor) = (v as u16, (v >> 16) as u16);
    let rest = c.rest();
    let json = match rest.iter().position(|&b| b == 0) {
        Some(n) => &rest[..n],
        None => rest,
    };
    let mut caps = Capabilities::default();
    if json.is_empty() {
        return Ok((major, minor, caps));
    }
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| ProtocolError::Malformed(format!("version JSON: {e}")))?;
    let Some(c) = value.get("capabilities") else {
        return Ok((major, minor, caps));
    };
    let num = |v: Option<&serde_json::Value>, what: &str| -> Result<Option<u64>, ProtocolError> {
        match v {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| ProtocolError::Malformed(format!("version JSON: {what} is not a number"))),
        }
    };
    if let Some(n) = num(c.get("max_data_xfer_size"), "max_data_xfer_size")? {
        caps.max_data_xfer_size = u32::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| ProtocolError::Malformed(format!("max_data_xfer_size {n}")))?;
    }
    if let Some(n) = num(c.get("max_msg_fds"), "max_msg_fds")? {
        caps.max_msg_fds = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(m) = c.get("migration") {
        if let Some(n) = num(m.get("pgsize"), "migration.pgsize")? {
            caps.pgsize = n;
        }
        if let Some(n) = num(m.get("max_bitmap_size"), "migration.max_bitmap_size")? {
            caps.max_bitmap_size = n;
        }
    }
    caps.identity = c.get(CAP_IDENTITY).and_then(|v| v.as_str()).map(str::to_string);
    Ok((major, minor, caps))
}

/// Append a `u32` in little endian.
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Append a `u64` in little endian.
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// `VFIO_DEVICE_FLAGS_RESET` in `VFIO_USER_DEVICE_GET_INFO`: the device can be reset.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `VFIO_DEVICE_FLAGS_PCI` in `VFIO_USER_DEVICE_GET_INFO`: a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_READ`.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`: the region may be mapped (with the file descriptor the server
/// sends with the region info).
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_REGION_INFO_FLAG_CAPS`: the region info carries a capability chain.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`: the areas of a region that may be mapped.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// The size of `struct vfio_region_info` without its capabilities.
pub const REGION_INFO_LEN: usize = 32;
/// The most regions a device may report (a PCI device has 9, plus device-specific ones).
pub const MAX_REGIONS: u32 = 64;
/// The most capabilities one region info may chain.
pub const MAX_REGION_CAPS: usize = 16;
/// `VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE`.
pub const DMA_MAP_READ_WRITE: u32 = (1 << 0) | (1 << 1);
/// `VFIO_IRQ_SET_DATA_EVENTFD`: SET_IRQS carries eventfds.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;

/// `VFIO_USER_DEVICE_GET_INFO`'s reply (`struct vfio_user_device_info` after `argsz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*` ([`DEVICE_FLAGS_PCI`], [`DEVICE_FLAGS_RESET`]).
    pub flags: u32,
    /// How many regions the device has.
    pub num_regions: u32,
    /// How many IRQ indexes the device has.
    pub num_irqs: u32,
}

/// The `VFIO_USER_DEVICE_GET_INFO` request: `{argsz 16, flags, num_regions, num_irqs}`, zeroed.
pub fn encode_device_info_request() -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    for v in [16, 0, 0, 0] {
        put_u32(&mut out, v);
    }
    out
}

/// Decode a `VFIO_USER_DEVICE_GET_INFO` reply.
pub fn decode_device_info(payload: &[u8]) -> Result<DeviceInfo, ProtocolError> {
    let mut c = Cursor::new(payload);
    let argsz = c.u32("device info argsz")?;
    if (argsz as usize) < 16 {
        return Err(ProtocolError::Malformed(format!("device info argsz {argsz}")));
    }
    Ok(DeviceInfo {
        flags: c.u32("device info flags")?,
        num_regions: c.u32("num_regions")?,
        num_irqs: c.u32("num_irqs")?,
    })
}

/// One area of a region that may be mapped (`struct vfio_region_sparse_mmap_area`), relative to
/// the region's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseArea {
    /// The area's offset inside the region.
    pub offset: u64,
    /// The area's length in bytes.
    pub size: u64,
}

/// `VFIO_USER_DEVICE_GET_REGION_INFO`'s reply (`struct vfio_region_info` and its capabilities).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The size of the whole info the server has (more than [`REGION_INFO_LEN`] when it has
    /// capabilities; larger than the request's `argsz` when they did not fit).
    pub argsz: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// The region index.
    pub index: u32,
    /// The offset of the first capability from the start of the info (0: none).
    pub cap_offset: u32,
    /// The region's size in bytes.
    pub size: u64,
    /// The offset to map the region at in the file descriptor sent with the reply.
    pub offset: u64,
    /// The sparse mmap areas ([`REGION_INFO_CAP_SPARSE_MMAP`]), when the chain has them.
    pub sparse_areas: Vec<SparseArea>,
}

/// The `VFIO_USER_DEVICE_GET_REGION_INFO` request for region `index`, with room for `argsz`
/// bytes of info (at least [`REGION_INFO_LEN`]).
pub fn encode_region_info_request(index: u32, argsz: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(REGION_INFO_LEN);
    for v in [argsz.max(REGION_INFO_LEN as u32), 0, index, 0] {
        put_u32(&mut out, v);
    }
    put_u64(&mut out, 0);
    put_u64(&mut out, 0);
    out
}

/// Decode a `VFIO_USER_DEVICE_GET_REGION_INFO` reply, with the capability chain when the
/// [`REGION_INFO_FLAG_CAPS`] flag says it is there: every capability must lie within the payload
/// and each `next` must point forward (no loops), at most [`MAX_REGION_CAPS`] of them; unknown
/// capabilities are skipped. A sparse mmap capability's areas are counted against the payload
/// before anything is allocated for them.
pub fn decode_region_info(payload: &[u8]) -> Result<RegionInfo, ProtocolError> {
    let mut c = Cursor::new(payload);
    let argsz = c.u32("region info argsz")?;
    let flags = c.u32("region info flags")?;
    let index = c.u32("region index")?;
    let cap_offset = c.u32("cap_offset")?;
    let size = c.u64("region size")?;
    let offset = c.u64("region offset")?;
    let mut info = RegionInfo {
        argsz,
        flags,
        index,
        cap_offset,
        size,
        offset,
        sparse_areas: Vec::new(),
    };
    if flags & REGION_INFO_FLAG_CAPS == 0 || cap_offset == 0 {
        return Ok(info);
    }
    let mut at = cap_offset as usize;
    for _ in 0..MAX_REGION_CAPS {
        if at < REGION_INFO_LEN {
            return Err(ProtocolError::Malformed(format!(
                "region {index}: a capability at offset {at}, inside the region info"
            )));
        }
        let cap = payload.get(at..).ok_or_else(|| {
            ProtocolError::Malformed(format!(
                "region {index}: a capability at offset {at} past the {} bytes of info",
                payload.len()
            ))
        })?;
        let mut h = Cursor::new(cap);
        let id_version = h.u32("capability header")?;
        let next = h.u32("capability next")?;
        if id_version as u16 == REGION_INFO_CAP_SPARSE_MMAP {
            let nr = h.u32("nr_areas")? as usize;
            h.u32("sparse mmap reserved")?;
            let areas = h.rest();
            if nr > areas.len() / 16 {
                return Err(ProtocolError::Malformed(format!(
                    "region {index}: {nr} sparse mmap areas in {} bytes",
                    areas.len()
                )));
            }
            let mut a = Cursor::new(areas);
            info.sparse_areas.reserve(nr);
            for _ in 0..nr {
                info.sparse_areas.push(SparseArea {
                    offset: a.u64("area offset")?,
                    size: a.u64("area size")?,
                });
            }
        }
        if next == 0 {
            return Ok(info);
        }
        if next as usize <= at {
            return Err(ProtocolError::Malformed(format!(
                "region {index}: capability at {at} points back to {next}"
            )));
        }
        at = next as usize;
    }
    Err(ProtocolError::Malformed(format!(
        "region {index}: more than {MAX_REGION_CAPS} capabilities"
    )))
}

/// A region access's `{offset u64, region u32, count u32}` (`VFIO_USER_REGION_READ` / `WRITE`
/// request, and the start of their replies).
pub fn encode_region_access(offset: u64, region: u32, count: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    put_u64(&mut out, offset);
    put_u32(&mut out, region);
    put_u32(&mut out, count);
    out
}

/// Read a region access's `(offset, region, count)`.
pub fn decode_region_access(c: &mut Cursor<'_>) -> Result<(u64, u32, u32), ProtocolError> {
    Ok((c.u64("offset")?, c.u32("region")?, c.u32("count")?))
}

/// `VFIO_USER_DEVICE_GET_IRQ_INFO`'s reply (`struct vfio_irq_info` after `argsz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// The IRQ index (`VFIO_PCI_*_IRQ_INDEX`).
    pub index: u32,
    /// `VFIO_IRQ_INFO_*` flags.
    pub flags: u32,
    /// How many vectors the index has.
    pub count: u32,
}

/// The `VFIO_USER_DEVICE_GET_IRQ_INFO` request for IRQ index `index`.
pub fn encode_irq_info_request(index: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    for v in [16, 0, index, 0] {
        put_u32(&mut out, v);
    }
    out
}

/// Decode a `VFIO_USER_DEVICE_GET_IRQ_INFO` reply.
pub fn decode_irq_info(payload: &[u8]) -> Result<IrqInfo, ProtocolError> {
    let mut c = Cursor::new(payload);
    c.u32("irq info argsz")?;
    let flags = c.u32("irq info flags")?;
    let index = c.u32("irq index")?;
    let count = c.u32("irq count")?;
    Ok(IrqInfo { index, flags, count })
}

/// The `VFIO_USER_DEVICE_SET_IRQS` request `{argsz 20, flags, index, start, count}` (the
/// eventfds go by `SCM_RIGHTS`).
pub fn encode_set_irqs(flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    for v in [20, flags, index, start, count] {
        put_u32(&mut out, v);
    }
    out
}

/// The `VFIO_USER_DMA_MAP` request `{argsz 32, flags, offset, address, size}` (the memory's file
/// descriptor goes by `SCM_RIGHTS`).
pub fn encode_dma_map(flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    put_u32(&mut out, 32);
    put_u32(&mut out, flags);
    put_u64(&mut out, offset);
    put_u64(&mut out, iova);
    put_u64(&mut out, size);
    out
}

/// The `VFIO_USER_DMA_UNMAP` request `{argsz 24, flags, address, size}` (the reply echoes it).
pub fn encode_dma_unmap(flags: u32, iova: u64, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    put_u32(&mut out, 24);
    put_u32(&mut out, flags);
    put_u64(&mut out, iova);
    put_u64(&mut out, size);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            msg_id: 0x1234,
            command: CMD_DEVICE_FEATURE,
            size: 40,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error_no: 22,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..4], &[0x34, 0x12, 16, 0]);
        assert_eq!(Header::from_bytes(&b), h);
        assert!(h.is_error());
    }

    #[test]
    fn short_and_long_messages_are_refused_before_allocation() {
        let h = Header {
            size: 8,
            ..Default::default()
        };
        let e = read_header(&mut &h.to_bytes()[..]).unwrap_err();
        assert!(matches!(e, ProtocolError::BadHeader(_)), "{e}");
        let h = Header {
            size: u32::MAX,
            ..Default::default()
        };
        let mut r = &h.to_bytes()[..];
        let got = read_header(&mut r).unwrap().unwrap();
        let e = read_payload(&mut r, &got, MAX_CONTROL_MSG).unwrap_err();
        assert!(matches!(e, ProtocolError::TooLong { size: u32::MAX, .. }), "{e}");
        assert!(read_header(&mut &[][..]).unwrap().is_none());
        let tiny = Header {
            size: 3,
            ..Default::default()
        };
        assert!(matches!(
            read_payload(&mut &[][..], &tiny, 64),
            Err(ProtocolError::BadHeader(_))
        ));
        assert!(matches!(read_header(&mut &[1u8, 2][..]), Err(ProtocolError::Closed)));
    }

    #[test]
    fn version_json_round_trips_and_defaults() {
        let caps = Capabilities {
            max_data_xfer_size: 4096,
            identity: Some("emulated:size=1".into()),
            ..Default::default()
        };
        let (ma, mi, got) = decode_version(&encode_version(&caps)).unwrap();
        assert_eq!((ma, mi), (VERSION_MAJOR, VERSION_MINOR));
        assert_eq!(got, caps);
        let mut bare = vec![0, 0, 1, 0];
        bare.extend_from_slice(b"{\"capabilities\":{}}\0");
        assert_eq!(
            decode_version(&bare).unwrap().2.max_data_xfer_size,
            DEFAULT_MAX_DATA_XFER
        );
        let mut bad = vec![0, 0, 1, 0];
        bad.extend_from_slice(b"{\"capabilities\":{\"max_data_xfer_size\":\"x\"}}");
        assert!(decode_version(&bad).is_err());
        assert!(decode_version(&[1]).is_err());
    }

    #[test]
    fn region_info_with_a_sparse_mmap_chain() {
        let mut p = Vec::new();
        for v in [
            32 + 8 + 8 + 32 + 8,
            REGION_INFO_FLAG_READ | REGION_INFO_FLAG_MMAP | REGION_INFO_FLAG_CAPS,
            2,
            32,
        ] {
            put_u32(&mut p, v);
        }
        put_u64(&mut p, 0x4000);
        put_u64(&mut p, 0x1000);
        // An unknown capability (id 9), then the sparse mmap one with two areas.
        put_u32(&mut p, 9 | (1 << 16));
        put_u32(&mut p, 40);
        put_u32(&mut p, u32::from(REGION_INFO_CAP_SPARSE_MMAP) | (1 << 16));
        put_u32(&mut p, 0);
        put_u32(&mut p, 2);
        put_u32(&mut p, 0);
        for v in [0, 0x1000, 0x3000, 0x1000] {
            put_u64(&mut p, v);
        }
        let info = decode_region_info(&p).unwrap();
        assert_eq!((info.index, info.size, info.offset), (2, 0x4000, 0x1000));
        assert_eq!(
            info.sparse_areas,
            vec![
                SparseArea {
                    offset: 0,
                    size: 0x1000
                },
                SparseArea {
                    offset: 0x3000,
                    size: 0x1000
                }
            ]
        );
        // A huge area count, a loop and a capability past the end are refused.
        let mut huge = p.clone();
        huge[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_region_info(&huge), Err(ProtocolError::Malformed(_))));
        let mut looped = p.clone();
        looped[44..48].copy_from_slice(&32u32.to_le_bytes());
        assert!(matches!(decode_region_info(&looped), Err(ProtocolError::Malformed(_))));
        let mut past = p.clone();
        past[12..16].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(decode_region_info(&past), Err(ProtocolError::Malformed(_))));
        assert!(decode_region_info(&p[..20]).is_err());
        // Without the CAPS flag the chain is not read.
        let mut plain = p.clone();
        plain[4..8].copy_from_slice(&REGION_INFO_FLAG_READ.to_le_bytes());
        assert!(decode_region_info(&plain).unwrap().sparse_areas.is_empty());
    }

    #[test]
    fn device_and_irq_info_decode() {
        let mut p = Vec::new();
        for v in [16, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET, 9, 5] {
            put_u32(&mut p, v);
        }
        let d = decode_device_info(&p).unwrap();
        assert_eq!((d.flags, d.num_regions, d.num_irqs), (3, 9, 5));
        assert!(decode_device_info(&p[..12]).is_err());
        let irq = decode_irq_info(&p).unwrap();
        assert_eq!((irq.flags, irq.index, irq.count), (3, 9, 5));
        assert_eq!(encode_set_irqs(1, 2, 3, 4).len(), 20);
        assert_eq!(encode_dma_map(3, 0, 0x1000, 0x2000).len(), 32);
        assert_eq!(encode_dma_unmap(0, 0x1000, 0x2000).len(), 24);
        assert_eq!(encode_region_info_request(7, 0)[..4], 32u32.to_le_bytes());
    }
}
