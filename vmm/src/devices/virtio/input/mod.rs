//! virtio-input (virtio 1.2, 5.8): a keyboard and an absolute pointer (tablet), fed by the
//! VMM/compositor through an [`InputInjector`] with Linux evdev events.
mod device;
pub use device::{InputEvent, InputInjector, InputKind, Leds, VirtioInput, EV_ABS, EV_KEY, EV_MSC, EV_REL, EV_SYN, KEYBOARD_KEYS};
