//! Services: child processes started, watched and restarted by rayosd (and by `systemless`).
//!
//! Each service has one task that owns its lifecycle: spawn, wait (through the [`Reaper`]),
//! decide (restart with exponential backoff, stop on a crash loop, or run the service's
//! on-success action), and obey stop/start/restart requests from the control API.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::power::PowerAction;
use crate::reaper::{ExitKind, Reaper};
use crate::restart::{RestartLimits, RestartTracker, Verdict};

/// When a service is started again after it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// Where a service's standard streams go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stdio3 {
    /// stdin, stdout and stderr on /dev/console with it as controlling terminal; rayosd mutes
    /// its own console output while the service runs (the installer's text UI).
    Console,
    /// stdin from /dev/null; stdout and stderr line by line into rayosd's log.
    Log,
    /// As `Log`, for a service that opens the consoles itself (the installer draws on the
    /// screen and the serial console at once): rayosd mutes its own console output while it runs.
    LogOwnsConsoles,
}

impl Stdio3 {
    /// rayosd stays off the console while such a service runs.
    pub fn owns_console(self) -> bool {
        matches!(self, Stdio3::Console | Stdio3::LogOwnsConsoles)
    }
}

/// What a service is and how it is supervised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdio: Stdio3,
    pub restart: RestartPolicy,
    /// What the machine does when the service exits with status 0 (the installer: reboot).
    pub on_success: Option<PowerAction>,
    /// Run as this uid/gid instead of root.
    pub user: Option<(u32, u32)>,
}

impl ServiceSpec {
    pub fn new(name: &str, argv: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.to_string(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            stdio: Stdio3::Log,
            restart: RestartPolicy::Always,
            on_success: None,
            user: None,
        }
    }
}

/// Backoff and crash-loop limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Backoff and crash loop, the policy services and VMs share.
    pub restart: RestartLimits,
    /// Between SIGTERM and SIGKILL when stopping.
    pub stop_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            restart: RestartLimits {
                backoff_initial: Duration::from_millis(250),
                backoff_max: Duration::from_secs(30),
                stable_after: Duration::from_secs(10),
                crash_count: 5,
                crash_window: Duration::from_secs(60),
            },
            stop_timeout: Duration::from_secs(5),
        }
    }
}

/// A service's state as the API shows it (a string on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, zbus::zvariant::Type)]
#[serde(rename_all = "kebab-case")]
#[zvariant(signature = "s")]
pub enum ServiceState {
    Starting,
    Running,
    /// Ended; waiting `backoff_ms` before the next start.
    Backoff,
    Stopped,
    /// Ended successfully and its policy does not restart it.
    Exited,
    /// Failed too often; not restarted until someone asks.
    CrashLoop,
    /// Could not be started (binary missing, …); see `last_exit`.
    Failed,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::Backoff => "backoff",
            ServiceState::Stopped => "stopped",
            ServiceState::Exited => "exited",
            ServiceState::CrashLoop => "crash-loop",
            ServiceState::Failed => "failed",
        }
    }
}

/// A snapshot of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, zbus::zvariant::Type)]
pub struct ServiceInfo {
    pub name: String,
    pub state: ServiceState,
    /// 0 when not running.
    pub pid: u32,
    /// Starts after the first.
    pub restarts: u32,
    /// How the last run ended, or why it could not start; empty if it never ended.
    pub last_exit: String,
    pub backoff_ms: u64,
    pub command: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SupervisorError {
    #[error("no service named {0:?}")]
    NoSuchService(String),
    #[error("a service named {0:?} already exists")]
    Exists(String),
    #[error("service {0:?} has an empty command")]
    EmptyCommand(String),
}

#[derive(Debug)]
enum Ctl {
    Stop,
    Start,
    Restart,
}

struct Entry {
    info: ServiceInfo,
    ctl: mpsc::UnboundedSender<Ctl>,
}

/// Shared by the service tasks and the control API.
pub struct Supervisor {
    reaper: Arc<Reaper>,
    limits: Limits,
    services: Mutex<BTreeMap<String, Entry>>,
    power: mpsc::UnboundedSender<PowerAction>,
    console_owners: Mutex<usize>,
}

impl Supervisor {
    /// `power` receives the on-success actions of services (e.g. the installer's reboot).
    pub fn new(reaper: Arc<Reaper>, limits: Limits, power: mpsc::UnboundedSender<PowerAction>) -> Arc<Supervisor> {
        Arc::new(Supervisor { reaper, limits, services: Mutex::new(BTreeMap::new()), power, console_owners: Mutex::new(0) })
    }

