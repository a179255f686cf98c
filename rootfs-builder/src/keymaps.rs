//! Console keymaps for the initramfs: the installer loads the layout the user picks onto the
//! screen's VT with kbd's `loadkeys` (`installer::keymap`). Only the layouts it offers
//! (`installer::config::KEYMAPS`) are shipped, with the files they include, taken from the
//! build host's console-data (`/usr/share/keymaps`, the same files the guest loads).
//!
//! They are shipped uncompressed at the paths they have on Debian: loadkeys decompresses `.gz`
//! through `popen("gzip -d -c")`, and the initramfs has neither gzip nor a shell (the archive is
//! zstd-compressed as a whole, so nothing is lost).

use std::path::{Path, PathBuf};

use kbd_keymaps::KeymapDir;
use thiserror::Error;

/// Where loadkeys looks for keymaps (its `/usr/share/keymaps/**`).
pub const KEYMAP_DIR: &str = "/usr/share/keymaps";

#[derive(Debug, Error)]
pub enum KeymapsError {
    #[error("keymap {name:?} (installer::config::KEYMAPS) is not in {root}/i386; install console-data")]
    NotFound { name: String, root: PathBuf },
    #[error("{file}: include {include:?} not found next to it or in {root}'s include directories")]
    Include { file: PathBuf, include: String, root: PathBuf },
    #[error("{file}: includes are nested too deeply (a loop?)")]
    TooDeep { file: PathBuf },
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// One file for the initramfs: where it goes, where it comes from, its uncompressed text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeymapFile {
    pub dest: String,
    pub source: PathBuf,
    pub data: Vec<u8>,
}

/// The keymaps `names` and every file they include, under `root` (console-data's
/// `/usr/share/keymaps`). Each file once, in a stable order.
pub fn resolve(root: &Path, names: &[&str]) -> Result<Vec<KeymapFile>, KeymapsError> {
    let dir = KeymapDir(root.to_path_buf());
    let mut out: Vec<KeymapFile> = Vec::new();
    for name in names {
        let path = dir.keymap(name).map_err(|e| match e {
            kbd_keymaps::Error::NotFound { .. } => KeymapsError::NotFound { name: name.to_string(), root: root.to_path_buf() },
            kbd_keymaps::Error::Io(p, e) => KeymapsError::Io(p, e),
        })?;
        add(&dir, &path, &mut out, 0)?;
    }
    Ok(out)
}

fn add(dir: &KeymapDir, source: &Path, out: &mut Vec<KeymapFile>, depth: usize) -> Result<(), KeymapsError> {
    if depth > 10 {
        return Err(KeymapsError::TooDeep { file: source.to_path_buf() });
    }
    let rel = source.strip_prefix(&dir.0).expect("kbd_keymaps finds files under its directory");
    let dest = format!("{KEYMAP_DIR}/{}", rel.to_string_lossy().trim_end_matches(".gz"));
    if out.iter().any(|f| f.dest == dest) {
        return Ok(());
    }
    // console-data's largest keymap is a few KiB; this only bounds a broken tree.
    let data = kbd_keymaps::read(source, 16 << 20).map_err(|e| match e {
        kbd_keymaps::Error::Io(p, e) => KeymapsError::Io(p, e),
        e => KeymapsError::Io(source.to_path_buf(), std::io::Error::other(e.to_string())),
    })?;
    let includes = includes(&data);
    out.push(KeymapFile { dest, source: source.to_path_buf(), data });
    for inc in includes {
        let found = dir
            .include(source, &inc)
            .ok_or_else(|| KeymapsError::Include { file: source.to_path_buf(), include: inc.clone(), root: dir.0.clone() })?;
        add(dir, &found, out, depth + 1)?;
    }
    Ok(())
}

