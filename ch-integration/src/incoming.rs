//! Destination: VFIO devices prepared when `Config` arrives, before Cloud Hypervisor builds its
//! device model at `State`.
//!
//! A destination given its devices as cdev fds (`receive-migration vfio_fds=[..],iommufd_fd=N`)
//! binds each cdev to the iommufd and registers it in the VM's group while memory still streams
//! in ([`prepare_cdev`]). That takes opening the device, reading its identity and checking its
//! migration support out of the downtime, and lets pre-copy device state
//! ([`crate::protocol`]) load into it as it arrives. When `State` arrives, Cloud Hypervisor builds
//! the `VfioPciDevice` from the same, already bound fd (its `preserved_fds` mark it bound) and
//! registers it again under the same id, which adopts the prepared member
//! ([`crate::VfioMigrationGroup::register`]).

use std::fs::canonicalize;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use vfio_migration::device::DeviceIdentity;
use vfio_migration::kernel::KernelDevice;
use vfio_migration::kernel::ioctls;
use vfio_migration::kernel::open::read_identity;

use crate::error::{IntegrationError, Step};
use crate::group::{DeviceConfig, VfioMigrationGroup};

/// The identity the engine checks before loading a state into a device: the PCI IDs of a PCI
/// function, the type of a mediated device. `device_path` is the sysfs path the device was
/// opened from, or its cdev (`/dev/vfio/devices/vfioN`). A device whose sysfs node cannot be read
/// is [`DeviceIdentity::Unknown`] (logged), which a restore refuses unless forced.
pub fn identity_for_path(device_path: &Path) -> DeviceIdentity {
    let sysfs = match device_path
        .strip_prefix("/dev/vfio/devices")
        .ok()
        .and_then(|cdev| cdev.to_str())
    {
        Some(cdev) => PathBuf::from(format!("/sys/class/vfio-dev/{cdev}/device")),
        None => device_path.to_path_buf(),
    };
    let sysfs = canonicalize(&sysfs).unwrap_or(sysfs);
    read_identity(&sysfs).unwrap_or_else(|e| {
        log::warn!(
            "VFIO device {}: no identity for migration checks ({e})",
            device_path.display()
        );
        DeviceIdentity::Unknown
    })
}

/// Where an open fd leads (`/proc/self/fd/N`), for messages and the identity.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    let link = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    std::fs::read_link(&link).unwrap_or(link)
}

/// Bind the VFIO cdev `cdev` (device `id`) to `iommufd` and register a duplicate of it in
/// `group` as a prepared member. Cloud Hypervisor must then treat `cdev` as already bound (it
/// attaches it to its IOAS at `State`). Nothing is changed in the device's migration state: a
/// prepared device enters RESUMING only when pre-copy data or `State` arrives.
pub fn prepare_cdev(
    group: &VfioMigrationGroup,
    id: &str,
    cdev: BorrowedFd<'_>,
    iommufd: BorrowedFd<'_>,
) -> Result<(), IntegrationError> {
    let path = fd_path(cdev);
    ioctls::bind_iommufd(cdev, iommufd).map_err(|e| {
        IntegrationError::new(
            id,
            Step::Register,
            std::io::Error::new(
                e.kind(),
                format!("VFIO_DEVICE_BIND_IOMMUFD of {} to the iommufd: {e}", path.display()),
            ),
        )
    })?;
    let dup = cdev
        .try_clone_to_owned()
        .map_err(|e| IntegrationError::new(id, Step::Register, e))?;
    let identity = identity_for_path(&path);
    let dev = KernelDevice::from_fd(dup, path.display().to_string(), identity);
    group.prepare(Box::new(dev), DeviceConfig::new(id, Vec::new()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_of_an_unknown_path_is_unknown() {
        let path = std::env::temp_dir().join(format!("ch-no-such-vfio-{}", std::process::id()));
        assert_eq!(identity_for_path(&path), DeviceIdentity::Unknown);
        assert_eq!(
            identity_for_path(Path::new("/dev/vfio/devices/vfio-missing")),
            DeviceIdentity::Unknown
        );
    }

    #[test]
    fn binding_something_that_is_not_a_cdev_fails_with_the_device_named() {
        let group = VfioMigrationGroup::new(Default::default());
        let f = tempfile::tempfile().unwrap();
        let g = tempfile::tempfile().unwrap();
        let e = prepare_cdev(
            &group,
            "vfio7",
            std::os::fd::AsFd::as_fd(&f),
            std::os::fd::AsFd::as_fd(&g),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("vfio7") && text.contains("BIND_IOMMUFD"), "{text}");
        assert!(group.is_empty());
    }
}
