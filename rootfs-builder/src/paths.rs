//! Where things live: the source tree, the build output (`target/rayos`) and the cache.

use std::path::{Path, PathBuf};

/// The workspace root (the folder holding the root Cargo.toml).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("rootfs-builder lives one level below the workspace root")
        .to_path_buf()
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace().join(dir)
            }
        }
        None => workspace().join("target"),
    }
}

/// Build output: kernel, initramfs, USB image, run state (`target/rayos`).
pub fn out_dir() -> PathBuf {
    std::env::var_os("RAYOS_OUT").map(PathBuf::from).unwrap_or_else(|| target_dir().join("rayos"))
}

/// Long-lived cache shared by every checkout: kernel sources and kernel builds.
/// `RAYOS_CACHE`, else `$XDG_CACHE_HOME/rayos`, else `~/.cache/rayos`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RAYOS_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("rayos");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache").join("rayos")
}

pub fn kernel_config_dir() -> PathBuf {
    workspace().join("kernel-config")
}

pub fn initramfs_manifest() -> PathBuf {
    workspace().join("initramfs").join("manifest.toml")
}

/// Debian's systemd-boot EFI binary (package systemd-boot-efi).
pub const SYSTEMD_BOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// OVMF firmware code and a template for its variable store (package ovmf).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// An exclusive lock on `dir/.lock` (the folder is created if needed), held while the file
/// lives. Checkouts share the cache: two builds of one cache entry (a kernel, the guest's
/// debootstrap tree) at the same time would write into the same folder.
pub fn lock_cache(dir: &Path, what: &str) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(".lock");
    let f = std::fs::File::create(&path)?;
    if f.try_lock().is_err() {
        crate::progress::step(what, format!("waiting for another build using {}", dir.display()));
        f.lock()?;
    }
    Ok(f)
}
