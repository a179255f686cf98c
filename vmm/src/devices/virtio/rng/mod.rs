//! virtio-rng (virtio 1.2, 5.4): entropy from the host's getrandom(2).
mod device;
pub use device::VirtioRng;
