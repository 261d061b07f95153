//! The emulated device's own data stream (opaque to callers, like any device's).
//!
//! All integers are little-endian. A stream is:
//!
//! | part | bytes | layout |
//! |---|---|---|
//! | header | 32 | magic `b"vfioEMUL"`, `u32` format version ([`FORMAT_VERSION`]), `u32` block size, `u64` size, `u64` seed |
//! | block record | 16 + block length | `u32` [`TAG_BLOCK`], `u32` version, `u64` block index, then the block's bytes |
//! | trailer | 24 | `u32` [`TAG_END`], `u32` 0, `u64` number of blocks, `u64` digest of all versions |
//!
//! The header and one record per block (in index order) form the *initial data*. During
//! pre-copy, blocks that change after they were sent are sent again as further records; the
//! last record of a block wins. The trailer comes only at the end of STOP_COPY; it lets the
//! destination tell a complete stream from a short one: on RESUMING -> STOP the destination
//! requires the trailer, a record for every block, and a digest equal to the one of the
//! versions it received.
//!
//! Block bytes are never stored on either side: the source generates them from (seed, index,
//! version) as they are read (see the `content` module), the destination checks them against the same
//! generator as they are written. Both sides work with small fixed buffers and at any read or
//! write size, down to one byte.

use super::config::EmulatedConfig;
use super::content;

/// The first eight bytes of every emulated device stream.
pub const MAGIC: [u8; 8] = *b"vfioEMUL";
/// The version of this format (the header, records, trailer, content generator and digest).
pub const FORMAT_VERSION: u32 = 1;
/// The tag of a block record.
pub const TAG_BLOCK: u32 = 0x4b43_4c42;
/// The tag of the trailer.
pub const TAG_END: u32 = 0x2144_4e45;
/// Header length in bytes.
pub const HEADER_LEN: u64 = 32;
/// Block record header length in bytes (before the block's bytes).
pub const RECORD_HEAD_LEN: u64 = 16;
/// Trailer length in bytes.
pub const TRAILER_LEN: u64 = 24;

/// The digest of a device's content as the trailer carries it.
pub(crate) fn versions_digest(cfg: &EmulatedConfig, versions: &[u32]) -> u64 {
    content::digest(FORMAT_VERSION, cfg.seed, cfg.size, cfg.block_size, versions)
}

/// The length of the record of block `index`.
pub(crate) fn record_len(cfg: &EmulatedConfig, index: u64) -> u64 {
    RECORD_HEAD_LEN + cfg.block_len(index)
}

/// The length of the initial data: the header and one record per block.
pub(crate) fn initial_len(cfg: &EmulatedConfig) -> u64 {
    HEADER_LEN + cfg.blocks() * RECORD_HEAD_LEN + cfg.size
}

/// The length of a complete stream with no block sent twice.
pub(crate) fn full_len(cfg: &EmulatedConfig) -> u64 {
    initial_len(cfg) + TRAILER_LEN
}

fn header_bytes(cfg: &EmulatedConfig) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&cfg.block_size.to_le_bytes());
    h[16..24].copy_from_slice(&cfg.size.to_le_bytes());
    h[24..32].copy_from_slice(&cfg.seed.to_le_bytes());
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// One part of the stream being produced: a short fixed prefix and optional block bytes.
#[derive(Clone, Debug)]
struct Segment {
    prefix: [u8; 32],
    prefix_len: u64,
    key: u64,
    content_len: u64,
    pos: u64,
    /// Part of the initial data (counts towards `initial_bytes`).
    initial: bool,
}

impl Segment {
    fn remaining(&self) -> u64 {
        self.prefix_len + self.content_len - self.pos
    }

    fn header(cfg: &EmulatedConfig) -> Self {
        Self {
            prefix: header_bytes(cfg),
            prefix_len: HEADER_LEN,
            key: 0,
            content_len: 0,
            pos: 0,
            initial: true,
        }
    }

