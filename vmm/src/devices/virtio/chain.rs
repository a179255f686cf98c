//! Descriptor chain parsing shared by the devices: every buffer is checked against guest
//! memory up front, and readable buffers must precede writable ones (virtio 1.2, 2.7.4.2).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::{VirtioInterrupt};
use crate::devices::GuestMemory;

/// Device-readable and device-writable buffers of one chain, in order. Buffers that failed
/// a check are left out and the first failure is kept in `error`: a device still reports an
/// error status through a good status buffer when it has one.
#[derive(Clone, Debug, Default)]
pub struct ParsedChain {
    pub head: u16,
    pub readable: Vec<(GuestAddress, u32)>,
    pub writable: Vec<(GuestAddress, u32)>,
    pub error: Option<ChainError>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("chain carries more than {limit} bytes")]
    TooLarge { limit: u64 },
}

/// Upper bound on the bytes one chain may describe; the spec's own limit (2.7.5.2).
pub const MAX_CHAIN_BYTES: u64 = 1 << 32;

/// Collect and check a chain's buffers. The iteration itself is bounded by virtio-queue
/// (at most queue-size descriptors, or the indirect table's length; no nested indirection).
pub fn parse_chain(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> ParsedChain {
    let mut parsed = ParsedChain { head: chain.head_index(), ..Default::default() };
    let mut total = 0u64;
    let fail = |p: &mut ParsedChain, e: ChainError| {
        if p.error.is_none() {
            p.error = Some(e);
        }
    };
    for desc in chain {
        let (addr, len) = (desc.addr(), desc.len());
        if !mem.check_range(addr, len as usize) {
            fail(&mut parsed, ChainError::OutsideMemory { addr: addr.0, len });
            continue;
        }
        total += u64::from(len);
        if total > MAX_CHAIN_BYTES {
            fail(&mut parsed, ChainError::TooLarge { limit: MAX_CHAIN_BYTES });
            break;
        }
        if desc.is_write_only() {
            parsed.writable.push((addr, len));
        } else if !parsed.writable.is_empty() {
            fail(&mut parsed, ChainError::ReadableAfterWritable);
        } else {
            parsed.readable.push((addr, len));
        }
    }
    parsed
}

/// Guest buffers `segs` starting `skip` bytes in, `len` bytes long, as host slices for
/// zero-copy vectored I/O. `parse_chain` already range-checked the buffers; `get_slices`
/// checks again and splits at memory region boundaries.
pub fn guest_slices<'a>(
    mem: &'a GuestMemory,
    segs: &[(GuestAddress, u32)],
    mut skip: u64,
    mut len: u64,
) -> Result<Vec<vm_memory::VolatileSlice<'a, ()>>, String> {
    let mut out = Vec::new();
    for &(addr, seg_len) in segs {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(seg_len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len);
        let start = GuestAddress(addr.0 + skip);
        for s in mem.get_slices(start, n as usize) {
            out.push(s.map_err(|e| format!("guest buffer {:#x}: {e}", start.0))?);
        }
        len -= n;
        skip = 0;
    }
    Ok(out)
}

/// iovecs over `slices`, for readv/writev/preadv/pwritev.
pub fn iovecs(slices: &[vm_memory::VolatileSlice<'_, ()>]) -> Vec<libc::iovec> {
    slices.iter().map(|s| libc::iovec { iov_base: s.ptr_guard_mut().as_ptr().cast(), iov_len: s.len() }).collect()
}

pub fn total_len(segs: &[(GuestAddress, u32)]) -> u64 {
    segs.iter().map(|s| u64::from(s.1)).sum()
}

/// Copy from the buffers starting `offset` bytes in; returns the bytes copied.
pub fn read_segments(mem: &GuestMemory, segs: &[(GuestAddress, u32)], mut offset: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    for &(addr, len) in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(buf.len() - done);
        if mem.read_slice(&mut buf[done..done + n], addr.unchecked_add_u64(offset)).is_err() {
            break;
        }
        done += n;
        offset = 0;
    }
    done
}

