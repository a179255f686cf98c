//! rayosd as PID 1 in QEMU (real kernel, real rayosd): reaping, supervision, the control API
//! over the virtio-serial bridge, power-off with a clean data volume, and the rescue fallback.
//!
//! The test-only service `rayos-testsvc` is not in the shipped initramfs: these tests append a
//! second cpio archive holding it to the built initramfs (the kernel unpacks both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rayos_tests::{artifacts, Qemu, BOOT_TIMEOUT};
use serde_json::Value;

const DATA_TYPE_GUID: &str = "bcae553e-c9a9-4fbc-8291-e48c272f7ecf";

/// Static rayosctl and rayos-testsvc from the same build as the initramfs's rayosd.
fn bin_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| rootfs_builder::cargo_build::build_static(["rayosd"]).expect("building rayosd's binaries"))
}

/// The built initramfs plus an archive holding /usr/bin/rayos-testsvc.
fn initramfs_with_testsvc() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let a = artifacts();
        let dir = rootfs_builder::paths::out_dir().join("test-runs");
        std::fs::create_dir_all(&dir).unwrap();
        let overlay = dir.join("testsvc-overlay.img");
        let mut o = rootfs_builder::initramfs::Initramfs::new();
        o.file("/usr/bin/rayos-testsvc", &bin_dir().join("rayos-testsvc"), 0o755).unwrap();
        o.write(&overlay).unwrap();
        let mut joined = std::fs::read(&a.initramfs).unwrap();
        // Archives are concatenated on 4-byte boundaries.
        while joined.len() % 4 != 0 {
            joined.push(0);
        }
        joined.extend(std::fs::read(&overlay).unwrap());
        let out = dir.join("initramfs-testsvc.img");
        std::fs::write(&out, joined).unwrap();
        out
    })
}

fn cmdline(extra: &str) -> String {
    format!("console=ttyS0,115200 panic=10 {extra}")
}

/// rayosctl on the host, through the bridge. Returns (exit code, parsed JSON stdout).
fn rayosctl(sock: &Path, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(bin_dir().join("rayosctl"))
        .arg("--socket")
        .arg(sock)
        .arg("--json")
        .args(args)
        .output()
        .expect("running rayosctl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v, String::from_utf8_lossy(&out.stderr).to_string())
}

fn service<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array().and_then(|a| a.iter().find(|s| s["name"] == name)).unwrap_or_else(|| panic!("no {name} in {list}"))
}

