//! The VM registry: `registry/vms.json` on the data volume (in systemless, under the state
//! folder), one record per VM, with a schema version.
//!
//! Writes are atomic (temp file, fsync, rename, fsync the directory) and the version being
//! replaced is first written, the same way, to `vms.json.bak`. On load, a file that cannot be
//! read as a registry is renamed aside to `vms.json.corrupt-<n>` (never overwritten, never
//! deleted), the backup is used, and the problem is reported to the caller.

use std::path::{Path, PathBuf};

use uuid::Uuid;

// The records and the file's schema are shared with the installer, which writes the first one.
pub use rayos_proto::registry::{
    now_secs, DeviceConfig, DiskIdentity, DiskRecord, DisplayConfig, DisplaySize, Network, OnShutdown, Policy, SavedState, RegistryFile, RestartPolicy, VmKind, VmRecord, DEFAULT_LINUX_CMDLINE,
    DEFAULT_LINUX_KERNEL, FILE_NAME, SCHEMA_VERSION,
};
use rayos_proto::registry::{valid_name, FileError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {path}: {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
    #[error("registry: a VM named {0:?} already exists")]
    NameTaken(String),
    #[error("registry: no VM {0:?}")]
    NoSuchVm(String),
    #[error("registry: VM name {0:?} is invalid (1-64 characters of a-z, A-Z, 0-9, '-', '_')")]
    BadName(String),
}

impl From<FileError> for RegistryError {
    fn from(e: FileError) -> Self {
        RegistryError::Io { path: e.path, op: e.op, source: e.source }
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> RegistryError + 'a {
    move |source| RegistryError::Io { path: path.to_path_buf(), op, source }
}

/// Something found while loading that the user must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The unreadable file, now renamed to `kept_as`.
    pub file: PathBuf,
    pub kept_as: PathBuf,
    pub error: String,
    /// What was used instead.
    pub used: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "registry {} is unreadable ({}); kept as {}; using {}",
            self.file.display(),
            self.error,
            self.kept_as.display(),
            self.used
        )
    }
}

/// The registry in memory, bound to its folder.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    vms: Vec<VmRecord>,
    /// The exact bytes of the file on disk now: what becomes the backup at the next save.
    on_disk: Option<Vec<u8>>,
}

fn parse(bytes: &[u8]) -> Result<Vec<VmRecord>, String> {
    RegistryFile::parse(bytes).map(|f| f.vms)
}

/// `<file>.corrupt-<n>` for the first n not taken.
fn keep_aside(file: &Path) -> Result<PathBuf, RegistryError> {
    for n in 1.. {
        let mut name = file.as_os_str().to_owned();
        name.push(format!(".corrupt-{n}"));
        let target = PathBuf::from(name);
        if !target.exists() {
            std::fs::rename(file, &target).map_err(io_err(file, "keeping the unreadable file aside"))?;
            sync_dir(file.parent().unwrap_or(Path::new(".")))?;
            return Ok(target);
        }
    }
    unreachable!()
}

fn sync_dir(dir: &Path) -> Result<(), RegistryError> {
    Ok(rayos_proto::registry::sync_dir(dir)?)
}

/// Temp file in the same directory, fsync, rename over `path`, fsync the directory.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    Ok(rayos_proto::registry::atomic_write(path, bytes)?)
}

impl Registry {
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    pub fn backup_path(&self) -> PathBuf {
        self.dir.join(format!("{FILE_NAME}.bak"))
    }

