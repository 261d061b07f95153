//! Transitions with recovery, as QEMU does it.
//!
//! A failed transition is followed by a request for a named recovery state; when that fails too,
//! or the device is in ERROR, the device is reset (which returns it to RUNNING). The outcome is
//! reported, so an error message always says what was done to the device.
//!
//! A reset costs the device's state: on vfio-pci hardware `VFIO_DEVICE_RESET` is usually a
//! function-level reset, which wipes what the device held (the emulated device's default,
//! `reset=wipe`, does the same; mtty and `reset=keep` keep their content). So a recovery by reset
//! is reported as [`STATE_LOST_BY_RESET`]: the device is RUNNING again, but a source that was
//! being saved or migrated no longer holds the state it had.

use std::fmt;

use crate::device::{DeviceError, MigrationDevice, TransferSession};
use crate::state::DeviceState;

/// The words every recovery by reset is reported with (see the [module documentation](self)).
pub const STATE_LOST_BY_RESET: &str = "device state lost by reset";

/// What was done to a device after a failure.
#[derive(Debug)]
pub enum Recovery {
    /// Nothing needed doing: the device is in a usable state.
    NotNeeded(DeviceState),
    /// The device was moved to this state.
    MovedTo(DeviceState),
    /// The device was reset and is RUNNING; what it held is lost (an FLR on PCI hardware).
    Reset,
    /// Recovery failed; the device may be unusable. The error of the last attempt.
    Failed(Box<DeviceError>),
}

impl Recovery {
    /// Whether the device ended in a known, usable state.
    pub fn succeeded(&self) -> bool {
        !matches!(self, Recovery::Failed(_))
    }

    /// Whether the device was reset, so the state it held is lost (on devices whose reset wipes
    /// it, which is most PCI hardware).
    pub fn reset(&self) -> bool {
        matches!(self, Recovery::Reset)
    }

    /// The state the device ended in, when known.
    pub fn final_state(&self) -> Option<DeviceState> {
        match self {
            Recovery::NotNeeded(s) | Recovery::MovedTo(s) => Some(*s),
            Recovery::Reset => Some(DeviceState::Running),
            Recovery::Failed(_) => None,
        }
    }
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recovery::NotNeeded(s) => write!(f, "the device stayed {s}"),
            Recovery::MovedTo(s) => write!(f, "the device was returned to {s}"),
            Recovery::Reset => write!(
                f,
                "the device was reset and is RUNNING: {STATE_LOST_BY_RESET} (a reset, an FLR on PCI hardware, wipes \
                 what the device held)"
            ),
            Recovery::Failed(e) => write!(f, "recovery FAILED, the device may be unusable: {e}"),
        }
    }
}

/// A transition that failed, and what recovery did.
#[derive(Debug, thiserror::Error)]
#[error("{error}; {recovery}")]
pub struct TransitionError {
    /// The failure of the requested transition.
    pub error: DeviceError,
    /// What was done afterwards.
    pub recovery: Recovery,
}

/// Reset `dev`, reporting the outcome as a [`Recovery`]. A failed reset is tried once more
/// before giving up, so one transient failure does not leave the device wedged.
pub fn reset_device(dev: &mut dyn MigrationDevice) -> Recovery {
    match dev.reset() {
        Ok(()) => Recovery::Reset,
        Err(first) => {
            log::warn!("{first}; trying the reset once more");
            match dev.reset() {
                Ok(()) => Recovery::Reset,
                Err(e) => Recovery::Failed(Box::new(e)),
            }
        }
    }
}

/// Bring `dev` to `target` from wherever it is, resetting it when that fails or it is in ERROR.
///
/// Any session opened on the way is closed. Used to put a device back into a usable state after
/// a failure.
pub fn restore_to(dev: &mut dyn MigrationDevice, target: DeviceState) -> Recovery {
    match dev.state() {
        Ok(s) if s == target => return Recovery::NotNeeded(s),
        Ok(DeviceState::Error) | Err(_) => return reset_device(dev),
        Ok(_) => {}
    }
    match dev.set_state(target) {
        Ok(_session) => Recovery::MovedTo(target),
        Err(_) => reset_device(dev),
    }
}

/// Request `to`; on failure, try `recover`, and reset when that fails or `recover` is ERROR.
///
/// This is QEMU's error policy. On success the session the transition opened (if any) is
/// returned.
pub fn set_state_or_recover(
    dev: &mut dyn MigrationDevice,
    to: DeviceState,
    recover: DeviceState,
) -> Result<Option<Box<dyn TransferSession>>, TransitionError> {
    match dev.set_state(to) {
        Ok(session) => Ok(session),
        Err(error) => {
            let recovery = if recover == DeviceState::Error {
                reset_device(dev)
            } else {
                restore_to(dev, recover)
            };
            log::warn!("{error}; {recovery}");
            Err(TransitionError { error, recovery })
        }
    }
}
