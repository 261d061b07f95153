//! Device migration states, migration flags and the kernel's path finding.
//!
//! This module has no I/O. It models the VFIO migration uAPI v2 state machine exactly as
//! VFIO core does: a device supports a set of [`MigrationFlags`]; each [`DeviceState`] needs some
//! of them; and a request for a target state is carried out as a series of single arcs chosen by
//! the kernel's next-hop table ([`NEXT_HOP`]), skipping states the device does not support.
//!
//! The table is data, not code: [`next_step`] is a lookup plus the kernel's "skip unsupported
//! states" loop, and [`path`] repeats it until the target is reached.
//!
//! ```
//! use vfio_migration::state::{path, DeviceState::*, MigrationFlags};
//!
//! let flags = MigrationFlags::STOP_COPY | MigrationFlags::P2P;
//! assert_eq!(path(Running, StopCopy, flags).unwrap(), vec![Running, RunningP2p, Stop, StopCopy]);
//! let flags = MigrationFlags::STOP_COPY;
//! assert_eq!(path(Running, StopCopy, flags).unwrap(), vec![Running, Stop, StopCopy]);
//! ```

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign};
use std::str::FromStr;

/// A device migration state of the VFIO migration uAPI v2 (`enum vfio_device_mig_state`).
///
/// The discriminants are the uAPI numbers.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceState {
    /// `VFIO_DEVICE_STATE_ERROR` (0): the device failed a transition; only a reset leaves it.
    Error = 0,
    /// `VFIO_DEVICE_STATE_STOP` (1): not running, not issuing DMA, not saving or loading.
    Stop = 1,
    /// `VFIO_DEVICE_STATE_RUNNING` (2): normal operation.
    Running = 2,
    /// `VFIO_DEVICE_STATE_STOP_COPY` (3): stopped, the complete device state can be read.
    StopCopy = 3,
    /// `VFIO_DEVICE_STATE_RESUMING` (4): stopped, a device state is being written.
    Resuming = 4,
    /// `VFIO_DEVICE_STATE_RUNNING_P2P` (5): running but quiesced for peer-to-peer DMA.
    RunningP2p = 5,
    /// `VFIO_DEVICE_STATE_PRE_COPY` (6): running while initial state is read.
    PreCopy = 6,
    /// `VFIO_DEVICE_STATE_PRE_COPY_P2P` (7): pre-copy while quiesced for peer-to-peer DMA.
    PreCopyP2p = 7,
}

/// Every device state, in uAPI number order.
pub const ALL_STATES: [DeviceState; 8] = [
    DeviceState::Error,
    DeviceState::Stop,
    DeviceState::Running,
    DeviceState::StopCopy,
    DeviceState::Resuming,
    DeviceState::RunningP2p,
    DeviceState::PreCopy,
    DeviceState::PreCopyP2p,
];

/// Errors of the state model: bad numbers, bad names and impossible transitions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A state number outside 0..=7 (for example from a device or a file).
    #[error("unknown device state number {0} (the uAPI defines 0..=7)")]
    UnknownState(u32),
    /// A state name that is not one of the uAPI names.
    #[error("unknown device state name {0:?} (expected one of {names})", names = state_names())]
    UnknownName(String),
    /// A migration flag name that is not known.
    #[error("unknown migration flag {0:?} (expected stop-copy, p2p or pre-copy)")]
    UnknownFlag(String),
    /// The device's flags lack STOP_COPY, which every migratable device must support.
    #[error("migration flags {0} lack the mandatory STOP_COPY")]
    NoStopCopy(MigrationFlags),
    /// The requested state needs flags the device does not have.
    #[error("state {state} needs migration flags {needs}, the device has {have}")]
    Unsupported {
        /// The requested state.
        state: DeviceState,
        /// The flags the state needs.
        needs: MigrationFlags,
        /// The flags the device has.
        have: MigrationFlags,
    },
    /// ERROR can never be requested.
    #[error("{0} can never be requested; only a device reset leaves it")]
    ErrorNotRequestable(DeviceState),
    /// The kernel has no path between the two states (for example STOP_COPY to PRE_COPY).
    #[error("no path from {from} to {to} (the kernel refuses it with EINVAL)")]
    NoPath {
        /// The current state.
        from: DeviceState,
        /// The requested state.
        to: DeviceState,
    },
}

fn state_names() -> String {
    ALL_STATES.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
}

