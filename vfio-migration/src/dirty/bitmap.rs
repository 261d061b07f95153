//! Dirty bitmaps to runs of set bits, a word at a time.
//!
//! The kernel's dirty bitmaps hold one bit per page: bit `n` is bit `n % 64` of the `u64` word
//! `n / 64`. [`for_each_run_batch`] finds the maximal runs of set bits without looking at bits one
//! by one and with few branches that depend on the data:
//!
//! - a run starts or ends wherever a bit differs from the one below it, so the boundaries of a
//!   word are the set bits of `w ^ (w << 1 | carry)` (`carry` is bit 63 of the previous word);
//!   starts and ends alternate, so the boundaries of the whole bitmap pair up in order, and a run
//!   that crosses words needs no special case;
//! - words go by groups of 64: a group that is all clear (outside a run) or all set (inside one)
//!   is skipped with one OR or AND; otherwise one branch-free pass marks the words that hold a
//!   boundary in a 64-bit mask, and only those words are visited (`trailing_zeros` on the mask),
//!   so the clear words of a sparse bitmap cost no misprediction and no store;
//! - a visited word writes its first few boundaries unconditionally (`trailing_zeros`, then
//!   clear the lowest bit) into a small buffer and advances by the number that were real; only
//!   words with more boundaries loop;
//! - the runs are handed over a group at a time as `[first, end)` pairs, so a caller appends them
//!   with one `Vec::extend` (one capacity check per group, not per run).

/// Words per group (the bits of the group's mask).
const GROUP: usize = 64;

/// Boundaries written unconditionally per visited word.
const UNROLL: usize = 4;

/// The boundary buffer: a pending start, up to 64 boundaries per word of a group, the end of a
/// run that reaches the end of the bitmap, and the slack of the unconditional writes.
const BUF: usize = 2 + GROUP * 64 + UNROLL;

/// The run boundaries of word `w` when the bit below its bit 0 is `carry` (0 or 1).
#[inline(always)]
fn boundary_mask(w: u64, carry: u64) -> u64 {
    w ^ ((w << 1) | carry)
}

/// Append the positions of the set bits of `b` (bit numbers from `base`) to `buf[k..]`; return
/// the new length.
#[inline(always)]
fn push_bits(mut b: u64, base: u64, buf: &mut [u64; BUF], k: usize) -> usize {
    let mut n = 0usize;
    // Fixed slots, written whether or not a boundary is left (past the last one they hold
    // garbage that `k` never reaches); the count is a sum of flags, not a branch.
    let dst = &mut buf[k..k + UNROLL];
    for slot in dst.iter_mut() {
        *slot = base + u64::from(b.trailing_zeros());
        n += usize::from(b != 0);
        b &= b.wrapping_sub(1);
    }
    let mut k = k + n;
    while b != 0 {
        buf[k] = base + u64::from(b.trailing_zeros());
        k += 1;
        b &= b - 1;
    }
    k
}

/// Hand the complete runs of `buf[..k]` to `f`; keep a pending start (odd count) in `buf[0]`.
/// Returns the new length (0 or 1).
#[inline(always)]
fn flush(buf: &mut [u64; BUF], k: usize, f: &mut impl FnMut(&[[u64; 2]])) -> usize {
    let (pairs, _) = buf[..k & !1].as_chunks::<2>();
    if !pairs.is_empty() {
        f(pairs);
    }
    if k & 1 == 1 {
        buf[0] = buf[k - 1];
        1
    } else {
        0
    }
}

/// Call `f` with the maximal runs of set bits, as `[first, end)` bit numbers, a batch at a time,
/// in increasing order (every batch is non-empty). A run that crosses word (or batch) boundaries
/// is reported once, whole.
///
/// ```
/// use vfio_migration::dirty::bitmap::for_each_run_batch;
/// let mut runs = Vec::new();
/// for_each_run_batch(&[0b1110_0001, u64::MAX, 1 << 63], |batch| runs.extend_from_slice(batch));
/// assert_eq!(runs, vec![[0, 1], [5, 8], [64, 128], [191, 192]]);
/// ```
#[inline]
pub fn for_each_run_batch(words: &[u64], mut f: impl FnMut(&[[u64; 2]])) {
    let mut buf = [0u64; BUF];
    let mut k = 0usize;
    // Bit 63 of the previous word: 1 inside a run.
    let mut carry = 0u64;
    let mut base = 0u64;
    // Whether the previous group held a boundary: then this one most likely does too, and the
    // quick test for a group without any is not worth its pass.
    let mut busy = false;
    for group in words.chunks(GROUP) {
        if !busy {
            let any = group.iter().fold(0, |acc, w| acc | w);
            let all = group.iter().fold(u64::MAX, |acc, w| acc & w);
            // No boundary in the group: clear outside a run, or all set inside one.
            if (carry == 0 && any == 0) || (carry == 1 && all == u64::MAX) {
                base += 64 * group.len() as u64;
                continue;
            }
        }
        // Which words hold a boundary (branch-free), then visit only those.
        let mut marks = 0u64;
        let mut c = carry;
        for (i, &w) in group.iter().enumerate() {
            marks |= u64::from(boundary_mask(w, c) != 0) << i;
            c = w >> 63;
        }
        busy = marks != 0;
        while marks != 0 {
            let i = marks.trailing_zeros() as usize;
            marks &= marks - 1;
            let below = if i == 0 { carry } else { group[i - 1] >> 63 };
            k = push_bits(boundary_mask(group[i], below), base + 64 * i as u64, &mut buf, k);
        }
        carry = c;
        base += 64 * group.len() as u64;
        k = flush(&mut buf, k, &mut f);
    }
    if carry == 1 {
        // The last run reaches the end of the bitmap.
        buf[k] = base;
        k += 1;
    }
    let left = flush(&mut buf, k, &mut f);
    debug_assert_eq!(left, 0, "starts and ends pair up");
}

