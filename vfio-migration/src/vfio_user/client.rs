//! The client: a [`MigrationDevice`] served by a vfio-user server over a UNIX socket.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::codec::{self, Capabilities, Cursor, HEADER_LEN, ProtocolError};
use super::conn::{Conn, Negotiated, lock};
use super::identity_from_cap;
use crate::device::{
    DeviceError, DeviceIdentity, DmaRange, ErrorKind, MigrationDevice, Operation, PrecopyInfo, ReadOutcome,
    SessionPhase, TransferSession,
};
use crate::state::{self, DeviceState, MigrationFlags, SessionKind};

/// How long the client waits for a reply before it gives up on the server (30 s).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest `VFIO_USER_MIG_DATA_WRITE` chunk (32 KiB), whatever `max_data_xfer_size` says:
/// libvfio-user reads a message body with one `recv()`, and the kernel queues a UNIX stream
/// message in pieces (about half the send buffer, or 32 KiB of pages on some kernels), so a
/// larger message may arrive in parts and fail (the C peer's tests saw 128 KiB fail now and then,
/// 32 KiB never).
pub const MAX_WRITE_CHUNK: usize = 32 << 10;

/// The PCI identity from the first 0x30 bytes of config space (`VFIO_USER_REGION_READ` of
/// region 7): vendor and device ID at 0 and 2, subsystem vendor and subsystem ID at 0x2c and 0x2e.
fn pci_identity(conn: &mut Conn) -> Result<DeviceIdentity, ProtocolError> {
    const COUNT: u32 = 0x30;
    let mut req = Vec::with_capacity(16);
    codec::put_u64(&mut req, 0);
    codec::put_u32(&mut req, codec::PCI_CONFIG_REGION);
    codec::put_u32(&mut req, COUNT);
    let reply = conn.request(codec::CMD_REGION_READ, &[&req], HEADER_LEN as u32 + 16 + COUNT)?;
    let mut c = Cursor::new(&reply);
    let echo = (c.u64("offset")?, c.u32("region")?, c.u32("count")?);
    if echo != (0, codec::PCI_CONFIG_REGION, COUNT) {
        return Err(ProtocolError::Malformed(format!(
            "config space read answered for {echo:?}"
        )));
    }
    let cfg = c.bytes(COUNT as usize, "config space")?;
    let word = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    if word(0) == 0xffff || word(0) == 0 {
        return Err(ProtocolError::Malformed(format!("vendor ID {:#06x}", word(0))));
    }
    Ok(DeviceIdentity::Pci {
        vendor: word(0),
        device: word(2),
        subsystem_vendor: word(0x2c),
        subsystem_device: word(0x2e),
    })
}

/// A [`ProtocolError`] as the engine's [`DeviceError`] for `device` and `op`: an error reply
/// or a socket error keeps its errno ([`DeviceError::raw_os_error`]), anything else is an
/// invalid answer.
pub fn device_error(device: &str, op: Operation, e: ProtocolError) -> DeviceError {
    match e {
        ProtocolError::Remote { errno } => DeviceError::errno(device, op, errno as i32),
        ProtocolError::Io(io) => DeviceError::io(device, op, io),
        other => DeviceError::new(device, op, ErrorKind::InvalidAnswer(other.to_string())),
    }
}

/// A device behind a vfio-user server, migrated with migration v2 over the socket.
///
/// All data moves in-band (`VFIO_USER_MIG_DATA_READ` / `WRITE`) in chunks of at most the
/// server's `max_data_xfer_size`. The protocol has neither pre-copy info nor a stop-copy size:
/// [`MigrationDevice::stop_copy_size`] fails with `EOPNOTSUPP` (the engine then assumes a large
/// state, as QEMU does) except in PRE_COPY after a complete pass (reads until a short one), where
/// it is what that pass read, and a session's [`TransferSession::precopy_info`] is derived from the
/// reads: 1 byte of initial data until the first short read, 1 dirty byte after a full read,
/// 0 after a short one. P2P is never offered (the P2P flag is masked out).
#[derive(Debug)]
pub struct VfioUserDevice {
    name: String,
    conn: Arc<Mutex<Conn>>,
    caps: Capabilities,
    identity: DeviceIdentity,
    max_xfer: u32,
    phase: SessionPhase,
    /// Bytes the last complete pre-copy pass read (between two short reads) in the open saving
    /// session: the client's stop-copy estimate while in PRE_COPY.
    last_pass: Arc<Mutex<Option<u64>>>,
}

