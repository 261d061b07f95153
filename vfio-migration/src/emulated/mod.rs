//! The built-in emulated migratable device.
//!
//! [`EmulatedDevice`] implements [`MigrationDevice`] by the rules of the VFIO migration uAPI v2,
//! with no kernel and no hardware. It is what users run anywhere, and what tests use for what a
//! real kernel here cannot give: multi-GiB states, fault injection ([`Faults`]) and page-accurate
//! DMA logging.
//!
//! ## The device
//! Its state is `size` bytes cut into blocks ([`EmulatedConfig`]). The content of block `i` at
//! version `v` is generated from `(seed, i, v)` and never stored: the device keeps one `u32`
//! version per block (1 MiB for 1 GiB of 4 KiB blocks). While the device is RUNNING or PRE_COPY
//! its content changes at the configured dirty rate: blocks picked pseudo-randomly from the seed
//! get a new version. The change is applied lazily from a [`Clock`] on every call; tests use a
//! [`ManualClock`], [`EmulatedHandle::advance`] or [`EmulatedHandle::touch_block`] instead of
//! sleeping. In every other state (RUNNING_P2P and PRE_COPY_P2P included: the uAPI lets a P2P
//! device run, and this device keeps it simple by treating P2P quiescence as "no own activity")
//! the content is frozen.
//!
//! ## Transitions and sessions
//! [`MigrationDevice::set_state`] walks the kernel's path ([`crate::state::path`]) one arc at a
//! time. RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P and STOP -> STOP_COPY open a saving
//! session, STOP -> RESUMING a resuming one; one saving session lives across PRE_COPY ->
//! PRE_COPY_P2P -> STOP_COPY. The data stream is this device's own format ([`mod@format`]).
//!
//! * Saving: reads of any size produce the stream on the fly. In PRE_COPY(_P2P) the initial
//!   data (header and one record per block) comes first, then records of blocks that changed
//!   after they were sent; when both are exhausted a read answers [`ReadOutcome::NothingNow`]
//!   (ENOMSG). `precopy_info` reports exactly those two amounts. In STOP_COPY the rest follows,
//!   then a trailer, then [`ReadOutcome::End`]. A STOP_COPY without pre-copy sends everything.
//! * Resuming: writes of any size are parsed as they come and every block's bytes are checked
//!   against what its version generates. A header that does not match this device (size, block
//!   size, seed, format) fails the write with EINVAL; writing past the trailer fails with ENOSPC.
//!   A corrupt record or trailer is taken silently and refused at RESUMING -> STOP, as drivers
//!   that validate on load do; so is a short stream. That transition then fails with EINVAL and
//!   **the device stays in RESUMING with the session open** (like mtty): a short stream can be
//!   completed and the transition retried; a corrupt one never loads. Only a reset leaves
//!   RESUMING without a valid load; it discards the partial load ([`EmulatedHandle::load_problem`]
//!   tells why a load was refused).
//! * A reset returns the device to RUNNING from any state and ends any session. By default
//!   (`reset=wipe`, [`ResetMode::Wipe`]) it also **wipes the content**, as a function-level reset
//!   does on vfio-pci hardware: the device enters a new reset generation, derived from the seed,
//!   in which every block has another version and so other bytes; the state held before the reset
//!   is lost. With `reset=keep` ([`ResetMode::Keep`]) it keeps the content, like mtty, which
//!   resets only its migration state. The DMA log survives either way. ERROR is entered only
//!   through an injected fault ([`ArcFault::to_error`]).
//!
//! ```
//! use vfio_migration::emulated::EmulatedDevice;
//! use vfio_migration::device::{MigrationDevice, ReadOutcome};
//! use vfio_migration::state::DeviceState;
//!
//! let mut src = EmulatedDevice::from_spec("size=1M,seed=3").unwrap();
//! let mut dst = EmulatedDevice::from_spec("size=1M,seed=3").unwrap();
//! let mut out = src.set_state(DeviceState::StopCopy).unwrap().unwrap();
//! let mut inp = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
//! let mut buf = vec![0u8; 65536];
//! while let ReadOutcome::Data(n) = out.read(&mut buf).unwrap() {
//!     let mut at = 0;
//!     while at < n {
//!         at += inp.write(&buf[at..n]).unwrap();
//!     }
//! }
//! dst.set_state(DeviceState::Running).unwrap();
//! assert_eq!(src.digest(), dst.digest());
//! ```

