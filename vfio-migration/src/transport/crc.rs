//! CRC32C, the records' checksum (the stream format's: Castagnoli, reflected, initial value and
//! final XOR all ones), at memory speed on CPUs with 512-bit carry-less multiplication.
//!
//! Every byte of device state is checksummed once by the sender and once by the receiver, so
//! the checksum is a good share of a migration's CPU time. The `crc32` instruction (the
//! `crc32c` crate's path) computes about 8 bytes per cycle; on x86-64 CPUs with AVX-512 and
//! VPCLMULQDQ the payload is instead folded 64 bytes per instruction (the folding of Intel's
//! "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ Instruction", four 512-bit
//! lanes at a time) and only the last 16 to 31 bytes go through the `crc32c` crate. Everywhere
//! else, and for short inputs, the `crc32c` crate computes it all. Both give the same values
//! (tested against each other).

/// Inputs shorter than this go to the `crc32c` crate (the folding needs 256 bytes to start).
#[cfg(target_arch = "x86_64")]
const FOLD_MIN: usize = 1024;

/// Whether [`append`] folds `len` bytes (else the `crc32c` crate computes them).
pub(crate) fn folds(len: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if len >= FOLD_MIN {
        return fold::available();
    }
    let _ = len;
    false
}

/// The CRC32C of `data` appended to a message whose CRC32C is `crc` (0 for the empty message),
/// as `crc32c::crc32c_append`.
pub(crate) fn append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if folds(data.len()) {
        // SAFETY: the CPU has every feature `fold::append` is compiled for (checked just
        // above), which is all that calling it requires.
        return unsafe { fold::append(crc, data) };
    }
    ::crc32c::crc32c_append(crc, data)
}

#[cfg(target_arch = "x86_64")]
mod fold {
    use std::arch::x86_64::{
        __m128i, __m512i, _mm_clmulepi64_si128, _mm_cvtsi128_si64, _mm_extract_epi64, _mm_set_epi64x,
        _mm_ternarylogic_epi64, _mm512_clmulepi64_epi128, _mm512_extracti32x4_epi32, _mm512_loadu_si512,
        _mm512_set_epi64, _mm512_ternarylogic_epi64, _mm512_xor_si512,
    };

    /// `x^n mod P`, bit-reflected and shifted left by one (the form the carry-less products of
    /// reflected operands need), for P the CRC32C polynomial 0x1_1EDC_6F41: the factors that
    /// move a 128-bit lane forward by `D` bits are `x^(D+32)` (its low half) and `x^(D-32)`
    /// (its high half).
    const fn key(n: u32) -> i64 {
        const P: u64 = 0x1_1EDC_6F41;
        let mut r: u64 = 1;
        let mut i = 0;
        while i < n {
            r <<= 1;
            if r & (1 << 32) != 0 {
                r ^= P;
            }
            i += 1;
        }
        ((r as u32).reverse_bits() as i64) << 1
    }

    /// The factors that move a lane forward by `bits`: (for its low half, for its high half).
    const fn keys(bits: u32) -> (i64, i64) {
        (key(bits + 32), key(bits - 32))
    }

    const BY_2048: (i64, i64) = keys(2048);
    const BY_512: (i64, i64) = keys(512);
    const BY_384: (i64, i64) = keys(384);
    const BY_256: (i64, i64) = keys(256);
    const BY_128: (i64, i64) = keys(128);

