//! `vfio-mig inspect FILE`: check a saved stream and describe it.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use vfio_migration::stream::{InspectOptions, InspectReport, MAX_LISTED_CHUNKS, inspect_with};

/// Arguments of `inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The stream file.
    file: PathBuf,
    /// List the records one by one (at most 4096; all are counted in the sections). By default
    /// the report is a summary: header, sections, end marker.
    #[arg(long)]
    chunks: bool,
}

/// The report as JSON: without the per-record list unless it was asked for.
fn report_json(report: &InspectReport, chunks: bool) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(report)?;
    if !chunks && let Some(obj) = v.as_object_mut() {
        obj.remove("chunks");
        obj.remove("chunks_not_listed");
    }
    Ok(v)
}

/// Exit 0 only for a flawless stream.
pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    let file = File::open(&args.file).with_context(|| format!("open {}", args.file.display()))?;
    let opts = InspectOptions {
        max_listed_chunks: if args.chunks { MAX_LISTED_CHUNKS } else { 0 },
    };
    match inspect_with(BufReader::new(file), opts) {
        Ok(report) => {
            if json {
                let mut v = report_json(&report, args.chunks)?;
                v["valid"] = true.into();
                outln!("{v}");
            } else {
                out!("{report}");
                outln!("valid: yes");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(fail) => {
            if json {
                outln!(
                    "{}",
                    serde_json::json!({
                        "valid": false,
                        "error": fail.message(),
                        "offset": fail.offset(),
                        "partial": report_json(&fail.partial, args.chunks).ok(),
                    })
                );
            } else {
                out!("{}", fail.partial);
                outln!("valid: NO: at byte {}: {}", fail.offset(), fail.message());
            }
            Ok(ExitCode::FAILURE)
        }
    }
}
