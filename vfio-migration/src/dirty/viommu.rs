//! Dirty tracking behind a vIOMMU: IOVA reports translated to guest-physical ranges.
//!
//! With a vIOMMU, devices address memory by IOVA, so every backend reports IOVA ranges. The VMM
//! provides the translation ([`IovaTranslator`]); [`ViommuTracker`] runs any tracker over the
//! IOVA space the translator declares and translates each report to guest-physical ranges (one
//! IOVA range may land on several guest ranges; several IOVAs on one guest page count once).
//!
//! **Unmapped dirty IOVA is an error** ([`TrackErrorKind::Untranslated`], with the byte count).
//! Mapping changes go through [`ViommuTracker::begin_remap`] / [`ViommuTracker::finish_remap`],
//! which harvest the dirty state under the old translation, so a dirty IOVA without translation
//! means a change the tracker was not told about: its guest pages cannot be named, and reporting
//! nothing would lose them. Under [`super::Policy::DegradeToAllDirty`] the migration then goes
//! on with all memory dirty.
//!
//! ## Re-arming when the mapping changes
//! 1. The VMM makes the old mapping unusable by the device (host IOMMU unmap / invalidation);
//! 2. [`begin_remap`](ViommuTracker::begin_remap): the tracker reports the dirty state and
//!    translates it with the **old** translation (still in force); the pages are kept for the
//!    next report: nothing is lost;
//! 3. the VMM installs the new mapping (translator and host IOMMU);
//! 4. [`finish_remap`](ViommuTracker::finish_remap): when the IOVA space changed, the inner
//!    tracker is restarted over the new space. Writes in the short window between its stop and
//!    start cannot be seen, so every guest range the new space maps is reported dirty once.
//!    [`remap`](ViommuTracker::remap) does 2 to 4 around a closure that changes the translator.

use super::{DirtyError, DirtyRange, DirtyTracker, RangeTable, TrackErrorKind, TrackOp};

/// The VMM's vIOMMU translation, IOVA to guest-physical.
pub trait IovaTranslator: Send {
    /// Append to `out` the guest-physical ranges behind `iova`, and return how many bytes of
    /// `iova` have no translation.
    fn translate(&self, iova: DirtyRange, out: &mut Vec<DirtyRange>) -> u64;

    /// The IOVA ranges devices may use now (what the inner tracker tracks).
    fn iova_space(&self) -> RangeTable;
}

/// A tracker whose IOVA reports are translated to guest-physical ranges.
#[derive(Debug)]
pub struct ViommuTracker<T, X> {
    inner: T,
    translator: X,
    name: String,
    /// Guest memory (guest-physical) while started.
    memory: Option<RangeTable>,
    /// The IOVA space the inner tracker tracks.
    space: RangeTable,
    /// Guest-physical dirty ranges harvested before mapping changes.
    pending: RangeTable,
    /// The inner tracker's last (IOVA) report, kept between rounds.
    iova: RangeTable,
    /// Whether a remap was begun and not finished.
    remapping: bool,
}

impl<T: DirtyTracker, X: IovaTranslator> ViommuTracker<T, X> {
    /// `inner` (tracking IOVA) behind `translator` (not started).
    pub fn new(inner: T, translator: X) -> Self {
        let name = format!("viommu:{}", inner.name());
        Self {
            inner,
            translator,
            name,
            memory: None,
            space: RangeTable::new(),
            pending: RangeTable::new(),
            iova: RangeTable::new(),
            remapping: false,
        }
    }

    /// The translator.
    pub fn translator(&self) -> &X {
        &self.translator
    }

    /// The inner (IOVA) tracker.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The inner (IOVA) tracker, mutably.
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    fn error(&self, op: TrackOp, kind: impl Into<TrackErrorKind>) -> DirtyError {
        DirtyError::new(&self.name, op, kind)
    }

