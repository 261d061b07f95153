//! The tracker interface, the all-dirty fallback and the failure policy.
//!
//! A [`DirtyTracker`] is started over the guest memory to track (a [`RangeTable`]), reports the
//! pages written since the last report (and clears them) as often as the migration asks, and is
//! stopped at the end. Backends: device DMA logging ([`super::DeviceLogTracker`]), the type1
//! container ([`super::Type1Tracker`]), an iommufd HWPT ([`super::HwptTracker`]) and
//! [`AllDirty`].
//!
//! A report that fails is an error, never an empty table: an empty table would mean "nothing
//! was written" and lose every page the device wrote. [`PolicyTracker`] decides what a failure
//! means ([`Policy`]): fail the migration, or from then on report everything dirty.

use log::warn;

use super::{DirtyError, RangeTable, TrackErrorKind, TrackOp};

/// A source of dirty pages.
pub trait DirtyTracker: Send {
    /// The tracker's name for messages.
    fn name(&self) -> &str;

    /// The granularity of the reports in bytes (0 before start).
    fn page_size(&self) -> u64;

    /// Whether the tracker is started.
    fn is_started(&self) -> bool;

    /// Start tracking writes to `memory` (guest-physical ranges, or IOVA ranges for a tracker
    /// under a vIOMMU translation).
    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError>;

    /// The ranges written since start or the last report, and clear them. A failure is an
    /// error, never an empty table.
    fn report(&mut self) -> Result<RangeTable, DirtyError>;

    /// [`report`](Self::report) into `out`: its ranges are replaced, its allocation is kept.
    /// Reporting every round into the same table converts the dirty bitmaps into memory that is
    /// already mapped, several times faster than into a fresh table for a large guest. On
    /// failure `out` is cleared and the error returned (an error, never an empty report).
    ///
    /// The default calls [`report`](Self::report) (a new table each round); the trackers of this
    /// crate convert straight into `out`.
    ///
    /// ```
    /// use vfio_migration::dirty::{AllDirty, DirtyRange, DirtyTracker, RangeTable};
    /// let memory = RangeTable::from_ranges([DirtyRange::new(0, 1 << 20)]);
    /// let mut t = AllDirty::new();
    /// t.start(&memory).unwrap();
    /// let mut dirty = RangeTable::with_capacity(16);
    /// for _round in 0..3 {
    ///     t.report_into(&mut dirty).unwrap();
    ///     assert_eq!(dirty, memory);
    /// }
    /// ```
    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        match self.report() {
            Ok(t) => {
                *out = t;
                Ok(())
            }
            Err(e) => {
                out.clear();
                Err(e)
            }
        }
    }

    /// Stop tracking.
    fn stop(&mut self) -> Result<(), DirtyError>;
}

impl<T: DirtyTracker + ?Sized> DirtyTracker for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn page_size(&self) -> u64 {
        (**self).page_size()
    }
    fn is_started(&self) -> bool {
        (**self).is_started()
    }
    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError> {
        (**self).start(memory)
    }
    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        (**self).report()
    }
    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        (**self).report_into(out)
    }
    fn stop(&mut self) -> Result<(), DirtyError> {
        (**self).stop()
    }
}

/// `tracker.report_into(out)`, checking that a table with room for the report keeps its
/// allocation (what the trackers of this crate promise), and the report.
#[cfg(test)]
pub(crate) fn report_reusing<T: DirtyTracker + ?Sized>(tracker: &mut T, out: &mut RangeTable) -> RangeTable {
    let (at, room) = (out.as_slice().as_ptr(), out.capacity());
    tracker.report_into(out).expect("report");
    if out.len() <= room {
        assert_eq!(
            out.as_slice().as_ptr(),
            at,
            "{}: a table with room for the report was reallocated",
            tracker.name()
        );
    }
    out.clone()
}

