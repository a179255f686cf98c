//! The RayOS data volume: its directory layout is written into a staging directory (a tmpfs
//! under /run on the machine), then `mke2fs -d` creates the ext4 filesystem from it directly
//! in the partition's byte range of the disk, without mounting anything.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DATA_LABEL: &str = "rayos-data";
pub const VMS_LABEL: &str = "rayos-vms";

#[derive(Debug, thiserror::Error)]
pub enum DataFsError {
    #[error("staging {path}: {source}")]
    Stage { path: PathBuf, source: io::Error },
    #[error("running {tool}: {source}")]
    Spawn { tool: String, source: io::Error },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed { tool: String, status: String, stderr: String },
}

pub struct Layout<'a> {
    pub system_toml: &'a str,
    pub answers_toml: Option<&'a str>,
}

fn stage_err(path: &Path) -> impl FnOnce(io::Error) -> DataFsError + '_ {
    move |source| DataFsError::Stage { path: path.to_path_buf(), source }
}

/// Writes the data layout (ARCHITECTURE.md, "The data volume") under `root`.
pub fn stage(root: &Path, layout: &Layout) -> Result<(), DataFsError> {
    for dir in ["config", "registry", "vms", "logs"] {
        let p = root.join(dir);
        fs::create_dir_all(&p).map_err(stage_err(&p))?;
    }
    let mut files = vec![
        (root.join("config/system.toml"), layout.system_toml.to_string()),
    ];
    if let Some(a) = layout.answers_toml {
        files.push((root.join("config/answers.toml"), a.to_string()));
    }
    for (path, text) in files {
        // The saved answers hold the Linux user's password hash: root's alone, like the registry.
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut f = fs::File::options().write(true).create(true).truncate(true).mode(0o600).open(&path).map_err(stage_err(&path))?;
        f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(stage_err(&path))?;
        io::Write::write_all(&mut f, text.as_bytes()).map_err(stage_err(&path))?;
    }
    Ok(())
}

/// Creates ext4 at `offset` bytes into `device` (a whole disk or an image file), `size` bytes
/// long, filled from `staging` when given.
pub fn mkfs_ext4(
    mke2fs: &Path,
    device: &Path,
    offset: u64,
    size: u64,
    label: &str,
    fs_uuid: uuid::Uuid,
    staging: Option<&Path>,
) -> Result<(), DataFsError> {
    let tool = mke2fs.display().to_string();
    let mut cmd = Command::new(mke2fs);
    // -F: the target is a whole disk (or an image file) addressed by offset, which mke2fs
    // would otherwise question interactively. No second -F: a mounted disk still refuses.
    cmd.args(["-q", "-F", "-t", "ext4", "-L", label, "-U"])
        .arg(fs_uuid.to_string())
        .arg("-E")
        .arg(format!("offset={offset}"));
    if let Some(dir) = staging {
        cmd.arg("-d").arg(dir);
    }
    cmd.arg(device).arg(format!("{}k", size / 1024));
    cmd.stdin(std::process::Stdio::null());
    let out = cmd.output().map_err(|source| DataFsError::Spawn { tool: tool.clone(), source })?;
    if !out.status.success() {
        return Err(DataFsError::Failed {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
