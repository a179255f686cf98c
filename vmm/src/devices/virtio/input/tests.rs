use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::features::VERSION_1;
use crate::devices::virtio::testing::{guest_mem, RecordingIrq, Rings};

fn cfg(dev: &mut VirtioInput, select: u8, subsel: u8) -> Vec<u8> {
    dev.write_config(0, &[select]);
    dev.write_config(1, &[subsel]);
    let mut size = [0u8; 1];
    dev.read_config(2, &mut size);
    let mut data = vec![0u8; usize::from(size[0])];
    dev.read_config(8, &mut data);
    data
}

fn bit(map: &[u8], b: u16) -> bool {
    map.get(usize::from(b / 8)).is_some_and(|x| x & (1 << (b % 8)) != 0)
}

#[test]
fn keyboard_config_describes_keys_leds_and_repeat() {
    let (mut kbd, _inj) = VirtioInput::new(InputKind::Keyboard, "RayOS Keyboard").unwrap();
    assert_eq!(cfg(&mut kbd, CFG_ID_NAME, 0), b"RayOS Keyboard");
    let keys = cfg(&mut kbd, CFG_EV_BITS, EV_KEY as u8);
    assert!(bit(&keys, 1) && bit(&keys, 30) && bit(&keys, 248), "KEY_ESC, KEY_A, KEY_MICMUTE");
    assert!(bit(&keys, 0x160) && bit(&keys, 0x1ff), "KEY_OK .. the last braille key");
    assert!(!bit(&keys, 0) && !bit(&keys, BTN_LEFT));
    assert!(!bit(&keys, 0x220) && !bit(&keys, 0x2c0), "no gamepad buttons (BTN_DPAD_UP, BTN_TRIGGER_HAPPY1)");
    assert!(bit(&cfg(&mut kbd, CFG_EV_BITS, EV_LED as u8), 1), "caps lock LED");
    assert_eq!(cfg(&mut kbd, CFG_EV_BITS, EV_REP as u8).len(), 1);
    assert!(cfg(&mut kbd, CFG_EV_BITS, EV_ABS as u8).is_empty());
    assert_eq!(cfg(&mut kbd, CFG_ID_DEVIDS, 0)[0..2], [6, 0], "BUS_VIRTUAL");
    assert!(cfg(&mut kbd, 0x7f, 0).is_empty(), "unknown selector: size 0");
}

#[test]
fn tablet_config_describes_absolute_axes_and_buttons() {
    let (mut tab, _inj) = VirtioInput::new(InputKind::Tablet, "RayOS Tablet").unwrap();
    let abs = cfg(&mut tab, CFG_EV_BITS, EV_ABS as u8);
    assert!(bit(&abs, ABS_X) && bit(&abs, ABS_Y));
    let keys = cfg(&mut tab, CFG_EV_BITS, EV_KEY as u8);
    assert!(bit(&keys, BTN_LEFT) && bit(&keys, BTN_RIGHT) && bit(&keys, BTN_MIDDLE));
    assert!(bit(&cfg(&mut tab, CFG_EV_BITS, EV_REL as u8), REL_WHEEL));
    let info = cfg(&mut tab, CFG_ABS_INFO, ABS_X as u8);
    assert_eq!(info.len(), 20);
    assert_eq!(u32::from_le_bytes(info[4..8].try_into().unwrap()), ABS_MAX);
    assert!(cfg(&mut tab, CFG_ABS_INFO, 5).is_empty(), "no such axis");
}