/// [`DirtyTracker::report`] by way of [`DirtyTracker::report_into`], for the trackers that
/// implement the latter.
pub(crate) fn report_by_into<T: DirtyTracker + ?Sized>(tracker: &mut T) -> Result<RangeTable, DirtyError> {
    let mut out = RangeTable::new();
    tracker.report_into(&mut out)?;
    Ok(out)
}

/// Reports every tracked range dirty on every round (QEMU's last resort): always correct,
/// costly, since all memory is copied again each round.
#[derive(Debug)]
pub struct AllDirty {
    name: String,
    page_size: u64,
    memory: Option<RangeTable>,
}

impl AllDirty {
    /// A tracker named `all-dirty` with 4 KiB pages.
    ///
    /// ```
    /// use vfio_migration::dirty::{AllDirty, DirtyRange, DirtyTracker, RangeTable};
    /// let memory = RangeTable::from_ranges([DirtyRange::new(0, 1 << 20)]);
    /// let mut t = AllDirty::new();
    /// t.start(&memory).unwrap();
    /// assert_eq!(t.report().unwrap(), memory);
    /// assert_eq!(t.report().unwrap(), memory);
    /// t.stop().unwrap();
    /// ```
    pub fn new() -> Self {
        Self::with_name("all-dirty", 4096)
    }

    /// A tracker with a given name and page size.
    pub fn with_name(name: impl Into<String>, page_size: u64) -> Self {
        Self {
            name: name.into(),
            page_size,
            memory: None,
        }
    }
}

impl Default for AllDirty {
    fn default() -> Self {
        Self::new()
    }
}

impl DirtyTracker for AllDirty {
    fn name(&self) -> &str {
        &self.name
    }

    fn page_size(&self) -> u64 {
        self.page_size
    }

    fn is_started(&self) -> bool {
        self.memory.is_some()
    }

    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError> {
        if self.memory.is_some() {
            return Err(DirtyError::new(
                &self.name,
                TrackOp::Start,
                TrackErrorKind::AlreadyStarted,
            ));
        }
        self.memory = Some(memory.clone());
        Ok(())
    }

    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        report_by_into(self)
    }

    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        match &self.memory {
            Some(memory) => {
                out.clone_from(memory);
                Ok(())
            }
            None => {
                out.clear();
                Err(DirtyError::new(&self.name, TrackOp::Report, TrackErrorKind::NotStarted))
            }
        }
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        match self.memory.take() {
            Some(_) => Ok(()),
            None => Err(DirtyError::new(&self.name, TrackOp::Stop, TrackErrorKind::NotStarted)),
        }
    }
}

/// What a tracker failure at run time means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// The error is returned: the migration fails cleanly.
    #[default]
    FailMigration,
    /// A warning is logged and that round and every later round report all tracked memory
    /// dirty (correct, but every round copies everything).
    DegradeToAllDirty,
}

/// A tracker with a [`Policy`] for its failures.
///
/// With [`Policy::DegradeToAllDirty`], a failed start or report switches the tracker to
/// all-dirty for good: the failed round and all later rounds return all tracked memory, and
/// stopping the broken backend is best effort (a failure is logged). With
/// [`Policy::FailMigration`] every error is returned as is.
#[derive(Debug)]
pub struct PolicyTracker<T> {
    inner: T,
    policy: Policy,
    memory: Option<RangeTable>,
    degraded: Option<String>,
}

impl<T: DirtyTracker> PolicyTracker<T> {
    /// `inner` under `policy`.
    pub fn new(inner: T, policy: Policy) -> Self {
        Self {
            inner,
            policy,
            memory: None,
            degraded: None,
        }
    }

