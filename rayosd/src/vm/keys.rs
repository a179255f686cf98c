//! What `rayosctl vm key|type|pointer` send: key combos, text and pointer positions turned
//! into virtio-input reports (`rayos_proto::display::InputRecord`s, each report ending in
//! `SYN_REPORT`), without I/O so every rule is unit-tested.
//!
//! Key names are Linux key codes (linux/input-event-codes.h) under the short names QEMU's
//! `sendkey` made familiar (`ret`, `spc`, `ctrl`, `pgup`, …). Text goes through the system
//! keymap: "us" is a table here (which key, and whether Shift, makes each printable ASCII
//! character, `\n` and `\t`), any other layout is read from its kbd keymap file
//! ([`super::keymap`]). The tables are written here because no crate maps names to
//! evdev codes in both directions for a layout we choose (the `evdev` crate names codes but
//! has no layouts; xkb would pull in libxkbcommon, which RayOS does not ship).

use rayos_proto::display::{ev, InputRecord};

use super::keymap::{Keymap, Mods, Stroke};

/// The most keys one combo holds (ctrl+alt+shift+meta and a few more is plenty).
pub const MAX_COMBO: usize = 8;
/// The most characters one `TypeText` takes. A character is at most 4 reports of 2 records
/// (Shift down, key down, key up, Shift up), and the VMM keeps 4096 events for a guest that
/// has not read them yet: 512 characters always fit, even if the guest reads nothing until
/// the last one is sent.
pub const MAX_TEXT: usize = 512;
/// The events the VMM keeps for a guest that has not read them (its keyboard's
/// `MAX_PENDING`). A character typed with Shift and AltGr takes 6 reports of 2 records, so
/// text in a keymap is also held to this many records.
pub const MAX_TEXT_EVENTS: usize = 4096;
/// The text layout built in (the rest are read from their keymap files).
pub const US: &str = "us";

const KEY_LEFTCTRL: u16 = 29;
const KEY_LEFTSHIFT: u16 = 42;
/// AltGr on the PC layouts kbd's keymaps describe (`linux-with-alt-and-altgr`).
const KEY_RIGHTALT: u16 = 100;

