//! Choosing the dirty tracker at migration start, as QEMU does.
//!
//! 1. Device DMA logging when **every** device supports it (probed by starting it: one device
//!    that refuses stops the others and rules the method out);
//! 2. else IOMMU dirty tracking (type1 container or iommufd HWPT) when there is one;
//! 3. else all-dirty, only when the user allows it (every round then copies all memory);
//! 4. otherwise a refusal naming every device and method and why it was ruled out.
//!
//! The chosen tracker comes back started and wrapped in a [`PolicyTracker`] with the run-time
//! failure policy.

use log::{info, warn};

use super::{
    AllDirty, DirtyError, DirtyTracker, Policy, PolicyTracker, RangeTable, Rejection, TrackErrorKind, TrackOp,
};

/// A tracking method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Device DMA logging on every device.
    DeviceLog,
    /// IOMMU dirty tracking (type1 container or iommufd HWPT).
    Iommu,
    /// Every tracked page dirty every round.
    AllDirty,
}

/// What the VMM offers to choose from.
pub struct Candidates<'a> {
    /// Device DMA logging over every migrating device ([`super::DeviceLogTracker`]), or why
    /// there is none.
    pub device_log: Result<Box<dyn DirtyTracker + 'a>, String>,
    /// IOMMU dirty tracking ([`super::Type1Tracker`], [`super::HwptTracker`]), or why there is
    /// none.
    pub iommu: Result<Box<dyn DirtyTracker + 'a>, String>,
}

impl std::fmt::Debug for Candidates<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |c: &Result<Box<dyn DirtyTracker + '_>, String>| match c {
            Ok(t) => t.name().to_string(),
            Err(why) => format!("none ({why})"),
        };
        f.debug_struct("Candidates")
            .field("device_log", &show(&self.device_log))
            .field("iommu", &show(&self.iommu))
            .finish()
    }
}

/// The user's choices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelectOptions {
    /// Whether all-dirty may be used when nothing better works.
    pub allow_all_dirty: bool,
    /// What a run-time failure of the chosen tracker means.
    pub policy: Policy,
}

/// The chosen tracker, started.
pub struct Selected<'a> {
    /// The method chosen.
    pub method: Method,
    /// The tracker, started, under the failure policy.
    pub tracker: PolicyTracker<Box<dyn DirtyTracker + 'a>>,
    /// The better methods that were ruled out, and why.
    pub rejected: Vec<Rejection>,
}

impl std::fmt::Debug for Selected<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selected")
            .field("method", &self.method)
            .field("tracker", &self.tracker.name())
            .field("rejected", &self.rejected)
            .finish()
    }
}

/// Whom to blame for a failed start: the device when a device failed.
fn rejection(e: &DirtyError) -> Rejection {
    match &e.kind {
        TrackErrorKind::Device(d) => Rejection {
            who: d.device.clone(),
            why: format!("{}: {}", d.op, d.kind),
        },
        kind => Rejection {
            who: e.tracker.clone(),
            why: format!("{}: {kind}", e.op),
        },
    }
}

