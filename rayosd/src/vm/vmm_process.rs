//! One `rayos-vmm` process: its spec file, its spawn (the exit status comes from the
//! [`Reaper`], never from our own wait) with its supervisor connection (a socketpair whose
//! other end it gets as `--control-fd 3`, see [`super::vmm_conn`]), and its output into
//! rayosd's log.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rayos_proto::spec::{ConsoleSpec, DiskSpec, DisplaySpec, InputSpec, NetSpec, VmSpec};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use tokio::io::AsyncBufReadExt;
use tokio::sync::oneshot;

use super::registry::{DisplaySize, Network, VmRecord};
use crate::reaper::{ExitKind, Reaper};

/// The descriptor the VMM finds its supervisor connection on.
const CONTROL_FD: i32 = 3;
/// The descriptor the VMM finds its display channel on (VMs with a display only).
const DISPLAY_FD: i32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("disk image {0} is missing")]
    MissingDisk(PathBuf),
    #[error("VM spec for {vm}: {reason}")]
    BadSpec { vm: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot start {bin}: {source}")]
    Spawn { bin: PathBuf, source: std::io::Error },
}

/// Where one VM's runtime files go.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub spec: PathBuf,
    pub control_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub serial_log: PathBuf,
    /// The VM's own folder (`<vms_dir>/<uuid>`): its user's, where its VMM may write.
    pub vm_dir: PathBuf,
}

impl VmFiles {
    pub fn new(run_dir: &Path, vm_dir: &Path, vm: &VmRecord) -> VmFiles {
        VmFiles {
            spec: run_dir.join(format!("{}.json", vm.id)),
            control_socket: run_dir.join(format!("{}.sock", vm.id)),
            agent_socket: run_dir.join(format!("{}.agent.sock", vm.id)),
            serial_log: vm_dir.join("serial.log"),
            vm_dir: vm_dir.to_path_buf(),
        }
    }
}

/// The missing disks come first so one message can name them all.
pub fn missing_disks(vm: &VmRecord) -> Vec<PathBuf> {
    vm.disks.iter().filter(|d| !d.path.is_file()).map(|d| d.path.clone()).collect()
}

/// The [`VmSpec`] for `vm` with a display of `display` (chosen by [`super::monitor::choose`]
/// for VMs with one), checked the way rayos-vmm will check it.
pub fn build_spec(vm: &VmRecord, files: &VmFiles, display: Option<DisplaySize>) -> Result<VmSpec, VmmError> {
    if let Some(d) = missing_disks(vm).into_iter().next() {
        return Err(VmmError::MissingDisk(d));
    }
    let c = &vm.config;
    let mut spec = VmSpec::new(&vm.name, c.vcpus, c.memory_mib, c.kernel.clone());
    spec.initramfs = c.initramfs.clone();
    spec.cmdline = c.cmdline.clone();
    spec.disks = vm.disks.iter().map(|d| DiskSpec { path: d.path.clone(), read_only: d.read_only }).collect();
    spec.net = c.net_taps.iter().map(|t| NetSpec { tap: t.clone(), mac: None }).collect();
    if vm.policy.network == Network::Nat {
        spec.net.push(nat_card(vm));
    }
    spec.display = c.display.and(display).map(|d| DisplaySpec { width: d.width, height: d.height });
    spec.input = c.input.then(InputSpec::default);
    spec.console = c.agent.then(ConsoleSpec::default);
    spec.rng = c.rng;
    spec.serial_log = Some(files.serial_log.clone());
    // For tools and tests (`vmm/scripts`, the QEMU tests); rayosd talks over its own connection.
    spec.control_socket = Some(files.control_socket.clone());
    spec.validate().map_err(|e| VmmError::BadSpec { vm: vm.name.clone(), reason: e.to_string() })?;
    Ok(spec)
}

/// A NAT VM's card: its tap on the RayOS bridge ([`netd::vmlink::prepare`] makes it before
/// the start), and a MAC from its UUID, the same on every start and resume.
pub fn nat_card(vm: &VmRecord) -> NetSpec {
    NetSpec {
        tap: netd::vmlink::tap_name(super::owner::vm_uid(vm.id)),
        mac: Some(rayos_proto::net::vm_mac(vm.id.as_bytes())),
    }
}

/// A started VMM.
pub struct Spawned {
    pub pid: u32,
    pub exit: oneshot::Receiver<ExitKind>,
    /// Our end of its supervisor connection.
    pub conn: tokio::net::UnixStream,
    /// Our end of its display channel (`rayos_proto::display`), for VMs with a display: the
    /// compositor gets duplicates of it (`org.rayos.Display1.OpenChannel`).
    pub display: Option<OwnedFd>,
}

