//! Dirty page tracking: which guest memory did devices write during migration.
//!
//! A page that a device wrote during migration and that is not sent again is silent guest memory
//! corruption. This module finds those pages and reports them as sorted, coalesced tables of
//! [`DirtyRange`]s (the shape of Cloud Hypervisor's `MemoryRange`).
//!
//! - [`range`]: [`DirtyRange`] and [`RangeTable`] (sorted, coalesced; linear k-way merge).
//! - [`bitmap`]: dirty bitmaps to runs of set bits, a word at a time.
//! - [`tracker`]: the [`DirtyTracker`] interface, [`AllDirty`], and the failure [`Policy`].
//! - [`device_log`]: device DMA logging ([`DeviceLogTracker`]).
//! - [`type1`]: the type1 container ([`Type1Tracker`] over the [`Type1Ops`] seam, [`KernelType1`]).
//! - [`iommufd`]: an iommufd HWPT ([`HwptTracker`] over the [`HwptOps`] seam, [`KernelHwpt`]).
//! - [`select`](mod@select): choosing the tracker at migration start, as QEMU does.
//! - [`viommu`]: IOVA reports translated to guest-physical ranges, re-arming on mapping changes.
//!
//! Every failure is a [`DirtyError`] naming the tracker (or device) and the operation. A report
//! that fails is never turned into "no dirty pages".
//!
//! The DMA demo (simulated guest memory written by the emulated device) lives above this layer,
//! in [`crate::testing::dma_demo`]: `dirty` never imports the emulated device.
pub mod bitmap;
pub mod device_log;
mod error;
#[cfg(test)]
mod fake;
pub mod iommufd;
pub mod range;
pub mod select;
pub mod tracker;
pub mod type1;
pub mod viommu;

pub use device_log::{DeviceLog, DeviceLogConfig, DeviceLogTracker};
pub use error::{DirtyError, Rejection, TrackErrorKind, TrackOp};
pub use iommufd::{HwptConfig, HwptOps, HwptTracker, KernelHwpt};
pub use range::{DirtyRange, RangeTable};
pub use select::{Candidates, Method, SelectOptions, Selected, select};
pub use tracker::{AllDirty, DirtyTracker, Policy, PolicyTracker};
pub use type1::{KernelType1, Type1Config, Type1MigrationCap, Type1Ops, Type1Tracker};
pub use viommu::{IovaTranslator, ViommuTracker};

#[cfg(test)]
mod layering {
    /// The layers point one way: no file of `dirty` uses the emulated device (the DMA demo that
    /// combines them lives in `crate::testing`).
    #[test]
    fn dirty_does_not_import_emulated() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/dirty");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    !text.contains(concat!("crate::", "emulated")),
                    "{} imports the emulated device",
                    path.display()
                );
                checked += 1;
            }
        }
        assert!(checked >= 10, "only {checked} files checked");
    }
}
