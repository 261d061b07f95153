//! Dirty tracking benchmarks: bitmap to ranges, and merging range tables.
//!
//! Bitmap to ranges runs on the bitmap of a 1 TiB guest with 4 KiB pages (2^28 pages, a 32 MiB
//! bitmap) in five shapes, against a fair simple converter written here (a word at a time: skip
//! clear words, `trailing_zeros`/`trailing_ones` within a word, push each run, coalescing across
//! words), both into a fresh table and into a reused one (what a tracker does every round).
//! Merging runs on two sorted tables of one million ranges each, against concatenating them,
//! sorting and coalescing. Criterion measures both sides; a summary line per case then times them
//! again in the same run (the bitmap cases round-robin, so load on a shared machine hits both
//! sides alike) and prints GB/s of bitmap, the ratios, and the conversion path picked for this
//! CPU ([`vfio_migration::dirty::bitmap::conversion_path`]); two last lines check the targets
//! (1% random pages: into a fresh table at least 2x the simple converter and within 1.3x of
//! merely writing the ranges into a fresh vector; into a reused one at most 12 ms and at least
//! 4x; no case slower than the simple converter).
//!
//! The fresh cases run back to back, so the memory one conversion frees is what the next one
//! gets: a fresh table of 1% random pages (42 MB) is in transparent huge pages, which the
//! kernel then has at hand. After a few seconds idle, in a guest with free page reporting, the
//! host may have taken them back, and the first fresh conversion can cost several times more.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vfio_migration::dirty::{DirtyRange, RangeTable};

const PAGE: u64 = 4096;
const GUEST: u64 = 1 << 40;
const WORDS: usize = (GUEST / PAGE / 64) as usize;
const BITMAP_BYTES: u64 = (WORDS * 8) as u64;

/// splitmix64: a small deterministic generator (the bitmaps are the same on every run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn set_bit(words: &mut [u64], bit: u64) {
    words[(bit / 64) as usize] |= 1 << (bit % 64);
}

/// A zeroed bitmap whose every page is really written (a `vec![0; n]` comes from calloc: its
/// untouched pages all map the kernel's zero page, which would make scans look faster than any
/// real bitmap).
fn zeros() -> Vec<u64> {
    (0..WORDS).map(|_| black_box(0u64)).collect()
}

/// The five bitmap shapes.
fn bitmaps() -> Vec<(&'static str, Vec<u64>)> {
    let bits = WORDS as u64 * 64;
    let mut rng = Rng(0x5eed);

    let empty = zeros();

    let mut sparse = zeros();
    for _ in 0..bits / 100 {
        set_bit(&mut sparse, rng.below(bits));
    }

    // Clustered: runs of 64 to 4096 pages (256 KiB to 16 MiB) at random places, about 5% dirty,
    // the shape of a guest working on a few buffers.
    let mut clustered = zeros();
    let mut dirty = 0u64;
    while dirty < bits / 20 {
        let len = 64 + rng.below(4096 - 64);
        let start = rng.below(bits - len);
        for b in start..start + len {
            set_bit(&mut clustered, b);
        }
        dirty += len;
    }

    let half: Vec<u64> = (0..WORDS).map(|_| rng.next()).collect();
    let full = vec![u64::MAX; WORDS];
    vec![
        ("empty", empty),
        ("1% random", sparse),
        ("clustered", clustered),
        ("50% random", half),
        ("all dirty", full),
    ]
}