/// Names and their key codes; the first name of a code is the one error messages list.
const NAMES: &[(&str, u16)] = &[
    ("esc", 1),
    ("escape", 1),
    ("1", 2),
    ("2", 3),
    ("3", 4),
    ("4", 5),
    ("5", 6),
    ("6", 7),
    ("7", 8),
    ("8", 9),
    ("9", 10),
    ("0", 11),
    ("minus", 12),
    ("-", 12),
    ("equal", 13),
    ("=", 13),
    ("backspace", 14),
    ("bs", 14),
    ("tab", 15),
    ("q", 16),
    ("w", 17),
    ("e", 18),
    ("r", 19),
    ("t", 20),
    ("y", 21),
    ("u", 22),
    ("i", 23),
    ("o", 24),
    ("p", 25),
    ("bracket_left", 26),
    ("leftbrace", 26),
    ("[", 26),
    ("bracket_right", 27),
    ("rightbrace", 27),
    ("]", 27),
    ("ret", 28),
    ("enter", 28),
    ("return", 28),
    ("ctrl", KEY_LEFTCTRL),
    ("control", KEY_LEFTCTRL),
    ("a", 30),
    ("s", 31),
    ("d", 32),
    ("f", 33),
    ("g", 34),
    ("h", 35),
    ("j", 36),
    ("k", 37),
    ("l", 38),
    ("semicolon", 39),
    (";", 39),
    ("apostrophe", 40),
    ("'", 40),
    ("grave_accent", 41),
    ("grave", 41),
    ("`", 41),
    ("shift", KEY_LEFTSHIFT),
    ("backslash", 43),
    ("\\", 43),
    ("z", 44),
    ("x", 45),
    ("c", 46),
    ("v", 47),
    ("b", 48),
    ("n", 49),
    ("m", 50),
    ("comma", 51),
    (",", 51),
    ("dot", 52),
    (".", 52),
    ("slash", 53),
    ("/", 53),
    ("shift_r", 54),
    ("rshift", 54),
    ("kp_multiply", 55),
    ("alt", 56),
    ("spc", 57),
    ("space", 57),
    ("caps_lock", 58),
    ("capslock", 58),
    ("f1", 59),
    ("f2", 60),
    ("f3", 61),
    ("f4", 62),
    ("f5", 63),
    ("f6", 64),
    ("f7", 65),
    ("f8", 66),
    ("f9", 67),
    ("f10", 68),
    ("num_lock", 69),
    ("numlock", 69),
    ("scroll_lock", 70),
    ("scrolllock", 70),
    ("kp_7", 71),
    ("kp_8", 72),
    ("kp_9", 73),
    ("kp_subtract", 74),
    ("kp_4", 75),
    ("kp_5", 76),
    ("kp_6", 77),
    ("kp_add", 78),
    ("kp_1", 79),
    ("kp_2", 80),
    ("kp_3", 81),
    ("kp_0", 82),
    ("kp_decimal", 83),
    ("less", 86),
    ("f11", 87),
    ("f12", 88),
    ("kp_enter", 96),
    ("ctrl_r", 97),
    ("rctrl", 97),
    ("kp_divide", 98),
    ("print", 99),
    ("sysrq", 99),
    ("alt_r", 100),
    ("ralt", 100),
    ("altgr", 100),
    ("home", 102),
    ("up", 103),
    ("pgup", 104),
    ("pageup", 104),
    ("left", 105),
    ("right", 106),
    ("end", 107),
    ("down", 108),
    ("pgdn", 109),
    ("pagedown", 109),
    ("ins", 110),
    ("insert", 110),
    ("del", 111),
    ("delete", 111),
    ("pause", 119),
    ("meta", 125),
    ("meta_l", 125),
    ("super", 125),
    ("win", 125),
    ("meta_r", 126),
    ("menu", 127),
    ("compose", 127),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("unknown key {0:?} (key names are like ctrl, alt, shift, meta, a, 1, f2, ret, esc, tab, spc, backspace, up, pgdn, del, minus, slash)")]
    UnknownKey(String),
    #[error("empty key combo {0:?} (give keys joined by +, e.g. ctrl+l)")]
    EmptyCombo(String),
    #[error("key combo {combo:?} names {key:?} twice")]
    Repeated { combo: String, key: String },
    #[error("key combo {0:?} has more than {MAX_COMBO} keys")]
    TooLong(String),
    #[error("text character {ch:?} at {at} has no key in the \"us\" layout (printable ASCII, newline and tab only)")]
    NoKeyForChar { ch: char, at: usize },
    #[error("text character {ch:?} at {at} has no key in the {keymap:?} keymap (only a dead key or compose makes it, or nothing does)")]
    NotInKeymap { ch: char, at: usize, keymap: String },
    #[error("text of {chars} characters takes {events} input events; at most {MAX_TEXT_EVENTS} at once (characters typed with AltGr take more)")]
    TooManyEvents { chars: usize, events: usize },
    #[error("text of {0} characters; at most {MAX_TEXT} at once")]
    TextTooLong(usize),
    #[error("no pointer position ({x}, {y}) on a {width}x{height} display (x is 0..{width}, y is 0..{height})")]
    OffScreen { x: u32, y: u32, width: u32, height: u32 },
    #[error("unknown mouse button {0:?} (left, right or middle)")]
    UnknownButton(String),
}

/// The key code a name stands for (case does not matter).
pub fn key_code(name: &str) -> Option<u16> {
    let lower = name.to_ascii_lowercase();
    NAMES.iter().find(|(n, _)| *n == lower).map(|&(_, code)| code)
}

