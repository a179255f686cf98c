//! The control API's bounds and privileges, against the real server on a real unix socket
//! and the real rayosctl run as other uids: the client cap, the owner uid systemless adds to
//! root, `Logs` needing root, and what is not built yet being refused by name.
//!
//! Runs as root (CI does): rayosctl is started as uids 65534/65533 to be a non-root caller.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayosd::api::control::{self, MAX_CLIENTS};
use rayosd::api::{Access, System, SystemStatus};
use rayosd::power::PowerAction;
use rayosd::reaper::Reaper;
use rayosd::supervisor::{Limits, Supervisor};
use rayosd::vm::{Paths, Settings, VmManager};
use tokio::sync::mpsc;

const NOBODY: u32 = 65534;
const OTHER: u32 = 65533;

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test runs rayosctl as uids {NOBODY} and {OTHER}, which needs root (CI runs as root)"
    );
}

struct Server {
    dir: PathBuf,
    sock: PathBuf,
    power: mpsc::UnboundedReceiver<PowerAction>,
    system: Arc<System>,
}

fn dir(tag: &str) -> PathBuf {
    common::socket_dir("rayosd-access", tag)
}

/// rayosctl against `sock` (see [`common::rayosctl`]).
async fn rayosctl(sock: &Path, args: &[&str], uid: Option<u32>) -> (Option<i32>, String, String) {
    let sock = sock.to_str().unwrap();
    common::rayosctl(&[&["--socket", sock], args].concat(), uid).await
}

/// A server with `access`; with a VM supervisor (whose VMM is never run) when `vms`.
async fn serve(tag: &str, access: Access, vms: bool) -> Server {
    let dir = dir(tag);
    let sock = dir.join("control.sock");
    let reaper = Arc::new(Reaper::new());
    let r = reaper.clone();
    tokio::spawn(async move { r.run().await });
    let (tx, power) = mpsc::unbounded_channel();
    let supervisor = Supervisor::new(reaper.clone(), Limits::default(), tx.clone());
    let system = Arc::new(System::new(supervisor, SystemStatus { mode: "systemless".into(), ..Default::default() }, tx).with_access(access));
    if vms {
        let settings = Settings::new(PathBuf::from("/bin/false"), Paths::under(&dir.join("state")));
        assert!(system.set_vms(VmManager::open(reaper, settings).unwrap()));
    }
    tokio::spawn(control::serve(control::bind(&sock).unwrap(), system.clone()));
    Server { dir, sock, power, system }
}


/// Whether a new client is closed before the session preamble is answered.
async fn refused(sock: &Path) -> bool {
    let start = Instant::now();
    let r = rayosd::client::connection(sock).await;
    match r {
        Err(rayosd::client::ClientError::Session { source: rayosd::session::SessionError::Closed, .. }) => {
            assert!(start.elapsed() < Duration::from_secs(2), "closed, but only after {:?}", start.elapsed());
            true
        }
        Ok(_) => false,
        Err(e) => panic!("neither served nor closed at once: {e}"),
    }
}

fn refusal_lines(sock: &Path) -> usize {
    let needle = format!("control: {}: {MAX_CLIENTS} clients are connected", sock.display());
    rayosd::log::sink().tail(rayosd::log::RING_CAPACITY).iter().filter(|r| r.message.contains(&needle)).count()
}

#[tokio::test(flavor = "current_thread")]
async fn the_socket_serves_at_most_max_clients_and_closes_one_more_at_once() {
    rayosd::log::init_tracing(tracing::Level::INFO);
    let s = serve("cap", Access::root_only(), false).await;
    let mut held = Vec::new();
    for i in 0..MAX_CLIENTS {
        let c = rayosd::client::connection(&s.sock).await.unwrap_or_else(|e| panic!("client {i}: {e}"));
        held.push(c);
    }
    for _ in 0..5 {
        assert!(refused(&s.sock).await, "client {} was served", MAX_CLIENTS + 1);
    }
    assert_eq!(refusal_lines(&s.sock), 1, "five refusals in a row make one log line");
    // rayosctl says why it could not talk (exit 3, cannot connect).
    let (code, _, err) = rayosctl(&s.sock, &["status"], None).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("closed the connection before answering"), "{err}");

    // A client leaving frees its slot.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let c = loop {
        match rayosd::client::Client::connect(&s.sock).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("the freed slot was not given to a new client: {e}"),
        }
    };
    assert_eq!(c.status().await.unwrap().mode, "systemless");
    drop((c, held));
    std::fs::remove_dir_all(&s.dir).unwrap();
}

