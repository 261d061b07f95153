//! Dirty bitmaps to runs of set bits, a word at a time.
//!
//! The kernel's dirty bitmaps hold one bit per page: bit `n` is bit `n % 64` of the `u64` word
//! `n / 64`. Two ways to get the maximal runs of set bits, neither looking at bits one by one:
//!
//! - [`for_each_run_batch`] hands the runs over as `[first, end)` bit numbers, a batch at a time;
//! - `append_ranges` (crate-internal; what [`RangeTable::from_bitmap`](super::RangeTable::from_bitmap) and
//!   [`fill_from_bitmap`](super::RangeTable::fill_from_bitmap) use) writes them as
//!   [`DirtyRange`]s straight into the table's vector.
//!
//! Both rest on the same ideas:
//!
//! - a run starts or ends wherever a bit differs from the one below it, so the boundaries of a
//!   word are the set bits of `w ^ (w << 1 | carry)` (`carry` is bit 63 of the previous word);
//!   starts and ends alternate, so the boundaries of the whole bitmap pair up in order, and a run
//!   that crosses words needs no special case;
//! - words go by groups of 64: a group that is all clear (outside a run) or all set (inside one)
//!   is skipped with one OR or AND; otherwise one branch-free pass (vectorized) computes the
//!   boundaries of its words and marks the words that hold one in a 64-bit mask, and only those
//!   words are visited (`trailing_zeros` on the mask), so the clear words of a sparse bitmap
//!   cost no misprediction and no store;
//! - a visited word writes its first few boundaries unconditionally and advances by the number
//!   that were real; only words with more boundaries loop.
//!
//! `append_ranges` writes each boundary as an address, straight into the spare capacity of
//! the output vector (reserved once per group for the most the group can hold): starts and ends
//! alternate, so a start and its end fill exactly the two fields of one [`DirtyRange`], and a
//! pass over the new ranges every few hundred (still in cache) turns the ends into lengths. No
//! intermediate buffer, no capacity check per range. A large, dense output (a fresh table on a
//! sparse bitmap: 1 TiB at 1% random pages is 2.6 million ranges, 42 MB) is sized once: when
//! the vector would grow past 1 MiB, the rest of the bitmap is counted (it is only read) and the
//! vector gets exactly the room it needs, in transparent huge pages up to 256 MiB; page faults
//! are most of what writing into fresh memory costs. A vector with room (a table reused every
//! round) is written in one pass. On x86-64 it picks at run time the fastest code the CPU
//! runs ([`conversion_path`] names it): with AVX-512 VBMI2, `vpcompressb` packs the bit positions of
//! a word's boundaries in one instruction and eight addresses are written per store; with
//! AVX2/BMI/POPCNT (x86-64-v3) the scalar code gets a vectorized boundary pass and `popcnt`;
//! elsewhere the same scalar code runs on the baseline instruction set.

use super::DirtyRange;

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

/// The implementation the conversion of a bitmap to ranges ([`RangeTable::from_bitmap`]) uses on this CPU:
/// `"x86-64 avx512-vbmi2"`, `"x86-64-v3"` (AVX2, BMI1/2, POPCNT, LZCNT) or `"portable"`. For
/// reports and benchmarks; every implementation gives the same ranges.
///
/// [`RangeTable::from_bitmap`]: super::RangeTable::from_bitmap
pub fn conversion_path() -> &'static str {
    Path::detect().name()
}

/// The implementations of [`append_ranges`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// Scalar code on the baseline instruction set (any architecture, any page size).
    Portable,
    /// The scalar code compiled for AVX2, BMI1/2, POPCNT and LZCNT (page sizes that are powers
    /// of two).
    #[cfg(target_arch = "x86_64")]
    X86V3,
    /// `vpcompressb` (AVX-512 VBMI2) per word (page sizes that are powers of two).
    #[cfg(target_arch = "x86_64")]
    X86Avx512,
}

impl Path {
    /// The fastest implementation this CPU runs.
    pub(crate) fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx512() {
                return Path::X86Avx512;
            }
            if x86::has_v3() {
                return Path::X86V3;
            }
        }
        Path::Portable
    }

    /// Every implementation this CPU runs.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Path> {
        let mut v = vec![Path::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_v3() {
                v.push(Path::X86V3);
            }
            if x86::has_avx512() {
                v.push(Path::X86Avx512);
            }
        }
        v
    }

    fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Path::X86V3 => "x86-64-v3",
            #[cfg(target_arch = "x86_64")]
            Path::X86Avx512 => "x86-64 avx512-vbmi2",
        }
    }
}

