//! Installed mode: find, check and mount the data volume, then log to it.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use rayosd::datavol::{self, DataVolError, DATA_MOUNT};
use rayosd::reaper::{ExitKind, Reaper};
use rayosd::{config, log, mounts};
use tracing::{info, warn};

/// Disks may still be probing when init starts (NVMe, USB).
const DISK_WAIT: Duration = Duration::from_secs(10);
const E2FSCK: &str = "/usr/sbin/e2fsck";
const LOG_FILE_MAX: u64 = 4 * 1024 * 1024;

/// Returns the device mounted at /data.
pub async fn mount_data(reaper: &Reaper) -> Result<String, DataVolError> {
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

    if Path::new(E2FSCK).exists() {
        match rayosd::supervisor::run_oneshot(reaper, &[E2FSCK, "-p", &dev], "e2fsck").await {
            Ok(ExitKind::Exited(c)) if datavol::fsck_ok(c) => info!("data: e2fsck -p {dev}: exit {c}"),
            Ok(ExitKind::Exited(c)) => return Err(DataVolError::FsckFailed { dev, code: c }),
            Ok(k) => return Err(DataVolError::FsckError { dev, reason: k.to_string() }),
            Err(e) => return Err(DataVolError::FsckError { dev, reason: e.to_string() }),
        }
    } else {
        warn!("data: {E2FSCK} is missing; mounting {dev} unchecked (ext4 replays its journal)");
    }

    std::fs::create_dir_all(DATA_MOUNT).map_err(|source| DataVolError::Layout { dev: dev.clone(), path: DATA_MOUNT.into(), source })?;
    mount(Some(dev.as_str()), DATA_MOUNT, Some("ext4"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME, None::<&str>)
        .map_err(|source| DataVolError::Mount { dev: dev.clone(), target: DATA_MOUNT.into(), source })?;
    mounts::record_mount(Path::new(DATA_MOUNT));
    datavol::create_layout(Path::new(DATA_MOUNT), &dev)?;
    if let Err(e) = log::sink().attach_file(&Path::new(DATA_MOUNT).join("logs/rayosd.log"), LOG_FILE_MAX) {
        warn!("data: cannot write the log file: {e}");
    }
    match config::load(&Path::new(DATA_MOUNT).join("config/system.toml")) {
        Ok(config::Loaded::Ok(c)) => info!("config: machine {}", c.machine_name),
        Ok(config::Loaded::Missing(_)) => info!("config: no system.toml; using defaults"),
        Ok(config::Loaded::Corrupt { kept_as, error, .. }) => {
            warn!("config: {error}; kept the file as {} and using defaults", kept_as.display())
        }
        Err(e) => warn!("config: cannot read system.toml: {e}; using defaults"),
    }
    info!("data: {dev} mounted on {DATA_MOUNT}");
    Ok(dev)
}