mod clock;
mod config;
mod content;
mod dma;
mod faults;
pub mod format;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    ConfigError, DEFAULT_MAX_RANGES, EmulatedConfig, MAX_BLOCK, MAX_BLOCKS, MAX_SIZE, ResetMode, parse_size,
};
pub use dma::MIN_PAGE_SIZE;
pub use faults::{ArcFault, Burst, Faults, WriteFault};

use crate::device::{
    DeviceError, DeviceIdentity, DmaRange, ErrorKind, MigrationDevice, Operation, PrecopyInfo, ReadOutcome,
    SessionPhase, TransferSession,
};
use crate::state::{self, DeviceState, MigrationFlags, SessionKind};
use dma::DmaLog;
use format::{LoadParser, SaveCursor};

/// Device activity asked of a device that does none in its state (a test-helper error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{device}: {what}: the device is in {state} and does no work there")]
pub struct ActivityError {
    /// The device's name.
    pub device: String,
    /// What was asked (`touch block 3`, `DMA write`).
    pub what: String,
    /// The state the device is in.
    pub state: DeviceState,
}

/// Whether the device changes its own content in `state` (RUNNING and PRE_COPY only).
pub fn changes_content(state: DeviceState) -> bool {
    matches!(state, DeviceState::Running | DeviceState::PreCopy)
}

/// Everything a device shares with its sessions (no `Debug`: it holds the version vector).
struct Inner {
    cfg: EmulatedConfig,
    name: String,
    state: DeviceState,
    phase: SessionPhase,
    versions: Vec<u32>,
    saving: Option<SaveCursor>,
    loading: Option<LoadParser>,
    load_problem: Option<String>,
    faults: Faults,
    clock: Arc<dyn Clock>,
    last_tick: Duration,
    /// Byte-nanoseconds of dirtying not yet turned into a whole block change.
    dirty_acc: u128,
    picker: content::Picker,
    dma: Option<DmaLog>,
    /// How many resets wiped the content (the reset generation).
    reset_generation: u64,
    /// Opted in to PRE_COPY info v2 ([`MigrationDevice::enable_precopy_info_v2`]).
    precopy_v2: bool,
    /// A re-init happened that no pre-copy info query has reported yet.
    reinit_pending: bool,
    /// Re-inits so far (all sessions).
    reinits: u64,
    /// A block the device's own activity leaves alone ([`EmulatedHandle::reserve_block`]).
    reserved_block: Option<u64>,
}

impl Inner {
    fn error(&self, op: Operation, errno: i32) -> DeviceError {
        DeviceError::errno(self.name.clone(), op, errno)
    }

    /// Apply the content changes of the time passed since the last call.
    fn tick(&mut self) {
        let now = self.clock.now();
        let elapsed = now.saturating_sub(self.last_tick);
        self.last_tick = now;
        self.run_for(elapsed);
    }

    /// Apply `d` of device activity at the dirty rate; returns the block changes made.
    fn run_for(&mut self, d: Duration) -> u64 {
        if !changes_content(self.state) || self.cfg.dirty_rate == 0 {
            return 0;
        }
        let unit = u128::from(self.cfg.block_size) * 1_000_000_000;
        self.dirty_acc = self
            .dirty_acc
            .saturating_add(u128::from(self.cfg.dirty_rate) * d.as_nanos());
        let changes = self.dirty_acc / unit;
        self.dirty_acc %= unit;
        // A long stall does not change a block more often than there are blocks.
        let changes = u64::try_from(changes).unwrap_or(u64::MAX).min(self.cfg.blocks());
        self.touch_random(changes);
        changes
    }

