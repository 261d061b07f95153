//! `vfio-mig send DEVICE.. --to URL`: live-migrate devices to a `vfio-mig receive` elsewhere.
//!
//! Exit status: 0 when the receiver confirmed that it runs the devices; 1 on a failure before
//! the commit point (the devices are back in RUNNING); [`EXIT_UNCONFIRMED`] when COMMIT was sent
//! but not confirmed: the devices stay stopped and the operator decides.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vfio_migration::MigrationDevice;
use vfio_migration::live::LiveProgress;
use vfio_migration::transport::{self, MigrationUrl, SendOptions};

use crate::live::{LiveArgs, LiveBar};
use crate::spec;

/// Arguments of `send`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The devices to migrate (emulated[:params], vfio-user:SOCKET or sysfs paths), in the receiver's order.
    #[arg(required = true)]
    devices: Vec<String>,
    /// Where the receiver listens: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    to: MigrationUrl,
    /// Data connections to spread the device state over (1 to 16).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Mutual TLS: a directory with ca-cert.pem, client-cert.pem and client-key.pem.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Seconds to wait for a connection (and its TLS handshake).
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
    /// Seconds the receiver may stay silent before the migration is aborted.
    #[arg(long, default_value_t = 30)]
    idle_timeout: u64,
    /// Switch over once the downtime estimate is met, without waiting for the receiver to
    /// acknowledge the initial pre-copy data (switchover-ack).
    #[arg(long)]
    force_switchover: bool,
    #[command(flatten)]
    live: LiveArgs,
}

/// The exit status of a migration handed over but not confirmed (`"outcome": "unconfirmed"`).
pub const EXIT_UNCONFIRMED: u8 = 3;

pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    let mut opened = args
        .devices
        .iter()
        .map(|s| spec::open(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut opts = SendOptions {
        connections: args.connections,
        connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(2)),
        ..SendOptions::default()
    };
    if let Some(dir) = &args.tls_dir {
        opts.tls = Some(transport::client_config(dir)?);
    }
    args.live.apply(&mut opts.source, &mut opts.convergence);
    if args.force_switchover {
        opts.convergence.switchover_ack = false;
    }
    let handles: Vec<_> = opened.iter().map(|o| o.emulated().map(|e| e.handle())).collect();
    if handles.iter().any(Option::is_some) {
        let h = handles.clone();
        opts.check = Some(Arc::new(move |i| h.get(i)?.as_ref().map(|d| d.digest())));
    }
    let total: u64 = opened.iter_mut().filter_map(|d| d.dev().stop_copy_size().ok()).sum();
    let mut bar = LiveBar::new(total, "sending");
    let mut on_progress = |p: &LiveProgress| bar.update(p);
    let devs: Vec<Box<dyn MigrationDevice + '_>> = opened
        .iter_mut()
        .map(|d| Box::new(d.dev()) as Box<dyn MigrationDevice>)
        .collect();
    let result = transport::send(&args.to, devs, &opts, &mut on_progress);
    bar.finish();
    let r = match result {
        Err(e) if e.is_unconfirmed() => {
            let msg = format!("migration to {}: {e}", args.to);
            if json {
                let v = serde_json::json!({
                    "outcome": "unconfirmed",
                    "to": args.to.to_string(),
                    "source_state": "STOP",
                    "error": msg,
                });
                println!("{v}");
            } else {
                eprintln!("vfio-mig: {msg}");
            }
            return Ok(ExitCode::from(EXIT_UNCONFIRMED));
        }
        r => r.with_context(|| format!("migration to {} failed", args.to))?,
    };
    let digests: Vec<Option<String>> = handles
        .iter()
        .map(|h| h.as_ref().map(|d| format!("{:016x}", d.digest())))
        .collect();
    if json {
        let per_device: Vec<serde_json::Value> = (0..r.devices.len())
            .map(|i| {
                serde_json::json!({
                    "source": r.devices[i],
                    "precopy_bytes": r.precopy_bytes.get(i),
                    "stop_copy_bytes": r.stop_copy_bytes.get(i),
                    "source_digest": digests.get(i),
                })
            })
            .collect();
        let mut v = crate::live::totals_json(&r);
        v["outcome"] = "completed".into();
        v["to"] = args.to.to_string().into();
        v["connections"] = args.connections.into();
        v["tls"] = args.tls_dir.is_some().into();
        v["per_device"] = per_device.into();
        outln!("{v}");
    } else {
        outln!("to:              {}", args.to);
        crate::live::print_human(&r);
    }
    Ok(ExitCode::SUCCESS)
}
