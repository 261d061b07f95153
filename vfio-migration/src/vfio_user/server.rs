//! The server: one [`MigrationDevice`] served to vfio-user clients, one connection at a time.
//!
//! It answers version negotiation, `VFIO_USER_DEVICE_FEATURE` (MIGRATION, MIG_DEVICE_STATE,
//! DMA_LOGGING_START/STOP/REPORT), `VFIO_USER_MIG_DATA_READ` / `WRITE`, device reset, and what a
//! VMM (Cloud Hypervisor's `vfio_user` client) needs to attach the device as a PCI device: device
//! and region info, `VFIO_USER_REGION_READ` / `WRITE` of a real config space ([`super::pci`],
//! region 7) and of the register block ([`super::regs`]) that BAR0 (region 0) and the I/O BAR2
//! (region 2) show; the other regions are empty), DMA_MAP / DMA_UNMAP with the memory's file descriptor ([`super::dma`]), IRQ info
//! without IRQs, and SET_IRQS (accepted; the eventfds it carries are closed). File descriptors
//! come with a message's header (`recvmsg`); any the command does not keep is closed.
//!
//! A message with a bad header or a length over the cap ends its connection (after an error
//! reply when one can be sent); an unknown command gets an `ENOSYS` error reply, a bad request
//! (a region access out of bounds, a bogus DMA range) an error reply. Either way the server then
//! serves the next connection. The connection's DMA mappings are unmapped when it ends; its
//! config space and BAR0's `DMA_*` registers start afresh on the next one.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::codec::{self, Capabilities, Cursor, HEADER_LEN, Header, ProtocolError};
use super::dma::{DmaEngine, DmaMappings};
use super::identity_to_cap;
use super::model::{DeviceModel, NoModel};
use super::pci::{BAR0_SIZE, BAR2_SIZE, CONFIG_SIZE, ConfigSpace};
use super::regs::Bar0;
use crate::device::{DeviceError, DmaRange, MigrationDevice, ReadOutcome, TransferSession};
use crate::state::{DeviceState, MigrationFlags, SessionKind};

/// How a [`Server`] serves.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The largest data chunk per message it announces and accepts (`max_data_xfer_size`).
    pub max_data_xfer_size: u32,
    /// How long the rest of a message may take once its header began to arrive, and how long a
    /// reply may wait for the client to take it.
    pub message_timeout: Duration,
    /// How long a STOP_COPY read may wait for the device to produce data before the reply
    /// (which a short reply would end) fails instead.
    pub stop_copy_wait: Duration,
    /// Pad a short `VFIO_USER_MIG_DATA_READ` reply to the length asked for, as libvfio-user does
    /// (`size` still tells the data). Off by default; tests use it to check a client copes.
    pub pad_short_reads: bool,
    /// Serve the device without migration: the migration features, MIG_DATA_READ and
    /// MIG_DATA_WRITE answer `ENOTTY`, as a vfio-user server without migration support does
    /// (for testing how a VMM treats a device whose state cannot move). Off by default.
    pub no_migration: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_data_xfer_size: codec::DEFAULT_MAX_DATA_XFER,
            message_timeout: Duration::from_secs(10),
            stop_copy_wait: Duration::from_secs(5),
            pad_short_reads: false,
            no_migration: false,
        }
    }
}

/// Regions a client sees (a PCI device's 9: BARs, ROM, config, VGA); BAR0, BAR2 and config
/// space have a size, the others are empty.
const NUM_REGIONS: u32 = 9;
/// BAR0's region index (`VFIO_PCI_BAR0_REGION_INDEX`).
const BAR0_REGION: u32 = 0;
/// BAR2's region index (`VFIO_PCI_BAR2_REGION_INDEX`): BAR0's registers as I/O ports.
const BAR2_REGION: u32 = 2;
/// `VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE`.
const REGION_RW: u32 = codec::REGION_INFO_FLAG_READ | codec::REGION_INFO_FLAG_WRITE;
/// `VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE`.
const DMA_MAP_FLAGS: u32 = codec::DMA_MAP_READ_WRITE;
/// `VFIO_DMA_UNMAP_FLAG_ALL`.
const DMA_UNMAP_ALL: u32 = 1 << 2;
/// IRQ indexes a client sees (a PCI device's 5), none with vectors.
const NUM_IRQS: u32 = 5;
/// `VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI`.
const DEVICE_FLAGS: u32 = codec::DEVICE_FLAGS_RESET | codec::DEVICE_FLAGS_PCI;

