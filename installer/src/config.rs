//! The first-boot configuration written to `/data/config/system.toml`, and its validation
//! (shared by the wizard's fields and the answer file).

use serde::{Deserialize, Serialize};

use crate::plan::VmStorage;

pub use rayos_proto::registry::{Network, OnShutdown};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub autostart_linux_hidden: bool,
    /// Always false: Windows VMs do not exist yet, so neither the wizard nor the answer file
    /// sets it (kept so system.toml keeps its shape).
    pub autostart_windows_hidden: bool,
    /// The default Linux VM's `policy.on_shutdown`: saved at RayOS shutdown and resumed at the
    /// next boot (the default), or shut down with RayOS and booted afresh.
    pub linux_on_shutdown: OnShutdown,
    /// The default Linux VM's `policy.network`: a private NAT link out through RayOS's
    /// uplink (what the wizard suggests) or none.
    #[serde(default)]
    pub linux_network: Network,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemConfig {
    pub hostname: String,
    pub timezone: String,
    pub locale: String,
    pub keymap: String,
    pub policy: Policy,
    /// The default Linux VM's user (the wizard's "Linux user" step, the answer file's
    /// `[linux_user]`); None until chosen.
    pub linux_user: Option<LinuxUser>,
}

/// The default Linux VM's user: its name and its password's SHA-512 crypt hash. The password
/// itself is never kept: [`hash_password`] turns it into this as soon as it is typed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxUser {
    pub name: String,
    pub password_hash: String,
}

/// The user name rule (`rayos_proto::firstboot::check_user_name`): lowercase, `[a-z_][a-z0-9_-]*`,
/// at most 32 characters, no name the system keeps.
pub use rayos_proto::firstboot::{check_password_hash, check_user_name};

/// SHA-512 crypt (`$6$…`, as /etc/shadow holds it), with a random salt from the OS.
pub fn hash_password(password: &str) -> Result<String, String> {
    if password.is_empty() {
        return Err("empty: type a password".into());
    }
    let mut salt = [0u8; 12];
    getrandom::fill(&mut salt).map_err(|e| format!("a random salt: {e}"))?;
    hash_with_salt(password, &salt)
}

/// 12 salt bytes are 16 crypt-base64 characters: glibc's crypt reads at most 16, so a longer
/// salt (the crate's own default) would hash differently in the guest.
fn hash_with_salt(password: &str, salt: &[u8; 12]) -> Result<String, String> {
    use sha_crypt::{PasswordHasher, ShaCrypt};
    let hash = ShaCrypt::default().hash_password_with_salt(password.as_bytes(), salt).map_err(|e| format!("hashing the password: {e}"))?;
    Ok(hash.as_str().to_string())
}

/// Whether `password` is the one `hash` was made from.
pub fn verify_password(password: &str, hash: &str) -> bool {
    use sha_crypt::{PasswordHashRef, PasswordVerifier, ShaCrypt};
    PasswordHashRef::new(hash).is_ok_and(|h| ShaCrypt::default().verify_password(password.as_bytes(), h).is_ok())
}

