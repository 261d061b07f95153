//! A device shared between its Cloud Hypervisor-facing wrapper and the migration engine.
//!
//! The engine's [`vfio_migration::live::Source`] and [`vfio_migration::live::Destination`] own
//! their devices; the group also needs the device while they do (dirty tracking, per-device pause
//! and resume). [`SharedDevice`] is a cloneable handle that implements
//! [`MigrationDevice`] by locking the one device.
//!
//! Two more duties fall to the handle, because every reset the engine or the group performs goes
//! through it: it calls the VMM's reset hook after each reset ([`SharedDevice::with_reset_hook`]),
//! and it lets a device leave while the engine still holds handles to it
//! ([`SharedDevice::detach`]): the real device is handed back (and its fd can be closed), every
//! handle then sees a detached stand-in that has no state to read and no DMA to report, and the
//! transfer sessions opened on the real device end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vfio_migration::DeviceError;
use vfio_migration::device::{
    DeviceIdentity, DmaRange, ErrorKind, MigrationDevice, Operation, PrecopyInfo, ReadOutcome, TransferSession,
};
use vfio_migration::state::{DeviceState, MigrationFlags, SessionKind};

/// Called after the device was reset (see [`crate::group::ResetHook`]).
type Hook = Arc<dyn Fn() + Send + Sync>;

struct Slot {
    dev: Box<dyn MigrationDevice>,
    hook: Option<Hook>,
    /// Set when the real device leaves: the sessions opened on it end.
    gone: Arc<AtomicBool>,
}

/// A cloneable handle to one device.
#[derive(Clone)]
pub struct SharedDevice {
    name: String,
    slot: Arc<Mutex<Slot>>,
}

impl std::fmt::Debug for SharedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDevice").field("name", &self.name).finish()
    }
}

impl SharedDevice {
    /// Share `dev`.
    pub fn new(dev: Box<dyn MigrationDevice>) -> Self {
        Self::with_reset_hook(dev, None)
    }

    /// Share `dev`; `hook` is called after every reset of the device through any handle,
    /// whether the reset succeeded or failed (the device lock is released by then).
    pub fn with_reset_hook(dev: Box<dyn MigrationDevice>, hook: Option<Arc<dyn Fn() + Send + Sync>>) -> Self {
        Self {
            name: dev.name().to_string(),
            slot: Arc::new(Mutex::new(Slot {
                dev,
                hook,
                gone: Arc::new(AtomicBool::new(false)),
            })),
        }
    }

    /// Replace the reset hook (a device adopted by the VMM's device model gets the model's).
    pub fn set_reset_hook(&self, hook: Option<Arc<dyn Fn() + Send + Sync>>) {
        let mut slot = self.slot();
        if !slot.gone.load(Ordering::Acquire) {
            slot.hook = hook;
        }
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        // A poisoned lock is taken over: the device itself is still consistent (every operation
        // on it is a single call), and every caller re-reads its state.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lock the device (after [`SharedDevice::detach`], the detached stand-in).
    pub fn lock(&self) -> MappedDevice<'_> {
        MappedDevice(self.slot())
    }

    /// Take the real device out: every handle (the engine's too) now reaches a detached stand-in
    /// that keeps the last known state, accepts transitions, has no data to read and no DMA to
    /// report, and whose resets call no hook; the sessions opened on the real device read as
    /// ended. Returns the real device, for the caller to drop (closing its fd); `None` when it
    /// was already detached.
    pub fn detach(&self) -> Option<Box<dyn MigrationDevice>> {
        let mut slot = self.slot();
        if slot.gone.load(Ordering::Acquire) {
            return None;
        }
        let state = slot.dev.state().unwrap_or(DeviceState::Running);
        let ghost = Detached {
            name: self.name.clone(),
            identity: slot.dev.identity(),
            flags: slot.dev.flags().unwrap_or(MigrationFlags::empty()),
            state,
        };
        slot.gone.store(true, Ordering::Release);
        slot.gone = Arc::new(AtomicBool::new(true));
        slot.hook = None;
        Some(std::mem::replace(&mut slot.dev, Box::new(ghost)))
    }

    /// Whether the real device left ([`SharedDevice::detach`]).
    pub fn is_detached(&self) -> bool {
        self.slot().gone.load(Ordering::Acquire)
    }
}

/// The locked device of a [`SharedDevice`].
pub struct MappedDevice<'a>(MutexGuard<'a, Slot>);

impl std::fmt::Debug for MappedDevice<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MappedDevice").field(&self.0.dev.name()).finish()
    }
}

impl std::ops::Deref for MappedDevice<'_> {
    type Target = Box<dyn MigrationDevice>;
    fn deref(&self) -> &Self::Target {
        &self.0.dev
    }
}

