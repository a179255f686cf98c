//! PID 1 duties: early setup, the main loop, signals and the orderly shutdown.

mod data;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rayosd::cmdline::{BootOptions, Mode};
use rayosd::api::{control, System, SystemStatus};
use rayosd::power::{final_reboot, PowerAction};
use rayosd::reaper::Reaper;
use rayosd::supervisor::{Limits, RestartPolicy, ServiceSpec, Stdio3, Supervisor};
use rayosd::watchdog::Watchdog;
use rayosd::{bridge, efivars, log, mounts, timeline, uevent};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// How long processes left after the services stopped get between SIGTERM and SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(3);
const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs PID 1. Never returns.
pub fn boot(init_uptime_ms: u64) -> ! {
    std::panic::set_hook(Box::new(|info| {
        log::sink().screen(&format!("rayosd: fatal: {info}; rebooting\n"));
        log::sink().log(tracing::Level::ERROR, "rayosd", &format!("fatal: {info}; rebooting"));
        final_reboot(PowerAction::Reboot);
    }));

    let mount_errors = mounts::mount_api_filesystems();
    log::sink().open_kernel_outputs();
    ensure_standard_fds();
    // Userspace writes to /dev/kmsg are rate-limited (10 per 5 s) unless this is on.
    let _ = std::fs::write("/proc/sys/kernel/printk_devkmsg", "on\n");
    // A kernel panic must reboot, even when the command line forgot panic=.
    if std::fs::read_to_string("/proc/sys/kernel/panic").is_ok_and(|v| v.trim() == "0") {
        let _ = std::fs::write("/proc/sys/kernel/panic", "10\n");
    }
    // Guest RAM is a memfd in each VMM, which asks for huge pages (MADV_HUGEPAGE): shmem
    // honours that only under `advise`. 2 MiB host pages let KVM map guests in 2 MiB steps.
    let _ = std::fs::write("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "advise\n");
    log::init_tracing(tracing::Level::DEBUG);

    info!("starting pid=1 uptime_ms={init_uptime_ms}");
    for e in &mount_errors {
        warn!("{e}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cmdline = cmdline.trim_end();
    info!("cmdline: {cmdline}");
    let boot_entry = efivars::loader_entry_selected(Path::new(efivars::EFIVARFS));
    if let Some(entry) = &boot_entry {
        info!("boot entry: {entry}");
    }
    let opts = BootOptions::parse(cmdline);
    for w in &opts.warnings {
        warn!("{w}");
    }

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
    let action = rt.block_on(run(opts, init_uptime_ms, boot_entry.unwrap_or_default()));
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

/// rayos-netd: links, DHCP, routes (netd/).
const NETD_BIN: &str = "/usr/bin/rayos-netd";

/// The services a mode starts.
fn services_for(mode: Mode, opts: &BootOptions) -> Vec<ServiceSpec> {
    let mut v = Vec::new();
    if mode == Mode::Installer {
        let mut s = ServiceSpec::new("installer", &["/usr/bin/rayos-installer"]);
        // It opens the screen's VT and the serial console itself (either may be missing);
        // its stdout and stderr are the log.
        s.stdio = Stdio3::LogOwnsConsoles;
        s.restart = RestartPolicy::OnFailure;
        s.on_success = Some(PowerAction::Reboot);
        v.push(s);
    }
    // The wired network, in every mode: offline is normal (it delays nothing), and it holds
    // no user data, so rescue and installer modes have it too.
    if Path::new(NETD_BIN).exists() {
        let mut s = ServiceSpec::new("netd", &[NETD_BIN]);
        s.restart = RestartPolicy::Always;
        v.push(s);
    }
    // rayos.testsvc=a,b → services testsvc-a and testsvc-b (integration tests only).
    for scenario in opts.testsvc.iter().flat_map(|s| s.split(',')).filter(|s| !s.is_empty()) {
        v.push(ServiceSpec::new(&format!("testsvc-{scenario}"), &["/usr/bin/rayos-testsvc", scenario]));
    }
    v
}

async fn run(opts: BootOptions, init_uptime_ms: u64, boot_entry: String) -> PowerAction {
    use tokio::signal::unix::{signal, SignalKind};
    let reaper = Arc::new(Reaper::new());
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

    let mut status = SystemStatus { init_uptime_ms, boot_entry, machine_name: "rayos".into(), ..Default::default() };
    let mut mode = opts.mode;
    if mode == Mode::Installed {
        match data::mount_data(&reaper).await {
            Ok((dev, name)) => (status.data_device, status.machine_name) = (dev, name),
            Err(e) => {
                let msg = format!("installed mode: {e}; starting rescue mode instead. Nothing was formatted.");
                error!("{msg}");
                status.rescue_reason = e.to_string();
                mode = Mode::Rescue;
            }
        }
    }
    info!("mode: {mode}");
    status.mode = mode.to_string();

    let mut watchdog = if opts.watchdog {
        match Watchdog::open(WATCHDOG_TIMEOUT) {
            Ok(Some(w)) => {
                info!("watchdog: {} armed, timeout {} s", w.device, w.timeout.as_secs());
                status.watchdog = format!("{} ({} s)", w.device, w.timeout.as_secs());
                Some(w)
            }
            Ok(None) => None,
            Err(e) => {
                warn!("watchdog: cannot open: {e}");
                None
            }
        }
    } else {
        None
    };

    let (power_tx, mut power_rx) = mpsc::unbounded_channel();
    let supervisor = Supervisor::new(reaper.clone(), Limits::default(), power_tx.clone());
    let system = Arc::new(
        System::new(supervisor.clone(), status, power_tx)
            .with_access(rayosd::api::auth::Access::root_only().with_screen(rayosd::screen::COMPOSITOR_UID)),
    );
    match control::bind(Path::new(control::SOCKET_PATH)) {
        Ok(l) => {
            tokio::spawn(control::serve(l, system.clone()));
        }
        Err(e) => error!("control API unavailable: {e}"),
    }

    let ready_ms = timeline::uptime_ms();
    system.status.lock().unwrap().ready_uptime_ms = ready_ms;
    info!("ready mode={mode} init_uptime_ms={init_uptime_ms} ready_uptime_ms={ready_ms}");

    // Services start after the ready line: a console service mutes rayosd's console output.
    for spec in services_for(mode, &opts) {
        if let Err(e) = supervisor.add(spec) {
            error!("{e}");
        }
    }
    if mode == Mode::Installed {
        if let Some(vms) = rayosd::vm::boot::open_installed(reaper.clone()) {
            // Served before any VM starts, so a client sees every state change.
            system.set_vms(vms.clone());
            rayosd::vm::boot::autostart(&vms);
        }
        // After the VM supervisor is served, so the compositor's first connection already
        // gets every VM state change.
        add_compositor(&supervisor);
        // Ready in installed mode is what "this boot is good" means (boot assessment).
        tokio::task::spawn_blocking(|| {
            let (efi, sys, dev) = (Path::new(efivars::EFIVARFS), Path::new("/sys/class/block"), Path::new("/dev"));
            match rayosd::bootcount::bless_boot(efi, sys, dev, Path::new("/run/rayos/esp")) {
                Ok(Some(entry)) => info!("boot assessment: this boot is good; the entry is now {entry}"),
                Ok(None) => {}
                Err(e) => warn!("boot assessment: {e}"),
            }
        });
    }
    if mode == Mode::Rescue {
        rescue_screen(&system.status.lock().unwrap());
        add_compositor(&supervisor);
    }
    tokio::spawn(devices(system.clone()));

    let mut ping = tokio::time::interval(watchdog.as_ref().map(|w| w.timeout / 3).unwrap_or(Duration::from_secs(3600)));
    let action = loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: powering off"); break PowerAction::PowerOff; }
            _ = int.recv() => { info!("SIGINT (ctrl-alt-del): rebooting"); break PowerAction::Reboot; }
            Some(a) = power_rx.recv() => { info!("{} requested", a.as_str()); break a; }
            _ = usr1.recv() => {
                let s = system.snapshot();
                info!("status: mode={} uptime_ms={} services={} orphans_reaped={} zombies={} rss_kib={}", s.mode, s.uptime_ms, supervisor.list().len(), s.orphans_reaped, s.zombies, s.rss_kib);
            }
            _ = usr2.recv() => {
                let muted = !log::sink().console_muted();
                log::sink().mute_console(false);
                info!("SIGUSR2: console logging {}", if muted { "muted" } else { "resumed" });
                log::sink().mute_console(muted);
            }
            _ = ping.tick() => { if let Some(w) = watchdog.as_mut() { w.ping(); } }
        }
    };
    system.status.lock().unwrap().shutting_down = true;
    shutdown(action, &supervisor, system.vms().map(|m| &**m)).await;
    if let Some(w) = watchdog.take() {
        w.magic_close();
    }
    info!("shutdown: {} now", action.as_str());
    action
}

/// The compositor (`rayos-compositor`): the screen, the home screen, present/hide and the
/// keyboard and mouse. The VMs do not depend on it: when it dies they run on and it is
/// restarted. Absent from the image (a build without it), nothing is started.
fn add_compositor(supervisor: &Arc<Supervisor>) {
    const BIN: &str = rayosd::vm::boot::COMPOSITOR_BIN;
    if !Path::new(BIN).exists() {
        warn!("compositor: {BIN} is missing; the screen shows the console only");
        return;
    }
    use rayosd::screen::{give_all, COMPOSITOR_UID};
    // Before it starts; nodes that appear later are given as their uevents come (`devices`).
    // Its console mode is set by rayosd (`Display1.HoldConsole`).
    let n = give_all(Path::new("/dev"), COMPOSITOR_UID);
    info!("screen: {n} device nodes given to the compositor (uid {COMPOSITOR_UID})");
    let mut s = ServiceSpec::new("compositor", &[BIN]);
    s.restart = RestartPolicy::Always;
    s.user = Some((COMPOSITOR_UID, COMPOSITOR_UID));
    if let Err(e) = supervisor.add(s) {
        error!("{e}");
    }
}

fn rescue_screen(s: &SystemStatus) {
    let reason = if s.rescue_reason.is_empty() { "rescue mode was selected at boot".to_string() } else { s.rescue_reason.clone() };
    log::sink().screen(&format!(
        "\n==================== RayOS rescue ====================\n\
         why: {reason}\n\
         nothing was formatted; no VM is started\n\
         control: rayosctl status  (socket {})\n\
         ======================================================\n\n",
        control::SOCKET_PATH
    ));
}

/// After ready: hotplug monitor, coldplug, and the virtio-serial bridge when its port exists.
async fn devices(system: Arc<System>) {
    let monitor = match uevent::Monitor::open() {
        Ok(m) => Some(m),
        Err(e) => {
            warn!("hotplug: cannot open the uevent socket: {e}");
            None
        }
    };
    // Coldplug after the monitor listens, so nothing falls between the two.
    let n = tokio::task::spawn_blocking(|| uevent::coldplug(Path::new("/sys/devices"))).await.unwrap_or(0);
    info!("coldplug: {n} devices announced");
    let mut bridged = false;
    let try_bridge = |bridged: &mut bool| {
        if !*bridged {
            if let Some(dev) = bridge::find_port(Path::new("/sys/class/virtio-ports"), Path::new("/dev")) {
                *bridged = true;
                tokio::spawn(bridge::run(dev, system.clone()));
            }
        }
    };
    try_bridge(&mut bridged);
    let Some(monitor) = monitor else { return };
    loop {
        match monitor.next().await {
            Ok(ev) => {
                tracing::debug!("uevent: {} {} {}", ev.action, ev.subsystem(), ev.devpath);
                if matches!(ev.action.as_str(), "add" | "change") {
                    if let Some(name) = ev.vars.get("DEVNAME").filter(|n| rayosd::screen::is_screen_device(n)) {
                        let path = Path::new("/dev").join(name);
                        match rayosd::screen::give(&path, rayosd::screen::COMPOSITOR_UID) {
                            Ok(()) => tracing::debug!("screen: {} given to the compositor", path.display()),
                            Err(e) => warn!("screen: giving {} to the compositor: {e}", path.display()),
                        }
                    }
                }
                if bridge::may_name_a_port(&ev.action, ev.subsystem()) {
                    // devtmpfs creates the node with the event; nothing for us to create.
                    try_bridge(&mut bridged);
                }
            }
            Err(e) => {
                warn!("hotplug: {e}; no longer following uevents");
                return;
            }
        }
    }
}

/// Stops services, then every other process, syncs and unmounts. The caller then reboots.
async fn shutdown(action: PowerAction, supervisor: &Supervisor, vms: Option<&rayosd::vm::VmManager>) {
    log::sink().mute_console(false);
    info!("shutdown: {} — stopping services", action.as_str());
    if let Some(m) = vms {
        rayosd::vm::boot::stop_all(m).await;
    }
    supervisor.stop_all().await;
    if user_processes_left() > 0 {
        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + KILL_TIMEOUT;
        while user_processes_left() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if user_processes_left() > 0 {
            warn!("shutdown: processes left after {:?}; killing them", KILL_TIMEOUT);
            let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    log::sink().detach_file();
    nix::unistd::sync();
    for (target, e) in mounts::unmount_all() {
        warn!("shutdown: could not unmount {}: {e}", target.display());
    }
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
