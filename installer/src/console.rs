//! The machine's consoles as the installer uses them: the kernel VT on the screen (tty1, fed by
//! every keyboard the kernel sees) and the serial console (when the port really exists).
//!
//! rayosd gives the installer no terminal (stdout and stderr go to rayosd's log): it opens the
//! consoles here itself, so one that is missing or broken is reported and left out instead of
//! taking the installer down. A serial port the firmware does not have still has its /dev node;
//! the kernel accepts writes to it and drops them (a write returns 0), which used to make
//! `println!` panic and, with `panic = "abort"`, the installer die with SIGABRT.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags};

/// A console the installer can draw on.
#[derive(Debug)]
pub struct ConsoleDev {
    /// What a person calls it: "screen" or "serial console".
    pub label: &'static str,
    pub path: PathBuf,
    pub file: File,
}

/// Where the consoles are found (a fake tree in tests).
#[derive(Debug, Clone)]
pub struct ConsolePaths {
    /// `/sys/class/tty`
    pub sys_class_tty: PathBuf,
    /// `/dev`
    pub dev: PathBuf,
}

impl Default for ConsolePaths {
    fn default() -> Self {
        ConsolePaths { sys_class_tty: "/sys/class/tty".into(), dev: "/dev".into() }
    }
}

/// The kernel's consoles (`/sys/class/tty/console/active`, e.g. `tty0 ttyS0`) that can be used,
/// screen first, and for each one that cannot, why.
pub fn discover(p: &ConsolePaths) -> (Vec<ConsoleDev>, Vec<String>) {
    let active = std::fs::read_to_string(p.sys_class_tty.join("console/active")).unwrap_or_default();
    let mut names: Vec<String> = active.split_whitespace().map(str::to_string).collect();
    if names.is_empty() {
        names = vec!["tty0".into(), "ttyS0".into()];
    }
    // The screen first: it is where a person at the machine looks.
    names.sort_by_key(|n| !is_vt(n));
    let mut found = Vec::new();
    let mut problems = Vec::new();
    let mut vt_seen = false;
    for name in names {
        let (label, dev) = if is_vt(&name) {
            if vt_seen {
                continue;
            }
            vt_seen = true;
            // tty0 is "the VT in front"; at boot that is tty1, the one the kernel's console shows.
            ("screen", "tty1".to_string())
        } else {
            ("serial console", name.clone())
        };
        if label == "serial console" {
            // serial_core's port type; 0 (PORT_UNKNOWN) means no UART answered at that address.
            let ty = std::fs::read_to_string(p.sys_class_tty.join(&dev).join("type")).unwrap_or_default();
            if ty.trim() == "0" {
                problems.push(format!("{dev}: no serial port hardware behind it (port type unknown)"));
                continue;
            }
        }
        let path = p.dev.join(&dev);
        match OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK).open(&path) {
            Ok(file) => found.push(ConsoleDev { label, path, file }),
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    (found, problems)
}

fn is_vt(name: &str) -> bool {
    name.strip_prefix("tty").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// How long a console may take no output before it counts as broken: at 9600 baud a full
/// redraw of the wizard drains in under 3 s.
const OUTPUT_STALL: Duration = Duration::from_secs(5);

/// A console's output, waiting while the terminal has no room. Consoles are opened non-blocking
/// (their input is polled), so a write fails with EAGAIN whenever output comes faster than the
/// terminal takes it: a serial UART's transmit buffer (4 KiB) holds about one full redraw. That
/// error used to count a working serial console as broken: the wizard dropped it (alone, the
/// installer gave up) and `say` stopped writing to it.
pub struct ConsoleOut(File);

impl From<File> for ConsoleOut {
    fn from(f: File) -> ConsoleOut {
        ConsoleOut(f)
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLOUT)];
                    match nix::poll::poll(&mut fds, OUTPUT_STALL.as_millis() as u16) {
                        Ok(0) => {
                            let why = format!("it took no output for {} s", OUTPUT_STALL.as_secs());
                            return Err(io::Error::new(io::ErrorKind::TimedOut, why));
                        }
                        // Room, or a hang-up that the next write reports.
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// A pseudo-terminal for tests: its slave opened as `discover` opens a console, and its master
/// (the person at it). Both close-on-exec: a child another test starts meanwhile must not keep
/// either side open, or closing the master would not hang the console up.
#[cfg(test)]
pub(crate) fn pty_console(label: &'static str, rows: u16, cols: u16) -> (nix::pty::PtyMaster, ConsoleDev) {
    use nix::fcntl::OFlag;
    use std::os::fd::AsRawFd;

    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).unwrap();
    nix::pty::grantpt(&master).unwrap();
    nix::pty::unlockpt(&master).unwrap();
    let path = PathBuf::from(nix::pty::ptsname_r(&master).unwrap());
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `winsize` from `ws`, which outlives the call.
    assert_eq!(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) }, 0);
    let flags = libc::O_NOCTTY | libc::O_NONBLOCK;
    let file = OpenOptions::new().read(true).write(true).custom_flags(flags).open(&path).unwrap();
    (master, ConsoleDev { label, path, file })
}

static LINE_OUTPUTS: Mutex<Vec<(String, ConsoleOut)>> = Mutex::new(Vec::new());

