//! Which QEMU accelerator to use: KVM when the host's KVM really runs a guest, else TCG
//! with an emulated AMD-V CPU so that RayOS can still start its own KVM guests inside.

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
    // The probe runs in a child (this binary's `kvm-probe` subcommand): a guest that does
    // not come back would otherwise keep a thread of ours spinning in KVM_RUN.
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return Accel::Tcg { why: format!("cannot find the builder binary to probe KVM: {e}") },
    };
    match kvm_probe::check(&exe, "kvm-probe", kvm_probe::DEFAULT_TIMEOUT) {
        kvm_probe::Verdict::Works { .. } => Accel::Kvm,
        kvm_probe::Verdict::Unusable(why) => Accel::Tcg { why },
    }
}

/// The probe itself (the `kvm-probe` subcommand).
pub use kvm_probe::probe;