impl DeviceState {
    /// The uAPI number of this state.
    pub const fn as_raw(self) -> u32 {
        self as u32
    }

    /// The state with uAPI number `raw`, or [`StateError::UnknownState`].
    pub fn from_raw(raw: u32) -> Result<Self, StateError> {
        ALL_STATES
            .get(raw as usize)
            .copied()
            .ok_or(StateError::UnknownState(raw))
    }

    /// The uAPI name without its prefix, e.g. `"RUNNING_P2P"`.
    pub const fn name(self) -> &'static str {
        match self {
            DeviceState::Error => "ERROR",
            DeviceState::Stop => "STOP",
            DeviceState::Running => "RUNNING",
            DeviceState::StopCopy => "STOP_COPY",
            DeviceState::Resuming => "RESUMING",
            DeviceState::RunningP2p => "RUNNING_P2P",
            DeviceState::PreCopy => "PRE_COPY",
            DeviceState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// The migration flags a device needs to support this state.
    ///
    /// ERROR needs none: a device can always fall into it.
    pub fn required_flags(self) -> MigrationFlags {
        use MigrationFlags as F;
        match self {
            DeviceState::Error => F::empty(),
            DeviceState::Stop | DeviceState::Running | DeviceState::StopCopy | DeviceState::Resuming => F::STOP_COPY,
            DeviceState::RunningP2p => F::STOP_COPY | F::P2P,
            DeviceState::PreCopy => F::STOP_COPY | F::PRE_COPY,
            DeviceState::PreCopyP2p => F::STOP_COPY | F::P2P | F::PRE_COPY,
        }
    }

    /// Whether a device with `flags` can be in this state.
    pub fn is_supported_by(self, flags: MigrationFlags) -> bool {
        flags.contains(self.required_flags())
    }

    /// Whether the device state can be read in this state (PRE_COPY, PRE_COPY_P2P, STOP_COPY).
    pub const fn is_saving(self) -> bool {
        matches!(
            self,
            DeviceState::PreCopy | DeviceState::PreCopyP2p | DeviceState::StopCopy
        )
    }

    /// Whether the device is running (RUNNING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P).
    pub const fn is_running(self) -> bool {
        matches!(
            self,
            DeviceState::Running | DeviceState::RunningP2p | DeviceState::PreCopy | DeviceState::PreCopyP2p
        )
    }

    /// Which transfer session, if any, a single arc `self -> to` opens.
    ///
    /// RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P and STOP -> STOP_COPY open a saving
    /// session; STOP -> RESUMING opens a resuming one. PRE_COPY -> PRE_COPY_P2P -> STOP_COPY keep
    /// the session already open.
    pub const fn arc_opens(self, to: DeviceState) -> Option<SessionKind> {
        match (self, to) {
            (DeviceState::Running, DeviceState::PreCopy)
            | (DeviceState::RunningP2p, DeviceState::PreCopyP2p)
            | (DeviceState::Stop, DeviceState::StopCopy) => Some(SessionKind::Saving),
            (DeviceState::Stop, DeviceState::Resuming) => Some(SessionKind::Resuming),
            _ => None,
        }
    }

    /// Whether the single arc `self -> to` ends the open transfer session.
    ///
    /// The ending arcs are STOP_COPY -> STOP, PRE_COPY -> RUNNING, PRE_COPY_P2P -> RUNNING_P2P
    /// and RESUMING -> STOP. (Falling into ERROR or a reset ends it too.)
    pub const fn arc_closes(self, to: DeviceState) -> bool {
        matches!(
            (self, to),
            (DeviceState::StopCopy, DeviceState::Stop)
                | (DeviceState::PreCopy, DeviceState::Running)
                | (DeviceState::PreCopyP2p, DeviceState::RunningP2p)
                | (DeviceState::Resuming, DeviceState::Stop)
        ) || matches!(to, DeviceState::Error)
    }

    /// The session kind that is open while the device is in this state, if any.
    pub const fn session_kind(self) -> Option<SessionKind> {
        match self {
            DeviceState::PreCopy | DeviceState::PreCopyP2p | DeviceState::StopCopy => Some(SessionKind::Saving),
            DeviceState::Resuming => Some(SessionKind::Resuming),
            _ => None,
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeviceState {
    type Err = StateError;

    /// Parses a uAPI name (`RUNNING_P2P`), case-insensitively, with `-` accepted for `_` and the
    /// `VFIO_DEVICE_STATE_` prefix optional.
    fn from_str(s: &str) -> Result<Self, StateError> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        let norm = norm.strip_prefix("VFIO_DEVICE_STATE_").unwrap_or(&norm);
        ALL_STATES
            .iter()
            .copied()
            .find(|st| st.name() == norm)
            .ok_or_else(|| StateError::UnknownName(s.to_string()))
    }
}

impl TryFrom<u32> for DeviceState {
    type Error = StateError;
    fn try_from(raw: u32) -> Result<Self, StateError> {
        Self::from_raw(raw)
    }
}

/// The kind of transfer session a device has open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionKind {
    /// The device state is read (PRE_COPY, PRE_COPY_P2P, STOP_COPY).
    Saving,
    /// A device state is written (RESUMING).
    Resuming,
}

/// The migration capabilities a device reports (`VFIO_DEVICE_FEATURE_MIGRATION`).
///
/// Unknown bits are kept, so a newer kernel's flags survive a round trip and are shown.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MigrationFlags(u64);

impl MigrationFlags {
    /// `VFIO_MIGRATION_STOP_COPY`: the mandatory base set of states.
    pub const STOP_COPY: Self = Self(1);
    /// `VFIO_MIGRATION_P2P`: RUNNING_P2P (and PRE_COPY_P2P with PRE_COPY).
    pub const P2P: Self = Self(2);
    /// `VFIO_MIGRATION_PRE_COPY`: PRE_COPY (and PRE_COPY_P2P with P2P).
    pub const PRE_COPY: Self = Self(4);
    /// Every flag this crate knows.
    pub const KNOWN: Self = Self(7);

    const NAMES: [(Self, &'static str); 3] = [
        (Self::STOP_COPY, "stop-copy"),
        (Self::P2P, "p2p"),
        (Self::PRE_COPY, "pre-copy"),
    ];

    /// No flags.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Flags from the raw uAPI bits, unknown bits kept.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw uAPI bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Bits this crate does not know.
    pub const fn unknown_bits(self) -> u64 {
        self.0 & !Self::KNOWN.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The states a device with these flags supports, ERROR excluded.
    pub fn supported_states(self) -> Vec<DeviceState> {
        ALL_STATES
            .iter()
            .copied()
            .filter(|s| *s != DeviceState::Error && s.is_supported_by(self))
            .collect()
    }

    /// The names of the known flags that are set, e.g. `["stop-copy", "p2p"]`.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(f, _)| self.contains(*f))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl BitOr for MigrationFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for MigrationFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for MigrationFlags {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl fmt::Display for MigrationFlags {
    /// `stop-copy+p2p+pre-copy`, unknown bits as `0x..`, `none` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.names().into_iter().map(String::from).collect();
        if self.unknown_bits() != 0 {
            parts.push(format!("{:#x}", self.unknown_bits()));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join("+"))
        }
    }
}

impl fmt::Debug for MigrationFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationFlags({:#x} = {})", self.0, self)
    }
}

impl FromStr for MigrationFlags {
    type Err = StateError;

    /// Parses `stop-copy,p2p,pre-copy` (`,` or `+` separated, `_` accepted for `-`, case-insensitive;
    /// a number such as `0x7` is taken as raw bits).
    fn from_str(s: &str) -> Result<Self, StateError> {
        let s = s.trim();
        if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            return u64::from_str_radix(hex, 16)
                .map(Self)
                .map_err(|_| StateError::UnknownFlag(s.to_string()));
        }
        if let Ok(n) = s.parse::<u64>() {
            return Ok(Self(n));
        }
        let mut flags = Self::empty();
        for part in s.split([',', '+']).map(str::trim).filter(|p| !p.is_empty()) {
            let norm = part.to_ascii_lowercase().replace('_', "-");
            let norm = match norm.as_str() {
                "stopcopy" => "stop-copy",
                "precopy" => "pre-copy",
                other => other,
            };
            let flag = Self::NAMES
                .iter()
                .find(|(_, n)| *n == norm)
                .map(|(f, _)| *f)
                .ok_or_else(|| StateError::UnknownFlag(part.to_string()))?;
            flags |= flag;
        }
        Ok(flags)
    }
}

/// The kernel's next-hop table: `NEXT_HOP[from][to]` is the state VFIO core steps to next when a
/// device in `from` is asked for `to`, before skipping unsupported states.
///
/// Indexed by uAPI numbers (see [`DeviceState::as_raw`]).
pub const NEXT_HOP: [[DeviceState; 8]; 8] = {
    use DeviceState::{
        Error as ERR, PreCopy as PC, PreCopyP2p as PCP, Resuming as RES, Running as RUN, RunningP2p as RP2P,
        Stop as STP, StopCopy as SC,
    };
    [
        // to:  ERR,  STP,  RUN,  SC,   RES,  RP2P, PC,   PCP
        /* ERR  */
        [ERR, ERR, ERR, ERR, ERR, ERR, ERR, ERR],
        /* STP  */ [ERR, STP, RP2P, SC, RES, RP2P, RP2P, RP2P],
        /* RUN  */ [ERR, RP2P, RUN, RP2P, RP2P, RP2P, PC, RP2P],
        /* SC   */ [ERR, STP, STP, SC, STP, STP, ERR, ERR],
        /* RES  */ [ERR, STP, STP, STP, RES, STP, STP, STP],
        /* RP2P */ [ERR, STP, RUN, STP, STP, RP2P, RUN, PCP],
        /* PC   */ [ERR, RUN, RUN, PCP, RUN, RUN, PC, PCP],
        /* PCP  */ [ERR, RP2P, RP2P, SC, RP2P, RP2P, PC, PCP],
    ]
};

/// The next single arc the kernel takes from `from` towards `to` for a device with `flags`.
///
/// Returns `Ok(from)` when `from == to`. Errors exactly where the kernel answers EINVAL: the
/// target is ERROR, the target needs flags the device lacks, or the table leads to ERROR.
pub fn next_step(from: DeviceState, to: DeviceState, flags: MigrationFlags) -> Result<DeviceState, StateError> {
    if !flags.contains(MigrationFlags::STOP_COPY) {
        return Err(StateError::NoStopCopy(flags));
    }
    if to == DeviceState::Error {
        return Err(StateError::ErrorNotRequestable(to));
    }
    if !to.is_supported_by(flags) {
        return Err(StateError::Unsupported {
            state: to,
            needs: to.required_flags(),
            have: flags,
        });
    }
    if from == DeviceState::Error {
        return Err(StateError::NoPath { from, to });
    }
    let mut next = NEXT_HOP[from as usize][to as usize];
    while next != DeviceState::Error && !next.is_supported_by(flags) {
        next = NEXT_HOP[next as usize][to as usize];
    }
    if next == DeviceState::Error {
        return Err(StateError::NoPath { from, to });
    }
    Ok(next)
}

/// The whole path the kernel takes from `from` to `to`, both ends included.
///
/// `path(s, s, _)` is `[s]` for any supported `s` other than ERROR.
pub fn path(from: DeviceState, to: DeviceState, flags: MigrationFlags) -> Result<Vec<DeviceState>, StateError> {
    let mut states = vec![from];
    let mut cur = from;
    // Validate even the trivial request, as the kernel does.
    next_step(from, to, flags)?;
    while cur != to {
        let next = next_step(cur, to, flags)?;
        // The table has no cycles; a path longer than the number of states is a bug in the
        // table, reported as no path rather than looping forever.
        if states.len() > ALL_STATES.len() {
            return Err(StateError::NoPath { from, to });
        }
        states.push(next);
        cur = next;
    }
    Ok(states)
}

/// Every flag combination that includes STOP_COPY (the only valid ones), among the known flags.
pub fn valid_flag_sets() -> impl Iterator<Item = MigrationFlags> {
    (0..8u64)
        .map(MigrationFlags::from_bits)
        .filter(|f| f.contains(MigrationFlags::STOP_COPY))
}

#[cfg(test)]
mod tests {
    use super::DeviceState::*;
    use super::*;
    use std::collections::{HashMap, VecDeque};

