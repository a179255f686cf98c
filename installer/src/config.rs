//! The first-boot configuration written to `/data/config/system.toml`, and its validation
//! (shared by the wizard's fields and the answer file).

use serde::{Deserialize, Serialize};

use crate::plan::VmStorage;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub autostart_linux_hidden: bool,
    pub autostart_windows_hidden: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemConfig {
    pub hostname: String,
    pub timezone: String,
    pub locale: String,
    pub keymap: String,
    pub policy: Policy,
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig {
            hostname: "rayos".into(),
            timezone: "UTC".into(),
            locale: "en_US.UTF-8".into(),
            keymap: "us".into(),
            policy: Policy { autostart_linux_hidden: true, autostart_windows_hidden: true },
        }
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
pub fn check_hostname(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("{s:?}: must be 1 to 253 characters"));
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("{s:?}: letters, digits and inner '-' only, labels of 1 to 63 characters"));
        }
    }
    Ok(())
}

/// An IANA zone name like `Europe/Paris` or `UTC`. The zone database is not in the initramfs,
/// so only the form is checked.
pub fn check_timezone(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && !s.starts_with('/')
        && !s.contains("..")
        && s.split('/').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+-".contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?}: not a time zone name like \"Europe/Paris\" or \"UTC\""))
    }
}

/// `ll[_CC][.UTF-8]`, e.g. `en_US.UTF-8`, `de_DE`, `C.UTF-8`.
pub fn check_locale(s: &str) -> Result<(), String> {
    let (base, codeset) = s.split_once('.').unwrap_or((s, ""));
    let (lang, country) = base.split_once('_').unwrap_or((base, ""));
    let ok = (lang == "C" || ((2..=3).contains(&lang.len()) && lang.bytes().all(|b| b.is_ascii_lowercase())))
        && (country.is_empty() || (country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase())))
        && (codeset.is_empty() || codeset == "UTF-8" || codeset == "utf8");
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?}: not a locale like \"en_US.UTF-8\""))
    }
}

pub fn check_keymap(s: &str) -> Result<(), String> {
    let ok = !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?}: not a keyboard layout name like \"us\" or \"de-latin1\""))
    }
}

impl SystemConfig {
    /// First failing field as (field name, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        check_hostname(&self.hostname).map_err(|e| ("hostname", e))?;
        check_timezone(&self.timezone).map_err(|e| ("timezone", e))?;
        check_locale(&self.locale).map_err(|e| ("locale", e))?;
        check_keymap(&self.keymap).map_err(|e| ("keymap", e))?;
        Ok(())
    }
}

/// The `system.toml` document: its schema is shared with rayosd, which reads it.
pub use rayos_proto::system::{SystemPolicy, SystemToml, VmStorage as VmStorageToml, VmStorageKind};

pub fn system_toml(cfg: &SystemConfig, vm: &VmStorage, vm_part_uuid: Option<uuid::Uuid>) -> String {
    let vm_storage = match vm {
        VmStorage::DataVolume => VmStorageToml { kind: VmStorageKind::DataVolume, location: None },
        VmStorage::DedicatedPartition { .. } => {
            VmStorageToml { kind: VmStorageKind::Partition, location: vm_part_uuid.map(|u| u.to_string()) }
        }
        VmStorage::Path(p) => VmStorageToml { kind: VmStorageKind::Path, location: Some(p.clone()) },
    };
    let doc = SystemToml {
        schema_version: rayos_proto::system::SCHEMA_VERSION,
        machine_name: cfg.hostname.clone(),
        timezone: cfg.timezone.clone(),
        locale: cfg.locale.clone(),
        keymap: cfg.keymap.clone(),
        autostart_vms: true,
        policy: SystemPolicy {
            autostart_linux_hidden: cfg.policy.autostart_linux_hidden,
            autostart_windows_hidden: cfg.policy.autostart_windows_hidden,
        },
        vm_storage,
    };
    doc.to_toml()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_checks_accept_common_values_and_reject_garbage() {
        assert!(check_hostname("rayos-box.lan").is_ok());
        assert!(check_hostname("-bad").is_err());
        assert!(check_hostname("has space").is_err());
        assert!(check_timezone("Europe/Paris").is_ok());
        assert!(check_timezone("America/Argentina/Buenos_Aires").is_ok());
        assert!(check_timezone("../etc/passwd").is_err());
        assert!(check_locale("en_US.UTF-8").is_ok());
        assert!(check_locale("C.UTF-8").is_ok());
        assert!(check_locale("english").is_err());
        assert!(check_keymap("de-latin1").is_ok());
        assert!(check_keymap("us uk").is_err());
    }

    #[test]
    fn system_toml_round_trips() {
        let text = system_toml(&SystemConfig::default(), &VmStorage::Path("/data/vmdisks".into()), None);
        let back: SystemToml = toml::from_str(&text).unwrap();
        assert_eq!(back.machine_name, "rayos");
        assert_eq!(back.vm_storage.kind, VmStorageKind::Path);
        assert_eq!(back.vm_storage.location.as_deref(), Some("/data/vmdisks"));
    }
}
