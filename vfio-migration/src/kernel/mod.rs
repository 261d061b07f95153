//! The real-kernel backend: VFIO devices driven through the Linux migration uAPI v2.
//!
//! - [`ioctls`]: every ioctl number and the uAPI glue, the only `unsafe` code of the backend,
//!   behind a syscall seam that has a test twin;
//! - [`device`]: [`KernelDevice`] (a [`crate::device::MigrationDevice`] owning the device fd) and
//!   [`KernelSession`] (owning a `data_fd`);
//! - [`open`]: opening a device from its sysfs path through the legacy group/container or the
//!   cdev with iommufd ([`open_device`], [`OpenMode`], [`OpenedDevice`], [`Handles`]).
//!
//! A VMM that already holds the device fd (Cloud Hypervisor's `vfio_fds`, say) skips [`open`] and
//! wraps it with [`KernelDevice::from_fd`].

pub mod device;
pub mod ioctls;
pub mod open;

pub use device::{KernelDevice, KernelSession, READ_WAIT};
pub use ioctls::RegionInfo;
pub use open::{Handles, OpenMode, OpenedDevice, Opener, SysfsInfo, inspect, open_device};