    fn record(cfg: &EmulatedConfig, index: u64, version: u32, initial: bool) -> Self {
        let mut prefix = [0u8; 32];
        prefix[0..4].copy_from_slice(&TAG_BLOCK.to_le_bytes());
        prefix[4..8].copy_from_slice(&version.to_le_bytes());
        prefix[8..16].copy_from_slice(&index.to_le_bytes());
        Self {
            prefix,
            prefix_len: RECORD_HEAD_LEN,
            key: content::block_key(cfg.seed, index, version),
            content_len: cfg.block_len(index),
            pos: 0,
            initial,
        }
    }

    fn trailer(cfg: &EmulatedConfig, versions: &[u32]) -> Self {
        let mut prefix = [0u8; 32];
        prefix[0..4].copy_from_slice(&TAG_END.to_le_bytes());
        prefix[8..16].copy_from_slice(&cfg.blocks().to_le_bytes());
        prefix[16..24].copy_from_slice(&versions_digest(cfg, versions).to_le_bytes());
        Self {
            prefix,
            prefix_len: TRAILER_LEN,
            key: 0,
            content_len: 0,
            pos: 0,
            initial: false,
        }
    }

    /// Copy the next bytes into `out`; returns how many.
    fn emit(&mut self, out: &mut [u8]) -> usize {
        let n = (self.remaining().min(out.len() as u64)) as usize;
        let mut done = 0usize;
        if self.pos < self.prefix_len {
            let p = self.pos as usize;
            let k = (self.prefix_len as usize - p).min(n);
            out[..k].copy_from_slice(&self.prefix[p..p + k]);
            done = k;
        }
        if done < n {
            let off = self.pos + done as u64 - self.prefix_len;
            content::fill(self.key, off, &mut out[done..n]);
        }
        self.pos += n as u64;
        n
    }
}

/// Find the first set bit in `[from, to)`.
fn find_set(bits: &[u64], from: u64, to: u64) -> Option<u64> {
    let mut i = from;
    while i < to {
        let word = bits[(i / 64) as usize] >> (i % 64);
        if word != 0 {
            let at = i + u64::from(word.trailing_zeros());
            return (at < to).then_some(at);
        }
        i = (i / 64 + 1) * 64;
    }
    None
}

/// The source side of a saving session: a cursor over the stream, generated on the fly.
///
/// It holds one bit per block (blocks changed since they were sent) and no block data.
#[derive(Clone, Debug)]
pub(crate) struct SaveCursor {
    header_started: bool,
    /// The next block the initial pass starts; blocks below it have been (or are being) sent.
    initial_next: u64,
    initial_remaining: u64,
    dirty: Vec<u64>,
    dirty_bytes: u64,
    scan: u64,
    current: Option<Segment>,
    trailer_started: bool,
    /// Bytes produced while in STOP_COPY (for the early-end fault).
    pub(crate) stop_copy_bytes: u64,
    /// Reads served so far (for the "nothing now" burst fault).
    pub(crate) reads: u64,
    /// Bytes produced while in pre-copy (for `reinit-after`).
    pub(crate) precopy_bytes: u64,
    /// Whether `reinit-after` already re-initialised this session.
    pub(crate) auto_reinit_done: bool,
}

impl SaveCursor {
    /// A cursor at the start of a new stream.
    pub(crate) fn new(cfg: &EmulatedConfig) -> Self {
        Self {
            header_started: false,
            initial_next: 0,
            initial_remaining: initial_len(cfg),
            dirty: vec![0; cfg.blocks().div_ceil(64) as usize],
            dirty_bytes: 0,
            scan: 0,
            current: None,
            trailer_started: false,
            stop_copy_bytes: 0,
            reads: 0,
            precopy_bytes: 0,
            auto_reinit_done: false,
        }
    }

