//! rayos-systemless runs as an ordinary user and serves that user as rayosd serves root: the
//! user who started it may change things (create a VM), another non-root user may not, root
//! still may. The real systemless binary runs as uid 65534; the callers are this test
//! program re-run as each uid (credentials are per process, and the server reads the peer's).
//!
//! Runs as root (CI does), to start processes as other uids. `harness = false`: the main
//! below is either the test or, with `CLIENT_ENV` set, one caller.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use rayosd::vm::cli::Vms1Proxy;

const CLIENT_ENV: &str = "RAYOS_OWNER_TEST_CLIENT";
const OWNER: u32 = 65534;
const OTHER: u32 = 65533;

fn main() -> ExitCode {
    match std::env::var(CLIENT_ENV) {
        Ok(args) => client(&args),
        Err(_) => {
            the_owner_and_root_may_change_things_and_other_users_may_not();
            println!("test the_owner_and_root_may_change_things_and_other_users_may_not ... ok");
            ExitCode::SUCCESS
        }
    }
}

/// One caller: `SOCKET NAME KERNEL` → CreateVm NAME; prints `ok` or the error; exit 0 or 4.
fn client(args: &str) -> ExitCode {
    let [sock, name, kernel] = args.splitn(3, ' ').collect::<Vec<_>>()[..] else { panic!("{CLIENT_ENV}={args:?}") };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let r: Result<(), rayosd::client::ClientError> = rt.block_on(async {
        let conn = rayosd::client::connection(Path::new(sock)).await?;
        let vms = Vms1Proxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?;
        let req = serde_json::json!({ "name": name, "config": { "vcpus": 1, "memory_mib": 64, "kernel": kernel } });
        vms.create_vm(&req.to_string()).await?;
        Ok(())
    });
    match r {
        Ok(()) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(rayosd::client::ClientError::AccessDenied(m)) => {
            println!("denied: {m}");
            ExitCode::from(4)
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs this program as a caller with `uid` (None: as we are, root).
fn create_as(uid: Option<u32>, sock: &Path, name: &str, kernel: &Path) -> (Option<i32>, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(CLIENT_ENV, format!("{} {name} {}", sock.display(), kernel.display()));
    if let Some(u) = uid {
        cmd.uid(u).gid(u);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn the_owner_and_root_may_change_things_and_other_users_may_not() {
    assert!(nix_is_root(), "this test starts systemless and its callers as uids {OWNER}/{OTHER}, which needs root (CI runs as root)");
    let dir = std::env::temp_dir().join(format!("systemless-owner-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(OWNER), Some(OWNER)).unwrap();
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, b"k").unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_rayos-systemless"))
        .arg("--state-dir")
        .arg(&dir)
        .arg("--no-kvm-check")
        .uid(OWNER)
        .gid(OWNER)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("ready socket=") {
        assert!(out.read_line(&mut seen).unwrap() > 0, "systemless ended early: {seen}");
    }
    let sock = dir.join("control.sock");

    let (code, text) = create_as(Some(OWNER), &sock, "mine", &kernel);
    assert_eq!(code, Some(0), "systemless's own user must be allowed: {text}");
    let (code, text) = create_as(Some(OTHER), &sock, "theirs", &kernel);
    assert_eq!(code, Some(4), "another user must be refused: {text}");
    assert!(text.contains("CreateVm needs root or uid 65534") && text.contains("caller uid is 65533"), "{text}");
    let (code, text) = create_as(None, &sock, "roots", &kernel);
    assert_eq!(code, Some(0), "root must be allowed: {text}");

    let reg = std::fs::read_to_string(dir.join("registry/vms.json")).unwrap();
    assert!(reg.contains("\"mine\"") && reg.contains("\"roots\"") && !reg.contains("\"theirs\""), "{reg}");

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}
