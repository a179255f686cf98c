//! virtio-net (virtio 1.2, 5.1) on a host tap device, one rx/tx queue pair. Checksum and
//! TSO offloads in both directions: the tap is opened with IFF_VNET_HDR and the guest's
//! virtio_net_hdr_v1 passes through, so the host kernel does the work (receive buffers must
//! then hold 64 KiB frames; Linux's "big packets" mode posts such chains without MRG_RXBUF).
mod device;
mod tap;
pub use device::{NetConfig, NetError, VirtioNet};
pub use tap::Tap;
pub(crate) use tap::TUNSETOFFLOAD;