    /// New initial data (PRE_COPY info v2's re-init): the initial pass over every block starts
    /// again from block 0 with the blocks' current versions (the header is not sent again), so
    /// `initial_bytes` starts over (plus what is left of a record of the old pass being sent);
    /// the dirty blocks are dropped, as the new pass sends them anyway (`dirty_bytes` resets,
    /// but for what is left of a dirty record being sent).
    pub(crate) fn reinit(&mut self, cfg: &EmulatedConfig) {
        let header = if self.header_started { 0 } else { HEADER_LEN };
        let current = self
            .current
            .as_ref()
            .filter(|s| s.initial)
            .map_or(0, Segment::remaining);
        self.initial_next = 0;
        self.initial_remaining = header + current + cfg.blocks() * RECORD_HEAD_LEN + cfg.size;
        self.dirty.fill(0);
        self.dirty_bytes = 0;
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.dirty.capacity() * 8
    }

    /// Block `index` changed: if it was already (being) sent, it must be sent again.
    pub(crate) fn touched(&mut self, cfg: &EmulatedConfig, index: u64) {
        if index >= self.initial_next {
            return; // Not sent yet: the initial pass sends its current version.
        }
        let (w, b) = ((index / 64) as usize, index % 64);
        if let Some(word) = self.dirty.get_mut(w)
            && *word & (1 << b) == 0
        {
            *word |= 1 << b;
            self.dirty_bytes += record_len(cfg, index);
        }
    }

    /// `initial_bytes` and `dirty_bytes` of `struct vfio_precopy_info`.
    pub(crate) fn precopy_info(&self) -> (u64, u64) {
        let current_dirty = self
            .current
            .as_ref()
            .filter(|s| !s.initial)
            .map_or(0, Segment::remaining);
        (self.initial_remaining, self.dirty_bytes + current_dirty)
    }

    /// The bytes a STOP_COPY from here would still produce (trailer included).
    pub(crate) fn remaining_to_end(&self) -> u64 {
        let (initial, dirty) = self.precopy_info();
        initial + dirty + if self.trailer_started { 0 } else { TRAILER_LEN }
    }

    fn next_dirty(&mut self) -> Option<u64> {
        let n = (self.dirty.len() * 64) as u64;
        let found = find_set(&self.dirty, self.scan, n).or_else(|| find_set(&self.dirty, 0, self.scan))?;
        self.dirty[(found / 64) as usize] &= !(1 << (found % 64));
        self.scan = found + 1;
        Some(found)
    }

    /// Produce up to `out.len()` bytes. `stop_copy` allows the trailer. Returns 0 when nothing is
    /// left now (pre-copy) or ever (stop-copy).
    pub(crate) fn fill(&mut self, cfg: &EmulatedConfig, versions: &[u32], stop_copy: bool, out: &mut [u8]) -> usize {
        let mut done = 0usize;
        while done < out.len() {
            if self.current.as_ref().is_none_or(|s| s.remaining() == 0) {
                self.current = if !self.header_started {
                    self.header_started = true;
                    Some(Segment::header(cfg))
                } else if self.initial_next < cfg.blocks() {
                    let i = self.initial_next;
                    self.initial_next += 1;
                    Some(Segment::record(cfg, i, versions[i as usize], true))
                } else if let Some(i) = self.next_dirty() {
                    self.dirty_bytes -= record_len(cfg, i);
                    Some(Segment::record(cfg, i, versions[i as usize], false))
                } else if stop_copy && !self.trailer_started {
                    self.trailer_started = true;
                    Some(Segment::trailer(cfg, versions))
                } else {
                    None
                };
            }
            let Some(seg) = self.current.as_mut() else { break };
            let n = seg.emit(&mut out[done..]);
            if seg.initial {
                self.initial_remaining -= n as u64;
            }
            done += n;
        }
        if stop_copy {
            self.stop_copy_bytes += done as u64;
        } else {
            self.precopy_bytes += done as u64;
        }
        done
    }
}

/// Why a destination refuses a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LoadProblem {
    /// The header does not match this device (refused on write).
    Header(String),
    /// A record or the trailer is wrong (refused on RESUMING -> STOP).
    Content(String),
}

