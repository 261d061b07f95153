//! What the replay tests share: Cloud Hypervisor's source call order, visiting devices in a random
//! order, and its failure path.

#![allow(dead_code)]

use std::collections::BTreeMap;

use ch_integration::MigratableVfioDevice;
use vm_migration::{Migratable, MigratableError, Pausable, Snapshot, Snapshottable};

/// A tiny deterministic RNG for visiting orders (seeded by proptest).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn order(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
        v
    }
}

/// The source's steps, in Cloud Hypervisor's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrcStep {
    StartMigration,
    StartDirtyLog,
    DirtyLog,
    Pause,
    Snapshot,
    StopDirtyLog,
    CompleteMigration,
}

pub const SOURCE_ORDER: [SrcStep; 10] = [
    SrcStep::StartMigration,
    SrcStep::StartDirtyLog,
    SrcStep::DirtyLog, // iteration 1
    SrcStep::DirtyLog, // iteration 2
    SrcStep::Pause,
    SrcStep::DirtyLog, // final iteration
    SrcStep::Snapshot,
    SrcStep::DirtyLog, // after the snapshot
    SrcStep::StopDirtyLog,
    SrcStep::CompleteMigration,
];
/// Index in SOURCE_ORDER where the State message (the snapshot, serialized) goes out.
pub const STATE_SENT_AFTER: usize = 7;

/// One step over every device in a random order; stops at the first error as the device
/// manager's `?` does.
pub fn visit(
    devs: &mut [MigratableVfioDevice],
    step: SrcStep,
    rng: &mut Rng,
    snaps: &mut BTreeMap<String, Snapshot>,
) -> Result<(), MigratableError> {
    for i in rng.order(devs.len()) {
        let d = &mut devs[i];
        match step {
            SrcStep::StartMigration => d.start_migration()?,
            SrcStep::StartDirtyLog => d.start_dirty_log()?,
            SrcStep::DirtyLog => {
                d.dirty_log()?;
            }
            SrcStep::Pause => d.pause()?,
            SrcStep::Snapshot => {
                let s = d.snapshot()?;
                snaps.insert(d.id(), s);
            }
            SrcStep::StopDirtyLog => d.stop_dirty_log()?,
            SrcStep::CompleteMigration => d.complete_migration()?,
        }
    }
    Ok(())
}

/// Cloud Hypervisor's failure path: resume if the VM was paused, then stop_dirty_log; errors are
/// logged there, and each loop stops at its first error.
pub fn failure_path(devs: &mut [MigratableVfioDevice], paused: bool, rng: &mut Rng) {
    if paused {
        for i in rng.order(devs.len()) {
            if devs[i].resume().is_err() {
                break;
            }
        }
    }
    for i in rng.order(devs.len()) {
        if devs[i].stop_dirty_log().is_err() {
            break;
        }
    }
}
