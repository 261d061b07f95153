//! A minimal fake migratable device for the replay tests, following the uAPI rules: transitions
//! go along `vfio_migration::state::path`, sessions open and close on the uAPI's arcs, PRE_COPY
//! yields the initial data then "nothing now", STOP_COPY yields the rest then the end, RESUMING
//! validates the loaded state on RESUMING -> STOP (failing EINVAL and staying RESUMING, as mtty),
//! only a reset leaves ERROR. A reset keeps the content, like mtty (the emulated device's
//! `reset=keep`); tests that check a source's content after a recovery by reset rely on that and
//! say so.
//!
//! The engine's emulated device (`tests/replay_emulated.rs`) covers content, DMA logging and arc
//! faults; this fake adds the "every operation of the device fails for a while" fault and tiny
//! states with a self-checking format, and keeps the replay harness independent of it.

#![allow(dead_code)]

use std::sync::{Arc, Mutex, MutexGuard};

use vfio_migration::device::{
    DeviceError, DeviceIdentity, DmaRange, ErrorKind, MigrationDevice, Operation, PrecopyInfo, ReadOutcome,
    TransferSession,
};
use vfio_migration::state::{DeviceState, MigrationFlags, SessionKind, path};

const MAGIC: &[u8; 4] = b"FAKE";
/// Largest state the fake accepts in RESUMING (mtty answers ENOMEM past its size).
const MAX_LOAD: usize = 16 << 20;

/// How an armed fault behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// Operations fail with EIO; a transition leaves the device where it was.
    Stay,
    /// Operations fail with EIO; a transition drops the device into ERROR.
    Error,
}

#[derive(Debug)]
pub struct Inner {
    pub name: String,
    pub flags: MigrationFlags,
    pub state: DeviceState,
    /// The device's state (what a save produces, what a load replaces).
    pub content: Vec<u8>,
    /// Bytes of `content` offered in PRE_COPY.
    pub initial_len: usize,
    generation: u64,
    cursor: usize,
    loaded: Vec<u8>,
    pub fault: Option<FaultMode>,
    pub resets: u32,
    pub transitions: Vec<DeviceState>,
    pub log: Option<(Vec<DmaRange>, u64)>,
    /// IOVAs the "device" wrote (reported and cleared by the DMA log).
    pub dma_writes: Vec<u64>,
    pub max_read: usize,
    /// Report `DeviceIdentity::Unknown`, as Cloud Hypervisor does for a device whose sysfs node
    /// cannot be read.
    pub unknown_identity: bool,
}

/// A test's handle on a fake device (the device itself is handed to the group).
#[derive(Clone, Debug)]
pub struct Handle(pub Arc<Mutex<Inner>>);

impl Handle {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A failed assertion holding the lock must not turn the devices' drops into an abort.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn state(&self) -> DeviceState {
        self.lock().state
    }
    pub fn content(&self) -> Vec<u8> {
        self.lock().content.clone()
    }
    pub fn arm(&self, mode: FaultMode) {
        self.lock().fault = Some(mode);
    }
    pub fn disarm(&self) {
        self.lock().fault = None;
    }
}

#[derive(Debug)]
pub struct FakeDevice {
    name: String,
    h: Handle,
}