#[test]
fn injected_events_reach_the_event_queue_in_order() {
    let mem = guest_mem();
    let (mut kbd, inj) = VirtioInput::new(InputKind::Keyboard, "kbd").unwrap();
    let rings = Rings::new(&mem, 2, 16);
    let irq = Arc::new(RecordingIrq::default());
    kbd.activate(rings.context(&mem, irq.clone(), VERSION_1)).unwrap();
    // Three buffers for four events: the fourth waits for a buffer.
    for i in 0..3u16 {
        let d = RawDescriptor::from(Descriptor::new(0x10_0000 + u64::from(i) * 8, 8, VRING_DESC_F_WRITE as u16, 0));
        rings.add_desc_chains(0, &[d], i);
    }
    rings.kick(0);
    let a_down = InputEvent::key(30, true);
    let a_up = InputEvent::key(30, false);
    inj.inject(&[a_down, InputEvent::syn(), a_up, InputEvent::syn()]);
    assert!(rings.wait_used(&mem, 0, 3));
    let read = |i: u64| {
        let b: [u8; 8] = mem.read_obj(GuestAddress(0x10_0000 + i * 8)).unwrap();
        InputEvent {
            kind: u16::from_le_bytes([b[0], b[1]]),
            code: u16::from_le_bytes([b[2], b[3]]),
            value: u32::from_le_bytes(b[4..8].try_into().unwrap()),
        }
    };
    assert_eq!([read(0), read(1), read(2)], [a_down, InputEvent::syn(), a_up]);
    assert_eq!(rings.used_elem(&mem, 0, 0), (0, 8));
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(rings.used_idx(&mem, 0), 3, "no buffer for the fourth event yet");
    let d = RawDescriptor::from(Descriptor::new(0x10_0000 + 3 * 8, 8, VRING_DESC_F_WRITE as u16, 0));
    rings.add_desc_chains(0, &[d], 3);
    rings.kick(0);
    assert!(rings.wait_used(&mem, 0, 4));
    assert_eq!(read(3), InputEvent::syn());
    assert!(irq.queues.lock().unwrap().contains(&0));
    kbd.reset();
}

#[test]
fn event_idx_receive_buffers_posted_later_are_noticed() {
    let mem = guest_mem();
    let (mut tab, inj) = VirtioInput::new(InputKind::Tablet, "tab").unwrap();
    let rings = Rings::new(&mem, 2, 16);
    let irq = Arc::new(RecordingIrq::default());
    let features = VERSION_1 | crate::devices::virtio::features::RING_EVENT_IDX;
    tab.activate(rings.context(&mem, irq.clone(), features)).unwrap();
    // Events first, no buffers: they wait; the device asks to be told about buffer 0.
    inj.inject(&[InputEvent::abs(ABS_X, 100), InputEvent::abs(ABS_Y, 200), InputEvent::syn()]);
    for i in 0..3u16 {
        assert!(crate::devices::virtio::testing::wait_for(|| rings.avail_event(0) == i), "avail_event {i}");
        let d = RawDescriptor::from(Descriptor::new(0x10_0000 + u64::from(i) * 8, 8, VRING_DESC_F_WRITE as u16, 0));
        rings.add_desc_chains(0, &[d], i);
        assert!(rings.driver_would_kick(0, i, i + 1));
        rings.kick(0);
        assert!(rings.wait_used(&mem, 0, i + 1));
    }
    let x: [u8; 8] = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
    assert_eq!(u16::from_le_bytes([x[0], x[1]]), EV_ABS);
    assert_eq!(u32::from_le_bytes(x[4..8].try_into().unwrap()), 100);
    tab.reset();
}

#[test]
fn led_events_from_the_guest_update_the_state_and_signal_it() {
    let mem = guest_mem();
    let (mut kbd, inj) = VirtioInput::new(InputKind::Keyboard, "kbd").unwrap();
    let rings = Rings::new(&mem, 2, 16);
    let irq = Arc::new(RecordingIrq::default());
    kbd.activate(rings.context(&mem, irq, VERSION_1)).unwrap();
    assert_eq!(inj.leds(), Leds::default());
    assert!(inj.leds_changed().read().is_err(), "not signalled before any change");
    // Linux's virtinput_status: EV_LED LED_CAPSL 1, then EV_SYN, each its own buffer.
    let status = [InputEvent { kind: EV_LED, code: 1, value: 1 }, InputEvent::syn(), InputEvent { kind: EV_LED, code: 9, value: 1 }];
    rings.send_each(&mem, 1, &status.map(InputEvent::to_bytes));
    assert_eq!(inj.leds(), Leds { num: false, caps: true, scroll: false }, "an unknown LED (9) changes nothing");
    assert_eq!(inj.leds_changed().read().unwrap(), 1, "signalled once");
    kbd.reset();
}
