use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tracing::{debug, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN};
use super::super::chain::{guest_slices, iovecs, parse_chain, total_len, write_segments, DeviceQueue};
use super::super::worker::{drain, EpollCtl, Worker, WorkerHandler};
use super::super::{device_type, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt};
use crate::devices::GuestMemory;

const NAME: &str = "virtio-net";
// Offloads (5.1.3): the guest's virtio_net_hdr passes through the tap unchanged, so the
// kernel does checksumming and segmentation for both directions.
const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_ECN: u64 = 1 << 9;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_ECN: u64 = 1 << 13;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];
const RX: usize = 0;
const TX: usize = 1;
const TAP_TOKEN: u64 = 2;
/// Largest frame the guest may send: header + 64 KiB of IP packet + link-layer headers
/// (Ethernet, VLAN tags) with room to spare; covers a GSO frame (HOST_TSO) and the largest
/// MTU Linux allows without F_MTU.
const MAX_TX_FRAME: u64 = (VNET_HDR_LEN + 65536 + 128) as u64;

#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Host tap interface name (created if missing and we may; otherwise it must exist).
    pub tap: String,
    pub mac: [u8; 6],
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtio-net: opening tap {tap}: {source}")]
    Tap { tap: String, source: io::Error },
}

pub struct VirtioNet {
    config: NetConfig,
    tap: Tap,
    worker: Option<Worker>,
}

impl VirtioNet {
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap).map_err(|source| NetError::Tap { tap: config.tap.clone(), source })?;
        Ok(Self { config, tap, worker: None })
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }
}

struct NetWorker {
    mem: GuestMemory,
    irq: Arc<dyn VirtioInterrupt>,
    queues: [DeviceQueue; 2],
    kicks: [EventFd; 2],
    tap: Tap,
    polling_tap: bool,
}

impl NetWorker {
    /// Host to guest: one frame per receive chain while both exist.
    fn rx(&mut self, ctl: &EpollCtl<'_>) {
        let mem = self.mem.clone();
        let mut delivered = false;
        loop {
            let Some(chain) = self.queues[RX].pop(&mem, &*self.irq) else {
                // No buffers: stop watching the tap until the driver posts some, or a
                // readable tap would spin this thread.
                if self.polling_tap {
                    let _ = ctl.remove(self.tap.as_raw_fd());
                    self.polling_tap = false;
                }
                break;
            };
            let p = parse_chain(chain, &mem);
            let len = total_len(&p.writable);
            if p.error.is_some() || len < VNET_HDR_LEN as u64 || !p.readable.is_empty() {
                crate::ratelimit::guest_warn!("{NAME}: unusable receive buffer (outside RAM, too short or device-readable)");
                self.queues[RX].add_used(&mem, p.head, 0, &*self.irq);
                delivered = true;
                continue;
            }
            let slices = match guest_slices(&mem, &p.writable, 0, len) {
                Ok(s) => s,
                Err(why) => {
                    crate::ratelimit::guest_warn!(why, "{NAME}: receive buffer");
                    self.queues[RX].add_used(&mem, p.head, 0, &*self.irq);
                    continue;
                }
            };
            match self.tap.readv(&iovecs(&slices)) {
                Ok(n) => {
                    // num_buffers is 1 without MRG_RXBUF (5.1.6.4); the tap leaves it alone.
                    write_segments(&mem, &p.writable, 10, &1u16.to_le_bytes());
                    self.queues[RX].add_used(&mem, p.head, n as u32, &*self.irq);
                    delivered = true;
                }
                Err(e) => {
                    self.queues[RX].undo_pop();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        warn!(%e, "{NAME}: tap read failed");
                    }
                    break;
                }
            }
        }
        if delivered {
            self.queues[RX].notify(&mem, &*self.irq);
        }
    }

    /// Guest to host: each chain is one frame with its header.
    fn tx(&mut self) {
        let mem = self.mem.clone();
        loop {
            self.queues[TX].disable_notification(&mem);
            while let Some(chain) = self.queues[TX].pop(&mem, &*self.irq) {
                let p = parse_chain(chain, &mem);
                let len = total_len(&p.readable);
                if p.error.is_some() || !p.writable.is_empty() || len < VNET_HDR_LEN as u64 || len > MAX_TX_FRAME {
                    debug!(len, "{NAME}: dropping malformed transmit chain");
                } else {
                    match guest_slices(&mem, &p.readable, 0, len) {
                        Ok(s) => {
                            if let Err(e) = self.tap.writev(&iovecs(&s)) {
                                debug!(%e, "{NAME}: tap write failed; frame dropped");
                            }
                        }
                        Err(why) => crate::ratelimit::guest_warn!(why, "{NAME}: transmit buffer"),
                    }
                }
                self.queues[TX].add_used(&mem, p.head, 0, &*self.irq);
            }
            if !self.queues[TX].enable_notification(&mem, &*self.irq) {
                break;
            }
        }
        self.queues[TX].notify(&mem, &*self.irq);
    }
}

impl WorkerHandler for NetWorker {
    fn handle(&mut self, token: u64, _events: EventSet, ctl: &EpollCtl<'_>) {
        match token {
            0 => {
                drain(&self.kicks[RX]);
                if !self.polling_tap && ctl.add(self.tap.as_raw_fd(), TAP_TOKEN).is_ok() {
                    self.polling_tap = true;
                }
                self.rx(ctl);
            }
            1 => {
                drain(&self.kicks[TX]);
                self.tx();
            }
            _ => self.rx(ctl),
        }
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        device_type::NET
    }
    fn name(&self) -> &'static str {
        NAME
    }
    fn features(&self) -> u64 {
        F_MAC
            | F_STATUS
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn pci_class(&self) -> u32 {
        0x02_00_00
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut img = [0u8; 8];
        img[..6].copy_from_slice(&self.config.mac);
        img[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = img.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive { device: NAME });
        }
        ctx.expect_queues(NAME, 2)?;
        let worker_err = |source| ActivateError::Worker { device: NAME, source };
        let tap = self.tap.try_clone().map_err(worker_err)?;
        // Let the tap hand the guest what its driver said it can take.
        let acked = ctx.acked_features;
        let mut offload = 0;
        if acked & F_GUEST_CSUM != 0 {
            offload |= TUN_F_CSUM;
            if acked & F_GUEST_TSO4 != 0 {
                offload |= TUN_F_TSO4;
            }
            if acked & F_GUEST_TSO6 != 0 {
                offload |= TUN_F_TSO6;
            }
            if acked & F_GUEST_ECN != 0 && acked & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0 {
                offload |= TUN_F_TSO_ECN;
            }
        }
        tap.set_offload(offload).map_err(worker_err)?;
        let mut it = ctx.queues.into_iter();
        let (rx, tx) = (it.next().expect("two queues"), it.next().expect("two queues"));
        let fds = [(rx.event.as_raw_fd(), 0), (tx.event.as_raw_fd(), 1), (tap.as_raw_fd(), TAP_TOKEN)];
        let w = NetWorker {
            mem: ctx.mem,
            irq: ctx.interrupt,
            queues: [DeviceQueue::new(rx.queue, 0), DeviceQueue::new(tx.queue, 1)],
            kicks: [rx.event, tx.event],
            tap,
            polling_tap: true,
        };
        self.worker = Some(Worker::spawn(NAME, &fds, w).map_err(worker_err)?);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
