//! [`VfioUserClient`]: what a VMM needs of a vfio-user device (regions, config space and BAR
//! accesses, interrupts, DMA mappings, reset), over one connection that it shares with the
//! device's migration ([`VfioUserClient::migration_device`]).
//!
//! A vfio-user server serves one connection at a time, so a VMM that attaches a device with one
//! client and migrates it with another cannot do both. This client is a replacement for the one
//! Cloud Hypervisor uses (the crates.io `vfio_user` crate's `Client`, which keeps its socket to
//! itself), with the same operations, and hands out [`VfioUserDevice`]s on the same connection:
//! requests are one at a time under the connection's mutex, so the VMM's region accesses and the
//! migration's requests interleave safely.
//!
//! Every length a server sends is checked against a cap before anything is allocated for it; a
//! reply that cannot be parsed makes the connection unusable (later requests fail at once), since
//! what the server did is then unknown; errors are [`DeviceError`]s naming the device
//! (`vfio-user:PATH`) and the [`Operation`]. Nothing a server sends makes the client panic.

use std::fs::File;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::client::{MAX_WRITE_CHUNK, VfioUserDevice, device_error};
use super::codec::{self, Capabilities, Cursor, HEADER_LEN, ProtocolError};
use super::conn::{Conn, Negotiated, lock};
use crate::device::{DeviceError, ErrorKind, Operation};

pub use super::codec::{DeviceInfo, IrqInfo, SparseArea};

/// The most file descriptors one message carries when the server announced none
/// (`max_msg_fds` absent or 0: the specification's default is 1).
const DEFAULT_MSG_FDS: usize = 1;
/// The most file descriptors one `sendmsg` may carry (the kernel's `SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// One region of the device, as `VFIO_USER_DEVICE_GET_REGION_INFO` described it.
#[derive(Clone, Debug)]
pub struct Region {
    /// `VFIO_REGION_INFO_FLAG_*` ([`codec::REGION_INFO_FLAG_READ`], `_WRITE`, `_MMAP`, `_CAPS`).
    pub flags: u32,
    /// The region index (`VFIO_PCI_BAR0_REGION_INDEX` is 0, config space 7).
    pub index: u32,
    /// The region's size in bytes (0: the device has no such region).
    pub size: u64,
    /// The file the server sent to map the region (only with [`codec::REGION_INFO_FLAG_MMAP`]),
    /// and the offset in it at which the region starts. `None` when the region is not
    /// mappable or the server sent no file descriptor.
    pub file: Option<(Arc<File>, u64)>,
    /// The areas that may be mapped (`VFIO_REGION_INFO_CAP_SPARSE_MMAP`), each inside the
    /// region; empty when the server gave none (then the whole region, if mappable).
    pub sparse_areas: Vec<SparseArea>,
}

/// A vfio-user device as a VMM attaches it: version negotiation, device info, the regions (with
/// their sparse mmap areas and file descriptors), region reads and writes, interrupts, DMA
/// mappings, reset; and [`VfioUserClient::migration_device`] for its migration over the same
/// connection.
///
/// All methods take `&self`: the connection is behind a mutex, shared with the migration devices
/// handed out, one request at a time.
#[derive(Debug)]
pub struct VfioUserClient {
    name: String,
    conn: Arc<Mutex<Conn>>,
    negotiated: Negotiated,
    info: DeviceInfo,
    regions: Vec<Region>,
}

/// One request: the command, its payload, the file descriptors sent with it and the largest
/// reply accepted (in all, header included).
struct Request<'a> {
    command: u16,
    payload: &'a [&'a [u8]],
    fds: &'a [RawFd],
    max_reply: u32,
}

/// Send `req` on `conn` and parse its reply with `parse`; a reply that does not parse marks
/// the connection broken. Errors name `name` and `op`.
fn call<T>(
    name: &str,
    conn: &Mutex<Conn>,
    op: Operation,
    req: Request<'_>,
    parse: impl FnOnce(&[u8], Vec<OwnedFd>) -> Result<T, ProtocolError>,
) -> Result<T, DeviceError> {
    let mut c = lock(conn);
    let (body, got) = c
        .request_fds(req.command, req.payload, req.fds, req.max_reply)
        .map_err(|e| device_error(name, op, e))?;
    parse(&body, got).map_err(|e| {
        c.mark_broken(&e.to_string());
        device_error(name, op, e)
    })
}

