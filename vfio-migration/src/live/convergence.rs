//! When to switch over: downtime estimates and the convergence policy.

use std::time::Duration;

/// The convergence policy of a live migration.
#[derive(Clone, Debug)]
pub struct Convergence {
    /// Switch over once the estimated downtime is at most this (Cloud Hypervisor's default: 300 ms).
    pub downtime_limit: Duration,
    /// Switch over after this many pre-copy iterations even when not converged.
    pub max_iterations: u32,
    /// Switch over after this much pre-copy time even when not converged.
    pub max_time: Duration,
    /// Bytes read per pre-copy iteration, at most.
    pub iteration_budget: u64,
    /// Wait until the destination has loaded every device's initial pre-copy data
    /// (QEMU's switchover-ack) before converging.
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
    /// The estimated downtime fell within the limit (and the initial data was acknowledged).
    Converged,
    /// No device is in pre-copy: nothing to iterate.
    NoPrecopy,
    /// The iteration bound was reached first.
    IterationLimit,
    /// The time bound was reached first.
    TimeLimit,
}

impl SwitchReason {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            SwitchReason::Converged => "converged",
            SwitchReason::NoPrecopy => "no-precopy",
            SwitchReason::IterationLimit => "iteration-limit",
            SwitchReason::TimeLimit => "time-limit",
        }
    }
}

impl Convergence {
    /// Decide whether to switch over now.
    pub fn decide(
        &self,
        iterations: u32,
        elapsed: Duration,
        estimated_downtime: Option<Duration>,
        initial_done: bool,
    ) -> Option<SwitchReason> {
        let converged = estimated_downtime.is_some_and(|d| d <= self.downtime_limit);
        if converged && initial_done {
            Some(SwitchReason::Converged)
        } else if iterations >= self.max_iterations {
            Some(SwitchReason::IterationLimit)
        } else if elapsed >= self.max_time {
            Some(SwitchReason::TimeLimit)
        } else {
            None
        }
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
        assert_eq!(c.decide(1, Duration::ZERO, short, true), Some(SwitchReason::Converged));
        assert_eq!(c.decide(1, Duration::ZERO, short, false), None, "waits for the ack");
        assert_eq!(c.decide(1, Duration::ZERO, long, true), None);
        assert_eq!(
            c.decide(5, Duration::ZERO, long, true),
            Some(SwitchReason::IterationLimit)
        );
        assert_eq!(
            c.decide(1, Duration::from_secs(11), None, true),
            Some(SwitchReason::TimeLimit)
        );
    }
}
