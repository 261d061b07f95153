//! When to switch over: downtime estimates and the convergence policy.

use std::time::{Duration, Instant};

/// The convergence policy of a live migration.
///
/// The migration switches over when the estimated downtime is within [`Convergence::downtime_limit`],
/// every device's initial pre-copy data has been read, and (unless
/// [`Convergence::switchover_ack`] is off) the destination has loaded it (switchover-ack).
/// Before that, only the explicit bounds switch over: [`Convergence::max_iterations`] full
/// passes over the devices that did not converge, or [`Convergence::max_time`] of pre-copy.
/// Passes made while the migration only waits for the acknowledgement do not count.
#[derive(Clone, Debug)]
pub struct Convergence {
    /// Switch over once the estimated downtime is at most this (Cloud Hypervisor's default: 300 ms).
    pub downtime_limit: Duration,
    /// Switch over after this many full pre-copy passes over all devices (see
    /// [`crate::live::Source::passes`]) without converging, even before the switchover-ack.
    pub max_iterations: u32,
    /// Switch over after this much pre-copy time even when not converged or not acknowledged.
    pub max_time: Duration,
    /// Bytes read per pre-copy step, at most.
    pub iteration_budget: u64,
    /// Wait until the destination has loaded every device's initial pre-copy data
    /// (QEMU's switchover-ack) before switching over on convergence. Off is what
    /// `--force-switchover` asks for.
    pub switchover_ack: bool,
}

impl Default for Convergence {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_iterations: 1000,
            max_time: Duration::from_secs(120),
            iteration_budget: 256 << 20,
            switchover_ack: true,
        }
    }
}

/// Why a migration switched over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchReason {
    /// The estimated downtime fell within the limit and the destination acknowledged the
    /// initial data.
    Converged,
    /// The estimated downtime fell within the limit; the switchover-ack was not awaited because
    /// the caller turned it off (`--force-switchover`).
    ConvergedWithoutAck,
    /// No device is in pre-copy: nothing to iterate.
    NoPrecopy,
    /// The bound on full passes was reached first.
    PassLimit,
    /// The time bound was reached first.
    TimeLimit,
}

impl SwitchReason {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            SwitchReason::Converged => "converged",
            SwitchReason::ConvergedWithoutAck => "converged-without-ack",
            SwitchReason::NoPrecopy => "no-precopy",
            SwitchReason::PassLimit => "pass-limit",
            SwitchReason::TimeLimit => "time-limit",
        }
    }
}

impl Convergence {
    /// Decide whether to switch over now, after `passes` full passes that did not converge,
    /// `elapsed` pre-copy time, with the current downtime estimate, whether every device's
    /// initial data was read (`drained`) and whether the destination acknowledged it.
    pub fn decide(
        &self,
        passes: u32,
        elapsed: Duration,
        estimated_downtime: Option<Duration>,
        drained: bool,
        acked: bool,
    ) -> Option<SwitchReason> {
        let converged = estimated_downtime.is_some_and(|d| d <= self.downtime_limit) && drained;
        if converged && acked {
            Some(SwitchReason::Converged)
        } else if converged && !self.switchover_ack {
            Some(SwitchReason::ConvergedWithoutAck)
        } else if passes >= self.max_iterations {
            Some(SwitchReason::PassLimit)
        } else if elapsed >= self.max_time {
            Some(SwitchReason::TimeLimit)
        } else {
            None
        }
    }
}

/// One pre-copy phase measured against a [`Convergence`] policy: counts the passes that did
/// not converge and the time, and estimates downtime from the throughput.
#[derive(Clone, Debug)]
pub struct Precopy {
    began: Instant,
    seen: u32,
    counted: u32,
    estimator: DowntimeEstimator,
}

impl Default for Precopy {
    fn default() -> Self {
        Self::new()
    }
}

impl Precopy {
    /// Start measuring now.
    pub fn new() -> Self {
        Self {
            began: Instant::now(),
            seen: 0,
            counted: 0,
            estimator: DowntimeEstimator::default(),
        }
    }

    /// Record that a pre-copy step moved `bytes` in `time`.
    pub fn moved(&mut self, bytes: u64, time: Duration) {
        if bytes > 0 {
            self.estimator.record(bytes, time);
        }
    }

    /// The downtime `pending_stop_copy` bytes would take at the measured throughput.
    pub fn estimate(&self, pending_stop_copy: u64) -> Option<Duration> {
        self.estimator.estimate(pending_stop_copy)
    }

    /// Passes counted against [`Convergence::max_iterations`] so far.
    pub fn counted_passes(&self) -> u32 {
        self.counted
    }

