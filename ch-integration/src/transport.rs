//! `Transportable` for `file://` URLs: the binary device state as a file beside the snapshot.
//!
//! Cloud Hypervisor's snapshot URL names a directory (`file:///path/to/dir`); its own files go
//! there (`config.json`, `state.json`, memory ranges). A device's binary record goes there too,
//! as [`crate::encoding::state_file_name`], so a large state skips base64 and JSON.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The directory of a `file://` URL; `None` for any other scheme.
pub fn file_url_dir(url: &str) -> Option<PathBuf> {
    url.strip_prefix("file://").filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// Write `record` to `path` (through a temporary name, then renamed, then synced).
pub fn write_state_file(path: &Path, record: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("bin.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(record)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Read a state file of at most `max` payload bytes (plus the record header).
pub fn read_state_file(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let limit = max.saturating_add(crate::encoding::HEADER_LEN as u64);
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {len} bytes, more than the {limit}-byte limit", path.display()),
        ));
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: grew past the {limit}-byte limit while read", path.display()),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_files() {
        assert_eq!(file_url_dir("file:///tmp/snap"), Some(PathBuf::from("/tmp/snap")));
        assert_eq!(file_url_dir("tcp:1.2.3.4:5"), None);
        assert_eq!(file_url_dir("file://"), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_state_file(&p, &[7u8; 100]).unwrap();
        assert_eq!(read_state_file(&p, 100).unwrap(), vec![7u8; 100]);
        let e = read_state_file(&p, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
