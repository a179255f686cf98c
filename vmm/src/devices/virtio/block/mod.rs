//! virtio-blk (virtio 1.2, 5.2) over a raw image file.
//!
//! Writes go to the host page cache; FLUSH is honoured with fdatasync(2), so data the guest
//! flushed survives a host power cut. A driver that does not negotiate VIRTIO_BLK_F_FLUSH
//! gets write-through behaviour (fdatasync after every write), as the spec requires.
//! DISCARD and WRITE_ZEROES punch holes in (or zero-allocate) the image, so a sparse image
//! shrinks when the guest trims.
mod device;
mod request;

pub use device::{BlockConfig, BlockError, VirtioBlock};
pub use request::{execute_request, BlockBackend, RequestOutcome, SECTOR_SIZE};