    /// The arcs VFIO core implements (its single-step function accepts exactly these),
    /// written independently of [`NEXT_HOP`].
    const ARCS: &[(DeviceState, DeviceState)] = &[
        (Running, Stop),
        (Running, RunningP2p),
        (Running, PreCopy),
        (RunningP2p, Running),
        (RunningP2p, Stop),
        (RunningP2p, PreCopyP2p),
        (Stop, Running),
        (Stop, RunningP2p),
        (Stop, StopCopy),
        (Stop, Resuming),
        (StopCopy, Stop),
        (Resuming, Stop),
        (PreCopy, Running),
        (PreCopy, PreCopyP2p),
        (PreCopy, StopCopy),
        (PreCopyP2p, PreCopy),
        (PreCopyP2p, RunningP2p),
        (PreCopyP2p, StopCopy),
    ];

    /// Independent formulation: breadth-first search over the implemented arcs between
    /// supported states, never passing *through* a saving or resuming state (it may end in one),
    /// and preferring, among equally short paths, the first arc in a fixed priority order.
    fn bfs(from: DeviceState, to: DeviceState, flags: MigrationFlags) -> Option<Vec<DeviceState>> {
        if to == Error || from == Error || !to.is_supported_by(flags) || !from.is_supported_by(flags) {
            return None;
        }
        // The uAPI forbids asking a device in STOP_COPY for a pre-copy state: the saving
        // session would have to end and a new one start, which the kernel will not do implicitly.
        if from == StopCopy && matches!(to, PreCopy | PreCopyP2p) {
            return None;
        }
        let mut prev: HashMap<DeviceState, DeviceState> = HashMap::new();
        let mut queue = VecDeque::from([from]);
        let mut seen = vec![from];
        while let Some(cur) = queue.pop_front() {
            if cur == to {
                let mut p = vec![to];
                let mut c = to;
                while c != from {
                    c = prev[&c];
                    p.push(c);
                }
                p.reverse();
                return Some(p);
            }
            // A saving or resuming state is never an intermediate state, except inside one
            // saving session (from one saving state to another: PRE_COPY -> PRE_COPY_P2P ->
            // STOP_COPY keeps the same data_fd).
            let within_session = from.is_saving() && to.is_saving() && cur.is_saving();
            if cur != from && (cur.is_saving() || cur == Resuming) && !within_session {
                continue;
            }
            for &(a, b) in ARCS {
                // With P2P, RUNNING_P2P / PRE_COPY_P2P sit between the running and stopped
                // states: the direct arcs that bypass them are not taken.
                let bypasses_p2p = matches!((a, b), (Running, Stop) | (Stop, Running) | (PreCopy, StopCopy));
                if bypasses_p2p && flags.contains(MigrationFlags::P2P) {
                    continue;
                }
                if a == cur && b.is_supported_by(flags) && !seen.contains(&b) {
                    seen.push(b);
                    prev.insert(b, cur);
                    queue.push_back(b);
                }
            }
        }
        None
    }