    /// Translate an IOVA table with the current translation.
    fn translate(&self, iova: &RangeTable) -> Result<RangeTable, DirtyError> {
        let mut out = Vec::new();
        let mut unmapped = 0u64;
        let mut first = None;
        for r in iova {
            let missing = self.translator.translate(*r, &mut out);
            if missing > 0 {
                unmapped = unmapped.saturating_add(missing);
                first.get_or_insert(*r);
            }
        }
        match first {
            Some(first) => Err(self.error(
                TrackOp::Translate,
                TrackErrorKind::Untranslated { first, bytes: unmapped },
            )),
            None => Ok(RangeTable::from_ranges(out)),
        }
    }

    /// Report the inner tracker and translate with the current translation (nothing while the
    /// IOVA space is empty and the inner tracker therefore not started).
    fn harvest(&mut self) -> Result<RangeTable, DirtyError> {
        if !self.inner.is_started() {
            return Ok(RangeTable::new());
        }
        self.inner.report_into(&mut self.iova)?;
        self.translate(&self.iova)
    }

    /// (Re)start the inner tracker over `space`, unless it is empty (nothing to track; a device
    /// refuses to log no range).
    fn arm(&mut self, space: RangeTable) -> Result<(), DirtyError> {
        if self.inner.is_started() {
            self.inner.stop()?;
        }
        if !space.is_empty() {
            self.inner.start(&space)?;
        }
        self.space = space;
        Ok(())
    }

    /// Step 2 of a mapping change: harvest the dirty state under the old translation (call it
    /// when the device can no longer use the old mapping and before the translator changes).
    pub fn begin_remap(&mut self) -> Result<(), DirtyError> {
        if self.memory.is_none() {
            return Err(self.error(TrackOp::Rearm, TrackErrorKind::NotStarted));
        }
        let got = self.harvest()?;
        self.pending.merge_in(&got);
        self.remapping = true;
        Ok(())
    }

    /// Step 4 of a mapping change: re-arm over the new IOVA space if it changed.
    pub fn finish_remap(&mut self) -> Result<(), DirtyError> {
        if !self.remapping {
            return Err(self.error(
                TrackOp::Rearm,
                TrackErrorKind::InvalidRequest("finish_remap without begin_remap".into()),
            ));
        }
        self.remapping = false;
        let space = self.translator.iova_space();
        if space == self.space {
            return Ok(());
        }
        self.arm(space)?;
        // Writes between stop and start were not seen: everything the new space maps is dirty.
        let all = self.translate(&self.space)?;
        self.pending.merge_in(&all);
        Ok(())
    }

    /// A whole mapping change: [`begin_remap`](Self::begin_remap), `change` applied to the
    /// translator, [`finish_remap`](Self::finish_remap).
    pub fn remap<R>(&mut self, change: impl FnOnce(&mut X) -> R) -> Result<R, DirtyError> {
        self.begin_remap()?;
        let r = change(&mut self.translator);
        self.finish_remap()?;
        Ok(r)
    }
}

impl<T: DirtyTracker, X: IovaTranslator> DirtyTracker for ViommuTracker<T, X> {
    fn name(&self) -> &str {
        &self.name
    }

    fn page_size(&self) -> u64 {
        self.inner.page_size()
    }

    fn is_started(&self) -> bool {
        self.memory.is_some()
    }

    /// Start over guest memory `memory`; the inner tracker starts over the translator's IOVA
    /// space (later, at a re-arm, when that space is empty now).
    fn start(&mut self, memory: &RangeTable) -> Result<(), DirtyError> {
        if self.memory.is_some() {
            return Err(self.error(TrackOp::Start, TrackErrorKind::AlreadyStarted));
        }
        self.arm(self.translator.iova_space())?;
        self.pending.clear();
        self.memory = Some(memory.clone());
        Ok(())
    }

    fn report(&mut self) -> Result<RangeTable, DirtyError> {
        super::tracker::report_by_into(self)
    }

