//! The VM registry file `vms.json`: `{"schema_version":1,"vms":[…]}`, one [`VmRecord`] per VM.
//! rayosd owns the file (load, backup, corrupt handling); the installer writes the first one.
//! Both write through [`atomic_write`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The schema this code reads and writes. Older versions would be migrated here; a newer
/// one is treated as unreadable (kept aside, never overwritten by an older RayOS).
pub const SCHEMA_VERSION: u32 = 1;
pub const FILE_NAME: &str = "vms.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmKind {
    Linux,
    Windows,
}

impl VmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VmKind::Linux => "linux",
            VmKind::Windows => "windows",
        }
    }
}

impl std::str::FromStr for VmKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linux" => Ok(VmKind::Linux),
            "windows" => Ok(VmKind::Windows),
            _ => Err(format!("VM kind {s:?} is not linux or windows")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRecord {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// What the VMM builds for this VM (turned into a [`crate::spec::VmSpec`] at each start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    /// The VM's display, when it has one: a fixed size, or the primary monitor's mode.
    #[serde(default)]
    pub display: Option<DisplayConfig>,
    #[serde(default)]
    pub input: bool,
    #[serde(default)]
    pub net_taps: Vec<String>,
    #[serde(default)]
    pub rng: bool,
    /// Offer the `org.rayos.agent` virtio-console port.
    #[serde(default)]
    pub agent: bool,
}

/// A display size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisplaySize {
    pub width: u32,
    pub height: u32,
}

impl DisplaySize {
    pub const fn new(width: u32, height: u32) -> DisplaySize {
        DisplaySize { width, height }
    }
}

impl std::fmt::Display for DisplaySize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// How big a VM's display is. In the file: `[width, height]` for a fixed size (the only
/// form before the display could follow the monitor, so old registries read unchanged) or
/// `"monitor"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisplayConfig {
    /// Always this size (what EDID announces to the guest as its preferred mode).
    Fixed(DisplaySize),
    /// At each cold start, the primary monitor's mode as the compositor last reported it to
    /// rayosd, so the presented guest is shown 1:1; a resume keeps the size it was saved with.
    FollowMonitor,
}

impl DisplayConfig {
    /// The word `"monitor"` stands for [`DisplayConfig::FollowMonitor`] in the file and on
    /// rayosctl's command line.
    pub const MONITOR: &'static str = "monitor";
}

impl Serialize for DisplayConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DisplayConfig::Fixed(d) => (d.width, d.height).serialize(s),
            DisplayConfig::FollowMonitor => s.serialize_str(Self::MONITOR),
        }
    }
}

impl<'de> Deserialize<'de> for DisplayConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // By hand rather than `#[serde(untagged)]`, whose error names neither form.
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = DisplayConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a display size [width, height] or \"{}\"", DisplayConfig::MONITOR)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DisplayConfig, E> {
                match v {
                    DisplayConfig::MONITOR => Ok(DisplayConfig::FollowMonitor),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<DisplayConfig, A::Error> {
                use serde::de::Error;
                let side = |e: A::Error| A::Error::custom(format!("display size: {e}; expected [width, height] or \"{}\"", DisplayConfig::MONITOR));
                let width: u32 = seq.next_element().map_err(side)?.ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let height: u32 = seq.next_element().map_err(side)?.ok_or_else(|| A::Error::invalid_length(1, &self))?;
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(A::Error::invalid_length(3, &self));
                }
                Ok(DisplayConfig::Fixed(DisplaySize { width, height }))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart after a VMM crash (with backoff, until a crash loop).
    OnFailure,
    Never,
}

/// What an orderly shutdown or reboot of RayOS does with a running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnShutdown {
    /// Save it to the data volume; the next start resumes it where it was.
    #[default]
    Save,
    /// Press its power button (forced after a timeout); the next start boots it afresh.
    Shutdown,
}

impl OnShutdown {
    pub fn as_str(self) -> &'static str {
        match self {
            OnShutdown::Save => "save",
            OnShutdown::Shutdown => "shutdown",
        }
    }
}