impl VfioUserDevice {
    /// Connect to the vfio-user server listening at `path`, negotiate the version and
    /// capabilities and read the device state. The device is not changed. Errors name the
    /// device as `vfio-user:PATH` with [`Operation::Open`] (or the operation that failed).
    pub fn connect(path: &Path) -> Result<Self, DeviceError> {
        let name = format!("vfio-user:{}", path.display());
        let stream = UnixStream::connect(path).map_err(|e| DeviceError::io(&name, Operation::Open, e))?;
        Self::from_stream(name, stream)
    }

    /// Use an already connected `stream` (e.g. one end of a socket pair) to a server; `name`
    /// names the device in errors.
    pub fn from_stream(name: impl Into<String>, stream: UnixStream) -> Result<Self, DeviceError> {
        let name = name.into();
        let (conn, negotiated) = Conn::open(&name, stream)?;
        Ok(Self::from_conn(name, Arc::new(Mutex::new(conn)), &negotiated))
    }

    /// The device on an open connection (shared with a [`super::VfioUserClient`]): its identity
    /// (the one our server tells, else the PCI IDs from config space, else unknown) and state.
    pub(crate) fn from_conn(name: String, conn: Arc<Mutex<Conn>>, negotiated: &Negotiated) -> Self {
        let caps = negotiated.caps.clone();
        let max_xfer = negotiated.max_xfer;
        // The identity our server tells, else the PCI IDs from config space (libvfio-user
        // devices), else unknown.
        let identity = match caps.identity.as_deref() {
            Some(id) => identity_from_cap(id),
            None => pci_identity(&mut lock(&conn)).unwrap_or_else(|e| {
                log::debug!("{name}: no PCI identity from config space: {e}");
                DeviceIdentity::Unknown
            }),
        };
        let dev = Self {
            name,
            conn,
            caps,
            identity,
            max_xfer,
            phase: SessionPhase::new(DeviceState::Running),
            last_pass: Arc::new(Mutex::new(None)),
        };
        // Learn the current state (a device that cannot migrate answers with an error: it stays
        // "RUNNING" here and its flags() fails).
        if let Ok(s) = dev.state() {
            dev.phase.set_state(s);
        }
        dev
    }

    /// The capabilities the server announced.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The largest data chunk per message (`max_data_xfer_size`, capped at
    /// [`codec::MAX_DATA_XFER_LIMIT`]).
    pub fn max_data_xfer_size(&self) -> u32 {
        self.max_xfer
    }

    /// `VFIO_USER_DEVICE_FEATURE` with `flags` and `data`; returns the reply's data (after
    /// argsz and flags). `reply_data` is the most data the reply may carry.
    fn feature(&self, op: Operation, flags: u32, data: &[u8], reply_data: usize) -> Result<Vec<u8>, DeviceError> {
        let argsz = 8 + data.len().max(reply_data);
        let argsz = u32::try_from(argsz)
            .map_err(|_| DeviceError::new(&self.name, op, ErrorKind::InvalidRequest(format!("argsz {argsz}"))))?;
        let mut head = Vec::with_capacity(8);
        codec::put_u32(&mut head, argsz);
        codec::put_u32(&mut head, flags);
        let max_reply = (HEADER_LEN + 8 + reply_data).min(u32::MAX as usize) as u32;
        let reply = lock(&self.conn)
            .request(codec::CMD_DEVICE_FEATURE, &[&head, data], max_reply)
            .map_err(|e| device_error(&self.name, op, e))?;
        let mut c = Cursor::new(&reply);
        let check = |r: Result<u32, ProtocolError>| r.map_err(|e| device_error(&self.name, op, e));
        check(c.u32("feature argsz"))?;
        let got = check(c.u32("feature flags"))?;
        if got & codec::FEATURE_MASK != flags & codec::FEATURE_MASK {
            return Err(DeviceError::new(
                &self.name,
                op,
                ErrorKind::InvalidAnswer(format!(
                    "reply for feature {} to a request for feature {}",
                    got & codec::FEATURE_MASK,
                    flags & codec::FEATURE_MASK
                )),
            ));
        }
        Ok(c.rest().to_vec())
    }

