//! Opening a VFIO device from its sysfs path, through the legacy group/container or the cdev with
//! iommufd.
//!
//! - Group path: the IOMMU group from the `iommu_group` symlink, `/dev/vfio/N`, a type1v2
//!   container (`/dev/vfio/vfio`), then `VFIO_GROUP_GET_DEVICE_FD` with the device name (PCI
//!   address or mdev UUID).
//! - Cdev path: `vfio-dev/vfioN` under the sysfs path, `/dev/vfio/devices/vfioN`, `/dev/iommu`,
//!   `VFIO_DEVICE_BIND_IOMMUFD`, `IOMMU_IOAS_ALLOC`, `VFIO_DEVICE_ATTACH_IOMMUFD_PT`.
//!
//! The result is an [`OpenedDevice`]: the [`KernelDevice`] and the [`Handles`] that must stay
//! open with it (and that the IOMMU dirty trackers use).

use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use vfio_bindings::bindings::vfio::{VFIO_API_VERSION, VFIO_GROUP_FLAGS_VIABLE, VFIO_TYPE1v2_IOMMU};

use super::device::KernelDevice;
use super::ioctls;
use crate::device::{DeviceError, DeviceIdentity, Operation};

/// Which way to open a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpenMode {
    /// The cdev with iommufd when the device has one, else the legacy group.
    #[default]
    Auto,
    /// The legacy group and a type1v2 container.
    Group,
    /// The cdev (`/dev/vfio/devices/vfioN`) with iommufd.
    Cdev,
}

impl fmt::Display for OpenMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpenMode::Auto => "auto",
            OpenMode::Group => "group",
            OpenMode::Cdev => "cdev",
        })
    }
}

impl FromStr for OpenMode {
    type Err = String;

    /// `auto`, `group` (or `legacy`, `container`), `cdev` (or `iommufd`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(OpenMode::Auto),
            "group" | "legacy" | "container" => Ok(OpenMode::Group),
            "cdev" | "iommufd" => Ok(OpenMode::Cdev),
            other => Err(format!("unknown open mode {other:?} (expected auto, group or cdev)")),
        }
    }
}

/// What keeps an opened device's IOMMU context alive. Drop it only after the device.
#[derive(Debug)]
pub enum Handles {
    /// Legacy path: the group and its type1v2 container.
    Group {
        /// `/dev/vfio/N` (declared first: it drops, leaving the container, before the container).
        group: File,
        /// `/dev/vfio/vfio`, set to `VFIO_TYPE1v2_IOMMU`.
        container: File,
        /// The IOMMU group number N.
        group_id: u32,
    },
    /// Cdev path: the iommufd and the IOAS the device is attached to.
    Iommufd {
        /// `/dev/iommu`.
        iommufd: File,
        /// The IO address space the device is attached to.
        ioas_id: u32,
        /// The iommufd device id from `VFIO_DEVICE_BIND_IOMMUFD`.
        dev_id: u32,
    },
}

impl Handles {
    /// Which way the device was opened ([`OpenMode::Group`] or [`OpenMode::Cdev`]).
    pub fn mode(&self) -> OpenMode {
        match self {
            Handles::Group { .. } => OpenMode::Group,
            Handles::Iommufd { .. } => OpenMode::Cdev,
        }
    }

    /// The type1v2 container fd (for `VFIO_IOMMU_DIRTY_PAGES` and DMA mapping), group path only.
    pub fn container_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Handles::Group { container, .. } => Some(container.as_fd()),
            Handles::Iommufd { .. } => None,
        }
    }

    /// The group fd, group path only.
    pub fn group_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Handles::Group { group, .. } => Some(group.as_fd()),
            Handles::Iommufd { .. } => None,
        }
    }

    /// The `/dev/iommu` fd (for IOAS mapping and HWPT dirty tracking), cdev path only.
    pub fn iommufd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Handles::Iommufd { iommufd, .. } => Some(iommufd.as_fd()),
            Handles::Group { .. } => None,
        }
    }

    /// The IOAS id the device is attached to, cdev path only.
    pub fn ioas_id(&self) -> Option<u32> {
        match self {
            Handles::Iommufd { ioas_id, .. } => Some(*ioas_id),
            Handles::Group { .. } => None,
        }
    }

    /// The iommufd device id, cdev path only.
    pub fn dev_id(&self) -> Option<u32> {
        match self {
            Handles::Iommufd { dev_id, .. } => Some(*dev_id),
            Handles::Group { .. } => None,
        }
    }
}

