//! When a guest counts as hung: it did not reach init (the VMM's boot-timer event) within a
//! bound made from its usual boot, or its guest agent, once ready, went silent. The VM's
//! task ([`super::task`]) asks [`HangWatch`] for the next deadline and, when one passes,
//! ends the VMM and hands the VM to the restart policy as `hung`.
//!
//! Time counts on the monotonic clock, which stands still while the host is suspended, and
//! not while the VM is paused: neither is the guest's fault.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The system's hang rules (rayosd's [`super::manager::Settings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HangLimits {
    /// A guest must reach init within this many times its usual boot…
    pub init_factor: u32,
    /// …and is never hung sooner than this, which is also the bound while its usual boot is
    /// not known yet. Large enough for a healthy Debian boot under nested TCG on a busy
    /// 2-core machine (25-60 s measured, 62 s after a restart).
    pub init_floor: Duration,
    /// Once its agent said `ready`: no agent line for this long (it sends a heartbeat every
    /// 200 ms) is a hang.
    pub heartbeat_timeout: Duration,
}

impl Default for HangLimits {
    fn default() -> Self {
        HangLimits { init_factor: 10, init_floor: Duration::from_secs(180), heartbeat_timeout: Duration::from_secs(60) }
    }
}

/// How long a VM's guest took to reach init in its last few boots (this rayosd's lifetime).
#[derive(Debug, Clone, Default)]
pub struct BootHistory {
    recent: VecDeque<Duration>,
}

impl BootHistory {
    const KEEP: usize = 5;

    pub fn record(&mut self, to_init: Duration) {
        if self.recent.len() == Self::KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(to_init);
    }

    /// The median of the recent boots: one slow boot (a restart on a busy host) does not
    /// move it much, nor does one fast one.
    pub fn usual(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self.recent.iter().copied().collect();
        v.sort();
        v.get(v.len() / 2).copied()
    }

    /// The bound on VMM start to guest init for the next boot.
    pub fn init_bound(&self, limits: &HangLimits) -> Duration {
        match self.usual() {
            Some(u) => (u * limits.init_factor).max(limits.init_floor),
            None => limits.init_floor,
        }
    }
}

/// One run's hang deadlines.
#[derive(Debug, Clone)]
pub struct HangWatch {
    init_bound: Duration,
    init_factor: u32,
    usual: Option<Duration>,
    heartbeat_timeout: Duration,
    /// Running (not paused) time the guest has had to reach init, before `running_since`.
    spent: Duration,
    /// Counting since then; `None` while paused (or once nothing is watched).
    running_since: Option<Instant>,
    init_reached: bool,
    /// The last sign of life from a ready agent; `None` before it is ready.
    agent_seen: Option<Instant>,
}

impl HangWatch {
    /// A VMM started at `started` for a guest with `history`.
    pub fn new(limits: &HangLimits, history: &BootHistory, started: Instant) -> HangWatch {
        HangWatch {
            init_bound: history.init_bound(limits),
            init_factor: limits.init_factor,
            usual: history.usual(),
            heartbeat_timeout: limits.heartbeat_timeout,
            spent: Duration::ZERO,
            running_since: Some(started),
            init_reached: false,
            agent_seen: None,
        }
    }

    pub fn init_bound(&self) -> Duration {
        self.init_bound
    }

    pub fn paused(&mut self, now: Instant) {
        if let Some(since) = self.running_since.take() {
            self.spent += now.saturating_duration_since(since);
        }
    }

    pub fn resumed(&mut self, now: Instant) {
        if self.running_since.is_none() {
            self.running_since = Some(now);
            // The agent could not speak while paused: its silence counts from now.
            if self.agent_seen.is_some() {
                self.agent_seen = Some(now);
            }
        }
    }

    pub fn init_reached(&self) -> bool {
        self.init_reached
    }

    pub fn init(&mut self) {
        self.init_reached = true;
    }

    /// An agent line (`ready`, a heartbeat, an answer) from an agent that is ready.
    pub fn agent_alive(&mut self, now: Instant) {
        self.agent_seen = Some(now);
    }

    /// How long the run that began at `started` was healthy: nothing before init, else until
    /// the agent's last sign of life (or now, for a guest without an agent).
    pub fn healthy_for(&self, started: Instant) -> Duration {
        if !self.init_reached {
            return Duration::ZERO;
        }
        self.agent_seen.unwrap_or_else(Instant::now).saturating_duration_since(started)
    }

    /// When the next rule fires unless something happens first; `None` while paused.
    pub fn deadline(&self) -> Option<Instant> {
        let since = self.running_since?;
        let init = (!self.init_reached).then(|| since + self.init_bound.saturating_sub(self.spent));
        let agent = self.agent_seen.map(|t| t + self.heartbeat_timeout);
        init.into_iter().chain(agent).min()
    }

