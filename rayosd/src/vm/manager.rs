//! The VM supervisor: owns the registry and one task per VM that starts its `rayos-vmm`,
//! watches it (exit statuses come from the [`Reaper`]), restarts it after a crash with
//! exponential backoff, stops restarting on a crash loop, and carries out the API's
//! start/stop/pause/resume requests. Every state change is logged and broadcast as a
//! [`VmEvent`] (the `VmStateChanged` D-Bus signal).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::owner;
use super::registry::{self, DeviceConfig, DiskRecord, Policy, Registry, RegistryError, RestartPolicy, VmKind, VmRecord};
use super::state::{self, Request, VmState};
use super::vmm_process::{self, VmFiles, EXIT_REBOOT};
use crate::reaper::{ExitKind, Reaper};

/// Where the supervisor keeps things. rayosd: `/data/registry`, `/data/vms`, `/run/rayos/vm`;
/// systemless: the same names under its state folder.
#[derive(Debug, Clone)]
pub struct Paths {
    pub registry_dir: PathBuf,
    pub vms_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl Paths {
    pub fn under(root: &Path) -> Paths {
        Paths { registry_dir: root.join("registry"), vms_dir: root.join("vms"), run_dir: root.join("run") }
    }

    pub fn installed() -> Paths {
        Paths {
            registry_dir: "/data/registry".into(),
            vms_dir: "/data/vms".into(),
            run_dir: "/run/rayos/vm".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub vmm_bin: PathBuf,
    pub paths: Paths,
    /// Between the ACPI power button and a forced power-off.
    pub stop_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// This many crashes within `crash_window` is a crash loop.
    pub crash_count: usize,
    pub crash_window: Duration,
    /// How long a new VMM gets to open its control socket.
    pub socket_timeout: Duration,
}

impl Settings {
    pub fn new(vmm_bin: PathBuf, paths: Paths) -> Settings {
        Settings {
            vmm_bin,
            paths,
            stop_timeout: Duration::from_secs(20),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            crash_count: 5,
            crash_window: Duration::from_secs(120),
            socket_timeout: Duration::from_secs(10),
        }
    }
}

/// One VM as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, zbus::zvariant::Type)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub state: String,
    /// The VMM's pid; 0 when none runs.
    pub pid: u32,
    pub restarts: u32,
    /// Why it is failed/broken/crash-looping, or the last notable event.
    pub detail: String,
    pub autostart_hidden: bool,
    /// ms from the VMM's start to the guest's init (the boot-timer port); 0 until reached.
    pub guest_init_ms: u64,
    /// ms from the supervisor's start request to the guest's init; 0 until reached.
    pub start_to_init_ms: u64,
    /// The guest agent said `ready` on its port (VMs with `config.agent`).
    pub agent_ready: bool,
    /// The last heartbeat number the guest agent sent; 0 before the first.
    pub agent_heartbeat: u64,
    pub disks: Vec<String>,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub created_at: u64,
    pub last_booted_at: u64,
}

/// The text on a VM's display console as its guest agent reads it (the `GuestScreen` call).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, zbus::zvariant::Type)]
pub struct GuestScreen {
    /// The virtual console read (1: the one the display shows at boot).
    pub tty: u32,
    pub rows: u32,
    pub cols: u32,
    pub cursor_x: u32,
    pub cursor_y: u32,
    /// `rows` lines joined by `\n`, trailing blanks cut.
    pub text: String,
}

/// A state change (the `VmStateChanged` signal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    pub id: String,
    pub name: String,
    pub state: String,
    pub detail: String,
}

/// What `create` takes (the API's CreateVm argument, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    #[serde(default = "default_kind")]
    pub kind: VmKind,
    #[serde(default)]
    pub disks: Vec<DiskRecord>,
    pub config: DeviceConfig,
    #[serde(default)]
    pub policy: Policy,
}