/// The largest control reply (device, region and IRQ info, echoes) in all.
const MAX_CONTROL_REPLY: u32 = codec::MAX_CONTROL_MSG;

impl VfioUserClient {
    /// Connect to the vfio-user server listening at `path` and read the device: errors name it
    /// `vfio-user:PATH`.
    pub fn connect(path: &Path) -> Result<Self, DeviceError> {
        let name = format!("vfio-user:{}", path.display());
        let stream = UnixStream::connect(path).map_err(|e| DeviceError::io(&name, Operation::Open, e))?;
        Self::from_stream(name, stream)
    }

    /// Use an already connected `stream` to a server; `name` names the device in errors.
    /// Negotiates the version as [`VfioUserDevice::from_stream`] does, then reads the device info
    /// (a device that is not a PCI device is refused) and every region's info with its
    /// capabilities and file descriptor. The device is not changed.
    pub fn from_stream(name: impl Into<String>, stream: UnixStream) -> Result<Self, DeviceError> {
        let name = name.into();
        let (conn, negotiated) = Conn::open(&name, stream)?;
        let conn = Arc::new(Mutex::new(conn));
        let op = Operation::DeviceInfo;
        let info = call(
            &name,
            &conn,
            op,
            Request {
                command: codec::CMD_DEVICE_GET_INFO,
                payload: &[&codec::encode_device_info_request()],
                fds: &[],
                max_reply: MAX_CONTROL_REPLY,
            },
            |body, _| codec::decode_device_info(body),
        )?;
        let refuse = |what: String| DeviceError::new(&name, op, ErrorKind::InvalidAnswer(what));
        if info.flags & codec::DEVICE_FLAGS_PCI == 0 {
            return Err(refuse(format!(
                "not a PCI device (device flags {:#x}): only PCI devices can be attached",
                info.flags
            )));
        }
        if info.num_regions > codec::MAX_REGIONS {
            return Err(refuse(format!(
                "{} regions (at most {})",
                info.num_regions,
                codec::MAX_REGIONS
            )));
        }
        let regions = (0..info.num_regions)
            .map(|index| region_info(&name, &conn, index))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name,
            conn,
            negotiated,
            info,
            regions,
        })
    }

    /// The device's name in errors (`vfio-user:PATH` for [`VfioUserClient::connect`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The capabilities the server announced in version negotiation.
    pub fn capabilities(&self) -> &Capabilities {
        &self.negotiated.caps
    }

    /// The device info: `VFIO_DEVICE_FLAGS_*`, the number of regions and of IRQ indexes.
    pub fn device_info(&self) -> DeviceInfo {
        self.info
    }

    /// How many IRQ indexes the device has.
    pub fn num_irqs(&self) -> u32 {
        self.info.num_irqs
    }

    /// Whether the device can be reset: the server's device info has `VFIO_DEVICE_FLAGS_RESET`.
    /// (The crates.io `vfio_user` 0.1.5 client inverts this test and reports a resettable device
    /// as not resettable and the other way round; this one does not.)
    pub fn resettable(&self) -> bool {
        self.info.flags & codec::DEVICE_FLAGS_RESET != 0
    }

    /// All regions, by index.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Region `index`, if the device has it.
    pub fn region(&self, index: u32) -> Option<&Region> {
        self.regions.get(index as usize)
    }

    /// The largest data chunk per message (`max_data_xfer_size`, capped).
    pub fn max_data_xfer_size(&self) -> u32 {
        self.negotiated.max_xfer
    }

    fn invalid_request(&self, op: Operation, what: String) -> DeviceError {
        DeviceError::new(&self.name, op, ErrorKind::InvalidRequest(what))
    }

    /// Check that `[offset, offset + len)` lies in region `index` and the region allows `flag`.
    fn check_access(&self, op: Operation, index: u32, offset: u64, len: usize, flag: u32) -> Result<(), DeviceError> {
        let r = self
            .region(index)
            .ok_or_else(|| self.invalid_request(op, format!("no region {index}")))?;
        if r.flags & flag == 0 {
            let what = if flag == codec::REGION_INFO_FLAG_READ {
                "readable"
            } else {
                "writable"
            };
            return Err(self.invalid_request(op, format!("region {index} is not {what}")));
        }
        if offset.checked_add(len as u64).is_none_or(|end| end > r.size) {
            return Err(self.invalid_request(
                op,
                format!("{len} bytes at {offset:#x} leave region {index} of {:#x} bytes", r.size),
            ));
        }
        Ok(())
    }

    /// Read `buf.len()` bytes of region `index` at `offset` (`VFIO_USER_REGION_READ`, in chunks
    /// of at most `max_data_xfer_size`). An access outside the region, or to a region that is not
    /// readable, is refused without asking the server.
    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let op = Operation::RegionRead { index, offset };
        self.check_access(op, index, offset, buf.len(), codec::REGION_INFO_FLAG_READ)?;
        let chunk = (self.negotiated.max_xfer as usize).max(1);
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(chunk);
            let at = offset + done as u64;
            let op = Operation::RegionRead { index, offset: at };
            let req = codec::encode_region_access(at, index, n as u32);
            let out = &mut buf[done..done + n];
            call(
                &self.name,
                &self.conn,
                op,
                Request {
                    command: codec::CMD_REGION_READ,
                    payload: &[&req],
                    fds: &[],
                    max_reply: (HEADER_LEN + 16 + n) as u32,
                },
                |body, _| {
                    let mut c = Cursor::new(body);
                    let echo = codec::decode_region_access(&mut c)?;
                    if echo != (at, index, n as u32) {
                        return Err(ProtocolError::Malformed(format!(
                            "region read answered for {echo:?}, asked for {:?}",
                            (at, index, n)
                        )));
                    }
                    let data = c.rest();
                    if data.len() != n {
                        return Err(ProtocolError::Malformed(format!(
                            "{} bytes for a region read of {n}",
                            data.len()
                        )));
                    }
                    out.copy_from_slice(data);
                    Ok(())
                },
            )?;
            done += n;
        }
        Ok(())
    }

    /// Write `data` to region `index` at `offset` (`VFIO_USER_REGION_WRITE`, in chunks of at most
    /// `max_data_xfer_size` and [`MAX_WRITE_CHUNK`]). An access outside the region, or to a
    /// region that is not writable, is refused without asking the server.
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let op = Operation::RegionWrite { index, offset };
        self.check_access(op, index, offset, data.len(), codec::REGION_INFO_FLAG_WRITE)?;
        let chunk = (self.negotiated.max_xfer as usize).clamp(1, MAX_WRITE_CHUNK);
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(chunk);
            let at = offset + done as u64;
            let op = Operation::RegionWrite { index, offset: at };
            let req = codec::encode_region_access(at, index, n as u32);
            call(
                &self.name,
                &self.conn,
                op,
                Request {
                    command: codec::CMD_REGION_WRITE,
                    payload: &[&req, &data[done..done + n]],
                    fds: &[],
                    max_reply: MAX_CONTROL_REPLY,
                },
                |body, _| {
                    let echo = codec::decode_region_access(&mut Cursor::new(body))?;
                    if echo != (at, index, n as u32) {
                        return Err(ProtocolError::Malformed(format!(
                            "region write answered for {echo:?}, asked for {:?}",
                            (at, index, n)
                        )));
                    }
                    Ok(())
                },
            )?;
            done += n;
        }
        Ok(())
    }

    /// The info of IRQ index `index` (`VFIO_USER_DEVICE_GET_IRQ_INFO`).
    pub fn get_irq_info(&self, index: u32) -> Result<IrqInfo, DeviceError> {
        call(
            &self.name,
            &self.conn,
            Operation::IrqInfo { index },
            Request {
                command: codec::CMD_DEVICE_GET_IRQ_INFO,
                payload: &[&codec::encode_irq_info_request(index)],
                fds: &[],
                max_reply: MAX_CONTROL_REPLY,
            },
            |body, _| {
                let info = codec::decode_irq_info(body)?;
                if info.index != index {
                    return Err(ProtocolError::Malformed(format!(
                        "IRQ info for index {}, asked for {index}",
                        info.index
                    )));
                }
                Ok(info)
            },
        )
    }

    /// The most file descriptors one message may carry to this server.
    fn max_fds(&self) -> usize {
        match self.negotiated.caps.max_msg_fds as usize {
            0 => DEFAULT_MSG_FDS,
            n => n.min(SCM_MAX_FD),
        }
    }

    /// `VFIO_USER_DEVICE_SET_IRQS` for IRQ index `index`: `flags` (`VFIO_IRQ_SET_DATA_*` |
    /// `VFIO_IRQ_SET_ACTION_*`), vectors `start..start + count`, and `fds` (eventfds, sent by
    /// `SCM_RIGHTS`; they stay the caller's). When there are more eventfds than the server takes
    /// in one message (`max_msg_fds`) and there is one per vector (`VFIO_IRQ_SET_DATA_EVENTFD`),
    /// they go in several messages, each for its part of the vectors; otherwise too many is
    /// refused without asking the server.
    pub fn set_irqs(&self, index: u32, flags: u32, start: u32, count: u32, fds: &[RawFd]) -> Result<(), DeviceError> {
        let op = Operation::SetIrqs { index };
        if start.checked_add(count).is_none() {
            return Err(self.invalid_request(op, format!("vectors {start}+{count} wrap around")));
        }
        let max = self.max_fds();
        let per_vector = flags & codec::IRQ_SET_DATA_EVENTFD != 0 && fds.len() == count as usize;
        if fds.len() > max && !per_vector {
            return Err(self.invalid_request(
                op,
                format!(
                    "{} file descriptors, the server takes at most {max} per message",
                    fds.len()
                ),
            ));
        }
        let send = |start: u32, count: u32, fds: &[RawFd]| {
            call(
                &self.name,
                &self.conn,
                op,
                Request {
                    command: codec::CMD_DEVICE_SET_IRQS,
                    payload: &[&codec::encode_set_irqs(flags, index, start, count)],
                    fds,
                    max_reply: MAX_CONTROL_REPLY,
                },
                |_, _| Ok(()),
            )
        };
        if fds.len() <= max {
            return send(start, count, fds);
        }
        for (i, part) in fds.chunks(max).enumerate() {
            send(start + (i * max) as u32, part.len() as u32, part)?;
        }
        Ok(())
    }

    /// Map `[iova, iova + size)` for the device's DMA, read-write (`VFIO_USER_DMA_MAP`), backed by
    /// the file `fd` at `offset` (sent by `SCM_RIGHTS`; it stays the caller's). A negative `fd`
    /// sends none (memory the server cannot access; it may refuse or record the range only).
    pub fn dma_map(&self, offset: u64, iova: u64, size: u64, fd: RawFd) -> Result<(), DeviceError> {
        let op = Operation::DmaMap { iova, size };
        if size == 0 || iova.checked_add(size).is_none() || offset.checked_add(size).is_none() {
            return Err(self.invalid_request(op, "an empty or wrapping range".into()));
        }
        let fds: &[RawFd] = if fd >= 0 { &[fd] } else { &[] };
        call(
            &self.name,
            &self.conn,
            op,
            Request {
                command: codec::CMD_DMA_MAP,
                payload: &[&codec::encode_dma_map(codec::DMA_MAP_READ_WRITE, offset, iova, size)],
                fds,
                max_reply: MAX_CONTROL_REPLY,
            },
            |_, _| Ok(()),
        )
    }

    /// Unmap `[iova, iova + size)` (`VFIO_USER_DMA_UNMAP`).
    pub fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), DeviceError> {
        call(
            &self.name,
            &self.conn,
            Operation::DmaUnmap { iova, size },
            Request {
                command: codec::CMD_DMA_UNMAP,
                payload: &[&codec::encode_dma_unmap(0, iova, size)],
                fds: &[],
                max_reply: MAX_CONTROL_REPLY,
            },
            |body, _| {
                // The reply echoes the request (some servers send only the header).
                if body.len() >= 24 {
                    let mut c = Cursor::new(&body[8..]);
                    let echo = (c.u64("address")?, c.u64("size")?);
                    if echo != (iova, size) {
                        return Err(ProtocolError::Malformed(format!(
                            "DMA unmap answered for {echo:?}, asked for {:?}",
                            (iova, size)
                        )));
                    }
                }
                Ok(())
            },
        )
    }

    /// Reset the device (`VFIO_USER_DEVICE_RESET`). The server decides what a reset keeps (on our
    /// server, the config space and BAR0's DMA window start afresh); a migration session open on
    /// the device ends, as with the kernel's reset.
    pub fn reset(&self) -> Result<(), DeviceError> {
        call(
            &self.name,
            &self.conn,
            Operation::Reset,
            Request {
                command: codec::CMD_DEVICE_RESET,
                payload: &[],
                fds: &[],
                max_reply: MAX_CONTROL_REPLY,
            },
            |_, _| Ok(()),
        )
    }

    /// Shut the connection down: the server sees the client leave. Every later request, of this
    /// client and of the migration devices it handed out, fails.
    pub fn shutdown(&self) -> Result<(), DeviceError> {
        lock(&self.conn)
            .shutdown()
            .map_err(|e| DeviceError::io(&self.name, Operation::Shutdown, e))
    }

    /// The device's migration, a [`crate::MigrationDevice`] on this same connection (its
    /// requests and the VMM's interleave safely, one at a time). Reads the device's identity (the
    /// one our server tells, else the PCI IDs in config space) and state. Several may be handed
    /// out; each learns the device state when it is asked for it.
    pub fn migration_device(&self) -> VfioUserDevice {
        VfioUserDevice::from_conn(self.name.clone(), Arc::clone(&self.conn), &self.negotiated)
    }
}

