//! `Transportable` for `file://` URLs: the binary device state as a file beside the snapshot.
//!
//! Cloud Hypervisor's snapshot URL names a directory (`file:///path/to/dir`); its own files go
//! there (`config.json`, `state.json`, memory ranges). A device's binary record goes there too,
//! as [`crate::encoding::state_file_name`], so a large state skips base64 and JSON.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::encoding::{HEADER_LEN, RecordHeader};
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

/// Open a state file of `len` bytes (the length the snapshot records, at most `max` payload
/// bytes plus the header) and read and check its header; the file is left at the payload.
pub fn open_state_file(path: &Path, len: u64, max: u64) -> io::Result<(RecordHeader, File)> {
    let mut f = File::open(path)?;
    let actual = f.metadata()?.len();
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {m}", path.display()));
    if actual != len {
        return Err(bad(format!("{actual} bytes, the snapshot says {len}")));
    }
    if len > max.saturating_add(HEADER_LEN as u64) {
        return Err(bad(format!("{len} bytes, more than the {max}-byte limit")));
    }
    let mut h = [0u8; HEADER_LEN];
    f.read_exact(&mut h)?;
    let header = RecordHeader::parse(&h).map_err(bad)?;
    if header.payload_len.checked_add(HEADER_LEN as u64) != Some(len) {
        return Err(bad(format!(
            "header says {} payload bytes in a {len}-byte file",
            header.payload_len
        )));
    }
    Ok((header, f))
}

/// Read a state file of at most `max` payload bytes (plus the record header).
pub fn read_state_file(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let limit = max.saturating_add(HEADER_LEN as u64);
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
