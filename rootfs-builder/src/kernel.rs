//! The trimmed kernel: Debian's linux-source package, `make tinyconfig` plus our fragments,
//! built once per (source version, configuration) and cached.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::kconfig;
use crate::paths;
use crate::progress::{self, Ticker};

/// Source packages in order of preference: 6.12 for hardware coverage, 6.1 as a fallback.
const SOURCE_PACKAGES: &[&str] = &["linux-source-6.12", "linux-source-6.1"];

/// Bump when the way we configure or build changes, so old cache entries are not reused.
const RECIPE: &str = "rayos-kernel-recipe-1";

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("no kernel source package ({}) is available from apt and none is cached in {cache}; check the apt sources (`apt-get update`)", SOURCE_PACKAGES.join(", "))]
    NoSource { cache: PathBuf },
    #[error("`{cmd}` failed ({status}){}", log.as_ref().map(|l| format!("; full log: {}", l.display())).unwrap_or_default())]
    Command { cmd: String, status: String, log: Option<PathBuf> },
    #[error("could not run `{0}`: {1}")]
    Spawn(String, std::io::Error),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(transparent)]
    Config(#[from] kconfig::KconfigError),
}

/// An extracted kernel source tree.
#[derive(Debug, Clone)]
pub struct Source {
    pub package: String,
    pub version: String,
    pub dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Kernel {
    pub bzimage: PathBuf,
    /// The uncompressed ELF kernel of the same build, stripped: what rayos-vmm boots without
    /// the guest decompressing it (the build dir's `vmlinux`, `objcopy --strip-all`).
    pub vmlinux: PathBuf,
    pub config: PathBuf,
    pub source_version: String,
}

fn run(cmd: &mut Command) -> Result<(), KernelError> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().map_err(|e| KernelError::Spawn(shown.clone(), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(KernelError::Command { cmd: shown, status: status.to_string(), log: None })
    }
}

fn apt_candidate(package: &str) -> Option<String> {
    let out = Command::new("apt-cache").args(["show", "--no-all-versions", package]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: ").map(|v| v.trim().to_string()))
}

fn sanitize(version: &str) -> String {
    version.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

fn tree_in(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("linux-source-")) && p.join("Makefile").exists()
    })
}

/// Find (or download and extract) the kernel source.
pub fn source() -> Result<Source, KernelError> {
    let cache = paths::cache_dir().join("linux");
    let mut candidates: Vec<(String, String)> =
        SOURCE_PACKAGES.iter().filter_map(|p| apt_candidate(p).map(|v| (p.to_string(), v))).collect();
    if candidates.is_empty() && crate::hostdeps::is_root() {
        let _ = crate::hostdeps::apt(&["update", "-q"]);
        candidates = SOURCE_PACKAGES.iter().filter_map(|p| apt_candidate(p).map(|v| (p.to_string(), v))).collect();
    }
    if let Some((package, version)) = candidates.into_iter().next() {
        let dir = cache.join(sanitize(&version));
        if let Some(tree) = tree_in(&dir) {
            return Ok(Source { package, version, dir: tree });
        }
        fetch(&package, &version, &dir)?;
        let tree = tree_in(&dir).ok_or_else(|| KernelError::NoSource { cache: cache.clone() })?;
        return Ok(Source { package, version, dir: tree });
    }
    // Offline: fall back to the newest cached tree.
    let mut cached: Vec<PathBuf> = std::fs::read_dir(&cache)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    cached.sort();
    for dir in cached.iter().rev() {
        if let Some(tree) = tree_in(dir) {
            let version = dir.file_name().unwrap().to_string_lossy().to_string();
            let package = tree.file_name().unwrap().to_string_lossy().to_string();
            progress::step("kernel", format!("apt has no kernel source; using the cached {package} {version}"));
            return Ok(Source { package, version, dir: tree });
        }
    }
    Err(KernelError::NoSource { cache })
}

fn fetch(package: &str, version: &str, dir: &Path) -> Result<(), KernelError> {
    progress::step("kernel", format!("downloading {package} {version} (about 150 MB)"));
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| KernelError::Io(tmp.clone(), e))?;
    run(Command::new("apt-get").args(["download", &format!("{package}={version}")]).current_dir(&tmp))?;
    let deb = std::fs::read_dir(&tmp)
        .map_err(|e| KernelError::Io(tmp.clone(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| KernelError::NoSource { cache: tmp.clone() })?;
    let pkg = tmp.join("pkg");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&pkg))?;
    let tarball = std::fs::read_dir(pkg.join("usr/src"))
        .map_err(|e| KernelError::Io(pkg.join("usr/src"), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().contains(".tar"))
        .ok_or_else(|| KernelError::NoSource { cache: pkg.clone() })?;
    progress::step("kernel", format!("extracting {}", tarball.display()));
    run(Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(&tmp))?;
    let _ = std::fs::remove_dir_all(&pkg);
    let _ = std::fs::remove_file(&deb);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| KernelError::Io(dir.to_path_buf(), e))?;
    Ok(())
}

