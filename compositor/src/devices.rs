//! Keyboards and pointers, read straight from evdev (no udevd, so no ID_INPUT_* properties:
//! the device's own capability bits say what it is), grabbed exclusively once no key is held.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use evdev::{AbsoluteAxisCode, Device, EventType, InputEvent, KeyCode, LedCode, RelativeAxisCode};
use rayos_proto::display::ev;
use tokio::sync::{mpsc, watch};

use crate::route::KeyEvent;

/// What a device is good for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Class {
    pub keyboard: bool,
    /// REL_X + REL_Y with a button.
    pub relative: bool,
    /// ABS_X + ABS_Y with a button or touch.
    pub absolute: bool,
    /// An absolute device that is a touchpad (a finger tool, not a direct-touch screen): it
    /// moves the pointer relatively, like a mouse.
    pub touchpad: bool,
}

impl Class {
    pub fn any(self) -> bool {
        self.keyboard || self.relative || self.absolute
    }
}

/// Classifies from capability bits: a keyboard has the letters or Enter (a power button or a
/// headset's volume keys are not one); a pointer has both axes and something to click.
pub fn classify(keys: &HashSet<u16>, rel: &HashSet<u16>, abs: &HashSet<u16>, direct: bool) -> Class {
    let letters = (KeyCode::KEY_Q.0..=KeyCode::KEY_P.0).chain(KeyCode::KEY_A.0..=KeyCode::KEY_L.0).chain(KeyCode::KEY_Z.0..=KeyCode::KEY_M.0);
    let keyboard = keys.contains(&KeyCode::KEY_ENTER.0) || letters.into_iter().any(|k| keys.contains(&k));
    let click = keys.contains(&ev::BTN_LEFT) || keys.contains(&KeyCode::BTN_TOUCH.0);
    let absolute = click && abs.contains(&ev::ABS_X) && abs.contains(&ev::ABS_Y);
    Class {
        keyboard,
        relative: click && rel.contains(&ev::REL_X) && rel.contains(&ev::REL_Y),
        absolute,
        touchpad: absolute && !direct && keys.contains(&KeyCode::BTN_TOOL_FINGER.0),
    }
}

/// The keyboard LEDs the presented VM set (all off at home).
pub use rayos_proto::display::Leds;

/// `leds` as the events that set them on a physical keyboard.
fn led_events(leds: Leds) -> [InputEvent; 3] {
    let e = |code: LedCode, on: bool| InputEvent::new(EventType::LED.0, code.0, i32::from(on));
    [e(LedCode::LED_NUML, leds.num), e(LedCode::LED_CAPSL, leds.caps), e(LedCode::LED_SCROLLL, leds.scroll)]
}

/// A pointer report before it is mapped onto an output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawPointer {
    pub dx: i32,
    pub dy: i32,
    /// An absolute position as a fraction of the device's range (0.0..=1.0).
    pub abs: Option<(f64, f64)>,
    pub buttons: Vec<(u16, bool)>,
    pub wheel: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DeviceEvent {
    Key(KeyEvent),
    Pointer(RawPointer),
    /// The device went away (unplugged) or failed.
    Gone(PathBuf),
}

/// Turns a device's events into key events and whole pointer reports (up to SYN_REPORT).
#[derive(Debug, Default)]
pub struct Assembler {
    /// (min, max) of ABS_X and ABS_Y.
    ranges: Option<((i32, i32), (i32, i32))>,
    pending: RawPointer,
    abs: (Option<i32>, Option<i32>),
    last_abs: (i32, i32),
    /// A touchpad: finger motion becomes relative motion.
    touchpad: bool,
    touching: bool,
    /// The finger's last position in this touch (None right after it lands).
    finger: Option<(i32, i32)>,
}

/// How far (in output pixels) a finger sliding across a whole touchpad moves the pointer.
const TOUCHPAD_TRAVEL: i64 = 1600;

fn frac(v: i32, (min, max): (i32, i32)) -> f64 {
    if max <= min {
        return 0.0;
    }
    ((f64::from(v) - f64::from(min)) / (f64::from(max) - f64::from(min))).clamp(0.0, 1.0)
}

impl Assembler {
    pub fn new(ranges: Option<((i32, i32), (i32, i32))>) -> Self {
        Self { ranges, ..Default::default() }
    }

    pub fn touchpad(ranges: ((i32, i32), (i32, i32))) -> Self {
        Self { ranges: Some(ranges), touchpad: true, ..Default::default() }
    }

