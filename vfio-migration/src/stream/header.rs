//! The stream header: writer version and the identity and flags of every device.

use crate::device::{DeviceIdentity, IdentityMismatch};
use crate::state::MigrationFlags;

use super::{MAX_DEVICES, MAX_NAME_LEN, Mismatch};

const ID_UNKNOWN: u8 = 0;
const ID_PCI: u8 = 1;
const ID_MDEV: u8 = 2;
const ID_EMULATED: u8 = 3;

/// One device of a stream: what it is and what it supports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    /// The device's identity.
    pub identity: DeviceIdentity,
    /// The migration flags the source device reported.
    pub flags: MigrationFlags,
}

/// The header of a stream: who wrote it and which devices it carries (index = position).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The writer's version string, e.g. `vfio-migration 0.1.0`.
    pub writer: String,
    /// The devices, in index order.
    pub devices: Vec<DeviceEntry>,
}

impl Header {
    /// A header for `devices`, written by this crate's version.
    pub fn new(devices: Vec<DeviceEntry>) -> Self {
        Self {
            writer: concat!("vfio-migration ", env!("CARGO_PKG_VERSION")).to_string(),
            devices,
        }
    }

    /// A header for a single device.
    ///
    /// ```
    /// use vfio_migration::{device::DeviceIdentity, state::MigrationFlags, stream::Header};
    /// let h = Header::single(DeviceIdentity::Mdev { mdev_type: "mtty-2".into() }, MigrationFlags::STOP_COPY);
    /// assert_eq!(h.devices.len(), 1);
    /// assert!(h.writer.starts_with("vfio-migration "));
    /// ```
    pub fn single(identity: DeviceIdentity, flags: MigrationFlags) -> Self {
        Self::new(vec![DeviceEntry { identity, flags }])
    }

    /// The same header with another writer version string.
    pub fn with_writer(mut self, writer: impl Into<String>) -> Self {
        self.writer = writer.into();
        self
    }

    /// The entry of device `index`.
    pub fn device(&self, index: u32) -> Option<&DeviceEntry> {
        self.devices.get(index as usize)
    }

    /// Whether the state of device `index` of this stream may be loaded into a device with
    /// `identity` and `flags`. Call it before touching the destination device.
    ///
    /// The identities must be equal (same PCI vendor, device and subsystem IDs; same mdev type;
    /// same emulated parameters), by [`DeviceIdentity::check_compatible`]: an unknown identity on
    /// either side is refused unless `force_unknown_identity` is set. The destination must support STOP_COPY and, when the source
    /// supported PRE_COPY (so the stream may hold pre-copy data, whose format is the driver's),
    /// PRE_COPY too. P2P and unknown flag bits do not matter for loading.
    ///
    /// ```
    /// use vfio_migration::{device::DeviceIdentity, state::MigrationFlags as F, stream::{Header, Mismatch}};
    /// let h = Header::single(DeviceIdentity::Mdev { mdev_type: "mtty-2".into() }, F::STOP_COPY | F::PRE_COPY);
    /// let mtty2 = DeviceIdentity::Mdev { mdev_type: "mtty-2".into() };
    /// assert!(h.check_compatible(0, &mtty2, F::STOP_COPY | F::PRE_COPY | F::P2P, false).is_ok());
    /// assert!(matches!(h.check_compatible(0, &mtty2, F::STOP_COPY, false), Err(Mismatch::Flags { .. })));
    /// let mtty1 = DeviceIdentity::Mdev { mdev_type: "mtty-1".into() };
    /// assert!(matches!(h.check_compatible(0, &mtty1, F::STOP_COPY | F::PRE_COPY, false), Err(Mismatch::Identity { .. })));
    /// assert!(matches!(h.check_compatible(1, &mtty2, F::STOP_COPY, false), Err(Mismatch::NoSuchDevice { .. })));
    /// let unknown = DeviceIdentity::Unknown;
    /// assert!(matches!(h.check_compatible(0, &unknown, F::STOP_COPY | F::PRE_COPY, false), Err(Mismatch::UnknownIdentity { .. })));
    /// assert!(h.check_compatible(0, &unknown, F::STOP_COPY | F::PRE_COPY, true).is_ok());
    /// ```
    pub fn check_compatible(
        &self,
        device_index: u32,
        identity: &DeviceIdentity,
        flags: MigrationFlags,
        force_unknown_identity: bool,
    ) -> Result<(), Mismatch> {
        let entry = self.device(device_index).ok_or(Mismatch::NoSuchDevice {
            index: device_index,
            count: self.devices.len(),
        })?;
        match entry.identity.check_compatible(identity, force_unknown_identity) {
            Ok(()) => {}
            Err(IdentityMismatch::Different { .. }) => {
                return Err(Mismatch::Identity {
                    index: device_index,
                    stream: entry.identity.clone(),
                    device: identity.clone(),
                });
            }
            Err(IdentityMismatch::Unknown { .. }) => {
                return Err(Mismatch::UnknownIdentity {
                    index: device_index,
                    stream: entry.identity.clone(),
                    device: identity.clone(),
                });
            }
        }
        let needed = MigrationFlags::STOP_COPY | (entry.flags & MigrationFlags::PRE_COPY);
        if !flags.contains(needed) {
            return Err(Mismatch::Flags {
                index: device_index,
                stream: entry.flags,
                device: flags,
                missing: MigrationFlags::from_bits(needed.bits() & !flags.bits()),
            });
        }
        Ok(())
    }