    fn flags(bits: u64) -> MigrationFlags {
        MigrationFlags::from_bits(bits)
    }

    #[test]
    fn raw_numbers_and_names_round_trip() {
        for (i, s) in ALL_STATES.iter().enumerate() {
            assert_eq!(s.as_raw(), i as u32);
            assert_eq!(DeviceState::from_raw(i as u32).unwrap(), *s);
            assert_eq!(s.name().parse::<DeviceState>().unwrap(), *s);
        }
        assert_eq!(DeviceState::from_raw(8), Err(StateError::UnknownState(8)));
        assert_eq!(DeviceState::from_raw(u32::MAX), Err(StateError::UnknownState(u32::MAX)));
        assert_eq!("running-p2p".parse::<DeviceState>().unwrap(), RunningP2p);
        assert_eq!("VFIO_DEVICE_STATE_STOP_COPY".parse::<DeviceState>().unwrap(), StopCopy);
        assert!(matches!(
            "RUNNIN".parse::<DeviceState>(),
            Err(StateError::UnknownName(_))
        ));
    }

    #[test]
    fn flags_parse_display_and_keep_unknown_bits() {
        let f: MigrationFlags = "stop-copy,p2p,pre-copy".parse().unwrap();
        assert_eq!(f.bits(), 7);
        assert_eq!(f.to_string(), "stop-copy+p2p+pre-copy");
        assert_eq!("0x5".parse::<MigrationFlags>().unwrap().bits(), 5);
        assert_eq!("STOP_COPY+precopy".parse::<MigrationFlags>().unwrap().bits(), 5);
        let odd = MigrationFlags::from_bits(0x13);
        assert_eq!(odd.unknown_bits(), 0x10);
        assert_eq!(odd.to_string(), "stop-copy+p2p+0x10");
        assert_eq!(MigrationFlags::empty().to_string(), "none");
        assert!(matches!(
            "p2q".parse::<MigrationFlags>(),
            Err(StateError::UnknownFlag(_))
        ));
        assert_eq!(flags(1).supported_states(), vec![Stop, Running, StopCopy, Resuming]);
        assert_eq!(flags(7).supported_states().len(), 7);
    }

