//! rayos-installer: started by rayosd in `rayos.mode=installer` on /dev/console. Exit 0 means
//! "installed, reboot now"; any other exit makes rayosd start it again (a fresh disk scan).
//!
//! With an answer file (`rayos.answers=<path on the USB ESP>` on the kernel command line, or
//! `rayos/answers.toml` on the USB ESP) it installs unattended; otherwise, or when the answer
//! file is invalid, it runs the wizard.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;

use installer::answers;
use installer::disks::{self, Disk, SystemPaths};
use installer::efiboot;
use installer::esp::{self, BootFiles};
use installer::guids;
use installer::install::{self, Environment};
use installer::plan::make_plan;
use installer::wizard::{self, terminal::Progress, Wizard};

#[derive(Parser, Debug)]
#[command(about = "RayOS installer")]
struct Args {
    /// sysfs block class (a fake tree for testing on a host)
    #[arg(long, default_value = "/sys/class/block")]
    sys_class_block: PathBuf,
    /// device node directory
    #[arg(long, default_value = "/dev")]
    dev: PathBuf,
    /// efivarfs mount point
    #[arg(long, default_value = efiboot::EFIVARS)]
    efivars: PathBuf,
    /// tmpfs where the data volume is staged
    #[arg(long, default_value = "/run")]
    staging: PathBuf,
    #[arg(long, default_value = "/usr/sbin/mke2fs")]
    mke2fs: PathBuf,
    /// kernel command line to read rayos.answers= from
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
    /// take the boot files from this USB image/device instead of finding the boot medium
    #[arg(long)]
    medium: Option<PathBuf>,
    /// tty class directory (which consoles the kernel uses, and whether a serial port exists)
    #[arg(long, default_value = "/sys/class/tty")]
    sys_class_tty: PathBuf,
    /// the kernel's printk levels, lowered while the installer draws on the consoles
    #[arg(long, default_value = "/proc/sys/kernel/printk")]
    printk: PathBuf,
    /// kbd's loadkeys, which puts the chosen keyboard layout on the screen's VT
    #[arg(long, default_value = installer::keymap::LOADKEYS)]
    loadkeys: PathBuf,
}

use installer::console::{self, say, ConsolePaths, QuietKernel};

fn answers_arg(cmdline: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix("rayos.answers=")).map(str::to_string)
}

/// The USB medium's ESP: on the disk systemd-boot ran from, or carrying the installer entry.
fn find_medium(all: &[Disk], boot: Option<uuid::Uuid>, explicit: Option<&PathBuf>) -> Option<(PathBuf, u64, u64)> {
    let esp_of = |d: &Disk| {
        d.partitions
            .iter()
            .filter(|p| p.type_guid == guids::ESP)
            .find(|p| boot.is_none_or(|b| p.part_uuid == b) || d.carries_installer)
            .map(|p| (d.device.clone(), p.first_lba * d.logical_sector, p.size_bytes))
    };
    if let Some(path) = explicit {
        let mut f = File::open(path).ok()?;
        let gpt = gptman::GPT::find_from(&mut f).ok()?;
        let (_, e) = gpt.iter().find(|(_, e)| e.is_used() && uuid::Uuid::from_bytes_le(e.partition_type_guid) == guids::ESP)?;
        return Some((path.clone(), e.starting_lba * gpt.sector_size, (e.ending_lba + 1 - e.starting_lba) * gpt.sector_size));
    }
    all.iter()
        .find(|d| boot.is_some_and(|b| d.partitions.iter().any(|p| p.part_uuid == b)))
        .or_else(|| all.iter().find(|d| d.carries_installer))
        .and_then(esp_of)
}

fn unattended(env: &Environment, all: &[Disk], files: &BootFiles, name: &str, text: &str) -> Result<()> {
    let a = answers::parse(name, text)?;
    let disk = a.select_disk(name, all)?;
    let plan = make_plan(disk, a.target.clone(), a.vm_storage.clone()).with_context(|| format!("{name}: disk.target"))?;
    a.check_confirm(name, &plan)?;
    say(&format!("unattended install from {name}"));
    for line in plan.describe() {
        say(&line);
    }
    // One line per step, not one per percent.
    let mut last = String::new();
    let report = install::install(env, &plan, &a.config, files, Some(text), &mut |pct, msg| {
        if msg != last {
            say(&format!("[{pct:>3}%] {msg}"));
            last = msg.to_string();
        }
    })?;
    say(&format!(
        "installed in {} ms, {} bytes written{}",
        report.duration.as_millis(),
        report.bytes_written,
        report.boot_entry.map(|n| format!(", boot entry Boot{n:04X}")).unwrap_or_default()
    ));
    Ok(())
}