    fn invalid(&self, op: Operation, what: String) -> DeviceError {
        DeviceError::new(&self.name, op, ErrorKind::InvalidAnswer(what))
    }

    /// The flags as the engine uses them (P2P masked out).
    fn migration_flags(&self) -> Result<MigrationFlags, DeviceError> {
        let op = Operation::GetFlags;
        let data = self.feature(op, codec::FEATURE_GET | codec::FEATURE_MIGRATION, &[0; 8], 8)?;
        let bits = Cursor::new(&data)
            .u64("migration flags")
            .map_err(|e| device_error(&self.name, op, e))?;
        Ok(MigrationFlags::from_bits(bits & !MigrationFlags::P2P.bits()))
    }
}

impl MigrationDevice for VfioUserDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> DeviceIdentity {
        self.identity.clone()
    }

    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        self.migration_flags()
    }

    fn state(&self) -> Result<DeviceState, DeviceError> {
        let op = Operation::GetState;
        let data = self.feature(op, codec::FEATURE_GET | codec::FEATURE_MIG_DEVICE_STATE, &[0; 8], 8)?;
        let raw = Cursor::new(&data)
            .u32("device_state")
            .map_err(|e| device_error(&self.name, op, e))?;
        let s = DeviceState::from_raw(raw).map_err(|_| self.invalid(op, format!("unknown device state {raw}")))?;
        if s != self.phase.state() {
            self.phase.set_state(s);
        }
        Ok(s)
    }

    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        let from = self.phase.state();
        let op = Operation::SetState { from, to };
        let flags = self.migration_flags()?;
        let path = state::path(from, to, flags).map_err(|e| DeviceError::new(&self.name, op, ErrorKind::State(e)))?;
        let opens = path.windows(2).filter_map(|a| a[0].arc_opens(a[1])).next_back();
        let mut data = Vec::with_capacity(8);
        codec::put_u32(&mut data, to.as_raw());
        codec::put_u32(&mut data, u32::MAX);
        if let Err(e) = self.feature(op, codec::FEATURE_SET | codec::FEATURE_MIG_DEVICE_STATE, &data, 8) {
            // Learn where the server left the device (a failed path may stop part way or in ERROR).
            match self.state() {
                Ok(_) => {}
                Err(_) => self.phase.close_session(DeviceState::Error),
            }
            return Err(e);
        }
        if from == to {
            return Ok(None);
        }
        Ok(match opens {
            Some(kind) => {
                *self.last_pass.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let generation = self.phase.open_session(to);
                Some(Box::new(VfioUserSession {
                    name: self.name.clone(),
                    conn: Arc::clone(&self.conn),
                    phase: self.phase.clone(),
                    generation,
                    kind,
                    max_xfer: self.max_xfer,
                    short_in: None,
                    drained_once: false,
                    last_drained: false,
                    pass_bytes: 0,
                    last_pass: Arc::clone(&self.last_pass),
                }) as Box<dyn TransferSession>)
            }
            None => {
                self.phase.set_state(to);
                None
            }
        })
    }

    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        // vfio-user has no VFIO_DEVICE_FEATURE_MIG_DATA_SIZE. In PRE_COPY, what the last
        // complete pass read (what changed between two passes) is what stop-copy would read.
        if matches!(self.phase.state(), DeviceState::PreCopy | DeviceState::PreCopyP2p)
            && let Some(n) = *self.last_pass.lock().unwrap_or_else(|e| e.into_inner())
        {
            return Ok(n);
        }
        Err(DeviceError::errno(
            &self.name,
            Operation::StopCopySize,
            libc::EOPNOTSUPP,
        ))
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        let op = Operation::Reset;
        lock(&self.conn)
            .request(codec::CMD_DEVICE_RESET, &[], codec::MAX_CONTROL_MSG)
            .map_err(|e| device_error(&self.name, op, e))?;
        self.phase.close_session(DeviceState::Running);
        // libvfio-user's reset leaves the migration state alone (a device in RESUMING stays
        // there): the uAPI's reset ends in RUNNING, so ask for it (the server walks the path).
        let after = self.state().map_err(|e| DeviceError::new(&self.name, op, e.kind))?;
        if after != DeviceState::Running {
            let mut data = Vec::with_capacity(8);
            codec::put_u32(&mut data, DeviceState::Running.as_raw());
            codec::put_u32(&mut data, u32::MAX);
            let r = self.feature(op, codec::FEATURE_SET | codec::FEATURE_MIG_DEVICE_STATE, &data, 8);
            let now = self.state().unwrap_or(DeviceState::Error);
            self.phase.close_session(now);
            r?;
            if now != DeviceState::Running {
                return Err(self.invalid(op, format!("the device is {now} after the reset (from {after})")));
            }
        }
        Ok(())
    }

    fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError> {
        let op = Operation::DmaLogStart;
        let n = u32::try_from(ranges.len())
            .ok()
            .filter(|&n| (n as u64) * 16 + 64 <= self.max_xfer as u64)
            .ok_or_else(|| {
                DeviceError::new(
                    &self.name,
                    op,
                    ErrorKind::InvalidRequest(format!("{} ranges", ranges.len())),
                )
            })?;
        let mut data = Vec::with_capacity(16 + ranges.len() * 16);
        codec::put_u64(&mut data, page_size);
        codec::put_u32(&mut data, n);
        codec::put_u32(&mut data, 0);
        for r in ranges {
            codec::put_u64(&mut data, r.iova);
            codec::put_u64(&mut data, r.length);
        }
        let reply = self.feature(op, codec::FEATURE_SET | codec::FEATURE_DMA_LOGGING_START, &data, 16)?;
        if reply.len() >= 8 {
            let chosen = Cursor::new(&reply)
                .u64("page_size")
                .map_err(|e| device_error(&self.name, op, e))?;
            if chosen != 0 {
                return Ok(chosen);
            }
        }
        Ok(page_size)
    }

    fn dma_log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        let op = Operation::DmaLogReport;
        let bad = |what: String| DeviceError::new(&self.name, op, ErrorKind::InvalidRequest(what));
        if !page_size.is_power_of_two() || length == 0 {
            return Err(bad(format!("length {length}, page size {page_size}")));
        }
        let pages = length.div_ceil(page_size);
        let words = usize::try_from(pages.div_ceil(64)).map_err(|_| bad(format!("{pages} pages")))?;
        if bitmap.len() < words {
            return Err(bad(format!("a bitmap of {} words for {pages} pages", bitmap.len())));
        }
        let mut data = Vec::with_capacity(24);
        codec::put_u64(&mut data, iova);
        codec::put_u64(&mut data, length);
        codec::put_u64(&mut data, page_size);
        let reply = self.feature(
            op,
            codec::FEATURE_GET | codec::FEATURE_DMA_LOGGING_REPORT,
            &data,
            24 + words * 8,
        )?;
        let mut c = Cursor::new(&reply);
        let echo = (|| Ok::<_, ProtocolError>((c.u64("iova")?, c.u64("length")?, c.u64("page_size")?)))()
            .map_err(|e| device_error(&self.name, op, e))?;
        if echo != (iova, length, page_size) {
            return Err(self.invalid(
                op,
                format!("report for {echo:?}, asked for {:?}", (iova, length, page_size)),
            ));
        }
        let bits = c.rest();
        if bits.len() != words * 8 {
            return Err(self.invalid(op, format!("a bitmap of {} bytes for {pages} pages", bits.len())));
        }
        for (w, b) in bitmap.iter_mut().zip(bits.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            *w |= u64::from_le_bytes(le);
        }
        Ok(())
    }

    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        self.feature(
            Operation::DmaLogStop,
            codec::FEATURE_SET | codec::FEATURE_DMA_LOGGING_STOP,
            &[0; 16],
            16,
        )?;
        Ok(())
    }
}