/// Choose and start a tracker over `memory` (see the module documentation).
pub fn select<'a>(
    candidates: Candidates<'a>,
    memory: &RangeTable,
    options: SelectOptions,
) -> Result<Selected<'a>, DirtyError> {
    let mut rejected = Vec::new();
    let tries = [
        (Method::DeviceLog, "device DMA logging", candidates.device_log),
        (Method::Iommu, "IOMMU dirty tracking", candidates.iommu),
    ];
    for (method, what, candidate) in tries {
        match candidate {
            Ok(mut tracker) => match tracker.start(memory) {
                Ok(()) => {
                    info!("dirty tracking: {what} ({})", tracker.name());
                    return Ok(Selected {
                        method,
                        tracker: PolicyTracker::started(tracker, options.policy, memory),
                        rejected,
                    });
                }
                Err(e) => {
                    info!("dirty tracking: {what} ruled out: {e}");
                    rejected.push(rejection(&e));
                }
            },
            Err(why) => rejected.push(Rejection { who: what.into(), why }),
        }
    }
    if !options.allow_all_dirty {
        rejected.push(Rejection {
            who: "all-dirty".into(),
            why: "not allowed (every round would copy all guest memory); allow it to migrate anyway".into(),
        });
        return Err(DirtyError::new(
            "dirty-tracking",
            TrackOp::Select,
            TrackErrorKind::Refused(rejected),
        ));
    }
    let reasons: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
    warn!(
        "dirty tracking: every page reported dirty every round ({})",
        reasons.join("; ")
    );
    let mut tracker: Box<dyn DirtyTracker + 'a> = Box::new(AllDirty::new());
    tracker.start(memory)?;
    Ok(Selected {
        method: Method::AllDirty,
        tracker: PolicyTracker::started(tracker, options.policy, memory),
        rejected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MigrationDevice;
    use crate::dirty::fake::FakeLogDevice;
    use crate::dirty::type1::fake::FakeType1;
    use crate::dirty::{DeviceLogConfig, DeviceLogTracker, DirtyRange, Type1Config, Type1Tracker};

    fn memory() -> RangeTable {
        RangeTable::from_ranges([DirtyRange::new(0, 0x10_0000)])
    }

    fn type1() -> Box<dyn DirtyTracker> {
        Box::new(Type1Tracker::new(
            FakeType1::new(&[(0, 0x10_0000)]),
            Type1Config::default(),
        ))
    }

    fn devlog<'a>(devs: Vec<&'a mut FakeLogDevice>) -> Box<dyn DirtyTracker + 'a> {
        Box::new(DeviceLogTracker::new(devs, DeviceLogConfig::default()))
    }

    #[test]
    fn device_logging_when_every_device_supports_it() {
        let (mut a, mut b) = (FakeLogDevice::new("dev-a"), FakeLogDevice::new("dev-b"));
        let s = select(
            Candidates {
                device_log: Ok(devlog(vec![&mut a, &mut b])),
                iommu: Ok(type1()),
            },
            &memory(),
            SelectOptions::default(),
        )
        .unwrap();
        assert_eq!(s.method, Method::DeviceLog);
        assert!(s.tracker.is_started());
        assert!(s.rejected.is_empty());
        drop(s);
        assert!(a.logging.is_some() && b.logging.is_some());
    }

    #[test]
    fn iommu_when_one_device_cannot_log() {
        let (mut a, mut b) = (FakeLogDevice::new("dev-a"), FakeLogDevice::new("dev-b"));
        b.fail_start = Some(libc::ENOTTY);
        let mut s = select(
            Candidates {
                device_log: Ok(devlog(vec![&mut a, &mut b])),
                iommu: Ok(type1()),
            },
            &memory(),
            SelectOptions::default(),
        )
        .unwrap();
        assert_eq!(s.method, Method::Iommu);
        assert_eq!(s.tracker.name(), "type1:fake-container");
        assert_eq!(s.rejected.len(), 1);
        assert_eq!(s.rejected[0].who, "dev-b");
        assert!(s.rejected[0].why.starts_with("start DMA logging"), "{:?}", s.rejected);
        assert!(s.tracker.report().unwrap().is_empty());
        drop(s);
        assert!(a.logging.is_none(), "dev-a must not keep logging");
    }

    #[test]
    fn all_dirty_only_when_allowed() {
        let mut a = FakeLogDevice::new("mtty-a");
        a.fail_start = Some(libc::EOPNOTSUPP);
        let e = select(
            Candidates {
                device_log: Ok(devlog(vec![&mut a])),
                iommu: Err("no container with dirty tracking".into()),
            },
            &memory(),
            SelectOptions::default(),
        )
        .unwrap_err();
        let TrackErrorKind::Refused(r) = &e.kind else {
            panic!("{e}")
        };
        assert_eq!(r.len(), 3);
        let msg = e.to_string();
        assert!(msg.contains("mtty-a: start DMA logging"), "{msg}");
        assert!(
            msg.contains("IOMMU dirty tracking: no container with dirty tracking"),
            "{msg}"
        );
        assert!(msg.contains("all-dirty: not allowed"), "{msg}");

        let mut s = select(
            Candidates {
                device_log: Ok(devlog(vec![&mut a])),
                iommu: Err("none".into()),
            },
            &memory(),
            SelectOptions {
                allow_all_dirty: true,
                policy: Policy::FailMigration,
            },
        )
        .unwrap();
        assert_eq!(s.method, Method::AllDirty);
        assert_eq!(s.rejected.len(), 2);
        assert_eq!(s.tracker.report().unwrap(), memory());
        s.tracker.stop().unwrap();
    }

    #[test]
    fn the_policy_applies_to_the_chosen_tracker() {
        // mtty on Debian's kernel: START works (so logging is chosen), REPORT fails.
        let mut a = FakeLogDevice::new("mtty-a");
        a.fail_report = Some(libc::EOPNOTSUPP);
        let devices: Vec<&mut dyn MigrationDevice> = vec![&mut a];
        let mut s = select(
            Candidates {
                device_log: Ok(Box::new(DeviceLogTracker::new(devices, DeviceLogConfig::default()))),
                iommu: Err("none".into()),
            },
            &memory(),
            SelectOptions {
                allow_all_dirty: false,
                policy: Policy::DegradeToAllDirty,
            },
        )
        .unwrap();
        assert_eq!(s.method, Method::DeviceLog);
        assert_eq!(s.tracker.report().unwrap(), memory());
        assert!(s.tracker.degraded().is_some());
    }
}