/// Clients that connect and say nothing hold their slots only for the 10 s preamble wait.
#[tokio::test(flavor = "current_thread")]
async fn silent_clients_cannot_hold_the_socket() {
    let s = serve("silent", Access::root_only(), false).await;
    let mut silent = Vec::new();
    for _ in 0..MAX_CLIENTS {
        silent.push(tokio::net::UnixStream::connect(&s.sock).await.unwrap());
    }
    assert!(refused(&s.sock).await, "the silent clients did not fill the socket");
    tokio::time::sleep(rayosd::session::SERVER_WAIT + Duration::from_millis(500)).await;
    let c = rayosd::client::Client::connect(&s.sock).await.expect("the silent clients were dropped after the preamble wait");
    assert!(c.ping().await.unwrap() > 0);
    drop(silent);
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn the_owner_uid_is_allowed_as_root_is_and_only_where_configured() {
    require_root();
    // systemless: root or its owner.
    let mut s = serve("owner", Access::root_or(NOBODY), false).await;
    let (code, _, err) = rayosctl(&s.sock, &["poweroff"], Some(OTHER)).await;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("access denied") && err.contains("caller uid is 65533") && err.contains("uid 65534"), "{err}");
    assert!(s.power.try_recv().is_err(), "a refused call must not power off");
    let (code, _, err) = rayosctl(&s.sock, &["poweroff"], Some(NOBODY)).await;
    assert_eq!(code, Some(0), "the owner is allowed: {err}");
    assert_eq!(tokio::time::timeout(Duration::from_secs(2), s.power.recv()).await.unwrap(), Some(PowerAction::PowerOff));
    let (code, _, err) = rayosctl(&s.sock, &["reboot"], None).await;
    assert_eq!(code, Some(0), "root is allowed too: {err}");
    assert_eq!(tokio::time::timeout(Duration::from_secs(2), s.power.recv()).await.unwrap(), Some(PowerAction::Reboot));
    std::fs::remove_dir_all(&s.dir).unwrap();

    // rayosd as PID 1: root only, whoever the caller.
    let mut s = serve("rootonly", Access::root_only(), false).await;
    let (code, _, err) = rayosctl(&s.sock, &["poweroff"], Some(NOBODY)).await;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("PowerOff needs root; caller uid is 65534"), "{err}");
    assert!(s.power.try_recv().is_err(), "a refused call must not power off");
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn serial_logs_need_root_and_unbuilt_options_are_refused_by_name() {
    require_root();
    let s = serve("vms", Access::root_only(), true).await;
    let kernel = s.dir.join("bzImage");
    std::fs::write(&kernel, b"k").unwrap();
    let k = kernel.to_str().unwrap();
    let (code, out, err) = rayosctl(&s.sock, &["--json", "vm", "create", "dev", "--kernel", k], None).await;
    assert_eq!(code, Some(0), "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_string();
    let log = s.dir.join("state/vms").join(&id).join("serial.log");
    std::fs::write(&log, "boot\nlogin: root\nPassword: hunter2\n").unwrap();

    let (code, out, err) = rayosctl(&s.sock, &["vm", "logs", "dev", "-n", "2"], None).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "login: root\nPassword: hunter2\n");
    let (code, out, err) = rayosctl(&s.sock, &["vm", "logs", "dev"], Some(NOBODY)).await;
    assert_eq!(code, Some(4), "a non-root caller must not read the console: {out}{err}");
    assert!(err.contains("access denied: Logs needs root; caller uid is 65534"), "{err}");
    assert!(!out.contains("hunter2"), "{out}");
    // The list stays open to everyone.
    let (code, out, err) = rayosctl(&s.sock, &["vm", "list"], Some(NOBODY)).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("dev"), "{out}");

    // Saving and fresh starts change a VM: root only.
    let (code, _, err) = rayosctl(&s.sock, &["vm", "fresh-start", "dev", "--yes"], Some(NOBODY)).await;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("access denied: StartVm needs root"), "{err}");
    let (code, _, err) = rayosctl(&s.sock, &["vm", "save", "dev"], Some(NOBODY)).await;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("access denied: SaveVm needs root"), "{err}");
    let vms = s.system.vms().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(vms.get("dev").unwrap().state, "stopped", "a refused fresh start starts nothing");
    // A stopped VM has nothing to save.
    let (code, _, err) = rayosctl(&s.sock, &["vm", "save", "dev"], None).await;
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("only a running or paused VM can be saved"), "{err}");

    let (code, _, err) = rayosctl(&s.sock, &["vm", "create", "win", "--kind", "windows", "--kernel", k], None).await;
    assert_eq!(code, Some(11), "{err}");
    assert!(err.contains("Windows VMs are not supported yet"), "{err}");
    assert!(vms.get("win").is_err(), "a refused Windows VM must not be registered");
    assert_eq!(vms.list().len(), 1);
    std::fs::remove_dir_all(&s.dir).unwrap();
}

