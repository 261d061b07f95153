//! The loading side of a live migration.

use std::collections::BTreeMap;

use super::LiveError;
use crate::device::{DeviceError, ErrorKind, MigrationDevice, Operation, TransferSession};
use crate::session::{Recovery, restore_to, set_state_or_recover};
use crate::state::{DeviceState, MigrationFlags};

/// Options of a [`Destination`].
#[derive(Clone, Debug)]
pub struct DestinationOptions {
    /// Most bytes held per device for chunks that arrived ahead of their turn.
    pub max_reorder_bytes: u64,
    /// Accept a source or destination device whose identity is unknown
    /// ([`crate::device::DeviceIdentity::Unknown`]) in the identity check before a migration
    /// ([`crate::device::DeviceIdentity::check_compatible`]); default `false`: refused. Known,
    /// different identities are refused anyway.
    pub force_unknown_identity: bool,
}

impl Default for DestinationOptions {
    fn default() -> Self {
        Self {
            max_reorder_bytes: 64 << 20,
            force_unknown_identity: false,
        }
    }
}

/// The per-device loading state: the RESUMING session and the reorder buffer.
///
/// [`Destination::loaders`] hands these out so several devices can load in parallel threads.
pub struct Loader {
    name: String,
    session: Option<Box<dyn TransferSession>>,
    next_seq: u64,
    ahead: BTreeMap<u64, Vec<u8>>,
    ahead_bytes: u64,
    max_ahead: u64,
    loaded: u64,
    /// Chunks the source sent before its latest initial-data marker, once one arrived.
    initial_chunks: Option<u64>,
    /// Initial-data markers received (more than one after re-inits, PRE_COPY info v2).
    markers: u64,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("name", &self.name)
            .field("next_seq", &self.next_seq)
            .field("ahead", &self.ahead.len())
            .field("loaded", &self.loaded)
            .finish()
    }
}

impl Loader {
    fn seq_err(&self, reason: String) -> LiveError {
        LiveError::Sequence {
            device: 0,
            reason: format!("{}: {reason}", self.name),
        }
    }

    /// Load chunk `seq` (0, 1, 2, ... per device). Chunks may arrive in any order; each is written
    /// to the device exactly once, in sequence order.
    pub fn load(&mut self, seq: u64, data: &[u8]) -> Result<(), LiveError> {
        if seq < self.next_seq || self.ahead.contains_key(&seq) {
            return Err(self.seq_err(format!("chunk {seq} arrived twice")));
        }
        if seq > self.next_seq {
            let len = data.len() as u64;
            if self.ahead_bytes + len > self.max_ahead {
                return Err(self.seq_err(format!(
                    "chunk {seq} arrived while {} is still missing and {} bytes are already held (limit {})",
                    self.next_seq, self.ahead_bytes, self.max_ahead
                )));
            }
            self.ahead_bytes += len;
            self.ahead.insert(seq, data.to_vec());
            return Ok(());
        }
        self.write_all(data)?;
        self.next_seq += 1;
        while let Some(chunk) = self.ahead.remove(&self.next_seq) {
            self.ahead_bytes -= chunk.len() as u64;
            self.write_all(&chunk)?;
            self.next_seq += 1;
        }
        Ok(())
    }

    fn write_all(&mut self, mut data: &[u8]) -> Result<(), LiveError> {
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| DeviceError::new(&self.name, Operation::Write, ErrorKind::SessionClosed))?;
        while !data.is_empty() {
            let n = session.write(data)?;
            if n == 0 || n > data.len() {
                return Err(DeviceError::new(
                    &self.name,
                    Operation::Write,
                    ErrorKind::InvalidAnswer(format!("write of {} bytes took {n}", data.len())),
                )
                .into());
            }
            data = &data[n..];
            self.loaded += n as u64;
        }
        Ok(())
    }

    /// The source says its initial pre-copy data was `chunks` chunks. A later marker (the
    /// device re-initialised its initial data, PRE_COPY info v2) replaces the earlier one: the
    /// acknowledgement ([`Loader::initial_loaded`]) then waits for the new count.
    pub fn initial_sent(&mut self, chunks: u64) {
        self.initial_chunks = Some(chunks);
        self.markers += 1;
    }

    /// Initial-data markers received so far.
    pub fn initial_markers(&self) -> u64 {
        self.markers
    }

    /// Whether the initial pre-copy data has been loaded (the switchover acknowledgement).
    pub fn initial_loaded(&self) -> bool {
        self.initial_chunks.is_some_and(|c| self.next_seq >= c)
    }

    /// Bytes written to the device so far.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded
    }

    /// Chunks written to the device so far (the next expected sequence number).
    pub fn chunks_loaded(&self) -> u64 {
        self.next_seq
    }
}

