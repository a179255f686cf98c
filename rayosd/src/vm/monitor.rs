//! The primary monitor's mode as the compositor reports it (`org.rayos.Display1`
//! `ReportPrimaryMode` / `ReportNoMonitor`), and the display size each VMM start gets from it:
//! a VM whose display follows the monitor runs at the monitor's mode, so the presented guest
//! is shown 1:1, never scaled.
//!
//! The rule ([`choose`]): a resume keeps the size its state was saved with (the framebuffer is
//! in the state and the VMM restores the display from it); a fixed size is that size; a cold
//! start that follows the monitor gets the last reported mode, shrunk to what the display
//! device can announce, or [`DEFAULT_SIZE`] when nothing was reported (no compositor, rescue
//! mode, a machine with no monitor).

use std::time::Duration;

use rayos_proto::spec::MAX_DISPLAY_SIDE;
use tokio::sync::watch;

use super::registry::{DisplayConfig, DisplaySize};

/// A follow-monitor VM's size when no monitor mode was ever reported.
pub const DEFAULT_SIZE: DisplaySize = DisplaySize::new(1280, 800);

/// What the compositor said about the primary monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Nothing yet (the compositor has not started, or is not there at all).
    Unknown,
    /// It found no connected monitor.
    NoMonitor,
    /// The primary output's mode, the last one reported (an unplug keeps it).
    Mode(DisplaySize),
}

/// The last report, shared by the API (which writes it) and the VM tasks (which read it).
#[derive(Debug)]
pub struct PrimaryMonitor {
    tx: watch::Sender<Report>,
}

impl Default for PrimaryMonitor {
    fn default() -> Self {
        PrimaryMonitor { tx: watch::channel(Report::Unknown).0 }
    }
}

impl PrimaryMonitor {
    pub fn report(&self) -> Report {
        *self.tx.borrow()
    }

    /// The last reported mode.
    pub fn mode(&self) -> Option<DisplaySize> {
        match self.report() {
            Report::Mode(m) => Some(m),
            Report::Unknown | Report::NoMonitor => None,
        }
    }

    /// Records the primary output's mode; returns whether it changed.
    pub fn set_mode(&self, mode: DisplaySize) -> bool {
        self.tx.send_if_modified(|r| std::mem::replace(r, Report::Mode(mode)) != Report::Mode(mode))
    }

    /// Records that no monitor is connected. A mode reported before is kept: a monitor
    /// unplugged for a moment comes back with it, and it is still the best size to boot at.
    pub fn set_no_monitor(&self) -> bool {
        self.tx.send_if_modified(|r| match r {
            Report::Unknown => {
                *r = Report::NoMonitor;
                true
            }
            Report::NoMonitor | Report::Mode(_) => false,
        })
    }

    /// The mode, waiting up to `limit` for the compositor's first report (PID 1 starts it
    /// just after the autostart VMs, which would otherwise always boot at the default size).
    pub async fn mode_when_known(&self, limit: Duration) -> Option<DisplaySize> {
        let mut rx = self.tx.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|r| *r != Report::Unknown)).await;
        self.mode()
    }
}

/// The display size one VMM start gets, and why (for the log and `vm show`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub size: DisplaySize,
    pub why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The VM's config fixes it.
    Fixed,
    /// A resume: the size the state was saved with.
    Saved,
    /// The primary monitor's mode.
    Monitor,
    /// The monitor's mode is more than the display can announce: this is the largest size
    /// with its shape that it can.
    MonitorShrunk { monitor: DisplaySize },
    /// No monitor mode was reported: [`DEFAULT_SIZE`].
    NoReport,
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = self.size;
        match self.why {
            Why::Fixed => write!(f, "{size} (fixed)"),
            Why::Saved => write!(f, "{size} (as it was saved)"),
            Why::Monitor => write!(f, "{size} (the primary monitor's mode)"),
            Why::MonitorShrunk { monitor } => write!(
                f,
                "{size} (the primary monitor's {monitor} is more than the display can announce, {MAX_DISPLAY_SIDE}x{MAX_DISPLAY_SIDE} at most)"
            ),
            Why::NoReport => write!(f, "{size} (no monitor mode reported yet)"),
        }
    }
}

/// The size a start of a VM with display `config` gets: `saved` is the size of the state it
/// resumes (None for a cold boot, or a state saved before sizes were recorded), `monitor` the
/// last reported mode.
pub fn choose(config: DisplayConfig, saved: Option<DisplaySize>, monitor: Option<DisplaySize>) -> Choice {
    if let Some(size) = saved {
        return Choice { size, why: Why::Saved };
    }
    match (config, monitor) {
        (DisplayConfig::Fixed(size), _) => Choice { size, why: Why::Fixed },
        (DisplayConfig::FollowMonitor, None) => Choice { size: DEFAULT_SIZE, why: Why::NoReport },
        (DisplayConfig::FollowMonitor, Some(m)) => match fit(m) {
            size if size == m => Choice { size, why: Why::Monitor },
            size => Choice { size, why: Why::MonitorShrunk { monitor: m } },
        },
    }
}

