//! The VM supervisor in a real RayOS: rayosd (installed mode, data volume on NVMe) starts
//! real `rayos-vmm` processes under nested KVM (QEMU TCG with an emulated AMD-V CPU). The
//! guest is the tiny `rayos-devguest` (systemless crate) on the RayOS kernel: it writes the
//! VMM's boot-timer port at init and prints `heartbeat <n>` on its serial console, which
//! `rayosctl vm logs` returns; it powers off on the ACPI power button.
//!
//! The data volume is built here the way the installer lays it out: GPT with the RayOS data
//! type, ext4 (`mkfs.ext4 -d`, label rayos-data) holding `registry/vms.json` in the
//! documented schema and the VMs' files under `vms/<uuid>/`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rayos_tests::ctl::{ctl, ctl_ok, monitor_vs_vm, wait_monitor_shows, wait_vm};
use rayos_tests::ppm::read_ppm;
use rayos_tests::{artifacts, initramfs::Initramfs, Qemu, QemuBuilder, BOOT_TIMEOUT};
use serde_json::{json, Value};

const DATA_TYPE_GUID: &str = "bcae553e-c9a9-4fbc-8291-e48c272f7ecf";
const PART_START_LBA: u64 = 2048;
const PART_SIZE: u64 = 192 << 20;
/// Room for the 2 GiB Debian guest image.
const BIG_PART_SIZE: u64 = 3 << 30;
/// A nested guest boots in ~5 s alone; two cores are shared with the other tests.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// GPT stores the first three GUID fields little-endian.
fn guid_le(s: &str) -> [u8; 16] {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let mut b = [0u8; 16];
    for i in 0..16 {
        b[i] = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

fn new_uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap().trim().to_string()
}

/// The static rayos-devguest and rayosctl (built once per test process).
fn bins() -> &'static PathBuf {
    static B: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    B.get_or_init(|| rootfs_builder::cargo_build::build_static(["systemless", "rayosd"]).expect("building rayos-devguest and rayosctl"))
}

fn rayosctl() -> PathBuf {
    rayos_tests::ctl::rayosctl_bin().clone()
}

/// A VM record in the registry's schema (version 1).
struct Vm {
    id: String,
    name: &'static str,
    autostart: bool,
    /// false: its disk image is missing.
    disk: bool,
    /// A kernel file that is not a kernel: the VMM fails at every start.
    bad_kernel: bool,
    /// Offer the `org.rayos.agent` port.
    agent: bool,
    /// Boot this kernel/initramfs/cmdline instead of the devguest's.
    boot: Option<(String, Option<String>, String)>,
    memory_mib: u64,
    /// Copy this image as the VM's disk instead of a blank 1 MiB one.
    disk_src: Option<PathBuf>,
    /// A display (and a keyboard and tablet with it), as the registry writes it: `[w, h]`
    /// (a fixed size) or `"monitor"` (the primary monitor's mode).
    display: Option<Value>,
    /// The record's `firstboot` (the user and settings the guest agent sets up).
    firstboot: Option<Value>,
    /// The record's `policy.on_shutdown` ("save" when absent).
    on_shutdown: Option<&'static str>,
    /// The record's `policy.network` ("off" when absent).
    network: Option<&'static str>,
}

impl Vm {
    fn new(name: &'static str, autostart: bool) -> Vm {
        Vm { id: new_uuid(), name, autostart, disk: true, bad_kernel: false, agent: true, boot: None, memory_mib: 128, disk_src: None, display: None, firstboot: None, on_shutdown: None, network: None }
    }

    fn record(&self) -> Value {
        let (kernel, initramfs, cmdline) = match &self.boot {
            Some(b) => b.clone(),
            None if self.bad_kernel => (format!("/data/vms/{}/not-a-kernel", self.id), None, String::new()),
            None => (
                "/data/images/vmlinuz".into(),
                Some("/data/images/devguest.img".into()),
                "console=ttyS0 panic=-1 devguest.interval_ms=250".into(),
            ),
        };
        let mut record = json!({
            "id": self.id,
            "name": self.name,
            "kind": "linux",
            "disks": [{"path": format!("/data/vms/{}/disk.img", self.id), "read_only": false}],
            "config": {
                "vcpus": 1,
                "memory_mib": self.memory_mib,
                "kernel": kernel,
                "initramfs": initramfs,
                "cmdline": cmdline,
                "display": self.display, "input": self.display.is_some(), "net_taps": [], "rng": false, "agent": self.agent
            },
            "policy": {"autostart_hidden": self.autostart, "restart": "on-failure"},
            "created_at": 1764000000u64,
            "last_booted_at": null
        });
        if let Some(fb) = &self.firstboot {
            record["firstboot"] = fb.clone();
        }
        if let Some(p) = self.on_shutdown {
            record["policy"]["on_shutdown"] = p.into();
        }
        if let Some(n) = self.network {
            record["policy"]["network"] = n.into();
        }
        record
    }
}

fn registry_json(vms: &[&Vm]) -> String {
    serde_json::to_string_pretty(&json!({"schema_version": 1, "vms": vms.iter().map(|v| v.record()).collect::<Vec<_>>()})).unwrap()
}

/// Builds the data disk: staging folder → ext4 (`mkfs.ext4 -d`) → GPT partition.
fn data_disk(dir: &Path, vms: &[&Vm], registry: &str, backup: Option<&str>) -> PathBuf {
    data_disk_sized(dir, vms, registry, backup, PART_SIZE)
}

fn data_disk_sized(dir: &Path, vms: &[&Vm], registry: &str, backup: Option<&str>, part_size: u64) -> PathBuf {
    let a = artifacts();
    let staging = dir.join("data-staging");
    let _ = std::fs::remove_dir_all(&staging);
    for d in ["registry", "images", "config", "logs"] {
        std::fs::create_dir_all(staging.join(d)).unwrap();
    }
    std::fs::copy(&a.kernel, staging.join("images/vmlinuz")).unwrap();
    let mut ird = Initramfs::new();
    ird.file("/init", &bins().join("rayos-devguest"), 0o755).unwrap();
    ird.write(&staging.join("images/devguest.img")).unwrap();
    for vm in vms {
        let d = staging.join("vms").join(&vm.id);
        std::fs::create_dir_all(&d).unwrap();
        match (&vm.disk_src, vm.disk) {
            (Some(src), _) => {
                // Sparse: the image is mostly holes.
                let st = Command::new("cp").arg("--sparse=always").arg(src).arg(d.join("disk.img")).status().unwrap();
                assert!(st.success());
            }
            (None, true) => std::fs::File::create(d.join("disk.img")).unwrap().set_len(1 << 20).unwrap(),
            (None, false) => {}
        }
        if vm.bad_kernel {
            std::fs::write(d.join("not-a-kernel"), b"this is not a bzImage").unwrap();
        }
    }
    std::fs::write(staging.join("registry/vms.json"), registry).unwrap();
    if let Some(b) = backup {
        std::fs::write(staging.join("registry/vms.json.bak"), b).unwrap();
    }
    let part = dir.join("data-part.img");
    let _ = std::fs::remove_file(&part);
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rayos-data", "-d"])
        .arg(&staging)
        .arg(&part)
        .arg(format!("{}k", part_size / 1024))
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 failed");

    let disk = dir.join("data-disk.img");
    let size = PART_START_LBA * 512 + part_size + (1 << 20);
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&disk).unwrap();
    f.set_len(size).unwrap();
    let mut gpt = gptman::GPT::new_from(&mut f, 512, guid_le(&new_uuid())).unwrap();
    gpt[1] = gptman::GPTPartitionEntry {
        partition_type_guid: guid_le(DATA_TYPE_GUID),
        unique_partition_guid: guid_le(&new_uuid()),
        starting_lba: PART_START_LBA,
        ending_lba: PART_START_LBA + part_size / 512 - 1,
        attribute_bits: 0,
        partition_name: "rayos-data".into(),
    };
    gpt.write_into(&mut f).unwrap();
    gptman::GPT::write_protective_mbr_into(&mut f, 512).unwrap();
    // Copy only the blocks that hold data: the disk file stays sparse.
    let mut src = std::fs::File::open(&part).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = src.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            f.seek(SeekFrom::Start(PART_START_LBA * 512 + off)).unwrap();
            f.write_all(&buf[..n]).unwrap();
        }
        off += n as u64;
    }
    f.flush().unwrap();
    let _ = std::fs::remove_file(&part);
    disk
}

/// Runs debugfs `script` (read-only unless `write`) on a copy of the data partition of `disk`
/// after QEMU is gone (no mount); with `write`, the edited partition is put back.
fn debugfs_on_data(disk: &Path, script: &str, write: bool) {
    let part = disk.with_extension("part-copy");
    let mut buf = vec![0u8; PART_SIZE as usize];
    {
        let mut f = std::fs::File::open(disk).unwrap();
        f.seek(SeekFrom::Start(PART_START_LBA * 512)).unwrap();
        f.read_exact(&mut buf).unwrap();
    }
    std::fs::write(&part, &buf).unwrap();
    let cmds = disk.with_extension("debugfs-cmds");
    std::fs::write(&cmds, script).unwrap();
    let mut cmd = Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    let out = cmd.arg("-f").arg(&cmds).arg(&part).output().unwrap();
    assert!(out.status.success(), "debugfs: {}", String::from_utf8_lossy(&out.stderr));
    if write {
        let edited = std::fs::read(&part).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
        f.seek(SeekFrom::Start(PART_START_LBA * 512)).unwrap();
        f.write_all(&edited).unwrap();
    }
    let _ = std::fs::remove_file(part);
    let _ = std::fs::remove_file(cmds);
}

