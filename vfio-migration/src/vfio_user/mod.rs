//! vfio-user backend: migrate a device served over a vfio-user UNIX socket, and serve a device
//! (the emulated one, or any [`crate::MigrationDevice`] whose data moves in-band) to vfio-user
//! clients.
//!
//! The protocol is the vfio-user specification's (QEMU `docs/interop/vfio-user.rst`) with
//! migration v2: `VFIO_USER_DEVICE_FEATURE` (16) carries the kernel's MIGRATION,
//! MIG_DEVICE_STATE and DMA_LOGGING_START/STOP/REPORT features, `VFIO_USER_MIG_DATA_READ` (17)
//! and `VFIO_USER_MIG_DATA_WRITE` (18) move the device state in-band in chunks of at most
//! `max_data_xfer_size` (negotiated in `VFIO_USER_VERSION`). A read reply shorter than asked
//! means "no more data": for now in PRE_COPY, for good in STOP_COPY.
//!
//! Limits: P2P states are not used by vfio-user (never offered, masked out of the flags); the
//! protocol has no pre-copy info and no stop-copy size estimate (see [`VfioUserDevice`]); device
//! state moves in-band only (no `data_fd`), and our server has no mmappable region. The client
//! ([`VfioUserClient`]) sends guest memory's file descriptor with DMA_MAP and eventfds with
//! SET_IRQS, and keeps the file descriptor a server sends with a mappable region's info.
//!
//! - [`codec`]: message framing, commands, payloads and the version JSON;
//! - [`client`]: [`VfioUserDevice`], the [`crate::MigrationDevice`] over a socket;
//! - [`vmm`]: [`VfioUserClient`], what a VMM needs to attach the device (regions, interrupts,
//!   DMA, reset), sharing its connection with the device's migration;
//! - [`server`]: [`Server`], which serves a device to one client at a time, as a PCI device a
//!   VMM can attach;
//! - [`pci`]: the served device's config space;
//! - [`regs`]: the served device's BAR0 registers;
//! - [`dma`]: the guest memory mapped for DMA, and the device's writes to it;
//! - [`model`]: [`DeviceModel`], what BAR0 shows and the device's DMA rate.

pub mod client;
pub mod codec;
mod conn;
pub mod dma;
pub mod model;
pub mod pci;
pub mod regs;
pub mod server;
#[cfg(test)]
mod tests;
pub mod vmm;

pub use client::VfioUserDevice;
pub use codec::ProtocolError;
pub use model::{DeviceModel, EmulatedModel, NoModel};
pub use server::{MigrationDigests, Server, ServerOptions, bind};
pub use vmm::{Region, VfioUserClient};

use crate::device::DeviceIdentity;

/// The identity as the server of this crate tells it in its capabilities
/// ([`codec::CAP_IDENTITY`]); `None` for an unknown one.
pub fn identity_to_cap(id: &DeviceIdentity) -> Option<String> {
    match id {
        DeviceIdentity::Emulated { params } => Some(format!("emulated:{params}")),
        DeviceIdentity::Mdev { mdev_type } => Some(format!("mdev:{mdev_type}")),
        DeviceIdentity::Pci {
            vendor,
            device,
            subsystem_vendor,
            subsystem_device,
        } => Some(format!(
            "pci:{vendor:04x}:{device:04x}:{subsystem_vendor:04x}:{subsystem_device:04x}"
        )),
        DeviceIdentity::Unknown => None,
    }
}

/// The identity a server told ([`identity_to_cap`]); anything else is unknown.
pub fn identity_from_cap(s: &str) -> DeviceIdentity {
    if let Some(params) = s.strip_prefix("emulated:") {
        return DeviceIdentity::Emulated { params: params.into() };
    }
    if let Some(t) = s.strip_prefix("mdev:") {
        return DeviceIdentity::Mdev { mdev_type: t.into() };
    }
    if let Some(p) = s.strip_prefix("pci:") {
        let ids: Vec<u16> = p.split(':').filter_map(|x| u16::from_str_radix(x, 16).ok()).collect();
        if let [vendor, device, subsystem_vendor, subsystem_device] = ids[..] {
            return DeviceIdentity::Pci {
                vendor,
                device,
                subsystem_vendor,
                subsystem_device,
            };
        }
    }
    DeviceIdentity::Unknown
}
