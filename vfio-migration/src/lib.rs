//! # vfio-migration
//!
//! Live migration of VFIO passthrough devices for Rust VMMs, built on the Linux VFIO migration
//! uAPI v2.
//!
//! ## The model
//!
//! A migratable device moves through eight states ([`state::DeviceState`]). The kernel finds the
//! path between any two states from a next-hop table ([`state::NEXT_HOP`], [`state::path`]) and the
//! device's migration flags ([`state::MigrationFlags`]). Some arcs open a *transfer session*: a file
//! descriptor from which the device state is read (PRE_COPY, STOP_COPY) or into which it is
//! written (RESUMING). Everything that touches a device goes through one trait,
//! [`device::MigrationDevice`], with three backends: the real kernel ([`kernel`]), a built-in
//! emulated device ([`emulated`]) that follows the same rules and runs anywhere, and devices served
//! over a vfio-user socket ([`vfio_user`], which also serves a device to vfio-user clients).
//!
//! ## Layers (imports point downwards only)
//! 1. [`state`]: states, flags, the next-hop table, path finding. No I/O.
//! 2. [`device`]: the backend trait and transfer sessions; [`kernel`], [`emulated`] and [`vfio_user`]
//!    backends.
//! 3. [`dirty`]: dirty-page trackers, bitmap-to-ranges, range tables, vIOMMU translation.
//! 4. [`stream`]: the versioned, checksummed device-state stream format.
//! 5. [`session`]: save, load and recovery (also through the stream); [`live`]: live migration of
//!    groups of devices (pre-copy, P2P quiescing, parallel stop-copy, convergence).
//! 6. [`transport`]: live migration between two processes over TCP or unix sockets, optionally
//!    with mutual TLS (`vfio-mig send` / `receive`).
//!
//! [`testing`] sits beside the top: demonstrations that combine layers (the DMA demo writes guest
//! memory with the emulated device and copies it with a dirty tracker).
#![deny(missing_docs)]

pub mod device;
pub mod dirty;
pub mod emulated;
pub mod kernel;
pub mod live;
pub mod session;
pub mod state;
pub mod stream;
pub mod testing;
pub mod transport;
pub mod unix_socket;
pub mod vfio_user;

pub use device::{DeviceError, MigrationDevice, TransferSession};
pub use state::{DeviceState, MigrationFlags};
