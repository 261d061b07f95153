//! Deterministic block content and the version digest.
//!
//! The emulated device never stores its content. Block `i` at version `v` of a device with seed
//! `s` is a pseudo-random byte string generated in counter mode: byte `k` is byte `k % 8`
//! (little-endian) of `mix(key(s, i, v) + (k / 8 + 1) * GOLDEN)`, where `mix` is the SplitMix64
//! finaliser. Counter mode gives random access, so a reader asking for one byte in the middle of
//! a 1 MiB block costs one word, and a writer's bytes can be checked piece by piece without a
//! buffer.
//!
//! The generator and the digest are part of the emulated data format ([`super::format`]): they
//! are written here, not taken from a crate, so that a saved state stays loadable whatever
//! version of a random-number crate a later build uses. Changing either means a new
//! [`super::format::FORMAT_VERSION`].

/// The SplitMix64 increment (2^64 / golden ratio).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The SplitMix64 finaliser: a bijective 64-bit mixer.
#[inline]
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generator key of block `index` at `version` on a device with `seed`.
#[inline]
pub(crate) fn block_key(seed: u64, index: u64, version: u32) -> u64 {
    mix(mix(mix(seed ^ 0x656d_756c_6174_6564).wrapping_add(index)).wrapping_add(u64::from(version)))
}

/// Word `n` of the block with `key`.
#[inline]
fn word(key: u64, n: u64) -> u64 {
    mix(key.wrapping_add(n.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// Fill `out` with the block bytes of `key` starting at byte `offset` of the block.
pub(crate) fn fill(key: u64, offset: u64, out: &mut [u8]) {
    let mut pos = offset;
    let mut rest = out;
    // Unaligned head.
    let head = (pos % 8) as usize;
    if head != 0 && !rest.is_empty() {
        let bytes = word(key, pos / 8).to_le_bytes();
        let n = (8 - head).min(rest.len());
        rest[..n].copy_from_slice(&bytes[head..head + n]);
        rest = &mut rest[n..];
        pos += n as u64;
    }
    // Whole words.
    let mut chunks = rest.chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&word(key, pos / 8).to_le_bytes());
        pos += 8;
    }
    // Tail.
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let bytes = word(key, pos / 8).to_le_bytes();
        let n = tail.len();
        tail.copy_from_slice(&bytes[..n]);
    }
}

/// The offset within `data` of the first byte that differs from the block bytes of `key` at
/// `offset`, or `None` when all match.
pub(crate) fn first_mismatch(key: u64, offset: u64, data: &[u8]) -> Option<usize> {
    let mut expect = [0u8; 512];
    let mut done = 0usize;
    for chunk in data.chunks(expect.len()) {
        let want = &mut expect[..chunk.len()];
        fill(key, offset + done as u64, want);
        if want != chunk {
            let at = chunk.iter().zip(want.iter()).position(|(a, b)| a != b).unwrap_or(0);
            return Some(done + at);
        }
        done += chunk.len();
    }
    None
}

/// A 64-bit digest of a device's content: the format version, seed, size, block size and the
/// version of every block. Two devices with equal digests hold equal content (up to the
/// digest's collision probability).
pub(crate) fn digest(format: u32, seed: u64, size: u64, block: u32, versions: &[u32]) -> u64 {
    let mut h = mix(u64::from(format) ^ 0x6469_6765_7374_0001);
    for v in [seed, size, u64::from(block), versions.len() as u64] {
        h = mix(h ^ v).wrapping_add(GOLDEN);
    }
    // Two versions per step: half the mixing work of one per step, still order-sensitive.
    let mut pairs = versions.chunks_exact(2);
    for p in &mut pairs {
        h = mix(h ^ (u64::from(p[0]) | (u64::from(p[1]) << 32))).wrapping_add(GOLDEN);
    }
    if let [last] = pairs.remainder() {
        h = mix(h ^ u64::from(*last) ^ (1 << 63)).wrapping_add(GOLDEN);
    }
    h
}

/// A small deterministic random source (SplitMix64) for picking blocks to dirty.
#[derive(Clone, Debug)]
pub(crate) struct Picker(u64);

impl Picker {
    /// A picker seeded from the device seed.
    pub(crate) fn new(seed: u64) -> Self {
        Self(mix(seed ^ 0x7069_636b_6572_0000))
    }

    /// A value in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        // Multiply-shift: unbiased enough for a test device, and never divides by zero.
        ((u128::from(mix(self.0)) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_random_access() {
        let key = block_key(1, 2, 3);
        let mut whole = vec![0u8; 100];
        fill(key, 0, &mut whole);
        for start in 0..100 {
            for len in 0..(100 - start).min(19) {
                let mut part = vec![0u8; len];
                fill(key, start as u64, &mut part);
                assert_eq!(&part[..], &whole[start..start + len], "start {start} len {len}");
            }
        }
        assert_eq!(first_mismatch(key, 0, &whole), None);
        let mut bad = whole.clone();
        bad[57] ^= 1;
        assert_eq!(first_mismatch(key, 0, &bad), Some(57));
        assert_eq!(first_mismatch(key, 10, &whole[10..]), None);
    }

    #[test]
    fn keys_differ_by_seed_index_and_version() {
        let k = block_key(1, 0, 0);
        assert_ne!(k, block_key(2, 0, 0));
        assert_ne!(k, block_key(1, 1, 0));
        assert_ne!(k, block_key(1, 0, 1));
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        fill(block_key(1, 0, 0), 0, &mut a);
        fill(block_key(1, 0, 1), 0, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn digest_sees_every_input() {
        let v = vec![0u32; 5];
        let d = digest(1, 1, 20, 4, &v);
        assert_eq!(d, digest(1, 1, 20, 4, &v));
        assert_ne!(d, digest(2, 1, 20, 4, &v));
        assert_ne!(d, digest(1, 2, 20, 4, &v));
        assert_ne!(d, digest(1, 1, 21, 4, &v));
        assert_ne!(d, digest(1, 1, 20, 5, &v));
        for i in 0..5 {
            let mut w = v.clone();
            w[i] = 1;
            assert_ne!(d, digest(1, 1, 20, 4, &w), "block {i}");
        }
        assert_ne!(digest(1, 1, 20, 4, &[1, 0]), digest(1, 1, 20, 4, &[0, 1]));
    }

    #[test]
    fn picker_stays_in_range() {
        let mut p = Picker::new(7);
        let mut seen = [false; 3];
        for _ in 0..100 {
            let i = p.below(3);
            assert!(i < 3);
            seen[i as usize] = true;
        }
        assert_eq!(seen, [true; 3]);
        assert_eq!(p.below(1), 0);
    }
}
