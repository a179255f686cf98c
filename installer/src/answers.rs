//! Answer files for unattended installs (TOML). Parsed with serde, then validated field by
//! field; every error names the file and the field: `answers.toml: disk.match: …`.
//!
//! ```toml
//! version = 1
//! [disk]
//! match = { serial = "S4EWNX0R123" }   # serial, model, size, min_size, max_size, device
//! target = "whole-disk"                # or "largest-free", "partition" (+ partition = N)
//! confirm = "wipe S4EWNX0R123"         # "install <id>" suffices when nothing is destroyed
//! [storage]
//! filesystem = "ext4"
//! vm_storage = "data-volume"           # or "partition" (+ vm_storage_size), "path" (+ vm_storage_path)
//! [system]
//! hostname = "rayos"
//! timezone = "UTC"
//! locale = "en_US.UTF-8"
//! keymap = "us"
//! [linux_user]                       # the default Linux VM's user, with sudo rights
//! name = "alice"
//! password_hash = "$6$…"               # SHA-512 crypt, e.g. `mkpasswd -m sha-512`; never a plain password
//! [policy]
//! autostart_linux_hidden = true
//! linux_on_shutdown = "save"           # or "shutdown": at RayOS shutdown the Linux VM is saved (and
//!                                      # resumed at boot) or shut down (and booted afresh)
//! linux_network = "nat"                # or "off": the Linux VM's private link out through RayOS
//!                                      # (absent: "nat", what the wizard suggests)
//! # autostart_windows_hidden: Windows VMs do not exist yet; `true` is refused, false/absent accepted
//! ```

use serde::{Deserialize, Serialize};

use crate::config::{check_password_hash, check_user_name, LinuxUser, Network, OnShutdown, Policy, SystemConfig};
use crate::disks::{human_size, Disk};
use crate::plan::{Plan, Target, VmStorage};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct AnswerError {
    pub file: String,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    #[serde(rename = "match")]
    pub match_: Option<DiskMatch>,
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    pub confirm: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_storage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_storage_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_storage_path: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keymap: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autostart_linux_hidden: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autostart_windows_hidden: Option<bool>,
    /// "save" or "shutdown" (checked by `validate`, so a wrong value is named like the others).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linux_on_shutdown: Option<String>,
    /// "nat" or "off" (checked by `validate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linux_network: Option<String>,
}

/// `[linux_user]`: the default Linux VM's user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxUserSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Read only to be refused by name: the file would keep it in the clear.
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
}

/// The file as written. Optional fields are checked by `validate`, so a missing field gets the
/// same named error as a wrong one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerFile {
    pub version: Option<u32>,
    pub disk: Option<DiskSection>,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub system: SystemSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linux_user: Option<LinuxUserSection>,
}

/// A validated answer file, before it meets the machine's disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answers {
    pub disk_match: DiskMatch,
    pub target: Target,
    pub confirm: String,
    pub vm_storage: VmStorage,
    pub config: SystemConfig,
}

/// "64G", "512M", "2T", "1000000000" → bytes (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].trim_end_matches("iB").trim_end_matches('B');
            let m: u64 = match unit.to_ascii_uppercase().as_str() {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                "" => 1,
                _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
            };
            (t[..i].trim(), m)
        }
        None => (t, 1),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: not a size like \"64G\""))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok((n * mult as f64) as u64)
}

/// Maps a toml/serde error to the dotted field it concerns, using the error's position: the
/// key on that line, under the last `[table]` header above it.
fn field_at(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else { return "(file)".into() };
    let upto = &text[..span.start.min(text.len())];
    let line_start = upto.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[line_start..].find('\n').map(|i| line_start + i).unwrap_or(text.len());
    let line = &text[line_start..line_end];
    let table = upto[..line_start]
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[').and_then(|r| r.strip_suffix(']')).map(|t| t.trim().to_string()));
    let key = line.split_once('=').map(|(k, _)| k.trim().trim_matches('"').to_string());
    match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k,
        (Some(t), None) => t,
        (None, None) => format!("line {}", upto.lines().count().max(1)),
    }
}

