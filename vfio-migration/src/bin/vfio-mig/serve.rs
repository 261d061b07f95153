//! `vfio-mig serve DEVICE --socket PATH`: serve an emulated device to vfio-user clients, as a PCI
//! device a VMM can attach (config space, BAR0 registers, DMA into mapped guest memory: see
//! `vfio_migration::vfio_user::regs`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use vfio_migration::MigrationDevice;
use vfio_migration::vfio_user::{self, Server};

use crate::spec;

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The device to serve: emulated[:params].
    device: String,
    /// The UNIX socket to listen on (created with mode 0600; a socket where a server still
    /// listens is never replaced).
    #[arg(long)]
    socket: PathBuf,
    /// Exit after serving this many connections (default: serve forever).
    #[arg(long)]
    connections: Option<u64>,
    /// Serve the device without migration support (the migration features and data messages
    /// answer ENOTTY), like a vfio-user server that cannot migrate: for testing how a VMM
    /// treats a device whose state cannot move.
    #[arg(long)]
    no_migration: bool,
}

pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    let mut opened = spec::open(&args.device)?;
    let Some(emulated) = opened.emulated() else {
        bail!(
            "{}: only emulated devices can be served (the server has no regions of a real device)",
            args.device
        );
    };
    let handle = emulated.handle();
    let listener = vfio_user::bind(&args.socket).with_context(|| format!("listen on {}", args.socket.display()))?;
    let dev = opened.dev();
    let name = dev.name().to_string();
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "serving": name,
                "socket": args.socket.display().to_string(),
                "identity": dev.identity().to_string(),
            })
        );
    } else {
        outln!("serving {name} on vfio-user:{}", args.socket.display());
    }
    let opts = vfio_user::ServerOptions {
        no_migration: args.no_migration,
        ..Default::default()
    };
    let mut server = Server::with_options(dev, opts).with_model(vfio_user::EmulatedModel::new(handle.clone()));
    let mut served = 0u64;
    let mut failed = 0u64;
    while args.connections.is_none_or(|n| served < n) {
        let outcome = server
            .serve_one(&listener)
            .with_context(|| format!("accept on {}", args.socket.display()))?;
        served += 1;
        if let Err(e) = outcome {
            failed += 1;
            eprintln!("vfio-mig serve: client dropped: {e}");
        }
    }
    let state = server.device().state().context("read the state")?;
    let digests = server.migration_digests();
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "device": name,
                "connections": served,
                "dropped": failed,
                "state": state.name(),
                "digest": format!("{:016x}", handle.digest()),
                "saved_digest": digests.saved.map(|d| format!("{d:016x}")),
                "loaded_digest": digests.loaded.map(|d| format!("{d:016x}")),
            })
        );
    } else {
        outln!(
            "{name}: served {served} connections ({failed} dropped); state {state}, content digest {:016x}{}{}",
            handle.digest(),
            digests.saved.map(|d| format!(", saved {d:016x}")).unwrap_or_default(),
            digests.loaded.map(|d| format!(", loaded {d:016x}")).unwrap_or_default(),
        );
    }
    Ok(ExitCode::SUCCESS)
}
