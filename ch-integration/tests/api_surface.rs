//! The part of Cloud Hypervisor's vm-migration API reproduced by our stand-in, pinned down by
//! signature: every item is used with explicit types (function pointers, trait bounds, an
//! exhaustive match). `check-against-ch.sh` compiles and runs this against Cloud Hypervisor's
//! own crate too, so the stand-in cannot drift from it unnoticed.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use vm_migration::protocol::{MemoryRange, MemoryRangeTable};
use vm_migration::{
    Migratable, MigratableError, Pausable, Snapshot, SnapshotData, Snapshottable, Transportable, UffdError,
    snapshot_from_id, state_from_id, tls,
};

type R<T> = Result<T, MigratableError>;

/// A component with every default body.
struct C;
impl Pausable for C {}
impl Snapshottable for C {}
impl Transportable for C {}
impl Migratable for C {}

fn derives<T: Clone + Default + Serialize + for<'de> Deserialize<'de>>() {}
fn debug_eq_copy<T: Copy + std::fmt::Debug + PartialEq + Eq>() {}

#[test]
fn trait_methods_have_cloud_hypervisors_signatures() {
    let _: fn(&mut C) -> R<()> = <C as Pausable>::pause;
    let _: fn(&mut C) -> R<()> = <C as Pausable>::resume;
    let _: fn(&C) -> String = <C as Snapshottable>::id;
    let _: fn(&mut C) -> R<Snapshot> = <C as Snapshottable>::snapshot;
    let _: fn(&C, &Snapshot, &str) -> R<()> = <C as Transportable>::send;
    let _: fn(&C, &str) -> R<Snapshot> = <C as Transportable>::recv;
    let _: fn(&mut C) -> R<()> = <C as Migratable>::start_dirty_log;
    let _: fn(&mut C) -> R<()> = <C as Migratable>::stop_dirty_log;
    let _: fn(&mut C) -> R<MemoryRangeTable> = <C as Migratable>::dirty_log;
    let _: fn(&mut C) -> R<()> = <C as Migratable>::start_migration;
    let _: fn(&mut C) -> R<()> = <C as Migratable>::complete_migration;
    // Supertraits: Migratable is Send + Pausable + Snapshottable + Transportable.
    fn supers<T: Migratable>(t: &mut T) -> (&mut dyn Pausable, bool) {
        fn is_send<S: Send + ?Sized>(_: &S) -> bool {
            true
        }
        let s = is_send(t);
        (t as &mut dyn Pausable, s)
    }
    let mut c = C;
    let (p, send) = supers(&mut c);
    assert!(send);
    p.pause().unwrap();
}