/// The fair simple converter: a word at a time, clear words skipped, runs inside a word found
/// with `trailing_zeros`/`trailing_ones`, each run pushed (or joined to the last range when it
/// continues it from the previous word). Appends to `out`, so it can reuse an allocation too.
fn simple_into(out: &mut Vec<DirtyRange>, words: &[u64], start: u64, page_size: u64) {
    for (i, &w) in words.iter().enumerate() {
        if w == 0 {
            continue;
        }
        let base = i as u64 * 64;
        let mut w = w;
        while w != 0 {
            let first = w.trailing_zeros();
            let len = (w >> first).trailing_ones();
            let gpa = start + (base + u64::from(first)) * page_size;
            let length = u64::from(len) * page_size;
            match out.last_mut() {
                Some(last) if last.gpa + last.length == gpa => last.length += length,
                _ => out.push(DirtyRange::new(gpa, length)),
            }
            // Clear the run (a run of 64 is the whole word).
            w = if len == 64 {
                0
            } else {
                w & !(((1u64 << len) - 1) << first)
            };
        }
    }
}

/// [`simple_into`] a fresh vector.
fn simple(words: &[u64], start: u64, page_size: u64) -> Vec<DirtyRange> {
    let mut out = Vec::new();
    simple_into(&mut out, words, start, page_size);
    out
}

/// The write-only floor: append `n` ranges to `out`, no bitmap read at all.
fn write_only(out: &mut Vec<DirtyRange>, n: usize) {
    out.extend((0..n as u64).map(|i| DirtyRange::new(i * 2 * PAGE, PAGE)));
}

/// Concatenate, sort, coalesce: the merge baseline.
fn concat_sort_coalesce(tables: &[&RangeTable], stable: bool) -> Vec<DirtyRange> {
    let mut all: Vec<DirtyRange> = tables.iter().flat_map(|t| t.iter().copied()).collect();
    if stable {
        all.sort_by_key(|r| r.gpa);
    } else {
        all.sort_unstable_by_key(|r| r.gpa);
    }
    let mut out: Vec<DirtyRange> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if r.gpa <= last.gpa + last.length => {
                let end = (r.gpa + r.length).max(last.gpa + last.length);
                last.length = end - last.gpa;
            }
            _ => out.push(r),
        }
    }
    out
}

/// A sorted, coalesced table of `n` ranges with random lengths and gaps.
fn random_table(rng: &mut Rng, n: usize) -> RangeTable {
    let mut t = RangeTable::with_capacity(n);
    let mut addr = 0u64;
    while t.len() < n {
        addr += (1 + rng.below(64)) * PAGE;
        let len = (1 + rng.below(32)) * PAGE;
        t.push(DirtyRange::new(addr, len));
        addr += len;
    }
    t
}