/// A transfer session over the socket (`VFIO_USER_MIG_DATA_READ` / `WRITE`).
#[derive(Debug)]
struct VfioUserSession {
    name: String,
    conn: Arc<Mutex<Conn>>,
    phase: SessionPhase,
    generation: u32,
    kind: SessionKind,
    max_xfer: u32,
    /// The state in which the last read came back short (no more data for now, or the end).
    short_in: Option<DeviceState>,
    /// Whether a read came back short in this session (the initial data has been read).
    drained_once: bool,
    /// Whether the last read came back short.
    last_drained: bool,
    /// Bytes read in PRE_COPY since the last short read.
    pass_bytes: u64,
    /// Where a complete pass's bytes go ([`VfioUserDevice::stop_copy_size`]).
    last_pass: Arc<Mutex<Option<u64>>>,
}

impl VfioUserSession {
    fn open_state(&self, op: Operation) -> Result<DeviceState, DeviceError> {
        self.phase
            .session_state(self.generation, self.kind)
            .ok_or_else(|| DeviceError::new(&self.name, op, ErrorKind::SessionClosed))
    }
}

impl TransferSession for VfioUserSession {
    fn kind(&self) -> SessionKind {
        self.kind
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        let op = Operation::Read;
        let state = self.open_state(op)?;
        if self.kind != SessionKind::Saving {
            return Err(DeviceError::new(
                &self.name,
                op,
                ErrorKind::InvalidRequest("read from a resuming session".into()),
            ));
        }
        let precopy = matches!(state, DeviceState::PreCopy | DeviceState::PreCopyP2p);
        if self.short_in == Some(state) {
            // A reply shorter than asked means no more data: nothing now in PRE_COPY (ask again
            // next time), the end in STOP_COPY.
            if precopy {
                self.short_in = None;
                return Ok(ReadOutcome::NothingNow);
            }
            return Ok(ReadOutcome::End);
        }
        let want = buf.len().min(self.max_xfer as usize);
        if want == 0 {
            return Err(DeviceError::new(
                &self.name,
                op,
                ErrorKind::InvalidRequest("an empty buffer".into()),
            ));
        }
        let mut req = Vec::with_capacity(8);
        codec::put_u32(&mut req, 8 + want as u32);
        codec::put_u32(&mut req, want as u32);
        let reply = lock(&self.conn)
            .request(codec::CMD_MIG_DATA_READ, &[&req], (HEADER_LEN + 8 + want) as u32)
            .map_err(|e| device_error(&self.name, op, e))?;
        let mut c = Cursor::new(&reply);
        let size = (|| {
            c.u32("argsz")?;
            c.u32("size")
        })()
        .map_err(|e| device_error(&self.name, op, e))? as usize;
        let data = c.rest();
        // libvfio-user pads a short reply to the length asked for: `size` tells the data, the
        // rest is ignored.
        if size > want || data.len() < size || data.len() > want {
            return Err(DeviceError::new(
                &self.name,
                op,
                ErrorKind::InvalidAnswer(format!("{} data bytes, size {size}, for a read of {want}", data.len())),
            ));
        }
        buf[..size].copy_from_slice(&data[..size]);
        if precopy {
            self.pass_bytes += size as u64;
        }
        if size < want {
            if precopy {
                *self.last_pass.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.pass_bytes);
                self.pass_bytes = 0;
            }
            self.drained_once |= precopy;
            self.last_drained = true;
            if size == 0 {
                return Ok(if precopy {
                    ReadOutcome::NothingNow
                } else {
                    self.short_in = Some(state);
                    ReadOutcome::End
                });
            }
            self.short_in = Some(state);
        } else {
            self.last_drained = false;
        }
        Ok(ReadOutcome::Data(size))
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let op = Operation::Write;
        self.open_state(op)?;
        if self.kind != SessionKind::Resuming {
            return Err(DeviceError::new(
                &self.name,
                op,
                ErrorKind::InvalidRequest("write to a saving session".into()),
            ));
        }
        let n = buf.len().min(self.max_xfer as usize).min(MAX_WRITE_CHUNK);
        let mut req = Vec::with_capacity(8);
        codec::put_u32(&mut req, 8 + n as u32);
        codec::put_u32(&mut req, n as u32);
        lock(&self.conn)
            .request(codec::CMD_MIG_DATA_WRITE, &[&req, &buf[..n]], codec::MAX_CONTROL_MSG)
            .map_err(|e| device_error(&self.name, op, e))?;
        Ok(n)
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        let op = Operation::PrecopyInfo;
        let state = self.open_state(op)?;
        if !matches!(state, DeviceState::PreCopy | DeviceState::PreCopyP2p) {
            return Err(DeviceError::errno(&self.name, op, libc::EINVAL));
        }
        Ok(PrecopyInfo {
            initial_bytes: u64::from(!self.drained_once),
            dirty_bytes: u64::from(!self.last_drained),
            reinit: false,
        })
    }
}