    fn touch(&mut self, index: u64) {
        let v = self.versions[index as usize].wrapping_add(1);
        self.set_version(index, v);
    }

    fn set_version(&mut self, index: u64, version: u32) {
        self.versions[index as usize] = version;
        if let Some(c) = self.saving.as_mut() {
            c.touched(&self.cfg, index);
        }
    }

    fn touch_random(&mut self, n: u64) {
        let blocks = self.cfg.blocks();
        for _ in 0..n {
            let i = self.picker.below(blocks);
            if Some(i) != self.reserved_block {
                self.touch(i);
            }
        }
    }

    /// New initial data appears in the open saving session (see [`SaveCursor::reinit`]).
    fn reinit(&mut self) {
        if let Some(c) = self.saving.as_mut() {
            c.reinit(&self.cfg);
            self.reinit_pending = true;
            self.reinits += 1;
        }
    }

    fn enter_error(&mut self) {
        self.state = DeviceState::Error;
        self.saving = None;
        self.loading = None;
        self.phase.close_session(DeviceState::Error);
    }

    /// Take one arc; returns the session it opened.
    fn step(&mut self, a: DeviceState, b: DeviceState) -> Result<Option<(SessionKind, u32)>, i32> {
        if let Some(f) = self.faults.fail_arc
            && f.from == a
            && f.to == b
        {
            if f.once {
                self.faults.fail_arc = None;
            }
            if f.to_error {
                self.enter_error();
            }
            return Err(f.errno);
        }
        if a == DeviceState::Resuming && b == DeviceState::Stop {
            let Some(parser) = self.loading.as_mut() else {
                return Err(libc::EINVAL);
            };
            match parser.finish() {
                Ok(versions) => {
                    self.versions = versions;
                    self.loading = None;
                    self.load_problem = None;
                }
                Err(reason) => {
                    log::warn!("{}: RESUMING -> STOP refused: {reason}", self.name);
                    self.load_problem = Some(reason);
                    return Err(libc::EINVAL);
                }
            }
        }
        let opened = match a.arc_opens(b) {
            Some(SessionKind::Saving) => {
                self.saving = Some(SaveCursor::new(&self.cfg));
                self.reinit_pending = false;
                Some((SessionKind::Saving, self.phase.open_session(b)))
            }
            Some(SessionKind::Resuming) => {
                self.loading = Some(LoadParser::new(&self.cfg));
                self.load_problem = None;
                Some((SessionKind::Resuming, self.phase.open_session(b)))
            }
            None => {
                if a.arc_closes(b) {
                    self.saving = None;
                    self.loading = None;
                }
                self.phase.set_state(b);
                None
            }
        };
        self.state = b;
        Ok(opened)
    }

    /// A reset under [`ResetMode::Wipe`]: enter the next reset generation, in which every block's
    /// version moves by the same seed-derived odd step (never 0 modulo 2^32, so every block's
    /// version, and with it its bytes, changes).
    fn wipe(&mut self) {
        self.reset_generation += 1;
        let step = (content::mix(self.cfg.seed ^ RESET_SALT ^ self.reset_generation.rotate_left(32)) as u32) | 1;
        for v in &mut self.versions {
            *v = v.wrapping_add(step);
        }
    }

    fn heap_bytes(&self) -> usize {
        self.versions.capacity() * 4
            + self.saving.as_ref().map_or(0, SaveCursor::heap_bytes)
            + self.loading.as_ref().map_or(0, LoadParser::heap_bytes)
    }
}

/// Salt of the reset generations' version steps.
const RESET_SALT: u64 = 0x7265_7365_7420_6765;

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock leaves consistent data (every update is a plain store):
    // keep going rather than poisoning every later call.
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

/// The emulated migratable device. See the [module documentation](self).
///
/// It dereferences to its [`EmulatedHandle`], which holds the inspection and test methods
/// (digest, touching blocks, DMA writes, faults).
pub struct EmulatedDevice {
    handle: EmulatedHandle,
}

