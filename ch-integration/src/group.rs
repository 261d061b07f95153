//! The group coordinator: what Cloud Hypervisor's call order does not supply.
//!
//! Cloud Hypervisor visits its devices one at a time, in the order of its device tree, for every
//! step of a migration. Several VFIO devices need group decisions: refuse before anything starts,
//! quiesce every device (P2P) before any stops, stop them all and read their states in parallel,
//! resume them in two phases. [`VfioMigrationGroup`] is shared (an `Arc<Mutex<..>>` handle) by the
//! per-device [`crate::MigratableVfioDevice`]s and makes those decisions on the first (or last)
//! visit. On the source it drives the engine's [`Source`]; on the destination one engine
//! [`Destination`] per device.
//!
//! Source, Cloud Hypervisor's order (facts section 4) and what the group does:
//!
//! | call (per device) | group |
//! |---|---|
//! | `start_migration` | refuse clearly, before touching any device |
//! | `start_dirty_log` | first call: every device RUNNING -> PRE_COPY where supported; start this device's tracking |
//! | `dirty_log` | drain the pre-copy data into bounded buffers (spilled to a file past a cap); this device's dirty ranges |
//! | `pause` | this device to RUNNING_P2P / PRE_COPY_P2P (nothing stops yet) |
//! | `snapshot` | first call: every device to STOP_COPY, all read in parallel, then STOP; each call returns its own part |
//! | `stop_dirty_log` | stop tracking; before a snapshot it means failure: every device back to RUNNING |
//! | `complete_migration` | last call: the migration is over, the devices stay stopped |
//! | `resume` (failure path) | every device back to RUNNING (RUNNING_P2P first, then RUNNING) |
//!
//! Destination: `restore` = RESUMING + load + RESUMING -> STOP (the device validates); `resume`
//! moves the device to RUNNING_P2P, and the last restored device to be resumed moves them all to
//! RUNNING.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_migration::device::MigrationDevice;
use vfio_migration::live::{ChunkSink, Destination, DestinationOptions, Phase as ChunkPhase, Source, SourceOptions};
use vfio_migration::session::{MAX_BUFFER, restore_to, set_state_or_recover};
use vfio_migration::state::{DeviceState, MigrationFlags};
use vm_migration::Snapshot;
use vm_migration::protocol::{MemoryRange, MemoryRangeTable};

use crate::encoding::{self, AnyDeviceState, DeviceStateRecord, HEADER_LEN, RecordHeader};
use crate::error::{Cause, IntegrationError, Step};
use crate::iterative::PrecopyItem;
use crate::shared::SharedDevice;
use crate::spill::SpillBuffer;
use crate::tracking::{AllDirty, DeviceDmaLog, DirtyTracker, Tracking, Viommu, translate};

/// Options of a [`VfioMigrationGroup`].
#[derive(Clone, Debug)]
pub struct GroupOptions {
    /// Use PRE_COPY on devices that support it.
    pub precopy: bool,
    /// Allow several devices when some lack P2P (only safe if they never DMA to each other).
    pub force_without_p2p: bool,
    /// Allow devices without precise dirty tracking: all their DMA-reachable memory is reported
    /// dirty on every iteration (the migration may not converge).
    pub allow_all_dirty: bool,
    /// Device state kept in memory per device before spilling to a temporary file.
    pub buffer_cap: usize,
    /// Where spill files go (the system's temporary directory when `None`).
    pub spill_dir: Option<PathBuf>,
    /// Most pre-copy bytes read from the devices per `dirty_log` call (all devices together).
    pub drain_budget: u64,
    /// Size of each read from a device and of each iterative chunk.
    pub chunk_size: usize,
    /// Read the stop-copy states of several devices in parallel.
    pub parallel: bool,
    /// Largest device state accepted on restore (bytes).
    pub max_state_bytes: u64,
    /// Above this many bytes a device's snapshot part names a file beside the snapshot instead
    /// of holding the state inline (then `Transportable::send` must write it). `None`: always
    /// inline, as a live migration's `State` message needs.
    pub external_state_threshold: Option<u64>,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            precopy: true,
            force_without_p2p: false,
            allow_all_dirty: false,
            buffer_cap: 64 << 20,
            spill_dir: None,
            drain_budget: 256 << 20,
            chunk_size: MAX_BUFFER,
            parallel: true,
            max_state_bytes: 64 << 30,
            external_state_threshold: None,
        }
    }
}

/// How Cloud Hypervisor describes one VFIO device to the integration.
#[derive(Debug)]
pub struct DeviceConfig {
    /// Cloud Hypervisor's device id (`_vfio0`, or the user's id).
    pub id: String,
    /// The guest memory the device can reach by DMA, in device addresses (for dirty tracking).
    pub dma_ranges: Vec<MemoryRange>,
    /// How its dirty pages are found.
    pub tracking: Tracking,
    /// Whether it sits behind a virtual IOMMU.
    pub viommu: Viommu,
}

