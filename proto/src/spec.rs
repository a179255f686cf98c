//! The VM spec: the JSON document (one per VM, written by rayosd from its registry record)
//! that says what `rayos-vmm` builds. Unknown fields are rejected so a typo never silently
//! drops a device.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading VM spec {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("VM spec {path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("VM spec field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    pub memory_mib: u64,
    /// A bzImage or an uncompressed ELF vmlinux, told apart by magic (the VMM's `boot`).
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub net: Vec<NetSpec>,
    #[serde(default)]
    pub display: Option<DisplaySpec>,
    #[serde(default)]
    pub input: Option<InputSpec>,
    #[serde(default)]
    pub console: Option<ConsoleSpec>,
    #[serde(default)]
    pub rng: bool,
    /// Where the 16550's output goes; the control socket also serves its recent tail.
    #[serde(default)]
    pub serial_log: Option<PathBuf>,
    /// Copy the serial output to the VMM's stdout too (tests, debugging).
    #[serde(default)]
    pub serial_stdout: bool,
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Fail if vCPU 0 leaves KVM_RUN not once in this long before the guest reaches init.
    #[serde(default = "default_progress_timeout")]
    pub progress_timeout_ms: u64,
    /// Fail as a hung guest (exit 11) if, once its devices are up and before it reaches init,
    /// the guest goes this long without any vCPU exit and without any virtio notification.
    #[serde(default = "default_hang_timeout")]
    pub hang_timeout_ms: u64,
    /// Drop capabilities, close stray fds and install the seccomp filter after set-up.
    #[serde(default = "default_true")]
    pub isolate: bool,
    /// The VM's own directory: snapshots and screenshots go only here (a target elsewhere is
    /// refused), the serial log rotates here. Opened at set-up; after isolation the VMM
    /// creates, renames or removes nothing anywhere else.
    #[serde(default)]
    pub vm_dir: Option<PathBuf>,
    /// The unprivileged user and group the VMM runs as after set-up (with `isolate`); rayosd
    /// gives each VM its own, owning `vm_dir`.
    #[serde(default)]
    pub run_as: Option<RunAs>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// Name of an existing tap interface.
    pub tap: String,
    /// The card's MAC; absent: one derived from the VM's name and the card's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DisplaySpec {
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    #[serde(default = "default_true")]
    pub keyboard: bool,
    #[serde(default = "default_true")]
    pub tablet: bool,
}

