//! `vfio-mig`: plan, probe, save, load and migrate VFIO device state.
//!
//! Every command takes `--json` for machine-readable output; errors then print `{"error": ...}`
//! and the exit status is non-zero. A closed stdout (`vfio-mig inspect --json FILE | head -c1`)
//! ends the tool quietly with status 141, as SIGPIPE would.

/// `println!` on stdout that exits quietly when stdout is closed ([`report::out`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::report::out(format_args!($($arg)*), true)
    };
}

/// `print!` on stdout that exits quietly when stdout is closed ([`report::out`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::report::out(format_args!($($arg)*), false)
    };
}

mod demo;
mod inspect;
mod live;
mod migrate;
mod plan;
mod probe;
mod receive;
mod report;
mod reset;
mod save;
mod send;
mod serve;
mod spec;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Live migration of VFIO devices: plan, probe, save, load and migrate device state.
#[derive(Debug, Parser)]
#[command(name = "vfio-mig", version, about, long_about = None)]
struct Cli {
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// How to open VFIO devices given by sysfs path: auto (cdev + iommufd when available, else
    /// group + type1 container), group, or cdev.
    #[arg(long, global = true, default_value = "auto")]
    open_mode: vfio_migration::kernel::OpenMode,
    /// Commands that open devices (probe, save, load, migrate, send, receive): reset every device
    /// that is not RUNNING before using it. Without it a device is never changed by being opened;
    /// a reset may lose the device's state.
    #[arg(long, global = true)]
    reset_first: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the path the kernel takes between two device states.
    Plan(plan::Args),
    /// Show a device's migration flags, states, current state and stop-copy size.
    Probe(probe::Args),
    /// Reset a device (VFIO_DEVICE_RESET): it returns to RUNNING; its migration state may be lost.
    Reset(reset::Args),
    /// Save a device's state to a stream file (the device returns to RUNNING unless --stop).
    Save(save::SaveArgs),
    /// Load a stream file into a device (RUNNING afterwards unless --stop).
    Load(save::LoadArgs),
    /// Check a stream file and describe it; exits 0 only for a flawless stream.
    Inspect(inspect::Args),
    /// Live-migrate devices of this host: SRC[,SRC..] to DST[,DST..].
    Migrate(migrate::Args),
    /// Live-migrate emulated devices whose state changes while running, and verify them.
    Demo(demo::Args),
    /// Live-migrate devices to a `vfio-mig receive` (tcp:HOST:PORT or unix:PATH).
    Send(send::Args),
    /// Receive a live migration from a `vfio-mig send` into these devices.
    Receive(receive::Args),
    /// Serve an emulated device to vfio-user clients on a UNIX socket, one connection at a time.
    Serve(serve::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let wants_json = std::env::args().any(|a| a == "--json");
            let usage_error = err.use_stderr();
            if wants_json && usage_error {
                let msg = err.kind().to_string();
                let detail = err.to_string();
                let first = detail.lines().next().unwrap_or(&msg).trim_start_matches("error: ");
                outln!("{}", serde_json::json!({ "error": first }));
                return ExitCode::from(2);
            }
            // --help and --version print and exit 0; usage errors exit 2.
            err.exit();
        }
    };
    let json = cli.json;
    spec::set_open_mode(cli.open_mode);
    spec::set_reset_first(cli.reset_first);
    let result = match cli.command {
        Command::Plan(args) => plan::run(args, json),
        Command::Probe(args) => probe::run(args, json),
        Command::Reset(args) => reset::run(args, json),
        Command::Save(args) => save::save(args, json),
        Command::Load(args) => save::load(args, json),
        Command::Inspect(args) => inspect::run(args, json),
        Command::Migrate(args) => migrate::run(args, json),
        Command::Demo(args) => demo::run(args, json),
        Command::Send(args) => send::run(args, json),
        Command::Receive(args) => receive::run(args, json),
        Command::Serve(args) => serve::run(args, json),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            if json {
                outln!("{}", serde_json::json!({ "error": format!("{err:#}") }));
            } else {
                eprintln!("vfio-mig: error: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}
