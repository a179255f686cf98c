//! rayos-systemless where KVM really runs guests: inside QEMU with nested KVM (on these build
//! machines the host's own KVM cannot, see systemless/tests/host.rs). The outer VM runs
//! `rayos-systemless --state-dir /run/sl` and, one after another, the rayosctl commands a
//! developer would type: create a VM, start it and wait for its init, stop it (the guest sees
//! the ACPI power button), read its serial log; then systemless gets SIGTERM.

use std::time::Duration;

use rayos_tests::nested::{section, Outer};

const RUN_TIMEOUT: Duration = Duration::from_secs(900);
use rayos_tests::nested::{systemless_ctl as ctl, SYSTEMLESS_SOCK as SOCK};

#[test]
fn systemless_runs_a_real_vm_under_nested_kvm() {
    let mut outer = Outer::new("systemless_nested");
    outer.systemless();
    outer.cmd(
        "create",
        &ctl(&[
            "vm", "create", "tiny", "--kernel", "/guest/bzImage", "--initramfs", "/guest/initrd",
            "--cmdline", "console=ttyS0 quiet rayos.agent=cpus,powerbutton", "--memory-mib", "256",
            "--vcpus", "2", "--no-restart",
        ]),
    );
    outer.cmd("start", &ctl(&["vm", "start", "tiny", "--wait", "300"]));
    outer.cmd("show", &ctl(&["--json", "vm", "show", "tiny"]));
    outer.cmd("stop", &ctl(&["vm", "stop", "tiny", "--wait", "120"]));
    outer.cmd("logs", &ctl(&["vm", "logs", "tiny", "-n", "400"]));
    outer.cmd("list", &ctl(&["vm", "list"]));
    let log = outer.boot(RUN_TIMEOUT);

    assert!(log.contains("rayos-systemless: host KVM runs guests"), "systemless did not find working KVM:\n{log}");
    assert!(log.contains(&format!("testinit: sl {SOCK} exists=true")), "no control socket:\n{log}");
    for run in ["create", "start", "show", "stop", "logs", "list"] {
        assert!(log.contains(&format!("testinit: {run} exit=0 ")), "rayosctl {run} failed:\n{log}");
    }
    assert!(section(&log, "create").contains("created tiny id="), "{log}");
    assert!(section(&log, "start").contains("tiny: guest init "), "{log}");
    let show = section(&log, "show");
    assert!(show.contains("\"state\": \"running\""), "not running after start: {show}");
    assert!(section(&log, "stop").contains("tiny stopped after"), "{log}");
    // The guest's own console, through systemless's serial log of the VM.
    let serial = section(&log, "logs");
    assert!(serial.contains("agent: cpus ok online=2"), "the guest did not see its 2 vCPUs:\n{serial}");
    assert!(serial.contains("agent: powerbutton ok pressed"), "stop did not reach the guest as a power button press:\n{serial}");
    assert!(section(&log, "list").contains("stopped"), "{log}");
    // SIGTERM: systemless stops cleanly and says so.
    assert!(log.contains("rayos-systemless: stopped") && log.contains("testinit: sl exit=0 "), "systemless did not stop cleanly:\n{log}");
}
