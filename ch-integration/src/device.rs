//! The migratable VFIO device: Cloud Hypervisor's four traits, delegating to the group.

use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::anyhow;
use vfio_migration::device::{DeviceIdentity, MigrationDevice};
use vfio_migration::kernel::KernelDevice;
use vfio_migration::state::DeviceState;
use vm_migration::protocol::MemoryRangeTable;
use vm_migration::{Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable};

use crate::encoding::{self, DeviceStateRecord};
use crate::error::{IntegrationError, Step};
use crate::group::{DeviceConfig, VfioMigrationGroup};
use crate::transport;

/// One VFIO device as Cloud Hypervisor migrates it.
///
/// `VfioPciDevice` keeps one of these (when the device supports migration) and forwards its
/// `Pausable`, `Snapshottable`, `Transportable` and `Migratable` calls to it; every device of
/// the VM shares one [`VfioMigrationGroup`].
#[derive(Debug)]
pub struct MigratableVfioDevice {
    group: VfioMigrationGroup,
    index: usize,
    id: String,
}

impl MigratableVfioDevice {
    /// Add `device` to `group` under `config`.
    ///
    /// The device is any [`MigrationDevice`]: the kernel backend over the device fd Cloud
    /// Hypervisor opened ([`MigratableVfioDevice::from_device_fd`]: a raw `OwnedFd`, no
    /// vfio-ioctls type crosses this boundary), or the emulated device.
    pub fn new(
        group: &VfioMigrationGroup,
        device: Box<dyn MigrationDevice>,
        config: DeviceConfig,
    ) -> Result<Self, IntegrationError> {
        let id = config.id.clone();
        let index = group.register(device, config)?;
        Ok(Self {
            group: group.clone(),
            index,
            id,
        })
    }

    /// Add the VFIO device behind `device_fd` to `group`: the raw-fd boundary for Cloud
    /// Hypervisor, which pins an older vfio-ioctls. Pass a duplicate of the fd its `VfioDevice`
    /// holds (`BorrowedFd::try_clone_to_owned`); the group, container or iommufd that keeps the
    /// device's IOMMU context alive must outlive this object. `name` is used in messages
    /// (the sysfs path or BDF), `identity` guards restores (PCI vendor/device/subsystem IDs).
    pub fn from_device_fd(
        group: &VfioMigrationGroup,
        device_fd: OwnedFd,
        name: String,
        identity: DeviceIdentity,
        config: DeviceConfig,
    ) -> Result<Self, IntegrationError> {
        Self::new(
            group,
            Box::new(KernelDevice::from_fd(device_fd, name, identity)),
            config,
        )
    }

    /// The device's group.
    pub fn group(&self) -> &VfioMigrationGroup {
        &self.group
    }

    /// The device's current migration state.
    pub fn device_state(&self) -> Result<DeviceState, IntegrationError> {
        match self.group.device_state(self.index) {
            Some(r) => r.map_err(|e| IntegrationError::new(&self.id, Step::State, e)),
            None => Err(IntegrationError::bad_state(&self.id, Step::State, "not in its group")),
        }
    }

    /// Destination: load the device's part of a snapshot (the leaf [`Snapshottable::snapshot`]
    /// returned): RESUMING, load, RESUMING -> STOP. The device runs again on
    /// [`Pausable::resume`]. A state kept in a file beside the snapshot needs
    /// [`MigratableVfioDevice::restore_from`].
    pub fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        self.restore_from(snapshot, None)
    }

    /// Destination: [`MigratableVfioDevice::restore`], reading a state that the snapshot keeps
    /// in a file from `dir` (the snapshot directory).
    pub fn restore_from(&mut self, snapshot: &Snapshot, dir: Option<&Path>) -> Result<(), MigratableError> {
        self.group
            .with(self.index, Step::Restore, |g, i| g.restore(i, snapshot, dir))
            .map_err(IntegrationError::into_migratable)
    }
}

impl Drop for MigratableVfioDevice {
    /// The device leaves its group ([`VfioMigrationGroup::unregister`]).
    fn drop(&mut self) {
        self.group.unregister(self.index);
    }
}

impl Pausable for MigratableVfioDevice {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.group
            .with(self.index, Step::Pause, |g, i| g.pause(i))
            .map_err(IntegrationError::into_migratable)
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.group
            .with(self.index, Step::Resume, |g, i| g.resume(i))
            .map_err(IntegrationError::into_migratable)
    }
}

impl Snapshottable for MigratableVfioDevice {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let leaf = self
            .group
            .with(self.index, Step::Snapshot, |g, i| g.snapshot(i))
            .map_err(IntegrationError::into_migratable)?;
        Snapshot::new_from_state(&leaf)
    }
}

impl Transportable for MigratableVfioDevice {
    fn send(&self, snapshot: &Snapshot, destination_url: &str) -> Result<(), MigratableError> {
        let dir = transport::file_url_dir(destination_url).ok_or_else(|| {
            MigratableError::MigrateSend(anyhow!(
                "VFIO device {}: only file:// URLs are supported, not {destination_url}",
                self.id
            ))
        })?;
        let path = dir.join(encoding::state_file_name(&self.id));
        self.group
            .with(self.index, Step::Send, |g, i| {
                transport::write_state_file(&path, &mut |w: &mut dyn std::io::Write| g.send_record(i, snapshot, w))
            })
            .map_err(IntegrationError::into_migratable)?;
        Ok(())
    }

    fn recv(&self, source_url: &str) -> Result<Snapshot, MigratableError> {
        let dir = transport::file_url_dir(source_url).ok_or_else(|| {
            MigratableError::MigrateReceive(anyhow!(
                "VFIO device {}: only file:// URLs are supported, not {source_url}",
                self.id
            ))
        })?;
        let max = self
            .group
            .with(self.index, Step::Recv, |g, _| Ok(g.state_limit()))
            .map_err(IntegrationError::into_migratable)?;
        let path = dir.join(encoding::state_file_name(&self.id));
        let recv_err = |e: IntegrationError| MigratableError::MigrateReceive(anyhow!(e));
        let bytes = transport::read_state_file(&path, encoding::stream_cap(max))
            .map_err(|e| recv_err(IntegrationError::new(&self.id, Step::Recv, e)))?;
        // Every byte checked here; the identity is checked against the device at restore.
        let summary =
            encoding::check_stream(&bytes[..]).map_err(|e| recv_err(IntegrationError::new(&self.id, Step::Recv, e)))?;
        let leaf: DeviceStateRecord = encoding::inline_leaf(&self.id, &summary.identity.to_string(), &bytes);
        Snapshot::new_from_state(&leaf)
    }
}

impl Migratable for MigratableVfioDevice {
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        self.group
            .with(self.index, Step::StartDirtyLog, |g, i| g.start_dirty_log(i))
            .map_err(IntegrationError::into_migratable)
    }

    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        self.group
            .with(self.index, Step::StopDirtyLog, |g, i| g.stop_dirty_log(i))
            .map_err(IntegrationError::into_migratable)
    }

    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError> {
        self.group
            .with(self.index, Step::DirtyLog, |g, i| g.dirty_log(i))
            .map_err(IntegrationError::into_migratable)
    }

    fn start_migration(&mut self) -> Result<(), MigratableError> {
        self.group
            .with(self.index, Step::StartMigration, |g, i| g.start_migration(i))
            .map_err(IntegrationError::into_migratable)
    }

    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        self.group
            .with(self.index, Step::CompleteMigration, |g, i| g.complete_migration(i))
            .map_err(IntegrationError::into_migratable)
    }
}
