//! Where each physical key and pointer report goes: a pure state machine (events in,
//! datagrams and actions out), so the rules that keep a hidden VM blind are unit-tested.
//!
//! - Only the presented VM gets input; at home nothing goes to any VM (keys drive the home screen).
//! - Ctrl+Alt+Home (either Ctrl, either Alt) returns home. It is recognised on physical codes
//!   before forwarding and no key of it that was not already forwarded reaches the VM.
//! - On every switch the VM being left is sent a release for every key and button it believes
//!   held, and keys still held then are never released into the next VM (it never saw them go down).
//! - Host autorepeat (value 2) is dropped: the guest repeats by itself.

use std::collections::BTreeSet;

use evdev::KeyCode;
use rayos_proto::display::{ev, InputRecord, InputTarget};

use crate::present::Transform;

pub const KEY_HOME: u16 = KeyCode::KEY_HOME.0;
pub const KEY_DELETE: u16 = KeyCode::KEY_DELETE.0;
const CTRLS: [u16; 2] = [KeyCode::KEY_LEFTCTRL.0, KeyCode::KEY_RIGHTCTRL.0];
const ALTS: [u16; 2] = [KeyCode::KEY_LEFTALT.0, KeyCode::KEY_RIGHTALT.0];

/// One physical key event (evdev value: 0 up, 1 down, 2 autorepeat).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyEvent {
    pub code: u16,
    pub value: i32,
}

/// One pointer report (everything up to a SYN_REPORT) from any pointing device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PointerReport {
    /// Relative motion in output pixels.
    pub dx: i32,
    pub dy: i32,
    /// An absolute device's position, already in output pixels.
    pub abs: Option<(i32, i32)>,
    /// BTN_LEFT/RIGHT/MIDDLE changes (a touch is BTN_LEFT).
    pub buttons: Vec<(u16, bool)>,
    pub wheel: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// One datagram for the VM's channel.
    Send { vm: String, target: InputTarget, records: Vec<InputRecord> },
    /// The return-home combo was pressed.
    GoHome,
    /// Ctrl+Alt+Del at home: ask RayOS for an orderly reboot.
    Reboot,
    /// A key pressed at home, for the home screen.
    HomeKey(u16),
}

#[derive(Debug)]
pub struct Router {
    presented: Option<String>,
    /// The presented VM's picture on the output, for the pointer.
    transform: Option<Transform>,
    output: (u32, u32),
    pointer: (i32, i32),
    physical: BTreeSet<u16>,
    /// What the presented VM believes held: (target, code).
    forwarded: BTreeSet<(u32, u16)>,
}

fn target_of(raw: u32) -> InputTarget {
    if raw == InputTarget::Tablet as u32 { InputTarget::Tablet } else { InputTarget::Keyboard }
}

impl Router {
    pub fn new(output_w: u32, output_h: u32) -> Self {
        let output = (output_w.max(1), output_h.max(1));
        Self { presented: None, transform: None, output, pointer: (output.0 as i32 / 2, output.1 as i32 / 2), physical: BTreeSet::new(), forwarded: BTreeSet::new() }
    }

    pub fn presented(&self) -> Option<&str> {
        self.presented.as_deref()
    }

    pub fn pointer(&self) -> (i32, i32) {
        self.pointer
    }

    pub fn set_output(&mut self, w: u32, h: u32) {
        self.output = (w.max(1), h.max(1));
        self.pointer = (self.pointer.0.clamp(0, self.output.0 as i32 - 1), self.pointer.1.clamp(0, self.output.1 as i32 - 1));
    }

    /// The presented VM's picture moved (a mode change or another output).
    pub fn set_transform(&mut self, t: Option<Transform>) {
        self.transform = t;
    }

    /// Releases everything the presented VM believes held, one report per target.
    fn release_all(&mut self) -> Vec<Action> {
        let Some(vm) = self.presented.clone() else {
            self.forwarded.clear();
            return Vec::new();
        };
        let mut out = Vec::new();
        for target in [InputTarget::Keyboard, InputTarget::Tablet] {
            let mut records: Vec<InputRecord> = self.forwarded.iter().filter(|(t, _)| *t == target as u32).map(|&(_, code)| InputRecord::key(code, false)).collect();
            if !records.is_empty() {
                records.push(InputRecord::syn());
                out.push(Action::Send { vm: vm.clone(), target, records });
            }
        }
        self.forwarded.clear();
        out
    }

