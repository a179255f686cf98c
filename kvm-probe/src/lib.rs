//! Does the host's KVM really run a guest? `/dev/kvm` can exist and create VMs while every
//! guest hangs (the paravirtual kvm_pvm of cloud machines). The probe is a real-mode guest
//! that writes a byte to a port and halts, run in a child process (the caller's own binary
//! with an argument it chooses, which calls [`probe_child`]) so a guest that never comes back
//! cannot keep a thread of ours spinning in KVM_RUN; the child is killed after the timeout.
//!
//! Used by the builder (QEMU's accelerator) and by systemless (its verdict before it starts).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the child gets: a working KVM answers in milliseconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Works { ms: u64 },
    /// Why guests will not run here.
    Unusable(String),
}

/// Checks `/dev/kvm`, the CPU's flags, then runs `exe child_arg` (which must call
/// [`probe_child`]) and waits up to `timeout`. Call it before a reaper owns `waitpid(-1)`.
pub fn check(exe: &Path, child_arg: &str, timeout: Duration) -> Verdict {
    if !Path::new("/dev/kvm").exists() {
        return Verdict::Unusable("there is no /dev/kvm".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !has_hw_virt(&cpuinfo) {
        return Verdict::Unusable(
            "the CPU shows no vmx/svm flag, so this /dev/kvm is a paravirtual flavour (e.g. kvm_pvm) that creates \
             VMs but hangs ordinary guests"
                .into(),
        );
    }
    let t = Instant::now();
    let mut child = match Command::new(exe).arg(child_arg).stdout(Stdio::null()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => return Verdict::Unusable(format!("cannot run the KVM probe {}: {e}", exe.display())),
    };
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Verdict::Works { ms: t.elapsed().as_millis() as u64 },
            Ok(Some(_)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Verdict::Unusable(format!("a test guest on host KVM failed: {}", err.trim()));
            }
            Ok(None) if t.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Verdict::Unusable(format!(
                    "a test guest on host KVM made no progress in {timeout:?}: this /dev/kvm creates VMs but does not \
                     run them (e.g. a paravirtual kvm_pvm without VT-x/AMD-V)"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Verdict::Unusable(format!("waiting for the KVM probe: {e}")),
        }
    }
}

/// KVM without VT-x/AMD-V in the CPU flags cannot run an ordinary guest: a tiny real-mode
/// probe may still come back (measured on kvm_pvm hosts), a Linux kernel never reaches init.
pub fn has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The child's side: runs [`probe`] and exits 0, or 1 with the reason on stderr.
pub fn probe_child() -> ! {
    match probe() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_virtualization_is_read_from_the_cpu_flags() {
        assert!(has_hw_virt("processor\t: 0\nflags\t\t: fpu vme svm npt\n"));
        assert!(has_hw_virt("flags\t\t: fpu vmx ept\n"));
        assert!(!has_hw_virt("flags\t\t: fpu vme hypervisor\n"));
        assert!(!has_hw_virt(""));
    }

    #[test]
    fn a_child_that_hangs_is_killed_after_the_timeout_and_a_failing_one_is_reported() {
        if !Path::new("/dev/kvm").exists() || !has_hw_virt(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()) {
            // The checks before the child decide; the verdict must say which one.
            let v = check(Path::new("/bin/sleep"), "10", Duration::from_millis(200));
            assert!(matches!(&v, Verdict::Unusable(w) if w.contains("/dev/kvm") || w.contains("vmx/svm")), "{v:?}");
            return;
        }
        let t = Instant::now();
        let v = check(Path::new("/bin/sleep"), "10", Duration::from_millis(300));
        assert!(t.elapsed() < Duration::from_secs(5), "the child was not killed");
        assert!(matches!(&v, Verdict::Unusable(w) if w.contains("no progress")), "{v:?}");
        let v = check(Path::new("/bin/false"), "x", Duration::from_secs(3));
        assert!(matches!(&v, Verdict::Unusable(w) if w.contains("failed")), "{v:?}");
    }
}
