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
//! | `start_dirty_log` | first call: choose and start the group's dirty tracking ([`crate::tracking`]), then every device RUNNING -> PRE_COPY where supported |
//! | `dirty_log` | drain the pre-copy data into bounded buffers (spilled to a file past a cap); the first device returns the group's dirty ranges, the others none (each tracker read once per round) |
//! | `pause` | this device to RUNNING_P2P / PRE_COPY_P2P; the last device with migration support to be paused stops the group before it returns: every device to STOP_COPY, all read in parallel, then STOP (so nothing runs once Cloud Hypervisor saved its vCPUs) |
//! | `snapshot` | each call returns its own part (the full save first if the group was not all paused) |
//! | `stop_dirty_log` | stop tracking; before a snapshot it means failure: every device back to RUNNING |
//! | `complete_migration` | last call: the migration is over, the devices stay stopped |
//! | `resume` (failure path) | every device back to RUNNING (RUNNING_P2P first, then RUNNING) |
//!
//! Without a migration (`ch-remote pause` / `snapshot`), the last `pause` moves every device to
//! STOP, the first `snapshot` reads them from STOP (with [`GroupOptions::snapshot_to_file`] the
//! part names a file that `Transportable::send` writes), and the first `resume` returns them all
//! to RUNNING in two phases. A device may leave at any time ([`VfioMigrationGroup::unregister`]).
//!
//! Destination: `restore` = the stream's header checked against the device (before touching it) +
//! a reset when the device is neither RUNNING nor STOP + RESUMING + load + RESUMING -> STOP once the end marker was checked (the device validates); `resume`
//! moves the device to RUNNING_P2P, and the last restored device to be resumed moves them all to
//! RUNNING.

use std::any::Any;
use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_migration::device::{DeviceIdentity, MigrationDevice};
use vfio_migration::dirty::{RangeTable, SelectOptions, Selected, select};
use vfio_migration::live::{ChunkSink, Destination, DestinationOptions, Phase as ChunkPhase, Source, SourceOptions};
use vfio_migration::session::{MAX_BUFFER, restore_to, set_state_or_recover};
use vfio_migration::state::{DeviceState, MigrationFlags};
use vfio_migration::stream::{SectionKind, StreamReader};
use vm_migration::Snapshot;
use vm_migration::protocol::{MemoryRange, MemoryRangeTable};

use crate::encoding::{self, AnyDeviceState, DeviceStateRecord, SentAhead, StateSource};
use crate::error::{Cause, IntegrationError, Step};
use crate::iterative::PrecopyItem;
use crate::shared::SharedDevice;
use crate::spill::SpillBuffer;
use crate::tracking::{self, Policy, TrackedDevice, Tracking, Viommu};

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
    /// What a failing dirty-page report means: fail the migration (the default) or report all
    /// tracked memory dirty from then on. A failing report is never "no dirty pages".
    pub dirty_policy: Policy,
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
    /// A snapshot taken with no source migration in progress (`ch-remote snapshot` after
    /// `pause`) names its state file beside the snapshot ([`crate::encoding::state_file_name`])
    /// instead of holding the state inline, whatever its size; the group keeps the stream until
    /// `Transportable::send(snapshot, "file:///dir")` writes it (dropped at the next pause,
    /// snapshot or migration start). A live migration's snapshot stays inline regardless.
    pub snapshot_to_file: bool,
    /// Restore a state into a device when the state's or the device's identity is unknown
    /// ([`DeviceIdentity::Unknown`]; Cloud Hypervisor falls back to it only when the device's
    /// sysfs node cannot be read). Default `false`: refused before the device is touched, as
    /// nothing then shows the state fits the device ([`DeviceIdentity::check_compatible`]).
    /// Known, different identities are refused anyway.
    pub force_unknown_identity: bool,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            precopy: true,
            force_without_p2p: false,
            allow_all_dirty: false,
            dirty_policy: Policy::FailMigration,
            buffer_cap: 64 << 20,
            spill_dir: None,
            drain_budget: 256 << 20,
            chunk_size: MAX_BUFFER,
            parallel: true,
            max_state_bytes: 64 << 30,
            external_state_threshold: None,
            snapshot_to_file: false,
            force_unknown_identity: false,
        }
    }
}

/// Answers the guest memory a device can reach by DMA, guest physical (Cloud Hypervisor's
/// `dirty_log_iova_ranges()`). Called with the group's lock held: it must not call into the group.
pub type DmaRangesProvider = Arc<dyn Fn() -> Vec<MemoryRange> + Send + Sync>;

/// Called right after the group (or the engine, on the group's behalf) reset the device
/// (`VFIO_DEVICE_RESET`), whether the reset succeeded or failed, so the VMM re-applies what a
/// reset clears (PCI_COMMAND, the IRQ eventfds). It may be called while the group's lock is held
/// (inside any group call): it must not call into the group, and should not block on a lock a
/// caller of the group may hold (Cloud Hypervisor's hook uses `try_lock` on its device).
pub type ResetHook = Arc<dyn Fn() + Send + Sync>;

/// Device state bytes of a source migration ([`VfioMigrationGroup::transferred`]), as QEMU's
/// `vfio.transferred` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Sent ahead in `DeviceState` messages while the VM ran.
    pub precopy_bytes: u64,
    /// Inside the devices' parts of the snapshot (`State`, inside the downtime).
    pub stop_copy_bytes: u64,
}

/// How Cloud Hypervisor describes one VFIO device to the integration.
pub struct DeviceConfig {
    /// Cloud Hypervisor's device id (`_vfio0`, or the user's id).
    pub id: String,
    /// The guest memory the device can reach by DMA, guest physical (for dirty tracking; behind
    /// a vIOMMU the IOVA space comes from the translation).
    pub dma_ranges: Vec<MemoryRange>,
    /// How its dirty pages may be found (the group chooses for all its devices).
    pub tracking: Tracking,
    /// Whether it sits behind a virtual IOMMU.
    pub viommu: Viommu,
    /// Recomputed whenever tracking starts (CH's dirty_log_iova_ranges(): memory hotplug changes it).
    ///
    /// When given, its answer at every `start_dirty_log` that starts the group's tracking
    /// replaces `dma_ranges` (the ranges given at register are then only used until then).
    pub dma_ranges_provider: Option<DmaRangesProvider>,
    /// Called right after the group reset the device (VFIO_DEVICE_RESET), so the VMM re-applies PCI_COMMAND and IRQ eventfds.
    ///
    /// Called after every reset of the device, by the group or the engine (recovery after a
    /// failed transition, a failed or abandoned load, a restore into a device left in another
    /// migration state); see [`ResetHook`] for what it must not do.
    pub on_reset: Option<ResetHook>,
}