/// Polls `rayosctl services` until `pred` holds for service `name`.
fn wait_service(sock: &Path, name: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let (code, v, err) = rayosctl(sock, &["services"]);
        assert_eq!(code, 0, "rayosctl services failed: {err}");
        let s = service(&v, name).clone();
        if pred(&s) {
            return s;
        }
        assert!(start.elapsed() < timeout, "timed out waiting on {name}: {s}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn rayosd_reaps_orphans_restarts_services_and_serves_the_bridge() {
    let a = artifacts();
    let mut vm = Qemu::builder("rayosd-supervision")
        .direct_kernel(&a.kernel, initramfs_with_testsvc(), &cmdline("rayos.mode=rescue rayos.testsvc=orphans,sleep,crashloop,nonroot"))
        .control_channel()
        .no_reboot()
        .spawn()
        .unwrap();
    let ready = vm.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("mode=rescue"), "{ready}");
    let sock = vm.control_socket();

    // Round trip over the virtio-serial bridge.
    let (code, st, err) = rayosctl(&sock, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(st["mode"], "rescue");
    eprintln!("rayosd RSS once ready: {} KiB; {}", st["rss_kib"], ready.trim());

    // Orphans: five grandchildren re-parented to PID 1 exit after 1 s; none may stay a zombie.
    vm.wait_for("left 5 orphans", BOOT_TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let (_, st, _) = rayosctl(&sock, &["status"]);
    assert!(st["orphans_reaped"].as_u64().unwrap() >= 5, "{st}");
    assert_eq!(st["zombies"], 0, "{st}");

    // SIGKILL a supervised service: it comes back with a new pid.
    let before = wait_service(&sock, "testsvc-sleep", BOOT_TIMEOUT, |s| s["state"] == "running");
    let (code, v, err) = rayosctl(&sock, &["service", "kill", "testsvc-sleep", "--signal", "KILL"]);
    assert_eq!((code, v["signalled"].clone()), (0, Value::Bool(true)), "{err}");
    let after = wait_service(&sock, "testsvc-sleep", Duration::from_secs(60), |s| s["state"] == "running" && s["restarts"] == 1);
    assert_ne!(before["pid"], after["pid"]);
    assert_eq!(after["last_exit"], "killed by signal 9 (SIGKILL)");

    // A service that always fails ends in crash-loop, is not restarted, and says so.
    let looped = wait_service(&sock, "testsvc-crashloop", Duration::from_secs(120), |s| s["state"] == "crash-loop");
    vm.wait_for("service testsvc-crashloop is crash-looping", Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let still = wait_service(&sock, "testsvc-crashloop", Duration::from_secs(5), |_| true);
    assert_eq!(still["restarts"], looped["restarts"], "restarted after a crash loop");

    // A non-root caller inside RayOS is refused a power-off.
    let refused = vm.wait_for("nonroot power_off", Duration::from_secs(60)).unwrap();
    assert!(refused.contains("refused") && refused.contains("uid is 65534"), "{refused}");

    // Bad input over the API: a named error, no change.
    let (code, _, err) = rayosctl(&sock, &["service", "restart", "no-such-service"]);
    assert_eq!(code, 5, "{err}");
    let (code, _, err) = rayosctl(&sock, &["service", "kill", "testsvc-sleep", "--signal", "BOGUS"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("BOGUS"), "{err}");
    let same = wait_service(&sock, "testsvc-sleep", Duration::from_secs(5), |_| true);
    assert_eq!((same["pid"].clone(), same["restarts"].clone()), (after["pid"].clone(), after["restarts"].clone()));

    // Round-trip figures over the bridge (TCG guest; the host-side target is for the server).
    let (code, v, err) = rayosctl(&sock, &["ping", "--count", "200"]);
    assert_eq!(code, 0, "{err}");
    eprintln!("bridge round trip over 200 calls: p50 {} us, p99 {} us", v["p50_us"], v["p99_us"]);

    let (code, _, err) = rayosctl(&sock, &["poweroff"]);
    assert_eq!(code, 0, "{err}");
    let status = vm.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "QEMU exit status after power-off: {status}");
    vm.wait_for("shutdown: poweroff now", Duration::from_secs(5)).unwrap();
}

/// A 64 MiB GPT disk with one RayOS data partition holding an empty ext4. Returns the
/// partition's byte offset and length.
fn data_disk(path: &Path) -> (u64, u64) {
    let size = 64 << 20;
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(path).unwrap();
    f.set_len(size).unwrap();
    let mut gpt = gptman::GPT::new_from(&mut f, 512, [0x42; 16]).unwrap();
    let first = 2048u64;
    let last = gpt.header.last_usable_lba;
    let guid = |s: &str| -> [u8; 16] {
        // GPT stores the first three GUID fields little-endian.
        let h: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&s.replace('-', "")[2 * i..2 * i + 2], 16).unwrap()).collect();
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&[h[3], h[2], h[1], h[0]]);
        b[4..6].copy_from_slice(&[h[5], h[4]]);
        b[6..8].copy_from_slice(&[h[7], h[6]]);
        b[8..].copy_from_slice(&h[8..]);
        b
    };
    gpt[1] = gptman::GPTPartitionEntry {
        partition_type_guid: guid(DATA_TYPE_GUID),
        unique_partition_guid: [0x17; 16],
        starting_lba: first,
        ending_lba: last,
        attribute_bits: 0,
        partition_name: "rayos-data".into(),
    };
    gpt.write_into(&mut f).unwrap();
    // Linux ignores a GPT without its protective MBR.
    gptman::GPT::write_protective_mbr_into(&mut f, 512).unwrap();
    drop(f);
    let (off, len) = (first * 512, (last - first + 1) * 512);
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rayos-data", "-E", &format!("offset={off}")])
        .arg(path)
        .arg(format!("{}k", len / 1024))
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 failed");
    (off, len)
}