    /// What is shown changed (None = home). Returns the releases for the VM being left.
    pub fn present(&mut self, vm: Option<String>, transform: Option<Transform>) -> Vec<Action> {
        if vm == self.presented {
            self.transform = transform;
            return Vec::new();
        }
        let out = self.release_all();
        self.presented = vm;
        self.transform = transform;
        out
    }

    /// An input device went away (unplugged): its held keys will never be released, so forget
    /// every held key and release in the presented VM everything it believes held.
    pub fn device_gone(&mut self) -> Vec<Action> {
        self.physical.clear();
        self.release_all()
    }

    /// The VM's channel went away: whatever it believed held died with it.
    pub fn vm_gone(&mut self, vm: &str) {
        if self.presented.as_deref() == Some(vm) {
            self.forwarded.clear();
        }
    }

    fn held(&self, set: &[u16]) -> bool {
        set.iter().any(|c| self.physical.contains(c))
    }

    pub fn key(&mut self, e: KeyEvent) -> Vec<Action> {
        match e.value {
            1 => {
                self.physical.insert(e.code);
            }
            0 => {
                self.physical.remove(&e.code);
            }
            // Autorepeat, and anything else a device makes up.
            _ => return Vec::new(),
        }
        let pressed = e.value == 1;
        let ctrl_alt = self.held(&CTRLS) && self.held(&ALTS);
        if pressed && e.code == KEY_HOME && ctrl_alt {
            let mut out = self.release_all();
            out.push(Action::GoHome);
            return out;
        }
        let Some(vm) = self.presented.clone() else {
            return match (pressed, e.code) {
                (true, KEY_DELETE) if ctrl_alt => vec![Action::Reboot],
                (true, code) => vec![Action::HomeKey(code)],
                (false, _) => Vec::new(),
            };
        };
        let id = (InputTarget::Keyboard as u32, e.code);
        // A release the VM never saw the press of (the combo's, or one held across a switch) is not its business.
        if !pressed && !self.forwarded.remove(&id) {
            return Vec::new();
        }
        if pressed {
            self.forwarded.insert(id);
        }
        vec![Action::Send { vm, target: InputTarget::Keyboard, records: vec![InputRecord::key(e.code, pressed), InputRecord::syn()] }]
    }

