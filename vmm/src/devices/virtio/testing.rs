//! Test helpers: guest memory, a recording interrupt, and waiting for the device.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, ActiveQueue, VirtioInterrupt};
use crate::devices::GuestMemory;

/// 16 MiB of guest RAM at 0; rings at the bottom, buffers from 1 MiB.
pub fn guest_mem() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

#[derive(Default)]
pub struct RecordingIrq {
    pub queues: Mutex<Vec<u16>>,
    pub configs: AtomicUsize,
    pub needs_reset: AtomicBool,
}

impl VirtioInterrupt for RecordingIrq {
    fn signal_queue(&self, queue: u16) {
        self.queues.lock().unwrap().push(queue);
    }
    fn signal_config(&self) {
        self.configs.fetch_add(1, Ordering::SeqCst);
    }
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// Driver-side rings for device tests, one per 64 KiB below 1 MiB: descriptor table at +0,
/// avail ring at +0x1000, used ring at +0x2000.
///
/// Not virtio-queue's `MockSplitQueue`: in 0.18 it places the used ring 4 + `len` bytes after
/// the avail ring instead of 4 + 2 × `len` + 2, so with more than len/2 chains outstanding
/// the device's used entries overwrite the driver's avail entries; and its `add_desc_chains`
/// does not wrap the avail ring index. Found by `slow_host_reader_never_blocks_the_device`.
pub struct Rings {
    pub size: u16,
    pub kicks: Vec<EventFd>,
    mem: GuestMemory,
    n: usize,
}

const RING_STRIDE: u64 = 0x10000;

impl Rings {
    pub fn new(mem: &GuestMemory, n: usize, size: u16) -> Self {
        let kicks = (0..n).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        Self { size, kicks, mem: mem.clone(), n }
    }

    fn base(&self, q: usize) -> u64 {
        q as u64 * RING_STRIDE
    }

    pub fn desc_table_addr(&self, q: usize) -> GuestAddress {
        GuestAddress(self.base(q))
    }

    pub fn avail_addr(&self, q: usize) -> GuestAddress {
        GuestAddress(self.base(q) + 0x1000)
    }

    pub fn used_addr(&self, q: usize) -> GuestAddress {
        GuestAddress(self.base(q) + 0x2000)
    }

    pub fn context(&self, mem: &GuestMemory, irq: Arc<RecordingIrq>, features: u64) -> ActivateContext {
        let event_idx = features & super::features::RING_EVENT_IDX != 0;
        let queues = (0..self.n)
            .map(|q| {
                let mut queue = Queue::new(self.size).unwrap();
                queue.try_set_desc_table_address(self.desc_table_addr(q)).unwrap();
                queue.try_set_avail_ring_address(self.avail_addr(q)).unwrap();
                queue.try_set_used_ring_address(self.used_addr(q)).unwrap();
                queue.set_event_idx(event_idx);
                queue.set_ready(true);
                ActiveQueue { index: q as u16, queue, event: self.kicks[q].try_clone().unwrap() }
            })
            .collect();
        ActivateContext { mem: mem.clone(), interrupt: irq, queues, acked_features: features }
    }

    /// Like [`Rings::context`] but continuing each ring at its published used index, as the
    /// transport does when resuming after a snapshot.
    pub fn context_resumed(&self, mem: &GuestMemory, irq: Arc<RecordingIrq>, features: u64) -> ActivateContext {
        let mut ctx = self.context(mem, irq, features);
        for (q, aq) in ctx.queues.iter_mut().enumerate() {
            let used = self.used_idx(mem, q);
            aq.queue.set_next_avail(used);
            aq.queue.set_next_used(used);
        }
        ctx
    }

    /// Write `descs` into queue `q`'s table from index `first` and offer descriptor `first`
    /// as a chain head (the caller sets NEXT flags and next indices).
    pub fn add_desc_chains(&self, q: usize, descs: &[RawDescriptor], first: u16) {
        for (i, d) in descs.iter().enumerate() {
            let at = self.base(q) + 16 * u64::from((first + i as u16) % self.size);
            self.mem.write_obj(*d, GuestAddress(at)).unwrap();
        }
        let avail = self.avail_addr(q).0;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        self.mem.write_obj(first, GuestAddress(avail + 4 + 2 * u64::from(idx % self.size))).unwrap();
        self.mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2)).unwrap();
    }

    /// The driver sends each of `bufs` in its own device-readable descriptor on queue `q`
    /// (buffers at 2 MiB on; e.g. virtio-input status events), kicks, and waits until the
    /// device has used them all.
    pub fn send_each(&self, mem: &GuestMemory, q: usize, bufs: &[[u8; 8]]) {
        for (i, b) in bufs.iter().enumerate() {
            let addr = 0x20_0000 + i as u64 * 8;
            mem.write_obj(*b, GuestAddress(addr)).unwrap();
            self.add_desc_chains(q, &[RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(addr, 8, 0, 0))], i as u16);
        }
        self.kick(q);
        assert!(self.wait_used(mem, q, bufs.len() as u16), "the device did not use the {} buffers on queue {q}", bufs.len());
    }

    /// Driver's view: index the device has published in queue `q`'s used ring.
    pub fn used_idx(&self, mem: &GuestMemory, q: usize) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used_addr(q).0 + 2)).unwrap()
    }

    /// (id, len) of used element `i` of queue `q`.
    pub fn used_elem(&self, mem: &GuestMemory, q: usize, i: u16) -> (u32, u32) {
        let base = self.used_addr(q).0 + 4 + 8 * u64::from(i % self.size);
        (mem.read_obj(GuestAddress(base)).unwrap(), mem.read_obj(GuestAddress(base + 4)).unwrap())
    }

    /// The `avail_event` the device published (EVENT_IDX): the driver kicks when its avail
    /// index moves past it.
    pub fn avail_event(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_addr(q).0 + 4 + 8 * u64::from(self.size))).unwrap()
    }

    /// Whether a driver using EVENT_IDX would notify after moving avail idx `old` -> `new`
    /// (vring_need_event in Linux).
    pub fn driver_would_kick(&self, q: usize, old: u16, new: u16) -> bool {
        let event = self.avail_event(q);
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    pub fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Wait until queue `q` has `n` used entries.
    pub fn wait_used(&self, mem: &GuestMemory, q: usize, n: u16) -> bool {
        wait_for(|| self.used_idx(mem, q) >= n)
    }
}

pub fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}