/// Append to `out` the ranges of the maximal runs of set bits of `words`: the run `[first, end)`
/// becomes `[start + first * page_size, start + end * page_size)`. With `join = Some(gpa)` a run
/// is open before bit 0 since `gpa` (the caller popped `out`'s last range `[gpa, start)`): the
/// first run continues it when bit 0 is set, and it is put back as it was otherwise.
///
/// The caller makes sure no address overflows: `start + words.len() * 64 * page_size` fits in a
/// `u64` (the arithmetic wraps otherwise: wrong ranges, but no panic), and `page_size > 0`.
pub(crate) fn append_ranges(out: &mut Vec<DirtyRange>, words: &[u64], start: u64, page_size: u64, join: Option<u64>) {
    append_ranges_via(Path::detect(), out, words, start, page_size, join);
}

/// [`append_ranges`] with a chosen implementation (one this CPU runs; see `Path::available`).
pub(crate) fn append_ranges_via(
    path: Path,
    out: &mut Vec<DirtyRange>,
    words: &[u64],
    start: u64,
    page_size: u64,
    join: Option<u64>,
) {
    if page_size.is_power_of_two() {
        let at = Shift {
            start,
            shift: page_size.trailing_zeros(),
        };
        match path {
            Path::Portable => convert(out, words, join, Scalar::<_, false>(at)),
            // SAFETY: `Path::X86Avx512` and `Path::X86V3` are only chosen when the CPU has the
            // features these functions are compiled for (`Path::detect`, `Path::available`).
            #[cfg(target_arch = "x86_64")]
            Path::X86V3 => unsafe { x86::convert_v3(out, words, join, at) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Path::X86Avx512 => unsafe { x86::convert_avx512(out, words, join, at) },
        }
    } else {
        let at = Mul { start, page_size };
        convert(out, words, join, Scalar::<_, false>(at));
    }
}

/// The address of a bit number. Wrapping arithmetic: the boundaries written past the last real
/// one (see [`Visit`]) may compute addresses nobody reads.
trait Addr: Copy {
    fn at(self, bit: u64) -> u64;
}

/// `start + bit << shift` (page sizes that are powers of two).
#[derive(Clone, Copy)]
struct Shift {
    start: u64,
    shift: u32,
}

impl Addr for Shift {
    #[inline(always)]
    fn at(self, bit: u64) -> u64 {
        self.start.wrapping_add(bit << self.shift)
    }
}

/// `start + bit * page_size` (any page size).
#[derive(Clone, Copy)]
struct Mul {
    start: u64,
    page_size: u64,
}

impl Addr for Mul {
    #[inline(always)]
    fn at(self, bit: u64) -> u64 {
        self.start.wrapping_add(bit.wrapping_mul(self.page_size))
    }
}

/// Slots (`u64`s) a visit may write past the last real boundary.
const SLACK: usize = 8;

/// Writes the boundaries of a group's words as addresses.
trait Visit: Copy {
    /// The address of bit `bit`.
    fn at(self, bit: u64) -> u64;

    /// Write the addresses of the boundaries of the words marked in `marks` (bit `i` set: word
    /// `i` of the group, first bit number `base + 64 * i`, has the boundaries `bm[i]`), in
    /// order, at `p[k..]`; return the new `k`. Slots up to [`SLACK`] past the new `k` may be
    /// written too (with garbage).
    ///
    /// # Safety
    ///
    /// `p[k..k + 64 * marks.count_ones() + SLACK]` is valid for writes.
    unsafe fn visit(self, p: *mut u64, k: usize, marks: u64, bm: &[u64; GROUP], base: u64) -> usize;

    /// The boundaries of the words of a whole group and the mask of the words that hold one
    /// ([`group_marks`]).
    #[inline(always)]
    fn marks(self, g: &[u64; GROUP], carry: u64, bm: &mut [u64; GROUP]) -> u64 {
        group_marks(g, carry, bm)
    }

    /// Turn each range's second field from an end address into a length.
    #[inline(always)]
    fn lengths(self, ranges: &mut [DirtyRange]) {
        for r in ranges {
            r.length = r.length.wrapping_sub(r.gpa);
        }
    }
}

/// The scalar visit: the first [`UNROLL`] boundaries of a word written unconditionally (the
/// count advances by flags, or by `popcnt` when `POPCNT`), a loop for the rest.
#[derive(Clone, Copy)]
struct Scalar<A, const POPCNT: bool>(A);

impl<A: Addr, const POPCNT: bool> Visit for Scalar<A, POPCNT> {
    #[inline(always)]
    fn at(self, bit: u64) -> u64 {
        self.0.at(bit)
    }

    #[inline(always)]
    unsafe fn visit(self, p: *mut u64, mut k: usize, mut marks: u64, bm: &[u64; GROUP], base: u64) -> usize {
        while marks != 0 {
            let i = marks.trailing_zeros() as usize;
            marks &= marks - 1;
            let mut b = bm[i % GROUP];
            let bit = base + 64 * i as u64;
            if POPCNT {
                let n = b.count_ones() as usize;
                for j in 0..UNROLL {
                    // SAFETY: `j < UNROLL <= SLACK` past `k`, and `k` stays below the real
                    // boundaries written so far (the caller's bound).
                    unsafe { p.add(k + j).write(self.0.at(bit + u64::from(b.trailing_zeros()))) };
                    b &= b.wrapping_sub(1);
                }
                let mut m = k + UNROLL;
                while b != 0 {
                    // SAFETY: `m < k + n`: a real boundary.
                    unsafe { p.add(m).write(self.0.at(bit + u64::from(b.trailing_zeros()))) };
                    m += 1;
                    b &= b - 1;
                }
                k += n;
            } else {
                for _ in 0..UNROLL {
                    // SAFETY: `k` is at most the real boundaries written so far; past the last
                    // one this is within `SLACK`.
                    unsafe { p.add(k).write(self.0.at(bit + u64::from(b.trailing_zeros()))) };
                    k += usize::from(b != 0);
                    b &= b.wrapping_sub(1);
                }
                while b != 0 {
                    // SAFETY: a real boundary.
                    unsafe { p.add(k).write(self.0.at(bit + u64::from(b.trailing_zeros()))) };
                    k += 1;
                    b &= b - 1;
                }
            }
        }
        k
    }
}

/// Whether a group has no boundary: all clear outside a run, or all set inside one.
#[inline(always)]
fn quiet(group: &[u64], carry: u64) -> bool {
    let any = group.iter().fold(0, |acc, w| acc | w);
    let all = group.iter().fold(u64::MAX, |acc, w| acc & w);
    (carry == 0 && any == 0) || (carry == 1 && all == u64::MAX)
}

/// The boundaries of the words of a whole group (`bm`) and the mask of the words that hold one.
/// Written so that it vectorizes: each word is paired with the one below it, not with a carry.
#[inline(always)]
fn group_marks(g: &[u64; GROUP], carry: u64, bm: &mut [u64; GROUP]) -> u64 {
    bm[0] = boundary_mask(g[0], carry);
    for ((b, &w), &below) in bm[1..].iter_mut().zip(&g[1..]).zip(&g[..GROUP - 1]) {
        *b = boundary_mask(w, below >> 63);
    }
    let mut marks = 0u64;
    for (i, &b) in bm.iter().enumerate() {
        marks |= u64::from(b != 0) << i;
    }
    marks
}

/// The most ranges [`emit`] reserves past the vector's length for one group: the open start,
/// 64 boundaries per word and the slack, two slots a range.
const GROUP_RESERVE: usize = (1 + 64 * GROUP + SLACK).div_ceil(2);

/// The converter: groups skipped or marked, marked words visited by `v` straight into `out`.
///
/// A large output is sized once: when the vector is about to grow past [`COUNT_AT`] ranges and
/// the output is dense next to the bitmap (at least one range per 16 words read so far),
/// [`count_ranges`] counts what the rest of the bitmap adds and the vector gets exactly that room
/// ([`reserve_fresh`], with huge pages when large). Writing into fresh memory is most of what a
/// fresh table costs on a sparse bitmap (a page fault per 256 ranges with 4 KiB pages), and
/// counting only reads the bitmap; a sparse output (or a vector that has room, a table reused
/// every round) never counts.
#[inline(always)]
fn convert<V: Visit>(out: &mut Vec<DirtyRange>, words: &[u64], join: Option<u64>, v: V) {
    // Bit 63 of the previous word (1 inside a run), and the start address of the open run.
    let mut carry = u64::from(join.is_some());
    let mut open = join;
    let mut base = 0u64;
    // Whether the previous group held a boundary: then this one most likely does too, and the
    // quick test for a group without any is not worth its pass.
    let mut busy = false;
    // Whether the rest of the output was counted and the vector sized for it.
    let mut counted = false;
    let start_len = out.len();
    // The ranges from `ended` on hold an end address in their second field (see [`emit`]);
    // they get their lengths a batch at a time, once their stores are out of the way.
    let mut ended = start_len;
    let mut bm = [0u64; GROUP];
    let (groups, rest) = words.as_chunks::<GROUP>();
    for (n, g) in groups.iter().enumerate() {
        if !busy && quiet(g, carry) {
            base += 64 * GROUP as u64;
            continue;
        }
        let marks = v.marks(g, carry, &mut bm);
        busy = marks != 0;
        if busy {
            size_once(out, &mut counted, start_len, words, n * GROUP, carry);
            emit(out, v, marks, &bm, base, &mut open);
            if out.len() - ended >= LENGTHS_BATCH {
                v.lengths(&mut out[ended..]);
                ended = out.len();
            }
        }
        carry = g[GROUP - 1] >> 63;
        base += 64 * GROUP as u64;
    }
    if !rest.is_empty() {
        let rest_carry = carry;
        let mut marks = 0u64;
        for (i, &w) in rest.iter().enumerate() {
            bm[i] = boundary_mask(w, carry);
            marks |= u64::from(bm[i] != 0) << i;
            carry = w >> 63;
        }
        if marks != 0 {
            size_once(out, &mut counted, start_len, words, groups.len() * GROUP, rest_carry);
            emit(out, v, marks, &bm, base, &mut open);
        }
        base += 64 * rest.len() as u64;
    }
    v.lengths(&mut out[ended..]);
    debug_assert_eq!(open.is_some(), carry == 1, "an open run iff the last bit is set");
    if let Some(first) = open {
        // The last run reaches the end of the bitmap.
        out.push(DirtyRange::from_bounds(first, v.at(base)));
    }
}

/// Before the ranges of the words from `at` on are written into `out` (`carry` being the bit
/// below word `at`): when the vector is about to grow past [`COUNT_AT`] ranges and what was
/// written since `start_len` is dense next to the words read (a range per 16 words or more; a
/// vector that is full before anything was written, a table appended to, grows as usual), count
/// what the rest adds and make exactly that room, once (`counted`).
#[inline(always)]
fn size_once(out: &mut Vec<DirtyRange>, counted: &mut bool, start_len: usize, words: &[u64], at: usize, carry: u64) {
    if !*counted
        && out.capacity() - out.len() < GROUP_RESERVE
        && out.capacity() >= COUNT_AT
        && (out.len() - start_len).saturating_mul(16) >= at.max(1)
    {
        *counted = true;
        let more = count_ranges(words.get(at..).unwrap_or_default(), carry);
        reserve_fresh(out, more.saturating_add(GROUP_RESERVE));
    }
}

/// Ranges written (with end addresses) before they are turned into lengths in one go: reading
/// back what was just stored waits for the stores; a batch later they are in the cache.
const LENGTHS_BATCH: usize = 512;

/// The capacity (in ranges, 1 MiB) from which a growing output is counted and sized once.
const COUNT_AT: usize = (1 << 20) / size_of::<DirtyRange>();

/// The boundaries of a group of words when the bit below its first word is `carry`.
#[inline(always)]
fn group_count(g: &[u64; GROUP], carry: u64) -> u64 {
    let mut n = u64::from(boundary_mask(g[0], carry).count_ones());
    for (&w, &below) in g[1..].iter().zip(&g[..GROUP - 1]) {
        n += u64::from(boundary_mask(w, below >> 63).count_ones());
    }
    n
}

/// The number of ranges the runs of `words` close, `carry` (0 or 1) being the bit below bit 0:
/// with 1, a run open before the words counts, its start being a boundary.
#[inline(always)]
fn count_ranges(words: &[u64], carry: u64) -> usize {
    let (groups, rest) = words.as_chunks::<GROUP>();
    let mut slots = carry;
    let mut carry = carry;
    for g in groups {
        slots += group_count(g, carry);
        carry = g[GROUP - 1] >> 63;
    }
    for &w in rest {
        slots += u64::from(boundary_mask(w, carry).count_ones());
        carry = w >> 63;
    }
    // A run that reaches the end of the bitmap ends there.
    slots += carry;
    usize::try_from(slots / 2).unwrap_or(usize::MAX)
}

/// Make room for `additional` more ranges in `out`, exactly, and advise huge pages for a large
/// new allocation ([`advise_huge_pages`]).
fn reserve_fresh(out: &mut Vec<DirtyRange>, additional: usize) {
    if out.capacity() - out.len() >= additional {
        return;
    }
    out.reserve_exact(additional);
    #[cfg(target_os = "linux")]
    advise_huge_pages(out);
}

/// The size of a transparent huge page on the platforms that matter here (x86-64, and arm64
/// with 4 KiB pages); elsewhere the advice covers fewer, larger pages, or none.
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// The largest allocation given huge pages (256 MiB, 16 Mi ranges). Huge pages are a bet: one
/// fault per 2 MiB instead of 512 when the kernel has free huge pages at hand, but a stall when
/// it has to compact memory for them, or (measured in a guest with free page reporting) when
/// the host took the free huge pages back and faults them in again 4 KiB at a time, about 4x
/// the cost of 4 KiB pages. The cap bounds what is bet: above it the table is filled in plain
/// pages.
#[cfg(target_os = "linux")]
const HUGE_MAX: usize = 256 << 20;

/// Advise transparent huge pages (`MADV_HUGEPAGE`) for the whole 2 MiB blocks inside `out`'s
/// allocation, when it is from 3 huge pages to [`HUGE_MAX`]. A table sized for its output is
/// written from one end to the other right away, so a huge page wastes nothing, and with 4 KiB
/// pages the page faults are most of what converting into a fresh table costs on a sparse
/// bitmap. The kernel is free to ignore the advice (transparent huge pages disabled, none
/// free).
#[cfg(target_os = "linux")]
fn advise_huge_pages(out: &mut Vec<DirtyRange>) {
    let Some(bytes) = out.capacity().checked_mul(size_of::<DirtyRange>()) else {
        return;
    };
    if !(3 * HUGE_PAGE..=HUGE_MAX).contains(&bytes) {
        return;
    }
    let first = out.as_mut_ptr().addr();
    let lo = first.next_multiple_of(HUGE_PAGE);
    let hi = (first + bytes) & !(HUGE_PAGE - 1);
    if hi > lo {
        // SAFETY: `[lo, hi)` is page-aligned and lies inside `out`'s allocation, which we hold
        // mutably; the pointer is derived from the vector's. `MADV_HUGEPAGE` only changes how
        // the kernel may back these pages, never their contents or whether they are mapped;
        // the result is ignored on purpose (a kernel without transparent huge pages refuses,
        // and the advice is only a speed-up).
        unsafe {
            libc::madvise(
                out.as_mut_ptr().cast::<u8>().wrapping_add(lo - first).cast(),
                hi - lo,
                libc::MADV_HUGEPAGE,
            );
        }
    }
}

/// Append the ranges closed by the boundaries of one group to `out`, each with its end address
/// in place of its length (see [`convert`]); `open` is the start address of a run open before
/// the group, and after it.
#[inline(always)]
fn emit<V: Visit>(out: &mut Vec<DirtyRange>, v: V, marks: u64, bm: &[u64; GROUP], base: u64, open: &mut Option<u64>) {
    // Room for the open start, 64 boundaries per marked word and the slack, two slots a range.
    let slots = 1 + 64 * marks.count_ones() as usize + SLACK;
    out.reserve(slots.div_ceil(2));
    let len = out.len();
    // `DirtyRange` is `#[repr(C)] { gpa: u64, length: u64 }`: two `u64` slots, the start in the
    // first and (until `convert` turns it into a length) the end in the second.
    let p = out.spare_capacity_mut().as_mut_ptr().cast::<u64>();
    let mut k = 0usize;
    if let Some(first) = *open {
        // SAFETY: `slots >= 1` slots are reserved past the vector's length.
        unsafe { p.write(first) };
        k = 1;
    }
    // SAFETY: `k <= 1` and `1 + 64 * marks.count_ones() + SLACK` slots are valid past `p`.
    k = unsafe { v.visit(p, k, marks, bm, base) };
    let done = k / 2;
    *open = if k % 2 == 1 {
        // SAFETY: slot `k - 1` was written (a start whose end is in a later group).
        Some(unsafe { p.add(k - 1).read() })
    } else {
        None
    };
    // SAFETY: slots `0..2 * done` were written: `done` whole ranges past the old length, within
    // the reserved capacity.
    unsafe { out.set_len(len + done) };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The x86-64 implementations, chosen at run time.

    use std::arch::x86_64::*;

    use super::{GROUP, Scalar, Shift, Visit, convert};
    use crate::dirty::DirtyRange;

    /// AVX2, BMI1/2, POPCNT, LZCNT (the x86-64-v3 level).
    pub(super) fn has_v3() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("bmi1")
            && is_x86_feature_detected!("bmi2")
            && is_x86_feature_detected!("popcnt")
            && is_x86_feature_detected!("lzcnt")
    }

    /// x86-64-v3 and AVX-512 F, BW, VL and VBMI2.
    pub(super) fn has_avx512() -> bool {
        has_v3()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vbmi2")
    }

    /// The scalar converter compiled for x86-64-v3.
    ///
    /// # Safety
    ///
    /// The CPU has the features ([`has_v3`]).
    #[target_feature(enable = "avx2,bmi1,bmi2,popcnt,lzcnt")]
    pub(super) unsafe fn convert_v3(out: &mut Vec<DirtyRange>, words: &[u64], join: Option<u64>, at: Shift) {
        convert(out, words, join, Scalar::<_, true>(at));
    }

    /// The converter with a `vpcompressb` visit.
    ///
    /// # Safety
    ///
    /// The CPU has the features ([`has_avx512`]).
    #[target_feature(enable = "avx2,bmi1,bmi2,popcnt,lzcnt,avx512f,avx512bw,avx512vl,avx512vbmi2")]
    pub(super) unsafe fn convert_avx512(out: &mut Vec<DirtyRange>, words: &[u64], join: Option<u64>, at: Shift) {
        convert(out, words, join, Compress(at));
    }

    /// The visit by `vpcompressb`: the bit positions of a word's boundaries packed in one
    /// instruction, eight addresses computed and stored at a time.
    #[derive(Clone, Copy)]
    struct Compress(Shift);

    impl Visit for Compress {
        #[inline(always)]
        fn at(self, bit: u64) -> u64 {
            self.0.start.wrapping_add(bit << self.0.shift)
        }

        #[inline(always)]
        unsafe fn visit(self, p: *mut u64, k: usize, marks: u64, bm: &[u64; GROUP], base: u64) -> usize {
            // SAFETY: only called from `convert_avx512` (the CPU has the features); the caller's
            // bound on `p` is this function's.
            unsafe { visit_compress(self.0, p, k, marks, bm, base) }
        }

        #[inline(always)]
        fn marks(self, g: &[u64; GROUP], carry: u64, bm: &mut [u64; GROUP]) -> u64 {
            // SAFETY: only called from `convert_avx512` (the CPU has the features).
            unsafe { marks_avx512(g, carry, bm) }
        }

        #[inline(always)]
        fn lengths(self, ranges: &mut [DirtyRange]) {
            // SAFETY: only called from `convert_avx512` (the CPU has the features).
            unsafe { lengths_avx512(ranges) }
        }
    }

    /// [`group_marks`](super::group_marks) eight words at a time: `vpshldq` shifts each word
    /// left by one with the top bit of the word below coming in, `vptestmq` marks the words with
    /// a boundary.
    ///
    /// # Safety
    ///
    /// The CPU has the features ([`has_avx512`]).
    #[target_feature(enable = "avx2,bmi1,bmi2,popcnt,lzcnt,avx512f,avx512bw,avx512vl,avx512vbmi2")]
    #[inline]
    unsafe fn marks_avx512(g: &[u64; GROUP], carry: u64, bm: &mut [u64; GROUP]) -> u64 {
        let (words, _) = g.as_chunks::<8>();
        let (out, _) = bm.as_chunks_mut::<8>();
        // Only bit 63 of the word below a chunk's first word matters.
        let mut below = _mm512_set1_epi64((carry << 63) as i64);
        let mut marks = 0u64;
        for (j, (w, b)) in words.iter().zip(out.iter_mut()).enumerate() {
            // SAFETY: `w` is 8 readable words (64 bytes), `b` 8 writable ones.
            unsafe {
                let w = _mm512_loadu_si512(w.as_ptr().cast());
                // Lane i: word i - 1 (lane 0: the last word of the chunk below).
                let prev = _mm512_alignr_epi64::<7>(w, below);
                let bounds = _mm512_xor_si512(w, _mm512_shldi_epi64::<1>(w, prev));
                _mm512_storeu_si512(b.as_mut_ptr().cast(), bounds);
                marks |= u64::from(_mm512_test_epi64_mask(bounds, bounds)) << (8 * j);
                below = w;
            }
        }
        marks
    }

    /// End addresses to lengths four ranges (one register) at a time.
    ///
    /// # Safety
    ///
    /// The CPU has the features ([`has_avx512`]).
    #[target_feature(enable = "avx2,bmi1,bmi2,popcnt,lzcnt,avx512f,avx512bw,avx512vl,avx512vbmi2")]
    #[inline]
    unsafe fn lengths_avx512(ranges: &mut [DirtyRange]) {
        let (fours, rest) = ranges.as_chunks_mut::<4>();
        for four in fours {
            // SAFETY: four `#[repr(C)]` ranges of two `u64`s: 64 bytes, readable and writable.
            unsafe {
                let v = _mm512_loadu_si512(four.as_ptr().cast());
                // Each range's start in both of its lanes; ends (odd lanes) minus starts.
                let starts = _mm512_unpacklo_epi64(v, v);
                let v = _mm512_mask_sub_epi64(v, 0b1010_1010, v, starts);
                _mm512_storeu_si512(four.as_mut_ptr().cast(), v);
            }
        }
        for r in rest {
            r.length = r.length.wrapping_sub(r.gpa);
        }
    }

    /// [`Compress`]'s visit (see [`Visit::visit`]).
    ///
    /// # Safety
    ///
    /// The CPU has the features ([`has_avx512`]); `p[k..k + 64 * marks.count_ones() + 8]` is
    /// valid for writes.
    #[target_feature(enable = "avx2,bmi1,bmi2,popcnt,lzcnt,avx512f,avx512bw,avx512vl,avx512vbmi2")]
    #[inline]
    unsafe fn visit_compress(
        at: Shift,
        p: *mut u64,
        mut k: usize,
        mut marks: u64,
        bm: &[u64; GROUP],
        base: u64,
    ) -> usize {
        // Byte j holds j: compressed by a word's boundary mask, the bit numbers of its
        // boundaries in order.
        let iota = _mm512_set_epi8(
            63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39, 38, 37,
            36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10,
            9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
        );
        let shift = _mm_cvtsi64_si128(i64::from(at.shift));
        // The address of each word's bit 0, eight words a register: a visited word then only
        // broadcasts its entry.
        let mut word_addrs = [0u64; GROUP];
        {
            let first = _mm512_set1_epi64(at.start.wrapping_add(base << at.shift) as i64);
            let word = _mm_cvtsi64_si128(i64::from(at.shift + 6));
            let mut lanes = _mm512_sll_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), word);
            let eight_words = _mm512_sll_epi64(_mm512_set1_epi64(8), word);
            let (chunks, _) = word_addrs.as_chunks_mut::<8>();
            for chunk in chunks {
                // SAFETY: `chunk` is 8 writable words (64 bytes).
                unsafe { _mm512_storeu_si512(chunk.as_mut_ptr().cast(), _mm512_add_epi64(first, lanes)) };
                lanes = _mm512_add_epi64(lanes, eight_words);
            }
        }
        let mut spill = [0u8; 64];
        while marks != 0 {
            let i = marks.trailing_zeros() as usize;
            marks &= marks - 1;
            let b = bm[i % GROUP];
            let n = b.count_ones() as usize;
            let word_addr = _mm512_set1_epi64(word_addrs[i % GROUP] as i64);
            let bits = _mm512_maskz_compress_epi8(b, iota);
            // SAFETY: 8 slots at `k`: real boundaries or within the slack past the last one.
            unsafe { _mm512_storeu_si512(p.add(k).cast(), eight(word_addr, shift, _mm512_castsi512_si128(bits))) };
            if n > 8 {
                // SAFETY: `spill` is 64 writable bytes.
                unsafe { _mm512_storeu_si512(spill.as_mut_ptr().cast(), bits) };
                let mut c = 8;
                while c < n {
                    // SAFETY: `c + 8 <= 64` bytes of `spill` (`c < n <= 64`, a multiple of 8);
                    // slots `k + c..k + c + 8` are real boundaries or within the slack past the
                    // last one.
                    unsafe {
                        let bytes = _mm_loadl_epi64(spill.as_ptr().add(c).cast());
                        _mm512_storeu_si512(p.add(k + c).cast(), eight(word_addr, shift, bytes));
                    }
                    c += 8;
                }
            }
            k += n;
        }
        k
    }

    /// Eight bit numbers (the low bytes of `bytes`) to eight addresses: `word_addr + (bit <<
    /// shift)`.
    #[target_feature(enable = "avx2,bmi1,bmi2,popcnt,lzcnt,avx512f,avx512bw,avx512vl,avx512vbmi2")]
    #[inline]
    fn eight(word_addr: __m512i, shift: __m128i, bytes: __m128i) -> __m512i {
        _mm512_add_epi64(word_addr, _mm512_sll_epi64(_mm512_cvtepu8_epi64(bytes), shift))
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
    fn every_path_on_large_bitmaps() {
        // Random words at several densities, with long clear and set stretches between them:
        // groups skipped inside and outside runs, runs open across groups, words with more
        // boundaries than are written unconditionally.
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut words = Vec::new();
        for round in 0..40 {
            let n = 1 + (next() % 300) as usize;
            for _ in 0..n {
                let w = match round % 5 {
                    0 => 0,
                    1 => u64::MAX,
                    2 => next() & next() & next() & next(),
                    3 => next(),
                    _ => next() | next(),
                };
                words.push(w);
            }
        }
        // Dense stretches: words with 32 boundaries, the vector grown many times.
        words.extend(std::iter::repeat_n(0x5555_5555_5555_5555, 4096));
        words.extend(std::iter::repeat_n(0x0f0f_0f0f_0f0f_0f0f, 100));
        let want = simple(&words, 1 << 30, 4096);
        let mut paths = Vec::new();
        for path in Path::available() {
            let mut got = Vec::new();
            append_ranges_via(path, &mut got, &words, 1 << 30, 4096, None);
            assert_eq!(got, want, "{path:?}");
            paths.push(path.name());
        }
        eprintln!("checked {paths:?}, detected {}", conversion_path());
    }

    #[test]
    fn a_large_dense_output_is_counted_and_sized_once() {
        // 2.2 million ranges: the vector is counted and sized when it reaches `COUNT_AT`.
        let mut seed = 0x00dd_ba11_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let words: Vec<u64> = (0..1 << 16).map(|_| next() & next()).collect();
        let want = simple(&words, 1 << 30, 4096);
        assert!(want.len() > 2 * COUNT_AT);
        for path in Path::available() {
            let mut got = Vec::new();
            append_ranges_via(path, &mut got, &words, 1 << 30, 4096, None);
            assert_eq!(got, want, "{path:?}");
            assert_eq!(
                got.capacity(),
                got.len() + GROUP_RESERVE,
                "{path:?}: sized once, exactly"
            );
            // Reused: no new allocation, no count.
            let at = got.as_ptr();
            got.clear();
            append_ranges_via(path, &mut got, &words, 1 << 30, 4096, None);
            assert_eq!(got, want, "{path:?}");
            assert_eq!(got.as_ptr(), at);
        }
        // A sparse output is never counted: the vector grows as usual.
        let mut sparse = vec![0u64; 1 << 22];
        for i in (0..sparse.len()).step_by(40) {
            sparse[i] = 1 << (i % 64);
        }
        let got = RangeTable::from_bitmap(&sparse, 0, 4096);
        assert_eq!(got.as_slice(), simple(&sparse, 0, 4096).as_slice());
        assert!(got.len() > COUNT_AT && got.capacity() >= 2 * COUNT_AT);
    }

    #[test]
    fn huge_page_advice_leaves_the_contents() {
        let mut v: Vec<DirtyRange> = (0..(8 << 20) / 16).map(|i| DirtyRange::new(i, 1)).collect();
        reserve_fresh(&mut v, 1 << 20);
        v.extend((0..1 << 20).map(|i| DirtyRange::new(i, 2)));
        assert!(
            v[..(8 << 20) / 16]
                .iter()
                .enumerate()
                .all(|(i, r)| *r == DirtyRange::new(i as u64, 1))
        );
        assert!(
            v[(8 << 20) / 16..]
                .iter()
                .enumerate()
                .all(|(i, r)| *r == DirtyRange::new(i as u64, 2))
        );
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
        fn every_path_equals_the_simple_converter(
            words in prop_oneof![
                proptest::collection::vec(arb_word(), 0..300),
                arb_stretches(),
                proptest::collection::vec(any::<u64>(), 0..200),
            ],
            page_size in prop_oneof![(0u32..22).prop_map(|s| 1u64 << s), 1u64..100_000],
            start_page in 1u64..1 << 20,
            open_pages in 0u64..3,
        ) {
            let start = start_page * 4096;
            let want = simple(&words, start, page_size);
            // A run open before bit 0 (a table's last range ending where the bitmap starts).
            let open = DirtyRange::new(start - open_pages * 4096, open_pages * 4096);
            let want_joined = RangeTable::from_ranges(want.iter().copied().chain([open]));
            for path in Path::available() {
                let mut got = vec![DirtyRange::new(0, 1)];
                append_ranges_via(path, &mut got, &words, start, page_size, None);
                prop_assert_eq!(&got[1..], want.as_slice(), "{:?}", path);
                if open_pages > 0 {
                    let mut joined = vec![DirtyRange::new(0, 1)];
                    append_ranges_via(path, &mut joined, &words, start, page_size, Some(open.gpa));
                    let want = RangeTable::from_ranges(want_joined.iter().copied().chain([DirtyRange::new(0, 1)]));
                    prop_assert_eq!(joined.as_slice(), want.as_slice(), "{:?} joined", path);
                }
            }
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

    proptest! {
        // Each case converts some 70 000 ranges (in a debug build).
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn counted_outputs_equal_the_simple_converter(
            dense in 2050usize..2200,
            tail in prop_oneof![
                proptest::collection::vec(arb_word(), 0..300),
                arb_stretches(),
            ],
            head_bit in any::<bool>(),
            open_pages in 0u64..3,
            cut in any::<proptest::sample::Index>(),
        ) {
            // A dense head (32 ranges a word) makes the vector reach `COUNT_AT` within it; the
            // rest is counted from wherever that is, inside or outside a run.
            let mut words = vec![if head_bit { 0x5555_5555_5555_5555 } else { 0xaaaa_aaaa_aaaa_aaaa }; dense];
            words.extend(tail);
            let start = 1u64 << 30;
            let want = simple(&words, start, 4096);
            let open = DirtyRange::new(start - open_pages * 4096, open_pages * 4096);
            for path in Path::available() {
                let mut got = vec![DirtyRange::new(0, 1)];
                let join = (open_pages > 0).then_some(open.gpa);
                append_ranges_via(path, &mut got, &words, start, 4096, join);
                let want = RangeTable::from_ranges(
                    want.iter().copied().chain([DirtyRange::new(0, 1), open]),
                );
                prop_assert_eq!(got.as_slice(), want.as_slice(), "{:?}", path);
                prop_assert!(got.capacity() <= got.len() + GROUP_RESERVE, "{:?}: sized once", path);
                // The count from any word on, inside a run or not.
                let from = 1 + cut.index(words.len() - 1);
                let carry = words[from - 1] >> 63;
                let mut rest = Vec::new();
                append_ranges_via(path, &mut rest, &words[from..], start, 4096, (carry == 1).then_some(0));
                prop_assert_eq!(count_ranges(&words[from..], carry), rest.len());
            }
        }
    }
}