/// An opened device and the handles that keep its IOMMU context alive.
///
/// Fields drop in order: the device fd closes before its group, container or iommufd.
#[derive(Debug)]
pub struct OpenedDevice {
    /// The device.
    pub device: KernelDevice,
    /// The group and container, or the iommufd and IOAS.
    pub handles: Handles,
}

/// Opens devices; the `/dev` root is configurable for tests.
#[derive(Clone, Debug)]
pub struct Opener {
    dev_root: PathBuf,
}

impl Default for Opener {
    fn default() -> Self {
        Self {
            dev_root: PathBuf::from("/dev"),
        }
    }
}

/// Open the device at `sysfs` (`/sys/bus/pci/devices/0000:00:04.0`, `/sys/bus/mdev/devices/UUID`)
/// the way `mode` says.
///
/// ```no_run
/// use std::path::Path;
/// use vfio_migration::kernel::{open_device, OpenMode};
///
/// let opened = open_device(Path::new("/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"), OpenMode::Auto)?;
/// let mut device = opened.device;
/// device.reset_if_not_running()?;
/// # Ok::<(), vfio_migration::DeviceError>(())
/// ```
pub fn open_device(sysfs: &Path, mode: OpenMode) -> Result<OpenedDevice, DeviceError> {
    Opener::default().open(sysfs, mode)
}

/// Attach a description of the step to an I/O error, keeping its kind.
fn step(what: impl fmt::Display, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| step(format_args!("open {}", path.display()), e))
}

impl Opener {
    /// An opener using `dev_root` instead of `/dev`.
    pub fn with_dev_root(dev_root: impl Into<PathBuf>) -> Self {
        Self {
            dev_root: dev_root.into(),
        }
    }

    /// Whether the device at `sysfs` can be opened through its cdev: it has `vfio-dev/vfioN`,
    /// and `/dev/vfio/devices/vfioN` and `/dev/iommu` exist.
    pub fn cdev_available(&self, sysfs: &Path) -> bool {
        matches!(cdev_name(sysfs), Ok(Some(n)) if self.dev_root.join("vfio/devices").join(&n).exists())
            && self.dev_root.join("iommu").exists()
    }

    /// Open the device at `sysfs` the way `mode` says. In [`OpenMode::Auto`] the cdev is tried
    /// first when available, then the group; the error names both attempts.
    pub fn open(&self, sysfs: &Path, mode: OpenMode) -> Result<OpenedDevice, DeviceError> {
        let who = sysfs.display().to_string();
        let open_err = |e: io::Error| DeviceError::io(who.clone(), Operation::Open, e);
        let name = device_name(sysfs).map_err(open_err)?;
        let identity = read_identity(sysfs).map_err(|e| DeviceError::io(who.clone(), Operation::Identity, e))?;

        let (fd, handles) = match mode {
            OpenMode::Group => self.open_group(sysfs, &name).map_err(open_err)?,
            OpenMode::Cdev => self.open_cdev(sysfs).map_err(open_err)?,
            OpenMode::Auto if self.cdev_available(sysfs) => match self.open_cdev(sysfs) {
                Ok(opened) => opened,
                Err(cdev_err) => {
                    log::warn!("{who}: cdev path failed ({cdev_err}); trying the group path");
                    self.open_group(sysfs, &name).map_err(|group_err| {
                        open_err(io::Error::new(
                            group_err.kind(),
                            format!("{cdev_err}; then {group_err}"),
                        ))
                    })?
                }
            },
            OpenMode::Auto => self.open_group(sysfs, &name).map_err(open_err)?,
        };
        log::debug!("{who}: opened as {name} through the {} path", handles.mode());
        Ok(OpenedDevice {
            device: KernelDevice::from_fd(fd, name, identity),
            handles,
        })
    }