    /// Decide after a step: `passes` is the source's total of full passes
    /// ([`crate::live::Source::passes`]); those completed since the last call count against the
    /// pass bound unless the migration had converged and only waits for the acknowledgement.
    pub fn decide(
        &mut self,
        policy: &Convergence,
        passes: u32,
        estimated_downtime: Option<Duration>,
        drained: bool,
        acked: bool,
    ) -> Option<SwitchReason> {
        let new = passes.saturating_sub(self.seen);
        self.seen = self.seen.max(passes);
        let converged = estimated_downtime.is_some_and(|d| d <= policy.downtime_limit) && drained;
        if !converged {
            self.counted = self.counted.saturating_add(new);
        }
        policy.decide(self.counted, self.began.elapsed(), estimated_downtime, drained, acked)
    }
}

/// Estimates downtime from the throughput measured so far.
#[derive(Clone, Debug, Default)]
pub struct DowntimeEstimator {
    bytes: u64,
    time: Duration,
}

impl DowntimeEstimator {
    /// Record that `bytes` moved in `time`.
    pub fn record(&mut self, bytes: u64, time: Duration) {
        self.bytes = self.bytes.saturating_add(bytes);
        self.time += time;
    }

    /// Measured throughput in bytes per second, once something was measured.
    pub fn throughput(&self) -> Option<f64> {
        (self.bytes > 0 && !self.time.is_zero()).then(|| self.bytes as f64 / self.time.as_secs_f64())
    }

    /// The time `pending` bytes would take at the measured throughput.
    pub fn estimate(&self, pending: u64) -> Option<Duration> {
        if pending == 0 {
            return Some(Duration::ZERO);
        }
        self.throughput()
            .map(|bps| Duration::from_secs_f64((pending as f64 / bps).min(1e9)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_throughput() {
        let mut e = DowntimeEstimator::default();
        assert_eq!(e.estimate(10), None);
        assert_eq!(e.estimate(0), Some(Duration::ZERO));
        e.record(1000, Duration::from_secs(1));
        assert_eq!(e.estimate(500), Some(Duration::from_millis(500)));
        e.record(1000, Duration::from_secs(1));
        assert_eq!(e.throughput(), Some(1000.0));
    }

    #[test]
    fn policy_bounds_and_acks() {
        let c = Convergence {
            downtime_limit: Duration::from_millis(100),
            max_iterations: 5,
            max_time: Duration::from_secs(10),
            ..Convergence::default()
        };
        let short = Some(Duration::from_millis(50));
        let long = Some(Duration::from_millis(500));
        let z = Duration::ZERO;
        assert_eq!(c.decide(1, z, short, true, true), Some(SwitchReason::Converged));
        assert_eq!(c.decide(1, z, short, true, false), None, "waits for the ack");
        assert_eq!(c.decide(1, z, short, false, true), None, "waits for the initial data");
        assert_eq!(c.decide(1, z, long, true, true), None);
        assert_eq!(c.decide(5, z, long, true, true), Some(SwitchReason::PassLimit));
        assert_eq!(
            c.decide(1, Duration::from_secs(11), None, true, false),
            Some(SwitchReason::TimeLimit)
        );
        let forced = Convergence {
            switchover_ack: false,
            ..c.clone()
        };
        assert_eq!(
            forced.decide(1, z, short, true, false),
            Some(SwitchReason::ConvergedWithoutAck)
        );
    }

    #[test]
    fn passes_while_waiting_for_the_ack_do_not_count() {
        let c = Convergence {
            downtime_limit: Duration::from_millis(100),
            max_iterations: 5,
            ..Convergence::default()
        };
        let short = Some(Duration::from_millis(50));
        let long = Some(Duration::from_millis(500));
        let mut p = Precopy::new();
        // Converged, initial data read, no ack yet: thousands of passes do not switch over.
        for passes in 1..=2000 {
            assert_eq!(p.decide(&c, passes, short, true, false), None, "pass {passes}");
        }
        assert_eq!(p.counted_passes(), 0);
        assert_eq!(p.decide(&c, 2001, short, true, true), Some(SwitchReason::Converged));
        // Passes that do not converge count, from where the source's counter stands.
        let mut p = Precopy::new();
        p.decide(&c, 10, short, true, false);
        for passes in 11..15 {
            assert_eq!(p.decide(&c, passes, long, true, false), None);
        }
        assert_eq!(p.decide(&c, 15, long, true, false), Some(SwitchReason::PassLimit));
        assert_eq!(p.counted_passes(), 5);
    }
}
