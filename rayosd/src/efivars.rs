//! systemd-boot's EFI variables, read through efivarfs.

use std::path::Path;

/// The vendor GUID of the Boot Loader Interface variables systemd-boot sets.
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// Where efivarfs is mounted.
pub const EFIVARFS: &str = "/sys/firmware/efi/efivars";

/// Reads `LoaderEntrySelected` (the boot entry systemd-boot booted) from efivarfs at `dir`.
/// `None` when not booted by systemd-boot or the variable is unreadable or malformed.
pub fn loader_entry_selected(dir: &Path) -> Option<String> {
    let raw = std::fs::read(dir.join(format!("LoaderEntrySelected-{LOADER_GUID}"))).ok()?;
    decode_string_var(&raw)
}

/// Decodes an efivarfs file holding a string: 4 bytes of attributes, then UTF-16LE, usually
/// NUL-terminated.
pub fn decode_string_var(raw: &[u8]) -> Option<String> {
    let body = raw.get(4..)?;
    if body.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> = body
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(attrs: u32, s: &str, nul: bool) -> Vec<u8> {
        let mut v = attrs.to_le_bytes().to_vec();
        for u in s.encode_utf16() {
            v.extend_from_slice(&u.to_le_bytes());
        }
        if nul {
            v.extend_from_slice(&[0, 0]);
        }
        v
    }

    #[test]
    fn decodes_entry_with_and_without_terminator() {
        assert_eq!(decode_string_var(&encode(6, "rayos-installer.conf", true)).as_deref(), Some("rayos-installer.conf"));
        assert_eq!(decode_string_var(&encode(6, "rayos-rescue.conf", false)).as_deref(), Some("rayos-rescue.conf"));
    }

    #[test]
    fn rejects_truncated_variables() {
        assert_eq!(decode_string_var(&[6, 0, 0]), None);
        assert_eq!(decode_string_var(&[6, 0, 0, 0, b'a']), None);
    }

    #[test]
    fn reads_from_an_efivarfs_like_directory() {
        let dir = std::env::temp_dir().join(format!("rayosd-efivars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(loader_entry_selected(&dir), None);
        std::fs::write(dir.join(format!("LoaderEntrySelected-{LOADER_GUID}")), encode(7, "rayos-rescue.conf", true)).unwrap();
        assert_eq!(loader_entry_selected(&dir).as_deref(), Some("rayos-rescue.conf"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
