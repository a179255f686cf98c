//! Isolation after set-up: close inherited descriptors, drop every capability, set
//! no_new_privs and install a seccomp allowlist on all threads (TSYNC). A forbidden syscall
//! kills the VMM with a log line naming it (SIGSYS handler), exit code [`EXIT_CODE_SECCOMP`].
//!
//! Some syscalls are allowed only with certain arguments: `ioctl` only with the request
//! numbers the running VMM issues (so a compromised device model cannot create VMs, change
//! vCPU state or push input into a terminal), `mmap`/`mprotect` never executable, `prctl`
//! only to name a thread, `clone` only for threads (clone3, whose flags a filter cannot
//! read, fails with ENOSYS so glibc falls back to clone), `openat` only to read or to create
//! a new file (never to truncate or write an existing one: a compromised device model cannot
//! overwrite disk images or saved state), `fcntl` only for descriptor flags and CLOEXEC
//! duplicates (no locks, leases, owners or signals on another process's files).

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use crate::error::{Error, Result};
use crate::spec::RunAs;

pub const EXIT_CODE_SECCOMP: i32 = rayos_proto::vmm::exit_code::SECCOMP;

/// Descriptors open when the process started, besides stdin/stdout/stderr: whatever the
/// parent leaked to us. Call first thing in `main`, before anything opens files.
pub fn inherited_fds() -> BTreeSet<i32> {
    let listed: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    // The listing shows the directory's own descriptor, closed by now; its number is reused
    // during set-up (e.g. by the control socket) and isolation must not close that one.
    listed
        .into_iter()
        // SAFETY: F_GETFD only queries a descriptor's flags.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0)
        .collect()
}

/// Everything the VMM's threads call after set-up, with any argument: vCPU run loops and bus
/// devices, virtio workers (epoll, eventfds, preadv/pwritev on images, readv/writev on taps,
/// sockets for console ports), the control socket, and Rust's runtime (futex, signals,
/// thread exit). `ioctl`, `mmap`, `mprotect`, `prctl` and `clone` are allowed with
/// conditions, see [`conditional_rules`].
const ALLOWED: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    // clone3 is answered ENOSYS by a second filter, see clone3_filter.
    libc::SYS_clone3,
    libc::SYS_close,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    // The snapshot writer sizes its memory file. Its directory changes (mkdirat, renameat,
    // unlinkat) are allowed only inside the VM's directory, see `vm_dir_rules`.
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_lseek,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
];

/// ioctl request numbers, encoded like the kernel's `_IO`/`_IOW` (struct sizes from
/// kvm-bindings), for the requests the VMM may issue once isolated.
#[allow(non_snake_case)]
mod request {
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_ioeventfd, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msi,
        kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs,
        kvm_xsave,
    };
    const KVMIO: u32 = 0xAE;
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    vmm_sys_util::ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    vmm_sys_util::ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
    vmm_sys_util::ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, KVMIO, 0x46, kvm_userspace_memory_region);
    vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
}

