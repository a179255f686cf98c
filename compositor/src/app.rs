//! The compositor's loop: one task owns the screen, the router and the VMs' channels; D-Bus
//! calls run in their own tasks and report back, so a slow rayosd never stalls a frame or a key.
//!
//! rayosd holds the truth of what is presented (it survives our restart): a key asks it
//! (Present/Hide) and we act on its PresentationChanged signal. The one exception is the
//! return-home combo, acted on at once so that no key after it reaches the VM.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rayos_proto::display::{FbMode, FromVmm, ToVmm};
use rayosd::client::{Control1Proxy, Display1Proxy};
use rayosd::vm::cli::Vms1Proxy;
use rayosd::vm::manager::VmInfo;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use crate::canvas::{rgb, Canvas};
use crate::channel::{Channel, Inbound, Mapping, RecvError};
use crate::devices::{self, DeviceEvent, Leds};
use crate::font::Text;
use crate::home::{self, Home, HomeCommand, VmEntry};
use crate::output::{card_paths, CardOutputs};
use crate::present::Scaler;
use crate::route::{Action, PointerReport, Router};

/// Where the app's tasks report to it.
enum Ev {
    Device(DeviceEvent),
    VmList(Vec<VmInfo>),
    VmState { name: String, state: String },
    Presented(String),
    ChannelOpened { vm: String, channel: Channel },
    Channel { vm: String, gen: u64, msg: Inbound },
    ChannelGone { vm: String, gen: u64, why: String },
    /// Something rayosd refused or a call that failed: shown on the home screen.
    Message(String),
}

struct VmDisplay {
    channel: Arc<Channel>,
    gen: u64,
    fb: Option<Mapping>,
    mode: Option<FbMode>,
    /// What the guest last set its keyboard LEDs to.
    leds: Leds,
    /// One per output (flattened), for the current mode.
    scalers: Vec<Option<Scaler>>,
}

struct Proxies {
    vms: Vms1Proxy<'static>,
    display: Display1Proxy<'static>,
    control: Control1Proxy<'static>,
}

/// The monitors, flattened: canvas `i` is card `outs[i].0`'s output `outs[i].1`.
#[derive(Default)]
struct Screen {
    cards: Vec<CardOutputs>,
    outs: Vec<(usize, usize)>,
    canvases: Vec<Canvas>,
    dirty: Vec<Option<Range<u32>>>,
}