/// A shared view of an [`EmulatedDevice`]: inspect it and drive its activity (touch blocks, DMA
/// writes, faults) while something else owns the device, for example a live migration engine
/// holding it as a `Box<dyn MigrationDevice>`. Cheap to clone; it cannot change the migration
/// state.
#[derive(Clone)]
pub struct EmulatedHandle {
    name: String,
    cfg: EmulatedConfig,
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for EmulatedHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = lock(&self.inner);
        f.debug_struct("EmulatedHandle")
            .field("name", &self.name)
            .field("config", &self.cfg)
            .field("state", &g.state)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for EmulatedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EmulatedDevice").field(&self.handle).finish()
    }
}

impl std::ops::Deref for EmulatedDevice {
    type Target = EmulatedHandle;

    fn deref(&self) -> &EmulatedHandle {
        &self.handle
    }
}

impl EmulatedDevice {
    /// A device in RUNNING with every block at version 0, driven by the system clock.
    pub fn new(cfg: EmulatedConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let name = match &cfg.name {
            Some(n) => format!("emulated:{n}"),
            None => format!("emulated:{}", cfg.identity_params()),
        };
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let inner = Inner {
            name: name.clone(),
            state: DeviceState::Running,
            phase: SessionPhase::new(DeviceState::Running),
            versions: vec![0; cfg.blocks() as usize],
            saving: None,
            loading: None,
            load_problem: None,
            faults: Faults::default(),
            last_tick: clock.now(),
            clock,
            dirty_acc: 0,
            picker: content::Picker::new(cfg.seed),
            dma: None,
            reset_generation: 0,
            precopy_v2: false,
            reinit_pending: false,
            reinits: 0,
            reserved_block: None,
            cfg: cfg.clone(),
        };
        Ok(Self {
            handle: EmulatedHandle {
                name,
                cfg,
                inner: Arc::new(Mutex::new(inner)),
            },
        })
    }

    /// A shared handle on this device (see [`EmulatedHandle`]).
    pub fn handle(&self) -> EmulatedHandle {
        self.handle.clone()
    }

    /// A device from the parameter part of a spec (`size=64M,seed=2,...`).
    pub fn from_spec(params: &str) -> Result<Self, ConfigError> {
        Self::new(params.parse()?)
    }

    /// Drive content changes from `clock` instead of the system clock.
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        {
            let mut g = lock(&self.inner);
            g.last_tick = clock.now();
            g.clock = clock;
        }
        self
    }

    /// Inject `faults` from the start.
    pub fn with_faults(self, faults: Faults) -> Self {
        self.set_faults(faults);
        self
    }
}

impl EmulatedHandle {
    /// The device's name (`emulated:<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replace the injected faults (also while a session is open).
    pub fn set_faults(&self, faults: Faults) {
        lock(&self.inner).faults = faults;
    }

    /// The faults currently injected.
    pub fn faults(&self) -> Faults {
        lock(&self.inner).faults.clone()
    }

    /// The device's configuration.
    pub fn config(&self) -> &EmulatedConfig {
        &self.cfg
    }

    /// The current state (the same as [`MigrationDevice::state`], without a `Result`).
    pub fn device_state(&self) -> DeviceState {
        let mut g = lock(&self.inner);
        g.tick();
        g.state
    }

    /// Whether the device holds a complete, valid content and can run: not in ERROR and not in
    /// RESUMING (where a load is pending).
    pub fn is_usable(&self) -> bool {
        !matches!(self.device_state(), DeviceState::Error | DeviceState::Resuming)
    }

    /// Simulate `d` of device activity at the dirty rate, on top of the clock (nothing happens
    /// outside RUNNING and PRE_COPY). Returns how many block changes were made.
    pub fn advance(&self, d: Duration) -> u64 {
        let mut g = lock(&self.inner);
        g.tick();
        g.run_for(d)
    }

