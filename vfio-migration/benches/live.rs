//! Live-migration benchmarks on emulated devices, measuring downtime (not wall time) with
//! criterion's `iter_custom`, and printing same-run ratios against the baseline:
//!
//! - pre-copy vs stop-copy only: a 1 GiB device with a low dirty rate (1 MiB/s); targets:
//!   stop-copy bytes at most 5% of the state, downtime at most 0.1 of the stop-copy-only run;
//! - parallel vs serial stop-copy: 4 devices x 256 MiB whose state comes out at a device-bound
//!   rate (`read-rate=256M`, as real devices do); target: parallel at most 0.6 of serial.
//!
//! `LIVE_BENCH_SCALE=N` divides the sizes by N for a quick run.

use std::sync::Mutex;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use vfio_migration::MigrationDevice;
use vfio_migration::emulated::EmulatedDevice;
use vfio_migration::live::{LocalMigration, MigrationReport};

fn scale() -> u64 {
    std::env::var("LIVE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn run(src_spec: &str, dst_spec: &str, n: usize, precopy: bool, parallel: bool) -> MigrationReport {
    let mut srcs: Vec<EmulatedDevice> = (0..n)
        .map(|i| EmulatedDevice::from_spec(&format!("{src_spec},seed={i}")).unwrap())
        .collect();
    let mut dsts: Vec<EmulatedDevice> = (0..n)
        .map(|i| EmulatedDevice::from_spec(&format!("{dst_spec},seed={i}")).unwrap())
        .collect();
    let mut m = LocalMigration::default();
    m.source.precopy = precopy;
    m.source.parallel = parallel;
    let report = m
        .run(
            srcs.iter_mut()
                .map(|d| Box::new(d) as Box<dyn MigrationDevice>)
                .collect(),
            dsts.iter_mut()
                .map(|d| Box::new(d) as Box<dyn MigrationDevice>)
                .collect(),
            &mut |_| {},
        )
        .expect("migration");
    for (s, d) in srcs.iter().zip(&dsts) {
        assert_eq!(s.digest(), d.digest(), "benchmark migration must verify");
    }
    report
}

/// Mean of the measured downtimes per case, for the summary.
static RESULTS: Mutex<Vec<(&'static str, Duration, u64, u64)>> = Mutex::new(Vec::new());

fn record(name: &'static str, r: &MigrationReport) {
    RESULTS.lock().unwrap().push((
        name,
        r.downtime,
        r.stop_copy_bytes.iter().sum(),
        r.precopy_bytes.iter().sum(),
    ));
}

/// Mean downtime and stop-copy bytes of a case, when it ran (a filter may have skipped it).
fn mean(name: &str) -> Option<(Duration, u64)> {
    let r = RESULTS.lock().unwrap();
    let v: Vec<_> = r.iter().filter(|x| x.0 == name).collect();
    let n = u32::try_from(v.len()).ok().filter(|n| *n > 0)?;
    let d = v.iter().map(|x| x.1).sum::<Duration>() / n;
    let b = v.iter().map(|x| x.2).sum::<u64>() / u64::from(n);
    Some((d, b))
}

fn precopy(c: &mut Criterion) {
    let size = (1u64 << 30) / scale();
    let src = format!("size={size},dirty-rate=1M");
    let dst = format!("size={size}");
    let mut g = c.benchmark_group("downtime_1GiB_low_dirty_rate");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    for (name, pre) in [("with_precopy", true), ("stop_copy_only", false)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let r = run(&src, &dst, 1, pre, true);
                    record(name, &r);
                    total += r.downtime;
                }
                total
            })
        });
    }
    g.finish();
    let (Some((with, sc_bytes)), Some((without, _))) = (mean("with_precopy"), mean("stop_copy_only")) else {
        return;
    };
    println!(
        "SUMMARY pre-copy: downtime {:.2} ms vs {:.2} ms stop-copy only: ratio {:.4} (target <= 0.1); \
         stop-copy bytes {} = {:.3}% of the state (target <= 5%)",
        with.as_secs_f64() * 1e3,
        without.as_secs_f64() * 1e3,
        with.as_secs_f64() / without.as_secs_f64(),
        sc_bytes,
        sc_bytes as f64 * 100.0 / size as f64
    );
}

fn parallel(c: &mut Criterion) {
    let size = (256u64 << 20) / scale();
    let src = format!("size={size},read-rate=256M");
    let dst = format!("size={size}");
    let mut g = c.benchmark_group("stop_copy_4x256MiB");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    for (name, par) in [("parallel", true), ("serial", false)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let r = run(&src, &dst, 4, false, par);
                    record(name, &r);
                    total += r.downtime;
                }
                total
            })
        });
    }
    g.finish();
    let (Some((p, _)), Some((s, _))) = (mean("parallel"), mean("serial")) else {
        return;
    };
    println!(
        "SUMMARY parallel stop-copy (4 x {} MiB, 256 MiB/s per device): {:.1} ms vs serial {:.1} ms: ratio {:.3} (target <= 0.6)",
        size >> 20,
        p.as_secs_f64() * 1e3,
        s.as_secs_f64() * 1e3,
        p.as_secs_f64() / s.as_secs_f64()
    );
}

criterion_group!(benches, precopy, parallel);
criterion_main!(benches);
