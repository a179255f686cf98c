//! The per-VM task: waits for a start, runs the VMM (spawn, its events, the API's
//! pause/resume/stop), and after it ends decides: stopped, broken, rebooted (start again) or
//! crashed (restart with the shared backoff policy, [`crate::restart`], until a crash loop).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rayos_proto::agent::FromAgent;
use rayos_proto::vmm::{exit_code, Event, Reply, Request as VmmRequest, RunState, SnapshotReply};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::agent::AgentStatus;
use super::hang::{BootHistory, HangWatch};
use super::manager::{parse_state, Ctl, Outcome, VmManager};
use super::monitor;
use super::owner;
use super::registry::{self, DisplayConfig, DisplaySize, RestartPolicy, SavedState, VmKind};
use super::saved;
use super::state::VmState;
use super::vmm_conn::VmmConn;
use std::os::fd::OwnedFd;
use super::vmm_process::{self, VmFiles};
use crate::reaper::ExitKind;
use crate::restart::{RestartTracker, Verdict};

/// What `run_once` says about a VM of a kind the VMM cannot boot yet.
pub const WINDOWS_NOT_SUPPORTED: &str = "Windows VMs are not supported yet";

/// How a VM's stop is going, once one was asked for.
#[derive(Clone, Copy, Debug)]
enum Stopping {
    /// The ACPI power button was pressed first at `since` and last at `pressed`; forced off
    /// once the stop timeout has passed since `since`.
    Graceful { since: Instant, pressed: Instant },
    /// Powered off (or ending) at `since`; its VMM is killed 2 s later.
    Forced { since: Instant },
}

