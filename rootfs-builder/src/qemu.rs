//! The QEMU machine RayOS runs on for `cargo rayos run`, the tests and the benchmarks: one
//! definition, so tests boot what users boot.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::accel::Accel;
use crate::{paths, qemu_pkg};

#[derive(Debug, Clone)]
pub enum Boot {
    /// Through OVMF (UEFI) from a disk (normally the USB image) — the real path.
    Uefi { vars: PathBuf },
    /// `-kernel/-initrd/-append`: no firmware, for benchmarks and low-level tests.
    Direct { kernel: PathBuf, initramfs: PathBuf, cmdline: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// A USB stick on xHCI: how users boot the installer.
    Usb,
    Nvme,
    /// SATA through AHCI (q35's built-in controller).
    Ahci,
    VirtioBlk,
}

#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub bus: DiskBus,
    pub serial: String,
    /// Discard writes when QEMU exits (the image file is left as it was).
    pub snapshot: bool,
    pub format: &'static str,
}

#[derive(Debug, Clone)]
pub enum Serial {
    /// On the terminal, with QEMU's monitor multiplexed (Ctrl-A X quits).
    Stdio,
    /// A unix socket QEMU listens on and waits for before starting (nothing is lost).
    Socket(PathBuf),
    File(PathBuf),
    /// No serial port at all (`-serial none`), like most laptops.
    None,
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub accel: Accel,
    pub boot: Boot,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disks: Vec<Disk>,
    pub serial: Serial,
    /// Show a window (else `-display none`; the screen is still there for QMP screendump).
    pub window: bool,
    pub qmp: Option<PathBuf>,
    /// virtio-serial port `org.rayos.control` on this host unix socket.
    pub control: Option<PathBuf>,
    /// The monitor's preferred mode (virtio-gpu `xres`/`yres`); QEMU's default (1280x800)
    /// when unset.
    pub screen: Option<(u32, u32)>,
    /// The machine's wired network cards.
    pub nics: Vec<Nic>,
    pub extra: Vec<String>,
}

/// A wired network card on its own QEMU user-mode network (slirp): in `net` (a /24), the
/// gateway and DHCP server is .2 (also the host's loopback) and DNS is .3; the first address
/// handed out is .15.
#[derive(Debug, Clone)]
pub struct Nic {
    /// The QEMU device model (`e1000e`, `e1000`, `virtio-net-pci`): RayOS's own hardware
    /// driver for it is what runs.
    pub model: &'static str,
    pub mac: String,
    /// "10.0.2.0/24".
    pub net: String,
}

impl Nic {
    /// The Intel NIC of q35 (and of many real PCs) on QEMU's default 10.0.2.0/24.
    pub fn e1000e() -> Nic {
        Nic { model: "e1000e", mac: "52:54:00:12:34:56".into(), net: "10.0.2.0/24".into() }
    }

    /// The QEMU device id of the `i`th card, for QMP `set_link` (its cable pulled and put
    /// back).
    pub fn device_id(i: usize) -> String {
        format!("nic{i}")
    }
}

