//! `vfio-mig save DEVICE -o FILE` and `vfio-mig load DEVICE -i FILE`.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use vfio_migration::session::{After, LoadOptions, SaveOptions, load_from_stream, save_to_stream};

use crate::{report, spec};

/// Arguments of `save`.
#[derive(Debug, clap::Args)]
pub struct SaveArgs {
    /// The device: emulated[:params] or a sysfs path.
    device: String,
    /// The file to write (written to FILE.partial, renamed on success).
    #[arg(short, long)]
    output: PathBuf,
    /// Leave the device stopped afterwards (default: back to RUNNING).
    #[arg(long)]
    stop: bool,
}

/// Arguments of `load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The device: emulated[:params] or a sysfs path.
    device: String,
    /// The stream file to load.
    #[arg(short, long)]
    input: PathBuf,
    /// Leave the device stopped afterwards (default: RUNNING).
    #[arg(long)]
    stop: bool,
}

fn after(stop: bool) -> After {
    if stop { After::Stop } else { After::Running }
}

pub fn save(args: SaveArgs, json: bool) -> anyhow::Result<ExitCode> {
    let mut opened = spec::open(&args.device)?;
    let dev = opened.dev();
    let estimate = dev.stop_copy_size().ok();
    let mut partial = args.output.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = File::create(&partial).with_context(|| format!("create {}", partial.display()))?;
    let bar = report::byte_bar(estimate, "saving");
    let mut progress = |bytes: u64, _total: Option<u64>| bar.set_position(bytes);
    let opts = SaveOptions {
        after: after(args.stop),
        progress: Some(&mut progress),
        ..SaveOptions::default()
    };
    let result = save_to_stream(dev, BufWriter::new(file), None, opts);
    bar.finish_and_clear();
    let (r, out) = match result {
        Ok(ok) => ok,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e).context(format!("save to {}", args.output.display()));
        }
    };
    let file = out.into_inner().map_err(|e| e.into_error()).context("flush")?;
    file.sync_all().context("sync")?;
    std::fs::rename(&partial, &args.output).with_context(|| format!("rename to {}", args.output.display()))?;
    let stream_bytes = std::fs::metadata(&args.output).map(|m| m.len()).unwrap_or(0);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "device": dev_name(&mut opened),
                "file": args.output,
                "state_bytes": r.bytes,
                "stream_bytes": stream_bytes,
                "estimate": r.estimate,
                "time_ms": report::ms(r.duration),
                "final_state": r.final_state.name(),
            })
        );
    } else {
        println!(
            "saved {} of device state ({} stream) to {} in {} ms; the device is {}",
            report::human(r.bytes),
            report::human(stream_bytes),
            args.output.display(),
            report::ms(r.duration),
            r.final_state
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn dev_name(o: &mut spec::Opened) -> String {
    o.dev().name().to_string()
}

pub fn load(args: LoadArgs, json: bool) -> anyhow::Result<ExitCode> {
    let file = File::open(&args.input).with_context(|| format!("open {}", args.input.display()))?;
    let size = file.metadata().map(|m| m.len()).ok();
    let mut opened = spec::open(&args.device)?;
    let bar = report::byte_bar(size, "loading");
    let mut progress = |bytes: u64, _total: Option<u64>| bar.set_position(bytes);
    let opts = LoadOptions {
        after: after(args.stop),
        progress: Some(&mut progress),
        expected: size,
        ..LoadOptions::default()
    };
    let result = load_from_stream(opened.dev(), BufReader::new(file), opts);
    bar.finish_and_clear();
    let r = result.with_context(|| format!("load {}", args.input.display()))?;
    let verified = opened.emulated().map(|d| format!("{:016x}", d.digest()));
    if json {
        println!(
            "{}",
            serde_json::json!({
                "device": dev_name(&mut opened),
                "file": args.input,
                "state_bytes": r.report.bytes,
                "time_ms": report::ms(r.report.duration),
                "final_state": r.report.final_state.name(),
                "writer": r.writer,
                "config_bytes": r.config.as_ref().map(Vec::len),
                "digest": verified,
            })
        );
    } else {
        println!(
            "loaded {} of device state from {} (written by {}) in {} ms; the device is {}",
            report::human(r.report.bytes),
            args.input.display(),
            r.writer,
            report::ms(r.report.duration),
            r.report.final_state
        );
    }
    Ok(ExitCode::SUCCESS)
}
