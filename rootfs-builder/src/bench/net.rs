//! `cargo rayos bench net`: how long after its cable comes in the machine has a DHCP lease,
//! rayos-netd beside the kernel's own boot-time DHCP client (`ip=dhcp`, CONFIG_IP_PNP_DHCP)
//! on the same card (an e1000 on QEMU's user-mode network), machine and run.
//!
//! netd measures itself from the carrier event to the lease on the interface and logs it
//! (`…, N ms after the cable came in`); the kernel's figure is the printk time from its
//! driver's `Link is Up` to `IP-Config: Got DHCP answer`. Both start at the carrier; the
//! kernel's ends at the answer, netd's once the address and route are on, so the comparison
//! leans, if anything, against netd.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use rootfs_builder::qemu::{Boot, Nic, QemuConfig, Serial};
use rootfs_builder::{accel, build, paths, progress};

use super::{median, wait_line, Targets};

/// How much slower than the kernel's own client netd may be. The uplink's lease time is set
/// mostly by the network (the server, the NIC's link training): under QEMU 7.2 the first
/// answer on a freshly up e1000 takes ~1 s for either client, and retrying after 250 ms
/// instead of 1 s changed nothing (1007 vs 1029 ms). So the target is relative: netd adds
/// no delay of its own. (Issue #16's 1 s figure is for guests leasing from RayOS's own server.)
const SLACK_MS: u64 = 100;

/// The printk timestamp of a kernel console line (`[    2.206348] …`), in microseconds.
pub fn printk_us(line: &str) -> Option<u64> {
    let inner = line
        .trim_start()
        .strip_prefix('[')?
        .split(']')
        .next()?
        .trim();
    let (s, frac) = inner.split_once('.')?;
    Some(s.parse::<u64>().ok()? * 1_000_000 + frac.parse::<u64>().ok()?)
}

/// The figure netd logs: `…, 123 ms after the cable came in`.
pub fn netd_ms(line: &str) -> Option<u64> {
    let before = line.strip_suffix(" ms after the cable came in")?;
    before.rsplit(", ").next()?.parse().ok()
}

pub fn net(runs: usize) -> Result<()> {
    let a = build::all()?;
    let dir = paths::out_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let accel = accel::detect();
    progress::step(
        "bench",
        format!("net, {runs} runs each, {}", accel.describe()),
    );
    let machine = |cmdline: &str, log: &Path| {
        let mut cfg = QemuConfig::new(
            accel.clone(),
            Boot::Direct {
                kernel: a.kernel.clone(),
                initramfs: a.initramfs.clone(),
                cmdline: cmdline.into(),
            },
        );
        cfg.serial = Serial::File(log.to_path_buf());
        cfg.nics.push(Nic {
            model: "e1000",
            mac: "52:54:00:12:34:56".into(),
            net: "10.0.2.0/24".into(),
        });
        cfg.extra = vec!["-no-reboot".into()];
        let mut c = cfg.command();
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let base = "console=ttyS0,115200 panic=-1 rayos.mode=rescue";
    let (mut kernel_ms, mut netd) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let log = dir.join(format!("net-kernel-{i}.log"));
        let _ = std::fs::remove_file(&log);
        let mut child = machine(&format!("{base} ip=dhcp"), &log).spawn()?;
        let up = wait_line(&log, "NIC Link is Up", &mut child, Duration::from_secs(240));
        let got = up.as_ref().ok().map(|_| {
            wait_line(
                &log,
                "IP-Config: Got DHCP answer",
                &mut child,
                Duration::from_secs(120),
            )
        });
        let _ = child.kill();
        let _ = child.wait();
        let (up, got) = (up?, got.unwrap()?);
        let us = printk_us(&got)
            .context("no timestamp")?
            .saturating_sub(printk_us(&up).context("no timestamp")?);
        kernel_ms.push(us / 1000);

        let log = dir.join(format!("net-netd-{i}.log"));
        let _ = std::fs::remove_file(&log);
        let mut child = machine(base, &log).spawn()?;
        let line = wait_line(
            &log,
            "ms after the cable came in",
            &mut child,
            Duration::from_secs(240),
        );
        let _ = child.kill();
        let _ = child.wait();
        let line = line?;
        netd.push(netd_ms(&line).with_context(|| format!("no figure in `{line}`"))?);
        eprintln!(
            "    run {}: kernel ip=dhcp {} ms, rayos-netd {} ms",
            i + 1,
            kernel_ms[i],
            netd[i]
        );
    }
    let (k, n) = (median(&mut kernel_ms), median(&mut netd));
    let mut targets = Targets::default();
    println!(
        "net: cable in → DHCP lease (median of {runs}, e1000 on QEMU user networking, {}):",
        accel.describe()
    );
    println!("  kernel's ip=dhcp (baseline)      {k:>6} ms");
    println!(
        "  rayos-netd                       {n:>6} ms   {}",
        targets.at_most(
            "rayos-netd lease",
            n,
            k + SLACK_MS,
            "ms (the baseline + 100 ms)"
        )
    );
    println!("  (the VMs' side, their lease time and the NAT's throughput: `cargo rayos bench nat`)");
    targets.finish("bench net")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_read_from_the_console_lines() {
        assert_eq!(
            printk_us("[    2.206348] e1000: eth0 NIC Link is Up 1000 Mbps"),
            Some(2_206_348)
        );
        assert_eq!(printk_us("rayosd: ready"), None);
        let l = "netd:  INFO eth0: bound to 10.0.2.15/24 gateway 10.0.2.2 dns 10.0.2.3 for 86400 s (server 10.0.2.2), 123 ms after the cable came in";
        assert_eq!(netd_ms(l), Some(123));
        assert_eq!(
            netd_ms("netd:  INFO eth0: bound to 10.0.2.15/24 for 86400 s (server 10.0.2.2)"),
            None
        );
    }
}