    /// A touchpad's report: the finger's travel since the last report, in pixels.
    fn finger_motion(&mut self) {
        let Some(((x0, x1), (y0, y1))) = self.ranges else { return };
        let now = (self.abs.0.unwrap_or(self.last_abs.0), self.abs.1.unwrap_or(self.last_abs.1));
        self.last_abs = now;
        if !self.touching {
            self.finger = None;
            return;
        }
        if let Some((fx, fy)) = self.finger {
            // Same scale on both axes (the wider side spans TOUCHPAD_TRAVEL) so motion is not skewed.
            let span = i64::from((x1 - x0).max(y1 - y0).max(1));
            self.pending.dx += (i64::from(now.0 - fx) * TOUCHPAD_TRAVEL / span) as i32;
            self.pending.dy += (i64::from(now.1 - fy) * TOUCHPAD_TRAVEL / span) as i32;
        }
        self.finger = Some(now);
    }

    pub fn feed(&mut self, kind: u16, code: u16, value: i32) -> Option<DeviceEvent> {
        match kind {
            ev::EV_KEY if (0x100..0x160).contains(&code) => {
                if code == KeyCode::BTN_TOUCH.0 && self.touchpad {
                    // On a touchpad a touch moves the pointer; clicking is the pad's button.
                    self.touching = value != 0;
                    return None;
                }
                // Buttons: a touch (on a screen or tablet) is a left click; other tool bits are not buttons.
                let code = if code == KeyCode::BTN_TOUCH.0 { ev::BTN_LEFT } else { code };
                if [ev::BTN_LEFT, ev::BTN_RIGHT, ev::BTN_MIDDLE].contains(&code) && value != 2 {
                    self.pending.buttons.push((code, value != 0));
                }
                None
            }
            ev::EV_KEY => Some(DeviceEvent::Key(KeyEvent { code, value })),
            ev::EV_REL => {
                match code {
                    ev::REL_X => self.pending.dx += value,
                    ev::REL_Y => self.pending.dy += value,
                    ev::REL_WHEEL => self.pending.wheel += value,
                    _ => {}
                }
                None
            }
            ev::EV_ABS => {
                match code {
                    ev::ABS_X => self.abs.0 = Some(value),
                    ev::ABS_Y => self.abs.1 = Some(value),
                    _ => {}
                }
                None
            }
            ev::EV_SYN if code == ev::SYN_REPORT && self.touchpad => {
                self.finger_motion();
                self.abs = (None, None);
                let r = std::mem::take(&mut self.pending);
                (r != RawPointer::default()).then_some(DeviceEvent::Pointer(r))
            }
            ev::EV_SYN if code == ev::SYN_REPORT => {
                if let (Some((rx, ry)), true) = (self.ranges, self.abs.0.is_some() || self.abs.1.is_some()) {
                    // An axis that did not move keeps its last value.
                    self.last_abs = (self.abs.0.unwrap_or(self.last_abs.0), self.abs.1.unwrap_or(self.last_abs.1));
                    self.pending.abs = Some((frac(self.last_abs.0, rx), frac(self.last_abs.1, ry)));
                }
                self.abs = (None, None);
                let r = std::mem::take(&mut self.pending);
                (r != RawPointer::default()).then_some(DeviceEvent::Pointer(r))
            }
            _ => None,
        }
    }
}

fn capabilities(d: &Device) -> Class {
    let keys = d.supported_keys().map(|k| k.iter().map(|c| c.0).collect()).unwrap_or_default();
    let rel = d.supported_relative_axes().map(|k| k.iter().map(|c: RelativeAxisCode| c.0).collect()).unwrap_or_default();
    let abs = d.supported_absolute_axes().map(|k| k.iter().map(|c: AbsoluteAxisCode| c.0).collect()).unwrap_or_default();
    classify(&keys, &rel, &abs, d.properties().contains(evdev::PropType::DIRECT))
}

fn abs_ranges(d: &Device) -> Option<((i32, i32), (i32, i32))> {
    let (mut x, mut y) = (None, None);
    for (code, info) in d.get_absinfo().ok()? {
        match code {
            AbsoluteAxisCode::ABS_X => x = Some((info.minimum(), info.maximum())),
            AbsoluteAxisCode::ABS_Y => y = Some((info.minimum(), info.maximum())),
            _ => {}
        }
    }
    Some((x?, y?))
}