struct DstDev<'a> {
    dev: Box<dyn MigrationDevice + 'a>,
    flags: MigrationFlags,
    loader: Loader,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Idle,
    Resuming,
    Completed,
    Resumed,
    Aborted,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Idle => "not started",
            Stage::Resuming => "resuming",
            Stage::Completed => "loaded and stopped",
            Stage::Resumed => "resumed",
            Stage::Aborted => "aborted",
        }
    }
}

/// The loading side of a live migration of a group of devices.
pub struct Destination<'a> {
    devs: Vec<DstDev<'a>>,
    stage: Stage,
}

impl std::fmt::Debug for Destination<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("devices", &self.devs.iter().map(|d| d.dev.name()).collect::<Vec<_>>())
            .field("stage", &self.stage)
            .finish()
    }
}

impl<'a> Destination<'a> {
    /// A destination over `devices` (RUNNING or STOP, not yet touched).
    pub fn new(devices: Vec<Box<dyn MigrationDevice + 'a>>, opts: DestinationOptions) -> Result<Self, LiveError> {
        if devices.is_empty() {
            return Err(LiveError::Refused("no devices to load into".into()));
        }
        let mut devs = Vec::with_capacity(devices.len());
        for dev in devices {
            let flags = dev.flags()?;
            devs.push(DstDev {
                loader: Loader {
                    name: dev.name().to_string(),
                    session: None,
                    next_seq: 0,
                    ahead: BTreeMap::new(),
                    ahead_bytes: 0,
                    max_ahead: opts.max_reorder_bytes,
                    loaded: 0,
                    initial_chunks: None,
                    markers: 0,
                },
                dev,
                flags,
            });
        }
        Ok(Self {
            devs,
            stage: Stage::Idle,
        })
    }

    fn expect(&self, step: &'static str, stage: Stage) -> Result<(), LiveError> {
        if self.stage == stage {
            Ok(())
        } else {
            Err(LiveError::WrongPhase {
                step,
                phase: self.stage.name(),
            })
        }
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devs.len()
    }

