//! Executes a plan: the only module that writes to the target disk.
//!
//! Order: check the disk is still the one the plan was made for; partition table (old-or-new
//! after a power cut, see `gpt`); ESP files; UEFI boot entry; data filesystem (built from a
//! staging directory, last, so its install.log tells everything before it). Nothing is written
//! before `install` is called, and `install` is only called after the confirmation.

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::blockio::{self, CountingWriter, Window};
use crate::config::{self, SystemConfig};
use crate::datafs::{self, Layout};
use crate::diskpack;
use crate::disks::{self, human_size, Disk, SystemPaths};
use crate::efiboot::{self, LoaderLocation};
use crate::esp::{self, BootFiles};
use crate::gpt;
use crate::plan::{EspChoice, Plan, Role, VmStorage};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the installer finds the machine's interfaces; a temp tree in tests.
#[derive(Debug, Clone)]
pub struct Environment {
    pub paths: SystemPaths,
    /// efivarfs; None or a missing directory (BIOS boot, tests) skips the boot entry.
    pub efivars: Option<PathBuf>,
    /// Where the data volume's contents are staged (a tmpfs: /run on the machine).
    pub staging_base: PathBuf,
    pub mke2fs: PathBuf,
}

impl Default for Environment {
    fn default() -> Self {
        Environment {
            paths: SystemPaths::default(),
            efivars: Some(efiboot::EFIVARS.into()),
            staging_base: "/run".into(),
            mke2fs: "/usr/sbin/mke2fs".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{disk}: is no longer the disk that was chosen ({what}); nothing was written")]
    DiskChanged { disk: String, what: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    #[error(transparent)]
    Esp(#[from] esp::EspError),
    #[error(transparent)]
    Efi(#[from] efiboot::EfiError),
    #[error(transparent)]
    DataFs(#[from] datafs::DataFsError),
    #[error(transparent)]
    DiskPack(#[from] diskpack::DiskPackError),
    #[error("registering the default Linux VM: {0}")]
    Registry(#[from] rayos_proto::registry::FileError),
}

#[derive(Debug, Clone)]
pub struct Report {
    pub duration: Duration,
    pub bytes_written: u64,
    pub boot_entry: Option<u16>,
    pub log: String,
}

/// Progress for the UI: percent done and what is happening.
pub type ProgressFn<'a> = &'a mut dyn FnMut(u8, &str);

struct Log<'a> {
    start: Instant,
    text: String,
    progress: ProgressFn<'a>,
}

impl Log<'_> {
    fn step(&mut self, pct: u8, msg: &str) {
        tracing::info!("{msg}");
        let ms = self.start.elapsed().as_millis();
        self.text.push_str(&format!("[{ms:>6} ms] {msg}\n"));
        (self.progress)(pct, msg);
    }
}

/// Compares what the disk is now with what the plan was made from.
pub fn verify_identity(planned: &Disk, now: Option<&Disk>) -> Result<(), InstallError> {
    let changed = |what: String| InstallError::DiskChanged { disk: planned.device.display().to_string(), what };
    let Some(now) = now else { return Err(changed("the disk is gone".into())) };
    for (field, a, b) in [
        ("model", &planned.model, &now.model),
        ("serial", &planned.serial, &now.serial),
        ("wwid", &planned.wwid, &now.wwid),
    ] {
        if a != b {
            return Err(changed(format!("{field} was {a:?}, is {b:?}")));
        }
    }
    if planned.size_bytes != now.size_bytes {
        return Err(changed(format!("size was {}, is {}", planned.size_bytes, now.size_bytes)));
    }
    if planned.gpt_disk_guid != now.gpt_disk_guid {
        return Err(changed("its partition table was replaced".into()));
    }
    let layout = |d: &Disk| d.partitions.iter().map(|p| (p.number, p.first_lba, p.last_lba, p.type_guid)).collect::<Vec<_>>();
    if layout(planned) != layout(now) {
        return Err(changed("its partitions changed".into()));
    }
    Ok(())
}

/// Puts the default Linux VM (when the medium carries it) into the staged data volume, or
/// into `vm_staging` (the dedicated VM partition's contents, mounted at /vms by rayosd), and
/// writes the registry: its disk unpacked sparse and the RayOS kernel under `<base>/<id>/`, its
/// record saying where they will be once mounted. The registry file's schema is rayosd's
/// (`rayos_proto::registry`), written the same atomic way, so what the installer writes is
/// what rayosd reads.
fn stage_vms(
    staging: &Path,
    vm_staging: Option<&Path>,
    plan: &Plan,
    cfg: &SystemConfig,
    files: &BootFiles,
    log: &mut Log,
) -> Result<usize, InstallError> {
    use rayos_proto::registry::{atomic_write, RegistryFile, VmRecord, DEFAULT_LINUX_KERNEL, FILE_NAME};
    let registry_dir = staging.join("registry");
    fs::create_dir_all(&registry_dir).map_err(|source| InstallError::Io { path: registry_dir.clone(), source })?;
    let write_registry = |vms: Vec<VmRecord>| atomic_write(&registry_dir.join(FILE_NAME), &RegistryFile::new(vms).to_bytes());
    let Some(packed) = &files.default_linux else {
        log.step(70, &format!("the medium carries no default Linux VM ({}): none registered", esp::DEFAULT_LINUX_DISK_PATH));
        write_registry(Vec::new())?;
        return Ok(0);
    };
    // Where rayosd will find it: /vms (the dedicated partition), a path under /data, or
    // /data/vms. A path elsewhere is not mounted by anyone, so the VM goes to /data/vms then.
    let (base, root, mount) = match (&plan.vm_storage, vm_staging) {
        (VmStorage::DedicatedPartition { .. }, Some(vs)) => (PathBuf::from("/vms"), vs, "/vms"),
        (VmStorage::Path(p), _) if p.starts_with("/data/") => (PathBuf::from(p), staging, "/data"),
        _ => (PathBuf::from("/data/vms"), staging, "/data"),
    };
    let id = uuid::Uuid::new_v4();
    let vm_dir = base.join(id.to_string());
    let staged = root.join(vm_dir.strip_prefix(mount).expect("under its mount point"));
    fs::create_dir_all(&staged).map_err(|source| InstallError::Io { path: staged.clone(), source })?;
    let unpacking = format!("unpacking the default Linux VM's disk into {}", vm_dir.display());
    log.step(72, &unpacking);
    let disk = staged.join("disk.img");
    let mut last_pct = 0;
    // The same text as the step: a UI shows one line for it and moves its percentage.
    let stats = diskpack::unpack(&packed[..], Path::new(esp::DEFAULT_LINUX_DISK_PATH), &disk, &mut |done, total| {
        let pct = 72 + (done * 16 / total.max(1)) as u8;
        if pct != last_pct {
            last_pct = pct;
            (log.progress)(pct, &unpacking);
        }
    })?;
    let mut vm = VmRecord::default_linux(id, &vm_dir);
    // The uncompressed kernel when the medium has it (it boots about a second faster under
    // nested KVM); a medium without it gets the bzImage the system itself boots.
    let (name, bytes) = match &files.default_linux_kernel {
        Some(elf) => (DEFAULT_LINUX_KERNEL, elf),
        None => ("vmlinuz", &files.kernel),
    };
    let kernel = staged.join(name);
    fs::write(&kernel, bytes).map_err(|source| InstallError::Io { path: kernel, source })?;
    vm.config.kernel = vm_dir.join(name);
    vm.policy.autostart_hidden = cfg.policy.autostart_linux_hidden;
    vm.policy.on_shutdown = cfg.policy.linux_on_shutdown;
    vm.policy.network = cfg.policy.linux_network;
    // The user the guest agent creates at the VM's first boot, with the system's zone,
    // locale and keymap; only the password's hash, in the root-only 0600 registry.
    vm.firstboot = cfg.linux_user.as_ref().map(|u| u.first_boot(cfg));
    write_registry(vec![vm])?;
    log.step(
        88,
        &format!(
            "default Linux VM {id} registered: disk {} ({} of data), autostart hidden: {}, at RayOS shutdown: {}, network: {}",
            human_size(stats.size),
            human_size(stats.data),
            if cfg.policy.autostart_linux_hidden { "yes" } else { "no" },
            cfg.policy.linux_on_shutdown.as_str(),
            cfg.policy.linux_network.as_str()
        ),
    );
    Ok(1)
}

fn sectors_written(paths: &SystemPaths, name: &str) -> Option<u64> {
    let stat = fs::read_to_string(paths.sys_class_block.join(name).join("stat")).ok()?;
    stat.split_whitespace().nth(6)?.parse().ok()
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// The data volume's contents, staged: layout, configuration, VMs and registry.
fn stage_data_volume(
    staging: &Path,
    plan: &Plan,
    cfg: &SystemConfig,
    files: &BootFiles,
    answers_toml: Option<&str>,
    vm_part_uuid: Option<uuid::Uuid>,
    vm_staging: Option<&Path>,
    log: &mut Log,
) -> Result<usize, InstallError> {
    let system_toml = config::system_toml(cfg, &plan.vm_storage, vm_part_uuid);
    datafs::stage(staging, &Layout { system_toml: &system_toml, answers_toml })?;
    if let VmStorage::Path(p) = &plan.vm_storage {
        if let Some(rel) = p.strip_prefix("/data/") {
            let dir = staging.join(rel);
            fs::create_dir_all(&dir).map_err(|source| InstallError::Io { path: dir, source })?;
        }
    }
    stage_vms(staging, vm_staging, plan, cfg, files, log)
}

pub fn install(
    env: &Environment,
    plan: &Plan,
    cfg: &SystemConfig,
    files: &BootFiles,
    answers_toml: Option<&str>,
    progress: ProgressFn,
) -> Result<Report, InstallError> {
    let mut log = Log { start: Instant::now(), text: String::new(), progress };
    let dev_path = plan.disk.device.clone();
    let io_err = |source| InstallError::Io { path: dev_path.clone(), source };
    log.step(0, &format!("rayos-installer {VERSION}: installing onto {}", plan.disk.describe()));
    for line in plan.describe() {
        log.step(0, &line);
    }

    log.step(2, "checking the disk's identity again");
    verify_identity(&plan.disk, disks::reread(&env.paths, &plan.disk.name).as_ref())?;

    let stat_before = sectors_written(&env.paths, &plan.disk.name);
    let alloc_before = allocated_bytes(&dev_path);
    let counted = Cell::new(0u64);
    let mut dev: File = OpenOptions::new().read(true).write(true).open(&dev_path).map_err(io_err)?;
    let ss = plan.sector();

    log.step(5, "writing the partition table (backup first, then primary)");
    let mut table = gpt::build(&mut dev, plan)?;
    let n = gpt::write(&mut dev, &mut table, plan, &mut |d: &mut File| d.sync_data())?;
    counted.set(counted.get() + n);
    if let Err(e) = blockio::reread_partitions(&dev) {
        log.step(10, &format!("warning: the kernel could not re-read the partition table now ({e}); it will at reboot"));
    }

    let (esp_number, esp_first, esp_last, esp_uuid, created) = match &plan.esp {
        EspChoice::Create(n) => {
            let p = plan.create.iter().find(|p| p.number == *n).expect("planned ESP");
            (p.number, p.first_lba, p.last_lba, p.part_uuid, true)
        }
        EspChoice::Reuse(p) => (p.number, p.first_lba, p.last_lba, p.part_uuid, false),
    };
    let esp_off = esp_first * ss;
    let esp_len = (esp_last + 1 - esp_first) * ss;
    if created {
        log.step(15, &format!("formatting the ESP (#{esp_number}, FAT32, {})", human_size(esp_len)));
        esp::format(Window::new(CountingWriter { inner: &mut dev, written: &counted }, esp_off, esp_len))?;
    }
    log.step(25, "copying systemd-boot, kernel and initramfs to the ESP");
    let esp_report = esp::install_files(
        Window::new(CountingWriter { inner: &mut dev, written: &counted }, esp_off, esp_len),
        files,
        created,
        VERSION,
    )?;
    for p in &esp_report.removed {
        log.step(45, &format!("ESP: removed old {p}"));
    }
    for p in &esp_report.kept {
        log.step(45, &format!("ESP: kept the machine's {p}"));
    }
    log.step(50, &format!("ESP: wrote {}", esp_report.written.join(", ")));
    dev.sync_data().map_err(io_err)?;

    let mut boot_entry = None;
    match env.efivars.as_deref().filter(|p| p.is_dir()) {
        Some(efivars) => {
            let loc = LoaderLocation {
                partition_number: esp_number,
                first_lba: esp_first,
                size_lba: esp_last + 1 - esp_first,
                part_uuid: esp_uuid,
                path: esp::SYSTEMD_BOOT_EFI_PATH.into(),
            };
            let n = efiboot::add_boot_entry(efivars, "RayOS", &loc)?;
            boot_entry = Some(n);
            log.step(55, &format!("UEFI boot entry Boot{n:04X} \"RayOS\" first in BootOrder"));
        }
        None => log.step(55, "no efivarfs: UEFI boot entry skipped (the fallback loader path still boots)"),
    }

    let vm_part = plan.create.iter().find(|p| p.role == Role::VmStorage);
    let data = plan.data_partition();
    let staging = env.staging_base.join(format!("rayos-install-{}", std::process::id()));
    let vm_staging = env.staging_base.join(format!("rayos-install-vms-{}", std::process::id()));
    let clean = || {
        let _ = fs::remove_dir_all(&staging);
        let _ = fs::remove_dir_all(&vm_staging);
    };
    clean();
    if vm_part.is_some() {
        fs::create_dir_all(&vm_staging).map_err(|source| InstallError::Io { path: vm_staging.clone(), source })?;
    }
    let staged = stage_data_volume(
        &staging,
        plan,
        cfg,
        files,
        answers_toml,
        vm_part.map(|p| p.part_uuid),
        vm_part.map(|_| vm_staging.as_path()),
        &mut log,
    );
    let vms = match staged {
        Ok(n) => n,
        Err(e) => {
            clean();
            return Err(e);
        }
    };
    if let Some(p) = vm_part {
        log.step(89, &format!("creating the VM storage partition #{} (ext4 '{}', {})", p.number, datafs::VMS_LABEL, human_size(p.size_bytes(ss))));
        let made = datafs::mkfs_ext4(&env.mke2fs, &dev_path, p.first_lba * ss, p.size_bytes(ss), datafs::VMS_LABEL, uuid::Uuid::new_v4(), Some(&vm_staging));
        if let Err(e) = made {
            clean();
            return Err(e.into());
        }
    }
    log.step(
        90,
        &format!(
            "creating the data volume #{} (ext4 '{}', {}) with {} registered VM(s)",
            data.number,
            datafs::DATA_LABEL,
            human_size(data.size_bytes(ss)),
            vms
        ),
    );
    let mut install_log = log.text.clone();
    install_log.push_str(&format!("[{:>6} ms] data volume written; install complete\n", log.start.elapsed().as_millis()));
    let p = staging.join("install.log");
    if let Err(source) = fs::write(&p, install_log) {
        clean();
        return Err(InstallError::Io { path: p, source });
    }
    let made = datafs::mkfs_ext4(&env.mke2fs, &dev_path, data.first_lba * ss, data.size_bytes(ss), datafs::DATA_LABEL, uuid::Uuid::new_v4(), Some(&staging));
    clean();
    made?;

    dev.sync_all().map_err(io_err)?;
    if let Err(e) = blockio::reread_partitions(&dev) {
        log.step(98, &format!("warning: re-reading partitions: {e}"));
    }
    let bytes_written = match (stat_before, sectors_written(&env.paths, &plan.disk.name)) {
        (Some(a), Some(b)) if blockio::is_block_device(&dev).unwrap_or(false) => (b - a) * 512,
        _ => counted.get().max(allocated_bytes(&dev_path).saturating_sub(alloc_before)),
    };
    let duration = log.start.elapsed();
    log.step(100, &format!("installed in {} ms, {} written", duration.as_millis(), human_size(bytes_written)));
    Ok(Report { duration, bytes_written, boot_entry, log: log.text })
}
