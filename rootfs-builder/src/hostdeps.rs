//! Debian packages the build and the QEMU runs need, installed with apt when missing.

use std::process::{Command, Stdio};

use thiserror::Error;

/// What building the kernel, initramfs and image needs (kbd and console-data: the installer's
/// `loadkeys` and the keymaps it loads).
pub const BUILD: &[&str] = &[
    "bc", "bison", "flex", "libelf-dev", "libssl-dev", "make", "gcc", "binutils", "xz-utils", "e2fsprogs",
    "systemd-boot-efi", "kbd", "console-data",
];
/// What booting RayOS in QEMU needs.
pub const RUN: &[&str] = &["qemu-system-x86", "ovmf"];
/// What the tests need beyond the build's tools: `fsck.vfat` for the ESPs the installer
/// writes (e2fsck and debugfs come with e2fsprogs), python3 for the fake VMM of rayosd's
/// unit tests, tesseract to read the installer's screen (QMP screendump) back as text.
pub const TEST: &[&str] = &["dosfstools", "python3", "tesseract-ocr"];

#[derive(Debug, Error)]
pub enum HostDepsError {
    #[error(
        "RayOS needs these Debian packages, which are not installed: {missing}\n\
         Install them as root, then run the command again:\n    sudo apt-get install -y {missing}"
    )]
    NotRoot { missing: String },
    #[error("`{cmd}` failed ({status}); see the apt output above")]
    Apt { cmd: String, status: String },
    #[error("could not run {0}: {1}")]
    Spawn(&'static str, std::io::Error),
}

pub fn missing(packages: &[&str]) -> Vec<String> {
    packages
        .iter()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", p]).output();
            !matches!(out, Ok(o) if o.status.success() && o.stdout.starts_with(b"ii"))
        })
        .map(|p| p.to_string())
        .collect()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Install whatever of `packages` is missing: list them first, then `apt-get install`.
/// As non-root, print the exact apt line and stop.
pub fn ensure(packages: &[&str]) -> Result<(), HostDepsError> {
    let missing = missing(packages);
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        return Err(HostDepsError::NotRoot { missing: list });
    }
    crate::progress::step("host packages", format!("installing {list}"));
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing.iter().map(String::as_str));
    apt(&args)
}

pub fn apt(args: &[&str]) -> Result<(), HostDepsError> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .map_err(|e| HostDepsError::Spawn("apt-get", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(HostDepsError::Apt { cmd: format!("apt-get {}", args.join(" ")), status: status.to_string() })
    }
}