/// The ioctl requests the VMM issues after set-up, and where. Everything else KVM offers
/// (creating VMs and vCPUs, reading or writing registers, MSRs, CPUID, irq routing) happens
/// during set-up only; KVM_IRQFD and KVM_IRQ_LINE are not used at run time (legacy IRQs go
/// through irqfds registered at set-up, PCI devices use MSI-X). Code that reads or writes
/// VM state after isolation (pause, snapshot) must add its requests here; the SIGSYS line
/// names the request number it was stopped on.
pub fn allowed_ioctls() -> [(u32, &'static str); 22] {
    [
        (request::KVM_RUN() as u32, "KVM_RUN: the vCPU loops"),
        (request::KVM_SIGNAL_MSI() as u32, "KVM_SIGNAL_MSI: MSI-X interrupts from devices"),
        (request::KVM_IOEVENTFD() as u32, "KVM_IOEVENTFD: queue-notify ioeventfds follow a BAR the guest moves"),
        (
            request::KVM_SET_USER_MEMORY_REGION() as u32,
            "KVM_SET_USER_MEMORY_REGION: the framebuffer slot follows its BAR",
        ),
        (crate::devices::virtio::net::TUNSETOFFLOAD as u32, "TUNSETOFFLOAD: virtio-net activation"),
        // Reads (and resets) which framebuffer pages the guest wrote; the display channel
        // asks every 16 ms while the VM is on screen, for the compositor's damage.
        (request::KVM_GET_DIRTY_LOG() as u32, "KVM_GET_DIRTY_LOG: framebuffer damage"),
        // The `snapshot` control command reads (never writes) the parked vCPUs and the VM.
        (request::KVM_GET_MP_STATE() as u32, "KVM_GET_MP_STATE: snapshot"),
        (request::KVM_GET_REGS() as u32, "KVM_GET_REGS: snapshot"),
        (request::KVM_GET_SREGS() as u32, "KVM_GET_SREGS: snapshot"),
        (request::KVM_GET_FPU() as u32, "KVM_GET_FPU: snapshot"),
        (request::KVM_GET_XSAVE() as u32, "KVM_GET_XSAVE: snapshot"),
        (request::KVM_GET_XCRS() as u32, "KVM_GET_XCRS: snapshot"),
        (request::KVM_GET_DEBUGREGS() as u32, "KVM_GET_DEBUGREGS: snapshot"),
        (request::KVM_GET_LAPIC() as u32, "KVM_GET_LAPIC: snapshot"),
        (request::KVM_GET_MSRS() as u32, "KVM_GET_MSRS: snapshot"),
        (request::KVM_GET_VCPU_EVENTS() as u32, "KVM_GET_VCPU_EVENTS: snapshot"),
        (request::KVM_GET_TSC_KHZ() as u32, "KVM_GET_TSC_KHZ: snapshot"),
        (request::KVM_GET_IRQCHIP() as u32, "KVM_GET_IRQCHIP: snapshot"),
        (request::KVM_GET_PIT2() as u32, "KVM_GET_PIT2: snapshot"),
        (request::KVM_GET_CLOCK() as u32, "KVM_GET_CLOCK: snapshot"),
        (request::KVM_GET_CPUID2() as u32, "KVM_GET_CPUID2: snapshot (the CPUID a restore compares)"),
        // Sets a flag in the guest's pvclock: the guest was stopped, not hung.
        (request::KVM_KVMCLOCK_CTRL() as u32, "KVM_KVMCLOCK_CTRL: resume after a pause or snapshot"),
    ]
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition> {
    // Dword: ioctl's request, mmap's prot and prctl's option are C ints; the kernel ignores
    // the upper half of the register, so the filter must too.
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| Error::Isolation(format!("seccomp condition on argument {arg}: {e}")))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule> {
    SeccompRule::new(conditions).map_err(|e| Error::Isolation(format!("seccomp rule: {e}")))
}

/// Syscalls allowed only with some arguments (rules are alternatives). `vm_dir` is the
/// descriptor of the VM's own directory ([`crate::vmdir::VmDir`]), the only directory in
/// which files may be created, renamed or removed.
fn conditional_rules(vm_dir: Option<i32>) -> Result<Vec<(i64, Vec<SeccompRule>)>> {
    let ioctls = allowed_ioctls()
        .iter()
        .map(|(req, _)| rule(vec![condition(1, SeccompCmpOp::Eq, u64::from(*req))?]))
        .collect::<Result<Vec<_>>>()?;
    // Nothing is loaded or generated at run time: thread stacks, heap and guest memory are
    // never executable, so PROT_EXEC would only serve injected code.
    let not_exec = || rule(vec![condition(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)?]);
    let mut rules = vec![
        (libc::SYS_ioctl, ioctls),
        (libc::SYS_mmap, vec![not_exec()?]),
        (libc::SYS_mprotect, vec![not_exec()?]),
        // Device workers started when the guest activates a device name their thread.
        (libc::SYS_prctl, vec![rule(vec![condition(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])?]),
        (libc::SYS_openat, openat_rules(vm_dir)?),
        (
            libc::SYS_fcntl,
            FCNTL_COMMANDS.iter().map(|c| rule(vec![condition(1, SeccompCmpOp::Eq, *c as u64)?])).collect::<Result<_>>()?,
        ),
        // The control socket asks each client's uid (SO_PEERCRED), nothing else.
        (
            libc::SYS_getsockopt,
            vec![rule(vec![
                condition(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64)?,
                condition(2, SeccompCmpOp::Eq, libc::SO_PEERCRED as u64)?,
            ])?],
        ),
        // Threads (vCPUs, device workers, control connections), never a new process.
        (libc::SYS_clone, vec![rule(vec![condition(0, SeccompCmpOp::MaskedEq(THREAD), THREAD)?])?]),
    ];
    rules.extend(vm_dir_rules(vm_dir)?);
    Ok(rules)
}

/// mkdirat, renameat(2) and unlinkat (the snapshot's temp-dir-and-rename, the serial log's
/// rotation) only relative to the VM directory's descriptor; their path-only forms (mkdir,
/// rename, unlink, rmdir) not at all. The filter sees the descriptor, not where the path
/// leads: an absolute path or `..` ignores it. What keeps a compromised VMM out of other
/// VMs' files and the registry is the uid it runs as (see [`drop_to`]); this keeps the
/// calls to the one directory the VMM's own code uses.
fn vm_dir_rules(vm_dir: Option<i32>) -> Result<Vec<(i64, Vec<SeccompRule>)>> {
    let Some(fd) = vm_dir else { return Ok(vec![]) };
    let fd = fd as u64;
    let at = |arg| condition(arg, SeccompCmpOp::Eq, fd);
    Ok(vec![
        (libc::SYS_mkdirat, vec![rule(vec![at(0)?])?]),
        (libc::SYS_unlinkat, vec![rule(vec![at(0)?])?]),
        (libc::SYS_renameat, vec![rule(vec![at(0)?, at(2)?])?]),
        (libc::SYS_renameat2, vec![rule(vec![at(0)?, at(2)?])?]),
    ])
}

/// fcntl commands the VMM's runtime uses: std's `try_clone` (F_DUPFD_CLOEXEC) and flag
/// queries and updates.
const FCNTL_COMMANDS: [i32; 5] = [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL, libc::F_DUPFD_CLOEXEC];

/// openat's `flags` may be any read-only open (the snapshot writer opens its directory to
/// fsync it), or, relative to the VM directory's descriptor only, a create that fails if the
/// file exists (snapshot parts, screenshots, a rotated serial log).
fn openat_rules(vm_dir: Option<i32>) -> Result<Vec<SeccompRule>> {
    let (creat, excl, trunc) = (libc::O_CREAT as u64, libc::O_EXCL as u64, libc::O_TRUNC as u64);
    let read_only = (libc::O_ACCMODE as u64) | creat | trunc;
    let mut rules = vec![rule(vec![condition(2, SeccompCmpOp::MaskedEq(read_only), 0)?])?];
    if let Some(fd) = vm_dir {
        rules.push(rule(vec![
            condition(0, SeccompCmpOp::Eq, fd as u64)?,
            condition(2, SeccompCmpOp::MaskedEq(creat | excl | trunc), creat | excl)?,
        ])?);
    }
    Ok(rules)
}

/// The clone flags every thread has (a process made without them would be a fork).
const THREAD: u64 = (libc::CLONE_THREAD | libc::CLONE_VM) as u64;

/// clone3 takes its flags in a struct a seccomp filter cannot read, so it is answered with
/// ENOSYS, on which glibc's pthread_create falls back to clone(2), whose flags the main
/// filter checks. A separate filter because ERRNO is a different action; stacked filters
/// take the strictest answer, so its ENOSYS beats the main filter's allow.
pub fn clone3_filter() -> Result<BpfProgram> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    let f = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), TargetArch::x86_64)
        .map_err(|e| Error::Isolation(format!("building the clone3 filter: {e}")))?;
    f.try_into().map_err(|e: seccompiler::BackendError| Error::Isolation(format!("compiling the clone3 filter: {e}")))
}