/// The cache key: source version, every fragment's name and text, and the recipe.
pub fn config_hash(source_version: &str, fragments: &[PathBuf]) -> Result<String, KernelError> {
    let mut h = Sha256::new();
    h.update(RECIPE.as_bytes());
    h.update(source_version.as_bytes());
    for f in fragments {
        h.update(f.file_name().unwrap().to_string_lossy().as_bytes());
        h.update(std::fs::read(f).map_err(|e| KernelError::Io(f.clone(), e))?);
    }
    Ok(h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

fn make(src: &Path, build: &Path) -> Command {
    let mut c = Command::new("make");
    c.arg("-C").arg(src).arg(format!("O={}", build.display())).arg("ARCH=x86_64");
    c.env("KBUILD_BUILD_USER", "rayos").env("KBUILD_BUILD_HOST", "rayos");
    c
}

/// Configure `build` from tinyconfig + fragments and check every option survived.
pub fn configure(src: &Source, build: &Path, fragments: &[PathBuf]) -> Result<(), KernelError> {
    let requests = kconfig::requests(fragments)?;
    std::fs::create_dir_all(build).map_err(|e| KernelError::Io(build.to_path_buf(), e))?;
    run(make(&src.dir, build).arg("tinyconfig").stdout(Stdio::null()))?;
    let mut merge = Command::new(src.dir.join("scripts/kconfig/merge_config.sh"));
    merge.current_dir(&src.dir).arg("-m").arg("-O").arg(build).arg(build.join(".config")).args(fragments);
    run(merge.env("ARCH", "x86_64").stdout(Stdio::null()))?;
    run(make(&src.dir, build).arg("olddefconfig").stdout(Stdio::null()))?;
    let dotconfig = build.join(".config");
    let text = std::fs::read_to_string(&dotconfig).map_err(|e| KernelError::Io(dotconfig.clone(), e))?;
    kconfig::check(&requests, &text)?;
    Ok(())
}

/// Build (or take from the cache) the kernel for the current fragments.
pub fn ensure() -> Result<Kernel, KernelError> {
    let fragments = kconfig::fragments(&paths::kernel_config_dir())?;
    // Reject malformed fragments before any download.
    kconfig::requests(&fragments)?;
    let src = source()?;
    let hash = config_hash(&src.version, &fragments)?;
    let dir = paths::cache_dir().join("kernel").join(format!("{}-{hash}", sanitize(&src.version)));
    let kernel = Kernel {
        bzimage: dir.join("bzImage"),
        vmlinux: dir.join("vmlinux"),
        config: dir.join("config"),
        source_version: src.version.clone(),
    };
    let build = dir.join("build");
    // Checked (and built) under the entry's lock: another checkout may be building it now.
    let _lock = paths::lock_cache(&dir, "kernel").map_err(|e| KernelError::Io(dir.join(".lock"), e))?;
    if kernel.bzimage.exists() && kernel.config.exists() {
        if kernel.vmlinux.exists() {
            return Ok(kernel);
        }
        // A cache entry from before the vmlinux was kept: take it from the build folder if
        // that still holds the very build the cached bzImage came from; otherwise `make`
        // below brings the build folder up to date (or rebuilds it if it is gone).
        if same_build(&build, &kernel.bzimage) {
            progress::step("kernel", format!("keeping the stripped vmlinux of the cached build in {}", dir.display()));
            strip_vmlinux(&build.join("vmlinux"), &kernel.vmlinux)?;
            return Ok(kernel);
        }
    }
    progress::step("kernel", format!("building {} {} (config {hash}); this takes a few minutes", src.package, src.version));
    let incremental = build.exists() || seed_build(&dir, &build, &sanitize(&src.version))?;
    configure(&src, &build, &fragments)?;
    compile(&src, &build, &dir, incremental)?;
    std::fs::copy(build.join(".config"), &kernel.config).map_err(|e| KernelError::Io(kernel.config.clone(), e))?;
    strip_vmlinux(&build.join("vmlinux"), &kernel.vmlinux)?;
    // The bzImage last: its presence marks the entry complete for older checkouts too.
    std::fs::copy(build.join("arch/x86/boot/bzImage"), &kernel.bzimage)
        .map_err(|e| KernelError::Io(kernel.bzimage.clone(), e))?;
    Ok(kernel)
}

/// Starts a new configuration's build folder as a copy of the newest complete build of the
/// same source: Kbuild records which CONFIG_ symbols each object depends on (fixdep), so after
/// a fragment edit `make` recompiles only what the changed options touch, minutes instead of
/// the half hour of a cold build on two cores. No earlier build: a cold build, as before.
/// True when it found one to start from.
fn seed_build(dir: &Path, build: &Path, version: &str) -> Result<bool, KernelError> {
    let root = dir.parent().expect("kernel cache entries live in a folder");
    let prefix = format!("{version}-");
    let newest = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix) && e.path() != dir)
        .filter(|e| e.path().join("bzImage").is_file() && e.path().join("build/.config").is_file())
        .filter_map(|e| Some((e.path().join("bzImage").metadata().ok()?.modified().ok()?, e.path())))
        .max();
    let Some((_, from)) = newest else { return Ok(false) };
    progress::step("kernel", format!("starting from the build in {} (only what the new options touch is recompiled)", from.display()));
    let tmp = dir.join("build.seeding");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(dir).map_err(|e| KernelError::Io(dir.to_path_buf(), e))?;
    run(Command::new("cp").arg("-a").arg("--reflink=auto").arg(from.join("build")).arg(&tmp))?;
    std::fs::rename(&tmp, build).map_err(|e| KernelError::Io(build.to_path_buf(), e))?;
    Ok(true)
}

