//! Dirty bitmaps to runs of set bits, a word at a time.
//!
//! The kernel's dirty bitmaps hold one bit per page: bit `n` is bit `n % 64` of the `u64` word
//! `n / 64`. [`for_each_run`] finds the maximal runs of set bits without looking at bits one by
//! one: a clear word or an all-set word costs one comparison (and eight of them in a row are
//! skipped with one OR or AND), and inside a mixed word `trailing_zeros` / `trailing_ones` jump
//! from one run boundary to the next. A run that crosses word boundaries is reported once.

/// Words looked at together when skipping clear or all-set stretches.
const CHUNK: usize = 8;

/// Whether every word of `chunk` is 0.
#[inline(always)]
fn all_clear(chunk: &[u64]) -> bool {
    chunk.iter().fold(0, |acc, w| acc | w) == 0
}

/// Whether every word of `chunk` is all ones.
#[inline(always)]
fn all_set(chunk: &[u64]) -> bool {
    chunk.iter().fold(u64::MAX, |acc, w| acc & w) == u64::MAX
}

/// Call `f(first, end)` for every maximal run of set bits `[first, end)` (bit numbers), in
/// increasing order.
///
/// ```
/// use vfio_migration::dirty::bitmap::for_each_run;
/// let mut runs = Vec::new();
/// for_each_run(&[0b1110_0001, u64::MAX, 1 << 63], |a, b| runs.push((a, b)));
/// assert_eq!(runs, vec![(0, 1), (5, 8), (64, 128), (191, 192)]);
/// ```
#[inline]
pub fn for_each_run(words: &[u64], mut f: impl FnMut(u64, u64)) {
    let n = words.len();
    let mut i = 0usize;
    // Bit 63 of the previous word: 1 when a run reaches into the current word.
    let mut carry = 0u64;
    // Where that run started.
    let mut run_start = 0u64;
    while i < n {
        let w = words[i];
        let base = (i as u64) * 64;
        if w == 0 {
            if carry == 1 {
                f(run_start, base);
                carry = 0;
            }
            i += 1;
            while let Some(chunk) = words.get(i..i + CHUNK) {
                if !all_clear(chunk) {
                    break;
                }
                i += CHUNK;
            }
            continue;
        }
        if w == u64::MAX {
            if carry == 0 {
                run_start = base;
                carry = 1;
            }
            i += 1;
            while let Some(chunk) = words.get(i..i + CHUNK) {
                if !all_set(chunk) {
                    break;
                }
                i += CHUNK;
            }
            continue;
        }
        // A mixed word. With `prev` bit k = bit k - 1 (bit 0 = the carry), a run starts where a
        // set bit follows a clear one and ends where a clear bit follows a set one; starts and
        // ends alternate, so they pair up in bit order.
        let prev = (w << 1) | carry;
        let mut starts = w & !prev;
        let mut ends = !w & prev;
        if carry == 1 {
            // The run from the previous word ends here (the word is not all set).
            f(run_start, base + ends.trailing_zeros() as u64);
            ends &= ends - 1;
        }
        while starts != 0 {
            let s = base + starts.trailing_zeros() as u64;
            starts &= starts - 1;
            if ends != 0 {
                f(s, base + ends.trailing_zeros() as u64);
                ends &= ends - 1;
            } else {
                // Bit 63 is set: the run goes on into the next word.
                run_start = s;
            }
        }
        carry = w >> 63;
        i += 1;
    }
    if carry == 1 {
        f(run_start, (n as u64) * 64);
    }
}

/// The number of set bits (dirty pages) of a bitmap.
pub fn count_set(words: &[u64]) -> u64 {
    words.iter().map(|w| w.count_ones() as u64).sum()
}

