//! Repeated cold boots under rayos-vmm in one outer QEMU with nested KVM: every boot must reach
//! the guest's init and power off. Guards against the intermittent early triple faults
//! ("guest rebooted (triple fault)") seen under rayosd and in the nested tests, which hit one
//! boot in a few and so are invisible to tests that boot each configuration once.

use std::time::Duration;

use rayos_tests::nested::{boot_timer_lines, section, Outer};

const RUN_TIMEOUT: Duration = Duration::from_secs(600);

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

    let mut outer = Outer::new("vmm_nested_boots");
    for (name, spec) in &runs {
        outer.vmm(name, spec, None);
    }
    let log = outer.boot(RUN_TIMEOUT);

    assert!(!log.contains("triple fault"), "a guest triple-faulted:\n{log}");
    for (name, spec) in &runs {
        // Each run on its own: a line from another run must not stand in for this one.
        let s = section(&log, name);
        assert!(s.contains(&format!("testinit: {name} exit=0 ")), "{name} did not power off cleanly:\n{s}");
        let cpus = format!("agent: cpus ok online={}", spec["vcpus"]);
        assert!(s.contains(&cpus), "run {name}: missing `{cpus}`:\n{s}");
        assert_eq!(boot_timer_lines(s), 1, "run {name}: guest init not reached exactly once:\n{s}");
    }
}

