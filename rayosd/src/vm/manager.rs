//! The VM supervisor: owns the registry and one task per VM that starts its `rayos-vmm`,
//! watches it (exit statuses come from the [`Reaper`]), restarts it after a crash with
//! exponential backoff, stops restarting on a crash loop, and carries out the API's
//! start/stop/pause/resume requests. Every state change is logged and broadcast as a
//! [`VmEvent`] (the `VmStateChanged` D-Bus signal).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::hang::HangLimits;
use super::owner;
use super::monitor::PrimaryMonitor;
use super::registry::{self, DeviceConfig, DiskRecord, DisplayConfig, DisplaySize, Policy, Registry, RegistryError, VmKind, VmRecord};
use super::state::{self, Request, VmState};
use super::vmm_conn::VmmConn;
use super::vmm_process::VmFiles;
use crate::reaper::Reaper;
use crate::restart::RestartLimits;

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
    /// Backoff and crash loop, the policy VMs share with services.
    pub restart: RestartLimits,
    /// How long a new VMM gets to say it is up (the first event on its connection).
    pub up_timeout: Duration,
    /// When a running guest counts as hung.
    pub hang: HangLimits,
    /// The system keymap chosen at install (system.toml's `keymap`): the layout `TypeText`
    /// types in.
    pub keymap: super::keymap::SystemKeymap,
    /// How long one VM's save may take before the guest is forced off instead.
    pub save_timeout: Duration,
    /// How long a cold start of a VM whose display follows the monitor waits for the
    /// compositor's first report of the monitor's mode (rayosd starts the compositor after
    /// the autostart VMs); zero where no compositor runs (systemless, tests).
    pub monitor_wait: Duration,
}