impl std::fmt::Debug for DeviceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("id", &self.id)
            .field("dma_ranges", &self.dma_ranges)
            .field("tracking", &self.tracking)
            .field("viommu", &self.viommu)
            .field("dma_ranges_provider", &self.dma_ranges_provider.is_some())
            .field("on_reset", &self.on_reset.is_some())
            .finish()
    }
}

impl DeviceConfig {
    /// A device `id` reaching `dma_ranges`, with device DMA logging at 4 KiB and no vIOMMU.
    pub fn new(id: impl Into<String>, dma_ranges: Vec<MemoryRange>) -> Self {
        Self {
            id: id.into(),
            dma_ranges,
            tracking: Tracking::device_log(),
            viommu: Viommu::None,
            dma_ranges_provider: None,
            on_reset: None,
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
    identity: DeviceIdentity,
    memory: RangeTable,
    dma_ranges_provider: Option<DmaRangesProvider>,
    tracking: Tracking,
    viommu: Viommu,
    paused: bool,
    // Source side.
    buf: SpillBuffer,
    sent_chunks: u64,
    sent_bytes: u64,
    initial_at: Option<u64>,
    /// Where (in bytes read from the device) the stop-copy data starts.
    stop_copy_at: Option<u64>,
    marker_sent: bool,
    saved: bool,
    completed: bool,
    /// A snapshot's stream kept for `Transportable::send` ([`GroupOptions::snapshot_to_file`]).
    file_state: Option<SpillBuffer>,
    // Destination side.
    dest: Option<Destination<'static>>,
    restored: bool,
    resumed_p2p: bool,
    /// Registered ahead by [`VfioMigrationGroup::prepare`], not yet adopted by `register`.
    prepared: bool,
    /// Device data bytes in the device's part of the last snapshot (its share of the downtime).
    snapshot_bytes: u64,
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
        self.stop_copy_at = None;
        self.marker_sent = false;
        self.saved = false;
        self.completed = false;
        self.snapshot_bytes = 0;
    }

    fn err(&self, step: Step, cause: impl Into<Cause>) -> IntegrationError {
        IntegrationError::new(&self.id, step, cause)
    }
}

/// The members by index. A device that leaves ([`VfioMigrationGroup::unregister`]) leaves an
/// empty slot, so the other members keep their indices; iterating visits the members present.
///
/// Indexing an empty slot panics: every entry point checks its index under the group lock
/// ([`VfioMigrationGroup::with`]), and nothing empties a slot while that lock is held by a step.
#[derive(Default)]
struct Slots(Vec<Option<Member>>);

impl Slots {
    fn get(&self, i: usize) -> Option<&Member> {
        self.0.get(i).and_then(Option::as_ref)
    }
    fn get_mut(&mut self, i: usize) -> Option<&mut Member> {
        self.0.get_mut(i).and_then(Option::as_mut)
    }
    fn iter(&self) -> impl Iterator<Item = &Member> {
        self.0.iter().flatten()
    }
    /// The members present with their indices.
    fn indexed(&self) -> impl Iterator<Item = (usize, &Member)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.as_ref().map(|m| (i, m)))
    }
    /// Number of members present.
    fn len(&self) -> usize {
        self.iter().count()
    }
    fn push(&mut self, m: Member) -> usize {
        self.0.push(Some(m));
        self.0.len() - 1
    }
    fn take(&mut self, i: usize) -> Option<Member> {
        self.0.get_mut(i).and_then(Option::take)
    }
}

impl std::ops::Index<usize> for Slots {
    type Output = Member;
    fn index(&self, i: usize) -> &Member {
        match self.get(i) {
            Some(m) => m,
            None => panic!("group member {i} is gone (checked under the group lock)"),
        }
    }
}

impl std::ops::IndexMut<usize> for Slots {
    fn index_mut(&mut self, i: usize) -> &mut Member {
        match self.get_mut(i) {
            Some(m) => m,
            None => panic!("group member {i} is gone (checked under the group lock)"),
        }
    }
}

impl<'a> IntoIterator for &'a mut Slots {
    type Item = &'a mut Member;
    type IntoIter = std::iter::Flatten<std::slice::IterMut<'a, Option<Member>>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter_mut().flatten()
    }
}

impl<'a> IntoIterator for &'a Slots {
    type Item = &'a Member;
    type IntoIter = std::iter::Flatten<std::slice::Iter<'a, Option<Member>>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().flatten()
    }
}

pub(crate) struct Inner {
    opts: GroupOptions,
    members: Slots,
    /// The engine's device index -> the member's slot (the engine numbers the devices it got).
    src_slots: Vec<usize>,
    /// A source migration started (`start_migration` or `start_dirty_log`) and neither
    /// completed nor failed: snapshots then stay inline ([`GroupOptions::snapshot_to_file`]).
    migrating: bool,
    /// The last `pause`, without a source migration, stopped every device (plain `pause`).
    stopped: bool,
    source: Option<Source<'static>>,
    /// The dirty tracker chosen for the group at the first `start_dirty_log`.
    dirty: Option<Selected<'static>>,
    /// What the dirty tracker reported last round: every round reports into this table, reusing
    /// its allocation (freed when the tracking stops).
    dirty_table: RangeTable,
    phase: Phase,
    /// Snapshots of this migration use Cloud Hypervisor's in-tree format
    /// ([`VfioMigrationGroup::set_legacy_peer`]).
    legacy_peer: bool,
    /// The VMM's handles kept with prepared devices, by device id
    /// ([`VfioMigrationGroup::prepare_with_handle`]).
    handles: HashMap<String, PreparedHandle>,
}

/// What the VMM keeps with a device it prepared (e.g. the vfio-user connection the device model
/// adopts at `State`): anything, taken back by id.
pub type PreparedHandle = Box<dyn Any + Send>;

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
    members: &'a mut Slots,
    slots: &'a [usize],
}

impl MemberSink<'_> {
    /// The member of the engine's device `device`; `Ok(None)` when it left the group.
    fn member(&mut self, device: usize) -> io::Result<Option<&mut Member>> {
        let slot = *self
            .slots
            .get(device)
            .ok_or_else(|| io::Error::other(format!("data for unknown device index {device}")))?;
        Ok(self.members.get_mut(slot))
    }
}

