//! Test helpers: guest memory, a recording interrupt, and waiting for the device.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::mock::MockSplitQueue;
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

/// Queues at distinct addresses (one MockSplitQueue per 64 KiB below 1 MiB).
pub struct Rings<'a> {
    pub mocks: Vec<MockSplitQueue<'a, GuestMemory>>,
    pub kicks: Vec<EventFd>,
}

impl<'a> Rings<'a> {
    pub fn new(mem: &'a GuestMemory, n: usize, size: u16) -> Self {
        let mocks = (0..n).map(|i| MockSplitQueue::create(mem, GuestAddress(i as u64 * 0x10000), size)).collect();
        let kicks = (0..n).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        Self { mocks, kicks }
    }

    pub fn context(&self, mem: &GuestMemory, irq: Arc<RecordingIrq>, features: u64) -> ActivateContext {
        let queues = self
            .mocks
            .iter()
            .zip(&self.kicks)
            .map(|(m, k)| {
                let mut q: Queue = m.create_queue().unwrap();
                q.set_event_idx(false);
                ActiveQueue { queue: q, event: k.try_clone().unwrap() }
            })
            .collect();
        ActivateContext { mem: mem.clone(), interrupt: irq, queues, acked_features: features }
    }

    /// Driver's view: index the device has published in queue `q`'s used ring.
    pub fn used_idx(&self, mem: &GuestMemory, q: usize) -> u16 {
        mem.read_obj::<u16>(self.mocks[q].used_addr().unchecked_add(2)).unwrap()
    }

    /// (id, len) of used element `i` of queue `q`.
    pub fn used_elem(&self, mem: &GuestMemory, q: usize, i: u16) -> (u32, u32) {
        let base = self.mocks[q].used_addr().0 + 4 + 8 * u64::from(i);
        (mem.read_obj(GuestAddress(base)).unwrap(), mem.read_obj(GuestAddress(base + 4)).unwrap())
    }

    pub fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Wait until queue `q` has `n` used entries.
    pub fn wait_used(&self, mem: &GuestMemory, q: usize, n: u16) -> bool {
        wait_for(|| self.used_idx(mem, q) >= n)
    }
}

trait AddrExt {
    fn unchecked_add(self, n: u64) -> GuestAddress;
}
impl AddrExt for GuestAddress {
    fn unchecked_add(self, n: u64) -> GuestAddress {
        GuestAddress(self.0 + n)
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