impl Default for InputSpec {
    fn default() -> Self {
        InputSpec { keyboard: true, tablet: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSpec {
    /// A virtio-console port named `org.rayos.agent` for the guest agent; its lines reach the
    /// supervisor as [`crate::vmm::Event::AgentLine`] events.
    #[serde(default = "default_true")]
    pub agent: bool,
}

impl Default for ConsoleSpec {
    fn default() -> Self {
        ConsoleSpec { agent: true }
    }
}

fn default_name() -> String {
    "vm".into()
}
fn default_vcpus() -> u8 {
    1
}
fn default_progress_timeout() -> u64 {
    10000
}
/// A healthy boot is never this quiet between its first device and init: it reads its disk,
/// prints on the console, probes devices (the longest pause measured in nested test guests:
/// see ARCHITECTURE.md, "Hung guests").
fn default_hang_timeout() -> u64 {
    60_000
}
fn default_true() -> bool {
    true
}

/// Most vCPUs we describe: APIC ids are u8 in the MADT entries we emit, 0xff is broadcast.
pub const MAX_VCPUS: u8 = 254;
/// The widest and tallest display: EDID's detailed timing holds 12-bit sizes. Two 32-bpp
/// frames of 4095x4095 need 128 MiB, which the VMM's framebuffer (a power of two, at most
/// 1 GiB, in the 896 MiB PCI window) and the compositor's mapping (at most 160 MiB) both take.
pub const MAX_DISPLAY_SIDE: u32 = 4095;
pub const MIN_MEMORY_MIB: u64 = 32;
/// Linux's IFNAMSIZ: interface names are shorter than this.
const IFNAMSIZ: usize = 16;

impl VmSpec {
    /// A spec with the defaults the JSON form gives missing fields.
    pub fn new(name: &str, vcpus: u8, memory_mib: u64, kernel: PathBuf) -> VmSpec {
        VmSpec {
            name: name.into(),
            vcpus,
            memory_mib,
            kernel,
            initramfs: None,
            cmdline: String::new(),
            disks: Vec::new(),
            net: Vec::new(),
            display: None,
            input: None,
            console: None,
            rng: false,
            serial_log: None,
            serial_stdout: false,
            control_socket: None,
            progress_timeout_ms: default_progress_timeout(),
            hang_timeout_ms: default_hang_timeout(),
            isolate: true,
            vm_dir: None,
            run_as: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read { path: path.into(), source })?;
        let spec: VmSpec = serde_json::from_str(&text).map_err(|source| SpecError::Parse { path: path.into(), source })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |field, reason: String| Err(SpecError::Invalid { field, reason });
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad("vcpus", format!("{} is outside 1..={MAX_VCPUS}", self.vcpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return bad("memory_mib", format!("{} MiB is below {MIN_MEMORY_MIB} MiB", self.memory_mib));
        }
        if self.memory_mib > (1 << 20) {
            return bad("memory_mib", format!("{} MiB is more than 1 TiB", self.memory_mib));
        }
        if !self.kernel.is_file() {
            return bad("kernel", format!("{} is not a file", self.kernel.display()));
        }
        if let Some(i) = &self.initramfs {
            if !i.is_file() {
                return bad("initramfs", format!("{} is not a file", i.display()));
            }
        }
        for d in &self.disks {
            if !d.path.is_file() {
                return bad("disks", format!("{} is not a file", d.path.display()));
            }
        }
        if let Some(d) = &self.display {
            if d.width == 0 || d.height == 0 || d.width > MAX_DISPLAY_SIDE || d.height > MAX_DISPLAY_SIDE {
                return bad("display", format!("{}x{} is not a mode the display can announce (1..={MAX_DISPLAY_SIDE} each)", d.width, d.height));
            }
        }
        for n in &self.net {
            if n.tap.is_empty() || n.tap.len() >= IFNAMSIZ {
                return bad("net", format!("tap name {:?} is not a valid interface name", n.tap));
            }
        }
        if let Some(d) = &self.vm_dir {
            if !d.is_dir() {
                return bad("vm_dir", format!("{} is not a directory", d.display()));
            }
        }
        if let Some(r) = &self.run_as {
            if r.uid == 0 || r.gid == 0 {
                return bad("run_as", format!("uid {} gid {}: the VMM drops to an unprivileged user, not root", r.uid, r.gid));
            }
        }
        if self.progress_timeout_ms == 0 {
            return bad("progress_timeout_ms", "must be positive".into());
        }
        if self.hang_timeout_ms == 0 {
            return bad("hang_timeout_ms", "must be positive".into());
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("proto-spec-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_full_spec_parses() {
        let d = tmpdir("full");
        let k = write(&d, "bzImage", "k");
        let disk = write(&d, "disk.img", "");
        let spec = write(
            &d,
            "vm.json",
            &format!(
                r#"{{"name":"t","vcpus":2,"memory_mib":256,"kernel":"{}","cmdline":"console=ttyS0",
                "disks":[{{"path":"{}","read_only":true}}],"display":{{"width":800,"height":600}},
                "input":{{}},"console":{{}},"rng":true,
                "serial_log":"/tmp/s.log","control_socket":"/tmp/c.sock"}}"#,
                k.display(),
                disk.display()
            ),
        );
        let s = VmSpec::from_file(&spec).unwrap();
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.memory_bytes(), 256 << 20);
        assert!(s.disks[0].read_only);
        assert_eq!(s.input, Some(InputSpec { keyboard: true, tablet: true }));
        assert!(s.isolate);
        assert_eq!(s.console, Some(ConsoleSpec { agent: true }));
        assert_eq!(s.hang_timeout_ms, 60_000, "a spec without it gets the default hang bound");
        // What rayosd writes reads back the same.
        let back: VmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let d = tmpdir("bad");
        let k = write(&d, "bzImage", "k");
        let typo = write(&d, "typo.json", &format!(r#"{{"memory_mib":64,"kernel":"{}","vcpu":2}}"#, k.display()));
        let e = VmSpec::from_file(&typo).unwrap_err().to_string();
        assert!(e.contains("typo.json") && e.contains("vcpu"), "{e}");

        let zero = write(&d, "zero.json", &format!(r#"{{"memory_mib":64,"kernel":"{}","vcpus":0}}"#, k.display()));
        let e = VmSpec::from_file(&zero).unwrap_err().to_string();
        assert!(e.contains("`vcpus`"), "{e}");

        let nokernel = write(&d, "nok.json", r#"{"memory_mib":64,"kernel":"/nonexistent/bzImage"}"#);
        let e = VmSpec::from_file(&nokernel).unwrap_err().to_string();
        assert!(e.contains("`kernel`") && e.contains("/nonexistent/bzImage"), "{e}");

        // EDID holds 12-bit sizes: a display it cannot announce is refused by name.
        let wide = write(&d, "wide.json", &format!(r#"{{"memory_mib":64,"kernel":"{}","display":{{"width":5120,"height":1440}}}}"#, k.display()));
        let e = VmSpec::from_file(&wide).unwrap_err().to_string();
        assert!(e.contains("`display`") && e.contains("5120x1440"), "{e}");

        let tap = write(&d, "tap.json", &format!(r#"{{"memory_mib":64,"kernel":"{}","net":[{{"tap":"a-very-long-tap-name"}}]}}"#, k.display()));
        let e = VmSpec::from_file(&tap).unwrap_err().to_string();
        assert!(e.contains("`net`") && e.contains("a-very-long-tap-name"), "{e}");

        let hang = write(&d, "hang.json", &format!(r#"{{"memory_mib":64,"kernel":"{}","hang_timeout_ms":0}}"#, k.display()));
        let e = VmSpec::from_file(&hang).unwrap_err().to_string();
        assert!(e.contains("`hang_timeout_ms`") && e.contains("positive"), "{e}");
    }
}
