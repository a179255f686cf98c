//! The home screen: the machine's name and the time, every VM with its kind, state and the key
//! that shows it, and the keys that start and stop VMs and power the machine off, so that no
//! second computer is ever needed.
//!
//! `Home` is the scene's state and its key handling (pure, unit-tested); `render` draws it and
//! says where each item went, which the compositor prints as `compositor: layout home …` lines
//! for the integration tests to compare with a screendump.

use std::fmt;

use evdev::KeyCode;

use crate::canvas::{rgb, Canvas};
use crate::font::{Text, TextBox};

/// The most VMs with a number key (1..9).
pub const MAX_NUMBERED: usize = 9;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmEntry {
    pub name: String,
    pub kind: String,
    pub state: String,
    pub has_display: bool,
    /// It has a NAT link out through RayOS (`policy.network = "nat"`).
    pub nat: bool,
    /// Running, but its guest has not come up yet (its guest agent has not said ready): the
    /// home screen says "starting" until then, as the user cannot use it before.
    pub guest_booting: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirm {
    PowerOff,
    Reboot,
}

/// What a key on the home screen asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HomeCommand {
    /// Show this VM (rayosd starts it if it is stopped).
    Present(String),
    Start(String),
    Stop(String),
    PowerOff,
    Reboot,
}

#[derive(Clone, Debug, Default)]
pub struct Home {
    pub machine_name: String,
    /// The time as shown, e.g. "14:05 UTC".
    pub clock: String,
    pub vms: Vec<VmEntry>,
    pub selected: usize,
    pub confirm: Option<Confirm>,
    /// The last thing that went wrong (e.g. rayosd refused a start), shown until the next key.
    pub message: String,
}

fn digit(code: u16) -> Option<usize> {
    // KEY_1..KEY_9 are 2..10 in evdev's numbering.
    (KeyCode::KEY_1.0..=KeyCode::KEY_9.0).contains(&code).then(|| usize::from(code - KeyCode::KEY_1.0))
}

impl Home {
    /// A key pressed at home.
    pub fn key(&mut self, code: u16) -> Option<HomeCommand> {
        self.message.clear();
        if let Some(c) = self.confirm.take() {
            return (code == KeyCode::KEY_Y.0).then_some(match c {
                Confirm::PowerOff => HomeCommand::PowerOff,
                Confirm::Reboot => HomeCommand::Reboot,
            });
        }
        let selected = self.vms.get(self.selected).map(|v| v.name.clone());
        match KeyCode(code) {
            KeyCode::KEY_UP => self.selected = self.selected.saturating_sub(1),
            KeyCode::KEY_DOWN => self.selected = (self.selected + 1).min(self.vms.len().saturating_sub(1)),
            KeyCode::KEY_ENTER | KeyCode::KEY_KPENTER => return selected.map(HomeCommand::Present),
            KeyCode::KEY_S => return selected.map(HomeCommand::Start),
            KeyCode::KEY_X => return selected.map(HomeCommand::Stop),
            KeyCode::KEY_P => self.confirm = Some(Confirm::PowerOff),
            KeyCode::KEY_R => self.confirm = Some(Confirm::Reboot),
            _ => {
                let n = digit(code)?;
                let vm = self.vms.get(n)?;
                self.selected = n;
                return Some(HomeCommand::Present(vm.name.clone()));
            }
        }
        None
    }

    /// The VM list changed: keep the same VM selected where it still exists.
    pub fn set_vms(&mut self, vms: Vec<VmEntry>) {
        let keep = self.vms.get(self.selected).map(|v| v.name.clone());
        self.vms = vms;
        self.selected = keep.and_then(|n| self.vms.iter().position(|v| v.name == n)).unwrap_or(0).min(self.vms.len().saturating_sub(1));
    }

