//! `/data/config/system.toml`: the first-boot configuration. The installer writes it
//! ([`SystemToml::to_toml`]); rayosd reads it ([`SystemToml::parse`]), taking defaults for
//! missing keys and ignoring keys it does not know (a newer installer's).

use serde::{Deserialize, Serialize};

use crate::registry::{Network, OnShutdown};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SystemToml {
    pub schema_version: u32,
    pub machine_name: String,
    pub timezone: String,
    pub locale: String,
    pub keymap: String,
    /// Start VMs marked autostart at boot (installed mode only).
    pub autostart_vms: bool,
    /// What the installer's wizard chose.
    pub policy: SystemPolicy,
    /// Where VM disks live, as the installer chose.
    pub vm_storage: VmStorage,
}

impl Default for SystemToml {
    fn default() -> Self {
        SystemToml {
            schema_version: SCHEMA_VERSION,
            machine_name: "rayos".into(),
            timezone: "UTC".into(),
            locale: "C.UTF-8".into(),
            keymap: "us".into(),
            autostart_vms: true,
            policy: SystemPolicy::default(),
            vm_storage: VmStorage::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SystemPolicy {
    pub autostart_linux_hidden: bool,
    pub autostart_windows_hidden: bool,
    /// What RayOS's shutdown does with the default Linux VM (its record's `policy.on_shutdown`
    /// holds the answer rayosd honours; this keeps what was chosen). Files from before it read
    /// as `save`, the default.
    pub linux_on_shutdown: OnShutdown,
    /// The default Linux VM's network as the installer recorded it (its record's
    /// `policy.network` is what rayosd honours). Files from before it read as `off`.
    pub linux_network: Network,
}

impl Default for SystemPolicy {
    fn default() -> Self {
        SystemPolicy { autostart_linux_hidden: true, autostart_windows_hidden: true, linux_on_shutdown: OnShutdown::Save, linux_network: Network::Off }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmStorageKind {
    /// VMs under /data/vms.
    DataVolume,
    /// A dedicated ext4 partition (`location`: its PARTUUID), mounted at /vms.
    Partition,
    /// A directory (`location`) under /data.
    Path,
}

/// `[vm_storage]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStorage {
    pub kind: VmStorageKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

impl Default for VmStorage {
    fn default() -> Self {
        VmStorage { kind: VmStorageKind::DataVolume, location: None }
    }
}

impl VmStorage {
    /// The PARTUUID of the dedicated VM partition, when there is one.
    pub fn partition(&self) -> Option<&str> {
        (self.kind == VmStorageKind::Partition).then_some(self.location.as_deref()).flatten()
    }
}

impl SystemToml {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("system.toml serializes")
    }

    pub fn parse(text: &str) -> Result<SystemToml, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What installers write today.
    const INSTALLED: &str = r#"schema_version = 1
machine_name = "desk"
timezone = "Europe/Paris"
locale = "en_US.UTF-8"
keymap = "de-latin1"
autostart_vms = true

[policy]
autostart_linux_hidden = true
autostart_windows_hidden = false
linux_on_shutdown = "shutdown"
linux_network = "nat"

[vm_storage]
kind = "partition"
location = "0a1b2c3d-0000-4000-8000-000000000001"
"#;

    #[test]
    fn an_installed_file_reads_and_writes_back_byte_for_byte() {
        let c = SystemToml::parse(INSTALLED).unwrap();
        assert_eq!(c.machine_name, "desk");
        assert_eq!(c.vm_storage.partition(), Some("0a1b2c3d-0000-4000-8000-000000000001"));
        assert!(!c.policy.autostart_windows_hidden);
        assert_eq!(c.policy.linux_on_shutdown, OnShutdown::Shutdown);
        assert_eq!(c.policy.linux_network, Network::Nat);
        assert_eq!(c.to_toml(), INSTALLED);
        let data = SystemToml { vm_storage: VmStorage::default(), ..c };
        assert!(data.to_toml().ends_with("[vm_storage]\nkind = \"data-volume\"\n"), "{}", data.to_toml());
    }

    #[test]
    fn missing_keys_take_defaults_unknown_ones_are_ignored_bad_ones_named() {
        let c = SystemToml::parse("machine_name = \"desk\"\nfuture_key = 1\n").unwrap();
        assert_eq!((c.machine_name.as_str(), c.timezone.as_str(), c.vm_storage.partition()), ("desk", "UTC", None));
        let e = SystemToml::parse("[vm_storage]\nkind = \"cloud\"\n").unwrap_err().to_string();
        assert!(e.contains("cloud") && e.contains("data-volume"), "{e}");
        assert!(SystemToml::parse("machine_name = [unterminated\n").is_err());
    }

    #[test]
    fn a_file_from_before_the_shutdown_policy_reads_as_save_and_a_bad_policy_is_named() {
        let old = INSTALLED.replace("linux_on_shutdown = \"shutdown\"\n", "");
        let c = SystemToml::parse(&old).unwrap();
        assert_eq!((c.policy.linux_on_shutdown, c.policy.autostart_windows_hidden), (OnShutdown::Save, false));
        assert!(c.to_toml().contains("linux_on_shutdown = \"save\"\n"), "{}", c.to_toml());
        let e = SystemToml::parse(&INSTALLED.replace("\"shutdown\"", "\"hibernate\"")).unwrap_err().to_string();
        assert!(e.contains("hibernate") && e.contains("save") && e.contains("shutdown"), "{e}");
    }
}
