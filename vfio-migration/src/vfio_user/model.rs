//! What a served device does beyond migration: the values its BAR0 registers show
//! ([`super::regs`]) and the rate at which it writes guest memory ([`super::dma`]).

use crate::emulated::{EmulatedHandle, changes_content};

/// The device behind a [`super::Server`]'s BAR0 and DMA. [`EmulatedModel`] is the emulated
/// device's; [`NoModel`] serves any other device (registers of a blank device, no DMA).
pub trait DeviceModel: Send {
    /// The size of the device state in bytes (`STATE_SIZE`).
    fn state_size(&self) -> u64;
    /// A 64-bit digest of the device state (`DIGEST`): equal digests, equal states.
    fn digest(&self) -> u64;
    /// The `SCRATCH` register, part of the migrated state.
    fn scratch(&self) -> u32;
    /// A driver writes `SCRATCH`; `false` when the device ignores it (it is not running).
    fn set_scratch(&mut self, value: u32) -> bool;
    /// Bytes per second the device writes to guest memory now (0: none, e.g. not running).
    fn dma_rate(&self) -> u64;
    /// The device wrote guest memory at `[iova, iova + len)`: record it in its DMA log.
    fn dma_written(&mut self, iova: u64, len: u64);
}

/// The model of a device that has none: `STATE_SIZE` and `DIGEST` read 0, `SCRATCH` is kept by
/// the server only (not migrated), no DMA.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoModel {
    scratch: u32,
}

impl DeviceModel for NoModel {
    fn state_size(&self) -> u64 {
        0
    }

    fn digest(&self) -> u64 {
        0
    }

    fn scratch(&self) -> u32 {
        self.scratch
    }

    fn set_scratch(&mut self, value: u32) -> bool {
        self.scratch = value;
        true
    }

    fn dma_rate(&self) -> u64 {
        0
    }

    fn dma_written(&mut self, _iova: u64, _len: u64) {}
}

/// The emulated device's model: `STATE_SIZE` is its `size`, `DIGEST` its content digest (the one
/// `vfio-mig serve --connections N` prints), `SCRATCH` the version of block 0 (which
/// [`EmulatedModel::new`] keeps out of the device's own activity, so it changes only when written
/// or wiped by a reset, and migrates with the content), and the DMA rate its `dirty-rate` while it
/// changes its content (RUNNING, PRE_COPY). DMA writes are marked in its DMA log.
#[derive(Clone, Debug)]
pub struct EmulatedModel {
    handle: EmulatedHandle,
}

impl EmulatedModel {
    /// The model of the device behind `handle`; reserves block 0 for `SCRATCH`.
    pub fn new(handle: EmulatedHandle) -> Self {
        handle.reserve_block(Some(0));
        Self { handle }
    }
}

impl DeviceModel for EmulatedModel {
    fn state_size(&self) -> u64 {
        self.handle.config().size
    }

    fn digest(&self) -> u64 {
        self.handle.digest()
    }

    fn scratch(&self) -> u32 {
        self.handle.version(0).unwrap_or(0)
    }

    fn set_scratch(&mut self, value: u32) -> bool {
        self.handle.set_version(0, value).is_ok()
    }

    fn dma_rate(&self) -> u64 {
        if changes_content(self.handle.device_state()) {
            self.handle.config().dirty_rate
        } else {
            0
        }
    }

    fn dma_written(&mut self, iova: u64, len: u64) {
        if let Err(e) = self.handle.dma_write(iova, len) {
            log::debug!("{e}");
        }
    }
}
