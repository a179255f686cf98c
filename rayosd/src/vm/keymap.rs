//! The system keymap as text entry needs it: which key, with which of Shift and AltGr, types
//! each character in a kbd (console-data) keymap, the same files the guest's `loadkeys` loads
//! at first boot (`/usr/share/keymaps`, shipped in the initramfs by `rootfs-builder/src/keymaps.rs`).
//!
//! Written by hand because no crate reads kbd keymaps: the parser follows what kbd 2.5's
//! libkeymap does with a file (its grammar, `keymaps` columns, the one-symbol lines filled in
//! at the end, `alt_is_meta`, `charset` and how a symbol's name becomes Unicode in `loadkeys
//! -u`), for the four modifier states text entry uses. A unit test checks the result against
//! `loadkeys --mktable --unicode` for every layout the installer offers.
//!
//! [`Keymap::parse`] reads text from a [`Source`] and does no I/O itself; [`Dir`] is the
//! Source of a keymap directory.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Where console-data's keymaps are (the initramfs has them there, uncompressed).
pub const KEYMAP_DIR: &str = "/usr/share/keymaps";

/// The modifiers held around a key, plainest first: a character several ways is typed the
/// first way in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mods {
    None,
    Shift,
    AltGr,
    ShiftAltGr,
}

impl Mods {
    const ALL: [Mods; 4] = [Mods::None, Mods::Shift, Mods::AltGr, Mods::ShiftAltGr];

    /// The kernel keymap (the sum of the modifiers' weights: Shift 1, AltGr 2) this state reads.
    fn map(self) -> usize {
        self as usize
    }
}

/// One character's key and the modifiers held around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stroke {
    /// A Linux key code (linux/input-event-codes.h).
    pub code: u16,
    pub mods: Mods,
}

#[derive(Debug, thiserror::Error)]
pub enum KeymapError {
    #[error("keymap {name:?} is not in {dir}/i386")]
    NotFound { name: String, dir: PathBuf },
    #[error("{file}: include {include:?} not found next to it or in the include directories")]
    Include { file: PathBuf, include: String },
    #[error("{file}: includes are nested too deeply (a loop?)")]
    TooDeep { file: PathBuf },
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{file}:{line}: {why}")]
    Syntax { file: PathBuf, line: usize, why: String },
}

/// Where a keymap's files come from.
pub trait Source {
    /// The keymap called `name`: its path and text.
    fn keymap(&self, name: &str) -> Result<(PathBuf, String), KeymapError>;
    /// What `include "name"` in `from` names: its path and text.
    fn include(&self, from: &Path, name: &str) -> Result<(PathBuf, String), KeymapError>;
}

/// A keymap directory laid out as console-data's (`kbd_keymaps::KeymapDir`: found as
/// loadkeys finds them; files may be gzip'd, as a build host's are).
pub struct Dir(pub PathBuf);

impl Source for Dir {
    fn keymap(&self, name: &str) -> Result<(PathBuf, String), KeymapError> {
        let path = kbd_keymaps::KeymapDir(self.0.clone()).keymap(name).map_err(KeymapError::from)?;
        let text = read_text(&path)?;
        Ok((path, text))
    }

    fn include(&self, from: &Path, name: &str) -> Result<(PathBuf, String), KeymapError> {
        let path = kbd_keymaps::KeymapDir(self.0.clone())
            .include(from, name)
            .ok_or_else(|| KeymapError::Include { file: from.to_path_buf(), include: name.into() })?;
        let text = read_text(&path)?;
        Ok((path, text))
    }
}

impl From<kbd_keymaps::Error> for KeymapError {
    fn from(e: kbd_keymaps::Error) -> Self {
        match e {
            kbd_keymaps::Error::NotFound { name, dir } => KeymapError::NotFound { name, dir },
            kbd_keymaps::Error::Io(path, e) => KeymapError::Io(path, e),
        }
    }
}

/// A keymap file's text; bytes that are not UTF-8 (a few console-data comments are Latin-1)
/// become U+FFFD, which no symbol name contains.
fn read_text(path: &Path) -> Result<String, KeymapError> {
    // Bigger than any keymap by far: a hostile file must not fill PID 1's memory.
    const MAX: u64 = 1 << 20;
    let data = kbd_keymaps::read(path, MAX)?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

/// What a key does in one kernel keymap, as far as typing text cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// It types this character (Return is `\n`, Tab `\t`).
    Char(char),
    Shift,
    AltGr,
    /// Anything else: VoidSymbol, function keys, dead keys, Control_x, Meta_x, locks…
    Other,
}