    #[test]
    fn documented_paths() {
        let f = flags(1 | 2);
        assert_eq!(
            path(Running, StopCopy, f).unwrap(),
            vec![Running, RunningP2p, Stop, StopCopy]
        );
        assert_eq!(
            path(Running, StopCopy, flags(1)).unwrap(),
            vec![Running, Stop, StopCopy]
        );
        assert_eq!(
            path(PreCopy, StopCopy, flags(7)).unwrap(),
            vec![PreCopy, PreCopyP2p, StopCopy]
        );
        assert_eq!(path(PreCopy, StopCopy, flags(5)).unwrap(), vec![PreCopy, StopCopy]);
        assert_eq!(
            path(Resuming, Running, flags(3)).unwrap(),
            vec![Resuming, Stop, RunningP2p, Running]
        );
        assert_eq!(path(Running, Running, flags(1)).unwrap(), vec![Running]);
    }

    #[test]
    fn impossible_requests() {
        for f in valid_flag_sets() {
            for from in ALL_STATES {
                assert_eq!(
                    path(from, Error, f),
                    Err(StateError::ErrorNotRequestable(Error)),
                    "ERROR must never be requestable (from {from}, flags {f})"
                );
            }
        }
        assert_eq!(
            path(StopCopy, PreCopy, flags(7)),
            Err(StateError::NoPath {
                from: StopCopy,
                to: PreCopy
            })
        );
        assert_eq!(
            path(StopCopy, PreCopyP2p, flags(7)),
            Err(StateError::NoPath {
                from: StopCopy,
                to: PreCopyP2p
            })
        );
        assert!(matches!(
            path(Running, PreCopy, flags(3)),
            Err(StateError::Unsupported { .. })
        ));
        assert!(matches!(path(Running, Stop, flags(2)), Err(StateError::NoStopCopy(_))));
    }

