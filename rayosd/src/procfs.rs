//! Small /proc readers for the status the API reports.

/// Resident memory of this process, from /proc/self/status (VmRSS).
pub fn self_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The state letter of process `pid` (R, S, Z, …).
fn state(pid: &str) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Zombie processes among our children (orphans re-parented to us included).
pub fn zombies() -> u32 {
    let is_zombie = |pid: &str| state(pid) == Some('Z');
    // /proc/self/task/*/children lists exactly our children (CONFIG_PROC_CHILDREN); scanning
    // all of /proc costs milliseconds on a busy host.
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        let mut found = false;
        let mut n = 0;
        for t in tasks.filter_map(|e| e.ok()) {
            if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
                found = true;
                n += list.split_whitespace().filter(|p| is_zombie(p)).count() as u32;
            }
        }
        if found {
            return n;
        }
    }
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            is_zombie(pid)
                && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.split(' ').nth(1).map(|p| p == me)))
                    .unwrap_or(false)
        })
        .count() as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn rss_is_read() {
        assert!(super::self_rss_kib() > 100);
    }
}
