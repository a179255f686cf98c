//! UEFI boot entry (Boot#### + BootOrder) through efivarfs, and reading systemd-boot's
//! `LoaderDevicePartUUID` to recognise the boot medium.
//!
//! The EFI_LOAD_OPTION is built by hand: the crates that do it (`efivar`) bring their own
//! variable store backends and a large dependency tree for what is ~60 lines of byte layout
//! defined in UEFI 2.10 §3.1.3 (load option) and §10.3 (device path nodes).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use uuid::Uuid;

pub const GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
const ATTR_NV_BS_RT: u32 = 0x7;
const LOAD_OPTION_ACTIVE: u32 = 0x1;

#[derive(Debug, thiserror::Error)]
pub enum EfiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("no free Boot#### number")]
    NoFreeNumber,
}

/// The partition systemd-boot was started from, when it recorded it.
pub fn loader_device_part_uuid(efivars: &Path) -> Option<Uuid> {
    let raw = fs::read(efivars.join(format!("LoaderDevicePartUUID-{LOADER_GUID}"))).ok()?;
    let utf16: Vec<u16> = raw.get(4..)?.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let s = String::from_utf16_lossy(&utf16);
    Uuid::parse_str(s.trim_end_matches('\0').trim()).ok()
}

fn utf16z(s: &str) -> Vec<u8> {
    s.encode_utf16().chain([0]).flat_map(u16::to_le_bytes).collect()
}

/// Where the loader lives: a GPT partition and a file path on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderLocation {
    pub partition_number: u32,
    pub first_lba: u64,
    pub size_lba: u64,
    pub part_uuid: Uuid,
    /// Backslash-separated, e.g. `\EFI\systemd\systemd-bootx64.efi`.
    pub path: String,
}

/// EFI_LOAD_OPTION: attributes, path list length, description, HD() + File() + End nodes.
pub fn load_option(description: &str, loc: &LoaderLocation) -> Vec<u8> {
    let mut path = Vec::new();
    // HARDDRIVE_DEVICE_PATH: type 4 (media), subtype 1, length 42.
    path.extend_from_slice(&[4, 1]);
    path.extend_from_slice(&42u16.to_le_bytes());
    path.extend_from_slice(&loc.partition_number.to_le_bytes());
    path.extend_from_slice(&loc.first_lba.to_le_bytes());
    path.extend_from_slice(&loc.size_lba.to_le_bytes());
    path.extend_from_slice(&loc.part_uuid.to_bytes_le());
    path.push(0x02); // partition format: GPT
    path.push(0x02); // signature type: GUID
    // FILEPATH_DEVICE_PATH: type 4, subtype 4, UTF-16 path with NUL.
    let file = utf16z(&loc.path);
    path.extend_from_slice(&[4, 4]);
    path.extend_from_slice(&((4 + file.len()) as u16).to_le_bytes());
    path.extend_from_slice(&file);
    // End of entire device path.
    path.extend_from_slice(&[0x7f, 0xff, 4, 0]);

    let mut out = Vec::new();
    out.extend_from_slice(&LOAD_OPTION_ACTIVE.to_le_bytes());
    out.extend_from_slice(&(path.len() as u16).to_le_bytes());
    out.extend_from_slice(&utf16z(description));
    out.extend_from_slice(&path);
    out
}

nix::ioctl_read!(fs_ioc_getflags, b'f', 1, libc::c_long);
nix::ioctl_write_ptr!(fs_ioc_setflags, b'f', 2, libc::c_long);
const FS_IMMUTABLE_FL: libc::c_long = 0x10;

