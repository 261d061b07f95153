//! `vfio-mig reset DEVICE`: return a device to RUNNING with VFIO_DEVICE_RESET.

use std::process::ExitCode;

use anyhow::Context;

use crate::spec;

/// Arguments of `reset`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The device: emulated[:params], vfio-user:SOCKET or a sysfs path.
    device: String,
}

/// Reset the device whatever state it is in, and report the state before and after.
pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    let mut opened = spec::open_as_is(&args.device)?;
    let dev = opened.dev();
    let name = dev.name().to_string();
    let before = dev
        .state()
        .with_context(|| format!("{name}: read the state before the reset"))?;
    dev.reset().with_context(|| format!("{name}: reset from {before}"))?;
    let after = dev
        .state()
        .with_context(|| format!("{name}: read the state after the reset"))?;
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "device": name,
                "state_before": before.name(),
                "state": after.name(),
            })
        );
    } else {
        outln!(
            "{name}: reset; it was {before} and is {after} (a reset that wipes, an FLR on PCI hardware, loses the \
             device state it held)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