/// Reads a file from the data partition of `disk` after QEMU is gone (debugfs, no mount).
fn read_data_file(disk: &Path, path: &str) -> Option<Vec<u8>> {
    let out_file = disk.with_extension("dump");
    let _ = std::fs::remove_file(&out_file);
    debugfs_on_data(disk, &format!("dump {path} {}\n", out_file.display()), false);
    let data = std::fs::read(&out_file).ok();
    let _ = std::fs::remove_file(&out_file);
    data
}

/// Replaces (or creates) `path` on the data partition of `disk` after QEMU is gone: as an
/// offline edit of the data volume would.
fn write_data_file(disk: &Path, path: &str, bytes: &[u8]) {
    let src = disk.with_extension("new-file");
    std::fs::write(&src, bytes).unwrap();
    let (dir, name) = path.rsplit_once('/').unwrap();
    debugfs_on_data(disk, &format!("cd {dir}\nrm {name}\nwrite {} {name}\n", src.display()), true);
    let _ = std::fs::remove_file(src);
}

/// Removes `files` from the folder `dir` on the data partition of `disk`, then the folder.
fn remove_data_files(disk: &Path, dir: &str, files: &[&str]) {
    let (parent, name) = dir.rsplit_once('/').unwrap();
    let rms: String = files.iter().map(|f| format!("rm {f}\n")).collect();
    debugfs_on_data(disk, &format!("cd {dir}\n{rms}cd {parent}\nrmdir {name}\n"), true);
}

fn boot(name: &str, disk_for: impl FnOnce(&Path) -> PathBuf) -> (Qemu, PathBuf) {
    boot_with(name, |b| b, disk_for)
}

fn boot_with(name: &str, tweak: impl FnOnce(QemuBuilder) -> QemuBuilder, disk_for: impl FnOnce(&Path) -> PathBuf) -> (Qemu, PathBuf) {
    let a = artifacts();
    let builder = tweak(Qemu::builder(name));
    let disk = disk_for(builder.workdir());
    let q = builder
        .direct_kernel(&a.kernel, &a.initramfs, "console=ttyS0,115200 panic=10 rayos.mode=installed")
        .nvme_disk(&disk, "RAYOS-DATA")
        .control_channel()
        .memory_mib(2048)
        .cpus(2)
        .spawn()
        .unwrap();
    (q, disk)
}

/// rayosctl's text output (no `--json`): what a user reads.
fn ctl_plain(q: &Qemu, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(rayosctl()).arg("--socket").arg(q.control_socket()).args(["--timeout", "30"]).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn vm_info(q: &Qemu, vm: &str) -> Value {
    ctl_ok(q, &["vm", "show", vm])
}

fn heartbeats(q: &Qemu, vm: &str) -> Vec<u64> {
    let v = ctl_ok(q, &["vm", "logs", vm, "-n", "400"]);
    v["serial"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("heartbeat ").and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()))
        .collect()
}

fn last_heartbeat(q: &Qemu, vm: &str) -> u64 {
    heartbeats(q, vm).last().copied().unwrap_or(0)
}

#[test]
fn vm_lifecycle_autostart_crashes_and_broken_disks() {
    let deb = Vm::new("deb", true);
    let mut gone = Vm::new("gone", true);
    gone.disk = false;
    let mut crashy = Vm::new("crashy", false);
    crashy.bad_kernel = true;
    let registry = registry_json(&[&deb, &gone, &crashy]);
    let (mut q, _disk) = boot("vm-lifecycle", |dir| data_disk(dir, &[&deb, &gone, &crashy], &registry, None));

    let ready = q.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("mode=installed"), "{ready}");
    q.wait_for("vm deb: autostart (hidden)", BOOT_TIMEOUT).unwrap();
    let init = q.wait_for("vm deb: guest init reached", GUEST_TIMEOUT).unwrap();
    // Benchmark: rayosd ready → the autostarted VM's guest init, on the kernel's clock.
    let out = Command::new(rayosctl()).arg("--socket").arg(q.control_socket()).args(["--json", "logs", "-n", "2000"]).output().unwrap();
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let at = |needle: &str| {
        records
            .iter()
            .find(|r| r["message"].as_str().is_some_and(|m| m.contains(needle)))
            .and_then(|r| r["uptime_ms"].as_u64())
            .unwrap_or_else(|| panic!("no log record with {needle:?}"))
    };
    let (ready_ms, init_ms) = (at("ready mode=installed"), at("vm deb: guest init reached"));
    eprintln!("bench: rayosd ready → deb guest init at boot: {} ms ({init})", init_ms - ready_ms);
    assert!(init_ms >= ready_ms);

    // Autostart: deb runs and its guest beats; gone is broken and says why; crashy (not
    // autostart) stays stopped.
    let list = ctl_ok(&q, &["vm", "list"]);
    let by_name = |n: &str| list["vms"].as_array().unwrap().iter().find(|v| v["name"] == n).cloned().unwrap();
    assert_eq!(by_name("deb")["state"], "running", "{list}");
    assert_eq!(by_name("deb")["id"], deb.id.as_str(), "the registry's UUID is the VM's");
    assert_eq!(by_name("gone")["state"], "broken", "{list}");
    let detail = by_name("gone")["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("disk image missing") && detail.contains(&gone.id), "{detail}");
    assert_eq!(by_name("crashy")["state"], "stopped", "{list}");
    let t = Instant::now();
    while last_heartbeat(&q, "deb") < 3 {
        assert!(t.elapsed() < GUEST_TIMEOUT, "no heartbeats from deb: {}", ctl(&q, &["vm", "logs", "deb"]).2);
        std::thread::sleep(Duration::from_millis(500));
    }
    // The guest agent reports ready and beats on its virtio-console port.
    q.wait_for("vm deb: guest agent ready", GUEST_TIMEOUT).unwrap();
    let a1 = wait_vm(&q, "deb", "agent heartbeats", Duration::from_secs(30), |v| v["agent_ready"] == true && v["agent_heartbeat"].as_u64() > Some(2));
    eprintln!("agent: ready, heartbeat {}", a1["agent_heartbeat"]);

    // Pause: the heartbeats stop; resume: they go on.
    ctl_ok(&q, &["vm", "pause", "deb"]);
    wait_vm(&q, "deb", "paused", Duration::from_secs(10), |v| v["state"] == "paused");
    std::thread::sleep(Duration::from_millis(500));
    let h_paused = last_heartbeat(&q, "deb");
    let agent_paused = vm_info(&q, "deb")["agent_heartbeat"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(last_heartbeat(&q, "deb"), h_paused, "heartbeats went on while paused");
    assert_eq!(vm_info(&q, "deb")["agent_heartbeat"].as_u64().unwrap(), agent_paused, "agent heartbeats went on while paused");
    ctl_ok(&q, &["vm", "resume", "deb"]);
    wait_vm(&q, "deb", "running", Duration::from_secs(10), |v| v["state"] == "running");
    let t = Instant::now();
    while last_heartbeat(&q, "deb") <= h_paused + 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "heartbeats did not resume");
        std::thread::sleep(Duration::from_millis(300));
    }

    // Stop: the guest sees the power button and powers off; start: it boots again.
    ctl_ok(&q, &["vm", "stop", "deb"]);
    wait_vm(&q, "deb", "stopped", Duration::from_secs(60), |v| v["state"] == "stopped");
    let serial = ctl_ok(&q, &["vm", "logs", "deb", "-n", "400"])["serial"].as_str().unwrap().to_string();
    // The agent's shutdown request or the ACPI power button, whichever the guest saw first.
    assert!(
        serial.contains("devguest: shutdown requested on the agent port, powering off") || serial.contains("devguest: power button, powering off"),
        "the guest did not see the stop:\n{serial}"
    );
    let (code, _, text) = ctl(&q, &["vm", "pause", "deb"]);
    assert_eq!(code, 8, "pausing a stopped VM is refused (exit 8): {text}");
    assert!(text.contains("only a running VM can be paused"), "{text}");
    let (code, _, text) = ctl(&q, &["vm", "start", "no-such-vm"]);
    assert_eq!(code, 7, "an unknown VM is exit 7: {text}");

    // Start, waiting for guest init: the benchmark of `rayosctl vm start` → guest init.
    let started = ctl_ok(&q, &["vm", "start", "deb", "--wait", "180"]);
    let (vmm_ms, total_ms) = (started["guest_init_ms"].as_u64().unwrap(), started["start_to_init_ms"].as_u64().unwrap());
    let wall_ms = started["rayosctl_wall_ms"].as_u64().unwrap();
    eprintln!(
        "bench: rayosctl vm start → guest init: {total_ms} ms (VMM's own start → init {vmm_ms} ms; supervisor adds {} ms; rayosctl wall {wall_ms} ms)",
        total_ms.saturating_sub(vmm_ms),
    );
    // rayosd's start → init figure is checked against rayosctl's own clock, which ran from
    // before the start request until it saw init: it must fit inside that, and not be far
    // short of it (rayosd notices the boot timer within 20 ms, rayosctl polls it; 5 s covers
    // a loaded nested host, a figure that left out the supervisor's part or the boot does not).
    assert!(vmm_ms > 0 && total_ms >= vmm_ms, "{started}");
    assert!(total_ms <= wall_ms, "rayosd says init came {total_ms} ms after the request, but rayosctl saw it after {wall_ms} ms: {started}");
    assert!(wall_ms - total_ms < 5000, "rayosctl waited {wall_ms} ms for init that rayosd dates at {total_ms} ms after the request: {started}");
    let t = Instant::now();
    // The VMM starts a new serial log per run: a fresh boot counts from 1 again.
    while !heartbeats(&q, "deb").first().is_some_and(|n| *n == 1) || last_heartbeat(&q, "deb") < 3 {
        assert!(t.elapsed() < GUEST_TIMEOUT, "no heartbeats after the restart: {:?}", heartbeats(&q, "deb"));
        std::thread::sleep(Duration::from_millis(500));
    }

    // kill -9 of the VMM: logged, failed, restarted (new pid, restarts = 1).
    let before = wait_vm(&q, "deb", "running", Duration::from_secs(30), |v| v["state"] == "running");
    let old_pid = before["pid"].as_u64().unwrap();
    let k = ctl_ok(&q, &["vm", "kill", "deb", "--signal", "KILL"]);
    assert_eq!(k["signalled"], true);
    q.wait_for("vm deb: failed (VMM killed by signal 9 (SIGKILL); restarting in", Duration::from_secs(30)).unwrap();
    let after = wait_vm(&q, "deb", "restarted", Duration::from_secs(60), |v| v["state"] == "running" && v["pid"].as_u64() != Some(old_pid));
    assert_eq!(after["restarts"], before["restarts"].as_u64().unwrap() + 1);

    // A VMM that fails at every start: restarted with backoff, then a crash loop, reported.
    ctl_ok(&q, &["vm", "start", "crashy"]);
    let cl = wait_vm(&q, "crashy", "crash-loop", Duration::from_secs(120), |v| v["state"] == "crash-loop");
    assert!(cl["detail"].as_str().unwrap().contains("crashed 5 times"), "{cl}");
    let list = ctl_ok(&q, &["vm", "list"]);
    let problems = list["problems"].to_string();
    assert!(problems.contains("VM crashy: crash loop"), "{problems}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(vm_info(&q, "crashy")["state"], "crash-loop", "a crash-looping VM was restarted");
    // The others still run.
    assert_eq!(vm_info(&q, "deb")["state"], "running");

    // Orderly power-off saves the running VM first (its policy's default), then RayOS goes down.
    ctl_ok(&q, &["poweroff"]);
    q.wait_for("vm deb: saved (generation 1", Duration::from_secs(90)).unwrap();
    q.wait_exit(Duration::from_secs(60)).unwrap();
}