impl std::ops::DerefMut for MappedDevice<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0.dev
    }
}

/// A session opened through a [`SharedDevice`]: ends when the device is detached.
#[derive(Debug)]
struct SharedSession {
    inner: Option<Box<dyn TransferSession>>,
    kind: SessionKind,
    gone: Arc<AtomicBool>,
}

impl SharedSession {
    fn live(&mut self) -> Option<&mut Box<dyn TransferSession>> {
        if self.gone.load(Ordering::Acquire) {
            // The device left: close the data fd now rather than when the engine lets go.
            self.inner = None;
        }
        self.inner.as_mut()
    }
}

impl TransferSession for SharedSession {
    fn kind(&self) -> SessionKind {
        self.kind
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        match self.live() {
            Some(s) => s.read(buf),
            None => Ok(ReadOutcome::End),
        }
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        match self.live() {
            Some(s) => s.write(buf),
            None => Ok(buf.len()),
        }
    }
    /// The device's own bounded write (the default would be a plain `write`, which may wait
    /// longer than `wait` and so delay the load path's cancel checks).
    fn write_within(&mut self, buf: &[u8], wait: Duration) -> Result<Option<usize>, DeviceError> {
        match self.live() {
            Some(s) => s.write_within(buf, wait),
            None => Ok(Some(buf.len())),
        }
    }
    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        match self.live() {
            Some(s) => s.precopy_info(),
            None => Ok(PrecopyInfo::default()),
        }
    }
}

/// What a detached device's handles reach: the device left its group (hot-unplug), the engine
/// may still hold a handle until its migration ends.
#[derive(Debug)]
struct Detached {
    name: String,
    identity: DeviceIdentity,
    flags: MigrationFlags,
    state: DeviceState,
}

/// A session of a detached device: nothing to read, everything written is dropped.
#[derive(Debug)]
struct DetachedSession(SessionKind);

impl TransferSession for DetachedSession {
    fn kind(&self) -> SessionKind {
        self.0
    }
    fn read(&mut self, _buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        Ok(ReadOutcome::End)
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        Ok(buf.len())
    }
    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        Ok(PrecopyInfo::default())
    }
}

impl MigrationDevice for Detached {
    fn name(&self) -> &str {
        &self.name
    }
    fn identity(&self) -> DeviceIdentity {
        self.identity.clone()
    }
    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        Ok(self.flags)
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        Ok(self.state)
    }
    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        self.state = to;
        Ok(to
            .session_kind()
            .map(|k| Box::new(DetachedSession(k)) as Box<dyn TransferSession>))
    }
    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        Ok(0)
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.state = DeviceState::Running;
        Ok(())
    }
    fn dma_log_start(&mut self, _ranges: &[DmaRange], _page_size: u64) -> Result<u64, DeviceError> {
        Err(DeviceError::new(
            &self.name,
            Operation::DmaLogStart,
            ErrorKind::InvalidAnswer("the device left its group".into()),
        ))
    }
    fn dma_log_report(
        &mut self,
        _iova: u64,
        _length: u64,
        _page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        // Gone: it writes no guest memory any more.
        bitmap.fill(0);
        Ok(())
    }
    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        Ok(())
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
        let mut slot = self.slot();
        let gone = slot.gone.clone();
        Ok(slot.dev.set_state(to)?.map(|s| {
            Box::new(SharedSession {
                kind: s.kind(),
                inner: Some(s),
                gone,
            }) as Box<dyn TransferSession>
        }))
    }
    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        self.lock().stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        let (r, hook) = {
            let mut slot = self.slot();
            (slot.dev.reset(), slot.hook.clone())
        };
        // After the device lock is released: the VMM re-applies its PCI command register and
        // interrupt eventfds, which may touch the device.
        if let Some(hook) = hook {
            hook();
        }
        r
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
    fn enable_precopy_info_v2(&mut self) -> Result<bool, DeviceError> {
        self.lock().enable_precopy_info_v2()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_migration::emulated::EmulatedDevice;

    /// The wrapper passes the opt-in to PRE_COPY info v2 through: the default answers "not
    /// offered" without asking the device.
    #[test]
    fn the_wrapper_forwards_the_precopy_info_v2_opt_in() {
        let dev = EmulatedDevice::from_spec("size=64K,flags=stop-copy+pre-copy+p2p+precopy-v2").unwrap();
        let h = dev.handle();
        let mut shared = SharedDevice::new(Box::new(dev));
        assert!(!h.precopy_v2_enabled());
        assert!(shared.enable_precopy_info_v2().unwrap(), "the device offers it");
        assert!(h.precopy_v2_enabled(), "the device was asked");
    }
}