    pub fn reaper(&self) -> &Arc<Reaper> {
        &self.reaper
    }

    /// Adds a service and starts it. Must be called on the runtime's thread.
    pub fn add(self: &Arc<Self>, spec: ServiceSpec) -> Result<(), SupervisorError> {
        if spec.argv.is_empty() {
            return Err(SupervisorError::EmptyCommand(spec.name));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut services = self.services.lock().unwrap();
            if services.contains_key(&spec.name) {
                return Err(SupervisorError::Exists(spec.name));
            }
            services.insert(
                spec.name.clone(),
                Entry {
                    info: ServiceInfo {
                        name: spec.name.clone(),
                        state: ServiceState::Starting,
                        pid: 0,
                        restarts: 0,
                        last_exit: String::new(),
                        backoff_ms: 0,
                        command: spec.argv.join(" "),
                    },
                    ctl: tx,
                },
            );
        }
        let me = self.clone();
        tokio::spawn(async move { me.run_service(spec, rx).await });
        Ok(())
    }

    pub fn list(&self) -> Vec<ServiceInfo> {
        self.services.lock().unwrap().values().map(|e| e.info.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Result<ServiceInfo, SupervisorError> {
        self.services.lock().unwrap().get(name).map(|e| e.info.clone()).ok_or_else(|| SupervisorError::NoSuchService(name.into()))
    }

    fn send(&self, name: &str, ctl: Ctl) -> Result<(), SupervisorError> {
        let services = self.services.lock().unwrap();
        let e = services.get(name).ok_or_else(|| SupervisorError::NoSuchService(name.into()))?;
        let _ = e.ctl.send(ctl);
        Ok(())
    }

    pub fn stop(&self, name: &str) -> Result<(), SupervisorError> {
        self.send(name, Ctl::Stop)
    }
    pub fn start(&self, name: &str) -> Result<(), SupervisorError> {
        self.send(name, Ctl::Start)
    }
    /// Restarts now; also clears a crash loop.
    pub fn restart(&self, name: &str) -> Result<(), SupervisorError> {
        self.send(name, Ctl::Restart)
    }

    /// Sends `sig` to the service's process (as a user would with kill).
    pub fn signal(&self, name: &str, sig: Signal) -> Result<bool, SupervisorError> {
        let info = self.get(name)?;
        if info.pid == 0 {
            return Ok(false);
        }
        Ok(kill(Pid::from_raw(info.pid as i32), sig).is_ok())
    }

    /// Stops every service and waits until they have ended (each gets `stop_timeout` before
    /// SIGKILL).
    pub async fn stop_all(&self) {
        let names: Vec<String> = self.services.lock().unwrap().keys().cloned().collect();
        for n in &names {
            let _ = self.stop(n);
        }
        let deadline = Instant::now() + self.limits.stop_timeout + Duration::from_secs(1);
        while Instant::now() < deadline && self.list().iter().any(|s| s.pid != 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut ServiceInfo)) {
        if let Some(e) = self.services.lock().unwrap().get_mut(name) {
            f(&mut e.info);
        }
    }

    fn console_claim(&self, on: bool) {
        let mut n = self.console_owners.lock().unwrap();
        if on {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
        }
        crate::log::sink().mute_console(*n > 0);
    }

    async fn run_service(self: Arc<Self>, spec: ServiceSpec, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
        let name = spec.name.clone();
        let limits = self.limits;
        let mut tracker = RestartTracker::new(limits.restart);
        let mut first = true;
        loop {
            // Start.
            if !first {
                self.update(&name, |i| i.restarts += 1);
            }
            first = false;
            self.update(&name, |i| {
                i.state = ServiceState::Starting;
                i.backoff_ms = 0;
            });
            let started = Instant::now();
            let spawned = spawn(&spec);
            let (pid, exit_rx) = match spawned {
                Ok((pid, output)) => {
                    let rx = self.reaper.watch(pid);
                    if let Some(fds) = output {
                        forward_output(&name, fds);
                    }
                    (pid, rx)
                }
                Err(e) => {
                    let msg = format!("cannot start {}: {e}", spec.argv[0]);
                    tracing::error!("service {name}: {msg}");
                    self.update(&name, |i| {
                        i.state = ServiceState::Failed;
                        i.last_exit = msg;
                    });
                    // A missing binary will not appear by retrying; wait to be asked.
                    match wait_for_start(&mut ctl).await {
                        true => continue,
                        false => return,
                    }
                }
            };
            if spec.stdio.owns_console() {
                self.console_claim(true);
            }
            tracing::info!("service {name}: started pid={pid}");
            self.update(&name, |i| {
                i.state = ServiceState::Running;
                i.pid = pid;
            });

            // Run until it ends or we are asked to stop it.
            let mut exit_rx = exit_rx;
            let mut requested: Option<Ctl> = None;
            let exit = loop {
                tokio::select! {
                    r = &mut exit_rx => break r.unwrap_or(ExitKind::Signaled(9)),
                    c = ctl.recv() => match c {
                        Some(Ctl::Start) => {}
                        Some(c @ (Ctl::Stop | Ctl::Restart)) => {
                            requested = Some(c);
                            break terminate(pid, &mut exit_rx, limits.stop_timeout).await;
                        }
                        None => { requested = Some(Ctl::Stop); break terminate(pid, &mut exit_rx, limits.stop_timeout).await; }
                    },
                }
            };
            if spec.stdio.owns_console() {
                self.console_claim(false);
            }
            let ran = started.elapsed();
            self.update(&name, |i| {
                i.pid = 0;
                i.last_exit = exit.to_string();
            });
            tracing::info!("service {name}: pid={pid} {exit} after {} ms", ran.as_millis());

            match requested {
                Some(Ctl::Restart) => {
                    tracker.reset();
                    continue;
                }
                Some(_) => {
                    self.update(&name, |i| i.state = ServiceState::Stopped);
                    if wait_for_start(&mut ctl).await {
                        tracker.reset();
                        continue;
                    }
                    return;
                }
                None => {}
            }

            let success = exit == ExitKind::Exited(0);
            if success {
                if let Some(action) = spec.on_success {
                    tracing::info!("service {name} finished successfully: {}", action.as_str());
                    self.update(&name, |i| i.state = ServiceState::Exited);
                    let _ = self.power.send(action);
                    if wait_for_start(&mut ctl).await {
                        continue;
                    }
                    return;
                }
            }
            let restart = match spec.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !success,
                RestartPolicy::Never => false,
            };
            if !restart {
                self.update(&name, |i| i.state = if success { ServiceState::Exited } else { ServiceState::Failed });
                if wait_for_start(&mut ctl).await {
                    continue;
                }
                return;
            }

            let backoff = match tracker.failed(ran, Instant::now()) {
                Verdict::Restart { after } => after,
                Verdict::CrashLoop { failures } => {
                    tracing::error!(
                        "service {name} is crash-looping ({failures} failures within {} s, last: {exit}); not restarting it (rayosctl service restart {name} to try again)",
                        limits.restart.crash_window.as_secs()
                    );
                    self.update(&name, |i| i.state = ServiceState::CrashLoop);
                    if wait_for_start(&mut ctl).await {
                        tracker.reset();
                        continue;
                    }
                    return;
                }
            };
            tracing::info!("service {name}: restarting in {} ms", backoff.as_millis());
            self.update(&name, |i| {
                i.state = ServiceState::Backoff;
                i.backoff_ms = backoff.as_millis() as u64;
            });
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            let stopped = tokio::select! {
                _ = &mut sleep => false,
                c = ctl.recv() => matches!(c, Some(Ctl::Stop) | None),
            };
            if stopped {
                self.update(&name, |i| {
                    i.state = ServiceState::Stopped;
                    i.backoff_ms = 0;
                });
                if wait_for_start(&mut ctl).await {
                    tracker.reset();
                    continue;
                }
                return;
            }
        }
    }
}

/// Waits for a Start or Restart; false when the supervisor is gone.
async fn wait_for_start(ctl: &mut mpsc::UnboundedReceiver<Ctl>) -> bool {
    loop {
        match ctl.recv().await {
            Some(Ctl::Start | Ctl::Restart) => return true,
            Some(Ctl::Stop) => continue,
            None => return false,
        }
    }
}

/// SIGTERM, then SIGKILL after `timeout`; returns how it ended.
async fn terminate(pid: u32, exit_rx: &mut tokio::sync::oneshot::Receiver<ExitKind>, timeout: Duration) -> ExitKind {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    match tokio::time::timeout(timeout, &mut *exit_rx).await {
        Ok(r) => r.unwrap_or(ExitKind::Signaled(9)),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            exit_rx.await.unwrap_or(ExitKind::Signaled(9))
        }
    }
}

/// Starts the process. Returns its pid and, for `Stdio3::Log*`, its stdout and stderr.
fn spawn(spec: &ServiceSpec) -> std::io::Result<(u32, Option<(OwnedFd, OwnedFd)>)> {
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..]);
    cmd.env_clear();
    cmd.env("PATH", "/usr/bin:/usr/sbin");
    cmd.env("HOME", "/");
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let console = spec.stdio == Stdio3::Console;
    if console {
        let open = || std::fs::OpenOptions::new().read(true).write(true).open("/dev/console");
        cmd.stdin(open()?).stdout(open()?).stderr(open()?);
        cmd.env("TERM", "linux");
    } else {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    if let Some((uid, gid)) = spec.user {
        // std also drops root's supplementary groups (setgroups(0)) when it sets the uid.
        cmd.uid(uid).gid(gid);
    }
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (setsid, ioctl).
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if console {
                // The console becomes the controlling terminal so ctrl-c and job control work.
                libc::ioctl(0, libc::TIOCSCTTY, 1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let output = match (child.stdout.take(), child.stderr.take()) {
        (Some(o), Some(e)) => Some((OwnedFd::from(o), OwnedFd::from(e))),
        _ => None,
    };
    // Dropping `Child` neither waits nor kills: the reaper owns the wait.
    Ok((child.id(), output))
}

/// Runs a one-shot helper (e2fsck, …) to completion, its output going to the log under
/// `source`, its exit status coming from the reaper.
pub async fn run_oneshot(reaper: &Reaper, argv: &[&str], source: &str) -> std::io::Result<ExitKind> {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).env_clear().env("PATH", "/usr/bin:/usr/sbin");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let rx = reaper.watch(child.id());
    if let (Some(o), Some(e)) = (child.stdout.take(), child.stderr.take()) {
        forward_output(source, (OwnedFd::from(o), OwnedFd::from(e)));
    }
    rx.await.map_err(|_| std::io::Error::other("reaper went away"))
}

fn forward_output(name: &str, (out, err): (OwnedFd, OwnedFd)) {
    for (fd, level) in [(out, tracing::Level::INFO), (err, tracing::Level::WARN)] {
        let name = name.to_string();
        let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else { continue };
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(rx).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                crate::log::sink().log(level, &name, &line);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast_limits() -> Limits {
        Limits {
            restart: RestartLimits {
                backoff_initial: Duration::from_millis(20),
                backoff_max: Duration::from_millis(200),
                stable_after: Duration::from_secs(5),
                crash_count: 4,
                crash_window: Duration::from_secs(10),
            },
            stop_timeout: Duration::from_millis(500),
        }
    }

    async fn wait_until(sup: &Supervisor, name: &str, mut pred: impl FnMut(&ServiceInfo) -> bool) -> ServiceInfo {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let i = sup.get(name).unwrap();
            if pred(&i) {
                return i;
            }
            assert!(Instant::now() < deadline, "timed out; last state {i:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    struct Setup {
        sup: Arc<Supervisor>,
        power: mpsc::UnboundedReceiver<PowerAction>,
        _only_reaper: std::sync::MutexGuard<'static, ()>,
    }

    fn setup() -> Setup {
        let only_reaper = crate::reaper::exclusive_for_test();
        let reaper = Arc::new(Reaper::new());
        let r = reaper.clone();
        tokio::spawn(async move { r.run().await });
        let (tx, rx) = mpsc::unbounded_channel();
        Setup { sup: Supervisor::new(reaper, fast_limits(), tx), power: rx, _only_reaper: only_reaper }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn killed_service_is_restarted_with_a_new_pid() {
        let Setup { sup, .. } = &setup();
        sup.add(ServiceSpec::new("sleeper", &["sleep", "30"])).unwrap();
        let first = wait_until(&sup, "sleeper", |i| i.state == ServiceState::Running).await;
        assert!(sup.signal("sleeper", Signal::SIGKILL).unwrap());
        let second = wait_until(&sup, "sleeper", |i| i.state == ServiceState::Running && i.restarts == 1).await;
        assert_ne!(first.pid, second.pid);
        assert_eq!(second.last_exit, "killed by signal 9 (SIGKILL)");
        sup.stop_all().await;
        assert_eq!(sup.get("sleeper").unwrap().state, ServiceState::Stopped);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn crash_loop_stops_restarting_and_restart_clears_it() {
        let Setup { sup, .. } = &setup();
        sup.add(ServiceSpec::new("crasher", &["sh", "-c", "exit 3"])).unwrap();
        let i = wait_until(&sup, "crasher", |i| i.state == ServiceState::CrashLoop).await;
        assert_eq!(i.restarts, 3, "4 runs = first + 3 restarts");
        assert_eq!(i.last_exit, "exited with status 3");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sup.get("crasher").unwrap().restarts, 3, "no restart after a crash loop");
        sup.restart("crasher").unwrap();
        wait_until(&sup, "crasher", |i| i.restarts >= 4).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn backoff_grows_between_failures() {
        let Setup { sup, .. } = &setup();
        sup.add(ServiceSpec::new("f", &["false"])).unwrap();
        let a = wait_until(&sup, "f", |i| i.state == ServiceState::Backoff).await.backoff_ms;
        let b = wait_until(&sup, "f", |i| i.state == ServiceState::Backoff && i.backoff_ms > a).await.backoff_ms;
        assert_eq!((a, b), (20, 40));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn success_action_is_requested_and_output_is_logged() {
        let Setup { sup, power, .. } = &mut setup();
        let mut spec = ServiceSpec::new("inst", &["sh", "-c", "echo hello-from-service; exit 0"]);
        spec.on_success = Some(PowerAction::Reboot);
        sup.add(spec).unwrap();
        let action = tokio::time::timeout(Duration::from_secs(5), power.recv()).await.unwrap();
        assert_eq!(action, Some(PowerAction::Reboot));
        wait_until(&sup, "inst", |i| i.state == ServiceState::Exited).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(crate::log::sink().tail(0).iter().any(|r| r.source == "inst" && r.message == "hello-from-service"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn missing_binary_is_failed_not_retried() {
        let Setup { sup, .. } = &setup();
        sup.add(ServiceSpec::new("ghost", &["/nonexistent/bin"])).unwrap();
        let i = wait_until(&sup, "ghost", |i| i.state == ServiceState::Failed).await;
        assert!(i.last_exit.contains("/nonexistent/bin"), "{}", i.last_exit);
        assert_eq!(sup.add(ServiceSpec::new("ghost", &["x"])), Err(SupervisorError::Exists("ghost".into())));
        assert_eq!(sup.stop("nope"), Err(SupervisorError::NoSuchService("nope".into())));
    }
}
