//! `rayos-vmm --restore DIR --control-fd N` with a saved state it refuses: exit 12
//! (STATE_REJECTED), the reason on stderr and in an `exiting` event on the supervisor
//! connection, naming the file and the section. Refused before KVM is touched, so this runs
//! on any machine.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;

use rayos_proto::vmm::{exit_code, from_line, Event, FromVmm};

fn snapshot_dir(tag: &str, state: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-refused-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("state.json"), state).unwrap();
    d
}

/// Runs `rayos-vmm --restore dir` with a supervisor socket; returns the exit code, stderr and
/// the lines the VMM wrote on the socket.
fn restore(dir: &std::path::Path) -> (i32, String, Vec<FromVmm>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    // The child inherits its end as the fd of the same number.
    nix::fcntl::fcntl(theirs.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rayos-vmm"))
        .arg("--restore")
        .arg(dir)
        .arg("--control-fd")
        .arg(theirs.as_raw_fd().to_string())
        .output()
        .unwrap();
    drop(theirs);
    let mut text = String::new();
    (&ours).read_to_string(&mut text).unwrap();
    let lines = text.lines().map(|l| from_line::<FromVmm>(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned(), lines)
}

fn assert_refused(dir: &std::path::Path, names: &[&str]) {
    let (code, stderr, lines) = restore(dir);
    assert_eq!(code, exit_code::STATE_REJECTED, "stderr: {stderr}");
    let state = dir.join("state.json").display().to_string();
    assert!(stderr.contains(&state) && names.iter().all(|n| stderr.contains(n)), "{stderr}");
    match lines.as_slice() {
        [FromVmm::Event { event: Event::Exiting { code: 12, reason } }] => {
            assert!(reason.contains(&state) && names.iter().all(|n| reason.contains(n)), "{reason}");
        }
        other => panic!("expected one exiting event, got {other:?}"),
    }
}

#[test]
fn a_damaged_or_foreign_state_exits_12_and_says_why() {
    // From a future format.
    let dir = snapshot_dir("format", "{\n\"format_version\":99,\n\"vmm_version\":\"x\"\n}\n");
    assert_refused(&dir, &["`format_version`", "99"]);
    // This build's, with a section that does not match its checksum.
    let v = vmm::snapshot::VMM_VERSION;
    let crc = |s: &str| crc32c::crc32c(s.as_bytes());
    let state = format!(
        "{{\n\"format_version\":3,\n\"vmm_version\":\"{v}\",\n\"required\":[],\n\"checksums\":{{\"format_version\":{},\"vmm_version\":{},\"required\":{},\"vcpus\":1}},\n\"vcpus\":[]\n}}\n",
        crc("3"),
        crc(&format!("\"{v}\"")),
        crc("[]"),
    );
    std::fs::write(dir.join("state.json"), &state).unwrap();
    assert_refused(&dir, &["`vcpus`", "damaged"]);
    // A section that is not JSON any more.
    std::fs::write(dir.join("state.json"), state.replace("\"vcpus\":[]", "\"vcpus\":[}")).unwrap();
    assert_refused(&dir, &["`vcpus`", "not JSON"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_state_is_refused_but_a_bad_control_fd_is_an_error() {
    let dir = snapshot_dir("missing", "");
    std::fs::remove_file(dir.join("state.json")).unwrap();
    assert_refused(&dir, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_rayos-vmm")).arg("--restore").arg(&dir).args(["--control-fd", "999"]).output().unwrap();
    assert_eq!(out.status.code(), Some(exit_code::ERROR), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}
