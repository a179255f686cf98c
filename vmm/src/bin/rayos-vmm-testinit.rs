//! `/init` of the outer QEMU guest used to test rayos-vmm under nested KVM.
//!
//! Mounts the API filesystems, loads the kernel modules listed in `/modules.order` (KVM when
//! the outer kernel has it as modules), then for each name in `rayos.vmmtest=a,b` on the
//! command line runs `/rayos-vmm --spec /specs/<name>.json` and, if `/specs/<name>.ctl`
//! exists, drives its control socket with that script. Prints
//! `testinit: <name> exit=<code> ms=<wall time>` per run, then powers off.
//!
//! If `/specs/<name>.cmd` exists instead, it is the command to run (one argument per line;
//! a `#kill-after-marker` line ends it 2 s after the marker, `#kill-after TEXT` 2 s after TEXT
//! appears on its output), e.g. QEMU for the side-by-side
//! boot benchmark. Either way the child's stdout is echoed
//! and, when `RAYOS-BOOT-TIMER` appears on it (the guest agent prints it at init), the run
//! prints `testinit: <name> marker_ms=<since spawn> rss_kb=… shmem_kb=… overhead_kb=…`,
//! the child's memory at that moment (overhead = RSS minus shared memory, which is where
//! both rayos-vmm and QEMU with a memfd backend keep guest RAM).
//!
//! A spec with `net: [{tap}]` gets the host side of its first tap configured once the VMM has
//! created it (10.0.2.1/24) and a UDP echo on 10.0.2.1:5555 (the guest agent's `net` check);
//! each datagram is printed as `testinit: <name> net echo <payload> from <addr>`.
//!
//! A `.cmd` with a `#background` line is left running while the next runs go on (e.g.
//! rayos-systemless, driven by rayosctl runs); `#wait-for <path>` first waits up to 60 s for
//! that path (its socket) to appear. Background runs get SIGTERM after the last run, and
//! print `testinit: <name> exit=…` when they end.
//!
//! Control script lines: a JSON request (sent, answer printed as `testinit: <name> ctl <json>`),
//! `sleep <ms>`, or `wait <text>` (poll the serial tail until it contains text, up to 60 s).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

fn mount(src: &str, target: &str, fstype: &str) {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (s, t, f) = (c(src), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
}

fn load_modules() {
    let Ok(order) = fs::read_to_string("/modules.order") else { return };
    for m in order.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(f) = fs::File::open(m.trim()) else {
            println!("testinit: module {m} missing");
            continue;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: finit_module reads the open module file; the params string is empty.
        let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
        if r != 0 {
            println!("testinit: loading {m}: {}", std::io::Error::last_os_error());
        }
    }
}

#[path = "common/netcfg.rs"]
mod netcfg;

fn first_tap(spec: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(spec).ok()?).ok()?;
    v.get("net")?.get(0)?.get("tap")?.as_str().map(String::from)
}

/// The host side of `tap`: address, then a UDP echo until the VMM is gone.
fn serve_tap(name: String, tap: String) {
    std::thread::spawn(move || {
        let t0 = Instant::now();
        while !std::path::Path::new(&format!("/sys/class/net/{tap}")).exists() {
            if t0.elapsed() > Duration::from_secs(30) {
                println!("testinit: {name} net: no {tap} after 30 s");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = netcfg::configure(&tap, std::net::Ipv4Addr::new(10, 0, 2, 1), 24) {
            println!("testinit: {name} net: {e}");
            return;
        }
        let sock = match std::net::UdpSocket::bind("10.0.2.1:5555") {
            Ok(s) => s,
            Err(e) => {
                println!("testinit: {name} net: bind 10.0.2.1:5555: {e}");
                return;
            }
        };
        let mut buf = [0u8; 256];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let payload = String::from_utf8_lossy(&buf[..n]).to_string();
            println!("testinit: {name} net echo {payload} from {from}");
            let _ = sock.send_to(format!("echo {payload}").as_bytes(), from);
        }
    });
}

fn ctl_socket(spec: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(spec).ok()?).ok()?;
    v.get("control_socket")?.as_str().map(String::from)
}