    /// Why the guest is hung at `now`, if it is.
    pub fn check(&self, now: Instant) -> Option<String> {
        let since = self.running_since?;
        if !self.init_reached && self.spent + now.saturating_duration_since(since) >= self.init_bound {
            let basis = match self.usual {
                Some(u) if self.init_bound == u * self.init_factor => format!("{}x its usual boot of {} ms", self.init_factor, u.as_millis()),
                Some(u) => format!("the floor; its usual boot is {} ms", u.as_millis()),
                None => "the floor; its usual boot is not known yet".to_string(),
            };
            return Some(format!("the guest did not reach init within {} s of running ({basis})", self.init_bound.as_secs()));
        }
        if let Some(seen) = self.agent_seen {
            if now.saturating_duration_since(seen) >= self.heartbeat_timeout {
                return Some(format!(
                    "the guest agent was ready but has sent nothing for {} s (no heartbeat)",
                    self.heartbeat_timeout.as_secs()
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HangLimits {
        HangLimits { init_factor: 10, init_floor: Duration::from_secs(180), heartbeat_timeout: Duration::from_secs(60) }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_init_bound_is_ten_usual_boots_never_below_the_floor() {
        let mut h = BootHistory::default();
        assert_eq!(h.init_bound(&limits()), s(180), "unknown: the floor");
        h.record(s(2));
        assert_eq!(h.init_bound(&limits()), s(180), "a fast guest still gets the floor");
        for b in [30, 31, 29, 62] {
            h.record(s(b));
        }
        // Median of 2, 30, 31, 29, 62 is 30: one slow restart does not move it.
        assert_eq!(h.usual(), Some(s(30)));
        assert_eq!(h.init_bound(&limits()), s(300));
        for _ in 0..5 {
            h.record(s(40));
        }
        assert_eq!(h.usual(), Some(s(40)), "only the last five count");
    }

    #[test]
    fn no_init_within_the_bound_is_a_hang_and_paused_time_does_not_count() {
        let t0 = Instant::now();
        let w = HangWatch::new(&limits(), &BootHistory::default(), t0);
        assert_eq!(w.deadline(), Some(t0 + s(180)));
        assert_eq!(w.check(t0 + s(179)), None);
        let why = w.check(t0 + s(180)).expect("hung at the bound");
        assert_eq!(w.healthy_for(t0), Duration::ZERO, "a run that never reached init was never healthy");
        assert!(why.contains("did not reach init within 180 s") && why.contains("floor"), "{why}");

        // Paused from 100 s to 1000 s: 80 s of running are left after the resume.
        let mut w = HangWatch::new(&limits(), &BootHistory::default(), t0);
        w.paused(t0 + s(100));
        assert_eq!(w.deadline(), None, "a paused VM is never hung");
        assert_eq!(w.check(t0 + s(900)), None);
        w.resumed(t0 + s(1000));
        assert_eq!(w.deadline(), Some(t0 + s(1080)));
        assert_eq!(w.check(t0 + s(1079)), None);
        assert!(w.check(t0 + s(1080)).is_some());

        let mut w = HangWatch::new(&limits(), &BootHistory::default(), t0);
        w.init();
        assert_eq!(w.deadline(), None);
        assert_eq!(w.check(t0 + s(10_000)), None, "init reached: no bound");
    }

    #[test]
    fn a_ready_agent_that_goes_silent_is_a_hang_but_not_while_paused() {
        let t0 = Instant::now();
        let mut w = HangWatch::new(&limits(), &BootHistory::default(), t0);
        w.init();
        assert_eq!(w.check(t0 + s(1000)), None, "no agent yet: nothing to miss");
        w.agent_alive(t0 + s(30));
        w.agent_alive(t0 + s(40));
        assert_eq!(w.deadline(), Some(t0 + s(100)));
        assert_eq!(w.check(t0 + s(99)), None);
        let why = w.check(t0 + s(100)).expect("silent for 60 s");
        assert!(why.contains("sent nothing for 60 s"), "{why}");

        assert_eq!(w.healthy_for(t0), s(40), "healthy until its last heartbeat");
        w.paused(t0 + s(50));
        assert_eq!(w.check(t0 + s(500)), None);
        w.resumed(t0 + s(500));
        assert_eq!(w.deadline(), Some(t0 + s(560)), "the silence counts from the resume");
    }

    #[test]
    fn the_reason_names_the_usual_boot() {
        let t0 = Instant::now();
        let mut h = BootHistory::default();
        h.record(s(25));
        let w = HangWatch::new(&limits(), &h, t0);
        let why = w.check(t0 + s(250)).unwrap();
        assert!(why.contains("within 250 s") && why.contains("10x its usual boot of 25000 ms"), "{why}");
        let mut h = BootHistory::default();
        h.record(s(3));
        let why = HangWatch::new(&limits(), &h, t0).check(t0 + s(180)).unwrap();
        assert!(why.contains("within 180 s of running (the floor; its usual boot is 3000 ms)"), "{why}");
    }
}
