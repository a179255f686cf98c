use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::chain::{parse_chain, read_segments, total_len, write_segments, DeviceQueue};
use super::super::worker::{drain, EpollCtl, Worker, WorkerHandler};
use super::super::{device_type, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt};
use crate::devices::pci::lock;
use crate::devices::GuestMemory;

const QUEUE_SIZES: &[u16] = &[64, 64];
/// Events waiting for guest buffers beyond this are dropped (oldest first): a guest that
/// stopped reading input must not grow the VMM without bound.
const MAX_PENDING: usize = 4096;

// Config selectors (5.8.5).
const CFG_ID_NAME: u8 = 0x01;
const CFG_ID_SERIAL: u8 = 0x02;
const CFG_ID_DEVIDS: u8 = 0x03;
const CFG_PROP_BITS: u8 = 0x10;
const CFG_EV_BITS: u8 = 0x11;
const CFG_ABS_INFO: u8 = 0x12;

// evdev constants (linux/input-event-codes.h).
pub const EV_SYN: u16 = 0x00;
pub const EV_KEY: u16 = 0x01;
pub const EV_REL: u16 = 0x02;
pub const EV_ABS: u16 = 0x03;
pub const EV_MSC: u16 = 0x04;
pub const EV_LED: u16 = 0x11;
pub const EV_REP: u16 = 0x14;
pub const ABS_X: u16 = 0x00;
pub const ABS_Y: u16 = 0x01;
pub const REL_WHEEL: u16 = 0x08;
pub const BTN_LEFT: u16 = 0x110;
pub const BTN_RIGHT: u16 = 0x111;
pub const BTN_MIDDLE: u16 = 0x112;
/// Absolute axes span 0..=ABS_MAX; the compositor scales its pointer position to it.
pub const ABS_MAX: u32 = 32767;
const BUS_VIRTUAL: u16 = 0x06;

/// The key codes the keyboard announces (the guest ignores others): KEY_ESC (1) to
/// KEY_MICMUTE (248), and KEY_OK (0x160) to the braille keys (0x1ff), what media and laptop
/// keyboards send. Not 0x200 and up: that range holds gamepad buttons (BTN_DPAD_*,
/// BTN_TRIGGER_HAPPY*), which would make udev take the keyboard for a joystick.
pub const KEYBOARD_KEYS: [std::ops::RangeInclusive<u16>; 2] = [1..=248, 0x160..=0x1ff];

/// Which device this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    Keyboard,
    /// Absolute pointer with three buttons and a wheel.
    Tablet,
}

/// One evdev event as virtio-input carries it (struct virtio_input_event): the display
/// channel's wire record, so the compositor's input reaches the queue without conversion.
pub use rayos_proto::display::InputRecord as InputEvent;

/// The keyboard LEDs as the guest last set them (EV_LED on the status queue).
pub use rayos_proto::display::Leds;

struct Pending {
    events: Mutex<VecDeque<InputEvent>>,
    wake: EventFd,
    leds: Mutex<Leds>,
    /// Written when the guest changes an LED (the display channel waits on it).
    leds_changed: EventFd,
}

/// Handle for pushing input into the guest; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct InputInjector {
    pending: Arc<Pending>,
}

impl InputInjector {
    /// Queue `events` (end each group with [`InputEvent::syn`]). They reach the guest as soon
    /// as it has buffers; events beyond a backlog of 4096 drop the oldest.
    pub fn inject(&self, events: &[InputEvent]) {
        let mut q = lock(&self.pending.events);
        for e in events {
            if q.len() >= MAX_PENDING {
                q.pop_front();
            }
            q.push_back(*e);
        }
        drop(q);
        if let Err(e) = self.pending.wake.write(1) {
            warn!(%e, "virtio-input: cannot wake the device");
        }
    }

    /// The LEDs as the guest last set them.
    pub fn leds(&self) -> Leds {
        *lock(&self.pending.leds)
    }

    /// Becomes readable when the guest changes an LED; read it (8 bytes) to re-arm.
    pub fn leds_changed(&self) -> &EventFd {
        &self.pending.leds_changed
    }

