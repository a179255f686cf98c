//! How the VM ends and who gets told: devices and vCPU threads `request` an exit, the main
//! thread `wait`s for the first one. Later requests are ignored: the first cause wins.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use rayos_proto::vmm::exit_code;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 (the guest powered off) or `poweroff` on the control socket.
    PowerOff,
    /// The guest asked for a reset: ACPI reset register, i8042 or a triple fault.
    Reboot(&'static str),
    /// Something broke (a vCPU error, the host KVM making no progress).
    Failed(String),
    /// The guest stopped making progress after its devices came up, before init.
    GuestHung(String),
}

impl ExitReason {
    /// The process exit code rayosd sees (documented in ARCHITECTURE.md, vmm section).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff => exit_code::POWERED_OFF,
            ExitReason::Failed(_) => exit_code::ERROR,
            ExitReason::GuestHung(_) => exit_code::GUEST_HUNG,
            ExitReason::Reboot(_) => EXIT_CODE_REBOOT,
        }
    }
}

/// Exit code for "the guest rebooted": the supervisor starts the VM again from its spec.
pub const EXIT_CODE_REBOOT: i32 = exit_code::REBOOTED;

#[derive(Default)]
pub struct Lifecycle {
    reason: Mutex<Option<ExitReason>>,
    cv: Condvar,
}

impl Lifecycle {
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            tracing::info!(?reason, "VM exit requested");
            *r = Some(reason);
            self.cv.notify_all();
        }
    }

    pub fn current(&self) -> Option<ExitReason> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn wait(&self) -> ExitReason {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(x) = r.clone() {
                return x;
            }
            r = self.cv.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn wait_timeout(&self, t: Duration) -> Option<ExitReason> {
        let r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let (r, _) = self.cv.wait_timeout_while(r, t, |r| r.is_none()).unwrap_or_else(|p| p.into_inner());
        r.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_request_wins_and_wakes_the_waiter() {
        let l = Arc::new(Lifecycle::default());
        let l2 = l.clone();
        let t = std::thread::spawn(move || l2.wait());
        l.request(ExitReason::PowerOff);
        l.request(ExitReason::Reboot("i8042"));
        assert_eq!(t.join().unwrap(), ExitReason::PowerOff);
        assert_eq!(l.current().unwrap().exit_code(), 0);
        assert_eq!(ExitReason::Reboot("x").exit_code(), EXIT_CODE_REBOOT);
    }
}
