//! The whole compositor against a fake rayosd (the control API on a socket, with the session
//! preamble) and a fake VMM (our end of a display channel), with keys typed on the channel the
//! input devices would use. No monitor: the screen part runs with no card.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use compositor::devices::DeviceEvent;
use compositor::route::KeyEvent;
use evdev::KeyCode;
use nix::sys::socket::{recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use rayos_proto::display::{decode_to_vmm, encode_from_vmm, ev, FbMode, FromVmm, InputTarget, PixelFormat, ToVmm, VmmInbound};
use rayosd::api::SystemStatus;
use rayosd::vm::manager::VmInfo;
use tokio::sync::mpsc;
use zbus::object_server::SignalEmitter;

#[derive(Default)]
struct Calls {
    log: Vec<String>,
    presented: String,
    /// The VMM's end of the channel handed out, for the test to hold.
    vmm_ends: Vec<OwnedFd>,
}

type Shared = Arc<Mutex<Calls>>;

fn vm(name: &str, state: &str, has_display: bool) -> VmInfo {
    VmInfo {
        id: format!("id-{name}"),
        name: name.into(),
        kind: "linux".into(),
        state: state.into(),
        pid: 0,
        restarts: 0,
        detail: String::new(),
        autostart_hidden: true,
        guest_init_ms: 0,
        start_to_init_ms: 0,
        has_agent: false,
        agent_ready: false,
        agent_heartbeat: 0,
        firstboot: String::new(),
        disks: vec![],
        memory_mib: 1024,
        vcpus: 1,
        created_at: 0,
        last_booted_at: 0,
        has_display,
        display_follows_monitor: false,
        display_width: if has_display { 640 } else { 0 },
        display_height: if has_display { 480 } else { 0 },
        on_shutdown: "save".into(),
        network: "off".into(),
        mac: String::new(),
        saved_generation: 0,
        saved_at: 0,
        saved_bytes: 0,
    }
}

struct FakeVms(Shared);
#[zbus::interface(name = "org.rayos.Vms1")]
impl FakeVms {
    async fn list_vms(&self) -> Vec<VmInfo> {
        vec![vm("debian", "running", true), vm("headless", "running", false)]
    }
    async fn start_vm(&self, vm: &str, fresh: bool) {
        self.0.lock().unwrap().log.push(format!("start {vm} {fresh}"));
    }
    async fn stop_vm(&self, vm: &str, force: bool) {
        self.0.lock().unwrap().log.push(format!("stop {vm} {force}"));
    }
}

struct FakeControl(Shared);
#[zbus::interface(name = "org.rayos.Control1")]
impl FakeControl {
    async fn status(&self) -> SystemStatus {
        SystemStatus { machine_name: "desk".into(), ..Default::default() }
    }
    async fn reboot(&self) {
        self.0.lock().unwrap().log.push("reboot".into());
    }
    async fn power_off(&self) {
        self.0.lock().unwrap().log.push("poweroff".into());
    }
}

struct FakeDisplay(Shared);
#[zbus::interface(name = "org.rayos.Display1")]
impl FakeDisplay {
    async fn present(&self, vm: &str, #[zbus(signal_emitter)] e: SignalEmitter<'_>) {
        {
            let mut c = self.0.lock().unwrap();
            c.log.push(format!("present {vm}"));
            c.presented = vm.into();
        }
        let _ = Self::presentation_changed(&e, vm).await;
    }
    async fn hide(&self, #[zbus(signal_emitter)] e: SignalEmitter<'_>) {
        {
            let mut c = self.0.lock().unwrap();
            c.log.push("hide".into());
            c.presented.clear();
        }
        let _ = Self::presentation_changed(&e, "").await;
    }
    async fn presented(&self) -> String {
        self.0.lock().unwrap().presented.clone()
    }
    async fn open_channel(&self, vm: &str) -> zbus::fdo::Result<zbus::zvariant::OwnedFd> {
        if vm != "debian" {
            return Err(zbus::fdo::Error::Failed(format!("{vm} has no display")));
        }
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let mut c = self.0.lock().unwrap();
        c.log.push(format!("open {vm}"));
        c.vmm_ends.push(ours);
        Ok(theirs.into())
    }
    async fn report_primary_mode(&self, width: u32, height: u32) {
        self.0.lock().unwrap().log.push(format!("monitor {width}x{height}"));
    }
    async fn report_no_monitor(&self) {
        self.0.lock().unwrap().log.push("no monitor".into());
    }
    #[zbus(signal)]
    async fn presentation_changed(e: &SignalEmitter<'_>, vm: &str) -> zbus::Result<()>;
}

async fn serve(listener: tokio::net::UnixListener, calls: Shared) {
    serve_until(listener, calls, std::future::pending()).await
}

async fn serve_until(listener: tokio::net::UnixListener, calls: Shared, stop: impl std::future::Future<Output = ()>) {
    let (mut stream, _) = listener.accept().await.unwrap();
    rayosd::session::server_accept(&mut stream).await.unwrap();
    let conn = zbus::connection::Builder::unix_stream(stream)
        .server(zbus::Guid::generate())
        .unwrap()
        .p2p()
        .serve_at("/org/rayos/Vms", FakeVms(calls.clone()))
        .unwrap()
        .serve_at("/org/rayos/Control1", FakeControl(calls.clone()))
        .unwrap()
        .serve_at("/org/rayos/Display1", FakeDisplay(calls))
        .unwrap()
        .build()
        .await
        .unwrap();
    stop.await;
    conn.close().await.unwrap();
}

/// Every datagram the fake VMM received so far.
fn drain(fd: &OwnedFd) -> Vec<VmmInbound> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
        out.push(decode_to_vmm(&buf[..n]).expect("the compositor sends well-formed datagrams"));
    }
    out
}

