//! The real control server and client over a real unix socket, on the host (no PID 1 duties).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rayosd::client::{Client, ClientError};
use rayosd::control::{self, System, SystemStatus};
use rayosd::power::PowerAction;
use rayosd::reaper::Reaper;
use rayosd::supervisor::{Limits, ServiceSpec, ServiceState, Supervisor};
use tokio::sync::mpsc;

struct Fixture {
    dir: std::path::PathBuf,
    sock: std::path::PathBuf,
    power: mpsc::UnboundedReceiver<PowerAction>,
    supervisor: Arc<Supervisor>,
}

async fn start(tag: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("rayosd-api-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Non-root callers must reach the socket.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.join("control.sock");
    let reaper = Arc::new(Reaper::new());
    let r = reaper.clone();
    tokio::spawn(async move { r.run().await });
    let (tx, power) = mpsc::unbounded_channel();
    let supervisor = Supervisor::new(reaper, Limits::default(), tx.clone());
    supervisor.add(ServiceSpec::new("sleeper", &["sleep", "60"])).unwrap();
    let system = Arc::new(System {
        supervisor: supervisor.clone(),
        status: Mutex::new(SystemStatus { mode: "rescue".into(), ..Default::default() }),
        power: tx,
    });
    let listener = control::bind(&sock).unwrap();
    tokio::spawn(control::serve(listener, system));
    Fixture { dir, sock, power, supervisor }
}

async fn wait_running(c: &Client, name: &str, restarts: u32) -> u32 {
    for _ in 0..500 {
        let s = c.service(name).await.unwrap();
        if s.state == ServiceState::Running && s.restarts == restarts {
            return s.pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never ran with {restarts} restarts");
}

#[tokio::test(flavor = "current_thread")]
async fn status_services_and_restart_through_the_api() {
    let mut f = start("main").await;
    let c = Client::connect(&f.sock).await.unwrap();
    let st = c.status().await.unwrap();
    assert_eq!(st.mode, "rescue");
    assert!(st.rss_kib > 0);
    assert!(c.ping().await.unwrap() > 0);

    let pid = wait_running(&c, "sleeper", 0).await;
    assert!(c.signal_service("sleeper", "KILL").await.unwrap());
    let pid2 = wait_running(&c, "sleeper", 1).await;
    assert_ne!(pid, pid2);
    assert_eq!(c.service("sleeper").await.unwrap().last_exit, "killed by signal 9 (SIGKILL)");

    c.power_off().await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(2), f.power.recv()).await.unwrap(), Some(PowerAction::PowerOff));
    f.supervisor.stop_all().await;
    std::fs::remove_dir_all(&f.dir).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn malformed_calls_get_named_errors_and_change_nothing() {
    let f = start("bad").await;
    let c = Client::connect(&f.sock).await.unwrap();
    let before = wait_running(&c, "sleeper", 0).await;

    match c.signal_service("sleeper", "NOTASIGNAL").await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("NOTASIGNAL"), "{m}"),
        other => panic!("{other:?}"),
    }
    match c.restart_service("no-such").await {
        Err(ClientError::NoSuchService(m)) => assert!(m.contains("no-such"), "{m}"),
        other => panic!("{other:?}"),
    }
    match c.stop_service("../etc/passwd").await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("../etc/passwd"), "{m}"),
        other => panic!("{other:?}"),
    }
    match c.log_tail(0).await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("lines"), "{m}"),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = c.service("sleeper").await.unwrap();
    assert_eq!((s.state, s.pid, s.restarts), (ServiceState::Running, before, 0), "no state change");
    f.supervisor.stop_all().await;
    std::fs::remove_dir_all(&f.dir).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn non_root_caller_is_refused_by_rayosctl_and_root_reads_work() {
    let mut f = start("nonroot").await;
    let sock = f.sock.clone();
    let out = tokio::task::spawn_blocking(move || {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rayosctl"));
        cmd.args(["--socket", sock.to_str().unwrap(), "poweroff"]);
        // nobody/nogroup; only meaningful when the test runs as root (CI does).
        if nix::unistd::Uid::effective().is_root() {
            cmd.uid(65534).gid(65534);
        }
        cmd.output().unwrap()
    })
    .await
    .unwrap();
    if nix::unistd::Uid::effective().is_root() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "stderr: {err}");
        assert!(err.contains("access denied") && err.contains("uid is 65534"), "{err}");
        assert!(f.power.try_recv().is_err(), "a refused call must not power off");
    }

    let sock = f.sock.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_rayosctl")).args(["--socket", sock.to_str().unwrap(), "--json", "services"]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "sleeper");

    let out = tokio::task::spawn_blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_rayosctl")).args(["--socket", "/nonexistent/sock", "status"]).output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(3));
    f.supervisor.stop_all().await;
    std::fs::remove_dir_all(&f.dir).unwrap();
}