    /// The legacy path.
    fn open_group(&self, sysfs: &Path, name: &str) -> io::Result<(std::os::fd::OwnedFd, Handles)> {
        let ctx = |e| step("legacy group path", e);
        let group_id = iommu_group(sysfs).map_err(ctx)?;
        let group_path = self.dev_root.join("vfio").join(group_id.to_string());
        let group = open_rw(&group_path).map_err(ctx)?;
        let status = ioctls::group_status(group.as_fd()).map_err(|e| {
            ctx(step(
                format_args!("VFIO_GROUP_GET_STATUS on {}", group_path.display()),
                e,
            ))
        })?;
        if status & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(ctx(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "group {group_id} is not viable (flags {status:#x}): every device in it must be bound to a VFIO driver"
                ),
            )));
        }

        let container_path = self.dev_root.join("vfio/vfio");
        let container = open_rw(&container_path).map_err(ctx)?;
        let version = ioctls::get_api_version(container.as_fd()).map_err(|e| ctx(step("VFIO_GET_API_VERSION", e)))?;
        if version != VFIO_API_VERSION as i32 {
            return Err(ctx(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("VFIO API version {version}, expected {VFIO_API_VERSION}"),
            )));
        }
        let type1v2 = ioctls::check_extension(container.as_fd(), VFIO_TYPE1v2_IOMMU)
            .map_err(|e| ctx(step("VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU)", e)))?;
        if !type1v2 {
            return Err(ctx(io::Error::new(
                io::ErrorKind::Unsupported,
                "the container does not support VFIO_TYPE1v2_IOMMU",
            )));
        }
        ioctls::group_set_container(group.as_fd(), container.as_fd())
            .map_err(|e| ctx(step(format_args!("VFIO_GROUP_SET_CONTAINER (group {group_id})"), e)))?;
        ioctls::set_iommu(container.as_fd(), VFIO_TYPE1v2_IOMMU)
            .map_err(|e| ctx(step("VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU)", e)))?;
        let cname = CString::new(name)
            .map_err(|_| ctx(io::Error::new(io::ErrorKind::InvalidInput, "device name contains NUL")))?;
        let fd = ioctls::group_get_device_fd(group.as_fd(), &cname).map_err(|e| {
            ctx(step(
                format_args!("VFIO_GROUP_GET_DEVICE_FD({name:?}) on {}", group_path.display()),
                e,
            ))
        })?;
        Ok((
            fd,
            Handles::Group {
                group,
                container,
                group_id,
            },
        ))
    }

    /// The cdev path.
    fn open_cdev(&self, sysfs: &Path) -> io::Result<(std::os::fd::OwnedFd, Handles)> {
        let ctx = |e| step("cdev path", e);
        let cdev = cdev_name(sysfs).map_err(ctx)?.ok_or_else(|| {
            ctx(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no vfio-dev/vfioN under {}", sysfs.display()),
            ))
        })?;
        let dev_path = self.dev_root.join("vfio/devices").join(&cdev);
        let device = open_rw(&dev_path).map_err(ctx)?;
        let iommu_path = self.dev_root.join("iommu");
        let iommufd = open_rw(&iommu_path).map_err(ctx)?;
        let dev_id = ioctls::bind_iommufd(device.as_fd(), iommufd.as_fd()).map_err(|e| {
            ctx(step(
                format_args!("VFIO_DEVICE_BIND_IOMMUFD on {}", dev_path.display()),
                e,
            ))
        })?;
        let ioas_id = ioctls::ioas_alloc(iommufd.as_fd()).map_err(|e| ctx(step("IOMMU_IOAS_ALLOC", e)))?;
        ioctls::attach_iommufd_pt(device.as_fd(), ioas_id)
            .map_err(|e| ctx(step(format_args!("VFIO_DEVICE_ATTACH_IOMMUFD_PT(ioas {ioas_id})"), e)))?;
        Ok((
            device.into(),
            Handles::Iommufd {
                iommufd,
                ioas_id,
                dev_id,
            },
        ))
    }
}

