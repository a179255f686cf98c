//! The EFI System Partition: formatting a new one, reading the boot files off the USB medium,
//! and adding RayOS's files to an ESP (ours or the machine's existing one).

use std::fs::File;
use std::io::{self, Read, Seek, Write};

use crate::blockio::Window;
use crate::bls;

pub const INSTALLER_ENTRY: &str = "loader/entries/rayos-installer.conf";
pub const SYSTEMD_BOOT_PATH: &str = "EFI/systemd/systemd-bootx64.efi";
pub const FALLBACK_PATH: &str = "EFI/BOOT/BOOTX64.EFI";
/// Same path as a UEFI device path string (backslashes), for the Boot#### entry.
pub const SYSTEMD_BOOT_EFI_PATH: &str = "\\EFI\\systemd\\systemd-bootx64.efi";

#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error("ESP: {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("USB medium ESP: {path} is missing")]
    Missing { path: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EspError {
    let what = what.into();
    move |source| EspError::Io { what, source }
}

/// The files an install copies from the boot medium. Held in memory: the kernel and the
/// initramfs together are tens of MiB.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub systemd_boot: Vec<u8>,
    pub kernel: Vec<u8>,
    pub initramfs: Vec<u8>,
    /// Contents of the answer file, when the medium (or the kernel command line) names one.
    pub answers: Option<(String, String)>,
    /// The default Linux VM's disk, packed (`diskpack`), when the medium carries it.
    pub default_linux: Option<Vec<u8>>,
    /// The RayOS kernel as a stripped ELF vmlinux for the default Linux VM, when the medium
    /// carries it (rayos-vmm boots it without the guest decompressing a bzImage).
    pub default_linux_kernel: Option<Vec<u8>>,
}

/// Where the USB medium's ESP carries the default Linux VM's packed disk.
pub const DEFAULT_LINUX_DISK_PATH: &str = "rayos/vms/linux.rdisk.zst";
/// Where it carries the default Linux VM's kernel: the RayOS kernel as an uncompressed ELF.
pub const DEFAULT_LINUX_KERNEL_PATH: &str = "rayos/vms/vmlinux";

/// True when a FAT filesystem at `offset` holds the installer's boot entry (the USB medium).
pub fn has_installer_entry<T: Read + Write + Seek>(dev: &mut T, offset: u64, len: u64) -> bool {
    let Ok(fs) = fatfs::FileSystem::new(Window::new(dev, offset, len), fatfs::FsOptions::new()) else {
        return false;
    };
    let found = fs.root_dir().open_file(INSTALLER_ENTRY).is_ok();
    found
}

fn read_file<T: fatfs::ReadWriteSeek>(fs: &fatfs::FileSystem<T>, path: &str) -> Result<Option<Vec<u8>>, EspError> {
    match fs.root_dir().open_file(path) {
        Ok(mut f) => {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(io_err(format!("reading {path}")))?;
            Ok(Some(buf))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EspError::Io { what: format!("opening {path}"), source: e }),
    }
}

/// Reads kernel, initramfs, systemd-boot and the answer file from the USB medium's ESP.
/// `answers_path` is the kernel command line's `rayos.answers=` (a path on that ESP), else
/// `rayos/answers.toml` is looked for.
pub fn read_boot_files(dev: &mut File, offset: u64, len: u64, answers_path: Option<&str>) -> Result<BootFiles, EspError> {
    let fs = fatfs::FileSystem::new(Window::new(dev, offset, len), fatfs::FsOptions::new())
        .map_err(io_err("opening the USB medium's FAT filesystem"))?;
    let need = |path: &str| -> Result<Vec<u8>, EspError> {
        read_file(&fs, path)?.ok_or_else(|| EspError::Missing { path: path.to_string() })
    };
    let systemd_boot = need(FALLBACK_PATH)?;
    let kernel = need(bls::KERNEL_PATH)?;
    let initramfs = need(bls::INITRAMFS_PATH)?;
    let answers = match answers_path {
        Some(p) => {
            let p = p.trim_start_matches(['/', '\\']).replace('\\', "/");
            Some((p.clone(), String::from_utf8_lossy(&need(&p)?).into_owned()))
        }
        None => read_file(&fs, "rayos/answers.toml")?
            .map(|b| ("rayos/answers.toml".to_string(), String::from_utf8_lossy(&b).into_owned())),
    };
    let default_linux = read_file(&fs, DEFAULT_LINUX_DISK_PATH)?;
    let default_linux_kernel = read_file(&fs, DEFAULT_LINUX_KERNEL_PATH)?;
    Ok(BootFiles { systemd_boot, kernel, initramfs, answers, default_linux, default_linux_kernel })
}

/// FAT32 over the whole partition window.
pub fn format<T: Read + Write + Seek>(window: T) -> Result<(), EspError> {
    let opts = fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat32).volume_label(*b"RAYOS-ESP  ");
    fatfs::format_volume(window, opts).map_err(io_err("formatting FAT32"))
}

fn ensure_dirs<T: fatfs::ReadWriteSeek>(fs: &fatfs::FileSystem<T>, path: &str) -> Result<(), EspError> {
    let mut dir = fs.root_dir();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        dir = match dir.open_dir(part) {
            Ok(d) => d,
            Err(_) => dir.create_dir(part).map_err(io_err(format!("creating directory {path}")))?,
        };
    }
    Ok(())
}