/// `m` shrunk, keeping its shape, until both sides are within what EDID announces; the
/// compositor letterboxes what is left.
fn fit(m: DisplaySize) -> DisplaySize {
    let (w, h) = (u64::from(m.width.max(1)), u64::from(m.height.max(1)));
    let max = u64::from(MAX_DISPLAY_SIDE);
    if w <= max && h <= max {
        return DisplaySize::new(w as u32, h as u32);
    }
    let (w, h) = if w >= h { (max, (h * max / w).max(1)) } else { ((w * max / h).max(1), max) };
    DisplaySize::new(w as u32, h as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HD: DisplaySize = DisplaySize::new(1920, 1080);

    #[test]
    fn a_cold_start_that_follows_the_monitor_takes_the_reported_mode() {
        let c = choose(DisplayConfig::FollowMonitor, None, Some(HD));
        assert_eq!(c, Choice { size: HD, why: Why::Monitor });
        assert_eq!(c.to_string(), "1920x1080 (the primary monitor's mode)");
        let uhd = DisplaySize::new(3840, 2160);
        assert_eq!(choose(DisplayConfig::FollowMonitor, None, Some(uhd)).size, uhd);
    }

    #[test]
    fn without_a_report_it_is_1280x800() {
        let c = choose(DisplayConfig::FollowMonitor, None, None);
        assert_eq!(c, Choice { size: DisplaySize::new(1280, 800), why: Why::NoReport });
        assert!(c.to_string().contains("no monitor mode reported"), "{c}");
    }

    #[test]
    fn a_mode_the_display_cannot_announce_is_shrunk_to_the_largest_it_can() {
        let wide = DisplaySize::new(5120, 1440);
        let c = choose(DisplayConfig::FollowMonitor, None, Some(wide));
        assert_eq!(c, Choice { size: DisplaySize::new(4095, 1151), why: Why::MonitorShrunk { monitor: wide } });
        assert!(c.to_string().contains("5120x1440 is more than the display can announce"), "{c}");
        let tall = DisplaySize::new(2160, 7680);
        assert_eq!(choose(DisplayConfig::FollowMonitor, None, Some(tall)).size, DisplaySize::new(1151, 4095));
        let square = DisplaySize::new(8192, 8192);
        assert_eq!(choose(DisplayConfig::FollowMonitor, None, Some(square)).size, DisplaySize::new(4095, 4095));
        // The edge itself is fine, and whatever comes out is a size the VMM takes.
        let edge = DisplaySize::new(4095, 4095);
        assert_eq!(choose(DisplayConfig::FollowMonitor, None, Some(edge)).why, Why::Monitor);
        let mut spec = rayos_proto::spec::VmSpec::new("v", 1, 64, std::env::current_exe().unwrap());
        for m in [wide, tall, square, edge, DisplaySize::new(65535, 1)] {
            let s = choose(DisplayConfig::FollowMonitor, None, Some(m)).size;
            spec.display = Some(rayos_proto::spec::DisplaySpec { width: s.width, height: s.height });
            spec.validate().unwrap_or_else(|e| panic!("{m} became {s}: {e}"));
        }
    }

    #[test]
    fn a_resume_keeps_the_size_it_was_saved_with() {
        let saved = DisplaySize::new(1280, 800);
        let c = choose(DisplayConfig::FollowMonitor, Some(saved), Some(HD));
        assert_eq!(c, Choice { size: saved, why: Why::Saved });
        assert_eq!(choose(DisplayConfig::FollowMonitor, Some(saved), None).size, saved);
        // A fixed size never changes either way.
        let fixed = DisplayConfig::Fixed(DisplaySize::new(1024, 768));
        assert_eq!(choose(fixed, None, Some(HD)), Choice { size: DisplaySize::new(1024, 768), why: Why::Fixed });
    }

    #[tokio::test]
    async fn the_last_report_is_kept_and_ends_a_wait() {
        let m = PrimaryMonitor::default();
        assert_eq!(m.report(), Report::Unknown);
        let t = std::time::Instant::now();
        assert_eq!(m.mode_when_known(Duration::from_millis(50)).await, None);
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(m.set_no_monitor());
        // Known now (no monitor): no wait.
        let t = std::time::Instant::now();
        assert_eq!(m.mode_when_known(Duration::from_secs(30)).await, None);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(m.set_mode(HD));
        assert!(!m.set_mode(HD), "the same mode again is no change");
        assert!(!m.set_no_monitor(), "an unplug keeps the last mode");
        assert_eq!(m.mode(), Some(HD));

        // A report that comes during the wait ends it.
        let m = std::sync::Arc::new(PrimaryMonitor::default());
        let m2 = m.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            m2.set_mode(HD);
        });
        let t = std::time::Instant::now();
        assert_eq!(m.mode_when_known(Duration::from_secs(30)).await, Some(HD));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
