//! The real control server and client over a real unix socket, on the host (no PID 1 duties).

mod common;

use common::rayosctl;
use std::sync::Arc;
use std::time::Duration;

use rayosd::client::{Client, ClientError};
use rayosd::api::{control, System, SystemStatus};
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
    let dir = common::socket_dir("rayosd-api", tag);
    let sock = dir.join("control.sock");
    let reaper = Arc::new(Reaper::new());
    let r = reaper.clone();
    tokio::spawn(async move { r.run().await });
    let (tx, power) = mpsc::unbounded_channel();
    let supervisor = Supervisor::new(reaper, Limits::default(), tx.clone());
    supervisor.add(ServiceSpec::new("sleeper", &["sleep", "60"])).unwrap();
    let system = Arc::new(System::new(supervisor.clone(), SystemStatus { mode: "rescue".into(), ..Default::default() }, tx));
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
    let sock = f.sock.to_str().unwrap().to_string();
    // The caller must really be non-root: as root (CI) rayosctl runs as nobody (65534);
    // otherwise this test's own user already is a non-root caller.
    let me = nix::unistd::Uid::effective();
    let (caller, uid) = if me.is_root() { (Some(65534), 65534) } else { (None, me.as_raw()) };
    let (code, _, err) = rayosctl(&["--socket", &sock, "poweroff"], caller).await;
    assert_eq!(code, Some(4), "a non-root poweroff must be refused with exit 4; stderr: {err}");
    assert!(err.contains("access denied") && err.contains(&format!("uid is {uid}")), "{err}");
    assert!(f.power.try_recv().is_err(), "a refused call must not power off");

    // Reads are open to every user.
    let (code, out, err) = rayosctl(&["--socket", &sock, "--json", "services"], None).await;
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "sleeper");

    let (code, _, _) = rayosctl(&["--socket", "/nonexistent/sock", "status"], None).await;
    assert_eq!(code, Some(3));
    f.supervisor.stop_all().await;
    std::fs::remove_dir_all(&f.dir).unwrap();
}
