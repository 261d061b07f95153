//! Fault injection for the emulated device.
//!
//! A [`Faults`] value is given at construction ([`super::EmulatedDevice::with_faults`]) and can be
//! replaced at any time ([`super::EmulatedHandle::set_faults`]), also while a session is open.
//! Every field defaults to "no fault".

use crate::state::DeviceState;

/// Fail one arc of a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArcFault {
    /// The state the arc starts from.
    pub from: DeviceState,
    /// The state the arc goes to.
    pub to: DeviceState,
    /// The errno `set_state` returns.
    pub errno: i32,
    /// Fall into ERROR (ending any session) instead of staying in `from`.
    pub to_error: bool,
    /// Fire only once, then clear itself.
    pub once: bool,
}

/// Bursts of "nothing now" reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Burst {
    /// How many reads of each period answer "nothing now" (at most `every - 1` take effect, so
    /// data always flows).
    pub count: u32,
    /// The period, in reads.
    pub every: u32,
}

impl Burst {
    /// Whether read number `n` (0-based, per session) falls in a burst.
    pub(crate) fn hits(&self, n: u64) -> bool {
        let every = u64::from(self.every.max(1));
        let count = u64::from(self.count).min(every - 1);
        n % every < count
    }
}

/// A refused write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteFault {
    /// The stream offset of the first refused byte: bytes before it are taken (the write that
    /// crosses it is short), a write starting there fails.
    pub at: u64,
    /// The errno the write fails with.
    pub errno: i32,
}

/// The faults the emulated device injects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fail this arc of any transition that takes it.
    pub fail_arc: Option<ArcFault>,
    /// Cap every read at this many bytes (0 is taken as 1).
    pub short_read: Option<usize>,
    /// "Nothing now" bursts. In PRE_COPY(_P2P) the burst reads answer [`crate::device::ReadOutcome::NothingNow`]
    /// even when data is pending; in STOP_COPY, where "nothing" would mean the end, they return
    /// one byte instead, so a burst never looks like the end.
    pub nothing_now: Option<Burst>,
    /// STOP_COPY reports the end after this many bytes were read in STOP_COPY (the state is then
    /// short and a destination must refuse it).
    pub early_end: Option<u64>,
    /// Refuse writes from a stream offset on.
    pub write_fail: Option<WriteFault>,
    /// `stop_copy_size` fails with this errno.
    pub stop_copy_size_errno: Option<i32>,
    /// The next `reset` fails with this errno (once; the device state is unchanged).
    pub reset_fails_once: Option<i32>,
}