/// Serves one device to vfio-user clients over UNIX sockets, one connection at a time (another
/// that connects meanwhile is served next if the first leaves within [`BUSY_GRACE`], else refused
/// with `EBUSY`). The device and its open transfer session outlive connections.
pub struct Server<D: MigrationDevice> {
    dev: D,
    session: Option<Box<dyn TransferSession>>,
    opts: ServerOptions,
    /// A client that connected while another was served, and is served next.
    next: Option<UnixStream>,
    /// What BAR0 shows and how the device writes guest memory.
    model: Box<dyn DeviceModel>,
    /// The connection's PCI side: config space, BAR0, DMA mappings and writes.
    att: Attachment,
    /// The model's content digest when the device last entered STOP_COPY, and when a load
    /// last completed (RESUMING to another state): see [`Server::migration_digests`].
    digests: MigrationDigests,
}

/// Content digests at the two points where a migration's state is fixed, as the device's
/// [`DeviceModel`] tells them (`None` until it happened, or without a model that has one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationDigests {
    /// When the device last entered STOP_COPY: the content a migration from it carries.
    pub saved: Option<u64>,
    /// When a load last left RESUMING without error: the content a migration brought.
    pub loaded: Option<u64>,
}

/// The PCI side of one connection.
#[derive(Debug)]
struct Attachment {
    config: ConfigSpace,
    bar0: Bar0,
    maps: DmaMappings,
    engine: DmaEngine,
}

impl Attachment {
    fn new(id: &crate::device::DeviceIdentity) -> Self {
        Self {
            config: ConfigSpace::new(id),
            bar0: Bar0::default(),
            maps: DmaMappings::default(),
            engine: DmaEngine::default(),
        }
    }
}

impl<D: MigrationDevice> std::fmt::Debug for Server<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("device", &self.dev.name())
            .field("session", &self.session)
            .field("opts", &self.opts)
            .field("attachment", &self.att)
            .finish_non_exhaustive()
    }
}

/// An error reply's errno.
type Errno = i32;

fn errno_of(e: &DeviceError) -> Errno {
    e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EINVAL)
}

impl<D: MigrationDevice> Server<D> {
    /// A server for `dev` with the default options.
    pub fn new(dev: D) -> Self {
        Self::with_options(dev, ServerOptions::default())
    }

    /// A server for `dev` with `opts`, without a [`DeviceModel`] ([`NoModel`]: BAR0 shows no
    /// state size or digest, `SCRATCH` is not migrated, no DMA); see [`Server::with_model`].
    pub fn with_options(dev: D, opts: ServerOptions) -> Self {
        let att = Attachment::new(&dev.identity());
        Self {
            dev,
            session: None,
            opts,
            next: None,
            model: Box::new(NoModel::default()),
            digests: MigrationDigests::default(),
            att,
        }
    }

    /// The model's content digests when the device last entered STOP_COPY and when a load last
    /// completed: what a migration from this device carried, and what one into it brought (a
    /// device's content may change afterwards, e.g. once it runs again).
    pub fn migration_digests(&self) -> MigrationDigests {
        self.digests
    }

    /// Show `model` in BAR0 and let it write guest memory (for the emulated device:
    /// [`super::EmulatedModel`]).
    pub fn with_model(mut self, model: impl DeviceModel + 'static) -> Self {
        self.model = Box::new(model);
        self
    }

