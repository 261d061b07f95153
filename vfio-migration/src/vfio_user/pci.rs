//! The served device's PCI config space (region 7, `VFIO_PCI_CONFIG_REGION_INDEX`): a 256-byte
//! type-0 header with two BARs that show the same register block ([`super::regs`]): a memory BAR
//! (BAR0) and an I/O port BAR (BAR2), for a guest that can reach port I/O but not MMIO (a small
//! test kernel without `/dev/mem` reads ports through `/dev/port`).
//!
//! | offset | field | value |
//! |---|---|---|
//! | 0x00 | vendor, device ID | from the device identity ([`pci_ids`]) |
//! | 0x04 | command | 0; bits I/O space (0), memory space (1), bus master (2) and INTx disable (10) writable |
//! | 0x06 | status | 0: no capabilities list |
//! | 0x08 | revision, class code | 1; class 0xff ("other"), subclass 0, prog-if 0 |
//! | 0x0c | cache line size, latency timer | 0, writable |
//! | 0x0e | header type | 0 (type 0, single function) |
//! | 0x10 | BAR0, BAR1 | a 64-bit non-prefetchable memory BAR of [`BAR0_SIZE`] bytes (region 0) |
//! | 0x18 | BAR2 | an I/O BAR of [`BAR2_SIZE`] bytes (region 2) |
//! | 0x1c..0x28 | BAR3..BAR5 | 0, writes ignored (no BAR) |
//! | 0x2c | subsystem vendor, subsystem ID | from the device identity ([`pci_ids`]) |
//! | 0x30 | expansion ROM | 0, writes ignored (no ROM) |
//! | 0x3c | interrupt line, pin | line writable, pin 0 (no INTx) |
//!
//! BAR sizing works as on hardware: after all-ones is written to BAR0 and BAR1 they read back
//! the size mask (`0xffff_f004`, `0xffff_ffff` for 4 KiB), BAR2 reads back `0xffff_ffc1` (64
//! bytes of ports), and an address written there reads back with the bits below the size
//! cleared. Everything else reads 0 and ignores writes.

use crate::device::DeviceIdentity;

/// The size of the config space region.
pub const CONFIG_SIZE: u64 = 256;
/// The size of BAR0 (region 0): the register block of [`super::regs`].
pub const BAR0_SIZE: u64 = 4096;
/// The size of BAR2 (region 2): the same register block as I/O ports (its registers end at
/// 0x38, so 64 ports hold them).
pub const BAR2_SIZE: u64 = 64;
/// The PCI vendor ID of a served device whose identity is not a PCI one (not a registered ID;
/// no guest driver binds to it).
pub const VENDOR_ID: u16 = 0x1234;
/// The PCI device ID of a served device whose identity is not a PCI one.
pub const DEVICE_ID: u16 = 0x7666;
/// The class code byte: "other" (unassigned class).
pub const CLASS_OTHER: u8 = 0xff;

/// Command register: I/O space enable.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable (the device may do DMA only with it set).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The command register bits a driver can set.
const COMMAND_WRITABLE: u16 = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;

const COMMAND: usize = 0x04;
const BAR0: usize = 0x10;
/// BAR0's flag bits: memory, 64-bit, not prefetchable.
const BAR0_FLAGS: u64 = 0b100;
const BAR2: usize = 0x18;
/// BAR2's flag bits: I/O space.
const BAR2_FLAGS: u32 = 0b1;

/// The PCI IDs `(vendor, device, subsystem vendor, subsystem ID)` the config space shows for a
/// device of identity `id`: a PCI identity's own IDs (so a client that reads config space derives
/// the very identity the server tells), else [`VENDOR_ID`]:[`DEVICE_ID`] with a subsystem pair
/// taken from a CRC-32C of the identity the server tells (`emulated:...`): two servers of the same
/// device show the same IDs, two different devices almost surely different ones.
pub fn pci_ids(id: &DeviceIdentity) -> (u16, u16, u16, u16) {
    match id {
        DeviceIdentity::Pci {
            vendor,
            device,
            subsystem_vendor,
            subsystem_device,
        } => (*vendor, *device, *subsystem_vendor, *subsystem_device),
        other => {
            let text = super::identity_to_cap(other).unwrap_or_default();
            let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, text.as_bytes()) as u32;
            (VENDOR_ID, DEVICE_ID, (crc >> 16) as u16, crc as u16)
        }
    }
}