    /// What is waiting for guest buffers, oldest first.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> Vec<InputEvent> {
        lock(&self.pending.events).iter().copied().collect()
    }
}

/// A virtio-input keyboard or tablet.
pub struct VirtioInput {
    kind: InputKind,
    name: String,
    select: u8,
    subsel: u8,
    pending: Arc<Pending>,
    worker: Option<Worker>,
}

fn bitmap(bits: &[u16]) -> Vec<u8> {
    let len = bits.iter().map(|b| usize::from(*b) / 8 + 1).max().unwrap_or(0);
    let mut m = vec![0u8; len];
    for b in bits {
        m[usize::from(*b) / 8] |= 1 << (b % 8);
    }
    m
}

impl VirtioInput {
    /// A device named `name` (what the guest shows, e.g. "RayOS Keyboard"); the injector
    /// feeds it.
    pub fn new(kind: InputKind, name: &str) -> std::io::Result<(Self, InputInjector)> {
        let pending = Arc::new(Pending {
            events: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            leds: Mutex::new(Leds::default()),
            leds_changed: EventFd::new(EFD_NONBLOCK)?,
        });
        let injector = InputInjector { pending: pending.clone() };
        let mut name = name.to_owned();
        name.truncate(128);
        Ok((Self { kind, name, select: 0, subsel: 0, pending, worker: None }, injector))
    }

    /// The answer to the current select/subsel (at most 128 bytes).
    fn config_payload(&self) -> Vec<u8> {
        match (self.select, self.subsel) {
            (CFG_ID_NAME, 0) => self.name.as_bytes().to_vec(),
            (CFG_ID_SERIAL, 0) => b"rayos-input".to_vec(),
            (CFG_ID_DEVIDS, 0) => {
                let product: u16 = match self.kind {
                    InputKind::Keyboard => 1,
                    InputKind::Tablet => 3,
                };
                [BUS_VIRTUAL, 0x0627, product, 1].iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            (CFG_PROP_BITS, 0) => Vec::new(),
            (CFG_EV_BITS, ev) => self.ev_bits(u16::from(ev)),
            (CFG_ABS_INFO, axis) if self.kind == InputKind::Tablet && matches!(u16::from(axis), ABS_X | ABS_Y) => {
                // min, max, fuzz, flat, res
                [0, ABS_MAX, 0, 0, 0].iter().flat_map(|v: &u32| v.to_le_bytes()).collect()
            }
            _ => Vec::new(),
        }
    }

    fn ev_bits(&self, ev: u16) -> Vec<u8> {
        match (self.kind, ev) {
            (InputKind::Keyboard, EV_KEY) => bitmap(&KEYBOARD_KEYS.into_iter().flatten().collect::<Vec<u16>>()),
            // Num, Caps and Scroll Lock LEDs.
            (InputKind::Keyboard, EV_LED) => bitmap(&[0, 1, 2]),
            // Non-empty so the guest enables software autorepeat.
            (InputKind::Keyboard, EV_REP) => vec![0],
            (InputKind::Tablet, EV_KEY) => bitmap(&[BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]),
            (InputKind::Tablet, EV_ABS) => bitmap(&[ABS_X, ABS_Y]),
            (InputKind::Tablet, EV_REL) => bitmap(&[REL_WHEEL]),
            _ => Vec::new(),
        }
    }
}

struct InputWorker {
    mem: GuestMemory,
    irq: Arc<dyn VirtioInterrupt>,
    eventq: DeviceQueue,
    statusq: DeviceQueue,
    kicks: Vec<EventFd>,
    pending: Arc<Pending>,
}

impl InputWorker {
    fn deliver(&mut self) {
        let mem = self.mem.clone();
        let mut sent = false;
        loop {
            let Some(ev) = lock(&self.pending.events).front().copied() else { break };
            let Some(chain) = self.eventq.pop(&mem, &*self.irq) else { break };
            let p = parse_chain(chain, &mem);
            let n = if p.error.is_none() && total_len(&p.writable) >= 8 {
                lock(&self.pending.events).pop_front();
                write_segments(&mem, &p.writable, 0, &ev.to_bytes())
            } else {
                crate::ratelimit::guest_warn!("virtio-input: event buffer unusable; skipped");
                0
            };
            self.eventq.add_used(&mem, p.head, n as u32, &*self.irq);
            sent = true;
        }
        if sent {
            self.eventq.notify(&mem, &*self.irq);
        }
    }

