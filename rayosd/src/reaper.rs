//! The one place that waits for child processes.
//!
//! A PID 1 must reap orphans with `waitpid(-1)`, which would steal the exit status of any
//! child another part of rayosd waits for. So nothing else waits: whoever starts a process
//! registers its pid here (in the same turn of the single-threaded runtime, so the reaper
//! cannot run in between) and gets its status through a channel; statuses of pids nobody
//! registered are orphans and are only counted and logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitKind {
    Exited(i32),
    Signaled(i32),
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Exited(c) => write!(f, "exited with status {c}"),
            ExitKind::Signaled(s) => {
                let name = nix::sys::signal::Signal::try_from(*s).map(|s| s.as_str()).unwrap_or("?");
                write!(f, "killed by signal {s} ({name})")
            }
        }
    }
}

/// Exit statuses nobody had registered for yet, kept briefly: another thread's reaper (tests,
/// `systemless`) may reap a child between its spawn and its registration.
const UNCLAIMED_TTL: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Table {
    waiters: HashMap<i32, oneshot::Sender<ExitKind>>,
    unclaimed: Vec<(i32, ExitKind, Instant)>,
}

/// Process-wide, because `waitpid(-1)` is: every [`Reaper`] handle shares it.
static TABLE: Mutex<Option<Table>> = Mutex::new(None);
static ORPHANS: AtomicU64 = AtomicU64::new(0);

fn with_table<R>(f: impl FnOnce(&mut Table) -> R) -> R {
    let mut t = TABLE.lock().unwrap();
    f(t.get_or_insert_with(Table::default))
}

/// A handle on the process's one reaper.
#[derive(Default)]
pub struct Reaper {
    _private: (),
}

impl Reaper {
    pub fn new() -> Reaper {
        Reaper::default()
    }

    /// Registers interest in `pid`'s exit. Call right after spawning.
    pub fn watch(&self, pid: u32) -> oneshot::Receiver<ExitKind> {
        let (tx, rx) = oneshot::channel();
        with_table(|t| {
            let now = Instant::now();
            t.unclaimed.retain(|(_, _, at)| now.duration_since(*at) < UNCLAIMED_TTL);
            if let Some(i) = t.unclaimed.iter().position(|(p, _, _)| *p == pid as i32) {
                let (_, kind, _) = t.unclaimed.swap_remove(i);
                ORPHANS.fetch_sub(1, Ordering::Relaxed);
                let _ = tx.send(kind);
            } else {
                t.waiters.insert(pid as i32, tx);
            }
        });
        rx
    }

    /// How many processes nobody registered (orphans) were reaped.
    pub fn orphans_reaped(&self) -> u64 {
        ORPHANS.load(Ordering::Relaxed)
    }

    /// Reaps every child that has exited. Call on each SIGCHLD.
    pub fn reap(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.deliver(pid, ExitKind::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.deliver(pid, ExitKind::Signaled(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }

    fn deliver(&self, pid: Pid, kind: ExitKind) {
        let waiter = with_table(|t| {
            let w = t.waiters.remove(&pid.as_raw());
            if w.is_none() {
                t.unclaimed.push((pid.as_raw(), kind, Instant::now()));
            }
            w
        });
        match waiter {
            Some(tx) => {
                let _ = tx.send(kind);
            }
            None => {
                ORPHANS.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("reaped orphan pid={} ({kind})", pid);
            }
        }
    }

    /// Runs forever, reaping on every SIGCHLD.
    pub async fn run(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = signal(SignalKind::child())?;
        loop {
            self.reap();
            sigchld.recv().await;
        }
    }
}

/// Tests run on parallel threads of one process, and a running [`Reaper`] takes every child
/// of that process, including one that `Command::spawn` is about to `waitpid` after a failed
/// exec (std then panics). rayosd itself is single-threaded so this cannot happen there; tests
/// that run a reaper or start children hold this lock for their whole duration.
#[cfg(test)]
pub(crate) fn exclusive_for_test() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn registered_child_gets_its_own_status() {
        let _only_reaper = exclusive_for_test();
        let reaper = std::sync::Arc::new(Reaper::new());
        let r2 = reaper.clone();
        tokio::spawn(async move { r2.run().await });
        let child = std::process::Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        let rx = reaper.watch(child.id());
        let status = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await.unwrap().unwrap();
        assert_eq!(status, ExitKind::Exited(7));

        let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let rx = reaper.watch(child.id());
        nix::sys::signal::kill(Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
        let status = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await.unwrap().unwrap();
        assert_eq!(status, ExitKind::Signaled(9));
        assert_eq!(status.to_string(), "killed by signal 9 (SIGKILL)");
    }
}
