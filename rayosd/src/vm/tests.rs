//! The supervisor against a fake VMM: a small script that speaks rayos-vmm's command line,
//! spec file and supervisor connection (`--control-fd`: requests in, answers and events out),
//! and "runs a guest" that writes heartbeats to the serial log while not paused and, with the
//! agent port, `ready` and heartbeats as agent lines. The real VMM cannot run guests on these
//! hosts' KVM; the QEMU tests (tests/tests/vm_*.rs) cover it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::manager::{CreateRequest, Paths, Settings, VmManager};
use super::registry::{DeviceConfig, DiskRecord, DisplayConfig, DisplaySize, Policy, RestartPolicy, VmKind};
use crate::reaper::Reaper;

/// Behaviour comes from words in the spec's cmdline: `crash-after-MS`, `ignore-acpi`,
/// `never-up` (no first event), `mute-agent` (the guest agent never answers), `no-init`
/// (the guest never reaches init: no boot-timer event), `agent-quiet-after-N` (the agent
/// stops after N heartbeats; the guest goes on), `vmm-no-progress-after-MS` (the VMM's own
/// no-progress check ends it: exit 11), `display-deaf` (it never reads its display channel).
const FAKE_VMM: &str = r#"#!/usr/bin/python3
import json, os, socket, struct, sys, threading, time
args = sys.argv[1:]
# --restore DIR: the "guest" continues from the heartbeat count saved in DIR/state.json; a
# state.json with "reject" in it is refused the way rayos-vmm refuses a bad state (exit 12).
restored = None
if "--restore" in args:
    restored = json.load(open(os.path.join(args[args.index("--restore") + 1], "state.json")))
    spec = restored["spec"]
else:
    spec = json.load(open(args[args.index("--spec") + 1]))
conn = socket.socket(fileno=int(args[args.index("--control-fd") + 1]))
words = spec["cmdline"].split()
agent = bool(spec.get("console"))
quiet_after = None
t0 = time.time()
log = open(spec["serial_log"], "a", buffering=1)
paused = threading.Event()
presses = [0]
wlock = threading.Lock()
def send(msg):
    with wlock:
        conn.sendall((json.dumps(msg) + "\n").encode())
def event(ev):
    send({"type": "event", "event": ev})
def leave(code, reason):
    event({"kind": "exiting", "code": code, "reason": reason})
    os._exit(code)
if restored is not None and "reject" in restored:
    conn_early = socket.socket(fileno=int(args[args.index("--control-fd") + 1]))
    conn_early.sendall((json.dumps({"type": "event", "event": {"kind": "exiting", "code": 12, "reason": "state.json: field `vm`: checksum mismatch"}}) + "\n").encode())
    os._exit(12)
count = [restored["n"] if restored else 0]
for w in words:
    if w.startswith("crash-after-"):
        ms = int(w[len("crash-after-"):])
        threading.Timer(ms / 1000, lambda: os._exit(3)).start()
    if w.startswith("vmm-no-progress-after-"):
        ms = int(w[len("vmm-no-progress-after-"):])
        threading.Timer(ms / 1000, lambda: leave(11, "guest hung: no progress for 60 s before init")).start()
    if w.startswith("agent-quiet-after-"):
        quiet_after = int(w[len("agent-quiet-after-"):])
if "--display-fd" in args and "display-deaf" not in words:
    # The display channel: an input datagram (tag 1) is written to input.log beside the
    # serial log, one line per datagram ("kbd" or "tablet", then type:code:value records);
    # any other datagram comes back with "echo:" in front.
    disp = socket.socket(fileno=int(args[args.index("--display-fd") + 1]))
    inputs = open(os.path.join(os.path.dirname(spec["serial_log"]), "input.log"), "a", buffering=1)
    def echo():
        while True:
            d = disp.recv(65536)
            if not d:
                return
            if d[:4] == struct.pack("<I", 1):
                target = {0: "kbd", 1: "tablet"}[struct.unpack("<I", d[4:8])[0]]
                recs = ["%d:%d:%d" % struct.unpack("<HHI", d[i:i + 8]) for i in range(8, len(d), 8)]
                inputs.write(" ".join([target] + recs) + "\n")
            else:
                disp.send(b"echo:" + d)
    threading.Thread(target=echo, daemon=True).start()
if "never-up" in words:
    time.sleep(60)
