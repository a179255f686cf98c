//! `cargo rayos …`: build RayOS, boot it in QEMU, run every test, print benchmarks.

mod bench;

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rootfs_builder::qemu::{Boot, DiskBus, QemuConfig, Serial};
use rootfs_builder::{accel, build, hostdeps, image, kernel, paths, progress, qemu_pkg};

#[derive(Parser)]
#[command(name = "cargo rayos", about = "Build RayOS, boot it in QEMU, run its tests and benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or take from the cache) the trimmed kernel.
    Kernel,
    /// Build the static RayOS binaries and pack the initramfs.
    Initramfs,
    /// Build everything into the USB image (target/rayos/rayos-usb.img).
    Image,
    /// Build what is stale, then boot the USB image in QEMU through UEFI with a blank
    /// 20 GiB NVMe disk to install onto.
    Run {
        /// Start over: a blank target disk and fresh UEFI variables (deletes target/rayos/run).
        #[arg(long)]
        fresh: bool,
        /// Boot the "RayOS rescue" entry instead of the installer.
        #[arg(long)]
        rescue: bool,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 4096)]
        memory: u32,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
    },
    /// Build (or take from the cache) the default Linux guest: Debian bookworm (debootstrap)
    /// with the RayOS guest agent, on an ext4 disk image.
    Guest,
    /// Build, then run every unit and integration test (extra arguments go to `cargo test`).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The whole product as a user meets it, step by step: the USB stick boots the
    /// installer, the wizard is driven by keys, the installed disk boots alone, the Linux VM
    /// is presented and typed into, RayOS reboots (the VM resumes), then powers off. It is
    /// the end-to-end test itself, shown in a window when there is a display.
    Demo,
    /// Print benchmark figures.
    Bench {
        #[command(subcommand)]
        what: bench::What,
    },
    /// (internal) Run a tiny guest on host KVM; exit 0 if it works.
    #[command(hide = true)]
    KvmProbe,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::KvmProbe => {
            return match accel::probe() {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::Kernel => {
            hostdeps::ensure(hostdeps::BUILD)?;
            let k = kernel::ensure()?;
            let size = std::fs::metadata(&k.bzimage)?.len();
            println!("{} ({}, linux-source {})", k.bzimage.display(), progress::fmt_size(size), k.source_version);
            let size = std::fs::metadata(&k.vmlinux)?.len();
            println!("{} ({}, stripped ELF of the same build)", k.vmlinux.display(), progress::fmt_size(size));
        }
        Cmd::Initramfs | Cmd::Image => {
            let a = build::all()?;
            println!("kernel     {}", a.kernel.display());
            println!("vmlinux    {}", a.vmlinux.display());
            println!("initramfs  {}", a.initramfs.display());
            println!("USB image  {}", a.usb_image.display());
        }
        Cmd::Run { fresh, rescue, memory, cpus } => run_qemu(fresh, rescue, memory, cpus)?,
        Cmd::Guest => {
            hostdeps::ensure(hostdeps::BUILD)?;
            let g = rootfs_builder::guest::ensure_default_linux_guest()?;
            println!("disk     {} ({})", g.disk.display(), progress::fmt_size(g.size));
            println!("kernel   {}", g.kernel.display());
            println!("cmdline  {}", g.cmdline);
        }
        Cmd::Test { args } => return test(args),
        Cmd::Demo => return demo(),
        Cmd::Bench { what } => {
            hostdeps::ensure(&[hostdeps::BUILD, hostdeps::RUN].concat())?;
            qemu_pkg::ensure()?;
            bench::run(what)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_qemu(fresh: bool, rescue: bool, memory: u32, cpus: u32) -> Result<()> {
    hostdeps::ensure(&[hostdeps::BUILD, hostdeps::RUN].concat())?;
    qemu_pkg::ensure()?;
    let a = build::all()?;
    let run_dir = paths::out_dir().join("run");
    if fresh && run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).with_context(|| format!("removing {}", run_dir.display()))?;
    }
    std::fs::create_dir_all(&run_dir)?;
    let target = run_dir.join("target-disk.img");
    if !target.exists() {
        let f = std::fs::File::create(&target)?;
        f.set_len(20 << 30)?; // sparse: takes no space until written
    }
    let vars = run_dir.join("ovmf-vars.fd");
    if !vars.exists() {
        rootfs_builder::qemu::fresh_vars(&vars).with_context(|| format!("copying {}", paths::OVMF_VARS))?;
    }
    let mut usb = a.usb_image.clone();
    if rescue {
        usb = run_dir.join("usb-rescue.img");
        std::fs::copy(&a.usb_image, &usb)?;
        image::set_default_entry(&usb, image::RESCUE_ENTRY)?;
    }
    let accel = accel::detect();
    println!("RayOS: booting {} in QEMU through UEFI", usb.display());
    println!("  accelerator: {}", accel.describe());
    println!("  install target: {} (20 GiB NVMe, serial RAYOS-TARGET)", target.display());
    println!("  network: an e1000e on QEMU's user-mode network (10.0.2.0/24; `rayosctl net status`)");
    let control = run_dir.join("control.sock");
    let _ = std::fs::remove_file(&control);
    println!("  control API: cargo run -p rayosd --bin rayosctl -- --socket {} status", control.display());
    println!("  serial console below; Ctrl-A X quits QEMU");
    let window = std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    let mut cfg = QemuConfig::new(accel, Boot::Uefi { vars })
        .disk(&usb, DiskBus::Usb, "RAYOS-USB")
        .disk(&target, DiskBus::Nvme, "RAYOS-TARGET");
    cfg.disks[0].snapshot = true; // the stick is the release image: keep it as built
    cfg.memory_mib = memory;
    cfg.cpus = cpus;
    cfg.window = window && std::io::stdout().is_terminal();
    cfg.serial = Serial::Stdio;
    cfg.control = Some(control);
    cfg.qmp = Some(run_dir.join("qmp.sock"));
    // A wired network like a PC's: RayOS takes a DHCP lease from QEMU's user-mode network.
    cfg.nics.push(rootfs_builder::qemu::Nic::e1000e());
    let status = cfg.command().status().context("starting qemu-system-x86_64")?;
    if !status.success() {
        bail!("QEMU exited with {status}");
    }
    Ok(())
}

fn test(args: Vec<String>) -> Result<ExitCode> {
    hostdeps::ensure(&[hostdeps::BUILD, hostdeps::RUN, hostdeps::TEST].concat())?;
    qemu_pkg::ensure()?;
    let a = build::all()?;
    progress::step("test", "cargo test --workspace");
    let status = cargo_test(&a, ["--workspace", "--no-fail-fast"].iter().map(|s| s.to_string()).chain(args), false)?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The demo is the end-to-end test (one flow, kept green by CI), with its steps printed as
/// they happen and the machine's screen in a window when there is a display to show it on.
fn demo() -> Result<ExitCode> {
    hostdeps::ensure(&[hostdeps::BUILD, hostdeps::RUN, hostdeps::TEST].concat())?;
    qemu_pkg::ensure()?;
    let a = build::all()?;
    let window = std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    progress::step(
        "demo",
        format!(
            "install from the USB stick, present the Linux VM, type, reboot, power off (10-15 min under TCG){}",
            if window { "; QEMU's window shows the machine's screen" } else { "; no display: steps are printed only" }
        ),
    );
    let args = ["-p", "rayos-tests", "--test", "end_to_end", "--", "--nocapture"];
    let status = cargo_test(&a, args.iter().map(|s| s.to_string()), window)?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn cargo_test(a: &build::Artifacts, args: impl IntoIterator<Item = String>, window: bool) -> Result<std::process::ExitStatus> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = std::process::Command::new(cargo);
    c.current_dir(paths::workspace()).arg("test").args(args);
    c.env("RAYOS_ARTIFACTS", &a.dir);
    if window {
        c.env("RAYOS_QEMU_WINDOW", "1");
    }
    c.status().context("running cargo test")
}