/// Creates the spec's disk images that do not exist yet (64 MiB, sparse), so a test can
/// name a fresh disk and a later run in the same boot sees what the first one wrote. A
/// `vm_dir` is created too and, with `run_as`, given to that user as rayosd does (0700).
fn make_disks(spec: &str) {
    let Some(v) = fs::read_to_string(spec).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) else {
        return;
    };
    if let Some(dir) = v.get("vm_dir").and_then(|d| d.as_str()) {
        let owner = v.get("run_as").and_then(|r| Some((r.get("uid")?.as_u64()? as u32, r.get("gid")?.as_u64()? as u32)));
        let r = fs::create_dir_all(dir).and_then(|()| match owner {
            Some((uid, gid)) => {
                use std::os::unix::fs::PermissionsExt;
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            }
            None => Ok(()),
        });
        println!("testinit: vm_dir {dir} owner {owner:?}: {r:?}");
    }
    for d in v.get("disks").and_then(|d| d.as_array()).into_iter().flatten() {
        if let Some(p) = d.get("path").and_then(|p| p.as_str()) {
            if !std::path::Path::new(p).exists() {
                let r = fs::File::create(p).and_then(|f| f.set_len(64 << 20));
                println!("testinit: created disk {p}: {r:?}");
            }
        }
    }
}

fn request(sock: &str, line: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "{line}")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(answer.trim().to_string())
}