/// What network a VM gets. Off unless the policy says otherwise (the Linux subsystem
/// contract): RayOS, not the guest, decides. A change takes effect at the VM's next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// No network device at all: the guest sees no link.
    #[default]
    Off,
    /// A virtio-net link on RayOS's private network (`rayos_proto::net::NAT_BRIDGE`): a
    /// lease from RayOS's DHCP server, DNS through RayOS, out through the uplink by
    /// masquerade; other VMs and RayOS's own services are out of reach.
    Nat,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Off => "off",
            Network::Nat => "nat",
        }
    }
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Network::Off),
            "nat" => Ok(Network::Nat),
            _ => Err(format!("network {s:?} is not \"off\" or \"nat\"")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Start at boot in installed mode, without switching the display to it.
    pub autostart_hidden: bool,
    pub restart: RestartPolicy,
    #[serde(default)]
    pub on_shutdown: OnShutdown,
    #[serde(default)]
    pub network: Network,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { autostart_hidden: false, restart: RestartPolicy::OnFailure, on_shutdown: OnShutdown::Save, network: Network::Off }
    }
}

/// A disk image as it was when a VM was saved: a resume needs the very same contents, and
/// any write since (a guest, or an offline edit) changes the size, mtime or ctime.
/// The device number is not compared: the kernel numbers block devices in probe order, so a
/// disk added to the machine renumbers the data volume without changing a byte of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskIdentity {
    pub path: PathBuf,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// A VM saved by the supervisor (`vms/<uuid>/saved-<generation>/`): what a start resumes.
/// The registry is the one place that vouches for a saved state: a state folder it does not
/// name is never resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    pub generation: u64,
    /// Seconds since the Unix epoch.
    pub saved_at: u64,
    /// Guest RAM, and the bytes of it written (non-zero pages).
    pub memory_bytes: u64,
    pub written_bytes: u64,
    /// Every writable disk, as it was once the saved VMM had exited.
    pub disks: Vec<DiskIdentity>,
    /// The display size the VM ran with: its framebuffer is in the state, so a resume keeps
    /// it whatever the monitor is now. Absent for VMs without a display (and in states saved
    /// before a display could follow the monitor: those had a fixed size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<DisplaySize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub id: Uuid,
    pub name: String,
    pub kind: VmKind,
    pub disks: Vec<DiskRecord>,
    pub config: DeviceConfig,
    pub policy: Policy,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(default)]
    pub last_booted_at: Option<u64>,
    /// The user and settings the guest agent sets up at the VM's first boot (the default
    /// Linux VM's, from the installer); absent for VMs without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firstboot: Option<crate::firstboot::FirstBoot>,
    /// The state the next start resumes, if the VM was saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<SavedState>,
    /// The last save generation handed out: generations only grow, so a state folder left
    /// from an older save never matches the record.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub save_generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The default Linux guest's kernel file in its VM folder: the RayOS kernel as an uncompressed
/// ELF vmlinux, which rayos-vmm boots without the guest decompressing a bzImage.
pub const DEFAULT_LINUX_KERNEL: &str = "vmlinux";

/// The kernel command line of the default Linux guest (`rootfs_builder::guest::CMDLINE`).
pub const DEFAULT_LINUX_CMDLINE: &str = "console=tty1 console=ttyS0,115200 root=/dev/vda rw panic=10";

