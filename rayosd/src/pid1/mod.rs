//! PID 1 duties: early setup, the main loop, signals and the orderly shutdown.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rayosd::cmdline::BootOptions;
use rayosd::power::{final_reboot, PowerAction};
use rayosd::reaper::Reaper;
use rayosd::{efivars, log, mounts, timeline};
use tracing::{error, info, warn};

/// How long services get between SIGTERM and SIGKILL at shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs PID 1. Never returns.
pub fn boot(init_uptime_ms: u64) -> ! {
    std::panic::set_hook(Box::new(|info| {
        log::sink().log(tracing::Level::ERROR, "rayosd", &format!("fatal: {info}; rebooting"));
        final_reboot(PowerAction::Reboot);
    }));

    let mount_errors = mounts::mount_api_filesystems();
    log::sink().open_kernel_outputs();
    ensure_standard_fds();
    // Userspace writes to /dev/kmsg are rate-limited (10 per 5 s) unless this is on.
    let _ = std::fs::write("/proc/sys/kernel/printk_devkmsg", "on\n");
    log::init_tracing(tracing::Level::DEBUG);

    info!("starting pid=1 uptime_ms={init_uptime_ms}");
    for e in &mount_errors {
        warn!("{e}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cmdline = cmdline.trim_end();
    info!("cmdline: {cmdline}");
    if let Some(entry) = efivars::loader_entry_selected(std::path::Path::new(efivars::EFIVARFS)) {
        info!("boot entry: {entry}");
    }
    let opts = BootOptions::parse(cmdline);
    for w in &opts.warnings {
        warn!("{w}");
    }
    info!("mode: {}", opts.mode);

    // The kernel then sends SIGINT on ctrl-alt-del instead of rebooting at once.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        warn!("could not hand ctrl-alt-del to rayosd: {e}");
    }

    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("fatal: cannot start the event loop: {e}; rebooting");
            final_reboot(PowerAction::Reboot);
        }
    };
    let action = rt.block_on(run(opts, init_uptime_ms));
    final_reboot(action)
}

/// Without /dev/console in the initramfs the kernel starts init with fds 0-2 closed; children
/// would then get whatever file rayosd opens first as their stdout.
fn ensure_standard_fds() {
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            let target = std::fs::OpenOptions::new()
                .read(fd == 0)
                .write(fd != 0)
                .open("/dev/console")
                .or_else(|_| std::fs::OpenOptions::new().read(true).write(true).open("/dev/null"));
            if let Ok(f) = target {
                // SAFETY: dup2 onto a closed standard fd; `f` stays valid for the call.
                unsafe { libc::dup2(f.as_raw_fd(), fd) };
            }
        }
    }
}

async fn run(opts: BootOptions, init_uptime_ms: u64) -> PowerAction {
    use tokio::signal::unix::{signal, SignalKind};
    let reaper = std::sync::Arc::new(Reaper::new());
    {
        let r = reaper.clone();
        tokio::spawn(async move {
            if let Err(e) = r.run().await {
                error!("reaper stopped: {e}");
            }
        });
    }
    let (mut term, mut int, mut usr1, mut usr2) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
        _ => {
            error!("fatal: cannot install signal handlers; rebooting");
            return PowerAction::Reboot;
        }
    };

    info!(
        "ready mode={} init_uptime_ms={} ready_uptime_ms={}",
        opts.mode,
        init_uptime_ms,
        timeline::uptime_ms()
    );

    let action = loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: powering off"); break PowerAction::PowerOff; }
            _ = int.recv() => { info!("SIGINT (ctrl-alt-del): rebooting"); break PowerAction::Reboot; }
            _ = usr1.recv() => {
                info!("status: mode={} uptime_ms={} orphans_reaped={}", opts.mode, timeline::uptime_ms(), reaper.orphans_reaped());
            }
            _ = usr2.recv() => {
                let muted = !log::sink().console_muted();
                log::sink().mute_console(false);
                info!("SIGUSR2: console logging {}", if muted { "muted" } else { "resumed" });
                log::sink().mute_console(muted);
            }
        }
    };
    shutdown(action).await;
    action
}

/// Stops every process, syncs and unmounts. The caller then calls reboot(2).
async fn shutdown(action: PowerAction) {
    log::sink().mute_console(false);
    info!("shutdown: {} — stopping processes", action.as_str());
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    while user_processes_left() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if user_processes_left() > 0 {
        warn!("shutdown: processes left after {:?}; killing them", STOP_TIMEOUT);
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log::sink().detach_file();
    nix::unistd::sync();
    for (target, e) in mounts::unmount_all() {
        warn!("shutdown: could not unmount {}: {e}", target.display());
    }
    info!("shutdown: {} now", action.as_str());
}

/// Processes other than rayosd and kernel threads. `kill(-1, 0)` cannot tell: it counts kernel
/// threads too.
fn user_processes_left() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|&pid| pid > 2)
        .filter(|pid| {
            // Field 4 of stat is the parent pid; kernel threads are kthreadd's (pid 2) children.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.split(' ').nth(1).map(str::to_string)))
                .flatten()
                .is_some_and(|ppid| ppid != "2")
        })
        .count()
}