impl VmManager {
    pub(super) async fn vm_task(self: Arc<Self>, id: Uuid, mut rx: mpsc::UnboundedReceiver<Ctl>) {
        let mut tracker = RestartTracker::new(self.settings.restart);
        let mut restarts = 0u32;
        // How long this VM's guest usually takes to reach init: its hang bound.
        let mut boots = BootHistory::default();
        loop {
            // Idle: wait for a start.
            let fresh = loop {
                match rx.recv().await {
                    None | Some(Ctl::Delete) => return,
                    Some(Ctl::Start { fresh }) => break fresh,
                    Some(Ctl::Save { reply, .. }) => {
                        let _ = reply.send(Err("it is not running".into()));
                    }
                    Some(other) => tracing::debug!("vm {id}: {other:?} ignored while not running"),
                }
            };
            if fresh {
                self.discard_saved(id);
            }
            tracker.reset();
            let requested_at = Instant::now();
            loop {
                let started = Instant::now();
                let outcome = self.run_once(id, &mut rx, requested_at, &mut boots).await;
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
                    Outcome::Saved(saved) => {
                        self.set(id, VmState::Saved, &super::manager::saved_detail(&saved), |i| {
                            i.pid = 0;
                            (i.saved_generation, i.saved_at, i.saved_bytes) = (saved.generation, saved.saved_at, saved.written_bytes);
                        });
                        break;
                    }
                    Outcome::ResumeRefused(why) => {
                        // Not a crash: the guest never ran. It boots from its disks now.
                        self.set(id, VmState::Starting, &format!("saved state refused ({why}); booting from its disks"), |_| {});
                        continue;
                    }
                    Outcome::Rebooted => {
                        restarts += 1;
                        self.set(id, VmState::Starting, "the guest rebooted", |i| i.restarts = restarts);
                        continue;
                    }
                    Outcome::Crashed(_) | Outcome::Hung { .. } => {
                        // A hang is a failure like a crash: the same policy decides. The time
                        // a hung guest sat silent is not a healthy run.
                        let (state, what, ran) = match outcome {
                            Outcome::Hung { why, healthy_for } => (VmState::Hung, format!("hung: {why}"), healthy_for),
                            Outcome::Crashed(why) => (VmState::Failed, format!("VMM {why}"), started.elapsed()),
                            _ => unreachable!(),
                        };
                        let policy = self.registry.lock().unwrap().get(id).map(|v| v.policy.restart);
                        if policy != Some(RestartPolicy::OnFailure) {
                            self.set(id, state, &format!("{what}; policy: no restart"), |i| i.pid = 0);
                            break;
                        }
                        let backoff = match tracker.failed(ran, Instant::now()) {
                            Verdict::Restart { after } => after,
                            Verdict::CrashLoop { failures } => {
                                let detail = format!(
                                    "{what}; {} {failures} times within {:?}: not restarted until started again",
                                    if state == VmState::Hung { "crashed or hung" } else { "crashed" },
                                    self.settings.restart.crash_window
                                );
                                let name = self.get(&id.to_string()).map(|i| i.name).unwrap_or_default();
                                tracing::error!("vm {name}: crash loop: {detail}");
                                self.problems.lock().unwrap().push(format!("VM {name}: crash loop: {detail}"));
                                self.set(id, VmState::CrashLoop, &detail, |i| i.pid = 0);
                                break;
                            }
                        };
                        let detail = format!("{what}; restarting in {} ms", backoff.as_millis());
                        self.set(id, state, &detail, |i| i.pid = 0);
                        // The backoff can be cut short by a stop (or a delete).
                        let sleep = tokio::time::sleep(backoff);
                        tokio::pin!(sleep);
                        let cancelled = loop {
                            tokio::select! {
                                _ = &mut sleep => break false,
                                c = rx.recv() => match c {
                                    None | Some(Ctl::Delete) => return,
                                    Some(Ctl::Stop { .. }) => break true,
                                    Some(Ctl::Save { reply, .. }) => {
                                        let _ = reply.send(Err("it is not running (a restart is pending)".into()));
                                    }
                                    Some(_) => {}
                                }
                            }
                        };
                        if cancelled {
                            self.set(id, VmState::Stopped, "restart cancelled by a stop", |_| {});
                            break;
                        }
                        restarts += 1;
                        let why = if state == VmState::Hung { "restarting after a hang" } else { "restarting after a crash" };
                        self.set(id, VmState::Starting, why, |i| i.restarts = restarts);
                    }
                }
            }
        }
    }

    /// One VMM run, from spawn to its exit.
    async fn run_once(
        &self,
        id: Uuid,
        rx: &mut mpsc::UnboundedReceiver<Ctl>,
        requested_at: Instant,
        boots: &mut BootHistory,
    ) -> Outcome {
        let Some(vm) = self.registry.lock().unwrap().get(id).cloned() else { return Outcome::Deleted };
        if vm.kind == VmKind::Windows {
            tracing::error!("vm {}: {WINDOWS_NOT_SUPPORTED}; not booted", vm.name);
            return Outcome::Broken(WINDOWS_NOT_SUPPORTED.into());
        }
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
        // Checked with the size the start will most likely get; the final one is chosen
        // below, once it is known whether the saved state is resumed.
        let likely = vm.config.display.map(|c| monitor::choose(c, vm.saved.as_ref().and_then(|s| s.display), self.monitor.mode()).size);
        let mut spec = match vmm_process::build_spec(&vm, &files, likely) {
            Ok(s) => s,
            Err(e) => return Outcome::Broken(e.to_string()),
        };
        saved::tidy(&vm.name, &files.vm_dir, vm.saved.as_ref().map(|s| s.generation));
        // The state to resume, already used up (renamed, and forgotten by the registry).
        let resume = vm.saved.clone().and_then(|s| self.take_saved(id, &vm, &files.vm_dir, s));
        self.set(id, VmState::Starting, "", |i| {
            i.guest_init_ms = 0;
            i.start_to_init_ms = 0;
            i.agent_ready = false;
            i.agent_heartbeat = 0;
        });
        let display = match vm.config.display {
            Some(config) => Some(self.choose_display(&vm.name, config, resume.as_ref().map(|(_, s)| s)).await),
            None => None,
        };
        spec.display = display.map(|d| rayos_proto::spec::DisplaySpec { width: d.width, height: d.height });
        // What the supervisor adds to a start is the time until it spawns the VMM; from then on
        // the VMM's own boot timer says when the guest reached init.
        if vm.policy.network == registry::Network::Nat {
            if let Err(e) = netd::vmlink::prepare(owner::vm_uid(id)).await {
                let detail = format!("its network (nat) could not be set up: {e}; `rayosctl vm set {} --network off` starts it without one", vm.name);
                tracing::error!("vm {}: {detail}", vm.name);
                return Outcome::Broken(detail);
            }
        }
        let supervisor_ms = requested_at.elapsed().as_millis() as u64;
        let restore_dir = resume.as_ref().map(|(dir, _)| dir.as_path());
        let spawned = match vmm_process::spawn(&self.reaper, &self.settings.vmm_bin, &vm, &files, &spec, restore_dir) {
            Ok(s) => s,
            Err(e) => return Outcome::Crashed(format!("could not start: {e}")),
        };
        let pid = spawned.pid;
        if let Some(e) = self.vms.lock().unwrap().get_mut(&id) {
            e.display_size = display;
        }
        let mut exit = spawned.exit;
        let (conn, mut events) = VmmConn::start(spawned.conn, &vm.name);
        let channel = spawned.display.map(Arc::new);
        let started = Instant::now();
        let mut watch = HangWatch::new(&self.settings.hang, boots, started);
        // Why the guest was found hung, once it was (its VMM is then being ended).
        let mut hang: Option<String> = None;
        tracing::info!(
            "vm {}: VMM pid {pid} started ({} ms after the request); hung unless its guest reaches init within {} s",
            vm.name,
            requested_at.elapsed().as_millis(),
            watch.init_bound().as_secs()
        );
        let booted_at = registry::now_secs();
        if let Err(e) = self.registry.lock().unwrap().update(id, |v| v.last_booted_at = Some(booted_at)) {
            tracing::warn!("vm {}: recording the boot time: {e}", vm.name);
        }
        self.set(id, VmState::Starting, "", |i| {
            i.pid = pid;
            i.last_booted_at = booted_at;
        });

        let call = |req: VmmRequest| {
            let conn = conn.clone();
            async move { conn.request(req, Duration::from_secs(3)).await }
        };
        let mut up = false;
        let mut not_up = false;
        // The VMM closed its end of the connection at this time (it is exiting, or gave up).
        let mut silent_since: Option<Instant> = None;
        let mut events_done = false;
        let mut vmm_reason: Option<String> = None;
        let mut stopping: Option<Stopping> = None;
        // The power button is pressed again every quarter of the stop timeout until the guest
        // goes: a guest still booting (its ACPI button driver or its init not listening yet)
        // misses a press as a PC's would, and forcing it off then loses what it had not written.
        let repress = self.settings.stop_timeout / 4;
        let mut agent = if resume.is_some() { AgentStatus::resumed() } else { AgentStatus::default() };
        // A save that succeeded: its generation, what the VMM reported, who asked.
        let mut saved_run: Option<(u64, SnapshotReply, SaveReply)> = None;
        // A resumed guest's clock is set once its agent speaks again.
        let mut clock_pending = resume.is_some();
        let kind = loop {
            // The one timer this loop needs: whichever deadline comes first.
            let deadline = [
                (!up && !not_up).then(|| started + self.settings.up_timeout),
                stopping.map(|s| match s {
                    Stopping::Forced { since } => since + Duration::from_secs(2),
                    Stopping::Graceful { since, pressed } => (since + self.settings.stop_timeout).min(pressed + repress),
                }),
                silent_since.map(|t| t + Duration::from_secs(2)),
                if stopping.is_none() { watch.deadline() } else { None },
            ]
            .into_iter()
            .flatten()
            .min();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                status = &mut exit => {
                    // The VMM's last words (`exiting` and why) can still be on their way from
                    // its socket when its end is seen: wait for them briefly, or a refused
                    // state or a crash is reported without its reason.
                    if vmm_reason.is_none() && !events_done {
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            while let Some(ev) = events.recv().await {
                                if let Event::Exiting { code, reason } = ev {
                                    tracing::info!("vm {}: VMM exiting with {code}: {reason}", vm.name);
                                    vmm_reason = Some(reason);
                                    break;
                                }
                            }
                        })
                        .await;
                    }
                    break status.unwrap_or(ExitKind::Signaled(9));
                }
                ev = events.recv(), if !events_done => match ev {
                    None => {
                        events_done = true;
                        // The VMM closed its end: it is exiting, or it gave up on us. Either way
                        // it gets a moment to exit on its own.
                        silent_since = Some(Instant::now());
                    }
                    Some(Event::Up { state, boot_ms, .. }) => {
                        up = true;
                        if let Some((dir, s)) = &resume {
                            tracing::info!(
                                "vm {}: resumed from saved state (generation {}, saved {} s ago), {} ms after the start request",
                                vm.name,
                                s.generation,
                                registry::now_secs().saturating_sub(s.saved_at),
                                requested_at.elapsed().as_millis()
                            );
                            if let Err(e) = saved::remove(dir) {
                                tracing::warn!("vm {}: removing the resumed state {}: {e}", vm.name, dir.display());
                            }
                        }
                        conn_for(self, id, Some((conn.clone(), channel.clone())));
                        if stopping.is_none() {
                            self.set(id, if state == RunState::Paused { VmState::Paused } else { VmState::Running }, "", |_| {});
                        }
                        if state == RunState::Paused {
                            watch.paused(Instant::now());
                        }
                        if let Some(ms) = boot_ms {
                            watch.init();
                            self.init_reached(id, &vm.name, ms, supervisor_ms, requested_at);
                        }
                    }
                    Some(Event::State { state }) => {
                        match state {
                            RunState::Paused => watch.paused(Instant::now()),
                            RunState::Running => watch.resumed(Instant::now()),
                        }
                        // Only between running and paused: a stop in progress stays one.
                        let now = parse_state(&self.get(&id.to_string()).map(|i| i.state).unwrap_or_default());
                        if stopping.is_none() && matches!(now, VmState::Running | VmState::Paused) {
                            self.set(id, if state == RunState::Paused { VmState::Paused } else { VmState::Running }, "", |_| {});
                        }
                    }
                    Some(Event::BootTimer { ms }) => {
                        if !watch.init_reached() {
                            boots.record(Duration::from_millis(ms));
                        }
                        watch.init();
                        self.init_reached(id, &vm.name, ms, supervisor_ms, requested_at);
                    }
                    Some(Event::AgentLine { line }) => {
                        // Lines that are not the agent's protocol are not ours to judge.
                        let message = FromAgent::parse(&line).ok();
                        if message.as_ref().is_some_and(|m| agent.message(m)) {
                            tracing::info!("vm {}: guest agent ready ({} ms after the start request)", vm.name, requested_at.elapsed().as_millis());
                            self.send_first_boot_setup(id, &vm.name, &conn).await;
                        }
                        let spoke = message.is_some();
                        if let Some(FromAgent::Setup(result)) = message {
                            self.first_boot_answered(id, &vm.name, result);
                        }
                        if clock_pending && spoke {
                            // The guest slept through the downtime: its agent sets its wall clock.
                            clock_pending = false;
                            let line = rayos_proto::agent::ToAgent::SetClock { unix_ns: unix_ns() }.to_line();
                            if let Err(e) = call(VmmRequest::AgentSend { data: line }).await {
                                tracing::warn!("vm {}: setting the resumed guest's clock: {e}", vm.name);
                            }
                        }
                        if agent.ready {
                            watch.agent_alive(Instant::now());
                        }
                        self.set_agent(id, agent.ready, agent.heartbeat);
                    }
                    Some(Event::Warning { message }) => tracing::warn!("vm {}: VMM: {message}", vm.name),
                    Some(Event::SaveProgress { .. }) => {}
                    Some(Event::Exiting { code, reason }) => {
                        tracing::info!("vm {}: VMM exiting with {code}: {reason}", vm.name);
                        vmm_reason = Some(reason);
                    }
                },
                _ = timer => {
                    if stopping.is_none() {
                        if let Some(why) = watch.check(Instant::now()) {
                            tracing::error!("vm {}: hung: {why}; ending its VMM (pid {pid})", vm.name);
                            force_off(&conn, pid).await;
                            // Killed if it has not exited 2 s from now.
                            stopping = Some(Stopping::Forced { since: Instant::now() });
                            hang = Some(why);
                        }
                    }
                    if !up && !not_up && started.elapsed() >= self.settings.up_timeout {
                        tracing::error!("vm {}: VMM not up after {:?}; killing it", vm.name, self.settings.up_timeout);
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        not_up = true;
                    }
                    if silent_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(2)) {
                        tracing::error!("vm {}: VMM closed its connection but did not exit; killing it", vm.name);
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        silent_since = None;
                    }
                    match stopping {
                        Some(Stopping::Graceful { since, .. }) if since.elapsed() >= self.settings.stop_timeout => {
                            tracing::warn!("vm {}: guest did not power off within {:?}; forcing", vm.name, self.settings.stop_timeout);
                            force_off(&conn, pid).await;
                            stopping = Some(Stopping::Forced { since: Instant::now() });
                        }
                        Some(Stopping::Graceful { since, pressed }) if pressed.elapsed() >= repress => {
                            tracing::info!("vm {}: still running {:?} after the power button; pressing it again", vm.name, since.elapsed());
                            if let Err(e) = call(VmmRequest::Shutdown).await {
                                tracing::warn!("vm {}: power button: {e}", vm.name);
                            }
                            stopping = Some(Stopping::Graceful { since, pressed: Instant::now() });
                        }
                        Some(Stopping::Forced { since }) if since.elapsed() >= Duration::from_secs(2) => {
                            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                            stopping = Some(Stopping::Forced { since: Instant::now() });
                        }
                        _ => {}
                    }
                }
                c = rx.recv() => match c {
                    None => {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                    Some(Ctl::Start { .. }) | Some(Ctl::Delete) => {}
                    Some(Ctl::Save { reply, or_stop }) => {
                        if !up || stopping.is_some() || saved_run.is_some() {
                            let _ = reply.send(Err("its VMM is starting or stopping".into()));
                            continue;
                        }
                        let before = parse_state(&self.get(&id.to_string()).map(|i| i.state).unwrap_or_default());
                        watch.paused(Instant::now());
                        self.set(id, VmState::Saving, "", |_| {});
                        match self.save_now(id, &vm, display, &files, &conn, &mut events).await {
                            Ok((generation, done)) => {
                                // The VMM left the guest paused; it ends now, and the save is
                                // recorded once it has (no disk write can follow).
                                force_off(&conn, pid).await;
                                stopping = Some(Stopping::Forced { since: Instant::now() });
                                saved_run = Some((generation, done, reply));
                            }
                            Err(SaveFailed { why, vmm_stuck }) => {
                                let _ = reply.send(Err(why.clone()));
                                if vmm_stuck {
                                    tracing::error!("vm {}: save failed: {why}; forcing it off", vm.name);
                                    force_off(&conn, pid).await;
                                    stopping = Some(Stopping::Forced { since: Instant::now() });
                                    continue;
                                }
                                // The guest keeps running as it was (or, at a RayOS shutdown, is
                                // shut down); a failed snapshot leaves the VMM paused.
                                let back = if before == VmState::Paused { VmState::Paused } else { VmState::Running };
                                if back == VmState::Running {
                                    let _ = call(VmmRequest::Resume).await;
                                    watch.resumed(Instant::now());
                                }
                                self.set(id, back, &format!("save failed: {why}"), |_| {});
                                if or_stop {
                                    if let Some(e) = self.vms.lock().unwrap().get(&id) {
                                        let _ = e.ctl.send(Ctl::Stop { force: false });
                                    }
                                }
                            }
                        }
                    }
                    Some(Ctl::Pause) => match call(VmmRequest::Pause).await {
                        Ok(_) => {
                            watch.paused(Instant::now());
                            self.set(id, VmState::Paused, "", |_| {})
                        }
                        Err(e) => tracing::warn!("vm {}: pause: {e}", vm.name),
                    },
                    Some(Ctl::Resume) => match call(VmmRequest::Resume).await {
                        Ok(_) => {
                            watch.resumed(Instant::now());
                            self.set(id, VmState::Running, "", |_| {})
                        }
                        Err(e) => tracing::warn!("vm {}: resume: {e}", vm.name),
                    },
                    Some(Ctl::Stop { force }) => {
                        // A stop asked for while a hung VMM is ending wins: it stays stopped.
                        hang = None;
                        self.set(id, VmState::Stopping, if force { "forced" } else { "ACPI power button" }, |_| {});
                        if force || !up {
                            force_off(&conn, pid).await;
                            stopping = Some(Stopping::Forced { since: Instant::now() });
                        } else {
                            // A paused guest cannot see the power button.
                            let _ = call(VmmRequest::Resume).await;
                            if agent.ready {
                                let shutdown = rayos_proto::agent::ToAgent::Shutdown.to_line();
                                let _ = call(VmmRequest::AgentSend { data: shutdown }).await;
                            }
                            if let Err(e) = call(VmmRequest::Shutdown).await {
                                tracing::warn!("vm {}: power button: {e}; forcing", vm.name);
                                force_off(&conn, pid).await;
                                stopping = Some(Stopping::Forced { since: Instant::now() });
                            } else {
                                let now = Instant::now();
                                stopping = Some(Stopping::Graceful { since: now, pressed: now });
                            }
                        }
                    }
                },
            }
        };
        conn_for(self, id, None);
        if let Some(e) = self.vms.lock().unwrap().get_mut(&id) {
            e.display_size = None;
        }
        drop(channel);
        let _ = std::fs::remove_file(&files.control_socket);
        if let Some((generation, done, reply)) = saved_run {
            return self.record_save(id, &vm, display, &files, (generation, done), reply);
        }
        if let Some((dir, s)) = &resume {
            if !up {
                // The VMM refused the state (or died loading it): no vCPU ran. Keep it aside.
                let why = vmm_reason.clone().unwrap_or_else(|| format!("rayos-vmm --restore: {kind}"));
                let kept = saved::set_aside(&files.vm_dir, dir).map(|p| p.display().to_string()).unwrap_or_else(|e| format!("(not kept: {e})"));
                tracing::warn!("vm {}: saved state generation {} not resumed: {why}; kept as {kept}; booting it from its disks", vm.name, s.generation);
                self.problems.lock().unwrap().push(format!("VM {}: saved state not resumed: {why} (kept as {kept})", vm.name));
                return Outcome::ResumeRefused(why);
            }
        }
        if let Some(why) = hang {
            return Outcome::Hung { why, healthy_for: watch.healthy_for(started) };
        }
        if not_up {
            return Outcome::Crashed(format!("did not come up (no first event on its connection) within {:?} and was killed", self.settings.up_timeout));
        }
        let why = |k: ExitKind| match &vmm_reason {
            Some(r) => format!("{k}: {r}"),
            None => k.to_string(),
        };
        match (kind, stopping) {
            (ExitKind::Exited(exit_code::POWERED_OFF), Some(Stopping::Graceful { .. })) => Outcome::Stopped("the guest powered off".into()),
            (_, Some(s)) => Outcome::Stopped(format!("{}; VMM {kind}", if matches!(s, Stopping::Forced { .. }) { "forced off" } else { "stopped" })),
            (ExitKind::Exited(exit_code::POWERED_OFF), None) => Outcome::Stopped("the guest powered off".into()),
            (ExitKind::Exited(exit_code::REBOOTED), None) => Outcome::Rebooted,
            (ExitKind::Exited(exit_code::GUEST_HUNG), None) => {
                // The VMM judges only the time before init.
                let why = format!("the VMM saw no progress: {}", vmm_reason.as_deref().unwrap_or("no reason given"));
                Outcome::Hung { why, healthy_for: Duration::ZERO }
            }
            (k, None) => Outcome::Crashed(why(k)),
        }
    }

    /// The display size of this start (see [`monitor::choose`]): `resume` is the saved state
    /// being resumed. A cold start that follows the monitor waits (bounded) for the
    /// compositor's first report when none came yet.
    async fn choose_display(&self, name: &str, config: DisplayConfig, resume: Option<&SavedState>) -> DisplaySize {
        let t0 = Instant::now();
        let monitor = match (config, resume) {
            (DisplayConfig::FollowMonitor, None) => self.monitor.mode_when_known(self.settings.monitor_wait).await,
            _ => self.monitor.mode(),
        };
        // The wait counts in the start's time to init: say it.
        let waited = match t0.elapsed().as_millis() {
            0 => String::new(),
            ms => format!(", after {ms} ms waiting for the compositor's report"),
        };
        let choice = monitor::choose(config, resume.and_then(|s| s.display), monitor);
        match choice.why {
            monitor::Why::MonitorShrunk { .. } => tracing::warn!("vm {name}: display {choice}{waited}"),
            _ => tracing::info!("vm {name}: display {choice}{waited}"),
        }
        choice.size
    }

    /// A fresh start: the saved state (if any) is discarded, after the user confirmed it.
    fn discard_saved(&self, id: Uuid) {
        let Some(vm) = self.registry.lock().unwrap().get(id).cloned() else { return };
        let Some(s) = vm.saved else {
            tracing::info!("vm {}: fresh start (there was no saved state)", vm.name);
            return;
        };
        if let Err(e) = self.registry.lock().unwrap().update(id, |v| v.saved = None) {
            tracing::error!("vm {}: fresh start: forgetting the saved state: {e}", vm.name);
        }
        let dir = saved::state_dir(&self.vm_dir(id), s.generation);
        match saved::remove(&dir) {
            Ok(()) => tracing::info!("vm {}: fresh start: saved state generation {} discarded as asked", vm.name, s.generation),
            Err(e) => tracing::warn!("vm {}: fresh start: removing {}: {e}", vm.name, dir.display()),
        }
        self.set(id, VmState::Stopped, "saved state discarded", |i| (i.saved_generation, i.saved_at, i.saved_bytes) = (0, 0, 0));
    }

    /// The saved state `s` of `vm`, checked against its disks and used up before any VMM
    /// runs: the registry forgets it and its folder becomes `restoring-<G>`, so a power cut
    /// from here on cold-boots. A state that fails a check is kept aside and `None` returned.
    fn take_saved(&self, id: Uuid, vm: &registry::VmRecord, vm_dir: &std::path::Path, s: SavedState) -> Option<(std::path::PathBuf, SavedState)> {
        let checked = saved::check(vm, vm_dir, &s);
        let folder = saved::state_dir(vm_dir, s.generation);
        if let Err(e) = self.registry.lock().unwrap().update(id, |v| v.saved = None) {
            // Without that record written, only moving the folder away keeps a later boot
            // from resuming it a second time.
            let kept = saved::set_aside(vm_dir, &folder).map(|p| p.display().to_string()).unwrap_or_else(|e| e.to_string());
            tracing::error!("vm {}: cannot record that the saved state is used ({e}); not resumed, kept as {kept}", vm.name);
            return None;
        }
        self.set(id, VmState::Starting, "", |i| (i.saved_generation, i.saved_at, i.saved_bytes) = (0, 0, 0));
        match checked {
            Ok(_) => match saved::begin_resume(vm_dir, s.generation) {
                Ok(dir) => Some((dir, s)),
                Err(e) => {
                    tracing::error!("vm {}: saved state {}: {e}; booting it from its disks", vm.name, folder.display());
                    None
                }
            },
            Err(m) => {
                let kept = match &m {
                    saved::Mismatch::NoFolder(_) => "nothing to keep".to_string(),
                    _ => saved::set_aside(vm_dir, &folder).map(|p| format!("kept as {}", p.display())).unwrap_or_else(|e| format!("not kept: {e}")),
                };
                tracing::warn!("vm {}: saved state generation {} not resumed: {m}; {kept}; booting it from its disks", vm.name, s.generation);
                self.problems.lock().unwrap().push(format!("VM {}: saved state not resumed: {m} ({kept})", vm.name));
                None
            }
        }
    }

    /// Asks the VMM to save the VM into `saved-<G>` for a new generation G, showing its
    /// progress. The VMM leaves the guest paused.
    async fn save_now(
        &self,
        id: Uuid,
        vm: &registry::VmRecord,
        display: Option<DisplaySize>,
        files: &VmFiles,
        conn: &VmmConn,
        events: &mut mpsc::Receiver<Event>,
    ) -> Result<(u64, SnapshotReply), SaveFailed> {
        let failed = |why: String| SaveFailed { why, vmm_stuck: false };
        saved::check_room(vm, display, &files.vm_dir).map_err(failed)?;
        let mut generation = 0;
        self.registry
            .lock()
            .unwrap()
            .update(id, |v| {
                v.save_generation += 1;
                generation = v.save_generation;
            })
            .map_err(|e| failed(format!("recording the save generation: {e}")))?;
        let path = saved::state_dir(&files.vm_dir, generation);
        tracing::info!("vm {}: saving to {} (generation {generation})", vm.name, path.display());
        let t0 = Instant::now();
        let request = conn.request(VmmRequest::Snapshot { path: path.clone(), replace: false, generation }, self.settings.save_timeout);
        tokio::pin!(request);
        let mut shown = Instant::now();
        let answer = loop {
            tokio::select! {
                r = &mut request => break r,
                ev = events.recv() => match ev {
                    Some(Event::SaveProgress { written, total }) if shown.elapsed() >= Duration::from_secs(1) || written == total => {
                        shown = Instant::now();
                        tracing::info!("vm {}: saving: {} MiB of {} MiB", vm.name, written >> 20, total >> 20);
                    }
                    Some(Event::Exiting { reason, .. }) => tracing::warn!("vm {}: VMM exiting during the save: {reason}", vm.name),
                    Some(_) => {}
                    // The connection is gone: the request fails on its own.
                    None => std::future::pending::<()>().await,
                },
            }
        };
        match answer {
            Ok(Reply::Snapshot(done)) => {
                tracing::info!(
                    "vm {}: saved in {} ms: {} MiB of RAM written ({} MiB guest RAM)",
                    vm.name,
                    t0.elapsed().as_millis(),
                    done.memory_written >> 20,
                    done.memory_bytes >> 20
                );
                Ok((generation, done))
            }
            Ok(other) => Err(failed(format!("the VMM answered the snapshot with {other:?}"))),
            Err(super::vmm_conn::ConnError::Timeout(_)) => Err(SaveFailed {
                why: format!("the save did not finish within {} s", self.settings.save_timeout.as_secs()),
                vmm_stuck: true,
            }),
            Err(e) => Err(failed(format!("the VMM refused the snapshot: {e}"))),
        }
    }

    /// After the saved VMM ended (it fdatasynced the disks before writing RAM, and its devices
    /// stayed paused since): the disks' identity is taken and the registry records the state.
    /// Only then does the VM count as saved.
    fn record_save(
        &self,
        id: Uuid,
        vm: &registry::VmRecord,
        display: Option<DisplaySize>,
        files: &VmFiles,
        (generation, done): (u64, SnapshotReply),
        reply: SaveReply,
    ) -> Outcome {
        let folder = saved::state_dir(&files.vm_dir, generation);
        let record = saved::disk_identities(vm).map_err(|e| format!("reading its disks: {e}")).and_then(|disks| {
            let s = SavedState {
                generation,
                saved_at: registry::now_secs(),
                memory_bytes: done.memory_bytes,
                written_bytes: done.memory_written,
                disks,
                display,
            };
            self.registry.lock().unwrap().update(id, |v| v.saved = Some(s.clone())).map_err(|e| e.to_string())?;
            Ok(s)
        });
        match record {
            Ok(s) => {
                let _ = reply.send(Ok(format!("saved (generation {generation}, {} MiB of RAM written); the next start resumes it", done.memory_written >> 20)));
                Outcome::Saved(s)
            }
            Err(why) => {
                let kept = saved::set_aside(&files.vm_dir, &folder).map(|p| p.display().to_string()).unwrap_or_else(|e| e.to_string());
                tracing::error!("vm {}: the save cannot be recorded ({why}); the state is kept as {kept} and not resumed", vm.name);
                let _ = reply.send(Err(format!("the save cannot be recorded: {why}; the VM was stopped")));
                Outcome::Stopped(format!("stopped after a save that could not be recorded: {why}"))
            }
        }
    }

    fn init_reached(&self, id: Uuid, name: &str, ms: u64, supervisor_ms: u64, requested_at: Instant) {
        if self.vms.lock().unwrap().get(&id).is_some_and(|e| e.info.guest_init_ms != 0) {
            return;
        }
        // When init ran, not when we heard of it (`noticed`); exec of the VMM binary counts
        // as the VMM's.
        let total = supervisor_ms + ms;
        let noticed = requested_at.elapsed().as_millis() as u64;
        tracing::info!("vm {name}: guest init reached: {ms} ms after VMM start, {total} ms after the start request (VMM spawned {supervisor_ms} ms after it; seen after {noticed} ms)");
        if let Some(e) = self.vms.lock().unwrap().get_mut(&id) {
            e.info.guest_init_ms = ms.max(1);
            e.info.start_to_init_ms = total;
        }
    }
}

/// Who waits for a save's outcome (`vm save`, or the shutdown).
type SaveReply = tokio::sync::oneshot::Sender<Result<String, String>>;

/// Why a save was not made; `vmm_stuck`: the VMM did not answer in time and must be forced.
struct SaveFailed {
    why: String,
    vmm_stuck: bool,
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Publishes (or withdraws) the live connection the API's requests use, and the display
/// channel the compositor is given.
fn conn_for(mgr: &VmManager, id: Uuid, live: Option<(Arc<VmmConn>, Option<Arc<OwnedFd>>)>) {
    if let Some(e) = mgr.vms.lock().unwrap().get_mut(&id) {
        (e.conn, e.display) = match live {
            Some((conn, display)) => (Some(conn), display),
            None => (None, None),
        };
    }
}

async fn force_off(conn: &VmmConn, pid: u32) {
    if conn.request(VmmRequest::Poweroff, Duration::from_secs(1)).await.is_err() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}