pub fn parse(file: &str, text: &str) -> Result<Answers, AnswerError> {
    let err = |field: &str, message: String| AnswerError { file: file.to_string(), field: field.to_string(), message };
    let raw: AnswerFile = toml::from_str(text).map_err(|e| err(&field_at(text, e.span()), e.message().to_string()))?;
    validate(file, raw)
}

pub fn validate(file: &str, raw: AnswerFile) -> Result<Answers, AnswerError> {
    let err = |field: &str, message: String| AnswerError { file: file.to_string(), field: field.to_string(), message };
    match raw.version {
        Some(SCHEMA_VERSION) => {}
        Some(v) => return Err(err("version", format!("{v} is not supported (this installer reads {SCHEMA_VERSION})"))),
        None => return Err(err("version", format!("missing (write version = {SCHEMA_VERSION})"))),
    }
    let disk = raw.disk.ok_or_else(|| err("disk", "missing: the [disk] section says where to install".into()))?;
    let disk_match = disk.match_.ok_or_else(|| {
        err("disk.match", "missing: e.g. match = { serial = \"…\" } (serial, model, size, min_size, max_size, device)".into())
    })?;
    if disk_match == DiskMatch::default() {
        return Err(err("disk.match", "empty: give at least one of serial, model, size, min_size, max_size, device".into()));
    }
    for (name, v) in [("size", &disk_match.size), ("min_size", &disk_match.min_size), ("max_size", &disk_match.max_size)] {
        if let Some(v) = v {
            parse_size(v).map_err(|m| err(&format!("disk.match.{name}"), m))?;
        }
    }
    let target = match disk.target.as_deref() {
        Some("whole-disk") => Target::WholeDisk,
        Some("largest-free") => Target::LargestFree,
        Some("partition") => Target::Partition(
            disk.partition.ok_or_else(|| err("disk.partition", "missing: target = \"partition\" needs partition = N".into()))?,
        ),
        Some(other) => {
            return Err(err("disk.target", format!("{other:?}: expected \"whole-disk\", \"largest-free\" or \"partition\"")))
        }
        None => return Err(err("disk.target", "missing: \"whole-disk\", \"largest-free\" or \"partition\"".into())),
    };
    if disk.partition.is_some() && !matches!(target, Target::Partition(_)) {
        return Err(err("disk.partition", "only meaningful with target = \"partition\"".into()));
    }
    let confirm = disk
        .confirm
        .ok_or_else(|| err("disk.confirm", "missing: write confirm = \"wipe <disk serial>\" to allow writing to the disk".into()))?;

    match raw.storage.filesystem.as_deref() {
        None | Some("ext4") => {}
        Some(other) => return Err(err("storage.filesystem", format!("{other:?}: only \"ext4\" is supported"))),
    }
    let vm_storage = match raw.storage.vm_storage.as_deref() {
        None | Some("data-volume") => VmStorage::DataVolume,
        Some("partition") => {
            let s = raw.storage.vm_storage_size.as_deref().ok_or_else(|| {
                err("storage.vm_storage_size", "missing: vm_storage = \"partition\" needs a size like \"64G\"".into())
            })?;
            VmStorage::DedicatedPartition { size_bytes: parse_size(s).map_err(|m| err("storage.vm_storage_size", m))? }
        }
        Some("path") => {
            let p = raw.storage.vm_storage_path.clone().ok_or_else(|| {
                err("storage.vm_storage_path", "missing: vm_storage = \"path\" needs a directory".into())
            })?;
            if !p.starts_with("/data/") {
                return Err(err("storage.vm_storage_path", format!("{p:?}: must be a directory under /data/")));
            }
            VmStorage::Path(p)
        }
        Some(other) => {
            return Err(err(
                "storage.vm_storage",
                format!("{other:?}: expected \"data-volume\", \"partition\" or \"path\""),
            ))
        }
    };

    if raw.policy.autostart_windows_hidden == Some(true) {
        return Err(err(
            "policy.autostart_windows_hidden",
            "RayOS does not run Windows VMs yet, so there is none to autostart: remove this key or set it to false"
                .into(),
        ));
    }
    let linux_on_shutdown = match raw.policy.linux_on_shutdown.as_deref() {
        None | Some("save") => OnShutdown::Save,
        Some("shutdown") => OnShutdown::Shutdown,
        Some(other) => {
            return Err(err(
                "policy.linux_on_shutdown",
                format!("{other:?}: expected \"save\" (the Linux VM is saved at shutdown and resumed at boot) or \"shutdown\" (it is shut down and boots afresh)"),
            ))
        }
    };
    let linux_network = match raw.policy.linux_network.as_deref() {
        None => Network::Nat,
        Some(s) => s.parse::<Network>().map_err(|_| {
            err(
                "policy.linux_network",
                format!("{s:?}: expected \"nat\" (a private link out through RayOS's network) or \"off\" (no network card)"),
            )
        })?,
    };
    let user = raw.linux_user.ok_or_else(|| {
        err("linux_user", "missing: the [linux_user] section names the Linux VM's user: name = \"…\" and password_hash = \"$6$…\"".into())
    })?;
    if user.password.is_some() {
        return Err(err(
            "linux_user.password",
            "a plain password is not taken (the file would keep it readable): give password_hash = \"$6$…\", e.g. from `mkpasswd -m sha-512`".into(),
        ));
    }
    let name = user.name.ok_or_else(|| err("linux_user.name", "missing: the Linux VM's user name, e.g. name = \"alice\"".into()))?;
    check_user_name(&name).map_err(|m| err("linux_user.name", m))?;
    let password_hash = user.password_hash.ok_or_else(|| err("linux_user.password_hash", "missing: password_hash = \"$6$…\" (`mkpasswd -m sha-512`)".into()))?;
    check_password_hash(&password_hash).map_err(|m| err("linux_user.password_hash", m))?;
    let d = SystemConfig::default();
    let config = SystemConfig {
        hostname: raw.system.hostname.unwrap_or(d.hostname),
        timezone: raw.system.timezone.unwrap_or(d.timezone),
        locale: raw.system.locale.unwrap_or(d.locale),
        keymap: raw.system.keymap.unwrap_or(d.keymap),
        policy: Policy {
            autostart_linux_hidden: raw.policy.autostart_linux_hidden.unwrap_or(true),
            autostart_windows_hidden: false,
            linux_on_shutdown,
            linux_network,
        },
        linux_user: Some(LinuxUser { name, password_hash }),
    };
    config.validate().map_err(|(f, m)| err(&format!("system.{f}"), m))?;
    Ok(Answers { disk_match, target, confirm, vm_storage, config })
}