    pub fn pointer_report(&mut self, r: &PointerReport) -> Vec<Action> {
        let before = self.pointer;
        if let Some((x, y)) = r.abs {
            self.pointer = (x, y);
        }
        self.pointer.0 = self.pointer.0.saturating_add(r.dx).clamp(0, self.output.0 as i32 - 1);
        self.pointer.1 = self.pointer.1.saturating_add(r.dy).clamp(0, self.output.1 as i32 - 1);
        let (Some(vm), Some(t)) = (self.presented.clone(), self.transform) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        if self.pointer != before || r.abs.is_some() {
            let (ax, ay) = t.to_tablet(self.pointer.0, self.pointer.1);
            records.extend([InputRecord::abs(ev::ABS_X, ax), InputRecord::abs(ev::ABS_Y, ay)]);
        }
        for &(code, pressed) in &r.buttons {
            let id = (InputTarget::Tablet as u32, code);
            if pressed {
                self.forwarded.insert(id);
            } else if !self.forwarded.remove(&id) {
                continue;
            }
            records.push(InputRecord::key(code, pressed));
        }
        if r.wheel != 0 {
            records.push(InputRecord::rel(ev::REL_WHEEL, r.wheel));
        }
        if records.is_empty() {
            return Vec::new();
        }
        records.push(InputRecord::syn());
        vec![Action::Send { vm, target: target_of(InputTarget::Tablet as u32), records }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u16 = KeyCode::KEY_A.0;
    const LCTRL: u16 = KeyCode::KEY_LEFTCTRL.0;
    const RCTRL: u16 = KeyCode::KEY_RIGHTCTRL.0;
    const LALT: u16 = KeyCode::KEY_LEFTALT.0;
    const RALT: u16 = KeyCode::KEY_RIGHTALT.0;

    fn down(code: u16) -> KeyEvent {
        KeyEvent { code, value: 1 }
    }
    fn up(code: u16) -> KeyEvent {
        KeyEvent { code, value: 0 }
    }
    fn t() -> Transform {
        Transform::fit(640, 480, 1920, 1080)
    }

    /// Every (vm, key record) delivered, in order.
    fn keys_sent(actions: &[Action]) -> Vec<(String, u16, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { vm, records, .. } => Some(records.iter().filter(|r| r.kind == ev::EV_KEY).map(move |r| (vm.clone(), r.code, r.value))),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn run(r: &mut Router, events: &[KeyEvent]) -> Vec<Action> {
        events.iter().flat_map(|&e| r.key(e)).collect()
    }

    #[test]
    fn keys_reach_only_the_presented_vm_as_one_report_each() {
        let mut r = Router::new(1920, 1080);
        assert_eq!(r.key(down(A)), vec![Action::HomeKey(A)], "at home a key drives the home screen");
        assert!(r.pointer_report(&PointerReport { dx: 5, buttons: vec![(ev::BTN_LEFT, true)], ..Default::default() }).is_empty());
        r.key(up(A));
        r.present(Some("linux".into()), Some(t()));
        assert_eq!(r.key(down(A)), vec![Action::Send { vm: "linux".into(), target: InputTarget::Keyboard, records: vec![InputRecord::key(A, true), InputRecord::syn()] }]);
        let out = r.key(up(A));
        assert_eq!(keys_sent(&out), vec![("linux".into(), A, 0)]);
        // Switch to another VM: the first gets nothing more.
        r.present(Some("win".into()), Some(t()));
        let out = run(&mut r, &[down(A), up(A)]);
        assert!(keys_sent(&out).iter().all(|(vm, _, _)| vm == "win"), "{out:?}");
        assert_eq!(keys_sent(&out).len(), 2);
        // Home: no VM gets anything.
        r.present(None, None);
        let out = run(&mut r, &[down(A), up(A)]);
        assert_eq!(keys_sent(&out), vec![]);
        assert!(r.pointer_report(&PointerReport { dx: 5, wheel: 1, ..Default::default() }).is_empty());
    }

    #[test]
    fn the_return_combo_goes_home_and_never_reaches_the_vm() {
        for (ctrl, alt) in [(LCTRL, LALT), (RCTRL, RALT), (LCTRL, RALT)] {
            for order in [[ctrl, alt], [alt, ctrl]] {
                let mut r = Router::new(800, 600);
                r.present(Some("linux".into()), Some(t()));
                let mut out = run(&mut r, &[down(order[0]), down(order[1])]);
                let at_combo = out.len();
                out.extend(r.key(down(KEY_HOME)));
                assert!(out[at_combo..].contains(&Action::GoHome));
                out.extend(run(&mut r, &[KeyEvent { code: KEY_HOME, value: 2 }, up(KEY_HOME), up(order[0]), up(order[1])]));
                let sent = keys_sent(&out);
                assert!(!sent.iter().any(|(_, c, _)| *c == KEY_HOME), "Home reached the VM: {sent:?}");
                // The modifiers it saw go down were released, each exactly once.
                for m in order {
                    assert_eq!(sent.iter().filter(|(_, c, v)| *c == m && *v == 1).count(), 1);
                    assert_eq!(sent.iter().filter(|(_, c, v)| *c == m && *v == 0).count(), 1, "{m} not released once: {sent:?}");
                }
                // The router itself does not decide what is shown: rayosd does, then tells us.
                r.present(None, None);
                assert_eq!(r.key(down(A)), vec![Action::HomeKey(A)]);
            }
        }
    }

    #[test]
    fn no_stuck_modifier_after_switching_with_ctrl_held() {
        let mut r = Router::new(800, 600);
        r.present(Some("a".into()), Some(t()));
        run(&mut r, &[down(LCTRL), down(A)]);
        // Switched away (e.g. by `rayosctl present b`) while Ctrl and A are held.
        let out = r.present(Some("b".into()), Some(t()));
        let mut released: Vec<_> = keys_sent(&out);
        released.sort();
        assert_eq!(released, vec![("a".into(), LCTRL, 0), ("a".into(), A, 0)]);
        // Letting go afterwards tells neither VM: b never saw them go down.
        assert_eq!(keys_sent(&run(&mut r, &[up(A), up(LCTRL)])), vec![]);
        // And Ctrl is not considered held by the combo detector any more.
        assert_eq!(keys_sent(&r.key(down(KEY_HOME))), vec![("b".into(), KEY_HOME, 1)]);
    }

    #[test]
    fn host_autorepeat_is_dropped() {
        let mut r = Router::new(800, 600);
        r.present(Some("a".into()), Some(t()));
        assert_eq!(keys_sent(&r.key(down(A))), vec![("a".into(), A, 1)]);
        for _ in 0..3 {
            assert_eq!(r.key(KeyEvent { code: A, value: 2 }), vec![], "a host repeat was forwarded");
        }
        assert_eq!(keys_sent(&r.key(up(A))), vec![("a".into(), A, 0)]);
        // At home too: a held key does not scroll the home screen by itself.
        r.present(None, None);
        r.key(down(A));
        assert_eq!(r.key(KeyEvent { code: A, value: 2 }), vec![]);
    }

    #[test]
    fn ctrl_alt_del_goes_to_the_vm_or_reboots_at_home() {
        let mut r = Router::new(800, 600);
        assert_eq!(run(&mut r, &[down(LCTRL), down(LALT), down(KEY_DELETE)]).last(), Some(&Action::Reboot));
        run(&mut r, &[up(KEY_DELETE), up(LALT), up(LCTRL)]);
        r.present(Some("win".into()), Some(t()));
        let out = run(&mut r, &[down(LCTRL), down(LALT), down(KEY_DELETE)]);
        assert!(!out.contains(&Action::Reboot));
        assert_eq!(keys_sent(&out).last(), Some(&("win".into(), KEY_DELETE, 1)));
    }

    #[test]
    fn the_pointer_follows_the_letterbox_and_buttons_are_released_on_switch() {
        let mut r = Router::new(1920, 1080);
        r.present(Some("a".into()), Some(t()));
        // An absolute device at the picture's top-left corner, then a click.
        let out = r.pointer_report(&PointerReport { abs: Some((240, 0)), buttons: vec![(ev::BTN_LEFT, true)], ..Default::default() });
        let Action::Send { target: InputTarget::Tablet, records, .. } = &out[0] else { panic!("{out:?}") };
        assert_eq!(records, &vec![InputRecord::abs(ev::ABS_X, 25), InputRecord::abs(ev::ABS_Y, 34), InputRecord::key(ev::BTN_LEFT, true), InputRecord::syn()]);
        // A relative mouse moves the compositor's pointer from there, into the left bar: clamped.
        let out = r.pointer_report(&PointerReport { dx: -100, ..Default::default() });
        let Action::Send { records, .. } = &out[0] else { panic!() };
        assert_eq!(records[0], InputRecord::abs(ev::ABS_X, 25));
        assert_eq!(r.pointer(), (140, 0));
        let out = r.present(None, None);
        assert_eq!(keys_sent(&out), vec![("a".into(), ev::BTN_LEFT, 0)]);
    }

    #[test]
    fn unplugging_a_keyboard_with_keys_held_leaves_nothing_stuck() {
        let mut r = Router::new(800, 600);
        r.present(Some("a".into()), Some(t()));
        run(&mut r, &[down(LCTRL), down(LALT)]);
        let mut released = keys_sent(&r.device_gone());
        released.sort();
        assert_eq!(released, vec![("a".into(), LCTRL, 0), ("a".into(), LALT, 0)]);
        // Ctrl and Alt are no longer held: Home alone is just Home.
        assert_eq!(keys_sent(&r.key(down(KEY_HOME))), vec![("a".into(), KEY_HOME, 1)]);
    }
}
