//! `/data/config/system.toml`: first-boot configuration written by the installer.
//! A file that does not parse is moved aside (never deleted) and defaults are used.

use std::path::{Path, PathBuf};

/// The schema, shared with the installer that writes the file.
pub use rayos_proto::system::{SystemToml as SystemConfig, VmStorage, VmStorageKind};

/// What loading found.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    Ok(SystemConfig),
    Missing(SystemConfig),
    /// The file did not parse: it was renamed to `kept_as`; defaults are in use.
    Corrupt { config: SystemConfig, kept_as: PathBuf, error: String },
}

impl Loaded {
    pub fn config(&self) -> &SystemConfig {
        match self {
            Loaded::Ok(c) | Loaded::Missing(c) | Loaded::Corrupt { config: c, .. } => c,
        }
    }
}

/// Loads `path`; a corrupt file is renamed to `<name>.corrupt-<n>` (first free n).
pub fn load(path: &Path) -> std::io::Result<Loaded> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Missing(SystemConfig::default())),
        Err(e) => return Err(e),
    };
    let parsed = std::str::from_utf8(&text)
        .map_err(|e| format!("not UTF-8: {e}"))
        .and_then(|s| SystemConfig::parse(s).map_err(|e| e.to_string()));
    match parsed {
        Ok(c) => Ok(Loaded::Ok(c)),
        Err(error) => {
            let mut n = 1;
            let kept_as = loop {
                let mut p = path.as_os_str().to_owned();
                p.push(format!(".corrupt-{n}"));
                let p = PathBuf::from(p);
                if !p.exists() {
                    break p;
                }
                n += 1;
            };
            std::fs::rename(path, &kept_as)?;
            Ok(Loaded::Corrupt { config: SystemConfig::default(), kept_as, error: format!("{}: {error}", path.display()) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_missing_and_corrupt_files() {
        let dir = std::env::temp_dir().join(format!("rayosd-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("system.toml");
        assert_eq!(load(&p).unwrap(), Loaded::Missing(SystemConfig::default()));

        std::fs::write(&p, "machine_name = \"desk\"\nfuture_key = 1\n").unwrap();
        let c = load(&p).unwrap();
        assert_eq!(c.config().machine_name, "desk");
        assert_eq!(c.config().timezone, "UTC");

        assert_eq!(c.config().vm_storage.partition(), None);

        std::fs::write(&p, "machine_name = \"desk\"\n[vm_storage]\nkind = \"partition\"\nlocation = \"0a1b\"\n").unwrap();
        assert_eq!(load(&p).unwrap().config().vm_storage.partition(), Some("0a1b"));

        let garbage = "machine_name = [unterminated\n";
        std::fs::write(&p, garbage).unwrap();
        match load(&p).unwrap() {
            Loaded::Corrupt { config, kept_as, error } => {
                assert_eq!(config, SystemConfig::default());
                assert_eq!(kept_as, dir.join("system.toml.corrupt-1"));
                assert_eq!(std::fs::read_to_string(&kept_as).unwrap(), garbage, "nothing lost");
                assert!(error.contains("system.toml"), "{error}");
                assert!(!p.exists());
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(&p, "[[[").unwrap();
        assert!(matches!(load(&p).unwrap(), Loaded::Corrupt { kept_as, .. } if kept_as == dir.join("system.toml.corrupt-2")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
