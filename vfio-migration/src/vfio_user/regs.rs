//! The served device's registers: BAR0 (region 0, 4 KiB of MMIO) and BAR2 (region 2, 64 I/O
//! ports) show the same register block, read and written with `VFIO_USER_REGION_READ` / `WRITE`
//! (not mmappable). All registers are little-endian; an access
//! may have any size and alignment (a register is a byte range). Bytes past the last register
//! read 0 and ignore writes.
//!
//! | offset | size | name | access | value |
//! |---|---|---|---|---|
//! | 0x00 | 4 | `MAGIC` | RO | [`MAGIC`] (`0x47494d56`, the bytes `VMIG`) |
//! | 0x04 | 4 | `LAYOUT` | RO | [`LAYOUT_VERSION`], the version of this layout |
//! | 0x08 | 8 | `STATE_SIZE` | RO | the size of the device state in bytes |
//! | 0x10 | 8 | `DIGEST` | RO | a digest of the device state; a read that includes byte 0x10 takes a new one, a read of 0x14..0x18 alone returns the high half of the last one (two 32-bit reads, low first, see one value) |
//! | 0x18 | 4 | `SCRATCH` | RW | a value the driver writes; part of the migrated state (written only while the device runs: RUNNING, PRE_COPY) |
//! | 0x1c | 4 | `DEVICE_STATE` | RO | the migration state (`VFIO_DEVICE_STATE_*` value) |
//! | 0x20 | 8 | `DMA_ADDR` | RW | the start (IOVA) of the window the device writes guest memory in |
//! | 0x28 | 8 | `DMA_LEN` | RW | the window's length in bytes (0: no DMA) |
//! | 0x30 | 8 | `DMA_WRITES` | RO | DMA writes the device made on this connection |
//!
//! For the emulated device ([`super::model::EmulatedModel`]) `DIGEST` is the content digest that
//! `vfio-mig serve --connections N` reports, and `SCRATCH` moves with the state when it migrates.
//! `DMA_*` and the config space are not device state: they start at 0 on every connection and
//! after a reset.
//!
//! With bus mastering on (config space command bit 2), a non-empty window and a device that
//! writes guest memory ([`super::model::DeviceModel::dma_rate`]), the device writes 16 bytes
//! (`u64` sequence number from 1, `u64` IOVA) at the start of pseudo-randomly chosen 4 KiB pages
//! of the window that are mapped ([`super::dma`]), at its DMA rate, and marks them in its DMA log.
//! The writes are made lazily: those of the time since the previous message when the next one
//! arrives, before it is handled (so a `DMA_LOGGING_REPORT` or a register read sees them; at most
//! [`super::dma::MAX_WRITES_PER_TICK`] at once). Without a driver that sets bus mastering and the
//! window, the device never touches guest memory.

use super::model::DeviceModel;

/// `MAGIC`'s value.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VMIG");
/// `LAYOUT`'s value.
pub const LAYOUT_VERSION: u32 = 1;
/// Offset of `MAGIC`.
pub const REG_MAGIC: u64 = 0x00;
/// Offset of `LAYOUT`.
pub const REG_LAYOUT: u64 = 0x04;
/// Offset of `STATE_SIZE`.
pub const REG_STATE_SIZE: u64 = 0x08;
/// Offset of `DIGEST`.
pub const REG_DIGEST: u64 = 0x10;
/// Offset of `SCRATCH`.
pub const REG_SCRATCH: u64 = 0x18;
/// Offset of `DEVICE_STATE`.
pub const REG_DEVICE_STATE: u64 = 0x1c;
/// Offset of `DMA_ADDR`.
pub const REG_DMA_ADDR: u64 = 0x20;
/// Offset of `DMA_LEN`.
pub const REG_DMA_LEN: u64 = 0x28;
/// Offset of `DMA_WRITES`.
pub const REG_DMA_WRITES: u64 = 0x30;
/// The bytes the registers take.
const REGS_LEN: usize = 0x38;

/// BAR0's registers that the server keeps (the others come from the [`DeviceModel`]).
#[derive(Clone, Debug, Default)]
pub struct Bar0 {
    digest: u64,
    dma_addr: u64,
    dma_len: u64,
    /// DMA writes made on this connection (`DMA_WRITES`).
    pub dma_writes: u64,
}

/// Whether `[offset, offset + len)` includes the register byte `at`.
fn covers(offset: u64, len: usize, at: u64) -> bool {
    offset <= at && at - offset < len as u64
}

impl Bar0 {
    /// The registers after a reset.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// The DMA window `(start, length)`, if the driver set a non-empty one.
    pub fn dma_window(&self) -> Option<(u64, u64)> {
        (self.dma_len > 0).then_some((self.dma_addr, self.dma_len))
    }

