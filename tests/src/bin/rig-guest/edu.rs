//! Scenarios of the iommu boot on QEMU's `edu` PCI device, bound to vfio-pci behind the emulated
//! Intel IOMMU.

use std::path::PathBuf;

use vfio_migration::MigrationDevice;
use vfio_migration::kernel::{OpenMode, open_device};

use crate::{Outcome, ensure};

/// edu has no migration support: the engine says so with an error naming the device and the
/// operation (ENOTTY from VFIO_DEVICE_FEATURE MIGRATION).
pub fn no_migration() -> Outcome {
    let bdf = std::env::var("EDU_BDF").map_err(|_| "EDU_BDF is not set".to_string())?;
    let path = PathBuf::from("/sys/bus/pci/devices").join(&bdf);
    let opened = open_device(&path, OpenMode::Group).map_err(|e| format!("open {bdf}: {e}"))?;
    match opened.device.flags() {
        Ok(f) => Err(format!("edu reported migration flags {f}")),
        Err(e) => {
            println!("rig-guest: edu-no-migration: {e}");
            ensure!(e.raw_os_error() == Some(libc_enotty()), "want ENOTTY, got {e}");
            ensure!(e.to_string().contains(&bdf), "error does not name {bdf}: {e}");
            Ok(())
        }
    }
}

/// ENOTTY on Linux.
const fn libc_enotty() -> i32 {
    25
}