    /// The served device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The served device, to change it between connections.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// Accept and serve connections on `listener` one after another, forever; a connection that
    /// fails (garbage, a timeout, a broken socket) is logged and dropped. Returns only when
    /// `accept` fails.
    pub fn serve(&mut self, listener: &UnixListener) -> io::Result<()>
    where
        D: Send,
    {
        loop {
            let _ = self.serve_one(listener)?;
        }
    }

    /// Accept one connection on `listener` and serve it until the client leaves or fails (a
    /// failure is logged); returns the connection's outcome. Meanwhile another client that
    /// connects waits up to [`BUSY_GRACE`] (it is served next if this one leaves by then), then
    /// is refused: its first message gets an `EBUSY` error reply and the connection is closed, so
    /// it fails soon instead of waiting in the backlog.
    pub fn serve_one(&mut self, listener: &UnixListener) -> io::Result<Result<(), ProtocolError>>
    where
        D: Send,
    {
        let stream = match self.next.take() {
            Some(s) => s,
            None => listener.accept()?.0,
        };
        let done = AtomicBool::new(false);
        let name = self.dev.name().to_string();
        let (r, refused) = std::thread::scope(|scope| {
            let refuser = scope.spawn(|| refuse_while_busy(listener, &done, &name));
            let r = self.serve_connection(stream);
            done.store(true, Ordering::Release);
            (r, refuser.join())
        });
        match refused {
            Ok(next) => self.next = next?,
            Err(_) => return Err(io::Error::other("the thread refusing busy connections panicked")),
        }
        if let Err(e) = &r {
            log::warn!("{name}: vfio-user client dropped: {e}");
        }
        Ok(r)
    }

    /// Serve one connected client until it closes the connection (`Ok`) or fails (`Err`: the
    /// connection is then dropped). Its DMA mappings are unmapped when it ends.
    pub fn serve_connection(&mut self, mut stream: UnixStream) -> Result<(), ProtocolError> {
        self.att = Attachment::new(&self.dev.identity());
        stream.set_write_timeout(Some(self.opts.message_timeout))?;
        let r = self.serve_messages(&mut stream);
        self.att.maps.clear();
        r
    }

    fn serve_messages(&mut self, stream: &mut UnixStream) -> Result<(), ProtocolError> {
        // A command's header plus the largest payload (a MIG_DATA_WRITE chunk) and room for the
        // rest of any request.
        let cap = self.opts.max_data_xfer_size.saturating_add(4096);
        let mut negotiated = false;
        loop {
            stream.set_read_timeout(None)?;
            let Some((h, fds)) = codec::read_header_with_fds(stream)? else {
                return Ok(());
            };
            stream.set_read_timeout(Some(self.opts.message_timeout))?;
            if h.msg_type() != codec::FLAG_TYPE_COMMAND {
                return Err(ProtocolError::BadHeader(format!(
                    "a reply (id {}) where a command was due",
                    h.msg_id
                )));
            }
            if h.size > cap {
                let _ = reply(stream, &h, Err(libc::E2BIG));
                return Err(ProtocolError::TooLong { size: h.size, max: cap });
            }
            let payload = codec::read_payload(stream, &h, cap)?;
            if !negotiated && h.command != codec::CMD_VERSION {
                let _ = reply(stream, &h, Err(libc::EINVAL));
                return Err(ProtocolError::Malformed(format!(
                    "command {} before VFIO_USER_VERSION",
                    h.command
                )));
            }
            self.run_dma();
            let result = self.handle(h.command, &payload, fds);
            let version_failed = h.command == codec::CMD_VERSION && result.is_err();
            if h.flags & codec::FLAG_NO_REPLY == 0 {
                reply(stream, &h, result.as_deref().map_err(|&e| e))?;
            }
            if version_failed {
                return Err(ProtocolError::Malformed("version negotiation failed".into()));
            }
            negotiated = true;
        }
    }

