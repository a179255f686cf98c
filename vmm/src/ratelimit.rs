//! Warnings a guest can cause (bad descriptors, garbage on a queue, a broken driver) are
//! rate-limited: the VMM's stderr goes into rayosd's log, and a hostile guest must not be
//! able to flood it. Each call site of [`guest_warn!`] is one kind: at most [`PER_SECOND`]
//! lines of it per second, then silence, and with the next line that gets through, one line
//! saying how many were suppressed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per second per kind.
pub const PER_SECOND: u32 = 5;
const WINDOW: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Window {
    start: Option<Instant>,
    count: u32,
    suppressed: u64,
}

/// One kind's budget.
pub struct RateLimit(Mutex<Window>);

impl RateLimit {
    pub const fn new() -> Self {
        RateLimit(Mutex::new(Window { start: None, count: 0, suppressed: 0 }))
    }

    /// `Some(k)` if a line may go out at `now`, `k` being how many were suppressed since the
    /// last one that did; `None` if this one is suppressed.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if w.start.is_none_or(|s| now.saturating_duration_since(s) >= WINDOW) {
            w.start = Some(now);
            w.count = 1;
            return Some(std::mem::take(&mut w.suppressed));
        }
        if w.count < PER_SECOND {
            w.count += 1;
            return Some(0);
        }
        w.suppressed += 1;
        None
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` for what a guest causes, limited per call site (see the module).
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.allow(std::time::Instant::now()) {
            if suppressed > 0 {
                tracing::warn!(suppressed, "{} more warnings like the next were suppressed (guest misbehaving)", suppressed);
            }
            tracing::warn!($($arg)+);
        }
    }};
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gives_a_few_lines_a_second_and_the_count_of_the_rest() {
        let l = RateLimit::new();
        let t0 = Instant::now();
        // A million tries within the first second: PER_SECOND pass.
        let passed = (0..1_000_000).filter(|i| l.allow(t0 + Duration::from_nanos(*i)).is_some()).count();
        assert_eq!(passed, PER_SECOND as usize);
        // The next second: the first line carries the count of the suppressed ones.
        assert_eq!(l.allow(t0 + Duration::from_millis(1500)), Some(1_000_000 - u64::from(PER_SECOND)));
        assert_eq!(l.allow(t0 + Duration::from_millis(1501)), Some(0));
        // A quiet guest's occasional warning always gets through.
        assert_eq!(l.allow(t0 + Duration::from_secs(10)), Some(0));
    }
}