    /// XOR of three (the ternary-logic truth table 0x96).
    const XOR3: i32 = 0x96;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
            && std::arch::is_x86_feature_detected!("sse4.1")
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load(block: &[u8; 64]) -> __m512i {
        // SAFETY: `block` is 64 readable bytes, exactly what an unaligned 512-bit load reads.
        unsafe { _mm512_loadu_si512(block.as_ptr().cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn wide(k: (i64, i64)) -> __m512i {
        _mm512_set_epi64(k.1, k.0, k.1, k.0, k.1, k.0, k.1, k.0)
    }

    /// Every lane of `x` moved forward (by the distance of `k`, [`wide`]) and XORed into `next`.
    #[inline]
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    fn fold512(x: __m512i, k: __m512i, next: __m512i) -> __m512i {
        let lo = _mm512_clmulepi64_epi128::<0x00>(x, k);
        let hi = _mm512_clmulepi64_epi128::<0x11>(x, k);
        _mm512_ternarylogic_epi64::<XOR3>(lo, hi, next)
    }

    /// `x` moved forward by the distance of `k` and XORed into `next`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,pclmulqdq")]
    fn fold128(x: __m128i, k: (i64, i64), next: __m128i) -> __m128i {
        let k = _mm_set_epi64x(k.1, k.0);
        let lo = _mm_clmulepi64_si128::<0x00>(x, k);
        let hi = _mm_clmulepi64_si128::<0x11>(x, k);
        _mm_ternarylogic_epi64::<XOR3>(lo, hi, next)
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    fn load16(b: &[u8]) -> __m128i {
        let half = |at: usize| {
            let mut h = [0u8; 8];
            h.copy_from_slice(&b[at..at + 8]);
            i64::from_le_bytes(h)
        };
        _mm_set_epi64x(half(8), half(0))
    }

    /// [`super::append`] (the folding needs 256 bytes; shorter `data` goes to the crate).
    #[target_feature(enable = "avx512f,avx512vl,vpclmulqdq,pclmulqdq,sse4.1")]
    pub(super) fn append(crc: u32, data: &[u8]) -> u32 {
        let (blocks, rest) = data.as_chunks::<64>();
        if blocks.len() < 4 {
            return ::crc32c::crc32c_append(crc, data);
        }
        // The running value goes into the first four bytes (the CRC's initial value, then the
        // state of what came before).
        let init = _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, i64::from(!crc));
        let mut x0 = _mm512_xor_si512(load(&blocks[0]), init);
        let (mut x1, mut x2, mut x3) = (load(&blocks[1]), load(&blocks[2]), load(&blocks[3]));
        // Four 512-bit accumulators over 256-byte strides.
        let k = wide(BY_2048);
        let mut groups = blocks[4..].chunks_exact(4);
        for g in &mut groups {
            x0 = fold512(x0, k, load(&g[0]));
            x1 = fold512(x1, k, load(&g[1]));
            x2 = fold512(x2, k, load(&g[2]));
            x3 = fold512(x3, k, load(&g[3]));
        }
        // Into one accumulator, then the remaining 64-byte blocks.
        let k = wide(BY_512);
        x1 = fold512(x0, k, x1);
        x2 = fold512(x1, k, x2);
        let mut x = fold512(x2, k, x3);
        for b in groups.remainder() {
            x = fold512(x, k, load(b));
        }
        // Its four 128-bit lanes into one, then the remaining 16-byte blocks.
        let mut y = fold128(
            _mm512_extracti32x4_epi32::<0>(x),
            BY_384,
            _mm512_extracti32x4_epi32::<3>(x),
        );
        y = fold128(_mm512_extracti32x4_epi32::<1>(x), BY_256, y);
        y = fold128(_mm512_extracti32x4_epi32::<2>(x), BY_128, y);
        let mut rest = rest;
        while rest.len() >= 16 {
            y = fold128(y, BY_128, load16(&rest[..16]));
            rest = &rest[16..];
        }
        // What is left (16 bytes congruent to everything so far, then under 16 bytes) has the
        // same remainder as the whole: its CRC, from an initial value of all ones (the XOR of
        // the original initial value is already in), is the CRC of the whole.
        let mut tail = [0u8; 32];
        tail[..8].copy_from_slice(&_mm_cvtsi128_si64(y).to_le_bytes());
        tail[8..16].copy_from_slice(&_mm_extract_epi64::<1>(y).to_le_bytes());
        tail[16..16 + rest.len()].copy_from_slice(rest);
        ::crc32c::crc32c_append(u32::MAX, &tail[..16 + rest.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random byte stream.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn matches_the_crc32c_crate_at_every_length_offset_and_initial_value() {
        let data = bytes(70_000, 7);
        let mut lens: Vec<usize> = (0..=1100).collect();
        lens.extend([1279, 1280, 1281, 4095, 4096, 4097, 65_535, 65_536, 65_537, 69_000]);
        for &len in &lens {
            for off in [0, 1, 3, 17, 63] {
                let d = &data[off..off + len.min(data.len() - off)];
                for init in [0, 1, 0xdead_beef, u32::MAX] {
                    assert_eq!(
                        append(init, d),
                        ::crc32c::crc32c_append(init, d),
                        "len {len}, offset {off}, initial {init:#x}"
                    );
                }
            }
        }
        assert_eq!(append(0, b"123456789"), 0xe306_9283, "the CRC-32/ISCSI check value");
        let big = bytes(1 << 20, 9);
        assert_eq!(append(0, &big), ::crc32c::crc32c(&big));
    }

    #[test]
    fn appends_like_one_pass() {
        let data = bytes(300_000, 3);
        let (a, b) = data.split_at(123_457);
        assert_eq!(append(append(0, a), b), ::crc32c::crc32c(&data));
    }
}