fn drive(name: &str, sock: &str, script: &str) {
    let t0 = Instant::now();
    while UnixStream::connect(sock).is_err() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(ms) = line.strip_prefix("sleep ") {
            std::thread::sleep(Duration::from_millis(ms.trim().parse().unwrap_or(0)));
        } else if let Some(text) = line.strip_prefix("wait ") {
            let t0 = Instant::now();
            loop {
                let tail = request(sock, r#"{"cmd":"serial"}"#).unwrap_or_default();
                if tail.contains(text) {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    println!("testinit: {name} ctl wait timed out: {text}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        } else {
            match request(sock, line) {
                Ok(a) => println!("testinit: {name} ctl {a}"),
                Err(e) => println!("testinit: {name} ctl error {e}"),
            }
        }
    }
}

fn status_kb(pid: u32, key: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Echoes the child's stdout and reports time and memory when the boot marker shows up.
/// `kill_on`: end the child 2 s after this text appears (benchmark runs of other VMMs, whose
/// power-off path is not what is measured: the boot marker, or a result line).
fn watch_output(name: &str, pid: u32, t0: Instant, out: std::process::ChildStdout, kill_on: Option<Vec<u8>>) {
    use std::io::Read;
    const MARKER: &[u8] = b"RAYOS-BOOT-TIMER";
    let mut r = BufReader::new(out);
    let mut buf = [0u8; 4096];
    let mut tail: Vec<u8> = Vec::new();
    let mut seen = false;
    let mut killing = false;
    let keep = MARKER.len().max(kill_on.as_ref().map_or(0, |k| k.len()));
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let ms = t0.elapsed().as_millis();
        let _ = std::io::stdout().write_all(&buf[..n]);
        if seen && (killing || kill_on.is_none()) {
            continue;
        }
        tail.extend_from_slice(&buf[..n]);
        if !seen && tail.windows(MARKER.len()).any(|w| w == MARKER) {
            seen = true;
            let rss = status_kb(pid, "VmRSS:");
            let shmem = status_kb(pid, "RssShmem:");
            println!(
                "testinit: {name} marker_ms={ms} rss_kb={rss} shmem_kb={shmem} overhead_kb={}",
                rss.saturating_sub(shmem)
            );
        }
        if let Some(k) = &kill_on {
            if !killing && tail.windows(k.len()).any(|w| w == k.as_slice()) {
                killing = true;
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(2));
                    // SAFETY: signalling our own child, which we have not reaped yet.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                });
            }
        }
        if tail.len() > 4 * keep {
            tail.drain(..tail.len() - keep);
        }
    }
}

fn main() {
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("tmpfs", "/tmp", "tmpfs");
    mount("tmpfs", "/run", "tmpfs");
    load_modules();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let tests = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rayos.vmmtest="))
        .unwrap_or("")
        .to_string();
    // The host's shmem THP policy (rayosd sets `advise`, see vmm::memory): `rayos.shmem_thp=`.
    if let Some(v) = cmdline.split_whitespace().find_map(|w| w.strip_prefix("rayos.shmem_thp=")) {
        let r = fs::write("/sys/kernel/mm/transparent_hugepage/shmem_enabled", v);
        println!("testinit: shmem_enabled={v}: {r:?}");
    }
    // Memory compaction in a loop (`rayos.compact_ms=N`): page migration under running guests,
    // the load under which the intermittent nested triple faults were seen.
    if let Some(ms) = cmdline.split_whitespace().find_map(|w| w.strip_prefix("rayos.compact_ms=")).and_then(|v| v.parse::<u64>().ok()) {
        std::thread::spawn(move || loop {
            let _ = fs::write("/proc/sys/vm/compact_memory", "1");
            std::thread::sleep(Duration::from_millis(ms));
        });
        println!("testinit: compacting memory every {ms} ms");
    }
    // `rayos.wait_tsc_refined`: the runs start after the kernel's second TSC calibration (its
    // clocksource moves off tsc-early then), so that a vCPU sees the refined rate.
    if cmdline.split_whitespace().any(|w| w == "rayos.wait_tsc_refined") {
        let t0 = Instant::now();
        let current = || fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource").unwrap_or_default();
        while current().trim() == "tsc-early" && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("testinit: clocksource {} after {} ms", current().trim(), t0.elapsed().as_millis());
    }
    println!("testinit: kvm={} tests={tests}", std::path::Path::new("/dev/kvm").exists());
    let mut background: Vec<(String, std::process::Child, Instant, std::thread::JoinHandle<()>)> = Vec::new();
    for name in tests.split(',').filter(|t| !t.is_empty()) {
        let spec = format!("/specs/{name}.json");
        make_disks(&spec);
        let t0 = Instant::now();
        let cmd_file = format!("/specs/{name}.cmd");
        let mut command = match fs::read_to_string(&cmd_file) {
            Ok(text) => {
                let args: Vec<&str> =
                    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
                let mut c = Command::new(args[0]);
                c.args(&args[1..]);
                c
            }
            Err(_) => {
                let mut c = Command::new("/rayos-vmm");
                c.arg("--spec").arg(&spec);
                c
            }
        };
        let child = command.stdout(std::process::Stdio::piped()).spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                println!("testinit: {name} spawn error {e}");
                continue;
            }
        };
        if let Some(tap) = first_tap(&spec) {
            serve_tap(name.to_string(), tap);
        }
        let script = fs::read_to_string(format!("/specs/{name}.ctl")).ok();
        let driver = match (script, ctl_socket(&spec)) {
            (Some(script), Some(sock)) => {
                let name = name.to_string();
                Some(std::thread::spawn(move || drive(&name, &sock, &script)))
            }
            _ => None,
        };
        let out = child.stdout.take().expect("piped stdout");
        let pid = child.id();
        let echo_name = name.to_string();
        let kill_on = fs::read_to_string(&cmd_file).ok().and_then(|t| {
            t.lines().map(str::trim).find_map(|l| match l {
                "#kill-after-marker" => Some(b"RAYOS-BOOT-TIMER".to_vec()),
                _ => l.strip_prefix("#kill-after ").map(|text| text.as_bytes().to_vec()),
            })
        });
        let echo = std::thread::spawn(move || watch_output(&echo_name, pid, t0, out, kill_on));
        let cmd_text = fs::read_to_string(&cmd_file).unwrap_or_default();
        if cmd_text.lines().any(|l| l.trim() == "#background") {
            if let Some(path) = cmd_text.lines().find_map(|l| l.trim().strip_prefix("#wait-for ")) {
                while !std::path::Path::new(path.trim()).exists() && t0.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                println!("testinit: {name} {path} exists={}", std::path::Path::new(path.trim()).exists());
            }
            println!("testinit: {name} started pid={pid}");
            background.push((name.to_string(), child, t0, echo));
            continue;
        }
        let status = child.wait();
        let _ = echo.join();
        if let Some(d) = driver {
            let _ = d.join();
        }
        let code = status.ok().and_then(|s| s.code()).unwrap_or(-1);
        println!("testinit: {name} exit={code} ms={}", t0.elapsed().as_millis());
    }
    for (name, mut child, t0, echo) in background {
        // SAFETY: signalling our own child, which we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(-1);
        let _ = echo.join();
        println!("testinit: {name} exit={code} ms={}", t0.elapsed().as_millis());
    }
    println!("testinit: all done");
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
    // SAFETY: PID 1 of a throwaway test VM.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
}