/// A device's config space.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE as usize],
    initial: [u8; CONFIG_SIZE as usize],
}

impl ConfigSpace {
    /// The config space of a device of identity `id`, as after a reset.
    pub fn new(id: &DeviceIdentity) -> Self {
        let (vendor, device, sub_vendor, sub_device) = pci_ids(id);
        let mut b = [0u8; CONFIG_SIZE as usize];
        b[0..2].copy_from_slice(&vendor.to_le_bytes());
        b[2..4].copy_from_slice(&device.to_le_bytes());
        b[0x08] = 1; // revision
        b[0x0b] = CLASS_OTHER;
        b[BAR0..BAR0 + 8].copy_from_slice(&BAR0_FLAGS.to_le_bytes());
        b[BAR2..BAR2 + 4].copy_from_slice(&BAR2_FLAGS.to_le_bytes());
        b[0x2c..0x2e].copy_from_slice(&sub_vendor.to_le_bytes());
        b[0x2e..0x30].copy_from_slice(&sub_device.to_le_bytes());
        Self { bytes: b, initial: b }
    }

    /// Back to the state after a reset (command 0, BARs unassigned).
    pub fn reset(&mut self) {
        self.bytes = self.initial;
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]])
    }

    /// Whether the device may do DMA (bus master enable).
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// The bytes at `[offset, offset + len)`; `None` when the range leaves the config space.
    pub fn read(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let (start, end) = range(offset, len)?;
        Some(&self.bytes[start..end])
    }

    /// Write `data` at `offset`, byte by byte through the writable bits; `None` when the range
    /// leaves the config space (nothing written).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<()> {
        let (start, _) = range(offset, data.len())?;
        for (i, &v) in data.iter().enumerate() {
            let at = start + i;
            let mask = writable(at);
            self.bytes[at] = (self.bytes[at] & !mask) | (v & mask);
        }
        // BAR0/BAR1: an address aligned to the size, with the flag bits fixed.
        let mut bar = [0u8; 8];
        bar.copy_from_slice(&self.bytes[BAR0..BAR0 + 8]);
        let addr = u64::from_le_bytes(bar) & !(BAR0_SIZE - 1);
        self.bytes[BAR0..BAR0 + 8].copy_from_slice(&(addr | BAR0_FLAGS).to_le_bytes());
        // BAR2: likewise, 32 bits.
        let mut bar = [0u8; 4];
        bar.copy_from_slice(&self.bytes[BAR2..BAR2 + 4]);
        let port = u32::from_le_bytes(bar) & !(BAR2_SIZE as u32 - 1);
        self.bytes[BAR2..BAR2 + 4].copy_from_slice(&(port | BAR2_FLAGS).to_le_bytes());
        Some(())
    }
}

/// The writable bits of config space byte `at`.
fn writable(at: usize) -> u8 {
    let [cmd_lo, cmd_hi] = COMMAND_WRITABLE.to_le_bytes();
    match at {
        0x04 => cmd_lo,
        0x05 => cmd_hi,
        0x0c | 0x0d => 0xff,
        0x10..=0x1b => 0xff,
        0x3c => 0xff,
        _ => 0,
    }
}