impl Settings {
    pub fn new(vmm_bin: PathBuf, paths: Paths) -> Settings {
        Settings {
            vmm_bin,
            paths,
            stop_timeout: Duration::from_secs(20),
            restart: RestartLimits {
                backoff_initial: Duration::from_millis(500),
                backoff_max: Duration::from_secs(30),
                crash_count: 5,
                crash_window: Duration::from_secs(120),
                stable_after: Duration::from_secs(60),
            },
            up_timeout: Duration::from_secs(10),
            hang: HangLimits::default(),
            keymap: super::keymap::SystemKeymap::Us,
            save_timeout: Duration::from_secs(90),
            monitor_wait: Duration::ZERO,
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
    /// Why it is failed/hung/broken/crash-looping, or the last notable event.
    pub detail: String,
    pub autostart_hidden: bool,
    /// ms from the VMM's start to the guest's init (the boot-timer port); 0 until reached.
    pub guest_init_ms: u64,
    /// ms from the supervisor's start request to the guest's init; 0 until reached.
    pub start_to_init_ms: u64,
    /// It offers the guest agent port (`config.agent`): `agent_ready` says when its guest is up.
    pub has_agent: bool,
    /// The guest agent said `ready` on its port (VMs with `config.agent`).
    pub agent_ready: bool,
    /// The last heartbeat number the guest agent sent; 0 before the first.
    pub agent_heartbeat: u64,
    /// The first-boot setup the guest agent is given (user, time zone, locale, keymap) and
    /// where it stands: "pending (…)", "done (…)" or "failed: <why> …"; empty when the VM
    /// has none.
    pub firstboot: String,
    pub disks: Vec<String>,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub created_at: u64,
    pub last_booted_at: u64,
    /// It has a display the compositor can present (`org.rayos.Display1`).
    pub has_display: bool,
    /// Its display follows the primary monitor's mode (else it is fixed, or there is none).
    pub display_follows_monitor: bool,
    /// Its display size now: the running VMM's, the saved state's, else what a start would
    /// give it now; 0x0 without a display.
    pub display_width: u32,
    pub display_height: u32,
    /// What a RayOS shutdown does with it when it runs: "save" or "shutdown".
    pub on_shutdown: String,
    /// Its network policy: "off" or "nat" (what its next start gives it).
    pub network: String,
    /// Its card's MAC on RayOS's private network ("nat" VMs; empty otherwise).
    pub mac: String,
    /// The saved state the next start resumes: its generation (0: none), when it was saved
    /// (seconds since the epoch) and the bytes of RAM written.
    pub saved_generation: u64,
    pub saved_at: u64,
    pub saved_bytes: u64,
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
    /// The request asks for something RayOS does not do (e.g. text in a system keymap
    /// whose file cannot be read).
    #[error("{0}")]
    NotSupported(String),
}

#[derive(Debug)]
pub(super) enum Ctl {
    Start { fresh: bool },
    /// Save the running VM and end its VMM; the answer says where it went or why not.
    /// With `or_stop`, a save that cannot be made shuts the guest down instead (RayOS is
    /// shutting down); without, the VM keeps running.
    Save { reply: tokio::sync::oneshot::Sender<Result<String, String>>, or_stop: bool },
    Stop { force: bool },
    Pause,
    Resume,
    Delete,
}

pub(super) struct Entry {
    pub(super) info: VmInfo,
    pub(super) ctl: mpsc::UnboundedSender<Ctl>,
    /// The running VMM's connection (requests from the API go over it).
    pub(super) conn: Option<Arc<VmmConn>>,
    /// rayosd's end of the running VMM's display channel (VMs with a display).
    pub(super) display: Option<Arc<OwnedFd>>,
    /// The display size the running VMM was given (VMs with a display).
    pub(super) display_size: Option<DisplaySize>,
}

pub struct VmManager {
    pub(super) reaper: Arc<Reaper>,
    pub(super) settings: Settings,
    pub(super) registry: Mutex<Registry>,
    pub(super) vms: Mutex<BTreeMap<Uuid, Entry>>,
    /// Registry problems found at load and crash loops: what `rayosctl vm list` reports.
    pub(super) problems: Mutex<Vec<String>>,
    pub(super) events: broadcast::Sender<VmEvent>,
    /// The primary monitor's mode as the compositor last reported it.
    pub(super) monitor: PrimaryMonitor,
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
            monitor: PrimaryMonitor::default(),
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
        let entries: Vec<(VmInfo, Option<DisplaySize>)> = self.vms.lock().unwrap().values().map(|e| (e.info.clone(), e.display_size)).collect();
        let mut v: Vec<VmInfo> = entries.into_iter().map(|(info, size)| self.with_display(info, size)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The primary monitor's mode as the compositor reports it (`org.rayos.Display1`).
    pub fn monitor(&self) -> &PrimaryMonitor {
        &self.monitor
    }

    /// `info` with its display fields filled in: `running` is the running VMM's size.
    /// (Called without the `vms` lock held: it takes the registry's.)
    fn with_display(&self, mut info: VmInfo, running: Option<DisplaySize>) -> VmInfo {
        let vm = Uuid::parse_str(&info.id).ok().and_then(|id| self.registry.lock().unwrap().get(id).cloned());
        let Some(config) = vm.as_ref().and_then(|v| v.config.display) else { return info };
        let saved = vm.as_ref().and_then(|v| v.saved.as_ref()).and_then(|s| s.display);
        let size = running.unwrap_or_else(|| super::monitor::choose(config, saved, self.monitor.mode()).size);
        info.display_follows_monitor = config == DisplayConfig::FollowMonitor;
        (info.display_width, info.display_height) = (size.width, size.height);
        info
    }

    fn resolve(&self, id_or_name: &str) -> Result<Uuid, VmError> {
        let reg = self.registry.lock().unwrap();
        reg.find(id_or_name).map(|v| v.id).map_err(|_| VmError::NoSuchVm(id_or_name.to_string()))
    }

    pub fn get(&self, id_or_name: &str) -> Result<VmInfo, VmError> {
        let id = self.resolve(id_or_name)?;
        let entry = self.vms.lock().unwrap().get(&id).map(|e| (e.info.clone(), e.display_size));
        let (info, size) = entry.ok_or_else(|| VmError::NoSuchVm(id_or_name.into()))?;
        Ok(self.with_display(info, size))
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
            firstboot: None,
            saved: None,
            save_generation: 0,
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
    /// Saves the running VM to the data volume and ends its VMM (hibernate); the next start
    /// resumes it. Waits for the save; the answer says what was written.
    pub async fn save(&self, id_or_name: &str) -> Result<String, VmError> {
        self.save_or_stop(id_or_name, false).await
    }

    async fn save_or_stop(&self, id_or_name: &str, or_stop: bool) -> Result<String, VmError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.request(id_or_name, Request::Save, Ctl::Save { reply: tx, or_stop })?;
        let name = self.get(id_or_name).map(|i| i.name).unwrap_or_else(|_| id_or_name.to_string());
        match rx.await {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(reason)) => Err(VmError::Failed { name, reason }),
            Err(_) => Err(VmError::Failed { name, reason: "its task ended before the save finished".into() }),
        }
    }

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
        if vm.policy.network == registry::Network::Nat {
            // Its tap outlives VMM runs on purpose (a restart or resume finds it); not a
            // deleted VM.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (name, uid) = (vm.name.clone(), owner::vm_uid(id));
                rt.spawn(async move {
                    if let Err(e) = netd::vmlink::remove(uid).await {
                        tracing::warn!("vm {name}: removing its tap: {e}");
                    }
                });
            }
        }
        let _ = self.events.send(VmEvent { id: id.to_string(), name: vm.name, state: "deleted".into(), detail: String::new() });
        Ok(())
    }