/// efivarfs marks existing variables immutable; clear that before rewriting one.
/// Filesystems without the flag ioctls (tests on tmpfs) are fine as they are.
fn make_mutable(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long through the valid pointer; fd open for the call.
    match unsafe { fs_ioc_getflags(f.as_raw_fd(), &mut flags) } {
        Ok(_) => {}
        Err(nix::errno::Errno::ENOTTY) | Err(nix::errno::Errno::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    if flags & FS_IMMUTABLE_FL != 0 {
        flags &= !FS_IMMUTABLE_FL;
        // SAFETY: FS_IOC_SETFLAGS reads one long through the valid pointer; fd open for the call.
        unsafe { fs_ioc_setflags(f.as_raw_fd(), &flags) }.map_err(io::Error::from)?;
    }
    Ok(())
}

/// efivarfs needs the attributes and the data in a single write().
fn write_var(path: &Path, data: &[u8]) -> Result<(), EfiError> {
    let err = |source| EfiError::Io { path: path.to_path_buf(), source };
    make_mutable(path).map_err(err)?;
    let mut buf = ATTR_NV_BS_RT.to_le_bytes().to_vec();
    buf.extend_from_slice(data);
    fs::write(path, &buf).map_err(err)
}

fn read_var(path: &Path) -> Option<Vec<u8>> {
    let raw = fs::read(path).ok()?;
    Some(raw.get(4..)?.to_vec())
}

/// Creates (or reuses, when an identical one exists) Boot#### and puts it first in BootOrder.
/// Returns the entry number.
pub fn add_boot_entry(efivars: &Path, description: &str, loc: &LoaderLocation) -> Result<u16, EfiError> {
    let option = load_option(description, loc);
    let var = |n: u16| efivars.join(format!("Boot{n:04X}-{GLOBAL_GUID}"));
    let mut existing = Vec::new();
    if let Ok(rd) = fs::read_dir(efivars) {
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name.strip_prefix("Boot").and_then(|r| r.strip_suffix(&format!("-{GLOBAL_GUID}"))) {
                if hex.len() == 4 {
                    if let Ok(n) = u16::from_str_radix(hex, 16) {
                        existing.push(n);
                    }
                }
            }
        }
    }
    let number = match existing.iter().find(|&&n| read_var(&var(n)).as_deref() == Some(&option[..])) {
        Some(&n) => n,
        None => {
            let n = (0..=0xffffu16).find(|n| !existing.contains(n)).ok_or(EfiError::NoFreeNumber)?;
            write_var(&var(n), &option)?;
            n
        }
    };
    let order_path = efivars.join(format!("BootOrder-{GLOBAL_GUID}"));
    let old: Vec<u16> = read_var(&order_path)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let order: Vec<u8> = std::iter::once(number)
        .chain(old.into_iter().filter(|&n| n != number))
        .flat_map(u16::to_le_bytes)
        .collect();
    write_var(&order_path, &order)?;
    Ok(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_option_layout_matches_uefi_spec() {
        let loc = LoaderLocation {
            partition_number: 1,
            first_lba: 2048,
            size_lba: 1048576,
            part_uuid: Uuid::parse_str("01234567-89ab-cdef-0123-456789abcdef").unwrap(),
            path: "\\EFI\\systemd\\systemd-bootx64.efi".into(),
        };
        let o = load_option("RayOS", &loc);
        assert_eq!(&o[0..4], &1u32.to_le_bytes());
        let path_len = u16::from_le_bytes([o[4], o[5]]) as usize;
        let desc_end = 6 + utf16z("RayOS").len();
        assert_eq!(&o[6..desc_end], &utf16z("RayOS")[..]);
        let path = &o[desc_end..];
        assert_eq!(path.len(), path_len);
        // HD node
        assert_eq!(&path[0..4], &[4, 1, 42, 0]);
        assert_eq!(u32::from_le_bytes(path[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(path[8..16].try_into().unwrap()), 2048);
        assert_eq!(u64::from_le_bytes(path[16..24].try_into().unwrap()), 1048576);
        // EFI_GUID mixed endian: first three fields little endian.
        assert_eq!(&path[24..28], &[0x67, 0x45, 0x23, 0x01]);
        assert_eq!(&path[40..42], &[2, 2]);
        // File node, then End.
        assert_eq!(&path[42..44], &[4, 4]);
        let file_len = u16::from_le_bytes([path[44], path[45]]) as usize;
        assert_eq!(&path[42 + file_len..], &[0x7f, 0xff, 4, 0]);
    }

    #[test]
    fn boot_entry_added_first_and_reused_on_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let order = dir.path().join(format!("BootOrder-{GLOBAL_GUID}"));
        fs::write(&order, [7, 0, 0, 0, 0, 0, 1, 0]).unwrap();
        fs::write(dir.path().join(format!("Boot0000-{GLOBAL_GUID}")), [7, 0, 0, 0, 1, 2]).unwrap();
        fs::write(dir.path().join(format!("Boot0001-{GLOBAL_GUID}")), [7, 0, 0, 0, 1, 2]).unwrap();
        let loc = LoaderLocation {
            partition_number: 1,
            first_lba: 2048,
            size_lba: 2048,
            part_uuid: Uuid::new_v4(),
            path: "\\EFI\\systemd\\systemd-bootx64.efi".into(),
        };
        let n = add_boot_entry(dir.path(), "RayOS", &loc).unwrap();
        assert_eq!(n, 2);
        assert_eq!(fs::read(&order).unwrap(), vec![7, 0, 0, 0, 2, 0, 0, 0, 1, 0]);
        let n2 = add_boot_entry(dir.path(), "RayOS", &loc).unwrap();
        assert_eq!(n2, 2, "an identical entry is reused, not duplicated");
        assert_eq!(fs::read(&order).unwrap(), vec![7, 0, 0, 0, 2, 0, 0, 0, 1, 0]);
        let var = fs::read(dir.path().join(format!("Boot0002-{GLOBAL_GUID}"))).unwrap();
        assert_eq!(&var[..4], &[7, 0, 0, 0]);
        assert_eq!(&var[4..], &load_option("RayOS", &loc)[..]);
    }

    #[test]
    fn loader_device_part_uuid_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = vec![6, 0, 0, 0];
        raw.extend(utf16z("5D7E4E3C-1A2B-4C5D-8E9F-0A1B2C3D4E5F"));
        fs::write(dir.path().join(format!("LoaderDevicePartUUID-{LOADER_GUID}")), raw).unwrap();
        assert_eq!(
            loader_device_part_uuid(dir.path()),
            Some(Uuid::parse_str("5d7e4e3c-1a2b-4c5d-8e9f-0a1b2c3d4e5f").unwrap())
        );
    }
}