fn list_disks(disks: &[Disk]) -> String {
    disks
        .iter()
        .map(|d| format!("{} {:?} serial {:?} {}", d.name, d.model, d.serial, human_size(d.size_bytes)))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Answers {
    fn matches(&self, d: &Disk) -> bool {
        let m = &self.disk_match;
        let size = |s: &Option<String>| s.as_deref().map(|v| parse_size(v).unwrap_or(0));
        m.serial.as_ref().is_none_or(|s| *s == d.serial)
            && m.model.as_ref().is_none_or(|s| *s == d.model)
            && m.device.as_ref().is_none_or(|s| std::path::Path::new(s) == d.device || *s == d.name)
            // "size" tolerates 5%: vendors' sizes are decimal and rounded.
            && size(&m.size).is_none_or(|s| d.size_bytes.abs_diff(s) <= s / 20)
            && size(&m.min_size).is_none_or(|s| d.size_bytes >= s)
            && size(&m.max_size).is_none_or(|s| d.size_bytes <= s)
    }

    fn describe_match(&self) -> String {
        let m = &self.disk_match;
        let mut parts = Vec::new();
        for (k, v) in [
            ("serial", &m.serial),
            ("model", &m.model),
            ("size", &m.size),
            ("min_size", &m.min_size),
            ("max_size", &m.max_size),
            ("device", &m.device),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k} {v:?}"));
            }
        }
        parts.join(", ")
    }

    /// Picks the one disk the file means. Ineligible disks (boot medium, removable, …) are
    /// matched too, so the error says why the disk named in the file is refused.
    pub fn select_disk<'a>(&self, file: &str, disks: &'a [Disk]) -> Result<&'a Disk, AnswerError> {
        let err = |message: String| AnswerError { file: file.into(), field: "disk.match".into(), message };
        let found: Vec<&Disk> = disks.iter().filter(|d| self.matches(d)).collect();
        match found.as_slice() {
            [] => Err(err(format!("no disk with {} (found: {})", self.describe_match(), list_disks(disks)))),
            [d] => match d.ineligible.first() {
                Some(reason) => Err(err(format!("{} matches {}, which is refused: {reason}", self.describe_match(), d.describe()))),
                None => Ok(d),
            },
            many => Err(err(format!(
                "{} matches {} disks ({}); add serial or model to choose one",
                self.describe_match(),
                many.len(),
                many.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The confirmation the plan requires: "wipe <id>" when anything is erased, else
    /// "install <id>" (or "wipe <id>").
    pub fn check_confirm(&self, file: &str, plan: &Plan) -> Result<(), AnswerError> {
        let id = plan.disk.identity();
        let wipe = format!("wipe {id}");
        let ok = if plan.destroys_anything() || plan.new_table {
            self.confirm == wipe
        } else {
            self.confirm == wipe || self.confirm == format!("install {id}")
        };
        if ok {
            return Ok(());
        }
        let what = if plan.destroys_anything() || plan.new_table {
            format!("this install erases data on {}; write confirm = {wipe:?}", plan.disk.describe())
        } else {
            format!("write confirm = \"install {id}\" to install onto {}", plan.disk.describe())
        };
        Err(AnswerError { file: file.into(), field: "disk.confirm".into(), message: format!("{:?} does not confirm: {what}", self.confirm) })
    }
}

/// An answer file reproducing a wizard run (what "save answers" writes).
pub fn to_toml(disk: &Disk, target: &Target, vm: &VmStorage, cfg: &SystemConfig, confirm: &str) -> String {
    let (target_s, partition) = match target {
        Target::WholeDisk => ("whole-disk", None),
        Target::LargestFree => ("largest-free", None),
        Target::Partition(n) => ("partition", Some(*n)),
    };
    let mut m = DiskMatch::default();
    if disk.serial.is_empty() {
        m.model = Some(disk.model.clone());
        m.size = Some(format!("{}M", disk.size_bytes >> 20));
    } else {
        m.serial = Some(disk.serial.clone());
    }
    let storage = match vm {
        VmStorage::DataVolume => StorageSection { filesystem: Some("ext4".into()), vm_storage: Some("data-volume".into()), ..Default::default() },
        VmStorage::DedicatedPartition { size_bytes } => StorageSection {
            filesystem: Some("ext4".into()),
            vm_storage: Some("partition".into()),
            vm_storage_size: Some(format!("{}M", size_bytes >> 20)),
            ..Default::default()
        },
        VmStorage::Path(p) => StorageSection {
            filesystem: Some("ext4".into()),
            vm_storage: Some("path".into()),
            vm_storage_path: Some(p.clone()),
            ..Default::default()
        },
    };
    let file = AnswerFile {
        version: Some(SCHEMA_VERSION),
        disk: Some(DiskSection {
            match_: Some(m),
            target: Some(target_s.into()),
            partition,
            confirm: Some(confirm.into()),
        }),
        storage,
        system: SystemSection {
            hostname: Some(cfg.hostname.clone()),
            timezone: Some(cfg.timezone.clone()),
            locale: Some(cfg.locale.clone()),
            keymap: Some(cfg.keymap.clone()),
        },
        policy: PolicySection {
            autostart_linux_hidden: Some(cfg.policy.autostart_linux_hidden),
            // Not offered until Windows VMs exist.
            autostart_windows_hidden: None,
            linux_on_shutdown: Some(cfg.policy.linux_on_shutdown.as_str().into()),
            linux_network: Some(cfg.policy.linux_network.as_str().into()),
        },
        linux_user: cfg.linux_user.as_ref().map(|u| LinuxUserSection {
            name: Some(u.name.clone()),
            password_hash: Some(u.password_hash.clone()),
            password: None,
        }),
    };
    format!("# RayOS answer file, saved by the installer wizard\n{}", toml::to_string(&file).expect("answers serialise"))
}
