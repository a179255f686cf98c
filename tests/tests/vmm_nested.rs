//! rayos-vmm end to end: real `rayos-vmm` processes inside a QEMU guest with nested KVM, on the
//! RayOS kernel. The outer guest's /init is `rayos-vmm-testinit`, which runs the VMM on each
//! spec in turn and drives its control socket from a script; the nested guest's /init is
//! `rayos-guest-agent`, which checks a device and prints `agent: <check> ok|FAIL …`.
//! Everything is read back from the outer serial console.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rayos_tests::nested::{boot_timer_lines, guest_initramfs, section, vmm_bins, Outer};
use rayos_tests::artifacts;
use rootfs_builder::accel::Accel;

/// Nested boots take seconds each under TCG; several run in sequence, on two shared cores.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

/// Where the outer initramfs carries the stripped ELF vmlinux (when a run needs it).
const GUEST_VMLINUX: &str = "/guest/vmlinux";

/// One VMM run: its spec, and optionally a control script.
struct Run {
    name: &'static str,
    spec: serde_json::Value,
    ctl: Option<&'static str>,
}

fn spec(name: &str, vcpus: u32, agent: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut s = serde_json::json!({
        "name": name, "vcpus": vcpus, "memory_mib": 256,
        "kernel": "/guest/bzImage", "initramfs": "/guest/initrd",
        "cmdline": format!("console=ttyS0 quiet rayos.agent={agent}"),
        "serial_stdout": true,
        "control_socket": format!("/run/{name}.sock"),
    });
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

/// Boots the outer VM, runs `runs` in order, returns the whole serial log.
fn run_nested(test: &str, runs: &[Run]) -> String {
    run_nested_with(test, runs, &[])
}

/// [`run_nested`] with extra files in the outer initramfs (e.g. `/specs/<name>.cmd`, a
/// command testinit runs instead of `rayos-vmm --spec`).
fn run_nested_with(test: &str, runs: &[Run], extra: &[(&str, &str)]) -> String {
    run_nested_booted_with(test, runs, extra, &[])
}

/// [`run_nested_with`] with extra arguments on the outer kernel's command line.
fn run_nested_booted_with(test: &str, runs: &[Run], extra: &[(&str, &str)], kernel_args: &[&str]) -> String {
    let mut outer = Outer::new(test);
    for a in kernel_args {
        outer.kernel_arg(a);
    }
    // The uncompressed kernel only where a run boots it: it is large, and every byte of the
    // outer initramfs is unpacked at emulated speed.
    if runs.iter().any(|r| r.spec["kernel"] == GUEST_VMLINUX) {
        outer.file(GUEST_VMLINUX, &artifacts().vmlinux, 0o644);
    }
    for r in runs {
        outer.vmm(r.name, &r.spec, r.ctl);
    }
    for (path, text) in extra {
        outer.text(path, text);
    }
    outer.boot(RUN_TIMEOUT)
}

/// This machine's TSC rate in kHz, measured over 300 ms (QEMU TCG gives its guest the
/// host's TSC).
fn host_tsc_khz() -> u64 {
    let t0 = Instant::now();
    // SAFETY: RDTSC reads a counter and touches no memory.
    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
    (c1 - c0) * 1_000_000 / t0.elapsed().as_nanos() as u64
}

/// The lines of `log` that start with `prefix` (after any console noise on the same line).
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

fn assert_has(log: &str, needle: &str) {
    assert!(log.contains(needle), "missing `{needle}` in the serial log:\n{log}");
}

/// The JSON answer of a control request in run `name` whose answer contains `marker`.
fn ctl_answer(log: &str, name: &str, marker: &str) -> serde_json::Value {
    let prefix = format!("testinit: {name} ctl ");
    let line = log
        .lines()
        .filter_map(|l| l.split_once(&prefix).map(|(_, a)| a))
        .find(|a| a.contains(marker))
        .unwrap_or_else(|| panic!("no control answer with `{marker}` for {name}:\n{log}"));
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
}

/// The first `status` answer (it carries `uptime_ms`) of run `name` that reports `state`.
/// Parsed, not matched as text: the answer's field order is serde's, not a contract.
fn status_answer(log: &str, name: &str, state: &str) -> serde_json::Value {
    let prefix = format!("testinit: {name} ctl ");
    log.lines()
        .filter_map(|l| l.split_once(&prefix).map(|(_, a)| a))
        .filter_map(|a| serde_json::from_str::<serde_json::Value>(a.trim()).ok())
        .find(|v| v["state"] == state && v["uptime_ms"].is_u64())
        .unwrap_or_else(|| panic!("no status answer with state {state:?} for {name}:\n{log}"))
}

#[test]
fn vmm_boots_linux_smp_with_devices_control_and_power_off() {
    let runs = [
        // 2 vCPUs through the ACPI MADT, and a kernel log without warnings (CPUID, XSAVE,
        // ACPI tables as Linux checks them); power-off (ACPI S5) ends the VMM with 0.
        Run { name: "smp", spec: spec("smp", 2, "cpus,nowarn", serde_json::json!({})), ctl: None },
        // Every device at once; the control socket injects input and reads the display.
        Run {
            name: "dev1",
            spec: spec(
                "dev1",
                2,
                "rng,disk-write,display,agent,input",
                serde_json::json!({
                    "disks": [{"path": "/tmp/disk.img"}], "rng": true, "input": {},
                    "display": {"width": 1280, "height": 800}, "console": {},
                }),
            ),
            ctl: Some(concat!(
                "wait agent: agent sent hello\n",
                "{\"cmd\":\"agent_read\"}\n",
                "{\"cmd\":\"agent_send\",\"data\":\"ping-from-host\\n\"}\n",
                "wait agent: input ready\n",
                "{\"cmd\":\"key\",\"code\":30,\"pressed\":true}\n",
                "{\"cmd\":\"key\",\"code\":30,\"pressed\":false}\n",
                "{\"cmd\":\"pointer\",\"x\":1000,\"y\":2000}\n",
                "wait agent: input ok\n",
                "{\"cmd\":\"display\",\"points\":[[0,0],[300,200],[1279,799]]}\n",
            )),
        },
        // virtio-net on a tap: the guest and the host side exchange UDP datagrams.
        Run {
            name: "net",
            spec: spec("net", 1, "net", serde_json::json!({"net": [{"tap": "rtap0"}]})),
            ctl: None,
        },
        // A second VM on the same disk image: what the first one wrote is there.
        Run {
            name: "dev2",
            spec: spec("dev2", 1, "disk-read", serde_json::json!({"disks": [{"path": "/tmp/disk.img"}]})),
            ctl: None,
        },
        // Graceful shutdown: the ACPI power button reaches the guest, which powers off.
        Run {
            name: "pwr",
            spec: spec("pwr", 1, "powerbutton", serde_json::json!({})),
            ctl: Some("wait agent: powerbutton waiting\n{\"cmd\":\"shutdown\"}\n"),
        },
        // The guest reboots the way Linux does by default here (no `reboot=` option): via the
        // reset vector, whose stub writes the ACPI reset register; the VMM exits 10 for its
        // supervisor.
        Run { name: "reboot", spec: spec("reboot", 1, "cpus rayos.agent_end=reboot", serde_json::json!({})), ctl: None },
        // Pause, resume, status, a bad request, and a forced power-off.
        Run {
            name: "ctl",
            spec: spec("ctl", 2, "sleep60000", serde_json::json!({})),
            ctl: Some(concat!(
                "wait agent: sleeping\n",
                "{\"cmd\":\"pause\"}\n",
                "{\"cmd\":\"status\"}\n",
                "{\"cmd\":\"resume\"}\n",
                "{\"cmd\":\"status\"}\n",
                "{\"cmd\":\"explode\"}\n",
                "{\"cmd\":\"poweroff\"}\n",
            )),
        },
    ];
    let log = run_nested("vmm_nested_devices", &runs);

    // Every VMM exited 0 (powered off) but the rebooting one (10); none was killed by its
    // seccomp filter (exit 31).
    for r in &runs {
        let code = if r.name == "reboot" { 10 } else { 0 };
        assert_has(&log, &format!("testinit: {} exit={code} ", r.name));
    }
    assert_has(&log, "rayos-vmm: guest rebooted (ACPI reset register)");
    assert!(!log.contains("seccomp: blocked syscall"), "{log}");
    assert!(!log.contains(" FAIL "), "a guest check failed:\n{log}");
    // The boot timer fired once for each guest, counted run by run.
    for r in &runs {
        let s = section(&log, r.name);
        assert_eq!(boot_timer_lines(s), 1, "run {}: guest init not reached exactly once:\n{s}", r.name);
    }

    // SMP: the guest sees both vCPUs; its kernel did not warn about what the VMM gave it.
    assert_has(&log, "agent: cpus ok online=2");
    assert_has(&log, "agent: nowarn ok");

    // virtio-rng.
    assert_has(&log, "agent: rng ok source=virtio_rng");

    // virtio-blk: the marker written by dev1 is read back by dev2, in another VMM process.
    let written = lines_with(&log, "agent: disk-write ok marker=");
    assert_eq!(written.len(), 1, "{log}");
    let marker = written[0].split("marker=").nth(1).unwrap().trim();
    assert_has(&log, &format!("agent: disk-read ok marker={marker}"));

    // virtio-net: the guest's datagram reached the host side of the tap and the echo came back.
    let echo = lines_with(&log, "agent: net ok echo=");
    assert_eq!(echo.len(), 1, "{log}");
    let payload = echo[0].split("echo=").nth(1).unwrap().split_whitespace().next().unwrap();
    assert_has(&log, &format!("testinit: net net echo {payload} from 10.0.2.2:"));

    // Agent channel both ways.
    let got = ctl_answer(&log, "dev1", "hello from guest");
    assert_eq!(got["ok"], true);
    assert_has(&log, "agent: agent ok got=ping-from-host");

    // Injected key and absolute pointer events arrive on the guest's evdev devices.
    assert_has(&log, "agent: input ok key=30 abs=1000,2000");

    // The guest drew pixel(x, y) = (x & 0xff) << 16 | (y & 0xff) << 8 | 0x5a through the bochs
    // DRM driver at the configured size (announced as the preferred mode through EDID, where
    // Linux would otherwise pick 1024x768); the VMM reads the same pixels from the shared
    // framebuffer.
    assert_has(&log, "agent: display ok 1280x800");
    let d = ctl_answer(&log, "dev1", "\"pixels\"");
    assert_eq!(d["enabled"], true);
    let pixels: Vec<(u64, u64, u64)> = serde_json::from_value(d["pixels"].clone()).unwrap();
    for (x, y, v) in &pixels {
        assert_eq!(*v, ((x & 0xff) << 16) | ((y & 0xff) << 8) | 0x5a, "pixel ({x},{y}) in {d}");
    }
    assert_eq!(pixels.len(), 3, "{d}");

    // ACPI power button.
    assert_has(&log, "agent: powerbutton ok pressed");

    // Control socket.
    assert_eq!(status_answer(&log, "ctl", "paused")["name"], "ctl");
    let status = status_answer(&log, "ctl", "running");
    assert_eq!(status["vcpus"], 2);
    assert!(status["boot_ms"].as_u64().is_some(), "{status}");
    assert_eq!(ctl_answer(&log, "ctl", "bad request")["ok"], false);
}

/// The uncompressed kernel: rayos-vmm boots the stripped ELF vmlinux of the same kernel build
/// (no decompression in the guest; 64-bit entry with boot_params filled in by the VMM) with
/// 2 vCPUs through ACPI, the guest reaches init and the VMM exits 0 when it powers off. The
/// same guest from the bzImage runs in the same outer VM, for the boot times beside it.
#[test]
fn vmm_boots_the_uncompressed_vmlinux() {
    let mut elf = spec("elf", 2, "cpus,rng", serde_json::json!({"rng": true}));
    elf["kernel"] = GUEST_VMLINUX.into();
    let runs = [
        Run { name: "elf", spec: elf, ctl: None },
        Run { name: "bz", spec: spec("bz", 2, "cpus,rng", serde_json::json!({"rng": true})), ctl: None },
    ];
    let log = run_nested("vmm_nested_vmlinux", &runs);
    assert!(!log.contains("seccomp: blocked syscall"), "{log}");
    let mut boot_ms = vec![];
    for (name, format) in [("elf", "(ELF vmlinux)"), ("bz", "(bzImage)")] {
        let s = section(&log, name);
        assert!(s.contains(&format!("testinit: {name} exit=0 ")), "run {name} did not power off cleanly:\n{s}");
        assert!(s.contains(format), "run {name} did not boot the {format} kernel:\n{s}");
        assert!(s.contains("agent: cpus ok online=2"), "run {name}:\n{s}");
        assert!(s.contains("agent: rng ok source=virtio_rng"), "run {name}:\n{s}");
        assert!(!s.contains(" FAIL "), "run {name}: a guest check failed:\n{s}");
        // The VMM prints the line itself (counted here) and logs it through tracing too.
        let timer: Vec<&str> =
            s.lines().filter(|l| l.trim_start().starts_with("boot-timer: guest init reached after")).collect();
        assert_eq!(timer.len(), 1, "run {name}: guest init not reached once:\n{s}");
        let ms: u64 = timer[0].split("after ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
        boot_ms.push(ms);
    }
    println!("VMM start to guest init: vmlinux {} ms, bzImage {} ms", boot_ms[0], boot_ms[1]);
}

/// Heartbeat counts in `log`, in order: `agent: heartbeat n=N uptime_ms=T` lines as (N, T).
fn heartbeats(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|l| l.split_once("agent: heartbeat n=").map(|(_, r)| r))
        .filter_map(|r| {
            let (n, t) = r.split_once(" uptime_ms=")?;
            Some((n.trim().parse().ok()?, t.trim().parse().ok()?))
        })
        .collect()
}

/// Snapshot and restore across VMM processes: a guest counts heartbeats; the VMM pauses and
/// saves it, is ended, and a new `rayos-vmm --restore` continues the same guest: the count
/// goes on from where it was (no second boot), its clock does not go back, and the disk
/// (a virtio queue that was active at the snapshot) still reads and writes.
#[test]
fn vmm_snapshot_restore_continues_the_guest() {
    let runs = [
        Run {
            name: "snap1",
            spec: spec(
                "snap1",
                1,
                "disk-write,display,heartbeat25,disk-write,disk-read",
                // As rayosd runs a VM: its own directory and its own unprivileged user.
                serde_json::json!({
                    "disks": [{"path": "/vms/snap1/disk.img"}], "rng": true, "console": {},
                    "display": {"width": 800, "height": 600},
                    "vm_dir": "/vms/snap1", "run_as": {"uid": 2000000001u32, "gid": 2000000001u32},
                }),
            ),
            ctl: Some(concat!(
                "wait agent: heartbeat n=4\n",
                "{\"cmd\":\"snapshot\",\"path\":\"/tmp/elsewhere\"}\n",
                "{\"cmd\":\"snapshot\",\"path\":\"/vms/snap1/snap\"}\n",
                "{\"cmd\":\"status\"}\n",
                "{\"cmd\":\"snapshot\",\"path\":\"/vms/snap1/snap\"}\n",
                "{\"cmd\":\"poweroff\"}\n",
            )),
        },
        // Only the control socket matters here (testinit reads it from the spec); the VM
        // comes from the snapshot.
        // Its first request reads the display before the guest could redraw anything.
        Run {
            name: "snap2",
            spec: serde_json::json!({"control_socket": "/run/snap1.sock"}),
            ctl: Some("{\"cmd\":\"display\",\"points\":[[0,0],[300,200],[799,599]]}\n"),
        },
    ];
    // The host's first TSC calibration 0.5% low, refined (within the kernel's 1%) before
    // the VMM runs: KVM's default rate for new vCPUs is then off by more than its 250 ppm
    // tolerance and the CPU cannot scale, as after a real boot under TCG. Without the VMM
    // setting the rate itself, KVM read the guest's TSC as 0 and every snapshot saved 0.
    let early_khz = host_tsc_khz() * 995 / 1000;
    let log = run_nested_booted_with(
        "vmm_nested_snapshot",
        &runs,
        &[("/specs/snap2.cmd", "/rayos-vmm\n--restore\n/vms/snap1/snap\n")],
        &[&format!("tsc_early_khz={early_khz}"), "rayos.wait_tsc_refined"],
    );
    // Said, not asserted: on a CPU with an invariant TSC, KVM takes the refined rate and
    // there is nothing to provoke (and nothing to fix).
    println!("KVM's default TSC rate was off and set by the VMM: {}", log.contains("KVM's default was"));
    assert!(!log.contains("TSC reads 0 from KVM"), "KVM's view of the guest's TSC was broken at the snapshot:\n{log}");
    assert!(!log.contains("seccomp: blocked syscall"), "{log}");
    assert!(!log.contains(" FAIL "), "a guest check failed:\n{log}");
    assert_has(&log, "testinit: snap1 exit=0 ");
    assert_has(&log, "testinit: snap2 exit=0 ");

    // Both VMMs ran as the VM's user, confined to its directory.
    assert_eq!(lines_with(&log, "running as uid 2000000001 gid 2000000001").len(), 2, "{log}");
    let outside = ctl_answer(&log, "snap1", "outside this VM's directory");
    assert_eq!(outside["ok"], false, "{outside}");
    let snap = ctl_answer(&log, "snap1", "memory_written");
    assert_eq!(snap["ok"], true, "{snap}");
    let (size, written) = (snap["memory_bytes"].as_u64().unwrap(), snap["memory_written"].as_u64().unwrap());
    assert_eq!(size, 256 << 20);
    assert!(written > 0 && written < size / 2, "the memory file is sparse: {snap}");
    status_answer(&log, "snap1", "paused"); // left paused after the snapshot
    let again = ctl_answer(&log, "snap1", "already exists");
    assert_eq!(again["ok"], false, "an existing snapshot is not replaced unasked: {again}");

    let (before, rest) = log.split_once("testinit: snap1 exit=0").unwrap();
    let (after, _) = rest.split_once("testinit: snap2 exit=").unwrap();
    let hb_before = heartbeats(before);
    let hb_after = heartbeats(after);
    let (n1, t1) = *hb_before.last().unwrap_or_else(|| panic!("no heartbeat before the snapshot:\n{log}"));
    let (n2, t2) = *hb_after.first().unwrap_or_else(|| panic!("no heartbeat after the restore:\n{log}"));
    // A heartbeat line cut by the snapshot is missing from both sides: n1 + 2 at most.
    assert!(n1 >= 4 && n2 > n1 && n2 <= n1 + 2, "count went {n1} -> {n2}:\n{log}");
    // Heartbeats are 200 ms apart; a cut line and a slow nested guest leave room, a clock
    // restored from the wrong source (seconds off) does not.
    assert!(t2 >= t1, "the guest's clock went back: {t1} -> {t2} ms");
    assert!(t2 - t1 < 3000, "the guest's clock jumped {t1} -> {t2} ms across the restore");
    assert_eq!(hb_after.last().unwrap().0, 25, "{log}");
    assert!(!after.contains("agent: started"), "the restored guest booted again:\n{after}");
    assert!(after.contains("restored /vms/snap1/snap in"), "{after}");

    // The disk: written before the snapshot, then written and read back (from the device,
    // not the page cache) by the restored guest.
    assert_eq!(lines_with(before, "agent: disk-write ok").len(), 1, "{before}");
    let written = lines_with(after, "agent: disk-write ok marker=");
    assert_eq!(written.len(), 1, "{after}");
    let marker = written[0].split("marker=").nth(1).unwrap().trim();
    assert_has(after, &format!("agent: disk-read ok marker={marker}"));
    // The display: the pattern drawn before the snapshot is on the restored VMM's screen.
    assert_eq!(lines_with(before, "agent: display ok 800x600").len(), 1, "{before}");
    let d = ctl_answer(&log, "snap2", "\"pixels\"");
    assert_eq!((d["enabled"].clone(), d["width"].clone()), (true.into(), 800.into()), "{d}");
    let pixels: Vec<(u64, u64, u64)> = serde_json::from_value(d["pixels"].clone()).unwrap();
    assert_eq!(pixels.len(), 3, "{d}");
    for (x, y, v) in &pixels {
        assert_eq!(*v, ((x & 0xff) << 16) | ((y & 0xff) << 8) | 0x5a, "restored pixel ({x},{y}) in {d}");
    }
    let restored_ms: Vec<&str> = lines_with(after, "restored /vms/snap1/snap in");
    println!("snapshot: {snap}\nrestore: {restored_ms:?}");
}

/// On a host whose KVM cannot run guests (this machine's kvm_pvm), the VMM must fail within
/// seconds with a clear error; on a host where KVM works, the guest boots and powers off.
/// Which of the two this host must give is the builder's KVM probe's verdict (the one that
/// picks QEMU's accelerator), decided before the VMM runs; it never hangs either way.
#[test]
fn vmm_never_hangs_on_the_host_kvm() {
    let verdict = rayos_tests::accel().clone();
    println!("builder's KVM probe: {}", verdict.describe());
    let dir = std::env::temp_dir().join(format!("vmm-host-kvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = guest_initramfs(&dir.join("guest-initrd"));
    let spec_path = dir.join("vm.json");
    let spec = serde_json::json!({
        "name": "host", "vcpus": 1, "memory_mib": 128,
        "kernel": artifacts().kernel, "initramfs": initrd,
        "cmdline": "console=ttyS0 quiet rayos.agent=cpus", "serial_stdout": true,
        "progress_timeout_ms": 3000,
    });
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let t0 = Instant::now();
    let mut child = Command::new(vmm_bins().join("rayos-vmm"))
        .arg("--spec")
        .arg(&spec_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("rayos-vmm still running after 60 s on the host KVM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match verdict {
        Accel::Kvm => {
            assert_eq!(status.code(), Some(0), "the probe says host KVM runs guests, yet the VMM failed:\n{text}");
            assert!(text.contains("agent: cpus ok online=1"), "{text}");
        }
        Accel::Tcg { why } => {
            assert_eq!(status.code(), Some(1), "the probe says host KVM cannot run guests ({why}); the VMM must fail with 1:\n{text}");
            // No /dev/kvm at all is named as such; a /dev/kvm that creates VMs but does not
            // run them is caught by the watchdog (KVM_RUN never returns) or by an early KVM
            // failure, named as this host's KVM.
            let named = if std::path::Path::new("/dev/kvm").exists() {
                text.contains("host KVM made no progress") || text.contains("this host's KVM may be unable to run ordinary guests")
            } else {
                text.contains("/dev/kvm")
            };
            assert!(named, "unclear error (probe: {why}):\n{text}");
            assert!(t0.elapsed() < Duration::from_secs(20), "took {:?} to fail", t0.elapsed());
        }
    }
}
