//! virtio-input (virtio 1.2, 5.8): a keyboard and an absolute pointer (tablet), fed by the
//! VMM/compositor through an [`InputInjector`] with Linux evdev events.
mod device;
pub use device::{InputEvent, InputInjector, InputKind, VirtioInput};