impl LinuxUser {
    /// The guest agent's first-boot setup for the default Linux VM: this user, and the
    /// system's time zone, locale and keymap.
    pub fn first_boot(&self, cfg: &SystemConfig) -> rayos_proto::firstboot::FirstBoot {
        rayos_proto::firstboot::FirstBoot::new(rayos_proto::firstboot::GuestSetup {
            user: self.name.clone(),
            password_hash: self.password_hash.clone(),
            timezone: cfg.timezone.clone(),
            locale: cfg.locale.clone(),
            keymap: cfg.keymap.clone(),
        })
    }
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig {
            hostname: "rayos".into(),
            timezone: "UTC".into(),
            locale: "en_US.UTF-8".into(),
            keymap: "us".into(),
            policy: Policy {
                autostart_linux_hidden: true,
                autostart_windows_hidden: false,
                linux_on_shutdown: OnShutdown::Save,
                linux_network: Network::Nat,
            },
            linux_user: None,
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

/// A zone of the tz database RayOS carries (compiled in through `chrono-tz`), e.g.
/// `Europe/Paris`, `America/Argentina/Buenos_Aires`, `UTC`.
pub fn check_timezone(s: &str) -> Result<(), String> {
    if s.parse::<chrono_tz::Tz>().is_ok() {
        return Ok(());
    }
    // Help with the usual slips: case, spaces for underscores, a region alone.
    let norm = |x: &str| x.to_ascii_lowercase().replace(' ', "_");
    let close: Vec<&str> = chrono_tz::TZ_VARIANTS
        .iter()
        .map(|z| z.name())
        .filter(|z| norm(z) == norm(s) || (!s.is_empty() && norm(z).starts_with(&format!("{}/", norm(s)))))
        .take(4)
        .collect();
    let hint = if close.is_empty() { String::new() } else { format!(" (did you mean {}?)", close.join(", ")) };
    Err(format!("{s:?} is not a time zone: use a tz database name like \"Europe/Paris\", \"America/New_York\" or \"UTC\"{hint}"))
}

/// The locales RayOS offers (glibc names, UTF-8).
pub const LOCALES: &[&str] = &[
    "C.UTF-8", "ar_EG.UTF-8", "bg_BG.UTF-8", "ca_ES.UTF-8", "cs_CZ.UTF-8", "da_DK.UTF-8", "de_AT.UTF-8", "de_CH.UTF-8",
    "de_DE.UTF-8", "el_GR.UTF-8", "en_AU.UTF-8", "en_CA.UTF-8", "en_GB.UTF-8", "en_IE.UTF-8", "en_IN.UTF-8",
    "en_NZ.UTF-8", "en_US.UTF-8", "en_ZA.UTF-8", "es_AR.UTF-8", "es_ES.UTF-8", "es_MX.UTF-8", "et_EE.UTF-8",
    "fi_FI.UTF-8", "fr_BE.UTF-8", "fr_CA.UTF-8", "fr_CH.UTF-8", "fr_FR.UTF-8", "he_IL.UTF-8", "hi_IN.UTF-8",
    "hr_HR.UTF-8", "hu_HU.UTF-8", "id_ID.UTF-8", "is_IS.UTF-8", "it_CH.UTF-8", "it_IT.UTF-8", "ja_JP.UTF-8",
    "ko_KR.UTF-8", "lt_LT.UTF-8", "lv_LV.UTF-8", "nb_NO.UTF-8", "nl_BE.UTF-8", "nl_NL.UTF-8", "pl_PL.UTF-8",
    "pt_BR.UTF-8", "pt_PT.UTF-8", "ro_RO.UTF-8", "ru_RU.UTF-8", "sk_SK.UTF-8", "sl_SI.UTF-8", "sr_RS.UTF-8",
    "sv_SE.UTF-8", "th_TH.UTF-8", "tr_TR.UTF-8", "uk_UA.UTF-8", "vi_VN.UTF-8", "zh_CN.UTF-8", "zh_TW.UTF-8",
];

/// Console keyboard layouts RayOS offers: names of Debian's console-data keymaps, which both the
/// guest's `loadkeys` and the installer's (on the screen's VT, `installer::keymap`) load.
pub const KEYMAPS: &[&str] = &[
    "be-latin1", "bg", "br-abnt2", "by", "cf", "croat", "cz-lat2", "de", "de-latin1", "de-latin1-nodeadkeys", "dk",
    "dvorak", "es", "et", "fi", "fr", "fr-latin1", "fr-latin9", "fr_CH", "gr", "hu", "il", "is-latin1", "it", "jp106",
    "la-latin1", "lt", "lv-latin7", "mk", "nl", "no", "pl", "pt-latin1", "ro", "ru", "se-latin1", "sg", "sg-latin1",
    "sk-qwerty", "sk-qwertz", "slovene", "sr-cy", "trq", "ua", "uk", "us", "us-intl.iso15",
];

/// Names RayOS once offered that console-data does not have (the guest could not load them),
/// with the layout to use instead. Refused with that name rather than mapped: an answer file
/// says exactly which layout its user gets.
pub const RETIRED_KEYMAPS: &[(&str, &str)] = &[
    // console-data has no Bulgarian BDS layout: its "bg" is the phonetic one.
    ("bg_bds-utf8", "bg"),
    ("cz", "cz-lat2"),
    ("de_CH-latin1", "sg-latin1"),
    ("lv", "lv-latin7"),
    ("us-acentos", "us-intl.iso15"),
];

/// One of `LOCALES`.
pub fn check_locale(s: &str) -> Result<(), String> {
    if LOCALES.contains(&s) {
        return Ok(());
    }
    // "de_DE" or "de_DE.utf8" mean the UTF-8 locale; say which name to write.
    let base = s.split('.').next().unwrap_or(s);
    let close: Vec<&str> = LOCALES.iter().copied().filter(|l| l.split('.').next() == Some(base) || l.starts_with(&format!("{base}_"))).take(4).collect();
    let hint = if close.is_empty() { String::new() } else { format!(" (did you mean {}?)", close.join(", ")) };
    Err(format!("{s:?} is not a locale RayOS knows: use one like \"en_US.UTF-8\" or \"de_DE.UTF-8\"{hint}"))
}

/// One of `KEYMAPS`.
pub fn check_keymap(s: &str) -> Result<(), String> {
    if KEYMAPS.contains(&s) {
        return Ok(());
    }
    if let Some((_, new)) = RETIRED_KEYMAPS.iter().find(|(old, _)| *old == s) {
        let note = if *new == "bg" { " (the phonetic Bulgarian layout: there is no BDS one)" } else { "" };
        return Err(format!("{s:?} is no longer offered (Debian's console-data has no such keymap): use {new:?} instead{note}"));
    }
    let close: Vec<&str> = KEYMAPS.iter().copied().filter(|k| !s.is_empty() && (k.starts_with(s) || s.starts_with(*k))).take(4).collect();
    let hint = if close.is_empty() { String::new() } else { format!(" (did you mean {}?)", close.join(", ")) };
    Err(format!("{s:?} is not a keyboard layout RayOS knows: use one like \"us\", \"uk\", \"de\" or \"fr\"{hint}"))
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
            linux_on_shutdown: cfg.policy.linux_on_shutdown,
            linux_network: cfg.policy.linux_network,
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
        assert!(check_timezone("UTC").is_ok());
        assert!(check_timezone("../etc/passwd").is_err());
        assert!(check_locale("en_US.UTF-8").is_ok());
        assert!(check_locale("C.UTF-8").is_ok());
        assert!(check_locale("english").is_err());
        assert!(check_keymap("de-latin1").is_ok());
        assert!(check_keymap("us uk").is_err());
    }

    #[test]
    fn only_names_from_the_lists_rayos_carries_are_taken_and_errors_suggest_one() {
        // Well formed, but no such zone, locale or layout.
        let e = check_timezone("Europe/Atlantis").unwrap_err();
        assert!(e.starts_with("\"Europe/Atlantis\" is not a time zone: use a tz database name like"), "{e}");
        let e = check_timezone("europe/paris").unwrap_err();
        assert!(e.ends_with("(did you mean Europe/Paris?)"), "{e}");
        let e = check_locale("de_DE").unwrap_err();
        assert!(e.ends_with("(did you mean de_DE.UTF-8?)"), "{e}");
        assert!(check_locale("xx_XX.UTF-8").is_err());
        let e = check_keymap("qwertz").unwrap_err();
        assert!(e.starts_with("\"qwertz\" is not a keyboard layout RayOS knows"), "{e}");
        assert!(check_keymap("de").is_ok() && check_keymap("uk").is_ok());
        // Every default is in its list.
        assert!(SystemConfig::default().validate().is_ok());
    }

    /// Every offered layout must load in the guest (`loadkeys NAME` from console-data) and on
    /// the installer's screen (the builder ships console-data's files for these names).
    #[test]
    fn every_offered_keymap_is_in_debians_console_data() {
        let pinned: Vec<&str> =
            include_str!("../data/console-data-keymaps.txt").lines().filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        assert!(pinned.len() > 100 && pinned.contains(&"de"), "the pinned list is read");
        let missing: Vec<&str> = KEYMAPS.iter().copied().filter(|k| !pinned.contains(k)).collect();
        assert!(missing.is_empty(), "offered but not in console-data: {missing:?}");
        for (old, new) in RETIRED_KEYMAPS {
            assert!(!pinned.contains(old) && !KEYMAPS.contains(old), "{old} is retired because console-data lacks it");
            assert!(KEYMAPS.contains(new), "{old}'s replacement {new} is offered");
        }
    }

    #[test]
    fn a_retired_keymap_is_refused_naming_its_replacement() {
        let e = check_keymap("cz").unwrap_err();
        assert_eq!(e, "\"cz\" is no longer offered (Debian's console-data has no such keymap): use \"cz-lat2\" instead");
        assert!(check_keymap("de_CH-latin1").unwrap_err().ends_with("use \"sg-latin1\" instead"));
        assert!(check_keymap("bg_bds-utf8").unwrap_err().ends_with("use \"bg\" instead (the phonetic Bulgarian layout: there is no BDS one)"));
        assert!(check_keymap("cz-lat2").is_ok() && check_keymap("sg-latin1").is_ok() && check_keymap("lv-latin7").is_ok());
    }

    #[test]
    fn passwords_are_hashed_with_sha512_crypt_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$6$"), "{h}");
        assert_eq!(check_password_hash(&h), Ok(()), "what we make is what the agent takes");
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct hors", &h));
        assert_ne!(hash_password("correct horse").unwrap(), h, "a fresh salt each time");
        assert!(!h.contains("correct"));
        // The hash the QEMU test's guest logs in with (made by Python's crypt(3)).
        let py = "$6$rayostestsalt$IU/hlK7ZQjeRIP2O3MMET0d1BP6g7JyoiNZtxu8C2NioljB5lphidcPuoRBJAqnnirtwi73pKAcnpwLxKQSzT/";
        assert!(verify_password("Tr0ub4dor&3", py));
        assert!(!verify_password("Tr0ub4dor&4", py));
        assert!(hash_password("").unwrap_err().starts_with("empty"));
        // Byte for byte what the guest's glibc makes (python3 crypt.crypt("secret", that salt)).
        assert_eq!(
            hash_with_salt("secret", &[7; 12]).unwrap(),
            "$6$rounds=5000$5Qk/5Qk/5Qk/5Qk/$uJoz4zXGqIpkmFM8PDSNYMvBeem0rJFvJrzHLGd/n1OfLwvkZj7Kxgh9LLHHSYg0r58YL0oqN6RBKEy.tXAGd1"
        );
    }

    #[test]
    fn system_toml_round_trips() {
        let text = system_toml(&SystemConfig::default(), &VmStorage::Path("/data/vmdisks".into()), None);
        let back: SystemToml = toml::from_str(&text).unwrap();
        assert_eq!(back.machine_name, "rayos");
        assert_eq!(back.policy.linux_on_shutdown, OnShutdown::Save, "kept running across reboots unless asked otherwise");
        let mut cfg = SystemConfig::default();
        cfg.policy.linux_on_shutdown = OnShutdown::Shutdown;
        let text = system_toml(&cfg, &VmStorage::DataVolume, None);
        assert!(text.contains("linux_on_shutdown = \"shutdown\""), "{text}");
        assert_eq!(back.vm_storage.kind, VmStorageKind::Path);
        assert_eq!(back.vm_storage.location.as_deref(), Some("/data/vmdisks"));
    }
}
