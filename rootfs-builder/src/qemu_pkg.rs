//! The QEMU that runs RayOS for `cargo rayos run`, the tests and the benchmarks: Debian's
//! 10.0.2 (the bookworm backport), pinned by SHA-256, fetched once into
//! `~/.cache/rayos/qemu/<version>` and unpacked there with `dpkg-deb -x`. It runs on the
//! libraries that Debian 12's own qemu-system-x86 (7.2, in [`crate::hostdeps::RUN`]) installs.
//!
//! Why not Debian 12's QEMU 7.2: everything nested runs on QEMU TCG's emulation of AMD SVM, and
//! 7.2's has bugs that later releases fixed (the XSETBV intercept in 8.2, the NPT walk in guest
//! real mode in 9.2). In our runs 7.2 reset the RayOS machine (a triple fault right after
//! VMRUN, with the kernel's stack and IDT unreadable) or triple-faulted its KVM guests a few
//! times per CI run (issue #12); CI went red on it. 10.0 also boots the nested guests about
//! 2.3 times faster.
//!
//! `RAYOS_QEMU_ROOT=<dir>` runs another unpacked QEMU package instead (for comparing
//! versions); `RAYOS_QEMU_ROOT=/` runs the system's own QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::{paths, progress};

/// The Debian version of the pinned packages.
pub const VERSION: &str = "10.0.2+ds-2+deb13u1~bpo12+1";

struct Deb {
    package: &'static str,
    arch: &'static str,
    sha256: &'static str,
    /// snapshot.debian.org serves every file Debian ever published by its SHA-1: the fallback
    /// once the backport leaves the archive for a newer one.
    sha1: &'static str,
}

const DEBS: &[Deb] = &[
    Deb {
        package: "qemu-system-x86",
        arch: "amd64",
        sha256: "4a6b1856c8b0d7df4ff8e70249e12c473ccf8d516aadb4ae14d3d938faed0c65",
        sha1: "3e738765a5f41149b7e308a85b853857079e0449",
    },
    Deb {
        package: "qemu-system-common",
        arch: "amd64",
        sha256: "23a4672a138832d7173855e981aa8282c73ef5e04e080fa7ada9f82c6b34f507",
        sha1: "7b8b7bfa931a61a9d866e63a96c6d57803c57607",
    },
    Deb {
        package: "qemu-system-data",
        arch: "all",
        sha256: "2d831088187087013b3fcbd19bdfb955b182a2d5a08f6dafa0ad1c6d2007fb4e",
        sha1: "87a9a71b73c693363a986fd8a8c411a1c50f9376",
    },
];

impl Deb {
    fn file_name(&self) -> String {
        format!("{}_{VERSION}_{}.deb", self.package, self.arch)
    }

    fn urls(&self) -> [String; 2] {
        [
            format!("http://deb.debian.org/debian/pool/main/q/qemu/{}", self.file_name()),
            format!("http://snapshot.debian.org/file/{}", self.sha1),
        ]
    }
}