/// `org.rayos.Display1` through rayosctl: what is presented is open to everyone, changing it
/// needs root, and a VM that does not exist or has no display is refused by name.
#[tokio::test(flavor = "current_thread")]
async fn presenting_needs_root_and_a_vm_with_a_display() {
    require_root();
    let s = serve("display", Access::root_only(), true).await;
    let kernel = s.dir.join("bzImage");
    std::fs::write(&kernel, b"k").unwrap();
    let k = kernel.to_str().unwrap();
    for args in [&["vm", "create", "headless", "--kernel", k][..], &["vm", "create", "desk", "--kernel", k, "--display", "1280x800"]] {
        let (code, _, err) = rayosctl(&s.sock, args, None).await;
        assert_eq!(code, Some(0), "{err}");
    }
    let (code, out, err) = rayosctl(&s.sock, &["presented"], Some(NOBODY)).await;
    assert_eq!((code, out.as_str()), (Some(0), "home\n"), "{err}");

    let (code, _, err) = rayosctl(&s.sock, &["present", "nosuch"], None).await;
    assert_eq!(code, Some(7), "{err}");
    assert!(err.contains("nosuch"), "{err}");
    let (code, _, err) = rayosctl(&s.sock, &["present", "headless"], None).await;
    assert_eq!(code, Some(8), "{err}");
    assert!(err.contains("VM headless has no display"), "{err}");
    let (code, _, err) = rayosctl(&s.sock, &["present", "desk"], Some(NOBODY)).await;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("Present needs root"), "{err}");
    let (code, _, err) = rayosctl(&s.sock, &["hide"], Some(NOBODY)).await;
    assert_eq!(code, Some(4), "{err}");
    assert_eq!(s.system.display().current(), "", "refused calls change nothing");

    // Root presents it: the stopped VM is started for it (this VMM, /bin/false, then fails).
    let (code, _, err) = rayosctl(&s.sock, &["present", "desk"], None).await;
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = rayosctl(&s.sock, &["presented"], Some(NOBODY)).await;
    assert_eq!((code, out.as_str()), (Some(0), "desk\n"));
    let vms = s.system.vms().unwrap();
    assert!(vms.get("desk").unwrap().restarts > 0 || vms.get("desk").unwrap().state != "stopped", "presenting a stopped VM starts it");
    let (code, _, err) = rayosctl(&s.sock, &["hide"], None).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(s.system.display().current(), "");
    std::fs::remove_dir_all(&s.dir).unwrap();
}