/// A valid device state: magic, length, payload, CRC-32C.
pub fn make_content(seed: u64, payload_len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let payload: Vec<u8> = (0..payload_len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut c = MAGIC.to_vec();
    c.extend_from_slice(&(payload_len as u32).to_le_bytes());
    c.extend_from_slice(&payload);
    c.extend_from_slice(&vfio_migration::stream::crc32c(&payload).to_le_bytes());
    c
}

fn valid(c: &[u8]) -> bool {
    if c.len() < 12 || &c[..4] != MAGIC {
        return false;
    }
    let len = u32::from_le_bytes([c[4], c[5], c[6], c[7]]) as usize;
    if c.len() != 12 + len {
        return false;
    }
    let crc = u32::from_le_bytes([c[8 + len], c[9 + len], c[10 + len], c[11 + len]]);
    vfio_migration::stream::crc32c(&c[8..8 + len]) == crc
}

impl FakeDevice {
    /// A RUNNING device with `flags` holding a state of about `payload_len` bytes, of which
    /// `initial_len` are offered in PRE_COPY.
    pub fn new(name: &str, flags: MigrationFlags, seed: u64, payload_len: usize, initial_len: usize) -> (Self, Handle) {
        let content = make_content(seed, payload_len);
        let initial_len = initial_len.min(content.len());
        let h = Handle(Arc::new(Mutex::new(Inner {
            name: name.into(),
            flags,
            state: DeviceState::Running,
            content,
            initial_len,
            generation: 0,
            cursor: 0,
            loaded: Vec::new(),
            fault: None,
            resets: 0,
            transitions: Vec::new(),
            log: None,
            dma_writes: Vec::new(),
            max_read: 1000,
            unknown_identity: false,
        })));
        (
            Self {
                name: name.into(),
                h: h.clone(),
            },
            h,
        )
    }

    fn err(&self, op: Operation, errno: i32) -> DeviceError {
        DeviceError::errno(&self.name, op, errno)
    }
}

impl MigrationDevice for FakeDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn identity(&self) -> DeviceIdentity {
        if self.h.lock().unknown_identity {
            return DeviceIdentity::Unknown;
        }
        DeviceIdentity::Emulated { params: "fake".into() }
    }
    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        let f = self.h.lock().flags;
        if f.bits() == 0 {
            // No migration support: the kernel answers ENOTTY.
            return Err(self.err(Operation::GetFlags, libc::ENOTTY));
        }
        Ok(f)
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        Ok(self.h.lock().state)
    }
    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        let mut d = self.h.lock();
        let from = d.state;
        let op = Operation::SetState { from, to };
        let steps = path(from, to, d.flags).map_err(|e| DeviceError::new(&self.name, op, ErrorKind::State(e)))?;
        if let Some(mode) = d.fault {
            if from != to && mode == FaultMode::Error {
                d.state = DeviceState::Error;
                d.generation += 1;
            }
            return Err(self.err(op, libc::EIO));
        }
        let mut opened = None;
        for w in steps.windows(2) {
            let (a, b) = (w[0], w[1]);
            if a == DeviceState::Resuming && b == DeviceState::Stop && !valid(&d.loaded) {
                // The device validates what was written; it stays RESUMING (mtty).
                return Err(self.err(Operation::SetState { from: a, to: b }, libc::EINVAL));
            }
            if a.arc_closes(b) {
                d.generation += 1;
                if a == DeviceState::Resuming {
                    d.content = std::mem::take(&mut d.loaded);
                }
            }
            if let Some(kind) = a.arc_opens(b) {
                d.generation += 1;
                d.cursor = 0;
                d.loaded.clear();
                opened = Some(kind);
            }
            d.state = b;
            d.transitions.push(b);
        }
        Ok(opened.map(|kind| {
            Box::new(FakeSession {
                name: self.name.clone(),
                h: self.h.clone(),
                generation: d.generation,
                kind,
            }) as Box<dyn TransferSession>
        }))
    }
    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        Ok(self.h.lock().content.len() as u64)
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        let mut d = self.h.lock();
        d.state = DeviceState::Running;
        d.generation += 1;
        d.loaded.clear();
        d.resets += 1;
        d.log = None;
        Ok(())
    }
    fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError> {
        let mut d = self.h.lock();
        if d.fault.is_some() {
            return Err(self.err(Operation::DmaLogStart, libc::EIO));
        }
        if d.log.is_some() {
            return Err(self.err(Operation::DmaLogStart, libc::EBUSY));
        }
        d.log = Some((ranges.to_vec(), page_size));
        Ok(page_size)
    }
    fn dma_log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        let mut d = self.h.lock();
        if d.fault.is_some() || d.log.is_none() {
            return Err(self.err(Operation::DmaLogReport, libc::EIO));
        }
        let mut keep = Vec::new();
        for a in std::mem::take(&mut d.dma_writes) {
            if a >= iova && a < iova + length {
                let n = ((a - iova) / page_size) as usize;
                if let Some(w) = bitmap.get_mut(n / 64) {
                    *w |= 1 << (n % 64);
                }
            } else {
                keep.push(a);
            }
        }
        d.dma_writes = keep;
        Ok(())
    }
    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        let mut d = self.h.lock();
        if d.log.take().is_none() {
            return Err(self.err(Operation::DmaLogStop, libc::EINVAL));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct FakeSession {
    name: String,
    h: Handle,
    generation: u64,
    kind: SessionKind,
}

impl FakeSession {
    fn open(&self, d: &Inner, op: Operation) -> Result<DeviceState, DeviceError> {
        if d.generation != self.generation || d.state.session_kind() != Some(self.kind) {
            return Err(DeviceError::new(&self.name, op, ErrorKind::SessionClosed));
        }
        if d.fault.is_some() {
            return Err(DeviceError::errno(&self.name, op, libc::EIO));
        }
        Ok(d.state)
    }
}

impl TransferSession for FakeSession {
    fn kind(&self) -> SessionKind {
        self.kind
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        let mut d = self.h.lock();
        let state = self.open(&d, Operation::Read)?;
        let limit = if state == DeviceState::StopCopy {
            d.content.len()
        } else {
            d.initial_len
        };
        let n = (limit.saturating_sub(d.cursor)).min(buf.len()).min(d.max_read);
        if n == 0 {
            return Ok(if state == DeviceState::StopCopy {
                ReadOutcome::End
            } else {
                ReadOutcome::NothingNow
            });
        }
        let c = d.cursor;
        buf[..n].copy_from_slice(&d.content[c..c + n]);
        d.cursor += n;
        Ok(ReadOutcome::Data(n))
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let mut d = self.h.lock();
        self.open(&d, Operation::Write)?;
        if d.loaded.len() + buf.len() > MAX_LOAD {
            return Err(DeviceError::errno(&self.name, Operation::Write, libc::ENOMEM));
        }
        let n = buf.len().min(d.max_read.max(1));
        d.loaded.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        let d = self.h.lock();
        let state = self.open(&d, Operation::PrecopyInfo)?;
        if !matches!(state, DeviceState::PreCopy | DeviceState::PreCopyP2p) {
            return Err(DeviceError::errno(&self.name, Operation::PrecopyInfo, libc::EINVAL));
        }
        Ok(PrecopyInfo {
            initial_bytes: d.initial_len.saturating_sub(d.cursor) as u64,
            dirty_bytes: 0,
            reinit: false,
        })
    }
}
