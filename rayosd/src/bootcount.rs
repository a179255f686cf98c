//! Automatic boot assessment (Boot Loader Specification): the installer writes the RayOS
//! entry as `rayos+3.conf`; systemd-boot renames it on every try (`rayos+2-1.conf`, …) and
//! names the current file in the `LoaderBootCountPath` EFI variable. An entry that runs out of
//! tries sorts last, so a broken update falls back by itself. Once rayosd is ready in
//! installed mode the boot is good: we rename the entry to drop the counter (`rayos.conf`).

use std::path::{Path, PathBuf};

use crate::efivars::{decode_string_var, LOADER_GUID};

#[derive(Debug, thiserror::Error)]
pub enum BootCountError {
    #[error("LoaderBootCountPath `{0}` is not a loader entry path")]
    BadPath(String),
    #[error("the ESP we booted from (PARTUUID {0}) was not found on any disk")]
    EspNotFound(String),
    #[error("mounting the ESP {dev} on {target}: {source}")]
    Mount { dev: String, target: String, source: nix::Error },
    #[error("renaming {from} to {to} on the ESP: {source}")]
    Rename { from: String, to: String, source: std::io::Error },
}

/// `\loader\entries\rayos+2-1.conf` → (`loader/entries/rayos+2-1.conf`, `loader/entries/rayos.conf`).
/// `None` when the name carries no counter (already assessed).
pub fn blessed_name(count_path: &str) -> Result<Option<(String, String)>, BootCountError> {
    let rel = count_path.trim_start_matches('\\').replace('\\', "/");
    let (dir, file) = rel.rsplit_once('/').ok_or_else(|| BootCountError::BadPath(count_path.into()))?;
    let stem = file.strip_suffix(".conf").ok_or_else(|| BootCountError::BadPath(count_path.into()))?;
    if !dir.eq_ignore_ascii_case("loader/entries") || stem.is_empty() || rel.contains("..") {
        return Err(BootCountError::BadPath(count_path.into()));
    }
    match stem.rsplit_once('+') {
        // The counter is `+LEFT` or `+LEFT-DONE`, digits only.
        Some((base, counter)) if !base.is_empty() && counter.split('-').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) => {
            Ok(Some((rel.clone(), format!("{dir}/{base}.conf"))))
        }
        _ => Ok(None),
    }
}

fn read_var(efivars: &Path, name: &str) -> Option<String> {
    decode_string_var(&std::fs::read(efivars.join(format!("{name}-{LOADER_GUID}"))).ok()?)
}

/// The block device of the partition whose GPT unique GUID is `partuuid`.
fn find_partition(sys_block: &Path, dev_dir: &Path, partuuid: &str) -> Option<PathBuf> {
    let want = partuuid.to_ascii_lowercase();
    for p in crate::datavol::scan(sys_block, dev_dir) {
        let Ok(mut f) = std::fs::File::open(dev_dir.join(&p.disk)) else { continue };
        let Ok(gpt) = gptman::GPT::find_from(&mut f) else { continue };
        let Some((_, e)) = gpt.iter().find(|(n, _)| *n == p.number) else { continue };
        let g = uuid::Uuid::from_bytes_le(e.unique_partition_guid).to_string();
        if g == want {
            return Some(p.dev);
        }
    }
    None
}

/// Mark the current boot good. Returns the new entry name, or `None` when there was nothing
/// to do (not booted by systemd-boot with a counted entry).
pub fn bless_boot(efivars: &Path, sys_block: &Path, dev_dir: &Path, mount_dir: &Path) -> Result<Option<String>, BootCountError> {
    let Some(count_path) = read_var(efivars, "LoaderBootCountPath") else { return Ok(None) };
    let Some((from, to)) = blessed_name(&count_path)? else { return Ok(None) };
    let partuuid = read_var(efivars, "LoaderDevicePartUUID").ok_or_else(|| BootCountError::EspNotFound("unknown".into()))?;
    let dev = find_partition(sys_block, dev_dir, &partuuid).ok_or(BootCountError::EspNotFound(partuuid))?;
    let _ = std::fs::create_dir_all(mount_dir);
    let mount_err = |source| BootCountError::Mount { dev: dev.display().to_string(), target: mount_dir.display().to_string(), source };
    nix::mount::mount(Some(&dev), mount_dir, Some("vfat"), nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC, None::<&str>)
        .map_err(mount_err)?;
    let result = std::fs::rename(mount_dir.join(&from), mount_dir.join(&to))
        .map_err(|source| BootCountError::Rename { from: from.clone(), to: to.clone(), source });
    // Unmounting writes the directory change out; do it whatever the rename did.
    let _ = nix::mount::umount(mount_dir);
    result?;
    Ok(Some(to.rsplit('/').next().unwrap_or(&to).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_counter() {
        let r = blessed_name("\\loader\\entries\\rayos+2-1.conf").unwrap();
        assert_eq!(r, Some(("loader/entries/rayos+2-1.conf".into(), "loader/entries/rayos.conf".into())));
        let r = blessed_name("\\loader\\entries\\rayos+3.conf").unwrap();
        assert_eq!(r.unwrap().1, "loader/entries/rayos.conf");
    }

    #[test]
    fn leaves_uncounted_names_and_refuses_odd_paths() {
        assert_eq!(blessed_name("\\loader\\entries\\rayos.conf").unwrap(), None);
        assert_eq!(blessed_name("\\loader\\entries\\c++.conf").unwrap(), None);
        assert!(blessed_name("\\EFI\\BOOT\\x+1.conf").is_err());
        assert!(blessed_name("\\loader\\entries\\..\\x+1.conf").is_err());
        assert!(blessed_name("\\loader\\entries\\x+1").is_err());
    }
}