/// Copies the partition out so host tools can read it.
fn extract(path: &Path, off: u64, len: u64, out: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    std::fs::write(out, buf).unwrap();
}

#[test]
fn installed_mode_mounts_data_and_poweroff_leaves_it_clean() {
    let a = artifacts();
    let builder = Qemu::builder("rayosd-installed");
    let disk = builder.workdir().join("data.img");
    let (off, len) = data_disk(&disk);
    let mut vm = builder
        .direct_kernel(&a.kernel, &a.initramfs, &cmdline("rayos.mode=installed"))
        .nvme_disk(&disk, "RAYOS-DATA")
        .control_channel()
        .no_reboot()
        .spawn()
        .unwrap();
    let ready = vm.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("mode=installed"), "{ready}");
    vm.wait_for("mounted on /data", Duration::from_secs(5)).unwrap();
    let sock = vm.control_socket();
    let (code, st, err) = rayosctl(&sock, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(st["mode"], "installed");
    assert!(st["data_device"].as_str().unwrap().starts_with("/dev/nvme"), "{st}");

    let (code, _, err) = rayosctl(&sock, &["poweroff"]);
    assert_eq!(code, 0, "{err}");
    let status = vm.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "QEMU exit status after power-off: {status}");

    let part = vm.workdir().join("data-part.img");
    extract(&disk, off, len, &part);
    let fsck = Command::new("e2fsck").arg("-fn").arg(&part).output().unwrap();
    assert!(fsck.status.success(), "data volume not clean after power-off:\n{}", String::from_utf8_lossy(&fsck.stdout));
    // The layout exists and the log reached the disk.
    let ls = Command::new("debugfs").args(["-R", "ls -l /"]).arg(&part).output().unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout);
    for d in ["config", "registry", "vms", "logs"] {
        assert!(ls.contains(d), "no /{d} on the data volume:\n{ls}");
    }
    let log = Command::new("debugfs").args(["-R", "cat /logs/rayosd.log"]).arg(&part).output().unwrap();
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(log.contains("rayosd: starting pid=1"), "earlier lines not flushed into the log file:\n{log}");
    assert!(log.contains("control: power-off requested"), "{log}");
}

#[test]
fn missing_data_partition_falls_back_to_rescue_and_touches_nothing() {
    let a = artifacts();
    let builder = Qemu::builder("rayosd-no-data");
    let disk = builder.workdir().join("blank.img");
    rayos_tests::blank_disk(&disk, 64 << 20).unwrap();
    let mut vm = builder
        .direct_kernel(&a.kernel, &a.initramfs, &cmdline("rayos.mode=installed"))
        .nvme_disk(&disk, "RAYOS-BLANK")
        .control_channel()
        .no_reboot()
        .spawn()
        .unwrap();
    let msg = vm.wait_for("starting rescue mode instead", BOOT_TIMEOUT).unwrap();
    assert!(msg.contains("no RayOS data partition") && msg.contains("Nothing was formatted"), "{msg}");
    let ready = vm.wait_for("rayosd: ready", Duration::from_secs(30)).unwrap();
    assert!(ready.contains("mode=rescue"), "{ready}");
    vm.wait_for("RayOS rescue", Duration::from_secs(10)).unwrap();
    let (code, st, err) = rayosctl(&vm.control_socket(), &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(st["rescue_reason"].as_str().unwrap().contains("no RayOS data partition"), "{st}");
    let (code, _, err) = rayosctl(&vm.control_socket(), &["poweroff"]);
    assert_eq!(code, 0, "{err}");
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    let bytes = std::fs::read(&disk).unwrap();
    assert!(bytes.iter().all(|&b| b == 0), "the blank disk was written to");
}
