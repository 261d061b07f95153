//! `vfio-mig migrate SRC[,SRC..] DST[,DST..]`: live migration between devices of this host.

use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::live::{self, LiveArgs};
use crate::spec;

/// Arguments of `migrate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source devices, comma-separated.
    sources: String,
    /// Destination devices, comma-separated, in the same order.
    destinations: String,
    #[command(flatten)]
    live: LiveArgs,
    /// Accept a device whose identity is unknown (its sysfs could not be read, or the stream
    /// carries none). Refused by default: nothing then shows the state fits the device, and a
    /// wrong state can wedge it. Known, different identities are refused anyway.
    #[arg(long)]
    force_unknown_identity: bool,
}

pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    let mut sources = spec::open_list(&args.sources).context("sources")?;
    let mut destinations = spec::open_list(&args.destinations).context("destinations")?;
    if sources.len() != destinations.len() {
        bail!("{} sources but {} destinations", sources.len(), destinations.len());
    }
    let r = live::migrate(&args.live, &mut sources, &mut destinations, args.force_unknown_identity)
        .context("migration failed")?;
    let verified = live::verified(&sources, &destinations);
    if json {
        let mut v = live::report_json(&r, &sources, &destinations);
        v["verified"] = verified.into();
        outln!("{v}");
    } else {
        live::print_human(&r);
        if let Some(v) = verified {
            outln!("verified:        {}", if v { "yes" } else { "NO: states differ" });
        }
    }
    Ok(if verified == Some(false) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
