//! Load through RESUMING.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::recovery::{reset_device, set_state_or_recover};
use super::{After, MAX_BUFFER, Progress, SessionError};
use crate::device::{DeviceError, ErrorKind, MigrationDevice, Operation, TransferSession};
use crate::state::DeviceState;

/// Options of [`load`].
pub struct LoadOptions<'a> {
    /// The state to leave the device in after a successful load.
    pub after: After,
    /// The transfer buffer size; clamped to `1..=MAX_BUFFER`.
    pub buffer_size: usize,
    /// Set to `true` from elsewhere to cancel; the device is then reset.
    pub cancel: Option<&'a AtomicBool>,
    /// Called after every chunk with the bytes loaded so far and `expected` when given.
    pub progress: Option<Progress<'a>>,
    /// The expected total, for progress only.
    pub expected: Option<u64>,
    /// How long the device may take no data in RESUMING before the load fails (default 5 s, as
    /// [`SaveOptions::max_idle_time`](super::SaveOptions::max_idle_time)): the error names the
    /// device, the state and the time waited, and the device is reset. Cancel is checked every
    /// [`WRITE_WAIT`] while it takes nothing.
    pub max_idle_time: Duration,
    /// Accept a stream or device whose identity is unknown ([`crate::device::DeviceIdentity::Unknown`])
    /// in [`crate::session::load_from_stream`]'s header check (default `false`: refused, as
    /// nothing shows the state fits the device). Known, different identities are refused anyway.
    pub force_unknown_identity: bool,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        Self {
            after: After::Running,
            buffer_size: MAX_BUFFER,
            cancel: None,
            progress: None,
            expected: None,
            max_idle_time: Duration::from_secs(5),
            force_unknown_identity: false,
        }
    }
}

/// How long one write of the load waits at most for the device to take data
/// ([`TransferSession::write_within`]) before the cancel flag and the time bound are checked.
pub const WRITE_WAIT: Duration = Duration::from_millis(10);

impl std::fmt::Debug for LoadOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("after", &self.after)
            .field("buffer_size", &self.buffer_size)
            .field("expected", &self.expected)
            .field("max_idle_time", &self.max_idle_time)
            .field("force_unknown_identity", &self.force_unknown_identity)
            .finish_non_exhaustive()
    }
}

/// What a successful [`load`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// Bytes of device state loaded.
    pub bytes: u64,
    /// Time from RESUMING to the end of RESUMING -> STOP.
    pub duration: Duration,
    /// The state the device was left in.
    pub final_state: DeviceState,
}

/// Load a device state from `input` into `dev` through RESUMING.
///
/// The device must be RUNNING, RUNNING_P2P or STOP. On success it is left in `opts.after`.
/// On any failure (bad input, a refused write, a device that takes nothing for
/// [`LoadOptions::max_idle_time`], a state the device rejects at RESUMING -> STOP, cancel) the
/// device is reset, which leaves it RUNNING and usable.
pub fn load(
    dev: &mut dyn MigrationDevice,
    input: &mut dyn Read,
    mut opts: LoadOptions<'_>,
) -> Result<LoadReport, SessionError> {
    let mut buf = vec![0u8; opts.buffer_size.clamp(1, MAX_BUFFER)];
    let began = Instant::now();
    let (_start, mut session) = super::begin(dev, "load", DeviceState::Resuming)?;

    let name = dev.name().to_string();
    let copied = copy_in(&name, session.as_mut(), input, &mut buf, &mut opts);
    drop(session);
    let bytes = match copied {
        Ok(bytes) => bytes,
        Err(fail) => {
            // Aborting RESUMING needs a reset.
            let recovery = reset_device(dev);
            return Err(match fail {
                LoadFail::Device(error, bytes) => SessionError::Transfer { error, bytes, recovery },
                LoadFail::Input(source, bytes) => SessionError::Io {
                    device: name,
                    what: "reading the state to load",
                    bytes,
                    error: source,
                    recovery,
                },
                LoadFail::Cancelled(bytes) => SessionError::Cancelled {
                    device: name,
                    op: "load",
                    bytes,
                    recovery,
                },
                LoadFail::Stalled(polls, waited, bytes) => SessionError::Stalled {
                    device: name,
                    state: DeviceState::Resuming,
                    polls,
                    waited,
                    bytes,
                    recovery,
                },
            });
        }
    };
    // RESUMING -> STOP is where the device validates the state; a refusal resets it.
    set_state_or_recover(dev, DeviceState::Stop, DeviceState::Error)?;
    let duration = began.elapsed();
    if opts.after == After::Running {
        set_state_or_recover(dev, DeviceState::Running, DeviceState::Error)?;
    }
    Ok(LoadReport {
        bytes,
        duration,
        final_state: opts.after.state(),
    })
}

enum LoadFail {
    Device(DeviceError, u64),
    Input(io::Error, u64),
    Cancelled(u64),
    /// Waits that found no room in a row, how long, bytes loaded before.
    Stalled(u32, Duration, u64),
}

fn copy_in(
    device: &str,
    session: &mut dyn TransferSession,
    input: &mut dyn Read,
    buf: &mut [u8],
    opts: &mut LoadOptions<'_>,
) -> Result<u64, LoadFail> {
    let mut bytes = 0u64;
    loop {
        if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(LoadFail::Cancelled(bytes));
        }
        let n = match input.read(buf) {
            Ok(0) => return Ok(bytes),
            Ok(n) => n.min(buf.len()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LoadFail::Input(e, bytes)),
        };
        let mut chunk = &buf[..n];
        // The device takes the data in its time, but not in no time at all: each write waits
        // at most WRITE_WAIT, then cancel and the time bound are checked.
        let mut idle_since = Instant::now();
        let mut idle = 0u32;
        while !chunk.is_empty() {
            let Some(taken) = session
                .write_within(chunk, WRITE_WAIT)
                .map_err(|e| LoadFail::Device(e, bytes))?
            else {
                idle = idle.saturating_add(1);
                let waited = idle_since.elapsed();
                if waited > opts.max_idle_time {
                    return Err(LoadFail::Stalled(idle, waited, bytes));
                }
                if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                    return Err(LoadFail::Cancelled(bytes));
                }
                continue;
            };
            idle = 0;
            idle_since = Instant::now();
            if taken == 0 || taken > chunk.len() {
                return Err(LoadFail::Device(
                    DeviceError::new(
                        device,
                        Operation::Write,
                        ErrorKind::InvalidAnswer(format!("write of {} bytes took {taken}", chunk.len())),
                    ),
                    bytes,
                ));
            }
            chunk = &chunk[taken..];
            bytes += taken as u64;
        }
        if let Some(p) = opts.progress.as_mut() {
            p(bytes, opts.expected);
        }
    }
}
