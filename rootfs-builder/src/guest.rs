//! The default Linux guest: a Debian bookworm minimal root filesystem (debootstrap, minbase)
//! with sysvinit, a login on the display (tty1) and the serial port (ttyS0), and the RayOS
//! guest agent (`rayos-devguest --service`: boot timer, `ready` and heartbeats on the
//! `org.rayos.agent` port, power-off on the ACPI power button or on request) — packed into an
//! ext4 disk image with `mkfs.ext4 -d` (no mounting). The kernel is RayOS's own: it has
//! virtio, bochs DRM, ext4 and KVM_GUEST, so one kernel serves host and guest.
//!
//! Why sysvinit and not Debian's systemd: the RayOS kernel has no CONFIG_CGROUPS, without
//! which systemd refuses to boot. Once kernel-config enables cgroups, `systemd-sysv` can
//! replace `sysvinit-core` in [`PACKAGES`] (the agent then runs as a unit).
//!
//! Cached in `~/.cache/rayos/guest/`: the debootstrap tree keyed by (suite, mirror, packages),
//! the image keyed by a hash of everything that goes into it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::progress::{self, Ticker};

pub const SUITE: &str = "bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";
/// On top of minbase (which has login and passwd): an init and a few tools; `sudo` for the
/// user the agent creates at first boot, `locales` to generate that user's locale, `kbd` and
/// `console-data` (the kbd keymaps the installer offers) to load their keyboard layout.
/// `isc-dhcp-client` takes a lease when the VM's policy gives it a network card (RayOS's DHCP
/// server, `network = "nat"`); its dhclient-script writes the DNS server into resolv.conf.
pub const PACKAGES: &[&str] =
    &["sysvinit-core", "procps", "iproute2", "less", "nano", "sudo", "locales", "kbd", "console-data", "isc-dhcp-client"];
pub const IMAGE_SIZE: u64 = 2 << 30;
pub const ROOT_DEVICE: &str = "/dev/vda";
/// The guest's kernel command line (serial last: it becomes /dev/console).
pub const CMDLINE: &str = "console=tty1 console=ttyS0,115200 root=/dev/vda rw panic=10";
/// Bumped when the customization below changes in a way the inputs hash would not see.
const RECIPE_VERSION: u32 = 2;