    /// Check the header against the format's limits.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.writer.len() > MAX_NAME_LEN {
            return Err(format!(
                "writer version is {} bytes, above the cap of {MAX_NAME_LEN}",
                self.writer.len()
            ));
        }
        if self.devices.is_empty() || self.devices.len() > MAX_DEVICES {
            return Err(format!(
                "{} devices; a stream carries 1 to {MAX_DEVICES}",
                self.devices.len()
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            if !d.flags.contains(MigrationFlags::STOP_COPY) {
                return Err(format!("device {i}: migration flags {} lack STOP_COPY", d.flags));
            }
            let name = match &d.identity {
                DeviceIdentity::Mdev { mdev_type } => mdev_type.as_str(),
                DeviceIdentity::Emulated { params } => params.as_str(),
                _ => "",
            };
            if name.len() > MAX_NAME_LEN {
                return Err(format!(
                    "device {i}: identity string is {} bytes, above the cap of {MAX_NAME_LEN}",
                    name.len()
                ));
            }
        }
        Ok(())
    }

    /// The header body (see the module documentation). The header must be valid.
    pub(crate) fn encode_body(&self) -> Result<Vec<u8>, String> {
        self.validate()?;
        let mut b = Vec::new();
        put_str(&mut b, &self.writer);
        b.extend_from_slice(&(self.devices.len() as u32).to_le_bytes());
        for d in &self.devices {
            b.extend_from_slice(&d.flags.bits().to_le_bytes());
            match &d.identity {
                DeviceIdentity::Unknown => b.push(ID_UNKNOWN),
                DeviceIdentity::Pci {
                    vendor,
                    device,
                    subsystem_vendor,
                    subsystem_device,
                } => {
                    b.push(ID_PCI);
                    for v in [vendor, device, subsystem_vendor, subsystem_device] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                }
                DeviceIdentity::Mdev { mdev_type } => {
                    b.push(ID_MDEV);
                    put_str(&mut b, mdev_type);
                }
                DeviceIdentity::Emulated { params } => {
                    b.push(ID_EMULATED);
                    put_str(&mut b, params);
                }
            }
        }
        Ok(b)
    }

    /// Parse a header body; errors carry the position in the body.
    pub(crate) fn decode_body(body: &[u8]) -> Result<Self, (usize, String)> {
        let mut c = Cursor { data: body, pos: 0 };
        let writer = c.string("writer version")?;
        let count_pos = c.pos;
        let count = c.u32("device count")? as usize;
        if count == 0 || count > MAX_DEVICES {
            return Err((
                count_pos,
                format!("{count} devices; a stream carries 1 to {MAX_DEVICES}"),
            ));
        }
        let mut devices = Vec::with_capacity(count);
        for i in 0..count {
            let flags_pos = c.pos;
            let flags = MigrationFlags::from_bits(c.u64("migration flags")?);
            if !flags.contains(MigrationFlags::STOP_COPY) {
                return Err((flags_pos, format!("device {i}: migration flags {flags} lack STOP_COPY")));
            }
            let kind_pos = c.pos;
            let identity = match c.u8("identity kind")? {
                ID_UNKNOWN => DeviceIdentity::Unknown,
                ID_PCI => DeviceIdentity::Pci {
                    vendor: c.u16("PCI vendor ID")?,
                    device: c.u16("PCI device ID")?,
                    subsystem_vendor: c.u16("PCI subsystem vendor ID")?,
                    subsystem_device: c.u16("PCI subsystem device ID")?,
                },
                ID_MDEV => DeviceIdentity::Mdev {
                    mdev_type: c.string("mdev type")?,
                },
                ID_EMULATED => DeviceIdentity::Emulated {
                    params: c.string("emulated parameters")?,
                },
                other => return Err((kind_pos, format!("device {i}: unknown identity kind {other}"))),
            };
            devices.push(DeviceEntry { identity, flags });
        }
        if c.pos != body.len() {
            return Err((
                c.pos,
                format!("{} unused bytes at the end of the header", body.len() - c.pos),
            ));
        }
        Ok(Self { writer, devices })
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    // Lengths were checked against MAX_NAME_LEN (< 64 KiB) by `validate`.
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// A bounds-checked little-endian reader over a byte slice.
pub(crate) struct Cursor<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], (usize, String)> {
        match self.data.get(self.pos..self.pos.saturating_add(n)) {
            Some(s) if self.pos.checked_add(n).is_some() => {
                self.pos += n;
                Ok(s)
            }
            _ => Err((self.pos, format!("{what} runs past the end"))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], (usize, String)> {
        let s = self.bytes(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, (usize, String)> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, (usize, String)> {
        self.array(what).map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, (usize, String)> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, (usize, String)> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, (usize, String)> {
        let len_pos = self.pos;
        let len = self.u16(what)? as usize;
        if len > MAX_NAME_LEN {
            return Err((
                len_pos,
                format!("{what} is {len} bytes, above the cap of {MAX_NAME_LEN}"),
            ));
        }
        let start = self.pos;
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| (start + e.utf8_error().valid_up_to(), format!("{what} is not UTF-8")))
    }
}
