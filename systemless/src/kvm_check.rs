//! Does the host's KVM really run a guest? `/dev/kvm` can exist and create VMs while every
//! guest hangs (the paravirtual kvm_pvm of cloud machines). The probe is the builder's:
//! a real-mode guest that writes a byte and halts, run in a child process so a guest that
//! never comes back cannot keep a thread of ours spinning in KVM_RUN.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The argument that makes `rayos-systemless` run the probe and exit.
pub const PROBE_ARG: &str = "--kvm-probe-child";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmVerdict {
    Works { ms: u64 },
    /// Why guests will not run here.
    Unusable(String),
}

/// Runs [`probe_child`] in a child process (`exe PROBE_ARG`) with `timeout`. Must be called
/// before a reaper owns `waitpid(-1)`.
pub fn check(exe: &Path, timeout: Duration) -> KvmVerdict {
    if !Path::new("/dev/kvm").exists() {
        return KvmVerdict::Unusable("there is no /dev/kvm".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !has_hw_virt(&cpuinfo) {
        return KvmVerdict::Unusable(
            "the CPU shows no vmx/svm flag, so this /dev/kvm is a paravirtual flavour (e.g. kvm_pvm) that creates \
             VMs but hangs ordinary guests"
                .into(),
        );
    }
    let t = Instant::now();
    let mut child = match Command::new(exe).arg(PROBE_ARG).stdout(Stdio::null()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => return KvmVerdict::Unusable(format!("cannot run the KVM probe: {e}")),
    };
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return KvmVerdict::Works { ms: t.elapsed().as_millis() as u64 },
            Ok(Some(_)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return KvmVerdict::Unusable(format!("a test guest failed: {}", err.trim()));
            }
            Ok(None) if t.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return KvmVerdict::Unusable(format!(
                    "a test guest made no progress in {timeout:?}: this /dev/kvm creates VMs but does not run them \
                     (e.g. a paravirtual kvm_pvm without VT-x/AMD-V)"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return KvmVerdict::Unusable(format!("waiting for the KVM probe: {e}")),
        }
    }
}

/// KVM without VT-x/AMD-V in the CPU flags cannot run an ordinary guest: a tiny real-mode
/// probe may still come back (measured on kvm_pvm hosts), a Linux kernel never reaches init.
pub fn has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The probe itself, in the child.
pub fn probe_child() -> ! {
    match rootfs_builder::accel::probe() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
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
}
