//! The wizard on a real terminal: /dev/console as rayosd hands it over (stdin/stdout), which
//! is a serial line in QEMU and on servers. Serial lines report no size, so 80x24 is assumed.

use std::io::{self, Write};
use std::sync::mpsc;
use std::time::Duration;

use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::layout::Rect;
use ratatui::{Terminal, TerminalOptions, Viewport};

use super::render::render;
use super::state::{Action, Key, Screen, Wizard};

pub enum Outcome {
    Reboot,
    Restart,
}

/// Progress messages from the install thread.
pub enum Progress {
    Step(u8, String),
    Finished(Result<String, String>),
}

fn map_key(code: KeyCode, mods: KeyModifiers) -> Option<Key> {
    Some(match code {
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Left => Key::Left,
        KeyCode::Right => Key::Right,
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Tab => Key::Tab,
        KeyCode::BackTab => Key::BackTab,
        // Serial terminals send DEL or ^H for backspace, and ^J/^M for enter.
        KeyCode::Char('h') if mods.contains(KeyModifiers::CONTROL) => Key::Backspace,
        KeyCode::Char('j') | KeyCode::Char('m') if mods.contains(KeyModifiers::CONTROL) => Key::Enter,
        KeyCode::Char(c) if !mods.contains(KeyModifiers::CONTROL) => Key::Char(c),
        _ => return None,
    })
}

/// Runs the wizard until the user reboots or starts over. `start_install` is called once,
/// after the confirmation, and must report through the sender.
pub fn run(mut w: Wizard, start_install: impl FnOnce(&Wizard, mpsc::Sender<Progress>)) -> io::Result<Outcome> {
    let (cols, rows) = terminal::size().unwrap_or((0, 0));
    let (cols, rows) = if cols < 20 || rows < 10 { (80, 24) } else { (cols, rows) };
    terminal::enable_raw_mode()?;
    // ratatui's `Terminal::clear` asks the terminal for the cursor position (ESC [6n), which a
    // serial console may never answer. A full redraw is done instead by clearing the screen
    // ourselves and starting from a fresh Terminal, whose first draw paints every cell.
    let fresh = || -> io::Result<Terminal<CrosstermBackend<io::Stdout>>> {
        execute!(io::stdout(), terminal::Clear(terminal::ClearType::All), cursor::MoveTo(0, 0))?;
        Terminal::with_options(
            CrosstermBackend::new(io::stdout()),
            TerminalOptions { viewport: Viewport::Fixed(Rect::new(0, 0, cols, rows)) },
        )
    };
    let mut term = fresh()?;
    let (tx, rx) = mpsc::channel();
    let mut start_install = Some(start_install);
    let mut last_screen = w.screen.clone();
    let result = loop {
        // A serial terminal keeps no state we can trust: on every screen change the whole
        // screen is cleared and drawn again rather than diffed.
        if w.screen != last_screen {
            term = fresh()?;
            last_screen = w.screen.clone();
        }
        term.draw(|f| render(f, &w))?;
        while let Ok(p) = rx.try_recv() {
            match p {
                Progress::Step(pct, line) => w.on_progress(pct, &line),
                Progress::Finished(r) => w.on_finished(r),
            }
        }
        if !event::poll(Duration::from_millis(200))? {
            continue;
        }
        let Event::Key(k) = event::read()? else {
            // Resize or noise: redraw everything.
            term = fresh()?;
            continue;
        };
        if k.kind != KeyEventKind::Press {
            continue;
        }
        if k.code == KeyCode::Char('l') && k.modifiers.contains(KeyModifiers::CONTROL) {
            term = fresh()?;
            continue;
        }
        let Some(key) = map_key(k.code, k.modifiers) else { continue };
        match w.handle(key) {
            Action::None => {}
            Action::Install => {
                if let Some(f) = start_install.take() {
                    f(&w, tx.clone());
                }
            }
            Action::Reboot => break Outcome::Reboot,
            Action::Restart => break Outcome::Restart,
        }
        if matches!(w.screen, Screen::Installing) {
            continue;
        }
    };
    terminal::disable_raw_mode()?;
    writeln!(io::stdout(), "\r")?;
    Ok(result)
}