/// Reads one device until it goes away: waits until none of its keys is held (grabbing with a
/// key down would leave that key stuck down for whoever had it), grabs it, then forwards.
async fn run_device(path: PathBuf, mut dev: Device, class: Class, tx: mpsc::UnboundedSender<DeviceEvent>, mut leds: watch::Receiver<Leds>) {
    let has_leds = class.keyboard && dev.supported_leds().is_some_and(|l| l.contains(LedCode::LED_CAPSL));
    let name = dev.name().unwrap_or("?").to_string();
    loop {
        match dev.get_key_state() {
            Ok(held) if held.iter().next().is_some() => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!("{}: reading its key state: {e}", path.display());
                let _ = tx.send(DeviceEvent::Gone(path));
                return;
            }
        }
    }
    if let Err(e) = dev.grab() {
        tracing::warn!("{} ({name}): EVIOCGRAB: {e}; not using it", path.display());
        let _ = tx.send(DeviceEvent::Gone(path));
        return;
    }
    tracing::info!("{} ({name}): grabbed as {class:?}", path.display());
    let ranges = if class.absolute { abs_ranges(&dev) } else { None };
    let mut asm = match ranges {
        Some(r) if class.touchpad => Assembler::touchpad(r),
        r => Assembler::new(r),
    };
    let mut stream = match dev.into_event_stream() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("{}: {e}", path.display());
            let _ = tx.send(DeviceEvent::Gone(path));
            return;
        }
    };
    if has_leds {
        let now = *leds.borrow_and_update();
        if let Err(e) = stream.device_mut().send_events(&led_events(now)) {
            tracing::debug!("{}: setting LEDs: {e}", path.display());
        }
    }
    loop {
        let next = tokio::select! {
            e = stream.next_event() => e,
            Ok(()) = leds.changed(), if has_leds => {
                let now = *leds.borrow_and_update();
                if let Err(e) = stream.device_mut().send_events(&led_events(now)) {
                    tracing::debug!("{}: setting LEDs: {e}", path.display());
                }
                continue;
            }
        };
        match next {
            Ok(e) => {
                if e.event_type() == EventType::KEY && !class.keyboard && e.code() < 0x100 {
                    continue;
                }
                if let Some(out) = asm.feed(e.event_type().0, e.code(), e.value()) {
                    if tx.send(out).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::info!("{} ({name}): {e}; dropped", path.display());
                let _ = tx.send(DeviceEvent::Gone(path));
                return;
            }
        }
    }
}

