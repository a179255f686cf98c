//! VM states and which requests each state accepts. The per-VM task in [`super::manager`]
//! is the only writer of a VM's state; requests from the API are checked here first so a
//! refused request gets a clear error instead of being queued.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Stopped,
    /// The VMM process runs; its control socket is not up yet.
    Starting,
    Running,
    /// vCPUs stopped; RAM kept by the VMM.
    Paused,
    /// A stop was asked; waiting for the guest (then the VMM) to end.
    Stopping,
    /// The VMM ended abnormally; a restart may be pending (see the VM's detail).
    Failed,
    /// The guest stopped making progress (no init within its bound, its agent went silent,
    /// or the VMM saw no progress) and its VMM was ended; a restart may be pending (see the
    /// VM's detail), as for `failed`.
    Hung,
    /// Crashed too often; not restarted until someone starts it.
    CrashLoop,
    /// Cannot start as configured (a disk image is missing, the spec is invalid).
    Broken,
    /// No VMM runs; its saved state is on the data volume and the next start resumes it.
    Saved,
    /// Its state is being written to the data volume; its VMM ends once it is.
    Saving,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Failed => "failed",
            VmState::Hung => "hung",
            VmState::CrashLoop => "crash-loop",
            VmState::Broken => "broken",
            VmState::Saved => "saved",
            VmState::Saving => "saving",
        }
    }

    /// A VMM process exists (or may, while a restart is pending).
    pub fn is_active(self) -> bool {
        matches!(self, VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping | VmState::Saving)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Start,
    Stop,
    Pause,
    Resume,
    Delete,
    /// Save to the data volume and end the VMM (hibernate).
    Save,
}

impl Request {
    pub fn as_str(self) -> &'static str {
        match self {
            Request::Start => "start",
            Request::Stop => "stop",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Delete => "delete",
            Request::Save => "save",
        }
    }
}

/// Whether `req` is accepted in `state`; the error says why not.
pub fn check(state: VmState, req: Request) -> Result<(), String> {
    use Request::*;
    use VmState::*;
    let ok = match req {
        // Broken is retried: the missing disk may be back.
        Start => matches!(state, Stopped | Failed | Hung | CrashLoop | Broken | Saved),
        // Stopping a failed or hung VM cancels its pending restart.
        Stop => matches!(state, Starting | Running | Paused | Failed | Hung | Stopping),
        Pause => state == Running,
        Resume => state == Paused,
        Delete => matches!(state, Stopped | Failed | Hung | CrashLoop | Broken | Saved),
        Save => matches!(state, Running | Paused),
    };
    if ok {
        Ok(())
    } else {
        let hint = match (req, state) {
            (Start, _) => "it is already running or starting",
            (Stop, Saved) => "it is saved, not running: start resumes it, fresh-start discards the saved state",
            (Stop, _) => "it is not running",
            (Save, Saved) => "it is already saved",
            (Save, _) => "only a running or paused VM can be saved",
            (Pause, Paused) => "it is already paused",
            (Pause, _) => "only a running VM can be paused",
            (Resume, _) => "only a paused VM can be resumed",
            (Delete, _) => "stop it first",
        };
        Err(format!("cannot {} a VM that is {}: {hint}", req.as_str(), state.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_follow_the_state_machine() {
        use Request::*;
        use VmState::*;
        assert!(check(Stopped, Start).is_ok());
        assert!(check(Broken, Start).is_ok());
        assert!(check(CrashLoop, Start).is_ok());
        assert!(check(Running, Start).unwrap_err().contains("already running"));
        assert!(check(Running, Pause).is_ok());
        assert!(check(Paused, Pause).unwrap_err().contains("already paused"));
        assert!(check(Paused, Resume).is_ok());
        assert!(check(Running, Resume).is_err());
        assert!(check(Paused, Stop).is_ok());
        assert!(check(Failed, Stop).is_ok(), "stop cancels a pending restart");
        assert!(check(Hung, Stop).is_ok(), "stop cancels a pending restart");
        assert!(check(Hung, Start).is_ok());
        assert!(check(Hung, Pause).is_err());
        assert_eq!(serde_json::to_string(&Hung).unwrap(), "\"hung\"");
        assert!(check(Stopped, Stop).is_err());
        assert!(check(Running, Delete).unwrap_err().contains("stop it first"));
        assert!(check(Broken, Delete).is_ok());
        assert_eq!(CrashLoop.as_str(), "crash-loop");
        assert_eq!(serde_json::to_string(&CrashLoop).unwrap(), "\"crash-loop\"");
        assert!(check(Saved, Start).is_ok(), "a start resumes a saved VM");
        assert!(check(Saved, Stop).unwrap_err().contains("fresh-start"));
        assert!(check(Running, Save).is_ok() && check(Paused, Save).is_ok());
        assert!(check(Saved, Save).unwrap_err().contains("already saved"));
        assert!(check(Stopped, Save).is_err());
        assert!(Saving.is_active() && !Saved.is_active());
    }
}
