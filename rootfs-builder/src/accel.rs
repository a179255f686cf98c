//! Which QEMU accelerator to use: KVM when the host's KVM really runs a guest, else TCG
//! with an emulated AMD-V CPU so that RayOS can still start its own KVM guests inside.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// TCG, and why KVM was not used.
    Tcg { why: String },
}

impl Accel {
    /// QEMU arguments: accelerator and CPU model.
    pub fn qemu_args(&self) -> Vec<String> {
        match self {
            Accel::Kvm => vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()],
            // EPYC with SVM and nested paging: the guest kernel's kvm_amd works under TCG.
            Accel::Tcg { .. } => vec!["-accel".into(), "tcg".into(), "-cpu".into(), "EPYC,+svm,+npt".into()],
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Accel::Kvm => "KVM (hardware virtualization)".into(),
            Accel::Tcg { why } => format!("TCG with an emulated AMD-V CPU (-cpu EPYC,+svm,+npt), because {why}"),
        }
    }
}

/// `RAYOS_ACCEL=kvm|tcg` forces a choice; otherwise probe.
pub fn detect() -> Accel {
    match std::env::var("RAYOS_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg { why: "RAYOS_ACCEL=tcg".into() },
        _ => {}
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        return Accel::Tcg { why: "there is no /dev/kvm".into() };
    }
    // KVM without VT-x/AMD-V in the CPU flags is a paravirtual flavour (e.g. kvm_pvm) that
    // creates VMs but hangs ordinary guests.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Accel::Tcg { why: "the host CPU shows no vmx/svm flag, so its /dev/kvm cannot run ordinary guests".into() };
    }
    match probe_in_child(Duration::from_secs(3)) {
        Ok(()) => Accel::Kvm,
        Err(why) => Accel::Tcg { why },
    }
}

/// Run the probe in a child process (the `kvm-probe` subcommand): a guest that does not
/// come back would otherwise keep a thread of ours spinning in KVM_RUN.
fn probe_in_child(timeout: Duration) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the builder binary: {e}"))?;
    let mut child = std::process::Command::new(exe)
        .arg("kvm-probe")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the KVM probe: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(_)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("host KVM failed a test guest: {}", err.trim()));
            }
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("a test guest on host KVM made no progress in {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for the KVM probe: {e}")),
        }
    }
}

/// The probe itself: a real-mode guest that writes one byte to a port and halts.
pub fn probe() -> Result<(), String> {
    use kvm_ioctls::{Kvm, VcpuExit};
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    // mov dx, 0x3f8; mov al, 'K'; out dx, al; hlt
    let code: [u8; 7] = [0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xf4];
    let size = 0x1000usize;
    // SAFETY: an anonymous private mapping; checked for MAP_FAILED below and unmapped by
    // process exit (the probe runs in its own short-lived process).
    let mem = unsafe {
        libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    // SAFETY: `mem` is a fresh writable mapping of `size` >= code.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem as *mut u8, code.len()) };
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0x1000,
        memory_size: size as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region points at our mapping, which outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs = kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let mut wrote = false;
    loop {
        match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::IoOut(0x3f8, data) => wrote = data == b"K",
            VcpuExit::Hlt if wrote => return Ok(()),
            other => return Err(format!("unexpected exit {other:?}")),
        }
    }
}