/// The keymaps a line's columns fill (the kernel has 256, one per modifier combination).
const NR_MAPS: usize = 256;
/// Key codes the guest's keyboard has (the VMM announces 1–248).
const MAX_KEY: u16 = 248;
const KEY_LEFTSHIFT: u16 = 42;
const KEY_RIGHTALT: u16 = 100;

/// The layout text is typed in: system.toml's `keymap`, loaded once when rayosd starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SystemKeymap {
    /// "us", the table built in (`keys::us_key`).
    Us,
    Loaded(Arc<Keymap>),
    /// Its file could not be read or parsed: typing text is refused with this reason.
    Unusable { name: String, reason: String },
}

impl SystemKeymap {
    /// The keymap `name` from `dir`; a file that cannot be used is logged and kept as the
    /// reason typing is refused (rayosd runs on without it).
    pub fn load(name: &str, dir: &Path) -> SystemKeymap {
        if name == super::keys::US {
            return SystemKeymap::Us;
        }
        match Keymap::load(name, dir) {
            Ok(k) => SystemKeymap::Loaded(Arc::new(k)),
            Err(e) => {
                tracing::error!("vm: the system keymap {name:?} cannot be used to type text: {e}");
                SystemKeymap::Unusable { name: name.into(), reason: e.to_string() }
            }
        }
    }

    pub fn name(&self) -> &str {
        match self {
            SystemKeymap::Us => super::keys::US,
            SystemKeymap::Loaded(k) => k.name(),
            SystemKeymap::Unusable { name, .. } => name,
        }
    }
}

/// A kbd keymap's characters: for each, the plainest key and modifiers that type it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keymap {
    name: String,
    strokes: HashMap<char, Stroke>,
}

impl Keymap {
    /// Parses the keymap `name` and what it includes from `src`.
    pub fn parse(name: &str, src: &dyn Source) -> Result<Keymap, KeymapError> {
        let (path, text) = src.keymap(name)?;
        let mut p = Parser::default();
        p.file(src, &path, &text, 0)?;
        Ok(Keymap { name: name.into(), strokes: p.finish() })
    }

    /// Reads the keymap `name` from a directory laid out as console-data's.
    pub fn load(name: &str, dir: &Path) -> Result<Keymap, KeymapError> {
        Keymap::parse(name, &Dir(dir.to_path_buf()))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key and modifiers that type `ch`; None when no key does (without a dead key or
    /// compose, which text entry does not use).
    pub fn stroke(&self, ch: char) -> Option<Stroke> {
        self.strokes.get(&ch).copied()
    }
}

/// libkeymap's state while it reads a keymap, for the modifier states text entry uses.
struct Parser {
    /// Which of the kernel's keymaps exist (a `keymaps` line, or each column/modifier used).
    maps: BTreeSet<usize>,
    /// A `keymaps` line was seen: columns go to those maps, in order, and no other map may be used.
    explicit_maps: bool,
    /// `alt_is_meta`: a column a line leaves out does not clear what the key had.
    alt_is_meta: bool,
    /// What each key does in maps 0–3 (plain, Shift, AltGr, Shift+AltGr); absent is a hole.
    keys: [HashMap<u16, Action>; 4],
    /// Keys given by a line with one symbol: filled into every map at the end.
    constant: BTreeSet<u16>,
    /// `loadkeys -u` resolves names to Unicode; a `charset "iso-8859-1"` line toggles it off
    /// (libkeymap: Unicode's first 256 code points are Latin-1), leaving Latin-1 bytes.
    unicode: bool,
    charset: Charset,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            maps: BTreeSet::new(),
            explicit_maps: false,
            alt_is_meta: false,
            keys: Default::default(),
            constant: BTreeSet::new(),
            unicode: true,
            charset: Charset::Latin1,
        }
    }
}

