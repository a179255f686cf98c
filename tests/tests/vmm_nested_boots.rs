//! Repeated cold boots under rayos-vmm in one outer QEMU with nested KVM: every boot must reach
//! the guest's init and power off. Guards against the intermittent early triple faults
//! ("guest rebooted (triple fault)") seen under rayosd and in the nested tests, which hit one
//! boot in a few and so are invisible to tests that boot each configuration once.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use rayos_tests::{artifacts, initramfs::Initramfs, Qemu};

const RUN_TIMEOUT: Duration = Duration::from_secs(600);

fn vmm_bins() -> &'static PathBuf {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| rootfs_builder::cargo_build::build_static(["vmm"]).expect("building the vmm binaries"))
}

#[test]
fn vmm_cold_boots_repeatedly_without_triple_fault() {
    // The shapes the failures were seen in: a small 1-vCPU guest with an initramfs, and a
    // 2-vCPU guest whose RAM goes past the first GiB (the part the boot page tables map).
    // Four boots keep this under a minute of nested time on a loaded 2-core host.
    let runs: Vec<(String, serde_json::Value)> = (0..4)
        .map(|i| {
            let (vcpus, mib) = if i == 3 { (2, 1536) } else { (1, 256) };
            let name = format!("b{i}");
            let spec = serde_json::json!({
                "name": name, "vcpus": vcpus, "memory_mib": mib,
                "kernel": "/guest/bzImage", "initramfs": "/guest/initrd",
                "cmdline": "console=ttyS0 quiet rayos.agent=cpus", "serial_stdout": true,
            });
            (name, spec)
        })
        .collect();

    let a = artifacts();
    let builder = Qemu::builder("vmm_nested_boots");
    let dir = builder.workdir().to_path_buf();
    let guest_initrd = dir.join("guest-initrd");
    let mut g = Initramfs::new();
    g.file("/init", &vmm_bins().join("rayos-guest-agent"), 0o755).unwrap();
    g.write(&guest_initrd).unwrap();
    let mut ird = Initramfs::new();
    ird.file("/init", &vmm_bins().join("rayos-vmm-testinit"), 0o755).unwrap();
    ird.file("/rayos-vmm", &vmm_bins().join("rayos-vmm"), 0o755).unwrap();
    ird.file("/guest/bzImage", &a.kernel, 0o644).unwrap();
    ird.file("/guest/initrd", &guest_initrd, 0o644).unwrap();
    for d in ["/dev", "/proc", "/sys", "/tmp", "/run"] {
        ird.dir(d, 0o755).unwrap();
    }
    for (name, spec) in &runs {
        ird.bytes(&format!("/specs/{name}.json"), spec.to_string().into_bytes(), 0o644).unwrap();
    }
    let outer = dir.join("outer-initrd");
    ird.write(&outer).unwrap();
    let names: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
    let mut q = builder
        .direct_kernel(&a.kernel, &outer, &format!("console=ttyS0 panic=-1 quiet rayos.vmmtest={}", names.join(",")))
        .memory_mib(2048)
        .cpus(2)
        .no_reboot()
        .spawn()
        .unwrap();
    q.wait_for("testinit: all done", RUN_TIMEOUT).unwrap();
    let log = q.serial_log();

    assert!(!log.contains("triple fault"), "a guest triple-faulted:\n{log}");
    for (name, spec) in &runs {
        assert!(log.contains(&format!("testinit: {name} exit=0 ")), "{name} did not power off cleanly:\n{log}");
        let cpus = format!("agent: cpus ok online={}", spec["vcpus"]);
        assert!(log.contains(&cpus), "missing `{cpus}`:\n{log}");
    }
    let boots = log.lines().filter(|l| l.contains("boot-timer: guest init reached after")).count();
    assert!(boots >= runs.len(), "{boots} of {} guests reached init:\n{log}", runs.len());
}
