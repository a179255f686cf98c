//! `rayosctl vm …`: the VM subcommands, talking to `org.rayos.Vms1`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use futures_util::StreamExt;

use super::manager::{CreateRequest, GuestScreen, VmInfo};
use super::registry::{DeviceConfig, DiskRecord, DisplayConfig, DisplaySize, Network, OnShutdown, Policy, RestartPolicy, VmKind};
use crate::client::ClientError;

#[zbus::proxy(
    interface = "org.rayos.Vms1",
    default_path = "/org/rayos/Vms",
    // Peer-to-peer has no bus to route by name; zbus still wants one.
    default_service = "org.rayos.Vms1",
    gen_blocking = false
)]
pub trait Vms1 {
    fn list_vms(&self) -> zbus::Result<Vec<VmInfo>>;
    fn get_vm(&self, vm: &str) -> zbus::Result<VmInfo>;
    fn problems(&self) -> zbus::Result<Vec<String>>;
    fn create_vm(&self, request: &str) -> zbus::Result<VmInfo>;
    fn start_vm(&self, vm: &str, fresh: bool) -> zbus::Result<()>;
    fn save_vm(&self, vm: &str) -> zbus::Result<String>;
    fn stop_vm(&self, vm: &str, force: bool) -> zbus::Result<()>;
    fn pause_vm(&self, vm: &str) -> zbus::Result<()>;
    fn resume_vm(&self, vm: &str) -> zbus::Result<()>;
    fn delete_vm(&self, vm: &str, purge: bool) -> zbus::Result<()>;
    fn set_network(&self, vm: &str, network: &str) -> zbus::Result<VmInfo>;
    fn logs(&self, vm: &str, lines: u32) -> zbus::Result<String>;
    fn signal_vmm(&self, vm: &str, signal: &str) -> zbus::Result<bool>;
    fn guest_screen(&self, vm: &str) -> zbus::Result<GuestScreen>;
    fn screenshot(&self, vm: &str) -> zbus::Result<Vec<u8>>;
    fn serial_input(&self, vm: &str, text: &str) -> zbus::Result<u64>;
    fn key_input(&self, vm: &str, keys: &str) -> zbus::Result<u32>;
    fn type_text(&self, vm: &str, text: &str) -> zbus::Result<u64>;
    fn pointer(&self, vm: &str, x: u32, y: u32, click: &[&str]) -> zbus::Result<()>;
    #[zbus(signal)]
    fn vm_state_changed(&self, id: &str, name: &str, state: &str, detail: &str) -> zbus::Result<()>;
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// List VMs, their states and registry problems.
    List,
    /// Show one VM.
    Show { vm: String },
    /// Register a new VM (stopped).
    Create {
        name: String,
        /// `linux` (`windows` is refused until Windows guests are supported: exit 11).
        #[arg(long, default_value = "linux")]
        kind: String,
        /// A disk image (repeatable).
        #[arg(long = "disk")]
        disks: Vec<PathBuf>,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initramfs: Option<PathBuf>,
        #[arg(long, default_value = "console=ttyS0")]
        cmdline: String,
        #[arg(long, default_value_t = 512)]
        memory_mib: u64,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Start it hidden at boot.
        #[arg(long)]
        autostart: bool,
        /// Do not restart it after a VMM crash.
        #[arg(long)]
        no_restart: bool,
        /// What a RayOS shutdown or reboot does with it when it runs: save it (the next
        /// start resumes it) or shut it down.
        #[arg(long, value_parser = parse_on_shutdown, default_value = "save")]
        on_shutdown: OnShutdown,
        /// Offer the guest agent port.
        #[arg(long)]
        agent: bool,
        /// A display with a virtio keyboard and tablet, so it can be presented: WIDTHxHEIGHT
        /// (e.g. 1280x800), `monitor` (the primary monitor's mode at each cold start) or
        /// `none` (the default).
        #[arg(long, value_parser = parse_display, default_value = "none")]
        display: DisplayFlag,
        /// `off` (no network card) or `nat` (a private link out through RayOS's uplink).
        #[arg(long, default_value = "off")]
        network: Network,
    },
    /// Change a VM's settings; they take effect at its next start.
    Set {
        vm: String,
        /// `off` (no network card) or `nat` (a private link out through RayOS's uplink).
        #[arg(long)]
        network: Option<Network>,
    },
    /// Start hidden (the display stays where it is); a saved VM resumes where it was.
    Start {
        vm: String,
        /// Discard the saved state and boot from the disks (asks to confirm; see fresh-start).
        #[arg(long)]
        fresh: bool,
        /// With --fresh: do not ask.
        #[arg(long)]
        yes: bool,
        /// Wait until the guest's init runs (up to this many seconds) and print the times.
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Save a running VM to the data volume and end it (hibernate); start resumes it.
    Save { vm: String },
    /// Discard the VM's saved state and boot it from its disks: what it had in memory (open
    /// programs, unsaved work) is lost. Asks to type the VM's name unless --yes.
    FreshStart {
        vm: String,
        #[arg(long)]
        yes: bool,
    },
    /// Stop: ACPI power button, then forced after the supervisor's timeout.
    Stop {
        vm: String,
        /// Power off at once.
        #[arg(long)]
        force: bool,
        /// Wait until it is stopped (up to this many seconds).
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Pause the vCPUs (RAM is kept).
    Pause { vm: String },
    /// Resume paused vCPUs.
    Resume { vm: String },
    /// Remove from the registry; the VM's disk stays unless --purge.
    Delete {
        vm: String,
        #[arg(long)]
        purge: bool,
    },
    /// The VM's serial console output.
    Logs {
        vm: String,
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: u32,
    },
    /// Send a signal to the VM's VMM process (tests, debugging).
    Kill {
        vm: String,
        #[arg(short, long, default_value = "KILL")]
        signal: String,
    },
    /// The text on the VM's display console (tty1), read by its guest agent (root).
    Screen { vm: String },
    /// Save the VM's display as a binary PPM (root).
    Screenshot { vm: String, path: PathBuf },
    /// Type TEXT on the VM's keyboard through the system keymap (root); with --serial, on
    /// its serial console instead, as if typed on a terminal attached to it.
    Type {
        vm: String,
        text: String,
        /// Press Enter after the text.
        #[arg(long)]
        enter: bool,
        /// Type on the serial console, not the keyboard.
        #[arg(long)]
        serial: bool,
    },
    /// Press key combos on the VM's keyboard, one after the other (root): `ctrl+l`,
    /// `ctrl+alt+f2`, `ret`, `shift+a`.
    Key {
        vm: String,
        #[arg(required = true)]
        combos: Vec<String>,
    },
    /// Move the VM's pointer to pixel X Y of its display (root), and click there.
    Pointer {
        vm: String,
        x: u32,
        y: u32,
        /// left, right or middle (repeatable: clicked in order).
        #[arg(long)]
        click: Vec<String>,
    },
    /// Print VmStateChanged signals as they come.
    Watch,
}

/// Width and height from a binary PPM's header (`P6 <w> <h> 255`).
pub fn ppm_size(data: &[u8]) -> Option<(u32, u32)> {
    // Lossy: the pixel bytes after the header are not text, and only the first tokens count.
    let head = String::from_utf8_lossy(&data[..data.len().min(32)]);
    let mut f = head.split_ascii_whitespace();
    if f.next()? != "P6" {
        return None;
    }
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

async fn connect(path: &Path) -> Result<Vms1Proxy<'static>, ClientError> {
    let conn = crate::client::connection(path).await?;
    Vms1Proxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|source| ClientError::Handshake { path: path.to_path_buf(), source })
}

fn human_age(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172800 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86400),
    }
}