/// Opens every keyboard and pointer under `dir` not already in `known`, each read by its own task.
pub fn scan(dir: &Path, known: &mut HashSet<PathBuf>, tx: &mpsc::UnboundedSender<DeviceEvent>, leds: &watch::Receiver<Leds>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("event")) || known.contains(&path) {
            continue;
        }
        let dev = match Device::open(&path) {
            Ok(d) => d,
            Err(err) => {
                tracing::debug!("{}: {err}", path.display());
                continue;
            }
        };
        let class = capabilities(&dev);
        known.insert(path.clone());
        if !class.any() {
            continue;
        }
        tokio::spawn(run_device(path, dev, class, tx.clone(), leds.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u16]) -> HashSet<u16> {
        v.iter().copied().collect()
    }

    #[test]
    fn devices_are_classified_by_their_capability_bits() {
        let kb = classify(&set(&[KeyCode::KEY_A.0, KeyCode::KEY_ENTER.0, KeyCode::KEY_LEFTCTRL.0]), &set(&[]), &set(&[]), false);
        assert_eq!(kb, Class { keyboard: true, ..Default::default() });
        let power = classify(&set(&[KeyCode::KEY_POWER.0]), &set(&[]), &set(&[]), false);
        assert!(!power.any(), "a power button is not a keyboard");
        let mouse = classify(&set(&[ev::BTN_LEFT, ev::BTN_RIGHT]), &set(&[ev::REL_X, ev::REL_Y, ev::REL_WHEEL]), &set(&[]), false);
        assert_eq!(mouse, Class { relative: true, ..Default::default() });
        let tablet = classify(&set(&[ev::BTN_LEFT]), &set(&[]), &set(&[ev::ABS_X, ev::ABS_Y]), false);
        assert_eq!(tablet, Class { absolute: true, ..Default::default() });
        let touch = classify(&set(&[KeyCode::BTN_TOUCH.0, KeyCode::BTN_TOOL_FINGER.0]), &set(&[]), &set(&[ev::ABS_X, ev::ABS_Y]), true);
        assert!(touch.absolute && !touch.touchpad, "a touchscreen is direct");
        let pad = classify(&set(&[KeyCode::BTN_TOUCH.0, KeyCode::BTN_TOOL_FINGER.0, ev::BTN_LEFT]), &set(&[]), &set(&[ev::ABS_X, ev::ABS_Y]), false);
        assert!(pad.touchpad);
        let accel = classify(&set(&[]), &set(&[]), &set(&[ev::ABS_X, ev::ABS_Y]), false);
        assert!(!accel.any(), "axes with nothing to click are not a pointer");
    }

    #[test]
    fn pointer_events_are_gathered_into_one_report_per_syn() {
        let mut a = Assembler::new(Some(((0, 32767), (0, 32767))));
        assert_eq!(a.feed(ev::EV_ABS, ev::ABS_X, 32767), None);
        assert_eq!(a.feed(ev::EV_KEY, KeyCode::BTN_TOUCH.0, 1), None);
        let Some(DeviceEvent::Pointer(r)) = a.feed(ev::EV_SYN, ev::SYN_REPORT, 0) else { panic!() };
        assert_eq!(r.abs, Some((1.0, 0.0)));
        assert_eq!(r.buttons, vec![(ev::BTN_LEFT, true)]);
        // Y alone moves: X keeps its last value.
        a.feed(ev::EV_ABS, ev::ABS_Y, 16383);
        let Some(DeviceEvent::Pointer(r)) = a.feed(ev::EV_SYN, ev::SYN_REPORT, 0) else { panic!() };
        assert_eq!(r.abs.map(|(x, y)| (x, (y * 100.0).round())), Some((1.0, 50.0)));
        // An empty report is nothing.
        assert_eq!(a.feed(ev::EV_SYN, ev::SYN_REPORT, 0), None);
        // Keys pass through with their value (autorepeat is the router's to drop).
        assert_eq!(a.feed(ev::EV_KEY, KeyCode::KEY_A.0, 2), Some(DeviceEvent::Key(KeyEvent { code: KeyCode::KEY_A.0, value: 2 })));
        let mut m = Assembler::new(None);
        m.feed(ev::EV_REL, ev::REL_X, 3);
        m.feed(ev::EV_REL, ev::REL_X, 4);
        m.feed(ev::EV_REL, ev::REL_WHEEL, -1);
        assert_eq!(m.feed(ev::EV_SYN, ev::SYN_REPORT, 0), Some(DeviceEvent::Pointer(RawPointer { dx: 7, wheel: -1, ..Default::default() })));
    }

    #[test]
    fn a_touchpad_moves_the_pointer_relatively_and_a_touch_is_not_a_click() {
        let mut a = Assembler::touchpad(((0, 3199), (0, 1999)));
        let mut report = |events: &[(u16, u16, i32)]| {
            let mut out = None;
            for &(k, c, v) in events {
                out = a.feed(k, c, v);
            }
            out
        };
        // The finger lands: no jump to where it landed, and no click.
        assert_eq!(report(&[(ev::EV_KEY, KeyCode::BTN_TOUCH.0, 1), (ev::EV_ABS, ev::ABS_X, 3000), (ev::EV_ABS, ev::ABS_Y, 1000), (ev::EV_SYN, ev::SYN_REPORT, 0)]), None);
        // Sliding a fifth of the width (640 units of 3200) moves 320 px, down the same scale.
        let Some(DeviceEvent::Pointer(r)) = report(&[(ev::EV_ABS, ev::ABS_X, 2360), (ev::EV_ABS, ev::ABS_Y, 1200), (ev::EV_SYN, ev::SYN_REPORT, 0)]) else { panic!() };
        assert_eq!((r.dx, r.dy, r.abs, r.buttons.len()), (-320, 100, None, 0));
        // Lifted and put down elsewhere: no motion from the jump.
        report(&[(ev::EV_KEY, KeyCode::BTN_TOUCH.0, 0), (ev::EV_SYN, ev::SYN_REPORT, 0)]);
        assert_eq!(report(&[(ev::EV_KEY, KeyCode::BTN_TOUCH.0, 1), (ev::EV_ABS, ev::ABS_X, 100), (ev::EV_SYN, ev::SYN_REPORT, 0)]), None);
        // The pad's button clicks.
        let Some(DeviceEvent::Pointer(r)) = report(&[(ev::EV_KEY, ev::BTN_LEFT, 1), (ev::EV_SYN, ev::SYN_REPORT, 0)]) else { panic!() };
        assert_eq!(r.buttons, vec![(ev::BTN_LEFT, true)]);
    }
}
