//! `vfio-mig save DEVICE -o FILE` and `vfio-mig load DEVICE -i FILE`.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use vfio_migration::session::{
    After, LoadOptions, SaveOptions, SessionError, StreamIoError, load_from_stream, save_to_stream,
};
use vfio_migration::stream::StreamReader;

use crate::{report, spec};

/// Arguments of `save`.
#[derive(Debug, clap::Args)]
pub struct SaveArgs {
    /// The device: emulated[:params], vfio-user:SOCKET or a sysfs path.
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
    /// The device: emulated[:params], vfio-user:SOCKET or a sysfs path.
    device: String,
    /// The stream file to load.
    #[arg(short, long)]
    input: PathBuf,
    /// Leave the device stopped afterwards (default: RUNNING).
    #[arg(long)]
    stop: bool,
    /// Accept a device whose identity is unknown (its sysfs could not be read, or the stream
    /// carries none). Refused by default: nothing then shows the state fits the device, and a
    /// wrong state can wedge it. Known, different identities are refused anyway.
    #[arg(long)]
    force_unknown_identity: bool,
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
            return Err(with_hint(e)).context(format!("save to {}", args.output.display()));
        }
    };
    let file = out.into_inner().map_err(|e| e.into_error()).context("flush")?;
    file.sync_all().context("sync")?;
    std::fs::rename(&partial, &args.output).with_context(|| format!("rename to {}", args.output.display()))?;
    let stream_bytes = std::fs::metadata(&args.output).map(|m| m.len()).unwrap_or(0);
    if json {
        outln!(
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
        outln!(
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

/// Point at the explicit reset when the device was found in a state save or load cannot start from.
fn with_hint(e: StreamIoError) -> anyhow::Error {
    let bad_start = matches!(e, StreamIoError::Session(SessionError::BadStartState { .. }));
    let e = anyhow::Error::from(e);
    if bad_start {
        e.context("the device was left outside RUNNING; `vfio-mig reset DEVICE` or --reset-first resets it")
    } else {
        e
    }
}

/// Read the header of the stream in `path` and check it against the device, touching nothing.
fn check_header(path: &Path, opened: &mut spec::Opened, force_unknown_identity: bool) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let reader = StreamReader::new(BufReader::new(file)).with_context(|| format!("read {}", path.display()))?;
    let dev = opened.dev();
    let name = dev.name().to_string();
    let flags = dev.flags().with_context(|| format!("{name}: migration flags"))?;
    reader
        .header()
        .check_compatible(0, &dev.identity(), flags, force_unknown_identity)
        .map_err(|error| StreamIoError::Mismatch { device: name, error })?;
    Ok(())
}

fn dev_name(o: &mut spec::Opened) -> String {
    o.dev().name().to_string()
}

pub fn load(args: LoadArgs, json: bool) -> anyhow::Result<ExitCode> {
    let file = File::open(&args.input).with_context(|| format!("open {}", args.input.display()))?;
    let size = file.metadata().map(|m| m.len()).ok();
    // Never change the device before the stream header was checked against it: with
    // --reset-first, the reset comes after that check.
    let mut opened = spec::open_as_is(&args.device)?;
    if spec::reset_first() {
        check_header(&args.input, &mut opened, args.force_unknown_identity)?;
        if let Some(was) = opened.reset_if_not_running()? {
            log::warn!("{}: was {was}; reset it to RUNNING (--reset-first)", args.device);
        }
    }
    let bar = report::byte_bar(size, "loading");
    let mut progress = |bytes: u64, _total: Option<u64>| bar.set_position(bytes);
    let opts = LoadOptions {
        after: after(args.stop),
        progress: Some(&mut progress),
        expected: size,
        force_unknown_identity: args.force_unknown_identity,
        ..LoadOptions::default()
    };
    let result = load_from_stream(opened.dev(), BufReader::new(file), opts);
    bar.finish_and_clear();
    let r = result
        .map_err(with_hint)
        .with_context(|| format!("load {}", args.input.display()))?;
    let verified = opened.emulated().map(|d| format!("{:016x}", d.digest()));
    if json {
        outln!(
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
        outln!(
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
