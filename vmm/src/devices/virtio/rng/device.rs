use std::os::fd::AsRawFd;
use std::sync::Arc;

use tracing::warn;
use vmm_sys_util::epoll::EventSet;

use super::super::chain::{parse_chain, write_segments, DeviceQueue};
use super::super::worker::{drain, EpollCtl, Worker, WorkerHandler};
use super::super::{device_type, ActivateContext, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::devices::GuestMemory;

const QUEUE_SIZES: &[u16] = &[256];
/// Bytes of entropy per request at most, so one request cannot keep the worker busy long.
const MAX_PER_REQUEST: usize = 64 * 1024;

/// The entropy device. It has no configuration.
#[derive(Default)]
pub struct VirtioRng {
    worker: Option<Worker>,
}

impl VirtioRng {
    pub fn new() -> Self {
        Self::default()
    }
}

struct RngWorker {
    mem: GuestMemory,
    irq: Arc<dyn VirtioInterrupt>,
    queue: DeviceQueue,
    kick: vmm_sys_util::eventfd::EventFd,
    buf: Vec<u8>,
}

/// Fill `buf` from getrandom(2).
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the valid buffer `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl RngWorker {
    fn process(&mut self) {
        let mem = self.mem.clone();
        loop {
            self.queue.disable_notification(&mem);
            while let Some(chain) = self.queue.pop(&mem, &*self.irq) {
                let head = chain.head_index();
                let p = parse_chain(chain, &mem);
                let written = match p.error {
                    None => {
                        let want = (super::super::chain::total_len(&p.writable) as usize).min(MAX_PER_REQUEST);
                        let buf = &mut self.buf[..want];
                        match fill_random(buf) {
                            Ok(()) => write_segments(&mem, &p.writable, 0, buf),
                            Err(e) => {
                                warn!(%e, "virtio-rng: getrandom failed");
                                0
                            }
                        }
                    }
                    Some(e) => {
                        crate::ratelimit::guest_warn!(%e, "virtio-rng: bad request");
                        0
                    }
                };
                self.queue.add_used(&mem, head, written as u32, &*self.irq);
            }
            if !self.queue.enable_notification(&mem, &*self.irq) {
                break;
            }
        }
        self.queue.notify(&mem, &*self.irq);
    }
}

impl WorkerHandler for RngWorker {
    fn handle(&mut self, _token: u64, _events: EventSet, _ctl: &EpollCtl<'_>) {
        drain(&self.kick);
        self.process();
    }
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn name(&self) -> &'static str {
        "virtio-rng"
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn pci_class(&self) -> u32 {
        0xff_00_00
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive { device: "virtio-rng" });
        }
        ctx.expect_queues("virtio-rng", 1)?;
        let ActiveQueue { queue, event, .. } = ctx.queues.remove(0);
        let fd = event.as_raw_fd();
        let w = RngWorker {
            mem: ctx.mem,
            irq: ctx.interrupt,
            queue: DeviceQueue::new(queue, 0),
            kick: event,
            buf: vec![0; MAX_PER_REQUEST],
        };
        let worker = Worker::spawn("virtio-rng", &[(fd, 0)], w)
            .map_err(|source| ActivateError::Worker { device: "virtio-rng", source })?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::testing::{guest_mem, RecordingIrq, Rings};

    #[test]
    fn fills_writable_buffers_with_entropy() {
        let mem = guest_mem();
        let rings = Rings::new(&mem, 1, 16);
        let irq = Arc::new(RecordingIrq::default());
        let mut rng = VirtioRng::new();
        rng.activate(rings.context(&mem, irq.clone(), 0)).unwrap();
        let descs = [
            RawDescriptor::from(Descriptor::new(0x10_0000, 64, VRING_DESC_F_WRITE as u16, 0)),
            RawDescriptor::from(Descriptor::new(0x20_0000, 4096, VRING_DESC_F_WRITE as u16, 0)),
        ];
        rings.add_desc_chains(0, &descs[..1], 0);
        rings.add_desc_chains(0, &descs[1..], 1);
        rings.kick(0);
        assert!(rings.wait_used(&mem, 0, 2));
        assert_eq!(rings.used_elem(&mem, 0, 0), (0, 64));
        assert_eq!(rings.used_elem(&mem, 0, 1), (1, 4096));
        let mut a = [0u8; 4096];
        mem.read_slice(&mut a, GuestAddress(0x20_0000)).unwrap();
        // 4 KiB of zeros from a working RNG has probability 2^-32768.
        assert!(a.iter().filter(|b| **b == 0).count() < 200, "buffer was filled");
        assert!(!irq.queues.lock().unwrap().is_empty(), "driver interrupted");
        rng.reset();
    }

    /// With EVENT_IDX the driver only kicks when its avail index passes the device's
    /// `avail_event`; the device must keep publishing it or the driver goes quiet.
    #[test]
    fn event_idx_keeps_the_driver_kicking() {
        let mem = guest_mem();
        let rings = Rings::new(&mem, 1, 16);
        let irq = Arc::new(RecordingIrq::default());
        let mut rng = VirtioRng::new();
        let features = crate::devices::virtio::features::VERSION_1 | crate::devices::virtio::features::RING_EVENT_IDX;
        rng.activate(rings.context(&mem, irq.clone(), features)).unwrap();
        for i in 0..20u16 {
            let d = RawDescriptor::from(Descriptor::new(0x10_0000, 16, VRING_DESC_F_WRITE as u16, 0));
            rings.add_desc_chains(0, &[d], i % 16);
            assert!(rings.driver_would_kick(0, i, i + 1), "request {i}: avail_event {} leaves the driver silent", rings.avail_event(0));
            rings.kick(0);
            assert!(rings.wait_used(&mem, 0, i + 1));
            assert!(crate::devices::virtio::testing::wait_for(|| rings.avail_event(0) == i + 1));
        }
    }

    #[test]
    fn buffer_outside_memory_is_not_written_and_request_completes() {
        let mem = guest_mem();
        let rings = Rings::new(&mem, 1, 16);
        let irq = Arc::new(RecordingIrq::default());
        let mut rng = VirtioRng::new();
        rng.activate(rings.context(&mem, irq.clone(), 0)).unwrap();
        let d = RawDescriptor::from(Descriptor::new(0xffff_0000_0000, 64, VRING_DESC_F_WRITE as u16, 0));
        rings.add_desc_chains(0, &[d], 0);
        rings.kick(0);
        assert!(rings.wait_used(&mem, 0, 1));
        assert_eq!(rings.used_elem(&mem, 0, 0), (0, 0));
    }
}