/// A fresh start throws away what the VM had in memory: the user types the VM's name to go
/// on (or gives --yes). Without a terminal to ask on, --yes is required.
async fn confirm_fresh(p: &Vms1Proxy<'_>, vm: &str, yes: bool) -> Result<(), ClientError> {
    let v = p.get_vm(vm).await?;
    if yes || v.saved_generation == 0 {
        return Ok(());
    }
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(ClientError::InvalidArgument(format!(
            "{vm} has a saved state that a fresh start discards; confirm with --yes (no terminal to ask on)"
        )));
    }
    eprint!("{vm} was saved {} ago; a fresh start discards what it had in memory. Type its name to go on: ", human_age(rayos_proto::registry::now_secs().saturating_sub(v.saved_at)));
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if line.trim() != v.name {
        return Err(ClientError::InvalidArgument(format!("not confirmed: {vm}'s saved state is kept")));
    }
    Ok(())
}

fn parse_on_shutdown(s: &str) -> Result<OnShutdown, String> {
    match s {
        "save" => Ok(OnShutdown::Save),
        "shutdown" => Ok(OnShutdown::Shutdown),
        _ => Err(format!("{s:?}: give save or shutdown")),
    }
}

/// `vm create --display`: a VM's display, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DisplayFlag(pub Option<DisplayConfig>);