/// A close-on-exec copy of `fd` numbered above [`CONTROL_FD`] and [`DISPLAY_FD`].
fn above_fixed_fds(fd: &impl AsFd) -> std::io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd.as_fd().as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(DISPLAY_FD + 1)).map_err(std::io::Error::from)?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Puts `fd` (numbered above the fixed descriptors) at `target` in a child between fork and
/// exec; dup2 clears close-on-exec on the copy. Async-signal-safe.
fn place_fd(fd: i32, target: i32) -> std::io::Result<()> {
    // SAFETY: dup2 on descriptors the parent keeps open until the spawn returns.
    if unsafe { libc::dup2(fd, target) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Empties the serial log of the VM's last run before a fresh boot (a resume continues it).
/// The new VMM empties it too, but only once it runs: until then `vm logs` answered with
/// the last run's lines as if they were this one's (a test saw its heartbeats and took the
/// new boot for up). The file is truncated, not removed: it belongs to the VM's own user,
/// which the VMM runs as. Its rotated predecessor goes, being older still.
fn forget_last_run_log(serial_log: &Path) {
    match std::fs::OpenOptions::new().write(true).truncate(true).open(serial_log) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("emptying {} before a fresh boot: {e}", serial_log.display()),
    }
    let _ = std::fs::remove_file(super::serial_tail::rotated(serial_log));
}

/// Writes the spec and starts `vmm_bin --spec FILE --control-fd 3 [--display-fd 4]`. Its stdout/stderr go to
/// the log under `vm <name>`. Must run on the runtime that runs the reaper (registration is in
/// this call).
/// With `restore`, the VMM continues the state saved in that folder (`--restore DIR`) instead
/// of booting the spec; the spec file is still written (tools read it).
pub fn spawn(reaper: &Reaper, vmm_bin: &Path, vm: &VmRecord, files: &VmFiles, spec: &VmSpec, restore: Option<&Path>) -> Result<Spawned, VmmError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmmError::Io { path, source }
    };
    for dir in [files.spec.parent(), files.serial_log.parent()].into_iter().flatten() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let spec = &confined(spec, vm, files)?;
    let text = serde_json::to_vec_pretty(spec).expect("a VmSpec serializes");
    std::fs::write(&files.spec, text).map_err(io(&files.spec))?;
    // A socket left by a VMM that was killed would make the new one refuse to start.
    let _ = std::fs::remove_file(&files.control_socket);
    let _ = std::fs::remove_file(&files.agent_socket);
    if restore.is_none() {
        forget_last_run_log(&files.serial_log);
    }

    let spawn_err = |source| VmmError::Spawn { bin: vmm_bin.to_path_buf(), source };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(spawn_err)?;
    // SEQPACKET: each datagram is one whole message, so a compositor that dies mid-write
    // leaves nothing half written for the next one.
    let display = match spec.display {
        Some(_) => Some(
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .map_err(|e| spawn_err(std::io::Error::from(e)))?,
        ),
        None => None,
    };
    let mut cmd = Command::new(vmm_bin);
    match restore {
        Some(dir) => cmd.arg("--restore").arg(dir),
        None => cmd.arg("--spec").arg(&files.spec),
    };
    cmd.arg("--control-fd").arg(CONTROL_FD.to_string());
    if display.is_some() {
        cmd.arg("--display-fd").arg(DISPLAY_FD.to_string());
    }
    // Both child-side ends are first copied above the descriptors they go to, so placing one
    // can never overwrite the other.
    let control_src = above_fixed_fds(&theirs).map_err(spawn_err)?;
    let display_src = display.as_ref().map(|(_, t)| above_fixed_fds(t)).transpose().map_err(spawn_err)?;
    let (control_raw, display_raw) = (control_src.as_raw_fd(), display_src.as_ref().map(|d| d.as_raw_fd()));
    // SAFETY: between fork and exec only dup2 runs (async-signal-safe); the descriptors stay
    // open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            place_fd(control_raw, CONTROL_FD)?;
            if let Some(d) = display_raw {
                place_fd(d, DISPLAY_FD)?;
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its log lines go into ours: no terminal colours.
    cmd.env("NO_COLOR", "1");
    // Its own process group: a terminal's ctrl-c to systemless must not kill the VMs with it.
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    drop((theirs, control_src, display_src));
    let display = display.map(|(ours, _theirs)| ours);
    let pid = child.id();
    let exit = reaper.watch(pid);
    let source = format!("vm {}", vm.name);
    for (fd, level) in [
        (child.stdout.take().map(OwnedFd::from), tracing::Level::INFO),
        (child.stderr.take().map(OwnedFd::from), tracing::Level::INFO),
    ] {
        let Some(fd) = fd else { continue };
        let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else { continue };
        let source = source.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(rx).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                crate::log::sink().log(level, &source, &line);
            }
        });
    }
    let conn = ours.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(ours)).map_err(spawn_err)?;
    // Dropping `Child` neither waits nor kills: the reaper owns the wait.
    Ok(Spawned { pid, exit, conn, display })
}

