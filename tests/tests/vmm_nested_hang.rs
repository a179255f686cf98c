//! A guest that hangs on purpose is ended by the VMM's no-progress check: real `rayos-vmm`
//! processes inside QEMU with nested KVM (see `rayos_tests::nested`). The nested guest's
//! agent writes its disk and then stops for good before it reaches "init" (it writes the
//! boot-timer port late, as the default Debian guest's agent service does), the way the
//! default VM was seen to stop right after its virtio-blk came up (issue #12). A healthy
//! guest of the same shape beside it must not be judged hung.

use std::time::Duration;

use rayos_tests::nested::{boot_timer_lines, section, Outer};

/// The hang bound for these runs: the spec's `hang_timeout_ms` (the default is 60 s).
const HANG_MS: u64 = 20_000;

fn spec(name: &str, checks: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name, "vcpus": 2, "memory_mib": 256,
        "kernel": "/guest/bzImage", "initramfs": "/guest/initrd",
        "cmdline": format!("console=ttyS0 quiet rayos.agent={checks} rayos.agent_boot_timer=late"),
        "disks": [{"path": format!("/tmp/{name}.img")}],
        "serial_stdout": true,
        "hang_timeout_ms": HANG_MS,
    })
}

/// The number after `key` in `s` (`key` then digits).
fn number_after(s: &str, key: &str) -> Option<u64> {
    let at = s.find(key)? + key.len();
    s[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[test]
fn vmm_ends_a_guest_that_hangs_after_its_disk_came_up() {
    let mut outer = Outer::new("vmm_nested_hang");
    outer.vmm("hang", &spec("hang", "disk-write,hang"), None);
    outer.vmm("healthy", &spec("healthy", "disk-write,disk-read"), None);
    let log = outer.boot(Duration::from_secs(900));

    let s = section(&log, "hang");
    assert!(s.contains("agent: disk-write ok"), "the guest did not use its disk first:\n{s}");
    assert!(s.contains("agent: hanging: spinning"), "the guest did not hang:\n{s}");
    assert!(s.contains("testinit: hang exit=11 "), "a hung guest must end its VMM with exit 11 (guest hung):\n{s}");
    assert!(
        s.contains("the guest stopped making progress before it reached init: no vCPU exit and no virtio notification for"),
        "no clear reason for the hang:\n{s}"
    );
    assert_eq!(boot_timer_lines(s), 0, "the hung guest reached init:\n{s}");
    let quiet = number_after(s, "no virtio notification for ").unwrap();
    assert!(quiet * 1000 >= HANG_MS, "ended after {quiet} s of silence, before its bound of {HANG_MS} ms:\n{s}");
    // Noticed within the bound: the silence the VMM reports is the bound plus its 50 ms poll.
    assert!(quiet * 1000 < HANG_MS + 1000, "ended after {quiet} s of silence:\n{s}");
    let wall = number_after(s, "testinit: hang exit=11 ms=").unwrap();
    println!("hung guest: ended after {quiet} s of silence, {wall} ms after its VMM started");

    let s = section(&log, "healthy");
    assert!(s.contains("testinit: healthy exit=0 "), "the healthy guest did not power off cleanly:\n{s}");
    assert!(s.contains("agent: disk-read ok"), "{s}");
    assert_eq!(boot_timer_lines(s), 1, "the healthy guest did not reach init once:\n{s}");
    let longest = number_after(s, "longest pause in guest progress before init: ").unwrap_or_else(|| panic!("no pause figure:\n{s}"));
    println!("healthy guest: longest pause in progress before init {longest} ms (bound {HANG_MS} ms, default 60000 ms)");
    assert!(longest * 2 < HANG_MS, "a healthy boot came within 2x of the hang bound ({longest} ms):\n{s}");
}
