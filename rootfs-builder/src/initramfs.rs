//! A newc cpio archive, zstd-compressed: the format the kernel unpacks into its rootfs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum InitramfsError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("initramfs path `{0}` must be absolute and normalised")]
    BadPath(String),
    #[error("`{path}` is both a directory and a file in the initramfs")]
    Clash { path: String },
    #[error("resolving the shared libraries of {0} with ldd failed: {1}")]
    Ldd(PathBuf, String),
    #[error("{0} is {1} bytes; a newc cpio entry holds at most 4 GiB")]
    TooBig(PathBuf, u64),
}

#[derive(Debug, Clone)]
enum Node {
    Dir { mode: u32 },
    File { data: Data, mode: u32 },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
enum Data {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// The set of files to pack. Parent directories are added as needed.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

fn check(path: &str) -> Result<String, InitramfsError> {
    if !path.starts_with('/') || path.contains("//") || path.split('/').any(|c| c == "." || c == "..") {
        return Err(InitramfsError::BadPath(path.to_string()));
    }
    Ok(path.trim_end_matches('/').to_string())
}

impl Initramfs {
    /// An archive with the merged-/usr skeleton and `/dev/console`, which the kernel opens
    /// for init's stdio before init can mount devtmpfs.
    pub fn new() -> Self {
        let mut s = Initramfs::default();
        for d in ["/dev", "/proc", "/sys", "/run", "/tmp", "/etc", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64"] {
            s.dir(d, 0o755).unwrap();
        }
        s.nodes.insert("/tmp".into(), Node::Dir { mode: 0o1777 });
        for (l, t) in [("/bin", "usr/bin"), ("/sbin", "usr/sbin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64")] {
            s.symlink(l, t).unwrap();
        }
        s.nodes.insert("/dev/console".into(), Node::CharDev { mode: 0o600, major: 5, minor: 1 });
        s
    }

    fn parents(&mut self, path: &str) {
        let mut p = String::new();
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            p.push('/');
            p.push_str(c);
            self.nodes.entry(p.clone()).or_insert(Node::Dir { mode: 0o755 });
        }
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), InitramfsError> {
        let path = check(path)?;
        self.parents(&path);
        match (self.nodes.get(&path), &node) {
            (Some(Node::Dir { .. }), Node::Dir { .. }) | (None, _) => {}
            (Some(Node::Dir { .. }), _) | (Some(_), Node::Dir { .. }) => return Err(InitramfsError::Clash { path }),
            _ => {}
        }
        self.nodes.insert(path, node);
        Ok(())
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), InitramfsError> {
        self.insert(path, Node::Dir { mode })
    }

    pub fn file(&mut self, path: &str, src: &Path, mode: u32) -> Result<(), InitramfsError> {
        self.insert(path, Node::File { data: Data::Path(src.to_path_buf()), mode })
    }

    pub fn bytes(&mut self, path: &str, data: Vec<u8>, mode: u32) -> Result<(), InitramfsError> {
        self.insert(path, Node::File { data: Data::Bytes(data), mode })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), InitramfsError> {
        self.insert(path, Node::Symlink { target: target.to_string() })
    }

    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path.trim_end_matches('/'))
    }

    /// A dynamically linked program from the build host, with the shared libraries `ldd`
    /// resolves for it, each at the path the dynamic loader will look for it.
    pub fn host_binary(&mut self, path: &str, src: &Path) -> Result<(), InitramfsError> {
        self.file(path, src, 0o755)?;
        for lib in shared_libraries(src)? {
            let dest = lib.to_string_lossy().to_string();
            // Merged /usr: /lib and /lib64 are links into /usr in the archive.
            let dest = if dest.starts_with("/lib") { format!("/usr{dest}") } else { dest };
            if !self.contains(&dest) {
                self.file(&dest, &lib, 0o755)?;
            }
        }
        Ok(())
    }

    /// Write the archive, zstd-compressed, and return its compressed size.
    pub fn write(&self, out: &Path) -> Result<u64, InitramfsError> {
        let io = |e| InitramfsError::Io(out.to_path_buf(), e);
        let tmp = out.with_extension("partial");
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut enc = zstd::Encoder::new(file, 19).map_err(io)?;
        enc.multithread(std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)).map_err(io)?;
        let mut w = enc;
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let name = path.trim_start_matches('/');
            let b = cpio::newc::Builder::new(name).ino(ino as u32 + 1).uid(0).gid(0).mtime(0);
            match node {
                Node::Dir { mode } => {
                    b.mode(0o040000 | mode).nlink(2).write(&mut w, 0).finish().map_err(io)?;
                }
                Node::Symlink { target } => {
                    let mut e = b.mode(0o120777).nlink(1).write(&mut w, target.len() as u32);
                    e.write_all(target.as_bytes()).map_err(io)?;
                    e.finish().map_err(io)?;
                }
                Node::CharDev { mode, major, minor } => {
                    b.mode(0o020000 | mode).nlink(1).rdev_major(*major).rdev_minor(*minor).write(&mut w, 0).finish().map_err(io)?;
                }
                Node::File { data, mode } => {
                    let bytes = match data {
                        Data::Bytes(b) => b.clone(),
                        Data::Path(p) => std::fs::read(p).map_err(|e| InitramfsError::Io(p.clone(), e))?,
                    };
                    if bytes.len() as u64 > u32::MAX as u64 {
                        return Err(InitramfsError::TooBig(PathBuf::from(path), bytes.len() as u64));
                    }
                    let mut e = b.mode(0o100000 | mode).nlink(1).write(&mut w, bytes.len() as u32);
                    e.write_all(&bytes).map_err(io)?;
                    e.finish().map_err(io)?;
                }
            }
        }
        let w = cpio::newc::trailer(w).map_err(io)?;
        let file = w.finish().map_err(io)?;
        file.sync_all().map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        std::fs::rename(&tmp, out).map_err(io)?;
        Ok(size)
    }

    /// Paths in the archive, for listings and tests.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }
}