/// Keyboard records (code, value) in `msgs`, in order.
fn keys(msgs: &[VmmInbound]) -> Vec<(u16, u32)> {
    msgs.iter()
        .filter_map(|m| match m {
            VmmInbound::Input { target: InputTarget::Keyboard, records } => Some(records.iter().filter(|r| r.kind == ev::EV_KEY).map(|r| (r.code, r.value))),
            _ => None,
        })
        .flatten()
        .collect()
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

async fn wait_for(calls: &Shared, what: &str) {
    for _ in 0..100 {
        if calls.lock().unwrap().log.iter().any(|l| l == what) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("rayosd never got {what:?}: {:?}", calls.lock().unwrap().log);
}

#[test]
fn keys_reach_only_the_presented_vm_and_the_combo_goes_home() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // zbus's tasks need the runtime while they are dropped, also when an assertion unwinds.
    let _rt = rt.enter();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let dir = std::env::temp_dir().join(format!("rayos-comp-it-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("dri")).unwrap();
        std::fs::create_dir_all(dir.join("input")).unwrap();
        let sock: PathBuf = dir.join("control.sock");
        let calls: Shared = Arc::default();
        tokio::task::spawn_local(serve(tokio::net::UnixListener::bind(&sock).unwrap(), calls.clone()));
        let (dev_tx, dev_rx) = mpsc::unbounded_channel();
        let typing = dev_tx.clone();
        tokio::task::spawn_local(compositor::app::run_with(sock, dir.join("dri"), dir.join("input"), dev_tx, dev_rx));
        let key = |code: KeyCode, value: i32| typing.send(DeviceEvent::Key(KeyEvent { code: code.0, value })).unwrap();

        // With no card there is no monitor, and rayosd is told so once (VMs that follow the
        // monitor need not wait for a mode).
        wait_for(&calls, "no monitor").await;
        // The running VM with a display gets a channel; the one without is not asked for one.
        wait_for(&calls, "open debian").await;
        settle().await;
        assert!(!calls.lock().unwrap().log.iter().any(|l| l == "open headless"));
        let vmm = calls.lock().unwrap().vmm_ends.pop().unwrap();
        assert_eq!(drain(&vmm), vec![VmmInbound::Control(ToVmm::Attach)]);
        let memfd = nix::sys::memfd::memfd_create(c"fb", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&memfd, 640 * 480 * 4).unwrap();
        let mode = FbMode { width: 640, height: 480, stride: 2560, offset: 0, format: PixelFormat::Xrgb8888 };
        let d = encode_from_vmm(&FromVmm::Framebuffer { size: 640 * 480 * 4, mode: Some(mode) });
        let fds = [memfd.as_raw_fd()];
        sendmsg::<()>(vmm.as_raw_fd(), &[std::io::IoSlice::new(&d)], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).unwrap();

        // At home, typing reaches no VM.
        key(KeyCode::KEY_A, 1);
        key(KeyCode::KEY_A, 0);
        settle().await;
        assert_eq!(drain(&vmm), vec![]);

        // "2" is the VM without a display: refused here, rayosd is not asked.
        key(KeyCode::KEY_2, 1);
        key(KeyCode::KEY_2, 0);
        settle().await;
        assert!(!calls.lock().unwrap().log.iter().any(|l| l.starts_with("present")));

        // "1" asks rayosd to present debian; its signal makes the compositor show it.
        key(KeyCode::KEY_1, 1);
        key(KeyCode::KEY_1, 0);
        wait_for(&calls, "present debian").await;
        settle().await;
        assert_eq!(drain(&vmm), vec![VmmInbound::Control(ToVmm::Shown { shown: true })]);

        // Now keys go to it, without host autorepeat.
        key(KeyCode::KEY_LEFTCTRL, 1);
        key(KeyCode::KEY_B, 1);
        key(KeyCode::KEY_B, 2);
        key(KeyCode::KEY_B, 0);
        key(KeyCode::KEY_LEFTALT, 1);
        // The return combo: Home never reaches the VM; Ctrl and Alt are released in it.
        key(KeyCode::KEY_HOME, 1);
        key(KeyCode::KEY_HOME, 0);
        key(KeyCode::KEY_LEFTALT, 0);
        key(KeyCode::KEY_LEFTCTRL, 0);
        wait_for(&calls, "hide").await;
        settle().await;
        let got = drain(&vmm);
        let ctrl = KeyCode::KEY_LEFTCTRL.0;
        let alt = KeyCode::KEY_LEFTALT.0;
        let b = KeyCode::KEY_B.0;
        let k = keys(&got);
        assert_eq!(&k[..4], &[(ctrl, 1), (b, 1), (b, 0), (alt, 1)], "{got:?}");
        let mut released = k[4..].to_vec();
        released.sort();
        assert_eq!(released, vec![(ctrl, 0), (alt, 0)], "{got:?}");
        assert!(got.contains(&VmmInbound::Control(ToVmm::Shown { shown: false })), "{got:?}");

        // Home again: nothing reaches it; Ctrl+Alt+Del asks rayosd to reboot.
        key(KeyCode::KEY_LEFTCTRL, 1);
        key(KeyCode::KEY_LEFTALT, 1);
        key(KeyCode::KEY_DELETE, 1);
        wait_for(&calls, "reboot").await;
        settle().await;
        assert_eq!(keys(&drain(&vmm)), vec![]);
        // The 2 s rescans found nothing new: nothing more was reported.
        let reports: Vec<String> = calls.lock().unwrap().log.iter().filter(|l| l.contains("monitor")).cloned().collect();
        assert_eq!(reports, ["no monitor"]);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn losing_rayosd_ends_the_compositor_with_an_error() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _rt = rt.enter();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let dir = std::env::temp_dir().join(format!("rayos-comp-it2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("control.sock");
        let calls: Shared = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::task::spawn_local(serve_until(tokio::net::UnixListener::bind(&sock).unwrap(), calls.clone(), async { drop(stop_rx.await) }));
        let (dev_tx, dev_rx) = mpsc::unbounded_channel();
        let app = tokio::task::spawn_local(compositor::app::run_with(sock.clone(), dir.join("dri"), dir.join("input"), dev_tx, dev_rx));
        wait_for(&calls, "open debian").await;
        stop_tx.send(()).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), app).await.expect("the compositor noticed within 5 s").unwrap();
        let e = r.expect_err("it ends with an error").to_string();
        assert!(e.contains("lost the connection to rayosd") && e.contains("control.sock"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}
