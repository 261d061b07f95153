//! `vfio-mig receive DEVICE.. --listen URL`: receive a live migration from `vfio-mig send`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use vfio_migration::MigrationDevice;
use vfio_migration::transport::{self, MigrationUrl, ReceiveOptions, ReceiveProgress, Receiver};

use crate::{report, spec};

/// Arguments of `receive`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The devices to load into (emulated[:params], vfio-user:SOCKET or sysfs paths), in the sender's order.
    #[arg(required = true)]
    devices: Vec<String>,
    /// Where to listen: tcp:HOST:PORT (port 0: any free port) or unix:PATH.
    #[arg(long)]
    listen: MigrationUrl,
    /// Mutual TLS: a directory with ca-cert.pem, server-cert.pem and server-key.pem.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Seconds to wait for a sender (default: forever).
    #[arg(long)]
    accept_timeout: Option<u64>,
    /// Seconds the hello and the data connections may take to arrive.
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
    /// Seconds the sender may stay silent before the migration is aborted.
    #[arg(long, default_value_t = 30)]
    idle_timeout: u64,
    /// Accept a device whose identity is unknown (its sysfs could not be read, or the stream
    /// carries none). Refused by default: nothing then shows the state fits the device, and a
    /// wrong state can wedge it. Known, different identities are refused anyway.
    #[arg(long)]
    force_unknown_identity: bool,
}

pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    let mut opened = args
        .devices
        .iter()
        .map(|s| spec::open(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut opts = ReceiveOptions {
        accept_timeout: args.accept_timeout.map(Duration::from_secs),
        connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(2)),
        ..ReceiveOptions::default()
    };
    opts.destination.force_unknown_identity = args.force_unknown_identity;
    if let Some(dir) = &args.tls_dir {
        opts.tls = Some(transport::server_config(dir)?);
    }
    let receiver = Receiver::bind(&args.listen)?;
    // Always on stderr, so a caller that asked for port 0 learns the port.
    eprintln!("vfio-mig: listening on {}", receiver.url());
    if let Some(w) = receiver.plaintext_warning(&opts) {
        eprintln!("vfio-mig: warning: {w}");
    }
    let handles: Vec<_> = opened.iter().map(|o| o.emulated().map(|e| e.handle())).collect();
    let bar = report::byte_bar(None, "waiting for a sender");
    let mut on_progress = |p: &ReceiveProgress| match p {
        ReceiveProgress::Accepted { peer, connections } => {
            bar.set_message(format!("receiving from {peer} ({connections} connection(s))"));
        }
        ReceiveProgress::Loaded { bytes } => bar.set_position(*bytes),
    };
    let devs: Vec<Box<dyn MigrationDevice + '_>> = opened
        .iter_mut()
        .map(|d| Box::new(d.dev()) as Box<dyn MigrationDevice>)
        .collect();
    let result = receiver.receive(devs, &opts, &mut on_progress);
    bar.finish_and_clear();
    let r = result.with_context(|| format!("migration received on {} failed", receiver.url()))?;
    let digests: Vec<Option<u64>> = handles.iter().map(|h| h.as_ref().map(|d| d.digest())).collect();
    let verified: Vec<Option<bool>> = digests
        .iter()
        .zip(&r.source_checks)
        .map(|(d, s)| Some(d.as_ref()? == s.as_ref()?))
        .collect();
    let all_verified = verified
        .iter()
        .copied()
        .collect::<Option<Vec<bool>>>()
        .map(|v| v.iter().all(|x| *x));
    if json {
        let hex = |v: &Option<u64>| v.map(|d| format!("{d:016x}"));
        let per_device: Vec<serde_json::Value> = (0..r.devices.len())
            .map(|i| {
                serde_json::json!({
                    "destination": r.devices[i],
                    "precopy_bytes": r.precopy_bytes.get(i),
                    "stop_copy_bytes": r.stop_copy_bytes.get(i),
                    "digest": digests.get(i).and_then(hex),
                    "source_digest": r.source_checks.get(i).and_then(hex),
                    "verified": verified.get(i).copied().flatten(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "listen": receiver.url().to_string(),
            "peer": r.peer,
            "connections": r.connections,
            "tls": r.tls,
            "devices": r.devices.len(),
            "precopy_bytes": r.precopy_bytes.iter().sum::<u64>(),
            "stop_copy_bytes": r.stop_copy_bytes.iter().sum::<u64>(),
            "iterations": r.source_iterations,
            "downtime_ms": report::ms(r.downtime),
            "est_downtime_ms": r.source_est_downtime.map(report::ms),
            "total_ms": report::ms(r.total),
            "verified": all_verified,
            "per_device": per_device,
        });
        outln!("{v}");
    } else {
        let pre: u64 = r.precopy_bytes.iter().sum();
        let stop: u64 = r.stop_copy_bytes.iter().sum();
        outln!(
            "from:            {} ({} connection(s){})",
            r.peer,
            r.connections,
            if r.tls { ", TLS" } else { "" }
        );
        outln!("devices:         {}", r.devices.join(", "));
        outln!("pre-copy:        {}", report::human(pre));
        outln!("stop-copy:       {}", report::human(stop));
        outln!("downtime:        {} ms (receiver's view)", report::ms(r.downtime));
        if let Some(v) = all_verified {
            outln!(
                "verified:        {}",
                if v {
                    "yes, every device equals its source"
                } else {
                    "NO: states differ"
                }
            );
        }
    }
    Ok(if all_verified == Some(false) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