/// The main filter; `vm_dir` as in [`conditional_rules`].
pub fn filter(vm_dir: Option<i32>) -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|s| (*s, vec![])).collect();
    rules.extend(conditional_rules(vm_dir)?);
    let f = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| Error::Isolation(format!("building the seccomp filter: {e}")))?;
    f.try_into().map_err(|e: seccompiler::BackendError| Error::Isolation(format!("compiling the seccomp filter: {e}")))
}

/// A fixed buffer for the SIGSYS message: no allocation in a signal handler.
struct Msg {
    buf: [u8; 96],
    len: usize,
}

impl Msg {
    fn push(&mut self, bytes: &[u8]) {
        for b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = *b;
                self.len += 1;
            }
        }
    }
    fn push_hex(&mut self, v: u32) {
        for shift in (0..8).rev() {
            self.push(&[b"0123456789abcdef"[(v >> (shift * 4)) as usize & 0xf]]);
        }
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // siginfo_t for SIGSYS: si_signo, si_errno, si_code, padding, then _sigsys
    // { void *call_addr; int syscall; unsigned arch; } — the syscall number is at byte 24.
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut msg = Msg { buf: [0; 96], len: 0 };
    msg.push(b"rayos-vmm: seccomp: blocked syscall ");
    msg.push(&[b'0' + (nr / 100 % 10) as u8, b'0' + (nr / 10 % 10) as u8, b'0' + (nr % 10) as u8]);
    if i64::from(nr) == libc::SYS_ioctl && !ctx.is_null() {
        // The request number says which ioctl a device model tried: the second syscall
        // argument, in rsi of the interrupted context.
        // SAFETY: for SA_SIGINFO handlers the third argument is the thread's ucontext_t.
        let req = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize] };
        msg.push(b" (ioctl 0x");
        msg.push_hex(req as u32);
        msg.push(b")");
    }
    msg.push(b", VMM stopped\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed by the filter.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(EXIT_CODE_SECCOMP);
    }
}

fn install_sigsys_handler() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| Error::Isolation(format!("SIGSYS handler: {e}")))
}

fn close_fds(fds: &BTreeSet<i32>) {
    for fd in fds {
        // SAFETY: these descriptors came from our parent; nothing in the VMM uses them.
        unsafe { libc::close(*fd) };
    }
}

fn drop_bounding_set() {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments only. EPERM (no CAP_SETPCAP) means we are
        // unprivileged and have nothing to drop from the bounding set.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
}

