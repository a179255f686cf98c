//! The RayOS USB image: a GPT disk whose ESP holds systemd-boot, Boot Loader Specification
//! entries, the kernel and the initramfs. It is the file a user writes to a USB stick.

use std::path::Path;

use thiserror::Error;

use crate::esp::{self, Esp, EspError, PartitionSpec};

/// The ESP starts at 1 MiB (sector 2048), the alignment every partitioning tool uses.
pub const ESP_FIRST_LBA: u64 = 2048;
/// 256 MiB of ESP: kernel, initramfs and the packed default Linux VM (~100 MiB), with room to
/// grow; FAT32 needs >= 65525 clusters.
pub const ESP_SIZE: u64 = 256 << 20;

pub const KERNEL_PATH: &str = "rayos/vmlinuz";
pub const INITRAMFS_PATH: &str = "rayos/initramfs.img";
pub const BOOTLOADER_PATH: &str = "EFI/BOOT/BOOTX64.EFI";
pub const INSTALLER_ENTRY: &str = "rayos-installer.conf";
pub const RESCUE_ENTRY: &str = "rayos-rescue.conf";

/// Options every RayOS entry shares: the screen and the serial console (the last one is
/// /dev/console), and reboot 10 s after a kernel panic.
pub const COMMON_OPTIONS: &str = "console=tty0 console=ttyS0,115200 panic=10";

#[derive(Debug, Error)]
pub enum ImageError {
    #[error(transparent)]
    Esp(#[from] EspError),
    #[error("{0}: {1}")]
    Io(std::path::PathBuf, std::io::Error),
}

/// A Boot Loader Specification Type #1 entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub file: String,
    pub title: String,
    pub version: String,
    pub options: String,
    pub sort_key: String,
}

impl BootEntry {
    pub fn render(&self) -> String {
        format!(
            "title {}\nversion {}\nlinux /{KERNEL_PATH}\ninitrd /{INITRAMFS_PATH}\noptions {}\nsort-key {}\n",
            self.title, self.version, self.options, self.sort_key
        )
    }

    /// Parse an entry's `key value` lines (BLS: first space separates key and value).
    pub fn parse_keys(text: &str) -> Vec<(String, String)> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| match l.split_once(char::is_whitespace) {
                Some((k, v)) => (k.to_string(), v.trim().to_string()),
                None => (l.to_string(), String::new()),
            })
            .collect()
    }
}

pub fn usb_entries() -> Vec<BootEntry> {
    let version = env!("CARGO_PKG_VERSION").to_string();
    vec![
        BootEntry {
            file: INSTALLER_ENTRY.into(),
            title: "RayOS installer".into(),
            version: version.clone(),
            options: format!("rayos.mode=installer {COMMON_OPTIONS} quiet"),
            sort_key: "rayos-1-installer".into(),
        },
        BootEntry {
            file: RESCUE_ENTRY.into(),
            title: "RayOS rescue".into(),
            version,
            options: format!("rayos.mode=rescue {COMMON_OPTIONS}"),
            sort_key: "rayos-2-rescue".into(),
        },
    ]
}

/// `loader/loader.conf`: boot the default at once; hold Space (or any key) during start-up
/// to get the menu with the rescue entry.
pub fn loader_conf(default: &str) -> String {
    format!("default {default}\ntimeout 0\nconsole-mode keep\neditor no\n")
}

/// Write the USB image at `out` (atomically: a partial file is renamed on success).
/// `extra` are more files for the ESP: (path on the ESP, file).
pub fn build_usb(
    out: &Path,
    kernel: &Path,
    initramfs: &Path,
    bootloader: &Path,
    extra: &[(&str, &Path)],
) -> Result<u64, ImageError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| ImageError::Io(p, e)
    };
    let kernel_bytes = std::fs::read(kernel).map_err(io(kernel))?;
    let initramfs_bytes = std::fs::read(initramfs).map_err(io(initramfs))?;
    let boot_bytes = std::fs::read(bootloader).map_err(io(bootloader))?;

    let tmp = out.with_extension("partial");
    let esp_last = ESP_FIRST_LBA + ESP_SIZE / esp::SECTOR - 1;
    // 1 MiB before the ESP, the ESP, and 1 MiB after it for the backup GPT.
    let size = (esp_last + 1) * esp::SECTOR + (1 << 20);
    esp::create_gpt_image(
        &tmp,
        size,
        &[PartitionSpec {
            type_guid: esp::guid_bytes(esp::ESP_TYPE),
            name: "RayOS boot".into(),
            first_lba: ESP_FIRST_LBA,
            last_lba: esp_last,
        }],
    )?;
    let mut fs = Esp::format(&tmp, "RAYOS")?;
    fs.write(BOOTLOADER_PATH, &boot_bytes)?;
    fs.write(KERNEL_PATH, &kernel_bytes)?;
    fs.write(INITRAMFS_PATH, &initramfs_bytes)?;
    fs.write("loader/loader.conf", loader_conf(INSTALLER_ENTRY).as_bytes())?;
    for e in usb_entries() {
        fs.write(&format!("loader/entries/{}", e.file), e.render().as_bytes())?;
    }
    for (path, file) in extra {
        fs.write(path, &std::fs::read(file).map_err(io(file))?)?;
    }
    fs.close()?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(size)
}

/// Make `entry` the default on an image (used on copies, e.g. to boot the rescue entry).
pub fn set_default_entry(image: &Path, entry: &str) -> Result<(), ImageError> {
    let mut fs = Esp::open(image)?;
    fs.write("loader/loader.conf", loader_conf(entry).as_bytes())?;
    fs.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_renders_and_parses_back() {
        let e = &usb_entries()[0];
        let keys = BootEntry::parse_keys(&e.render());
        let get = |k: &str| keys.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("linux"), "/rayos/vmlinuz");
        assert_eq!(get("initrd"), "/rayos/initramfs.img");
        assert!(get("options").starts_with("rayos.mode=installer "));
        assert_eq!(get("title"), "RayOS installer");
    }

    #[test]
    fn small_image_round_trip() {
        let dir = std::env::temp_dir().join(format!("image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (k, i, b) = (dir.join("k"), dir.join("i"), dir.join("b"));
        std::fs::write(&k, vec![1u8; 5000]).unwrap();
        std::fs::write(&i, vec![2u8; 70000]).unwrap();
        std::fs::write(&b, b"MZ boot").unwrap();
        let img = dir.join("usb.img");
        build_usb(&img, &k, &i, &b, &[]).unwrap();
        set_default_entry(&img, RESCUE_ENTRY).unwrap();
        let fs = Esp::open(&img).unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
        assert_eq!(fs.read(INITRAMFS_PATH).unwrap(), vec![2u8; 70000]);
        assert!(fs.read_string("loader/loader.conf").unwrap().starts_with("default rayos-rescue.conf\n"));
        assert_eq!(
            fs.list().unwrap(),
            vec![
                "EFI/BOOT/BOOTX64.EFI",
                "loader/entries/rayos-installer.conf",
                "loader/entries/rayos-rescue.conf",
                "loader/loader.conf",
                "rayos/initramfs.img",
                "rayos/vmlinuz"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