/// The shared libraries (and the dynamic loader) a host program needs, per `ldd`.
pub fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>, InitramfsError> {
    let out = Command::new("ldd").arg(bin).output().map_err(|e| InitramfsError::Io(bin.to_path_buf(), e))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        // "not a dynamic executable": a static binary needs nothing.
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(InitramfsError::Ldd(bin.to_path_buf(), format!("{text}{err}")));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(InitramfsError::Ldd(bin.to_path_buf(), line.to_string()));
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Read back an initramfs (zstd + newc) as (path, mode, contents) for checks and tests.
pub fn read(path: &Path) -> Result<Vec<(String, u32, Vec<u8>)>, InitramfsError> {
    use std::io::Read;
    let io = |e| InitramfsError::Io(path.to_path_buf(), e);
    let mut raw = Vec::new();
    zstd::Decoder::new(std::fs::File::open(path).map_err(io)?).map_err(io)?.read_to_end(&mut raw).map_err(io)?;
    let mut entries = Vec::new();
    let mut cursor = std::io::Cursor::new(raw);
    loop {
        let mut r = cpio::NewcReader::new(&mut cursor).map_err(io)?;
        if r.entry().is_trailer() {
            break;
        }
        let name = format!("/{}", r.entry().name());
        let mode = r.entry().mode();
        let mut data = Vec::new();
        r.read_to_end(&mut data).map_err(io)?;
        r.finish().map_err(io)?;
        entries.push((name, mode, data));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_parents_links_and_console() {
        let dir = std::env::temp_dir().join(format!("initramfs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut i = Initramfs::new();
        i.bytes("/usr/share/rayos/hello", b"hi".to_vec(), 0o644).unwrap();
        i.symlink("/usr/sbin/mkfs.ext4", "mke2fs").unwrap();
        let out = dir.join("i.img");
        let size = i.write(&out).unwrap();
        assert!(size > 0);
        let entries = read(&out).unwrap();
        let find = |p: &str| entries.iter().find(|e| e.0 == p).unwrap_or_else(|| panic!("{p} missing"));
        assert_eq!(find("/usr/share/rayos/hello").2, b"hi");
        assert_eq!(find("/usr/share/rayos").1 & 0o170000, 0o040000);
        assert_eq!(find("/usr/sbin/mkfs.ext4").2, b"mke2fs");
        assert_eq!(find("/dev/console").1 & 0o170000, 0o020000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_relative_and_dotdot_paths_and_clashes() {
        let mut i = Initramfs::new();
        assert!(i.bytes("etc/x", vec![], 0o644).is_err());
        assert!(i.bytes("/etc/../x", vec![], 0o644).is_err());
        assert!(matches!(i.bytes("/usr/bin", vec![], 0o644), Err(InitramfsError::Clash { .. })));
    }

    #[test]
    fn host_binary_brings_its_loader_and_libc() {
        let mut i = Initramfs::new();
        i.host_binary("/usr/sbin/mke2fs", Path::new("/usr/sbin/mke2fs")).unwrap();
        let paths: Vec<&str> = i.paths().collect();
        assert!(paths.iter().any(|p| p.ends_with("/ld-linux-x86-64.so.2")), "{paths:?}");
        assert!(paths.iter().any(|p| p.contains("libc.so.6")), "{paths:?}");
        assert!(paths.iter().all(|p| !p.starts_with("/lib/")), "libraries go under /usr: {paths:?}");
    }
}