impl ChunkSink for MemberSink<'_> {
    fn chunk(&mut self, device: usize, phase: ChunkPhase, data: &[u8]) -> io::Result<()> {
        let Some(m) = self.member(device)? else {
            // The device left the group during the migration: its data goes nowhere.
            return Ok(());
        };
        if phase == ChunkPhase::StopCopy && m.stop_copy_at.is_none() {
            m.stop_copy_at = Some(m.buf.total_in());
        }
        m.buf.append(data)
    }

    fn initial_sent(&mut self, device: usize) -> io::Result<()> {
        let Some(m) = self.member(device)? else {
            return Ok(());
        };
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
                members: Slots::default(),
                src_slots: Vec::new(),
                migrating: false,
                stopped: false,
                source: None,
                dirty: None,
                dirty_table: RangeTable::new(),
                phase: Phase::Idle,
                legacy_peer: false,
                handles: HashMap::new(),
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
        let prepared = g
            .members
            .indexed()
            .find(|(_, m)| m.prepared && m.id == config.id)
            .map(|(i, _)| i);
        if let Some(i) = prepared {
            // Cloud Hypervisor's device model takes over a device prepared at `Config`: it keeps
            // the prepared handle (the same open file, maybe loading) and takes the rest of the
            // configuration; `dev`, a second handle on the same device, is dropped.
            let m = &mut g.members[i];
            m.prepared = false;
            m.memory = tracking::memory_of(&config.dma_ranges);
            m.dma_ranges_provider = config.dma_ranges_provider;
            m.tracking = config.tracking;
            m.viommu = config.viommu;
            m.dev.set_reset_hook(config.on_reset);
            drop(dev);
            return Ok(i);
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
        let identity = dev.identity();
        let buf = SpillBuffer::new(g.opts.buffer_cap, g.opts.spill_dir.clone());
        let index = g.members.push(Member {
            id: config.id,
            dev: SharedDevice::with_reset_hook(dev, config.on_reset),
            flags,
            identity,
            memory: tracking::memory_of(&config.dma_ranges),
            dma_ranges_provider: config.dma_ranges_provider,
            tracking: config.tracking,
            viommu: config.viommu,
            paused: false,
            buf,
            sent_chunks: 0,
            sent_bytes: 0,
            initial_at: None,
            stop_copy_at: None,
            marker_sent: false,
            saved: false,
            completed: false,
            file_state: None,
            dest: None,
            restored: false,
            resumed_p2p: false,
            prepared: false,
            snapshot_bytes: 0,
        });
        Ok(index)
    }

    /// Destination: register `dev` ahead of Cloud Hypervisor's device model (see
    /// [`crate::incoming`]), so pre-copy data can load into it; the `register` of the same id at
    /// `State` adopts it. A prepared device that is never adopted leaves with
    /// [`VfioMigrationGroup::drop_prepared`] (a failed migration), reset if it was loading.
    pub fn prepare(&self, dev: Box<dyn MigrationDevice>, config: DeviceConfig) -> Result<usize, IntegrationError> {
        let index = self.register(dev, config)?;
        let (id, identity, flags) = {
            let mut g = self.lock();
            let m = &mut g.members[index];
            m.prepared = true;
            (m.id.clone(), m.identity.clone(), m.flags)
        };
        if let Some(flags) = flags {
            warm_up_state_paths(&id, &identity, flags);
        }
        Ok(index)
    }

    /// [`VfioMigrationGroup::prepare`], keeping `handle` with the device until the device model
    /// takes it back with [`VfioMigrationGroup::take_prepared_handle`] (Cloud Hypervisor's
    /// vfio-user devices: the one connection a server serves, which the device model adopts
    /// instead of connecting again). [`VfioMigrationGroup::drop_prepared`] drops the handles not
    /// taken, after the devices left.
    pub fn prepare_with_handle(
        &self,
        dev: Box<dyn MigrationDevice>,
        config: DeviceConfig,
        handle: PreparedHandle,
    ) -> Result<usize, IntegrationError> {
        let id = config.id.clone();
        let index = self.prepare(dev, config)?;
        self.lock().handles.insert(id, handle);
        Ok(index)
    }

    /// The handle kept with the prepared device `id`, once ([`VfioMigrationGroup::prepare_with_handle`]).
    pub fn take_prepared_handle(&self, id: &str) -> Option<PreparedHandle> {
        self.lock().handles.remove(id)
    }

    /// Whether device `id` was prepared and is waiting to be adopted.
    pub fn is_prepared(&self, id: &str) -> bool {
        self.lock().members.iter().any(|m| m.prepared && m.id == id)
    }

    /// Destination, after a failed migration: every prepared device that was never adopted
    /// leaves the group (a device loading pre-copy data is reset first).
    pub fn drop_prepared(&self) {
        self.drop_prepared_members();
        // After the members, whose leaving may still use the connection a handle holds; dropped
        // outside the group's lock (a handle's drop may call into the group).
        let handles = std::mem::take(&mut self.lock().handles);
        drop(handles);
    }

    fn drop_prepared_members(&self) {
        let ids: Vec<usize> = self
            .lock()
            .members
            .indexed()
            .filter(|(_, m)| m.prepared)
            .map(|(i, _)| i)
            .collect();
        for i in ids {
            self.unregister(i);
        }
    }

    /// Source: the destination reads only Cloud Hypervisor's in-tree device state (an unpatched
    /// Cloud Hypervisor, [`crate::protocol::Peer::Upstream`]): the next migration's snapshots are
    /// `{"blob": base64 of the raw device data}`, without identity, checksum or pre-copy
    /// accounting. Reset when the migration ends.
    pub fn set_legacy_peer(&self, legacy: bool) {
        self.lock().legacy_peer = legacy;
    }

    /// Source: the device data bytes sent ahead in `DeviceState` messages (pre-copy) and those
    /// inside the devices' parts of the last snapshot (inside the downtime), over all devices;
    /// stream headers and checksums are not counted.
    pub fn transferred(&self) -> Transferred {
        let g = self.lock();
        Transferred {
            precopy_bytes: g.members.iter().map(|m| m.sent_bytes).sum(),
            stop_copy_bytes: g.members.iter().map(|m| m.snapshot_bytes).sum(),
        }
    }

    /// Source: whether every device that reports initial pre-copy data has had all of it sent
    /// ahead (its marker taken by [`VfioMigrationGroup::take_precopy`]). With the destination's
    /// acknowledgement that it loaded them ([`crate::protocol::switchover_acknowledged`]) the VM
    /// may stop.
    pub fn initial_data_sent(&self) -> bool {
        let g = self.lock();
        let precopy = g.opts.precopy;
        // A paused VM's devices (STOP when the migration started) have no pre-copy at all.
        let none_in_precopy = g.source.as_ref().is_some_and(|s| !s.precopy_active());
        g.phase == Phase::PreCopy
            && (none_in_precopy
                || g.members
                    .iter()
                    .all(|m| !(precopy && m.has(MigrationFlags::PRE_COPY)) || m.marker_sent))
    }

    /// Remove device `index` from the group (hot-unplug, or the VM going away; the
    /// [`crate::MigratableVfioDevice`]'s `Drop` calls it). The device leaves: the group drops it
    /// (closing its fd) and forgets it for the rest of any migration, the other devices keep
    /// their indices, and a device with the same id may register afterwards.
    ///
    /// When a source migration is in progress, the device is first put back to RUNNING (best
    /// effort, logged) and its DMA logging stopped; a device left with a state loading or loaded
    /// and not resumed is reset. The reset hook is not called for a device that leaves. Nothing happens for an index
    /// that is not (or no longer) a member.
    pub fn unregister(&self, index: usize) {
        let mut g = self.lock();
        let Some(m) = g.members.take(index) else {
            return;
        };
        g.leave(m);
    }

    /// Number of devices (the members present: a device that left is not counted).
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

    /// The dirty tracking method chosen for the group, while it tracks dirty pages.
    pub fn dirty_tracking(&self) -> Option<tracking::Method> {
        self.lock().tracking_method()
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
        if g.members.get(index).is_none() {
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
        let Some(i) = g.members.indexed().find(|(_, m)| m.id == item.device()).map(|(i, _)| i) else {
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
            // Cloud Hypervisor no longer resets a device it opens to restore it, and a device
            // may keep its migration state across close (mtty): start from RUNNING or STOP.
            match self.dev.state() {
                Ok(DeviceState::Running | DeviceState::Stop) => {}
                Ok(s) => {
                    log::info!(
                        "{}: the device is {s}, not RUNNING or STOP: resetting it before the load",
                        self.id
                    );
                    self.dev.reset().map_err(|e| self.err(step, e))?;
                }
                Err(e) => return Err(self.err(step, e)),
            }
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
    /// What a leaving member needs done before it is dropped (see
    /// [`VfioMigrationGroup::unregister`]).
    fn leave(&mut self, mut m: Member) {
        let migrating = self.phase != Phase::Idle;
        // A load begun (RESUMING) or completed (STOP) and not resumed: void, reset the device.
        let loading = m.dest.is_some();
        // Every handle (the engine's source, tracker and destination hold some) now reaches a
        // stand-in; the real device comes back here.
        let real = m.dev.detach();
        // The destination over the stand-in: nothing left to abort on the device.
        drop(m.dest.take());
        let Some(mut real) = real else {
            return;
        };
        if m.flags.is_some() {
            match real.state() {
                Ok(s) if s != DeviceState::Running && (loading || s == DeviceState::Resuming) => {
                    let r = vfio_migration::session::recovery::reset_device(real.as_mut());
                    log::info!("{}: left its group with a state loaded or loading ({s}): {r}", m.id);
                }
                Ok(s) if migrating => {
                    if let Err(e) = real.dma_log_stop() {
                        log::debug!("{}: stopping DMA logging as it leaves: {e}", m.id);
                    }
                    let r = restore_to(real.as_mut(), DeviceState::Running);
                    if r.succeeded() {
                        log::info!("{}: left its group during a migration (it was {s}): {r}", m.id);
                    } else {
                        log::warn!("{}: left its group during a migration (it was {s}): {r}", m.id);
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!("{}: state unknown as it leaves its group: {e}", m.id),
            }
        }
        log::info!("{}: left its group", m.id);
        drop(real);
    }

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
        Ok(())
    }

    /// The devices as the dirty tracking sees them.
    fn tracked(&self) -> Vec<TrackedDevice<'_>> {
        self.members
            .iter()
            .map(|m| TrackedDevice {
                id: &m.id,
                dev: &m.dev,
                memory: m.memory.clone(),
                tracking: &m.tracking,
                viommu: &m.viommu,
            })
            .collect()
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
            .map_err(|r| IntegrationError::refused(&me.id, step, r))?;
        if need_tracking {
            tracking::check_group(&self.tracked(), self.opts.allow_all_dirty)
                .map_err(|r| IntegrationError::refused(&me.id, step, r))?;
        }
        Ok(())
    }

    /// Choose and start the group's dirty tracker (QEMU's choice, the engine's `select`).
    fn start_tracking(&mut self, i: usize) -> Result<(), IntegrationError> {
        let devices = self.tracked();
        let memory = RangeTable::merge_from(devices.iter().map(|d| &d.memory));
        let candidates = tracking::candidates(&devices);
        drop(devices);
        let options = SelectOptions {
            allow_all_dirty: self.opts.allow_all_dirty,
            policy: self.opts.dirty_policy,
        };
        let selected = select(candidates, &memory, options).map_err(|e| self.members[i].err(Step::StartDirtyLog, e))?;
        for r in &selected.rejected {
            log::info!("dirty tracking: {r} (ruled out)");
        }
        log::info!(
            "dirty tracking for {} device(s): {:?} ({})",
            self.members.len(),
            selected.method,
            vfio_migration::dirty::DirtyTracker::name(&selected.tracker)
        );
        self.dirty = Some(selected);
        Ok(())
    }

    /// Stop the group's dirty tracker, if it runs.
    fn stop_tracking(&mut self, i: usize) -> Result<(), IntegrationError> {
        use vfio_migration::dirty::DirtyTracker;
        let Some(mut selected) = self.dirty.take() else {
            return Ok(());
        };
        self.dirty_table = RangeTable::new();
        if !selected.tracker.is_started() {
            return Ok(());
        }
        selected.tracker.stop().map_err(|e| {
            log::warn!("stopping dirty tracking failed: {e}");
            self.members[i].err(Step::StopDirtyLog, e)
        })
    }

    /// The method the group's dirty tracking uses, while it runs.
    pub(crate) fn tracking_method(&self) -> Option<tracking::Method> {
        self.dirty.as_ref().map(|s| s.method)
    }

    fn build_source(&mut self, i: usize, step: Step, precopy: bool) -> Result<(), IntegrationError> {
        let opts = SourceOptions {
            precopy,
            force_without_p2p: self.opts.force_without_p2p,
            parallel: self.opts.parallel,
            chunk_size: self.opts.chunk_size,
            ..SourceOptions::default()
        };
        let (slots, devices): (Vec<usize>, Vec<Box<dyn MigrationDevice>>) = self
            .members
            .indexed()
            .map(|(k, m)| (k, Box::new(m.dev.clone()) as Box<dyn MigrationDevice>))
            .unzip();
        let src = Source::new(devices, opts).map_err(|e| self.members[i].err(step, e))?;
        for m in &mut self.members {
            m.reset_source_side();
        }
        self.src_slots = slots;
        self.source = Some(src);
        Ok(())
    }

    /// The engine aborted itself after a failure (every device RUNNING): forget the migration.
    fn source_failed(&mut self) {
        self.source = None;
        self.phase = Phase::Idle;
        self.migrating = false;
        self.legacy_peer = false;
        for m in &mut self.members {
            m.reset_source_side();
        }
    }

    /// Return every source device to RUNNING: the stopped ones to RUNNING_P2P first, so none
    /// runs while a peer is stopped, then all to RUNNING. With `requiesce`, devices Cloud
    /// Hypervisor paused go back to RUNNING_P2P afterwards. The devices of a VM that was paused
    /// before its migration began (a plain pause stopped the group) go back to STOP instead, and
    /// stay there until the VM resumes (`step` [`Step::Resume`]: then they all run).
    fn recover_source(&mut self, i: usize, step: Step, requiesce: bool) -> Result<(), IntegrationError> {
        let Some(mut src) = self.source.take() else {
            return Ok(());
        };
        let paused_vm = self.stopped;
        for m in &mut self.members {
            if !paused_vm
                && m.has(MigrationFlags::P2P)
                && let Ok(DeviceState::Stop | DeviceState::StopCopy | DeviceState::PreCopyP2p) = m.dev.state()
            {
                let _ = m.dev.set_state(DeviceState::RunningP2p);
            }
        }
        let recoveries = src.abort();
        drop(src);
        self.source_failed();
        if paused_vm && step == Step::Resume {
            // The paused VM resumes after its migration failed: the devices run again, in two
            // phases, with the whole group.
            return self.run_all(i, step);
        }
        if paused_vm {
            let failed: Vec<String> = recoveries
                .iter()
                .filter(|(_, r)| r.final_state() != Some(DeviceState::Stop))
                .map(|(n, r)| format!("{n}: {r}"))
                .collect();
            if failed.is_empty() {
                return Ok(());
            }
            return Err(IntegrationError::new(
                &self.members[i].id,
                step,
                Cause::WrongPhase(format!(
                    "returning the paused VM's devices to STOP failed: {}",
                    failed.join("; ")
                )),
            ));
        }
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
        self.returned_to_running(i, step, &failed)
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
            slots: &self.src_slots,
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
        self.check_all(i, Step::StartMigration, true)?;
        for m in &mut self.members {
            m.file_state = None;
        }
        self.migrating = true;
        Ok(())
    }

    pub(crate) fn start_dirty_log(&mut self, i: usize) -> Result<(), IntegrationError> {
        match self.phase {
            Phase::Idle => {
                // The DMA-reachable memory as it is now (memory hotplug changes it).
                for m in &mut self.members {
                    if let Some(p) = &m.dma_ranges_provider {
                        m.memory = tracking::memory_of(&p());
                    }
                }
                self.check_all(i, Step::StartDirtyLog, true)?;
                // A tracker left over from a migration that failed without stop_dirty_log.
                if let Err(e) = self.stop_tracking(i) {
                    log::warn!("{e}");
                }
                // Tracking first: a refusal leaves every device as it was.
                self.start_tracking(i)?;
                let built = self.build_source(i, Step::StartDirtyLog, self.opts.precopy);
                let started = built.and_then(|()| match self.source.as_mut() {
                    Some(src) => src.start().map_err(|e| self.members[i].err(Step::StartDirtyLog, e)),
                    None => Ok(()),
                });
                if let Err(err) = started {
                    if let Err(e) = self.stop_tracking(i) {
                        log::warn!("{e}");
                    }
                    self.source_failed();
                    return Err(err);
                }
                self.phase = Phase::PreCopy;
                self.migrating = true;
                for m in &self.members {
                    if let Some(flags) = m.flags {
                        warm_up_state_paths(&m.id, &m.identity, flags);
                    }
                }
                for m in &mut self.members {
                    m.file_state = None;
                }
                Ok(())
            }
            Phase::PreCopy => Ok(()),
            Phase::Saved => Err(self.members[i].err(
                Step::StartDirtyLog,
                Cause::WrongPhase("the device states were already saved".into()),
            )),
        }
    }

    /// Drains the devices' pre-copy data, and returns the group's dirty pages through its first
    /// device present (empty for the others): each container, and the group's device logging, is
    /// reported once per round, not once per device. A failing report is an error or, under
    /// [`Policy::DegradeToAllDirty`], all tracked memory.
    pub(crate) fn dirty_log(&mut self, i: usize) -> Result<MemoryRangeTable, IntegrationError> {
        use vfio_migration::dirty::DirtyTracker;
        self.drain(i, Step::DirtyLog)?;
        if self.members.indexed().next().map(|(k, _)| k) != Some(i) {
            return Ok(MemoryRangeTable::default());
        }
        let Some(selected) = self.dirty.as_mut() else {
            return Ok(MemoryRangeTable::default());
        };
        selected
            .tracker
            .report_into(&mut self.dirty_table)
            .map_err(|e| self.members[i].err(Step::DirtyLog, e))?;
        Ok(tracking::to_memory_range_table(&self.dirty_table))
    }

    /// Stops the tracking of the whole group: Cloud Hypervisor's device manager stops at the
    /// first error, and after a failure no device may be left logging.
    pub(crate) fn stop_dirty_log(&mut self, i: usize) -> Result<(), IntegrationError> {
        let result = self.stop_tracking(i);
        if self.phase != Phase::Saved {
            // Before the states were saved (or without any): the migration is over.
            self.migrating = false;
        }
        if self.phase == Phase::PreCopy {
            // Stopping the log before the states were saved: the migration failed.
            self.recover_source(i, Step::StopDirtyLog, true)?;
        }
        result
    }

    /// This device to RUNNING_P2P / PRE_COPY_P2P; the last device with migration support to be
    /// paused stops the whole group (see [`Inner::stop_group`]) before `pause` returns.
    pub(crate) fn pause(&mut self, i: usize) -> Result<(), IntegrationError> {
        for m in &mut self.members {
            m.file_state = None;
        }
        let m = &mut self.members[i];
        m.paused = true;
        if m.has(MigrationFlags::P2P) {
            let state = m.dev.state().map_err(|e| m.err(Step::Pause, e))?;
            let target = match state {
                DeviceState::Running => Some(DeviceState::RunningP2p),
                DeviceState::PreCopy => Some(DeviceState::PreCopyP2p),
                _ => None,
            };
            if let Some(target) = target {
                set_state_or_recover(&mut m.dev, target, state).map_err(|e| m.err(Step::Pause, e))?;
            }
        }
        let all_paused = {
            let mut migratable = self.members.iter().filter(|m| m.flags.is_some()).peekable();
            migratable.peek().is_some() && migratable.all(|m| m.paused)
        };
        if all_paused && self.phase != Phase::Saved && !self.stopped {
            self.stop_group(i)?;
        }
        Ok(())
    }

    /// Every device paused: stop them all, so none can raise an interrupt or write memory after
    /// Cloud Hypervisor saved its vCPUs. During a source migration this is the save (every
    /// device to STOP_COPY, read in parallel, then STOP); otherwise every device goes to STOP.
    /// A failure returns every device to RUNNING.
    fn stop_group(&mut self, i: usize) -> Result<(), IntegrationError> {
        if self.migrating || self.source.is_some() {
            let r = self.save_all(i, Step::Pause);
            if r.is_err() {
                // The engine returned every device to RUNNING: none counts as paused any more.
                for m in &mut self.members {
                    m.paused = false;
                }
            }
            return r;
        }
        let mut failed = None;
        for m in &mut self.members {
            if m.flags.is_none() {
                continue;
            }
            let r = match m.dev.state() {
                Ok(DeviceState::Stop) => continue,
                Ok(state) => {
                    set_state_or_recover(&mut m.dev, DeviceState::Stop, state).map_err(|e| m.err(Step::Pause, e))
                }
                Err(e) => Err(m.err(Step::Pause, e)),
            };
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        let Some(err) = failed else {
            self.stopped = true;
            return Ok(());
        };
        for m in &mut self.members {
            m.paused = false;
        }
        if let Err(e) = self.run_all(i, Step::Pause) {
            log::warn!("{e}");
        }
        Err(err)
    }

    /// Every device with migration support back to RUNNING in two phases: the stopped ones to
    /// RUNNING_P2P first (so none runs while a peer is stopped), then all to RUNNING (reset when
    /// a transition fails).
    fn run_all(&mut self, i: usize, step: Step) -> Result<(), IntegrationError> {
        self.stopped = false;
        for m in &mut self.members {
            if m.has(MigrationFlags::P2P)
                && let Ok(DeviceState::Stop) = m.dev.state()
                && let Err(e) = m.dev.set_state(DeviceState::RunningP2p)
            {
                log::warn!("{}: STOP -> RUNNING_P2P: {e}", m.id);
            }
        }
        let mut failed = Vec::new();
        for m in &mut self.members {
            if m.flags.is_none() {
                continue;
            }
            let r = restore_to(&mut m.dev, DeviceState::Running);
            if !r.succeeded() {
                failed.push(format!("{}: {r}", m.id));
            }
        }
        self.returned_to_running(i, step, &failed)
    }

    pub(crate) fn resume(&mut self, i: usize) -> Result<(), IntegrationError> {
        self.members[i].paused = false;
        if self.members[i].restored {
            return self.resume_destination(i);
        }
        if self.source.is_some() {
            return self.recover_source(i, Step::Resume, false);
        }
        if self.stopped {
            // After a plain pause stopped the group: every device back to RUNNING.
            self.run_all(i, Step::Resume)?;
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

    fn save_all(&mut self, i: usize, step: Step) -> Result<(), IntegrationError> {
        if self.phase == Phase::Saved {
            return Ok(());
        }
        for m in &mut self.members {
            m.file_state = None;
        }
        if self.source.is_none() {
            // A snapshot without a live migration (`ch-remote snapshot`), or a migration that
            // started no tracking: no pre-copy. Devices a plain pause stopped (all STOP) are
            // read as they are, and the engine returns them to STOP if the save fails; the
            // group stays `stopped`, so the VM's resume runs them all.
            self.check_all(i, step, false)?;
            self.build_source(i, step, false)?;
        }
        let Some(src) = self.source.as_mut() else {
            return Ok(());
        };
        let mut sink = MemberSink {
            members: &mut self.members,
            slots: &self.src_slots,
        };
        let r = src.stop_copy(&mut sink).and_then(|_| src.finish());
        if let Err(e) = r {
            let err = self.members[i].err(step, e);
            self.source_failed();
            return Err(err);
        }
        for m in &mut self.members {
            m.saved = true;
            if m.stop_copy_at.is_none() {
                m.stop_copy_at = Some(m.buf.total_in());
            }
        }
        self.phase = Phase::Saved;
        Ok(())
    }

    /// Write device `i`'s state stream (header, what went ahead, then all of its state not yet
    /// sent) into `out`.
    fn write_stream<W: Write>(&self, i: usize, step: Step, out: W) -> Result<W, IntegrationError> {
        let m = &self.members[i];
        let flags = m
            .flags
            .ok_or_else(|| IntegrationError::bad_state(&m.id, step, "the device does not support VFIO migration"))?;
        // Bytes read before STOP_COPY and not sent ahead are pre-copy data.
        let start = m.buf.total_in() - m.buf.len();
        let pre_copy = m.stop_copy_at.unwrap_or(m.buf.total_in()).saturating_sub(start);
        let mut copy = |w: &mut dyn Write| m.buf.copy_to(w);
        encoding::write_state_stream(
            out,
            StateSource {
                identity: m.identity.clone(),
                flags,
                sent: SentAhead {
                    chunks: m.sent_chunks,
                    bytes: m.sent_bytes,
                },
                pre_copy,
                chunk_size: self.opts.chunk_size,
                copy: &mut copy,
            },
        )
        .map_err(|e| m.err(step, e))
    }

    /// The outcome of returning every device to RUNNING, reported for device `i` at `step`:
    /// `failed` lists each device whose recovery did not succeed, with what happened to it.
    fn returned_to_running(&self, i: usize, step: Step, failed: &[String]) -> Result<(), IntegrationError> {
        if failed.is_empty() {
            return Ok(());
        }
        Err(IntegrationError::new(
            &self.members[i].id,
            step,
            Cause::WrongPhase(format!(
                "returning the devices to RUNNING failed: {}",
                failed.join("; ")
            )),
        ))
    }

    pub(crate) fn snapshot(&mut self, i: usize) -> Result<AnyDeviceState, IntegrationError> {
        if !self.members[i].saved {
            self.save_all(i, Step::Snapshot)?;
        }
        // The device data this part carries (what was not sent ahead), as QEMU counts it.
        self.members[i].snapshot_bytes = self.members[i].buf.len();
        if self.migrating && self.legacy_peer {
            // An unpatched destination: the raw device data, as its in-tree code reads it.
            let m = &self.members[i];
            if m.sent_chunks > 0 {
                return Err(IntegrationError::bad_state(
                    &m.id,
                    Step::Snapshot,
                    "device state went ahead, and Cloud Hypervisor's in-tree format cannot say so",
                ));
            }
            let mut raw = Vec::with_capacity(m.buf.len() as usize);
            m.buf.copy_to(&mut raw).map_err(|e| m.err(Step::Snapshot, e))?;
            return Ok(AnyDeviceState::Legacy(encoding::legacy_leaf(&raw)));
        }
        self.snapshot_record(i).map(AnyDeviceState::Record)
    }

    fn snapshot_record(&mut self, i: usize) -> Result<DeviceStateRecord, IntegrationError> {
        if self.opts.snapshot_to_file && !self.migrating {
            // `ch-remote snapshot`: the stream goes to its file beside the snapshot (`send`).
            let m = &self.members[i];
            let buf = SpillBuffer::new(self.opts.buffer_cap, self.opts.spill_dir.clone());
            let SpillWriter(buf) = self.write_stream(i, Step::Snapshot, SpillWriter(buf))?;
            let record = DeviceStateRecord {
                format: encoding::STREAM_FORMAT.into(),
                device: m.id.clone(),
                identity: m.identity.to_string(),
                len: buf.len(),
                data: None,
                file: Some(encoding::state_file_name(&m.id)),
            };
            self.members[i].file_state = Some(buf);
            return Ok(record);
        }
        let m = &self.members[i];
        let external = self.opts.external_state_threshold.is_some_and(|t| m.buf.len() > t);
        if external {
            // Large: no copy in memory; the stream is written to its file by `send`.
            let len = self.write_stream(i, Step::Snapshot, CountingWriter::default())?.0;
            return Ok(DeviceStateRecord {
                format: encoding::STREAM_FORMAT.into(),
                device: m.id.clone(),
                identity: m.identity.to_string(),
                len,
                data: None,
                file: Some(encoding::state_file_name(&m.id)),
            });
        }
        let stream = self.write_stream(i, Step::Snapshot, Vec::with_capacity(m.buf.len() as usize + 4096))?;
        Ok(encoding::inline_leaf(&m.id, &m.identity.to_string(), &stream))
    }

    /// Write device `i`'s stream for `Transportable::send`: the saved state, or the one inline in
    /// `snapshot` when this group did not save it.
    pub(crate) fn send_record(&self, i: usize, snapshot: &Snapshot, w: &mut dyn Write) -> Result<(), IntegrationError> {
        let m = &self.members[i];
        if let Some(f) = &m.file_state {
            f.copy_to(w).map_err(|e| m.err(Step::Send, e))?;
            return Ok(());
        }
        if m.saved {
            self.write_stream(i, Step::Send, w)?;
            return Ok(());
        }
        let leaf: DeviceStateRecord = snapshot
            .to_state()
            .map_err(|e| m.err(Step::Send, Cause::BadState(e.to_string())))?;
        let data = leaf.data.ok_or_else(|| {
            IntegrationError::bad_state(&m.id, Step::Send, "the snapshot names a file and the state is gone")
        })?;
        let bytes = encoding::decode_base64(&data, encoding::stream_cap(self.opts.max_state_bytes))
            .map_err(|r| IntegrationError::bad_state(&m.id, Step::Send, r))?;
        w.write_all(&bytes).map_err(|e| m.err(Step::Send, e))
    }

    /// The largest device state accepted.
    pub(crate) fn state_limit(&self) -> u64 {
        self.opts.max_state_bytes
    }

    pub(crate) fn complete_migration(&mut self, i: usize) -> Result<(), IntegrationError> {
        self.members[i].completed = true;
        if self.phase == Phase::Saved && self.members.iter().all(|m| m.completed) {
            // Finished: the engine leaves the devices stopped (the VM now runs elsewhere).
            self.source = None;
            self.phase = Phase::Idle;
            self.migrating = false;
            self.legacy_peer = false;
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
        let force_unknown = self.opts.force_unknown_identity;
        let m = &mut self.members[i];
        let step = Step::Restore;
        if m.restored {
            return Err(m.err(step, Cause::WrongPhase("the device was already restored".into())));
        }
        let r = m.restore(snapshot, dir, max, chunk, force_unknown);
        if r.is_err()
            && let Some(mut d) = m.dest.take()
        {
            // The device was touched (RESUMING, maybe pre-copy data loaded): reset it.
            d.abort();
        }
        r?;
        m.restored = true;
        m.resumed_p2p = false;
        Ok(())
    }
}

impl Member {
    /// Load the device's part of a snapshot; the caller aborts the load on failure.
    fn restore(
        &mut self,
        snapshot: &Snapshot,
        dir: Option<&Path>,
        max: u64,
        chunk: usize,
        force_unknown: bool,
    ) -> Result<(), IntegrationError> {
        let step = Step::Restore;
        let leaf: AnyDeviceState = snapshot
            .to_state()
            .map_err(|e| self.err(step, Cause::BadState(e.to_string())))?;
        let r = match leaf {
            AnyDeviceState::Legacy(l) => {
                // Cloud Hypervisor's in-tree blob: raw bytes, neither identity nor checksum.
                let p = encoding::decode_base64(&l.blob, max)
                    .map_err(|r| IntegrationError::bad_state(&self.id, step, r))?;
                self.check_sent(SentAhead::default(), step)?;
                let id = self.id.clone();
                let dest = self.ensure_destination(step)?;
                let mut seq = 0;
                for c in p.chunks(chunk) {
                    dest.load(0, seq, c).map_err(|e| IntegrationError::new(&id, step, e))?;
                    seq += 1;
                }
                seq
            }
            AnyDeviceState::Record(r) => {
                if r.format != encoding::STREAM_FORMAT {
                    return Err(IntegrationError::bad_state(
                        &self.id,
                        step,
                        format!("unknown device state format {:?}", r.format),
                    ));
                }
                let cap = encoding::stream_cap(max);
                match (&r.data, &r.file) {
                    (Some(d), _) => {
                        let bytes = encoding::decode_base64(d, cap)
                            .map_err(|e| IntegrationError::bad_state(&self.id, step, e))?;
                        // In memory anyway: check every byte before the device is touched.
                        encoding::check_stream(&bytes[..]).map_err(|e| self.err(step, e))?;
                        self.load_stream(&bytes[..], max, force_unknown, step)?
                    }
                    (None, Some(f)) => {
                        let dir = dir.ok_or_else(|| {
                            IntegrationError::bad_state(
                                &self.id,
                                step,
                                format!("the state is in file {f}, and no directory was given"),
                            )
                        })?;
                        let file = crate::transport::open_state_file(&dir.join(f), r.len, cap)
                            .map_err(|e| self.err(step, e))?;
                        // Checked while it streams into the device; damage aborts (resets) it.
                        self.load_stream(io::BufReader::with_capacity(1 << 20, file), max, force_unknown, step)?
                    }
                    (None, None) => return Err(IntegrationError::bad_state(&self.id, step, "neither data nor file")),
                }
            }
        };
        let id = self.id.clone();
        let dest = self.ensure_destination(step)?;
        dest.complete(Some(&[r]))
            .map_err(|e| IntegrationError::new(&id, step, e))
    }

    /// Whether the state continues exactly what was loaded ahead (iterative protocol).
    fn check_sent(&mut self, sent: SentAhead, step: Step) -> Result<(), IntegrationError> {
        let (chunks, bytes) = match self.dest.as_mut() {
            Some(d) => d
                .loaders()
                .first()
                .map_or((0, 0), |l| (l.chunks_loaded(), l.loaded_bytes())),
            None => (0, 0),
        };
        if (chunks, bytes) != (sent.chunks, sent.bytes) {
            return Err(IntegrationError::bad_state(
                &self.id,
                step,
                format!(
                    "the state continues after {} chunks ({} bytes) sent ahead, {chunks} chunks ({bytes} bytes) \
                     were loaded",
                    sent.chunks, sent.bytes
                ),
            ));
        }
        Ok(())
    }

    /// Load a stream into the device: its header is checked against the device before the device
    /// is touched; the load completes only after the end marker was checked. Returns the number
    /// of chunks the device has loaded in all.
    fn load_stream<R: io::Read>(
        &mut self,
        input: R,
        max: u64,
        force_unknown: bool,
        step: Step,
    ) -> Result<u64, IntegrationError> {
        let mut reader = StreamReader::new(input).map_err(|e| self.err(step, e))?;
        let header = reader.header();
        if header.devices.len() != 1 {
            return Err(IntegrationError::bad_state(
                &self.id,
                step,
                format!(
                    "the stream holds {} devices, a device's part holds 1",
                    header.devices.len()
                ),
            ));
        }
        let flags = self
            .flags
            .ok_or_else(|| IntegrationError::refused(&self.id, step, "the device does not support VFIO migration"))?;
        header
            .check_compatible(0, &self.identity, flags, force_unknown)
            .map_err(|e| IntegrationError::refused(&self.id, step, format!("{e}; the device was not touched")))?;
        let mut sent = SentAhead::default();
        let mut checked = false;
        let mut seq = 0;
        let mut state_bytes = 0u64;
        loop {
            let chunk = reader.next_chunk().map_err(|e| self.err(step, e))?;
            let Some(c) = chunk else { break };
            if c.kind == SectionKind::Config {
                match SentAhead::decode(c.payload) {
                    Ok(Some(_)) if checked => {
                        return Err(IntegrationError::bad_state(
                            &self.id,
                            step,
                            format!("sent-ahead record after device state at byte offset {}", c.offset),
                        ));
                    }
                    Ok(Some(s)) => sent = s,
                    Ok(None) => log::debug!(
                        "{}: config record of another VMM at offset {} ignored",
                        self.id,
                        c.offset
                    ),
                    Err(e) => {
                        return Err(IntegrationError::bad_state(
                            &self.id,
                            step,
                            format!("{e} at byte offset {}", c.offset),
                        ));
                    }
                }
                continue;
            }
            if !checked {
                self.check_sent(sent, step)?;
                checked = true;
                seq = sent.chunks;
            }
            state_bytes += c.payload.len() as u64;
            if state_bytes > max {
                return Err(IntegrationError::bad_state(
                    &self.id,
                    step,
                    format!("device state larger than the {max}-byte limit"),
                ));
            }
            if self.dest.is_none() {
                self.ensure_destination(step)?;
            }
            let Member { id, dest, .. } = self;
            if let Some(dest) = dest.as_mut() {
                dest.load(0, seq, c.payload)
                    .map_err(|e| IntegrationError::new(&*id, step, e))?;
            }
            seq += 1;
        }
        if !checked {
            self.check_sent(sent, step)?;
            seq = sent.chunks;
        }
        Ok(seq)
    }
}

/// Writes into a [`SpillBuffer`] (memory up to its cap, then its file).
struct SpillWriter(SpillBuffer);

impl Write for SpillWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that only counts bytes.
#[derive(Default)]
struct CountingWriter(u64);

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Before the downtime (a source starting a migration, a destination preparing a device at
/// `Config`): runs the serialisation halves of [`Inner::snapshot`] and [`Member::restore`] once
/// over a small synthetic state of this device's identity (stream written, wrapped in a snapshot
/// leaf, decoded, checked and read back), so that the one-time costs of that code (first-touch
/// page faults of its code and data, lazily initialised state, allocator arenas) are paid now
/// rather than inside the downtime, where the real state takes the same path. On hardware this is
/// tens of microseconds; under the rig's emulator it moved several milliseconds out of the
/// downtime. Returns whether the synthetic state passed every check (the path taken is the real
/// one); failures are otherwise ignored: the real snapshot or restore reports its own.
fn warm_up_state_paths(id: &str, identity: &DeviceIdentity, flags: MigrationFlags) -> bool {
    let began = std::time::Instant::now();
    let mut copy = |w: &mut dyn Write| w.write_all(&[0u8; 64]).map(|()| 64);
    let Ok(stream) = encoding::write_state_stream(
        Vec::new(),
        StateSource {
            identity: identity.clone(),
            flags,
            sent: SentAhead { chunks: 1, bytes: 64 },
            pre_copy: 0,
            chunk_size: 4096,
            copy: &mut copy,
        },
    ) else {
        return false;
    };
    let leaf = encoding::inline_leaf(id, &identity.to_string(), &stream);
    let Ok(snapshot) = Snapshot::new_from_state(&leaf) else {
        return false;
    };
    let Ok(AnyDeviceState::Record(record)) = snapshot.to_state::<AnyDeviceState>() else {
        return false;
    };
    let Some(bytes) = record.data.and_then(|d| encoding::decode_base64(&d, 1 << 20).ok()) else {
        return false;
    };
    let mut checked = encoding::check_stream(&bytes[..]).is_ok();
    match StreamReader::new(&bytes[..]) {
        Ok(mut reader) => {
            checked &= reader.header().check_compatible(0, identity, flags, true).is_ok();
            loop {
                match reader.next_chunk() {
                    Ok(Some(c)) if c.kind == SectionKind::Config => {
                        checked &= matches!(SentAhead::decode(c.payload), Ok(Some(_)));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        checked = false;
                        break;
                    }
                }
            }
        }
        Err(_) => checked = false,
    }
    log::debug!(
        "{id}: snapshot and restore paths warmed up in {:?} before the downtime (synthetic state {})",
        began.elapsed(),
        if checked { "checked" } else { "refused" }
    );
    checked
}

#[cfg(test)]
mod warm_up_tests {
    use super::*;

    #[test]
    fn the_synthetic_state_takes_the_real_path() {
        let identity = DeviceIdentity::Mdev {
            mdev_type: "mtty-1".into(),
        };
        let flags = MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY;
        assert!(warm_up_state_paths("vfio0", &identity, flags));
        assert!(warm_up_state_paths(
            "vfio1",
            &DeviceIdentity::Unknown,
            MigrationFlags::STOP_COPY
        ));
    }
}