/// The number of `u64` words a bitmap of `pages` bits needs.
pub const fn words_for_pages(pages: u64) -> u64 {
    pages.div_ceil(64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::{DirtyRange, RangeTable};
    use proptest::prelude::*;

    /// The reference: look at every bit, start and end runs one page at a time.
    fn naive(words: &[u64], start: u64, page_size: u64) -> Vec<DirtyRange> {
        let mut out: Vec<DirtyRange> = Vec::new();
        for (i, w) in words.iter().enumerate() {
            for b in 0..64 {
                if w >> b & 1 == 1 {
                    let gpa = start + ((i * 64 + b) as u64) * page_size;
                    match out.last_mut() {
                        Some(last) if last.end() == gpa => last.length += page_size,
                        _ => out.push(DirtyRange::new(gpa, page_size)),
                    }
                }
            }
        }
        out
    }

    /// Words biased towards the interesting shapes: clear, all set, runs, single bits.
    fn arb_word() -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => Just(0u64),
            3 => Just(u64::MAX),
            2 => (0u32..64).prop_map(|s| u64::MAX << s),
            2 => (0u32..64).prop_map(|s| u64::MAX >> s),
            2 => (0u32..64, 0u32..64).prop_map(|(a, b)| (u64::MAX << a.min(b)) & (u64::MAX >> (63 - a.max(b)))),
            3 => any::<u64>(),
            1 => (0u32..64).prop_map(|s| 1u64 << s),
        ]
    }

    #[test]
    fn edge_words() {
        let cases: &[&[u64]] = &[
            &[],
            &[0],
            &[u64::MAX],
            &[1],
            &[1 << 63],
            &[1 << 63, 1],
            &[u64::MAX, u64::MAX, 0, u64::MAX],
            &[0xAAAA_AAAA_AAAA_AAAA],
            &[0x5555_5555_5555_5555, u64::MAX],
        ];
        for words in cases {
            let got = RangeTable::from_bitmap(words, 0x4000, 0x1000);
            assert_eq!(got.as_slice(), naive(words, 0x4000, 0x1000).as_slice(), "{words:x?}");
        }
        // Long stretches exercise the chunk skipping, including a chunk cut short at the end.
        let mut words = vec![0u64; 100];
        words.extend(vec![u64::MAX; 37]);
        words.push(7);
        words.extend(vec![0u64; 9]);
        words.push(1 << 40);
        let got = RangeTable::from_bitmap(&words, 0, 4096);
        assert_eq!(got.as_slice(), naive(&words, 0, 4096).as_slice());
        assert_eq!(count_set(&words), 37 * 64 + 3 + 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn fast_conversion_equals_per_bit(
            words in proptest::collection::vec(arb_word(), 0..70),
            shift in 0u32..22,
            start_page in 0u64..1 << 20,
        ) {
            let page_size = 1u64 << shift;
            let start = start_page * 4096;
            let got = RangeTable::from_bitmap(&words, start, page_size);
            let want = naive(&words, start, page_size);
            prop_assert_eq!(got.as_slice(), want.as_slice());
            prop_assert_eq!(got.effective_size(), count_set(&words) * page_size);
        }

        #[test]
        fn any_page_size_and_partial_last_word(
            words in proptest::collection::vec(arb_word(), 1..40),
            page_size in 1u64..100_000,
            start in 0u64..1 << 40,
            valid_bits in 1u64..64,
        ) {
            // Only the first `valid_bits` bits of the last word belong to the range: the clamp
            // cuts at the range end, exactly like masking the unused bits.
            let mut masked = words.clone();
            let last = masked.len() - 1;
            masked[last] &= u64::MAX >> (64 - valid_bits);
            let limit = start + ((last as u64) * 64 + valid_bits) * page_size;
            let mut got = RangeTable::new();
            got.extend_from_bitmap_clamped(&words, start, page_size, limit);
            let want = naive(&masked, start, page_size);
            prop_assert_eq!(got.as_slice(), want.as_slice());
        }

        #[test]
        fn runs_are_maximal_and_ordered(words in proptest::collection::vec(arb_word(), 0..70)) {
            let mut runs = Vec::new();
            for_each_run(&words, |a, b| runs.push((a, b)));
            let bit = |n: u64| words[(n / 64) as usize] >> (n % 64) & 1 == 1;
            let total = words.len() as u64 * 64;
            for w in runs.windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
            for &(a, b) in &runs {
                prop_assert!(a < b && b <= total);
                prop_assert!((a..b).all(bit));
                prop_assert!(a == 0 || !bit(a - 1));
                prop_assert!(b == total || !bit(b));
            }
        }
    }
}