/// Call `f(first, end)` for every maximal run of set bits `[first, end)` (bit numbers), in
/// increasing order (see [`for_each_run_batch`]).
///
/// ```
/// use vfio_migration::dirty::bitmap::for_each_run;
/// let mut runs = Vec::new();
/// for_each_run(&[0b1110_0001, u64::MAX, 1 << 63], |a, b| runs.push((a, b)));
/// assert_eq!(runs, vec![(0, 1), (5, 8), (64, 128), (191, 192)]);
/// ```
#[inline]
pub fn for_each_run(words: &[u64], mut f: impl FnMut(u64, u64)) {
    for_each_run_batch(words, |runs| {
        for &[first, end] in runs {
            f(first, end);
        }
    });
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

    /// The fair simple converter (the benchmark's baseline): a word at a time, clear words
    /// skipped, `trailing_zeros`/`trailing_ones` within a word, each run pushed or joined to the
    /// last range when it continues it from the previous word.
    fn simple(words: &[u64], start: u64, page_size: u64) -> Vec<DirtyRange> {
        let mut out: Vec<DirtyRange> = Vec::new();
        for (i, &w) in words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let first = w.trailing_zeros();
                let len = (w >> first).trailing_ones();
                let gpa = start + (i as u64 * 64 + u64::from(first)) * page_size;
                let length = u64::from(len) * page_size;
                match out.last_mut() {
                    Some(last) if last.end() == gpa => last.length += length,
                    _ => out.push(DirtyRange::new(gpa, length)),
                }
                w = if len == 64 {
                    0
                } else {
                    w & !(((1u64 << len) - 1) << first)
                };
            }
        }
        out
    }

    /// Bitmaps of long stretches (so whole groups of clear or all-set words get skipped, and
    /// groups end inside runs) of the interesting words.
    fn arb_stretches() -> impl Strategy<Value = Vec<u64>> {
        proptest::collection::vec((arb_word(), 1usize..150), 0..8)
            .prop_map(|parts| parts.into_iter().flat_map(|(w, n)| std::iter::repeat_n(w, n)).collect())
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
        fn fast_conversion_equals_the_simple_converter(
            words in prop_oneof![
                proptest::collection::vec(arb_word(), 0..300),
                arb_stretches(),
                proptest::collection::vec(any::<u64>(), 0..200),
            ],
            shift in 0u32..22,
            start_page in 0u64..1 << 20,
        ) {
            let page_size = 1u64 << shift;
            let start = start_page * 4096;
            let want = simple(&words, start, page_size);
            let got = RangeTable::from_bitmap(&words, start, page_size);
            prop_assert_eq!(got.as_slice(), want.as_slice());
            // Into a reused table holding something else: the same, whatever was there.
            let mut reused = RangeTable::from_bitmap(&[0xF0F0], 1 << 50, 4096);
            reused.fill_from_bitmap(&words, start, page_size);
            prop_assert_eq!(reused.as_slice(), want.as_slice());
            let mut runs = Vec::new();
            for_each_run_batch(&words, |batch| {
                assert!(!batch.is_empty());
                runs.extend_from_slice(batch);
            });
            prop_assert_eq!(runs.len(), want.len());
        }

        #[test]
        fn bit_lengths_that_are_not_whole_words(
            words in prop_oneof![proptest::collection::vec(arb_word(), 1..200), arb_stretches()],
            bits_cut in 0u64..64,
            page_size in 1u64..100_000,
            start in 0u64..1 << 40,
        ) {
            // A bitmap of `bits` pages (not a multiple of 64): the limit cuts at its end, exactly
            // like clearing the bits past it.
            let total = words.len() as u64 * 64;
            let bits = total.saturating_sub(bits_cut);
            let mut masked = words.clone();
            for n in bits..total {
                masked[(n / 64) as usize] &= !(1 << (n % 64));
            }
            let limit = start + bits * page_size;
            let want = simple(&masked, start, page_size);
            let mut got = RangeTable::new();
            got.extend_from_bitmap_clamped(&words, start, page_size, limit);
            prop_assert_eq!(got.as_slice(), want.as_slice());
            // Appending right after a table's last range joins a run that starts at bit 0.
            let mut joined = RangeTable::from_ranges([DirtyRange::new(0, start)]);
            joined.extend_from_bitmap_clamped(&words, start, page_size, limit);
            prop_assert_eq!(joined, RangeTable::from_ranges(want.iter().copied().chain([DirtyRange::new(0, start)])));
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
