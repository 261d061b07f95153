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
    #[command(flatten)]
    live: LiveArgs,
}

pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
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
    let r = live::migrate(&args.live, &mut sources, &mut destinations).context("demo migration failed")?;
    let verified = live::verified(&sources, &destinations).unwrap_or(false);
    let size = sources[0].emulated().map_or(0, |d| d.config().size);
    if json {
        let mut v = live::report_json(&r, &sources, &destinations);
        v["verified"] = verified.into();
        v["size_bytes"] = size.into();
        v["peak_rss_bytes"] = report::peak_rss().into();
        println!("{v}");
    } else {
        println!("emulated devices: {} x {}", args.devices, report::human(size));
        live::print_human(&r);
        if let Some(rss) = report::peak_rss() {
            println!("peak memory:     {}", report::human(rss));
        }
        println!(
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