impl VmRecord {
    /// The default Linux subsystem as the installer registers it: its files in `vm_dir`
    /// (`/data/vms/<id>/`): `disk.img` (the Debian ext4 image) and [`DEFAULT_LINUX_KERNEL`] (the
    /// RayOS kernel as a stripped ELF; an installer whose medium lacks it points `kernel` at
    /// the bzImage, `vmlinuz`, instead);
    /// 2 vCPUs, 2 GiB, a display that follows the monitor, input, the agent port; autostart
    /// hidden, restarted on failure.
    pub fn default_linux(id: Uuid, vm_dir: &Path) -> VmRecord {
        VmRecord {
            id,
            name: "linux".into(),
            kind: VmKind::Linux,
            disks: vec![DiskRecord { path: vm_dir.join("disk.img"), read_only: false }],
            config: DeviceConfig {
                vcpus: 2,
                memory_mib: 2048,
                kernel: vm_dir.join(DEFAULT_LINUX_KERNEL),
                initramfs: None,
                cmdline: DEFAULT_LINUX_CMDLINE.into(),
                display: Some(DisplayConfig::FollowMonitor),
                input: true,
                net_taps: vec![],
                rng: true,
                agent: true,
            },
            policy: Policy { autostart_hidden: true, restart: RestartPolicy::OnFailure, on_shutdown: OnShutdown::Save, network: Network::Off },
            created_at: now_secs(),
            last_booted_at: None,
            firstboot: None,
            saved: None,
            save_generation: 0,
        }
    }
}

/// A VM name: 1-64 characters of a-z, A-Z, 0-9, '-', '_'.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    pub schema_version: u32,
    pub vms: Vec<VmRecord>,
}

impl RegistryFile {
    pub fn new(vms: Vec<VmRecord>) -> RegistryFile {
        RegistryFile { schema_version: SCHEMA_VERSION, vms }
    }

    /// The file's bytes: pretty JSON and a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("registry records always serialize");
        bytes.push(b'\n');
        bytes
    }

    /// Reads a registry file; the error says what is wrong in words for the user.
    pub fn parse(bytes: &[u8]) -> Result<RegistryFile, String> {
        // The version is read first so a newer schema is named as such, not as a field error.
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        match v.get("schema_version").and_then(|v| v.as_u64()) {
            None => return Err("no schema_version".into()),
            Some(n) if n != SCHEMA_VERSION as u64 => {
                return Err(format!("schema_version {n} is not {SCHEMA_VERSION}, the one this RayOS reads"))
            }
            Some(_) => {}
        }
        let f: RegistryFile = serde_json::from_value(v).map_err(|e| format!("bad record: {e}"))?;
        let mut seen = std::collections::HashSet::new();
        for vm in &f.vms {
            if !seen.insert(vm.id) {
                return Err(format!("VM id {} appears twice", vm.id));
            }
            if !valid_name(&vm.name) {
                return Err(format!("VM name {:?} is invalid (1-64 characters of a-z, A-Z, 0-9, '-', '_')", vm.name));
            }
        }
        Ok(f)
    }
}

/// A file operation that failed, with the file and the step.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {op}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    pub op: &'static str,
    pub source: std::io::Error,
}

fn file_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError { path: path.to_path_buf(), op, source }
}

pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(file_err(dir, "fsync of the directory"))
}

