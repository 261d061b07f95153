//! Errors of the integration, and their mapping onto Cloud Hypervisor's [`MigratableError`]
//! ([`IntegrationError::into_migratable`]).

use std::fmt;
use std::io;

use anyhow::anyhow;
use vfio_migration::DeviceError;
use vfio_migration::dirty::DirtyError;
use vfio_migration::live::LiveError;
use vfio_migration::session::TransitionError;
use vfio_migration::stream::StreamError;
use vm_migration::MigratableError;

/// The Cloud Hypervisor call (or integration step) that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Registering a device with its group.
    Register,
    /// `Migratable::start_migration`.
    StartMigration,
    /// `Migratable::start_dirty_log`.
    StartDirtyLog,
    /// `Migratable::dirty_log`.
    DirtyLog,
    /// `Migratable::stop_dirty_log`.
    StopDirtyLog,
    /// `Pausable::pause`.
    Pause,
    /// `Pausable::resume`.
    Resume,
    /// `Snapshottable::snapshot`.
    Snapshot,
    /// Restoring a device from its snapshot (destination).
    Restore,
    /// `Transportable::send`.
    Send,
    /// `Transportable::recv`.
    Recv,
    /// `Migratable::complete_migration`.
    CompleteMigration,
    /// Taking pre-copy data for the iterative protocol (source).
    PrecopySend,
    /// Loading pre-copy data from the iterative protocol (destination).
    PrecopyLoad,
    /// Reading the device's migration state (diagnostics).
    State,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Register => "register",
            Step::StartMigration => "start migration",
            Step::StartDirtyLog => "start dirty log",
            Step::DirtyLog => "dirty log",
            Step::StopDirtyLog => "stop dirty log",
            Step::Pause => "pause",
            Step::Resume => "resume",
            Step::Snapshot => "snapshot",
            Step::Restore => "restore",
            Step::Send => "send",
            Step::Recv => "receive",
            Step::CompleteMigration => "complete migration",
            Step::PrecopySend => "send pre-copy data",
            Step::PrecopyLoad => "load pre-copy data",
            Step::State => "read the device state",
        })
    }
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// The migration cannot be done as configured (checked before touching the device).
    #[error("refused: {0}")]
    Refused(String),
    /// The live-migration engine failed (what it did to the devices is included).
    #[error(transparent)]
    Live(#[from] LiveError),
    /// A device operation failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A device transition failed (with its recovery).
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// Dirty page tracking failed (under [`crate::GroupOptions::dirty_policy`]), or none could
    /// be chosen.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// A device-state stream is damaged (with the byte offset of the damage).
    #[error("damaged device state: {0}")]
    Stream(#[from] StreamError),
    /// A device snapshot or state file is malformed.
    #[error("bad device state: {0}")]
    BadState(String),
    /// The step is not valid now.
    #[error("{0}")]
    WrongPhase(String),
    /// Buffering or file I/O failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A failed integration step, naming the device and the step.
#[derive(Debug, thiserror::Error)]
#[error("VFIO device {device}: {step}: {cause}")]
pub struct IntegrationError {
    /// The device id (Cloud Hypervisor's device id).
    pub device: String,
    /// The step.
    pub step: Step,
    /// Why it failed (boxed: the engine's errors carry what recovery did to every device).
    #[source]
    pub cause: Box<Cause>,
}

impl IntegrationError {
    /// A new error.
    pub fn new(device: impl Into<String>, step: Step, cause: impl Into<Cause>) -> Self {
        Self {
            device: device.into(),
            step,
            cause: Box::new(cause.into()),
        }
    }

    /// A refusal.
    pub fn refused(device: impl Into<String>, step: Step, reason: impl Into<String>) -> Self {
        Self::new(device, step, Cause::Refused(reason.into()))
    }

    /// A malformed state.
    pub fn bad_state(device: impl Into<String>, step: Step, reason: impl Into<String>) -> Self {
        Self::new(device, step, Cause::BadState(reason.into()))
    }
}

impl IntegrationError {
    /// This error as Cloud Hypervisor's [`MigratableError`], in the variant of its step
    /// (`Pause`, `Snapshot`, `StartDirtyLog`...).
    ///
    /// A method rather than `From`: inside Cloud Hypervisor's tree a `From` impl makes `?` in
    /// closures returning `MigratableError` ambiguous (E0283 in `vmm/src/lib.rs`).
    pub fn into_migratable(self) -> MigratableError {
        let step = self.step;
        let err = anyhow!(self);
        match step {
            Step::Register | Step::StartMigration | Step::State => MigratableError::StartMigration(err),
            Step::StartDirtyLog => MigratableError::StartDirtyLog(err),
            Step::DirtyLog => MigratableError::DirtyLog(err),
            Step::StopDirtyLog => MigratableError::StopDirtyLog(err),
            Step::Pause => MigratableError::Pause(err),
            Step::Resume => MigratableError::Resume(err),
            Step::Snapshot => MigratableError::Snapshot(err),
            Step::Restore | Step::PrecopyLoad => MigratableError::Restore(err),
            Step::Send | Step::PrecopySend => MigratableError::MigrateSend(err),
            Step::Recv => MigratableError::MigrateReceive(err),
            Step::CompleteMigration => MigratableError::CompleteMigration(err),
        }
    }
}