    /// Sets the VM's network policy; it takes effect at its next start (a running VM keeps
    /// the network it started with, and a resume needs the devices it was saved with).
    pub fn set_network(&self, id_or_name: &str, network: registry::Network) -> Result<VmInfo, VmError> {
        let id = self.resolve(id_or_name)?;
        let mut vm = None;
        self.registry.lock().unwrap().update(id, |v| {
            v.policy.network = network;
            vm = Some(v.clone());
        })?;
        let vm = vm.expect("update ran");
        if let Some(e) = self.vms.lock().unwrap().get_mut(&id) {
            e.info.network = network.as_str().into();
            e.info.mac = nat_mac(&vm);
        }
        tracing::info!("vm {}: network {} from its next start", vm.name, network.as_str());
        self.get(id_or_name)
    }

    /// The last `lines` lines of the VM's serial console (read in bounded memory, see
    /// [`super::serial_tail`]).
    pub fn logs(&self, id_or_name: &str, lines: usize) -> Result<String, VmError> {
        let vm = self.record(id_or_name)?;
        let files = VmFiles::new(&self.settings.paths.run_dir, &self.vm_dir(vm.id), &vm);
        Ok(super::serial_tail::serial_tail(&files.serial_log, lines))
    }

    /// The connection of a VM whose VMM is up (running, or paused when `paused_ok`).
    pub(super) fn live_vmm(&self, id_or_name: &str, what: &str, paused_ok: bool) -> Result<(VmRecord, Arc<VmmConn>), VmError> {
        let vm = self.record(id_or_name)?;
        let st = parse_state(&self.get(id_or_name)?.state);
        if !(st == VmState::Running || (paused_ok && st == VmState::Paused)) {
            let need = if paused_ok { "a running or paused VM" } else { "a running VM" };
            return Err(VmError::Refused { name: vm.name, reason: format!("{what} needs {need}; it is {st}") });
        }
        let conn = self.vms.lock().unwrap().get(&vm.id).and_then(|e| e.conn.clone());
        let conn = conn.ok_or_else(|| VmError::Refused { name: vm.name.clone(), reason: format!("{what}: its VMM is not connected") })?;
        Ok((vm, conn))
    }

