//! Kconfig fragments: parse what `kernel-config/*.config` asks for and check that the final
//! `.config` kept every option (olddefconfig silently drops options whose dependencies are
//! missing; we want that to fail the build by name).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// One requested option: `CONFIG_X=value`, or `n` for `# CONFIG_X is not set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub name: String,
    pub value: String,
    pub fragment: PathBuf,
    pub line: usize,
}

#[derive(Debug, Error)]
pub enum KconfigError {
    #[error("{file}:{line}: cannot parse `{text}` (expected `CONFIG_X=value` or `# CONFIG_X is not set`)")]
    Syntax { file: PathBuf, line: usize, text: String },
    #[error("{file}:{line}: {name} is also set in {other}")]
    Conflict { file: PathBuf, line: usize, name: String, other: String },
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("no *.config fragments in {0}")]
    NoFragments(PathBuf),
    #[error(
        "the kernel configuration dropped or changed {} requested option(s) (usually a missing dependency):\n{}",
        .0.len(),
        .0.iter().map(|m| format!("  {m}")).collect::<Vec<_>>().join("\n")
    )]
    Dropped(Vec<Mismatch>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub name: String,
    pub wanted: String,
    pub got: String,
    pub fragment: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}={} (asked in {}:{}), final .config has {}",
            self.name,
            self.wanted,
            self.fragment.display(),
            self.line,
            if self.got == "n" { "it unset".to_string() } else { format!("{}={}", self.name, self.got) }
        )
    }
}

/// The fragments in merge order (file-name order).
pub fn fragments(dir: &Path) -> Result<Vec<PathBuf>, KconfigError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| KconfigError::Io(dir.to_path_buf(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "config"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(KconfigError::NoFragments(dir.to_path_buf()));
    }
    Ok(files)
}

/// Parse one line of Kconfig output or a fragment.
fn parse_line(text: &str) -> Option<Option<(String, String)>> {
    let t = text.trim();
    if t.is_empty() {
        return Some(None);
    }
    if let Some(rest) = t.strip_prefix("# CONFIG_") {
        if let Some(name) = rest.strip_suffix(" is not set") {
            return Some(Some((format!("CONFIG_{name}"), "n".to_string())));
        }
        return Some(None); // an ordinary comment
    }
    if t.starts_with('#') {
        return Some(None);
    }
    let (name, value) = t.split_once('=')?;
    if !name.starts_with("CONFIG_") || name.contains(char::is_whitespace) {
        return None;
    }
    Some(Some((name.to_string(), value.to_string())))
}

pub fn parse_fragment(file: &Path, text: &str) -> Result<Vec<Request>, KconfigError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match parse_line(line) {
            Some(Some((name, value))) => out.push(Request { name, value, fragment: file.to_path_buf(), line: i + 1 }),
            Some(None) => {}
            None => return Err(KconfigError::Syntax { file: file.to_path_buf(), line: i + 1, text: line.to_string() }),
        }
    }
    Ok(out)
}

/// Every request across the fragments; the same option set twice is an error.
pub fn requests(files: &[PathBuf]) -> Result<Vec<Request>, KconfigError> {
    let mut seen: BTreeMap<String, Request> = BTreeMap::new();
    let mut all = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| KconfigError::Io(f.clone(), e))?;
        for r in parse_fragment(f, &text)? {
            if let Some(prev) = seen.get(&r.name) {
                return Err(KconfigError::Conflict {
                    file: r.fragment.clone(),
                    line: r.line,
                    name: r.name.clone(),
                    other: format!("{}:{}", prev.fragment.display(), prev.line),
                });
            }
            seen.insert(r.name.clone(), r.clone());
            all.push(r);
        }
    }
    Ok(all)
}

/// The final `.config` as name → value (`n` for "is not set").
pub fn parse_dotconfig(text: &str) -> BTreeMap<String, String> {
    text.lines().filter_map(|l| parse_line(l).flatten()).collect()
}

/// Check that every request survived into the final configuration.
pub fn check(requests: &[Request], dotconfig: &str) -> Result<(), KconfigError> {
    let have = parse_dotconfig(dotconfig);
    let mismatches: Vec<Mismatch> = requests
        .iter()
        .filter_map(|r| {
            let got = have.get(&r.name).cloned().unwrap_or_else(|| "n".to_string());
            (got != r.value).then(|| Mismatch {
                name: r.name.clone(),
                wanted: r.value.clone(),
                got,
                fragment: r.fragment.clone(),
                line: r.line,
            })
        })
        .collect();
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(KconfigError::Dropped(mismatches))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reqs(text: &str) -> Vec<Request> {
        parse_fragment(Path::new("frag.config"), text).unwrap()
    }

    #[test]
    fn parses_values_unset_and_comments() {
        let r = reqs("# why\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\n\nCONFIG_D=16\n");
        let got: Vec<(String, String)> = r.iter().map(|r| (r.name.clone(), r.value.clone())).collect();
        assert_eq!(
            got,
            vec![
                ("CONFIG_A".into(), "y".into()),
                ("CONFIG_B".into(), "n".into()),
                ("CONFIG_C".into(), "\"x y\"".into()),
                ("CONFIG_D".into(), "16".into())
            ]
        );
        assert_eq!(r[1].line, 3);
    }

    #[test]
    fn rejects_garbage_naming_the_line() {
        let err = parse_fragment(Path::new("x.config"), "CONFIG_A=y\nKVM=y\n").unwrap_err();
        assert!(err.to_string().contains("x.config:2"), "{err}");
    }

    #[test]
    fn dropped_option_is_named() {
        let r = reqs("CONFIG_KVM=y\nCONFIG_EXT4_FS=y\n# CONFIG_MODULES is not set\n");
        let err = check(&r, "CONFIG_EXT4_FS=y\n# CONFIG_KVM is not set\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("CONFIG_KVM=y"), "{msg}");
        assert!(!msg.contains("CONFIG_EXT4_FS=y (asked"), "{msg}");
        assert!(check(&r, "CONFIG_EXT4_FS=y\nCONFIG_KVM=y\n").is_ok());
    }

    #[test]
    fn unset_request_fails_when_enabled() {
        let r = reqs("# CONFIG_MODULES is not set\n");
        assert!(check(&r, "CONFIG_MODULES=y\n").is_err());
    }

    #[test]
    fn conflicting_fragments_are_refused() {
        let dir = std::env::temp_dir().join(format!("kconfig-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.config"), "CONFIG_A=y\n").unwrap();
        std::fs::write(dir.join("b.config"), "# CONFIG_A is not set\n").unwrap();
        let err = requests(&fragments(&dir).unwrap()).unwrap_err();
        assert!(err.to_string().contains("CONFIG_A is also set"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