/// Injected input (`vm key|type|pointer`) needs root, whatever the VM's state; root is
/// refused by name for a VM that is not running or has no display, and for a key that does
/// not exist. (What reaches a running VMM is `rayosd::vm::tests`, against a fake VMM.)
#[tokio::test(flavor = "current_thread")]
async fn injected_input_needs_root_and_a_running_vm_with_a_display() {
    require_root();
    let s = serve("inject", Access::root_only(), true).await;
    let kernel = s.dir.join("bzImage");
    std::fs::write(&kernel, b"k").unwrap();
    let k = kernel.to_str().unwrap();
    for args in [&["vm", "create", "headless", "--kernel", k][..], &["vm", "create", "desk", "--kernel", k, "--display", "1280x800"]] {
        let (code, _, err) = rayosctl(&s.sock, args, None).await;
        assert_eq!(code, Some(0), "{err}");
    }
    let calls: [(&[&str], &str); 3] = [
        (&["vm", "key", "desk", "ctrl+l"], "KeyInput"),
        (&["vm", "type", "desk", "root", "--enter"], "TypeText"),
        (&["vm", "pointer", "desk", "10", "10", "--click", "left"], "Pointer"),
    ];
    for (args, method) in calls {
        let (code, out, err) = rayosctl(&s.sock, args, Some(NOBODY)).await;
        assert_eq!(code, Some(4), "a non-root caller must not inject input: {out}{err}");
        assert!(err.contains(&format!("access denied: {method} needs root; caller uid is 65534")), "{err}");
        // Root gets past the check, to the VM's state: it is stopped.
        let (code, _, err) = rayosctl(&s.sock, args, None).await;
        assert_eq!(code, Some(8), "{err}");
        assert!(err.contains("VM desk: ") && err.contains("needs a running VM; it is stopped"), "{err}");
    }
    let (code, _, err) = rayosctl(&s.sock, &["vm", "key", "headless", "ret"], None).await;
    assert_eq!(code, Some(8), "{err}");
    assert!(err.contains("VM headless: key input needs a display with input devices"), "{err}");
    // A bad name in any combo presses none of them.
    let (code, _, err) = rayosctl(&s.sock, &["vm", "key", "desk", "ctrl+l", "ctrl+hyper"], None).await;
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("unknown key \"hyper\""), "{err}");
    assert_eq!(s.system.vms().unwrap().get("desk").unwrap().state, "stopped", "refused calls start nothing");
    std::fs::remove_dir_all(&s.dir).unwrap();
}

/// The compositor's report of the monitor (`Display1.ReportPrimaryMode`) reaches the VM
/// supervisor: `vm show` of a VM created with `--display monitor` says the reported mode; a
/// mode that is none is refused by name and changes nothing.
#[tokio::test(flavor = "current_thread")]
async fn a_reported_monitor_mode_is_what_a_follow_monitor_vm_shows() {
    let s = serve("monitor", Access::root_only(), true).await;
    let kernel = s.dir.join("bzImage");
    std::fs::write(&kernel, b"k").unwrap();
    let k = kernel.to_str().unwrap();
    for args in [&["vm", "create", "desk", "--kernel", k, "--display", "monitor"][..], &["vm", "create", "fixed", "--kernel", k, "--display", "1024x768"]] {
        let (code, _, err) = rayosctl(&s.sock, args, None).await;
        assert_eq!(code, Some(0), "{err}");
    }
    let show = |vm: &'static str| {
        let sock = s.sock.clone();
        async move {
            let (code, out, err) = rayosctl(&sock, &["vm", "show", vm], None).await;
            assert_eq!(code, Some(0), "{err}");
            out.lines().find(|l| l.starts_with("display: ")).unwrap_or_default().to_string()
        }
    };
    assert_eq!(show("desk").await, "display: follows the monitor (now 1280x800)");

    let conn = rayosd::client::connection(&s.sock).await.unwrap();
    let display = rayosd::client::Display1Proxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build().await.unwrap();
    display.report_primary_mode(2560, 1440).await.unwrap();
    assert_eq!(show("desk").await, "display: follows the monitor (now 2560x1440)");
    assert_eq!(show("fixed").await, "display: 1024x768");
    let e = display.report_primary_mode(0, 1440).await.unwrap_err().to_string();
    assert!(e.contains("InvalidArgument") && e.contains("0x1440 is not a monitor mode"), "{e}");
    // No monitor now: the last mode is kept.
    display.report_no_monitor().await.unwrap();
    assert_eq!(show("desk").await, "display: follows the monitor (now 2560x1440)");
    drop(conn);
    std::fs::remove_dir_all(&s.dir).unwrap();
}