fn run() -> Result<ExitCode> {
    let args = Args::parse();
    let (consoles, unusable) = console::discover(&ConsolePaths { sys_class_tty: args.sys_class_tty.clone(), dev: args.dev.clone() });
    console::set_line_outputs(&consoles);
    for why in &unusable {
        say(&format!("console not used: {why}"));
    }
    // Kernel messages would scribble over the wizard; they still reach kmsg and rayosd's log.
    let _quiet = QuietKernel::new(&args.printk);
    let env = Environment {
        paths: SystemPaths { sys_class_block: args.sys_class_block.clone(), dev: args.dev.clone() },
        efivars: Some(args.efivars.clone()),
        staging_base: args.staging.clone(),
        mke2fs: args.mke2fs.clone(),
    };
    let boot = efiboot::loader_device_part_uuid(&args.efivars);
    // USB sticks are often enumerated seconds after rayosd starts us: wait for the medium
    // (and let slow disks settle) before showing or choosing anything.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut waited = false;
    let (all, found) = loop {
        let all = disks::enumerate(&env.paths, boot)?;
        let found = find_medium(&all, boot, args.medium.as_ref());
        if found.is_some() || std::time::Instant::now() > deadline {
            break (all, found);
        }
        if !waited {
            say("waiting for the RayOS USB medium to appear");
            waited = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    if waited {
        // Other disks on the same bus may trail the medium by a moment.
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    let all = if waited { disks::enumerate(&env.paths, boot)? } else { all };
    for d in &all {
        let why = d.ineligible.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
        say(&format!("disk {}: {}{}", d.name, d.describe(), if why.is_empty() { String::new() } else { format!(" - not usable: {why}") }));
    }
    let Some((medium, off, len)) = found else {
        bail!("cannot find the RayOS USB medium (no disk with the boot partition or the installer entry)");
    };
    let cmdline = std::fs::read_to_string(&args.cmdline).unwrap_or_default();
    let answers_path = answers_arg(&cmdline);
    let mut f = File::open(&medium).with_context(|| format!("{}", medium.display()))?;
    let files = esp::read_boot_files(&mut f, off, len, answers_path.as_deref())?;
    drop(f);

    let mut note = None;
    if let Some((name, text)) = &files.answers {
        match unattended(&env, &all, &files, name, text) {
            Ok(()) => return Ok(ExitCode::SUCCESS),
            Err(e) => {
                say(&format!("unattended install refused: {e:#}"));
                say("starting the interactive installer instead");
                note = Some(format!("Answer file refused: {e:#}"));
            }
        }
    }

    let mut w = Wizard::new(all);
    w.message = note;
    let env2 = env.clone();
    let outcome = wizard::terminal::run(w, consoles, Some(args.loadkeys.clone()), move |w: &Wizard, tx| {
        let plan = w.plan.clone().expect("a plan before confirmation");
        let cfg = w.config.clone();
        let answers = w.answers_toml();
        std::thread::spawn(move || {
            let tx2 = tx.clone();
            let r = install::install(&env2, &plan, &cfg, &files, answers.as_deref(), &mut |pct, msg| {
                let _ = tx2.send(Progress::Step(pct, msg.to_string()));
            });
            let _ = tx.send(Progress::Finished(
                r.map(|r| format!("Installed in {:.1} s, {} bytes written.", r.duration.as_secs_f64(), r.bytes_written))
                    .map_err(|e| e.to_string()),
            ));
        });
    })
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; connect a screen and keyboard or a serial console, or put rayos/answers.toml on the USB stick \
             for an unattended install"
        )
    })?;
    Ok(match outcome {
        wizard::terminal::Outcome::Reboot => {
            say("installed; rebooting");
            ExitCode::SUCCESS
        }
        wizard::terminal::Outcome::Restart => ExitCode::from(2),
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_ansi(false).with_target(false).with_writer(std::io::stderr).with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
    ).init();
    match run() {
        Ok(code) => code,
        Err(e) => {
            say(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
