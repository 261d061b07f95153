//! `vfio-mig probe DEVICE`: what a device supports and where it is.

use std::process::ExitCode;

use anyhow::Context;
use vfio_migration::DeviceState;

use crate::{report, spec};

/// Arguments of `probe`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The device: emulated[:params], vfio-user:SOCKET or a sysfs path.
    device: String,
}

pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    let mut opened = spec::open(&args.device)?;
    let dev = opened.dev();
    let flags = dev.flags().context("probe")?;
    let state = dev.state().context("probe")?;
    let size = dev.stop_copy_size();
    // Opening never resets: this is the state the device was left in.
    let note = (state != DeviceState::Running).then(|| {
        format!(
            "the device is {state}, not RUNNING (left so by an earlier save --stop, migration or another user); \
             `vfio-mig reset DEVICE` or --reset-first returns it to RUNNING"
        )
    });
    let states: Vec<&str> = flags.supported_states().iter().map(|s| s.name()).collect();
    if json {
        let v = serde_json::json!({
            "device": dev.name(),
            "identity": dev.identity().to_string(),
            "flags": flags.bits(),
            "flag_names": flags.names(),
            "unknown_flag_bits": flags.unknown_bits(),
            "states": states,
            "state": state.name(),
            "running": state == DeviceState::Running,
            "note": note,
            "stop_copy_size": size.as_ref().ok(),
            "stop_copy_size_error": size.as_ref().err().map(|e| e.to_string()),
        });
        outln!("{v}");
    } else {
        outln!("device:          {}", dev.name());
        outln!("identity:        {}", dev.identity());
        outln!("flags:           {flags} ({:#x})", flags.bits());
        outln!("states:          {}", states.join(" "));
        outln!("state:           {state}");
        if let Some(note) = &note {
            outln!("note:            {note}");
        }
        match size {
            Ok(s) => outln!("stop-copy size:  {s} bytes ({})", report::human(s)),
            Err(e) => outln!("stop-copy size:  unknown ({e})"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