#[test]
fn snapshot_types_have_cloud_hypervisors_signatures() {
    derives::<Snapshot>();
    derives::<SnapshotData>();
    let _: fn(SnapshotData) -> Snapshot = Snapshot::from_data;
    let _: fn(&u32) -> R<Snapshot> = Snapshot::new_from_state::<u32>;
    let _: fn(&mut Snapshot, String, Snapshot) = Snapshot::add_snapshot;
    // `to_state` and `state_from_id` bind their lifetime early (it is in a where clause).
    #[allow(clippy::extra_unused_lifetimes)] // 'a is used in the fn pointer types.
    fn early<'a>() {
        let _: fn(&'a Snapshot) -> R<u32> = Snapshot::to_state::<'a, u32>;
        let _: fn(&'a SnapshotData) -> R<u32> = SnapshotData::to_state::<'a, u32>;
        let _: fn(Option<&'a Snapshot>, &str) -> R<Option<u32>> = state_from_id::<u32>;
    }
    early();
    let _: fn(&u32) -> R<SnapshotData> = SnapshotData::new_from_state::<u32>;
    let _: for<'a> fn(Option<&'a Snapshot>, &str) -> Option<&'a Snapshot> = snapshot_from_id;
    let mut s = Snapshot::default();
    let _: &mut BTreeMap<String, Snapshot> = &mut s.snapshots;
    let _: &mut Option<SnapshotData> = &mut s.snapshot_data;
    s.add_snapshot("x".into(), Snapshot::new_from_state(&5u32).unwrap());
    assert_eq!(state_from_id::<u32>(Some(&s), "x").unwrap(), Some(5));
}

#[test]
fn memory_range_types_have_cloud_hypervisors_signatures() {
    debug_eq_copy::<MemoryRange>();
    derives::<MemoryRange>();
    derives::<MemoryRangeTable>();
    let _ = format!("{:?}", MemoryRangeTable::default());
    assert_eq!(std::mem::size_of::<MemoryRange>(), 16);
    let r = MemoryRange { gpa: 1, length: 2 };
    let _: fn(&mut dyn Read) -> R<MemoryRange> = MemoryRange::read_from;
    let _: fn(&MemoryRange, &mut dyn Write) -> R<()> = MemoryRange::write_to;
    let _: fn(&MemoryRangeTable) -> &[MemoryRange] = MemoryRangeTable::ranges;
    let _: fn(&MemoryRangeTable) -> &[MemoryRange] = MemoryRangeTable::regions;
    let _: fn(&mut MemoryRangeTable, MemoryRange) = MemoryRangeTable::push;
    let _: fn(&mut dyn Read, u64) -> R<MemoryRangeTable> = MemoryRangeTable::read_from;
    let _: fn(&MemoryRangeTable) -> u64 = MemoryRangeTable::length;
    let _: fn(&MemoryRangeTable, &mut dyn Write) -> R<()> = MemoryRangeTable::write_to;
    let _: fn(&MemoryRangeTable) -> bool = MemoryRangeTable::is_empty;
    let _: fn(&mut MemoryRangeTable, MemoryRangeTable) = MemoryRangeTable::extend;
    let _: fn(Vec<MemoryRangeTable>) -> MemoryRangeTable = MemoryRangeTable::new_from_tables;
    let _: fn(&MemoryRangeTable) -> u64 = MemoryRangeTable::effective_size;
    let t: MemoryRangeTable = MemoryRangeTable::from_dirty_bitmap(vec![0b110u64], 0x1000, 0x1000);
    let parts: Vec<MemoryRangeTable> = t.clone().partition(0x1000).collect();
    assert_eq!(parts.len(), 2);
    assert_eq!(
        t.regions(),
        &[MemoryRange {
            gpa: 0x2000,
            length: 0x2000
        }]
    );
    let mut u = MemoryRangeTable::default();
    u.push(r);
    assert_eq!(u.effective_size(), 2);
}

#[test]
fn migratable_error_has_exactly_cloud_hypervisors_variants() {
    let a = || anyhow::anyhow!("x");
    let all = vec![
        MigratableError::Pause(a()),
        MigratableError::Resume(a()),
        MigratableError::Snapshot(a()),
        MigratableError::Restore(a()),
        MigratableError::MigrateSend(a()),
        MigratableError::MigrateReceive(a()),
        MigratableError::OnDemandRestore(UffdError::UnalignedRanges),
        MigratableError::MigrateSocket(std::io::Error::other("x")),
        MigratableError::StartDirtyLog(a()),
        MigratableError::StopDirtyLog(a()),
        MigratableError::DirtyLog(a()),
        MigratableError::StartMigration(a()),
        MigratableError::CompleteMigration(a()),
        MigratableError::UnlockError(a()),
        MigratableError::DeviceDisconnected("d".into()),
        MigratableError::Tls(tls::TlsError::HandshakeError),
    ];
    // Exhaustive: adding or removing a variant on either side breaks this match.
    let n = all
        .iter()
        .map(|e| match e {
            MigratableError::Pause(_)
            | MigratableError::Resume(_)
            | MigratableError::Snapshot(_)
            | MigratableError::Restore(_)
            | MigratableError::MigrateSend(_)
            | MigratableError::MigrateReceive(_)
            | MigratableError::OnDemandRestore(_)
            | MigratableError::MigrateSocket(_)
            | MigratableError::StartDirtyLog(_)
            | MigratableError::StopDirtyLog(_)
            | MigratableError::DirtyLog(_)
            | MigratableError::StartMigration(_)
            | MigratableError::CompleteMigration(_)
            | MigratableError::UnlockError(_)
            | MigratableError::DeviceDisconnected(_)
            | MigratableError::Tls(_) => 1,
        })
        .sum::<usize>();
    assert_eq!(n, 16);
    for e in &all {
        let _: &dyn std::error::Error = e;
        assert!(!e.to_string().is_empty());
    }
    assert_eq!(
        MigratableError::Pause(a()).to_string(),
        "Failed to pause migratable component"
    );
}
