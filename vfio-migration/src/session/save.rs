//! Stop-copy save.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::recovery::{restore_to, set_state_or_recover};
use super::{After, MAX_BUFFER, Progress, SessionError};
use crate::device::{MigrationDevice, ReadOutcome, TransferSession};
use crate::state::DeviceState;

/// Options of [`save`].
pub struct SaveOptions<'a> {
    /// The state to leave the device in after a successful save.
    pub after: After,
    /// The transfer buffer size; clamped to `1..=MAX_BUFFER` and to the device's estimate.
    pub buffer_size: usize,
    /// Set to `true` from elsewhere to cancel; the device then returns to where it started.
    pub cancel: Option<&'a AtomicBool>,
    /// Called after every chunk with the bytes saved so far and the device's size estimate.
    pub progress: Option<Progress<'a>>,
    /// How many consecutive "nothing now" reads STOP_COPY may give (1 ms apart) before the save
    /// is declared stalled. The uAPI has no such answer in STOP_COPY; this only guards against
    /// a misbehaving device.
    pub max_idle_polls: u32,
    /// How long STOP_COPY may give no data before the save is declared stalled, whatever the
    /// number of polls (a kernel device's read waits up to [`crate::kernel::READ_WAIT`] per poll).
    pub max_idle_time: Duration,
}

impl Default for SaveOptions<'_> {
    fn default() -> Self {
        Self {
            after: After::Running,
            buffer_size: MAX_BUFFER,
            cancel: None,
            progress: None,
            max_idle_polls: 5000,
            max_idle_time: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for SaveOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveOptions")
            .field("after", &self.after)
            .field("buffer_size", &self.buffer_size)
            .field("max_idle_polls", &self.max_idle_polls)
            .field("max_idle_time", &self.max_idle_time)
            .finish_non_exhaustive()
    }
}

/// What a successful [`save`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveReport {
    /// Bytes of device state saved.
    pub bytes: u64,
    /// The device's estimate before the save, when it gave one.
    pub estimate: Option<u64>,
    /// Time from the request for STOP_COPY to the end of the data.
    pub duration: Duration,
    /// The state the device was left in.
    pub final_state: DeviceState,
}

/// Save the complete device state of `dev` into `out` through STOP_COPY.
///
/// The device must be RUNNING, RUNNING_P2P or STOP. On success it is left in `opts.after`; on
/// failure or cancel it is returned to the state it started in (reset when that fails).
pub fn save(
    dev: &mut dyn MigrationDevice,
    out: &mut dyn Write,
    mut opts: SaveOptions<'_>,
) -> Result<SaveReport, SessionError> {
    let estimate = dev.stop_copy_size().ok();
    let buf_len = opts
        .buffer_size
        .clamp(1, MAX_BUFFER)
        .min(estimate.map_or(MAX_BUFFER, |e| e.clamp(4096, MAX_BUFFER as u64) as usize));
    let mut buf = vec![0u8; buf_len];

    let began = Instant::now();
    let (start, mut session) = super::begin(dev, "save", DeviceState::StopCopy)?;

    let bytes = match copy_out(session.as_mut(), out, &mut buf, &mut opts, estimate) {
        Ok(bytes) => bytes,
        Err(fail) => {
            drop(session);
            let recovery = restore_to(dev, start);
            return Err(fail.into_error(dev.name(), recovery));
        }
    };
    drop(session);
    let duration = began.elapsed();
    set_state_or_recover(dev, opts.after.state(), DeviceState::Error)?;
    Ok(SaveReport {
        bytes,
        estimate,
        duration,
        final_state: opts.after.state(),
    })
}

/// Why the copy loop stopped early (recovery is decided by the caller).
enum CopyFail {
    Device(crate::device::DeviceError, u64),
    Output(io::Error, u64),
    Cancelled(u64),
    Stalled(u32, Duration, u64),
}

impl CopyFail {
    fn into_error(self, device: &str, recovery: super::Recovery) -> SessionError {
        match self {
            CopyFail::Device(error, bytes) => SessionError::Transfer { error, bytes, recovery },
            CopyFail::Output(source, bytes) => SessionError::Io {
                device: device.to_string(),
                what: "writing the saved state",
                bytes,
                error: source,
                recovery,
            },
            CopyFail::Cancelled(bytes) => SessionError::Cancelled {
                device: device.to_string(),
                op: "save",
                bytes,
                recovery,
            },
            CopyFail::Stalled(polls, waited, bytes) => SessionError::Stalled {
                device: device.to_string(),
                state: DeviceState::StopCopy,
                polls,
                waited,
                bytes,
                recovery,
            },
        }
    }
}

fn copy_out(
    session: &mut dyn TransferSession,
    out: &mut dyn Write,
    buf: &mut [u8],
    opts: &mut SaveOptions<'_>,
    estimate: Option<u64>,
) -> Result<u64, CopyFail> {
    let mut bytes = 0u64;
    let mut idle = 0u32;
    let mut idle_since = Instant::now();
    loop {
        if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(CopyFail::Cancelled(bytes));
        }
        match session.read(buf).map_err(|e| CopyFail::Device(e, bytes))? {
            ReadOutcome::Data(n) => {
                idle = 0;
                // A device claiming more than the buffer is a device bug; never index past it.
                let chunk = buf.get(..n).ok_or_else(|| {
                    CopyFail::Output(
                        io::Error::other(format!(
                            "device reported {n} bytes read into a {}-byte buffer",
                            buf.len()
                        )),
                        bytes,
                    )
                })?;
                out.write_all(chunk).map_err(|e| CopyFail::Output(e, bytes))?;
                bytes += n as u64;
                if let Some(p) = opts.progress.as_mut() {
                    p(bytes, estimate);
                }
            }
            ReadOutcome::NothingNow => {
                if idle == 0 {
                    idle_since = Instant::now();
                }
                idle += 1;
                let waited = idle_since.elapsed();
                if idle > opts.max_idle_polls || waited > opts.max_idle_time {
                    return Err(CopyFail::Stalled(idle, waited, bytes));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            ReadOutcome::End => break,
        }
    }
    out.flush().map_err(|e| CopyFail::Output(e, bytes))?;
    Ok(bytes)
}