    fn image(&self, model: &dyn DeviceModel, device_state: u32) -> [u8; REGS_LEN] {
        let mut b = [0u8; REGS_LEN];
        let mut put = |at: u64, v: &[u8]| b[at as usize..at as usize + v.len()].copy_from_slice(v);
        put(REG_MAGIC, &MAGIC.to_le_bytes());
        put(REG_LAYOUT, &LAYOUT_VERSION.to_le_bytes());
        put(REG_STATE_SIZE, &model.state_size().to_le_bytes());
        put(REG_DIGEST, &self.digest.to_le_bytes());
        put(REG_SCRATCH, &model.scratch().to_le_bytes());
        put(REG_DEVICE_STATE, &device_state.to_le_bytes());
        put(REG_DMA_ADDR, &self.dma_addr.to_le_bytes());
        put(REG_DMA_LEN, &self.dma_len.to_le_bytes());
        put(REG_DMA_WRITES, &self.dma_writes.to_le_bytes());
        b
    }

    /// Read `out.len()` bytes at `offset` (the caller checked the range lies in BAR0).
    pub fn read(&mut self, model: &dyn DeviceModel, device_state: u32, offset: u64, out: &mut [u8]) {
        if covers(offset, out.len(), REG_DIGEST) {
            self.digest = model.digest();
        }
        let image = self.image(model, device_state);
        copy_overlap(&image, offset, out);
    }

    /// Write `data` at `offset` (the caller checked the range lies in BAR0): read-modify-write
    /// of the writable registers it touches; the rest is ignored.
    pub fn write(&mut self, model: &mut dyn DeviceModel, offset: u64, data: &[u8]) {
        let apply = |reg: u64, old: &[u8]| -> Vec<u8> {
            let mut v = old.to_vec();
            for (i, &byte) in data.iter().enumerate() {
                let at = offset + i as u64;
                if at >= reg && at < reg + v.len() as u64 {
                    v[(at - reg) as usize] = byte;
                }
            }
            v
        };
        let touches = |reg: u64, len: u64| offset < reg + len && reg < offset.saturating_add(data.len() as u64);
        if touches(REG_SCRATCH, 4) {
            let old = model.scratch();
            let new = apply(REG_SCRATCH, &old.to_le_bytes());
            let new = u32::from_le_bytes([new[0], new[1], new[2], new[3]]);
            if new != old && !model.set_scratch(new) {
                log::debug!("SCRATCH write ignored: the device is not running");
            }
        }
        if touches(REG_DMA_ADDR, 8) {
            self.dma_addr = u64_of(&apply(REG_DMA_ADDR, &self.dma_addr.to_le_bytes()));
        }
        if touches(REG_DMA_LEN, 8) {
            self.dma_len = u64_of(&apply(REG_DMA_LEN, &self.dma_len.to_le_bytes()));
        }
    }
}

fn u64_of(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// Copy the part of `image` (at offset 0) that `[offset, offset + out.len())` overlaps into
/// `out`; the rest of `out` is zeroed.
fn copy_overlap(image: &[u8], offset: u64, out: &mut [u8]) {
    out.fill(0);
    if offset >= image.len() as u64 {
        return;
    }
    let start = offset as usize;
    let n = (image.len() - start).min(out.len());
    out[..n].copy_from_slice(&image[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio_user::model::NoModel;

    #[test]
    fn registers_read_and_write_at_any_size() {
        let mut m = NoModel::default();
        let mut r = Bar0::default();
        let mut b = [0u8; 8];
        r.read(&m, 2, 0, &mut b);
        assert_eq!(&b[..4], b"VMIG");
        assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), LAYOUT_VERSION);
        r.write(&mut m, REG_SCRATCH + 1, &[0xab, 0xcd]);
        assert_eq!(m.scratch(), 0x00cd_ab00);
        r.write(&mut m, REG_DMA_ADDR, &0x1_0000_0000u64.to_le_bytes());
        r.write(&mut m, REG_DMA_LEN, &[0, 0x10]);
        assert_eq!(r.dma_window(), Some((0x1_0000_0000, 0x1000)));
        let mut s = [0u8; 4];
        r.read(&m, 2, REG_DEVICE_STATE, &mut s);
        assert_eq!(u32::from_le_bytes(s), 2);
        let mut tail = [0xffu8; 16];
        r.read(&m, 2, 0x30, &mut tail);
        assert_eq!(tail, [0; 16]);
        r.write(&mut m, 0x40, &[1; 8]);
        r.read(&m, 2, 4088, &mut b);
        assert_eq!(b, [0; 8]);
        r.reset();
        assert_eq!(r.dma_window(), None);
    }
}