    fn active(&self, what: impl FnOnce() -> String) -> Result<MutexGuard<'_, Inner>, ActivityError> {
        let mut g = lock(&self.inner);
        g.tick();
        if !changes_content(g.state) {
            return Err(ActivityError {
                device: self.name.clone(),
                what: what(),
                state: g.state,
            });
        }
        Ok(g)
    }

    /// Give block `index` a new version, as the device's own activity would (RUNNING and
    /// PRE_COPY only).
    pub fn touch_block(&self, index: u64) -> Result<(), ActivityError> {
        let mut g = self.active(|| format!("touch block {index}"))?;
        if index >= g.cfg.blocks() {
            return Err(ActivityError {
                device: self.name.clone(),
                what: format!("touch block {index} of {}", g.cfg.blocks()),
                state: g.state,
            });
        }
        g.touch(index);
        Ok(())
    }

    /// Give `n` pseudo-randomly picked blocks (repeats possible) a new version (RUNNING and
    /// PRE_COPY only).
    pub fn touch_blocks(&self, n: u64) -> Result<(), ActivityError> {
        let mut g = self.active(|| format!("touch {n} blocks"))?;
        g.touch_random(n);
        Ok(())
    }

    /// Keep block `index` out of the device's own activity at the dirty rate (`None`: leave no
    /// block out), so that a value a driver writes there ([`EmulatedHandle::set_version`])
    /// stays until the driver changes it: a random change that picks it is dropped (the others
    /// happen as before). A reset that wipes the content still changes it. The vfio-user
    /// server's emulated model keeps block 0 for its `SCRATCH` register.
    pub fn reserve_block(&self, index: Option<u64>) {
        lock(&self.inner).reserved_block = index;
    }

    /// The block [`EmulatedHandle::reserve_block`] keeps out of the device's own activity.
    pub fn reserved_block(&self) -> Option<u64> {
        lock(&self.inner).reserved_block
    }

    /// Give block `index` the version `version`, as a driver's register write that changes the
    /// device's state would (RUNNING and PRE_COPY only, like [`EmulatedHandle::touch_block`]).
    /// The block is sent again by an open pre-copy session when the version changes.
    pub fn set_version(&self, index: u64, version: u32) -> Result<(), ActivityError> {
        let mut g = self.active(|| format!("set block {index} to version {version}"))?;
        if index >= g.cfg.blocks() {
            return Err(ActivityError {
                device: self.name.clone(),
                what: format!("set block {index} of {}", g.cfg.blocks()),
                state: g.state,
            });
        }
        if g.versions[index as usize] != version {
            g.set_version(index, version);
        }
        Ok(())
    }

    /// The device wrote guest memory at `[iova, iova + len)`: mark the pages in the DMA log when
    /// logging is on. A device does DMA only while running (RUNNING, RUNNING_P2P, PRE_COPY,
    /// PRE_COPY_P2P).
    pub fn dma_write(&self, iova: u64, len: u64) -> Result<(), ActivityError> {
        let mut g = lock(&self.inner);
        g.tick();
        if !g.state.is_running() {
            return Err(ActivityError {
                device: self.name.clone(),
                what: format!("DMA write {iova:#x}+{len:#x}"),
                state: g.state,
            });
        }
        if let Some(log) = g.dma.as_mut() {
            log.mark(iova, len);
        }
        Ok(())
    }

    /// Whether DMA logging is on, and at which page size.
    pub fn dma_log_page_size(&self) -> Option<u64> {
        lock(&self.inner).dma.as_ref().map(DmaLog::page_size)
    }

    /// A digest of the content: format version, seed, size, block size and every block's
    /// version. Equal digests mean equal content.
    pub fn digest(&self) -> u64 {
        let mut g = lock(&self.inner);
        g.tick();
        format::versions_digest(&g.cfg, &g.versions)
    }

    /// PRE_COPY info v2's re-init: new initial data appears in the open saving session. The
    /// initial pass over every block starts again (`initial_bytes` starts over, `dirty_bytes`
    /// resets), and, when the device offers PRE_COPY info v2 (`flags=...+precopy-v2`) and the
    /// engine opted in, the next pre-copy info query reports [`PrecopyInfo::reinit`] (once).
    /// Without the opt-in the new initial data still appears, unannounced. Only in PRE_COPY:
    /// elsewhere an [`ActivityError`]. `reinit-after=BYTES` does the same on its own.
    ///
    /// ```
    /// use vfio_migration::emulated::EmulatedDevice;
    /// use vfio_migration::device::MigrationDevice;
    /// use vfio_migration::DeviceState;
    ///
    /// let mut dev = EmulatedDevice::from_spec("size=64K,flags=stop-copy+pre-copy+precopy-v2").unwrap();
    /// assert!(dev.trigger_reinit().is_err(), "RUNNING: no saving session");
    /// assert!(dev.enable_precopy_info_v2().unwrap());
    /// let mut session = dev.set_state(DeviceState::PreCopy).unwrap().unwrap();
    /// let first = session.precopy_info().unwrap();
    /// dev.trigger_reinit().unwrap();
    /// let info = session.precopy_info().unwrap();
    /// assert!(info.reinit && !first.reinit);
    /// assert!(!session.precopy_info().unwrap().reinit, "reported once");
    /// ```
    pub fn trigger_reinit(&self) -> Result<(), ActivityError> {
        let mut g = lock(&self.inner);
        g.tick();
        if g.state != DeviceState::PreCopy || g.saving.is_none() {
            return Err(ActivityError {
                device: self.name.clone(),
                what: "re-init of the initial data".into(),
                state: g.state,
            });
        }
        g.reinit();
        Ok(())
    }

    /// Re-inits so far ([`EmulatedHandle::trigger_reinit`] and `reinit-after`), all sessions.
    pub fn reinits(&self) -> u64 {
        lock(&self.inner).reinits
    }

    /// Whether the engine opted the device in to PRE_COPY info v2.
    pub fn precopy_v2_enabled(&self) -> bool {
        lock(&self.inner).precopy_v2
    }

    /// How many resets have wiped the content so far (0 with `reset=keep`).
    pub fn reset_generation(&self) -> u64 {
        lock(&self.inner).reset_generation
    }

    /// The version of block `index`.
    pub fn version(&self, index: u64) -> Option<u32> {
        let mut g = lock(&self.inner);
        g.tick();
        g.versions.get(index as usize).copied()
    }

    /// The bytes of block `index` as they are now.
    pub fn block_content(&self, index: u64) -> Option<Vec<u8>> {
        let mut g = lock(&self.inner);
        g.tick();
        let v = *g.versions.get(index as usize)?;
        let mut out = vec![0u8; g.cfg.block_len(index) as usize];
        content::fill(content::block_key(g.cfg.seed, index, v), 0, &mut out);
        Some(out)
    }

    /// The heap memory the device holds for its content and open session (versions, dirty
    /// bits, a staged load), in bytes. Block bytes are never held.
    pub fn heap_bytes(&self) -> usize {
        lock(&self.inner).heap_bytes()
    }

    /// Why the last load was refused (a header on write, a corrupt or short stream on RESUMING
    /// -> STOP), until a new load starts or one succeeds.
    pub fn load_problem(&self) -> Option<String> {
        lock(&self.inner).load_problem.clone()
    }
}

