//! The wizard on the machine's consoles: the screen (kernel VT, tty1) and the serial console,
//! drawn on all of them at once. The first one a key is typed on drives the wizard; the others
//! show the same view with a line saying where it is in use. A console that breaks or goes away
//! is left out (said on the others and in the log); the wizard only gives up when none is left.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::mpsc;

use nix::poll::{PollFd, PollFlags};
use nix::sys::termios::{self, SetArg, Termios};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::Rect;
use ratatui::{Terminal, TerminalOptions, Viewport};
use thiserror::Error;

use super::keys::{Input, KeyDecoder};
use super::render::render;
use super::state::{Action, Screen, Wizard};
use crate::console::{ConsoleDev, ConsoleOut};
use crate::keymap::ScreenKeymap;

pub enum Outcome {
    Reboot,
    Restart,
}

/// Progress messages from the install thread.
pub enum Progress {
    Step(u8, String),
    Finished(Result<String, String>),
}

#[derive(Debug, Error)]
pub enum WizardError {
    #[error("no console to show the installer on: {0}")]
    NoConsole(String),
}

struct Tty {
    id: usize,
    label: &'static str,
    path: PathBuf,
    input: File,
    term: Terminal<CrosstermBackend<ConsoleOut>>,
    area: Rect,
    saved: Termios,
    keys: KeyDecoder,
    /// Ctrl-L was typed: clear and draw everything with the next frame.
    redraw: bool,
}

/// The terminal's size; 0x0 (a serial line reports none) or anything too small to draw the
/// wizard on means 80x24, what every serial terminal shows.
fn size_of(f: &File) -> Rect {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `ws`, which outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    if r != 0 || ws.ws_col < 40 || ws.ws_row < 12 {
        Rect::new(0, 0, 80, 24)
    } else {
        Rect::new(0, 0, ws.ws_col, ws.ws_row)
    }
}

/// A full redraw: ratatui's `Terminal::clear` asks the terminal for the cursor position
/// (ESC [6n), which a serial console may never answer. We clear the screen ourselves and start
/// from a fresh Terminal, whose first draw paints every cell.
fn fresh(out: &File, area: Rect) -> io::Result<Terminal<CrosstermBackend<ConsoleOut>>> {
    let mut file = ConsoleOut::from(out.try_clone()?);
    // Clear the screen, cursor home.
    file.write_all(b"\x1b[2J\x1b[H")?;
    Terminal::with_options(CrosstermBackend::new(file), TerminalOptions { viewport: Viewport::Fixed(area) })
}