impl Parser {
    fn file(&mut self, src: &dyn Source, path: &Path, text: &str, depth: usize) -> Result<(), KeymapError> {
        if depth > 10 {
            return Err(KeymapError::TooDeep { file: path.to_path_buf() });
        }
        let mut lines = text.lines().enumerate();
        while let Some((i, first)) = lines.next() {
            let mut line = first.to_string();
            // A logical line continues over lines that end in a backslash.
            while line.ends_with('\\') {
                line.pop();
                match lines.next() {
                    Some((_, next)) => line.push_str(next),
                    None => break,
                }
            }
            let err = |why: String| KeymapError::Syntax { file: path.to_path_buf(), line: i + 1, why };
            let word = line.split_whitespace().next().unwrap_or("");
            // Strings and compose definitions are not text entry's (and may quote # and !).
            if matches!(word, "string" | "strings" | "compose") {
                continue;
            }
            let line = line.split(['#', '!']).next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("include") {
                let name = quoted(rest).ok_or_else(|| err(format!("include needs a quoted name: {line:?}")))?;
                let (inc_path, inc_text) = src.include(path, name)?;
                self.file(src, &inc_path, &inc_text, depth + 1)?;
            } else if let Some(rest) = line.strip_prefix("charset") {
                let name = quoted(rest).ok_or_else(|| err(format!("charset needs a quoted name: {line:?}")))?;
                self.charset = Charset::named(name).ok_or_else(|| err(format!("unknown charset {name:?}")))?;
                if self.charset == Charset::Latin1 {
                    self.unicode = !self.unicode;
                }
            } else if let Some(rest) = line.strip_prefix("keymaps") {
                self.keymaps(rest).map_err(err)?;
            } else if line == "alt_is_meta" {
                self.alt_is_meta = true;
            } else if line.contains("keycode") {
                self.key_line(line).map_err(err)?;
            } else {
                return Err(err(format!("not a keymap line: {line:?}")));
            }
        }
        Ok(())
    }

    /// `keymaps 0-2,4-6,8`: the maps that exist; a line's columns fill them in this order.
    fn keymaps(&mut self, ranges: &str) -> Result<(), String> {
        for range in ranges.split(',') {
            let range = range.trim();
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            let n = |s: &str| number(s.trim()).filter(|&n| (n as usize) < NR_MAPS).ok_or_else(|| format!("bad keymaps range {range:?}"));
            let (lo, hi) = (n(lo)? as usize, n(hi)? as usize);
            self.maps.extend(lo..=hi);
        }
        self.explicit_maps = true;
        Ok(())
    }

    fn key_line(&mut self, line: &str) -> Result<(), String> {
        let (lhs, rhs) = line.split_once('=').ok_or_else(|| format!("no = in {line:?}"))?;
        let words: Vec<&str> = lhs.split_whitespace().collect();
        let [mods @ .., keycode, code] = &words[..] else {
            return Err(format!("not a keycode line: {line:?}"));
        };
        if !keycode.eq_ignore_ascii_case("keycode") {
            return Err(format!("not a keycode line: {line:?}"));
        }
        let key = number(code).filter(|&k| k < 512).ok_or_else(|| format!("bad key code {code:?}"))? as u16;
        let values = rhs.split_whitespace().map(|s| self.symbol(s)).collect::<Result<Vec<_>, _>>()?;
        if mods.is_empty() {
            return self.full_line(key, &values);
        }
        let [value] = values[..] else {
            return Err(format!("a line with modifiers takes one symbol: {line:?}"));
        };
        let mut map = 0;
        // kbd's modifier names are case-blind ("CtrlL" is ctrll).
        for m in mods {
            map |= match m.to_ascii_lowercase().as_str() {
                "plain" => 0,
                "shift" => 1,
                "altgr" => 2,
                "control" => 4,
                "alt" => 8,
                "shiftl" => 16,
                "shiftr" => 32,
                "ctrll" => 64,
                "ctrlr" => 128,
                "capsshift" => 256,
                other => return Err(format!("unknown modifier {other:?}")),
            };
        }
        self.add(map, key, Some(value))
    }

    /// `keycode N = a b c`: the columns fill the maps in order and the rest get holes; a line
    /// with one symbol clears the key everywhere and is filled into every map at the end.
    fn full_line(&mut self, key: u16, values: &[Action]) -> Result<(), String> {
        if values.len() == 1 {
            self.constant.insert(key);
            for map in &mut self.keys {
                map.remove(&key);
            }
        }
        if self.explicit_maps {
            let maps: Vec<usize> = self.maps.iter().copied().collect();
            if values.len() > maps.len() {
                return Err(format!("too many ({}) entries on one line", values.len()));
            }
            for (i, map) in maps.into_iter().enumerate() {
                if values.len() != 1 || i == 0 {
                    self.add(map, key, values.get(i).copied())?;
                }
            }
        } else {
            if values.len() > NR_MAPS {
                return Err(format!("too many ({}) entries on one line", values.len()));
            }
            for (map, value) in values.iter().enumerate() {
                self.add(map, key, Some(*value))?;
            }
        }
        Ok(())
    }