impl MigrationDevice for EmulatedDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity::Emulated {
            params: self.cfg.identity_params(),
        }
    }

    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        Ok(self.cfg.flags)
    }

    fn state(&self) -> Result<DeviceState, DeviceError> {
        Ok(self.device_state())
    }

    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        let mut g = lock(&self.inner);
        g.tick();
        let from = g.state;
        let op = Operation::SetState { from, to };
        let path = state::path(from, to, self.cfg.flags)
            .map_err(|e| DeviceError::new(self.name.clone(), op, ErrorKind::State(e)))?;
        let mut opened = None;
        for arc in path.windows(2) {
            match g.step(arc[0], arc[1]) {
                Ok(o) => opened = o.or(opened),
                Err(errno) => return Err(g.error(op, errno)),
            }
        }
        Ok(opened.map(|(kind, generation)| {
            Box::new(EmulatedSession {
                name: self.name.clone(),
                inner: Arc::clone(&self.inner),
                kind,
                generation,
                read_rate: self.cfg.read_rate,
                throttle: None,
            }) as Box<dyn TransferSession>
        }))
    }

    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        let mut g = lock(&self.inner);
        g.tick();
        if let Some(errno) = g.faults.stop_copy_size_errno {
            return Err(g.error(Operation::StopCopySize, errno));
        }
        Ok(match &g.saving {
            Some(c) => c.remaining_to_end(),
            None => format::full_len(&g.cfg),
        })
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        let mut g = lock(&self.inner);
        g.tick();
        if let Some(errno) = g.faults.reset_fails_once.take() {
            return Err(g.error(Operation::Reset, errno));
        }
        g.saving = None;
        g.loading = None;
        g.reinit_pending = false;
        g.state = DeviceState::Running;
        g.phase.close_session(DeviceState::Running);
        if g.cfg.reset == ResetMode::Wipe {
            g.wipe();
        }
        Ok(())
    }

    fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError> {
        let mut g = lock(&self.inner);
        if g.dma.is_some() {
            return Err(g.error(Operation::DmaLogStart, libc::EBUSY));
        }
        match DmaLog::start(ranges, page_size, g.cfg.max_ranges) {
            Ok(log) => {
                let ps = log.page_size();
                g.dma = Some(log);
                Ok(ps)
            }
            Err(r) => {
                log::debug!("{}: DMA logging start refused: {}", self.name, r.reason);
                Err(g.error(Operation::DmaLogStart, r.errno))
            }
        }
    }

    fn dma_log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        let mut g = lock(&self.inner);
        let Some(log) = g.dma.as_mut() else {
            return Err(g.error(Operation::DmaLogReport, libc::EINVAL));
        };
        log.report(iova, length, page_size, bitmap).map_err(|r| {
            log::debug!("{}: DMA log report refused: {}", self.name, r.reason);
            DeviceError::errno(self.name.clone(), Operation::DmaLogReport, r.errno)
        })
    }

    /// Stops logging and drops the log; stopping when not logging succeeds.
    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        lock(&self.inner).dma = None;
        Ok(())
    }

    /// Opted in when the configuration offers it (`flags=...+precopy-v2`).
    fn enable_precopy_info_v2(&mut self) -> Result<bool, DeviceError> {
        let mut g = lock(&self.inner);
        g.precopy_v2 = g.cfg.precopy_v2;
        Ok(g.precopy_v2)
    }
}