/// A saved state that is damaged, or whose disk was edited while RayOS was off, is refused
/// by name: the VM boots from its disk, the state is kept aside, the disk is left as it is.
/// A save without room for it shuts the guest down instead.
#[test]
fn a_damaged_state_or_an_edited_disk_is_refused_by_name_and_the_vm_boots_afresh() {
    let vm = Vm::new("counter", true);
    let registry = registry_json(&[&vm]);
    let (mut q, disk) = boot("vm-refused", |dir| data_disk(dir, &[&vm], &registry, None));
    let beating = |q: &mut Qemu, first_boot: bool| {
        q.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
        let t = Instant::now();
        while (first_boot && heartbeats(q, "counter").first() != Some(&1)) || last_heartbeat(q, "counter") < 4 {
            assert!(t.elapsed() < GUEST_TIMEOUT, "counter does not beat (from 1: {first_boot}): {:?}", heartbeats(q, "counter"));
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let power_off = |q: &mut Qemu, expect: &str| -> String {
        let mark = q.log_len();
        ctl_ok(q, &["poweroff"]);
        let line = q.wait_for_line_after(mark, |l| l.contains(expect), expect, Duration::from_secs(120)).unwrap();
        q.wait_exit(Duration::from_secs(120)).unwrap();
        line
    };
    let dir = format!("/vms/{}", vm.id);
    beating(&mut q, true);
    power_off(&mut q, "vm counter: saved in");

    // One flipped bit in the middle of the state file.
    let state_path = format!("{dir}/saved-1/state.json");
    let mut state = read_data_file(&disk, &state_path).expect("the saved state is on the data volume");
    let mid = state.len() / 2;
    state[mid] ^= 0x01;
    write_data_file(&disk, &state_path, &state);
    let (mut q, _) = boot("vm-refused-2", |_| disk.clone());
    let refused = q.wait_for("vm counter: saved state generation 1 not resumed", GUEST_TIMEOUT).unwrap();
    eprintln!("refused: {refused}");
    assert!(
        (refused.contains("damaged") || refused.contains("state.json")) && refused.contains("saved-state.rejected-1"),
        "the refusal does not say why and where: {refused}"
    );
    beating(&mut q, true);
    assert!(ctl_ok(&q, &["vm", "list"])["problems"].to_string().contains("saved state not resumed"));
    // The kept state fills the small data volume: the next save has no room, and the guest
    // is shut down instead, cleanly.
    let no_room = power_off(&mut q, "vm counter: not saved");
    assert!(no_room.contains("not enough free space") && no_room.contains("shutting it down instead"), "{no_room}");
    let log = q.serial_log();
    assert!(log.contains("vm counter: stopped (the guest powered off)"), "the guest was not shut down cleanly");
    assert_eq!(
        read_data_file(&disk, &format!("{dir}/saved-state.rejected-1/state.json")).as_deref(),
        Some(&state[..]),
        "the refused state is kept aside as it was"
    );

    // The user removes the kept state; the VM is saved again (generation 2), then its disk is
    // written while RayOS is off.
    remove_data_files(&disk, &format!("{dir}/saved-state.rejected-1"), &["state.json", "memory"]);
    let (mut q, _) = boot("vm-refused-3", |_| disk.clone());
    beating(&mut q, true);
    power_off(&mut q, "vm counter: saved in");
    let edited = vec![0x5au8; 1 << 20];
    write_data_file(&disk, &format!("{dir}/disk.img"), &edited);
    let (mut q, _) = boot("vm-refused-4", |_| disk.clone());
    let refused = q.wait_for("vm counter: saved state generation 2 not resumed", GUEST_TIMEOUT).unwrap();
    eprintln!("refused: {refused}");
    assert!(refused.contains("disk.img") && refused.contains("changed since") && refused.contains("rejected-1"), "{refused}");
    beating(&mut q, true);
    // Stopped before the power-off, so that nothing is saved over what we check.
    ctl_ok(&q, &["vm", "stop", "counter", "--force"]);
    wait_vm(&q, "counter", "stopped", Duration::from_secs(60), |v| v["state"] == "stopped");
    ctl_ok(&q, &["poweroff"]);
    q.wait_exit(Duration::from_secs(120)).unwrap();
    assert_eq!(read_data_file(&disk, &format!("{dir}/disk.img")).map(|d| d == edited), Some(true), "the refusal left the disk as the user left it");
    assert!(read_data_file(&disk, &format!("{dir}/saved-state.rejected-1/state.json")).is_some(), "the refused state is kept");
}

/// `heartbeat N uptime_ms=U wall_ms=W` lines of a devguest's serial console, as (N, U, W).
fn beats(serial: &str) -> Vec<(u64, u64, u64)> {
    serial
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("heartbeat ")?.split_whitespace();
            let n = f.next()?.parse().ok()?;
            let u = f.next()?.strip_prefix("uptime_ms=")?.parse().ok()?;
            let w = f.next()?.strip_prefix("wall_ms=")?.parse().ok()?;
            Some((n, u, w))
        })
        .collect()
}