    /// A duplicate of rayosd's end of the running VMM's display channel, for the compositor.
    /// Refused by name for a VM without a display or without a running VMM.
    pub fn display_channel(&self, id_or_name: &str) -> Result<OwnedFd, VmError> {
        let vm = self.record(id_or_name)?;
        if vm.config.display.is_none() {
            return Err(VmError::Refused { name: vm.name, reason: "it has no display".into() });
        }
        let fd = self.vms.lock().unwrap().get(&vm.id).and_then(|e| e.display.clone());
        let fd = fd.ok_or_else(|| VmError::Refused { name: vm.name.clone(), reason: "its VMM is not running".into() })?;
        fd.try_clone().map_err(|e| VmError::Refused { name: vm.name, reason: format!("cannot share its display channel: {e}") })
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

    /// Orderly shutdown: saves every running or paused VM whose policy says `save` (all at
    /// once, each bounded by the settings' `save_timeout`; one that cannot be saved is shut
    /// down instead), stops every other active VM (ACPI power button, forced after `timeout`),
    /// and waits until no VMM runs.
    pub async fn shutdown_all(&self, timeout: Duration) {
        let policy = |id: &str| {
            let reg = self.registry.lock().unwrap();
            reg.find(id).map(|v| v.policy.on_shutdown).unwrap_or_default()
        };
        let (mut to_save, mut to_stop) = (Vec::new(), Vec::new());
        for v in self.list() {
            let st = parse_state(&v.state);
            if matches!(st, VmState::Running | VmState::Paused) && policy(&v.id) == registry::OnShutdown::Save {
                to_save.push(v);
            } else if st.is_active() || matches!(st, VmState::Failed | VmState::Hung) {
                to_stop.push(v);
            }
        }
        if to_save.is_empty() && to_stop.is_empty() {
            return;
        }
        for v in &to_stop {
            tracing::info!("vm {}: stopping it for the shutdown", v.name);
            let _ = self.stop(&v.id, false);
        }
        if !to_save.is_empty() {
            let names: Vec<&str> = to_save.iter().map(|v| v.name.as_str()).collect();
            tracing::info!("vm: saving {} for the shutdown: {}", if names.len() == 1 { "1 VM" } else { "the VMs" }, names.join(", "));
            let t0 = Instant::now();
            let saves = to_save.iter().map(|v| async move { (v, self.save_or_stop(&v.id, true).await) });
            for (v, r) in futures_util::future::join_all(saves).await {
                match r {
                    Ok(done) => tracing::info!("vm {}: {done}", v.name),
                    Err(e) => tracing::warn!("vm {}: not saved ({e}); shutting it down instead", v.name),
                }
            }
            tracing::info!("vm: saving took {} ms", t0.elapsed().as_millis());
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
            has_agent: vm.config.agent,
            agent_ready: false,
            agent_heartbeat: 0,
            firstboot: vm.firstboot.as_ref().map(|f| f.describe()).unwrap_or_default(),
            disks: vm.disks.iter().map(|d| d.path.display().to_string()).collect(),
            memory_mib: vm.config.memory_mib,
            vcpus: vm.config.vcpus,
            created_at: vm.created_at,
            last_booted_at: vm.last_booted_at.unwrap_or(0),
            has_display: vm.config.display.is_some(),
            display_follows_monitor: false,
            display_width: 0,
            display_height: 0,
            on_shutdown: vm.policy.on_shutdown.as_str().into(),
            network: vm.policy.network.as_str().into(),
            mac: nat_mac(vm),
            saved_generation: 0,
            saved_at: 0,
            saved_bytes: 0,
        };
        let mut info = info;
        if let Some(s) = &vm.saved {
            info.state = VmState::Saved.as_str().into();
            info.detail = saved_detail(s);
            (info.saved_generation, info.saved_at, info.saved_bytes) = (s.generation, s.saved_at, s.written_bytes);
        }
        self.vms.lock().unwrap().insert(vm.id, Entry { info, ctl: tx, conn: None, display: None, display_size: None });
        let mgr = self.clone();
        let id = vm.id;
        tokio::spawn(async move { mgr.vm_task(id, rx).await });
    }

    /// What the guest agent last said. When its readiness changes, watchers get a
    /// VmStateChanged with the state as it is: the home screen shows a VM starting until its
    /// guest is up, which a state of its own would not say (the VMM is up well before).
    pub(super) fn set_agent(&self, id: Uuid, ready: bool, heartbeat: u64) {
        let ev = {
            let mut vms = self.vms.lock().unwrap();
            let Some(e) = vms.get_mut(&id) else { return };
            let changed = e.info.agent_ready != ready;
            e.info.agent_ready = ready;
            e.info.agent_heartbeat = heartbeat;
            changed.then(|| VmEvent { id: id.to_string(), name: e.info.name.clone(), state: e.info.state.clone(), detail: e.info.detail.clone() })
        };
        if let Some(ev) = ev {
            let _ = self.events.send(ev);
        }
    }

    pub(super) fn set(&self, id: Uuid, state: VmState, detail: &str, f: impl FnOnce(&mut VmInfo)) {
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
            if matches!(state, VmState::Failed | VmState::Broken | VmState::Hung) {
                tracing::warn!("vm {}: {} ({})", ev.name, ev.state, ev.detail);
            } else if detail.is_empty() {
                tracing::info!("vm {}: {}", ev.name, ev.state);
            } else {
                tracing::info!("vm {}: {} ({})", ev.name, ev.state, ev.detail);
            }
            let _ = self.events.send(ev);
        }
    }
}

/// Numbers requests to the VMMs and guest agents (screen ids, screenshot files).
pub(super) static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

pub(super) enum Outcome {
    Stopped(String),
    Broken(String),
    Rebooted,
    Crashed(String),
    /// The guest was found hung (by rayosd's [`super::hang`] rules or the VMM's no-progress
    /// check) and its VMM ended; the run counts as healthy only for as long as the guest
    /// showed signs of life (for the restart policy's "healthy run").
    Hung { why: String, healthy_for: Duration },
    Deleted,
    /// Saved to the data volume; its VMM has ended.
    Saved(registry::SavedState),
    /// The saved state was refused when its VMM loaded it (it is kept aside): boot the VM
    /// from its disks now.
    ResumeRefused(String),
}

/// What `vm list` says about a saved VM.
pub(super) fn saved_detail(s: &registry::SavedState) -> String {
    format!("generation {}, {} MiB of RAM written; the next start resumes it", s.generation, s.written_bytes >> 20)
}

pub fn parse_state(s: &str) -> VmState {
    serde_json::from_value(serde_json::Value::String(s.into())).unwrap_or(VmState::Stopped)
}

fn nat_mac(vm: &VmRecord) -> String {
    if vm.policy.network == registry::Network::Nat {
        rayos_proto::net::fmt_mac(&rayos_proto::net::vm_mac(vm.id.as_bytes()))
    } else {
        String::new()
    }
}