    #[test]
    fn exhaustive_against_independent_search() {
        let mut checked = 0;
        for f in valid_flag_sets() {
            for from in ALL_STATES {
                for to in ALL_STATES {
                    checked += 1;
                    let got = path(from, to, f);
                    if !from.is_supported_by(f) && from != Error {
                        // A device cannot be in an unsupported state; the kernel never asks.
                        continue;
                    }
                    let want = bfs(from, to, f);
                    match (&got, &want) {
                        (Ok(g), Some(w)) => {
                            assert_eq!(g, w, "{from}->{to} with {f}");
                            // Every step is an implemented arc between supported states.
                            for pair in g.windows(2) {
                                assert!(ARCS.contains(&(pair[0], pair[1])), "{pair:?} is no arc");
                                assert!(pair[1].is_supported_by(f));
                            }
                            // Never passes through a saving or resuming state, except
                            // within one saving session.
                            for s in g.iter().skip(1).take(g.len().saturating_sub(2)) {
                                let ok = !s.is_saving() && *s != Resuming || from.is_saving() && to.is_saving();
                                assert!(ok, "{from}->{to}: through {s}");
                            }
                            // At most one arc opens a session, and only the last one.
                            for (i, pair) in g.windows(2).enumerate() {
                                if pair[0].arc_opens(pair[1]).is_some() {
                                    assert_eq!(i, g.len() - 2, "{g:?} opens a session midway");
                                }
                            }
                        }
                        (Err(_), None) => {}
                        _ => panic!("{from}->{to} with {f}: table gives {got:?}, search gives {want:?}"),
                    }
                }
            }
        }
        assert_eq!(checked, 4 * 64);
    }

    #[test]
    fn sessions_open_and_close_on_the_right_arcs() {
        assert_eq!(Running.arc_opens(PreCopy), Some(SessionKind::Saving));
        assert_eq!(Stop.arc_opens(StopCopy), Some(SessionKind::Saving));
        assert_eq!(Stop.arc_opens(Resuming), Some(SessionKind::Resuming));
        assert_eq!(PreCopyP2p.arc_opens(StopCopy), None);
        assert_eq!(PreCopy.arc_opens(PreCopyP2p), None);
        assert!(StopCopy.arc_closes(Stop));
        assert!(PreCopy.arc_closes(Running));
        assert!(PreCopyP2p.arc_closes(RunningP2p));
        assert!(Resuming.arc_closes(Stop));
        assert!(!PreCopyP2p.arc_closes(StopCopy));
    }
}