impl DeviceConfig {
    /// A device `id` reaching `dma_ranges`, with device DMA logging at 4 KiB and no vIOMMU.
    pub fn new(id: impl Into<String>, dma_ranges: Vec<MemoryRange>) -> Self {
        Self {
            id: id.into(),
            dma_ranges,
            tracking: Tracking::DeviceLog { page_size: 4096 },
            viommu: Viommu::None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No source migration.
    Idle,
    /// The source engine runs (PRE_COPY where supported), before the snapshot.
    PreCopy,
    /// The states are read; the devices are stopped.
    Saved,
}

struct Member {
    id: String,
    dev: SharedDevice,
    flags: Option<MigrationFlags>,
    identity: String,
    dma_ranges: Vec<MemoryRange>,
    tracker: Option<Box<dyn DirtyTracker>>,
    viommu: Viommu,
    tracking: bool,
    paused: bool,
    // Source side.
    buf: SpillBuffer,
    sent_chunks: u64,
    sent_bytes: u64,
    initial_at: Option<u64>,
    marker_sent: bool,
    saved: bool,
    completed: bool,
    // Destination side.
    dest: Option<Destination<'static>>,
    restored: bool,
    resumed_p2p: bool,
}

impl Member {
    fn has(&self, f: MigrationFlags) -> bool {
        self.flags.is_some_and(|fl| fl.contains(f))
    }

    fn reset_source_side(&mut self) {
        self.buf.clear();
        self.sent_chunks = 0;
        self.sent_bytes = 0;
        self.initial_at = None;
        self.marker_sent = false;
        self.saved = false;
        self.completed = false;
    }

    fn err(&self, step: Step, cause: impl Into<Cause>) -> IntegrationError {
        IntegrationError::new(&self.id, step, cause)
    }
}

pub(crate) struct Inner {
    opts: GroupOptions,
    members: Vec<Member>,
    source: Option<Source<'static>>,
    phase: Phase,
}

/// The coordinator shared by the VFIO devices of one VM (cheap to clone: a shared handle).
#[derive(Clone)]
pub struct VfioMigrationGroup {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for VfioMigrationGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("VfioMigrationGroup")
            .field("devices", &g.members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>())
            .field("phase", &g.phase)
            .finish()
    }
}

/// Routes the engine's chunks into the members' buffers.
struct MemberSink<'a> {
    members: &'a mut [Member],
}

impl ChunkSink for MemberSink<'_> {
    fn chunk(&mut self, device: usize, _phase: ChunkPhase, data: &[u8]) -> io::Result<()> {
        let m = self
            .members
            .get_mut(device)
            .ok_or_else(|| io::Error::other(format!("chunk for unknown device index {device}")))?;
        m.buf.append(data)
    }

    fn initial_sent(&mut self, device: usize) -> io::Result<()> {
        let m = self
            .members
            .get_mut(device)
            .ok_or_else(|| io::Error::other(format!("marker for unknown device index {device}")))?;
        m.initial_at = Some(m.buf.total_in());
        Ok(())
    }
}

impl VfioMigrationGroup {
    /// An empty group.
    pub fn new(opts: GroupOptions) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                opts,
                members: Vec::new(),
                source: None,
                phase: Phase::Idle,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave Inner half-updated in a way that matters
        // more than refusing every later call would: every step re-reads device states.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a device; returns its index. Refused while a migration is in progress.
    pub fn register(&self, dev: Box<dyn MigrationDevice>, config: DeviceConfig) -> Result<usize, IntegrationError> {
        let mut g = self.lock();
        // On the destination Cloud Hypervisor creates (and restores) its devices one at a time,
        // so devices join while others load; on the source the group is fixed once it started.
        if g.phase != Phase::Idle {
            return Err(IntegrationError::new(
                &config.id,
                Step::Register,
                Cause::WrongPhase("a device cannot join its group during an outgoing migration".into()),
            ));
        }
        if g.members.iter().any(|m| m.id == config.id) {
            return Err(IntegrationError::refused(
                &config.id,
                Step::Register,
                "the group already has a device with this id",
            ));
        }
        let flags = match dev.flags() {
            Ok(f) => Some(f),
            Err(e) => {
                log::info!("{}: no VFIO migration support: {e}", config.id);
                None
            }
        };
        let identity = dev.identity().to_string();
        let tracker: Option<Box<dyn DirtyTracker>> = match config.tracking {
            Tracking::DeviceLog { page_size } => Some(Box::new(DeviceDmaLog::new(&config.dma_ranges, page_size))),
            Tracking::Custom(t) => Some(t),
            Tracking::None => None,
        };
        let buf = SpillBuffer::new(g.opts.buffer_cap, g.opts.spill_dir.clone());
        g.members.push(Member {
            id: config.id,
            dev: SharedDevice::new(dev),
            flags,
            identity,
            dma_ranges: config.dma_ranges,
            tracker,
            viommu: config.viommu,
            tracking: false,
            paused: false,
            buf,
            sent_chunks: 0,
            sent_bytes: 0,
            initial_at: None,
            marker_sent: false,
            saved: false,
            completed: false,
            dest: None,
            restored: false,
            resumed_p2p: false,
        });
        Ok(g.members.len() - 1)
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.lock().members.len()
    }