/// `[offset, offset + len)` as indexes when it lies within the config space.
fn range(offset: u64, len: usize) -> Option<(usize, usize)> {
    let end = offset.checked_add(len as u64).filter(|&e| e <= CONFIG_SIZE)?;
    Some((offset as usize, end as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dword(c: &ConfigSpace, at: u64) -> u32 {
        let b = c.read(at, 4).unwrap();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn bar_sizing_and_writable_bits() {
        let id = DeviceIdentity::Emulated {
            params: "size=1".into(),
        };
        let mut c = ConfigSpace::new(&id);
        assert_eq!(dword(&c, 0x10), 0b100);
        c.write(0x10, &u32::MAX.to_le_bytes()).unwrap();
        c.write(0x14, &u32::MAX.to_le_bytes()).unwrap();
        assert_eq!(dword(&c, 0x10), 0xffff_f004);
        assert_eq!(dword(&c, 0x14), u32::MAX);
        c.write(0x10, &0x1234_5678u32.to_le_bytes()).unwrap();
        assert_eq!(dword(&c, 0x10), 0x1234_5004);
        assert_eq!(dword(&c, 0x18), 1, "BAR2: I/O");
        c.write(0x18, &u32::MAX.to_le_bytes()).unwrap();
        assert_eq!(dword(&c, 0x18), 0xffff_ffc1, "BAR2: 64 ports");
        c.write(0x18, &0xc07fu32.to_le_bytes()).unwrap();
        assert_eq!(dword(&c, 0x18), 0xc041);
        for off in [0x1c, 0x20, 0x24, 0x30] {
            c.write(off, &u32::MAX.to_le_bytes()).unwrap();
            assert_eq!(dword(&c, off), 0, "{off:#x}");
        }
        c.write(0x04, &u32::MAX.to_le_bytes()).unwrap();
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert!(c.bus_master());
        assert_eq!(dword(&c, 0) & 0xffff, u32::from(VENDOR_ID));
        c.write(0, &[0, 0]).unwrap();
        assert_eq!(dword(&c, 0) & 0xffff, u32::from(VENDOR_ID), "IDs are read-only");
        assert!(c.read(255, 2).is_none() && c.read(u64::MAX, 1).is_none());
        assert!(c.write(256, &[1]).is_none());
        c.reset();
        assert_eq!((c.command(), dword(&c, 0x10), dword(&c, 0x18)), (0, 0b100, 1));
    }

    proptest::proptest! {
        /// Any writes leave the IDs, class, header type, status and BAR flags alone and never
        /// panic; out-of-range ones are refused whole.
        #[test]
        fn random_writes_keep_the_read_only_fields(
            writes in proptest::collection::vec((0u64..300, proptest::collection::vec(proptest::num::u8::ANY, 0..9)), 0..40)
        ) {
            let id = DeviceIdentity::Emulated { params: "size=1".into() };
            let mut c = ConfigSpace::new(&id);
            let fresh = ConfigSpace::new(&id);
            for (offset, data) in &writes {
                let fits = offset + data.len() as u64 <= CONFIG_SIZE;
                proptest::prop_assert_eq!(c.write(*offset, data).is_some(), fits);
            }
            for at in [0usize, 1, 2, 3, 6, 7, 8, 9, 10, 11, 0x0e, 0x2c, 0x2d, 0x2e, 0x2f, 0x34, 0x3d] {
                proptest::prop_assert_eq!(c.read(at as u64, 1), fresh.read(at as u64, 1), "byte {:#x}", at);
            }
            proptest::prop_assert_eq!(c.read(0x10, 1).unwrap()[0] & 0xf, 0b100);
            proptest::prop_assert_eq!(c.read(0x18, 1).unwrap()[0] & 0x3f, 1);
            proptest::prop_assert_eq!(c.read(0x1c, 0xc).unwrap(), &[0u8; 0xc][..]);
        }
    }

    #[test]
    fn ids_follow_the_identity() {
        let pci = DeviceIdentity::Pci {
            vendor: 0x10de,
            device: 0x2230,
            subsystem_vendor: 0x10de,
            subsystem_device: 0x1459,
        };
        assert_eq!(pci_ids(&pci), (0x10de, 0x2230, 0x10de, 0x1459));
        let a = DeviceIdentity::Emulated {
            params: "size=1".into(),
        };
        let b = DeviceIdentity::Emulated {
            params: "size=2".into(),
        };
        assert_eq!(pci_ids(&a), pci_ids(&a.clone()));
        assert_ne!(pci_ids(&a), pci_ids(&b));
        assert_eq!(pci_ids(&a).0, VENDOR_ID);
    }
}