    /// One VM's state changed (the VmStateChanged signal).
    pub fn set_state(&mut self, name: &str, state: &str) -> bool {
        match self.vms.iter_mut().find(|v| v.name == name) {
            Some(v) => {
                v.state = state.to_string();
                true
            }
            None => false,
        }
    }
}

/// Where one thing on the home screen went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutItem {
    pub what: Item,
    pub at: TextBox,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Title(String),
    Clock(String),
    Vm { name: String, state: String, key: Option<usize> },
    Help(String),
    Confirm(String),
    Message(String),
}

impl fmt::Display for LayoutItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "compositor: layout home ")?;
        match &self.what {
            Item::Title(s) => write!(f, "title={s:?}")?,
            Item::Clock(s) => write!(f, "clock={s:?}")?,
            Item::Vm { name, state, key } => write!(f, "vm={name} state={state} key={}", key.map_or("none".into(), |k| k.to_string()))?,
            Item::Help(s) => write!(f, "help={s:?}")?,
            Item::Confirm(s) => write!(f, "confirm={s:?}")?,
            Item::Message(s) => write!(f, "message={s:?}")?,
        }
        write!(f, " x={} y={} w={} h={}", self.at.x, self.at.y, self.at.w, self.at.h)
    }
}

const BG: u32 = rgb(0x1c, 0x1f, 0x26);
const FG: u32 = rgb(0xee, 0xee, 0xee);
const DIM: u32 = rgb(0xa0, 0xa6, 0xb0);
const ACCENT: u32 = rgb(0x6c, 0xb6, 0xff);
const SELECTED: u32 = rgb(0x2e, 0x3a, 0x4e);
const WARN: u32 = rgb(0xff, 0xc8, 0x57);

fn state_color(state: &str) -> u32 {
    match state {
        "running" => rgb(0x7d, 0xd8, 0x7d),
        "starting" | "stopping" | "paused" | "saved" | "saving" => WARN,
        "failed" | "hung" | "crash-loop" | "broken" => rgb(0xff, 0x6b, 0x6b),
        _ => DIM,
    }
}

/// How a VM's state reads at home, where every running VM is hidden by definition.
fn state_label(vm: &VmEntry) -> String {
    match vm.state.as_str() {
        "running" if vm.guest_booting => "starting (hidden)".into(),
        "running" => "running (hidden)".into(),
        "saved" => "saved (S resumes it)".into(),
        s => s.into(),
    }
}

