//! A hung guest is noticed and restarted by policy, end to end: the real supervisor
//! (`rayos-systemless`, rayosd's VM supervisor on an ordinary host) runs a real `rayos-vmm`
//! inside QEMU with nested KVM (see `rayos_tests::nested`). The guest writes its disk and then
//! stops for good before it reaches "init" (it writes the boot-timer port late, as the
//! default Debian guest's agent service does), the way the default VM was seen to stop right
//! after its virtio-blk came up (issue #12). Its kernel lives on (the hwrng thread still reads
//! the virtio-rng every VM created by `rayosctl vm create` has, which the VMM counts as
//! progress), so it is rayosd's rule that notices: no init within the floor of 180 s (its usual
//! boot is not known yet). What a user sees through `rayosctl` is checked: `vm start --wait`
//! ends saying the VM is hung and why, the state changes show the restart the policy made,
//! and `vm show` counts it.

use std::time::Duration;

use rayos_tests::nested::{section, Outer};

const RUN_TIMEOUT: Duration = Duration::from_secs(900);
use rayos_tests::nested::{systemless_ctl as ctl, SYSTEMLESS_SOCK as SOCK};

#[test]
fn a_guest_that_hangs_after_its_disk_came_up_is_marked_hung_and_restarted() {
    let mut outer = Outer::new("vm_hung_nested");
    let disk = outer.workdir().join("hang.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // Not under /tmp or /run: testinit mounts fresh file systems there.
    outer.file("/disks/hang.img", &disk, 0o644);
    outer.systemless();
    outer.cmd(
        "create",
        &ctl(&[
            "vm", "create", "stuck", "--kernel", "/guest/bzImage", "--initramfs", "/guest/initrd", "--disk", "/disks/hang.img",
            "--cmdline", "console=ttyS0 quiet rayos.agent=disk-write,hang rayos.agent_boot_timer=late", "--memory-mib", "256",
            "--vcpus", "2",
        ]),
    );
    // Ends when the VM is found hung (it never reaches init).
    outer.cmd("start", &ctl(&["vm", "start", "stuck", "--wait", "600"]));
    // Ends 2 s after the policy's restart (this one or, if it came before the watch began,
    // the next hang's).
    // (`--timeout` bounds the watch: one more boot and hang fit in 200 s.)
    outer.cmd(
        "restart",
        &["/rayosctl", "--socket", SOCK, "--timeout", "200", "vm", "watch", "#kill-after stuck starting restarting after a hang"],
    );
    outer.cmd("show", &ctl(&["--json", "vm", "show", "stuck"]));
    outer.cmd("stop", &ctl(&["vm", "stop", "stuck", "--force", "--wait", "60"]));
    let log = outer.boot(RUN_TIMEOUT);

    assert!(log.contains("rayos-systemless: host KVM runs guests"), "systemless did not find working KVM:\n{log}");
    assert!(log.contains("testinit: create exit=0 "), "{log}");
    // `vm start --wait` saw the VM hung, not its init, within the bound, and says why.
    const WHY: &str = "hung: the guest did not reach init within 180 s of running (the floor; its usual boot is not known yet)";
    let start = section(&log, "start");
    assert!(!start.contains("testinit: start exit=0 "), "the hung guest was reported as booted:\n{start}");
    assert!(log.contains(&format!("stuck is hung: {WHY}; restarting in 500 ms")), "rayosctl did not say the VM is hung and why:\n{log}");
    let ms = start.split("testinit: start exit=1 ms=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse::<u64>().ok());
    let ms = ms.unwrap_or_else(|| panic!("no end of `vm start --wait`:\n{start}"));
    assert!((180_000..200_000).contains(&ms), "hung after {ms} ms, the bound is 180 s:\n{start}");
    // The supervisor's clear log line, and the restart the policy made.
    assert!(log.contains(&format!("vm stuck: {WHY}; ending its VMM")), "no log line for the hung VM:\n{log}");
    assert!(section(&log, "restart").contains("stuck starting restarting after a hang"), "not restarted by policy:\n{log}");
    let show = section(&log, "show");
    let json = &show[show.find('{').unwrap_or_else(|| panic!("no vm show answer:\n{show}"))..show.rfind('}').unwrap() + 1];
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("vm show: {e}:\n{json}"));
    assert!(v["restarts"].as_u64() >= Some(1), "vm show counts no restart: {v}");
    assert!(log.contains("testinit: stop exit=0 "), "{log}");
    // It hung after its disk came up (the VMM's log, relayed by the supervisor). Its serial
    // log is the restarted guest's by now.
    let disk_up = log.find("virtio device activated device=virtio-blk").unwrap_or_else(|| panic!("its disk never came up:\n{log}"));
    assert!(disk_up < log.find("hung: the guest did not reach init").unwrap(), "{log}");
}
