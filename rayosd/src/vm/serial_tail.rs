//! The end of a VM's serial console log (`Logs(vm, lines)`), read in bounded memory and time.
//!
//! A guest can write to its serial port as fast as it likes, so the log can be large, and
//! PID 1 must not read it whole. The tail is read backwards from the end of the file, at most
//! [`MAX_LINE_BYTES`] per line asked for and [`MAX_TAIL_BYTES`] in all; a longer line keeps
//! its last [`MAX_LINE_BYTES`] bytes. When the VMM has rotated the log (`serial.log` →
//! `serial.log.1`) and the current file holds fewer lines than asked, the rest comes from the
//! end of `serial.log.1`, within the same budget.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The most of one line `Logs` returns (its end: the part written last).
pub const MAX_LINE_BYTES: usize = 1024;
/// The most one `Logs` call reads, whatever the number of lines asked for.
pub const MAX_TAIL_BYTES: usize = 4 << 20;
/// What a line cut to [`MAX_LINE_BYTES`] starts with.
pub const CUT_MARK: &str = "…";
const CHUNK: usize = 64 << 10;

/// The file the VMM rotates `serial_log` into.
pub fn rotated(serial_log: &Path) -> PathBuf {
    let mut p = serial_log.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// The last `lines` lines of the serial log at `path` (and of its rotated predecessor when
/// `path` holds fewer), joined by `\n`; NULs (console padding) are dropped, since D-Bus
/// strings cannot carry them. A missing or unreadable file reads as empty.
pub fn serial_tail(path: &Path, lines: usize) -> String {
    let mut budget = lines.saturating_mul(MAX_LINE_BYTES + 1).min(MAX_TAIL_BYTES);
    let mut out = match File::open(path) {
        Ok(mut f) => tail_of(&mut f, lines, &mut budget).unwrap_or_else(|e| {
            tracing::warn!("vm: reading {}: {e}", path.display());
            Tail::default()
        }),
        Err(_) => Tail { lines: Vec::new(), whole_file: true },
    };
    if out.whole_file && out.lines.len() < lines && budget > 0 {
        if let Ok(mut f) = File::open(rotated(path)) {
            if let Ok(mut older) = tail_of(&mut f, lines - out.lines.len(), &mut budget) {
                older.lines.append(&mut out.lines);
                out.lines = older.lines;
            }
        }
    }
    out.lines.join("\n")
}

#[derive(Default)]
struct Tail {
    lines: Vec<String>,
    /// The read reached the start of the file: an older file may hold more.
    whole_file: bool,
}

/// The last `want` lines of `f`, reading backwards at most `budget` bytes (what is read is
/// taken off it).
fn tail_of<F: Read + Seek>(f: &mut F, want: usize, budget: &mut usize) -> std::io::Result<Tail> {
    let end = f.seek(SeekFrom::End(0))?;
    // One buffer of the most this call may read, filled from its end backwards.
    let cap = (*budget as u64).min(end) as usize;
    let mut data = vec![0u8; cap];
    let (mut pos, mut filled, mut newlines) = (end, 0usize, 0usize);
    while pos > 0 && filled < cap && newlines < want {
        let n = CHUNK.min(cap - filled).min(pos as usize);
        pos -= n as u64;
        f.seek(SeekFrom::Start(pos))?;
        let at = cap - filled - n;
        f.read_exact(&mut data[at..at + n])?;
        newlines += data[at..at + n].iter().filter(|&&b| b == b'\n').count();
        // The file's own last newline ends the last line; it starts none.
        if filled == 0 && data[cap - 1] == b'\n' {
            newlines -= 1;
        }
        filled += n;
    }
    *budget -= filled;
    let mut bytes = &data[cap - filled..];
    if pos > 0 {
        // The first line is only partly read. When what was read of it is at least
        // MAX_LINE_BYTES, it is what a cut line shows anyway; otherwise drop it.
        let first = bytes.iter().position(|&b| b == b'\n').unwrap_or(bytes.len());
        if first < MAX_LINE_BYTES {
            bytes = &bytes[(first + 1).min(bytes.len())..];
        }
    }
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let skip = lines.len().saturating_sub(want);
    let lines = lines[skip..].iter().map(|l| render(l)).collect();
    Ok(Tail { lines, whole_file: pos == 0 })
}

fn render(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let cut = line.len() > MAX_LINE_BYTES;
    let line = &line[line.len().saturating_sub(MAX_LINE_BYTES)..];
    let text = String::from_utf8_lossy(line).replace('\0', "");
    if cut {
        format!("{CUT_MARK}{text}")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rayos-serial-tail-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A reader that counts the bytes it hands out.
    struct Counting<R> {
        inner: R,
        read: usize,
    }
    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n;
            Ok(n)
        }
    }
    impl<R: Seek> Seek for Counting<R> {
        fn seek(&mut self, p: SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(p)
        }
    }

    #[test]
    fn the_last_lines_without_nuls_and_a_missing_file_is_empty() {
        let d = dir("small");
        let log = d.join("serial.log");
        std::fs::write(&log, b"one\n\0\0login: \ntwo\r\nthree\n").unwrap();
        assert_eq!(serial_tail(&log, 3), "login: \ntwo\nthree");
        assert_eq!(serial_tail(&log, 100), "one\nlogin: \ntwo\nthree");
        std::fs::write(&log, b"no newline at the end").unwrap();
        assert_eq!(serial_tail(&log, 1), "no newline at the end");
        assert_eq!(serial_tail(&d.join("nothing.log"), 5), "");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// 64 MiB of a guest's garbage: the tail reads what it returns, not the file.
    #[test]
    fn a_large_log_is_read_from_its_end_within_the_budget() {
        let d = dir("large");
        let log = d.join("serial.log");
        let mut f = File::create(&log).unwrap();
        // Sparse, then lines of 100 bytes, then one 5000-byte line, then short lines.
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::End(0)).unwrap();
        for i in 0..2000 {
            writeln!(f, "{:0>99}", i).unwrap();
        }
        f.write_all(&[b'x'; 5000]).unwrap();
        f.write_all(b"\nlast-but-one\nlast\n").unwrap();
        drop(f);

        for want in [1, 3, 50, MAX_TAIL_BYTES] {
            let mut c = Counting { inner: File::open(&log).unwrap(), read: 0 };
            let mut budget = want.saturating_mul(MAX_LINE_BYTES + 1).min(MAX_TAIL_BYTES);
            let start = budget;
            let t = tail_of(&mut c, want, &mut budget).unwrap();
            assert!(c.read <= start && c.read == start - budget, "asked {want} lines: read {} bytes", c.read);
            assert!(t.lines.len() <= want);
        }
        let t = std::time::Instant::now();
        let text = serial_tail(&log, 3);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text:.200}");
        assert_eq!(lines[0], format!("{CUT_MARK}{}", "x".repeat(MAX_LINE_BYTES)), "a long line keeps its end");
        assert_eq!(&lines[1..], ["last-but-one", "last"]);
        let text = serial_tail(&log, 10_000);
        assert!(text.len() <= MAX_TAIL_BYTES, "{}", text.len());
        assert!(text.ends_with(&format!("{:0>99}\n{CUT_MARK}{}\nlast-but-one\nlast", 1999, "x".repeat(MAX_LINE_BYTES))));
        assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_rotated_log_gives_the_lines_the_current_one_lacks() {
        let d = dir("rotated");
        let log = d.join("serial.log");
        std::fs::write(rotated(&log), b"old-1\nold-2\nold-3\n").unwrap();
        std::fs::write(&log, b"new-1\nnew-2\n").unwrap();
        assert_eq!(serial_tail(&log, 2), "new-1\nnew-2");
        assert_eq!(serial_tail(&log, 4), "old-2\nold-3\nnew-1\nnew-2");
        assert_eq!(serial_tail(&log, 100), "old-1\nold-2\nold-3\nnew-1\nnew-2");
        std::fs::remove_file(&log).unwrap();
        assert_eq!(serial_tail(&log, 2), "old-2\nold-3", "just rotated: the current file is not there yet");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