    /// Sets what `key` does in `map`; `None` is a hole (VoidSymbol), which under
    /// `alt_is_meta` leaves a key's earlier action in place.
    fn add(&mut self, map: usize, key: u16, value: Option<Action>) -> Result<(), String> {
        if !self.maps.contains(&map) {
            if self.explicit_maps {
                return Err(format!("adding map {map} violates explicit keymaps line"));
            }
            self.maps.insert(map);
        }
        let Some(slot) = self.keys.get_mut(map) else { return Ok(()) };
        if value.is_none() && self.alt_is_meta && slot.contains_key(&key) {
            return Ok(());
        }
        slot.insert(key, value.unwrap_or(Action::Other));
        Ok(())
    }

    /// A symbol on the right of `=`: a name, a number, `U+xxxx`, any of them after `+`
    /// (Caps-Lock-able, which text entry does not use).
    fn symbol(&self, s: &str) -> Result<Action, String> {
        let s = s.strip_prefix('+').unwrap_or(s);
        if let Some(hex) = s.strip_prefix("U+") {
            let u = u32::from_str_radix(hex, 16).map_err(|_| format!("bad Unicode symbol {s:?}"))?;
            return Ok(char::from_u32(u).map_or(Action::Other, typed));
        }
        if s.starts_with(|c: char| c.is_ascii_digit()) {
            let n = number(s).ok_or_else(|| format!("bad number {s:?}"))?;
            return Ok(self.numeric(n));
        }
        self.named(s).ok_or_else(|| format!("unknown keysym {s:?}"))
    }

    /// A kernel action code: below 0x100 a byte of the current charset, 0x0bXX the same
    /// byte Caps-Lock-able; every other type is not a character.
    fn numeric(&self, n: u32) -> Action {
        let byte = match n {
            0..=0xff => n as u8,
            0xb00..=0xbff => (n & 0xff) as u8,
            _ => return Action::Other,
        };
        if byte < 0x80 {
            return typed(char::from(byte));
        }
        let ch = if self.unicode { self.charset.decode(byte) } else { Some(char::from(byte)) };
        ch.map_or(Action::Other, typed)
    }

    /// A keysym name as `loadkeys -u` resolves it: ASCII and action names, then the current
    /// charset's letters, then every charset's.
    fn named(&self, s: &str) -> Option<Action> {
        if let Some(a) = action_name(s) {
            return Some(a);
        }
        if let Some(c) = ascii_name(s) {
            return Some(typed(c));
        }
        let ch = match self.charset {
            Charset::Greek => greek(s).or_else(|| latin(s)),
            Charset::Hebrew => hebrew(s).or_else(|| latin(s)),
            _ => latin(s).or_else(|| greek(s)).or_else(|| hebrew(s)),
        }?;
        if self.unicode {
            Some(typed(ch))
        } else {
            // An 8-bit map holds Latin-1 bytes; a name without one is the byte of the first
            // charset that has it (libkeymap's "assuming iso-8859-15 euro"), which the
            // Unicode console shows as that Latin-1 character, not the named one.
            let byte = [self.charset, Charset::Latin1, Charset::Latin9, Charset::Latin2, Charset::Latin3, Charset::Latin4]
                .into_iter()
                .find_map(|cs| (0xa0..=0xffu8).find(|&b| cs.decode(b) == Some(ch)))?;
            Some(typed(char::from(byte)))
        }
    }

