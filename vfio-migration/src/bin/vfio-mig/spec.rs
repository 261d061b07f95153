//! DEVICE arguments: `emulated[:params]`, `vfio-user:SOCKET` or the sysfs path of a VFIO device.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use vfio_migration::MigrationDevice;
use vfio_migration::emulated::EmulatedDevice;
use vfio_migration::kernel::{OpenMode, OpenedDevice, open_device};
use vfio_migration::vfio_user::VfioUserDevice;

/// How sysfs paths are opened (the global `--open-mode`), set once by `main`.
static OPEN_MODE: OnceLock<OpenMode> = OnceLock::new();

/// Whether devices are reset after opening when they are not RUNNING (the global
/// `--reset-first`), set once by `main`.
static RESET_FIRST: OnceLock<bool> = OnceLock::new();

/// Set how sysfs paths are opened.
pub fn set_open_mode(mode: OpenMode) {
    let _ = OPEN_MODE.set(mode);
}

/// Set whether devices are reset after opening when they are not RUNNING (`--reset-first`).
pub fn set_reset_first(reset: bool) {
    let _ = RESET_FIRST.set(reset);
}

/// Whether `--reset-first` was given.
pub fn reset_first() -> bool {
    RESET_FIRST.get().copied().unwrap_or(false)
}

/// An opened DEVICE argument.
pub enum Opened {
    /// The built-in emulated device.
    Emulated(EmulatedDevice),
    /// A real VFIO device with the group/container or iommufd handles that keep it usable.
    Kernel(Box<OpenedDevice>),
    /// A device behind a vfio-user server's socket.
    VfioUser(Box<VfioUserDevice>),
}

impl Opened {
    /// The device.
    pub fn dev(&mut self) -> &mut dyn MigrationDevice {
        match self {
            Opened::Emulated(d) => d,
            Opened::Kernel(k) => &mut k.device,
            Opened::VfioUser(d) => d.as_mut(),
        }
    }

    /// Reset the device when it is not RUNNING; returns the state it was in when it was reset.
    pub fn reset_if_not_running(&mut self) -> anyhow::Result<Option<vfio_migration::DeviceState>> {
        let dev = self.dev();
        let name = dev.name().to_string();
        let state = dev.state().with_context(|| format!("{name}: read the state"))?;
        if state == vfio_migration::DeviceState::Running {
            return Ok(None);
        }
        dev.reset().with_context(|| format!("{name}: reset from {state}"))?;
        Ok(Some(state))
    }

    /// The emulated device, when it is one.
    pub fn emulated(&self) -> Option<&EmulatedDevice> {
        match self {
            Opened::Emulated(d) => Some(d),
            Opened::Kernel(_) | Opened::VfioUser(_) => None,
        }
    }
}

/// The prefix of a vfio-user DEVICE argument (`vfio-user:/path/to.sock`).
pub const VFIO_USER: &str = "vfio-user:";

/// Open one DEVICE argument. The device is not changed: a device another user left outside
/// RUNNING stays where it is, unless `--reset-first` was given (see [`open_as_is`]).
pub fn open(spec: &str) -> anyhow::Result<Opened> {
    let mut opened = open_as_is(spec)?;
    if reset_first()
        && let Some(was) = opened.reset_if_not_running()?
    {
        log::warn!("{spec}: was {was} when opened; reset it to RUNNING (--reset-first)");
    }
    Ok(opened)
}

/// Open one DEVICE argument and never change it, whatever `--reset-first` says.
pub fn open_as_is(spec: &str) -> anyhow::Result<Opened> {
    if let Some(rest) = spec.strip_prefix("emulated") {
        let params = match rest.strip_prefix(':') {
            Some(p) => p,
            None if rest.is_empty() => "",
            None => bail!("bad device {spec:?}: expected emulated[:key=value,...] or a sysfs path"),
        };
        let dev = EmulatedDevice::from_spec(params).with_context(|| format!("device {spec:?}"))?;
        return Ok(Opened::Emulated(dev));
    }
    if let Some(socket) = spec.strip_prefix(VFIO_USER) {
        if socket.is_empty() {
            bail!("bad device {spec:?}: expected vfio-user:PATH, the socket of a vfio-user server");
        }
        // Connecting negotiates the protocol and reads the state; it never changes the device.
        let dev = VfioUserDevice::connect(Path::new(socket))?;
        return Ok(Opened::VfioUser(Box::new(dev)));
    }
    if spec.starts_with('/') {
        if !Path::new(spec).exists() {
            bail!("{spec}: no such device (expected the sysfs path of a VFIO device, e.g. /sys/bus/mdev/devices/UUID)");
        }
        let mode = OPEN_MODE.get().copied().unwrap_or_default();
        // Opening never changes the device: some drivers (mtty) keep their migration state across
        // close, and that state is what `probe` reports and what `load` refuses to overwrite.
        let opened = open_device(Path::new(spec), mode)?;
        return Ok(Opened::Kernel(Box::new(opened)));
    }
    bail!(
        "bad device {spec:?}: expected emulated[:key=value,...], vfio-user:SOCKET or a sysfs path such as \
         /sys/bus/pci/devices/0000:03:00.1"
    )
}

/// Open a comma-separated list of DEVICE arguments. Commas inside emulated parameters are
/// kept: a new device starts only at `emulated`, `vfio-user:` or `/`.
pub fn open_list(list: &str) -> anyhow::Result<Vec<Opened>> {
    split_list(list).iter().map(|s| open(s)).collect()
}

fn split_list(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in list.split(',') {
        let starts_device = part.starts_with("emulated") || part.starts_with(VFIO_USER) || part.starts_with('/');
        match out.last_mut() {
            Some(last) if !starts_device => {
                last.push(',');
                last.push_str(part);
            }
            _ => out.push(part.to_string()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_at_device_starts_only() {
        assert_eq!(
            split_list("emulated:size=1M,seed=2,emulated,/sys/bus/mdev/devices/x"),
            vec!["emulated:size=1M,seed=2", "emulated", "/sys/bus/mdev/devices/x"]
        );
        assert_eq!(
            split_list("vfio-user:/tmp/a.sock,emulated:size=1M,seed=2,vfio-user:/tmp/b.sock"),
            vec![
                "vfio-user:/tmp/a.sock",
                "emulated:size=1M,seed=2",
                "vfio-user:/tmp/b.sock"
            ]
        );
    }

    #[test]
    fn bad_specs_are_explained() {
        let e = open("emulatedx").err().unwrap().to_string();
        assert!(e.contains("expected emulated"), "{e}");
        let e = format!("{:#}", open("emulated:size=banana").err().unwrap());
        assert!(e.contains("size"), "{e}");
        assert!(open("nonsense").is_err());
        let e = format!("{:#}", open("vfio-user:").err().unwrap());
        assert!(e.contains("vfio-user:PATH"), "{e}");
        let e = format!("{:#}", open("vfio-user:/nonexistent/x.sock").err().unwrap());
        assert!(e.contains("vfio-user:/nonexistent/x.sock: open"), "{e}");
    }
}
