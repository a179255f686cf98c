//! The guest agent's side of a VM: its readiness and heartbeat (from the agent lines the VMM
//! passes on as events), `GuestScreen` (a `screen <id>` request, answered among those
//! lines), and the first-boot setup (`setup {json}` once the agent is ready, until it answers
//! `setup ok`). The line protocol is `rayos_proto::agent`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rayos_proto::agent::{FromAgent, ScreenAnswer, ToAgent};
use rayos_proto::vmm::Request as VmmRequest;
use tokio::sync::broadcast::error::RecvError;

use uuid::Uuid;

use super::manager::{GuestScreen, VmError, VmManager, NEXT_REQUEST};
use super::vmm_conn::VmmConn;

/// What the agent said so far in this run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    pub ready: bool,
    /// The last heartbeat number; 0 before the first.
    pub heartbeat: u64,
    /// A resumed guest's agent said `ready` before the save, in the run that saved it: its
    /// next heartbeat is the sign it is there again.
    pub resumed: bool,
}

impl AgentStatus {
    pub fn resumed() -> AgentStatus {
        AgentStatus { resumed: true, ..Default::default() }
    }

    /// Takes one agent line; true when it made the agent ready.
    pub fn line(&mut self, line: &str) -> bool {
        FromAgent::parse(line).is_ok_and(|m| self.message(&m))
    }

    /// Takes one parsed agent message (the VM's task parses each line once); true when it
    /// made the agent ready.
    pub fn message(&mut self, m: &FromAgent) -> bool {
        match m {
            FromAgent::Ready => !std::mem::replace(&mut self.ready, true),
            FromAgent::Heartbeat(n) => {
                self.heartbeat = *n;
                self.resumed && !std::mem::replace(&mut self.ready, true)
            }
            // Screen and setup answers go to their request.
            FromAgent::Screen { .. } | FromAgent::Setup(_) => false,
        }
    }
}

impl VmManager {
    /// Once the agent is ready: hands it the VM's first-boot setup, when the VM has one that
    /// is not done. A setup that cannot be sent is recorded as failed (and sent again at the
    /// next boot).
    pub(super) async fn send_first_boot_setup(&self, id: Uuid, name: &str, conn: &VmmConn) {
        let fb = self.registry.lock().unwrap().get(id).and_then(|v| v.firstboot.clone());
        let Some(fb) = fb.filter(|f| f.wanted()) else { return };
        if let Err((field, e)) = fb.setup.check() {
            self.first_boot_answered(id, name, Err(format!("the VM's record has a bad firstboot.setup.{field}: {e}")));
            return;
        }
        let line = ToAgent::Setup(fb.setup).to_line();
        match conn.request(VmmRequest::AgentSend { data: line }, Duration::from_secs(3)).await {
            Ok(_) => tracing::info!("vm {name}: first-boot setup sent to the guest agent"),
            Err(e) => self.first_boot_answered(id, name, Err(format!("sending it to the guest agent: {e}"))),
        }
    }

    /// Records the agent's `setup ok` / `setup failed: …` in the VM's record (so a done
    /// setup is never sent again) and in what `vm show` says.
    pub(super) fn first_boot_answered(&self, id: Uuid, name: &str, result: Result<Option<String>, String>) {
        match &result {
            Ok(None) => tracing::info!("vm {name}: first-boot setup done (user created, root locked)"),
            Ok(Some(warning)) => tracing::warn!("vm {name}: first-boot setup done (user created, root locked), but {warning}"),
            Err(why) => {
                tracing::error!("vm {name}: first-boot setup failed: {why}");
                self.problems.lock().unwrap().push(format!("VM {name}: first-boot setup failed: {why}"));
            }
        }
        let mut shown = String::new();
        let saved = self.registry.lock().unwrap().update(id, |v| {
            if let Some(fb) = v.firstboot.as_mut() {
                fb.answered(&result);
                shown = fb.describe();
            }
        });
        if let Err(e) = saved {
            tracing::error!("vm {name}: recording the first-boot setup's result: {e}");
        }
        if let Some(e) = self.vms.lock().unwrap().get_mut(&id) {
            e.info.firstboot = shown;
        }
    }

    /// What the VM's display console (tty1) shows, as text: asks the guest agent (`screen
    /// <id>` on its port; it answers `screen <id> {json}`, see `rayos-devguest`) and waits up
    /// to `timeout` for the answer among its lines.
    pub async fn guest_screen(&self, id_or_name: &str, timeout: Duration) -> Result<GuestScreen, VmError> {
        let (vm, conn) = self.live_vmm(id_or_name, "reading the guest's screen", false)?;
        if !vm.config.agent {
            return Err(VmError::Refused { name: vm.name, reason: "reading the guest's screen needs the guest agent (config.agent)".into() });
        }
        let failed = |reason: String| VmError::Failed { name: vm.name.clone(), reason };
        // Unique per request: an answer to an earlier request that timed out may still come.
        let id = format!("{}-{}", std::process::id(), NEXT_REQUEST.fetch_add(1, Ordering::Relaxed));
        // Listening before asking: the answer cannot come before we hear.
        let mut lines = conn.agent_lines();
        let ask = ToAgent::Screen { id: id.clone() }.to_line();
        conn.request(VmmRequest::AgentSend { data: ask }, Duration::from_secs(3)).await.map_err(|e| failed(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let no_answer = || failed(format!("the guest agent did not answer the screen request within {timeout:?}"));
        loop {
            let line = match tokio::time::timeout_at(deadline.into(), lines.recv()).await {
                Err(_) => return Err(no_answer()),
                Ok(Err(RecvError::Closed)) => return Err(failed("the VMM's connection closed".into())),
                // Lines lost while we were slow: ours may be among the next ones.
                Ok(Err(RecvError::Lagged(_))) => continue,
                Ok(Ok(line)) => line,
            };
            if FromAgent::screen_id(&line) != Some(id.as_str()) {
                continue;
            }
            return match FromAgent::parse(&line) {
                Ok(FromAgent::Screen { answer: ScreenAnswer::Screen(s), .. }) => Ok(GuestScreen {
                    tty: s.tty,
                    rows: s.rows,
                    cols: s.cols,
                    cursor_x: s.cursor.0,
                    cursor_y: s.cursor.1,
                    text: s.text,
                }),
                Ok(FromAgent::Screen { answer: ScreenAnswer::Error { error }, .. }) => {
                    Err(failed(format!("the guest agent could not read tty1: {error}")))
                }
                Ok(other) => Err(failed(format!("unexpected answer {other:?}"))),
                Err(e) => Err(failed(format!("the guest agent's answer: {e}"))),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AgentStatus;

    #[test]
    fn agent_lines_give_readiness_and_the_last_heartbeat() {
        let mut a = AgentStatus::default();
        assert!(!a.line("heartbeat 1"));
        assert_eq!(a, AgentStatus { ready: false, heartbeat: 1, resumed: false });
        assert!(a.line("ready"), "the first ready makes it ready");
        assert!(!a.line("ready"), "only once");
        a.line("heartbeat 2");
        a.line("garbage \u{fffd}");
        a.line("heartbeat x");
        a.line(r#"screen 1 {"error":"no"}"#);
        a.line("setup failed: no");
        assert_eq!(a, AgentStatus { ready: true, heartbeat: 2, resumed: false });
        // A resumed guest's agent does not say ready again: its heartbeat shows it is there.
        let mut r = AgentStatus::resumed();
        assert!(r.line("heartbeat 41"), "the first heartbeat after a resume makes it ready");
        assert!(!r.line("heartbeat 42"));
        assert!(r.ready && r.heartbeat == 42);
    }
}