    /// Fills the one-symbol keys into every map (an ASCII letter with its other case under
    /// Shift), then picks the plainest stroke for each character.
    fn finish(mut self) -> HashMap<char, Stroke> {
        let first = if self.explicit_maps { self.maps.first().copied().unwrap_or(0) } else { 0 };
        for key in std::mem::take(&mut self.constant) {
            let base = self.keys.get(first).and_then(|m| m.get(&key)).copied().unwrap_or(Action::Other);
            for map in 0..4 {
                if !self.maps.contains(&map) || (map > 0 && self.keys[map].contains_key(&key)) {
                    continue;
                }
                let value = match base {
                    Action::Char(c) if c.is_ascii_alphabetic() && map % 2 == 1 => Action::Char((c as u8 ^ 32) as char),
                    Action::Char(c) if c.is_ascii_alphabetic() => Action::Char(c),
                    _ if map == 0 => continue,
                    other => other,
                };
                self.keys[map].insert(key, value);
            }
        }
        let mut strokes = HashMap::new();
        for mods in Mods::ALL {
            if !self.reachable(mods) {
                continue;
            }
            let mut keys: Vec<(&u16, &Action)> = self.keys[mods.map()].iter().collect();
            keys.sort_by_key(|(code, _)| **code);
            for (&code, action) in keys {
                if let Action::Char(c) = *action {
                    if (1..=MAX_KEY).contains(&code) {
                        strokes.entry(c).or_insert(Stroke { code, mods });
                    }
                }
            }
        }
        strokes
    }

    /// Whether holding `mods` with KEY_LEFTSHIFT and KEY_RIGHTALT works in this keymap: each
    /// modifier key must be that modifier in the map it is pressed in and in the map it is
    /// released in (else the guest's state would stick).
    fn reachable(&self, mods: Mods) -> bool {
        let is = |map: usize, key: u16, want: Action| self.maps.contains(&map) && self.keys[map].get(&key) == Some(&want);
        match mods {
            Mods::None => self.maps.contains(&0),
            Mods::Shift => is(0, KEY_LEFTSHIFT, Action::Shift) && is(1, KEY_LEFTSHIFT, Action::Shift),
            Mods::AltGr => is(0, KEY_RIGHTALT, Action::AltGr) && is(2, KEY_RIGHTALT, Action::AltGr),
            // Shift down, AltGr down (read in the Shift map), key, AltGr up (the Shift+AltGr
            // map), Shift up (the Shift map).
            Mods::ShiftAltGr => {
                is(0, KEY_LEFTSHIFT, Action::Shift)
                    && is(1, KEY_RIGHTALT, Action::AltGr)
                    && is(3, KEY_RIGHTALT, Action::AltGr)
                    && is(1, KEY_LEFTSHIFT, Action::Shift)
                    && self.maps.contains(&3)
            }
        }
    }
}

/// The text in `"…"` after a keyword.
fn quoted(rest: &str) -> Option<&str> {
    rest.trim().strip_prefix('"')?.split('"').next()
}

/// A number as kbd writes them: decimal, octal with a leading 0, hexadecimal with 0x.
fn number(s: &str) -> Option<u32> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u32::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// What typing a character takes: control characters other than Tab are not text.
fn typed(c: char) -> Action {
    if c == '\t' || !c.is_control() {
        Action::Char(c)
    } else {
        Action::Other
    }
}

/// The charsets a `charset` line may name (kbd's list); the 8-bit codes in a keymap are
/// read in the last one named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Charset {
    Latin1,
    Latin2,
    Latin3,
    Latin4,
    Cyrillic,
    Greek,
    Hebrew,
    Turkish,
    Nordic,
    Latin9,
    /// kbd knows it (koi8-r, cp-1250, mazovia, …; no layout RayOS offers uses one) but its
    /// 8-bit codes are not decoded here: they count as no character, so such a character is
    /// refused rather than mistyped.
    Undecoded,
}

impl Charset {
    fn named(name: &str) -> Option<Charset> {
        Some(match name.to_ascii_lowercase().as_str() {
            "iso-8859-1" => Charset::Latin1,
            "iso-8859-2" => Charset::Latin2,
            "iso-8859-3" => Charset::Latin3,
            "iso-8859-4" => Charset::Latin4,
            "iso-8859-5" => Charset::Cyrillic,
            "iso-8859-7" => Charset::Greek,
            "iso-8859-8" => Charset::Hebrew,
            "iso-8859-9" => Charset::Turkish,
            "iso-8859-10" => Charset::Nordic,
            "iso-8859-15" => Charset::Latin9,
            "koi8-r" | "koi8-u" | "cp-1250" | "mazovia" | "tis-620" | "iso-10646-18" | "iso-ir-197" | "iso-ir-209" => Charset::Undecoded,
            _ => return None,
        })
    }