/// True when `build` holds a vmlinux and the bzImage made with it is byte for byte `cached`.
fn same_build(build: &Path, cached: &Path) -> bool {
    if !build.join("vmlinux").is_file() {
        return false;
    }
    match (std::fs::read(build.join("arch/x86/boot/bzImage")), std::fs::read(cached)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `objcopy --strip-all vmlinux` into `to`, through a temporary file so that a reader
/// (another checkout sharing the cache) never sees half of it. Symbols and debug sections
/// are not loaded into the guest; the kernel keeps its own kallsyms.
fn strip_vmlinux(from: &Path, to: &Path) -> Result<(), KernelError> {
    let tmp = to.with_extension(format!("partial-{}", std::process::id()));
    run(Command::new("objcopy").arg("--strip-all").arg(from).arg(&tmp))?;
    std::fs::rename(&tmp, to).map_err(|e| KernelError::Io(to.to_path_buf(), e))
}

/// `incremental`: the folder already held objects, so the object count of a cold build is no
/// guide to progress and this build's count must not replace it.
fn compile(src: &Source, build: &Path, dir: &Path, incremental: bool) -> Result<(), KernelError> {
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let log_path = dir.join("build.log");
    let mut log = std::fs::File::create(&log_path).map_err(|e| KernelError::Io(log_path.clone(), e))?;
    // A previous build of this configuration tells how many objects to expect.
    let count_file = paths::cache_dir().join("kernel").join("last-object-count");
    let expected: Option<u64> =
        if incremental { None } else { std::fs::read_to_string(&count_file).ok().and_then(|s| s.trim().parse().ok()) };
    let mut cmd = make(&src.dir, build);
    cmd.arg(format!("-j{jobs}")).arg("bzImage").stdout(Stdio::piped()).stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().map_err(|e| KernelError::Spawn(shown.clone(), e))?;
    // stderr goes to the log through a thread so neither pipe can fill up and block make.
    let stderr = child.stderr.take().unwrap();
    let err_log = log.try_clone().map_err(|e| KernelError::Io(log_path.clone(), e))?;
    let err_thread = std::thread::spawn(move || {
        use std::io::Write;
        let mut err_log = err_log;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(err_log, "{line}");
        }
    });
    let mut ticker = Ticker::new("kernel");
    let mut objects = 0u64;
    let mut current = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
        use std::io::Write;
        let _ = writeln!(log, "{line}");
        let t = line.trim_start();
        if t.starts_with("CC ") || t.starts_with("AS ") || t.starts_with("LD ") || t.starts_with("AR ") {
            objects += 1;
            current = t.to_string();
        }
        ticker.update(|| match expected {
            Some(n) if n > 0 => format!("{}% ({objects}/{n}) {current}", (objects * 100 / n).min(99)),
            _ => format!("{objects} objects {current}"),
        });
    }
    let status = child.wait().map_err(|e| KernelError::Spawn(shown.clone(), e))?;
    let _ = err_thread.join();
    if !status.success() {
        return Err(KernelError::Command { cmd: shown, status: status.to_string(), log: Some(log_path) });
    }
    if !incremental {
        let _ = std::fs::write(&count_file, objects.to_string());
    }
    ticker.finish(format!("{objects} objects"));
    Ok(())
}
