//! Bytes typed on a terminal (the kernel VT or a serial line, both in raw mode) to wizard keys.
//!
//! The wizard reads several terminals at once, so it cannot use crossterm's event reader (one
//! terminal per process); this decodes what the Linux VT and common serial terminals send.

use super::state::Key;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Key(Key),
    /// Ctrl-L: draw the whole screen again.
    Redraw,
}

/// Collects bytes until they form whole keys.
#[derive(Debug, Default)]
pub struct KeyDecoder {
    buf: Vec<u8>,
}

enum Step {
    /// `n` bytes make this input (or nothing, for sequences the wizard has no use for).
    Done(usize, Option<Input>),
    /// The bytes so far may be the start of a longer sequence.
    Incomplete,
}

impl KeyDecoder {
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// True while bytes wait for the rest of a sequence (a lone ESC may be the Esc key or the
    /// start of an arrow key: the caller waits a moment, then calls `drain(true)`).
    pub fn pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The whole keys in the buffer. With `at_rest` (nothing more came for a moment), an
    /// unfinished sequence is taken as it stands: a lone ESC is the Esc key.
    pub fn drain(&mut self, at_rest: bool) -> Vec<Input> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.buf.len() {
            match decode(&self.buf[i..]) {
                Step::Done(n, input) => {
                    out.extend(input);
                    i += n;
                }
                Step::Incomplete if at_rest => {
                    if self.buf[i] == 0x1b {
                        out.push(Input::Key(Key::Esc));
                    }
                    // Anything else unfinished (half a UTF-8 character, a cut-off CSI) is noise.
                    i = self.buf.len();
                }
                Step::Incomplete => break,
            }
        }
        self.buf.drain(..i);
        out
    }
}

fn decode(b: &[u8]) -> Step {
    let key = |n, k| Step::Done(n, Some(Input::Key(k)));
    match b[0] {
        0x1b => match b.get(1) {
            None => Step::Incomplete,
            Some(b'[') => csi(b),
            // SS3 arrows (terminals in application cursor mode).
            Some(b'O') => match b.get(2) {
                None => Step::Incomplete,
                Some(c) => match arrow(*c) {
                    Some(k) => key(3, k),
                    None => Step::Done(3, None),
                },
            },
            // ESC then something else: the Esc key, and the next byte is read on its own.
            Some(_) => key(1, Key::Esc),
        },
        b'\r' => key(if b.get(1) == Some(&b'\n') { 2 } else { 1 }, Key::Enter),
        b'\n' => key(1, Key::Enter),
        0x7f | 0x08 => key(1, Key::Backspace),
        b'\t' => key(1, Key::Tab),
        0x0c => Step::Done(1, Some(Input::Redraw)),
        c if c < 0x20 => Step::Done(1, None),
        c if c < 0x80 => key(1, Key::Char(c as char)),
        c => {
            let len = match c {
                0xc0..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf7 => 4,
                _ => return Step::Done(1, None),
            };
            if b.len() < len {
                return Step::Incomplete;
            }
            match std::str::from_utf8(&b[..len]).ok().and_then(|s| s.chars().next()) {
                Some(ch) => key(len, Key::Char(ch)),
                None => Step::Done(1, None),
            }
        }
    }
}

fn arrow(c: u8) -> Option<Key> {
    Some(match c {
        b'A' => Key::Up,
        b'B' => Key::Down,
        b'C' => Key::Right,
        b'D' => Key::Left,
        _ => return None,
    })
}

/// `ESC [` parameters, then one final byte in `@`..=`~`. The Linux VT's F1-F5 are `ESC [ [ A`..`E`.
fn csi(b: &[u8]) -> Step {
    if b.get(2) == Some(&b'[') {
        return if b.len() > 3 { Step::Done(4, None) } else { Step::Incomplete };
    }
    for (i, &c) in b.iter().enumerate().skip(2) {
        if (0x40..=0x7e).contains(&c) {
            let k = match c {
                b'Z' => Some(Key::BackTab),
                c => arrow(c),
            };
            return Step::Done(i + 1, k.map(Input::Key));
        }
        if !(0x20..=0x3f).contains(&c) {
            // Not a CSI after all: drop the ESC [ and read on from here.
            return Step::Done(i, None);
        }
    }
    Step::Incomplete
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(bytes: &[u8], at_rest: bool) -> Vec<Input> {
        let mut d = KeyDecoder::default();
        d.feed(bytes);
        d.drain(at_rest)
    }

    fn k(k: Key) -> Input {
        Input::Key(k)
    }

    #[test]
    fn vt_and_serial_keys() {
        assert_eq!(
            keys(b"\x1b[A\x1b[B\x1b[C\x1b[D\x1bOA\x1b[Z\t", false),
            [k(Key::Up), k(Key::Down), k(Key::Right), k(Key::Left), k(Key::Up), k(Key::BackTab), k(Key::Tab)]
        );
        assert_eq!(keys(b"ab\r", false), [k(Key::Char('a')), k(Key::Char('b')), k(Key::Enter)]);
        // CR LF from a terminal that sends both is one Enter.
        assert_eq!(keys(b"\r\n\x7f\x08", false), [k(Key::Enter), k(Key::Backspace), k(Key::Backspace)]);
        assert_eq!(keys("é".as_bytes(), false), [k(Key::Char('é'))]);
        // Delete, F1 on the VT, F5 elsewhere: nothing the wizard uses, and nothing left behind.
        assert_eq!(keys(b"\x1b[3~\x1b[[A\x1b[15~x", false), [k(Key::Char('x'))]);
        assert_eq!(keys(b"\x0c\x01", false), [Input::Redraw]);
    }

    #[test]
    fn a_lone_escape_waits_for_a_moment_of_rest() {
        let mut d = KeyDecoder::default();
        d.feed(b"\x1b");
        assert_eq!(d.drain(false), []);
        assert!(d.pending());
        d.feed(b"[");
        assert_eq!(d.drain(false), []);
        d.feed(b"A");
        assert_eq!(d.drain(false), [k(Key::Up)]);
        assert!(!d.pending());
        d.feed(b"\x1b");
        assert_eq!(d.drain(true), [k(Key::Esc)]);
        assert!(!d.pending());
        // ESC then a letter (Alt+x on some terminals): Esc, then the letter.
        assert_eq!(keys(b"\x1bx", false), [k(Key::Esc), k(Key::Char('x'))]);
        // Half a UTF-8 character waits, and is dropped once at rest.
        let mut d = KeyDecoder::default();
        d.feed(&"é".as_bytes()[..1]);
        assert_eq!(d.drain(false), []);
        assert_eq!(d.drain(true), []);
        assert!(!d.pending());
    }
}