/// What sysfs tells about a VFIO device, without opening it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysfsInfo {
    /// The device name (PCI address or mdev UUID).
    pub name: String,
    /// What the device is.
    pub identity: DeviceIdentity,
    /// The IOMMU group number, when the device has one.
    pub iommu_group: Option<u32>,
    /// The `vfioN` cdev name, when the device has one.
    pub cdev: Option<String>,
}

/// Read what sysfs tells about the device at `sysfs` (name, identity, IOMMU group, cdev).
pub fn inspect(sysfs: &Path) -> io::Result<SysfsInfo> {
    let has_group = fs::symlink_metadata(sysfs.join("iommu_group")).is_ok();
    Ok(SysfsInfo {
        name: device_name(sysfs)?,
        identity: read_identity(sysfs)?,
        iommu_group: if has_group { Some(iommu_group(sysfs)?) } else { None },
        cdev: cdev_name(sysfs)?,
    })
}

/// The device name VFIO knows it by: the last component of the sysfs path (PCI address or mdev
/// UUID).
pub fn device_name(sysfs: &Path) -> io::Result<String> {
    sysfs
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} does not end in a device name", sysfs.display()),
            )
        })
}

/// The last component of the target of the symlink `link`.
fn link_basename(link: &Path) -> io::Result<String> {
    let target = fs::read_link(link).map_err(|e| step(format_args!("read link {}", link.display()), e))?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} points at {}", link.display(), target.display()),
            )
        })
}

/// The IOMMU group number, from the `iommu_group` symlink.
pub fn iommu_group(sysfs: &Path) -> io::Result<u32> {
    let link = sysfs.join("iommu_group");
    let base = link_basename(&link)?;
    base.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} points at group {base:?}, not a number", link.display()),
        )
    })
}

/// The `vfioN` cdev name under `vfio-dev/`, if the device has one.
pub fn cdev_name(sysfs: &Path) -> io::Result<Option<String>> {
    let dir = sysfs.join("vfio-dev");
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(step(format_args!("read {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| step(format_args!("read {}", dir.display()), e))?;
        if let Some(name) = entry.file_name().to_str() {
            let is_cdev = name
                .strip_prefix("vfio")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if is_cdev {
                return Ok(Some(name.to_owned()));
            }
        }
    }
    Ok(None)
}

/// Parse a sysfs hex attribute such as `0x8086\n`.
fn read_hex_u16(path: &Path) -> io::Result<u16> {
    let text = fs::read_to_string(path).map_err(|e| step(format_args!("read {}", path.display()), e))?;
    let t = text.trim();
    let digits = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    u16::from_str_radix(digits, 16).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} holds {t:?}, not a 16-bit hex number", path.display()),
        )
    })
}

