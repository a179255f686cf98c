//! Errors of the VMM library. Each names the file, field or device it concerns.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] rayos_proto::spec::SpecError),
    #[error("/dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM {op}: {source}")]
    Kvm { op: &'static str, source: kvm_ioctls::Error },
    #[error("host KVM lacks {0}")]
    KvmCapability(&'static str),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("initramfs {path}: {reason}")]
    Initramfs { path: PathBuf, reason: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("ACPI tables: {0}")]
    Acpi(String),
    #[error("bus: {0}")]
    Bus(String),
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("isolation: {0}")]
    Isolation(String),
    #[error(transparent)]
    DisplayChannel(#[from] crate::display_channel::SetupError),
    #[error(
        "host KVM made no progress: vCPU 0 left KVM_RUN {exits} times in the first {secs:.1} s \
         and then not at all; this host's KVM cannot run ordinary guests \
         (e.g. a paravirtual kvm_pvm without VT-x/AMD-V)"
    )]
    NoProgress { exits: u64, secs: f64 },
    #[error("vCPU {cpu}: {reason}")]
    Vcpu { cpu: usize, reason: String },
    /// A restore found the saved state unusable here (damaged, another CPU, another TSC
    /// frequency, changed disks): the state's fault, not this host's.
    #[error("{file}: field `{field}`: {reason}")]
    StateRejected { file: PathBuf, field: String, reason: String },
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
    pub fn kvm(op: &'static str, source: kvm_ioctls::Error) -> Self {
        Error::Kvm { op, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