/// The VM's whole serial console log (up to 10000 lines): a resumed guest's log goes on from
/// before the reboot.
fn whole_serial(q: &Qemu, vm: &str) -> String {
    ctl_ok(q, &["vm", "logs", vm, "-n", "10000"])["serial"].as_str().unwrap_or_default().to_string()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// RayOS reboots, the VM does not: a guest that counts keeps counting across a RayOS reboot,
/// its uptime goes on, and its wall clock is set right again; a VM whose policy is
/// `shutdown` boots afresh. A power cut after the resume cold-boots the VM at the next boot:
/// a saved state is used at most once. A power cut during a save cold-boots it too. A fresh
/// start discards a saved state only when confirmed.
#[test]
fn vm_lives_through_a_rayos_reboot_and_a_power_cut_after_the_resume_cold_boots_it() {
    let counter = Vm::new("counter", true);
    let mut plain = Vm::new("plain", true);
    plain.on_shutdown = Some("shutdown");
    let registry = registry_json(&[&counter, &plain]);
    let (mut q, disk) = boot("vm-resume", |dir| data_disk(dir, &[&counter, &plain], &registry, None));
    q.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    let t = Instant::now();
    while last_heartbeat(&q, "counter") < 12 || last_heartbeat(&q, "plain") < 3 {
        assert!(t.elapsed() < GUEST_TIMEOUT, "no heartbeats: {:?} {:?}", heartbeats(&q, "counter"), heartbeats(&q, "plain"));
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_vm(&q, "counter", "agent ready", Duration::from_secs(60), |v| v["agent_ready"] == true);
    let before = beats(whole_serial(&q, "counter").as_str());
    let &(n1, up1, _) = before.last().unwrap();
    assert_eq!(vm_info(&q, "counter")["on_shutdown"], "save");
    assert_eq!(vm_info(&q, "plain")["on_shutdown"], "shutdown");

    let mark = q.log_len();
    let t_reboot = Instant::now();
    ctl_ok(&q, &["reboot"]);
    let saved = q.wait_for_line_after(mark, |l| l.contains("vm counter: saved in"), "the save", Duration::from_secs(120)).unwrap();
    eprintln!("resume: {saved}");
    q.wait_for_line_after(mark, |l| l.contains("vm plain: stopping it for the shutdown"), "plain's stop", Duration::from_secs(30)).unwrap();
    q.wait_for_line_after(mark, |l| l.contains("rayosd: ready"), "second ready", BOOT_TIMEOUT).unwrap();
    let resumed = q
        .wait_for_line_after(mark, |l| l.contains("vm counter: resumed from saved state (generation 1"), "the resume", GUEST_TIMEOUT)
        .unwrap();
    eprintln!("resume: {resumed} ({:?} after the reboot request)", t_reboot.elapsed());

    // It goes on counting from where it was: the same boot, its uptime continued.
    let t = Instant::now();
    while last_heartbeat(&q, "counter") < n1 + 8 || !whole_serial(&q, "counter").contains("clock set by the host") {
        assert!(t.elapsed() < GUEST_TIMEOUT, "the resumed guest does not beat or its clock was not set:\n{}", whole_serial(&q, "counter"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let host_before = unix_ms();
    let serial = whole_serial(&q, "counter");
    let host_after = unix_ms();
    assert_eq!(serial.matches("devguest: init").count(), 1, "the guest booted again instead of resuming:\n{serial}");
    let after: Vec<_> = beats(&serial).into_iter().filter(|b| b.0 > n1).collect();
    let first = after.first().unwrap_or_else(|| panic!("no heartbeat after {n1}:\n{serial}"));
    // A heartbeat line cut by the save is lost at most.
    assert!(first.0 <= n1 + 2, "the count jumped from {n1} to {}:\n{serial}", first.0);
    assert!(first.1 > up1, "the guest's uptime went back from {up1} to {} ms", first.1);
    let behind = serial.lines().find_map(|l| l.split("clock set by the host: it was ").nth(1)).unwrap().to_string();
    eprintln!("resume: the guest's clock was {behind}");
    // Its wall clock now: the last heartbeat was printed between our two readings, less the
    // beat interval (250 ms) and the time the logs took to come back.
    let &(_, _, wall) = after.last().unwrap();
    assert!(
        wall + 1000 + 250 >= host_before.saturating_sub(host_after - host_before) && wall <= host_after + 1000,
        "the resumed guest's wall clock is off: it says {wall}, the host {host_before}..{host_after}"
    );
    assert_eq!(vm_info(&q, "counter")["saved_generation"], 0, "a resumed state is used up");
    // plain's policy is shutdown: it was stopped and booted afresh (a new log, counting from 1).
    let t = Instant::now();
    while !heartbeats(&q, "plain").first().is_some_and(|n| *n == 1) {
        assert!(t.elapsed() < GUEST_TIMEOUT, "plain did not boot afresh: {:?}", heartbeats(&q, "plain"));
        std::thread::sleep(Duration::from_millis(500));
    }

    // Power cut after the resume: the state was used up before the guest ran, so the next
    // boot boots the VM from its disk.
    q.kill();
    drop(q);
    let (mut q, _) = boot("vm-resume-cut", |_| disk.clone());
    q.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    let t = Instant::now();
    while last_heartbeat(&q, "counter") < 2 {
        assert!(t.elapsed() < GUEST_TIMEOUT, "counter did not boot: {:?}", heartbeats(&q, "counter"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let serial = whole_serial(&q, "counter");
    assert_eq!(heartbeats(&q, "counter").first(), Some(&1), "after a power cut the VM boots afresh:\n{serial}");
    assert!(!q.serial_log().contains("resumed from saved state"), "a used-up state was resumed again");

    // Power cut during a save: QEMU is killed as soon as the save begins. The registry never
    // recorded it, so the next boot boots the VM from its disk and tidies what was written.
    let sock = q.control_socket();
    let save = std::thread::spawn(move || {
        Command::new(rayosctl()).arg("--socket").arg(sock).args(["--json", "--timeout", "30", "vm", "save", "counter"]).output()
    });
    q.wait_for("vm counter: saving to", Duration::from_secs(60)).unwrap();
    q.kill();
    drop(q);
    let _ = save.join();
    let (mut q, _) = boot("vm-resume-cut-save", |_| disk.clone());
    q.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    let t = Instant::now();
    while last_heartbeat(&q, "counter") < 2 {
        assert!(t.elapsed() < GUEST_TIMEOUT, "counter did not boot: {:?}", heartbeats(&q, "counter"));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(heartbeats(&q, "counter").first(), Some(&1), "after a power cut during a save the VM boots afresh");
    let log = q.serial_log();
    assert!(!log.contains("resumed from saved state"), "a save cut short was resumed");
    let tidied = log.lines().find(|l| l.contains("a save that did not finish") || l.contains("is not the one the registry records"));
    eprintln!("resume: after the cut save: {}", tidied.unwrap_or("nothing of the save had reached the disk"));
    assert_eq!(vm_info(&q, "counter")["saved_generation"], 0, "a cut save is not a saved state");

    // A fresh start discards a saved state only when confirmed.
    let said = ctl_ok(&q, &["vm", "save", "counter"]);
    eprintln!("resume: {said}");
    let saved = wait_vm(&q, "counter", "saved", Duration::from_secs(60), |v| v["state"] == "saved");
    assert!(saved["saved_generation"].as_u64() > Some(0), "{saved}");
    let (code, _, text) = ctl(&q, &["vm", "fresh-start", "counter"]);
    assert_ne!(code, 0, "a fresh start without a confirmation went ahead: {text}");
    assert!(text.contains("confirm with --yes"), "{text}");
    assert_eq!(vm_info(&q, "counter")["saved_generation"], saved["saved_generation"], "an unconfirmed fresh start touched the state");
    ctl_ok(&q, &["vm", "fresh-start", "counter", "--yes"]);
    wait_vm(&q, "counter", "running", Duration::from_secs(60), |v| v["state"] == "running");
    assert_eq!(vm_info(&q, "counter")["saved_generation"], 0, "a confirmed fresh start discards the state");
    let t = Instant::now();
    while heartbeats(&q, "counter").first() != Some(&1) || last_heartbeat(&q, "counter") < 2 {
        assert!(t.elapsed() < GUEST_TIMEOUT, "counter did not boot afresh: {:?}", heartbeats(&q, "counter"));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(q.serial_log().contains("fresh start: saved state generation"), "the discard is not logged");
    ctl_ok(&q, &["poweroff"]);
    q.wait_exit(Duration::from_secs(120)).unwrap();
}

#[test]
fn vm_registry_survives_reboot_and_a_corrupt_registry_falls_back_to_the_backup() {
    let keep = Vm::new("keep", false);
    let lost = Vm::new("lost", false);
    let good = registry_json(&[&keep]);
    let newer = registry_json(&[&keep, &lost]);
    // A torn write of the newer registry; the backup holds the version before it.
    let corrupt = newer[..newer.len() / 2].to_string();
    let (mut q, disk) = boot("vm-registry", |dir| data_disk(dir, &[&keep, &lost], &corrupt, Some(&good)));
    q.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    let report = q.wait_for("is unreadable", Duration::from_secs(5)).unwrap();
    assert!(report.contains("vms.json.corrupt-1") && report.contains("backup"), "{report}");

    let list = ctl_ok(&q, &["vm", "list"]);
    let problems = list["problems"].to_string();
    assert!(problems.contains("corrupt-1") && problems.contains("backup"), "the report is not visible in vm list: {list}");
    let vms = list["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{list}");
    assert_eq!(vms[0]["id"], keep.id.as_str());

    // A VM created now survives the reboot with its UUID.
    let created = ctl_ok(
        &q,
        &["vm", "create", "fresh", "--kernel", "/data/images/vmlinuz", "--initramfs", "/data/images/devguest.img", "--memory-mib", "128"],
    );
    let fresh_id = created["id"].as_str().unwrap().to_string();
    let mark = q.log_len();
    ctl_ok(&q, &["reboot"]);
    q.wait_for_line_after(mark, |l| l.contains("rayosd: ready"), "second ready", BOOT_TIMEOUT).unwrap();
    let list = ctl_ok(&q, &["vm", "list"]);
    let mut ids: Vec<String> = list["vms"].as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    let mut want = vec![keep.id.clone(), fresh_id.clone()];
    want.sort();
    assert_eq!(ids, want, "{list}");
    assert_eq!(list["problems"].as_array().map(|p| p.len()), Some(0), "the registry was repaired: {list}");

    ctl_ok(&q, &["poweroff"]);
    q.wait_exit(Duration::from_secs(60)).unwrap();
    // The corrupt file is kept, byte for byte; the live registry and its backup are valid.
    let kept = read_data_file(&disk, "/registry/vms.json.corrupt-1").expect("vms.json.corrupt-1 on the data volume");
    assert_eq!(kept, corrupt.as_bytes());
    let live: Value = serde_json::from_slice(&read_data_file(&disk, "/registry/vms.json").unwrap()).unwrap();
    assert_eq!(live["schema_version"], 1);
    assert_eq!(live["vms"].as_array().unwrap().len(), 2);
    let bak: Value = serde_json::from_slice(&read_data_file(&disk, "/registry/vms.json.bak").unwrap()).unwrap();
    assert_eq!(bak["vms"].as_array().unwrap().len(), 1, "the backup is the version before the create");
}

/// What the screenshot shows against the console's text: the background (the most common
/// colour), how many pixels differ from it, and which text rows have any such pixel.
fn lit_rows(w: usize, h: usize, px: &[u8], rows: usize) -> (u32, usize, Vec<bool>) {
    let colour = |i: usize| u32::from_be_bytes([0, px[3 * i], px[3 * i + 1], px[3 * i + 2]]);
    let mut counts = std::collections::HashMap::new();
    for i in 0..w * h {
        *counts.entry(colour(i)).or_insert(0usize) += 1;
    }
    let bg = counts.iter().max_by_key(|(_, n)| **n).map(|(c, _)| *c).unwrap();
    let cell_h = h / rows;
    let mut lit = 0;
    let mut by_row = vec![false; rows];
    for y in 0..cell_h * rows {
        for x in 0..w {
            if colour(y * w + x) != bg {
                lit += 1;
                by_row[y / cell_h] = true;
            }
        }
    }
    (bg, lit, by_row)
}

/// The screenshot check itself, on made-up frames: it must tell a console's picture from a
/// blank or a shifted one (no QEMU needed).
#[test]
fn the_screenshot_check_finds_the_lit_text_rows() {
    let (w, h, rows) = (16, 12, 3);
    let mut px = vec![0u8; w * h * 3];
    // Row 1 (pixels 4..8) has a "glyph" of grey pixels.
    for y in 5..7 {
        for x in 2..6 {
            px[3 * (y * w + x)..3 * (y * w + x) + 3].copy_from_slice(&[0xaa, 0xaa, 0xaa]);
        }
    }
    let (bg, lit, by_row) = lit_rows(w, h, &px, rows);
    assert_eq!((bg, lit, by_row), (0, 8, vec![false, true, false]));
    assert_eq!(lit_rows(w, h, &vec![0u8; w * h * 3], rows), (0, 0, vec![false; 3]), "a blank frame lights nothing");
    // A white background with dark text: the background is whatever is most common.
    let inv: Vec<u8> = px.iter().map(|b| 0xff - b).collect();
    assert_eq!(lit_rows(w, h, &inv, rows).1, 8);

    let path = std::env::temp_dir().join(format!("rayos-ppm-{}.ppm", std::process::id()));
    std::fs::write(&path, [format!("P6\n{w} {h}\n255\n").into_bytes(), px.clone()].concat()).unwrap();
    assert_eq!(read_ppm(&path), (w, h, px));
    let _ = std::fs::remove_file(&path);
}

/// The Linux user the test's installer chose: its password and that password's SHA-512
/// crypt hash (python3 `crypt.crypt(PASSWORD, "$6$rayostestsalt$")`), as the record keeps it.
const LINUX_USER: &str = "alice";
const LINUX_PASSWORD: &str = "Tr0ub4dor&3";
const LINUX_PASSWORD_HASH: &str =
    "$6$rayostestsalt$IU/hlK7ZQjeRIP2O3MMET0d1BP6g7JyoiNZtxu8C2NioljB5lphidcPuoRBJAqnnirtwi73pKAcnpwLxKQSzT/";
/// No daylight saving time: `date +%Z` says JST all year.
const LINUX_TIMEZONE: &str = "Asia/Tokyo";
const LINUX_LOCALE: &str = "en_GB.UTF-8";

fn serial_of(q: &Qemu, vm: &str) -> String {
    ctl_ok(q, &["vm", "logs", vm, "-n", "400"])["serial"].as_str().unwrap_or_default().to_string()
}

/// Waits until the VM's serial console output satisfies `pred`; returns that output.
fn wait_serial(q: &Qemu, vm: &str, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let serial = serial_of(q, vm);
        if pred(&serial) {
            return serial;
        }
        assert!(t.elapsed() < timeout, "{what}: not on the serial console after {timeout:?}:\n{serial}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Types a line on the VM's serial console, as a user at a terminal would.
fn type_line(q: &Qemu, vm: &str, text: &str) {
    ctl_ok(q, &["vm", "type", vm, text, "--enter", "--serial"]);
}

/// The first-boot setup (the record's `firstboot`) was done by the guest agent: the login on
/// the serial console takes the chosen user and password, root with an empty password is
/// refused, and the guest runs in the chosen time zone and locale.
fn first_boot_user_logs_in_and_root_is_refused(q: &Qemu) {
    let t = Instant::now();
    let v = wait_vm(q, "debian", "first-boot setup done", Duration::from_secs(300), |v| {
        v["firstboot"].as_str().is_some_and(|f| !f.starts_with("pending"))
    });
    assert!(v["firstboot"].as_str().unwrap().starts_with("done (user alice"), "the first-boot setup did not succeed: {v}");
    eprintln!("debian: first-boot setup done after {:?}: {}", t.elapsed(), v["firstboot"]);
    let count = |s: &str, what: &str| s.matches(what).count();

    // Root, empty password: refused (before the setup, root logged in with no password asked).
    let before = serial_of(q, "debian");
    let (prompts, refusals) = (count(&before, "rayos-linux login:"), count(&before, "Login incorrect"));
    type_line(q, "debian", "root");
    // A locked root still gets the password question; an open one gets a shell at once.
    let s = wait_serial(q, "debian", "the password question for root", Duration::from_secs(60), |s| {
        s.contains("Password:") || s.contains("root@rayos-linux")
    });
    assert!(!s.contains("root@rayos-linux"), "root logged in without a password:\n{s}");
    type_line(q, "debian", "");
    let s = wait_serial(q, "debian", "root refused and the login asked again", Duration::from_secs(90), |s| {
        s.contains("root@rayos-linux") || (count(s, "Login incorrect") > refusals && count(s, "rayos-linux login:") > prompts)
    });
    assert!(!s.contains("root@rayos-linux"), "root logged in with an empty password:\n{s}");

    // The chosen user, with the chosen password: a shell, in the sudo group.
    let (prompts, passwords) = (count(&s, "rayos-linux login:"), count(&s, "Password:"));
    type_line(q, "debian", LINUX_USER);
    wait_serial(q, "debian", "the password question", Duration::from_secs(60), |s| count(s, "Password:") > passwords);
    type_line(q, "debian", LINUX_PASSWORD);
    let s = wait_serial(q, "debian", "a shell for the user", Duration::from_secs(90), |s| {
        s.contains("alice@rayos-linux:~$") || count(s, "rayos-linux login:") > prompts
    });
    assert!(s.contains("alice@rayos-linux:~$"), "the user's login was refused:\n{s}");
    // The quotes keep the typed command line (echoed back) from matching the answer.
    type_line(q, "debian", r#"echo "CHE""CK zone=$(cat /etc/timezone) abbr=$(date +%Z) lang=$LANG groups=$(id -nG)"; exit"#);
    let s = wait_serial(q, "debian", "the user's check line", Duration::from_secs(60), |s| s.contains("CHECK zone="));
    // From the marker on: bash may put terminal modes (bracketed paste off, `ESC[?2004l`)
    // and a CR before its command's output on the same line.
    let line = s.lines().find_map(|l| l.find("CHECK zone=").map(|at| l[at..].trim().to_string())).unwrap();
    assert_eq!(line, format!("CHECK zone={LINUX_TIMEZONE} abbr=JST lang={LINUX_LOCALE} groups=alice sudo"), "{s}");
    eprintln!("debian: {line}");
}

/// The default Linux guest (Debian bookworm + sysvinit + the RayOS guest agent, built by
/// `rootfs_builder::guest`) autostarts under the supervisor in a real RayOS, its agent reports
/// ready, its serial console and its display (tty1) each offer a login, the first-boot setup
/// makes that login the chosen user's (root refused), and a stop shuts it down cleanly.
#[test]
fn vm_default_debian_guest_boots_to_a_login() {
    let guest = rootfs_builder::guest::ensure_default_linux_guest().expect("building the default Linux guest");
    let mut debian = Vm::new("debian", true);
    debian.memory_mib = 512;
    debian.disk_src = Some(guest.disk.clone());
    debian.boot = Some(("/data/images/vmlinuz".into(), None, guest.cmdline.clone()));
    // The display of `VmRecord::default_linux`.
    debian.display = Some(json!([1280, 800]));
    // What the installer records for the default Linux VM (the wizard's user and settings).
    debian.firstboot = Some(json!({
        "setup": {
            "user": LINUX_USER,
            "password_hash": LINUX_PASSWORD_HASH,
            "timezone": LINUX_TIMEZONE,
            "locale": LINUX_LOCALE,
            "keymap": "us"
        },
        "state": "pending"
    }));
    let registry = registry_json(&[&debian]);
    let (mut q, _disk) = boot("vm-debian", |dir| data_disk_sized(dir, &[&debian], &registry, None, BIG_PART_SIZE));
    q.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    q.wait_for("vm debian: autostart (hidden)", BOOT_TIMEOUT).unwrap();
    // The agent's boot-timer write comes when init starts it: "guest init" here is the
    // agent's start, later than the kernel's init.
    let init = q.wait_for("vm debian: guest init reached", Duration::from_secs(600)).unwrap();
    eprintln!("debian: {init}");
    q.wait_for("vm debian: guest agent ready", Duration::from_secs(120)).unwrap();
    let t = Instant::now();
    loop {
        let serial = ctl_ok(&q, &["vm", "logs", "debian", "-n", "400"])["serial"].as_str().unwrap_or_default().to_string();
        if serial.contains("rayos-linux login:") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "no login prompt on the serial console:\n{serial}");
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("debian: serial login prompt after {:?}", t.elapsed());

    // The display: the text of tty1 (read by the guest agent) has the login prompt…
    let t = Instant::now();
    let text_of = |v: &Value| v["text"].as_str().unwrap_or_default().to_string();
    loop {
        let (code, v, out) = ctl(&q, &["vm", "screen", "debian"]);
        if code == 0 && text_of(&v).lines().any(|l| l.trim_end().ends_with("rayos-linux login:")) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no login prompt on the display console (tty1):\n{}", if code == 0 { text_of(&v) } else { out });
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("debian: tty1 login prompt after {:?} more", t.elapsed());
    first_boot_user_logs_in_and_root_is_refused(&q);
    // …and the framebuffer really shows that console: pixels lit in exactly the text rows
    // that have characters (the cursor's row may be lit without any). Text and picture are
    // compared only when the text did not change around the screenshot.
    let shot = q.workdir().join("debian-display.ppm");
    let shot_arg = shot.to_str().unwrap().to_string();
    let mut tries = 0;
    loop {
        tries += 1;
        let before = ctl_ok(&q, &["vm", "screen", "debian"]);
        let ts = Instant::now();
        let info = ctl_ok(&q, &["vm", "screenshot", "debian", &shot_arg]);
        let shot_ms = ts.elapsed().as_millis();
        let after = ctl_ok(&q, &["vm", "screen", "debian"]);
        if text_of(&before) != text_of(&after) {
            assert!(tries < 5, "tty1 kept changing around the screenshots:\n{}", text_of(&after));
            continue;
        }
        let (w, h, px) = read_ppm(&shot);
        assert_eq!((info["width"].as_u64(), info["height"].as_u64()), (Some(w as u64), Some(h as u64)));
        // The configured size: the VMM announces it as the preferred mode (EDID).
        assert_eq!((w, h), (1280, 800), "the guest did not take the display's preferred mode");
        let rows = after["rows"].as_u64().unwrap() as usize;
        let cursor_row = after["cursor_y"].as_u64().unwrap() as usize;
        let text = text_of(&after);
        let has_text: Vec<bool> = (0..rows).map(|r| text.lines().nth(r).is_some_and(|l| !l.trim().is_empty())).collect();
        let (bg, lit, lit_by_row) = lit_rows(w, h, &px, rows);
        let chars = text.chars().filter(|c| !c.is_whitespace()).count();
        eprintln!("debian: screenshot {w}x{h} in {shot_ms} ms: background {bg:06x}, {lit} lit pixels, {chars} characters on {rows} rows");
        // A glyph of the 8x16 console font lights 10-40 pixels; 5 per character is a floor.
        assert!(lit >= 5 * chars && chars > 20, "the display is (nearly) blank: {lit} lit pixels for {chars} characters of text:\n{text}");
        let wrong: Vec<usize> = (0..rows).filter(|&r| lit_by_row[r] != has_text[r] && !(r == cursor_row && lit_by_row[r])).collect();
        assert!(
            wrong.is_empty(),
            "the display does not show tty1: rows {wrong:?} differ (lit: {lit_by_row:?}); screenshot {}; text:\n{text}",
            shot.display()
        );
        break;
    }
    keyboard_reaches_only_the_presented_vm(&mut q);

    ctl_ok(&q, &["vm", "stop", "debian"]);
    let v = wait_vm(&q, "debian", "stopped", Duration::from_secs(300), |v| v["state"] == "stopped");
    assert_eq!(v["detail"], "the guest powered off", "not a clean power-off: {v}");
    ctl_ok(&q, &["poweroff"]);
    q.wait_exit(Duration::from_secs(60)).unwrap();
}

/// The machine's USB keyboard (QMP) types into the Debian VM's tty1 login only while it is
/// presented: keys pressed on the home screen never reach it, the return combo (pressed with
/// Ctrl held) is not delivered and leaves no modifier stuck in the guest.
fn keyboard_reaches_only_the_presented_vm(q: &mut Qemu) {
    keyboard_checks(q);
}

fn keyboard_checks(q: &mut Qemu) {
    let screen = |q: &Qemu| ctl_ok(q, &["vm", "screen", "debian"])["text"].as_str().unwrap_or_default().to_string();
    let wait_text = |q: &Qemu, what: &str| {
        let t = Instant::now();
        loop {
            let text = screen(q);
            if text.contains(what) {
                return text;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "{what:?} never reached the guest's tty1:\n{text}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    // At home the monitor shows the home screen, not the guest.
    let home = monitor_vs_vm(q, "debian");
    assert!(home.is_none_or(|(n, _, _)| n > 10_000), "the home screen looks like the guest's display: {home:?}");
    ctl_ok(q, &["present", "debian"]);
    // The compositor shows the guest's own screen (its tty1 login prompt), 1:1.
    wait_monitor_shows(q, "debian");
    q.type_text("seenkeys").unwrap();
    wait_text(q, "login: seenkeys");

    q.press(&["ctrl", "alt", "home"]).unwrap();
    let t = Instant::now();
    while ctl_ok(q, &["presented"])["presented"] != "" {
        assert!(t.elapsed() < Duration::from_secs(30), "Ctrl+Alt+Home did not return home");
        std::thread::sleep(Duration::from_millis(300));
    }
    q.type_text("lostkeys").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let text = screen(q);
    assert!(!text.contains("lostkeys"), "keys typed on the home screen reached the hidden VM:\n{text}");

    ctl_ok(q, &["present", "debian"]);
    wait_monitor_shows(q, "debian");
    // With Ctrl stuck from the combo these would be Ctrl+A, Ctrl+B, Ctrl+C.
    q.type_text("abc").unwrap();
    wait_text(q, "login: seenkeysabc");
    // What the guest drew while presented reaches the monitor (the VMM's dirty log of its
    // framebuffer, not a full redraw on presenting).
    wait_monitor_shows(q, "debian");

    // A USB keyboard plugged in while the VM is presented, the first one unplugged: the new
    // one's keys still reach the VM (QEMU sends QMP keys to the keyboard that remains).
    q.qmp("device_add", json!({ "driver": "usb-kbd", "bus": "xhci.0", "id": "kbd1" })).unwrap();
    q.qmp("device_del", json!({ "id": "kbd0" })).unwrap();
    let t = Instant::now();
    loop {
        q.type_text("x").unwrap();
        if screen(q).contains("seenkeysabcx") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "keys of a hot-plugged keyboard never reached the presented VM:\n{}", screen(q));
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("debian: a hot-plugged keyboard reached it after {:?}", t.elapsed());
    ctl_ok(q, &["hide"]);
}

/// The compositor's screen, as the user at the monitor sees it (QMP screendump, read by OCR
/// and by the compositor's own layout lines) and drives it (QMP keyboard): the home screen
/// lists the VMs with their states; `rayosctl present` shows a VM's own display full screen
/// (here the devguest's heartbeats on its tty0); Ctrl+Alt+Home returns home; a VM without a
/// display is refused by name; a killed compositor is restarted and the VMs run on.
#[test]
fn compositor_home_screen_present_and_hide() {
    let mut work = Vm::new("work", true);
    // It autostarts before the compositor runs: it waits for the compositor's report of the
    // monitor's mode and boots at it.
    work.display = Some(json!("monitor"));
    // Its user space writes to /dev/console = the last console: its own screen (tty0).
    work.boot = Some((
        "/data/images/vmlinuz".into(),
        Some("/data/images/devguest.img".into()),
        "console=ttyS0 console=tty0 panic=-1 devguest.interval_ms=250".into(),
    ));
    let spare = Vm::new("spare", false);
    let registry = registry_json(&[&work, &spare]);
    let (mut q, _disk) = boot_with("compositor", |b| b.screen(1920, 1080), |dir| data_disk(dir, &[&work, &spare], &registry, None));
    q.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    wait_vm(&q, "work", "running with its agent", GUEST_TIMEOUT, |v| v["agent_ready"] == true);
    // The compositor says where it drew each VM; the screen must show the same.
    q.wait_for("layout home vm=spare", BOOT_TIMEOUT).unwrap();
    // It runs as its own user with no capabilities (rayosd gave it the screen's devices), and
    // still drew the home screen, reported the monitor and (below) shows a VM.
    let who = q.wait_for("compositor:  INFO running as uid", BOOT_TIMEOUT).unwrap();
    assert!(who.contains("running as uid 1999000001 gid 1999000001, effective capabilities 0000000000000000"), "{who}");
    // rayosd put the console in graphics mode for it (an unprivileged process cannot).
    q.wait_for("rayosd: display: the console is in graphics mode while the compositor holds the screen", BOOT_TIMEOUT).unwrap();
    assert!(!q.serial_log().contains("KDSETMODE"), "a console mode change failed");
    // "running" once the compositor has heard that the guest is up (until then the row says
    // "starting (hidden)").
    let home = q.wait_screen("running", Duration::from_secs(60)).unwrap();
    for text in ["work", "spare", "stopped"] {
        assert!(rayos_tests::ocr_contains(&home, text), "the home screen does not show {text:?}; OCR read:\n{home}");
    }
    assert_eq!(ctl_ok(&q, &["presented"])["presented"], "");

    // A VM without a display cannot be presented; nothing changes.
    let (code, _, out) = ctl(&q, &["present", "spare"]);
    assert_eq!(code, 8, "{out}");
    assert!(out.contains("VM spare has no display"), "{out}");

    ctl_ok(&q, &["present", "work"]);
    assert_eq!(ctl_ok(&q, &["presented"])["presented"], "work");
    // The VM's own screen: the devguest's heartbeat lines on its console.
    let shown = q.wait_screen("heartbeat", Duration::from_secs(60)).unwrap();
    assert!(!rayos_tests::ocr_contains(&shown, "spare"), "the home screen is still showing:\n{shown}");
    // Its display follows the 1920x1080 monitor: the guest runs at that mode and is shown
    // 1:1, filling the screen, unscaled.
    let (code, show, err) = ctl_plain(&q, &["vm", "show", "work"]);
    assert_eq!(code, 0, "{show}{err}");
    assert!(show.contains("display: follows the monitor (now 1920x1080)"), "{show}");
    let shot = q.workdir().join("work.ppm");
    ctl_ok(&q, &["vm", "screenshot", "work", shot.to_str().unwrap()]);
    let (w, h, _) = read_ppm(&shot);
    assert_eq!((w, h), (1920, 1080), "the guest's display is not the monitor's mode");
    q.wait_for("compositor: layout present vm=work mode=1920x1080 x=0 y=0 w=1920 h=1080", Duration::from_secs(30)).unwrap();

    // The return combo on the machine's USB keyboard.
    q.press(&["ctrl", "alt", "home"]).unwrap();
    let t = Instant::now();
    while ctl_ok(&q, &["presented"])["presented"] != "" {
        assert!(t.elapsed() < Duration::from_secs(30), "Ctrl+Alt+Home did not return home");
        std::thread::sleep(Duration::from_millis(300));
    }
    q.wait_screen("spare", Duration::from_secs(60)).unwrap();

    // A killed compositor comes back; the VM never noticed.
    let beat = wait_vm(&q, "work", "a heartbeat", GUEST_TIMEOUT, |v| v["agent_heartbeat"].as_u64() > Some(0))["agent_heartbeat"].as_u64().unwrap();
    let pid = ctl_ok(&q, &["service", "show", "compositor"])["pid"].as_u64().unwrap();
    let mark = q.log_len();
    ctl_ok(&q, &["service", "kill", "compositor", "--signal", "KILL"]);
    // Killed, it gave nothing back itself: rayosd put the console back to text, and into
    // graphics mode again for the restarted compositor.
    q.wait_for_line_after(mark, |l| l.contains("the compositor let go of the screen; the console shows text again"), "text mode after the kill", Duration::from_secs(30)).unwrap();
    q.wait_for_line_after(mark, |l| l.contains("the console is in graphics mode while the compositor holds the screen"), "graphics mode again", Duration::from_secs(60)).unwrap();
    let t = Instant::now();
    loop {
        let s = ctl_ok(&q, &["service", "show", "compositor"]);
        if s["state"] == "running" && s["pid"].as_u64() != Some(pid) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the compositor was not restarted: {s}");
        std::thread::sleep(Duration::from_millis(300));
    }
    q.wait_screen("spare", Duration::from_secs(60)).unwrap();
    let v = wait_vm(&q, "work", "heartbeats after the compositor's restart", GUEST_TIMEOUT, |v| v["agent_heartbeat"].as_u64() > Some(beat));
    assert_eq!(v["state"], "running");
    assert_eq!(v["restarts"], 0, "the VM was restarted with the compositor: {v}");
}

/// The home screen on a 3840x2160 monitor: text sized from the output, so the compositor's
/// layout lines put each VM's row where OCR of the screendump reads its name and state.
#[test]
fn compositor_home_screen_is_readable_at_4k() {
    let a = Vm::new("alpha", false);
    let mut b = Vm::new("bravo", false);
    b.display = Some(json!([1280, 800]));
    let registry = registry_json(&[&a, &b]);
    let (mut q, _disk) = boot_with("compositor-4k", |b| b.screen(3840, 2160), |dir| data_disk(dir, &[&a, &b], &registry, None));
    q.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    let line = q.wait_for_line(|l| l.contains("layout home vm=bravo"), "the layout line of bravo", BOOT_TIMEOUT).unwrap();
    // Rows are a 34th of the output's height: legible from across a room at 4K.
    let h: u32 = line.split_whitespace().find_map(|w| w.strip_prefix("h=")).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(h >= 2160 / 40, "a VM row is {h} px high on a 2160-line monitor: {line}");
    let seen = q.wait_screen("bravo", Duration::from_secs(60)).unwrap();
    for text in ["alpha", "stopped", "no display"] {
        assert!(rayos_tests::ocr_contains(&seen, text), "the 4K home screen does not show {text:?}; OCR read:\n{seen}");
    }
}

/// Logs in as root on the serial console of a Debian VM that has no first-boot user yet
/// (root has an empty password until the agent's setup), up to a shell.
fn root_shell(q: &Qemu, vm: &str) {
    wait_serial(q, vm, "a login prompt", Duration::from_secs(600), |s| s.contains("rayos-linux login:"));
    type_line(q, vm, "root");
    wait_serial(q, vm, "a root shell", Duration::from_secs(90), |s| s.contains("root@rayos-linux:~#"));
}

/// Runs `cmd` in the VM's root shell between two markers and returns what it printed (the
/// quotes in the typed line keep its echo from matching the markers).
fn run_marked(q: &Qemu, vm: &str, tag: &str, cmd: &str, timeout: Duration) -> String {
    let (begin, end) = (format!("BEGIN-{tag}"), format!("END-{tag}"));
    let (b1, b2) = begin.split_at(3);
    let (e1, e2) = end.split_at(3);
    type_line(q, vm, &format!(r#"echo "{b1}""{b2}"; {cmd}; echo "{e1}""{e2} rc=$?""#));
    let s = wait_serial(q, vm, &format!("the output of {tag}"), timeout, |s| s.lines().any(|l| l.contains(&end) && !l.contains('"')));
    let from = s.rfind(&begin).map(|i| i + begin.len()).unwrap_or(0);
    // Through the end of the end marker's line: its ` rc=N`.
    let to = s[from..].find(&end).map(|i| from + i).map(|i| s[i..].find('\n').map_or(s.len(), |n| i + n)).unwrap_or(s.len());
    s[from..to].to_string()
}

/// A one-page HTTP server on the host's loopback, reached by guests through QEMU's user-mode
/// gateway (10.0.2.2): answers every request with `token` and the request's number.
fn http_server(token: String) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (n, c) in l.incoming().enumerate() {
            let Ok(mut c) = c else { continue };
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&b[..k]),
                }
            }
            let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{token}-{}\n", n + 1);
        }
    });
    port
}

/// The guest's IPv4 address on eth0, from `ip -4 -o addr` output.
fn inet_of(out: &str) -> Option<String> {
    out.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(|a| a.split('/').next().unwrap().to_string())
}

/// Issue 16's per-VM networking, as a user meets it: two Debian VMs with `network = "nat"`
/// each get a lease from RayOS's DHCP server on 10.73.0.0/24 (`vm show` and `net status`
/// say which), fetch a page from a server on the host's loopback through RayOS's uplink
/// (QEMU's user network) and resolve a name through RayOS's DNS forwarder. Neither reaches
/// the other (directly or routed through RayOS) nor any of RayOS's own addresses. Garbage
/// sent to the DHCP server leaves it serving. A pulled and replugged cable heals and the NAT
/// works again. Set to `off`, the VM boots without a network card.
#[test]
fn nat_vms_reach_the_outside_through_rayos_but_not_each_other_or_rayos() {
    let guest = rootfs_builder::guest::ensure_default_linux_guest().expect("building the default Linux guest");
    let debian = |name: &'static str| {
        let mut v = Vm::new(name, true);
        v.memory_mib = 384;
        v.disk_src = Some(guest.disk.clone());
        v.boot = Some(("/data/images/vmlinuz".into(), None, guest.cmdline.clone()));
        v.network = Some("nat");
        v
    };
    let web = debian("web");
    // Started once web's checks are done: two Debian guests booting at once under TCG with
    // nested KVM are what issue #12's host resets and stalls come from most often.
    let mut other = debian("other");
    other.autostart = false;
    let token = format!("RAYOS-NAT-{}", unix_ms());
    let port = http_server(token.clone());
    // What the host's own resolver says: RayOS's forwarder must give the guest the same.
    let name = "deb.debian.org";
    let host_answer = std::net::ToSocketAddrs::to_socket_addrs(&(name, 80))
        .unwrap_or_else(|e| panic!("this host cannot resolve {name} ({e}); the DNS check needs a working resolver"))
        .find(|a| a.is_ipv4())
        .map(|a| a.ip().to_string())
        .expect("an IPv4 address for the name");
    let registry = registry_json(&[&web, &other]);
    // The e1000 reports a pulled cable to its driver (QEMU 7.2's e1000e does not).
    let nic = rootfs_builder::qemu::Nic { model: "e1000", mac: "52:54:00:12:34:56".into(), net: "10.0.2.0/24".into() };
    let (mut q, _disk) = boot_with("vm-nat", |b| b.nic(nic), |dir| data_disk_sized(dir, &[&web, &other], &registry, None, BIG_PART_SIZE + (1 << 30)));
    q.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    let show = vm_info(&q, "web");
    assert_eq!(show["network"], "nat", "{show}");
    let web_mac = show["mac"].as_str().unwrap().to_string();
    assert!(web_mac.starts_with("52:54:"), "{show}");

    // 1. A lease from RayOS, its DNS server in resolv.conf; `vm show` names the address.
    root_shell(&q, "web");
    let out = run_marked(
        &q,
        "web",
        "lease",
        "for i in $(seq 60); do ip -4 -o addr show eth0 | grep -q inet && break; sleep 1; done; ip -4 -o addr show eth0; grep nameserver /etc/resolv.conf",
        Duration::from_secs(120),
    );
    let web_ip = inet_of(&out).unwrap_or_else(|| panic!("web got no address on eth0:\n{out}"));
    assert!(web_ip.starts_with("10.73.0."), "web's address {web_ip} is not on RayOS's NAT network:\n{out}");
    assert!(out.contains("nameserver 10.73.0.1"), "web's resolv.conf does not name RayOS's DNS forwarder:\n{out}");
    let (_, text, _) = ctl_plain(&q, &["vm", "show", "web"]);
    assert!(text.contains(&format!("network: nat, card {web_mac}, address {web_ip}")), "vm show:\n{text}");
    let net = ctl_ok(&q, &["net", "status"]);
    assert_eq!(net["nat"]["ready"], true, "{net}");
    eprintln!("nat: web has {web_ip} ({web_mac})");

    // 2. Out through RayOS's uplink to the host's loopback, and a name through the forwarder.
    let out = run_marked(&q, "web", "http", &format!(r#"timeout 20 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}; printf "GET /nat HTTP/1.0\r\n\r\n" >&3; cat <&3'"#), Duration::from_secs(60));
    assert!(out.contains(&format!("{token}-1")), "web did not get the page from the host:\n{out}");
    let out = run_marked(&q, "web", "dns", &format!("getent hosts {name}"), Duration::from_secs(60));
    assert!(out.lines().any(|l| l.contains(&host_answer) && l.contains(name)), "web did not resolve {name} to {host_answer}:\n{out}");
    let net = ctl_ok(&q, &["net", "status"]);
    assert!(net["nat"]["dns_answered"].as_u64().unwrap_or(0) >= 1 || {
        std::thread::sleep(Duration::from_secs(3));
        ctl_ok(&q, &["net", "status"])["nat"]["dns_answered"].as_u64().unwrap_or(0) >= 1
    }, "the forwarder counted no answer: {net}");

    // 3. The other VM reaches neither web (on the bridge, nor routed through RayOS) nor
    //    RayOS itself. A reachable host with nothing listening answers "Connection refused";
    //    a dropped connection attempt times out (rc 124) or finds no route.
    ctl_ok(&q, &["vm", "start", "other"]);
    root_shell(&q, "other");
    let out = run_marked(&q, "other", "lease2", "for i in $(seq 60); do ip -4 -o addr show eth0 | grep -q inet && break; sleep 1; done; ip -4 -o addr show eth0", Duration::from_secs(120));
    let other_ip = inet_of(&out).unwrap_or_else(|| panic!("other got no address:\n{out}"));
    assert_ne!(other_ip, web_ip);
    let probe = |tag: &str, target: &str| {
        let out = run_marked(&q, "other", tag, &format!("timeout 6 bash -c 'exec 3<>/dev/tcp/{target}' 2>&1"), Duration::from_secs(60));
        assert!(!out.contains("refused") && !out.contains("rc=0"), "other reached {target}:\n{out}");
        eprintln!("nat: other → {target}: {}", out.split_whitespace().collect::<Vec<_>>().join(" "));
    };
    probe("direct", &format!("{web_ip}/22"));
    type_line(&q, "other", &format!("ip route add {web_ip}/32 via 10.73.0.1"));
    probe("routed", &format!("{web_ip}/22"));
    probe("gateway", "10.73.0.1/22");
    probe("uplink", "10.0.2.15/22");

    // 4. Garbage to the DHCP server: oversized, short, zeros (not a BOOTREQUEST). It says so
    //    in the log and still hands out a lease; netd did not restart.
    let netd_before = ctl_ok(&q, &["service", "show", "netd"]);
    run_marked(
        &q,
        "other",
        "garbage",
        "head -c 3000 /dev/urandom > /dev/udp/10.73.0.1/67; printf x > /dev/udp/10.73.0.1/67; head -c 600 /dev/zero > /dev/udp/10.73.0.1/67",
        Duration::from_secs(60),
    );
    let out = run_marked(&q, "other", "relase", "dhclient -r eth0; dhclient -4 -1 eth0; ip -4 -o addr show eth0", Duration::from_secs(120));
    assert_eq!(inet_of(&out).as_deref(), Some(other_ip.as_str()), "no lease (or another address) after the garbage:\n{out}");
    let netd_after = ctl_ok(&q, &["service", "show", "netd"]);
    assert_eq!((netd_before["pid"].clone(), netd_before["restarts"].clone()), (netd_after["pid"].clone(), netd_after["restarts"].clone()), "netd restarted");
    let (_, logs, _) = ctl_plain(&q, &["logs", "-n", "400"]);
    assert!(logs.contains("got no answer"), "the refused datagrams were not logged");

    // 5. The cable pulled and put back: the uplink heals and web's NAT works again.
    q.qmp("set_link", json!({"name": rootfs_builder::qemu::Nic::device_id(0), "up": false})).unwrap();
    let t = Instant::now();
    loop {
        let v = ctl_ok(&q, &["net", "status"]);
        if v["uplinks"][0]["carrier"] == false {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the pulled cable was not seen: {v}");
        std::thread::sleep(Duration::from_millis(300));
    }
    q.qmp("set_link", json!({"name": rootfs_builder::qemu::Nic::device_id(0), "up": true})).unwrap();
    let t = Instant::now();
    loop {
        let v = ctl_ok(&q, &["net", "status"]);
        if v["uplinks"][0]["state"] == "bound" && v["uplinks"][0]["carrier"] == true {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the uplink did not heal: {v}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = run_marked(&q, "web", "http2", &format!(r#"timeout 20 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}; printf "GET /again HTTP/1.0\r\n\r\n" >&3; cat <&3'"#), Duration::from_secs(60));
    assert!(out.contains(&format!("{token}-2")), "web's NAT did not work after the cable came back:\n{out}");

    // 6. Network off, at the next start: no card at all.
    let v = ctl_ok(&q, &["vm", "set", "other", "--network", "off"]);
    assert_eq!(v["network"], "off", "{v}");
    ctl_ok(&q, &["vm", "stop", "other", "--force"]);
    wait_vm(&q, "other", "stopped", Duration::from_secs(60), |v| v["state"] == "stopped");
    ctl_ok(&q, &["vm", "start", "other"]);
    root_shell_again(&q, "other");
    let out = run_marked(&q, "other", "nolink", "ip -o link show eth0 2>&1", Duration::from_secs(60));
    assert!(out.contains("does not exist") || out.contains("not found"), "other still has eth0 with network off:\n{out}");
    ctl_ok(&q, &["poweroff"]);
    q.wait_exit(Duration::from_secs(120)).unwrap();
}

/// Like [`root_shell`], after a restart: a fresh login prompt after the ones seen before.
fn root_shell_again(q: &Qemu, vm: &str) {
    let prompts = serial_of(q, vm).matches("rayos-linux login:").count();
    let t = Instant::now();
    loop {
        let s = serial_of(q, vm);
        // The serial log is per run: the new run's log starts afresh, or holds more prompts.
        if s.matches("rayos-linux login:").count() > prompts || (!s.contains("root@rayos-linux") && s.contains("rayos-linux login:")) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(600), "no login prompt after the restart:\n{s}");
        std::thread::sleep(Duration::from_secs(1));
    }
    type_line(q, vm, "root");
    wait_serial(q, vm, "a root shell", Duration::from_secs(90), |s| s.contains("root@rayos-linux:~#"));
}