impl LoadProblem {
    pub(crate) fn reason(&self) -> &str {
        match self {
            LoadProblem::Header(s) | LoadProblem::Content(s) => s,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    Header,
    /// A record head or the first 16 bytes of the trailer.
    Head,
    Content {
        index: u64,
        key: u64,
        len: u64,
        pos: u64,
    },
    Digest {
        nblocks: u64,
    },
    Done,
}

/// Why a write was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WriteRefused {
    pub(crate) errno: i32,
    pub(crate) reason: String,
}

/// The destination side of a resuming session: an incremental parser with a 32-byte buffer.
///
/// It stages the received versions (4 bytes per block) and one bit per block received; they
/// replace the device's versions only when the load is accepted.
#[derive(Clone, Debug)]
pub(crate) struct LoadParser {
    expect: Expect,
    buf: [u8; 32],
    have: usize,
    staging: Vec<u32>,
    received: Vec<u64>,
    received_count: u64,
    /// Bytes accepted so far.
    pub(crate) consumed: u64,
    problem: Option<LoadProblem>,
}

impl LoadParser {
    /// A parser expecting a new stream for a device configured as `cfg`.
    pub(crate) fn new(cfg: &EmulatedConfig) -> Self {
        let n = cfg.blocks();
        Self {
            expect: Expect::Header,
            buf: [0; 32],
            have: 0,
            staging: vec![0; n as usize],
            received: vec![0; n.div_ceil(64) as usize],
            received_count: 0,
            consumed: 0,
            problem: None,
        }
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.staging.capacity() * 4 + self.received.capacity() * 8
    }

    fn fail(&mut self, p: LoadProblem) {
        if self.problem.is_none() {
            self.problem = Some(p);
        }
    }

    /// Gather `need` bytes into the buffer; returns bytes taken from `data` and whether full.
    fn gather(&mut self, need: usize, data: &[u8]) -> (usize, bool) {
        let k = (need - self.have).min(data.len());
        self.buf[self.have..self.have + k].copy_from_slice(&data[..k]);
        self.have += k;
        (k, self.have == need)
    }

    fn check_header(&self, cfg: &EmulatedConfig) -> Result<(), String> {
        let b = &self.buf;
        if b[0..8] != MAGIC {
            return Err(format!("not an emulated device stream (magic {:02x?})", &b[0..8]));
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(format!("format version {version}, this device reads {FORMAT_VERSION}"));
        }
        let (block, size, seed) = (u32_at(b, 12), u64_at(b, 16), u64_at(b, 24));
        if size != cfg.size {
            return Err(format!("stream size {size} bytes, this device has {}", cfg.size));
        }
        if block != cfg.block_size {
            return Err(format!("stream block size {block}, this device has {}", cfg.block_size));
        }
        if seed != cfg.seed {
            return Err(format!("stream seed {seed}, this device has {}", cfg.seed));
        }
        Ok(())
    }

    fn on_head(&mut self, cfg: &EmulatedConfig) {
        let tag = u32_at(&self.buf, 0);
        let word = u32_at(&self.buf, 4);
        let num = u64_at(&self.buf, 8);
        match tag {
            TAG_BLOCK if num < cfg.blocks() => {
                self.expect = Expect::Content {
                    index: num,
                    key: content::block_key(cfg.seed, num, word),
                    len: cfg.block_len(num),
                    pos: 0,
                };
                self.staging[num as usize] = word;
                let (w, b) = ((num / 64) as usize, num % 64);
                if self.received[w] & (1 << b) == 0 {
                    self.received[w] |= 1 << b;
                    self.received_count += 1;
                }
            }
            TAG_BLOCK => self.fail(LoadProblem::Content(format!(
                "record for block {num}, the device has {} blocks",
                cfg.blocks()
            ))),
            TAG_END if word == 0 => self.expect = Expect::Digest { nblocks: num },
            _ => self.fail(LoadProblem::Content(format!(
                "unknown record tag {tag:#010x} at stream offset {}",
                self.consumed
            ))),
        }
    }