/// Keys pressed together, in the order given: `ctrl+alt+f2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Combo {
    codes: Vec<u16>,
}

impl Combo {
    pub fn parse(combo: &str) -> Result<Combo, KeyError> {
        if combo.trim().is_empty() {
            return Err(KeyError::EmptyCombo(combo.into()));
        }
        let names: Vec<&str> = combo.split('+').map(str::trim).collect();
        if names.len() > MAX_COMBO {
            return Err(KeyError::TooLong(combo.into()));
        }
        let mut codes = Vec::with_capacity(names.len());
        for name in names {
            if name.is_empty() {
                return Err(KeyError::EmptyCombo(combo.into()));
            }
            let code = key_code(name).ok_or_else(|| KeyError::UnknownKey(name.into()))?;
            // A key pressed twice without a release in between is not a thing a keyboard does.
            if codes.contains(&code) {
                return Err(KeyError::Repeated { combo: combo.into(), key: name.into() });
            }
            codes.push(code);
        }
        Ok(Combo { codes })
    }

    pub fn codes(&self) -> &[u16] {
        &self.codes
    }

    /// Each key pressed in order, then released in reverse: one report per step.
    pub fn reports(&self) -> Vec<Vec<InputRecord>> {
        press_release(&self.codes)
    }
}

fn press_release(codes: &[u16]) -> Vec<Vec<InputRecord>> {
    let down = codes.iter().map(|&c| vec![InputRecord::key(c, true), InputRecord::syn()]);
    let up = codes.iter().rev().map(|&c| vec![InputRecord::key(c, false), InputRecord::syn()]);
    down.chain(up).collect()
}

/// The key and Shift state that type `ch` in the "us" layout.
pub fn us_key(ch: char) -> Option<(u16, bool)> {
    const SHIFTED_DIGITS: &str = ")!@#$%^&*(";
    let plain = |name: &str| key_code(name).map(|c| (c, false));
    let shifted = |name: &str| key_code(name).map(|c| (c, true));
    match ch {
        'a'..='z' | '0'..='9' => plain(ch.encode_utf8(&mut [0; 4])),
        'A'..='Z' => shifted(ch.to_ascii_lowercase().encode_utf8(&mut [0; 4])),
        ' ' => plain("spc"),
        '\n' => plain("ret"),
        '\t' => plain("tab"),
        '-' | '=' | '[' | ']' | ';' | '\'' | '`' | '\\' | ',' | '.' | '/' => plain(ch.encode_utf8(&mut [0; 4])),
        '_' => shifted("minus"),
        '+' => shifted("equal"),
        '{' => shifted("["),
        '}' => shifted("]"),
        ':' => shifted(";"),
        '"' => shifted("'"),
        '~' => shifted("`"),
        '|' => shifted("\\"),
        '<' => shifted(","),
        '>' => shifted("."),
        '?' => shifted("/"),
        _ => {
            let digit = SHIFTED_DIGITS.find(ch)?;
            shifted(&digit.to_string())
        }
    }
}

/// The reports that type `text` in the "us" layout: each character is its key pressed and
/// released, inside Shift when the layout needs it. Nothing is returned unless every
/// character has a key, so a refused text types nothing.
pub fn us_text_reports(text: &str) -> Result<Vec<Vec<InputRecord>>, KeyError> {
    let n = text.chars().count();
    if n > MAX_TEXT {
        return Err(KeyError::TextTooLong(n));
    }
    let mut out = Vec::new();
    for (at, ch) in text.chars().enumerate() {
        let (code, shift) = us_key(ch).ok_or(KeyError::NoKeyForChar { ch, at })?;
        let keys: &[u16] = if shift { &[KEY_LEFTSHIFT, code] } else { &[code] };
        out.extend(press_release(keys));
    }
    Ok(out)
}

