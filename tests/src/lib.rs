//! The harness for tests that boot RayOS in QEMU: real firmware (OVMF), real kernel, real
//! rayosd, with the serial console captured, QMP for keys and screenshots, and the
//! `org.rayos.control` virtio-serial port on a host socket.
//!
//! ```no_run
//! use rayos_tests::{artifacts, Qemu};
//! use std::time::Duration;
//! let mut vm = Qemu::builder("doc").uefi_usb(&artifacts().usb_image).spawn().unwrap();
//! vm.wait_for("rayosd: ready", Duration::from_secs(180)).unwrap();
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use rootfs_builder::qemu::DiskBus;
use rootfs_builder::qemu::{Boot, Disk, QemuConfig, Serial};
pub use rootfs_builder::{esp, image, initramfs, Artifacts};
use thiserror::Error;

pub mod ctl;
pub mod nested;
pub mod ppm;

/// One RayOS machine at a time per test binary (tests run on parallel threads). Two TCG
/// machines with nested KVM on these 2-core hosts starve each other's vCPU threads, and that
/// is when QEMU's nested-SVM emulation misbehaves most: in stop 26's rehearsal two parallel
/// vm_supervisor tests lost, one its machine's CPU 1 timer (an RCU stall before init), one its
/// screen checks; alone, the same test passed. A thread may hold several machines at once.
static ONE_MACHINE: Mutex<()> = Mutex::new(());

thread_local! {
    static MACHINES_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Held by a test thread's machines while any of them lives.
struct MachineTurn {
    _guard: Option<std::sync::MutexGuard<'static, ()>>,
}

impl MachineTurn {
    fn take() -> MachineTurn {
        let first = MACHINES_HERE.with(|n| {
            n.set(n.get() + 1);
            n.get() == 1
        });
        // A test that panicked with the lock held poisoned it; the lock guards no data.
        MachineTurn { _guard: first.then(|| ONE_MACHINE.lock().unwrap_or_else(|e| e.into_inner())) }
    }
}

impl Drop for MachineTurn {
    fn drop(&mut self) {
        MACHINES_HERE.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// QEMU's `-d cpu_reset` log in each test folder.
const CPU_RESET_LOG: &str = "qemu-cpu-reset.log";

/// Generous: TCG boots through OVMF take ~10 s alone and several tests share two cores.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

#[derive(Debug, Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("[{name}] waited {timeout:?} for `{pattern}`; last serial lines:\n{tail}")]
    Timeout { name: String, pattern: String, timeout: Duration, tail: String },
    #[error("[{name}] QEMU exited ({status}) while waiting for `{pattern}`; stderr: {stderr}\nlast serial lines:\n{tail}")]
    Exited { name: String, pattern: String, status: String, stderr: String, tail: String },
    #[error("QMP: {0}")]
    Qmp(String),
    /// Issue #12: the RayOS machine itself (the outer QEMU's guest) triple-faulted.
    #[error("[{name}] the RayOS machine triple-faulted while waiting for `{pattern}` (issue #12): {report}; QEMU's log: {log}\nlast serial lines:\n{tail}")]
    TripleFault { name: String, pattern: String, report: String, log: String, tail: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// The built kernel, initramfs and USB image (built once per test process if stale).
pub fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        // Every test boots QEMU: the pinned one (rootfs_builder::qemu_pkg) must be there too.
        if let Err(e) = rootfs_builder::qemu_pkg::ensure() {
            panic!("fetching the QEMU the tests run failed: {e}");
        }
        match rootfs_builder::artifacts() {
            Ok(a) => a,
            Err(e) => panic!("building RayOS for the tests failed: {e:#}"),
        }
    })
}

/// The accelerator every test uses (probed once).
pub fn accel() -> &'static rootfs_builder::accel::Accel {
    static A: OnceLock<rootfs_builder::accel::Accel> = OnceLock::new();
    A.get_or_init(rootfs_builder::accel::detect)
}

