//! The VM's own directory (`spec.vm_dir`), held open from set-up on: the only place the VMM
//! creates, renames or removes anything after isolation (snapshots, screenshots, the serial
//! log's rotation). Every change goes through the `*at` calls against this descriptor, which
//! is what the seccomp filter allows (see [`crate::isolation`]); names are single components
//! checked here, so a request cannot reach outside by `..` or an absolute path.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

#[derive(Debug, thiserror::Error)]
pub enum VmDirError {
    #[error("{requested}: outside this VM's directory {dir}; name a file directly inside it")]
    Outside { requested: PathBuf, dir: PathBuf },
    #[error("{requested}: names starting with '.' are the VMM's temporaries; choose another name")]
    Hidden { requested: PathBuf },
    #[error("this VM has no directory of its own (spec: vm_dir), so it writes no files")]
    NoDir,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// An open directory and its path (the path only for messages and for checking requests).
#[derive(Debug)]
pub struct VmDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl VmDir {
    /// Opens `path` (a directory) for the `*at` calls and for fsync.
    pub fn open(path: &Path) -> Result<VmDir, VmDirError> {
        let fd = nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| VmDirError::Io { path: path.into(), source: e.into() })?;
        // SAFETY: `open` just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(VmDir { path: path.to_path_buf(), fd })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The single file name `requested` stands for in this directory: a bare name, or an
    /// absolute path whose parent is exactly this directory. Anything else is refused by name.
    pub fn name_of(&self, requested: &Path) -> Result<String, VmDirError> {
        let outside = || VmDirError::Outside { requested: requested.into(), dir: self.path.clone() };
        let (parent, name) = match (requested.parent(), requested.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => return Err(outside()),
        };
        if requested.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(outside());
        }
        if !(parent.as_os_str().is_empty() || parent == self.path) {
            return Err(outside());
        }
        let name = name.to_str().ok_or_else(outside)?;
        if name.starts_with('.') {
            return Err(VmDirError::Hidden { requested: requested.into() });
        }
        Ok(name.to_string())
    }

    fn io(&self, rel: &str) -> impl FnOnce(nix::Error) -> VmDirError + '_ {
        let path = self.path.join(rel);
        move |e| VmDirError::Io { path, source: e.into() }
    }

    /// A new file `rel` (relative; may go through a subdirectory this VMM made), never an
    /// existing one.
    pub fn create_new(&self, rel: &str) -> Result<File, VmDirError> {
        let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let fd = nix::fcntl::openat(Some(self.raw_fd()), rel, flags, Mode::from_bits_truncate(0o600)).map_err(self.io(rel))?;
        // SAFETY: `openat` just returned this descriptor and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Opens `rel` read-only (`O_NOFOLLOW`: a link the guest's VMM could not have made is
    /// not followed either).
    pub fn open_read(&self, rel: &str) -> Result<File, VmDirError> {
        let fd = nix::fcntl::openat(Some(self.raw_fd()), rel, OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW, Mode::empty())
            .map_err(self.io(rel))?;
        // SAFETY: `openat` just returned this descriptor and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    pub fn mkdir(&self, rel: &str) -> Result<(), VmDirError> {
        nix::sys::stat::mkdirat(Some(self.raw_fd()), rel, Mode::from_bits_truncate(0o700)).map_err(self.io(rel))
    }

    pub fn rename(&self, from: &str, to: &str) -> Result<(), VmDirError> {
        nix::fcntl::renameat(Some(self.raw_fd()), from, Some(self.raw_fd()), to).map_err(self.io(from))
    }

    pub fn unlink(&self, rel: &str) -> Result<(), VmDirError> {
        nix::unistd::unlinkat(Some(self.raw_fd()), rel, UnlinkatFlags::NoRemoveDir).map_err(self.io(rel))
    }

    pub fn rmdir(&self, rel: &str) -> Result<(), VmDirError> {
        nix::unistd::unlinkat(Some(self.raw_fd()), rel, UnlinkatFlags::RemoveDir).map_err(self.io(rel))
    }

    /// Whether `rel` exists (without following a final symlink).
    pub fn exists(&self, rel: &str) -> bool {
        nix::sys::stat::fstatat(Some(self.raw_fd()), rel, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
    }

    /// Whether `rel` is a directory (not a symlink to one).
    pub fn is_dir(&self, rel: &str) -> bool {
        nix::sys::stat::fstatat(Some(self.raw_fd()), rel, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFDIR)
    }

    /// Makes the directory's entries (a rename, a new file) durable.
    pub fn sync(&self, rel: Option<&str>) -> Result<(), VmDirError> {
        match rel {
            None => nix::unistd::fsync(self.raw_fd()).map_err(self.io(".")),
            Some(r) => {
                let fd = nix::fcntl::openat(Some(self.raw_fd()), r, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW, Mode::empty())
                    .map_err(self.io(r))?;
                // SAFETY: `openat` just returned this descriptor and nothing else owns it.
                let d = unsafe { File::from_raw_fd(fd) };
                d.sync_all().map_err(|e| VmDirError::Io { path: self.path.join(r), source: e })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_directly_inside_are_accepted() {
        let base = std::env::temp_dir().join(format!("vmm-vmdir-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let d = VmDir::open(&base).unwrap();
        assert_eq!(d.name_of(Path::new("snap")).unwrap(), "snap");
        assert_eq!(d.name_of(&base.join("shot.ppm")).unwrap(), "shot.ppm");
        for bad in ["/tmp/snap", "../other/snap", "sub/snap", "/", "", ".."] {
            let e = d.name_of(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains("outside this VM's directory"), "{bad}: {e}");
        }
        let e = d.name_of(&base.join("..").join("x")).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
        let e = d.name_of(Path::new(".snap.partial-1")).unwrap_err().to_string();
        assert!(e.contains("temporaries"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
