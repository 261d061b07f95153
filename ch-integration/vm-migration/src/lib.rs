//! # vm-migration (stand-in)
//!
//! The part of Cloud Hypervisor's in-tree `vm-migration` crate (version 0.1.0) that
//! `ch-integration` uses, reproduced signature for signature so that `ch-integration` builds
//! unchanged against either crate:
//!
//! - the four component traits [`Pausable`], [`Snapshottable`], [`Transportable`] and
//!   [`Migratable`], every method with a default body returning `Ok`;
//! - [`MigratableError`] with every variant;
//! - the snapshot tree: [`Snapshot`], [`SnapshotData`] (a `serde_json` text) and the helpers
//!   [`snapshot_from_id`] and [`state_from_id`];
//! - [`protocol::MemoryRange`] and [`protocol::MemoryRangeTable`].
//!
//! This workspace uses it through `[patch.crates-io]` in the root `Cargo.toml`; inside Cloud
//! Hypervisor's workspace its own crate is patched in instead (`ch-integration/check-against-ch.sh`
//! checks that). The derives are exactly Cloud Hypervisor's: [`Snapshot`] and [`SnapshotData`]
//! have no `Debug`, so code written against this crate cannot come to depend on one.
//!
//! Deliberate differences, none visible to `ch-integration`: the payloads of the two variants
//! that need Cloud Hypervisor's userfaultfd and TLS code ([`MigratableError::OnDemandRestore`],
//! [`MigratableError::Tls`]) are reduced to what needs no extra dependency ([`UffdError`],
//! [`tls::TlsError`]); the wire-protocol `Request`/`Response`/`Command` types, the migration
//! context types and the TLS streams are not reproduced; [`protocol::MemoryRangeTable::read_from`]
//! returns an error instead of panicking on a length that is not a whole number of ranges.
#![deny(missing_docs)]
// Cloud Hypervisor's Snapshot and SnapshotData derive no Debug; reproducing that is the point.
#![allow(missing_debug_implementations)]

use std::collections::BTreeMap;
use std::{io, result};

use anyhow::anyhow;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::protocol::MemoryRangeTable;

pub mod protocol;
pub mod tls;

