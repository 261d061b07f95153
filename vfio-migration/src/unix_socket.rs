//! A UNIX socket that only its owner can reach, which never replaces a live one.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Listen on the UNIX socket `path`, created with mode 0600: bound inside a private directory,
/// made 0600, then linked into place, so nobody connects before the mode is set and linking never
/// replaces an existing file. A path where something still listens is never replaced (a
/// connection is tried first; the error names `who`, e.g. "a receiver"); a socket file nobody
/// listens on is.
pub fn bind_private(path: &Path, who: &str) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: {who} is already listening on this socket", path.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)?,
            Err(_) => {}
        }
    }
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = parent.join(format!(".vm{:x}.{n:x}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let tmp = dir.join("s");
    let result = UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&tmp, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    result
}
