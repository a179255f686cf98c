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
use crate::console::ConsoleDev;
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
    term: Terminal<CrosstermBackend<File>>,
    area: Rect,
    saved: Termios,
    keys: KeyDecoder,
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
fn fresh(out: &File, area: Rect) -> io::Result<Terminal<CrosstermBackend<File>>> {
    let mut file = out.try_clone()?;
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
        Ok(Tty { id, label: c.label, path: c.path, input: c.file, term, area, saved, keys: KeyDecoder::default() })
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
            if redraw_all {
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

        for (id, label, input) in inputs {
            let Some(t) = ttys.iter_mut().find(|t| t.id == id) else { continue };
            let key = match input {
                Input::Redraw => {
                    if let Ok(term) = fresh(&t.input, t.area) {
                        t.term = term;
                    }
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
    };
    for t in ttys.iter_mut() {
        t.restore();
    }
    Ok(result)
}
