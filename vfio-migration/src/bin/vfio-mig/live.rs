//! Live migration between opened devices of this process: shared by `migrate` and `demo`.

use std::time::Duration;

use vfio_migration::MigrationDevice;
use vfio_migration::live::{Convergence, LiveProgress, LocalMigration, MigrationReport, SourceOptions};

use crate::report;
use crate::spec::Opened;

/// Options shared by `migrate` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct LiveArgs {
    /// Skip pre-copy: the whole state moves inside the downtime (stop-copy only).
    #[arg(long)]
    pub no_precopy: bool,
    /// Downtime limit in milliseconds: switch over once the estimate is below it.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Switch over after this many pre-copy iterations even when not converged.
    #[arg(long, default_value_t = 1000)]
    pub max_iterations: u32,
    /// Switch over after this many seconds of pre-copy even when not converged.
    #[arg(long, default_value_t = 120)]
    pub max_precopy_secs: u64,
    /// Allow several devices when some lack P2P (unsafe if they DMA to each other).
    #[arg(long)]
    pub force_without_p2p: bool,
    /// Read the devices one after another in stop-copy instead of in parallel.
    #[arg(long)]
    pub serial: bool,
}

/// Run a live migration from `sources[i]` to `destinations[i]`, with a progress line on stderr.
/// A pair where either identity is unknown is refused unless `force_unknown_identity`.
pub fn migrate(
    args: &LiveArgs,
    sources: &mut [Opened],
    destinations: &mut [Opened],
    force_unknown_identity: bool,
) -> Result<MigrationReport, vfio_migration::live::LiveError> {
    let mut m = LocalMigration::default();
    args.apply(&mut m.source, &mut m.convergence);
    m.destination.force_unknown_identity = force_unknown_identity;
    let total: u64 = sources.iter_mut().filter_map(|d| d.dev().stop_copy_size().ok()).sum();
    let mut bar = LiveBar::new(total, "migrating");
    let mut on_progress = |p: &LiveProgress| bar.update(p);
    let srcs: Vec<Box<dyn MigrationDevice + '_>> = sources
        .iter_mut()
        .map(|d| Box::new(d.dev()) as Box<dyn MigrationDevice>)
        .collect();
    let dsts: Vec<Box<dyn MigrationDevice + '_>> = destinations
        .iter_mut()
        .map(|d| Box::new(d.dev()) as Box<dyn MigrationDevice>)
        .collect();
    let result = m.run(srcs, dsts, &mut on_progress);
    bar.finish();
    result
}

impl LiveArgs {
    /// Put these options into the engine's source options and convergence policy.
    pub fn apply(&self, source: &mut SourceOptions, convergence: &mut Convergence) {
        source.precopy = !self.no_precopy;
        source.force_without_p2p = self.force_without_p2p;
        source.parallel = !self.serial;
        convergence.downtime_limit = Duration::from_millis(self.downtime_ms);
        convergence.max_iterations = self.max_iterations;
        convergence.max_time = Duration::from_secs(self.max_precopy_secs);
    }
}

/// The progress bar of a live migration: pre-copy iterations, then stop-copy bytes.
pub struct LiveBar {
    bar: indicatif::ProgressBar,
    total: u64,
    moved_precopy: u64,
}

impl LiveBar {
    /// A bar for `total` bytes (the devices' stop-copy estimates), labelled `what`.
    pub fn new(total: u64, what: &str) -> Self {
        Self {
            bar: report::byte_bar(Some(total), what),
            total,
            moved_precopy: 0,
        }
    }

    /// Show one progress event.
    pub fn update(&mut self, p: &LiveProgress) {
        match p {
            LiveProgress::Iteration {
                n,
                bytes,
                pending,
                est_downtime,
            } => {
                self.moved_precopy += bytes;
                self.bar.set_position(self.moved_precopy.min(self.total));
                self.bar.set_message(format!(
                    "pre-copy #{n}: pending {}, est. downtime {}",
                    report::human(*pending),
                    est_downtime.map_or("?".into(), |d| format!("{} ms", report::ms(d)))
                ));
            }
            LiveProgress::StopCopy { bytes } => {
                self.bar.set_message("stop-copy");
                self.bar.set_position((self.moved_precopy + bytes).min(self.total));
            }
        }
    }

    /// Remove the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The JSON report of a live migration; `verified` per device when both ends are emulated.
pub fn report_json(r: &MigrationReport, sources: &[Opened], destinations: &[Opened]) -> serde_json::Value {
    let per_device: Vec<serde_json::Value> = (0..r.devices.len())
        .map(|i| {
            let digests = sources[i]
                .emulated()
                .zip(destinations[i].emulated())
                .map(|(s, d)| (s.digest(), d.digest()));
            serde_json::json!({
                "source": r.devices[i],
                "precopy_bytes": r.precopy_bytes.get(i),
                "stop_copy_bytes": r.stop_copy_bytes.get(i),
                "source_digest": digests.map(|d| format!("{:016x}", d.0)),
                "destination_digest": digests.map(|d| format!("{:016x}", d.1)),
                "verified": digests.map(|(a, b)| a == b),
            })
        })
        .collect();
    let mut v = totals_json(r);
    v["per_device"] = per_device.into();
    v
}

/// The totals of a live migration report, shared by `migrate`, `demo` and `send`.
pub fn totals_json(r: &MigrationReport) -> serde_json::Value {
    serde_json::json!({
        "devices": r.devices.len(),
        "precopy_bytes": r.precopy_bytes.iter().sum::<u64>(),
        "stop_copy_bytes": r.stop_copy_bytes.iter().sum::<u64>(),
        "iterations": r.iterations(),
        "iteration_bytes": r.iteration_bytes,
        "switch_reason": r.switch_reason,
        "downtime_ms": report::ms(r.downtime),
        "est_downtime_ms": r.est_downtime.map(report::ms),
        "total_ms": report::ms(r.total),
    })
}

/// Whether every device pair is verified equal (None when some end is not emulated).
pub fn verified(sources: &[Opened], destinations: &[Opened]) -> Option<bool> {
    let mut all = true;
    for (s, d) in sources.iter().zip(destinations) {
        let (s, d) = (s.emulated()?, d.emulated()?);
        all &= s.digest() == d.digest();
    }
    Some(all)
}

/// Print the human summary of a live migration.
pub fn print_human(r: &MigrationReport) {
    let pre: u64 = r.precopy_bytes.iter().sum();
    let stop: u64 = r.stop_copy_bytes.iter().sum();
    outln!("devices:         {}", r.devices.join(", "));
    outln!(
        "pre-copy:        {} in {} iterations ({})",
        report::human(pre),
        r.iterations(),
        r.switch_reason
    );
    outln!("stop-copy:       {}", report::human(stop));
    outln!(
        "downtime:        {} ms (estimated {})",
        report::ms(r.downtime),
        r.est_downtime.map_or("n/a".into(), |d| format!("{} ms", report::ms(d)))
    );
    outln!("total:           {} ms", report::ms(r.total));
}