    /// Whether the group has no device.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id of device `index`.
    pub fn id(&self, index: usize) -> Option<String> {
        self.lock().members.get(index).map(|m| m.id.clone())
    }

    /// The current migration state of device `index`, as the device reports it.
    pub fn device_state(&self, index: usize) -> Option<Result<DeviceState, vfio_migration::DeviceError>> {
        let g = self.lock();
        g.members.get(index).map(|m| m.dev.state())
    }

    /// Whether a source migration is in progress (started and neither completed nor failed).
    pub fn migration_in_progress(&self) -> bool {
        self.lock().phase != Phase::Idle
    }

    /// Run `f` on the group for device `index`.
    pub(crate) fn with<T>(
        &self,
        index: usize,
        step: Step,
        f: impl FnOnce(&mut Inner, usize) -> Result<T, IntegrationError>,
    ) -> Result<T, IntegrationError> {
        let mut g = self.lock();
        if index >= g.members.len() {
            return Err(IntegrationError::new(
                format!("#{index}"),
                step,
                Cause::WrongPhase("no such device in the group".into()),
            ));
        }
        f(&mut g, index)
    }

    /// Source, iterative protocol: drain the devices and take up to about `max_bytes` of their
    /// buffered pre-copy data as numbered items (with each device's initial-data marker once
    /// everything before it is out). Only before the snapshot.
    pub fn take_precopy(&self, max_bytes: u64) -> Result<Vec<PrecopyItem>, IntegrationError> {
        let mut g = self.lock();
        if g.phase != Phase::PreCopy {
            return Err(IntegrationError::new(
                "group",
                Step::PrecopySend,
                Cause::WrongPhase("pre-copy data is sent only between start_dirty_log and the snapshot".into()),
            ));
        }
        g.drain(0, Step::PrecopySend)?;
        let chunk = g.opts.chunk_size.max(1);
        let mut items = Vec::new();
        let mut taken = 0u64;
        for m in &mut g.members {
            while taken < max_bytes && !m.buf.is_empty() {
                let want = ((max_bytes - taken) as usize).min(chunk);
                let data = m.buf.take_front(want).map_err(|e| m.err(Step::PrecopySend, e))?;
                if data.is_empty() {
                    break;
                }
                taken += data.len() as u64;
                m.sent_bytes += data.len() as u64;
                items.push(PrecopyItem::Chunk {
                    device: m.id.clone(),
                    seq: m.sent_chunks,
                    data,
                });
                m.sent_chunks += 1;
            }
            if !m.marker_sent && m.initial_at.is_some_and(|at| m.sent_bytes >= at) {
                m.marker_sent = true;
                items.push(PrecopyItem::InitialSent {
                    device: m.id.clone(),
                    chunks: m.sent_chunks,
                });
            }
        }
        Ok(items)
    }

    /// Source: bytes still to move before the devices' pre-copy is drained (buffered here plus
    /// what the devices report as initial and dirty), and the devices' stop-copy estimate.
    pub fn precopy_pending(&self) -> Result<(u64, u64), IntegrationError> {
        let mut g = self.lock();
        let buffered: u64 = g.members.iter().map(|m| m.buf.len()).sum();
        let precopy = g.phase == Phase::PreCopy;
        match g.source.as_mut() {
            Some(src) if precopy => {
                let p = src
                    .pending()
                    .map_err(|e| IntegrationError::new("group", Step::PrecopySend, e))?;
                Ok((buffered + p.initial + p.dirty, p.stop_copy))
            }
            _ => Ok((buffered, 0)),
        }
    }

