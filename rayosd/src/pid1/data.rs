//! Installed mode: find, check and mount the data volume, then log to it.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use rayosd::datavol::{self, DataVolError, DATA_MOUNT, VMS_MOUNT};
use rayosd::reaper::{ExitKind, Reaper};
use rayosd::{config, log, mounts};
use tracing::{info, warn};

/// Disks may still be probing when init starts (NVMe, USB).
const DISK_WAIT: Duration = Duration::from_secs(10);
const E2FSCK: &str = "/usr/sbin/e2fsck";
const LOG_FILE_MAX: u64 = 4 * 1024 * 1024;

/// Returns the device mounted at /data.
/// Returns the data device and the machine's name (system.toml).
pub async fn mount_data(reaper: &Reaper) -> Result<(String, String), DataVolError> {
    let started = Instant::now();
    let part = loop {
        let parts = datavol::scan(Path::new("/sys/class/block"), Path::new("/dev"));
        let data = datavol::data_partitions(&parts);
        if let Some(first) = data.first() {
            if data.len() > 1 {
                warn!("{} RayOS data partitions found; using {} (disk {})", data.len(), first.dev.display(), first.disk);
            }
            break (*first).clone();
        }
        if started.elapsed() > DISK_WAIT {
            return Err(DataVolError::NotFound);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let dev = part.dev.display().to_string();
    info!("data: partition {} on disk {} (partition {})", dev, part.disk, part.number);

    check_and_mount(reaper, &dev, DATA_MOUNT, "data").await?;
    datavol::create_layout(Path::new(DATA_MOUNT), &dev)?;
    if let Err(e) = log::sink().attach_file(&Path::new(DATA_MOUNT).join("logs/rayosd.log"), LOG_FILE_MAX) {
        warn!("data: cannot write the log file: {e}");
    }
    let cfg = match config::load(&Path::new(DATA_MOUNT).join("config/system.toml")) {
        Ok(config::Loaded::Ok(c)) => {
            info!("config: machine {}", c.machine_name);
            c
        }
        Ok(config::Loaded::Missing(c)) => {
            info!("config: no system.toml; using defaults");
            c
        }
        Ok(config::Loaded::Corrupt { kept_as, error, config }) => {
            warn!("config: {error}; kept the file as {} and using defaults", kept_as.display());
            config
        }
        Err(e) => {
            warn!("config: cannot read system.toml: {e}; using defaults");
            config::SystemConfig::default()
        }
    };
    info!("data: {dev} mounted on {DATA_MOUNT}");
    if let Some(part_uuid) = cfg.vm_storage.partition() {
        // Not fatal: the VMs whose disks live there are marked broken ("disk image missing"),
        // the rest of RayOS runs, and the log says why.
        if let Err(e) = mount_vm_storage(reaper, part_uuid).await {
            warn!("vm storage: {e}; VMs on it will not start");
        }
    }
    Ok((dev, cfg.machine_name))
}

/// The dedicated VM storage partition named in system.toml, checked and mounted at /vms.
async fn mount_vm_storage(reaper: &Reaper, part_uuid: &str) -> Result<(), DataVolError> {
    let parts = datavol::scan(Path::new("/sys/class/block"), Path::new("/dev"));
    let Some(part) = datavol::vm_storage_partition(&parts, part_uuid) else {
        return Err(DataVolError::Layout {
            dev: format!("PARTUUID={part_uuid}"),
            path: VMS_MOUNT.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no RayOS VM storage partition with this PARTUUID"),
        });
    };
    let dev = part.dev.display().to_string();
    check_and_mount(reaper, &dev, VMS_MOUNT, "vm storage").await?;
    info!("vm storage: {dev} mounted on {VMS_MOUNT}");
    Ok(())
}

/// e2fsck -p, then mount ext4 at `target`.
async fn check_and_mount(reaper: &Reaper, dev: &str, target: &str, what: &str) -> Result<(), DataVolError> {
    let dev = dev.to_string();
    if Path::new(E2FSCK).exists() {
        match rayosd::supervisor::run_oneshot(reaper, &[E2FSCK, "-p", &dev], "e2fsck").await {
            Ok(ExitKind::Exited(c)) if datavol::fsck_ok(c) => info!("{what}: e2fsck -p {dev}: exit {c}"),
            Ok(ExitKind::Exited(c)) => return Err(DataVolError::FsckFailed { dev, code: c }),
            Ok(k) => return Err(DataVolError::FsckError { dev, reason: k.to_string() }),
            Err(e) => return Err(DataVolError::FsckError { dev, reason: e.to_string() }),
        }
    } else {
        warn!("{what}: {E2FSCK} is missing; mounting {dev} unchecked (ext4 replays its journal)");
    }
    std::fs::create_dir_all(target).map_err(|source| DataVolError::Layout { dev: dev.clone(), path: target.into(), source })?;
    mount(Some(dev.as_str()), target, Some("ext4"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME, None::<&str>)
        .map_err(|source| DataVolError::Mount { dev: dev.clone(), target: target.into(), source })?;
    mounts::record_mount(Path::new(target));
    Ok(())
}
