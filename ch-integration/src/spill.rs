//! A FIFO byte buffer held in memory up to a cap, spilling to an unnamed temporary file past it.
//!
//! Device state read during pre-copy waits here until it is sent (the iterative protocol) or
//! put into the snapshot; a device with a multi-GB state must not pin that much memory.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Bytes appended at the back and taken from the front, in order.
#[derive(Debug)]
pub struct SpillBuffer {
    cap: usize,
    dir: Option<PathBuf>,
    mem: Vec<u8>,
    mem_pos: usize,
    file: Option<File>,
    file_read: u64,
    file_len: u64,
    total_in: u64,
}

impl SpillBuffer {
    /// A buffer keeping at most `cap` bytes in memory; the rest goes to a temporary file in
    /// `dir` (the system's temporary directory when `None`).
    pub fn new(cap: usize, dir: Option<PathBuf>) -> Self {
        Self {
            cap,
            dir,
            mem: Vec::new(),
            mem_pos: 0,
            file: None,
            file_read: 0,
            file_len: 0,
            total_in: 0,
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> u64 {
        (self.mem.len() - self.mem_pos) as u64 + (self.file_len - self.file_read)
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes ever appended (the position of the next byte in the device's stream).
    pub fn total_in(&self) -> u64 {
        self.total_in
    }

    /// Whether part of the data is in the file.
    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }

    /// Append `data`.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if self.file.is_none() && self.mem.len() - self.mem_pos + data.len() > self.cap {
            let file = match &self.dir {
                Some(d) => tempfile::tempfile_in(d)?,
                None => tempfile::tempfile()?,
            };
            self.file = Some(file);
            self.file_read = 0;
            self.file_len = 0;
        }
        match &self.file {
            Some(f) => {
                f.write_all_at(data, self.file_len)?;
                self.file_len += data.len() as u64;
            }
            None => {
                if self.mem_pos > 0 && self.mem_pos >= self.mem.len() / 2 {
                    self.mem.drain(..self.mem_pos);
                    self.mem_pos = 0;
                }
                self.mem.extend_from_slice(data);
            }
        }
        self.total_in += data.len() as u64;
        Ok(())
    }

    /// Take up to `max` bytes from the front.
    pub fn take_front(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let in_mem = self.mem.len() - self.mem_pos;
        if in_mem > 0 {
            let n = in_mem.min(max);
            let out = self.mem[self.mem_pos..self.mem_pos + n].to_vec();
            self.mem_pos += n;
            if self.mem_pos == self.mem.len() {
                self.mem.clear();
                self.mem_pos = 0;
            }
            return Ok(out);
        }
        let Some(f) = &self.file else {
            return Ok(Vec::new());
        };
        let n = (self.file_len - self.file_read).min(max as u64) as usize;
        let mut out = vec![0u8; n];
        f.read_exact_at(&mut out, self.file_read)?;
        self.file_read += n as u64;
        if self.file_read == self.file_len {
            self.file = None;
            self.file_read = 0;
            self.file_len = 0;
        }
        Ok(out)
    }

    /// Copy everything waiting to `w` without taking it; returns the byte count.
    pub fn copy_to(&self, w: &mut dyn Write) -> io::Result<u64> {
        w.write_all(&self.mem[self.mem_pos..])?;
        if let Some(f) = &self.file {
            let mut buf = vec![0u8; (1 << 20).min((self.file_len - self.file_read) as usize)];
            let mut pos = self.file_read;
            while pos < self.file_len {
                let n = ((self.file_len - pos) as usize).min(buf.len());
                f.read_exact_at(&mut buf[..n], pos)?;
                w.write_all(&buf[..n])?;
                pos += n as u64;
            }
        }
        Ok(self.len())
    }

    /// Drop everything waiting (the stream position is kept).
    pub fn clear(&mut self) {
        self.mem = Vec::new();
        self.mem_pos = 0;
        self.file = None;
        self.file_read = 0;
        self.file_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spills_past_the_cap_and_keeps_order() {
        let mut b = SpillBuffer::new(10, None);
        let data: Vec<u8> = (0..100u8).collect();
        b.append(&data[..6]).unwrap();
        assert!(!b.spilled());
        b.append(&data[6..20]).unwrap();
        assert!(b.spilled());
        b.append(&data[20..]).unwrap();
        assert_eq!(b.len(), 100);
        let mut copy = Vec::new();
        assert_eq!(b.copy_to(&mut copy).unwrap(), 100);
        assert_eq!(copy, data);
        let mut got = Vec::new();
        while !b.is_empty() {
            got.extend(b.take_front(7).unwrap());
        }
        assert_eq!(got, data);
        assert!(!b.spilled());
        b.append(&[1, 2, 3]).unwrap();
        assert!(!b.spilled());
        assert_eq!(b.take_front(10).unwrap(), vec![1, 2, 3]);
        assert_eq!(b.total_in(), 103);
    }
}