/// A per-test folder for disks, logs and sockets: `target/rayos/test-runs/<name>`, emptied
/// first. Sockets live in a short /tmp folder because unix socket paths are limited to 107 bytes.
pub struct Workdir {
    pub dir: PathBuf,
    pub sockets: PathBuf,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Workdir {
    pub fn new(name: &str) -> Workdir {
        let dir = rootfs_builder::paths::out_dir().join("test-runs").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test folder");
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let sockets = std::env::temp_dir().join(format!("rayos-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sockets);
        std::fs::create_dir_all(&sockets).expect("creating the socket folder");
        Workdir { dir, sockets }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A blank sparse disk image of `size` bytes.
pub fn blank_disk(path: &Path, size: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)
}

/// Whether `s` starts with a kernel message's timestamp: `[`, spaces, digits, `.`, six
/// digits, `]`.
fn starts_with_timestamp(s: &str) -> bool {
    let Some(rest) = s.as_bytes().strip_prefix(b"[") else { return false };
    let spaces = rest.iter().take_while(|c| **c == b' ').count();
    let digits = rest[spaces..].iter().take_while(|c| c.is_ascii_digit()).count();
    let after = &rest[spaces + digits..];
    digits > 0 && after.len() >= 8 && after[0] == b'.' && after[1..7].iter().all(u8::is_ascii_digit) && after[7] == b']'
}

/// Where a kernel message (`[    4.364723] input: …`) starts inside `line`, past its start.
fn kernel_message_at(line: &str) -> Option<usize> {
    line.match_indices('[').map(|(i, _)| i).find(|&i| i > 0 && starts_with_timestamp(&line[i..]))
}

/// A console line as a reader means it: without the serial CR, and without a kernel message
/// that the kernel's console printed into the middle of it — printk does not wait for user
/// space's output to the same UART.
pub fn clean_line(line: &str) -> &str {
    let line = line.trim_end_matches('\r');
    match kernel_message_at(line) {
        Some(i) => &line[..i],
        None => line,
    }
}

/// The console's lines as their writers wrote them, lazily (the harness searches a growing
/// log several times a second). A kernel message printed into the middle of a program's line
/// (`ra[    3.19] hid-generic …\nyosd: ready`) becomes a line of its own, and the program's
/// two halves are joined again (`rayosd: ready`), also across several kernel messages in a row.
pub fn console_lines(text: &str) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    let mut fragment: Option<String> = None;
    std::iter::from_fn(move || {
        let Some(line) = lines.next() else {
            return fragment.take().map(Cow::Owned);
        };
        if starts_with_timestamp(line) {
            return Some(Cow::Borrowed(line));
        }
        let (head, kernel) = match kernel_message_at(line) {
            Some(i) => (&line[..i], Some(&line[i..])),
            None => (line, None),
        };
        let whole = match fragment.take() {
            Some(mut f) => {
                f.push_str(head);
                Cow::Owned(f)
            }
            None => Cow::Borrowed(head),
        };
        match kernel {
            // The program's line goes on after the kernel message's newline.
            Some(k) => {
                fragment = Some(whole.into_owned());
                Some(Cow::Borrowed(k))
            }
            None => Some(whole),
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_messages_glued_to_a_line_are_cut() {
        let l = "rayosd: mode: rescue[    4.364723] input: QEMU QEMU USB Keyboard as /devices/x\r";
        assert_eq!(super::clean_line(l), "rayosd: mode: rescue");
        assert_eq!(super::clean_line("rayosd: cmdline: a [b] c"), "rayosd: cmdline: a [b] c");
        assert_eq!(super::clean_line("[    1.000000] kernel line"), "[    1.000000] kernel line");
    }

    #[test]
    fn a_line_split_by_kernel_messages_is_joined_again() {
        // As a CI run's console had it: "rayosd: ready" was never seen whole.
        let text = "rayosd: watchdog: armed\r\nra[    3.194817] hid-generic 0003: input: USB HID\r\nyosd: ready mode=installed\r\n";
        let lines: Vec<_> = super::console_lines(text).collect();
        assert_eq!(lines, ["rayosd: watchdog: armed", "[    3.194817] hid-generic 0003: input: USB HID", "rayosd: ready mode=installed"]);
        // Two kernel messages in a row, and one that came after the program's last byte.
        let text = "rayo[    1.000000] a\n[    1.000001] b\nsd: up\nrayosd: mode: rescue[    4.364723] input: x\n\n";
        let lines: Vec<_> = super::console_lines(text).collect();
        assert_eq!(lines, ["[    1.000000] a", "[    1.000001] b", "rayosd: up", "[    4.364723] input: x", "rayosd: mode: rescue"]);
        assert_eq!(super::console_lines("plain [b] line\n").collect::<Vec<_>>(), ["plain [b] line"]);
    }
}

/// Whether OCR'd screen text holds `text`, ignoring case, spacing and the O/0 confusion of
/// the VT font.
pub fn ocr_contains(seen: &str, text: &str) -> bool {
    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase().replace('0', "o");
    norm(seen).contains(&norm(text))
}

/// The key that types `c` on a US keyboard, as (shift held, QEMU qcode).
pub fn qcode(c: char) -> Option<(bool, String)> {
    Some(match c {
        'a'..='z' | '0'..='9' => (false, c.to_string()),
        'A'..='Z' => (true, c.to_ascii_lowercase().to_string()),
        ' ' => (false, "spc".into()),
        '-' => (false, "minus".into()),
        '_' => (true, "minus".into()),
        '/' => (false, "slash".into()),
        '.' => (false, "dot".into()),
        ',' => (false, "comma".into()),
        ':' => (true, "semicolon".into()),
        ';' => (false, "semicolon".into()),
        '>' => (true, "dot".into()),
        '<' => (true, "comma".into()),
        '|' => (true, "backslash".into()),
        '=' => (false, "equal".into()),
        '$' => (true, "4".into()),
        '(' => (true, "9".into()),
        ')' => (true, "0".into()),
        '"' => (true, "apostrophe".into()),
        '\'' => (false, "apostrophe".into()),
        '\n' => (false, "ret".into()),
        _ => return None,
    })
}

pub struct QemuBuilder {
    name: String,
    work: Workdir,
    cfg: QemuConfig,
}

impl QemuBuilder {
    /// Boot through OVMF (UEFI). Add the boot disk with `uefi_usb` or a `*_disk` call.
    fn new(name: &str) -> QemuBuilder {
        let work = Workdir::new(name);
        let vars = work.path("ovmf-vars.fd");
        rootfs_builder::qemu::fresh_vars(&vars).expect("copying OVMF_VARS (is the ovmf package installed?)");
        let mut cfg = QemuConfig::new(accel().clone(), Boot::Uefi { vars });
        // `cargo rayos demo`: the machine's screen in a window, when there is a display.
        cfg.window = std::env::var_os("RAYOS_QEMU_WINDOW").is_some();
        cfg.serial = Serial::Socket(work.sockets.join("serial.sock"));
        cfg.qmp = Some(work.sockets.join("qmp.sock"));
        QemuBuilder { name: name.to_string(), work, cfg }
    }

    /// Attach `image` as a USB stick on xHCI, the way users boot the installer. Writes are
    /// discarded when QEMU exits, so the image stays as built.
    pub fn uefi_usb(mut self, image: &Path) -> Self {
        self.cfg.disks.push(Disk { path: image.to_path_buf(), bus: DiskBus::Usb, serial: "RAYOS-USB".into(), snapshot: true, format: "raw" });
        self
    }

    /// Boot a kernel directly (no firmware): for VMM and low-level tests.
    pub fn direct_kernel(mut self, kernel: &Path, initramfs: &Path, cmdline: &str) -> Self {
        self.cfg.boot = Boot::Direct { kernel: kernel.into(), initramfs: initramfs.into(), cmdline: cmdline.into() };
        self
    }

    pub fn disk(mut self, path: &Path, bus: DiskBus, serial: &str) -> Self {
        self.cfg.disks.push(Disk { path: path.to_path_buf(), bus, serial: serial.into(), snapshot: false, format: "raw" });
        self
    }

    pub fn nvme_disk(self, path: &Path, serial: &str) -> Self {
        self.disk(path, DiskBus::Nvme, serial)
    }

    pub fn ahci_disk(self, path: &Path, serial: &str) -> Self {
        self.disk(path, DiskBus::Ahci, serial)
    }

    /// The virtio-serial port `org.rayos.control`, on a host socket (`Qemu::control_socket`).
    pub fn control_channel(mut self) -> Self {
        self.cfg.control = Some(self.work.sockets.join("control.sock"));
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.cfg.memory_mib = mib;
        self
    }

    /// A monitor whose preferred mode is `w`x`h` (virtio-gpu `xres`/`yres`).
    pub fn screen(mut self, w: u32, h: u32) -> Self {
        self.cfg.screen = Some((w, h));
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cfg.cpus = n;
        self
    }

    /// Exit QEMU instead of rebooting the guest.
    pub fn no_reboot(mut self) -> Self {
        self.cfg.extra.push("-no-reboot".into());
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.cfg.extra.push(a.into());
        self
    }

    /// The test folder (for disk images etc.) before spawning.
    pub fn workdir(&self) -> &Path {
        &self.work.dir
    }

    /// A wired network card on its own QEMU user-mode network; QMP `set_link` on
    /// [`rootfs_builder::qemu::Nic::device_id`] of its index pulls its cable.
    pub fn nic(mut self, nic: rootfs_builder::qemu::Nic) -> Self {
        self.cfg.nics.push(nic);
        self
    }

    /// No serial port at all (`-serial none`): the machine has only its screen and keyboard.
    /// `serial_log` stays empty; read the screen with `screen_text`.
    pub fn no_serial(mut self) -> Self {
        self.cfg.serial = Serial::None;
        self
    }

    pub fn spawn(self) -> Result<Qemu, HarnessError> {
        let QemuBuilder { name, work, mut cfg } = self;
        let turn = MachineTurn::take();
        // A triple fault of the machine leaves no other trace: see Qemu::check_no_triple_fault.
        cfg.log_cpu_resets(&work.path(CPU_RESET_LOG));
        let serial_sock = work.sockets.join("serial.sock");
        let stderr_path = work.path("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(io("creating qemu.stderr"))?;
        let mut cmd = cfg.command();
        std::fs::write(work.path("qemu.cmdline"), format!("{cmd:?}\n")).map_err(io("writing qemu.cmdline"))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        let mut child = cmd.spawn().map_err(io("starting qemu-system-x86_64"))?;
        let log = Arc::new((Mutex::new(String::new()), Condvar::new()));
        if matches!(cfg.serial, Serial::None) {
            // Nothing to wait on but QEMU's QMP socket, which it makes while starting up.
            if let Some(q) = &cfg.qmp {
                let start = Instant::now();
                while UnixStream::connect(q).is_err() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(HarnessError::Exited {
                            name,
                            pattern: "QMP socket".into(),
                            status: status.to_string(),
                            stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
                            tail: String::new(),
                        });
                    }
                    if start.elapsed() > Duration::from_secs(30) {
                        let _ = child.kill();
                        return Err(HarnessError::Qmp(format!("{}: no QMP socket after 30 s", q.display())));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            return Ok(Qemu { name, work, child: Some(child), serial: None, log, qmp: None, cfg, _turn: turn });
        }
        // QEMU waits for us on the serial socket before it starts the guest: nothing is lost.
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(&serial_sock) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(HarnessError::Exited {
                            name,
                            pattern: "serial socket".into(),
                            status: status.to_string(),
                            stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
                            tail: String::new(),
                        });
                    }
                    if start.elapsed() > Duration::from_secs(30) {
                        let _ = child.kill();
                        return Err(HarnessError::Io { what: format!("connecting to {}", serial_sock.display()), source: e });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let reader = stream.try_clone().map_err(io("cloning the serial socket"))?;
        let log2 = log.clone();
        let log_file = work.path("serial.log");
        std::thread::spawn(move || {
            let mut file = std::fs::File::create(log_file).ok();
            let mut r = BufReader::new(reader);
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Some(f) = file.as_mut() {
                            let _ = f.write_all(&buf[..n]);
                        }
                        let (m, cv) = &*log2;
                        m.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                        cv.notify_all();
                    }
                }
            }
            let (m, cv) = &*log2;
            m.lock().unwrap().push_str("\n[serial closed]\n");
            cv.notify_all();
        });
        Ok(Qemu { name, work, child: Some(child), serial: Some(stream), log, qmp: None, cfg, _turn: turn })
    }
}

pub struct Qemu {
    name: String,
    work: Workdir,
    child: Option<Child>,
    /// None with `no_serial()`.
    serial: Option<UnixStream>,
    log: Arc<(Mutex<String>, Condvar)>,
    qmp: Option<BufReader<UnixStream>>,
    cfg: QemuConfig,
    /// Last field: released after the machine is killed (fields drop after `Drop::drop`).
    _turn: MachineTurn,
}

impl Qemu {
    /// A UEFI machine with no disks yet; `name` names the test folder.
    pub fn builder(name: &str) -> QemuBuilder {
        QemuBuilder::new(name)
    }

    pub fn workdir(&self) -> &Path {
        &self.work.dir
    }

    /// Everything the guest wrote to its serial console so far.
    pub fn serial_log(&self) -> String {
        self.log.0.lock().unwrap().clone()
    }

    /// The last 40 lines of the machine's serial console.
    pub fn tail(&self) -> String {
        let log = self.serial_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Wait for a serial line containing `pattern`; return that whole line.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> Result<String, HarnessError> {
        self.wait_for_line(|l| l.contains(pattern), pattern, timeout)
    }

    /// Wait for a serial line for which `pred` holds, searching from the start of the log.
    pub fn wait_for_line(
        &mut self,
        pred: impl Fn(&str) -> bool,
        what: &str,
        timeout: Duration,
    ) -> Result<String, HarnessError> {
        self.wait_for_line_after(0, pred, what, timeout)
    }

    /// Like `wait_for_line`, ignoring the first `offset` bytes of the log (see `log_len`).
    pub fn wait_for_line_after(
        &mut self,
        offset: usize,
        pred: impl Fn(&str) -> bool,
        what: &str,
        timeout: Duration,
    ) -> Result<String, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let (m, cv) = &*self.log;
                let guard = m.lock().unwrap();
                let text = guard.get(offset..).unwrap_or("");
                // Only complete lines count; strip the CR of serial line endings.
                let complete = match text.rfind('\n') {
                    Some(i) => &text[..i],
                    None => "",
                };
                if let Some(l) = console_lines(complete).find(|l| pred(l)) {
                    return Ok(l.into_owned());
                }
                let _ = cv.wait_timeout(guard, Duration::from_millis(200)).unwrap();
            }
            self.check_no_triple_fault(what)?;
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    // Let the reader drain what QEMU wrote last.
                    std::thread::sleep(Duration::from_millis(200));
                    let text = self.serial_log();
                    if let Some(l) = console_lines(text.get(offset..).unwrap_or("")).find(|l| pred(l)) {
                        return Ok(l.into_owned());
                    }
                    self.check_no_triple_fault(what)?;
                    return Err(HarnessError::Exited {
                        name: self.name.clone(),
                        pattern: what.into(),
                        status: status.to_string(),
                        stderr: std::fs::read_to_string(self.work.path("qemu.stderr")).unwrap_or_default(),
                        tail: self.tail(),
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    name: self.name.clone(),
                    pattern: what.into(),
                    timeout,
                    tail: self.tail(),
                });
            }
        }
    }

    /// Bytes of serial output so far (to wait only for lines that come after now).
    pub fn log_len(&self) -> usize {
        self.log.0.lock().unwrap().len()
    }

    /// Type on the serial console.
    pub fn send_serial(&mut self, bytes: &[u8]) -> Result<(), HarnessError> {
        let s = self.serial.as_mut().expect("this machine has no serial port (no_serial())");
        s.write_all(bytes).map_err(io("writing to the serial console"))
    }

    /// Press keys on the USB keyboard together, then release them (QMP `input-send-event`
    /// with QEMU qcodes, e.g. `["shift", "a"]`, `["ret"]`, `["esc"]`).
    pub fn press(&mut self, qcodes: &[&str]) -> Result<(), HarnessError> {
        let ev = |q: &str, down: bool| {
            serde_json::json!({ "type": "key", "data": { "down": down, "key": { "type": "qcode", "data": q } } })
        };
        let down: Vec<_> = qcodes.iter().map(|q| ev(q, true)).collect();
        self.qmp("input-send-event", serde_json::json!({ "events": down }))?;
        // The guest polls the USB keyboard: give it a report with the keys down before the release.
        std::thread::sleep(Duration::from_millis(40));
        let up: Vec<_> = qcodes.iter().rev().map(|q| ev(q, false)).collect();
        self.qmp("input-send-event", serde_json::json!({ "events": up }))?;
        std::thread::sleep(Duration::from_millis(40));
        Ok(())
    }

    /// Type `text` on the USB keyboard (US layout; `\n` is Enter).
    pub fn type_text(&mut self, text: &str) -> Result<(), HarnessError> {
        for c in text.chars() {
            let (shift, q) = qcode(c).ok_or_else(|| HarnessError::Qmp(format!("no key for {c:?} in type_text")))?;
            if shift {
                self.press(&["shift", &q])?;
            } else {
                self.press(&[&q])?;
            }
        }
        Ok(())
    }

    /// The screen as text: a QMP screendump (kept as `screen.png` in the test folder) read by
    /// tesseract (Debian's `tesseract-ocr`).
    pub fn screen_text(&mut self) -> Result<String, HarnessError> {
        let png = self.work.path("screen.png");
        let _ = std::fs::remove_file(&png);
        self.screendump(&png)?;
        // QEMU writes the file when the display next refreshes.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !png.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = std::process::Command::new("tesseract")
            .arg(&png)
            .arg("-")
            .output()
            .map_err(io("running tesseract (apt-get install tesseract-ocr)"))?;
        if !out.status.success() {
            return Err(HarnessError::Qmp(format!("tesseract: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The screen as a PPM picture (width, height, RGB), from a QMP screendump.
    pub fn screen_picture(&mut self) -> Result<(usize, usize, Vec<u8>), HarnessError> {
        let path = self.work.path("screen.ppm");
        let _ = std::fs::remove_file(&path);
        self.qmp("screendump", serde_json::json!({ "filename": path, "format": "ppm" }))?;
        // QEMU writes the file at its next display refresh: wait until it is whole.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(data) = std::fs::read(&path) {
                if let Ok(p) = ppm::parse_ppm(&data) {
                    return Ok(p);
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Qmp(format!("screendump: no whole picture in {} after 10 s", path.display())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The screen read as a text console (a VM's tty on the monitor: an 8x16 font, light on
    /// dark): scaled up and inverted for tesseract (`ppm::console_for_ocr`). The picture read
    /// is kept as `console.pgm` in the test folder.
    pub fn console_text(&mut self) -> Result<String, HarnessError> {
        let (w, h, rgb) = self.screen_picture()?;
        let pgm = self.work.path("console.pgm");
        std::fs::write(&pgm, ppm::console_for_ocr(w, h, &rgb, 3)).map_err(io("writing console.pgm"))?;
        let out = std::process::Command::new("tesseract")
            .arg(&pgm)
            .arg("-")
            .args(["--psm", "6"])
            .output()
            .map_err(io("running tesseract (apt-get install tesseract-ocr)"))?;
        if !out.status.success() {
            return Err(HarnessError::Qmp(format!("tesseract: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Pull the USB stick out (QMP device_del), as a user does once the installer is done.
    pub fn pull_usb_stick(&mut self) -> Result<(), HarnessError> {
        let i = self.cfg.disks.iter().position(|d| d.bus == DiskBus::Usb).expect("no USB stick was attached (uefi_usb)");
        self.qmp("device_del", serde_json::json!({ "id": rootfs_builder::qemu::device_id(i) })).map(|_| ())
    }

    /// Read the screen until `text` is on it (spaces and case as OCR reads them do not
    /// matter); returns what was read.
    pub fn wait_screen(&mut self, text: &str, timeout: Duration) -> Result<String, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.screen_text()?;
            if ocr_contains(&seen, text) {
                return Ok(seen);
            }
            self.check_no_triple_fault(text)?;
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(HarnessError::Exited {
                        name: self.name.clone(),
                        pattern: text.into(),
                        status: status.to_string(),
                        stderr: std::fs::read_to_string(self.work.path("qemu.stderr")).unwrap_or_default(),
                        tail: seen,
                    });
                }
            }
            if Instant::now() > deadline {
                let _ = std::fs::copy(self.work.path("screen.png"), self.work.path("screen-timeout.png"));
                return Err(HarnessError::Timeout { name: self.name.clone(), pattern: text.into(), timeout, tail: seen });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The host end of the `org.rayos.control` port (after `control_channel()`).
    pub fn control_socket(&self) -> PathBuf {
        self.cfg.control.clone().expect("control_channel() was not asked for")
    }

    /// Run a QMP command; returns its `return` value.
    pub fn qmp(&mut self, execute: &str, arguments: serde_json::Value) -> Result<serde_json::Value, HarnessError> {
        if self.qmp.is_none() {
            let path = self.cfg.qmp.clone().expect("QMP socket configured");
            // With a serial socket QEMU makes its QMP socket only once the harness has
            // connected to the serial one: it may be a moment away.
            let deadline = Instant::now() + Duration::from_secs(30);
            let s = loop {
                match UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => return Err(io(format!("connecting to QMP at {}", path.display()))(e)),
                }
            };
            let mut r = BufReader::new(s);
            let mut greeting = String::new();
            r.read_line(&mut greeting).map_err(io("reading the QMP greeting"))?;
            self.qmp = Some(r);
            self.qmp_raw("qmp_capabilities", serde_json::json!({}))?;
        }
        self.qmp_raw(execute, arguments)
    }

    fn qmp_raw(&mut self, execute: &str, arguments: serde_json::Value) -> Result<serde_json::Value, HarnessError> {
        let r = self.qmp.as_mut().unwrap();
        let msg = serde_json::json!({ "execute": execute, "arguments": arguments });
        r.get_mut().write_all(format!("{msg}\n").as_bytes()).map_err(io("writing to QMP"))?;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(io("reading from QMP"))? == 0 {
                return Err(HarnessError::Qmp("QMP closed".into()));
            }
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| HarnessError::Qmp(format!("{e}: {line}")))?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                return Err(HarnessError::Qmp(format!("{execute}: {err}")));
            }
            // An asynchronous event: skip it.
        }
    }

    /// Save the screen as PNG.
    pub fn screendump(&mut self, path: &Path) -> Result<(), HarnessError> {
        self.qmp("screendump", serde_json::json!({ "filename": path, "format": "png" })).map(|_| ())
    }

    /// Wait for QEMU to exit by itself (e.g. the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("QEMU running");
        loop {
            if let Some(s) = child.try_wait().map_err(io("waiting for QEMU"))? {
                // With -no-reboot a triple fault also ends QEMU: that is no power-off.
                self.check_no_triple_fault("QEMU to exit")?;
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    name: self.name.clone(),
                    pattern: "QEMU to exit".into(),
                    timeout,
                    tail: self.tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fails once QEMU has logged a triple fault of the machine (issue #12's silent resets:
    /// the kernel has no chance to say anything). Without -no-reboot the machine would boot
    /// again and a test would wait out its timeout; with it QEMU exits and the test would see
    /// only that. Either way the test now says what happened, with QEMU's registers.
    pub fn check_no_triple_fault(&self, waiting_for: &str) -> Result<(), HarnessError> {
        let path = self.work.path(CPU_RESET_LOG);
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        match rootfs_builder::qemu::triple_fault(&log) {
            None => Ok(()),
            Some(report) => Err(HarnessError::TripleFault {
                name: self.name.clone(),
                pattern: waiting_for.into(),
                report,
                log: path.display().to_string(),
                tail: self.tail(),
            }),
        }
    }

    /// Stop QEMU now (as pulling the power).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.work.sockets);
    }
}