/// `VFIO_USER_DEVICE_GET_REGION_INFO` for region `index`: first with room for the info alone;
/// when the server says it has more (capabilities), again with room for all of it (at most
/// [`codec::MAX_CONTROL_MSG`]). The file descriptor of a mappable region is kept, any other is
/// closed; sparse areas must lie inside the region.
fn region_info(name: &str, conn: &Mutex<Conn>, index: u32) -> Result<Region, DeviceError> {
    let op = Operation::RegionInfo { index };
    let ask = |argsz: u32| {
        call(
            name,
            conn,
            op,
            Request {
                command: codec::CMD_DEVICE_GET_REGION_INFO,
                payload: &[&codec::encode_region_info_request(index, argsz)],
                fds: &[],
                max_reply: MAX_CONTROL_REPLY,
            },
            |body, fds| {
                let info = codec::decode_region_info(body)?;
                if info.index != index {
                    return Err(ProtocolError::Malformed(format!(
                        "info of region {}, asked for {index}",
                        info.index
                    )));
                }
                Ok((info, body.len(), fds))
            },
        )
    };
    let mut got = ask(codec::REGION_INFO_LEN as u32)?;
    if got.0.argsz as usize > got.1 {
        let want = got.0.argsz;
        if want > MAX_CONTROL_REPLY - HEADER_LEN as u32 {
            lock(conn).mark_broken("region info too long");
            return Err(DeviceError::new(
                name,
                op,
                ErrorKind::InvalidAnswer(format!("region info of {want} bytes")),
            ));
        }
        got = ask(want)?;
        if got.0.argsz as usize > got.1 {
            return Err(DeviceError::new(
                name,
                op,
                ErrorKind::InvalidAnswer(format!("region info of {} bytes after asking for {want}", got.0.argsz)),
            ));
        }
    }
    let (info, _, fds) = got;
    let invalid = |what: String| DeviceError::new(name, op, ErrorKind::InvalidAnswer(what));
    for a in &info.sparse_areas {
        if a.offset.checked_add(a.size).is_none_or(|end| end > info.size) {
            return Err(invalid(format!(
                "sparse mmap area {:#x}+{:#x} outside the region of {:#x} bytes",
                a.offset, a.size, info.size
            )));
        }
    }
    let mut fds = fds.into_iter();
    let file = match fds.next() {
        Some(fd) if info.flags & codec::REGION_INFO_FLAG_MMAP != 0 => {
            if info.offset.checked_add(info.size).is_none() {
                return Err(invalid(format!(
                    "region of {:#x} bytes at file offset {:#x}",
                    info.size, info.offset
                )));
            }
            Some((Arc::new(File::from(fd)), info.offset))
        }
        _ => None,
    };
    // Any other descriptor is closed here.
    drop(fds);
    Ok(Region {
        flags: info.flags,
        index,
        size: info.size,
        file,
        sparse_areas: info.sparse_areas,
    })
}
