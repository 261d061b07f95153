//! Dirty page tracking: which guest memory did devices write during migration.
//!
//! A page that a device wrote during migration and that is not sent again is silent guest memory
//! corruption. This module finds those pages and reports them as sorted, coalesced tables of
//! [`DirtyRange`]s (the shape of Cloud Hypervisor's `MemoryRange`).
//!
//! - [`range`]: [`DirtyRange`] and [`RangeTable`] (sorted, coalesced; linear k-way merge).
//! - [`bitmap`]: dirty bitmaps to runs of set bits, a word at a time.
pub mod bitmap;
pub mod range;

pub use range::{DirtyRange, RangeTable};
