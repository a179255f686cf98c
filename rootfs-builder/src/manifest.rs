//! `initramfs/manifest.toml`: what goes into the RayOS initramfs and where it comes from.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::initramfs::{Initramfs, InitramfsError};
use crate::keymaps::{self, KeymapsError};

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("{manifest}: binary `{bin}` (package `{package}`) for {path} was not built at {built}")]
    MissingBinary { manifest: PathBuf, path: String, package: String, bin: String, built: PathBuf },
    #[error("{manifest}: host file {from} for {path} does not exist; install the Debian package that provides it")]
    MissingHostFile { manifest: PathBuf, path: String, from: PathBuf },
    #[error("{manifest}: {source}")]
    Initramfs { manifest: PathBuf, source: InitramfsError },
    #[error("{manifest}: [keymaps]: {source}")]
    Keymaps { manifest: PathBuf, source: KeymapsError },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// RayOS programs, built by cargo as static binaries.
    #[serde(default)]
    pub binary: Vec<Binary>,
    /// Programs from the build machine, copied with the shared libraries they need.
    #[serde(default)]
    pub host: Vec<HostFile>,
    /// Plain files from the build machine.
    #[serde(default)]
    pub file: Vec<HostFile>,
    #[serde(default)]
    pub symlink: Vec<Symlink>,
    #[serde(default)]
    pub dir: Vec<Dir>,
    /// The console keymaps the installer offers, with what they include.
    #[serde(default)]
    pub keymaps: Option<Keymaps>,
}

/// `installer::config::KEYMAPS` and the files they include, from console-data's tree at
/// `from`, uncompressed under `/usr/share/keymaps` (see `keymaps`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keymaps {
    pub from: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binary {
    pub path: String,
    pub package: String,
    pub bin: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFile {
    pub path: String,
    pub from: PathBuf,
    #[serde(default)]
    pub mode: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Symlink {
    pub path: String,
    pub target: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dir {
    pub path: String,
    #[serde(default = "default_dir_mode")]
    pub mode: u32,
}

fn default_dir_mode() -> u32 {
    0o755
}

impl Manifest {
    pub fn load(path: &Path) -> Result<(Manifest, PathBuf), ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError::Io(path.to_path_buf(), e))?;
        let m = toml::from_str(&text).map_err(|e| ManifestError::Parse(path.to_path_buf(), e))?;
        Ok((m, path.to_path_buf()))
    }

    /// The cargo packages whose binaries the manifest wants.
    pub fn packages(&self) -> BTreeSet<String> {
        self.binary.iter().map(|b| b.package.clone()).collect()
    }

    /// Every file the archive depends on (for staleness checks).
    pub fn inputs(&self, bin_dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.binary.iter().map(|b| bin_dir.join(&b.bin)).collect();
        v.extend(self.host.iter().map(|h| h.from.clone()));
        v.extend(self.file.iter().map(|h| h.from.clone()));
        // A keymap tree that does not resolve fails in `to_initramfs`, with the reason.
        if let Some(Ok(files)) = self.keymaps.as_ref().map(|k| keymaps::resolve(&k.from, installer::config::KEYMAPS)) {
            v.extend(files.into_iter().map(|f| f.source));
        }
        v
    }

    /// Lay the manifest out as an initramfs, taking RayOS binaries from `bin_dir`.
    pub fn to_initramfs(&self, manifest: &Path, bin_dir: &Path) -> Result<Initramfs, ManifestError> {
        let wrap = |source| ManifestError::Initramfs { manifest: manifest.to_path_buf(), source };
        let mut i = Initramfs::new();
        for d in &self.dir {
            i.dir(&d.path, d.mode).map_err(wrap)?;
        }
        for b in &self.binary {
            let built = bin_dir.join(&b.bin);
            if !built.is_file() {
                return Err(ManifestError::MissingBinary {
                    manifest: manifest.to_path_buf(),
                    path: b.path.clone(),
                    package: b.package.clone(),
                    bin: b.bin.clone(),
                    built,
                });
            }
            i.file(&b.path, &built, 0o755).map_err(wrap)?;
        }
        for h in &self.host {
            if !h.from.exists() {
                return Err(ManifestError::MissingHostFile {
                    manifest: manifest.to_path_buf(),
                    path: h.path.clone(),
                    from: h.from.clone(),
                });
            }
            i.host_binary(&h.path, &h.from).map_err(wrap)?;
        }
        for f in &self.file {
            if !f.from.exists() {
                return Err(ManifestError::MissingHostFile {
                    manifest: manifest.to_path_buf(),
                    path: f.path.clone(),
                    from: f.from.clone(),
                });
            }
            i.file(&f.path, &f.from, f.mode.unwrap_or(0o644)).map_err(wrap)?;
        }
        for s in &self.symlink {
            i.symlink(&s.path, &s.target).map_err(wrap)?;
        }
        if let Some(k) = &self.keymaps {
            let files = keymaps::resolve(&k.from, installer::config::KEYMAPS)
                .map_err(|source| ManifestError::Keymaps { manifest: manifest.to_path_buf(), source })?;
            for f in files {
                i.bytes(&f.dest, f.data, 0o644).map_err(wrap)?;
            }
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_manifest_parses_and_names_rayosd_as_init() {
        let (m, _) = Manifest::load(&crate::paths::initramfs_manifest()).unwrap();
        let init = m.binary.iter().find(|b| b.path == "/init").expect("/init entry");
        assert_eq!(init.bin, "rayosd");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("manifest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.toml");
        std::fs::write(&p, "[[binary]]\npath = \"/init\"\npackage = \"rayosd\"\nbinn = \"x\"\n").unwrap();
        let err = Manifest::load(&p).unwrap_err().to_string();
        assert!(err.contains("m.toml") && err.contains("binn"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_installer_gets_loadkeys_and_its_keymaps() {
        let (m, _) = Manifest::load(&crate::paths::initramfs_manifest()).unwrap();
        assert!(m.host.iter().any(|h| h.path == installer::keymap::LOADKEYS), "the installer runs {}", installer::keymap::LOADKEYS);
        assert_eq!(m.keymaps.as_ref().map(|k| k.from.as_path()), Some(Path::new("/usr/share/keymaps")));
    }

    #[test]
    fn a_keymap_tree_without_the_offered_layouts_is_named() {
        let m: Manifest = toml::from_str("[keymaps]\nfrom = \"/nonexistent/keymaps\"\n").unwrap();
        let err = m.to_initramfs(Path::new("manifest.toml"), Path::new("/nonexistent")).unwrap_err().to_string();
        assert!(err.starts_with("manifest.toml: [keymaps]: reading /nonexistent/keymaps/i386"), "{err}");
    }

    #[test]
    fn a_missing_binary_is_named() {
        let m: Manifest = toml::from_str("[[binary]]\npath = \"/init\"\npackage = \"rayosd\"\nbin = \"nope\"\n").unwrap();
        let err = m.to_initramfs(Path::new("manifest.toml"), Path::new("/nonexistent")).unwrap_err().to_string();
        assert!(err.contains("`nope`") && err.contains("/init"), "{err}");
    }
}