    /// Loads the registry in `dir` (created when missing). Unreadable files are kept aside
    /// and reported in the returned problems; the registry then holds what the backup had.
    pub fn open(dir: &Path) -> Result<(Registry, Vec<Problem>), RegistryError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir, "chmod 0700"))?;
        let mut reg = Registry { dir: dir.to_path_buf(), vms: Vec::new(), on_disk: None };
        let main = reg.path();
        let bak = reg.backup_path();
        let mut problems = Vec::new();
        let read = |p: &Path| match std::fs::read(p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RegistryError::Io { path: p.to_path_buf(), op: "read", source: e }),
        };
        let main_bytes = read(&main)?;
        if let Some(bytes) = &main_bytes {
            match parse(bytes) {
                Ok(vms) => {
                    reg.vms = vms;
                    reg.on_disk = main_bytes.clone();
                    return Ok((reg, problems));
                }
                Err(error) => {
                    let kept_as = keep_aside(&main)?;
                    problems.push(Problem { file: main.clone(), kept_as, error, used: String::new() });
                }
            }
        }
        // The main file is missing or was kept aside: fall back to the backup.
        match read(&bak)? {
            Some(bytes) => match parse(&bytes) {
                Ok(vms) => {
                    reg.vms = vms;
                    // Restore the main file so the next boot does not depend on the backup.
                    atomic_write(&main, &bytes)?;
                    reg.on_disk = Some(bytes);
                    let used = format!("the backup {} ({} VMs)", bak.display(), reg.vms.len());
                    match problems.last_mut() {
                        Some(p) => p.used = used,
                        None => problems.push(Problem {
                            file: main.clone(),
                            kept_as: PathBuf::new(),
                            error: "missing".into(),
                            used,
                        }),
                    }
                }
                Err(error) => {
                    if let Some(p) = problems.last_mut() {
                        p.used = "nothing: the backup is unreadable too".into();
                    }
                    let kept_as = keep_aside(&bak)?;
                    problems.push(Problem { file: bak, kept_as, error, used: "an empty registry".into() });
                }
            },
            None => {
                if let Some(p) = problems.last_mut() {
                    p.used = "an empty registry (there is no backup)".into();
                }
            }
        }
        Ok((reg, problems))
    }

    pub fn vms(&self) -> &[VmRecord] {
        &self.vms
    }

    pub fn get(&self, id: Uuid) -> Option<&VmRecord> {
        self.vms.iter().find(|v| v.id == id)
    }

    /// By UUID or by name.
    pub fn find(&self, id_or_name: &str) -> Result<&VmRecord, RegistryError> {
        let by_id = Uuid::parse_str(id_or_name).ok();
        self.vms
            .iter()
            .find(|v| Some(v.id) == by_id || v.name == id_or_name)
            .ok_or_else(|| RegistryError::NoSuchVm(id_or_name.to_string()))
    }

    /// Writes the registry: the current file becomes the backup, then the new one goes in.
    pub fn save(&mut self) -> Result<(), RegistryError> {
        let bytes = RegistryFile::new(self.vms.clone()).to_bytes();
        if let Some(prev) = &self.on_disk {
            if *prev == bytes {
                return Ok(());
            }
            atomic_write(&self.backup_path(), prev)?;
        }
        atomic_write(&self.path(), &bytes)?;
        self.on_disk = Some(bytes);
        Ok(())
    }

    /// Adds a VM and saves. The UUID is the record's and stays for the VM's life.
    pub fn insert(&mut self, vm: VmRecord) -> Result<(), RegistryError> {
        if !valid_name(&vm.name) {
            return Err(RegistryError::BadName(vm.name));
        }
        if self.vms.iter().any(|v| v.name == vm.name) {
            return Err(RegistryError::NameTaken(vm.name));
        }
        self.vms.push(vm);
        self.save()
    }

    pub fn remove(&mut self, id: Uuid) -> Result<VmRecord, RegistryError> {
        let i = self.vms.iter().position(|v| v.id == id).ok_or_else(|| RegistryError::NoSuchVm(id.to_string()))?;
        let vm = self.vms.remove(i);
        self.save()?;
        Ok(vm)
    }

    pub fn update(&mut self, id: Uuid, f: impl FnOnce(&mut VmRecord)) -> Result<(), RegistryError> {
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or_else(|| RegistryError::NoSuchVm(id.to_string()))?;
        f(vm);
        self.save()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rayos-registry-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    pub(crate) fn record(name: &str) -> VmRecord {
        VmRecord {
            id: Uuid::new_v4(),
            name: name.into(),
            kind: VmKind::Linux,
            disks: vec![DiskRecord { path: format!("/data/vms/{name}/disk.img").into(), read_only: false }],
            config: DeviceConfig {
                vcpus: 1,
                memory_mib: 256,
                kernel: "/boot/vmlinuz".into(),
                initramfs: None,
                cmdline: "console=ttyS0".into(),
                display: None,
                input: false,
                net_taps: vec![],
                rng: true,
                agent: true,
            },
            policy: Policy { autostart_hidden: true, restart: RestartPolicy::OnFailure, on_shutdown: Default::default(), network: Default::default() },
            created_at: now_secs(),
            last_booted_at: None,
            firstboot: None,
            saved: None,
            save_generation: 0,
        }
    }

    /// The VMs' own users (see `owner`) must not read the registry: root 0700 folder, 0600
    /// files, even where the umask would allow more.
    #[test]
    fn the_registry_is_roots_alone() {
        use std::os::unix::fs::MetadataExt;
        let d = tmpdir("modes");
        let dir = d.join("registry");
        std::fs::create_dir(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (mut reg, _) = Registry::open(&dir).unwrap();
        reg.insert(record("a")).unwrap();
        reg.insert(record("b")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&reg.path()), 0o600);
        assert_eq!(mode(&reg.backup_path()), 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn records_survive_a_reopen_with_the_same_uuids() {
        let d = tmpdir("reopen");
        let (mut reg, problems) = Registry::open(&d).unwrap();
        assert!(problems.is_empty());
        let a = record("linux");
        let b = record("win");
        reg.insert(a.clone()).unwrap();
        reg.insert(b.clone()).unwrap();
        drop(reg);
        let (reg, problems) = Registry::open(&d).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(reg.vms(), &[a.clone(), b]);
        assert_eq!(reg.find("linux").unwrap().id, a.id);
        assert_eq!(reg.find(&a.id.to_string()).unwrap().name, "linux");
        let text = std::fs::read_to_string(d.join("vms.json")).unwrap();
        assert!(text.contains("\"schema_version\": 1"), "{text}");
        assert!(!d.join("vms.json.tmp").exists(), "temp file left behind");
    }

    #[test]
    fn each_save_keeps_the_previous_version_as_backup() {
        let d = tmpdir("backup");
        let (mut reg, _) = Registry::open(&d).unwrap();
        reg.insert(record("one")).unwrap();
        assert!(!d.join("vms.json.bak").exists(), "nothing to back up on the first save");
        let first = std::fs::read(d.join("vms.json")).unwrap();
        reg.insert(record("two")).unwrap();
        assert_eq!(std::fs::read(d.join("vms.json.bak")).unwrap(), first);
        let (reg2, _) = Registry::open(&d).unwrap();
        assert_eq!(reg2.vms().len(), 2);
    }

    #[test]
    fn a_corrupt_registry_is_kept_aside_and_the_backup_used() {
        let d = tmpdir("corrupt");
        let (mut reg, _) = Registry::open(&d).unwrap();
        let one = record("one");
        reg.insert(one.clone()).unwrap();
        reg.insert(record("two")).unwrap();
        drop(reg);
        // A torn write: half a file.
        let good = std::fs::read(d.join("vms.json")).unwrap();
        std::fs::write(d.join("vms.json"), &good[..good.len() / 2]).unwrap();

        let (reg, problems) = Registry::open(&d).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        let p = &problems[0];
        assert_eq!(p.kept_as, d.join("vms.json.corrupt-1"));
        assert_eq!(std::fs::read(&p.kept_as).unwrap(), &good[..good.len() / 2], "the corrupt bytes are kept");
        let msg = p.to_string();
        assert!(msg.contains("vms.json") && msg.contains("corrupt-1") && msg.contains("backup"), "{msg}");
        // The backup held the registry before "two" was added.
        assert_eq!(reg.vms(), &[one]);
        // The main file is restored from the backup, so the next open is clean.
        let (_, again) = Registry::open(&d).unwrap();
        assert!(again.is_empty(), "{again:?}");

        // A second corruption does not overwrite the first kept file.
        std::fs::write(d.join("vms.json"), b"{}").unwrap();
        let (_, problems) = Registry::open(&d).unwrap();
        assert_eq!(problems[0].kept_as, d.join("vms.json.corrupt-2"));
        assert!(problems[0].error.contains("schema_version"), "{}", problems[0].error);
    }

    #[test]
    fn a_newer_schema_is_not_overwritten() {
        let d = tmpdir("newer");
        std::fs::write(d.join("vms.json"), br#"{"schema_version": 99, "vms": []}"#).unwrap();
        let (_, problems) = Registry::open(&d).unwrap();
        assert!(problems[0].error.contains("schema_version 99"), "{}", problems[0].error);
        assert_eq!(std::fs::read(d.join("vms.json.corrupt-1")).unwrap(), br#"{"schema_version": 99, "vms": []}"#);
        assert!(problems[0].used.contains("empty"), "{}", problems[0].used);
    }

    #[test]
    fn both_files_unreadable_reports_both_and_starts_empty() {
        let d = tmpdir("both");
        std::fs::write(d.join("vms.json"), b"garbage").unwrap();
        std::fs::write(d.join("vms.json.bak"), b"more garbage").unwrap();
        let (reg, problems) = Registry::open(&d).unwrap();
        assert!(reg.vms().is_empty());
        assert_eq!(problems.len(), 2);
        assert!(d.join("vms.json.corrupt-1").exists() && d.join("vms.json.bak.corrupt-1").exists());
    }

    #[test]
    fn the_default_linux_record_registers_and_reloads() {
        let d = tmpdir("default");
        let id = Uuid::new_v4();
        let (mut reg, _) = Registry::open(&d).unwrap();
        reg.insert(VmRecord::default_linux(id, Path::new("/data/vms/x"))).unwrap();
        let (reg, _) = Registry::open(&d).unwrap();
        let vm = reg.find("linux").unwrap();
        assert_eq!(vm.id, id);
        assert!(vm.policy.autostart_hidden && vm.config.agent);
        assert_eq!(vm.disks[0].path, Path::new("/data/vms/x/disk.img"));
        assert!(vm.config.cmdline.contains("root=/dev/vda"));
    }

    #[test]
    fn names_are_checked_and_unique() {
        let d = tmpdir("names");
        let (mut reg, _) = Registry::open(&d).unwrap();
        reg.insert(record("a")).unwrap();
        assert!(matches!(reg.insert(record("a")), Err(RegistryError::NameTaken(_))));
        assert!(matches!(reg.insert(record("a b")), Err(RegistryError::BadName(_))));
        assert!(matches!(reg.find("zzz"), Err(RegistryError::NoSuchVm(_))));
    }
}