impl QemuConfig {
    pub fn new(accel: Accel, boot: Boot) -> Self {
        QemuConfig {
            accel,
            boot,
            memory_mib: 2048,
            cpus: 2,
            disks: Vec::new(),
            serial: Serial::Stdio,
            window: false,
            qmp: None,
            control: None,
            screen: None,
            nics: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Log every CPU reset to `path` with the registers before it (`-d cpu_reset`): the only
    /// trace a triple fault of the machine leaves (see [`triple_fault`]).
    pub fn log_cpu_resets(&mut self, path: &Path) {
        self.extra.extend(["-d".into(), "cpu_reset".into(), "-D".into(), path.display().to_string()]);
    }

    pub fn disk(mut self, path: &Path, bus: DiskBus, serial: &str) -> Self {
        self.disks.push(Disk { path: path.to_path_buf(), bus, serial: serial.to_string(), snapshot: false, format: "raw" });
        self
    }

    pub fn command(&self) -> Command {
        // The pinned QEMU (qemu_pkg), or RAYOS_QEMU_ROOT's: its binary, firmware blobs, modules.
        let root = qemu_pkg::root();
        let mut c = Command::new(qemu_pkg::binary(&root));
        c.env("QEMU_MODULE_DIR", root.join("usr/lib/x86_64-linux-gnu/qemu"));
        c.arg("-L").arg(root.join("usr/share/qemu"));
        // No PS/2 controller: input is USB (keyboard, tablet) as on current PCs. Besides, the
        // kernel's PS/2 mouse probing is slow under TCG and once oopsed there (cypress_detect).
        c.args(["-machine", "q35,i8042=off", "-nodefaults", "-no-user-config"]);
        c.args(self.accel.qemu_args());
        c.args(["-m", &self.memory_mib.to_string(), "-smp", &self.cpus.to_string()]);
        match &self.boot {
            Boot::Uefi { vars } => {
                c.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={}", paths::OVMF_CODE));
                c.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
            }
            Boot::Direct { kernel, initramfs, cmdline } => {
                c.arg("-kernel").arg(kernel).arg("-initrd").arg(initramfs).arg("-append").arg(cmdline);
            }
        }
        // The screen: virtio-gpu has a GOP driver in OVMF and a DRM driver in our kernel.
        match self.screen {
            Some((w, h)) => c.args(["-device", &format!("virtio-gpu-pci,xres={w},yres={h}")]),
            None => c.args(["-device", "virtio-gpu-pci"]),
        };
        c.args(["-display", if self.window { "gtk" } else { "none" }]);
        c.args(["-device", "virtio-rng-pci"]);
        c.args(["-device", "qemu-xhci,id=xhci", "-device", "usb-kbd,bus=xhci.0,id=kbd0", "-device", "usb-tablet,bus=xhci.0"]);
        match &self.serial {
            Serial::Stdio => {
                c.args(["-serial", "mon:stdio"]);
            }
            Serial::Socket(p) => {
                c.arg("-chardev").arg(format!("socket,id=ser0,path={},server=on,wait=on", p.display()));
                c.args(["-serial", "chardev:ser0"]);
            }
            Serial::File(p) => {
                c.arg("-serial").arg(format!("file:{}", p.display()));
            }
            Serial::None => {
                c.args(["-serial", "none"]);
            }
        }
        if let Some(q) = &self.qmp {
            c.arg("-qmp").arg(format!("unix:{},server=on,wait=off", q.display()));
        }
        if let Some(s) = &self.control {
            c.args(["-device", "virtio-serial-pci,id=vser"]);
            c.arg("-chardev").arg(format!("socket,id=ctl,path={},server=on,wait=off", s.display()));
            c.args(["-device", "virtserialport,bus=vser.0,chardev=ctl,name=org.rayos.control"]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            let id = format!("disk{i}");
            let dev = device_id(i);
            c.arg("-drive").arg(format!(
                "file={},if=none,id={id},format={}{}",
                d.path.display(),
                d.format,
                if d.snapshot { ",snapshot=on" } else { "" }
            ));
            match d.bus {
                DiskBus::Usb => c.arg("-device").arg(format!("usb-storage,bus=xhci.0,drive={id},id={dev},removable=on,serial={}", d.serial)),
                DiskBus::Nvme => c.arg("-device").arg(format!("nvme,drive={id},id={dev},serial={}", d.serial)),
                DiskBus::Ahci => c.arg("-device").arg(format!("ide-hd,drive={id},id={dev},bus=ide.{i},serial={}", d.serial)),
                DiskBus::VirtioBlk => c.arg("-device").arg(format!("virtio-blk-pci,drive={id},id={dev},serial={}", d.serial)),
            };
        }
        for (i, n) in self.nics.iter().enumerate() {
            c.arg("-netdev").arg(format!("user,id=uplink{i},net={}", n.net));
            c.arg("-device").arg(format!("{},netdev=uplink{i},id={},mac={}", n.model, Nic::device_id(i), n.mac));
        }
        c.args(&self.extra);
        c
    }
}

/// The QEMU device id of the `i`th disk (for QMP `device_del`: a USB stick pulled out).
pub fn device_id(i: usize) -> String {
    format!("disk{i}-dev")
}

/// What QEMU's `-d cpu_reset` log (see [`QemuConfig::log_cpu_resets`]) says of a triple
/// fault of the machine, issue #12's silent resets: the registers QEMU dumped after its
/// `Triple fault` line (the CPU's state before the reset; none when QEMU exited instead, with
/// `-no-reboot`). `None` when no triple fault was logged (resets asked for are not faults).
pub fn triple_fault(cpu_log: &str) -> Option<String> {
    let at = cpu_log.find("Triple fault")?;
    let after = &cpu_log[at..];
    if !after.contains("CPU Reset (CPU ") {
        return Some("a triple fault (QEMU exited rather than reset, so it dumped no registers)".into());
    }
    let reg = |name: &str| after.split_whitespace().find_map(|w| w.strip_prefix(name)).map(str::to_string).unwrap_or_else(|| "?".into());
    // QEMU does not say which CPU faulted; it resets them in order and dumps each.
    let cpu = after.split("CPU Reset (CPU ").nth(1).and_then(|r| r.split(')').next()).unwrap_or("?");
    Some(format!(
        "a triple fault; CPU {cpu}, the first reset after it, was at RIP={} (CR2={}, RSP={}, CR3={})",
        reg("RIP="),
        reg("CR2="),
        reg("RSP="),
        reg("CR3=")
    ))
}

/// A fresh, writable copy of OVMF's variable store.
pub fn fresh_vars(dest: &Path) -> std::io::Result<()> {
    std::fs::copy(paths::OVMF_VARS, dest).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_triple_fault_is_told_by_the_registers_qemu_logged() {
        let log = "CPU Reset (CPU 0)\nRAX=0 RBX=0\nEIP=0000fff0 EFL=00000002\n\
            Triple fault\nCPU Reset (CPU 0)\nRAX=0000000001bc2000 RBX=0000000000000000\n\
            RSI=00000000ffffffff RDI=0000000000000b2c RBP=ffffffffa5609d00 RSP=ffffa1a980cc7cc8\n\
            RIP=ffffffffa9c1188c RFL=00000246 [---Z-P-] CPL=0\n\
            CR0=80050033 CR2=fffffe0000000080 CR3=0000000001467000 CR4=003506f0\n";
        assert_eq!(
            triple_fault(log).unwrap(),
            "a triple fault; CPU 0, the first reset after it, was at RIP=ffffffffa9c1188c (CR2=fffffe0000000080, RSP=ffffa1a980cc7cc8, CR3=0000000001467000)"
        );
        // Resets at start and reboots asked for are no faults.
        assert_eq!(triple_fault("CPU Reset (CPU 0)\nEIP=0000fff0\nCPU Reset (CPU 1)\n"), None);
        assert!(triple_fault("CPU Reset (CPU 0)\nEIP=0000fff0\nTriple fault\n").unwrap().contains("exited rather than reset"));
    }
}