    fn report_into(&mut self, out: &mut RangeTable) -> Result<(), DirtyError> {
        out.clear();
        if self.memory.is_none() {
            return Err(self.error(TrackOp::Report, TrackErrorKind::NotStarted));
        }
        let got = self.harvest()?;
        let pending = std::mem::take(&mut self.pending);
        if let Some(memory) = &self.memory {
            RangeTable::merge(&[&got, &pending]).intersect_into(memory, out);
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.memory.take().is_none() {
            return Err(self.error(TrackOp::Stop, TrackErrorKind::NotStarted));
        }
        if self.inner.is_started() {
            self.inner.stop()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::fake::FakeLogDevice;
    use crate::dirty::{DeviceLogConfig, DeviceLogTracker, Policy, PolicyTracker};
    use std::collections::BTreeMap;

    const P: u64 = 4096;

    /// A page-granular vIOMMU: IOVA page -> guest page.
    #[derive(Debug, Default)]
    struct FakeViommu {
        pages: BTreeMap<u64, u64>,
    }

    impl FakeViommu {
        fn map(&mut self, iova: u64, gpa: u64, len: u64) {
            for off in (0..len).step_by(P as usize) {
                self.pages.insert(iova + off, gpa + off);
            }
        }
        fn unmap(&mut self, iova: u64, len: u64) {
            for off in (0..len).step_by(P as usize) {
                self.pages.remove(&(iova + off));
            }
        }
    }

    impl IovaTranslator for FakeViommu {
        fn translate(&self, iova: DirtyRange, out: &mut Vec<DirtyRange>) -> u64 {
            let mut missing = 0;
            let mut at = iova.gpa & !(P - 1);
            while at < iova.end() {
                let part = DirtyRange::new(at, P).intersect(&iova).expect("inside");
                match self.pages.get(&at) {
                    Some(gpa) => out.push(DirtyRange::new(gpa + (part.gpa - at), part.length)),
                    None => missing += part.length,
                }
                at += P;
            }
            missing
        }
        fn iova_space(&self) -> RangeTable {
            RangeTable::from_ranges(self.pages.keys().map(|&a| DirtyRange::new(a, P)))
        }
    }

    fn guest() -> RangeTable {
        RangeTable::from_ranges([DirtyRange::new(0, 0x100_0000)])
    }

    type Tracker<'a> = ViommuTracker<DeviceLogTracker<&'a mut FakeLogDevice>, FakeViommu>;

    fn tracker(dev: &mut FakeLogDevice) -> Tracker<'_> {
        let mut x = FakeViommu::default();
        // IOVA 0x10000.. -> two separate guest ranges; a second IOVA aliases a guest page.
        x.map(0x1_0000, 0x50_0000, 2 * P);
        x.map(0x1_0000 + 2 * P, 0x20_0000, 2 * P);
        x.map(0x9_0000, 0x50_0000, P);
        ViommuTracker::new(DeviceLogTracker::new([dev], DeviceLogConfig::default()), x)
    }

    fn dev<'b>(t: &'b mut Tracker<'_>) -> &'b mut FakeLogDevice {
        // The only device of the inner tracker.
        t.inner_mut().device_mut(0).expect("one device")
    }

    #[test]
    fn one_iova_range_to_several_guest_ranges_and_aliases_counted_once() {
        let mut d = FakeLogDevice::new("dev-a");
        let mut t = tracker(&mut d);
        t.start(&guest()).unwrap();
        for iova in [0x1_0000, 0x1_0000 + P, 0x1_0000 + 2 * P, 0x9_0000] {
            dev(&mut t).dma_write(iova);
        }
        let got = t.report().unwrap();
        assert_eq!(
            got.as_slice(),
            &[DirtyRange::new(0x20_0000, P), DirtyRange::new(0x50_0000, 2 * P)]
        );
        assert!(t.report().unwrap().is_empty());
        t.stop().unwrap();
    }

    #[test]
    fn untranslated_dirty_iova_is_an_error_with_its_size() {
        let mut d = FakeLogDevice::new("dev-a");
        let mut t = tracker(&mut d);
        t.start(&guest()).unwrap();
        dev(&mut t).dma_write(0x1_0000);
        dev(&mut t).dma_write(0x1_0000 + 3 * P);
        // The VMM changes the translation behind the tracker's back.
        t.translator.unmap(0x1_0000, 4 * P);
        let e = t.report().unwrap_err();
        let TrackErrorKind::Untranslated { bytes, first } = e.kind else {
            panic!("{e}")
        };
        assert_eq!(bytes, 2 * P);
        assert_eq!(first, DirtyRange::new(0x1_0000, P));
        assert!(e.tracker.starts_with("viommu:device-log"));
    }

    #[test]
    fn untranslated_under_degrade_reports_all_guest_memory() {
        let mut d = FakeLogDevice::new("dev-a");
        let mut t = PolicyTracker::new(tracker(&mut d), Policy::DegradeToAllDirty);
        t.start(&guest()).unwrap();
        dev(t.inner_mut()).dma_write(0x1_0000);
        t.inner_mut().translator.unmap(0x1_0000, P);
        assert_eq!(t.report().unwrap(), guest());
    }

    #[test]
    fn remap_reports_the_old_mapping_first_nothing_lost() {
        let mut d = FakeLogDevice::new("dev-a");
        let mut t = tracker(&mut d);
        t.start(&guest()).unwrap();
        // The device writes IOVA 0x9000_0 while it maps guest 0x50_0000...
        dev(&mut t).dma_write(0x9_0000);
        // ...then the guest points the same IOVA at 0x70_0000 (same IOVA space: no restart).
        t.remap(|x| x.map(0x9_0000, 0x70_0000, P)).unwrap();
        dev(&mut t).dma_write(0x9_0000);
        let got = t.report().unwrap();
        assert_eq!(
            got.as_slice(),
            &[DirtyRange::new(0x50_0000, P), DirtyRange::new(0x70_0000, P)]
        );
        assert_eq!(t.inner().device_page_sizes().len(), 1);
        assert_eq!(d_starts(&mut t), 1, "same IOVA space: no restart");
    }

    #[test]
    fn an_empty_iova_space_arms_at_the_first_mapping() {
        let mut d = FakeLogDevice::new("dev-a");
        let mut t = ViommuTracker::new(
            DeviceLogTracker::new([&mut d], DeviceLogConfig::default()),
            FakeViommu::default(),
        );
        t.start(&guest()).unwrap();
        assert!(!t.inner().is_started());
        assert!(t.report().unwrap().is_empty());
        t.remap(|x| x.map(0x1000, 0x30_0000, P)).unwrap();
        assert!(t.inner().is_started());
        // The new mapping is reported once (re-arm window), then only real writes.
        assert_eq!(t.report().unwrap().as_slice(), &[DirtyRange::new(0x30_0000, P)]);
        assert!(t.report().unwrap().is_empty());
        dev(&mut t).dma_write(0x1008);
        assert_eq!(t.report().unwrap().as_slice(), &[DirtyRange::new(0x30_0000, P)]);
        t.stop().unwrap();
    }

    fn d_starts(t: &mut Tracker<'_>) -> usize {
        dev(t).starts
    }

    #[test]
    fn a_new_iova_space_re_arms_and_marks_it_dirty_once() {
        let mut d = FakeLogDevice::new("dev-a");
        let mut t = tracker(&mut d);
        t.start(&guest()).unwrap();
        dev(&mut t).dma_write(0x1_0000 + 3 * P);
        t.begin_remap().unwrap();
        t.translator.unmap(0x1_0000, 4 * P);
        t.translator.map(0x40_0000, 0x80_0000, 2 * P);
        t.finish_remap().unwrap();
        assert_eq!(d_starts(&mut t), 2);
        // The dirty page of the old mapping, and the whole new space once.
        let got = t.report().unwrap();
        assert_eq!(
            got.as_slice(),
            &[
                DirtyRange::new(0x20_0000 + P, P),
                DirtyRange::new(0x50_0000, P),
                DirtyRange::new(0x80_0000, 2 * P)
            ]
        );
        // Then only real writes, through the new mapping.
        dev(&mut t).dma_write(0x40_0000 + P);
        assert_eq!(t.report().unwrap().as_slice(), &[DirtyRange::new(0x80_0000 + P, P)]);
        assert!(t.finish_remap().is_err());
    }
}