    /// The character an 8-bit code stands for (kbd names codes from 160 up in these).
    fn decode(self, byte: u8) -> Option<char> {
        let table = match self {
            Charset::Latin1 => return (byte >= 0xa0).then_some(char::from(byte)),
            Charset::Latin2 => &charsets::LATIN2,
            Charset::Latin3 => &charsets::LATIN3,
            Charset::Latin4 => &charsets::LATIN4,
            Charset::Cyrillic => &charsets::CYRILLIC,
            Charset::Greek => &charsets::GREEK,
            Charset::Hebrew => &charsets::HEBREW,
            Charset::Turkish => &charsets::TURKISH,
            Charset::Nordic => &charsets::NORDIC,
            Charset::Latin9 => &charsets::LATIN9,
            Charset::Undecoded => return None,
        };
        let u = *table.get(usize::from(byte.checked_sub(0xa0)?))?;
        (u != 0).then(|| char::from_u32(u32::from(u))).flatten()
    }
}

/// kbd's names of key actions that are not characters, and of the two modifiers text
/// entry holds. Return types a newline and Tab a tab.
fn action_name(s: &str) -> Option<Action> {
    const SHIFTS: &[&str] = &["Shift", "AltGr", "Control", "Alt", "ShiftL", "ShiftR", "CtrlL", "CtrlR", "CapsShift"];
    const OTHERS: &[&str] = &[
        "VoidSymbol", "nul", "BackSpace", "Linefeed", "Escape", "Delete", "Show_Registers", "Show_Memory", "Show_State",
        "Break", "Last_Console", "Caps_Lock", "Num_Lock", "Scroll_Lock", "Scroll_Forward", "Scroll_Backward", "Boot",
        "Caps_On", "Compose", "SAK", "Decr_Console", "Incr_Console", "KeyboardSignal", "Spawn_Console", "Bare_Num_Lock",
        "Find", "Insert", "Remove", "Select", "Prior", "Next", "Macro", "Help", "Do", "Pause", "Home", "End", "PageUp",
        "PageDown", "Backtab", "Down", "Left", "Right", "Up", "Shift_L", "Shift_R", "Control_L", "Control_R", "AltL",
        "Alt_L", "AltGr_L", "Uncaps_Shift", "SCtrl", "AltLLock", "AltRLock",
    ];
    let with_digits = |prefix: &str| s.strip_prefix(prefix).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    match s {
        "Shift" => Some(Action::Shift),
        "AltGr" | "AltR" | "Alt_R" | "AltGr_R" => Some(Action::AltGr),
        "Return" => Some(Action::Char('\n')),
        "Tab" | "Control_i" => Some(Action::Char('\t')),
        _ if OTHERS.contains(&s) || SHIFTS.contains(&s) => Some(Action::Other),
        _ if with_digits("F") || with_digits("Console_") => Some(Action::Other),
        _ if ["KP_", "dead_", "Ascii_", "Hex_", "Brl_", "Meta_", "Control_"].iter().any(|p| s.starts_with(p)) => Some(Action::Other),
        // Locks and sticky modifiers: Shift_Lock, AltGr_Lock, SShift, SAltGr, …
        _ if s.strip_suffix("_Lock").is_some_and(|m| SHIFTS.contains(&m)) => Some(Action::Other),
        _ if s.strip_prefix('S').is_some_and(|m| SHIFTS.contains(&m) || m == "Control") => Some(Action::Other),
        _ => None,
    }
}

/// kbd's names of the printable ASCII characters: X's (checked through `xkeysym`), except
/// that kbd spells the digits out (and takes X's digits as synonyms).
fn ascii_name(s: &str) -> Option<char> {
    const DIGITS: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    if let Some(d) = DIGITS.iter().position(|&d| d == s) {
        return Some(char::from(b'0' + d as u8));
    }
    let c = x_names().get(s).copied()?;
    c.is_ascii().then_some(c)
}