    fn status(&mut self) {
        let mem = self.mem.clone();
        while let Some(chain) = self.statusq.pop(&mem, &*self.irq) {
            let p = parse_chain(chain, &mem);
            let mut b = [0u8; 8];
            if p.error.is_none() && read_segments(&mem, &p.readable, 0, &mut b) == 8 {
                let ev = InputEvent::from_bytes(b);
                debug!(kind = ev.kind, code = ev.code, value = ev.value, "virtio-input status event");
                if ev.kind == EV_LED {
                    let mut leds = lock(&self.pending.leds);
                    let before = *leds;
                    if leds.set(ev.code, ev.value != 0) && *leds != before {
                        drop(leds);
                        let _ = self.pending.leds_changed.write(1);
                    }
                }
            }
            self.statusq.add_used(&mem, p.head, 0, &*self.irq);
        }
        self.statusq.notify(&mem, &*self.irq);
    }
}

impl WorkerHandler for InputWorker {
    fn handle(&mut self, token: u64, _events: EventSet, _ctl: &EpollCtl<'_>) {
        match token {
            0 => {
                drain(&self.kicks[0]);
                self.deliver();
            }
            1 => {
                drain(&self.kicks[1]);
                self.status();
            }
            _ => {
                // Host input to deliver, not a sign of guest progress: not counted as a kick.
                let _ = self.pending.wake.read();
                self.deliver();
            }
        }
    }
}

impl VirtioDevice for VirtioInput {
    fn device_type(&self) -> u32 {
        device_type::INPUT
    }
    fn name(&self) -> &'static str {
        match self.kind {
            InputKind::Keyboard => "virtio-keyboard",
            InputKind::Tablet => "virtio-tablet",
        }
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn pci_class(&self) -> u32 {
        0x09_80_00
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let payload = self.config_payload();
        let mut img = [0u8; 136];
        img[0] = self.select;
        img[1] = self.subsel;
        img[2] = payload.len().min(128) as u8;
        let n = payload.len().min(128);
        img[8..8 + n].copy_from_slice(&payload[..n]);
        for (i, d) in data.iter_mut().enumerate() {
            *d = img.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            match offset + i as u64 {
                0 => self.select = *b,
                1 => self.subsel = *b,
                _ => {}
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let name = self.name();
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive { device: name });
        }
        ctx.expect_queues(name, 2)?;
        // Input from before the driver was ready is stale (keys would appear stuck).
        lock(&self.pending.events).clear();
        let mut it = ctx.queues.into_iter();
        let (e, s) = (it.next().expect("two queues"), it.next().expect("two queues"));
        let fds = [(e.event.as_raw_fd(), 0), (s.event.as_raw_fd(), 1), (self.pending.wake.as_raw_fd(), 2)];
        let w = InputWorker {
            mem: ctx.mem,
            irq: ctx.interrupt,
            eventq: DeviceQueue::new(e.queue, 0),
            statusq: DeviceQueue::new(s.queue, 1),
            kicks: vec![e.event, s.event],
            pending: self.pending.clone(),
        };
        self.worker = Some(Worker::spawn(name, &fds, w).map_err(|source| ActivateError::Worker { device: name, source })?);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "select": self.select, "subsel": self.subsel })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let byte = |k: &str| state.get(k).and_then(|v| v.as_u64()).and_then(|v| u8::try_from(v).ok());
        self.select = byte("select").ok_or("virtio-input state: select")?;
        self.subsel = byte("subsel").ok_or("virtio-input state: subsel")?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