fn drop_capabilities() -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) };
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut hdr = CapHeader { version: 0x2008_0522, pid: 0 }; // _LINUX_CAPABILITY_VERSION_3
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, all valid for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        return Err(Error::Isolation(format!("capset: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

/// Becomes `to` for good: no supplementary groups, real, effective and saved ids all set
/// (glibc applies each call to every thread of the process). Needs root; after it the
/// process has no capabilities left in its permitted set.
pub fn drop_to(to: RunAs) -> Result<()> {
    let fail = |what: &str, e: nix::Error| Error::Isolation(format!("{what} to uid {} gid {}: {e}", to.uid, to.gid));
    let (uid, gid) = (nix::unistd::Uid::from_raw(to.uid), nix::unistd::Gid::from_raw(to.gid));
    nix::unistd::setgroups(&[]).map_err(|e| fail("setgroups", e))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| fail("setresgid", e))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| fail("setresuid", e))?;
    Ok(())
}

/// What [`isolate`] confines the process to, from the spec.
#[derive(Debug, Clone, Copy, Default)]
pub struct Confinement {
    /// The VM directory's descriptor ([`crate::vmdir::VmDir::raw_fd`]).
    pub vm_dir: Option<i32>,
    /// The user to run as; skipped (with a log line) when the VMM is not root.
    pub run_as: Option<RunAs>,
}

/// Applies all isolation steps to the whole process. Call after set-up, once every thread
/// that exists at that point may be held to the filter.
pub fn isolate(inherited: &BTreeSet<i32>, confine: Confinement) -> Result<()> {
    close_fds(inherited);
    // The bounding set first: dropping it needs CAP_SETPCAP, which the uid change takes away.
    drop_bounding_set();
    match confine.run_as {
        Some(to) if nix::unistd::geteuid().is_root() => {
            drop_to(to)?;
            tracing::info!("running as uid {} gid {}", to.uid, to.gid);
        }
        Some(to) => tracing::info!(
            "not root (uid {}): cannot switch to uid {} gid {}; staying, the seccomp filter still applies",
            nix::unistd::geteuid(),
            to.uid,
            to.gid
        ),
        None => tracing::info!("no run_as in the spec: staying uid {}", nix::unistd::geteuid()),
    }
    drop_capabilities()?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::Isolation(format!("no_new_privs: {}", std::io::Error::last_os_error())));
    }
    install_sigsys_handler()?;
    for bpf in [clone3_filter()?, filter(confine.vm_dir)?] {
        seccompiler::apply_filter_all_threads(&bpf).map_err(|e| Error::Isolation(format!("installing seccomp: {e}")))?;
    }
    tracing::info!("isolated: {} inherited fds closed, capabilities dropped, seccomp on", inherited.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child and returns its exit status and what it wrote to stderr.
    fn in_child(body: impl FnOnce()) -> (i32, String) {
        let mut pipe = [0; 2];
        // SAFETY: pipe fills two fds.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child only calls async-signal-safe functions and the body below.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: dup2/close on our own pipe fds in the child.
            unsafe {
                libc::dup2(pipe[1], 2);
                libc::close(pipe[0]);
            }
            body();
            // SAFETY: leave the child without running the test harness' destructors.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(pipe[1]) };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reading into a valid buffer from our pipe.
            let n = unsafe { libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        (libc::WEXITSTATUS(status), String::from_utf8_lossy(&out).into_owned())
    }

    /// Every descriptor reported is open (the listing's own directory fd is not), and a
    /// descriptor the process holds is among them.
    #[test]
    fn inherited_fds_are_the_open_ones() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let fds = inherited_fds();
        use std::os::fd::AsRawFd;
        assert!(fds.contains(&f.as_raw_fd()), "{fds:?}");
        for fd in &fds {
            // SAFETY: F_GETFD only queries a descriptor's flags.
            assert!(unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0, "fd {fd} is not open: {fds:?}");
        }
    }

    #[test]
    fn forbidden_syscall_is_named_and_fatal_allowed_ones_work() {
        let bpf = filter(None).unwrap();
        let (code, err) = in_child(move || {
            install_sigsys_handler().unwrap();
            seccompiler::apply_filter(&bpf).unwrap();
            // Allowed: a write.
            // SAFETY: writing a static buffer to stderr.
            unsafe { libc::write(2, b"still alive\n".as_ptr().cast(), 12) };
            // Forbidden: execve (59) is not on the list.
            // SAFETY: the filter traps this call before it runs.
            unsafe { libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), 0, 0) };
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert!(err.contains("still alive"), "{err}");
        assert!(err.contains("blocked syscall 059"), "{err}");
    }

    /// Writes `text` to stderr from a forked child (no allocation, no test-harness capture).
    fn say(text: &[u8]) {
        // SAFETY: writing a live buffer to stderr.
        unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
    }

    /// Runs `body` in a child under the VMM's filter and SIGSYS handler.
    fn filtered(body: impl FnOnce()) -> (i32, String) {
        filtered_in(None, body)
    }

    /// As [`filtered`], with `vm_dir` the VM directory's descriptor.
    fn filtered_in(vm_dir: Option<i32>, body: impl FnOnce()) -> (i32, String) {
        let bpfs = [clone3_filter().unwrap(), filter(vm_dir).unwrap()];
        in_child(move || {
            install_sigsys_handler().unwrap();
            for bpf in &bpfs {
                seccompiler::apply_filter(bpf).unwrap();
            }
            body();
        })
    }

    /// /dev/kvm when this host has it (the fd the VMM's ioctls really go to; opening it
    /// works even where KVM cannot run guests), else an eventfd: the filter looks only at
    /// the request number, the kernel then refuses requests the fd does not know.
    fn ioctl_target() -> i32 {
        // SAFETY: open with a static NUL-terminated path; eventfd with integer arguments.
        let fd = unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd >= 0 {
            fd
        } else {
            // SAFETY: as above.
            unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // From <linux/kvm.h> and <linux/if_tun.h> on x86_64.
        let want = [
            0xae80, 0x4020_aea5, 0x4040_ae79, 0x4020_ae46, 0x4004_54d0, 0x4010_ae42,
            // The snapshot writer's KVM_GET_* requests.
            0x8004_ae98, 0x8090_ae81, 0x8138_ae83, 0x81a0_ae8c, 0x9000_aea4, 0x8188_aea6, 0x8080_aea1,
            0x8400_ae8e, 0xc008_ae88, 0x8040_ae9f, 0xaea3, 0xc208_ae62, 0x8070_ae9f, 0x8030_ae7c,
            // KVM_GET_CPUID2 (snapshot), KVM_KVMCLOCK_CTRL (resume).
            0xc008_ae91, 0xaead,
        ];
        let got: Vec<u32> = allowed_ioctls().iter().map(|(r, _)| *r).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn allowed_ioctls_reach_the_kernel_others_stop_the_vmm() {
        let fd = ioctl_target();
        assert!(fd >= 0);
        let kvm_run = allowed_ioctls()[0].0 as libc::c_ulong;
        let (code, err) = filtered(move || {
            // Through the filter to the kernel, which refuses KVM_RUN on a non-vCPU fd.
            // SAFETY: KVM_RUN takes no argument; the kernel rejects it on this fd.
            let r = unsafe { libc::ioctl(fd, kvm_run, 0) };
            if r == -1 {
                say(b"KVM_RUN reached the kernel\n");
            }
            // The kernel compares only the low 32 bits of a request; so does the filter.
            // SAFETY: as above.
            let r = unsafe { libc::ioctl(fd, kvm_run | 1 << 32, 0) };
            if r == -1 {
                say(b"KVM_RUN with a dirty upper half reached the kernel\n");
            }
            // KVM_CREATE_VM (_IO(0xAE, 1)) is a set-up call: blocked before it runs.
            // SAFETY: the filter traps this call.
            unsafe { libc::ioctl(fd, 0xae01, 0) };
            say(b"KVM_CREATE_VM was not stopped\n");
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert!(err.contains("KVM_RUN reached the kernel"), "{err}");
        assert!(err.contains("dirty upper half reached the kernel"), "{err}");
        assert!(err.contains("blocked syscall 016 (ioctl 0x0000ae01), VMM stopped"), "{err}");
        assert!(!err.contains("not stopped"), "{err}");

        // TIOCSTI would type into the controlling terminal of whoever started the VMM.
        let (code, err) = filtered(|| {
            let c = b'x';
            // SAFETY: the filter traps this call.
            unsafe { libc::ioctl(2, libc::TIOCSTI, &c) };
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert!(err.contains("blocked syscall 016 (ioctl 0x00005412)"), "{err}");
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
    }

    #[test]
    fn no_executable_mappings_and_prctl_only_names_threads() {
        let (code, err) = filtered(|| {
            // SAFETY: anonymous mappings of one page, unmapped again; prctl with a static name.
            unsafe {
                let p = libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
                if p != libc::MAP_FAILED && libc::mprotect(p, 4096, libc::PROT_READ) == 0 {
                    say(b"rw mapping ok\n");
                }
                libc::munmap(p, 4096);
                if libc::prctl(libc::PR_SET_NAME, c"worker".as_ptr()) == 0 {
                    say(b"thread named\n");
                }
            }
        });
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("rw mapping ok") && err.contains("thread named"), "{err}");

        let (code, err) = filtered(|| {
            // SAFETY: the filter traps this call.
            unsafe {
                libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_EXEC, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
            };
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert!(err.contains("blocked syscall 009"), "{err}");

        let (code, err) = filtered(|| {
            // SAFETY: the filter traps this call before it touches the stack's protection.
            let mut local = 0u8;
            let page = (&mut local as *mut u8 as usize) & !4095;
            unsafe { libc::mprotect(page as *mut libc::c_void, 4096, libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) };
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert!(err.contains("blocked syscall 010"), "{err}");

        let (code, err) = filtered(|| {
            // SAFETY: the filter traps this call.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert!(err.contains("blocked syscall 157"), "{err}");
    }

    #[test]
    fn files_are_read_or_created_never_truncated_or_overwritten() {
        let dir = std::env::temp_dir().join(format!("vmm-seccomp-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let existing = dir.join("disk.img");
        std::fs::write(&existing, b"guest data").unwrap();
        let vm_dir = crate::vmdir::VmDir::open(&dir).unwrap();
        let dirfd = vm_dir.raw_fd();
        let c_existing = std::ffi::CString::new(existing.to_str().unwrap()).unwrap();
        let e1 = c_existing.clone();
        let (code, err) = filtered_in(Some(dirfd), move || {
            // SAFETY: openat/fcntl/close with valid NUL-terminated paths and our own fds.
            unsafe {
                let fd = libc::openat(libc::AT_FDCWD, e1.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd >= 0 && libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) >= 0 && libc::fcntl(fd, libc::F_GETFL) >= 0 {
                    say(b"read open and dup ok\n");
                }
                let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
                if libc::openat(dirfd, c"new".as_ptr(), flags, 0o600) >= 0 {
                    say(b"create_new in the VM dir ok\n");
                }
                // Same flags on an existing file: the kernel says EEXIST.
                if libc::openat(dirfd, c"disk.img".as_ptr(), flags, 0o600) < 0 {
                    say(b"create_new of an existing file refused by the kernel\n");
                }
                // A lock: not on the list.
                let lock = libc::flock { l_type: libc::F_WRLCK as i16, l_whence: 0, l_start: 0, l_len: 0, l_pid: 0 };
                libc::fcntl(fd, libc::F_SETLK, &lock);
            }
            say(b"F_SETLK was not stopped\n");
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert!(err.contains("read open and dup ok") && err.contains("create_new in the VM dir ok"), "{err}");
        assert!(err.contains("refused by the kernel"), "{err}");
        assert!(err.contains("blocked syscall 072"), "{err}");
        assert!(dir.join("new").exists());
        for flags in [libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, libc::O_RDWR, libc::O_WRONLY | libc::O_TRUNC] {
            let e = c_existing.clone();
            let (code, err) = filtered_in(Some(dirfd), move || {
                // SAFETY: the filter traps this call before it opens anything.
                unsafe { libc::openat(libc::AT_FDCWD, e.as_ptr(), flags, 0o600) };
            });
            assert_eq!(code, EXIT_CODE_SECCOMP, "flags {flags:#o}: {err}");
            assert!(err.contains("blocked syscall 257"), "{err}");
        }
        // Creating a new file anywhere but relative to the VM dir's descriptor.
        let other = std::ffi::CString::new(dir.join("other").to_str().unwrap()).unwrap();
        let (code, err) = filtered_in(Some(dirfd), move || {
            // SAFETY: the filter traps this call before it creates anything.
            unsafe { libc::openat(libc::AT_FDCWD, other.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600) };
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert!(!dir.join("other").exists());
        assert_eq!(std::fs::read(&existing).unwrap(), b"guest data", "the existing file is untouched");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The control socket's peer check runs after isolation: SO_PEERCRED passes, other
    /// socket options do not.
    #[test]
    fn the_peer_uid_can_be_asked_other_socket_options_cannot() {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two fds.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) }, 0);
        let fd = fds[0];
        let (code, err) = filtered(move || {
            let mut cred = libc::ucred { pid: 0, uid: 1, gid: 1 };
            let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
            // SAFETY: getsockopt into a ucred of the size given.
            let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
            if r == 0 && cred.pid > 0 {
                say(b"peer cred ok\n");
            }
            let mut v = 0i32;
            let mut len = 4 as libc::socklen_t;
            // SAFETY: the filter traps this call.
            unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, (&mut v as *mut i32).cast(), &mut len) };
            say(b"SO_RCVBUF was not stopped\n");
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert!(err.contains("peer cred ok") && err.contains("blocked syscall 055"), "{err}");
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    #[test]
    fn threads_start_but_processes_do_not() {
        let (code, err) = filtered(|| {
            // pthread_create: clone3 answers ENOSYS, glibc falls back to clone(CLONE_THREAD…).
            if std::thread::spawn(|| 7).join().ok() == Some(7) {
                say(b"thread ran\n");
            }
            // The kernel would say EINVAL (no struct); the filter answers first.
            // SAFETY: clone3 with a null struct of size 0 cannot create anything.
            let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
            if r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                say(b"clone3 ENOSYS\n");
            }
            // fork(2) is clone without CLONE_THREAD.
            // SAFETY: the filter traps this call before a child exists.
            unsafe { libc::fork() };
            say(b"fork was not stopped\n");
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert!(err.contains("thread ran") && err.contains("clone3 ENOSYS"), "{err}");
        assert!(err.contains("blocked syscall 056"), "{err}");
        assert!(!err.contains("not stopped"), "{err}");
    }

    /// Nothing that starts a process, and no change to the filesystem except the `*at`
    /// calls relative to the VM directory's descriptor: under the real filter, each path-based
    /// call stops the VMM (and changes nothing), as does an `*at` call against any other
    /// directory; against the VM directory they work.
    #[test]
    fn the_allowlist_excludes_process_creation_and_filesystem_changes() {
        let conditional: Vec<i64> = conditional_rules(Some(3)).unwrap().iter().map(|(s, _)| *s).collect();
        for s in [libc::SYS_execve, libc::SYS_fork, libc::SYS_vfork, libc::SYS_ptrace, libc::SYS_mount, libc::SYS_socket, libc::SYS_connect] {
            assert!(!ALLOWED.contains(&s) && !conditional.contains(&s), "syscall {s} must stay forbidden");
        }
        for s in &conditional {
            assert!(!ALLOWED.contains(s), "syscall {s} is allowed with conditions, not unconditionally");
        }

        let base = std::env::temp_dir().join(format!("vmm-seccomp-fs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (own, elsewhere) = (base.join("own"), base.join("elsewhere"));
        for d in [&own, &elsewhere] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("disk.img"), b"guest data").unwrap();
            std::fs::create_dir(d.join("sub")).unwrap();
        }
        let vm_dir = crate::vmdir::VmDir::open(&own).unwrap();
        let dirfd = vm_dir.raw_fd();
        let other = crate::vmdir::VmDir::open(&elsewhere).unwrap();
        let other_fd = other.raw_fd();
        let cs = |p: &std::path::Path| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        let (disk, sub, newdir) = (cs(&elsewhere.join("disk.img")), cs(&elsewhere.join("sub")), cs(&elsewhere.join("new")));
        type Call = Box<dyn Fn() + Send>;
        // SAFETY (each call below): path syscalls with valid NUL-terminated strings; the
        // filter traps them before they run.
        let forbidden: Vec<(&str, &str, Call)> = vec![
            ("mkdir", "083", { let p = newdir.clone(); Box::new(move || unsafe { libc::syscall(libc::SYS_mkdir, p.as_ptr(), 0o700); }) }),
            ("rename", "082", { let (a, b) = (disk.clone(), newdir.clone()); Box::new(move || unsafe { libc::syscall(libc::SYS_rename, a.as_ptr(), b.as_ptr()); }) }),
            ("unlink", "087", { let p = disk.clone(); Box::new(move || unsafe { libc::syscall(libc::SYS_unlink, p.as_ptr()); }) }),
            ("rmdir", "084", { let p = sub.clone(); Box::new(move || unsafe { libc::syscall(libc::SYS_rmdir, p.as_ptr()); }) }),
            ("unlinkat(AT_FDCWD)", "263", { let p = disk.clone(); Box::new(move || unsafe { libc::unlinkat(libc::AT_FDCWD, p.as_ptr(), 0); }) }),
            ("unlinkat(other dir)", "263", Box::new(move || unsafe { libc::unlinkat(other_fd, c"disk.img".as_ptr(), 0); })),
            ("mkdirat(AT_FDCWD)", "258", { let p = newdir.clone(); Box::new(move || unsafe { libc::mkdirat(libc::AT_FDCWD, p.as_ptr(), 0o700); }) }),
            ("renameat(own -> other dir)", "264", Box::new(move || unsafe { libc::syscall(libc::SYS_renameat, dirfd, c"disk.img".as_ptr(), other_fd, c"disk.img".as_ptr()); })),
            ("renameat2(other -> own dir)", "316", Box::new(move || unsafe { libc::syscall(libc::SYS_renameat2, other_fd, c"disk.img".as_ptr(), dirfd, c"x".as_ptr(), 0); })),
            ("link", "086", { let (a, b) = (disk.clone(), newdir.clone()); Box::new(move || unsafe { libc::syscall(libc::SYS_link, a.as_ptr(), b.as_ptr()); }) }),
            ("symlinkat", "266", Box::new(move || unsafe { libc::symlinkat(c"/etc/shadow".as_ptr(), dirfd, c"shadow".as_ptr()); })),
            ("chmod", "090", { let p = disk.clone(); Box::new(move || unsafe { libc::chmod(p.as_ptr(), 0o666); }) }),
        ];
        for (what, nr, call) in forbidden {
            let (code, err) = filtered_in(Some(dirfd), move || {
                call();
                say(b"not stopped\n");
            });
            assert_eq!(code, EXIT_CODE_SECCOMP, "{what} must stop the VMM: {err}");
            assert!(err.contains(&format!("blocked syscall {nr}")), "{what}: {err}");
        }
        assert_eq!(std::fs::read(elsewhere.join("disk.img")).unwrap(), b"guest data");
        assert!(elsewhere.join("sub").is_dir() && !elsewhere.join("new").exists());
        assert!(!own.join("shadow").exists() && own.join("disk.img").exists());

        // The same calls against the VM's own directory go through.
        let (code, err) = filtered_in(Some(dirfd), move || {
            // SAFETY: *at calls relative to our own directory fd with static names.
            unsafe {
                if libc::mkdirat(dirfd, c"snap".as_ptr(), 0o700) == 0
                    && libc::renameat(dirfd, c"disk.img".as_ptr(), dirfd, c"snap/disk.img".as_ptr()) == 0
                    && libc::unlinkat(dirfd, c"snap/disk.img".as_ptr(), 0) == 0
                    && libc::unlinkat(dirfd, c"sub".as_ptr(), libc::AT_REMOVEDIR) == 0
                {
                    say(b"own dir changes ok\n");
                }
            }
        });
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("own dir changes ok"), "{err}");
        assert!(own.join("snap").is_dir() && !own.join("disk.img").exists() && !own.join("sub").exists());
        drop((vm_dir, other));
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// The VMM after set-up as rayosd runs it: its own uid (the real drop), no capabilities,
    /// no_new_privs, the real filter with its VM directory's descriptor. It cannot read,
    /// rename over or unlink another VM's disk (0600, in a 0700 directory of another uid),
    /// nor read, write or rename over the registry (root 0600 in a root 0700 directory),
    /// whether by absolute path or by `..` from its own directory; its own snapshot into its
    /// own directory works.
    #[test]
    fn a_vmm_under_its_own_uid_cannot_touch_other_vms_or_the_registry() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test drops to a VM's uid and needs root (CI runs the tests as root): run `sudo -E cargo test -p vmm`"
        );
        use std::os::unix::fs::{chown, PermissionsExt};
        let (me, them) = (RunAs { uid: 3_900_001, gid: 3_900_001 }, RunAs { uid: 3_900_002, gid: 3_900_002 });
        let base = std::env::temp_dir().join(format!("vmm-uid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (own, other, registry) = (base.join("vms/own"), base.join("vms/other"), base.join("registry"));
        for d in [&own, &other, &registry] {
            std::fs::create_dir_all(d).unwrap();
        }
        // As rayosd lays them out: vms/ readable by all, each VM's directory its own.
        std::fs::set_permissions(base.join("vms"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let disk = other.join("disk.img");
        std::fs::write(&disk, b"other guest's data").unwrap();
        let reg = registry.join("vms.toml");
        std::fs::write(&reg, b"registry").unwrap();
        for (p, mode, owner) in [
            (&own, 0o700, Some(me)),
            (&other, 0o700, Some(them)),
            (&disk, 0o600, Some(them)),
            (&registry, 0o700, None),
            (&reg, 0o600, None),
        ] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
            if let Some(o) = owner {
                chown(p, Some(o.uid), Some(o.gid)).unwrap();
            }
        }
        std::fs::write(own.join("scratch"), b"").unwrap();
        chown(own.join("scratch"), Some(me.uid), Some(me.gid)).unwrap();

        let vm_dir = crate::vmdir::VmDir::open(&own).unwrap();
        let dirfd = vm_dir.raw_fd();
        let bpfs = [clone3_filter().unwrap(), filter(Some(dirfd)).unwrap()];
        let cs = |p: &std::path::Path| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        let (c_disk, c_reg) = (cs(&disk), cs(&reg));
        let run = |body: &dyn Fn()| {
            let bpfs = bpfs.clone();
            in_child(move || {
                drop_bounding_set();
                drop_to(me).unwrap();
                drop_capabilities().unwrap();
                // SAFETY: prctl with integer arguments only.
                assert_eq!(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, 0);
                install_sigsys_handler().unwrap();
                for bpf in &bpfs {
                    seccompiler::apply_filter(bpf).unwrap();
                }
                body();
            })
        };
        let denied = |r: libc::c_int| r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EACCES);
        let (code, err) = run(&|| {
            // SAFETY (all calls): *at and open calls with valid NUL-terminated strings.
            unsafe {
                let rd = libc::O_RDONLY | libc::O_CLOEXEC;
                let excl = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
                let report = |what: &[u8], ok: bool| {
                    say(what);
                    say(if ok { b": denied\n" } else { b": ALLOWED\n" });
                };
                report(b"read other disk", denied(libc::openat(libc::AT_FDCWD, c_disk.as_ptr(), rd)));
                report(b"read other disk via ..", denied(libc::openat(dirfd, c"../other/disk.img".as_ptr(), rd)));
                report(b"rename onto other disk", denied(libc::renameat(dirfd, c"scratch".as_ptr(), dirfd, c_disk.as_ptr())));
                report(b"rename onto other disk via ..", denied(libc::renameat(dirfd, c"scratch".as_ptr(), dirfd, c"../other/disk.img".as_ptr())));
                report(b"unlink other disk", denied(libc::unlinkat(dirfd, c"../other/disk.img".as_ptr(), 0)));
                report(b"read registry", denied(libc::openat(libc::AT_FDCWD, c_reg.as_ptr(), rd)));
                report(b"rename onto registry", denied(libc::renameat(dirfd, c"scratch".as_ptr(), dirfd, c_reg.as_ptr())));
                report(b"create in registry dir", denied(libc::openat(dirfd, c"../../registry/new".as_ptr(), excl, 0o600)));
                report(b"unlink registry", denied(libc::unlinkat(dirfd, c_reg.as_ptr(), 0)));
            }
            // The VM's own snapshot, written the way `snapshot::take` writes it.
            let shot = crate::snapshot::Target::new(&vm_dir, std::path::Path::new("snap"))
                    .and_then(|t| {
                        t.write(false, |tmp| {
                            use std::io::Write;
                            tmp.create_new(crate::snapshot::STATE_FILE)?.write_all(b"{}").map_err(|e| crate::snapshot::SnapshotError::Io { file: "state.json".into(), source: e })
                        })
                    })
                    .map_err(|e| e.to_string());
            match shot {
                Ok(()) => say(b"own snapshot written\n"),
                Err(e) => say(format!("own snapshot failed: {e}\n").as_bytes()),
            }
        });
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("ALLOWED"), "a VMM under its own uid reached what is not its own:\n{err}");
        assert_eq!(err.matches(": denied").count(), 9, "{err}");
        assert!(err.contains("own snapshot written"), "{err}");
        let st = std::fs::metadata(own.join("snap/state.json")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((st.uid(), st.mode() & 0o777), (me.uid, 0o600), "the snapshot is the VM's own");

        // Writing the registry in place: the filter stops the VMM before the kernel is asked.
        let c_reg2 = cs(&reg);
        let (code, err) = run(&|| {
            // SAFETY: the filter traps this call.
            unsafe { libc::openat(libc::AT_FDCWD, c_reg2.as_ptr(), libc::O_WRONLY) };
        });
        assert_eq!(code, EXIT_CODE_SECCOMP, "{err}");
        assert_eq!(std::fs::read(&disk).unwrap(), b"other guest's data");
        assert_eq!(std::fs::read(&reg).unwrap(), b"registry");
        drop(vm_dir);
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// The display channel's thread, started after isolation as the VMM's threads may be,
    /// answers Attach (sendmsg with the memfd) and, shown, reads KVM's dirty log of a real
    /// framebuffer slot (KVM_GET_DIRTY_LOG) and sends the damage, all under the filter.
    #[test]
    fn the_display_channel_works_under_the_filter() {
        use crate::attach::{Attached, Display};
        use crate::devices::display::{BochsDisplay, DEFAULT_FB_SIZE};
        use crate::devices::BusDevice;
        use crate::display_channel::Channel;
        use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
        use rayos_proto::display::{decode_from_vmm, encode_to_vmm, FromVmm, ToVmm};
        use std::os::fd::AsRawFd;

        let vm = std::sync::Arc::new(crate::vm::Vm::new().expect("a KVM VM (needs /dev/kvm)"));
        let window = 0xc000_0000..0xd000_0000u64;
        let mut root = crate::devices::pci::PciRoot::new(vm.clone(), window.clone());
        let dev = BochsDisplay::new(vm.clone(), DEFAULT_FB_SIZE).unwrap();
        let devices = Attached { display: Some(Display { framebuffer: dev.framebuffer(), dirty: dev.dirty() }), ..Attached::default() };
        let slot = root.add(Box::new(dev)).unwrap();
        // A 640x480 mode (Linux's bochs_hw_setmode), so damage has lines to name.
        let regs = root.bar_address(slot, 2).unwrap().0 - window.start;
        let mut mmio = root.mmio_window();
        for (i, v) in [(4u64, 0u16), (3, 32), (1, 640), (2, 480), (6, 640), (4, 0x41)] {
            mmio.write(regs + 0x500 + 2 * i, &v.to_le_bytes());
        }
        let (vmm_end, comp) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::empty()).unwrap();
        let channel = Channel::new(vmm_end, &devices).unwrap();
        let (code, err) = filtered(move || {
            let _thread = channel.spawn().unwrap();
            let mut buf = [0u8; 4096];
            let mut next = || {
                let n = recv(comp.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
                decode_from_vmm(&buf[..n]).unwrap()
            };
            send(comp.as_raw_fd(), &encode_to_vmm(&ToVmm::Attach), MsgFlags::empty()).unwrap();
            if matches!(next(), FromVmm::Framebuffer { .. }) {
                say(b"framebuffer received\n");
            }
            send(comp.as_raw_fd(), &encode_to_vmm(&ToVmm::Shown { shown: true }), MsgFlags::empty()).unwrap();
            if next() == (FromVmm::Damage { y0: 0, y1: 480 }) {
                say(b"damage received\n");
            }
            // Two more ticks, each reading the dirty log.
            std::thread::sleep(std::time::Duration::from_millis(40));
        });
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("framebuffer received") && err.contains("damage received"), "{err}");
    }
}