#[derive(Debug, Error)]
pub enum GuestError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{what} failed ({status}); see its output above")]
    Command { what: String, status: String },
    #[error("could not run {0}: {1}")]
    Spawn(&'static str, std::io::Error),
    #[error(transparent)]
    HostDeps(#[from] crate::hostdeps::HostDepsError),
    #[error("building the RayOS kernel: {0}")]
    Build(String),
    #[error(transparent)]
    Cargo(#[from] crate::cargo_build::CargoError),
}

/// What the VM supervisor registers: the disk, the kernel and the command line to boot it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub size: u64,
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> GuestError + '_ {
    move |e| GuestError::Io(p.to_path_buf(), e)
}

fn run(what: &str, cmd: &mut Command) -> Result<(), GuestError> {
    let status = cmd.status().map_err(|e| GuestError::Command { what: what.into(), status: e.to_string() })?;
    if status.success() {
        Ok(())
    } else {
        Err(GuestError::Command { what: what.into(), status: status.to_string() })
    }
}

fn hash_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Lines added to sysvinit's /etc/inittab: a login on the serial port (tty1's is there
/// already) and the guest agent, restarted if it dies.
///
/// The network: `dhclient -nw` goes to the background at once, so a VM without a card (its
/// policy is `off`: no eth0) or whose DHCP server is slow boots as fast as ever; it keeps
/// asking, and renews, on its own.
const INITTAB_LINES: &str = "\n# RayOS\nT0:2345:respawn:/sbin/getty -L 115200 ttyS0 vt100\nRA:2345:respawn:/usr/local/bin/rayos-guest-agent --service\nRN:2345:once:/sbin/dhclient -4 -nw eth0\n";

/// Files written into the tree on top of debootstrap's: (path, mode, contents).
fn customization() -> Vec<(&'static str, u32, String)> {
    vec![
        ("/etc/hostname", 0o644, "rayos-linux\n".into()),
        ("/etc/hosts", 0o644, "127.0.0.1 localhost\n127.0.1.1 rayos-linux\n".into()),
        ("/etc/fstab", 0o644, format!("{ROOT_DEVICE} / ext4 defaults,errors=remount-ro 0 1\n")),
        ("/etc/motd", 0o644, "RayOS default Linux subsystem (Debian bookworm). Log in as the user chosen when RayOS was installed (it has sudo rights).\n".into()),
    ]
}

/// Builds (or takes from the cache) the default Linux guest.
pub fn ensure_default_linux_guest() -> Result<GuestImage, GuestError> {
    let disk = ensure_disk()?;
    with_kernel(disk)
}

/// Builds (or takes from the cache) the default Linux guest's disk: an ext4 image whose file
/// name carries the hash of everything that went into it.
pub fn ensure_disk() -> Result<PathBuf, GuestError> {
    let cache = crate::paths::cache_dir().join("guest");
    std::fs::create_dir_all(&cache).map_err(io(&cache))?;
    // The debootstrap tree is shared by every image built from it and gets each build's
    // agent copied in: one build at a time, across checkouts.
    let lock_path = cache.join(".lock");
    let _lock = crate::paths::lock_cache(&cache, "guest").map_err(io(&lock_path))?;
    let packages = PACKAGES.join(",");
    let boot_key = hash_hex(&[SUITE.as_bytes(), MIRROR.as_bytes(), packages.as_bytes()]);
    // The download first: it needs nothing else and is the slowest part.
    let tree = cache.join(format!("debootstrap-{SUITE}-{boot_key}"));
    let done = tree.with_extension("complete");
    if !done.exists() {
        crate::hostdeps::ensure(&["debootstrap"])?;
        let _ = std::fs::remove_dir_all(&tree);
        progress::step("guest", format!("debootstrap --variant=minbase {SUITE} (+{packages}) from {MIRROR}"));
        debootstrap(&tree, &packages)?;
        std::fs::write(&done, b"").map_err(io(&done))?;
    }

    let bins = crate::cargo_build::build_static(["systemless"])?;
    let agent = bins.join("rayos-devguest");
    let agent_bytes = std::fs::read(&agent).map_err(io(&agent))?;
    let custom = customization();
    let mut custom_text: String = custom.iter().map(|(p, m, c)| format!("{p}\0{m}\0{c}\0")).collect();
    custom_text.push_str(INITTAB_LINES);
    let image_key = hash_hex(&[
        boot_key.as_bytes(),
        &agent_bytes,
        custom_text.as_bytes(),
        &IMAGE_SIZE.to_le_bytes(),
        &RECIPE_VERSION.to_le_bytes(),
    ]);
    let disk = cache.join(format!("debian-{SUITE}-{image_key}.ext4"));
    if disk.exists() {
        progress::step("guest", format!("default Linux guest from the cache: {}", disk.display()));
        return Ok(disk);
    }

    progress::step("guest", "adding the RayOS guest agent and a login on ttyS0");
    let dest = tree.join("usr/local/bin/rayos-guest-agent");
    std::fs::create_dir_all(dest.parent().unwrap()).map_err(io(&dest))?;
    std::fs::copy(&agent, &dest).map_err(io(&dest))?;
    for (path, mode, contents) in &custom {
        let p = tree.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).map_err(io(&p))?;
        std::fs::write(&p, contents).map_err(io(&p))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).map_err(io(&p))?;
    }
    let inittab = tree.join("etc/inittab");
    let text = std::fs::read_to_string(&inittab).map_err(io(&inittab))?;
    if !text.contains("# RayOS") {
        std::fs::write(&inittab, format!("{text}{INITTAB_LINES}")).map_err(io(&inittab))?;
    }
    // Root logs in without a password on the VM's own console until the guest agent's
    // first-boot setup creates the installer's user and locks root.
    let shadow = tree.join("etc/shadow");
    let text = std::fs::read_to_string(&shadow).map_err(io(&shadow))?;
    let text: String = text
        .lines()
        .map(|l| match l.strip_prefix("root:") {
            Some(rest) => format!("root::{}\n", rest.split_once(':').map(|(_, r)| r).unwrap_or("")),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&shadow, text).map_err(io(&shadow))?;

    progress::step("guest", format!("mkfs.ext4 -d → {} ({})", disk.display(), progress::fmt_size(IMAGE_SIZE)));
    let tmp = disk.with_extension("ext4.tmp");
    let _ = std::fs::remove_file(&tmp);
    run(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "rayos-linux", "-d"])
            .arg(&tree)
            .arg(&tmp)
            .arg(format!("{}k", IMAGE_SIZE / 1024)),
    )?;
    std::fs::rename(&tmp, &disk).map_err(io(&disk))?;
    Ok(disk)
}

/// The guest boots RayOS's own kernel. It comes through `artifacts()`, which holds the build
/// lock: a second `kernel::ensure` beside a running build would compile into the same folder.
fn with_kernel(disk: PathBuf) -> Result<GuestImage, GuestError> {
    let a = crate::artifacts().map_err(|e| GuestError::Build(format!("{e:#}")))?;
    Ok(GuestImage { disk, kernel: a.kernel, cmdline: CMDLINE.into(), size: IMAGE_SIZE })
}

/// Runs debootstrap into `tree`, showing its progress (it prints one line per step).
fn debootstrap(tree: &Path, packages: &str) -> Result<(), GuestError> {
    use std::io::BufRead;
    let mut child = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={packages}"), SUITE])
        .arg(tree)
        .arg(MIRROR)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| GuestError::Spawn("debootstrap", e))?;
    let mut ticker = Ticker::new("debootstrap");
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            ticker.update(|| line.clone());
        }
    }
    let status = child.wait().map_err(|e| GuestError::Spawn("debootstrap", e))?;
    if !status.success() {
        return Err(GuestError::Command { what: "debootstrap".into(), status: status.to_string() });
    }
    ticker.finish(tree.display().to_string());
    Ok(())
}