    fn on_trailer(&mut self, cfg: &EmulatedConfig, nblocks: u64, digest: u64) {
        let problem = if nblocks != cfg.blocks() {
            Some(format!(
                "trailer counts {nblocks} blocks, the device has {}",
                cfg.blocks()
            ))
        } else if self.received_count != nblocks {
            Some(format!(
                "trailer after {} of {nblocks} blocks were received",
                self.received_count
            ))
        } else if versions_digest(cfg, &self.staging) != digest {
            Some("trailer digest does not match the block versions received".to_string())
        } else {
            None
        };
        match problem {
            Some(p) => self.fail(LoadProblem::Content(p)),
            None => self.expect = Expect::Done,
        }
    }

    /// Take bytes of the stream. Returns how many were taken (fewer than given only when the
    /// stream ended inside `data`).
    pub(crate) fn write(&mut self, cfg: &EmulatedConfig, data: &[u8]) -> Result<usize, WriteRefused> {
        match &self.problem {
            Some(LoadProblem::Header(reason)) => {
                return Err(WriteRefused {
                    errno: libc::EINVAL,
                    reason: reason.clone(),
                });
            }
            // A driver that validates on load keeps taking bytes; the load fails at the end.
            Some(LoadProblem::Content(_)) => {
                self.consumed += data.len() as u64;
                return Ok(data.len());
            }
            None => {}
        }
        let mut at = 0usize;
        while at < data.len() && self.problem.is_none() {
            let rest = &data[at..];
            match self.expect {
                Expect::Header => {
                    let (k, full) = self.gather(HEADER_LEN as usize, rest);
                    at += k;
                    if full {
                        self.have = 0;
                        if let Err(reason) = self.check_header(cfg) {
                            self.problem = Some(LoadProblem::Header(reason.clone()));
                            self.consumed += at as u64;
                            return Err(WriteRefused {
                                errno: libc::EINVAL,
                                reason,
                            });
                        }
                        self.expect = Expect::Head;
                    }
                }
                Expect::Head => {
                    let (k, full) = self.gather(RECORD_HEAD_LEN as usize, rest);
                    at += k;
                    if full {
                        self.have = 0;
                        self.on_head(cfg);
                    }
                }
                Expect::Content { index, key, len, pos } => {
                    let k = ((len - pos).min(rest.len() as u64)) as usize;
                    if let Some(bad) = content::first_mismatch(key, pos, &rest[..k]) {
                        self.fail(LoadProblem::Content(format!(
                            "block {index}: byte {} differs from the block's content",
                            pos + bad as u64
                        )));
                    }
                    at += k;
                    self.expect = if pos + k as u64 == len {
                        Expect::Head
                    } else {
                        Expect::Content {
                            index,
                            key,
                            len,
                            pos: pos + k as u64,
                        }
                    };
                }
                Expect::Digest { nblocks } => {
                    let (k, full) = self.gather(8, rest);
                    at += k;
                    if full {
                        self.have = 0;
                        let digest = u64_at(&self.buf, 0);
                        self.on_trailer(cfg, nblocks, digest);
                    }
                }
                Expect::Done => break,
            }
        }
        if self.problem.is_some() {
            // Content problem: take the rest as well (see above).
            at = data.len();
        }
        self.consumed += at as u64;
        if at == 0 && !data.is_empty() {
            return Err(WriteRefused {
                errno: libc::ENOSPC,
                reason: "write past the end of the device state".to_string(),
            });
        }
        Ok(at)
    }

