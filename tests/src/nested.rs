//! The outer VM of nested-KVM tests: QEMU (TCG, emulated AMD-V) boots the RayOS kernel
//! straight into `rayos-vmm-testinit` (vmm/src/bin), which runs each named run in turn: a VMM
//! on `/specs/<name>.json`, or the command in `/specs/<name>.cmd`, and prints
//! `testinit: <name> exit=<code> ms=<wall>`. The initramfs carries `/rayos-vmm`, the guest
//! kernel `/guest/bzImage` and the guest initramfs `/guest/initrd` (`rayos-guest-agent` as
//! init). Everything is read back from the outer serial console.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::initramfs::Initramfs;
use crate::{artifacts, Qemu, QemuBuilder};

/// The static release builds of the vmm crate's binaries (rayos-vmm, testinit, guest agent).
pub fn vmm_bins() -> &'static PathBuf {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| rootfs_builder::cargo_build::build_static(["vmm"]).expect("building the vmm binaries"))
}

/// An initramfs whose /init is `rayos-guest-agent`, written to `out`.
pub fn guest_initramfs(out: &Path) -> PathBuf {
    let mut g = Initramfs::new();
    g.file("/init", &vmm_bins().join("rayos-guest-agent"), 0o755).unwrap();
    g.write(out).unwrap();
    out.to_path_buf()
}

/// The part of a serial `log` that belongs to run `name`: after the previous run's exit line,
/// up to and including its own (a background run's output may be mixed in).
pub fn section<'a>(log: &'a str, name: &str) -> &'a str {
    let at = log.find(&format!("testinit: {name} exit=")).unwrap_or_else(|| panic!("run {name} never ended:\n{log}"));
    let end = at + log[at..].find('\n').unwrap_or(log.len() - at);
    let start = log[..at].rfind(" exit=").map(|i| i + log[i..].find('\n').unwrap_or(0)).unwrap_or(0);
    &log[start..end]
}

/// The VMM's own `boot-timer: guest init reached after …` lines in `s` (one run's section).
/// The VMM prints the line itself and logs it through tracing too (`… INFO rayos_vmm…:
/// boot-timer: …`); only the printed one starts a line, so each guest counts once.
pub fn boot_timer_lines(s: &str) -> usize {
    s.lines().filter(|l| l.trim_start().starts_with("boot-timer: guest init reached after")).count()
}

/// The control socket of [`Outer::systemless`].
pub const SYSTEMLESS_SOCK: &str = "/run/sl/control.sock";

/// A rayosctl command line against [`Outer::systemless`] (60 s timeout).
pub fn systemless_ctl<'a>(args: &[&'a str]) -> Vec<&'a str> {
    [&["/rayosctl", "--socket", SYSTEMLESS_SOCK, "--timeout", "60"][..], args].concat()
}

pub struct Outer {
    builder: QemuBuilder,
    ird: Initramfs,
    runs: Vec<String>,
    kernel_args: Vec<String>,
}

impl Outer {
    pub fn new(test: &str) -> Outer {
        let a = artifacts();
        let builder = Qemu::builder(test);
        let guest_initrd = guest_initramfs(&builder.workdir().join("guest-initrd"));
        let mut ird = Initramfs::new();
        ird.file("/init", &vmm_bins().join("rayos-vmm-testinit"), 0o755).unwrap();
        ird.file("/rayos-vmm", &vmm_bins().join("rayos-vmm"), 0o755).unwrap();
        ird.file("/guest/bzImage", &a.kernel, 0o644).unwrap();
        ird.file("/guest/initrd", &guest_initrd, 0o644).unwrap();
        for d in ["/dev", "/proc", "/sys", "/tmp", "/run"] {
            ird.dir(d, 0o755).unwrap();
        }
        Outer { builder, ird, runs: Vec::new(), kernel_args: Vec::new() }
    }

    /// The test's folder on the host.
    pub fn workdir(&self) -> &Path {
        self.builder.workdir()
    }

    /// A host file in the outer initramfs.
    pub fn file(&mut self, path: &str, src: &Path, mode: u32) -> &mut Self {
        self.ird.file(path, src, mode).unwrap();
        self
    }

    /// One more argument on the outer kernel's command line.
    pub fn kernel_arg(&mut self, arg: &str) -> &mut Self {
        self.kernel_args.push(arg.to_string());
        self
    }

    pub fn text(&mut self, path: &str, text: &str) -> &mut Self {
        self.ird.bytes(path, text.as_bytes().to_vec(), 0o644).unwrap();
        self
    }

    /// A VMM run on `spec`, driven by the control script `ctl` when given.
    pub fn vmm(&mut self, name: &str, spec: &serde_json::Value, ctl: Option<&str>) -> &mut Self {
        self.text(&format!("/specs/{name}.json"), &spec.to_string());
        if let Some(c) = ctl {
            self.text(&format!("/specs/{name}.ctl"), c);
        }
        self.runs.push(name.to_string());
        self
    }

    /// A command run: one argument per item; `#background` and `#wait-for PATH` are testinit's
    /// markers (leave it running; wait for PATH first).
    pub fn cmd(&mut self, name: &str, args: &[&str]) -> &mut Self {
        self.text(&format!("/specs/{name}.cmd"), &args.join("\n"));
        self.runs.push(name.to_string());
        self
    }

    /// Boots the outer VM (2 vCPUs, 2 GiB), runs everything, returns the serial log.
    /// `rayos-systemless --state-dir /run/sl` started in the background (waited for until its
    /// control socket [`SYSTEMLESS_SOCK`] exists), with `/rayosctl` beside it for
    /// [`systemless_ctl`] commands.
    pub fn systemless(&mut self) -> &mut Self {
        let bins = rootfs_builder::cargo_build::build_static(["systemless", "rayosd"]).expect("building systemless and rayosctl");
        self.file("/rayos-systemless", &bins.join("rayos-systemless"), 0o755);
        self.file("/rayosctl", &bins.join("rayosctl"), 0o755);
        self.cmd("sl", &["/rayos-systemless", "--state-dir", "/run/sl", "#background", &format!("#wait-for {SYSTEMLESS_SOCK}")])
    }

    pub fn boot(self, timeout: Duration) -> String {
        let Outer { builder, ird, runs, kernel_args } = self;
        let outer = builder.workdir().join("outer-initrd");
        ird.write(&outer).unwrap();
        let a = artifacts();
        let mut q = builder
            .direct_kernel(
                &a.kernel,
                &outer,
                &format!("console=ttyS0 panic=-1 quiet rayos.shmem_thp=advise rayos.vmmtest={} {}", runs.join(","), kernel_args.join(" ")),
            )
            .memory_mib(2048)
            .cpus(2)
            .no_reboot()
            .spawn()
            .unwrap();
        q.wait_for("testinit: all done", timeout).unwrap();
        q.serial_log()
    }
}