/// `spec` for a VMM that runs as the VM's own user (see [`super::owner`]) with the VM's
/// folder as the only place it writes; the folder and the disks in it are given to that
/// user first.
fn confined(spec: &VmSpec, vm: &VmRecord, files: &VmFiles) -> Result<VmSpec, VmmError> {
    super::owner::give_files(vm, &files.vm_dir).map_err(|e| VmmError::Io { path: e.path.clone(), source: std::io::Error::other(e.to_string()) })?;
    let uid = super::owner::vm_uid(vm.id);
    let mut spec = spec.clone();
    spec.vm_dir = Some(files.vm_dir.clone());
    spec.run_as = Some(rayos_proto::spec::RunAs { uid, gid: uid });
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::registry::{DeviceConfig, DiskRecord, DisplayConfig, Policy, VmKind};

    fn record(dir: &Path, disk: &Path) -> VmRecord {
        VmRecord {
            id: uuid::Uuid::new_v4(),
            name: "deb".into(),
            kind: VmKind::Linux,
            disks: vec![DiskRecord { path: disk.to_path_buf(), read_only: true }],
            config: DeviceConfig {
                vcpus: 2,
                memory_mib: 256,
                kernel: dir.join("bzImage"),
                initramfs: None,
                cmdline: "console=ttyS0 root=/dev/vda".into(),
                display: Some(DisplayConfig::FollowMonitor),
                input: true,
                net_taps: vec![],
                rng: true,
                agent: true,
            },
            policy: Policy::default(),
            created_at: 0,
            last_booted_at: None,
            firstboot: None,
            saved: None,
            save_generation: 0,
        }
    }

    #[test]
    fn the_spec_carries_the_record_and_the_runtime_paths() {
        let dir = std::env::temp_dir().join(format!("rayos-vmspec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bzImage"), b"k").unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, b"").unwrap();
        let vm = record(&dir, &disk);
        let files = VmFiles::new(&dir.join("run"), &dir.join("vms"), &vm);
        let spec = build_spec(&vm, &files, Some(DisplaySize::new(1920, 1080))).unwrap();
        assert_eq!((spec.vcpus, spec.memory_mib, spec.name.as_str()), (2, 256, "deb"));
        assert_eq!(spec.disks.len(), 1);
        assert!(spec.disks[0].read_only);
        assert_eq!(spec.control_socket.as_deref(), Some(files.control_socket.as_path()));
        assert_eq!(spec.serial_log.as_deref(), Some(files.serial_log.as_path()));
        assert_eq!(spec.display, Some(DisplaySpec { width: 1920, height: 1080 }));
        assert!(spec.input.is_some() && spec.console.is_some() && spec.rng);
        let mut headless = vm.clone();
        headless.config.display = None;
        assert_eq!(build_spec(&headless, &files, Some(DisplaySize::new(1920, 1080))).unwrap().display, None);
        assert!(files.control_socket.to_string_lossy().ends_with(&format!("{}.sock", vm.id)));
        // Network: none unless the policy says nat; then one card on the VM's own tap, with a
        // MAC that follows the UUID (the same at every start).
        assert!(build_spec(&vm, &files, None).unwrap().net.is_empty(), "off: no card");
        let mut nat = vm.clone();
        nat.policy.network = Network::Nat;
        let net = build_spec(&nat, &files, None).unwrap().net;
        assert_eq!(net.len(), 1);
        assert_eq!(net[0].tap, netd::vmlink::tap_name(super::super::owner::vm_uid(vm.id)));
        assert_eq!(net[0].mac, Some(rayos_proto::net::vm_mac(vm.id.as_bytes())));
        let mut other = nat.clone();
        other.id = uuid::Uuid::new_v4();
        let net2 = build_spec(&other, &files, None).unwrap().net;
        assert_ne!((&net2[0].tap, net2[0].mac), (&net[0].tap, net[0].mac), "another VM, another tap and MAC");

        std::fs::remove_file(&disk).unwrap();
        let e = build_spec(&vm, &files, None).unwrap_err().to_string();
        assert!(e.contains("disk image") && e.contains("disk.img"), "{e}");
        assert_eq!(missing_disks(&vm), vec![disk]);

        let mut bad = record(&dir, &dir.join("bzImage"));
        bad.config.kernel = dir.join("no-such-kernel");
        let e = build_spec(&bad, &files, None).unwrap_err().to_string();
        assert!(e.contains("kernel") && e.contains("no-such-kernel"), "{e}");
    }

    /// The VMM runs as the VM's own user, writing only in the VM's folder, which is that
    /// user's (rayosd runs as root here, as in CI).
    #[test]
    fn the_spawned_spec_runs_as_the_vms_user_in_its_folder() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("rayos-vmspec-own-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bzImage"), b"k").unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, b"").unwrap();
        let vm = record(&dir, &disk);
        let files = VmFiles::new(&dir.join("run"), &dir.join("vms").join(vm.id.to_string()), &vm);
        let spec = confined(&build_spec(&vm, &files, Some(DisplaySize::new(1024, 768))).unwrap(), &vm, &files).unwrap();
        let uid = crate::vm::owner::vm_uid(vm.id);
        assert_eq!(spec.run_as, Some(rayos_proto::spec::RunAs { uid, gid: uid }));
        assert_eq!(spec.vm_dir.as_deref(), Some(files.vm_dir.as_path()));
        spec.validate().unwrap();
        if nix::unistd::geteuid().is_root() {
            assert_eq!(std::fs::metadata(&files.vm_dir).unwrap().uid(), uid);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