    /// Accept the load: the staged versions when the stream was complete and valid (they are
    /// moved out), else why not (the parser is left as it was).
    pub(crate) fn finish(&mut self) -> Result<Vec<u32>, String> {
        if let Some(p) = &self.problem {
            return Err(p.reason().to_string());
        }
        match self.expect {
            Expect::Done => Ok(std::mem::take(&mut self.staging)),
            Expect::Header => Err(format!(
                "short stream: {} bytes, the header is incomplete",
                self.consumed
            )),
            _ => Err(format!(
                "short stream: ends after {} bytes ({} of {} blocks received, no trailer)",
                self.consumed,
                self.received_count,
                self.staging.len()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(spec: &str) -> EmulatedConfig {
        spec.parse().unwrap()
    }

    fn drain(c: &mut SaveCursor, cfg: &EmulatedConfig, v: &[u32], stop: bool, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = c.fill(cfg, v, stop, &mut buf);
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn layout_of_a_small_stream() {
        let cfg = cfg("size=10,block=4,seed=9");
        let v = vec![0, 5, 0];
        let mut c = SaveCursor::new(&cfg);
        let s = drain(&mut c, &cfg, &v, true, 3);
        assert_eq!(s.len() as u64, full_len(&cfg));
        assert_eq!(s.len(), 32 + 3 * 16 + 10 + 24);
        assert_eq!(&s[0..8], b"vfioEMUL");
        assert_eq!(u32_at(&s, 8), FORMAT_VERSION);
        assert_eq!(u32_at(&s, 12), 4);
        assert_eq!(u64_at(&s, 16), 10);
        assert_eq!(u64_at(&s, 24), 9);
        // Record 1 starts after the header and record 0 (16 + 4 bytes).
        let r1 = 32 + 20;
        assert_eq!(u32_at(&s, r1), TAG_BLOCK);
        assert_eq!(u32_at(&s, r1 + 4), 5);
        assert_eq!(u64_at(&s, r1 + 8), 1);
        let mut want = [0u8; 4];
        content::fill(content::block_key(9, 1, 5), 0, &mut want);
        assert_eq!(&s[r1 + 16..r1 + 20], &want);
        // The last block is 2 bytes.
        let t = s.len() - 24;
        assert_eq!(u64_at(&s, t - 16 - 2 + 8), 2);
        assert_eq!(u32_at(&s, t), TAG_END);
        assert_eq!(u64_at(&s, t + 8), 3);
        assert_eq!(u64_at(&s, t + 16), versions_digest(&cfg, &v));
        // Same bytes whatever the read size.
        let mut c1 = SaveCursor::new(&cfg);
        assert_eq!(drain(&mut c1, &cfg, &v, true, 1), s);
        // And it loads.
        let mut p = LoadParser::new(&cfg);
        for b in &s {
            assert_eq!(p.write(&cfg, std::slice::from_ref(b)), Ok(1));
        }
        assert_eq!(p.finish().unwrap(), v);
    }

    #[test]
    fn precopy_accounting_and_dirty_resend() {
        let cfg = cfg("size=64K,block=4K");
        let mut v = vec![0u32; 16];
        let mut c = SaveCursor::new(&cfg);
        assert_eq!(c.precopy_info(), (initial_len(&cfg), 0));
        let mut buf = [0u8; 100];
        assert_eq!(c.fill(&cfg, &v, false, &mut buf), 100);
        assert_eq!(c.precopy_info(), (initial_len(&cfg) - 100, 0));
        // Block 0 was being sent: it becomes dirty; block 9 was not sent: nothing.
        v[0] += 1;
        c.touched(&cfg, 0);
        v[9] += 1;
        c.touched(&cfg, 9);
        c.touched(&cfg, 0);
        assert_eq!(c.precopy_info(), (initial_len(&cfg) - 100, 16 + 4096));
        let rest = drain(&mut c, &cfg, &v, false, 4096);
        assert_eq!(rest.len() as u64, initial_len(&cfg) - 100 + 16 + 4096);
        assert_eq!(c.precopy_info(), (0, 0));
        assert_eq!(c.remaining_to_end(), TRAILER_LEN);
        let tail = drain(&mut c, &cfg, &v, true, 7);
        assert_eq!(tail.len() as u64, TRAILER_LEN);
        assert_eq!(c.fill(&cfg, &v, true, &mut buf), 0);
    }

    #[test]
    fn find_set_bits() {
        let bits = [0u64, 1 << 5, 0, 1 << 63];
        assert_eq!(find_set(&bits, 0, 256), Some(69));
        assert_eq!(find_set(&bits, 70, 256), Some(255));
        assert_eq!(find_set(&bits, 70, 255), None);
        assert_eq!(find_set(&bits, 0, 69), None);
    }
}
