//! rayos-vmm end to end: real `rayos-vmm` processes inside a QEMU guest with nested KVM, on the
//! RayOS kernel. The outer guest's /init is `rayos-vmm-testinit`, which runs the VMM on each
//! spec in turn and drives its control socket from a script; the nested guest's /init is
//! `rayos-guest-agent`, which checks a device and prints `agent: <check> ok|FAIL …`.
//! Everything is read back from the outer serial console.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rayos_tests::{artifacts, initramfs::Initramfs, Qemu};

/// Nested boots take seconds each under TCG; several run in sequence, on two shared cores.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

fn vmm_bins() -> &'static PathBuf {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| rootfs_builder::cargo_build::build_static(["vmm"]).expect("building the vmm binaries"))
}

fn guest_initramfs(dir: &Path) -> PathBuf {
    let out = dir.join("guest-initrd");
    let mut ird = Initramfs::new();
    ird.file("/init", &vmm_bins().join("rayos-guest-agent"), 0o755).unwrap();
    ird.write(&out).unwrap();
    out
}

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
    let a = artifacts();
    let builder = Qemu::builder(test);
    let dir = builder.workdir().to_path_buf();
    let guest_initrd = guest_initramfs(&dir);
    let mut ird = Initramfs::new();
    ird.file("/init", &vmm_bins().join("rayos-vmm-testinit"), 0o755).unwrap();
    ird.file("/rayos-vmm", &vmm_bins().join("rayos-vmm"), 0o755).unwrap();
    ird.file("/guest/bzImage", &a.kernel, 0o644).unwrap();
    ird.file("/guest/initrd", &guest_initrd, 0o644).unwrap();
    for d in ["/dev", "/proc", "/sys", "/tmp", "/run"] {
        ird.dir(d, 0o755).unwrap();
    }
    for r in runs {
        ird.bytes(&format!("/specs/{}.json", r.name), r.spec.to_string().into_bytes(), 0o644).unwrap();
        if let Some(c) = r.ctl {
            ird.bytes(&format!("/specs/{}.ctl", r.name), c.as_bytes().to_vec(), 0o644).unwrap();
        }
    }
    let outer = dir.join("outer-initrd");
    ird.write(&outer).unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r.name).collect();
    let mut q = builder
        .direct_kernel(&a.kernel, &outer, &format!("console=ttyS0 panic=-1 quiet rayos.vmmtest={}", names.join(",")))
        .memory_mib(2048)
        .cpus(2)
        .no_reboot()
        .spawn()
        .unwrap();
    q.wait_for("testinit: all done", RUN_TIMEOUT).unwrap();
    q.serial_log()
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

#[test]
fn vmm_boots_linux_smp_with_devices_control_and_power_off() {
    let runs = [
        // 2 vCPUs through the ACPI MADT; power-off (ACPI S5) ends the VMM with 0.
        Run { name: "smp", spec: spec("smp", 2, "cpus", serde_json::json!({})), ctl: None },
        // Every device at once; the control socket injects input and reads the display.
        Run {
            name: "dev1",
            spec: spec(
                "dev1",
                2,
                "rng,disk-write,display,agent,input",
                serde_json::json!({
                    "disks": [{"path": "/tmp/disk.img"}], "rng": true, "input": {},
                    "display": {"width": 1024, "height": 768}, "console": {},
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
                "{\"cmd\":\"display\",\"points\":[[0,0],[300,200],[1023,767]]}\n",
            )),
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
        // The guest reboots (ACPI reset register): the VMM exits 10 for its supervisor.
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
    assert_has(&log, "rayos-vmm: guest rebooted");
    assert!(!log.contains("seccomp: blocked syscall"), "{log}");
    assert!(!log.contains(" FAIL "), "a guest check failed:\n{log}");
    // The boot timer fired for each guest.
    assert!(lines_with(&log, "boot-timer: guest init reached after").len() >= runs.len(), "{log}");

    // SMP: the guest sees both vCPUs.
    assert_has(&log, "agent: cpus ok online=2");

    // virtio-rng.
    assert_has(&log, "agent: rng ok source=virtio_rng");

    // virtio-blk: the marker written by dev1 is read back by dev2, in another VMM process.
    let written = lines_with(&log, "agent: disk-write ok marker=");
    assert_eq!(written.len(), 1, "{log}");
    let marker = written[0].split("marker=").nth(1).unwrap().trim();
    assert_has(&log, &format!("agent: disk-read ok marker={marker}"));

    // Agent channel both ways.
    let got = ctl_answer(&log, "dev1", "hello from guest");
    assert_eq!(got["ok"], true);
    assert_has(&log, "agent: agent ok got=ping-from-host");

    // Injected key and absolute pointer events arrive on the guest's evdev devices.
    assert_has(&log, "agent: input ok key=30 abs=1000,2000");

    // The guest drew pixel(x, y) = (x & 0xff) << 16 | (y & 0xff) << 8 | 0x5a through the bochs
    // DRM driver; the VMM reads the same pixels from the shared framebuffer.
    assert_has(&log, "agent: display ok 1024x768");
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
    assert_eq!(ctl_answer(&log, "ctl", "\"paused\",\"uptime")["state"], "paused");
    let status = ctl_answer(&log, "ctl", "\"running\",\"uptime");
    assert_eq!(status["vcpus"], 2);
    assert!(status["boot_ms"].as_u64().is_some(), "{status}");
    assert_eq!(ctl_answer(&log, "ctl", "bad request")["ok"], false);
}

/// On a host whose KVM cannot run guests (this machine's kvm_pvm), the VMM must fail within
/// seconds with a clear error; on a host where KVM works, the guest boots and powers off.
/// Either way it never hangs.
#[test]
fn vmm_never_hangs_on_the_host_kvm() {
    let dir = std::env::temp_dir().join(format!("vmm-host-kvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = guest_initramfs(&dir);
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
    match status.code() {
        Some(0) => assert!(text.contains("agent: cpus ok"), "{text}"),
        Some(1) => {
            // Either the watchdog (KVM_RUN never returns) or an early KVM failure, named as such.
            assert!(
                text.contains("host KVM made no progress")
                    || text.contains("this host's KVM may be unable to run ordinary guests")
                    || text.contains("/dev/kvm"),
                "unclear error:\n{text}"
            );
            assert!(t0.elapsed() < Duration::from_secs(20), "took {:?} to fail", t0.elapsed());
        }
        other => panic!("unexpected exit {other:?}:\n{text}"),
    }
}
