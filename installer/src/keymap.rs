//! The chosen keyboard layout on the screen's VT, so that what the user types into the wizard
//! (the Linux user's password above all) is what the keys are labelled with.
//!
//! The kernel translates the keyboards it sees (USB HID, PS/2) through one keymap, the built-in
//! US one until something loads another. We run kbd's `loadkeys -C <vt> <name>` (shipped in the
//! initramfs with console-data's keymaps for `config::KEYMAPS`, uncompressed) rather than
//! parsing keymap files ourselves: it is the same program and the same files the guest loads the
//! layout with, so the installer's screen and the VM agree on what each key types. The serial
//! console is the remote terminal's business and is left alone.
//!
//! `loadkeys` runs as a child the wizard's loop polls: the UI never waits for it.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where the initramfs has kbd's `loadkeys`.
pub const LOADKEYS: &str = "/usr/bin/loadkeys";

/// A load slower than this is given up on (the child is killed); loadkeys takes milliseconds.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeymapError {
    #[error("cannot run {program}: {reason}")]
    Spawn { program: String, reason: String },
    #[error("loadkeys {name} failed ({status}){}", if .stderr.is_empty() { String::new() } else { format!(": {}", .stderr) })]
    Failed { name: String, status: String, stderr: String },
    #[error("loadkeys {name} did not finish within {} s", .timeout.as_secs())]
    TimedOut { name: String, timeout: Duration },
}

struct Loading {
    name: String,
    child: Child,
    started: Instant,
}

/// Loads layouts onto one VT, one `loadkeys` at a time; a layout asked for while another loads
/// is loaded next (only the latest: the user may change their mind twice).
pub struct ScreenKeymap {
    program: PathBuf,
    console: PathBuf,
    timeout: Duration,
    loading: Option<Loading>,
    queued: Option<String>,
    loaded: Option<String>,
}

impl ScreenKeymap {
    pub fn new(program: impl Into<PathBuf>, console: impl Into<PathBuf>) -> Self {
        ScreenKeymap { program: program.into(), console: console.into(), timeout: TIMEOUT, loading: None, queued: None, loaded: None }
    }

    #[doc(hidden)]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The layout the VT has now: None until a load succeeded (the kernel's built-in US map,
    /// or whatever an earlier run of the installer left).
    pub fn loaded(&self) -> Option<&str> {
        self.loaded.as_deref()
    }

    /// Load `name` (a `config::KEYMAPS` name, checked by the caller) as soon as the VT is free.
    /// Asking for the layout the VT already has does nothing.
    pub fn request(&mut self, name: &str) {
        let busy_with = self.loading.as_ref().map(|l| l.name.as_str());
        if busy_with == Some(name) || (busy_with.is_none() && self.loaded.as_deref() == Some(name)) {
            self.queued = None;
            return;
        }
        self.queued = Some(name.to_string());
    }

    /// Starts what is queued and reaps what finished: `Some` once per load that ended, with the
    /// layout's name on success. Never blocks.
    pub fn poll(&mut self) -> Option<Result<String, KeymapError>> {
        let done = self.reap();
        if self.loading.is_none() {
            if let Some(name) = self.queued.take() {
                if let Err(e) = self.start(&name) {
                    return Some(Err(e));
                }
            }
        }
        done
    }

    /// True while a load runs or waits.
    pub fn busy(&self) -> bool {
        self.loading.is_some() || self.queued.is_some()
    }

    fn start(&mut self, name: &str) -> Result<(), KeymapError> {
        let child = Command::new(&self.program)
            .arg("-q")
            .arg("-C")
            .arg(&self.console)
            .arg(name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| KeymapError::Spawn { program: self.program.display().to_string(), reason: e.to_string() })?;
        self.loading = Some(Loading { name: name.to_string(), child, started: Instant::now() });
        Ok(())
    }

    fn reap(&mut self) -> Option<Result<String, KeymapError>> {
        let l = self.loading.as_mut()?;
        let status = match l.child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) if l.started.elapsed() < self.timeout => return None,
            Ok(None) | Err(_) => {
                let mut l = self.loading.take()?;
                let _ = l.child.kill();
                let _ = l.child.wait();
                return Some(Err(KeymapError::TimedOut { name: l.name, timeout: self.timeout }));
            }
        };
        let mut l = self.loading.take()?;
        if status.success() {
            self.loaded = Some(l.name.clone());
            return Some(Ok(l.name));
        }
        // The child has exited, so this read ends; loadkeys says why in a line or two.
        let mut stderr = String::new();
        if let Some(mut e) = l.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let stderr = stderr.lines().map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>().join("; ");
        let stderr: String = stderr.chars().take(200).collect();
        Some(Err(KeymapError::Failed { name: l.name, status: status.to_string(), stderr }))
    }
}