fn default_kind() -> VmKind {
    VmKind::Linux
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no VM {0:?}")]
    NoSuchVm(String),
    #[error("VM {name}: {reason}")]
    Refused { name: String, reason: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The VM is in a state for the request, but carrying it out failed (the VMM or the
    /// guest agent did not do its part).
    #[error("VM {name}: {reason}")]
    Failed { name: String, reason: String },
}

#[derive(Debug)]
enum Ctl {
    Start { fresh: bool },
    Stop { force: bool },
    Pause,
    Resume,
    Delete,
}

struct Entry {
    info: VmInfo,
    ctl: mpsc::UnboundedSender<Ctl>,
}

pub struct VmManager {
    reaper: Arc<Reaper>,
    settings: Settings,
    registry: Mutex<Registry>,
    vms: Mutex<BTreeMap<Uuid, Entry>>,
    /// Registry problems found at load and crash loops: what `rayosctl vm list` reports.
    problems: Mutex<Vec<String>>,
    events: broadcast::Sender<VmEvent>,
}

impl VmManager {
    /// Loads the registry (reporting and keeping aside what is unreadable) and starts one task
    /// per VM. Must be called on the runtime that runs the reaper.
    pub fn open(reaper: Arc<Reaper>, settings: Settings) -> Result<Arc<VmManager>, VmError> {
        for d in [&settings.paths.vms_dir, &settings.paths.run_dir] {
            std::fs::create_dir_all(d).map_err(|source| RegistryError::Io { path: d.clone(), op: "create directory", source })?;
        }
        let (registry, problems) = Registry::open(&settings.paths.registry_dir)?;
        let problems: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        for p in &problems {
            tracing::error!("vm: {p}");
        }
        let (events, _) = broadcast::channel(256);
        let mgr = Arc::new(VmManager {
            reaper,
            settings,
            registry: Mutex::new(registry),
            vms: Mutex::new(BTreeMap::new()),
            problems: Mutex::new(problems),
            events,
        });
        let records: Vec<VmRecord> = mgr.registry.lock().unwrap().vms().to_vec();
        tracing::info!("vm: registry has {} VMs", records.len());
        for vm in records {
            mgr.add_task(&vm);
        }
        Ok(mgr)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    pub fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap().clone()
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let mut v: Vec<VmInfo> = self.vms.lock().unwrap().values().map(|e| e.info.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn resolve(&self, id_or_name: &str) -> Result<Uuid, VmError> {
        let reg = self.registry.lock().unwrap();
        reg.find(id_or_name).map(|v| v.id).map_err(|_| VmError::NoSuchVm(id_or_name.to_string()))
    }

    pub fn get(&self, id_or_name: &str) -> Result<VmInfo, VmError> {
        let id = self.resolve(id_or_name)?;
        self.vms.lock().unwrap().get(&id).map(|e| e.info.clone()).ok_or_else(|| VmError::NoSuchVm(id_or_name.into()))
    }

    pub fn record(&self, id_or_name: &str) -> Result<VmRecord, VmError> {
        let reg = self.registry.lock().unwrap();
        reg.find(id_or_name).cloned().map_err(|_| VmError::NoSuchVm(id_or_name.to_string()))
    }

    pub fn vm_dir(&self, id: Uuid) -> PathBuf {
        self.settings.paths.vms_dir.join(id.to_string())
    }

    /// Registers a new VM (stopped). Its folder `<vms_dir>/<uuid>/` is created for its disks.
    pub fn create(self: &Arc<Self>, req: CreateRequest) -> Result<VmInfo, VmError> {
        if req.config.vcpus == 0 || req.config.memory_mib == 0 {
            return Err(VmError::Invalid("config.vcpus and config.memory_mib must be positive".into()));
        }
        let id = {
            // Each VM has a user of its own, derived from its UUID (see `owner`).
            let reg = self.registry.lock().unwrap();
            std::iter::repeat_with(Uuid::new_v4).find(|id| owner::collision(reg.vms(), *id).is_none()).expect("an endless iterator")
        };
        let vm = VmRecord {
            id,
            name: req.name,
            kind: req.kind,
            disks: req.disks,
            config: req.config,
            policy: req.policy,
            created_at: registry::now_secs(),
            last_booted_at: None,
        };
        let dir = self.vm_dir(vm.id);
        self.registry.lock().unwrap().insert(vm.clone())?;
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("vm {}: cannot create {}: {e}", vm.name, dir.display());
        }
        tracing::info!("vm {}: created id={}", vm.name, vm.id);
        self.add_task(&vm);
        self.get(&vm.id.to_string())
    }

    fn request(&self, id_or_name: &str, req: Request, ctl: Ctl) -> Result<(), VmError> {
        let id = self.resolve(id_or_name)?;
        let vms = self.vms.lock().unwrap();
        let e = vms.get(&id).ok_or_else(|| VmError::NoSuchVm(id_or_name.into()))?;
        let st = parse_state(&e.info.state);
        state::check(st, req).map_err(|reason| VmError::Refused { name: e.info.name.clone(), reason })?;
        e.ctl.send(ctl).map_err(|_| VmError::Refused { name: e.info.name.clone(), reason: "its task has ended".into() })
    }

    /// Starts the VM hidden (the display stays where it is). `fresh` ignores any saved state.
    pub fn start(&self, id_or_name: &str, fresh: bool) -> Result<(), VmError> {
        self.request(id_or_name, Request::Start, Ctl::Start { fresh })?;
        // A crash loop report is answered by this explicit start.
        let name = self.get(id_or_name)?.name;
        self.problems.lock().unwrap().retain(|p| !p.starts_with(&format!("VM {name}: crash loop")));
        Ok(())
    }

    /// Graceful (ACPI power button, then forced after the stop timeout) or forced at once.
    pub fn stop(&self, id_or_name: &str, force: bool) -> Result<(), VmError> {
        self.request(id_or_name, Request::Stop, Ctl::Stop { force })
    }

    pub fn pause(&self, id_or_name: &str) -> Result<(), VmError> {
        self.request(id_or_name, Request::Pause, Ctl::Pause)
    }

    pub fn resume(&self, id_or_name: &str) -> Result<(), VmError> {
        self.request(id_or_name, Request::Resume, Ctl::Resume)
    }

    /// Sends `sig` to the VM's VMM process (tests, debugging); false when none runs. The
    /// supervisor treats the VMM's end like any other (a crash, unless it was stopping).
    pub fn signal_vmm(&self, id_or_name: &str, sig: Signal) -> Result<bool, VmError> {
        let info = self.get(id_or_name)?;
        if info.pid == 0 {
            return Ok(false);
        }
        tracing::warn!("vm {}: sending {} to VMM pid {}", info.name, sig.as_str(), info.pid);
        Ok(kill(Pid::from_raw(info.pid as i32), sig).is_ok())
    }

    /// Removes the VM from the registry. Its folder (disks) stays unless `purge`.
    pub fn delete(&self, id_or_name: &str, purge: bool) -> Result<(), VmError> {
        let id = self.resolve(id_or_name)?;
        self.request(id_or_name, Request::Delete, Ctl::Delete)?;
        let vm = self.registry.lock().unwrap().remove(id)?;
        self.vms.lock().unwrap().remove(&id);
        let dir = self.vm_dir(id);
        if purge {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("vm {}: purge of {}: {e}", vm.name, dir.display());
                }
            }
            tracing::info!("vm {}: deleted and purged {}", vm.name, dir.display());
        } else {
            tracing::info!("vm {}: deleted; its files stay in {}", vm.name, dir.display());
        }
        let _ = self.events.send(VmEvent { id: id.to_string(), name: vm.name, state: "deleted".into(), detail: String::new() });
        Ok(())
    }

    /// The last `lines` lines of the VM's serial console.
    pub fn logs(&self, id_or_name: &str, lines: usize) -> Result<String, VmError> {
        let vm = self.record(id_or_name)?;
        let files = VmFiles::new(&self.settings.paths.run_dir, &self.vm_dir(vm.id), &vm);
        Ok(vmm_process::serial_tail(&files.serial_log, lines))
    }

    /// The control socket of a VM whose VMM is up (running, or paused when `paused_ok`).
    fn live_vmm(&self, id_or_name: &str, what: &str, paused_ok: bool) -> Result<(VmRecord, PathBuf), VmError> {
        let vm = self.record(id_or_name)?;
        let st = parse_state(&self.get(id_or_name)?.state);
        if !(st == VmState::Running || (paused_ok && st == VmState::Paused)) {
            let need = if paused_ok { "a running or paused VM" } else { "a running VM" };
            return Err(VmError::Refused { name: vm.name, reason: format!("{what} needs {need}; it is {st}") });
        }
        let files = VmFiles::new(&self.settings.paths.run_dir, &self.vm_dir(vm.id), &vm);
        Ok((vm, files.control_socket))
    }

    /// What the VM's display console (tty1) shows, as text: asks the guest agent (`screen
    /// <id>` on its port; it answers `screen <id> {json}`, see `rayos-devguest`) and waits up
    /// to `timeout` for the answer.
    pub async fn guest_screen(&self, id_or_name: &str, timeout: Duration) -> Result<GuestScreen, VmError> {
        let (vm, sock) = self.live_vmm(id_or_name, "reading the guest's screen", false)?;
        if !vm.config.agent {
            return Err(VmError::Refused { name: vm.name, reason: "reading the guest's screen needs the guest agent (config.agent)".into() });
        }
        let failed = |reason: String| VmError::Failed { name: vm.name.clone(), reason };
        // Unique per request: the agent's output ring still holds earlier answers.
        let id = format!("{}-{}", std::process::id(), NEXT_REQUEST.fetch_add(1, Ordering::Relaxed));
        let call = |req: serde_json::Value| vmm_process::request(&sock, req, Duration::from_secs(3));
        call(json!({"cmd": "agent_send", "data": format!("screen {id}\n")})).await.map_err(|e| failed(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        loop {
            let a = call(json!({"cmd": "agent_read"})).await.map_err(|e| failed(e.to_string()))?;
            if let Some(answer) = find_screen_answer(a.get("data").and_then(|d| d.as_str()).unwrap_or(""), &id) {
                return answer.map_err(|e| failed(format!("the guest agent could not read tty1: {e}")));
            }
            if Instant::now() >= deadline {
                return Err(failed(format!("the guest agent did not answer the screen request within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The VM's display as a binary PPM (P6): the VMM writes the frame into the VM's own
    /// folder (the only place it may write), we read it back and remove it.
    pub async fn screenshot(&self, id_or_name: &str) -> Result<Vec<u8>, VmError> {
        let (vm, sock) = self.live_vmm(id_or_name, "a screenshot", true)?;
        if vm.config.display.is_none() {
            return Err(VmError::Refused { name: vm.name, reason: "a screenshot needs a display (config.display)".into() });
        }
        let path = self.vm_dir(vm.id).join(format!("screenshot-{}.ppm", NEXT_REQUEST.fetch_add(1, Ordering::Relaxed)));
        let failed = |reason: String| VmError::Failed { name: vm.name.clone(), reason };
        // The VMM creates the file and never replaces one (its seccomp filter allows no
        // truncating open); a leftover goes first.
        let _ = std::fs::remove_file(&path);
        // Reading a large frame takes a moment under emulation.
        let r = vmm_process::request(&sock, json!({"cmd": "screenshot", "path": path}), Duration::from_secs(20)).await;
        let data = r.map_err(|e| failed(e.to_string())).and_then(|_| read_screenshot(&path).map_err(|e| failed(format!("{}: {e}", path.display()))));
        let _ = std::fs::remove_file(&path);
        data
    }

    /// Boot in installed mode: start every VM whose policy says so, hidden. A VM that cannot
    /// start (missing disk, …) is marked broken; the others still start.
    pub fn autostart(&self) -> usize {
        let ids: Vec<(Uuid, String)> = {
            let reg = self.registry.lock().unwrap();
            reg.vms().iter().filter(|v| v.policy.autostart_hidden).map(|v| (v.id, v.name.clone())).collect()
        };
        for (id, name) in &ids {
            tracing::info!("vm {name}: autostart (hidden)");
            if let Err(e) = self.start(&id.to_string(), false) {
                tracing::warn!("vm {name}: autostart: {e}");
            }
        }
        ids.len()
    }

    /// Orderly shutdown: stop every active VM (graceful, forced after `timeout`), and wait.
    pub async fn shutdown_all(&self, timeout: Duration) {
        let active: Vec<String> = self
            .list()
            .into_iter()
            .filter(|v| parse_state(&v.state).is_active() || v.state == "failed")
            .map(|v| v.id)
            .collect();
        if active.is_empty() {
            return;
        }
        tracing::info!("vm: stopping {} VMs for shutdown", active.len());
        for id in &active {
            let _ = self.stop(id, false);
        }
        let all_down = |m: &VmManager| m.list().iter().all(|v| !parse_state(&v.state).is_active());
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && !all_down(self) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if all_down(self) {
            return;
        }
        tracing::warn!("vm: VMs still running {timeout:?} into the shutdown; forcing them off");
        for v in self.list().into_iter().filter(|v| parse_state(&v.state).is_active()) {
            let _ = self.stop(&v.id, true);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !all_down(self) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn add_task(self: &Arc<Self>, vm: &VmRecord) {
        let (tx, rx) = mpsc::unbounded_channel();
        let info = VmInfo {
            id: vm.id.to_string(),
            name: vm.name.clone(),
            kind: vm.kind.as_str().into(),
            state: VmState::Stopped.as_str().into(),
            pid: 0,
            restarts: 0,
            detail: String::new(),
            autostart_hidden: vm.policy.autostart_hidden,
            guest_init_ms: 0,
            start_to_init_ms: 0,
            agent_ready: false,
            agent_heartbeat: 0,
            disks: vm.disks.iter().map(|d| d.path.display().to_string()).collect(),
            memory_mib: vm.config.memory_mib,
            vcpus: vm.config.vcpus,
            created_at: vm.created_at,
            last_booted_at: vm.last_booted_at.unwrap_or(0),
        };
        self.vms.lock().unwrap().insert(vm.id, Entry { info, ctl: tx });
        let mgr = self.clone();
        let id = vm.id;
        tokio::spawn(async move { mgr.vm_task(id, rx).await });
    }

    fn set(&self, id: Uuid, state: VmState, detail: &str, f: impl FnOnce(&mut VmInfo)) {
        let ev = {
            let mut vms = self.vms.lock().unwrap();
            let Some(e) = vms.get_mut(&id) else { return };
            let changed = e.info.state != state.as_str() || e.info.detail != detail;
            e.info.state = state.as_str().into();
            e.info.detail = detail.into();
            f(&mut e.info);
            changed.then(|| VmEvent { id: id.to_string(), name: e.info.name.clone(), state: state.as_str().into(), detail: detail.into() })
        };
        if let Some(ev) = ev {
            if state == VmState::Failed || state == VmState::Broken {
                tracing::warn!("vm {}: {} ({})", ev.name, ev.state, ev.detail);
            } else if detail.is_empty() {
                tracing::info!("vm {}: {}", ev.name, ev.state);
            } else {
                tracing::info!("vm {}: {} ({})", ev.name, ev.state, ev.detail);
            }
            let _ = self.events.send(ev);
        }
    }

    async fn vm_task(self: Arc<Self>, id: Uuid, mut rx: mpsc::UnboundedReceiver<Ctl>) {
        let mut crashes: VecDeque<Instant> = VecDeque::new();
        let mut restarts = 0u32;
        loop {
            // Idle: wait for a start.
            let fresh = loop {
                match rx.recv().await {
                    None | Some(Ctl::Delete) => return,
                    Some(Ctl::Start { fresh }) => break fresh,
                    Some(other) => tracing::debug!("vm {id}: {other:?} ignored while not running"),
                }
            };
            if fresh {
                tracing::info!("vm {id}: fresh start (no saved state is resumed)");
            }
            crashes.clear();
            let mut backoff = self.settings.backoff_initial;
            let requested_at = Instant::now();
            loop {
                let outcome = self.run_once(id, &mut rx, requested_at).await;
                match outcome {
                    Outcome::Stopped(detail) => {
                        self.set(id, VmState::Stopped, &detail, |i| i.pid = 0);
                        break;
                    }
                    Outcome::Broken(detail) => {
                        self.set(id, VmState::Broken, &detail, |i| i.pid = 0);
                        break;
                    }
                    Outcome::Deleted => return,
                    Outcome::Rebooted => {
                        restarts += 1;
                        self.set(id, VmState::Starting, "the guest rebooted", |i| i.restarts = restarts);
                        continue;
                    }
                    Outcome::Crashed(why) => {
                        let now = Instant::now();
                        crashes.push_back(now);
                        while crashes.front().is_some_and(|t| now.duration_since(*t) > self.settings.crash_window) {
                            crashes.pop_front();
                        }
                        let policy = self.registry.lock().unwrap().get(id).map(|v| v.policy.restart);
                        if policy != Some(RestartPolicy::OnFailure) {
                            self.set(id, VmState::Failed, &format!("VMM {why}; policy: no restart"), |i| i.pid = 0);
                            break;
                        }
                        if crashes.len() >= self.settings.crash_count {
                            let detail = format!(
                                "VMM {why}; crashed {} times within {:?}: not restarted until started again",
                                crashes.len(),
                                self.settings.crash_window
                            );
                            let name = self.get(&id.to_string()).map(|i| i.name).unwrap_or_default();
                            tracing::error!("vm {name}: crash loop: {detail}");
                            self.problems.lock().unwrap().push(format!("VM {name}: crash loop: {detail}"));
                            self.set(id, VmState::CrashLoop, &detail, |i| i.pid = 0);
                            break;
                        }
                        let detail = format!("VMM {why}; restarting in {} ms", backoff.as_millis());
                        self.set(id, VmState::Failed, &detail, |i| i.pid = 0);
                        // The backoff can be cut short by a stop (or a delete).
                        let sleep = tokio::time::sleep(backoff);
                        tokio::pin!(sleep);
                        let cancelled = loop {
                            tokio::select! {
                                _ = &mut sleep => break None,
                                c = rx.recv() => match c {
                                    None | Some(Ctl::Delete) => return,
                                    Some(Ctl::Stop { .. }) => break Some(()),
                                    Some(_) => {}
                                }
                            }
                        };
                        if cancelled.is_some() {
                            self.set(id, VmState::Stopped, "restart cancelled by a stop", |_| {});
                            break;
                        }
                        backoff = (backoff * 2).min(self.settings.backoff_max);
                        restarts += 1;
                        self.set(id, VmState::Starting, "restarting after a crash", |i| i.restarts = restarts);
                    }
                }
            }
        }
    }

    /// One VMM run, from spawn to its exit.
    async fn run_once(&self, id: Uuid, rx: &mut mpsc::UnboundedReceiver<Ctl>, requested_at: Instant) -> Outcome {
        let Some(vm) = self.registry.lock().unwrap().get(id).cloned() else { return Outcome::Deleted };
        let files = VmFiles::new(&self.settings.paths.run_dir, &self.vm_dir(id), &vm);
        let missing = vmm_process::missing_disks(&vm);
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            let detail = format!("disk image missing: {}", list.join(", "));
            tracing::error!("vm {}: {detail}", vm.name);
            return Outcome::Broken(detail);
        }
        if let Some(other) = owner::collision(self.registry.lock().unwrap().vms(), id) {
            let detail = format!(
                "VM {} has the same user (uid {}) and would share its files: delete and recreate one of them",
                other.name,
                owner::vm_uid(id)
            );
            tracing::error!("vm {}: {detail}", vm.name);
            return Outcome::Broken(detail);
        }
        let spec = match vmm_process::build_spec(&vm, &files) {
            Ok(s) => s,
            Err(e) => return Outcome::Broken(e.to_string()),
        };
        self.set(id, VmState::Starting, "", |i| {
            i.guest_init_ms = 0;
            i.start_to_init_ms = 0;
            i.agent_ready = false;
            i.agent_heartbeat = 0;
        });
        // What the supervisor adds to a start is the time until it spawns the VMM; from then on
        // the VMM's own boot timer says when the guest reached init.
        let supervisor_ms = requested_at.elapsed().as_millis() as u64;
        let spawned = match vmm_process::spawn(&self.reaper, &self.settings.vmm_bin, &vm, &files, &spec) {
            Ok(s) => s,
            Err(e) => return Outcome::Crashed(format!("could not start: {e}")),
        };
        let pid = spawned.pid;
        let mut exit = spawned.exit;
        let started = Instant::now();
        tracing::info!("vm {}: VMM pid {pid} started ({} ms after the request)", vm.name, requested_at.elapsed().as_millis());
        let booted_at = registry::now_secs();
        if let Err(e) = self.registry.lock().unwrap().update(id, |v| v.last_booted_at = Some(booted_at)) {
            tracing::warn!("vm {}: recording the boot time: {e}", vm.name);
        }
        self.set(id, VmState::Starting, "", |i| {
            i.pid = pid;
            i.last_booted_at = booted_at;
        });

        let sock = files.control_socket.clone();
        let call = |req: serde_json::Value| {
            let sock = sock.clone();
            async move { vmm_process::request(&sock, req, Duration::from_secs(3)).await }
        };
        let mut up = false;
        let mut hung = false;
        let mut init_seen = false;
        let mut stopping: Option<(Instant, bool)> = None;
        let mut agent_polled = Instant::now();
        let mut agent_ready = false;
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let kind = loop {
            tokio::select! {
                status = &mut exit => break status.unwrap_or(ExitKind::Signaled(9)),
                _ = poll.tick() => {
                    if !up {
                        if sock.exists() && call(json!({"cmd": "status"})).await.is_ok() {
                            up = true;
                            if stopping.is_none() {
                                self.set(id, VmState::Running, "", |_| {});
                            }
                        } else if started.elapsed() > self.settings.socket_timeout && stopping.is_none() && !hung {
                            tracing::error!("vm {}: control socket {} not up after {:?}; killing the VMM", vm.name, sock.display(), self.settings.socket_timeout);
                            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                            hung = true;
                        }
                    } else if !init_seen {
                        // The VMM's boot timer: the guest's init wrote its port.
                        if let Ok(st) = call(json!({"cmd": "status"})).await {
                            if let Some(ms) = st.get("boot_ms").and_then(|v| v.as_u64()) {
                                init_seen = true;
                                // When init ran, not when this 20 ms poll noticed it (that is
                                // `noticed`); exec of the VMM binary counts as the VMM's.
                                let total = supervisor_ms + ms;
                                let noticed = requested_at.elapsed().as_millis() as u64;
                                tracing::info!("vm {}: guest init reached: {ms} ms after VMM start, {total} ms after the start request (VMM spawned {supervisor_ms} ms after it; seen after {noticed} ms)", vm.name);
                                self.set(id, parse_state(&self.get(&id.to_string()).map(|i| i.state).unwrap_or_default()), "", |i| {
                                    i.guest_init_ms = ms;
                                    i.start_to_init_ms = total;
                                });
                            }
                        }
                    }
                    if up && vm.config.agent && stopping.is_none() && agent_polled.elapsed() >= AGENT_POLL {
                        agent_polled = Instant::now();
                        if let Ok(a) = call(json!({"cmd": "agent_read"})).await {
                            let (ready, beat) = parse_agent(a.get("data").and_then(|d| d.as_str()).unwrap_or(""));
                            if ready && !agent_ready {
                                agent_ready = true;
                                tracing::info!("vm {}: guest agent ready ({} ms after the start request)", vm.name, requested_at.elapsed().as_millis());
                            }
                            if let Some(e) = self.vms.lock().unwrap().get_mut(&id) {
                                e.info.agent_ready = ready;
                                e.info.agent_heartbeat = beat;
                            }
                        }
                    }
                    if let Some((since, forced)) = stopping {
                        if !forced && since.elapsed() > self.settings.stop_timeout {
                            tracing::warn!("vm {}: guest did not power off within {:?}; forcing", vm.name, self.settings.stop_timeout);
                            self.force_off(&sock, pid).await;
                            stopping = Some((Instant::now(), true));
                        } else if forced && since.elapsed() > Duration::from_secs(2) {
                            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        }
                    }
                }
                c = rx.recv() => match c {
                    None => {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                    Some(Ctl::Start { .. }) | Some(Ctl::Delete) => {}
                    Some(Ctl::Pause) => match call(json!({"cmd": "pause"})).await {
                        Ok(_) => self.set(id, VmState::Paused, "", |_| {}),
                        Err(e) => tracing::warn!("vm {}: pause: {e}", vm.name),
                    },
                    Some(Ctl::Resume) => match call(json!({"cmd": "resume"})).await {
                        Ok(_) => self.set(id, VmState::Running, "", |_| {}),
                        Err(e) => tracing::warn!("vm {}: resume: {e}", vm.name),
                    },
                    Some(Ctl::Stop { force }) => {
                        self.set(id, VmState::Stopping, if force { "forced" } else { "ACPI power button" }, |_| {});
                        if force || !up {
                            self.force_off(&sock, pid).await;
                            stopping = Some((Instant::now(), true));
                        } else {
                            // A paused guest cannot see the power button.
                            let _ = call(json!({"cmd": "resume"})).await;
                            if agent_ready {
                                let _ = call(json!({"cmd": "agent_send", "data": "shutdown\n"})).await;
                            }
                            if let Err(e) = call(json!({"cmd": "shutdown"})).await {
                                tracing::warn!("vm {}: power button: {e}; forcing", vm.name);
                                self.force_off(&sock, pid).await;
                                stopping = Some((Instant::now(), true));
                            } else {
                                stopping = Some((Instant::now(), false));
                            }
                        }
                    }
                },
            }
        };
        let _ = std::fs::remove_file(&files.control_socket);
        if hung {
            return Outcome::Crashed(format!("opened no control socket within {:?} and was killed", self.settings.socket_timeout));
        }
        match (kind, stopping) {
            (ExitKind::Exited(0), Some((_, false))) => Outcome::Stopped("the guest powered off".into()),
            (_, Some((_, forced))) => Outcome::Stopped(format!("{}; VMM {kind}", if forced { "forced off" } else { "stopped" })),
            (ExitKind::Exited(0), None) => Outcome::Stopped("the guest powered off".into()),
            (ExitKind::Exited(EXIT_REBOOT), None) => Outcome::Rebooted,
            (k, None) => Outcome::Crashed(k.to_string()),
        }
    }

    async fn force_off(&self, sock: &Path, pid: u32) {
        if vmm_process::request(sock, json!({"cmd": "poweroff"}), Duration::from_secs(1)).await.is_err() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// The largest PPM a display can give: 4095x4095 pixels (EDID's limit), 3 bytes each, and
/// its header.
const MAX_SCREENSHOT: u64 = 4095 * 4095 * 3 + 64;

/// Reads the screenshot the VMM wrote into its folder, which its user owns: not through a
/// symlink (to a file only root may read), and not more than a frame can be.
fn read_screenshot(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let mut data = Vec::new();
    f.take(MAX_SCREENSHOT + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_SCREENSHOT {
        return Err(std::io::Error::other(format!("larger than any frame ({MAX_SCREENSHOT} bytes)")));
    }
    Ok(data)
}

/// Numbers requests to the VMMs and guest agents (screen ids, screenshot files).
static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

/// In the agent's recent output, the complete answer line `screen <id> {json}`: Some(Ok)
/// with the screen, Some(Err) with the agent's error, None while it has not come.
fn find_screen_answer(data: &str, id: &str) -> Option<Result<GuestScreen, String>> {
    let prefix = format!("screen {id} ");
    // Only whole lines: the last one may still be arriving.
    let complete = &data[..data.rfind('\n')? + 1];
    let json = complete.lines().rev().find_map(|l| l.strip_prefix(prefix.as_str()))?;
    #[derive(Deserialize)]
    struct Answer {
        error: Option<String>,
        tty: Option<u32>,
        rows: Option<u32>,
        cols: Option<u32>,
        cursor: Option<(u32, u32)>,
        text: Option<String>,
    }
    let a: Answer = match serde_json::from_str(json) {
        Ok(a) => a,
        Err(e) => return Some(Err(format!("unreadable answer: {e}"))),
    };
    if let Some(e) = a.error {
        return Some(Err(e));
    }
    let (Some(tty), Some(rows), Some(cols), Some((cursor_x, cursor_y)), Some(text)) = (a.tty, a.rows, a.cols, a.cursor, a.text) else {
        return Some(Err(format!("answer without tty, rows, cols, cursor or text: {json}")));
    };
    Some(Ok(GuestScreen { tty, rows, cols, cursor_x, cursor_y, text }))
}

/// How often the guest agent's output is read.
const AGENT_POLL: Duration = Duration::from_millis(250);

/// From the agent port's recent output: whether it said `ready`, and its last heartbeat.
fn parse_agent(data: &str) -> (bool, u64) {
    let ready = data.lines().any(|l| l.trim() == "ready");
    let beat = data
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("heartbeat ").and_then(|n| n.trim().parse::<u64>().ok()))
        .unwrap_or(0);
    (ready, beat)
}

enum Outcome {
    Stopped(String),
    Broken(String),
    Rebooted,
    Crashed(String),
    Deleted,
}

pub fn parse_state(s: &str) -> VmState {
    serde_json::from_value(serde_json::Value::String(s.into())).unwrap_or(VmState::Stopped)
}

#[cfg(test)]
mod agent_tests {
    #[test]
    fn agent_output_gives_readiness_and_the_last_heartbeat() {
        assert_eq!(super::parse_agent(""), (false, 0));
        assert_eq!(super::parse_agent("ready\nheartbeat 1\nheartbeat 2\nheartb"), (true, 2));
        // The ring may start mid-line.
        assert_eq!(super::parse_agent("beat 7\nheartbeat 8\n"), (false, 8));
    }

    #[test]
    fn the_screen_answer_is_found_by_its_id_and_only_when_complete() {
        use super::find_screen_answer;
        let ours = r#"screen 7-2 {"tty":1,"rows":2,"cols":80,"cursor":[7,1],"text":"Debian\nhost login:"}"#;
        let old = r#"screen 7-1 {"tty":1,"rows":2,"cols":80,"cursor":[0,0],"text":"old"}"#;
        assert!(find_screen_answer(&format!("ready\n{old}\nheartbeat 3\n"), "7-2").is_none(), "an earlier answer is not ours");
        assert!(find_screen_answer(&ours[..40], "7-2").is_none(), "a line still arriving");
        let s = find_screen_answer(&format!("{old}\nheartbeat 4\n{ours}\nheartbeat 5\n"), "7-2").unwrap().unwrap();
        assert_eq!((s.tty, s.rows, s.cols, s.cursor_x, s.cursor_y), (1, 2, 80, 7, 1));
        assert_eq!(s.text, "Debian\nhost login:");
        let e = find_screen_answer("screen 9 {\"error\":\"/dev/vcsu1: No such file\"}\n", "9").unwrap().unwrap_err();
        assert!(e.contains("/dev/vcsu1"), "{e}");
        let e = find_screen_answer("screen 9 {\"tty\":1}\n", "9").unwrap().unwrap_err();
        assert!(e.contains("without"), "{e}");
    }
}
