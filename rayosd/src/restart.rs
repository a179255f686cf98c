//! The restart policy shared by services ([`crate::supervisor`]) and VMs ([`crate::vm`]):
//! exponential backoff between restarts, reset after a healthy run, and a crash loop after
//! too many failures within a window (then no more restarts until someone starts it again).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartLimits {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A run this long counts as healthy: the backoff starts over.
    pub stable_after: Duration,
    /// This many failures within `crash_window` is a crash loop.
    pub crash_count: usize,
    pub crash_window: Duration,
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start again after this wait.
    Restart { after: Duration },
    /// `failures` within the window: stop restarting.
    CrashLoop { failures: usize },
}

/// One service's or VM's failure history.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    limits: RestartLimits,
    failures: VecDeque<Instant>,
    backoff: Duration,
}

impl RestartTracker {
    pub fn new(limits: RestartLimits) -> RestartTracker {
        RestartTracker { limits, failures: VecDeque::new(), backoff: limits.backoff_initial }
    }

    pub fn limits(&self) -> &RestartLimits {
        &self.limits
    }

    /// An explicit start or restart: the history is forgotten.
    pub fn reset(&mut self) {
        self.failures.clear();
        self.backoff = self.limits.backoff_initial;
    }

    /// A run that lasted `ran` ended in a failure at `now`.
    pub fn failed(&mut self, ran: Duration, now: Instant) -> Verdict {
        if ran >= self.limits.stable_after {
            self.reset();
        }
        self.failures.push_back(now);
        while self.failures.front().is_some_and(|t| now.duration_since(*t) > self.limits.crash_window) {
            self.failures.pop_front();
        }
        if self.failures.len() >= self.limits.crash_count {
            return Verdict::CrashLoop { failures: self.failures.len() };
        }
        let after = self.backoff;
        self.backoff = (self.backoff * 2).min(self.limits.backoff_max);
        Verdict::Restart { after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RestartLimits {
        RestartLimits {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
            stable_after: Duration::from_secs(10),
            crash_count: 5,
            crash_window: Duration::from_secs(60),
        }
    }

    fn after(v: Verdict) -> u64 {
        match v {
            Verdict::Restart { after } => after.as_millis() as u64,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut t = RestartTracker::new(RestartLimits { crash_count: 100, ..limits() });
        let t0 = Instant::now();
        let waits: Vec<u64> = (0..5).map(|i| after(t.failed(Duration::ZERO, t0 + Duration::from_millis(i)))).collect();
        assert_eq!(waits, [100, 200, 350, 350, 350]);
    }

    #[test]
    fn a_healthy_run_resets_the_backoff_and_the_failure_count() {
        let mut t = RestartTracker::new(limits());
        let t0 = Instant::now();
        for i in 0..4 {
            t.failed(Duration::from_secs(1), t0 + Duration::from_secs(i));
        }
        // A fifth short run would be a crash loop; a long healthy one starts over.
        assert_eq!(after(t.failed(Duration::from_secs(10), t0 + Duration::from_secs(20))), 100);
        assert_eq!(after(t.failed(Duration::from_secs(1), t0 + Duration::from_secs(21))), 200);
    }

    #[test]
    fn n_failures_within_the_window_are_a_crash_loop_and_older_ones_do_not_count() {
        let mut t = RestartTracker::new(limits());
        let t0 = Instant::now();
        for i in 0..4 {
            assert!(matches!(t.failed(Duration::ZERO, t0 + Duration::from_secs(i * 30)), Verdict::Restart { .. }));
        }
        // Failures at 0, 30, 60, 90 s: at 100 s only 60 and 90 are in the window.
        assert!(matches!(t.failed(Duration::ZERO, t0 + Duration::from_secs(100)), Verdict::Restart { .. }));
        let mut t = RestartTracker::new(limits());
        for i in 0..4 {
            t.failed(Duration::ZERO, t0 + Duration::from_secs(i));
        }
        assert_eq!(t.failed(Duration::ZERO, t0 + Duration::from_secs(4)), Verdict::CrashLoop { failures: 5 });
        t.reset();
        assert_eq!(after(t.failed(Duration::ZERO, t0 + Duration::from_secs(5))), 100, "a start clears the crash loop");
    }
}