/// A transfer session of an [`EmulatedDevice`]: the emulated `data_fd`.
pub struct EmulatedSession {
    name: String,
    inner: Arc<Mutex<Inner>>,
    kind: SessionKind,
    generation: u32,
    /// The `read-rate` throttle: bytes per second (0: none), when the first byte was read, and
    /// bytes read since.
    read_rate: u64,
    throttle: Option<(std::time::Instant, u64)>,
}

impl fmt::Debug for EmulatedSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatedSession")
            .field("device", &self.name)
            .field("kind", &self.kind)
            .field("generation", &self.generation)
            .finish()
    }
}

impl EmulatedSession {
    /// Hold the caller (outside the device lock) so the session's reads average at most
    /// `read_rate` bytes per second, in real time.
    fn throttle(&mut self, n: usize) {
        if self.read_rate == 0 || n == 0 {
            return;
        }
        let (start, bytes) = self.throttle.get_or_insert_with(|| (std::time::Instant::now(), 0));
        *bytes += n as u64;
        let due = Duration::from_secs_f64(*bytes as f64 / self.read_rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }

    /// Lock the device and check this session is still the open one; returns its state.
    fn open(&self, op: Operation) -> Result<(MutexGuard<'_, Inner>, DeviceState), DeviceError> {
        let mut g = lock(&self.inner);
        let Some(state) = g.phase.session_state(self.generation, self.kind) else {
            return Err(DeviceError::new(self.name.clone(), op, ErrorKind::SessionClosed));
        };
        g.tick();
        Ok((g, state))
    }
}

impl TransferSession for EmulatedSession {
    fn kind(&self) -> SessionKind {
        self.kind
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        let (mut g, state) = self.open(Operation::Read)?;
        if self.kind != SessionKind::Saving {
            // The resuming data_fd is write-only.
            return Err(g.error(Operation::Read, libc::EBADF));
        }
        if buf.is_empty() {
            return Err(DeviceError::new(
                self.name.clone(),
                Operation::Read,
                ErrorKind::InvalidRequest("empty read buffer".into()),
            ));
        }
        let stop_copy = state == DeviceState::StopCopy;
        if state == DeviceState::PreCopy
            && let Some(after) = g.cfg.reinit_after
            && let Some(c) = g.saving.as_mut()
            && !c.auto_reinit_done
            && c.precopy_bytes >= after
        {
            c.auto_reinit_done = true;
            g.reinit();
        }
        let inner = &mut *g;
        let Some(cursor) = inner.saving.as_mut() else {
            return Err(DeviceError::new(
                self.name.clone(),
                Operation::Read,
                ErrorKind::SessionClosed,
            ));
        };
        let faults = &inner.faults;
        let read_no = cursor.reads;
        cursor.reads += 1;
        let mut cap = buf.len();
        if let Some(burst) = faults.nothing_now
            && burst.hits(read_no)
        {
            if !stop_copy {
                return Ok(ReadOutcome::NothingNow);
            }
            cap = 1;
        }
        if let Some(limit) = faults.short_read {
            cap = cap.min(limit.max(1));
        }
        if stop_copy && let Some(end) = faults.early_end {
            let left = end.saturating_sub(cursor.stop_copy_bytes);
            if left == 0 {
                return Ok(ReadOutcome::End);
            }
            cap = cap.min(usize::try_from(left).unwrap_or(usize::MAX));
        }
        let n = cursor.fill(&inner.cfg, &inner.versions, stop_copy, &mut buf[..cap]);
        drop(g);
        self.throttle(n);
        Ok(match n {
            0 if stop_copy => ReadOutcome::End,
            0 => ReadOutcome::NothingNow,
            n => ReadOutcome::Data(n),
        })
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let (mut g, _) = self.open(Operation::Write)?;
        if self.kind != SessionKind::Resuming {
            // The saving data_fd is read-only.
            return Err(g.error(Operation::Write, libc::EBADF));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let inner = &mut *g;
        let Some(parser) = inner.loading.as_mut() else {
            return Err(DeviceError::new(
                self.name.clone(),
                Operation::Write,
                ErrorKind::SessionClosed,
            ));
        };
        let mut data = buf;
        if let Some(wf) = inner.faults.write_fail {
            if parser.consumed >= wf.at {
                return Err(DeviceError::errno(self.name.clone(), Operation::Write, wf.errno));
            }
            let room = usize::try_from(wf.at - parser.consumed).unwrap_or(usize::MAX);
            data = &data[..data.len().min(room)];
        }
        match parser.write(&inner.cfg, data) {
            Ok(n) => Ok(n),
            Err(refused) => {
                log::warn!("{}: write refused: {}", self.name, refused.reason);
                inner.load_problem = Some(refused.reason);
                Err(DeviceError::errno(self.name.clone(), Operation::Write, refused.errno))
            }
        }
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        let (mut g, state) = self.open(Operation::PrecopyInfo)?;
        if self.kind != SessionKind::Saving {
            return Err(g.error(Operation::PrecopyInfo, libc::ENOTTY));
        }
        if !matches!(state, DeviceState::PreCopy | DeviceState::PreCopyP2p) {
            return Err(g.error(Operation::PrecopyInfo, libc::EINVAL));
        }
        let (initial_bytes, dirty_bytes) = g.saving.as_ref().map_or((0, 0), SaveCursor::precopy_info);
        // Without the opt-in there is no REINIT flag to report (the pending one is dropped).
        let reinit = std::mem::take(&mut g.reinit_pending) && g.precopy_v2;
        Ok(PrecopyInfo {
            initial_bytes,
            dirty_bytes,
            reinit,
        })
    }
}
