//! A device shared between its Cloud Hypervisor-facing wrapper and the migration engine.
//!
//! The engine's [`vfio_migration::live::Source`] and [`vfio_migration::live::Destination`] own
//! their devices; the group also needs the device while they do (dirty tracking, per-device pause
//! and resume). [`SharedDevice`] is a cloneable handle that implements
//! [`MigrationDevice`] by locking the one device.

use std::sync::{Arc, Mutex, MutexGuard};

use vfio_migration::DeviceError;
use vfio_migration::device::{DeviceIdentity, DmaRange, MigrationDevice, TransferSession};
use vfio_migration::state::{DeviceState, MigrationFlags};

/// A cloneable handle to one device.
#[derive(Clone)]
pub struct SharedDevice {
    name: String,
    dev: Arc<Mutex<Box<dyn MigrationDevice>>>,
}

impl std::fmt::Debug for SharedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDevice").field("name", &self.name).finish()
    }
}

impl SharedDevice {
    /// Share `dev`.
    pub fn new(dev: Box<dyn MigrationDevice>) -> Self {
        Self {
            name: dev.name().to_string(),
            dev: Arc::new(Mutex::new(dev)),
        }
    }

    /// Lock the device. A poisoned lock is taken over: the device itself is still consistent
    /// (every operation on it is a single call), and every caller re-reads its state.
    pub fn lock(&self) -> MutexGuard<'_, Box<dyn MigrationDevice>> {
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MigrationDevice for SharedDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn identity(&self) -> DeviceIdentity {
        self.lock().identity()
    }
    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        self.lock().flags()
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        self.lock().state()
    }
    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        self.lock().set_state(to)
    }
    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        self.lock().stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.lock().reset()
    }
    fn dma_log_start(&mut self, ranges: &[DmaRange], page_size: u64) -> Result<u64, DeviceError> {
        self.lock().dma_log_start(ranges, page_size)
    }
    fn dma_log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.lock().dma_log_report(iova, length, page_size, bitmap)
    }
    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        self.lock().dma_log_stop()
    }
}