/// Consoles that `say` writes to (besides the log).
pub fn set_line_outputs(consoles: &[ConsoleDev]) {
    let mut outs = LINE_OUTPUTS.lock().unwrap_or_else(|e| e.into_inner());
    outs.clear();
    for c in consoles {
        if let Ok(f) = c.file.try_clone() {
            outs.push((c.path.display().to_string(), ConsoleOut(f)));
        }
    }
}

/// A line for people and tests, on every console and in the log (stderr, which rayosd logs).
/// Never fails: a console that takes no output is skipped (and said so in the log once).
pub fn say(msg: &str) {
    let line = format!("rayos-installer: {msg}");
    let _ = writeln!(std::io::stderr(), "{line}");
    let mut outs = LINE_OUTPUTS.lock().unwrap_or_else(|e| e.into_inner());
    write_line(&mut outs, &line);
}

/// `line` on each of `outs`; one that fails is dropped from them.
fn write_line(outs: &mut Vec<(String, ConsoleOut)>, line: &str) {
    outs.retain_mut(|(name, f)| {
        // \r because the console may be in raw mode.
        match f.write_all(format!("{line}\r\n").as_bytes()) {
            Ok(()) => true,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "rayos-installer: {name} takes no output ({e}); not writing to it any more");
                false
            }
        }
    });
}

/// The kernel's console log level while the installer runs: only emergencies reach the consoles
/// (everything still goes to kmsg and rayosd's log). Restored when dropped.
pub struct QuietKernel {
    path: PathBuf,
    saved: Option<String>,
}

impl QuietKernel {
    pub fn new(printk: &Path) -> QuietKernel {
        let saved = std::fs::read_to_string(printk).ok();
        if saved.is_some() {
            // Writing one number sets only the first field, the console log level.
            if let Err(e) = std::fs::write(printk, "1") {
                tracing::warn!("cannot lower the kernel's console log level ({}): {e}", printk.display());
            }
        }
        QuietKernel { path: printk.to_path_buf(), saved }
    }
}

impl Drop for QuietKernel {
    fn drop(&mut self) {
        if let Some(level) = self.saved.as_deref().and_then(|s| s.split_whitespace().next()) {
            let _ = std::fs::write(&self.path, level);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(active: &str, serial_type: &str) -> (tempfile::TempDir, ConsolePaths) {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let dev = d.path().join("dev");
        std::fs::create_dir_all(sys.join("console")).unwrap();
        std::fs::create_dir_all(sys.join("ttyS0")).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(sys.join("console/active"), active).unwrap();
        std::fs::write(sys.join("ttyS0/type"), serial_type).unwrap();
        // Plain files stand in for the device nodes.
        std::fs::write(dev.join("tty1"), "").unwrap();
        std::fs::write(dev.join("ttyS0"), "").unwrap();
        (d, ConsolePaths { sys_class_tty: sys, dev })
    }

    #[test]
    fn the_screen_comes_first_and_a_serial_port_without_hardware_is_left_out() {
        let (_d, p) = tree("tty0 ttyS0\n", "4\n");
        let (found, problems) = discover(&p);
        assert_eq!(found.iter().map(|c| c.label).collect::<Vec<_>>(), ["screen", "serial console"]);
        assert!(found[0].path.ends_with("tty1"), "{:?}", found[0].path);
        assert!(problems.is_empty(), "{problems:?}");

        let (_d, p) = tree("ttyS0 tty0\n", "0\n");
        let (found, problems) = discover(&p);
        assert_eq!(found.iter().map(|c| c.label).collect::<Vec<_>>(), ["screen"]);
        assert_eq!(problems, ["ttyS0: no serial port hardware behind it (port type unknown)"]);
    }

    #[test]
    fn a_missing_node_is_reported_by_path() {
        let (_d, p) = tree("tty0\n", "4\n");
        std::fs::remove_file(p.dev.join("tty1")).unwrap();
        let (found, problems) = discover(&p);
        assert!(found.is_empty());
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("tty1") && problems[0].contains("No such file"), "{problems:?}");
    }

    #[test]
    fn lines_wait_for_a_console_that_reads_slowly_and_every_one_arrives() {
        use std::io::Read;

        let (mut master, console) = pty_console("serial console", 24, 80);
        let mut outs = vec![(console.path.display().to_string(), ConsoleOut::from(console.file))];
        // The terminal reads nothing for a second: far more than the pty holds is written by then.
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            let mut seen = Vec::new();
            let mut buf = [0u8; 65536];
            // Until the console side is closed (EIO on Linux).
            while let Ok(n @ 1..) = master.read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
            }
            String::from_utf8(seen).unwrap()
        });
        let filler = "x".repeat(1000);
        for i in 0..200 {
            write_line(&mut outs, &format!("line {i:03} {filler}"));
        }
        assert_eq!(outs.len(), 1, "the slow console was dropped");
        drop(outs);
        let seen = reader.join().unwrap();
        for i in 0..200 {
            assert!(seen.contains(&format!("line {i:03} {filler}")), "line {i} lost");
        }
    }

    #[test]
    fn the_kernel_console_level_is_lowered_and_restored() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("printk");
        std::fs::write(&p, "7\t4\t1\t7\n").unwrap();
        let q = QuietKernel::new(&p);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "1");
        drop(q);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "7");
    }
}