    /// Destination, iterative protocol: load one item (the device enters RESUMING on the first).
    pub fn load_precopy(&self, item: &PrecopyItem) -> Result<(), IntegrationError> {
        let mut g = self.lock();
        let Some(i) = g.members.iter().position(|m| m.id == item.device()) else {
            return Err(IntegrationError::refused(
                item.device(),
                Step::PrecopyLoad,
                "no device with this id on the destination",
            ));
        };
        let m = &mut g.members[i];
        if m.restored {
            return Err(m.err(
                Step::PrecopyLoad,
                Cause::WrongPhase("pre-copy data after the device was restored".into()),
            ));
        }
        let dest = m.ensure_destination(Step::PrecopyLoad)?;
        let r = match item {
            PrecopyItem::Chunk { seq, data, .. } => dest.load(0, *seq, data),
            PrecopyItem::InitialSent { chunks, .. } => dest.initial_sent(0, *chunks),
        };
        if let Err(e) = r {
            // A failed load aborted (reset) the device.
            m.dest = None;
            return Err(m.err(Step::PrecopyLoad, e));
        }
        Ok(())
    }

    /// Destination, iterative protocol: whether every device that received pre-copy data has
    /// loaded its initial data (the switchover acknowledgement).
    pub fn switchover_ready(&self) -> bool {
        let g = self.lock();
        g.members
            .iter()
            .all(|m| m.dest.as_ref().is_none_or(|d| d.switchover_ready()))
    }
}

impl Member {
    fn ensure_destination(&mut self, step: Step) -> Result<&mut Destination<'static>, IntegrationError> {
        if self.dest.is_none() {
            let dev: Box<dyn MigrationDevice> = Box::new(self.dev.clone());
            let mut d = Destination::new(vec![dev], DestinationOptions::default()).map_err(|e| self.err(step, e))?;
            d.start().map_err(|e| self.err(step, e))?;
            self.dest = Some(d);
        }
        match self.dest.as_mut() {
            Some(d) => Ok(d),
            None => Err(IntegrationError::new(
                &self.id,
                step,
                Cause::WrongPhase("destination vanished".into()),
            )),
        }
    }
}

impl Inner {
    fn check_member(&self, m: &Member, need_tracking: bool) -> Result<(), String> {
        let Some(flags) = m.flags else {
            return Err("the device does not support VFIO migration (uAPI v2)".into());
        };
        if !flags.contains(MigrationFlags::STOP_COPY) {
            return Err(format!("migration flags {flags} lack the mandatory STOP_COPY"));
        }
        if !need_tracking {
            return Ok(());
        }
        if matches!(m.viommu, Viommu::Untranslated) {
            return Err(
                "the device is behind a virtual IOMMU and no IOVA translation was given: \
                        its dirty pages cannot be reported as guest addresses"
                    .into(),
            );
        }
        let precise = m.tracker.as_ref().is_some_and(|t| t.precise());
        if !precise && !self.opts.allow_all_dirty {
            return Err(format!(
                "no precise dirty page tracking ({}) and reporting all pages dirty is not allowed \
                 (GroupOptions::allow_all_dirty)",
                m.tracker.as_ref().map_or("none", |t| t.method())
            ));
        }
        Ok(())
    }

    fn check_group(&self) -> Result<(), String> {
        if self.members.len() > 1 && !self.opts.force_without_p2p {
            let lacking: Vec<&str> = self
                .members
                .iter()
                .filter(|m| !m.has(MigrationFlags::P2P))
                .map(|m| m.id.as_str())
                .collect();
            if !lacking.is_empty() {
                return Err(format!(
                    "{} VFIO devices, but {} lack P2P: stopping them one by one is unsafe for \
                     peer-to-peer DMA (GroupOptions::force_without_p2p if they never DMA to each other)",
                    self.members.len(),
                    lacking.join(", ")
                ));
            }
        }
        Ok(())
    }

    fn check_all(&self, i: usize, step: Step, need_tracking: bool) -> Result<(), IntegrationError> {
        let me = &self.members[i];
        self.check_member(me, need_tracking)
            .map_err(|r| IntegrationError::refused(&me.id, step, r))?;
        for m in &self.members {
            self.check_member(m, need_tracking)
                .map_err(|r| IntegrationError::refused(&me.id, step, format!("device {} of the group: {r}", m.id)))?;
        }
        self.check_group()
            .map_err(|r| IntegrationError::refused(&me.id, step, r))
    }

    fn build_source(&mut self, i: usize, step: Step, precopy: bool) -> Result<(), IntegrationError> {
        let opts = SourceOptions {
            precopy,
            force_without_p2p: self.opts.force_without_p2p,
            parallel: self.opts.parallel,
            chunk_size: self.opts.chunk_size,
            queue_depth: 4,
        };
        let devices: Vec<Box<dyn MigrationDevice>> = self
            .members
            .iter()
            .map(|m| Box::new(m.dev.clone()) as Box<dyn MigrationDevice>)
            .collect();
        let src = Source::new(devices, opts).map_err(|e| self.members[i].err(step, e))?;
        for m in &mut self.members {
            m.reset_source_side();
        }
        self.source = Some(src);
        Ok(())
    }