#[derive(Debug, Error)]
pub enum QemuPkgError {
    #[error(
        "could not download {file} from {urls} (see apt-helper's output above); check the network, \
         or point RAYOS_QEMU_ROOT at an unpacked QEMU package (RAYOS_QEMU_ROOT=/ for the system's)"
    )]
    Download { file: String, urls: String },
    #[error("RAYOS_QEMU_ROOT={0}: there is no usr/bin/qemu-system-x86_64 below it")]
    NotAQemu(PathBuf),
    #[error("the unpacked QEMU {binary} does not run (`--version`: {detail}); is Debian's qemu-system-x86 installed (its libraries)?")]
    DoesNotRun { binary: PathBuf, detail: String },
    #[error("could not run {0}: {1}")]
    Spawn(&'static str, std::io::Error),
    #[error("`{cmd}` failed ({status})")]
    Failed { cmd: String, status: String },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Where the pinned packages are unpacked.
pub fn pinned_root() -> PathBuf {
    paths::cache_dir().join("qemu").join(VERSION).join("root")
}

/// The root of the QEMU every [`crate::qemu::QemuConfig`] runs: its binary is
/// `usr/bin/qemu-system-x86_64` below it.
pub fn root() -> PathBuf {
    match std::env::var_os("RAYOS_QEMU_ROOT") {
        Some(dir) => PathBuf::from(dir),
        None => pinned_root(),
    }
}

pub fn binary(root: &Path) -> PathBuf {
    root.join("usr/bin/qemu-system-x86_64")
}

/// Make [`root`] hold a QEMU: download and unpack the pinned packages when they are not in the
/// cache yet (about 13 MB). Returns the root.
pub fn ensure() -> Result<PathBuf, QemuPkgError> {
    if let Some(dir) = std::env::var_os("RAYOS_QEMU_ROOT") {
        let dir = PathBuf::from(dir);
        return if binary(&dir).is_file() { Ok(dir) } else { Err(QemuPkgError::NotAQemu(dir)) };
    }
    let root = pinned_root();
    let done = root.with_file_name("complete");
    if done.exists() {
        return Ok(root);
    }
    let top = root.parent().expect("the pinned root has a parent").to_path_buf();
    let _lock = paths::lock_cache(&top, "qemu").map_err(|e| QemuPkgError::Io(top.clone(), e))?;
    if done.exists() {
        return Ok(root);
    }
    let partial = top.join("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| QemuPkgError::Io(partial.clone(), e))?;
    for deb in DEBS {
        let file = partial.join(deb.file_name());
        progress::step("qemu", format!("downloading {}", deb.file_name()));
        let fetched = deb.urls().iter().any(|url| {
            // apt-helper comes with apt on every Debian system and checks the hash itself, so
            // a truncated or substituted file never reaches dpkg-deb.
            Command::new("/usr/lib/apt/apt-helper")
                .args(["download-file", url])
                .arg(&file)
                .arg(format!("SHA256:{}", deb.sha256))
                .status()
                .is_ok_and(|s| s.success())
        });
        if !fetched {
            return Err(QemuPkgError::Download { file: deb.file_name(), urls: deb.urls().join(" or ") });
        }
        run(Command::new("dpkg-deb").arg("-x").arg(&file).arg(partial.join("root")))?;
        let _ = std::fs::remove_file(&file);
    }
    check_runs(&partial.join("root"))?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(partial.join("root"), &root).map_err(|e| QemuPkgError::Io(root.clone(), e))?;
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::write(&done, VERSION).map_err(|e| QemuPkgError::Io(done.clone(), e))?;
    progress::step("qemu", format!("QEMU {VERSION} in {}", root.display()));
    Ok(root)
}

fn check_runs(root: &Path) -> Result<(), QemuPkgError> {
    let bin = binary(root);
    let out = Command::new(&bin).arg("--version").output().map_err(|e| QemuPkgError::Spawn("qemu-system-x86_64", e))?;
    let text = String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr }).trim().to_string();
    let upstream = VERSION.split('+').next().unwrap_or(VERSION);
    if out.status.success() && text.contains(upstream) {
        Ok(())
    } else {
        Err(QemuPkgError::DoesNotRun { binary: bin, detail: text })
    }
}

fn run(cmd: &mut Command) -> Result<(), QemuPkgError> {
    let status = cmd.status().map_err(|e| QemuPkgError::Spawn("dpkg-deb", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(QemuPkgError::Failed { cmd: format!("{cmd:?}"), status: status.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_package_has_a_full_hash_and_a_snapshot_url() {
        for d in DEBS {
            assert_eq!(d.sha256.len(), 64, "{}", d.package);
            assert_eq!(d.sha1.len(), 40, "{}", d.package);
            assert!(d.urls()[0].ends_with(&d.file_name()));
        }
    }
}