fn write_file<T: fatfs::ReadWriteSeek>(fs: &fatfs::FileSystem<T>, path: &str, data: &[u8]) -> Result<(), EspError> {
    if let Some((dir, _)) = path.rsplit_once('/') {
        ensure_dirs(fs, dir)?;
    }
    let mut f = fs.root_dir().create_file(path).map_err(io_err(format!("creating {path}")))?;
    f.truncate().map_err(io_err(format!("truncating {path}")))?;
    for chunk in data.chunks(1 << 20) {
        f.write_all(chunk).map_err(io_err(format!("writing {path}")))?;
    }
    f.flush().map_err(io_err(format!("writing {path}")))?;
    Ok(())
}

/// What `install_files` did, for the install log.
#[derive(Debug, Default, Clone)]
pub struct EspReport {
    pub written: Vec<String>,
    pub kept: Vec<String>,
    pub removed: Vec<String>,
}

/// Adds RayOS's files. On an ESP we created: everything, including the fallback loader. On the
/// machine's existing ESP: only files that are ours (`rayos/`, our entries) are replaced; an
/// existing systemd-boot or loader.conf is kept (another systemd-boot reads our entries too).
pub fn install_files<T: Read + Write + Seek>(
    mut window: T,
    files: &BootFiles,
    created_by_us: bool,
    version: &str,
) -> Result<EspReport, EspError> {
    let fs = fatfs::FileSystem::new(&mut window, fatfs::FsOptions::new()).map_err(io_err("opening FAT filesystem"))?;
    let mut report = EspReport::default();

    // Old default entries of an earlier install, whatever their tries counter.
    if let Ok(entries) = fs.root_dir().open_dir("loader/entries") {
        let stale: Vec<String> = entries
            .iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| bls::is_default_entry_name(n))
            .collect();
        for name in stale {
            entries.remove(&name).map_err(io_err(format!("removing loader/entries/{name}")))?;
            report.removed.push(format!("loader/entries/{name}"));
        }
    }

    let mut put = |path: &str, data: &[u8], ours: bool| -> Result<(), EspError> {
        if !ours && !created_by_us && read_file(&fs, path)?.is_some() {
            report.kept.push(path.to_string());
            return Ok(());
        }
        write_file(&fs, path, data)?;
        report.written.push(path.to_string());
        Ok(())
    };
    put(bls::KERNEL_PATH, &files.kernel, true)?;
    put(bls::INITRAMFS_PATH, &files.initramfs, true)?;
    put(SYSTEMD_BOOT_PATH, &files.systemd_boot, false)?;
    if created_by_us {
        put(FALLBACK_PATH, &files.systemd_boot, true)?;
    }
    put("loader/loader.conf", bls::loader_conf().as_bytes(), false)?;
    put(&format!("loader/entries/{}", bls::DEFAULT_ENTRY), bls::default_entry(version).as_bytes(), true)?;
    put(&format!("loader/entries/{}", bls::RESCUE_ENTRY), bls::rescue_entry(version).as_bytes(), true)?;
    fs.unmount().map_err(io_err("unmounting FAT filesystem"))?;
    crate::fatfix::fix_dot_entries(&mut window, &["EFI", "EFI/BOOT", "EFI/systemd", "loader", "loader/entries", "rayos"])
        .map_err(io_err("repairing directory entries"))?;
    Ok(report)
}

/// Reads a file from a FAT filesystem in a window (tests and checks).
pub fn read_from<T: Read + Write + Seek>(window: T, path: &str) -> Result<Option<Vec<u8>>, EspError> {
    let fs = fatfs::FileSystem::new(window, fatfs::FsOptions::new()).map_err(io_err("opening FAT filesystem"))?;
    read_file(&fs, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fsck(path: &std::path::Path) -> (bool, String) {
        let out = std::process::Command::new("fsck.vfat").arg("-n").arg(path).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    #[test]
    fn formatted_esp_with_files_passes_fsck() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("esp.img");
        let f = File::create(&img).unwrap();
        f.set_len(512 << 20).unwrap();
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        format(Window::new(&mut f, 0, 512 << 20)).unwrap();
        let files = BootFiles { systemd_boot: vec![1; 1000], kernel: vec![2; 100_000], initramfs: vec![3; 300_000], answers: None, default_linux: None, default_linux_kernel: None };
        install_files(Window::new(&mut f, 0, 512 << 20), &files, true, "0.1.0").unwrap();
        let (ok, out) = fsck(&img);
        assert!(ok, "{out}");
        // and fatfs still reads what it wrote
        let k = read_from(Window::new(&mut f, 0, 512 << 20), "rayos/vmlinuz").unwrap().unwrap();
        assert_eq!(k, files.kernel);
        let fs = fatfs::FileSystem::new(Window::new(&mut f, 0, 512 << 20), fatfs::FsOptions::new()).unwrap();
        let names: Vec<String> = fs.root_dir().open_dir("loader/entries").unwrap().iter().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [".", "..", "rayos+3.conf", "rayos-rescue.conf"]);
    }
}