/// kbd's names of Latin letters and signs (its latin1–4, 8859-9, 8859-10 and 8859-15
/// tables) are X keysym names; the X names come from `xkeysym`, which maps keysyms to names
/// and characters but not names to keysyms, so the reverse map is built once here over the
/// X keysym ranges that hold them. kbd's own spellings and synonyms are added on top.
fn latin(s: &str) -> Option<char> {
    const KBD: &[(&str, char)] = &[
        ("euro", '€'),
        ("multiplication", '×'),
        ("pound", '£'),
        ("pilcrow", '¶'),
        ("Oslash", 'Ø'),
        ("Ooblique", 'Ø'),
        ("ETH", 'Ð'),
        ("THORN", 'Þ'),
        ("tilde", '~'),
        ("circumflex", '^'),
        ("Idotabove", 'İ'),
        ("dotlessi", 'ı'),
        ("no-break_space", '\u{a0}'),
        ("paragraph_sign", '§'),
        ("soft_hyphen", '\u{ad}'),
        ("rightanglequote", '»'),
    ];
    KBD.iter().find(|(n, _)| *n == s).map(|&(_, c)| c).or_else(|| x_names().get(s).copied())
}

fn x_names() -> &'static HashMap<&'static str, char> {
    static NAMES: OnceLock<HashMap<&'static str, char>> = OnceLock::new();
    NAMES.get_or_init(|| {
        // ASCII and Latin-1, Latin-2, Latin-3, Latin-4 and the Latin-9 additions.
        let ranges = [0x20..=0x7e, 0xa0..=0xff, 0x1a1..=0x1ff, 0x2a1..=0x2fe, 0x3a2..=0x3fe, 0x13bc..=0x13be];
        let mut names = HashMap::new();
        for raw in ranges.into_iter().flatten() {
            let sym = xkeysym::Keysym::new(raw);
            if let (Some(name), Some(c)) = (sym.name(), sym.key_char()) {
                names.insert(name.strip_prefix("XK_").unwrap_or(name), c);
            }
        }
        names
    })
}

/// kbd's names in its iso-8859-7 table (not X's `Greek_…`), with the synonyms it takes.
fn greek(s: &str) -> Option<char> {
    const UPPER: [&str; 25] = [
        "Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota", "Kappa", "Lamda", "Mu", "Nu", "Ksi",
        "Omicron", "Pi", "Rho", "", "Sigma", "Tau", "Upsilon", "Phi", "Khi", "Psi", "Omega",
    ];
    const OTHER: &[(&str, char)] = &[
        ("Lambda", 'Λ'),
        ("Xi", 'Ξ'),
        ("Chi", 'Χ'),
        ("lambda", 'λ'),
        ("xi", 'ξ'),
        ("chi", 'χ'),
        ("terminalsigma", 'ς'),
        ("alphaaccent", 'ά'),
        ("epsilonaccent", 'έ'),
        ("etaaccent", 'ή'),
        ("iotaaccent", 'ί'),
        ("omicronaccent", 'ό'),
        ("upsilonaccent", 'ύ'),
        ("omegaaccent", 'ώ'),
        ("Alphaaccent", 'Ά'),
        ("Epsilonaccent", 'Έ'),
        ("Etaaccent", 'Ή'),
        ("Iotaaccent", 'Ί'),
        ("Omicronaccent", 'Ό'),
        ("Upsilonaccent", 'Ύ'),
        ("Omegaaccent", 'Ώ'),
        ("iotadiaeresis", 'ϊ'),
        ("upsilondieresis", 'ϋ'),
    ];
    if let Some(i) = UPPER.iter().position(|&n| !n.is_empty() && n == s) {
        return char::from_u32(0x391 + i as u32);
    }
    // The small letters are the capitals' names in lower case (kbd's "lamda", "ksi", "khi").
    if let Some(i) = UPPER.iter().position(|&n| !n.is_empty() && n.to_ascii_lowercase() == s) {
        return char::from_u32(0x3b1 + i as u32);
    }
    OTHER.iter().find(|(n, _)| *n == s).map(|&(_, c)| c)
}

/// kbd's names in its iso-8859-8 table: the Hebrew letters in alphabetical (Unicode) order.
fn hebrew(s: &str) -> Option<char> {
    const LETTERS: [&str; 27] = [
        "alef", "bet", "gimel", "dalet", "he", "vav", "zayin", "het", "tet", "yod", "finalkaf", "kaf", "lamed", "finalmem",
        "mem", "finalnun", "nun", "samekh", "ayin", "finalpe", "pe", "finaltsadi", "tsadi", "qof", "resh", "shin", "tav",
    ];
    LETTERS.iter().position(|&n| n == s).and_then(|i| char::from_u32(0x5d0 + i as u32))
}

mod charsets;

#[cfg(test)]
mod tests;