/// Copy into the buffers starting `offset` bytes in; returns the bytes copied.
pub fn write_segments(mem: &GuestMemory, segs: &[(GuestAddress, u32)], mut offset: u64, data: &[u8]) -> usize {
    let mut done = 0;
    for &(addr, len) in segs {
        if done == data.len() {
            break;
        }
        let len = u64::from(len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(data.len() - done);
        if mem.write_slice(&data[done..done + n], addr.unchecked_add_u64(offset)).is_err() {
            break;
        }
        done += n;
        offset = 0;
    }
    done
}

trait AddU64 {
    fn unchecked_add_u64(self, off: u64) -> GuestAddress;
}
impl AddU64 for GuestAddress {
    fn unchecked_add_u64(self, off: u64) -> GuestAddress {
        GuestAddress(self.0.wrapping_add(off))
    }
}

/// Outcome of taking the next chain from a queue.
pub enum Next<'a> {
    Chain(DescriptorChain<&'a GuestMemory>),
    Empty,
    /// The ring is unusable (e.g. an avail index more than a queue size ahead).
    Broken(virtio_queue::Error),
}

pub fn next_chain<'a>(queue: &mut Queue, mem: &'a GuestMemory) -> Next<'a> {
    match queue.iter(mem) {
        Ok(mut it) => match it.next() {
            Some(c) => Next::Chain(c),
            None => Next::Empty,
        },
        Err(e) => Next::Broken(e),
    }
}

/// A queue plus its "broken" latch: once the ring misbehaves the device stops using it
/// until reset, rather than reading or writing at guest-controlled ring addresses again.
pub struct DeviceQueue {
    pub queue: Queue,
    pub index: u16,
    pub broken: bool,
}

impl DeviceQueue {
    pub fn new(queue: Queue, index: u16) -> Self {
        Self { queue, index, broken: false }
    }

    /// Next chain, or `None` when empty or broken (then DEVICE_NEEDS_RESET is raised once).
    ///
    /// On finding the ring empty it re-enables driver notifications, which with EVENT_IDX
    /// publishes `avail_event` = our position: without that a driver using EVENT_IDX stops
    /// kicking after the first buffer (it only notifies when it crosses `avail_event`).
    pub fn pop<'a>(&mut self, mem: &'a GuestMemory, irq: &dyn VirtioInterrupt) -> Option<DescriptorChain<&'a GuestMemory>> {
        loop {
            if self.broken {
                return None;
            }
            match next_chain(&mut self.queue, mem) {
                Next::Chain(c) => return Some(c),
                Next::Empty => {
                    if !self.enable_notification(mem, irq) {
                        return None;
                    }
                    // More arrived while notifications were off: take it.
                }
                Next::Broken(e) => {
                    self.mark_broken(irq, &e.to_string());
                    return None;
                }
            }
        }
    }

    /// Put the chain back at the front (device lacks resources to handle it now).
    pub fn undo_pop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Return a chain to the driver with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32, irq: &dyn VirtioInterrupt) {
        if self.broken {
            return;
        }
        if let Err(e) = self.queue.add_used(mem, head, len) {
            self.mark_broken(irq, &e.to_string());
        }
    }

    /// Interrupt the driver if it wants one (EVENT_IDX aware).
    pub fn notify(&mut self, mem: &GuestMemory, irq: &dyn VirtioInterrupt) {
        if self.broken {
            return;
        }
        match self.queue.needs_notification(mem) {
            Ok(true) => irq.signal_queue(self.index),
            Ok(false) => {}
            Err(e) => self.mark_broken(irq, &e.to_string()),
        }
    }

    /// Turn driver notifications off while draining; returns whether more work arrived
    /// when turning them back on (the EVENT_IDX race, 2.7.10).
    pub fn disable_notification(&mut self, mem: &GuestMemory) {
        if !self.broken {
            let _ = self.queue.disable_notification(mem);
        }
    }

    pub fn enable_notification(&mut self, mem: &GuestMemory, irq: &dyn VirtioInterrupt) -> bool {
        if self.broken {
            return false;
        }
        match self.queue.enable_notification(mem) {
            Ok(more) => more,
            Err(e) => {
                self.mark_broken(irq, &e.to_string());
                false
            }
        }
    }

    fn mark_broken(&mut self, irq: &dyn VirtioInterrupt, why: &str) {
        crate::ratelimit::guest_warn!(queue = self.index, why, "virtio queue broken by the driver; device needs reset");
        self.broken = true;
        irq.set_needs_reset();
    }
}
