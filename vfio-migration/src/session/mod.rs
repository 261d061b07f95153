//! Moving device state: stop-copy save and load, with recovery.
//!
//! [`save`] takes a device to STOP_COPY (along the kernel's path), reads the whole device state
//! into any [`std::io::Write`] through one bounded buffer (at most [`MAX_BUFFER`] bytes in
//! flight), then stops the device or returns it to RUNNING. [`load`] takes a device to RESUMING,
//! streams a state from any [`std::io::Read`] into it, and ends the session with RESUMING -> STOP,
//! which is where the device validates what it was given.
//!
//! Failures never leave a device wedged: a failed or cancelled save returns the source to
//! RUNNING (resetting it when that fails), and a failed load resets the destination, as QEMU
//! does. Every error says what was done ([`Recovery`]).

mod error;
mod load;
pub mod recovery;
mod save;
mod stream;

pub use error::SessionError;
pub(crate) use error::stall_text;
pub use load::{LoadOptions, LoadReport, WRITE_WAIT, load};
pub use recovery::{Recovery, STATE_LOST_BY_RESET, TransitionError, restore_to, set_state_or_recover};
pub use save::{SaveOptions, SaveReport, save};
pub use stream::{StreamIoError, StreamLoad, load_from_stream, save_to_stream};

/// The largest transfer buffer used by save and load: 1 MiB, as QEMU.
pub const MAX_BUFFER: usize = 1 << 20;

/// What a device should be left in after a successful save or load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum After {
    /// RUNNING (the default).
    #[default]
    Running,
    /// STOP: a saved source stays stopped (the VM moved away); a loaded destination waits.
    Stop,
}

impl After {
    fn state(self) -> crate::state::DeviceState {
        match self {
            After::Running => crate::state::DeviceState::Running,
            After::Stop => crate::state::DeviceState::Stop,
        }
    }
}

/// Check that `dev` is where a save or load starts (RUNNING, RUNNING_P2P or STOP) and request
/// `to`, which must open a transfer session. Returns the start state and the session; on failure
/// the device is back where it started (or reset).
fn begin(
    dev: &mut dyn crate::device::MigrationDevice,
    op: &'static str,
    to: crate::state::DeviceState,
) -> Result<(crate::state::DeviceState, Box<dyn crate::device::TransferSession>), SessionError> {
    use crate::state::DeviceState;
    let start = dev.state()?;
    if !matches!(
        start,
        DeviceState::Running | DeviceState::RunningP2p | DeviceState::Stop
    ) {
        return Err(SessionError::BadStartState {
            device: dev.name().to_string(),
            op,
            state: start,
            needs: "RUNNING, RUNNING_P2P or STOP",
        });
    }
    match set_state_or_recover(dev, to, start)? {
        Some(session) => Ok((start, session)),
        None => {
            let error = crate::device::DeviceError::no_session(dev.name(), start, to);
            let recovery = restore_to(dev, start);
            Err(SessionError::Transfer {
                error,
                bytes: 0,
                recovery,
            })
        }
    }
}

/// A progress callback: bytes moved so far and the expected total when known.
pub type Progress<'a> = &'a mut dyn FnMut(u64, Option<u64>);
