//! One `rayos-vmm` process: its spec file, its spawn (the exit status comes from the
//! [`Reaper`], never from our own wait), its output into rayosd's log, and a client for its
//! JSON-lines control socket (see `vmm/src/control.rs`).

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use super::registry::VmRecord;
use crate::reaper::{ExitKind, Reaper};

/// `rayos-vmm`'s exit code for "the guest rebooted" (vmm::lifecycle::EXIT_CODE_REBOOT).
pub const EXIT_REBOOT: i32 = vmm::lifecycle::EXIT_CODE_REBOOT;

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
    #[error("VMM control socket {path}: {reason}")]
    Control { path: PathBuf, reason: String },
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

/// The `vmm::spec::VmSpec` for `vm`, checked the way rayos-vmm will check it.
pub fn build_spec(vm: &VmRecord, files: &VmFiles) -> Result<vmm::spec::VmSpec, VmmError> {
    if let Some(d) = missing_disks(vm).into_iter().next() {
        return Err(VmmError::MissingDisk(d));
    }
    let c = &vm.config;
    // Built as JSON and parsed so fields the VMM adds later take their defaults.
    let v = json!({
        "name": vm.name,
        "vcpus": c.vcpus,
        "memory_mib": c.memory_mib,
        "kernel": c.kernel,
        "initramfs": c.initramfs,
        "cmdline": c.cmdline,
        "disks": vm.disks.iter().map(|d| json!({"path": d.path, "read_only": d.read_only})).collect::<Vec<_>>(),
        "net": c.net_taps.iter().map(|t| json!({"tap": t})).collect::<Vec<_>>(),
        "display": c.display.map(|(w, h)| json!({"width": w, "height": h})),
        "input": if c.input { json!({}) } else { Value::Null },
        // `{}`: the VMM's defaults give the agent port.
        "console": if c.agent { json!({}) } else { Value::Null },
        "rng": c.rng,
        "serial_log": files.serial_log,
        "control_socket": files.control_socket,
    });
    let bad = |reason: String| VmmError::BadSpec { vm: vm.name.clone(), reason };
    let spec: vmm::spec::VmSpec = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
    spec.validate().map_err(|e| bad(e.to_string()))?;
    Ok(spec)
}

/// A started VMM.
pub struct Spawned {
    pub pid: u32,
    pub exit: oneshot::Receiver<ExitKind>,
}

/// Writes the spec and starts `vmm_bin --spec FILE`. Its stdout/stderr go to the log under
/// `vm <name>`. Must run on the runtime that runs the reaper (registration is in this call).
pub fn spawn(reaper: &Reaper, vmm_bin: &Path, vm: &VmRecord, files: &VmFiles, spec: &vmm::spec::VmSpec) -> Result<Spawned, VmmError> {
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

    let mut cmd = Command::new(vmm_bin);
    cmd.arg("--spec").arg(&files.spec);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its log lines go into ours: no terminal colours.
    cmd.env("NO_COLOR", "1");
    // Its own process group: a terminal's ctrl-c to systemless must not kill the VMs with it.
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|source| VmmError::Spawn { bin: vmm_bin.to_path_buf(), source })?;
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
    // Dropping `Child` neither waits nor kills: the reaper owns the wait.
    Ok(Spawned { pid, exit })
}

/// `spec` for a VMM that runs as the VM's own user (see [`super::owner`]) with the VM's
/// folder as the only place it writes; the folder and the disks in it are given to that
/// user first.
fn confined(spec: &vmm::spec::VmSpec, vm: &VmRecord, files: &VmFiles) -> Result<vmm::spec::VmSpec, VmmError> {
    super::owner::give_files(vm, &files.vm_dir).map_err(|e| VmmError::Io { path: e.path.clone(), source: std::io::Error::other(e.to_string()) })?;
    let uid = super::owner::vm_uid(vm.id);
    let mut spec = spec.clone();
    spec.vm_dir = Some(files.vm_dir.clone());
    spec.run_as = Some(vmm::spec::RunAs { uid, gid: uid });
    Ok(spec)
}

/// One request on the VMM's control socket; returns the answer when `ok` is true.
pub async fn request(socket: &Path, req: Value, timeout: Duration) -> Result<Value, VmmError> {
    let err = |reason: String| VmmError::Control { path: socket.to_path_buf(), reason };
    let work = async {
        let mut s = tokio::net::UnixStream::connect(socket).await.map_err(|e| err(format!("connect: {e}")))?;
        let mut line = req.to_string();
        line.push('\n');
        s.write_all(line.as_bytes()).await.map_err(|e| err(format!("write: {e}")))?;
        let mut answer = String::new();
        tokio::io::BufReader::new(s).read_line(&mut answer).await.map_err(|e| err(format!("read: {e}")))?;
        let v: Value = serde_json::from_str(&answer).map_err(|e| err(format!("bad answer {answer:?}: {e}")))?;
        if v.get("ok") == Some(&Value::Bool(true)) {
            Ok(v)
        } else {
            Err(err(v.get("error").and_then(|e| e.as_str()).unwrap_or("refused").to_string()))
        }
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| err(format!("no answer within {timeout:?}")))?
}

/// The last `lines` lines of the VM's serial log.
pub fn serial_tail(path: &Path, lines: usize) -> String {
    // Consoles write NULs (padding, cleared screens); D-Bus strings cannot carry them.
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).replace('\0', "")).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::registry::{DeviceConfig, DiskRecord, Policy, VmKind};

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
                display: Some((1024, 768)),
                input: true,
                net_taps: vec![],
                rng: true,
                agent: true,
            },
            policy: Policy::default(),
            created_at: 0,
            last_booted_at: None,
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
        let spec = build_spec(&vm, &files).unwrap();
        assert_eq!((spec.vcpus, spec.memory_mib, spec.name.as_str()), (2, 256, "deb"));
        assert_eq!(spec.disks.len(), 1);
        assert!(spec.disks[0].read_only);
        assert_eq!(spec.control_socket.as_deref(), Some(files.control_socket.as_path()));
        assert_eq!(spec.serial_log.as_deref(), Some(files.serial_log.as_path()));
        assert!(spec.display.is_some() && spec.input.is_some() && spec.console.is_some() && spec.rng);
        assert!(files.control_socket.to_string_lossy().ends_with(&format!("{}.sock", vm.id)));

        std::fs::remove_file(&disk).unwrap();
        let e = build_spec(&vm, &files).unwrap_err().to_string();
        assert!(e.contains("disk image") && e.contains("disk.img"), "{e}");
        assert_eq!(missing_disks(&vm), vec![disk]);

        let log = dir.join("serial.log");
        std::fs::write(&log, b"one\n\0\0login: \ntwo\nthree\n").unwrap();
        assert_eq!(serial_tail(&log, 3), "login: \ntwo\nthree");

        let mut bad = record(&dir, &dir.join("bzImage"));
        bad.config.kernel = dir.join("no-such-kernel");
        let e = build_spec(&bad, &files).unwrap_err().to_string();
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
        let spec = confined(&build_spec(&vm, &files).unwrap(), &vm, &files).unwrap();
        let uid = crate::vm::owner::vm_uid(vm.id);
        assert_eq!(spec.run_as, Some(vmm::spec::RunAs { uid, gid: uid }));
        assert_eq!(spec.vm_dir.as_deref(), Some(files.vm_dir.as_path()));
        spec.validate().unwrap();
        if nix::unistd::geteuid().is_root() {
            assert_eq!(std::fs::metadata(&files.vm_dir).unwrap().uid(), uid);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