/// The reports that type `text` in `keymap`: each character's key pressed and released
/// inside its modifiers (Shift, then AltGr, released in reverse). Nothing is returned unless
/// every character has a key, so a refused text types nothing.
pub fn keymap_text_reports(keymap: &Keymap, text: &str) -> Result<Vec<Vec<InputRecord>>, KeyError> {
    let n = text.chars().count();
    if n > MAX_TEXT {
        return Err(KeyError::TextTooLong(n));
    }
    let mut out = Vec::new();
    for (at, ch) in text.chars().enumerate() {
        let Stroke { code, mods } = keymap.stroke(ch).ok_or_else(|| KeyError::NotInKeymap { ch, at, keymap: keymap.name().into() })?;
        let keys: &[u16] = match mods {
            Mods::None => &[code],
            Mods::Shift => &[KEY_LEFTSHIFT, code],
            Mods::AltGr => &[KEY_RIGHTALT, code],
            Mods::ShiftAltGr => &[KEY_LEFTSHIFT, KEY_RIGHTALT, code],
        };
        out.extend(press_release(keys));
    }
    let events = out.iter().map(Vec::len).sum();
    if events > MAX_TEXT_EVENTS {
        return Err(KeyError::TooManyEvents { chars: n, events });
    }
    Ok(out)
}

/// A mouse button `--click` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Button {
    Left,
    Right,
    Middle,
}

impl Button {
    pub fn parse(name: &str) -> Result<Button, KeyError> {
        match name.to_ascii_lowercase().as_str() {
            "left" => Ok(Button::Left),
            "right" => Ok(Button::Right),
            "middle" => Ok(Button::Middle),
            _ => Err(KeyError::UnknownButton(name.into())),
        }
    }

    fn code(self) -> u16 {
        match self {
            Button::Left => ev::BTN_LEFT,
            Button::Right => ev::BTN_RIGHT,
            Button::Middle => ev::BTN_MIDDLE,
        }
    }
}

/// Pixel `x` of a `size`-pixel axis on the tablet's 0..=ABS_MAX. The middle of the pixel,
/// not its edge: guests scale back with `abs * size / (ABS_MAX + 1)` (libinput) or
/// `abs * size / ABS_MAX` (the kernel's mousedev), and the middle lands on the same pixel
/// under both.
pub fn tablet_axis(x: u32, size: u32) -> u32 {
    let span = u64::from(ev::ABS_MAX) + 1;
    let v = (2 * u64::from(x) + 1) * span / (2 * u64::from(size.max(1)));
    v.min(u64::from(ev::ABS_MAX)) as u32
}

