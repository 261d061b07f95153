//! `vfio-mig plan FROM TO`: the path the kernel takes.

use std::process::ExitCode;

use vfio_migration::state::{DeviceState, MigrationFlags, path};

/// Arguments of `plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The current state (e.g. RUNNING).
    from: DeviceState,
    /// The requested state (e.g. STOP_COPY).
    to: DeviceState,
    /// The device's migration flags: stop-copy,p2p,pre-copy (or raw bits such as 0x7).
    #[arg(long, default_value = "stop-copy,p2p,pre-copy")]
    flags: MigrationFlags,
}

pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    let states = path(args.from, args.to, args.flags)
        .map_err(|e| anyhow::anyhow!("{} -> {} with flags {}: {e}", args.from, args.to, args.flags))?;
    let names: Vec<&str> = states.iter().map(|s| s.name()).collect();
    if json {
        outln!("{}", serde_json::json!({ "path": names }));
    } else {
        outln!("{}", names.join(" -> "));
    }
    Ok(ExitCode::SUCCESS)
}
