//! `vfio-mig demo`: live-migrate emulated devices whose state changes while they run, and verify.

use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::live::{self, LiveArgs};
use crate::{report, spec};

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of devices.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Device state size of each device (K, M, G suffixes).
    #[arg(long, default_value = "64M")]
    size: String,
    /// Bytes of device state changed per second while the source runs (e.g. 1M; 0 for none).
    #[arg(long, default_value = "1M")]
    dirty_rate: String,
    /// Content seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Instead: copy a simulated guest memory iteratively while the emulated device DMAs into it,
    /// using the device's DMA log, and check the destination memory byte for byte.
    #[arg(long)]
    dma: bool,
    /// Guest memory size for --dma.
    #[arg(long, default_value = "64M", requires = "dma")]
    memory: String,
    /// Copy rounds while the device runs, for --dma.
    #[arg(long, default_value_t = 5, requires = "dma")]
    rounds: usize,
    /// For --dma: leave one dirty page out of the final copy on purpose; the check must fail.
    #[arg(long, requires = "dma")]
    drop_dirty_page: bool,
    #[command(flatten)]
    live: LiveArgs,
}

pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    if args.dma {
        return run_dma(&args, json);
    }
    if args.devices == 0 || args.devices > 64 {
        bail!("--devices must be 1 to 64, not {}", args.devices);
    }
    let mut sources = Vec::new();
    let mut destinations = Vec::new();
    for i in 0..args.devices {
        let seed = args.seed.wrapping_add(i as u64);
        let src = format!(
            "emulated:name=src{i},size={},seed={seed},dirty-rate={}",
            args.size, args.dirty_rate
        );
        let dst = format!("emulated:name=dst{i},size={},seed={seed}", args.size);
        sources.push(
            spec::open(&src).with_context(|| format!("--size {} / --dirty-rate {}", args.size, args.dirty_rate))?,
        );
        destinations.push(spec::open(&dst)?);
    }
    let r = live::migrate(&args.live, &mut sources, &mut destinations, false).context("demo migration failed")?;
    let verified = live::verified(&sources, &destinations).unwrap_or(false);
    let size = sources[0].emulated().map_or(0, |d| d.config().size);
    if json {
        let mut v = live::report_json(&r, &sources, &destinations);
        v["verified"] = verified.into();
        v["size_bytes"] = size.into();
        v["peak_rss_bytes"] = report::peak_rss().into();
        outln!("{v}");
    } else {
        outln!("emulated devices: {} x {}", args.devices, report::human(size));
        live::print_human(&r);
        if let Some(rss) = report::peak_rss() {
            outln!("peak memory:     {}", report::human(rss));
        }
        outln!(
            "verified:        {}",
            if verified {
                "yes, every destination equals its source"
            } else {
                "NO: states differ"
            }
        );
    }
    Ok(if verified { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn run_dma(args: &Args, json: bool) -> anyhow::Result<ExitCode> {
    use vfio_migration::emulated::{EmulatedDevice, parse_size};
    use vfio_migration::testing::dma_demo::{DmaDemoConfig, run_dma_demo};

    let memory = parse_size("memory", &args.memory)?;
    let device = EmulatedDevice::from_spec(&format!("size={},seed={}", args.size, args.seed)).context("--size")?;
    let cfg = DmaDemoConfig {
        memory,
        rounds: args.rounds.max(1),
        seed: args.seed,
        drop_last_written_page: args.drop_dirty_page,
        ..DmaDemoConfig::default()
    };
    let r = run_dma_demo(device, &cfg).context("DMA demo")?;
    let verified = r.verified.is_ok();
    let dirty: Vec<u64> = r.rounds.iter().map(|x| x.copied).collect();
    if json {
        let rounds: Vec<serde_json::Value> = r
            .rounds
            .iter()
            .map(|x| serde_json::json!({"copied_bytes": x.copied, "ranges": x.ranges, "device_stopped": x.device_stopped}))
            .collect();
        let mismatch = r
            .verified
            .as_ref()
            .err()
            .map(|m| serde_json::json!({"first_gpa": m.first_gpa, "pages": m.pages}));
        outln!(
            "{}",
            serde_json::json!({
                "dma": true,
                "memory_bytes": memory,
                "iterations": r.rounds.len(),
                "rounds": rounds,
                "dirty_bytes_per_iteration": dirty,
                "dma_writes": r.dma_writes,
                "dropped_page": r.dropped.map(|d| d.gpa),
                "verified": verified,
                "mismatch": mismatch,
            })
        );
    } else {
        outln!(
            "guest memory:    {}, device DMA logged page by page",
            report::human(memory)
        );
        for (i, x) in r.rounds.iter().enumerate() {
            outln!(
                "round {i}:         {} in {} ranges{}",
                report::human(x.copied),
                x.ranges,
                if x.device_stopped { " (device stopped)" } else { "" }
            );
        }
        outln!("DMA writes:      {}", r.dma_writes);
        match &r.verified {
            Ok(()) => outln!("verified:        yes, destination memory equals the source byte for byte"),
            Err(m) => outln!(
                "verified:        NO: {} page(s) differ, first at {:#x}",
                m.pages,
                m.first_gpa
            ),
        }
    }
    Ok(if verified { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