/// What the device is, from sysfs: an mdev's type (basename of the `mdev_type` link, e.g.
/// `mtty-2`), a PCI function's IDs (`vendor`, `device`, `subsystem_vendor`, `subsystem_device`),
/// else [`DeviceIdentity::Unknown`].
pub fn read_identity(sysfs: &Path) -> io::Result<DeviceIdentity> {
    let mdev_type = sysfs.join("mdev_type");
    if fs::symlink_metadata(&mdev_type).is_ok() {
        return Ok(DeviceIdentity::Mdev {
            mdev_type: link_basename(&mdev_type)?,
        });
    }
    if sysfs.join("vendor").exists() {
        return Ok(DeviceIdentity::Pci {
            vendor: read_hex_u16(&sysfs.join("vendor"))?,
            device: read_hex_u16(&sysfs.join("device"))?,
            subsystem_vendor: read_hex_u16(&sysfs.join("subsystem_vendor"))?,
            subsystem_device: read_hex_u16(&sysfs.join("subsystem_device"))?,
        });
    }
    Ok(DeviceIdentity::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{ErrorKind, MigrationDevice};
    use crate::kernel::ioctls::sys::{self, Call, reply, reply_errno, reply_ok, take_calls};
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::fs::symlink;

    const UUID: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";

    /// A fake sysfs mdev under `root/sys` and an empty fake `/dev` under `root/dev`.
    fn fake_mdev(root: &Path) -> PathBuf {
        let dev = root.join("sys/devices/virtual/mtty/mtty").join(UUID);
        fs::create_dir_all(dev.join("vfio-dev/vfio3")).unwrap();
        fs::create_dir_all(root.join("sys/kernel/iommu_groups/7")).unwrap();
        symlink("../../../../kernel/iommu_groups/7", dev.join("iommu_group")).unwrap();
        symlink("../mdev_supported_types/mtty-2", dev.join("mdev_type")).unwrap();
        fs::create_dir_all(root.join("dev/vfio/devices")).unwrap();
        dev
    }

    fn fake_pci(root: &Path) -> PathBuf {
        let dev = root.join("sys/devices/pci0000:00/0000:00:04.0");
        fs::create_dir_all(&dev).unwrap();
        for (attr, v) in [
            ("vendor", "0x1b36\n"),
            ("device", "0x0005\n"),
            ("subsystem_vendor", "0x1af4\n"),
            ("subsystem_device", "0x1100\n"),
        ] {
            fs::write(dev.join(attr), v).unwrap();
        }
        symlink("../../../kernel/iommu_groups/12", dev.join("iommu_group")).unwrap();
        dev
    }

    #[test]
    fn sysfs_of_an_mdev() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = fake_mdev(tmp.path());
        assert_eq!(device_name(&dev).unwrap(), UUID);
        assert_eq!(iommu_group(&dev).unwrap(), 7);
        assert_eq!(cdev_name(&dev).unwrap().as_deref(), Some("vfio3"));
        assert_eq!(
            read_identity(&dev).unwrap(),
            DeviceIdentity::Mdev {
                mdev_type: "mtty-2".into()
            }
        );
    }

    #[test]
    fn inspect_reads_everything_sysfs_tells() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = fake_mdev(tmp.path());
        assert_eq!(
            inspect(&dev).unwrap(),
            SysfsInfo {
                name: UUID.into(),
                identity: DeviceIdentity::Mdev {
                    mdev_type: "mtty-2".into()
                },
                iommu_group: Some(7),
                cdev: Some("vfio3".into()),
            }
        );
        let pci = fake_pci(tmp.path());
        fs::remove_file(pci.join("iommu_group")).unwrap();
        let info = inspect(&pci).unwrap();
        assert_eq!((info.iommu_group, info.cdev), (None, None));
    }

    #[test]
    fn sysfs_of_a_pci_function() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = fake_pci(tmp.path());
        assert_eq!(device_name(&dev).unwrap(), "0000:00:04.0");
        assert_eq!(iommu_group(&dev).unwrap(), 12);
        assert_eq!(cdev_name(&dev).unwrap(), None);
        assert_eq!(
            read_identity(&dev).unwrap(),
            DeviceIdentity::Pci {
                vendor: 0x1b36,
                device: 0x0005,
                subsystem_vendor: 0x1af4,
                subsystem_device: 0x1100
            }
        );
        assert!(!Opener::with_dev_root(tmp.path().join("dev")).cdev_available(&dev));
    }

    #[test]
    fn bad_sysfs_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = fake_pci(tmp.path());
        fs::write(dev.join("device"), "0xzz\n").unwrap();
        let e = read_identity(&dev).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("device"), "{e}");
        fs::write(dev.join("device"), "0x10000\n").unwrap();
        assert!(read_identity(&dev).is_err());

        fs::remove_file(dev.join("iommu_group")).unwrap();
        symlink("../groups/abc", dev.join("iommu_group")).unwrap();
        assert_eq!(iommu_group(&dev).unwrap_err().kind(), io::ErrorKind::InvalidData);
        fs::remove_file(dev.join("iommu_group")).unwrap();
        assert_eq!(iommu_group(&dev).unwrap_err().kind(), io::ErrorKind::NotFound);

        let plain = tmp.path().join("nothing");
        fs::create_dir(&plain).unwrap();
        assert_eq!(read_identity(&plain).unwrap(), DeviceIdentity::Unknown);
        // vfio-dev entries that are not vfioN are ignored.
        fs::create_dir_all(plain.join("vfio-dev/vfio")).unwrap();
        fs::create_dir_all(plain.join("vfio-dev/vfioX")).unwrap();
        assert_eq!(cdev_name(&plain).unwrap(), None);
    }

    #[test]
    fn open_modes_parse() {
        assert_eq!("auto".parse::<OpenMode>().unwrap(), OpenMode::Auto);
        assert_eq!("Group".parse::<OpenMode>().unwrap(), OpenMode::Group);
        assert_eq!("cdev".parse::<OpenMode>().unwrap(), OpenMode::Cdev);
        assert!("vfio".parse::<OpenMode>().is_err());
        assert_eq!(OpenMode::Cdev.to_string(), "cdev");
    }

    #[test]
    fn group_path_issues_the_container_ioctls_in_order() {
        sys::reset();
        let tmp = tempfile::tempdir().unwrap();
        let dev = fake_mdev(tmp.path());
        let dev_root = tmp.path().join("dev");
        fs::write(dev_root.join("vfio/7"), "").unwrap();
        fs::write(dev_root.join("vfio/vfio"), "").unwrap();

        reply(|arg| {
            arg[4..8].copy_from_slice(&VFIO_GROUP_FLAGS_VIABLE.to_ne_bytes());
            Ok(0)
        }); // GET_STATUS
        reply_ok(0); // GET_API_VERSION
        reply_ok(1); // CHECK_EXTENSION
        reply_ok(0); // SET_CONTAINER
        reply_ok(0); // SET_IOMMU
        let devfd = File::open("/dev/null").unwrap().into_raw_fd();
        reply_ok(devfd); // GET_DEVICE_FD
        let opened = Opener::with_dev_root(&dev_root).open(&dev, OpenMode::Group).unwrap();
        let calls = take_calls();
        let reqs: Vec<_> = calls
            .iter()
            .map(|c| match c {
                Call::Ioctl { req, .. } | Call::Val { req, .. } | Call::None { req, .. } => *req,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(reqs, vec![0x3B67, 0x3B64, 0x3B65, 0x3B68, 0x3B66, 0x3B6A]);
        let container = opened.handles.container_fd().unwrap().as_raw_fd();
        assert_eq!(
            calls[2],
            Call::Val {
                fd: container,
                req: 0x3B65,
                val: 3
            }
        );
        assert_eq!(
            calls[4],
            Call::Val {
                fd: container,
                req: 0x3B66,
                val: 3
            }
        );
        match &calls[5] {
            Call::Ioctl { arg, fd, .. } => {
                assert_eq!(*fd, opened.handles.group_fd().unwrap().as_raw_fd());
                assert_eq!(arg, &[UUID.as_bytes(), b"\0"].concat());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(opened.device.fd().as_raw_fd(), devfd);
        assert_eq!(opened.device.name(), UUID);
        assert_eq!(
            opened.device.identity(),
            DeviceIdentity::Mdev {
                mdev_type: "mtty-2".into()
            }
        );
        assert_eq!(opened.handles.mode(), OpenMode::Group);
        assert!(opened.handles.iommufd().is_none());
        assert!(matches!(opened.handles, Handles::Group { group_id: 7, .. }));
    }

    #[test]
    fn a_group_that_is_not_viable_is_refused() {
        sys::reset();
        let tmp = tempfile::tempdir().unwrap();
        let dev = fake_mdev(tmp.path());
        let dev_root = tmp.path().join("dev");
        fs::write(dev_root.join("vfio/7"), "").unwrap();
        reply_ok(0); // GET_STATUS: flags 0
        let e = Opener::with_dev_root(&dev_root)
            .open(&dev, OpenMode::Group)
            .unwrap_err();
        assert_eq!(e.op, Operation::Open);
        assert_eq!(e.device, dev.display().to_string());
        assert!(e.to_string().contains("not viable"), "{e}");
        take_calls();
    }

    #[test]
    fn cdev_path_binds_allocates_and_attaches() {
        sys::reset();
        let tmp = tempfile::tempdir().unwrap();
        let dev = fake_mdev(tmp.path());
        let dev_root = tmp.path().join("dev");
        fs::write(dev_root.join("vfio/devices/vfio3"), "").unwrap();
        fs::write(dev_root.join("iommu"), "").unwrap();
        let opener = Opener::with_dev_root(&dev_root);
        assert!(opener.cdev_available(&dev));

        reply(|arg| {
            arg[12..16].copy_from_slice(&1u32.to_ne_bytes());
            Ok(0)
        }); // BIND: devid 1
        reply(|arg| {
            arg[8..12].copy_from_slice(&2u32.to_ne_bytes());
            Ok(0)
        }); // IOAS_ALLOC: 2
        reply_ok(0); // ATTACH
        let opened = opener.open(&dev, OpenMode::Auto).unwrap();
        let calls = take_calls();
        let dfd = opened.device.fd().as_raw_fd();
        let ifd = opened.handles.iommufd().unwrap().as_raw_fd();
        match &calls[..] {
            [
                Call::Ioctl {
                    fd: f1,
                    req: 0x3B76,
                    arg: bind,
                },
                Call::Ioctl {
                    fd: f2, req: 0x3B81, ..
                },
                Call::Ioctl {
                    fd: f3,
                    req: 0x3B77,
                    arg: attach,
                },
            ] => {
                assert_eq!((*f1, *f2, *f3), (dfd, ifd, dfd));
                assert_eq!(&bind[8..12], &ifd.to_ne_bytes());
                assert_eq!(&attach[8..12], &2u32.to_ne_bytes());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(opened.handles.mode(), OpenMode::Cdev);
        assert_eq!((opened.handles.ioas_id(), opened.handles.dev_id()), (Some(2), Some(1)));
        assert!(opened.handles.container_fd().is_none());
    }

    #[test]
    fn auto_falls_back_to_the_group_and_names_both_failures() {
        sys::reset();
        let tmp = tempfile::tempdir().unwrap();
        let dev = fake_mdev(tmp.path());
        let dev_root = tmp.path().join("dev");
        fs::write(dev_root.join("vfio/devices/vfio3"), "").unwrap();
        fs::write(dev_root.join("iommu"), "").unwrap();
        reply_errno(libc::EBUSY); // BIND fails; then /dev/vfio/7 does not exist
        let e = Opener::with_dev_root(&dev_root).open(&dev, OpenMode::Auto).unwrap_err();
        take_calls();
        assert_eq!(e.op, Operation::Open);
        let msg = e.to_string();
        assert!(msg.contains("cdev path: VFIO_DEVICE_BIND_IOMMUFD"), "{msg}");
        assert!(msg.contains("legacy group path: open "), "{msg}");
        assert!(msg.contains("vfio/7"), "{msg}");
        assert!(matches!(e.kind, ErrorKind::Os(_)));

        // Cdev asked for but absent.
        let pci = fake_pci(tmp.path());
        let e = Opener::with_dev_root(&dev_root).open(&pci, OpenMode::Cdev).unwrap_err();
        assert!(e.to_string().contains("no vfio-dev/vfioN"), "{e}");
        assert!(take_calls().is_empty());
    }
}
