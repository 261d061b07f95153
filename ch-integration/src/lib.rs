//! # ch-integration
//!
//! Cloud Hypervisor's migration traits (`Pausable`, `Snapshottable`, `Transportable`,
//! `Migratable` from its in-tree `vm-migration` crate) implemented on the `vfio-migration` engine,
//! so Cloud Hypervisor can replace its in-tree VFIO migration code and gain pre-copy, P2P
//! quiescing, parallel stop-copy reads, a choice of dirty tracking and a binary device-state path,
//! with the same user commands (`ch-remote send-migration` / `receive-migration`, snapshot /
//! restore).
//!
//! ## The model
//!
//! Cloud Hypervisor visits its devices one at a time, in its own order, for every migration
//! step. A [`MigratableVfioDevice`] is what one `VfioPciDevice` delegates to; all of a VM's VFIO
//! devices share one [`VfioMigrationGroup`], which takes the decisions that concern the group on
//! the first or last visit (see [`group`] for the table of calls). Devices enter through the
//! engine's [`vfio_migration::device::MigrationDevice`] trait: the kernel backend over a raw
//! device fd, never a vfio-ioctls type (Cloud Hypervisor pins an older vfio-ioctls).
//!
//! - [`group`]: the coordinator and its options;
//! - [`device`]: the per-device trait implementations;
//! - [`tracking`]: what each device offers for dirty page tracking, and the group's choice on
//!   the engine's [`vfio_migration::dirty`] (one report per container);
//! - [`spill`]: the bounded pre-copy buffer that spills to a file;
//! - [`encoding`]: the device state inside the snapshot tree, as the engine's checksummed
//!   stream ([`vfio_migration::stream`]);
//! - [`transport`]: `file://` send and receive;
//! - [`iterative`]: pre-copy device state during memory iterations (the `DeviceState` payload);
//! - [`protocol`]: Cloud Hypervisor migration protocol version 1, byte by byte;
//! - [`incoming`]: destination devices prepared at `Config`, before the device model exists;
//! - [`error`]: errors naming the device and the step, mapped onto `MigratableError`.
#![deny(missing_docs)]

pub mod device;
pub mod encoding;
pub mod error;
pub mod group;
pub mod incoming;
pub mod iterative;
pub mod protocol;
pub mod shared;
pub mod spill;
pub mod tracking;
pub mod transport;

pub use device::MigratableVfioDevice;
pub use error::{IntegrationError, Step};
pub use group::{
    DeviceConfig, DmaRangesProvider, GroupOptions, PreparedHandle, ResetHook, Transferred, VfioMigrationGroup,
};
pub use iterative::PrecopyItem;
pub use tracking::{ContainerTracker, Policy, SharedTranslator, Tracking, Viommu};
