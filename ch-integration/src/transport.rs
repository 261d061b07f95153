//! `Transportable` for `file://` URLs: the binary device state as a file beside the snapshot.
//!
//! Cloud Hypervisor's snapshot URL names a directory (`file:///path/to/dir`); its own files go
//! there (`config.json`, `state.json`, memory ranges). A device's state stream goes there too,
//! as [`crate::encoding::state_file_name`], so a large state skips base64 and JSON.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{IntegrationError, Step};

/// The directory of a `file://` URL; `None` for any other scheme.
pub fn file_url_dir(url: &str) -> Option<PathBuf> {
    url.strip_prefix("file://").filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// Write a state file at `path` with `write` (through a temporary name, synced, then renamed,
/// so a failed write never leaves a partial file under the real name).
pub fn write_state_file(
    path: &Path,
    write: &mut dyn FnMut(&mut dyn Write) -> Result<(), IntegrationError>,
) -> Result<(), IntegrationError> {
    let tmp = path.with_extension("bin.tmp");
    let io_err = |e: io::Error| IntegrationError::new(path.display().to_string(), Step::Send, e);
    let result = (|| {
        let f = File::create(&tmp).map_err(io_err)?;
        let mut w = io::BufWriter::with_capacity(1 << 20, f);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| io_err(e.into_error()))?;
        f.sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, path).map_err(io_err)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Open a state file that the snapshot says is `len` bytes long (at most `cap`): a shorter file
/// is reported as truncated at the offset where it ends, before anything reads it.
pub fn open_state_file(path: &Path, len: u64, cap: u64) -> io::Result<File> {
    let f = File::open(path)?;
    let actual = f.metadata()?.len();
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {m}", path.display()));
    if len > cap {
        return Err(bad(format!("{len} bytes, more than the {cap}-byte limit")));
    }
    if actual < len {
        return Err(bad(format!(
            "the device-state stream is truncated: the file ends at byte offset {actual}, the snapshot \
             says it holds {len} bytes"
        )));
    }
    if actual > len {
        return Err(bad(format!(
            "{actual} bytes, the snapshot says {len}: bytes after byte offset {len}"
        )));
    }
    Ok(f)
}

/// Read a state file of at most `cap` bytes.
pub fn read_state_file(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len > cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {len} bytes, more than the {cap}-byte limit", path.display()),
        ));
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(cap + 1).read_to_end(&mut out)?;
    if out.len() as u64 > cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: grew past the {cap}-byte limit while read", path.display()),
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
        write_state_file(&p, &mut |w: &mut dyn Write| {
            w.write_all(&[7u8; 100])
                .map_err(|e| IntegrationError::new("t", Step::Send, e))
        })
        .unwrap();
        assert_eq!(read_state_file(&p, 100).unwrap(), vec![7u8; 100]);
        let e = read_state_file(&p, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