impl Tty {
    fn open(id: usize, c: ConsoleDev) -> Result<Tty, String> {
        let name = c.path.display().to_string();
        let saved = termios::tcgetattr(&c.file).map_err(|e| format!("{name}: not a terminal ({e})"))?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&c.file, SetArg::TCSANOW, &raw).map_err(|e| format!("{name}: cannot switch to raw mode ({e})"))?;
        let area = size_of(&c.file);
        let mut out = c.file.try_clone().map_err(|e| format!("{name}: {e}"))?;
        if c.label == "screen" {
            // The Linux VT: no screen blanking while someone reads the summary (setterm -blank 0).
            let _ = out.write_all(b"\x1b[9;0]");
        }
        let term = fresh(&out, area).map_err(|e| format!("{name}: {e}"))?;
        let keys = KeyDecoder::default();
        Ok(Tty { id, label: c.label, path: c.path, input: c.file, term, area, saved, keys, redraw: false })
    }

    fn restore(&mut self) {
        let _ = termios::tcsetattr(&self.input, SetArg::TCSANOW, &self.saved);
        // Clear the screen, cursor home and visible again.
        let _ = (&self.input).write_all(b"\x1b[2J\x1b[H\x1b[?25h");
    }

    /// What arrived; Err when the console is gone (hang-up, I/O error).
    fn read(&mut self) -> io::Result<usize> {
        let mut buf = [0u8; 256];
        match (&self.input).read(&mut buf) {
            Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the console hung up")),
            Ok(n) => {
                self.keys.feed(&buf[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// Runs the wizard until the user reboots or starts over. `start_install` is called once,
/// after the confirmation, and must report through the sender. With `loadkeys` (kbd's program),
/// the keyboard layout the wizard holds is loaded onto the screen's VT at start and whenever the
/// user accepts one; the serial console is not touched.
pub fn run(
    mut w: Wizard,
    consoles: Vec<ConsoleDev>,
    loadkeys: Option<PathBuf>,
    start_install: impl FnOnce(&Wizard, mpsc::Sender<Progress>),
) -> Result<Outcome, WizardError> {
    let mut ttys = Vec::new();
    let mut problems = Vec::new();
    for (id, c) in consoles.into_iter().enumerate() {
        match Tty::open(id, c) {
            Ok(t) => ttys.push(t),
            Err(e) => {
                tracing::warn!("{e}");
                problems.push(e);
            }
        }
    }
    if ttys.is_empty() {
        return Err(WizardError::NoConsole(if problems.is_empty() { "none found".into() } else { problems.join("; ") }));
    }
    if !problems.is_empty() {
        w.message = Some(format!("Not shown on: {}", problems.join("; ")));
    }
    // At start too: an earlier run of the installer may have left another layout on the VT
    // than the one the wizard shows.
    let mut keymap = loadkeys.zip(ttys.iter().find(|t| t.label == "screen")).map(|(program, t)| {
        let mut k = ScreenKeymap::new(program, &t.path);
        k.request(&w.config.keymap);
        k
    });
    let (tx, rx) = mpsc::channel();
    let mut start_install = Some(start_install);
    let mut last_screen = w.screen.clone();
    let mut driver: Option<(usize, &'static str)> = None;
    // Drawn only when something changed: a serial line should not get a frame every poll.
    let mut dirty = true;
    let result = 'outer: loop {
        while let Ok(p) = rx.try_recv() {
            dirty = true;
            match p {
                Progress::Step(pct, line) => w.on_progress(pct, &line),
                Progress::Finished(r) => w.on_finished(r),
            }
        }
        if let Some(done) = keymap.as_mut().and_then(ScreenKeymap::poll) {
            dirty = true;
            w.keymap_problem = match done {
                Ok(name) => {
                    tracing::info!("keyboard layout {name} loaded on the screen");
                    None
                }
                Err(e) => {
                    let now = keymap.as_ref().and_then(ScreenKeymap::loaded).unwrap_or("the layout they had (at boot, us)");
                    let msg = format!("Keyboard layout: {e}. Keys typed on the screen follow {now} (the serial console is not affected).");
                    tracing::warn!("{msg}");
                    Some(msg)
                }
            };
        }
        // A serial terminal keeps no state we can trust: on every screen change the whole
        // screen is cleared and drawn again rather than diffed.
        let redraw_all = w.screen != last_screen;
        last_screen = w.screen.clone();
        let mut broken: Vec<(usize, String)> = Vec::new();
        for t in ttys.iter_mut().filter(|_| dirty || redraw_all) {
            let asked = std::mem::take(&mut t.redraw);
            if redraw_all || asked {
                match fresh(&t.input, t.area) {
                    Ok(term) => t.term = term,
                    Err(e) => {
                        broken.push((t.id, e.to_string()));
                        continue;
                    }
                }
            }
            let note = match driver {
                Some((id, label)) if id != t.id => {
                    Some(format!("The installer is in use on the {label}: keys typed here are ignored."))
                }
                _ => None,
            };
            if let Err(e) = t.term.draw(|f| render(f, &w, note.as_deref())) {
                broken.push((t.id, e.to_string()));
            }
        }

        dirty = false;
        let pending = ttys.iter().any(|t| t.keys.pending());
        let loading = keymap.as_ref().is_some_and(ScreenKeymap::busy);
        let timeout: u16 = if pending || loading { 50 } else { 200 };
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd> = ttys.iter().map(|t| PollFd::new(t.input.as_fd(), PollFlags::POLLIN)).collect();
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) => fds.iter().map(|p| p.any().unwrap_or(false)).collect(),
                Err(_) => vec![false; fds.len()],
            }
        };
        let mut inputs: Vec<(usize, &'static str, Input)> = Vec::new();
        for (t, ready) in ttys.iter_mut().zip(ready) {
            let got = if ready {
                match t.read() {
                    Ok(n) => n,
                    Err(e) => {
                        broken.push((t.id, e.to_string()));
                        continue;
                    }
                }
            } else {
                0
            };
            // Nothing more came for a moment: a lone ESC is the Esc key.
            for i in t.keys.drain(got == 0) {
                inputs.push((t.id, t.label, i));
            }
        }

        for (id, label, input) in inputs {
            let Some(t) = ttys.iter_mut().find(|t| t.id == id) else { continue };
            let key = match input {
                Input::Redraw => {
                    // Drawn with the next frame, where a console that takes no output is found
                    // broken (here its error was ignored, and each Ctrl-L waited 5 s again).
                    t.redraw = true;
                    dirty = true;
                    continue;
                }
                Input::Key(k) => k,
            };
            dirty = true;
            match driver {
                None => driver = Some((id, label)),
                Some((d, _)) if d != id => continue,
                Some(_) => {}
            }
            match w.handle(key) {
                Action::None => {}
                Action::Install => {
                    if let Some(f) = start_install.take() {
                        f(&w, tx.clone());
                    }
                }
                Action::Reboot => break 'outer Outcome::Reboot,
                Action::Restart => break 'outer Outcome::Restart,
                Action::LoadKeymap(name) => {
                    if let Some(k) = keymap.as_mut() {
                        k.request(&name);
                    }
                }
            }
            if matches!(w.screen, Screen::Installing) {
                break;
            }
        }

        // After the keys: they were typed before the console was found broken, and a key clears
        // the wizard's message, which must name the broken console. (A console stalls for up to
        // 5 s (`console::ConsoleOut`) before it counts as broken; keys typed on the others
        // meanwhile used to wipe the message before it was ever drawn.)
        for (id, why) in broken {
            if let Some(pos) = ttys.iter().position(|t| t.id == id) {
                let mut t = ttys.remove(pos);
                let msg = format!("The {} ({}) stopped working: {why}.", t.label, t.path.display());
                tracing::warn!("{msg}");
                crate::console::say(&msg);
                t.restore();
                dirty = true;
                if driver.is_some_and(|(d, _)| d == id) {
                    driver = None;
                }
                w.message = Some(msg);
            }
        }
        if ttys.is_empty() {
            return Err(WizardError::NoConsole("every console stopped working".into()));
        }
    };
    for t in ttys.iter_mut() {
        t.restore();
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    //! The wizard on real pseudo-terminals: the slave side is a tty the wizard opens as a
    //! console, the master side is the person at it (what they see, what they type, unplugging).

    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use nix::pty::PtyMaster;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// What a terminal of `rows` x `cols` shows after the installer's output, enough of VT100 for
    /// what ratatui's crossterm backend writes: text, CR/LF, cursor moves (CSI row;col H) and
    /// clearing (CSI 2J); colours and cursor visibility are ignored. Cursor moves beyond the
    /// screen are recorded, not clamped, so a test can see a wizard drawn too big.
    struct Vt {
        grid: Vec<Vec<char>>,
        row: usize,
        col: usize,
        /// The furthest (row, col) the output moved the cursor to or wrote at, 1-based.
        max_row: usize,
        max_col: usize,
    }

    impl Vt {
        fn parse(bytes: &[u8], rows: usize, cols: usize) -> Vt {
            let mut vt = Vt { grid: vec![vec![' '; cols]; rows], row: 0, col: 0, max_row: 0, max_col: 0 };
            let text = String::from_utf8_lossy(bytes);
            let mut chars = text.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '\x1b' if chars.peek() == Some(&'[') => {
                        chars.next();
                        let mut params = String::new();
                        let mut last = ' ';
                        for n in chars.by_ref() {
                            if ('@'..='~').contains(&n) {
                                last = n;
                                break;
                            }
                            params.push(n);
                        }
                        match last {
                            'H' => {
                                let mut p = params.split(';').map(|n| n.parse::<usize>().unwrap_or(1).max(1));
                                vt.row = p.next().unwrap_or(1) - 1;
                                vt.col = p.next().unwrap_or(1) - 1;
                                vt.max_row = vt.max_row.max(vt.row + 1);
                                vt.max_col = vt.max_col.max(vt.col + 1);
                            }
                            'J' if params == "2" => vt.grid.iter_mut().for_each(|r| r.fill(' ')),
                            _ => {}
                        }
                    }
                    '\r' => vt.col = 0,
                    '\n' => vt.row += 1,
                    c if !c.is_control() => {
                        if let Some(cell) = vt.grid.get_mut(vt.row).and_then(|r| r.get_mut(vt.col)) {
                            *cell = c;
                        }
                        vt.max_row = vt.max_row.max(vt.row + 1);
                        vt.max_col = vt.max_col.max(vt.col + 1);
                        vt.col += 1;
                    }
                    _ => {}
                }
            }
            vt
        }

        fn row(&self, n: usize) -> String {
            self.grid[n].iter().collect::<String>().trim_end().to_string()
        }

        /// The screen's rows joined, runs of blanks as one space: text wrapped over two rows
        /// reads as one line.
        fn text(&self) -> String {
            let rows: Vec<String> = (0..self.grid.len()).map(|r| self.row(r)).collect();
            rows.join(" ").split_whitespace().collect::<Vec<_>>().join(" ")
        }
    }

    enum Cmd {
        Type(Vec<u8>),
        /// Stop reading (a slow terminal, or one scrolled back): output piles up in the pty.
        Pause(bool),
        HangUp,
    }

    /// The person at one console: the pty's master, read all along (as a terminal does) by a
    /// thread that alone holds it, so that hanging up really closes it.
    struct Person {
        out: Arc<Mutex<Vec<u8>>>,
        cmds: mpsc::Sender<Cmd>,
        rows: usize,
        cols: usize,
    }

    impl Person {
        fn new(mut master: PtyMaster, rows: usize, cols: usize) -> Person {
            let out = Arc::new(Mutex::new(Vec::new()));
            let (cmds, rx) = mpsc::channel();
            let seen = out.clone();
            std::thread::spawn(move || {
                let mut paused = false;
                loop {
                    match rx.try_recv() {
                        Ok(Cmd::Type(b)) => master.write_all(&b).unwrap(),
                        Ok(Cmd::Pause(p)) => paused = p,
                        Ok(Cmd::HangUp) | Err(mpsc::TryRecvError::Disconnected) => return,
                        Err(mpsc::TryRecvError::Empty) => {}
                    }
                    if paused {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
                    if nix::poll::poll(&mut fds, 20u16).unwrap_or(0) == 0 {
                        continue;
                    }
                    let mut buf = [0u8; 4096];
                    match master.read(&mut buf) {
                        Ok(n) if n > 0 => seen.lock().unwrap().extend_from_slice(&buf[..n]),
                        // The installer closed its side (EIO on Linux): nothing more will come,
                        // but the master stays open until the test hangs up.
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
            Person { out, cmds, rows, cols }
        }

        fn screen(&self) -> Vt {
            Vt::parse(&self.out.lock().unwrap(), self.rows, self.cols)
        }

        fn type_keys(&self, keys: &str) {
            self.cmds.send(Cmd::Type(keys.as_bytes().to_vec())).unwrap();
        }

        /// Ctrl-L every few ms for `how_long`: each asks for a whole frame, far more output than
        /// a pty holds while nobody reads it.
        fn redraw_often(&self, how_long: Duration) {
            let end = Instant::now() + how_long;
            while Instant::now() < end {
                self.type_keys("\x0c");
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// How much output came, once nothing more comes for a moment.
        fn settled(&self) -> usize {
            let mut len = self.out.lock().unwrap().len();
            loop {
                std::thread::sleep(Duration::from_millis(300));
                let now = self.out.lock().unwrap().len();
                if now == len {
                    return len;
                }
                len = now;
            }
        }

        fn pause(&self, paused: bool) {
            self.cmds.send(Cmd::Pause(paused)).unwrap();
        }

        fn hang_up(&self) {
            self.cmds.send(Cmd::HangUp).unwrap();
        }

        fn wait_for(&self, text: &str) -> Vt {
            let deadline = Instant::now() + WAIT;
            loop {
                let vt = self.screen();
                if vt.text().contains(text) {
                    return vt;
                }
                assert!(Instant::now() < deadline, "waited {WAIT:?} for {text:?}; the screen shows:\n{}", vt.text());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// A pseudo-terminal whose slave is the installer's console `label`, and the person at its
    /// master.
    fn pty(label: &'static str, rows: u16, cols: u16) -> (ConsoleDev, Person) {
        let (master, console) = crate::console::pty_console(label, rows, cols);
        // A terminal reporting no size: room to see whatever size the wizard is drawn at.
        let (vr, vc) = if rows == 0 { (100, 300) } else { (rows as usize, cols as usize) };
        (console, Person::new(master, vr, vc))
    }

    /// `run` on `consoles` in a thread, with the log it writes; the result is waited for with a
    /// bound so a hang fails the test instead of stalling it.
    struct Running {
        done: mpsc::Receiver<Result<Outcome, WizardError>>,
        log: Arc<Mutex<Vec<u8>>>,
    }

    #[derive(Clone)]
    struct LogBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for LogBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Running {
        fn start(consoles: Vec<ConsoleDev>) -> Running {
            let log = Arc::new(Mutex::new(Vec::new()));
            let buf = LogBuf(log.clone());
            let (tx, done) = mpsc::channel();
            std::thread::spawn(move || {
                let sub = tracing_subscriber::fmt().with_ansi(false).with_writer(move || buf.clone()).finish();
                let r = tracing::subscriber::with_default(sub, || run(Wizard::new(Vec::new()), consoles, None, |_, _| {}));
                let _ = tx.send(r);
            });
            Running { done, log }
        }

        /// The error `run` gave up with (it must give up, within the bound).
        fn gave_up(&self) -> String {
            match self.done.recv_timeout(WAIT) {
                Ok(Err(WizardError::NoConsole(why))) => why,
                Ok(Ok(_)) => panic!("run finished as if the user had rebooted or started over"),
                Err(e) => panic!("run did not return within {WAIT:?} ({e}): a hang, or it panicked"),
            }
        }

        fn still_running(&self) {
            match self.done.try_recv() {
                Err(mpsc::TryRecvError::Empty) => {}
                Ok(Err(e)) => panic!("run gave up while a console was left: {e}"),
                Ok(Ok(_)) => panic!("run finished on its own"),
                Err(mpsc::TryRecvError::Disconnected) => panic!("run panicked"),
            }
        }

        fn log(&self) -> String {
            String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
        }
    }

    #[test]
    fn a_console_that_goes_away_is_named_on_the_other_which_still_drives_the_wizard() {
        let (screen_dev, screen) = pty("screen", 24, 80);
        let (serial_dev, serial) = pty("serial console", 24, 80);
        let serial_path = serial_dev.path.display().to_string();
        let screen_path = screen_dev.path.display().to_string();
        let running = Running::start(vec![screen_dev, serial_dev]);
        screen.wait_for("RayOS installer - 1/9 Welcome");
        serial.wait_for("RayOS installer - 1/9 Welcome");

        serial.hang_up();
        let gone = format!("The serial console ({serial_path}) stopped working");
        screen.wait_for(&gone);
        running.still_running();
        assert!(running.log().contains(&gone), "not in the log:\n{}", running.log());

        screen.type_keys("\r");
        screen.wait_for("RayOS installer - 2/9 Disks");
        running.still_running();

        screen.hang_up();
        let why = running.gave_up();
        assert_eq!(why, "every console stopped working");
        let log = running.log();
        assert!(log.contains(&format!("The screen ({screen_path}) stopped working")), "not in the log:\n{log}");
    }

    #[test]
    fn a_terminal_of_size_0x0_gets_an_80x24_wizard() {
        let (dev, person) = pty("serial console", 0, 0);
        let running = Running::start(vec![dev]);
        // The footer is the last row ratatui draws; then give the frame time to end.
        person.wait_for("Enter: start");
        std::thread::sleep(Duration::from_millis(300));
        let vt = person.screen();
        assert!(vt.max_row <= 24 && vt.max_col <= 80, "drawn up to row {} col {}:\n{}", vt.max_row, vt.max_col, vt.text());
        assert!(vt.row(0).starts_with("RayOS installer - 1/9 Welcome"), "{:?}", vt.row(0));
        assert_eq!(vt.row(23), "Enter: start", "the footer belongs on row 24");
        person.hang_up();
        running.gave_up();
    }

    #[test]
    fn a_console_that_is_not_a_terminal_is_named_and_left_out() {
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("ttyS0");
        std::fs::write(&plain, "").unwrap();
        let open = |p: &std::path::Path| std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
        let not_tty = |label, p: &std::path::Path| ConsoleDev { label, path: p.to_path_buf(), file: open(p) };

        // Next to a terminal: the wizard runs there and says what it is not shown on.
        let (screen_dev, screen) = pty("screen", 30, 120);
        let running = Running::start(vec![screen_dev, not_tty("serial console", &plain)]);
        screen.wait_for("RayOS installer - 1/9 Welcome");
        screen.wait_for(&format!("Not shown on: {}: not a terminal", plain.display()));
        assert!(running.log().contains(&format!("{}: not a terminal", plain.display())), "{}", running.log());
        screen.type_keys("\r");
        screen.wait_for("RayOS installer - 2/9 Disks");
        running.still_running();
        screen.hang_up();
        running.gave_up();
        assert_eq!(std::fs::read(&plain).unwrap(), b"", "nothing is drawn into a file that is not a terminal");

        // Alone (here with /dev/null, a device that is not a terminal either): nothing to show
        // the wizard on, and the error names each of them.
        let null = std::path::Path::new("/dev/null");
        let why = Running::start(vec![not_tty("screen", null), not_tty("serial console", &plain)]).gave_up();
        assert!(why.starts_with("/dev/null: not a terminal"), "{why}");
        assert!(why.contains(&format!("; {}: not a terminal", plain.display())), "{why}");
    }

    #[test]
    fn a_console_that_reads_slowly_is_waited_for_not_dropped() {
        let (dev, person) = pty("serial console", 24, 80);
        let running = Running::start(vec![dev]);
        person.wait_for("RayOS installer - 1/9 Welcome");
        person.pause(true);
        // Well under the 5 s a console may take nothing: the terminal is slow, not gone.
        person.redraw_often(Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(300));
        running.still_running();
        person.pause(false);
        person.wait_for("RayOS installer - 1/9 Welcome");
        // Ctrl-L once it reads again and the frames held back have come: the screen cleared and
        // drawn whole.
        let mark = person.settled();
        person.type_keys("\x0c");
        let deadline = Instant::now() + WAIT;
        while !String::from_utf8_lossy(&person.out.lock().unwrap()[mark..]).contains("\x1b[2J\x1b[H") {
            assert!(Instant::now() < deadline, "Ctrl-L did not clear the screen");
            std::thread::sleep(Duration::from_millis(20));
        }
        person.wait_for("RayOS installer - 1/9 Welcome");
        person.type_keys("\r");
        person.wait_for("RayOS installer - 2/9 Disks");
        running.still_running();
        person.hang_up();
        running.gave_up();
    }

    #[test]
    fn a_console_that_takes_no_output_at_all_is_dropped_and_the_other_goes_on() {
        let (screen_dev, screen) = pty("screen", 24, 80);
        let (serial_dev, serial) = pty("serial console", 24, 80);
        let serial_path = serial_dev.path.display().to_string();
        let running = Running::start(vec![screen_dev, serial_dev]);
        serial.wait_for("RayOS installer - 1/9 Welcome");
        // The serial terminal stops reading for good (flow control held, a stuck terminal).
        serial.pause(true);
        serial.redraw_often(Duration::from_secs(1));
        let gone = format!("The serial console ({serial_path}) stopped working: it took no output for 5 s");
        // Keys typed on the screen while the wizard waits for the serial console must not wipe
        // the message that names it.
        for _ in 0..10 {
            screen.type_keys("\r");
            std::thread::sleep(Duration::from_millis(10));
            screen.type_keys("\x1b");
            std::thread::sleep(Duration::from_millis(70));
        }
        screen.wait_for(&gone);
        assert!(running.log().contains(&gone), "not in the log:\n{}", running.log());
        running.still_running();
        screen.type_keys("\r");
        screen.wait_for("RayOS installer - 2/9 Disks");
        screen.hang_up();
        assert_eq!(running.gave_up(), "every console stopped working");
    }
}
