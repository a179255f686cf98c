//! The observer of the flood test (tests/tests/flood_nested.rs), run by
//! `rayos-vmm-testinit` in the outer VM beside `rayos-systemless`:
//!
//! - `rayos-flood-watch mkdisk PATH MIB`: a sparse disk image for the flooding guest;
//! - `rayos-flood-watch watch SECS STATE_DIR RAYOSCTL SOCKET VM`: every 2 s, until the guest
//!   has finished (`agent: done` in the VM's log tail) or for at most SECS seconds, prints one
//!   line
//!   `flood-watch: t_ms=… rss_kb=… serial_files=… serial_bytes=… serial_max_file=… logs_ms=… logs_exit=… logs_bytes=…`:
//!   the supervisor's VmRSS (the `rayos-systemless` process, from /proc), the VM's serial
//!   log files under STATE_DIR (`serial.log` and any rotated `serial.log.*`: how many, their
//!   total and the largest), and one `rayosctl vm logs VM -n 200` call: how long it took,
//!   its exit status and how much it returned; then `flood-watch: guest done at t_ms=…` or
//!   `flood-watch: guest not done after SECS s`.
//!
//! Only the figures are printed (never the guest's garbage), so the outer console stays
//! readable.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn supervisor_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let argv0 = cmdline.split(|b| *b == 0).next()?;
        argv0.ends_with(b"rayos-systemless").then_some(pid)
    })
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

/// (count, total bytes, largest) of the files named `serial.log*` under `dir`.
fn serial_logs(dir: &Path, acc: &mut (u64, u64, u64)) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            serial_logs(&e.path(), acc);
        } else if e.file_name().to_string_lossy().starts_with("serial.log") {
            acc.0 += 1;
            acc.1 += meta.len();
            acc.2 = acc.2.max(meta.len());
        }
    }
}

fn watch(secs: u64, state: &Path, rayosctl: &str, socket: &str, vm: &str) -> Result<(), String> {
    let pid = supervisor_pid().ok_or("no rayos-systemless process in /proc")?;
    println!("flood-watch: supervisor pid {pid}");
    let t0 = Instant::now();
    loop {
        if t0.elapsed() >= Duration::from_secs(secs) {
            println!("flood-watch: guest not done after {secs} s");
            return Ok(());
        }
        let tick = Instant::now();
        let rss = rss_kb(pid).ok_or_else(|| format!("rayos-systemless (pid {pid}) is gone"))?;
        let mut files = (0, 0, 0);
        serial_logs(state, &mut files);
        let t = Instant::now();
        let out = Command::new(rayosctl)
            .args(["--socket", socket, "--timeout", "60", "vm", "logs", vm, "-n", "200"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("{rayosctl}: {e}"))?;
        let logs_ms = t.elapsed().as_millis();
        println!(
            "flood-watch: t_ms={} rss_kb={rss} serial_files={} serial_bytes={} serial_max_file={} logs_ms={logs_ms} logs_exit={} logs_bytes={}",
            t0.elapsed().as_millis(),
            files.0,
            files.1,
            files.2,
            out.status.code().unwrap_or(-1),
            out.stdout.len()
        );
        // The guest agent's last line before it powers off (a guest that rebooted meanwhile
        // floods again from the start, so this waits for the flood that finished).
        if out.stdout.windows(12).any(|w| w == b"agent: done,") {
            println!("flood-watch: guest done at t_ms={}", t0.elapsed().as_millis());
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(2).saturating_sub(tick.elapsed()));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.iter().skip(1).map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["mkdisk", path, mib] => mib
            .parse::<u64>()
            .map_err(|e| format!("size {mib:?}: {e}"))
            .and_then(|m| std::fs::File::create(path).and_then(|f| f.set_len(m << 20)).map_err(|e| format!("{path}: {e}"))),
        ["watch", secs, state, rayosctl, socket, vm] => secs
            .parse()
            .map_err(|e| format!("seconds {secs:?}: {e}"))
            .and_then(|s| watch(s, Path::new(state), rayosctl, socket, vm)),
        _ => Err("usage: rayos-flood-watch mkdisk PATH MIB | watch SECS STATE_DIR RAYOSCTL SOCKET VM".into()),
    };
    if let Err(e) = r {
        eprintln!("rayos-flood-watch: {e}");
        std::process::exit(1);
    }
}
