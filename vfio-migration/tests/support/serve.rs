//! Our vfio-user server in a thread: the emulated device a test's vfio-user client attaches.
//!
//! Shared by `vfio_user_ch_client.rs` and `vfio_user_vmm_client.rs` (`#[path]`-included).

use std::path::{Path, PathBuf};

use vfio_migration::MigrationDevice;
use vfio_migration::device::DeviceIdentity;
use vfio_migration::emulated::{EmulatedDevice, EmulatedHandle};
use vfio_migration::vfio_user::{EmulatedModel, Server};

/// Serve `emulated:{spec}` (with its BAR0 model) at `dir/name` in a thread, forever.
pub fn serve(dir: &Path, name: &str, spec: &str) -> (EmulatedHandle, DeviceIdentity, PathBuf) {
    let dev = EmulatedDevice::from_spec(spec).unwrap();
    let handle = dev.handle();
    let identity = dev.identity();
    let path = dir.join(name);
    let listener = vfio_migration::vfio_user::bind(&path).unwrap();
    let model = EmulatedModel::new(handle.clone());
    std::thread::spawn(move || {
        let mut server = Server::new(dev).with_model(model);
        let _ = server.serve(&listener);
    });
    (handle, identity, path)
}
