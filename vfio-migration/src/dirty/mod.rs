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
//! - [`guest`]: simulated guest memory, emulated DMA into it, and an iterative copy checked byte
//!   for byte ([`guest::run_dma_demo`]).
//! - [`viommu`]: IOVA reports translated to guest-physical ranges, re-arming on mapping changes.
//!
//! Every failure is a [`DirtyError`] naming the tracker (or device) and the operation. A report
//! that fails is never turned into "no dirty pages".
pub mod bitmap;
pub mod device_log;
mod error;
#[cfg(test)]
mod fake;
pub mod guest;
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