/// The names in a keymap's `include "NAME"` lines.
fn includes(text: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("include"))
        .filter_map(|rest| rest.trim().strip_prefix('"')?.split('"').next().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut e = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap();
    }

    /// The shape of console-data's tree: layouts by family, includes beside them.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        gz(&r.join("i386/qwertz/de.kmap.gz"), "keymaps 0-2\ninclude \"qwertz-layout\"\n  include \"linux-with-alt-and-altgr\"\ninclude \"euro.inc\"\nkeycode 21 = z\n");
        gz(&r.join("i386/qwertz/de-latin1.kmap.gz"), "include \"qwertz-layout\"\n");
        gz(&r.join("i386/qwertz/de-latin1-nodeadkeys.kmap.gz"), "include \"de-latin1.kmap\"\n");
        gz(&r.join("i386/qwerty/us.kmap.gz"), "include \"qwerty-layout\"\n");
        gz(&r.join("i386/include/qwertz-layout.inc.gz"), "keycode 44 = y\n");
        gz(&r.join("i386/include/qwerty-layout.inc.gz"), "keycode 44 = z\n");
        gz(&r.join("i386/include/linux-with-alt-and-altgr.inc.gz"), "include \"linux-keys-bare\"\n");
        gz(&r.join("i386/include/linux-keys-bare.inc.gz"), "keycode 1 = Escape\n");
        gz(&r.join("i386/include/euro.inc.gz"), "altgr keycode 18 = euro\n");
        gz(&r.join("i386/include/unused.inc.gz"), "\n");
        gz(&r.join("mac/all/mac-de.kmap.gz"), "\n");
        // console-data has a top-level include directory too; a file's own family's comes first.
        gz(&r.join("include/qwertz-layout.inc.gz"), "keycode 44 = not this one\n");
        t
    }

    fn dests(files: &[KeymapFile]) -> Vec<&str> {
        files.iter().map(|f| f.dest.as_str()).collect()
    }

    #[test]
    fn the_offered_layouts_and_their_includes_are_shipped_uncompressed_and_nothing_else() {
        let t = tree();
        let files = resolve(t.path(), &["de", "de-latin1-nodeadkeys"]).unwrap();
        assert_eq!(
            dests(&files),
            [
                "/usr/share/keymaps/i386/qwertz/de.kmap",
                "/usr/share/keymaps/i386/include/qwertz-layout.inc",
                "/usr/share/keymaps/i386/include/linux-with-alt-and-altgr.inc",
                "/usr/share/keymaps/i386/include/linux-keys-bare.inc",
                "/usr/share/keymaps/i386/include/euro.inc",
                "/usr/share/keymaps/i386/qwertz/de-latin1-nodeadkeys.kmap",
                "/usr/share/keymaps/i386/qwertz/de-latin1.kmap",
            ]
        );
        assert!(files[0].data.ends_with(b"keycode 21 = z\n"), "decompressed");
        assert_eq!(files[3].data, b"keycode 1 = Escape\n");
        assert!(files[0].source.ends_with("i386/qwertz/de.kmap.gz"));
    }

    #[test]
    fn a_missing_layout_or_include_is_named() {
        let t = tree();
        let e = resolve(t.path(), &["us", "cz"]).unwrap_err().to_string();
        assert!(e.starts_with("keymap \"cz\" (installer::config::KEYMAPS) is not in "), "{e}");
        gz(&t.path().join("i386/qwerty/uk.kmap.gz"), "include \"no-such-thing\"\n");
        let e = resolve(t.path(), &["uk"]).unwrap_err().to_string();
        assert!(e.contains("uk.kmap.gz: include \"no-such-thing\" not found"), "{e}");
        gz(&t.path().join("i386/qwerty/loop.kmap.gz"), "include \"loop.kmap\"\n");
        assert!(resolve(t.path(), &["loop"]).is_ok(), "a file includes itself once");
    }

    #[test]
    fn includes_are_read_as_loadkeys_reads_them() {
        assert_eq!(includes(b"# include \"not\"\n\tinclude \"a\"\ninclude\"b.inc\" # x\nkeycode 1 = include\n"), ["a", "b.inc"]);
    }
}
