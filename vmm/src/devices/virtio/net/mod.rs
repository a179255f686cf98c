//! virtio-net (virtio 1.2, 5.1) on a host tap device, one rx/tx queue pair, no offloads.
mod device;
mod tap;
pub use device::{NetConfig, NetError, VirtioNet};
pub use tap::Tap;
