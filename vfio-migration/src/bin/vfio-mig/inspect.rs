//! `vfio-mig inspect FILE`: check a saved stream and describe it.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use vfio_migration::stream::inspect;

/// Arguments of `inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The stream file.
    file: PathBuf,
}

/// Exit 0 only for a flawless stream.
pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    let file = File::open(&args.file).with_context(|| format!("open {}", args.file.display()))?;
    match inspect(BufReader::new(file)) {
        Ok(report) => {
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["valid"] = true.into();
                println!("{v}");
            } else {
                print!("{report}");
                println!("valid: yes");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(fail) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "valid": false,
                        "error": fail.message(),
                        "offset": fail.offset(),
                        "partial": serde_json::to_value(&fail.partial).ok(),
                    })
                );
            } else {
                print!("{}", fail.partial);
                println!("valid: NO: at byte {}: {}", fail.offset(), fail.message());
            }
            Ok(ExitCode::FAILURE)
        }
    }
}