impl Drop for ScreenKeymap {
    fn drop(&mut self) {
        // Let a load in progress finish (the VT then has the layout the user last accepted), up
        // to its timeout, and leave no zombie behind.
        if let Some(l) = self.loading.as_mut() {
            while matches!(l.child.try_wait(), Ok(None)) && l.started.elapsed() < self.timeout {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = l.child.kill();
            let _ = l.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for loadkeys: records its arguments, then behaves as `body` says.
    fn fake(dir: &std::path::Path, body: &str) -> PathBuf {
        let p = dir.join("loadkeys");
        std::fs::write(&p, format!("#!/bin/sh\necho \"$@\" >> {}/calls\n{body}\n", dir.display())).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn finish(k: &mut ScreenKeymap) -> Result<String, KeymapError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = k.poll() {
                return r;
            }
            assert!(Instant::now() < deadline, "the load never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn calls(dir: &std::path::Path) -> String {
        std::fs::read_to_string(dir.join("calls")).unwrap_or_default()
    }

    #[test]
    fn a_layout_is_loaded_onto_the_screens_vt_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = ScreenKeymap::new(fake(dir.path(), "exit 0"), "/dev/tty1");
        assert_eq!(k.poll(), None, "nothing asked, nothing run");
        k.request("de");
        assert_eq!(finish(&mut k), Ok("de".into()));
        assert_eq!(k.loaded(), Some("de"));
        assert_eq!(calls(dir.path()), "-q -C /dev/tty1 de\n");
        k.request("de");
        assert!(!k.busy(), "the VT has it already");
        k.request("fr");
        assert_eq!(finish(&mut k), Ok("fr".into()));
        assert_eq!(calls(dir.path()), "-q -C /dev/tty1 de\n-q -C /dev/tty1 fr\n");
    }

    #[test]
    fn only_the_latest_layout_asked_for_during_a_load_is_loaded_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = ScreenKeymap::new(fake(dir.path(), "sleep 0.3"), "/dev/tty1");
        k.request("de");
        assert_eq!(k.poll(), None, "started, not finished");
        k.request("fr");
        k.request("uk");
        assert_eq!(finish(&mut k), Ok("de".into()));
        assert_eq!(finish(&mut k), Ok("uk".into()));
        assert_eq!(calls(dir.path()), "-q -C /dev/tty1 de\n-q -C /dev/tty1 uk\n");
        assert!(!k.busy());
    }

    #[test]
    fn a_failed_load_says_why_and_keeps_the_previous_layout() {
        let dir = tempfile::tempdir().unwrap();
        let ok = fake(dir.path(), "exit 0");
        let mut k = ScreenKeymap::new(&ok, "/dev/tty1");
        k.request("de");
        finish(&mut k).unwrap();
        std::fs::write(&ok, "#!/bin/sh\necho 'cannot open file fr' >&2\necho 'Couldn'\"'\"'t get a file descriptor' >&2\nexit 1\n").unwrap();
        k.request("fr");
        let e = finish(&mut k).unwrap_err();
        assert_eq!(e.to_string(), "loadkeys fr failed (exit status: 1): cannot open file fr; Couldn't get a file descriptor");
        assert_eq!(k.loaded(), Some("de"));
        // Asked again, it is tried again.
        k.request("fr");
        assert!(k.busy());
    }

    #[test]
    fn a_missing_program_or_a_hung_load_is_an_error_not_a_hang() {
        let mut k = ScreenKeymap::new("/nonexistent/loadkeys", "/dev/tty1");
        k.request("de");
        let e = k.poll().expect("reported at once").unwrap_err();
        assert!(e.to_string().starts_with("cannot run /nonexistent/loadkeys: No such file"), "{e}");
        assert_eq!(k.loaded(), None);

        let dir = tempfile::tempdir().unwrap();
        let mut k = ScreenKeymap::new(fake(dir.path(), "sleep 30"), "/dev/tty1").with_timeout(Duration::from_millis(200));
        k.request("de");
        let started = Instant::now();
        assert_eq!(finish(&mut k), Err(KeymapError::TimedOut { name: "de".into(), timeout: Duration::from_millis(200) }));
        assert!(started.elapsed() < Duration::from_secs(5), "the child was killed, not waited for");

        // Nor when the wizard ends during a load that hangs.
        let mut k = ScreenKeymap::new(fake(dir.path(), "sleep 30"), "/dev/tty1").with_timeout(Duration::from_millis(200));
        k.request("fr");
        assert_eq!(k.poll(), None);
        let started = Instant::now();
        drop(k);
        assert!(started.elapsed() < Duration::from_secs(5), "dropping waited for a hung loadkeys");
    }
}
