//! The whole build, stale steps only: kernel → static binaries → initramfs → USB image.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::manifest::{Manifest, ManifestError};
use crate::{cargo_build, guest, hostdeps, image, initramfs, kernel, paths, progress};

#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    HostDeps(#[from] hostdeps::HostDepsError),
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Cargo(#[from] cargo_build::CargoError),
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("the default Linux guest: {0}")]
    Guest(#[from] guest::GuestError),
    #[error(transparent)]
    DiskPack(#[from] installer::diskpack::DiskPackError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let p = p.to_path_buf();
    move |e| BuildError::Io(p, e)
}

/// What `cargo rayos` builds, under `target/rayos`.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub dir: PathBuf,
    /// The bzImage (`vmlinuz`).
    pub kernel: PathBuf,
    /// The same kernel as a stripped, uncompressed ELF (`vmlinux`), which rayos-vmm boots
    /// without the guest's decompression.
    pub vmlinux: PathBuf,
    pub kernel_config: PathBuf,
    pub initramfs: PathBuf,
    pub usb_image: PathBuf,
    /// The default Linux VM's disk, packed for the USB medium (installer::diskpack).
    pub linux_disk: PathBuf,
}

impl Artifacts {
    /// The paths of an existing build in `dir` (as passed to tests in `RAYOS_ARTIFACTS`).
    pub fn in_dir(dir: &Path) -> Artifacts {
        Artifacts {
            dir: dir.to_path_buf(),
            kernel: dir.join("vmlinuz"),
            vmlinux: dir.join("vmlinux"),
            kernel_config: dir.join("kernel.config"),
            initramfs: dir.join("initramfs.img"),
            usb_image: dir.join("rayos-usb.img"),
            linux_disk: dir.join("linux.rdisk.zst"),
        }
    }

    pub fn complete(&self) -> bool {
        [&self.kernel, &self.vmlinux, &self.kernel_config, &self.initramfs, &self.usb_image, &self.linux_disk].iter().all(|p| p.is_file())
    }
}

fn hash_files(label: &str, files: &[PathBuf]) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    h.update(label.as_bytes());
    for f in files {
        h.update(f.to_string_lossy().as_bytes());
        let mut file = std::fs::File::open(f).map_err(io(f))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io(f))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// True when `out` was made from exactly these inputs (recorded in `out.inputs`).
fn fresh(out: &Path, stamp: &str) -> bool {
    out.is_file() && std::fs::read_to_string(out.with_extension("inputs")).is_ok_and(|s| s == stamp)
}

fn record(out: &Path, stamp: &str) -> Result<(), BuildError> {
    let p = out.with_extension("inputs");
    std::fs::write(&p, stamp).map_err(io(&p))
}

/// Hard-link or copy `from` to `to` if it differs.
fn place(from: &Path, to: &Path) -> Result<(), BuildError> {
    let new = std::fs::read(from).map_err(io(from))?;
    if std::fs::read(to).is_ok_and(|old| old == new) {
        return Ok(());
    }
    let _ = std::fs::remove_file(to);
    std::fs::write(to, new).map_err(io(to))
}

/// Build whatever is stale and return the artifacts. Holds a lock so parallel test
/// processes and a concurrent `cargo rayos run` don't build over each other.
pub fn all() -> Result<Artifacts, BuildError> {
    hostdeps::ensure(hostdeps::BUILD)?;
    let dir = paths::out_dir();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let lock_path = dir.join(".build.lock");
    let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
    if fs2::FileExt::try_lock_exclusive(&lock).is_err() {
        progress::step("build", format!("waiting for another RayOS build to finish ({})", dir.join(".build.lock").display()));
        fs2::FileExt::lock_exclusive(&lock).map_err(io(&lock_path))?;
    }
    let a = Artifacts::in_dir(&dir);

    let k = kernel::ensure()?;
    place(&k.bzimage, &a.kernel)?;
    place(&k.vmlinux, &a.vmlinux)?;
    place(&k.config, &a.kernel_config)?;

    let manifest_path = paths::initramfs_manifest();
    let (manifest, _) = Manifest::load(&manifest_path)?;
    let bin_dir = cargo_build::build_static(manifest.packages())?;
    let mut inputs = vec![manifest_path.clone()];
    inputs.extend(manifest.inputs(&bin_dir));
    let stamp = hash_files("initramfs-1", &inputs)?;
    if !fresh(&a.initramfs, &stamp) {
        progress::step("initramfs", "packing (newc, zstd -19)");
        let size = manifest.to_initramfs(&manifest_path, &bin_dir)?.write(&a.initramfs)?;
        record(&a.initramfs, &stamp)?;
        progress::step("initramfs", format!("{} ({})", a.initramfs.display(), progress::fmt_size(size)));
    }

    // The guest disk's file name is the hash of its inputs, so it is the stamp.
    let guest_disk = guest::ensure_disk()?;
    let stamp = format!("diskpack-1 {}", guest_disk.display());
    if !fresh(&a.linux_disk, &stamp) {
        progress::step("guest", format!("packing {} for the USB medium (data extents, zstd)", guest_disk.display()));
        let s = installer::diskpack::pack(&guest_disk, &a.linux_disk, 6)?;
        record(&a.linux_disk, &stamp)?;
        let packed = std::fs::metadata(&a.linux_disk).map_err(io(&a.linux_disk))?.len();
        progress::step(
            "guest",
            format!(
                "{} ({} disk, {} of data in {} extents, {} packed)",
                a.linux_disk.display(),
                progress::fmt_size(s.size),
                progress::fmt_size(s.data),
                s.extents,
                progress::fmt_size(packed)
            ),
        );
    }

    let boot = PathBuf::from(paths::SYSTEMD_BOOT_EFI);
    let entries: String = image::usb_entries().iter().map(|e| e.render()).collect();
    let stamp = hash_files(
        &format!("usb-3{entries}"),
        &[a.kernel.clone(), a.initramfs.clone(), boot.clone(), a.linux_disk.clone(), a.vmlinux.clone()],
    )?;
    if !fresh(&a.usb_image, &stamp) {
        progress::step("image", "writing the USB image (GPT, FAT32 ESP, systemd-boot, default Linux VM)");
        // The default Linux VM: its disk and its kernel (the uncompressed one, which
        // rayos-vmm boots without the guest decompressing it).
        let extra = [
            (installer::esp::DEFAULT_LINUX_DISK_PATH, a.linux_disk.as_path()),
            (installer::esp::DEFAULT_LINUX_KERNEL_PATH, a.vmlinux.as_path()),
        ];
        let size = image::build_usb(&a.usb_image, &a.kernel, &a.initramfs, &boot, &extra)?;
        record(&a.usb_image, &stamp)?;
        progress::step("image", format!("{} ({})", a.usb_image.display(), progress::fmt_size(size)));
    }
    Ok(a)
}

/// The artifacts for tests: those named by `RAYOS_ARTIFACTS` (set by `cargo rayos test`,
/// which has just built them), else build what is stale.
pub fn artifacts() -> Result<Artifacts, BuildError> {
    if let Some(dir) = std::env::var_os("RAYOS_ARTIFACTS") {
        let a = Artifacts::in_dir(Path::new(&dir));
        if a.complete() {
            return Ok(a);
        }
    }
    all()
}