fn parse_display(s: &str) -> Result<DisplayFlag, String> {
    match s {
        "none" => return Ok(DisplayFlag(None)),
        DisplayConfig::MONITOR => return Ok(DisplayFlag(Some(DisplayConfig::FollowMonitor))),
        _ => {}
    }
    let bad = || format!("{s:?} is not WIDTHxHEIGHT (e.g. 1280x800), monitor or none");
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let size = DisplaySize::new(w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    Ok(DisplayFlag(Some(DisplayConfig::Fixed(size))))
}

/// What `vm show` says about a VM's network: its policy and, for a NAT VM, its card and the
/// address RayOS's DHCP server gave it (asked over the same connection: the serial bridge
/// serves one at a time).
async fn describe_network(v: &VmInfo, p: &Vms1Proxy<'static>) -> String {
    if v.network != "nat" {
        return v.network.clone();
    }
    let net = match crate::client::Net1Proxy::builder(p.inner().connection()).build().await {
        Ok(n) => n.status().await.ok(),
        Err(_) => None,
    };
    let address = match &net {
        Some(n) => n.nat_address(&v.mac).map(|a| format!("address {a}")).unwrap_or_else(|| "no lease yet".into()),
        None => "address unknown (the network status did not answer)".into(),
    };
    format!("nat, card {}, {address}", v.mac)
}

/// What `vm show` says about a VM's display.
fn describe_display(v: &VmInfo) -> String {
    let size = DisplaySize::new(v.display_width, v.display_height);
    match (v.has_display, v.display_follows_monitor) {
        (false, _) => "none".into(),
        (true, true) => format!("follows the monitor (now {size})"),
        (true, false) => size.to_string(),
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn done(json: bool, msg: &str) {
    if json {
        print_json(&serde_json::json!({ "ok": true }))
    } else {
        println!("{msg}")
    }
}

fn print_row(v: &VmInfo) {
    let pid = if v.pid == 0 { "-".to_string() } else { v.pid.to_string() };
    println!(
        "{:<36} {:<16} {:<8} {:<10} {:>7} {:>3}  {}",
        v.id,
        v.name,
        v.kind,
        v.state,
        pid,
        if v.autostart_hidden { "yes" } else { "no" },
        v.detail
    );
}

/// Runs one `rayosctl vm` command against the control socket at `socket`.
pub async fn run(socket: &str, json: bool, cmd: &VmCmd) -> Result<(), ClientError> {
    let p = connect(Path::new(socket)).await?;
    match cmd {
        VmCmd::List => {
            let list = p.list_vms().await?;
            let problems = p.problems().await?;
            if json {
                print_json(&serde_json::json!({ "vms": list, "problems": problems }));
            } else {
                for pr in &problems {
                    println!("problem: {pr}");
                }
                println!("{:<36} {:<16} {:<8} {:<10} {:>7} {:>3}  DETAIL", "ID", "NAME", "KIND", "STATE", "PID", "AUTO");
                for v in &list {
                    print_row(v);
                }
            }
        }
        VmCmd::Show { vm } => {
            let v = p.get_vm(vm).await?;
            if json {
                print_json(&v)
            } else {
                print_row(&v);
                println!("disks: {}", v.disks.join(", "));
                println!("memory: {} MiB, vCPUs: {}, restarts: {}", v.memory_mib, v.vcpus, v.restarts);
                println!("display: {}", describe_display(&v));
                if v.guest_init_ms > 0 {
                    println!("guest init: {} ms after VMM start, {} ms after the start request", v.guest_init_ms, v.start_to_init_ms);
                }
                if !v.firstboot.is_empty() {
                    println!("first-boot setup: {}", v.firstboot);
                }
                println!("on RayOS shutdown: {}", v.on_shutdown);
                println!("network: {}", describe_network(&v, &p).await);
                if v.saved_generation > 0 {
                    let age = rayos_proto::registry::now_secs().saturating_sub(v.saved_at);
                    println!(
                        "saved state: generation {}, {} MiB of RAM written, saved {} ago; the next start resumes it (fresh-start discards it)",
                        v.saved_generation,
                        v.saved_bytes >> 20,
                        human_age(age)
                    );
                } else {
                    println!("saved state: none");
                }
            }
        }
        VmCmd::Set { vm, network } => {
            let Some(network) = network else {
                return Err(ClientError::InvalidArgument("nothing to set: give --network off|nat".into()));
            };
            let v = p.set_network(vm, network.as_str()).await?;
            if json {
                print_json(&v)
            } else {
                println!("{}: network {} from its next start", v.name, v.network);
            }
        }
        VmCmd::Create { name, kind, disks, kernel, initramfs, cmdline, memory_mib, vcpus, autostart, no_restart, on_shutdown, agent, display, network } => {
            let kind: VmKind = kind.parse().map_err(ClientError::InvalidArgument)?;
            let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            let req = CreateRequest {
                name: name.clone(),
                kind,
                disks: disks.iter().map(|d| DiskRecord { path: abs(d), read_only: false }).collect(),
                config: DeviceConfig {
                    vcpus: *vcpus,
                    memory_mib: *memory_mib,
                    kernel: abs(kernel),
                    initramfs: initramfs.as_ref().map(abs),
                    cmdline: cmdline.clone(),
                    display: display.0,
                    input: display.0.is_some(),
                    net_taps: vec![],
                    rng: true,
                    agent: *agent,
                },
                policy: Policy {
                    autostart_hidden: *autostart,
                    restart: if *no_restart { RestartPolicy::Never } else { RestartPolicy::OnFailure },
                    on_shutdown: *on_shutdown,
                    network: *network,
                },
            };
            let v = p.create_vm(&serde_json::to_string(&req).expect("serializes")).await?;
            if json {
                print_json(&v)
            } else {
                println!("created {} id={}", v.name, v.id)
            }
        }
        VmCmd::Save { vm } => {
            let said = p.save_vm(vm).await?;
            done(json, &format!("{vm}: {said}"));
        }
        VmCmd::FreshStart { vm, yes } => {
            confirm_fresh(&p, vm, *yes).await?;
            p.start_vm(vm, true).await?;
            done(json, &format!("starting {vm} from its disks"));
        }
        VmCmd::Start { vm, fresh, yes, wait } => {
            let t = std::time::Instant::now();
            if *fresh {
                confirm_fresh(&p, vm, *yes).await?;
            }
            p.start_vm(vm, *fresh).await?;
            match wait {
                None => done(json, &format!("starting {vm}")),
                Some(secs) => {
                    let deadline = t + Duration::from_secs(*secs);
                    loop {
                        let v = p.get_vm(vm).await?;
                        if v.guest_init_ms > 0 {
                            let wall = t.elapsed().as_millis();
                            if json {
                                print_json(&serde_json::json!({ "ok": true, "guest_init_ms": v.guest_init_ms, "start_to_init_ms": v.start_to_init_ms, "rayosctl_wall_ms": wall }))
                            } else {
                                println!("{vm}: guest init {} ms after VMM start, {} ms after the start request ({wall} ms for rayosctl)", v.guest_init_ms, v.start_to_init_ms);
                            }
                            break;
                        }
                        if matches!(v.state.as_str(), "failed" | "hung" | "broken" | "crash-loop" | "stopped") && t.elapsed() > Duration::from_millis(200) {
                            return Err(ClientError::VmEnded(format!("{vm} is {}: {}", v.state, v.detail)));
                        }
                        if std::time::Instant::now() > deadline {
                            return Err(ClientError::TimedOut(format!("{vm}: guest init not reached within {secs} s (state {})", v.state)));
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        VmCmd::Stop { vm, force, wait } => {
            let t = std::time::Instant::now();
            p.stop_vm(vm, *force).await?;
            let Some(secs) = wait else {
                done(json, &format!("stopping {vm}"));
                return Ok(());
            };
            let deadline = t + Duration::from_secs(*secs);
            loop {
                let v = p.get_vm(vm).await?;
                match v.state.as_str() {
                    "stopped" => {
                        done(json, &format!("{vm} stopped after {} ms", t.elapsed().as_millis()));
                        break;
                    }
                    "failed" | "hung" | "broken" | "crash-loop" => {
                        return Err(ClientError::VmEnded(format!("{vm} is {}: {}", v.state, v.detail)))
                    }
                    _ if std::time::Instant::now() > deadline => {
                        return Err(ClientError::TimedOut(format!("{vm}: not stopped within {secs} s (state {})", v.state)))
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        VmCmd::Pause { vm } => {
            p.pause_vm(vm).await?;
            done(json, &format!("pausing {vm}"))
        }
        VmCmd::Resume { vm } => {
            p.resume_vm(vm).await?;
            done(json, &format!("resuming {vm}"))
        }
        VmCmd::Delete { vm, purge } => {
            p.delete_vm(vm, *purge).await?;
            done(json, &format!("deleted {vm}{}", if *purge { " and its files" } else { "; its disk is kept" }))
        }
        VmCmd::Logs { vm, lines } => {
            let text = p.logs(vm, *lines).await?;
            if json {
                print_json(&serde_json::json!({ "vm": vm, "serial": text }))
            } else {
                println!("{text}")
            }
        }
        VmCmd::Kill { vm, signal } => {
            let hit = p.signal_vmm(vm, signal).await?;
            if json {
                print_json(&serde_json::json!({ "signalled": hit }))
            } else if hit {
                println!("sent {signal} to the VMM of {vm}")
            } else {
                println!("{vm} has no VMM running; nothing signalled")
            }
        }
        VmCmd::Screen { vm } => {
            let s = p.guest_screen(vm).await?;
            if json {
                print_json(&s)
            } else {
                println!("{}", s.text)
            }
        }
        VmCmd::Screenshot { vm, path } => {
            let data = p.screenshot(vm).await?;
            let (w, h) = ppm_size(&data).ok_or_else(|| ClientError::Call(zbus::Error::Failure(format!("{vm}: the screenshot is not a PPM image"))))?;
            std::fs::write(path, &data).map_err(|e| ClientError::InvalidArgument(format!("PATH {}: {e}", path.display())))?;
            if json {
                print_json(&serde_json::json!({ "ok": true, "path": path, "width": w, "height": h, "bytes": data.len() }))
            } else {
                println!("{vm}: {w}x{h} screenshot saved to {}", path.display())
            }
        }
        VmCmd::Type { vm, text, enter, serial: true } => {
            let text = if *enter { format!("{text}\r") } else { text.clone() };
            let n = p.serial_input(vm, &text).await?;
            if json {
                print_json(&serde_json::json!({ "ok": true, "queued": n }))
            } else {
                println!("{vm}: {n} bytes typed on the serial console")
            }
        }
        VmCmd::Type { vm, text, enter, serial: false } => {
            let text = if *enter { format!("{text}\n") } else { text.clone() };
            let n = p.type_text(vm, &text).await?;
            if json {
                print_json(&serde_json::json!({ "ok": true, "typed": n }))
            } else {
                println!("{vm}: {n} characters typed on the keyboard")
            }
        }
        VmCmd::Key { vm, combos } => {
            // All checked before any is pressed: a typo in the third combo must not leave the
            // first two done.
            for c in combos {
                super::keys::Combo::parse(c).map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
            }
            for c in combos {
                p.key_input(vm, c).await?;
            }
            done(json, &format!("{vm}: pressed {}", combos.join(" ")))
        }
        VmCmd::Pointer { vm, x, y, click } => {
            let click: Vec<&str> = click.iter().map(String::as_str).collect();
            p.pointer(vm, *x, *y, &click).await?;
            let clicked = if click.is_empty() { String::new() } else { format!(", clicked {}", click.join(" ")) };
            done(json, &format!("{vm}: pointer at {x},{y}{clicked}"))
        }
        VmCmd::Watch => {
            let mut s = p.receive_vm_state_changed().await?;
            while let Some(sig) = s.next().await {
                let a = sig.args()?;
                if json {
                    println!("{}", serde_json::json!({ "id": a.id, "name": a.name, "state": a.state, "detail": a.detail }));
                } else {
                    println!("{} {} {}", a.name, a.state, a.detail);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_display_flag_is_a_size_monitor_or_none() {
        assert_eq!(parse_display("1280x800"), Ok(DisplayFlag(Some(DisplayConfig::Fixed(DisplaySize::new(1280, 800))))));
        assert_eq!(parse_display("monitor"), Ok(DisplayFlag(Some(DisplayConfig::FollowMonitor))));
        assert_eq!(parse_display("none"), Ok(DisplayFlag(None)));
        for bad in ["1280", "wide", "1280x", "x800", "-1x800"] {
            let e = parse_display(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("monitor or none"), "{e}");
        }
    }

    #[test]
    fn vm_show_says_whether_the_display_follows_the_monitor() {
        let mut v: VmInfo = serde_json::from_value(serde_json::json!({
            "id": "x", "name": "work", "kind": "linux", "state": "running", "pid": 1, "restarts": 0, "detail": "",
            "autostart_hidden": false, "guest_init_ms": 0, "start_to_init_ms": 0, "has_agent": false, "agent_ready": false,
            "agent_heartbeat": 0, "firstboot": "", "disks": [], "memory_mib": 128, "vcpus": 1, "created_at": 0,
            "last_booted_at": 0, "has_display": true, "display_follows_monitor": true, "display_width": 1920,
            "display_height": 1080, "on_shutdown": "save", "network": "off", "mac": "", "saved_generation": 0, "saved_at": 0, "saved_bytes": 0
        }))
        .unwrap();
        assert_eq!(describe_display(&v), "follows the monitor (now 1920x1080)");
        (v.display_follows_monitor, v.display_width, v.display_height) = (false, 1280, 800);
        assert_eq!(describe_display(&v), "1280x800");
        v.has_display = false;
        assert_eq!(describe_display(&v), "none");
    }
}
