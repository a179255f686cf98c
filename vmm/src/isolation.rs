//! Isolation after set-up: close inherited descriptors, drop every capability, set
//! no_new_privs and install a seccomp allowlist on all threads (TSYNC). A forbidden syscall
//! kills the VMM with a log line naming it (SIGSYS handler), exit code [`EXIT_CODE_SECCOMP`].

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::error::{Error, Result};

pub const EXIT_CODE_SECCOMP: i32 = 31;

/// Descriptors open when the process started, besides stdin/stdout/stderr: whatever the
/// parent leaked to us. Call first thing in `main`, before anything opens files.
pub fn inherited_fds() -> BTreeSet<i32> {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect()
}

/// Everything the VMM's threads call after set-up: vCPU run loops and bus devices, virtio
/// workers (epoll, eventfds, preadv/pwritev on images, readv/writev on taps, sockets for
/// console ports), the control socket, and Rust's runtime (futex, signals, thread exit).
const ALLOWED: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_clone,
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
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_ioctl,
    libc::SYS_lseek,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
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
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_write,
    libc::SYS_writev,
];

pub fn filter() -> Result<BpfProgram> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = ALLOWED.iter().map(|s| (*s, vec![])).collect();
    let f = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| Error::Isolation(format!("building the seccomp filter: {e}")))?;
    f.try_into().map_err(|e: seccompiler::BackendError| Error::Isolation(format!("compiling the seccomp filter: {e}")))
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo_t for SIGSYS: si_signo, si_errno, si_code, padding, then _sigsys
    // { void *call_addr; int syscall; unsigned arch; } — the syscall number is at byte 24.
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut msg = *b"rayos-vmm: seccomp: blocked syscall 000, VMM stopped\n";
    let digits = [(nr / 100 % 10) as u8, (nr / 10 % 10) as u8, (nr % 10) as u8];
    msg[36..39].copy_from_slice(&digits.map(|d| b'0' + d));
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed by the filter.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
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

fn drop_capabilities() -> Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments only. EPERM (no CAP_SETPCAP) means we are
        // unprivileged and have nothing to drop from the bounding set.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
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

/// Applies all isolation steps to the whole process. Call after set-up, once every thread
/// that exists at that point may be held to the filter.
pub fn isolate(inherited: &BTreeSet<i32>) -> Result<()> {
    close_fds(inherited);
    drop_capabilities()?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::Isolation(format!("no_new_privs: {}", std::io::Error::last_os_error())));
    }
    install_sigsys_handler()?;
    let bpf = filter()?;
    seccompiler::apply_filter_all_threads(&bpf).map_err(|e| Error::Isolation(format!("installing seccomp: {e}")))?;
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

    #[test]
    fn forbidden_syscall_is_named_and_fatal_allowed_ones_work() {
        let bpf = filter().unwrap();
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

    #[test]
    fn the_allowlist_excludes_process_creation_and_filesystem_changes() {
        for s in [libc::SYS_execve, libc::SYS_fork, libc::SYS_ptrace, libc::SYS_mount, libc::SYS_socket, libc::SYS_connect] {
            assert!(!ALLOWED.contains(&s), "syscall {s} must stay forbidden");
        }
    }
}
