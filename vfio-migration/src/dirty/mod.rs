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
//!
//! Every failure is a [`DirtyError`] naming the tracker (or device) and the operation. A report
//! that fails is never turned into "no dirty pages".
pub mod bitmap;
pub mod device_log;
mod error;
#[cfg(test)]
mod fake;
pub mod range;
pub mod tracker;

pub use device_log::{DeviceLogConfig, DeviceLogTracker};
pub use error::{DirtyError, Rejection, TrackErrorKind, TrackOp};
pub use range::{DirtyRange, RangeTable};
pub use tracker::{AllDirty, DirtyTracker, Policy, PolicyTracker};
