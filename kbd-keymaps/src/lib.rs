//! kbd (console-data) keymap files: where a layout's file is and where the files it includes
//! are, as kbd 2.5's libkeymap finds them, and their text (gunzipped when they end in `.gz`).
//! Shared by the build, which ships the files the installer offers into the initramfs
//! (`rootfs-builder/src/keymaps.rs`), and rayosd, which reads the system keymap to type text
//! (`rayosd/src/vm/keymap.rs`): both must find the same files loadkeys would.
//!
//! Written here because no crate reads kbd's keymap tree.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("keymap {name:?} is not in {dir}/i386")]
    NotFound { name: String, dir: PathBuf },
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// A keymap directory laid out as console-data's `/usr/share/keymaps`: layouts under
/// `i386/<family>/NAME.kmap`, include files beside them and in `include` directories; files
/// plain or gzip'd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeymapDir(pub PathBuf);

impl KeymapDir {
    /// The layout `name`'s file (`NAME.kmap` or `NAME.kmap.gz` in one of `i386`'s families,
    /// whose names are unique there). A name is a file name, not a path: one that could
    /// reach outside the directory is not found.
    pub fn keymap(&self, name: &str) -> Result<PathBuf, Error> {
        let not_found = || Error::NotFound { name: name.into(), dir: self.0.clone() };
        if name.is_empty() || name.contains('/') || name == ".." {
            return Err(not_found());
        }
        let i386 = self.0.join("i386");
        let families = std::fs::read_dir(&i386).map_err(|e| Error::Io(i386.clone(), e))?;
        let mut families: Vec<PathBuf> = families.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect();
        families.sort();
        for family in families {
            for suffix in [".kmap", ".kmap.gz"] {
                let p = family.join(format!("{name}{suffix}"));
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(not_found())
    }

    /// The file `include "name"` in `from` (a file of this directory) names: next to it, in
    /// `../include` and `../../include`, then the standard include directories; as named or
    /// with `.inc`, plain or gzip'd (libkeymap's `find_incl_file`). None when there is none,
    /// or the name leads outside the directory.
    pub fn include(&self, from: &Path, name: &str) -> Option<PathBuf> {
        let rel = from.strip_prefix(&self.0).ok()?;
        let dir = rel.parent().unwrap_or(Path::new(""));
        let dirs = [
            dir.to_path_buf(),
            dir.join("../include"),
            dir.join("../../include"),
            PathBuf::from("include"),
            PathBuf::from("i386/include"),
            PathBuf::from("mac/include"),
        ];
        for d in dirs {
            let Some(d) = normalise(&d.join(name)) else { continue };
            for suffix in ["", ".inc"] {
                for z in ["", ".gz"] {
                    let mut p = self.0.join(&d).into_os_string();
                    p.push(format!("{suffix}{z}"));
                    let p = PathBuf::from(p);
                    if p.is_file() {
                        return Some(p);
                    }
                }
            }
        }
        None
    }
}

/// `a/b/../c` as `a/c`; None when it leaves the keymap directory.
fn normalise(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// A keymap file's bytes, gunzipped when it ends in `.gz`; more than `max` bytes is an error
/// (rayosd, PID 1, reads them: a hostile file must not fill its memory).
pub fn read(path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    let f = std::fs::File::open(path).map_err(|e| Error::Io(path.to_path_buf(), e))?;
    let mut data = Vec::new();
    let read = if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(f).take(max + 1).read_to_end(&mut data)
    } else {
        f.take(max + 1).read_to_end(&mut data)
    };
    read.map_err(|e| Error::Io(path.to_path_buf(), e))?;
    if data.len() as u64 > max {
        return Err(Error::Io(path.to_path_buf(), std::io::Error::other(format!("larger than {max} bytes"))));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(path: &Path, text: &str, gzip: bool) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = std::fs::File::create(path).unwrap();
        if gzip {
            let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::default());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap();
        } else {
            (&f).write_all(text.as_bytes()).unwrap();
        }
    }

    #[test]
    fn layouts_and_includes_are_found_where_loadkeys_looks() {
        let t = tempfile::tempdir().unwrap();
        let d = KeymapDir(t.path().to_path_buf());
        file(&t.path().join("i386/qwertz/de.kmap.gz"), "include \"qwertz-layout\"\n", true);
        file(&t.path().join("i386/include/qwertz-layout.inc.gz"), "keycode 21 = z\n", true);
        file(&t.path().join("i386/qwertz/beside"), "", false);
        file(&t.path().join("include/compose.latin1"), "", false);
        let de = d.keymap("de").unwrap();
        assert_eq!(de, t.path().join("i386/qwertz/de.kmap.gz"));
        assert_eq!(read(&de, 1 << 20).unwrap(), b"include \"qwertz-layout\"\n");
        assert_eq!(d.include(&de, "qwertz-layout"), Some(t.path().join("i386/include/qwertz-layout.inc.gz")));
        assert_eq!(d.include(&de, "beside"), Some(t.path().join("i386/qwertz/beside")));
        assert_eq!(d.include(&de, "compose.latin1"), Some(t.path().join("include/compose.latin1")));
        assert_eq!(d.include(&de, "nowhere"), None);
        // Out of the directory: never, by name or by include.
        assert!(matches!(d.keymap("../de"), Err(Error::NotFound { .. })));
        assert!(matches!(d.keymap("fr"), Err(Error::NotFound { .. })));
        assert_eq!(d.include(&de, "../../../../etc/passwd"), None);
        assert!(read(&de, 4).unwrap_err().to_string().contains("larger than 4 bytes"));
        assert_eq!(normalise(Path::new("i386/qwertz/../include")), Some(PathBuf::from("i386/include")));
        assert_eq!(normalise(Path::new("i386/../../etc")), None);
    }
}