/// The median wall time of each of `fs`, timed round-robin: each round calls every function
/// once, so a change of load on a shared machine hits all of them alike, and the ratios of the
/// medians stay fair. 11 rounds, or 5 when one round takes over 300 ms.
fn medians_interleaved(fs: &mut [&mut dyn FnMut()]) -> Vec<Duration> {
    let round = |fs: &mut [&mut dyn FnMut()]| -> Vec<Duration> {
        fs.iter_mut()
            .map(|f| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect()
    };
    let first = round(fs);
    let rounds = if first.iter().sum::<Duration>() > Duration::from_millis(300) {
        5
    } else {
        11
    };
    let mut times: Vec<Vec<Duration>> = first.into_iter().map(|t| vec![t]).collect();
    for _ in 1..rounds {
        for (v, t) in times.iter_mut().zip(round(fs)) {
            v.push(t);
        }
    }
    times
        .into_iter()
        .map(|mut v| {
            v.sort();
            v[v.len() / 2]
        })
        .collect()
}

/// The median wall time of `runs` calls.
fn median<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

/// Criterion's name filter (the first argument that is not an option), applied to the summary.
fn summary_filter() -> Option<String> {
    std::env::args().skip(1).find(|a| !a.starts_with('-'))
}

fn selected(filter: &Option<String>, name: &str) -> bool {
    filter.as_deref().is_none_or(|f| name.contains(f))
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn bench_bitmap(c: &mut Criterion) {
    let maps = bitmaps();
    let mut summary = Vec::new();
    {
        let mut group = c.benchmark_group("bitmap_to_ranges_1TiB_4KiB");
        group.throughput(Throughput::Bytes(BITMAP_BYTES));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        for (name, words) in &maps {
            group.bench_function(format!("{name}/fresh"), |b| {
                b.iter(|| RangeTable::from_bitmap(black_box(words), 0, PAGE))
            });
            let mut table = RangeTable::from_bitmap(words, 0, PAGE);
            group.bench_function(format!("{name}/reused"), |b| {
                b.iter(|| {
                    table.fill_from_bitmap(black_box(words), 0, PAGE);
                    table.len()
                })
            });
            group.bench_function(format!("{name}/simple fresh"), |b| {
                b.iter(|| simple(black_box(words), 0, PAGE))
            });
            let mut vec = simple(words, 0, PAGE);
            group.bench_function(format!("{name}/simple reused"), |b| {
                b.iter(|| {
                    vec.clear();
                    simple_into(&mut vec, black_box(words), 0, PAGE);
                    vec.len()
                })
            });
        }
        group.finish();
    }
    let filter = summary_filter();
    // (case, fresh or reused, ratio to simple) of every case, and the 1% random figures the
    // targets are about.
    let mut ratios: Vec<(&str, &str, f64)> = Vec::new();
    let mut sparse = None;
    for (name, words) in &maps {
        if !selected(&filter, &format!("bitmap_to_ranges_1TiB_4KiB/{name}/")) {
            continue;
        }
        // Check once that both sides agree, then time them in the same run.
        let fast = RangeTable::from_bitmap(words, 0, PAGE);
        let slow = simple(words, 0, PAGE);
        assert_eq!(fast.as_slice(), slow.as_slice(), "{name}: conversions disagree");
        let ranges = fast.len();
        let mut table = fast;
        let mut vec = slow;
        let mut floor_vec: Vec<DirtyRange> = Vec::with_capacity(ranges);
        // The conversions and what merely writing the output costs (into a fresh and into a
        // reused vector), timed round-robin.
        let times = medians_interleaved(&mut [
            &mut || drop(black_box(RangeTable::from_bitmap(words, 0, PAGE))),
            &mut || drop(black_box(simple(words, 0, PAGE))),
            &mut || {
                table.fill_from_bitmap(words, 0, PAGE);
                black_box(table.len());
            },
            &mut || {
                vec.clear();
                simple_into(&mut vec, words, 0, PAGE);
                black_box(vec.len());
            },
            &mut || {
                let mut v = Vec::new();
                write_only(&mut v, ranges);
                drop(black_box(v));
            },
            &mut || {
                floor_vec.clear();
                write_only(&mut floor_vec, ranges);
                black_box(floor_vec.len());
            },
        ]);
        let [t_fast, t_simple, t_reused, t_simple_reused, t_floor, t_floor_reused] = times[..] else {
            unreachable!("six timings")
        };
        let ratio = |simple: Duration, fast: Duration| simple.as_secs_f64() / fast.as_secs_f64();
        ratios.push((name, "fresh", ratio(t_simple, t_fast)));
        ratios.push((name, "reused", ratio(t_simple_reused, t_reused)));
        if *name == "1% random" {
            sparse = Some((
                ratio(t_simple, t_fast),
                t_fast.as_secs_f64() / t_floor.as_secs_f64(),
                t_reused,
                ratio(t_simple_reused, t_reused),
            ));
        }
        summary.push(format!(
            "SUMMARY bitmap_to_ranges {name:<10} fresh : fast {:>8.3} ms {:>6.2} GB/s | simple {:>8.3} ms {:>6.2} GB/s | ratio {:>5.2}x | write-only floor {:>8.3} ms (fast/floor {:.2}x) | {ranges} ranges",
            ms(t_fast),
            gbps(BITMAP_BYTES, t_fast),
            ms(t_simple),
            gbps(BITMAP_BYTES, t_simple),
            t_simple.as_secs_f64() / t_fast.as_secs_f64(),
            ms(t_floor),
            t_fast.as_secs_f64() / t_floor.as_secs_f64(),
        ));
        summary.push(format!(
            "SUMMARY bitmap_to_ranges {name:<10} reused: fast {:>8.3} ms {:>6.2} GB/s | simple {:>8.3} ms {:>6.2} GB/s | ratio {:>5.2}x | write-only floor {:>8.3} ms | fast vs simple into a fresh vector {:.2}x",
            ms(t_reused),
            gbps(BITMAP_BYTES, t_reused),
            ms(t_simple_reused),
            gbps(BITMAP_BYTES, t_simple_reused),
            t_simple_reused.as_secs_f64() / t_reused.as_secs_f64(),
            ms(t_floor_reused),
            t_simple.as_secs_f64() / t_reused.as_secs_f64(),
        ));
    }
    if !summary.is_empty() {
        println!(
            "SUMMARY bitmap_to_ranges conversion path: {} (median of round-robin runs)",
            vfio_migration::dirty::bitmap::conversion_path()
        );
    }
    for line in summary {
        println!("{line}");
    }
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    if let Some((fresh, floor, reused, reused_ratio)) = sparse {
        println!(
            "SUMMARY bitmap_to_ranges targets (1% random): fresh >= 2x simple: {fresh:.2}x {} | fresh <= 1.3x write-only floor: {floor:.2}x {} | reused <= 12 ms: {:.3} ms {} | reused >= 4x simple: {reused_ratio:.2}x {}",
            verdict(fresh >= 2.0),
            verdict(floor <= 1.3),
            ms(reused),
            verdict(reused <= Duration::from_millis(12)),
            verdict(reused_ratio >= 4.0),
        );
    }
    if let Some(&(name, kind, lowest)) = ratios.iter().min_by(|a, b| a.2.total_cmp(&b.2)) {
        println!(
            "SUMMARY bitmap_to_ranges targets: no case slower than simple: lowest ratio {lowest:.2}x ({name} {kind}) {}",
            verdict(lowest >= 1.0)
        );
    }
}

fn bench_merge(c: &mut Criterion) {
    let mut rng = Rng(0x3e76e);
    let a = random_table(&mut rng, 1_000_000);
    let b = random_table(&mut rng, 1_000_000);
    let tables = [&a, &b];
    {
        let mut group = c.benchmark_group("merge_2x1M_ranges");
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        group.bench_function("k-way merge", |bch| bch.iter(|| RangeTable::merge(black_box(&tables))));
        group.bench_function("concat+sort_unstable+coalesce", |bch| {
            bch.iter(|| concat_sort_coalesce(black_box(&tables), false))
        });
        group.finish();
    }
    if !selected(&summary_filter(), "merge_2x1M_ranges/k-way merge") {
        return;
    }
    let merged = RangeTable::merge(&tables);
    assert_eq!(merged.as_slice(), concat_sort_coalesce(&tables, false).as_slice());
    let t_merge = median(11, || RangeTable::merge(&tables));
    let t_unstable = median(5, || concat_sort_coalesce(&tables, false));
    let t_stable = median(5, || concat_sort_coalesce(&tables, true));
    println!(
        "SUMMARY merge 2x1M ranges: k-way {:.3} ms | concat+sort_unstable+coalesce {:.3} ms, ratio {:.1}x | concat+stable sort+coalesce {:.3} ms, ratio {:.1}x | {} ranges out",
        t_merge.as_secs_f64() * 1e3,
        t_unstable.as_secs_f64() * 1e3,
        t_unstable.as_secs_f64() / t_merge.as_secs_f64(),
        t_stable.as_secs_f64() * 1e3,
        t_stable.as_secs_f64() / t_merge.as_secs_f64(),
        merged.len()
    );
}

criterion_group!(benches, bench_bitmap, bench_merge);
criterion_main!(benches);
