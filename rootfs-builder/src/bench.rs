//! `cargo rayos bench …`: figures, side by side with a baseline from the same run.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use rootfs_builder::initramfs::Initramfs;
use rootfs_builder::qemu::{Boot, QemuConfig, Serial};
use rootfs_builder::{accel, build, cargo_build, paths, progress};

mod nat;
mod net;
mod soak;
use soak::SoakBus;

#[derive(Subcommand)]
pub enum What {
    /// Kernel start to rayosd ready, beside the floor (a trivial init that powers off at
    /// once) booted by the same kernel in the same QEMU; and the sizes of what we ship.
    Boot {
        /// Boots of each kind (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// rayos-vmm beside QEMU -M pc and -M microvm, each booting the vmlinux (QEMU through
    /// PVH) and the bzImage, in the same nested-KVM machine: VMM start to guest init (ratios),
    /// VMM memory overhead, virtio-blk sequential throughput. Fails unless rayos-vmm/vmlinux
    /// is within 0.40x of QEMU -M pc/vmlinux.
    Vmm {
        #[arg(long, default_value_t = 2)]
        rounds: u32,
    },
    /// An unattended install from the USB image onto a blank NVMe disk in QEMU (UEFI), the
    /// default Linux VM included: the installer's own duration and bytes written, beside the
    /// wall time from power-on (firmware and boot included) of the same run.
    Install {
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// The VM supervisor on an installed RayOS (installed as `bench install` does): rayosd ready
    /// to the default Linux VM's guest init at boot, and `rayosctl vm start` to guest init,
    /// each beside the VMM's own start-to-init of the same run.
    Vms {
        #[arg(long, default_value_t = 2)]
        starts: usize,
    },
    /// Save and resume on an installed RayOS (installed as `bench install` does), the default
    /// Linux VM (Debian, 2 GiB): the save's time, state size and write rate beside the guest's
    /// RAM; start request → resumed (VMM up) and → guest agent answering, beside a cold start →
    /// agent ready of the same guest in the same run; and the time saving adds to a power-off.
    /// Fails unless the resume reaches the agent within 0.1x of the cold start.
    Resume,
    /// The compositor's compose cost per frame (a guest frame onto 1080p and 2160p outputs,
    /// 1:1 and scaled) beside copying the same frame once, in the same run. Fails unless
    /// compose at 1080p takes at most 2 ms.
    Display,
    /// Issue #12's soak: installs RayOS once (as `bench install` does), then boots a
    /// copy-on-write view of the installed disk again and again, each boot watched until the
    /// default Linux VM's guest agent answers and for `--watch` seconds more. Reports each boot
    /// and, per disk bus, how many went wrong (a host oops or panic, a guest triple fault, a VM
    /// marked hung, a machine that reset, no agent within 300 s) side by side. Fails on any.
    Soak {
        /// Boots in all (the buses take turns).
        #[arg(long, default_value_t = 10)]
        boots: usize,
        /// The bus the installed disk is attached to, boot by boot in turn
        /// (comma-separated: nvme, virtio, ahci).
        #[arg(long, value_delimiter = ',', default_value = "nvme,virtio")]
        disk: Vec<SoakBus>,
        /// Seconds each boot is watched after its guest agent answered (the first-boot
        /// setup runs then; the end-to-end test's triple faults came about 2 min after it).
        #[arg(long, default_value_t = 120)]
        watch: u64,
    },
    /// rayos-netd's time from a cable coming in to a DHCP lease on the interface, beside the
    /// kernel's own boot-time DHCP client (`ip=dhcp`) on the same card, machine and run.
    /// Fails unless netd has its lease within 100 ms of the kernel's client.
    Net {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Issue #16's NAT figures, in a guest of rayos-vmm under nested KVM: the time from the
    /// guest setting its card up to its lease from RayOS's DHCP server, and TCP throughput to a
    /// machine beyond the NAT beside the same guest's plain tap, in the same boot. Fails unless
    /// the lease comes within 1 s and the NAT costs at most 10 % of the plain tap's throughput.
    Nat {
        /// Guest boots (one lease each).
        #[arg(long, default_value_t = 3)]
        boots: u32,
        /// Transfers per path per boot, alternating.
        #[arg(long, default_value_t = 20)]
        pairs: u32,
        /// MiB per transfer.
        #[arg(long, default_value_t = 128)]
        mib: u32,
    },
    /// Run the VMM's cargo-fuzz targets (virtio queue/chain and virtio-blk request parsing)
    /// for a bounded time each; installs cargo-fuzz if missing. Fails on a crash.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

pub fn run(what: What) -> Result<()> {
    match what {
        What::Boot { runs } => boot(runs.max(1)),
        What::Fuzz { seconds } => fuzz(seconds.max(1)),
        What::Vmm { rounds } => vmm(rounds.max(1)),
        What::Install { runs } => install(runs.max(1)),
        What::Vms { starts } => vms(starts.max(1)),
        What::Resume => resume(),
        What::Display => display(),
        What::Net { runs } => net::net(runs.max(1)),
        What::Nat { boots, pairs, mib } => nat::nat(boots.max(1), pairs.max(1), mib.max(1)),
        What::Soak { boots, disk, watch } => soak::soak(boots.max(1), &disk, Duration::from_secs(watch)),
    }
}

/// `cargo bench -p compositor --bench compose` (compositor/benches/compose.rs prints the
/// table and exits non-zero when a target is not met).
fn display() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(&cargo)
        .args(["bench", "-p", "compositor", "--bench", "compose"])
        .current_dir(crate::paths::workspace())
        .status()
        .with_context(|| format!("running {cargo} bench -p compositor --bench compose"))?;
    if !status.success() {
        bail!("display: the compose bench failed ({status}); its table above names the unmet target");
    }
    Ok(())
}

/// Wait until a line containing `needle` appears in the serial log; return it.
fn wait_line(log: &Path, needle: &str, child: &mut std::process::Child, timeout: Duration) -> Result<String> {
    wait_line_after(log, 0, needle, child, timeout)
}

/// The serial log's length now: lines after it are new.
fn log_len(log: &Path) -> usize {
    std::fs::metadata(log).map(|m| m.len() as usize).unwrap_or(0)
}

/// [`wait_line`] among the bytes after `offset`.
fn wait_line_after(log: &Path, offset: usize, needle: &str, child: &mut std::process::Child, timeout: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        // Lossy: firmware and guests write bytes that are not UTF-8 to the serial port.
        let bytes = std::fs::read(log).unwrap_or_default();
        let text = String::from_utf8_lossy(bytes.get(offset..).unwrap_or_default()).into_owned();
        if let Some(l) = text.lines().find(|l| l.contains(needle)) {
            return Ok(l.to_string());
        }
        if let Some(s) = child.try_wait()? {
            bail!("QEMU exited ({s}) before `{needle}`; serial log {}:\n{}", log.display(), tail(&text));
        }
        if start.elapsed() > timeout {
            bail!("no `{needle}` within {timeout:?}; serial log {}:\n{}", log.display(), tail(&text));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn field(line: &str, key: &str) -> Result<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .with_context(|| format!("no {key}= in `{line}`"))?
        .parse()
        .with_context(|| format!("{key} in `{line}`"))
}

/// The targets a bench checks: each is printed beside its figure, and the bench fails (exit
/// status non-zero, the unmet ones named on the last line) when any is not met, so a script
/// or CI job running it learns the verdict from the status, not by reading the text.
#[derive(Default)]
struct Targets {
    unmet: Vec<String>,
}

impl Targets {
    /// `value` must be at most `limit` (in `unit`); returns the text to print beside it.
    fn at_most(&mut self, what: &str, value: u64, limit: u64, unit: &str) -> String {
        if value <= limit {
            format!("(target: <= {limit} {unit}: met)")
        } else {
            self.unmet.push(format!("{what} {value} {unit} > {limit} {unit}"));
            format!("(target: <= {limit} {unit}: NOT met)")
        }
    }

    fn finish(self, bench: &str) -> Result<()> {
        if self.unmet.is_empty() {
            println!("{bench}: every target met");
            Ok(())
        } else {
            bail!("{bench}: target NOT met: {}", self.unmet.join("; "))
        }
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn boot(runs: usize) -> Result<()> {
    let a = build::all()?;
    let dir = paths::out_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let bins = cargo_build::build_static(["floor-init"])?;
    let mut floor = Initramfs::new();
    floor.file("/init", &bins.join("floor-init"), 0o755)?;
    let floor_img = dir.join("floor-initramfs.img");
    floor.write(&floor_img)?;
    let accel = accel::detect();
    progress::step("bench", format!("boot, {runs} runs each, {}", accel.describe()));

    let machine = |initramfs: &Path, cmdline: &str, log: &Path| {
        let mut cfg = QemuConfig::new(
            accel.clone(),
            Boot::Direct { kernel: a.kernel.clone(), initramfs: initramfs.to_path_buf(), cmdline: cmdline.into() },
        );
        cfg.serial = Serial::File(log.to_path_buf());
        cfg.extra = vec!["-no-reboot".into()];
        let mut c = cfg.command();
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        c
    };

    let (mut floor_ms, mut init_ms, mut ready_ms, mut floor_wall, mut ready_wall) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let log = dir.join(format!("floor-{i}.log"));
        let _ = std::fs::remove_file(&log);
        let t = Instant::now();
        let mut child = machine(&floor_img, "console=ttyS0 panic=-1 quiet", &log).spawn()?;
        let line = wait_line(&log, "floor: init", &mut child, Duration::from_secs(120))?;
        floor_ms.push(field(&line, "uptime_ms")?);
        let _ = child.wait();
        floor_wall.push(t.elapsed().as_millis() as u64);

        let log = dir.join(format!("rayosd-{i}.log"));
        let _ = std::fs::remove_file(&log);
        let t = Instant::now();
        let mut child = machine(&a.initramfs, "rayos.mode=installer console=ttyS0 panic=-1 quiet", &log).spawn()?;
        let line = wait_line(&log, "rayosd: ready", &mut child, Duration::from_secs(120));
        let wall = t.elapsed().as_millis() as u64;
        let _ = child.kill();
        let _ = child.wait();
        let line = line?;
        init_ms.push(field(&line, "init_uptime_ms")?);
        ready_ms.push(field(&line, "ready_uptime_ms")?);
        ready_wall.push(wall);
        eprintln!("    run {}: floor init at {} ms, rayosd ready at {} ms (kernel uptime)", i + 1, floor_ms[i], ready_ms[i]);
    }
    let (f, i, r) = (median(&mut floor_ms), median(&mut init_ms), median(&mut ready_ms));
    let mut targets = Targets::default();
    println!("boot (median of {runs}, kernel uptime, direct kernel boot, same kernel and QEMU):");
    println!("  floor: trivial init runs         {f:>6} ms");
    println!("  rayosd: init starts              {i:>6} ms");
    println!("  rayosd: ready                    {r:>6} ms");
    let over_floor = r.saturating_sub(f);
    println!("  rayosd ready - floor             {over_floor:>6} ms   {}", targets.at_most("rayosd ready - floor", over_floor, 100, "ms"));
    println!("  rayosd own start-to-ready        {:>6} ms", r as i64 - i as i64);
    println!(
        "  wall clock, QEMU start to floor power-off / to rayosd ready: {} / {} ms",
        median(&mut floor_wall),
        median(&mut ready_wall)
    );
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!("sizes:");
    println!("  bzImage                          {:>10}", progress::fmt_size(size(&a.kernel)));
    let initramfs_kib = size(&a.initramfs) / 1024;
    println!(
        "  initramfs (zstd)                 {:>10}   {}",
        progress::fmt_size(size(&a.initramfs)),
        targets.at_most("initramfs (zstd)", initramfs_kib, 16 * 1024, "KiB")
    );
    println!("  USB image                        {:>10}", progress::fmt_size(size(&a.usb_image)));
    targets.finish("bench boot")
}

const FUZZ_TARGETS: &[&str] = &["virtio_queue", "virtio_blk_request"];

fn fuzz(seconds: u64) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let has_fuzz = std::process::Command::new(&cargo).args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !has_fuzz {
        progress::step("fuzz", "installing cargo-fuzz from crates.io");
        let ok = std::process::Command::new(&cargo).args(["install", "--locked", "cargo-fuzz"]).status()?.success();
        if !ok {
            bail!("cargo install cargo-fuzz failed");
        }
    }
    let dir = paths::workspace().join("vmm").join("fuzz");
    let mut results = Vec::new();
    for t in FUZZ_TARGETS {
        progress::step("fuzz", format!("{t} for {seconds} s"));
        // libFuzzer's sanitizer flags are nightly-only; RUSTC_BOOTSTRAP lets stable take them.
        let out = std::process::Command::new(&cargo)
            .current_dir(&dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "-O", t, "--", &format!("-max_total_time={seconds}")])
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()
            .context("running cargo fuzz")?;
        let err = String::from_utf8_lossy(&out.stderr);
        let done = err.lines().rev().find(|l| l.starts_with("Done ")).unwrap_or("").to_string();
        let cov = err.lines().rev().find_map(|l| l.split_whitespace().skip_while(|w| *w != "cov:").nth(1)).unwrap_or("?").to_string();
        if !out.status.success() {
            eprintln!("{err}");
            bail!("fuzz target {t} failed (a crash or a build error); the input is under vmm/fuzz/artifacts/{t}/");
        }
        results.push((t, done, cov));
    }
    println!("fuzz ({seconds} s each, no crashes):");
    for (t, done, cov) in results {
        println!("  {t:<20} {done}  coverage {cov}");
    }
    Ok(())
}

/// The measuring lives with the VMM (`vmm/scripts/bench-nested.sh`, which packs the outer
/// machine and runs all three VMMs in it); this builds what it needs and runs it.
fn vmm(rounds: u32) -> Result<()> {
    let a = build::all()?;
    // bench-nested.sh packs the outer machine with cpio(1) and zstd(1) and runs QEMU.
    rootfs_builder::hostdeps::ensure(&["cpio", "zstd", "python3", "qemu-system-x86"])?;
    let bin = cargo_build::build_static(["vmm"])?;
    let work = paths::out_dir().join("bench").join("vmm");
    std::fs::create_dir_all(&work)?;
    let script = paths::workspace().join("vmm/scripts/bench-nested.sh");
    progress::step("bench", format!("rayos-vmm vs QEMU -M pc / -M microvm, each on the vmlinux and the bzImage, nested, {rounds} round(s)"));
    let out = std::process::Command::new("bash")
        .arg(&script)
        .env("RAYOS_BIN_DIR", &bin)
        .arg(&a.kernel)
        .arg(rounds.to_string())
        .arg(&work)
        .arg(&a.vmlinux)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("bench-vmm:")).collect();
    if lines.is_empty() {
        eprintln!("{text}");
        bail!("the nested VMM benchmark printed no result ({}); its files are in {}", out.status, work.display());
    }
    println!("vmm (nested KVM in QEMU TCG, same kernel build/initramfs/256 MiB; VMM start to guest init):");
    for l in &lines {
        println!("  {}", l.trim_start_matches("bench-vmm:").trim());
    }
    // The script's last line is its verdict (the target, or why it could not be checked); its
    // exit status says the same.
    if !out.status.success() {
        let last = lines.last().map(|l| l.trim_start_matches("bench-vmm:").trim()).unwrap_or_default();
        bail!("bench vmm: {last} ({}); its files are in {}", out.status, work.display());
    }
    Ok(())
}

/// Parses the installer's last line: `installed in N ms, <size> written`.
fn install_figures(line: &str) -> Result<(u64, String)> {
    let rest = line.split("installed in ").nth(1).context("no `installed in`")?;
    let (ms, rest) = rest.split_once(" ms, ").context("no ` ms, `")?;
    let bytes = rest.split(" bytes written").next().unwrap_or(rest).trim().to_string();
    Ok((ms.trim().parse().with_context(|| format!("duration in `{line}`"))?, bytes))
}

struct InstallRun {
    installer_ms: u64,
    written: String,
    wall_ms: u64,
    /// The installed disk.
    target: std::path::PathBuf,
}

/// One unattended install of a copy of the USB image onto a blank 8 GiB NVMe disk.
fn install_run(a: &build::Artifacts, dir: &Path, accel: &accel::Accel, i: usize) -> Result<InstallRun> {
    let answers = "version = 1\n[disk]\nmatch = { serial = \"BENCH-TARGET\" }\ntarget = \"whole-disk\"\n\
                   confirm = \"wipe BENCH-TARGET\"\n[system]\nhostname = \"bench\"\n\
                   [linux_user]\nname = \"bench\"\npassword_hash = \"$6$benchsalt$0kQCiHldjG5kuj8v4yzRhjGa58r4Kq.bbzhE43OQbldhEO7AGV.3.DNU3G9BMAIW5y72HXigxRHEilIdGP80o0\"\n";
    let usb = dir.join("install-usb.img");
    std::fs::copy(&a.usb_image, &usb).with_context(|| format!("copying {}", a.usb_image.display()))?;
    let mut esp = rootfs_builder::esp::Esp::open(&usb)?;
    esp.write("rayos/answers.toml", answers.as_bytes())?;
    esp.close()?;
    let target = dir.join("install-target.img");
    let _ = std::fs::remove_file(&target);
    std::fs::File::create(&target)?.set_len(8 << 30)?;
    let vars = dir.join("install-vars.fd");
    rootfs_builder::qemu::fresh_vars(&vars).with_context(|| format!("copying {}", paths::OVMF_VARS))?;
    let log = dir.join(format!("install-{i}.log"));
    let _ = std::fs::remove_file(&log);
    let mut cfg = QemuConfig::new(accel.clone(), Boot::Uefi { vars })
        .disk(&usb, rootfs_builder::qemu::DiskBus::Usb, "RAYOS-USB")
        .disk(&target, rootfs_builder::qemu::DiskBus::Nvme, "BENCH-TARGET");
    cfg.serial = Serial::File(log.clone());
    cfg.extra = vec!["-no-reboot".into()];
    let mut c = cfg.command();
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let t = Instant::now();
    let mut child = c.spawn()?;
    let line = wait_line(&log, "rayos-installer: installed in", &mut child, Duration::from_secs(900));
    let wall_ms = t.elapsed().as_millis() as u64;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&usb);
    let (installer_ms, written) = install_figures(&line?)?;
    Ok(InstallRun { installer_ms, written, wall_ms, target })
}

fn install(runs: usize) -> Result<()> {
    let a = build::all()?;
    let dir = paths::out_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let accel = accel::detect();
    progress::step("bench", format!("unattended install, {runs} run(s), {}", accel.describe()));
    let mut durations = vec![];
    let mut walls = vec![];
    let mut written = String::new();
    for i in 0..runs {
        let r = install_run(&a, &dir, &accel, i)?;
        eprintln!("    run {}: installer {} ms, {} written; power-on to done {} ms", i + 1, r.installer_ms, r.written, r.wall_ms);
        durations.push(r.installer_ms);
        walls.push(r.wall_ms);
        written = r.written;
        let _ = std::fs::remove_file(&r.target);
    }
    let (d, w) = (median(&mut durations), median(&mut walls));
    println!("install (median of {runs}; unattended, whole 8 GiB NVMe disk, default Linux VM included; {}):", accel.describe());
    let mut targets = Targets::default();
    println!("  installer: confirmation to done    {d:>7} ms   {} under TCG", targets.at_most("installer: confirmation to done", d, 120_000, "ms"));
    let shown = written.parse::<u64>().map(|b| format!("{} ({b} bytes)", progress::fmt_size(b))).unwrap_or(written);
    println!("  written to the target disk         {shown}");
    println!("  power-on to done (firmware, boot)  {w:>7} ms");
    println!("  installer share of the wall time   {:>9.2}", d as f64 / w.max(1) as f64);
    targets.finish("bench install")
}

/// `rayosctl --socket <sock> --json <args>`: the JSON answer, or an error with its output.
fn rayosctl(bin: &Path, sock: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = std::process::Command::new(bin).arg("--socket").arg(sock).arg("--json").args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("rayosctl {args:?}: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// The number before `unit` after `after` in `line` (e.g. "… init reached: 812 ms after …").
fn number_after(line: &str, after: &str) -> Result<u64> {
    let rest = line.split(after).nth(1).with_context(|| format!("no `{after}` in `{line}`"))?;
    rest.split_whitespace().next().and_then(|w| w.parse().ok()).with_context(|| format!("no number after `{after}` in `{line}`"))
}

fn vms(starts: usize) -> Result<()> {
    let a = build::all()?;
    let bins = cargo_build::build_static(["rayosd"])?;
    let ctl = bins.join("rayosctl");
    let dir = paths::out_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let accel = accel::detect();
    progress::step("bench", format!("VM supervisor: install, boot the installed disk, {starts} start(s) of the default Linux VM; {}", accel.describe()));
    let inst = install_run(&a, &dir, &accel, 0)?;
    let (mut child, log, sock) = boot_installed(&dir, &accel, &inst.target, "vms")?;
    let result = (|| -> Result<()> {
        let line = wait_line(&log, "vm linux: guest init reached", &mut child, Duration::from_secs(900))?;
        let boot_vmm = number_after(&line, "guest init reached:")?;
        // On the kernel's clock: rayosd ready → the autostarted VM's guest init.
        let logs = rayosctl(&ctl, &sock, &["logs", "-n", "2000"]);
        let records: Vec<serde_json::Value> = match &logs {
            Ok(serde_json::Value::String(t)) => t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect(),
            Ok(v) => vec![v.clone()],
            Err(e) => bail!("{e}"),
        };
        let at = |needle: &str| -> Result<u64> {
            records
                .iter()
                .find(|r| r["message"].as_str().is_some_and(|m| m.contains(needle)))
                .and_then(|r| r["uptime_ms"].as_u64())
                .with_context(|| format!("no log record with `{needle}`"))
        };
        let ready_to_init = at("vm linux: guest init reached")? as i64 - at("ready mode=installed")? as i64;
        eprintln!("    at boot: rayosd ready → guest init {ready_to_init} ms; the VMM's own start → init {boot_vmm} ms");

        let (mut totals, mut owns) = (vec![], vec![]);
        for i in 0..starts {
            rayosctl(&ctl, &sock, &["vm", "stop", "linux"])?;
            let t = Instant::now();
            loop {
                let v = rayosctl(&ctl, &sock, &["vm", "show", "linux"])?;
                if v["state"] == "stopped" {
                    break;
                }
                if t.elapsed() > Duration::from_secs(300) {
                    bail!("the default Linux VM did not stop within 300 s: {v}");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            let v = match rayosctl(&ctl, &sock, &["vm", "start", "linux", "--wait", "600"]) {
                Ok(v) => v,
                // The VM can fail on its own (see the guest reboots below); keep measuring.
                Err(e) => {
                    eprintln!("    start {}: {e:#}", i + 1);
                    continue;
                }
            };
            let (own, total) = (
                v["guest_init_ms"].as_u64().context("no guest_init_ms")?,
                v["start_to_init_ms"].as_u64().context("no start_to_init_ms")?,
            );
            eprintln!("    start {}: rayosctl vm start → guest init {total} ms; the VMM's own start → init {own} ms", i + 1);
            totals.push(total);
            owns.push(total.saturating_sub(own));
        }
        if totals.is_empty() {
            bail!("no start of the default Linux VM reached guest init; serial log {}", log.display());
        }
        let (total, added) = (median(&mut totals), median(&mut owns));
        // From rayosd's own lines: how long each fresh request waited for its VMM (what the
        // supervisor itself adds), and how often the guest rebooted, which the totals above
        // include (a restart after a reboot counts from the original request).
        let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("rayosd: vm linux: ")).collect();
        let mut spawn_ms = vec![];
        for (i, l) in lines.iter().enumerate() {
            let after_reboot = i >= 2 && lines[i - 2].contains("(the guest rebooted)");
            if l.contains("VMM pid") && !after_reboot {
                let ms = l.split(" started (").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse::<u64>().ok());
                spawn_ms.extend(ms);
            }
        }
        let reboots = text.lines().filter(|l| l.contains("vm linux: rayos-vmm: guest rebooted")).count();
        println!("VM supervisor (the installed default Linux VM, Debian; nested KVM; {}):", accel.describe());
        let mut targets = Targets::default();
        if spawn_ms.is_empty() {
            targets.unmet.push("start request -> VMM spawned: no `VMM pid … started (N ms` line from rayosd to measure".into());
        } else {
            let n = spawn_ms.len();
            let m = median(&mut spawn_ms);
            println!("  start request -> VMM spawned (median of {n})  {m:>5} ms   {}", targets.at_most("start request -> VMM spawned", m, 100, "ms"));
        }
        println!("  guest reboots during the run               {reboots:>5}   (each restart is counted in the totals below)");
        println!("  at boot: rayosd ready → guest init        {ready_to_init:>7} ms");
        println!("           of which the VMM's own start → init {boot_vmm:>5} ms; the rest {:>5} ms", ready_to_init - boot_vmm as i64);
        println!("  rayosctl vm start → guest init (median of {starts}) {total:>5} ms");
        println!("           total minus the VMM's own (median)       {added:>5} ms");
        println!("  (guest init = the boot-timer write of the guest agent, which sysvinit starts late in the boot)");
        targets.finish("bench vms")
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&inst.target);
    result
}

/// Boots the installed disk `target` (UEFI, NVMe) with the control channel; its serial log.
fn boot_installed(dir: &Path, accel: &accel::Accel, target: &Path, name: &str) -> Result<(std::process::Child, std::path::PathBuf, std::path::PathBuf)> {
    let vars = dir.join(format!("{name}-vars.fd"));
    rootfs_builder::qemu::fresh_vars(&vars).with_context(|| format!("copying {}", paths::OVMF_VARS))?;
    let log = dir.join(format!("{name}.log"));
    let sock = dir.join(format!("{name}-control.sock"));
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&sock);
    let mut cfg = QemuConfig::new(accel.clone(), Boot::Uefi { vars }).disk(target, rootfs_builder::qemu::DiskBus::Nvme, "BENCH-TARGET");
    cfg.serial = Serial::File(log.clone());
    cfg.control = Some(sock.clone());
    cfg.extra = vec!["-no-reboot".into()];
    let mut c = cfg.command();
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    Ok((c.spawn()?, log, sock))
}

fn resume() -> Result<()> {
    let a = build::all()?;
    let bins = cargo_build::build_static(["rayosd"])?;
    let ctl = bins.join("rayosctl");
    let dir = paths::out_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let accel = accel::detect();
    progress::step("bench", format!("save and resume: install, boot the installed disk, save and resume the default Linux VM; {}", accel.describe()));
    let inst = install_run(&a, &dir, &accel, 0)?;
    let (mut child, log, sock) = boot_installed(&dir, &accel, &inst.target, "resume")?;
    let result = (|| -> Result<()> {
        const T: Duration = Duration::from_secs(900);
        let agent = "vm linux: guest agent ready (";
        let first = wait_line(&log, agent, &mut child, T)?;
        eprintln!("    at boot: {first}");
        // Let the guest settle (first-boot setup, its login prompt): a save now is what a
        // user's reboot saves.
        std::thread::sleep(Duration::from_secs(20));

        // A cold start of the same guest, for the comparison.
        let mark = log_len(&log);
        rayosctl(&ctl, &sock, &["vm", "stop", "linux", "--wait", "300"])?;
        rayosctl(&ctl, &sock, &["vm", "start", "linux"])?;
        let cold = number_after(&wait_line_after(&log, mark, agent, &mut child, T)?, agent)?;
        eprintln!("    cold start → guest agent ready: {cold} ms");
        std::thread::sleep(Duration::from_secs(20));

        let mark = log_len(&log);
        let t = Instant::now();
        rayosctl(&ctl, &sock, &["vm", "save", "linux"])?;
        let save_wall = t.elapsed().as_millis() as u64;
        let saved = wait_line_after(&log, mark, "vm linux: saved in ", &mut child, T)?;
        let save_ms = number_after(&saved, "saved in ")?;
        let written_mib = number_after(&saved, "ms: ")?;
        let ram_mib = number_after(&saved, "written (")?;

        let mark = log_len(&log);
        rayosctl(&ctl, &sock, &["vm", "start", "linux"])?;
        let up = wait_line_after(&log, mark, "vm linux: resumed from saved state", &mut child, T)?;
        let up_ms = number_after(&up, "s ago), ")?;
        let back = number_after(&wait_line_after(&log, mark, agent, &mut child, T)?, agent)?;

        // The power-off: how long saving took inside it.
        let mark = log_len(&log);
        std::thread::sleep(Duration::from_secs(10));
        rayosctl(&ctl, &sock, &["poweroff"])?;
        let took = number_after(&wait_line_after(&log, mark, "vm: saving took ", &mut child, T)?, "saving took ")?;

        println!("Save and resume (the installed default Linux VM, Debian; nested KVM; {}):", accel.describe());
        let mut targets = Targets::default();
        let rate = (written_mib * 1000).checked_div(save_ms).unwrap_or(0);
        println!("  guest RAM                                  {ram_mib:>6} MiB");
        println!("  state written (non-zero pages)             {written_mib:>6} MiB");
        println!("  save (the VMM's snapshot)                  {save_ms:>6} ms   {rate} MiB/s of written pages");
        println!("  rayosctl vm save, wall                     {save_wall:>6} ms");
        println!("  cold start → guest agent ready             {cold:>6} ms   (baseline, same guest, same run)");
        println!("  resume: start → VMM up (guest running)     {up_ms:>6} ms");
        let ratio = format!("{:.3}x", back as f64 / cold.max(1) as f64);
        println!(
            "  resume: start → guest agent answering      {back:>6} ms   = {ratio} of the cold start {}",
            targets.at_most("resume → agent (per mille of the cold start)", back * 1000 / cold.max(1), 100, "‰")
        );
        println!("  saving inside the power-off                {took:>6} ms");
        println!("  not measured: restore time of a 256 MiB beside a 2 GiB guest (one guest size here), and dd on the data volume");
        targets.finish("bench resume")
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&inst.target);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmet_target_fails_the_bench_and_names_it() {
        let mut t = Targets::default();
        assert_eq!(t.at_most("ready - floor", 100, 100, "ms"), "(target: <= 100 ms: met)");
        t.finish("bench boot").unwrap();
        let mut t = Targets::default();
        assert_eq!(t.at_most("ready - floor", 90, 100, "ms"), "(target: <= 100 ms: met)");
        assert_eq!(t.at_most("initramfs (zstd)", 17_000, 16_384, "KiB"), "(target: <= 16384 KiB: NOT met)");
        let e = t.finish("bench boot").unwrap_err().to_string();
        assert_eq!(e, "bench boot: target NOT met: initramfs (zstd) 17000 KiB > 16384 KiB");
    }
}