impl Screen {
    /// Opens new cards, drops vanished ones, rescans connectors. Returns whether outputs changed.
    fn rescan(&mut self, dir: &Path) -> bool {
        let mut changed = false;
        let paths = card_paths(dir);
        let before = self.cards.len();
        self.cards.retain(|c| paths.contains(&c.card.path));
        changed |= before != self.cards.len();
        for c in &mut self.cards {
            match c.rescan() {
                Ok(ch) => changed |= ch,
                Err(e) => tracing::warn!("{e}"),
            }
        }
        for p in paths {
            if self.cards.iter().any(|c| c.card.path == p) {
                continue;
            }
            match CardOutputs::open(&p) {
                Ok(c) => {
                    changed |= !c.outputs.is_empty();
                    self.cards.push(c);
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        if changed {
            self.outs = self.cards.iter().enumerate().flat_map(|(ci, c)| (0..c.outputs.len()).map(move |oi| (ci, oi))).collect();
            self.canvases = self.outs.iter().map(|&(ci, oi)| {
                let (w, h) = self.cards[ci].outputs[oi].size();
                Canvas::new(w, h)
            }).collect();
            self.dirty = self.canvases.iter().map(|c| Some(0..c.height)).collect();
        }
        changed
    }

    fn mark(&mut self, i: usize, rows: Range<u32>) {
        if rows.is_empty() {
            return;
        }
        self.dirty[i] = Some(match self.dirty[i].take() {
            Some(d) => d.start.min(rows.start)..d.end.max(rows.end),
            None => rows,
        });
    }

    fn mark_all(&mut self) {
        for i in 0..self.canvases.len() {
            self.dirty[i] = Some(0..self.canvases[i].height);
        }
    }

    fn busy(&self) -> bool {
        self.dirty.iter().any(Option::is_some)
    }

    /// Sends every dirty output whose last flip is done.
    fn flush(&mut self) {
        for c in &mut self.cards {
            c.drain_events();
        }
        for i in 0..self.outs.len() {
            let (ci, oi) = self.outs[i];
            let Some(rows) = self.dirty[i].clone() else { continue };
            if !self.cards[ci].outputs[oi].ready() {
                continue;
            }
            self.dirty[i] = None;
            if let Err(e) = self.cards[ci].show(oi, &self.canvases[i], rows) {
                tracing::warn!("{} {}: {e}", self.cards[ci].card.path.display(), self.cards[ci].outputs[oi].name);
            }
        }
    }

    fn primary_size(&self) -> (u32, u32) {
        self.primary_mode().unwrap_or((1920, 1080))
    }

    /// The first output's mode: the monitor a presented VM is shown on.
    fn primary_mode(&self) -> Option<(u32, u32)> {
        self.canvases.first().map(|c| (c.width, c.height))
    }
}

pub fn entry(v: &VmInfo) -> VmEntry {
    VmEntry {
        name: v.name.clone(),
        kind: v.kind.clone(),
        state: v.state.clone(),
        has_display: v.has_display,
        nat: v.network == "nat",
        guest_booting: v.state == "running" && v.has_agent && !v.agent_ready,
    }
}

pub struct App {
    p: Arc<Proxies>,
    tx: mpsc::UnboundedSender<Ev>,
    home: Home,
    text: Text,
    router: Router,
    /// What rayosd says is presented.
    presented: Option<String>,
    vms: Vec<VmInfo>,
    displays: HashMap<String, VmDisplay>,
    /// VMs whose channel is being opened.
    opening: HashSet<String>,
    next_gen: u64,
    screen: Screen,
    /// Whether rayosd was asked to put the console in graphics mode (`HoldConsole`).
    console_held: bool,
    last_layout: Vec<String>,
    dri: PathBuf,
    /// The physical keyboards show the presented VM's LEDs.
    leds: watch::Sender<Leds>,
    /// What rayosd was last told about the primary monitor (None: nothing yet).
    reported: Option<Option<(u32, u32)>>,
}

fn spawn_call<F>(tx: &mpsc::UnboundedSender<Ev>, what: String, f: F)
where
    F: std::future::Future<Output = zbus::Result<()>> + 'static,
{
    let tx = tx.clone();
    tokio::task::spawn_local(async move {
        if let Err(e) = f.await {
            let msg = match &e {
                zbus::Error::MethodError(_, Some(m), _) => m.clone(),
                e => e.to_string(),
            };
            tracing::warn!("{what}: {msg}");
            let _ = tx.send(Ev::Message(format!("{what}: {msg}")));
        }
    });
}

async fn connect(socket: &Path) -> anyhow::Result<Proxies> {
    let mut wait = Duration::from_millis(200);
    let conn = loop {
        match rayosd::client::connection(socket).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::info!("{e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    let no_cache = zbus::proxy::CacheProperties::No;
    Ok(Proxies {
        vms: Vms1Proxy::builder(&conn).cache_properties(no_cache).build().await?,
        display: Display1Proxy::builder(&conn).cache_properties(no_cache).build().await?,
        control: Control1Proxy::builder(&conn).cache_properties(no_cache).build().await?,
    })
}

impl App {
    fn refresh_vms(&self) {
        let (p, tx) = (self.p.clone(), self.tx.clone());
        tokio::task::spawn_local(async move {
            match p.vms.list_vms().await {
                Ok(v) => drop(tx.send(Ev::VmList(v))),
                Err(e) => drop(tx.send(Ev::Message(format!("listing VMs: {e}")))),
            }
        });
    }

    /// Tells rayosd the primary output's mode, or that there is no monitor, when that differs
    /// from what it was last told: VMs whose display follows the monitor boot at that mode.
    fn report_monitor(&mut self) {
        let now = self.screen.primary_mode();
        if self.reported == Some(now) {
            return;
        }
        self.reported = Some(now);
        let p = self.p.clone();
        // Only logged: nothing on the home screen is about it.
        tokio::task::spawn_local(async move {
            let r = match now {
                Some((w, h)) => p.display.report_primary_mode(w, h).await.map(|()| format!("{w}x{h}")),
                None => p.display.report_no_monitor().await.map(|()| "no monitor".to_string()),
            };
            match r {
                Ok(what) => tracing::info!("told rayosd the primary monitor: {what}"),
                Err(e) => tracing::warn!("telling rayosd the primary monitor: {e}"),
            }
        });
    }

    /// Asks rayosd to keep the console in graphics mode (fbcon off our screen) for as long as
    /// our connection lasts; rayosd puts it back to text when we are gone, however we ended.
    /// Once there is a monitor to hold.
    fn hold_console(&mut self) {
        if self.console_held || self.screen.canvases.is_empty() {
            return;
        }
        self.console_held = true;
        let p = self.p.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = p.display.hold_console().await {
                tracing::warn!("asking rayosd for the console's graphics mode: {e}; kernel text may show over the screen");
            }
        });
    }

    fn open_channel(&mut self, vm: &str) {
        if self.displays.contains_key(vm) || !self.opening.insert(vm.to_string()) {
            return;
        }
        let (p, tx, vm) = (self.p.clone(), self.tx.clone(), vm.to_string());
        tokio::task::spawn_local(async move {
            // rayosd may announce "running" a moment before the VMM's channel is there.
            let mut r = Err(String::new());
            for attempt in 0..5 {
                r = p.display.open_channel(&vm).await.map_err(|e| e.to_string()).and_then(|fd| Channel::new(&vm, fd.into()).map_err(|e| e.to_string()));
                if r.is_ok() || attempt == 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            match r {
                Ok(channel) => drop(tx.send(Ev::ChannelOpened { vm, channel })),
                Err(e) => {
                    tracing::warn!("opening the display channel of {vm}: {e}");
                    drop(tx.send(Ev::ChannelGone { vm, gen: u64::MAX, why: e }));
                }
            }
        });
    }

    fn sync_channels(&mut self) {
        let want: Vec<String> = self.vms.iter().filter(|v| v.has_display && matches!(v.state.as_str(), "running" | "paused")).map(|v| v.name.clone()).collect();
        for vm in want {
            self.open_channel(&vm);
        }
    }

    fn channel_opened(&mut self, vm: String, channel: Channel) {
        self.opening.remove(&vm);
        let channel = Arc::new(channel);
        self.next_gen += 1;
        let gen = self.next_gen;
        // SAFETY: the AsyncFd holds an Arc of the Channel, which owns the fd: it stays open and
        // the same for as long as the AsyncFd lives.
        let fd = match unsafe { AsyncFd::register_with_interest(channel.clone(), tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => return tracing::warn!("display channel of {vm}: {e}"),
        };
        if let Err(e) = channel.send_control(&ToVmm::Attach) {
            return tracing::warn!("display channel of {vm}: sending attach: {e}");
        }
        let tx = self.tx.clone();
        let name = vm.clone();
        tokio::task::spawn_local(async move {
            loop {
                let Ok(mut guard) = fd.readable().await else { break };
                loop {
                    match fd.get_ref().recv() {
                        Ok(Some(msg)) => {
                            if tx.send(Ev::Channel { vm: name.clone(), gen, msg }).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            guard.clear_ready();
                            break;
                        }
                        Err(e @ (RecvError::Closed { .. } | RecvError::Io { .. })) => {
                            let _ = tx.send(Ev::ChannelGone { vm: name.clone(), gen, why: e.to_string() });
                            return;
                        }
                        // A bad message is refused and the channel goes on.
                        Err(e) => tracing::warn!("{e}"),
                    }
                }
            }
        });
        tracing::info!("display channel of {vm} open");
        self.displays.insert(vm.clone(), VmDisplay { channel, gen, fb: None, mode: None, leds: Leds::default(), scalers: Vec::new() });
        if self.presented.as_deref() == Some(vm.as_str()) {
            self.show(&vm, true);
        }
    }

    fn show(&self, vm: &str, shown: bool) {
        if let Some(d) = self.displays.get(vm) {
            if let Err(e) = d.channel.send_control(&ToVmm::Shown { shown }) {
                tracing::warn!("display channel of {vm}: {e}");
            }
        }
    }

    fn rebuild_scalers(&mut self, vm: &str) {
        let sizes: Vec<(u32, u32)> = self.screen.canvases.iter().map(|c| (c.width, c.height)).collect();
        let Some(d) = self.displays.get_mut(vm) else { return };
        d.scalers = match (&d.fb, d.mode) {
            (Some(fb), Some(mode)) => sizes
                .iter()
                .map(|&(w, h)| Scaler::new(mode, fb.len() as u64, w, h).map_err(|e| tracing::warn!("{vm}: {e}")).ok())
                .collect(),
            _ => Vec::new(),
        };
    }

    /// The router's picture of the presented VM on the primary output.
    fn primary_transform(&self) -> Option<crate::present::Transform> {
        let vm = self.presented.as_ref()?;
        let d = self.displays.get(vm)?;
        match d.scalers.first() {
            Some(Some(s)) => Some(s.t),
            // No monitor: map onto a notional one of the guest's own size.
            _ if self.screen.canvases.is_empty() => d.mode.map(|m| crate::present::Transform::fit(m.width, m.height, m.width, m.height)),
            _ => None,
        }
    }

    /// Draws the whole current scene on every output.
    fn redraw(&mut self) {
        match self.presented.clone() {
            None => self.draw_home(),
            Some(vm) => self.draw_vm(&vm),
        }
        self.screen.mark_all();
    }

    fn draw_home(&mut self) {
        self.home.clock = crate::clock::format_utc(crate::clock::now_secs());
        let mut first = None;
        for c in &mut self.screen.canvases {
            let items = home::render(&self.home, &mut self.text, c);
            first.get_or_insert(items);
        }
        // One line per drawn item, for tests to compare with a screendump; only when it changed.
        if let Some(items) = first {
            let lines: Vec<String> = items.iter().map(|i| i.to_string()).collect();
            if lines != self.last_layout {
                for l in &lines {
                    println!("{l}");
                }
                self.last_layout = lines;
            }
        }
    }

    fn draw_vm(&mut self, vm: &str) {
        let d = self.displays.get(vm);
        // Where the picture went on the primary output, for tests to compare with a screendump.
        let line = match d.and_then(|d| d.scalers.first()?.as_ref()) {
            Some(s) => format!("compositor: layout present vm={vm} mode={}x{} x={} y={} w={} h={}", s.mode.width, s.mode.height, s.t.x0, s.t.y0, s.t.w, s.t.h),
            None => format!("compositor: layout present vm={vm} mode=none"),
        };
        if self.last_layout != [line.clone()] {
            println!("{line}");
            self.last_layout = vec![line];
        }
        for (i, c) in self.screen.canvases.iter_mut().enumerate() {
            match d.and_then(|d| Some((d.fb.as_ref()?, d.scalers.get(i)?.as_ref()?))) {
                Some((fb, s)) => s.compose_all(fb.as_slice(), c),
                None => {
                    // Starting, or its display is off: say so rather than show a stale picture.
                    c.fill(0);
                    let px = (c.height / 30).max(12);
                    let state = self.vms.iter().find(|v| v.name == vm).map_or("", |v| v.state.as_str());
                    let msg = if state == "running" { format!("{vm}: the display is off") } else { format!("{vm}: {state}…") };
                    let w = self.text.measure(&msg, px);
                    let at = self.text.draw(c, (c.width as i32 - w as i32) / 2, c.height as i32 / 2, px, rgb(0xa0, 0xa6, 0xb0), &msg);
                    let hint = "Ctrl+Alt+Home: back to the home screen";
                    let hw = self.text.measure(hint, px * 2 / 3);
                    self.text.draw(c, (c.width as i32 - hw as i32) / 2, at.y + at.h as i32 * 2, px * 2 / 3, rgb(0x70, 0x76, 0x80), hint);
                }
            }
        }
    }

    fn set_presented(&mut self, vm: Option<String>) {
        if vm == self.presented {
            return;
        }
        tracing::info!("presenting {}", vm.as_deref().unwrap_or("the home screen"));
        if let Some(old) = self.presented.take() {
            self.show(&old, false);
        }
        self.presented = vm.clone();
        let t = self.primary_transform();
        for a in self.router.present(vm.clone(), t) {
            self.act(a);
        }
        self.leds.send_replace(vm.as_ref().and_then(|v| self.displays.get(v)).map_or(Leds::default(), |d| d.leds));
        if let Some(vm) = &vm {
            self.show(vm, true);
            // Presenting a stopped VM starts it (rayosd does); its channel opens once it runs.
            self.open_channel_if_running(vm);
        }
        self.redraw();
    }

    fn open_channel_if_running(&mut self, vm: &str) {
        if self.vms.iter().any(|v| v.name == vm && v.has_display && matches!(v.state.as_str(), "running" | "paused")) {
            self.open_channel(vm);
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Send { vm, target, records } => {
                if let Some(d) = self.displays.get(&vm) {
                    if let Err(e) = d.channel.send_input(target, &records) {
                        tracing::debug!("input to {vm} lost: {e}");
                    }
                }
            }
            Action::GoHome => {
                self.set_presented(None);
                let p = self.p.clone();
                spawn_call(&self.tx, "going home".into(), async move { p.display.hide().await });
            }
            Action::Reboot => {
                tracing::info!("Ctrl+Alt+Del at home: rebooting");
                let p = self.p.clone();
                spawn_call(&self.tx, "reboot".into(), async move { p.control.reboot().await });
            }
            Action::HomeKey(code) => {
                let cmd = self.home.key(code);
                if let Some(cmd) = cmd {
                    self.home_command(cmd);
                }
                self.redraw();
            }
        }
    }

    fn home_command(&mut self, cmd: HomeCommand) {
        let p = self.p.clone();
        match cmd {
            HomeCommand::Present(vm) => {
                if let Some(v) = self.vms.iter().find(|v| v.name == vm && !v.has_display) {
                    self.home.message = format!("{} has no display", v.name);
                    return;
                }
                spawn_call(&self.tx, format!("showing {vm}"), async move { p.display.present(&vm).await });
            }
            HomeCommand::Start(vm) => spawn_call(&self.tx, format!("starting {vm}"), async move { p.vms.start_vm(&vm, false).await }),
            HomeCommand::Stop(vm) => spawn_call(&self.tx, format!("stopping {vm}"), async move { p.vms.stop_vm(&vm, false).await }),
            HomeCommand::PowerOff => spawn_call(&self.tx, "power off".into(), async move { p.control.power_off().await }),
            HomeCommand::Reboot => spawn_call(&self.tx, "reboot".into(), async move { p.control.reboot().await }),
        }
    }

    fn channel_msg(&mut self, vm: String, gen: u64, msg: Inbound) {
        let Some(d) = self.displays.get_mut(&vm) else { return };
        if d.gen != gen {
            return;
        }
        let presented = self.presented.as_deref() == Some(vm.as_str());
        match msg {
            Inbound::Framebuffer { fb, mode } => {
                d.fb = Some(fb);
                d.mode = mode;
                self.rebuild_scalers(&vm);
            }
            Inbound::Other(FromVmm::Mode { mode }) => {
                d.mode = mode;
                self.rebuild_scalers(&vm);
            }
            Inbound::Other(FromVmm::Damage { y0, y1 }) => {
                if presented {
                    let d = &self.displays[&vm];
                    if let Some(fb) = &d.fb {
                        for (i, s) in d.scalers.iter().enumerate() {
                            if let Some(s) = s {
                                let rows = s.compose_lines(fb.as_slice(), &mut self.screen.canvases[i], y0..y1);
                                self.screen.mark(i, rows);
                            }
                        }
                    }
                }
                return;
            }
            Inbound::Other(FromVmm::Leds(leds)) => {
                d.leds = leds;
                if presented {
                    self.leds.send_replace(d.leds);
                }
                return;
            }
            Inbound::Other(FromVmm::Framebuffer { .. }) => return,
        }
        if presented {
            let t = self.primary_transform();
            self.router.set_transform(t);
            self.redraw();
        }
    }

    fn pointer(&mut self, raw: devices::RawPointer) {
        let (w, h) = self.screen.primary_size();
        let r = PointerReport {
            dx: raw.dx,
            dy: raw.dy,
            abs: raw.abs.map(|(x, y)| ((x * f64::from(w - 1)).round() as i32, (y * f64::from(h - 1)).round() as i32)),
            buttons: raw.buttons,
            wheel: raw.wheel,
        };
        for a in self.router.pointer_report(&r) {
            self.act(a);
        }
    }

    fn handle(&mut self, ev: Ev, known_devices: &mut HashSet<PathBuf>) {
        match ev {
            Ev::Device(DeviceEvent::Key(k)) => {
                for a in self.router.key(k) {
                    self.act(a);
                }
            }
            Ev::Device(DeviceEvent::Pointer(p)) => self.pointer(p),
            Ev::Device(DeviceEvent::Gone(path)) => {
                known_devices.remove(&path);
                for a in self.router.device_gone() {
                    self.act(a);
                }
            }
            Ev::VmList(v) => {
                self.vms = v;
                self.home.set_vms(self.vms.iter().map(entry).collect());
                self.sync_channels();
                self.redraw();
            }
            Ev::VmState { name, state } => {
                let known = self.vms.iter_mut().find(|v| v.name == name).map(|v| v.state = state.clone()).is_some();
                self.home.set_state(&name, &state);
                if !known || state == "running" {
                    // A VM we have not heard of (created since), or a running one whose guest
                    // may have come up (the signal repeats the state then): fetch the list.
                    self.refresh_vms();
                }
                if matches!(state.as_str(), "running" | "paused") {
                    self.open_channel_if_running(&name);
                } else if let Some(d) = self.displays.remove(&name) {
                    // Its VMM is gone or going: the channel's reader ends on EOF by itself.
                    drop(d);
                    self.router.vm_gone(&name);
                }
                self.redraw();
            }
            Ev::Presented(vm) => self.set_presented((!vm.is_empty()).then_some(vm)),
            Ev::ChannelOpened { vm, channel } => self.channel_opened(vm, channel),
            Ev::Channel { vm, gen, msg } => self.channel_msg(vm, gen, msg),
            Ev::ChannelGone { vm, gen, why } => {
                self.opening.remove(&vm);
                if self.displays.get(&vm).is_some_and(|d| d.gen == gen) {
                    tracing::info!("{why}");
                    self.displays.remove(&vm);
                    self.router.vm_gone(&vm);
                    if self.presented.as_deref() == Some(vm.as_str()) {
                        self.redraw();
                    }
                }
            }
            Ev::Message(m) => {
                self.home.message = m;
                if self.presented.is_none() {
                    self.redraw();
                }
            }
        }
    }
}

/// Runs the compositor until SIGTERM/SIGINT. Must run inside a `LocalSet`.
pub async fn run(socket: PathBuf, dri: PathBuf, input: PathBuf) -> anyhow::Result<()> {
    let (dev_tx, dev_rx) = mpsc::unbounded_channel::<DeviceEvent>();
    run_with(socket, dri, input, dev_tx, dev_rx).await
}

/// `run`, with the input devices' channel made by the caller, so a test can type on it.
pub async fn run_with(
    socket: PathBuf,
    dri: PathBuf,
    input: PathBuf,
    dev_tx: mpsc::UnboundedSender<DeviceEvent>,
    mut dev_rx: mpsc::UnboundedReceiver<DeviceEvent>,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Ev>();
    let mut screen = Screen::default();
    screen.rescan(&dri);
    if screen.canvases.is_empty() {
        tracing::warn!("no connected monitor on any card in {}; looking again every 2 s", dri.display());
    }
    // From here on the screen is ours: a signal must end us through the drops that give it back.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let p = tokio::select! {
        p = connect(&socket) => Arc::new(p?),
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };

    // Signals first, then the state they update, so no change falls between.
    let mut states = p.vms.receive_vm_state_changed().await?;
    let mut presentations = p.display.receive_presentation_changed().await?;
    let status = p.control.status().await.ok();
    let machine_name = status.map(|s| s.machine_name).filter(|n| !n.is_empty()).or_else(|| nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok())).unwrap_or_else(|| "RayOS".into());
    let (w, h) = screen.primary_size();
    let mut app = App {
        p: p.clone(),
        tx: tx.clone(),
        home: Home { machine_name, ..Default::default() },
        text: Text::new(),
        router: Router::new(w, h),
        presented: None,
        vms: Vec::new(),
        displays: HashMap::new(),
        opening: HashSet::new(),
        next_gen: 0,
        screen,
        console_held: false,
        last_layout: Vec::new(),
        dri,
        leds: watch::channel(Leds::default()).0,
        reported: None,
    };
    app.hold_console();
    app.report_monitor();
    app.refresh_vms();
    {
        let (p, tx) = (p.clone(), tx.clone());
        tokio::task::spawn_local(async move {
            match p.display.presented().await {
                Ok(vm) => drop(tx.send(Ev::Presented(vm))),
                Err(e) => tracing::warn!("Presented(): {e}"),
            }
        });
    }
    app.redraw();

    let mut known_devices = HashSet::new();
    devices::scan(&input, &mut known_devices, &dev_tx, &app.leds.subscribe());
    let mut hotplug = tokio::time::interval(Duration::from_secs(2));
    hotplug.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let frame = Duration::from_millis(4);
    loop {
        let clock = tokio::time::sleep(crate::clock::until_next_minute(crate::clock::now_secs()));
        tokio::select! {
            biased;
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(d) = dev_rx.recv() => app.handle(Ev::Device(d), &mut known_devices),
            Some(ev) = rx.recv() => app.handle(ev, &mut known_devices),
            s = states.next() => {
                // The stream ends with the connection: rayosd went away; rayosd restarts us.
                let Some(s) = s else { anyhow::bail!("lost the connection to rayosd on {}", socket.display()) };
                match s.args() {
                    Ok(a) => app.handle(Ev::VmState { name: a.name.to_string(), state: a.state.to_string() }, &mut known_devices),
                    Err(e) => tracing::warn!("VmStateChanged: {e}"),
                }
            }
            s = presentations.next() => {
                let Some(s) = s else { anyhow::bail!("lost the connection to rayosd on {}", socket.display()) };
                match s.args() {
                    Ok(a) => app.handle(Ev::Presented(a.vm.to_string()), &mut known_devices),
                    Err(e) => tracing::warn!("PresentationChanged: {e}"),
                }
            }
            _ = tokio::time::sleep(frame), if app.screen.busy() => app.screen.flush(),
            _ = hotplug.tick() => {
                devices::scan(&input, &mut known_devices, &dev_tx, &app.leds.subscribe());
                let dri = app.dri.clone();
                if app.screen.rescan(&dri) {
                    app.report_monitor();
                    let (w, h) = app.screen.primary_size();
                    app.router.set_output(w, h);
                    app.hold_console();
                    let names: Vec<String> = app.displays.keys().cloned().collect();
                    for vm in names {
                        app.rebuild_scalers(&vm);
                    }
                    let t = app.primary_transform();
                    app.router.set_transform(t);
                    app.redraw();
                }
            }
            _ = clock, if app.presented.is_none() => {
                app.redraw();
            }
        }
        if app.screen.busy() {
            app.screen.flush();
        }
    }
    tracing::info!("exiting: giving the console back");
    // Hide the VM we showed (it stops tracking damage) and let go of the screen.
    if let Some(vm) = app.presented.clone() {
        app.show(&vm, false);
    }
    drop(app);
    Ok(())
}