    /// `inner`, already started over `memory`, under `policy`.
    pub fn started(inner: T, policy: Policy, memory: &RangeTable) -> Self {
        Self {
            inner,
            policy,
            memory: Some(memory.clone()),
            degraded: None,
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Why the tracker degraded to all-dirty, if it did.
    pub fn degraded(&self) -> Option<&str> {
        self.degraded.as_deref()
    }

    /// The wrapped tracker.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The wrapped tracker, mutably (for backend-specific calls such as unmap).
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// The wrapped tracker.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Apply the policy to a failure; `Ok(())` when degraded.
    fn on_failure(&mut self, err: DirtyError) -> Result<(), DirtyError> {
        match self.policy {
            Policy::FailMigration => Err(err),
            Policy::DegradeToAllDirty => {
                warn!("{err}; reporting all tracked memory dirty from now on");
                self.degraded = Some(err.to_string());
                Ok(())
            }
        }
    }
}

impl<T: DirtyTracker> DirtyTracker for PolicyTracker<T> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn page_size(&self) -> u64 {
        self.inner.page_size()
    }

    fn is_started(&self) -> bool {
        self.memory.is_some()
    }

    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError> {
        if self.memory.is_some() {
            return Err(DirtyError::new(
                self.name(),
                TrackOp::Start,
                TrackErrorKind::AlreadyStarted,
            ));
        }
        if let Err(e) = self.inner.start(memory) {
            self.on_failure(e)?;
        }
        self.memory = Some(memory.clone());
        Ok(())
    }

    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        report_by_into(self)
    }

    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        if self.memory.is_none() {
            out.clear();
            return Err(DirtyError::new(
                self.name(),
                TrackOp::Report,
                TrackErrorKind::NotStarted,
            ));
        }
        if self.degraded.is_none()
            && let Err(e) = self.inner.report_into(out)
            && let Err(e) = self.on_failure(e)
        {
            out.clear();
            return Err(e);
        }
        if self.degraded.is_some()
            && let Some(memory) = &self.memory
        {
            out.clone_from(memory);
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.memory.take().is_none() {
            return Err(DirtyError::new(self.name(), TrackOp::Stop, TrackErrorKind::NotStarted));
        }
        if !self.inner.is_started() {
            return Ok(());
        }
        match self.inner.stop() {
            Err(e) if self.degraded.is_some() => {
                warn!("{e} (after degrading to all-dirty; ignored)");
                Ok(())
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::DirtyRange;

    /// A tracker whose reports follow a script.
    struct Scripted {
        started: bool,
        script: Vec<Result<RangeTable, i32>>,
        fail_start: bool,
    }

    impl DirtyTracker for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn page_size(&self) -> u64 {
            4096
        }
        fn is_started(&self) -> bool {
            self.started
        }
        fn start(&mut self, _: &RangeTable) -> Result<(), DirtyError> {
            if self.fail_start {
                return Err(DirtyError::new(
                    "scripted",
                    TrackOp::Start,
                    std::io::Error::from_raw_os_error(95),
                ));
            }
            self.started = true;
            Ok(())
        }
        fn report(&mut self) -> Result<RangeTable, DirtyError> {
            match self.script.remove(0) {
                Ok(t) => Ok(t),
                Err(errno) => Err(DirtyError::new(
                    "scripted",
                    TrackOp::Report,
                    std::io::Error::from_raw_os_error(errno),
                )),
            }
        }
        fn stop(&mut self) -> Result<(), DirtyError> {
            self.started = false;
            Err(DirtyError::new(
                "scripted",
                TrackOp::Stop,
                std::io::Error::from_raw_os_error(5),
            ))
        }
    }

    fn memory() -> RangeTable {
        RangeTable::from_ranges([DirtyRange::new(0, 0x10000), DirtyRange::new(0x100000, 0x10000)])
    }

    fn scripted(script: Vec<Result<RangeTable, i32>>) -> Scripted {
        Scripted {
            started: false,
            script,
            fail_start: false,
        }
    }

    #[test]
    fn all_dirty_reports_everything_every_round() {
        let mut t = AllDirty::new();
        assert!(matches!(t.report().unwrap_err().kind, TrackErrorKind::NotStarted));
        t.start(&memory()).unwrap();
        assert!(matches!(
            t.start(&memory()).unwrap_err().kind,
            TrackErrorKind::AlreadyStarted
        ));
        for _ in 0..3 {
            assert_eq!(t.report().unwrap(), memory());
        }
        t.stop().unwrap();
        assert!(t.stop().is_err());
    }

    #[test]
    fn all_dirty_and_the_policy_report_into_the_same_table() {
        let mut out = RangeTable::with_capacity(64);
        let mut t = AllDirty::new();
        t.start(&memory()).unwrap();
        for _ in 0..3 {
            assert_eq!(report_reusing(&mut t, &mut out), memory());
        }
        // Degraded: all memory, into the same table; a failure under FailMigration clears it.
        let one = RangeTable::from_ranges([DirtyRange::new(0, 4096)]);
        let mut t = PolicyTracker::new(scripted(vec![Ok(one.clone()), Err(95)]), Policy::DegradeToAllDirty);
        t.start(&memory()).unwrap();
        t.report_into(&mut out).unwrap();
        assert_eq!(out, one);
        assert_eq!(report_reusing(&mut t, &mut out), memory());
        assert_eq!(report_reusing(&mut t, &mut out), memory());
        let mut t = PolicyTracker::new(scripted(vec![Err(95)]), Policy::FailMigration);
        t.start(&memory()).unwrap();
        assert_eq!(t.report_into(&mut out).unwrap_err().raw_os_error(), Some(95));
        assert!(out.is_empty(), "a failed report leaves no stale ranges behind");
    }

    /// What the trackers' reuse tests catch: a tracker with only `report` (the default
    /// `report_into`) hands over a new table every round.
    #[test]
    #[should_panic(expected = "a table with room for the report was reallocated")]
    fn the_default_report_into_reallocates() {
        let one = RangeTable::from_ranges([DirtyRange::new(0, 4096)]);
        let mut t = scripted(vec![Ok(one)]);
        t.start(&memory()).unwrap();
        report_reusing(&mut t, &mut RangeTable::with_capacity(64));
    }

    #[test]
    fn failed_report_fails_the_migration() {
        let one = RangeTable::from_ranges([DirtyRange::new(0, 4096)]);
        let mut t = PolicyTracker::new(scripted(vec![Ok(one.clone()), Err(95)]), Policy::FailMigration);
        t.start(&memory()).unwrap();
        assert_eq!(t.report().unwrap(), one);
        let e = t.report().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(95));
        assert!(e.to_string().starts_with("scripted: report dirty pages: "), "{e}");
        assert!(t.degraded().is_none());
        assert_eq!(t.stop().unwrap_err().raw_os_error(), Some(5));
    }

    #[test]
    fn failed_report_degrades_for_that_round_and_all_later() {
        let one = RangeTable::from_ranges([DirtyRange::new(0, 4096)]);
        let mut t = PolicyTracker::new(
            scripted(vec![Ok(one.clone()), Err(95), Ok(RangeTable::new())]),
            Policy::DegradeToAllDirty,
        );
        t.start(&memory()).unwrap();
        assert_eq!(t.report().unwrap(), one);
        assert_eq!(t.report().unwrap(), memory());
        assert!(t.degraded().unwrap().contains("report dirty pages"));
        // The backend would now answer "nothing", but it is no longer trusted.
        assert_eq!(t.report().unwrap(), memory());
        assert_eq!(t.report().unwrap(), memory());
        // Stopping the broken backend is best effort once degraded.
        t.stop().unwrap();
    }

    #[test]
    fn failed_start_degrades_or_fails() {
        let mut s = scripted(vec![]);
        s.fail_start = true;
        let mut t = PolicyTracker::new(s, Policy::FailMigration);
        assert_eq!(t.start(&memory()).unwrap_err().raw_os_error(), Some(95));
        assert!(!t.is_started());

        let mut s = scripted(vec![]);
        s.fail_start = true;
        let mut t = PolicyTracker::new(s, Policy::DegradeToAllDirty);
        t.start(&memory()).unwrap();
        assert_eq!(t.report().unwrap(), memory());
        t.stop().unwrap();
    }
}