    /// Whether the group is empty (never: [`Destination::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.devs.is_empty()
    }

    /// Start: every device enters RESUMING.
    pub fn start(&mut self) -> Result<(), LiveError> {
        self.expect("start", Stage::Idle)?;
        for i in 0..self.devs.len() {
            let d = &mut self.devs[i];
            let start = match d.dev.state() {
                Ok(s) => s,
                Err(e) => return Err(self.fail(e.into())),
            };
            match set_state_or_recover(d.dev.as_mut(), DeviceState::Resuming, start) {
                Ok(Some(s)) => d.loader.session = Some(s),
                Ok(None) => {
                    let e = DeviceError::no_session(d.dev.name(), start, DeviceState::Resuming);
                    return Err(self.fail(e.into()));
                }
                Err(e) => return Err(self.fail(e.into())),
            }
        }
        self.stage = Stage::Resuming;
        Ok(())
    }

    /// Load chunk `seq` of device `device` (see [`Loader::load`]). A failure aborts.
    pub fn load(&mut self, device: usize, seq: u64, data: &[u8]) -> Result<(), LiveError> {
        self.expect("load", Stage::Resuming)?;
        let Some(d) = self.devs.get_mut(device) else {
            let e = LiveError::Sequence {
                device,
                reason: format!("no such device (the destination has {})", self.devs.len()),
            };
            return Err(self.fail(e));
        };
        match d.loader.load(seq, data) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(with_index(e, device))),
        }
    }

    /// The source's initial-data marker for `device` after `chunks` chunks.
    ///
    /// A device may send it again (PRE_COPY info v2: new initial data appeared on the source):
    /// a later marker means "re-acknowledge", so [`Destination::switchover_ready`] is false until
    /// the chunks it counts are loaded too. A marker counting fewer chunks than an earlier one
    /// is a sequence error.
    pub fn initial_sent(&mut self, device: usize, chunks: u64) -> Result<(), LiveError> {
        match self.devs.get_mut(device) {
            Some(d) => {
                if let Some(before) = d.loader.initial_chunks
                    && chunks < before
                {
                    return Err(LiveError::Sequence {
                        device,
                        reason: format!(
                            "{}: initial-data marker after {chunks} chunks, but an earlier one came after {before}",
                            d.loader.name
                        ),
                    });
                }
                d.loader.initial_sent(chunks);
                Ok(())
            }
            None => Err(LiveError::Sequence {
                device,
                reason: "initial-data marker for a device the destination does not have".into(),
            }),
        }
    }

    /// Whether every device that takes pre-copy data has loaded its initial data: the
    /// switchover acknowledgement.
    pub fn switchover_ready(&self) -> bool {
        self.devs
            .iter()
            .all(|d| !d.flags.contains(MigrationFlags::PRE_COPY) || d.loader.initial_loaded())
    }

    /// Initial-data markers received so far, all devices (a switchover acknowledgement covers
    /// this many).
    pub fn initial_markers(&self) -> u64 {
        self.devs.iter().map(|d| d.loader.markers).sum()
    }

    /// The per-device loaders, for loading several devices in parallel threads.
    pub fn loaders(&mut self) -> Vec<&mut Loader> {
        self.devs.iter_mut().map(|d| &mut d.loader).collect()
    }

    /// Bytes loaded per device.
    pub fn loaded_bytes(&self) -> Vec<u64> {
        self.devs.iter().map(|d| d.loader.loaded).collect()
    }

    /// Complete the load: check nothing is missing, then every device RESUMING -> STOP, where
    /// the device validates its state. Any failure resets every device.
    pub fn complete(&mut self, expected_chunks: Option<&[u64]>) -> Result<(), LiveError> {
        self.expect("complete", Stage::Resuming)?;
        for i in 0..self.devs.len() {
            let l = &self.devs[i].loader;
            let missing = !l.ahead.is_empty() || expected_chunks.is_some_and(|e| e.get(i) != Some(&l.next_seq));
            if missing {
                let reason = format!(
                    "{}: chunks missing: {} loaded, {} held out of order, {} expected",
                    l.name,
                    l.next_seq,
                    l.ahead.len(),
                    expected_chunks
                        .and_then(|e| e.get(i))
                        .map_or("an unknown number".into(), |n| n.to_string())
                );
                return Err(self.fail(LiveError::Sequence { device: i, reason }));
            }
        }
        for i in 0..self.devs.len() {
            let d = &mut self.devs[i];
            d.loader.session = None;
            if let Err(e) = set_state_or_recover(d.dev.as_mut(), DeviceState::Stop, DeviceState::Error) {
                return Err(self.fail(e.into()));
            }
        }
        self.stage = Stage::Completed;
        Ok(())
    }

    /// Resume in two phases: every device with P2P to RUNNING_P2P, then every device to RUNNING.
    pub fn resume(&mut self) -> Result<(), LiveError> {
        self.expect("resume", Stage::Completed)?;
        for target in [DeviceState::RunningP2p, DeviceState::Running] {
            for i in 0..self.devs.len() {
                let d = &mut self.devs[i];
                if !target.is_supported_by(d.flags) {
                    continue;
                }
                if let Err(e) = set_state_or_recover(d.dev.as_mut(), target, DeviceState::Error) {
                    return Err(self.fail(e.into()));
                }
            }
        }
        self.stage = Stage::Resumed;
        Ok(())
    }

    /// Abort: reset every device (aborting RESUMING needs a reset); they end RUNNING.
    pub fn abort(&mut self) -> Vec<(String, Recovery)> {
        let mut out = Vec::new();
        if self.stage == Stage::Aborted {
            return out;
        }
        for d in &mut self.devs {
            d.loader.session = None;
            d.loader.ahead.clear();
            d.loader.ahead_bytes = 0;
            let r = match d.dev.state() {
                Ok(DeviceState::Running) if self.stage == Stage::Idle => Recovery::NotNeeded(DeviceState::Running),
                _ => crate::session::recovery::reset_device(d.dev.as_mut()),
            };
            let r = match r {
                Recovery::Failed(_) => restore_to(d.dev.as_mut(), DeviceState::Running),
                r => r,
            };
            if !matches!(r, Recovery::NotNeeded(_)) {
                out.push((d.dev.name().to_string(), r));
            }
        }
        self.stage = Stage::Aborted;
        out
    }

    fn fail(&mut self, cause: LiveError) -> LiveError {
        let recoveries = self.abort();
        LiveError::Aborted {
            cause: Box::new(cause),
            recoveries,
        }
    }

    /// Give the devices back (an unfinished load is aborted first).
    pub fn into_devices(mut self) -> Vec<Box<dyn MigrationDevice + 'a>> {
        if matches!(self.stage, Stage::Resuming | Stage::Completed) {
            self.abort();
        }
        self.stage = Stage::Aborted;
        std::mem::take(&mut self.devs).into_iter().map(|d| d.dev).collect()
    }

    /// Borrow device `i`.
    pub fn device(&self, i: usize) -> Option<&(dyn MigrationDevice + 'a)> {
        self.devs.get(i).map(|d| d.dev.as_ref())
    }
}

impl Drop for Destination<'_> {
    fn drop(&mut self) {
        if matches!(self.stage, Stage::Resuming | Stage::Completed) {
            for (name, r) in self.abort() {
                log::warn!("{name}: unfinished load dropped: {r}");
            }
        }
    }
}

fn with_index(e: LiveError, device: usize) -> LiveError {
    match e {
        LiveError::Sequence { reason, .. } => LiveError::Sequence { device, reason },
        e => e,
    }
}
