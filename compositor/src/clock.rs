//! The home screen's clock, in UTC (RayOS keeps the hardware clock in UTC and has no time zone
//! database in its initramfs; the screen says "UTC" so nobody is misled).

use std::time::{SystemTime, UNIX_EPOCH};

/// "2026-12-07 14:05 UTC" for `secs` since the epoch.
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let (h, m) = ((secs / 3600) % 24, (secs / 60) % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How long until the minute changes.
pub fn until_next_minute(secs_now: u64) -> std::time::Duration {
    std::time::Duration::from_secs(60 - secs_now % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_and_times() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(951_782_400 + 3600 * 23 + 59 * 60), "2000-02-29 23:59 UTC");
        assert_eq!(format_utc(1_796_601_600), "2026-12-07 00:00 UTC");
        assert_eq!(until_next_minute(120).as_secs(), 60);
        assert_eq!(until_next_minute(179).as_secs(), 1);
    }
}
