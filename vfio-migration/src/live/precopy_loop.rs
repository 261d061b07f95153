//! The pre-copy loop, one for every kind of migration: [`super::LocalMigration`] (source and
//! destination in one process) and the network sender (`transport::send`) both run [`run`],
//! each with its own [`PrecopyPeer`] (where the chunks go, what the destination said).

use std::time::{Duration, Instant};

use super::{Convergence, LiveError, LiveProgress, MigrationReport, Precopy, Source, SwitchReason};

/// What the pre-copy loop needs from the side that takes the chunks.
pub(crate) trait PrecopyPeer<'a> {
    /// The error the loop returns (a device error converts into it).
    type Error: From<LiveError>;

    /// The source being migrated.
    fn source(&mut self) -> &mut Source<'a>;

    /// Take what the destination said so far (acknowledgements, a failure); called before and
    /// after every step. Nothing to do in one process.
    fn poll(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// One pre-copy step: [`Source::iterate`] with at most `budget` bytes into this peer's
    /// sink, and whatever makes the chunks reach the destination; returns the bytes moved.
    fn step(&mut self, budget: u64) -> Result<u64, Self::Error>;

    /// Whether the destination acknowledged every initial-data marker sent so far
    /// (switchover-ack).
    fn acked(&mut self) -> bool;
}

/// Pre-copy until the convergence policy says to switch over (or no device is in pre-copy),
/// filling the pre-copy part of `report` (downtime estimate, switch reason, initial-data
/// markers, pass bytes, pre-copy bytes). A re-init (PRE_COPY info v2) seen right before a
/// switchover on convergence sends the loop on: the acknowledgement must cover the new marker.
/// On an error the caller aborts both sides.
pub(crate) fn run<'a, P: PrecopyPeer<'a>>(
    peer: &mut P,
    conv: &Convergence,
    report: &mut MigrationReport,
    progress: &mut dyn FnMut(&LiveProgress),
) -> Result<SwitchReason, P::Error> {
    let mut precopy = Precopy::new();
    let reason = loop {
        peer.poll()?;
        if !peer.source().precopy_active() {
            break SwitchReason::NoPrecopy;
        }
        let t = Instant::now();
        let moved = peer.step(conv.iteration_budget)?;
        precopy.moved(moved, t.elapsed());
        let src = peer.source();
        let pending = src.pending()?;
        let estimate = precopy.estimate(pending.stop_copy);
        report.est_downtime = estimate;
        progress(&LiveProgress::Iteration {
            n: src.passes() + 1,
            bytes: moved,
            pending: pending.total(),
            est_downtime: estimate,
        });
        peer.poll()?;
        let acked = peer.acked();
        let src = peer.source();
        if let Some(r) = precopy.decide(conv, src.passes(), estimate, src.initial_drained(), acked) {
            // A last look for new initial data (PRE_COPY info v2) before a switchover on
            // convergence: a re-init withdraws the acknowledgement until the destination has
            // the new initial data.
            if matches!(r, SwitchReason::Converged | SwitchReason::ConvergedWithoutAck) && src.check_reinit()? {
                continue;
            }
            break r;
        }
        if moved == 0 {
            // Nothing to read now: let the devices produce more before polling again.
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let src = peer.source();
    report.switch_reason = reason.name();
    report.initial_markers = src.initial_markers();
    report.iteration_bytes = src.pass_bytes().to_vec();
    report.precopy_bytes = src.precopy_bytes();
    Ok(reason)
}