    /// The device's DMA writes since the last message: only with bus mastering on, into the
    /// window BAR0 sets, at the model's rate.
    fn run_dma(&mut self) {
        let rate = if self.att.config.bus_master() {
            self.model.dma_rate()
        } else {
            0
        };
        let Attachment { bar0, maps, engine, .. } = &mut self.att;
        let model = &mut self.model;
        let made = engine.tick(rate, bar0.dma_window(), maps, |iova, len| model.dma_written(iova, len));
        bar0.dma_writes += made;
    }

    /// Handle one command; `fds` are the descriptors that came with it (closed unless kept).
    fn handle(&mut self, command: u16, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Vec<u8>, Errno> {
        let bad = |_: ProtocolError| libc::EINVAL;
        match command {
            codec::CMD_VERSION => {
                let (major, _minor, _caps) = codec::decode_version(payload).map_err(bad)?;
                if major != codec::VERSION_MAJOR {
                    return Err(libc::ENOTSUP);
                }
                let caps = Capabilities {
                    max_data_xfer_size: self.opts.max_data_xfer_size,
                    max_msg_fds: codec::MAX_MSG_FDS as u32,
                    identity: identity_to_cap(&self.dev.identity()),
                    ..Default::default()
                };
                Ok(codec::encode_version(&caps))
            }
            codec::CMD_DEVICE_GET_INFO => {
                let mut out = Vec::with_capacity(16);
                for v in [16, DEVICE_FLAGS, NUM_REGIONS, NUM_IRQS] {
                    codec::put_u32(&mut out, v);
                }
                Ok(out)
            }
            codec::CMD_DEVICE_GET_REGION_INFO => {
                let mut c = Cursor::new(payload);
                c.u32("argsz").map_err(bad)?;
                c.u32("flags").map_err(bad)?;
                let index = c.u32("index").map_err(bad)?;
                if index >= NUM_REGIONS {
                    return Err(libc::EINVAL);
                }
                let (flags, size) = match index {
                    BAR0_REGION => (REGION_RW, BAR0_SIZE),
                    BAR2_REGION => (REGION_RW, BAR2_SIZE),
                    codec::PCI_CONFIG_REGION => (REGION_RW, CONFIG_SIZE),
                    _ => (0, 0),
                };
                let mut out = Vec::with_capacity(32);
                for v in [32, flags, index, 0] {
                    codec::put_u32(&mut out, v);
                }
                codec::put_u64(&mut out, size);
                codec::put_u64(&mut out, 0);
                Ok(out)
            }
            codec::CMD_DEVICE_GET_IRQ_INFO => {
                let mut c = Cursor::new(payload);
                c.u32("argsz").map_err(bad)?;
                c.u32("flags").map_err(bad)?;
                let index = c.u32("index").map_err(bad)?;
                if index >= NUM_IRQS {
                    return Err(libc::EINVAL);
                }
                let mut out = Vec::with_capacity(16);
                for v in [16, 0, index, 0] {
                    codec::put_u32(&mut out, v);
                }
                Ok(out)
            }
            codec::CMD_DEVICE_SET_IRQS => {
                // No IRQs: the eventfds are closed (dropped) and the request accepted.
                let mut c = Cursor::new(payload);
                for what in ["argsz", "flags", "index", "start", "count"] {
                    c.u32(what).map_err(bad)?;
                }
                drop(fds);
                Ok(Vec::new())
            }
            codec::CMD_DMA_MAP => self.dma_map(payload, fds),
            codec::CMD_DMA_UNMAP => self.dma_unmap(payload),
            codec::CMD_REGION_READ => self.region_read(payload),
            codec::CMD_REGION_WRITE => self.region_write(payload),
            codec::CMD_DEVICE_RESET => {
                self.session = None;
                self.att.config.reset();
                self.att.bar0.reset();
                self.dev.reset().map_err(|e| errno_of(&e))?;
                Ok(Vec::new())
            }
            codec::CMD_DEVICE_FEATURE => self.feature(payload),
            codec::CMD_MIG_DATA_READ | codec::CMD_MIG_DATA_WRITE if self.opts.no_migration => Err(libc::ENOTTY),
            codec::CMD_MIG_DATA_READ => self.data_read(payload),
            codec::CMD_MIG_DATA_WRITE => self.data_write(payload),
            _ => Err(libc::ENOSYS),
        }
    }

    /// `VFIO_USER_DMA_MAP`: `{argsz, flags, offset u64, address u64, size u64}` and the memory's
    /// descriptor (optional).
    fn dma_map(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Vec<u8>, Errno> {
        let bad = |_: ProtocolError| libc::EINVAL;
        let mut c = Cursor::new(payload);
        c.u32("argsz").map_err(bad)?;
        let flags = c.u32("flags").map_err(bad)?;
        let offset = c.u64("offset").map_err(bad)?;
        let iova = c.u64("address").map_err(bad)?;
        let size = c.u64("size").map_err(bad)?;
        if flags & !DMA_MAP_FLAGS != 0 {
            return Err(libc::EINVAL);
        }
        let fd = fds.into_iter().next();
        self.att.maps.map(iova, size, offset, fd).map_err(|e| {
            log::debug!("{}: DMA_MAP refused: {e}", self.dev.name());
            e.errno()
        })?;
        Ok(Vec::new())
    }

    /// `VFIO_USER_DMA_UNMAP`: `{argsz, flags, address u64, size u64}`, echoed in the reply.
    fn dma_unmap(&mut self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let bad = |_: ProtocolError| libc::EINVAL;
        let mut c = Cursor::new(payload);
        c.u32("argsz").map_err(bad)?;
        let flags = c.u32("flags").map_err(bad)?;
        let iova = c.u64("address").map_err(bad)?;
        let size = c.u64("size").map_err(bad)?;
        match flags {
            0 => {
                self.att.maps.unmap(iova, size).map_err(|e| {
                    log::debug!("{}: DMA_UNMAP refused: {e}", self.dev.name());
                    e.errno()
                })?;
            }
            DMA_UNMAP_ALL if iova == 0 && size == 0 => self.att.maps.clear(),
            // Dirty bitmaps on unmap (the old migration v1) and unknown flags.
            _ => return Err(libc::EINVAL),
        }
        Ok(payload[..24].to_vec())
    }

    /// The `{offset u64, region u32, count u32}` of a region access, checked to lie within a
    /// region that has a size.
    fn region_access(c: &mut Cursor<'_>) -> Result<(u64, u32, u32), Errno> {
        let bad = |_: ProtocolError| libc::EINVAL;
        let offset = c.u64("offset").map_err(bad)?;
        let region = c.u32("region").map_err(bad)?;
        let count = c.u32("count").map_err(bad)?;
        let size = match region {
            BAR0_REGION => BAR0_SIZE,
            BAR2_REGION => BAR2_SIZE,
            codec::PCI_CONFIG_REGION => CONFIG_SIZE,
            _ => return Err(libc::EINVAL),
        };
        if offset.checked_add(u64::from(count)).is_none_or(|end| end > size) {
            return Err(libc::EINVAL);
        }
        Ok((offset, region, count))
    }

    /// `VFIO_USER_REGION_READ`: the reply echoes the access and carries the bytes.
    fn region_read(&mut self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let (offset, region, count) = Self::region_access(&mut Cursor::new(payload))?;
        // `count` is within the region (at most 4 KiB) from here on.
        let mut out = Vec::with_capacity(16 + count as usize);
        codec::put_u64(&mut out, offset);
        codec::put_u32(&mut out, region);
        codec::put_u32(&mut out, count);
        let at = out.len();
        out.resize(at + count as usize, 0);
        if region == BAR0_REGION || region == BAR2_REGION {
            let state = self.dev.state().map_or(0, |s| s.as_raw());
            self.att.bar0.read(self.model.as_ref(), state, offset, &mut out[at..]);
        } else {
            let bytes = self.att.config.read(offset, count as usize).ok_or(libc::EINVAL)?;
            out[at..].copy_from_slice(bytes);
        }
        Ok(out)
    }

    /// `VFIO_USER_REGION_WRITE`: the reply echoes the access.
    fn region_write(&mut self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let mut c = Cursor::new(payload);
        let (offset, region, count) = Self::region_access(&mut c)?;
        let data = c.rest();
        if data.len() != count as usize {
            return Err(libc::EINVAL);
        }
        if region == BAR0_REGION || region == BAR2_REGION {
            self.att.bar0.write(self.model.as_mut(), offset, data);
        } else {
            self.att.config.write(offset, data).ok_or(libc::EINVAL)?;
        }
        Ok(payload[..16].to_vec())
    }

    fn feature(&mut self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let bad = |_: ProtocolError| libc::EINVAL;
        let mut c = Cursor::new(payload);
        let _argsz = c.u32("argsz").map_err(bad)?;
        let flags = c.u32("flags").map_err(bad)?;
        let feature = flags & codec::FEATURE_MASK;
        let ops = flags & (codec::FEATURE_GET | codec::FEATURE_SET | codec::FEATURE_PROBE);
        let data = c.rest();
        if self.opts.no_migration {
            return Err(libc::ENOTTY);
        }
        let (get_ok, set_ok) = match feature {
            codec::FEATURE_MIGRATION => (true, false),
            codec::FEATURE_MIG_DEVICE_STATE => (true, true),
            codec::FEATURE_DMA_LOGGING_START | codec::FEATURE_DMA_LOGGING_STOP => (false, true),
            codec::FEATURE_DMA_LOGGING_REPORT => (true, false),
            _ => return Err(libc::ENOTTY),
        };
        let get = ops & codec::FEATURE_GET != 0;
        let set = ops & codec::FEATURE_SET != 0;
        if (get && !get_ok) || (set && !set_ok) || (get && set) || ops == 0 {
            return Err(libc::EINVAL);
        }
        let mut out = Vec::new();
        if ops & codec::FEATURE_PROBE != 0 {
            codec::put_u32(&mut out, 8);
            codec::put_u32(&mut out, flags);
            return Ok(out);
        }
        let body: Vec<u8> = match feature {
            codec::FEATURE_MIGRATION => {
                let f = self.dev.flags().map_err(|e| errno_of(&e))?;
                (f.bits() & !MigrationFlags::P2P.bits()).to_le_bytes().to_vec()
            }
            codec::FEATURE_MIG_DEVICE_STATE if get => {
                let s = self.dev.state().map_err(|e| errno_of(&e))?;
                let mut b = Vec::with_capacity(8);
                codec::put_u32(&mut b, s.as_raw());
                codec::put_u32(&mut b, u32::MAX);
                b
            }
            codec::FEATURE_MIG_DEVICE_STATE => {
                let raw = Cursor::new(data).u32("device_state").map_err(bad)?;
                let to = DeviceState::from_raw(raw).map_err(|_| libc::EINVAL)?;
                if matches!(to, DeviceState::RunningP2p | DeviceState::PreCopyP2p) {
                    // P2P states are not used in vfio-user.
                    return Err(libc::EINVAL);
                }
                let from = self.dev.state().ok();
                self.set_state(to)?;
                if to == DeviceState::StopCopy {
                    self.digests.saved = Some(self.model.digest());
                }
                if from == Some(DeviceState::Resuming) && to != DeviceState::Resuming {
                    self.digests.loaded = Some(self.model.digest());
                }
                let mut b = Vec::with_capacity(8);
                codec::put_u32(&mut b, to.as_raw());
                codec::put_u32(&mut b, u32::MAX);
                b
            }
            codec::FEATURE_DMA_LOGGING_START => {
                let mut d = Cursor::new(data);
                let page_size = d.u64("page_size").map_err(bad)?;
                let n = d.u32("num_ranges").map_err(bad)?;
                d.u32("rsvd").map_err(bad)?;
                let rest = d.rest();
                if rest.len() as u64 != n as u64 * 16 {
                    return Err(libc::EINVAL);
                }
                let mut ranges = Vec::with_capacity(n as usize);
                let mut r = Cursor::new(rest);
                for _ in 0..n {
                    ranges.push(DmaRange {
                        iova: r.u64("iova").map_err(bad)?,
                        length: r.u64("length").map_err(bad)?,
                    });
                }
                let chosen = self.dev.dma_log_start(&ranges, page_size).map_err(|e| errno_of(&e))?;
                let mut b = Vec::with_capacity(16);
                codec::put_u64(&mut b, chosen);
                codec::put_u32(&mut b, n);
                codec::put_u32(&mut b, 0);
                b
            }
            codec::FEATURE_DMA_LOGGING_STOP => {
                self.dev.dma_log_stop().map_err(|e| errno_of(&e))?;
                Vec::new()
            }
            codec::FEATURE_DMA_LOGGING_REPORT => {
                let mut d = Cursor::new(data);
                let iova = d.u64("iova").map_err(bad)?;
                let length = d.u64("length").map_err(bad)?;
                let page_size = d.u64("page_size").map_err(bad)?;
                if !page_size.is_power_of_two() || length == 0 {
                    return Err(libc::EINVAL);
                }
                let words = length.div_ceil(page_size).div_ceil(64);
                // The reply must fit the data cap (checked before the bitmap is allocated).
                if words.saturating_mul(8) > self.opts.max_data_xfer_size as u64 {
                    return Err(libc::E2BIG);
                }
                let mut bitmap = vec![0u64; words as usize];
                self.dev
                    .dma_log_report(iova, length, page_size, &mut bitmap)
                    .map_err(|e| errno_of(&e))?;
                let mut b = Vec::with_capacity(24 + bitmap.len() * 8);
                codec::put_u64(&mut b, iova);
                codec::put_u64(&mut b, length);
                codec::put_u64(&mut b, page_size);
                for w in bitmap {
                    codec::put_u64(&mut b, w);
                }
                b
            }
            _ => return Err(libc::ENOTTY),
        };
        codec::put_u32(&mut out, (8 + body.len()) as u32);
        codec::put_u32(&mut out, flags);
        out.extend_from_slice(&body);
        Ok(out)
    }

    fn set_state(&mut self, to: DeviceState) -> Result<(), Errno> {
        match self.dev.set_state(to) {
            Ok(Some(s)) => {
                self.session = Some(s);
                Ok(())
            }
            Ok(None) => {
                if to.session_kind().is_none() {
                    self.session = None;
                }
                Ok(())
            }
            Err(e) => {
                if self.dev.state().map_or(true, |s| s.session_kind().is_none()) {
                    self.session = None;
                }
                Err(errno_of(&e))
            }
        }
    }

    fn data_read(&mut self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let mut c = Cursor::new(payload);
        let argsz = c.u32("argsz").map_err(|_| libc::EINVAL)?;
        let size = c.u32("size").map_err(|_| libc::EINVAL)?;
        if size > self.opts.max_data_xfer_size || (argsz as u64) < 8 + size as u64 {
            return Err(libc::EINVAL);
        }
        let state = self.dev.state().map_err(|e| errno_of(&e))?;
        let session = match &mut self.session {
            Some(s) if s.kind() == SessionKind::Saving => s,
            _ => return Err(libc::EINVAL),
        };
        let mut out = vec![0u8; 8 + size as usize];
        let mut got = 0usize;
        let mut idle_since: Option<Instant> = None;
        while got < size as usize {
            match session.read(&mut out[8 + got..]).map_err(|e| errno_of(&e))? {
                ReadOutcome::Data(n) => {
                    got += n;
                    idle_since = None;
                }
                ReadOutcome::End => break,
                ReadOutcome::NothingNow if state != DeviceState::StopCopy => break,
                ReadOutcome::NothingNow => {
                    // A short reply ends STOP_COPY: wait (bounded) for the device instead.
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.opts.stop_copy_wait {
                        return Err(libc::ETIMEDOUT);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        if !self.opts.pad_short_reads {
            out.truncate(8 + got);
        }
        out[0..4].copy_from_slice(&((8 + got) as u32).to_le_bytes());
        out[4..8].copy_from_slice(&(got as u32).to_le_bytes());
        Ok(out)
    }

    fn data_write(&mut self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let mut c = Cursor::new(payload);
        c.u32("argsz").map_err(|_| libc::EINVAL)?;
        let size = c.u32("size").map_err(|_| libc::EINVAL)?;
        let data = c.rest();
        if data.len() != size as usize {
            return Err(libc::EINVAL);
        }
        let session = match &mut self.session {
            Some(s) if s.kind() == SessionKind::Resuming => s,
            _ => return Err(libc::EINVAL),
        };
        let began = Instant::now();
        let mut done = 0;
        while done < data.len() {
            match session
                .write_within(&data[done..], Duration::from_millis(10))
                .map_err(|e| errno_of(&e))?
            {
                Some(n) if n > 0 => done += n,
                _ if began.elapsed() > self.opts.stop_copy_wait => return Err(libc::ETIMEDOUT),
                _ => {}
            }
        }
        Ok(Vec::new())
    }
}

/// How long a client that connects while another is served waits before it is refused (1 s).
pub const BUSY_GRACE: Duration = Duration::from_secs(1);

/// While `done` is false, accept connections on `listener`: the first waits (up to
/// [`BUSY_GRACE`]) to be served next and is returned if `done` comes in time; the others, and
/// the first after its grace, are refused ([`refuse`]). The listener is non-blocking meanwhile
/// and blocking again afterwards.
fn refuse_while_busy(listener: &UnixListener, done: &AtomicBool, name: &str) -> io::Result<Option<UnixStream>> {
    listener.set_nonblocking(true)?;
    let mut waiting: Option<(UnixStream, Instant)> = None;
    while !done.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                if waiting.is_none() {
                    waiting = Some((s, Instant::now()));
                } else {
                    refuse(s, name);
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => log::warn!("{name}: accept while busy: {e}"),
        }
        if waiting.as_ref().is_some_and(|(_, since)| since.elapsed() > BUSY_GRACE)
            && let Some((s, _)) = waiting.take()
        {
            refuse(s, name);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    listener.set_nonblocking(false)?;
    Ok(waiting.map(|(s, _)| s))
}

/// Refuse a client: an `EBUSY` error reply to its first message (waiting at most 1 s for it),
/// then close.
fn refuse(mut s: UnixStream, name: &str) {
    log::warn!("{name}: refused a vfio-user client: busy with another");
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if let Ok(Some(h)) = codec::read_header(&mut s) {
        let _ = reply(&mut s, &h, Err(libc::EBUSY));
    }
}

/// Send the reply to `h`: its payload, or an error reply with the errno.
fn reply(stream: &mut UnixStream, h: &Header, result: Result<&[u8], Errno>) -> Result<(), ProtocolError> {
    let (flags, error_no, payload): (u32, u32, &[u8]) = match result {
        Ok(p) => (codec::FLAG_TYPE_REPLY, 0, p),
        Err(e) => (codec::FLAG_TYPE_REPLY | codec::FLAG_ERROR, e as u32, &[]),
    };
    let out = Header {
        msg_id: h.msg_id,
        command: h.command,
        size: HEADER_LEN as u32,
        flags,
        error_no,
    };
    codec::write_message(stream, out, &[payload])
}

/// Listen on the UNIX socket `path`, created with mode 0600 (bound in a private directory,
/// then linked into place, so nobody connects before the mode is set). A path where a server
/// still listens is never replaced (a connection is tried first); a socket file nobody listens
/// on is.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    crate::unix_socket::bind_private(path, "a server")
}