/// Errors of on-demand (userfaultfd) restore.
///
/// Cloud Hypervisor's enum has the same variants; `GpaTranslation` carries a
/// `vm_memory::GuestMemoryError` there and a boxed error here (no `vm-memory` dependency).
#[derive(Error, Debug)]
pub enum UffdError {
    /// The snapshot's memory ranges are not page-aligned.
    #[error("Snapshot ranges are not page-aligned")]
    UnalignedRanges,
    /// `userfaultfd` could not be created.
    #[error("Failed to create userfaultfd")]
    Create(#[source] io::Error),
    /// A guest physical address has no host mapping.
    #[error("Cannot translate GPA {gpa:#x} to host address")]
    GpaTranslation {
        /// The guest physical address.
        gpa: u64,
        /// Why it could not be translated.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Registering a region with userfaultfd failed.
    #[error("Failed to register region at {addr:#x}+{len:#x}")]
    Register {
        /// Host address of the region.
        addr: u64,
        /// Length of the region.
        len: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks UFFDIO_COPY / UFFDIO_WAKE for a region.
    #[error("Region at {addr:#x}+{len:#x} missing COPY/WAKE support")]
    MissingIoctlSupport {
        /// Host address of the region.
        addr: u64,
        /// Length of the region.
        len: u64,
    },
    /// Configuring the fault socket failed.
    #[error("Failed to configure socket")]
    SetSocket(#[source] io::Error),
    /// The fault handler thread could not be spawned.
    #[error("Failed to spawn handler thread")]
    SpawnThread(#[source] io::Error),
    /// The handler stopped before it was ready.
    #[error("Handler terminated before startup completed")]
    HandlerStartup,
    /// The handler failed after it started.
    #[error("Handler failed after startup")]
    HandlerFailed(#[source] io::Error),
}

/// The error of every migration operation of a component.
#[derive(Error, Debug)]
pub enum MigratableError {
    /// Pausing failed.
    #[error("Failed to pause migratable component")]
    Pause(#[source] anyhow::Error),
    /// Resuming failed.
    #[error("Failed to resume migratable component")]
    Resume(#[source] anyhow::Error),
    /// Taking a snapshot failed.
    #[error("Failed to snapshot migratable component")]
    Snapshot(#[source] anyhow::Error),
    /// Restoring from a snapshot failed.
    #[error("Failed to restore migratable component")]
    Restore(#[source] anyhow::Error),
    /// Sending a snapshot failed.
    #[error("Failed to send migratable component snapshot")]
    MigrateSend(#[source] anyhow::Error),
    /// Receiving a snapshot failed.
    #[error("Failed to receive migratable component snapshot")]
    MigrateReceive(#[source] anyhow::Error),
    /// On-demand (postcopy) restore failed.
    #[error("On-demand restore failed")]
    OnDemandRestore(#[source] UffdError),
    /// The migration socket failed.
    #[error("Socket error")]
    MigrateSocket(#[source] io::Error),
    /// Starting dirty logging failed.
    #[error("Failed to start migration for migratable component")]
    StartDirtyLog(#[source] anyhow::Error),
    /// Stopping dirty logging failed.
    #[error("Failed to stop migration for migratable component")]
    StopDirtyLog(#[source] anyhow::Error),
    /// Reading the dirty log failed.
    #[error("Failed to retrieve dirty ranges for migratable component")]
    DirtyLog(#[source] anyhow::Error),
    /// Starting the migration failed (or was refused).
    #[error("Failed to start migration for migratable component")]
    StartMigration(#[source] anyhow::Error),
    /// Completing the migration failed.
    #[error("Failed to complete migration for migratable component")]
    CompleteMigration(#[source] anyhow::Error),
    /// Releasing a disk lock failed.
    #[error("Failed to release a disk lock")]
    UnlockError(#[source] anyhow::Error),
    /// The component is disconnected; the lifecycle operation was skipped.
    #[error("Lifecycle operation skipped for disconnected component {0}")]
    DeviceDisconnected(String),
    /// Setting up TLS for the migration connection failed.
    #[error("Error setting up a TLS-encrypted connection")]
    Tls(#[source] tls::TlsError),
}

/// A component that can be paused and resumed.
pub trait Pausable {
    /// Pause the component.
    fn pause(&mut self) -> result::Result<(), MigratableError> {
        Ok(())
    }

    /// Resume the component.
    fn resume(&mut self) -> result::Result<(), MigratableError> {
        Ok(())
    }
}

/// One section of a component's snapshot: its state as `serde_json` text.
#[derive(Clone, Default, Deserialize, Serialize)]
pub struct SnapshotData {
    state: String,
}

impl SnapshotData {
    /// Deserialize the state.
    pub fn to_state<'a, T>(&'a self) -> Result<T, MigratableError>
    where
        T: Deserialize<'a>,
    {
        serde_json::from_str(&self.state).map_err(|e| MigratableError::Restore(anyhow!("Error deserialising: {e}")))
    }

    /// Serialize `state` into a new section.
    pub fn new_from_state<T>(state: &T) -> Result<Self, MigratableError>
    where
        T: Serialize,
    {
        let state =
            serde_json::to_string(state).map_err(|e| MigratableError::Snapshot(anyhow!("Error serialising: {e}")))?;
        Ok(SnapshotData { state })
    }
}

/// A component's snapshot: a tree whose nodes hold their sub-components' snapshots by id and
/// whose leaves hold state.
#[derive(Clone, Default, Deserialize, Serialize)]
pub struct Snapshot {
    /// The sub-components' snapshots, by id.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// This component's own state, if any.
    pub snapshot_data: Option<SnapshotData>,
}

impl Snapshot {
    /// A leaf holding `data`.
    pub fn from_data(data: SnapshotData) -> Self {
        Snapshot {
            snapshot_data: Some(data),
            ..Default::default()
        }
    }

    /// A leaf holding `state` serialized.
    pub fn new_from_state<T>(state: &T) -> Result<Self, MigratableError>
    where
        T: Serialize,
    {
        Ok(Snapshot::from_data(SnapshotData::new_from_state(state)?))
    }

    /// Add (or replace) the snapshot of sub-component `id`.
    pub fn add_snapshot(&mut self, id: String, snapshot: Snapshot) {
        self.snapshots.insert(id, snapshot);
    }

    /// Deserialize this component's own state; an error when it has none.
    pub fn to_state<'a, T>(&'a self) -> Result<T, MigratableError>
    where
        T: Deserialize<'a>,
    {
        self.snapshot_data
            .as_ref()
            .ok_or_else(|| MigratableError::Restore(anyhow!("Missing snapshot data")))?
            .to_state()
    }
}

/// The snapshot of sub-component `id` of `snapshot`, if both exist.
pub fn snapshot_from_id<'a>(snapshot: Option<&'a Snapshot>, id: &str) -> Option<&'a Snapshot> {
    snapshot.and_then(|s| s.snapshots.get(id))
}

/// The deserialized state of sub-component `id` of `s`: `Ok(None)` when either is missing.
pub fn state_from_id<'a, T>(s: Option<&'a Snapshot>, id: &str) -> Result<Option<T>, MigratableError>
where
    T: Deserialize<'a>,
{
    match s {
        Some(s) => s.snapshots.get(id).map(|s| s.to_state()).transpose(),
        None => Ok(None),
    }
}

/// A component that can be snapshotted.
pub trait Snapshottable: Pausable {
    /// The component's id in its parent's snapshot.
    fn id(&self) -> String {
        String::new()
    }

    /// Take a snapshot of the component.
    fn snapshot(&mut self) -> result::Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// A component with its own way of sending and receiving its snapshot to and from a URL.
pub trait Transportable: Pausable + Snapshottable {
    /// Send `snapshot` to `destination_url` (a local file, TCP address, HTTP endpoint...).
    fn send(&self, _snapshot: &Snapshot, _destination_url: &str) -> result::Result<(), MigratableError> {
        Ok(())
    }

    /// Receive a snapshot from `source_url`.
    fn recv(&self, _source_url: &str) -> result::Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// A component that can be live-migrated: paused, snapshotted, transported, with dirty-page
/// logging while it runs.
pub trait Migratable: Send + Pausable + Snapshottable + Transportable {
    /// Start logging the guest memory the component writes.
    fn start_dirty_log(&mut self) -> result::Result<(), MigratableError> {
        Ok(())
    }

    /// Stop logging.
    fn stop_dirty_log(&mut self) -> result::Result<(), MigratableError> {
        Ok(())
    }

    /// The guest memory written since the last call.
    fn dirty_log(&mut self) -> result::Result<MemoryRangeTable, MigratableError> {
        Ok(MemoryRangeTable::default())
    }

    /// A migration is about to start.
    fn start_migration(&mut self) -> result::Result<(), MigratableError> {
        Ok(())
    }

    /// The migration completed.
    fn complete_migration(&mut self) -> result::Result<(), MigratableError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct S {
        a: u32,
        b: String,
    }

    #[test]
    fn snapshot_tree_round_trips_through_json() {
        let mut root = Snapshot::default();
        let leaf = Snapshot::new_from_state(&S { a: 7, b: "x".into() }).unwrap();
        root.add_snapshot("dev".into(), leaf);
        let text = serde_json::to_string(&root).unwrap();
        let back: Snapshot = serde_json::from_str(&text).unwrap();
        let s: Option<S> = state_from_id(Some(&back), "dev").unwrap();
        assert_eq!(s, Some(S { a: 7, b: "x".into() }));
        assert!(snapshot_from_id(Some(&back), "other").is_none());
        assert!(matches!(back.to_state::<S>(), Err(MigratableError::Restore(_))));
    }

    #[test]
    fn default_methods_succeed() {
        struct C;
        impl Pausable for C {}
        impl Snapshottable for C {}
        impl Transportable for C {}
        impl Migratable for C {}
        let mut c = C;
        c.pause().unwrap();
        c.resume().unwrap();
        assert_eq!(c.id(), "");
        assert!(c.snapshot().unwrap().snapshot_data.is_none());
        assert!(c.recv("file:///nowhere").unwrap().snapshots.is_empty());
        c.start_migration().unwrap();
        c.start_dirty_log().unwrap();
        assert!(c.dirty_log().unwrap().is_empty());
        c.stop_dirty_log().unwrap();
        c.complete_migration().unwrap();
    }
}
