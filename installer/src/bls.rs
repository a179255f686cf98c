//! Boot Loader Specification Type #1 entries and loader.conf for the installed ESP.

/// Boot-assessment tries given to a fresh install: systemd-boot renames `rayos+3.conf` to
/// `rayos+2-1.conf` on the first try, …; rayosd renames it to `rayos.conf` once ready.
pub const BOOT_TRIES: u32 = 3;
pub const DEFAULT_ENTRY: &str = "rayos+3.conf";
pub const RESCUE_ENTRY: &str = "rayos-rescue.conf";
pub const KERNEL_PATH: &str = "rayos/vmlinuz";
pub const INITRAMFS_PATH: &str = "rayos/initramfs.img";
pub const CONSOLE_OPTIONS: &str = "console=tty0 console=ttyS0,115200 panic=10";

/// True for any file name our default entry may have on the ESP: `rayos.conf` (assessed good)
/// or `rayos+LEFT[-DONE].conf` (still being assessed). A reinstall removes all of them first.
pub fn is_default_entry_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".conf") else { return false };
    if stem == "rayos" {
        return true;
    }
    let Some(counter) = stem.strip_prefix("rayos+") else { return false };
    let mut parts = counter.splitn(2, '-');
    let left_ok = parts.next().is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()));
    let done_ok = parts.next().is_none_or(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    left_ok && done_ok
}

pub fn entry(title: &str, mode: &str, version: &str, sort_key: &str) -> String {
    format!(
        "title {title}\nversion {version}\nsort-key {sort_key}\nlinux /{KERNEL_PATH}\ninitrd /{INITRAMFS_PATH}\noptions rayos.mode={mode} {CONSOLE_OPTIONS}\n"
    )
}

pub fn default_entry(version: &str) -> String {
    entry("RayOS", "installed", version, "rayos-1")
}

pub fn rescue_entry(version: &str) -> String {
    entry("RayOS (rescue)", "rescue", version, "rayos-2")
}

/// `default` matches the entry id, which systemd-boot derives with the tries counter removed,
/// so `rayos.conf` selects the entry before and after assessment.
pub fn loader_conf() -> String {
    "default rayos.conf\ntimeout 3\nconsole-mode keep\neditor no\n".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_entry_names_with_and_without_counter() {
        for ok in ["rayos.conf", "rayos+3.conf", "rayos+2-1.conf", "rayos+0-3.conf"] {
            assert!(is_default_entry_name(ok), "{ok}");
        }
        for no in ["rayos-rescue.conf", "rayos+.conf", "rayos+a.conf", "rayos+1-.conf", "other.conf", "rayos"] {
            assert!(!is_default_entry_name(no), "{no}");
        }
    }

    #[test]
    fn installed_entry_boots_installed_mode_with_counter() {
        let e = default_entry("0.1.0");
        assert!(e.contains("options rayos.mode=installed console=tty0 console=ttyS0,115200 panic=10\n"));
        assert!(e.contains("linux /rayos/vmlinuz\n"));
        assert!(e.contains("initrd /rayos/initramfs.img\n"));
        assert_eq!(DEFAULT_ENTRY, format!("rayos+{BOOT_TRIES}.conf"));
        assert!(rescue_entry("0.1.0").contains("rayos.mode=rescue "));
    }
}