    /// The engine aborted itself after a failure (every device RUNNING): forget the migration.
    fn source_failed(&mut self) {
        self.source = None;
        self.phase = Phase::Idle;
        for m in &mut self.members {
            m.reset_source_side();
        }
    }

    /// Return every source device to RUNNING: the stopped ones to RUNNING_P2P first, so none
    /// runs while a peer is stopped, then all to RUNNING. With `requiesce`, devices Cloud
    /// Hypervisor paused go back to RUNNING_P2P afterwards.
    fn recover_source(&mut self, i: usize, step: Step, requiesce: bool) -> Result<(), IntegrationError> {
        let Some(mut src) = self.source.take() else {
            return Ok(());
        };
        for m in &mut self.members {
            if m.has(MigrationFlags::P2P)
                && let Ok(DeviceState::Stop | DeviceState::StopCopy | DeviceState::PreCopyP2p) = m.dev.state()
            {
                let _ = m.dev.set_state(DeviceState::RunningP2p);
            }
        }
        let recoveries = src.abort();
        drop(src);
        self.source_failed();
        if requiesce {
            for m in &mut self.members {
                if m.paused && m.has(MigrationFlags::P2P) {
                    let _ = set_state_or_recover(&mut m.dev, DeviceState::RunningP2p, DeviceState::Running);
                }
            }
        }
        let failed: Vec<String> = recoveries
            .iter()
            .filter(|(_, r)| !r.succeeded())
            .map(|(n, r)| format!("{n}: {r}"))
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(IntegrationError::new(
                &self.members[i].id,
                step,
                Cause::WrongPhase(format!(
                    "returning the devices to RUNNING failed: {}",
                    failed.join("; ")
                )),
            ))
        }
    }

    /// Read what pre-copy data the devices have now into the buffers.
    fn drain(&mut self, i: usize, step: Step) -> Result<(), IntegrationError> {
        if self.phase != Phase::PreCopy {
            return Ok(());
        }
        let Some(src) = self.source.as_mut() else {
            return Ok(());
        };
        if !src.precopy_active() {
            return Ok(());
        }
        let mut sink = MemberSink {
            members: &mut self.members,
        };
        if let Err(e) = src.iterate(&mut sink, self.opts.drain_budget) {
            let err = self.members[i].err(step, e);
            self.source_failed();
            return Err(err);
        }
        Ok(())
    }

    pub(crate) fn start_migration(&mut self, i: usize) -> Result<(), IntegrationError> {
        if self.phase == Phase::Saved {
            return Err(self.members[i].err(
                Step::StartMigration,
                Cause::WrongPhase("the device states of a migration were already saved".into()),
            ));
        }
        self.check_all(i, Step::StartMigration, true)
    }

    pub(crate) fn start_dirty_log(&mut self, i: usize) -> Result<(), IntegrationError> {
        match self.phase {
            Phase::Idle => {
                self.check_all(i, Step::StartDirtyLog, true)?;
                self.build_source(i, Step::StartDirtyLog, self.opts.precopy)?;
                let started = match self.source.as_mut() {
                    Some(src) => src.start(),
                    None => Ok(()),
                };
                if let Err(e) = started {
                    let err = self.members[i].err(Step::StartDirtyLog, e);
                    self.source_failed();
                    return Err(err);
                }
                self.phase = Phase::PreCopy;
            }
            Phase::PreCopy => {}
            Phase::Saved => {
                return Err(self.members[i].err(
                    Step::StartDirtyLog,
                    Cause::WrongPhase("the device states were already saved".into()),
                ));
            }
        }
        let m = &mut self.members[i];
        if !m.tracking {
            let ranges = m.dma_ranges.clone();
            let t = m.tracker.get_or_insert_with(|| Box::new(AllDirty::new(ranges)));
            let mut dev = m.dev.clone();
            t.start(&mut dev).map_err(|e| m.err(Step::StartDirtyLog, e))?;
            m.tracking = true;
        }
        Ok(())
    }

    pub(crate) fn dirty_log(&mut self, i: usize) -> Result<MemoryRangeTable, IntegrationError> {
        self.drain(i, Step::DirtyLog)?;
        let m = &mut self.members[i];
        if !m.tracking {
            return Ok(MemoryRangeTable::default());
        }
        let Some(t) = m.tracker.as_mut() else {
            return Ok(MemoryRangeTable::default());
        };
        let mut dev = m.dev.clone();
        let table = t.report(&mut dev).map_err(|e| m.err(Step::DirtyLog, e))?;
        Ok(translate(table, &m.viommu))
    }

    /// Stops the tracking of every device of the group: Cloud Hypervisor's device manager stops
    /// at the first error, and after a failure no device may be left logging.
    pub(crate) fn stop_dirty_log(&mut self, i: usize) -> Result<(), IntegrationError> {
        let mut result = Ok(());
        for m in &mut self.members {
            if !m.tracking {
                continue;
            }
            m.tracking = false;
            if let Some(t) = m.tracker.as_mut() {
                let mut dev = m.dev.clone();
                if let Err(e) = t.stop(&mut dev) {
                    log::warn!("{}: stopping {} failed: {e}", m.id, t.method());
                    if result.is_ok() {
                        result = Err(IntegrationError::new(&m.id, Step::StopDirtyLog, e));
                    }
                }
            }
        }
        if self.phase == Phase::PreCopy {
            // Stopping the log before the states were saved: the migration failed.
            self.recover_source(i, Step::StopDirtyLog, true)?;
        }
        result
    }

    pub(crate) fn pause(&mut self, i: usize) -> Result<(), IntegrationError> {
        let m = &mut self.members[i];
        m.paused = true;
        if !m.has(MigrationFlags::P2P) {
            // Without P2P nothing short of stopping quiesces the device: it stops at the snapshot.
            return Ok(());
        }
        let state = m.dev.state().map_err(|e| m.err(Step::Pause, e))?;
        let target = match state {
            DeviceState::Running => DeviceState::RunningP2p,
            DeviceState::PreCopy => DeviceState::PreCopyP2p,
            _ => return Ok(()),
        };
        set_state_or_recover(&mut m.dev, target, state).map_err(|e| m.err(Step::Pause, e))?;
        Ok(())
    }

    pub(crate) fn resume(&mut self, i: usize) -> Result<(), IntegrationError> {
        self.members[i].paused = false;
        if self.members[i].restored {
            return self.resume_destination(i);
        }
        if self.source.is_some() {
            return self.recover_source(i, Step::Resume, false);
        }
        let m = &mut self.members[i];
        if let Some(mut d) = m.dest.take() {
            // Pre-copy data arrived but no state: abandon the load (resets the device).
            d.abort();
        }
        if m.flags.is_none() {
            return Ok(());
        }
        match m.dev.state() {
            Ok(DeviceState::Running) => Ok(()),
            Ok(DeviceState::Error) | Err(_) => {
                let r = restore_to(&mut m.dev, DeviceState::Running);
                if r.succeeded() {
                    Ok(())
                } else {
                    Err(m.err(Step::Resume, Cause::WrongPhase(r.to_string())))
                }
            }
            Ok(_) => {
                set_state_or_recover(&mut m.dev, DeviceState::Running, DeviceState::Error)
                    .map_err(|e| m.err(Step::Resume, e))?;
                Ok(())
            }
        }
    }

    fn resume_destination(&mut self, i: usize) -> Result<(), IntegrationError> {
        let m = &mut self.members[i];
        if !m.resumed_p2p {
            if m.has(MigrationFlags::P2P) {
                set_state_or_recover(&mut m.dev, DeviceState::RunningP2p, DeviceState::Error).map_err(|e| {
                    // The device was reset (RUNNING); its load is void.
                    m.dest = None;
                    m.restored = false;
                    m.err(Step::Resume, e)
                })?;
            }
            m.resumed_p2p = true;
        }
        if !self.members.iter().all(|m| !m.restored || m.resumed_p2p) {
            return Ok(());
        }
        // The last restored device: every one of them to RUNNING.
        let mut first_err = None;
        for m in &mut self.members {
            if !m.restored {
                continue;
            }
            m.restored = false;
            m.resumed_p2p = false;
            if let Some(mut d) = m.dest.take()
                && let Err(e) = d.resume()
                && first_err.is_none()
            {
                first_err = Some(m.err(Step::Resume, e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn save_all(&mut self, i: usize) -> Result<(), IntegrationError> {
        if self.phase == Phase::Saved {
            return Ok(());
        }
        if self.source.is_none() {
            // A snapshot without a live migration (`ch-remote snapshot`): no pre-copy.
            self.check_all(i, Step::Snapshot, false)?;
            self.build_source(i, Step::Snapshot, false)?;
        }
        let Some(src) = self.source.as_mut() else {
            return Ok(());
        };
        let mut sink = MemberSink {
            members: &mut self.members,
        };
        let r = src.stop_copy(&mut sink).and_then(|_| src.finish());
        if let Err(e) = r {
            let err = self.members[i].err(Step::Snapshot, e);
            self.source_failed();
            return Err(err);
        }
        for m in &mut self.members {
            m.saved = true;
        }
        self.phase = Phase::Saved;
        Ok(())
    }

    /// The header of device `i`'s binary record (one pass over its buffered state).
    fn record_header(&self, i: usize, step: Step) -> Result<RecordHeader, IntegrationError> {
        let m = &self.members[i];
        let mut crc = CrcWriter::default();
        m.buf.copy_to(&mut crc).map_err(|e| m.err(step, e))?;
        Ok(RecordHeader {
            sent_chunks: m.sent_chunks,
            sent_bytes: m.sent_bytes,
            payload_len: crc.len,
            crc: crc.crc,
        })
    }

    /// Write device `i`'s binary record (header, then all of its state not yet sent) to `w`.
    fn write_record(&self, i: usize, step: Step, w: &mut dyn Write) -> Result<(), IntegrationError> {
        let m = &self.members[i];
        let header = self.record_header(i, step)?;
        w.write_all(&header.to_bytes()).map_err(|e| m.err(step, e))?;
        m.buf.copy_to(w).map_err(|e| m.err(step, e))?;
        Ok(())
    }

    pub(crate) fn snapshot(&mut self, i: usize) -> Result<DeviceStateRecord, IntegrationError> {
        if !self.members[i].saved {
            self.save_all(i)?;
        }
        let m = &self.members[i];
        let external = self
            .opts
            .external_state_threshold
            .is_some_and(|t| m.buf.len() + HEADER_LEN as u64 > t);
        if external {
            // Large: no copy in memory; the record is streamed to its file by `send`.
            let mut crc = CrcWriter::default();
            self.write_record(i, Step::Snapshot, &mut crc)?;
            return Ok(DeviceStateRecord {
                format: encoding::RECORD_FORMAT.into(),
                device: m.id.clone(),
                identity: m.identity.clone(),
                len: crc.len,
                crc32c: crc.crc,
                data: None,
                file: Some(encoding::state_file_name(&m.id)),
            });
        }
        let mut record = Vec::with_capacity(HEADER_LEN + m.buf.len() as usize);
        self.write_record(i, Step::Snapshot, &mut record)?;
        Ok(encoding::inline_leaf(&m.id, &m.identity, &record))
    }

    /// Write device `i`'s record for `Transportable::send`: the saved state, or the one inline in
    /// `snapshot` when this group did not save it.
    pub(crate) fn send_record(&self, i: usize, snapshot: &Snapshot, w: &mut dyn Write) -> Result<(), IntegrationError> {
        let m = &self.members[i];
        if m.saved {
            return self.write_record(i, Step::Send, w);
        }
        let leaf: DeviceStateRecord = snapshot
            .to_state()
            .map_err(|e| m.err(Step::Send, Cause::BadState(e.to_string())))?;
        let data = leaf.data.ok_or_else(|| {
            IntegrationError::bad_state(&m.id, Step::Send, "the snapshot names a file and the state is gone")
        })?;
        let bytes = encoding::decode_base64(&data, self.opts.max_state_bytes.saturating_add(HEADER_LEN as u64))
            .map_err(|r| IntegrationError::bad_state(&m.id, Step::Send, r))?;
        w.write_all(&bytes).map_err(|e| m.err(Step::Send, e))
    }

    pub(crate) fn identity_and_limit(&self, i: usize) -> (String, u64) {
        (self.members[i].identity.clone(), self.opts.max_state_bytes)
    }

    pub(crate) fn complete_migration(&mut self, i: usize) -> Result<(), IntegrationError> {
        self.members[i].completed = true;
        if self.phase == Phase::Saved && self.members.iter().all(|m| m.completed) {
            // Finished: the engine leaves the devices stopped (the VM now runs elsewhere).
            self.source = None;
            self.phase = Phase::Idle;
            for m in &mut self.members {
                m.reset_source_side();
            }
        }
        Ok(())
    }

    pub(crate) fn restore(
        &mut self,
        i: usize,
        snapshot: &Snapshot,
        dir: Option<&Path>,
    ) -> Result<(), IntegrationError> {
        let max = self.opts.max_state_bytes;
        let chunk = self.opts.chunk_size.max(4096);
        let m = &mut self.members[i];
        let step = Step::Restore;
        if m.restored {
            return Err(m.err(step, Cause::WrongPhase("the device was already restored".into())));
        }
        let leaf: AnyDeviceState = snapshot
            .to_state()
            .map_err(|e| m.err(step, Cause::BadState(e.to_string())))?;
        let (sent_chunks, sent_bytes, mut payload) = match leaf {
            AnyDeviceState::Legacy(l) => {
                let p =
                    encoding::decode_base64(&l.blob, max).map_err(|r| IntegrationError::bad_state(&m.id, step, r))?;
                (0, 0, Payload::Memory(p))
            }
            AnyDeviceState::Record(r) => {
                if r.format != encoding::RECORD_FORMAT {
                    return Err(IntegrationError::bad_state(
                        &m.id,
                        step,
                        format!("unknown device state format {:?}", r.format),
                    ));
                }
                if r.identity != m.identity {
                    return Err(IntegrationError::refused(
                        &m.id,
                        step,
                        format!("the state is of a {} device, this device is {}", r.identity, m.identity),
                    ));
                }
                match (&r.data, &r.file) {
                    (Some(d), _) => {
                        let bytes = encoding::decode_base64(d, max.saturating_add(HEADER_LEN as u64))
                            .map_err(|e| IntegrationError::bad_state(&m.id, step, e))?;
                        if bytes.len() as u64 != r.len || crc32c::crc32c(&bytes) != r.crc32c {
                            return Err(IntegrationError::bad_state(
                                &m.id,
                                step,
                                "the binary record does not match the length and CRC-32C in the snapshot",
                            ));
                        }
                        let rec =
                            encoding::decode_record(&bytes).map_err(|e| IntegrationError::bad_state(&m.id, step, e))?;
                        (rec.sent_chunks, rec.sent_bytes, Payload::Memory(rec.payload))
                    }
                    (None, Some(f)) => {
                        let dir = dir.ok_or_else(|| {
                            IntegrationError::bad_state(
                                &m.id,
                                step,
                                format!("the state is in file {f}, and no directory was given"),
                            )
                        })?;
                        let (header, file) =
                            crate::transport::open_state_file(&dir.join(f), r.len, max).map_err(|e| m.err(step, e))?;
                        (
                            header.sent_chunks,
                            header.sent_bytes,
                            Payload::File {
                                file,
                                header,
                                record_crc: r.crc32c,
                            },
                        )
                    }
                    (None, None) => return Err(IntegrationError::bad_state(&m.id, step, "neither data nor file")),
                }
            }
        };
        let dest = m.ensure_destination(step)?;
        let (loaded_chunks, loaded_bytes) = dest
            .loaders()
            .first()
            .map_or((0, 0), |l| (l.chunks_loaded(), l.loaded_bytes()));
        if loaded_chunks != sent_chunks || loaded_bytes != sent_bytes {
            let e = IntegrationError::bad_state(
                &m.id,
                step,
                format!(
                    "the state continues after {sent_chunks} chunks ({sent_bytes} bytes) sent ahead, \
                     {loaded_chunks} chunks ({loaded_bytes} bytes) were loaded"
                ),
            );
            if let Some(mut d) = m.dest.take() {
                d.abort();
            }
            return Err(e);
        }
        // Load the payload as chunks continuing the device's sequence (streamed from a file).
        let mut seq = sent_chunks;
        let loaded = payload.load_into(dest, &mut seq, chunk);
        let r = match loaded {
            Ok(()) => dest.complete(Some(&[seq])).map_err(|e| m.err(step, e)),
            Err(e) => Err(IntegrationError::new(&m.id, step, e)),
        };
        if let Err(e) = r {
            // A failed load or validation resets the device (the engine's abort).
            if let Some(mut d) = m.dest.take() {
                d.abort();
            }
            return Err(e);
        }
        m.restored = true;
        m.resumed_p2p = false;
        Ok(())
    }
}

/// A writer that only counts bytes and computes their CRC-32C.
#[derive(Default)]
struct CrcWriter {
    crc: u32,
    len: u64,
}

impl Write for CrcWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.crc = crc32c::crc32c_append(self.crc, buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a restored device's payload comes from.
enum Payload {
    Memory(Vec<u8>),
    /// A state file positioned after its header; checked while streamed.
    File {
        file: std::fs::File,
        header: encoding::RecordHeader,
        record_crc: u32,
    },
}

impl Payload {
    /// Load every byte into `dest` as chunks `*seq`, `*seq + 1`, ...
    fn load_into(&mut self, dest: &mut Destination<'static>, seq: &mut u64, chunk: usize) -> Result<(), Cause> {
        match self {
            Payload::Memory(p) => {
                for c in p.chunks(chunk) {
                    dest.load(0, *seq, c)?;
                    *seq += 1;
                }
                Ok(())
            }
            Payload::File {
                file,
                header,
                record_crc,
            } => {
                use std::io::Read;
                let mut rec_crc = crc32c::crc32c(&header.to_bytes());
                let mut pay_crc = 0u32;
                let mut left = header.payload_len;
                let mut buf = vec![0u8; chunk];
                while left > 0 {
                    let n = (left.min(chunk as u64)) as usize;
                    file.read_exact(&mut buf[..n])?;
                    rec_crc = crc32c::crc32c_append(rec_crc, &buf[..n]);
                    pay_crc = crc32c::crc32c_append(pay_crc, &buf[..n]);
                    dest.load(0, *seq, &buf[..n])?;
                    *seq += 1;
                    left -= n as u64;
                }
                if rec_crc != *record_crc || pay_crc != header.crc {
                    return Err(Cause::BadState("the state file's CRC-32C does not match".into()));
                }
                Ok(())
            }
        }
    }
}
