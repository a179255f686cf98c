//! Does the host's KVM really run a guest? The probe is the `kvm-probe` crate's (shared with
//! the builder): a real-mode guest that writes a byte and halts, run in a child process
//! (`rayos-systemless --kvm-probe-child`) so a guest that never comes back cannot keep a
//! thread of ours spinning in KVM_RUN; the child is killed after the timeout.

use std::path::Path;
use std::time::Duration;

pub use kvm_probe::{has_hw_virt, Verdict as KvmVerdict};

/// The argument that makes `rayos-systemless` run the probe and exit.
pub const PROBE_ARG: &str = "--kvm-probe-child";

/// Runs the probe in `exe PROBE_ARG` with `timeout`. Must be called before a reaper owns
/// `waitpid(-1)`.
pub fn check(exe: &Path, timeout: Duration) -> KvmVerdict {
    kvm_probe::check(exe, PROBE_ARG, timeout)
}

/// The probe itself, in the child.
pub fn probe_child() -> ! {
    kvm_probe::probe_child()
}