/// Draws the home screen on `canvas`; text sizes follow the canvas height so the same screen
/// is legible from 1280x800 to 3840x2160.
pub fn render(home: &Home, text: &mut Text, canvas: &mut Canvas) -> Vec<LayoutItem> {
    let (w, h) = (canvas.width, canvas.height);
    let title_px = (h / 16).max(16);
    let body_px = (h / 34).max(12);
    let small_px = (h / 44).max(10);
    let margin = (w.min(h) / 20) as i32;
    let mut items = Vec::new();
    canvas.fill(BG);

    let mut y = margin;
    let at = text.draw(canvas, margin, y, title_px, FG, &home.machine_name);
    items.push(LayoutItem { what: Item::Title(home.machine_name.clone()), at });
    let clock_w = text.measure(&home.clock, body_px) as i32;
    let at = text.draw(canvas, w as i32 - margin - clock_w, y + (title_px as i32 - body_px as i32) / 2, body_px, DIM, &home.clock);
    items.push(LayoutItem { what: Item::Clock(home.clock.clone()), at });
    y += text.line_height(title_px) as i32 + margin / 2;
    canvas.fill_rect(margin, y, w - 2 * margin as u32, (h / 400).max(1), ACCENT);
    y += margin / 2;

    let row_h = text.line_height(body_px) as i32 * 3 / 2;
    let (key_x, name_x, kind_x, state_x) = (margin, margin + (w as i32) / 14, margin + (w as i32) * 5 / 14, margin + (w as i32) * 8 / 14);
    if home.vms.is_empty() {
        let at = text.draw(canvas, margin, y, body_px, DIM, "No virtual machines yet.");
        items.push(LayoutItem { what: Item::Message("No virtual machines yet.".into()), at });
        y += row_h;
    }
    for (i, vm) in home.vms.iter().enumerate() {
        if y + row_h > h as i32 - 4 * row_h {
            break;
        }
        if i == home.selected {
            canvas.fill_rect(margin / 2, y - row_h / 6, w - margin as u32, row_h as u32, SELECTED);
        }
        let key = (i < MAX_NUMBERED).then_some(i + 1);
        let key_label = key.map_or(String::new(), |k| format!("[{k}]"));
        text.draw(canvas, key_x, y, body_px, ACCENT, &key_label);
        text.draw(canvas, name_x, y, body_px, FG, &vm.name);
        let kind = match (vm.has_display, vm.nat) {
            (true, false) => format!("{}, no net", vm.kind),
            (true, true) => format!("{}, NAT", vm.kind),
            (false, false) => format!("{} (no display)", vm.kind),
            (false, true) => format!("{}, NAT (no display)", vm.kind),
        };
        text.draw(canvas, kind_x, y, body_px, DIM, &kind);
        let label = state_label(vm);
        let colour = state_color(if vm.guest_booting && vm.state == "running" { "starting" } else { &vm.state });
        let s = text.draw(canvas, state_x, y, body_px, colour, &label);
        let at = TextBox { x: key_x, y, w: (s.x + s.w as i32 - key_x) as u32, h: s.h };
        items.push(LayoutItem { what: Item::Vm { name: vm.name.clone(), state: vm.state.clone(), key }, at });
        y += row_h;
    }

    let mut bottom = h as i32 - margin;
    let help = [
        "1-9 or Enter: show a VM    Ctrl+Alt+Home: back to this screen".to_string(),
        "Up/Down: select    S: start    X: stop    P: power off    R: reboot".to_string(),
    ];
    for line in help.iter().rev() {
        bottom -= text.line_height(small_px) as i32 * 5 / 4;
        let at = text.draw(canvas, margin, bottom, small_px, DIM, line);
        items.push(LayoutItem { what: Item::Help(line.clone()), at });
    }
    let banner = match home.confirm {
        Some(Confirm::PowerOff) => Some("Power off this machine? Press Y to confirm, any other key to cancel."),
        Some(Confirm::Reboot) => Some("Reboot this machine? Press Y to confirm, any other key to cancel."),
        None => None,
    };
    if let Some(b) = banner {
        bottom -= row_h;
        let at = text.draw(canvas, margin, bottom, body_px, WARN, b);
        items.push(LayoutItem { what: Item::Confirm(b.into()), at });
    } else if !home.message.is_empty() {
        bottom -= row_h;
        let at = text.draw(canvas, margin, bottom, body_px, WARN, &home.message);
        items.push(LayoutItem { what: Item::Message(home.message.clone()), at });
    }
    // Items sorted top to bottom, as a reader (or OCR) meets them.
    items.sort_by_key(|i| (i.at.y, i.at.x));
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, state: &str) -> VmEntry {
        VmEntry { name: name.into(), kind: "linux".into(), state: state.into(), has_display: true, nat: false, guest_booting: false }
    }

    #[test]
    fn a_running_vm_whose_guest_is_not_up_yet_reads_starting() {
        let mut booting = vm("debian", "running");
        booting.guest_booting = true;
        assert_eq!(state_label(&booting), "starting (hidden)");
        assert_eq!(state_label(&vm("debian", "running")), "running (hidden)");
        // Only a running VM is booting: a stopped one says so whatever was last heard.
        booting.state = "stopped".into();
        assert_eq!(state_label(&booting), "stopped");
    }

    fn home() -> Home {
        Home { machine_name: "desk".into(), clock: "12:34 UTC".into(), vms: vec![vm("debian", "running"), vm("win11", "stopped")], ..Default::default() }
    }

    #[test]
    fn keys_pick_and_drive_vms() {
        let mut h = home();
        assert_eq!(h.key(KeyCode::KEY_2.0), Some(HomeCommand::Present("win11".into())));
        assert_eq!(h.key(KeyCode::KEY_3.0), None, "no third VM");
        assert_eq!(h.key(KeyCode::KEY_S.0), Some(HomeCommand::Start("win11".into())));
        h.key(KeyCode::KEY_UP.0);
        assert_eq!(h.key(KeyCode::KEY_X.0), Some(HomeCommand::Stop("debian".into())));
        assert_eq!(h.key(KeyCode::KEY_ENTER.0), Some(HomeCommand::Present("debian".into())));
        h.key(KeyCode::KEY_DOWN.0);
        h.key(KeyCode::KEY_DOWN.0);
        assert_eq!(h.selected, 1, "selection stops at the last VM");
    }

    #[test]
    fn power_off_and_reboot_need_a_confirming_y() {
        let mut h = home();
        assert_eq!(h.key(KeyCode::KEY_P.0), None);
        assert_eq!(h.confirm, Some(Confirm::PowerOff));
        assert_eq!(h.key(KeyCode::KEY_N.0), None, "any other key cancels");
        assert_eq!(h.confirm, None);
        assert_eq!(h.key(KeyCode::KEY_Y.0), None, "Y alone does nothing");
        h.key(KeyCode::KEY_R.0);
        assert_eq!(h.key(KeyCode::KEY_Y.0), Some(HomeCommand::Reboot));
        h.key(KeyCode::KEY_P.0);
        assert_eq!(h.key(KeyCode::KEY_Y.0), Some(HomeCommand::PowerOff));
    }

    #[test]
    fn state_changes_update_the_list_and_the_selection_follows_its_vm() {
        let mut h = home();
        h.selected = 1;
        assert!(h.set_state("debian", "stopped"));
        assert!(!h.set_state("nope", "running"));
        assert_eq!(h.vms[0].state, "stopped");
        h.set_vms(vec![vm("arch", "running"), vm("debian", "running"), vm("win11", "failed")]);
        assert_eq!(h.vms[h.selected].name, "win11");
    }

    #[test]
    fn every_vm_is_drawn_inside_the_screen_and_named_in_the_layout() {
        let mut text = Text::new();
        for (w, hgt) in [(1280, 800), (1920, 1080), (3840, 2160)] {
            let mut c = Canvas::new(w, hgt);
            let items = render(&home(), &mut text, &mut c);
            let lines: Vec<String> = items.iter().map(|i| i.to_string()).collect();
            let vm_line = lines.iter().find(|l| l.contains("vm=win11")).expect("win11 laid out");
            assert!(vm_line.contains("state=stopped key=2"), "{vm_line}");
            assert!(lines.iter().any(|l| l.starts_with("compositor: layout home title=\"desk\"")));
            for i in &items {
                assert!(i.at.x >= 0 && i.at.y >= 0 && i.at.x as u32 + i.at.w <= w && i.at.y as u32 + i.at.h <= hgt, "{i} off a {w}x{hgt} screen");
            }
            // Text is sized from the screen: the title is taller on a bigger screen.
            let title = items.iter().find(|i| matches!(i.what, Item::Title(_))).unwrap();
            assert!(title.at.h >= hgt / 16, "{title} too small at {w}x{hgt}");
            // Something was drawn inside the title's box.
            let b = title.at;
            let ink = (b.y..b.y + b.h as i32).flat_map(|y| (b.x..b.x + b.w as i32).map(move |x| (x, y))).filter(|&(x, y)| c.get(x as u32, y as u32) != BG).count();
            assert!(ink > 100, "no ink in the title box at {w}x{hgt}");
        }
    }
}