/// The reports that move the tablet to pixel (`x`, `y`) of a `width`x`height` display and
/// then click each of `clicks` (press, release) there.
pub fn pointer_reports(x: u32, y: u32, (width, height): (u32, u32), clicks: &[Button]) -> Result<Vec<Vec<InputRecord>>, KeyError> {
    if x >= width || y >= height {
        return Err(KeyError::OffScreen { x, y, width, height });
    }
    let mut out = vec![vec![
        InputRecord::abs(ev::ABS_X, tablet_axis(x, width)),
        InputRecord::abs(ev::ABS_Y, tablet_axis(y, height)),
        InputRecord::syn(),
    ]];
    for b in clicks {
        out.push(vec![InputRecord::key(b.code(), true), InputRecord::syn()]);
        out.push(vec![InputRecord::key(b.code(), false), InputRecord::syn()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: u16, down: bool) -> Vec<InputRecord> {
        vec![InputRecord::key(code, down), InputRecord::syn()]
    }

    #[test]
    fn a_combo_presses_in_order_and_releases_in_reverse() {
        // ctrl 29, alt 56, f2 60.
        let r = Combo::parse("ctrl+alt+f2").unwrap().reports();
        assert_eq!(r, [key(29, true), key(56, true), key(60, true), key(60, false), key(56, false), key(29, false)]);
        assert_eq!(Combo::parse("ctrl+l").unwrap().codes(), [29, 38]);
        assert_eq!(Combo::parse("Shift+A").unwrap().codes(), [42, 30]);
        assert_eq!(Combo::parse("ret").unwrap().reports(), [key(28, true), key(28, false)]);
    }

    #[test]
    fn key_names_are_linux_key_codes() {
        let pairs = [
            ("esc", 1), ("1", 2), ("0", 11), ("backspace", 14), ("tab", 15), ("q", 16), ("enter", 28), ("a", 30),
            ("z", 44), ("m", 50), ("spc", 57), ("space", 57), ("f1", 59), ("f10", 68), ("f11", 87), ("f12", 88),
            ("home", 102), ("up", 103), ("pgup", 104), ("left", 105), ("right", 106), ("end", 107), ("down", 108),
            ("pgdn", 109), ("ins", 110), ("del", 111), ("meta", 125), ("alt", 56), ("shift", 42), ("ctrl", 29),
            ("minus", 12), ("slash", 53), ("dot", 52), ("comma", 51), ("backslash", 43), ("grave", 41),
        ];
        for (name, code) in pairs {
            assert_eq!(key_code(name), Some(code), "{name}");
        }
    }

    #[test]
    fn bad_combos_are_refused_by_name() {
        let e = Combo::parse("ctrl+hyper").unwrap_err();
        assert_eq!(e, KeyError::UnknownKey("hyper".into()));
        let msg = e.to_string();
        assert!(msg.contains("\"hyper\"") && msg.contains("ctrl") && msg.contains("f2"), "{msg}");
        assert_eq!(Combo::parse(""), Err(KeyError::EmptyCombo("".into())));
        assert_eq!(Combo::parse("ctrl+"), Err(KeyError::EmptyCombo("ctrl+".into())));
        assert_eq!(Combo::parse("ctrl+control"), Err(KeyError::Repeated { combo: "ctrl+control".into(), key: "control".into() }));
        assert_eq!(Combo::parse("a+b+c+d+e+f+g+h+i"), Err(KeyError::TooLong("a+b+c+d+e+f+g+h+i".into())));
    }

    #[test]
    fn us_text_is_typed_with_shift_where_the_layout_needs_it() {
        let r = us_text_reports("aB!\n").unwrap();
        let expect = [
            key(30, true), key(30, false),
            key(42, true), key(48, true), key(48, false), key(42, false),
            key(42, true), key(2, true), key(2, false), key(42, false),
            key(28, true), key(28, false),
        ];
        assert_eq!(r, expect);
        // Every printable ASCII character, newline and tab has a key; each report ends in SYN.
        let all: String = (' '..='~').chain(['\n', '\t']).collect();
        let r = us_text_reports(&all).unwrap();
        assert!(r.iter().all(|rep| rep.last() == Some(&InputRecord::syn()) && rep.len() == 2));
        for (ch, want) in [('~', (41, true)), ('`', (41, false)), ('"', (40, true)), ('(', (10, true)), (')', (11, true)), ('|', (43, true)), ('?', (53, true)), ('_', (12, true)), ('+', (13, true)), (' ', (57, false))] {
            assert_eq!(us_key(ch), Some(want), "{ch:?}");
        }
    }

    #[test]
    fn text_without_a_us_key_types_nothing_and_says_which_character() {
        assert_eq!(us_text_reports("ok é"), Err(KeyError::NoKeyForChar { ch: 'é', at: 3 }));
        assert_eq!(us_text_reports("\r"), Err(KeyError::NoKeyForChar { ch: '\r', at: 0 }));
        let long = "a".repeat(MAX_TEXT + 1);
        assert_eq!(us_text_reports(&long), Err(KeyError::TextTooLong(MAX_TEXT + 1)));
        assert_eq!(us_text_reports(&long[1..]).unwrap().len(), MAX_TEXT * 2);
    }

    #[test]
    fn keymap_text_holds_shift_and_altgr_around_the_key_and_refuses_what_it_cannot_type() {
        use crate::vm::keymap::{Keymap, KeymapError, Source};
        use std::path::{Path, PathBuf};
        struct One(&'static str);
        impl Source for One {
            fn keymap(&self, _: &str) -> Result<(PathBuf, String), KeymapError> {
                Ok(("/mem/xx".into(), self.0.into()))
            }
            fn include(&self, from: &Path, name: &str) -> Result<(PathBuf, String), KeymapError> {
                Err(KeymapError::Include { file: from.into(), include: name.into() })
            }
        }
        let k = Keymap::parse("xx", &One("keymaps 0-3\nkeycode 42 = Shift\nkeycode 100 = AltGr\nkeycode 16 = q Q at euro\n")).unwrap();
        let r = keymap_text_reports(&k, "qQ@€").unwrap();
        let expect = [
            key(16, true), key(16, false),
            key(42, true), key(16, true), key(16, false), key(42, false),
            key(100, true), key(16, true), key(16, false), key(100, false),
            key(42, true), key(100, true), key(16, true), key(16, false), key(100, false), key(42, false),
        ];
        assert_eq!(r, expect);
        let e = keymap_text_reports(&k, "q?").unwrap_err();
        assert_eq!(e, KeyError::NotInKeymap { ch: '?', at: 1, keymap: "xx".into() });
        assert!(e.to_string().starts_with("text character '?' at 1 has no key in the \"xx\" keymap"), "{e}");
        // 6 reports of 2 records a character: the VMM's queue holds 341 of them, not 512.
        assert_eq!(keymap_text_reports(&k, &"€".repeat(341)).unwrap().len(), 341 * 6);
        assert_eq!(keymap_text_reports(&k, &"€".repeat(342)), Err(KeyError::TooManyEvents { chars: 342, events: 342 * 12 }));
        assert_eq!(keymap_text_reports(&k, &"q".repeat(MAX_TEXT + 1)), Err(KeyError::TextTooLong(MAX_TEXT + 1)));
    }

    #[test]
    fn pointer_pixels_land_on_the_same_pixel_in_the_guest() {
        assert_eq!(tablet_axis(0, 1024), 16);
        assert_eq!(tablet_axis(1023, 1024), 32752);
        assert_eq!(tablet_axis(0, 1), 16384);
        for size in [640u32, 768, 800, 1024, 1080, 1920, 4095] {
            for x in [0, 1, size / 3, size / 2, size - 2, size - 1] {
                let abs = tablet_axis(x, size);
                assert!(abs <= ev::ABS_MAX);
                // libinput's scale and mousedev's both give the pixel back.
                assert_eq!(u64::from(abs) * u64::from(size) / 32768, u64::from(x), "libinput, {x} of {size}");
                assert_eq!(u64::from(abs) * u64::from(size) / 32767, u64::from(x), "mousedev, {x} of {size}");
            }
        }
    }

    #[test]
    fn a_click_moves_then_presses_and_releases_there() {
        let r = pointer_reports(512, 384, (1024, 768), &[Button::Left]).unwrap();
        assert_eq!(
            r,
            [
                vec![InputRecord::abs(ev::ABS_X, 16400), InputRecord::abs(ev::ABS_Y, 16405), InputRecord::syn()],
                key(ev::BTN_LEFT, true),
                key(ev::BTN_LEFT, false),
            ]
        );
        assert_eq!(pointer_reports(0, 0, (1024, 768), &[]).unwrap().len(), 1);
        let e = pointer_reports(1024, 0, (1024, 768), &[]).unwrap_err();
        assert_eq!(e.to_string(), "no pointer position (1024, 0) on a 1024x768 display (x is 0..1024, y is 0..768)");
        assert!(pointer_reports(0, 768, (1024, 768), &[]).is_err());
        assert_eq!(Button::parse("Right"), Ok(Button::Right));
        assert_eq!(Button::parse("back"), Err(KeyError::UnknownButton("back".into())));
    }
}