event({"kind": "up", "name": spec["name"], "state": "running", "boot_ms": restored["boot_ms"] if restored else None})
def guest():
    if restored:
        log.write("guest: restored at heartbeat %d\n" % count[0])
    else:
        log.write("guest: init\n")
        # Cold boots counted where rayosd's emptying of a fresh boot's serial log cannot reach.
        with open(os.path.join(os.path.dirname(spec["serial_log"]), "boots.log"), "a") as b:
            b.write("init\n")
        time.sleep(0.05)
        if "no-init" not in words:
            event({"kind": "boot_timer", "ms": int((time.time() - t0) * 1000)})
        if agent:
            event({"kind": "agent_line", "line": "ready"})
    while True:
        if not paused.is_set():
            count[0] += 1
            n = count[0]
            log.write("heartbeat %d\n" % n)
            if agent and n % 5 == 0 and (quiet_after is None or n // 5 <= quiet_after):
                event({"kind": "agent_line", "line": "heartbeat %d" % (n // 5)})
        time.sleep(0.02)
threading.Thread(target=guest, daemon=True).start()
def screen(l):
    answer = {"tty": 1, "rows": 2, "cols": 20, "cursor": [12, 1], "text": "Debian GNU/Linux 12\nfake login:"}
    event({"kind": "agent_line", "line": "screen %s %s" % (l.split()[1], json.dumps(answer))})
for line in conn.makefile("r"):
    env = json.loads(line)
    req = env["request"]
    cmd = req["cmd"]
    ans = {"ok": True}
    if cmd == "pause":
        paused.set()
        ans["state"] = "paused"
        event({"kind": "state", "state": "paused"})
    elif cmd == "resume":
        paused.clear()
        ans["state"] = "running"
        event({"kind": "state", "state": "running"})
    elif cmd == "shutdown":
        presses[0] += 1
        if "miss-first-acpi" in words and presses[0] == 1:
            log.write("guest: power button missed (still booting)\n")
        elif "ignore-acpi" not in words:
            log.write("guest: power button, powering off\n")
            threading.Timer(0.05, lambda: leave(0, "the guest powered off")).start()
        ans["note"] = "ACPI power button pressed"
    elif cmd == "poweroff":
        threading.Timer(0.01, lambda: leave(0, "the guest powered off")).start()
    elif cmd == "agent_send":
        for l in req["data"].splitlines():
            if l.startswith("screen ") and "mute-agent" not in words:
                # Other lines first, an answer to someone else among them: ours is found by its id.
                event({"kind": "agent_line", "line": "heartbeat 999"})
                event({"kind": "agent_line", "line": 'screen 0-0 {"error": "an answer to another request"}'})
                threading.Timer(0.02, screen, args=(l,)).start()
    elif cmd == "snapshot":
        paused.set()
        event({"kind": "state", "state": "paused"})
        if "save-fails" in words:
            ans = {"ok": False, "error": "writing memory: No space left on device"}
        else:
            for w in (0, 32 << 20, 64 << 20):
                event({"kind": "save_progress", "written": w, "total": 64 << 20})
            os.mkdir(req["path"])
            json.dump({"spec": spec, "n": count[0], "generation": req.get("generation", 0), "boot_ms": 50}, open(os.path.join(req["path"], "state.json"), "w"))
            ans.update(state="paused", path=req["path"], memory_bytes=64 << 20, memory_written=3 << 20, state_bytes=100, ms=5)
    elif cmd == "screenshot":
        open(req["path"], "wb").write(b"P6\n2 1\n255\n" + bytes([255, 0, 0, 0, 0, 255]))
        ans.update(width=2, height=1)
    else:
        ans = {"ok": False, "error": "the fake VMM does not do %s" % cmd}
    send({"type": "answer", "id": env["id"], "answer": ans})
time.sleep(60)
"#;

struct Env {
    dir: PathBuf,
    mgr: Arc<VmManager>,
    _only_reaper: std::sync::MutexGuard<'static, ()>,
}

fn setup(tag: &str, tweak: impl FnOnce(&mut Settings)) -> Env {
    let dir = std::env::temp_dir().join(format!("rayos-vmsup-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let vmm = dir.join("fake-vmm");
    std::fs::write(&vmm, FAKE_VMM).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("bzImage"), b"kernel").unwrap();
    let mut s = Settings::new(vmm, Paths::under(&dir));
    s.stop_timeout = Duration::from_millis(500);
    s.restart.backoff_initial = Duration::from_millis(50);
    s.restart.backoff_max = Duration::from_millis(200);
    s.restart.crash_count = 3;
    s.restart.crash_window = Duration::from_secs(30);
    s.up_timeout = Duration::from_secs(3);
    tweak(&mut s);
    let only_reaper = crate::reaper::exclusive_for_test();
    let reaper = Arc::new(Reaper::new());
    let r2 = reaper.clone();
    tokio::spawn(async move { r2.run().await });
    let mgr = VmManager::open(reaper, s).unwrap();
    Env { dir, mgr, _only_reaper: only_reaper }
}

fn create(env: &Env, name: &str, cmdline: &str, autostart: bool) -> String {
    create_with(env, name, cmdline, autostart, false, RestartPolicy::OnFailure)
}

fn create_with(env: &Env, name: &str, cmdline: &str, autostart: bool, agent: bool, restart: RestartPolicy) -> String {
    create_full(env, name, cmdline, autostart, agent, restart, None)
}

fn create_full(
    env: &Env,
    name: &str,
    cmdline: &str,
    autostart: bool,
    agent: bool,
    restart: RestartPolicy,
    display: Option<DisplayConfig>,
) -> String {
    let disk = env.dir.join(format!("{name}.img"));
    std::fs::write(&disk, b"").unwrap();
    let req = CreateRequest {
        name: name.into(),
        kind: VmKind::Linux,
        disks: vec![DiskRecord { path: disk, read_only: false }],
        config: DeviceConfig {
            vcpus: 1,
            memory_mib: 64,
            kernel: env.dir.join("bzImage"),
            initramfs: None,
            cmdline: cmdline.into(),
            display,
            input: display.is_some(),
            net_taps: vec![],
            rng: false,
            agent,
        },
        policy: Policy { autostart_hidden: autostart, restart, on_shutdown: Default::default(), network: Default::default() },
    };
    env.mgr.create(req).unwrap().id
}

async fn wait_state(env: &Env, vm: &str, state: &str, timeout: Duration) -> super::manager::VmInfo {
    let t = Instant::now();
    loop {
        let i = env.mgr.get(vm).unwrap();
        if i.state == state {
            return i;
        }
        assert!(t.elapsed() < timeout, "{vm} did not become {state} within {timeout:?}; it is {} ({})", i.state, i.detail);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn heartbeats(serial: &Path) -> usize {
    std::fs::read_to_string(serial).unwrap_or_default().lines().filter(|l| l.starts_with("heartbeat")).count()
}

#[tokio::test(flavor = "current_thread")]
async fn start_pause_resume_stop_are_seen_by_the_guest() {
    let env = setup("cycle", |_| {});
    let id = create(&env, "deb", "console=ttyS0", false);
    let mut events = env.mgr.subscribe();
    env.mgr.start("deb", false).unwrap();
    let info = wait_state(&env, "deb", "running", Duration::from_secs(5)).await;
    assert!(info.pid > 0);
    assert!(env.mgr.start("deb", false).unwrap_err().to_string().contains("already running"));
    let serial = env.dir.join("vms").join(&id).join("serial.log");
    // Guest init seen through the VMM's status (boot timer).
    let t = Instant::now();
    while env.mgr.get("deb").unwrap().guest_init_ms == 0 {
        assert!(t.elapsed() < Duration::from_secs(3), "guest init never reported");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(heartbeats(&serial) > 0, "no heartbeats while running");

    env.mgr.pause("deb").unwrap();
    wait_state(&env, "deb", "paused", Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    let h1 = heartbeats(&serial);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(heartbeats(&serial), h1, "heartbeats went on while paused");

    env.mgr.resume("deb").unwrap();
    wait_state(&env, "deb", "running", Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(heartbeats(&serial) > h1, "heartbeats did not restart after resume");

    env.mgr.stop("deb", false).unwrap();
    let info = wait_state(&env, "deb", "stopped", Duration::from_secs(3)).await;
    assert_eq!(info.pid, 0);
    assert_eq!(info.detail, "the guest powered off");
    assert!(std::fs::read_to_string(&serial).unwrap().contains("power button"), "the guest saw no ACPI shutdown");
    assert!(env.mgr.logs("deb", 50).unwrap().contains("power button"));

    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(ev.state);
    }
    for s in ["starting", "running", "paused", "running", "stopping", "stopped"] {
        assert!(seen.iter().any(|x| x == s), "no {s} event in {seen:?}");
    }
    // last_booted_at was recorded in the registry.
    assert!(env.mgr.record("deb").unwrap().last_booted_at.is_some());

    // A fresh boot's log is its own from the start: the last run's lines are gone before the
    // new VMM writes any (this fake VMM appends, so only rayosd can have emptied it).
    std::fs::write(serial_tail_rotated(&serial), "older run\n").unwrap();
    env.mgr.start("deb", false).unwrap();
    wait_state(&env, "deb", "running", Duration::from_secs(5)).await;
    let logs = env.mgr.logs("deb", 1000).unwrap();
    assert!(!logs.contains("power button") && !logs.contains("older run"), "the last run's log is shown as this one's:\n{logs}");
    env.mgr.stop("deb", true).unwrap();
    wait_state(&env, "deb", "stopped", Duration::from_secs(3)).await;
}

fn serial_tail_rotated(serial: &std::path::Path) -> std::path::PathBuf {
    super::serial_tail::rotated(serial)
}

#[tokio::test(flavor = "current_thread")]
async fn a_guest_that_ignores_the_power_button_is_forced_off() {
    let env = setup("force", |_| {});
    create(&env, "stubborn", "ignore-acpi", false);
    env.mgr.start("stubborn", false).unwrap();
    wait_state(&env, "stubborn", "running", Duration::from_secs(5)).await;
    let t = Instant::now();
    env.mgr.stop("stubborn", false).unwrap();
    let i = wait_state(&env, "stubborn", "stopped", Duration::from_secs(5)).await;
    assert!(i.detail.starts_with("forced off"), "{}", i.detail);
    // stop_timeout is 500 ms: forced after it, not before.
    assert!(t.elapsed() >= Duration::from_millis(500), "forced too early: {:?}", t.elapsed());
}

#[tokio::test(flavor = "current_thread")]
async fn a_guest_that_misses_the_first_press_gets_another_and_is_not_forced() {
    let env = setup("repress", |_| {});
    create(&env, "sleepy", "miss-first-acpi", false);
    env.mgr.start("sleepy", false).unwrap();
    wait_state(&env, "sleepy", "running", Duration::from_secs(5)).await;
    env.mgr.stop("sleepy", false).unwrap();
    let i = wait_state(&env, "sleepy", "stopped", Duration::from_secs(5)).await;
    assert!(!i.detail.contains("forced"), "forced off although a second press would have done: {}", i.detail);
}

#[tokio::test(flavor = "current_thread")]
async fn a_killed_vmm_is_restarted_and_a_crash_loop_stops_restarts() {
    let env = setup("crash", |_| {});
    create(&env, "k9", "", false);
    env.mgr.start("k9", false).unwrap();
    let first = wait_state(&env, "k9", "running", Duration::from_secs(5)).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = Instant::now();
    loop {
        let i = env.mgr.get("k9").unwrap();
        if i.state == "running" && i.pid != first.pid {
            assert_eq!(i.restarts, 1);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "not restarted: {} {}", i.state, i.detail);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    env.mgr.stop("k9", true).unwrap();
    wait_state(&env, "k9", "stopped", Duration::from_secs(3)).await;

    create(&env, "loop", "crash-after-100", false);
    env.mgr.start("loop", false).unwrap();
    let info = wait_state(&env, "loop", "crash-loop", Duration::from_secs(10)).await;
    assert!(info.detail.contains("crashed 3 times") && info.detail.contains("exited with status 3"), "{}", info.detail);
    assert_eq!(info.restarts, 2);
    assert!(env.mgr.problems().iter().any(|p| p.contains("loop") && p.contains("crash loop")), "{:?}", env.mgr.problems());
    // It stays down.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(env.mgr.get("loop").unwrap().state, "crash-loop");
    // Starting it again answers the report.
    env.mgr.start("loop", false).unwrap();
    assert!(!env.mgr.problems().iter().any(|p| p.contains("crash loop")), "{:?}", env.mgr.problems());
    wait_state(&env, "loop", "crash-loop", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn autostart_marks_a_vm_with_a_missing_disk_broken_and_starts_the_others() {
    let env = setup("broken", |_| {});
    create(&env, "good", "", true);
    let gone = create(&env, "gone", "", true);
    create(&env, "manual", "", false);
    let disk = env.dir.join("gone.img");
    std::fs::remove_file(&disk).unwrap();
    assert_eq!(env.mgr.autostart(), 2);
    wait_state(&env, "good", "running", Duration::from_secs(5)).await;
    let b = wait_state(&env, &gone, "broken", Duration::from_secs(5)).await;
    assert!(b.detail.contains("disk image missing") && b.detail.contains("gone.img"), "{}", b.detail);
    assert_eq!(env.mgr.get("manual").unwrap().state, "stopped", "autostart started a VM not marked so");
    // Its policy's default: a shutdown saves it.
    env.mgr.shutdown_all(Duration::from_secs(2)).await;
    assert_eq!(env.mgr.get("good").unwrap().state, "saved");
}

#[tokio::test(flavor = "current_thread")]
async fn a_vmm_that_never_comes_up_is_killed_and_counted_as_failed() {
    let env = setup("nosock", |s| s.up_timeout = Duration::from_millis(300));
    create(&env, "mute", "never-up", false);
    env.mgr.start("mute", false).unwrap();
    let i = wait_state(&env, "mute", "failed", Duration::from_secs(5)).await;
    assert!(i.detail.contains("did not come up"), "{}", i.detail);
    env.mgr.stop("mute", false).unwrap();
    wait_state(&env, "mute", "stopped", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn delete_keeps_the_disk_unless_purged_and_the_registry_reopens_the_same() {
    let env = setup("delete", |_| {});
    let a = create(&env, "a", "", false);
    let b = create(&env, "b", "", false);
    let a_dir = env.dir.join("vms").join(&a);
    std::fs::write(a_dir.join("disk.img"), b"data").unwrap();
    env.mgr.delete("a", false).unwrap();
    assert!(a_dir.join("disk.img").exists(), "delete without purge removed the disk");
    assert!(env.mgr.get("a").is_err());
    env.mgr.delete("b", true).unwrap();
    assert!(!env.dir.join("vms").join(&b).exists(), "purge left the VM's folder");

    // A new supervisor on the same folder sees the same VM with the same UUID.
    let c = create(&env, "c", "", false);
    let again = VmManager::open(Arc::new(Reaper::new()), env.mgr.settings().clone()).unwrap();
    let list = again.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, c);
}

#[tokio::test(flavor = "current_thread")]
async fn the_guest_screen_comes_from_the_agent_and_the_screenshot_from_the_vmm() {
    let env = setup("screen", |_| {});
    let mk = |name: &str, cmdline: &str, agent: bool, display: Option<DisplayConfig>| {
        let disk = env.dir.join(format!("{name}.img"));
        std::fs::write(&disk, b"").unwrap();
        let config = DeviceConfig {
            vcpus: 1,
            memory_mib: 64,
            kernel: env.dir.join("bzImage"),
            initramfs: None,
            cmdline: cmdline.into(),
            display,
            input: false,
            net_taps: vec![],
            rng: false,
            agent,
        };
        let req = CreateRequest { name: name.into(), kind: VmKind::Linux, disks: vec![DiskRecord { path: disk, read_only: false }], config, policy: Policy::default() };
        env.mgr.create(req).unwrap();
    };
    mk("shown", "", true, Some(DisplayConfig::Fixed(DisplaySize::new(1024, 768))));
    mk("mute", "mute-agent", true, None);
    mk("bare", "", false, None);

    // A stopped VM has no screen to read.
    let e = env.mgr.guest_screen("shown", Duration::from_secs(2)).await.unwrap_err();
    assert!(matches!(e, super::manager::VmError::Refused { .. }) && e.to_string().contains("it is stopped"), "{e}");
    let e = env.mgr.screenshot("shown").await.unwrap_err();
    assert!(matches!(e, super::manager::VmError::Refused { .. }), "{e}");

    for vm in ["shown", "mute", "bare"] {
        env.mgr.start(vm, false).unwrap();
        wait_state(&env, vm, "running", Duration::from_secs(5)).await;
    }
    // Readiness and heartbeats arrive as agent lines on the VMM's connection.
    let t = Instant::now();
    loop {
        let i = env.mgr.get("shown").unwrap();
        if i.agent_ready && i.agent_heartbeat >= 2 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "agent not ready with heartbeats: {i:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!env.mgr.get("bare").unwrap().agent_ready, "a VM without the agent port reported an agent");
    let s = env.mgr.guest_screen("shown", Duration::from_secs(2)).await.unwrap();
    assert_eq!((s.tty, s.rows, s.cols, s.cursor_x, s.cursor_y), (1, 2, 20, 12, 1));
    assert_eq!(s.text, "Debian GNU/Linux 12\nfake login:");
    // Each request gets its own answer, not the one before it.
    assert_eq!(env.mgr.guest_screen("shown", Duration::from_secs(2)).await.unwrap(), s);

    let ppm = env.mgr.screenshot("shown").await.unwrap();
    assert_eq!(ppm, b"P6\n2 1\n255\n\xff\x00\x00\x00\x00\xff");
    assert_eq!(super::cli::ppm_size(&ppm), Some((2, 1)));
    let run = env.dir.join("run");
    let left: Vec<_> = std::fs::read_dir(&run).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains("screenshot")).collect();
    assert!(left.is_empty(), "the screenshot file was left in {}: {left:?}", run.display());

    let t = Instant::now();
    let e = env.mgr.guest_screen("mute", Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(e, super::manager::VmError::Failed { .. }) && e.to_string().contains("did not answer"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "the timeout was not kept: {:?}", t.elapsed());
    let e = env.mgr.guest_screen("bare", Duration::from_secs(1)).await.unwrap_err();
    assert!(e.to_string().contains("config.agent"), "{e}");
    let e = env.mgr.screenshot("bare").await.unwrap_err();
    assert!(e.to_string().contains("config.display"), "{e}");
    env.mgr.shutdown_all(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_windows_record_is_broken_not_booted_as_linux() {
    let env = setup("windows", |_| {});
    let disk = env.dir.join("win.img");
    std::fs::write(&disk, b"").unwrap();
    let config = DeviceConfig {
        vcpus: 1,
        memory_mib: 64,
        kernel: env.dir.join("bzImage"),
        initramfs: None,
        cmdline: String::new(),
        display: None,
        input: false,
        net_taps: vec![],
        rng: false,
        agent: false,
    };
    let req = CreateRequest { name: "win".into(), kind: VmKind::Windows, disks: vec![DiskRecord { path: disk, read_only: false }], config, policy: Policy::default() };
    env.mgr.create(req).unwrap();
    env.mgr.start("win", false).unwrap();
    let i = wait_state(&env, "win", "broken", Duration::from_secs(5)).await;
    assert_eq!(i.detail, "Windows VMs are not supported yet");
    assert_eq!(i.pid, 0, "no VMM was started");
}

#[tokio::test(flavor = "current_thread")]
async fn a_vm_that_runs_healthy_between_crashes_is_never_a_crash_loop() {
    // 3 crashes within 30 s would be a loop; each run lasts longer than a healthy one.
    let env = setup("healthy", |s| s.restart.stable_after = Duration::from_millis(300));
    create(&env, "flaky", "crash-after-500", false);
    let mut events = env.mgr.subscribe();
    env.mgr.start("flaky", false).unwrap();
    let t = Instant::now();
    loop {
        let i = env.mgr.get("flaky").unwrap();
        assert_ne!(i.state, "crash-loop", "healthy runs counted towards a crash loop: {}", i.detail);
        if i.restarts >= 4 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "not restarted enough: {i:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The backoff started over after each healthy run: always the initial 50 ms.
    let mut waits = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let Some(w) = ev.detail.split("restarting in ").nth(1) {
            waits.push(w.to_string());
        }
    }
    assert!(waits.len() >= 3 && waits.iter().all(|w| w == "50 ms"), "{waits:?}");
    env.mgr.stop("flaky", true).unwrap();
    wait_state(&env, "flaky", "stopped", Duration::from_secs(3)).await;
}

/// The hung rules, fast: a guest must reach init within 600 ms, a ready agent may be silent
/// for 500 ms. (The real bounds are minutes; see `hang::HangLimits`.)
fn fast_hang(s: &mut Settings) {
    s.hang.init_floor = Duration::from_millis(600);
    s.hang.heartbeat_timeout = Duration::from_millis(500);
}

#[tokio::test(flavor = "current_thread")]
async fn a_guest_that_never_reaches_init_is_hung_within_the_bound_and_restarted_by_policy() {
    let env = setup("hung-init", |s| {
        fast_hang(s);
        // Each hung run lasts longer than a healthy one would need to: still no healthy run.
        s.restart.stable_after = Duration::from_millis(300);
    });
    create(&env, "stuck", "no-init", false);
    let mut events = env.mgr.subscribe();
    let t = Instant::now();
    env.mgr.start("stuck", false).unwrap();
    let first = wait_state(&env, "stuck", "running", Duration::from_secs(5)).await;
    let hung = wait_state(&env, "stuck", "hung", Duration::from_secs(5)).await;
    let after = t.elapsed();
    assert!(after >= Duration::from_millis(600), "hung before its bound: {after:?}");
    assert!(after < Duration::from_millis(600 + 1500), "not noticed within its bound: {after:?}");
    assert!(
        hung.detail.contains("hung: the guest did not reach init within 0 s") && hung.detail.contains("restarting in"),
        "{}",
        hung.detail
    );
    assert_eq!(hung.pid, 0, "its VMM ended");
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.pid as i32), None).is_err(), "the hung VMM still runs");
    // The restart policy: started again, and after 3 hangs within the window a crash loop.
    let again = wait_state(&env, "stuck", "running", Duration::from_secs(5)).await;
    assert!(again.restarts >= 1 && again.pid != first.pid, "not restarted: {again:?}");
    let looped = wait_state(&env, "stuck", "crash-loop", Duration::from_secs(10)).await;
    assert!(looped.detail.starts_with("hung: ") && looped.detail.contains("crashed or hung 3 times"), "{}", looped.detail);
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(format!("{} {}", ev.state, ev.detail));
    }
    assert!(seen.iter().any(|e| e.starts_with("starting restarting after a hang")), "{seen:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_paused_vm_is_never_hung_and_its_paused_time_does_not_count() {
    let env = setup("hung-pause", fast_hang);
    create(&env, "napping", "no-init", false);
    let t = Instant::now();
    env.mgr.start("napping", false).unwrap();
    wait_state(&env, "napping", "running", Duration::from_secs(5)).await;
    env.mgr.pause("napping").unwrap();
    wait_state(&env, "napping", "paused", Duration::from_secs(2)).await;
    let ran = t.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(env.mgr.get("napping").unwrap().state, "paused", "a paused VM was judged hung");
    env.mgr.resume("napping").unwrap();
    let resumed = Instant::now();
    wait_state(&env, "napping", "running", Duration::from_secs(2)).await;
    let i = wait_state(&env, "napping", "hung", Duration::from_secs(5)).await;
    // What was left of the 600 ms when it was paused, not a fresh bound nor none.
    let left = Duration::from_millis(600).saturating_sub(ran);
    assert!(resumed.elapsed() >= left, "hung {:?} after the resume, {left:?} were left", resumed.elapsed());
    assert!(resumed.elapsed() < left + Duration::from_millis(1000), "hung {:?} after the resume", resumed.elapsed());
    assert!(i.detail.contains("did not reach init"), "{}", i.detail);
}

#[tokio::test(flavor = "current_thread")]
async fn a_silent_agent_makes_the_vm_hung_and_a_no_restart_policy_leaves_it_so() {
    let env = setup("hung-agent", fast_hang);
    // The agent says ready and 3 heartbeats (100 ms each), then nothing; init was reached.
    create_with(&env, "mute", "agent-quiet-after-3", false, true, RestartPolicy::Never);
    // A healthy agent VM beside it is left alone.
    create_with(&env, "chatty", "", false, true, RestartPolicy::Never);
    env.mgr.start("mute", false).unwrap();
    env.mgr.start("chatty", false).unwrap();
    let t = Instant::now();
    wait_state(&env, "mute", "running", Duration::from_secs(5)).await;
    let i = wait_state(&env, "mute", "hung", Duration::from_secs(5)).await;
    assert!(t.elapsed() >= Duration::from_millis(500), "hung too early: {:?}", t.elapsed());
    assert!(i.agent_ready && i.agent_heartbeat == 3 && i.guest_init_ms > 0, "{i:?}");
    assert_eq!(i.detail, "hung: the guest agent was ready but has sent nothing for 0 s (no heartbeat); policy: no restart");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.mgr.get("mute").unwrap().state, "hung", "restarted against its policy");
    let c = env.mgr.get("chatty").unwrap();
    assert_eq!(c.state, "running", "{}", c.detail);
    assert!(c.agent_heartbeat > 3);
    // A hung VM can be started again.
    env.mgr.start("mute", false).unwrap();
    wait_state(&env, "mute", "running", Duration::from_secs(5)).await;
    env.mgr.stop("mute", true).unwrap();
    env.mgr.stop("chatty", true).unwrap();
    wait_state(&env, "chatty", "stopped", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_vmms_own_no_progress_exit_is_a_hang() {
    let env = setup("hung-vmm", |_| {});
    create_with(&env, "frozen", "no-init vmm-no-progress-after-200", false, false, RestartPolicy::Never);
    env.mgr.start("frozen", false).unwrap();
    let i = wait_state(&env, "frozen", "hung", Duration::from_secs(5)).await;
    assert_eq!(i.detail, "hung: the VMM saw no progress: guest hung: no progress for 60 s before init; policy: no restart");
}

/// The compositor's display channel is the other end of the socketpair the running VMM got
/// as `--display-fd`: a datagram sent on it reaches that VMM whole. A VM without a display,
/// or without a running VMM, is refused by name; a restarted VM gets a new channel.
#[tokio::test(flavor = "current_thread")]
async fn the_display_channel_reaches_the_running_vmm_and_only_it() {
    use std::os::unix::net::UnixDatagram;
    let env = setup("display", |_| {});
    create_full(&env, "shown", "", false, false, RestartPolicy::OnFailure, Some(DisplayConfig::Fixed(DisplaySize::new(1024, 768))));
    create(&env, "headless", "", false);

    let e = env.mgr.display_channel("shown").unwrap_err().to_string();
    assert!(e.contains("shown") && e.contains("not running"), "{e}");
    let e = env.mgr.display_channel("headless").unwrap_err().to_string();
    assert!(e.contains("headless") && e.contains("no display"), "{e}");
    assert!(env.mgr.display_channel("nosuch").is_err());
    assert!(env.mgr.get("shown").unwrap().has_display && !env.mgr.get("headless").unwrap().has_display);

    let ask = |fd: std::os::fd::OwnedFd, what: &[u8]| {
        // SEQPACKET reads like a datagram socket: one message per recv.
        let sock = UnixDatagram::from(fd);
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send(what).unwrap();
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        buf[..n].to_vec()
    };
    env.mgr.start("shown", false).unwrap();
    wait_state(&env, "shown", "running", Duration::from_secs(10)).await;
    let first_pid = env.mgr.get("shown").unwrap().pid;
    let fd = env.mgr.display_channel("shown").unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || ask(fd, b"hello")).await.unwrap(), b"echo:hello");

    env.mgr.stop("shown", true).unwrap();
    wait_state(&env, "shown", "stopped", Duration::from_secs(10)).await;
    assert!(env.mgr.display_channel("shown").is_err());
    env.mgr.start("shown", false).unwrap();
    wait_state(&env, "shown", "running", Duration::from_secs(10)).await;
    assert_ne!(env.mgr.get("shown").unwrap().pid, first_pid);
    let fd = env.mgr.display_channel("shown").unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || ask(fd, b"again")).await.unwrap(), b"echo:again");
    env.mgr.stop("shown", true).unwrap();
    wait_state(&env, "shown", "stopped", Duration::from_secs(10)).await;
}

/// A VM whose display follows the monitor: a cold start waits (bounded) for the compositor's
/// first report and gets that mode; a mode reported later is for the next cold start; a
/// resume keeps the size it was saved with; a mode the display cannot announce is shrunk.
#[tokio::test(flavor = "current_thread")]
async fn a_display_that_follows_the_monitor_is_sized_at_each_cold_start_and_kept_by_a_resume() {
    let env = setup("monitor", |s| s.monitor_wait = Duration::from_secs(5));
    let id = create_full(&env, "desk", "", false, false, RestartPolicy::OnFailure, Some(DisplayConfig::FollowMonitor));
    let spec_file = env.dir.join("run").join(format!("{id}.json"));
    let spec_size = || {
        let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&spec_file).unwrap()).unwrap();
        (spec["display"]["width"].as_u64().unwrap(), spec["display"]["height"].as_u64().unwrap())
    };
    let shown = |env: &Env| {
        let i = env.mgr.get("desk").unwrap();
        assert!(i.has_display && i.display_follows_monitor, "{i:?}");
        (i.display_width, i.display_height)
    };
    assert_eq!(shown(&env), (1280, 800), "before any report, a start would get 1280x800");

    // The start waits for the compositor's first report (PID 1 starts it after autostart).
    env.mgr.start("desk", false).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.mgr.get("desk").unwrap().state, "starting");
    assert!(!spec_file.exists(), "the VMM was started before the monitor was known");
    assert!(env.mgr.monitor().set_mode(DisplaySize::new(1920, 1080)));
    wait_state(&env, "desk", "running", Duration::from_secs(5)).await;
    assert_eq!(spec_size(), (1920, 1080));
    assert_eq!(shown(&env), (1920, 1080));
    // Pointer positions are on the size the VMM was given.
    env.mgr.pointer("desk", 1919, 1079, &[]).await.unwrap();
    let e = env.mgr.pointer("desk", 1920, 0, &[]).await.unwrap_err().to_string();
    assert!(e.contains("1920x1080"), "{e}");

    // A new monitor while it runs changes nothing for the running VMM.
    env.mgr.monitor().set_mode(DisplaySize::new(3840, 2160));
    assert_eq!(shown(&env), (1920, 1080));
    env.mgr.save("desk").await.unwrap();
    wait_state(&env, "desk", "saved", Duration::from_secs(3)).await;
    assert_eq!(env.mgr.record("desk").unwrap().saved.unwrap().display, Some(DisplaySize::new(1920, 1080)));
    assert_eq!(shown(&env), (1920, 1080), "a saved VM resumes at its saved size");
    std::fs::remove_file(&spec_file).unwrap();
    env.mgr.start("desk", false).unwrap();
    wait_state(&env, "desk", "running", Duration::from_secs(5)).await;
    assert!(env.mgr.record("desk").unwrap().saved.is_none(), "it was resumed");
    assert_eq!(spec_size(), (1920, 1080), "the spec of a resume says the size of its state");
    assert_eq!(shown(&env), (1920, 1080));

    // The next cold start follows the monitor; one it cannot announce is shrunk to fit.
    env.mgr.stop("desk", true).unwrap();
    wait_state(&env, "desk", "stopped", Duration::from_secs(3)).await;
    assert_eq!(shown(&env), (3840, 2160));
    env.mgr.start("desk", false).unwrap();
    wait_state(&env, "desk", "running", Duration::from_secs(5)).await;
    assert_eq!(spec_size(), (3840, 2160));
    env.mgr.stop("desk", true).unwrap();
    wait_state(&env, "desk", "stopped", Duration::from_secs(3)).await;
    env.mgr.monitor().set_mode(DisplaySize::new(5120, 1440));
    env.mgr.start("desk", false).unwrap();
    wait_state(&env, "desk", "running", Duration::from_secs(5)).await;
    assert_eq!(spec_size(), (4095, 1151));
    env.mgr.stop("desk", true).unwrap();
    wait_state(&env, "desk", "stopped", Duration::from_secs(3)).await;
    std::fs::remove_dir_all(&env.dir).unwrap();
}

/// The lines of the fake VMM's input.log once it has at least `n` (one per input datagram).
async fn input_log(env: &Env, id: &str, n: usize) -> Vec<String> {
    let path = env.dir.join("vms").join(id).join("input.log");
    let t = Instant::now();
    loop {
        let lines: Vec<String> = std::fs::read_to_string(&path).unwrap_or_default().lines().map(String::from).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the VMM got {} input datagrams, not {n}: {lines:?}", lines.len());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `vm key`, `vm type` and `vm pointer` as the VMM receives them on its display channel: one
/// datagram per report, each ending in SYN_REPORT, in order; and who is refused.
#[tokio::test(flavor = "current_thread")]
async fn injected_keys_text_and_clicks_reach_the_vmm_as_reports_in_order() {
    use super::manager::VmError;
    let env = setup("inject", |_| {});
    let id = create_full(&env, "desk", "", false, false, RestartPolicy::OnFailure, Some(DisplayConfig::Fixed(DisplaySize::new(1024, 768))));
    create(&env, "headless", "", false);

    let e = env.mgr.key_input("desk", "ctrl+l").await.unwrap_err();
    assert!(matches!(e, VmError::Refused { .. }) && e.to_string().contains("desk") && e.to_string().contains("it is stopped"), "{e}");
    env.mgr.start("headless", false).unwrap();
    env.mgr.start("desk", false).unwrap();
    wait_state(&env, "headless", "running", Duration::from_secs(10)).await;
    wait_state(&env, "desk", "running", Duration::from_secs(10)).await;
    let e = env.mgr.type_text("headless", "hi").await.unwrap_err();
    assert!(matches!(e, VmError::Refused { .. }) && e.to_string().contains("VM headless: typing text needs a display with input devices"), "{e}");
    // A display without the virtio keyboard and tablet has nothing to type into.
    let disk = env.dir.join("screen-only.img");
    std::fs::write(&disk, b"").unwrap();
    let config = DeviceConfig {
        vcpus: 1,
        memory_mib: 64,
        kernel: env.dir.join("bzImage"),
        initramfs: None,
        cmdline: String::new(),
        display: Some(DisplayConfig::Fixed(DisplaySize::new(640, 480))),
        input: false,
        net_taps: vec![],
        rng: false,
        agent: false,
    };
    let req = CreateRequest { name: "screen-only".into(), kind: VmKind::Linux, disks: vec![DiskRecord { path: disk, read_only: false }], config, policy: Policy::default() };
    env.mgr.create(req).unwrap();
    let e = env.mgr.pointer("screen-only", 1, 1, &[]).await.unwrap_err();
    assert!(e.to_string().contains("VM screen-only: pointer input needs a display with input devices"), "{e}");
    let e = env.mgr.key_input("desk", "ctrl+hyper").await.unwrap_err();
    assert!(matches!(e, VmError::Invalid(_)) && e.to_string().contains("unknown key \"hyper\""), "{e}");
    let e = env.mgr.type_text("desk", "naïve").await.unwrap_err();
    assert!(matches!(e, VmError::Invalid(_)) && e.to_string().contains("'ï'"), "{e}");
    let e = env.mgr.pointer("desk", 1024, 0, &[]).await.unwrap_err();
    assert!(matches!(e, VmError::Invalid(_)) && e.to_string().contains("1024x768"), "{e}");
    let e = env.mgr.pointer("desk", 0, 0, &["back".into()]).await.unwrap_err();
    assert!(matches!(e, VmError::Invalid(_)) && e.to_string().contains("\"back\""), "{e}");

    assert_eq!(env.mgr.key_input("desk", "ctrl+l").await.unwrap(), 4);
    let ctrl_l = ["kbd 1:29:1 0:0:0", "kbd 1:38:1 0:0:0", "kbd 1:38:0 0:0:0", "kbd 1:29:0 0:0:0"];
    assert_eq!(input_log(&env, &id, 4).await, ctrl_l, "ctrl down, l down, l up, ctrl up, each one report");

    assert_eq!(env.mgr.type_text("desk", "A1\n").await.unwrap(), 3);
    env.mgr.pointer("desk", 512, 384, &["left".into()]).await.unwrap();
    let log = input_log(&env, &id, 4 + 8 + 3).await;
    assert_eq!(
        log[4..],
        [
            "kbd 1:42:1 0:0:0", "kbd 1:30:1 0:0:0", "kbd 1:30:0 0:0:0", "kbd 1:42:0 0:0:0",
            "kbd 1:2:1 0:0:0", "kbd 1:2:0 0:0:0",
            "kbd 1:28:1 0:0:0", "kbd 1:28:0 0:0:0",
            "tablet 3:0:16400 3:1:16405 0:0:0", "tablet 1:272:1 0:0:0", "tablet 1:272:0 0:0:0",
        ]
    );

    // A paused guest reads no input: refused, nothing sent.
    env.mgr.pause("desk").unwrap();
    wait_state(&env, "desk", "paused", Duration::from_secs(2)).await;
    let e = env.mgr.key_input("desk", "ret").await.unwrap_err();
    assert!(e.to_string().contains("it is paused"), "{e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(input_log(&env, &id, 0).await.len(), 15, "a refused call sent input");
    env.mgr.shutdown_all(Duration::from_secs(2)).await;
}

/// Text is typed in the system keymap read from its kbd file: each character's key inside the
/// modifiers the file says (AltGr is KEY_RIGHTALT), and keys by name do not depend on it.
#[tokio::test(flavor = "current_thread")]
async fn text_is_typed_in_the_system_keymap_from_its_file() {
    use super::keymap::{Keymap, Mods, Stroke, SystemKeymap};
    let keymap = Keymap::load("de-latin1", Path::new("/usr/share/keymaps")).expect("console-data's de-latin1 (a build host package)");
    let env = setup("keymap", |s| s.keymap = SystemKeymap::Loaded(Arc::new(keymap.clone())));
    let id = create_full(&env, "desk", "", false, false, RestartPolicy::OnFailure, Some(DisplayConfig::Fixed(DisplaySize::new(800, 600))));
    env.mgr.start("desk", false).unwrap();
    wait_state(&env, "desk", "running", Duration::from_secs(10)).await;
    assert_eq!(env.mgr.type_text("desk", "zy@Ä").await.unwrap(), 4);
    // What the parser says, as the VMM got it: z on KEY_Y, y on KEY_Z, @ AltGr+Q, Ä Shift+'.
    let mut want = Vec::new();
    for ch in "zy@Ä".chars() {
        let Stroke { code, mods } = keymap.stroke(ch).unwrap();
        let held: &[u16] = match mods {
            Mods::None => &[],
            Mods::Shift => &[42],
            Mods::AltGr => &[100],
            Mods::ShiftAltGr => &[42, 100],
        };
        let keys: Vec<u16> = held.iter().copied().chain([code]).collect();
        want.extend(keys.iter().map(|k| format!("kbd 1:{k}:1 0:0:0")));
        want.extend(keys.iter().rev().map(|k| format!("kbd 1:{k}:0 0:0:0")));
    }
    #[rustfmt::skip]
    let expect = [
        "kbd 1:21:1 0:0:0", "kbd 1:21:0 0:0:0",
        "kbd 1:44:1 0:0:0", "kbd 1:44:0 0:0:0",
        "kbd 1:100:1 0:0:0", "kbd 1:16:1 0:0:0", "kbd 1:16:0 0:0:0", "kbd 1:100:0 0:0:0",
        "kbd 1:42:1 0:0:0", "kbd 1:40:1 0:0:0", "kbd 1:40:0 0:0:0", "kbd 1:42:0 0:0:0",
    ];
    assert_eq!(want, expect);
    assert_eq!(input_log(&env, &id, 12).await, expect);

    // A character the layout cannot type is refused naming it and the layout; nothing is sent.
    let e = env.mgr.type_text("desk", "a€").await.unwrap_err();
    assert!(matches!(e, super::manager::VmError::Invalid(_)), "{e}");
    assert!(e.to_string().contains("'€' at 1") && e.to_string().contains("\"de-latin1\" keymap"), "{e}");
    // Keys by name do not depend on the layout.
    env.mgr.key_input("desk", "y").await.unwrap();
    assert_eq!(input_log(&env, &id, 14).await[12..], ["kbd 1:21:1 0:0:0", "kbd 1:21:0 0:0:0"]);
    env.mgr.shutdown_all(Duration::from_secs(2)).await;
}

/// A system keymap whose file could not be used refuses text with the reason, naming the file.
#[tokio::test(flavor = "current_thread")]
async fn text_in_an_unusable_system_keymap_is_refused_with_why() {
    let env = setup("badkeymap", |_| {});
    let dir = env.dir.join("keymaps");
    std::fs::create_dir_all(dir.join("i386/qwertz")).unwrap();
    std::fs::write(dir.join("i386/qwertz/xx.kmap"), "keymaps 0-1\nkeycode 16 = q nosuchsym\n").unwrap();
    let keymap = super::keymap::SystemKeymap::load("xx", &dir);
    let mut settings = Settings::new(env.dir.join("fake-vmm"), Paths::under(&env.dir.join("other")));
    settings.keymap = keymap;
    let mgr = VmManager::open(Arc::new(Reaper::new()), settings).unwrap();
    let e = mgr.type_text("desk", "q").await.unwrap_err();
    assert!(matches!(e, super::manager::VmError::NotSupported(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("\"xx\"") && msg.contains("i386/qwertz/xx.kmap:2: unknown keysym \"nosuchsym\""), "{msg}");
}

/// A VMM that never reads its display channel makes the call fail, saying so, once the
/// channel has stayed full for the stall limit; the VM itself carries on.
///
/// Two worker threads and the call in its own task: a send that blocked would hold its thread,
/// and the test's timeout must still run on the other to say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_reads_no_input_fails_the_call_instead_of_hanging_it() {
    let env = setup("deaf", |_| {});
    create_full(&env, "deaf", "display-deaf", false, false, RestartPolicy::OnFailure, Some(DisplayConfig::Fixed(DisplaySize::new(800, 600))));
    env.mgr.start("deaf", false).unwrap();
    wait_state(&env, "deaf", "running", Duration::from_secs(10)).await;
    let t = Instant::now();
    let (mgr, text) = (env.mgr.clone(), "x".repeat(super::keys::MAX_TEXT));
    let call = tokio::spawn(async move { mgr.type_text("deaf", &text).await });
    let Ok(answer) = tokio::time::timeout(Duration::from_secs(10), call).await else {
        // A blocked send returns only once its peer is gone: end the VMM so the test can end.
        env.mgr.stop("deaf", true).unwrap();
        panic!("the call hung on the full display channel");
    };
    let e = answer.unwrap().unwrap_err();
    assert!(matches!(e, super::manager::VmError::Failed { .. }), "{e}");
    assert!(e.to_string().contains("display channel stayed full") && e.to_string().contains(" of 1024 input reports sent"), "{e}");
    assert!(t.elapsed() >= super::input::STALL_LIMIT, "gave up after {:?}", t.elapsed());
    assert_eq!(env.mgr.get("deaf").unwrap().state, "running");
    env.mgr.stop("deaf", false).unwrap();
    wait_state(&env, "deaf", "stopped", Duration::from_secs(5)).await;
}

/// The heartbeat numbers in a serial log, in order.
fn heartbeat_numbers(serial: &Path) -> Vec<u64> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("heartbeat ").and_then(|n| n.trim().parse().ok()))
        .collect()
}

async fn wait_heartbeats_past(serial: &Path, n: u64) {
    let t = Instant::now();
    while heartbeat_numbers(serial).last().copied().unwrap_or(0) <= n {
        assert!(t.elapsed() < Duration::from_secs(5), "no heartbeat past {n}: {:?}", heartbeat_numbers(serial).last());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the guest has booted from scratch `n` times in all (the fake writes a line to
/// `boots.log`, beside the serial log, only at a cold boot, just after its VMM is up).
async fn wait_inits(serial: &Path, n: usize) {
    let t = Instant::now();
    let boots = serial.with_file_name("boots.log");
    loop {
        let log = std::fs::read_to_string(&boots).unwrap_or_default();
        let seen = log.lines().count();
        assert!(seen <= n, "{seen} cold boots where {n} were due:\n{log}");
        if seen == n {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{seen} cold boots, not {n}:\n{log}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Save and resume: a saved VM resumes where it was, exactly once; a state whose disk
/// changed, or that its VMM refuses, is kept aside and the VM boots from its disks; a fresh
/// start discards the state.
#[tokio::test(flavor = "current_thread")]
async fn a_saved_vm_resumes_once_and_never_over_a_changed_disk() {
    let env = setup("save", |_| {});
    let id = create_with(&env, "deb", "console=ttyS0", false, true, RestartPolicy::OnFailure);
    let vm_dir = env.dir.join("vms").join(&id);
    let serial = vm_dir.join("serial.log");
    env.mgr.start("deb", false).unwrap();
    wait_state(&env, "deb", "running", Duration::from_secs(5)).await;
    wait_heartbeats_past(&serial, 10).await;

    // Save: the VMM ends, the registry vouches for generation 1.
    let said = env.mgr.save("deb").await.unwrap();
    assert!(said.contains("generation 1"), "{said}");
    let info = wait_state(&env, "deb", "saved", Duration::from_secs(3)).await;
    assert_eq!((info.pid, info.saved_generation, info.saved_bytes), (0, 1, 3 << 20), "{info:?}");
    let rec = env.mgr.record("deb").unwrap();
    let saved = rec.saved.clone().expect("the registry records the save");
    assert_eq!(saved.generation, 1);
    assert_eq!(saved.disks.len(), 1, "the writable disk's identity is recorded: {saved:?}");
    assert!(vm_dir.join("saved-1/state.json").is_file());
    let at_save = *heartbeat_numbers(&serial).last().unwrap();
    assert!(env.mgr.save("deb").await.unwrap_err().to_string().contains("already saved"));

    // Resume: it continues counting; the state is used up before the VMM ran.
    env.mgr.start("deb", false).unwrap();
    wait_state(&env, "deb", "running", Duration::from_secs(5)).await;
    wait_heartbeats_past(&serial, at_save + 5).await;
    let log = std::fs::read_to_string(&serial).unwrap();
    assert!(log.contains(&format!("guest: restored at heartbeat {at_save}")), "{log}");
    assert_eq!(log.matches("guest: init").count(), 1, "the resumed guest booted again:\n{log}");
    assert!(env.mgr.record("deb").unwrap().saved.is_none(), "a resumed state is forgotten");
    assert!(!vm_dir.join("saved-1").exists() && !vm_dir.join("restoring-1").exists(), "a resumed state is removed");
    // The resumed agent never says ready again: its heartbeat makes it ready.
    let t = Instant::now();
    while !env.mgr.get("deb").unwrap().agent_ready {
        assert!(t.elapsed() < Duration::from_secs(3), "the resumed guest's agent never counted as ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A disk written while the VM was saved (an offline edit): not resumed, kept aside.
    env.mgr.save("deb").await.unwrap();
    wait_state(&env, "deb", "saved", Duration::from_secs(3)).await;
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(env.dir.join("deb.img"), b"edited offline").unwrap();
    env.mgr.start("deb", false).unwrap();
    wait_state(&env, "deb", "running", Duration::from_secs(5)).await;
    wait_inits(&serial, 2).await;
    assert!(vm_dir.join("saved-state.rejected-1/state.json").is_file(), "the refused state is kept aside");
    let problems = env.mgr.problems().join("\n");
    assert!(problems.contains("deb.img") && problems.contains("changed since") && problems.contains("rejected-1"), "{problems}");
    assert_eq!(std::fs::read(env.dir.join("deb.img")).unwrap(), b"edited offline", "the disk is untouched");

    // A state the VMM refuses (exit 12): kept aside, cold boot, no crash counted.
    env.mgr.save("deb").await.unwrap();
    wait_state(&env, "deb", "saved", Duration::from_secs(3)).await;
    let g = env.mgr.record("deb").unwrap().saved.unwrap().generation;
    assert_eq!(g, 3, "generations only grow");
    let state = vm_dir.join(format!("saved-{g}/state.json"));
    let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    doc["reject"] = true.into();
    std::fs::write(&state, doc.to_string()).unwrap();
    env.mgr.start("deb", false).unwrap();
    wait_state(&env, "deb", "running", Duration::from_secs(5)).await;
    wait_inits(&serial, 3).await;
    assert!(vm_dir.join("saved-state.rejected-2/state.json").is_file(), "the refused state is kept aside");
    assert!(env.mgr.problems().join("\n").contains("checksum mismatch"), "{:?}", env.mgr.problems());
    assert_eq!(env.mgr.get("deb").unwrap().restarts, 0, "a refused state is not a crash");

    // A fresh start discards the state.
    env.mgr.save("deb").await.unwrap();
    wait_state(&env, "deb", "saved", Duration::from_secs(3)).await;
    env.mgr.start("deb", true).unwrap();
    wait_state(&env, "deb", "running", Duration::from_secs(5)).await;
    assert!(env.mgr.record("deb").unwrap().saved.is_none());
    assert!(!vm_dir.join("saved-4").exists(), "a fresh start removes the state");
    wait_inits(&serial, 4).await;
    env.mgr.stop("deb", true).unwrap();
    wait_state(&env, "deb", "stopped", Duration::from_secs(3)).await;
    std::fs::remove_dir_all(&env.dir).unwrap();
}

/// An orderly shutdown saves the VMs whose policy says so and shuts the others down; a save
/// that fails shuts its guest down instead.
#[tokio::test(flavor = "current_thread")]
async fn shutdown_saves_by_policy_and_falls_back_to_a_shutdown() {
    let env = setup("shutsave", |_| {});
    create_with(&env, "keep", "console=ttyS0", false, true, RestartPolicy::OnFailure);
    create_with(&env, "full", "console=ttyS0 save-fails", false, true, RestartPolicy::OnFailure);
    let off = create_with(&env, "off", "console=ttyS0", false, true, RestartPolicy::OnFailure);
    env.mgr.registry.lock().unwrap().update(off.parse().unwrap(), |v| v.policy.on_shutdown = super::registry::OnShutdown::Shutdown).unwrap();
    for vm in ["keep", "full", "off"] {
        env.mgr.start(vm, false).unwrap();
        wait_state(&env, vm, "running", Duration::from_secs(5)).await;
    }
    env.mgr.shutdown_all(Duration::from_secs(5)).await;
    assert_eq!(env.mgr.get("keep").unwrap().state, "saved");
    let full = env.mgr.get("full").unwrap();
    assert_eq!((full.state.as_str(), full.detail.as_str()), ("stopped", "the guest powered off"), "a failed save shuts the guest down: {full:?}");
    assert!(env.mgr.record("full").unwrap().saved.is_none());
    let off = env.mgr.get("off").unwrap();
    assert_eq!(off.state, "stopped", "{off:?}");
    assert!(env.mgr.record("off").unwrap().saved.is_none(), "policy shutdown never saves");
    std::fs::remove_dir_all(&env.dir).unwrap();
}

/// The home screen shows a VM "starting" until its guest is up: the moment its agent says
/// ready, watchers get a VmStateChanged repeating "running"; heartbeats alone send nothing.
#[tokio::test(flavor = "current_thread")]
async fn the_guest_coming_up_is_announced_once_with_the_state_as_it_is() {
    let env = setup("agent-up", |_| {});
    create_with(&env, "deb", "console=ttyS0", false, true, RestartPolicy::OnFailure);
    create(&env, "bare", "console=ttyS0", false);
    assert!(env.mgr.get("deb").unwrap().has_agent && !env.mgr.get("bare").unwrap().has_agent);
    let mut events = env.mgr.subscribe();
    env.mgr.start("deb", false).unwrap();
    let t = Instant::now();
    while env.mgr.get("deb").unwrap().agent_heartbeat < 3 {
        assert!(t.elapsed() < Duration::from_secs(5), "no heartbeats: {:?}", env.mgr.get("deb"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(ev.state);
    }
    // starting, running (the VMM is up), running (the guest is up): nothing per heartbeat.
    assert_eq!(seen, ["starting", "running", "running"], "events: {seen:?}");
    env.mgr.stop("deb", false).unwrap();
    wait_state(&env, "deb", "stopped", Duration::from_secs(3)).await;
}