/// Temp file in the same directory, fsync, rename over `path`, fsync the directory: a reader
/// sees the old file or the new one, never a torn one, even across a power cut.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        // Only root (rayosd) reads the registry: the VMs' own users must not.
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut f = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(file_err(&tmp, "create"))?;
        // A temp file left by a crash keeps its old mode through `open`.
        f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(file_err(&tmp, "chmod"))?;
        f.write_all(bytes).map_err(file_err(&tmp, "write"))?;
        f.sync_all().map_err(file_err(&tmp, "fsync"))?;
    }
    std::fs::rename(&tmp, path).map_err(file_err(path, "rename into place"))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry as installed disks hold it today: it must keep reading.
    const INSTALLED: &str = r#"{
  "schema_version": 1,
  "vms": [
    {
      "id": "0b0c6c6e-3c5e-4a57-9d56-7c1b7f0d2a11",
      "name": "linux",
      "kind": "linux",
      "disks": [
        {
          "path": "/vms/0b0c6c6e-3c5e-4a57-9d56-7c1b7f0d2a11/disk.img",
          "read_only": false
        }
      ],
      "config": {
        "vcpus": 2,
        "memory_mib": 2048,
        "kernel": "/vms/0b0c6c6e-3c5e-4a57-9d56-7c1b7f0d2a11/vmlinux",
        "initramfs": null,
        "cmdline": "console=tty1 console=ttyS0,115200 root=/dev/vda rw panic=10",
        "display": [
          1280,
          800
        ],
        "input": true,
        "net_taps": [],
        "rng": true,
        "agent": true
      },
      "policy": {
        "autostart_hidden": true,
        "restart": "on-failure",
        "on_shutdown": "save",
        "network": "nat"
      },
      "created_at": 1764806400,
      "last_booted_at": null
    }
  ]
}
"#;

    #[test]
    fn an_installed_registry_reads_and_writes_back_byte_for_byte() {
        let f = RegistryFile::parse(INSTALLED.as_bytes()).unwrap();
        assert_eq!(f.vms.len(), 1);
        let vm = &f.vms[0];
        let fixed = Some(DisplayConfig::Fixed(DisplaySize::new(1280, 800)));
        assert_eq!((vm.name.as_str(), vm.kind, vm.config.display), ("linux", VmKind::Linux, fixed));
        assert_eq!(vm.policy.restart, RestartPolicy::OnFailure);
        assert_eq!(String::from_utf8(f.to_bytes()).unwrap(), INSTALLED);
        // A registry from before saved states reads with their defaults: save at shutdown,
        // nothing saved.
        let old = INSTALLED.replace(",\n        \"on_shutdown\": \"save\"", "");
        assert_ne!(old, INSTALLED);
        let vm = RegistryFile::parse(old.as_bytes()).unwrap().vms.remove(0);
        assert_eq!((vm.policy.on_shutdown, vm.saved, vm.save_generation), (OnShutdown::Save, None, 0));
        assert_eq!(vm.policy.network, Network::Nat);
        // One from before VM networks: no network, as the subsystem contract says.
        let old = INSTALLED.replace(",\n        \"network\": \"nat\"", "");
        assert_ne!(old, INSTALLED);
        assert_eq!(RegistryFile::parse(old.as_bytes()).unwrap().vms[0].policy.network, Network::Off);
        let bad = INSTALLED.replace("\"network\": \"nat\"", "\"network\": \"bridge\"");
        let e = RegistryFile::parse(bad.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("bridge"), "{e}");
    }

    #[test]
    fn a_display_is_a_fixed_size_or_follows_the_monitor() {
        // The installed file above stores `[1280, 800]`: a fixed size (tested above). The
        // other form, and the default Linux VM, which follows the monitor:
        let monitor = INSTALLED.replace("\"display\": [\n          1280,\n          800\n        ]", "\"display\": \"monitor\"");
        assert_ne!(monitor, INSTALLED);
        let f = RegistryFile::parse(monitor.as_bytes()).unwrap();
        assert_eq!(f.vms[0].config.display, Some(DisplayConfig::FollowMonitor));
        assert_eq!(String::from_utf8(f.to_bytes()).unwrap(), monitor, "the new form writes back as it was read");
        let none = INSTALLED.replace("\"display\": [\n          1280,\n          800\n        ]", "\"display\": null");
        assert_eq!(RegistryFile::parse(none.as_bytes()).unwrap().vms[0].config.display, None);

        let linux = VmRecord::default_linux(Uuid::new_v4(), Path::new("/data/vms/x"));
        assert_eq!(linux.config.display, Some(DisplayConfig::FollowMonitor));
        let back = RegistryFile::parse(&RegistryFile::new(vec![linux.clone()]).to_bytes()).unwrap();
        assert_eq!(back.vms[0], linux);

        // Anything else is refused, naming what was there and what is allowed.
        for (bad, named) in [("\"screen\"", "screen"), ("[1280]", "length 1"), ("[1280, 800, 2]", "length 3"), ("[-1, 800]", "-1"), ("{\"width\": 1280}", "map")] {
            let text = INSTALLED.replace("\"display\": [\n          1280,\n          800\n        ]", &format!("\"display\": {bad}"));
            let e = RegistryFile::parse(text.as_bytes()).unwrap_err();
            assert!(e.contains(named) && e.contains("[width, height] or \"monitor\""), "{bad}: {e}");
        }
    }

    #[test]
    fn a_saved_state_keeps_its_display_size() {
        let mut f = RegistryFile::parse(INSTALLED.as_bytes()).unwrap();
        let saved = SavedState { generation: 3, saved_at: 1, memory_bytes: 2, written_bytes: 1, disks: vec![], display: Some(DisplaySize::new(1920, 1080)) };
        f.vms[0].saved = Some(saved.clone());
        let text = String::from_utf8(f.to_bytes()).unwrap();
        assert!(text.contains("\"display\": {\n          \"width\": 1920,\n          \"height\": 1080\n        }"), "{text}");
        assert_eq!(RegistryFile::parse(text.as_bytes()).unwrap().vms[0].saved, Some(saved));
        // A state saved before the size was recorded reads without one.
        let old = text.replace(",\n        \"display\": {\n          \"width\": 1920,\n          \"height\": 1080\n        }", "");
        assert_ne!(old, text);
        assert_eq!(RegistryFile::parse(old.as_bytes()).unwrap().vms[0].saved.as_ref().unwrap().display, None);
    }

    #[test]
    fn a_first_boot_setup_is_kept_in_the_record_and_checked() {
        use crate::firstboot::{FirstBoot, FirstBootState, GuestSetup};
        let mut f = RegistryFile::parse(INSTALLED.as_bytes()).unwrap();
        assert_eq!(f.vms[0].firstboot, None, "a record without one reads as before");
        let setup = GuestSetup {
            user: "alice".into(),
            password_hash: crate::firstboot::tests::HASH.into(),
            timezone: "Europe/Paris".into(),
            locale: "fr_FR.UTF-8".into(),
            keymap: "fr".into(),
        };
        f.vms[0].firstboot = Some(FirstBoot::new(setup));
        let text = String::from_utf8(f.to_bytes()).unwrap();
        assert!(text.contains("\"firstboot\": {\n        \"setup\": {\n          \"user\": \"alice\""), "{text}");
        assert!(text.contains("\"state\": \"pending\""), "{text}");
        let back = RegistryFile::parse(text.as_bytes()).unwrap();
        assert_eq!(back, f);
        assert_eq!(back.vms[0].firstboot.as_ref().unwrap().state, FirstBootState::Pending);
        let e = RegistryFile::parse(text.replace("\"state\": \"pending\"", "\"state\": \"later\"").as_bytes()).unwrap_err();
        assert!(e.contains("later"), "{e}");
        let e = RegistryFile::parse(text.replace("\"user\"", "\"username\"").as_bytes()).unwrap_err();
        assert!(e.contains("username"), "{e}");
    }

    #[test]
    fn bad_files_are_named_by_what_is_wrong() {
        assert!(RegistryFile::parse(b"{\"schema_version\":1,\"vms\":[").unwrap_err().contains("not JSON"));
        assert!(RegistryFile::parse(b"{}").unwrap_err().contains("no schema_version"));
        assert!(RegistryFile::parse(br#"{"schema_version":2,"vms":[]}"#).unwrap_err().contains("schema_version 2"));
        let typo = INSTALLED.replace("\"rng\"", "\"rgn\"");
        assert!(RegistryFile::parse(typo.as_bytes()).unwrap_err().contains("rgn"));
        let twice = RegistryFile::parse(INSTALLED.as_bytes()).unwrap();
        let twice = RegistryFile::new(vec![twice.vms[0].clone(), twice.vms[0].clone()]);
        assert!(RegistryFile::parse(&twice.to_bytes()).unwrap_err().contains("appears twice"));
        let badname = INSTALLED.replace("\"name\": \"linux\"", "\"name\": \"a b\"");
        assert!(RegistryFile::parse(badname.as_bytes()).unwrap_err().contains("\"a b\""));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let d = std::env::temp_dir().join(format!("proto-registry-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(FILE_NAME);
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!d.join("vms.json.tmp").exists());
        let e = atomic_write(&d.join("no-such-dir/vms.json"), b"x").unwrap_err().to_string();
        assert!(e.contains("no-such-dir") && e.contains("create"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
