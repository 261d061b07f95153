//! Output helpers shared by the commands: progress bars, sizes, peak memory.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// The exit status when stdout was closed under us: 128 + SIGPIPE, what a shell reports for a
/// program SIGPIPE ended.
pub const CLOSED_STDOUT_STATUS: i32 = 141;

/// Write `args` (and a newline) to stdout and flush. When stdout is closed (EPIPE: the reader of
/// the pipe went away, as `head -c1` does) exit at once with [`CLOSED_STDOUT_STATUS`] and no
/// message; any other write error is reported on stderr and exits 1. Never panics, unlike
/// `println!`. Commands print only after their work is done, so exiting here never leaves a
/// device mid-migration.
pub fn out(args: fmt::Arguments<'_>, newline: bool) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| if newline { stdout.write_all(b"\n") } else { Ok(()) })
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(CLOSED_STDOUT_STATUS),
        Err(e) => {
            eprintln!("vfio-mig: error: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// A byte-progress bar on stderr, shown only when stderr is a terminal (JSON goes to stdout,
/// so the two never mix).
pub fn byte_bar(total: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} {spinner} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Peak resident memory of this process in bytes (VmHWM), when the kernel tells.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A size for people: `64.0 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Milliseconds with three decimals, for JSON.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
