use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::request::{execute_request, BlockBackend, ID_BYTES, MAX_RANGES, MAX_RANGE_SECTORS, SECTOR_SIZE};
use super::super::chain::{parse_chain, DeviceQueue};
use super::super::worker::{drain, EpollCtl, Worker, WorkerHandler};
use super::super::{device_type, ActivateContext, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::devices::GuestMemory;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE];

/// How to back a virtio-blk device.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// Raw image file; its size (rounded down to 512 bytes) is the disk's capacity.
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial the guest reads with GET_ID (at most 20 bytes; default: the file name).
    pub serial: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("virtio-blk image {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("virtio-blk image {path}: empty (size {size} bytes, less than one 512-byte sector)")]
    Empty { path: PathBuf, size: u64 },
}

/// A virtio-blk device.
pub struct VirtioBlock {
    config: BlockConfig,
    file: File,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    worker: Option<Worker>,
}

impl VirtioBlock {
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open { path: config.path.clone(), source };
        let file = OpenOptions::new().read(true).write(!config.read_only).open(&config.path).map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        if size < SECTOR_SIZE {
            return Err(BlockError::Empty { path: config.path.clone(), size });
        }
        let serial = config.serial.clone().unwrap_or_else(|| {
            config.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        });
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Self { config, file, capacity_sectors: size / SECTOR_SIZE, id, worker: None })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The open image: a snapshot syncs it and records its identity (see
    /// [`crate::snapshot::DiskIdentity`]) through a clone of this descriptor.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn config_image(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        // seg_max: the queue size minus header and status descriptors.
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        // Discard and write-zeroes limits; sector alignment 1 (any sector).
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_RANGES.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_RANGES.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

struct BlockWorker {
    mem: GuestMemory,
    irq: Arc<dyn VirtioInterrupt>,
    queue: DeviceQueue,
    kick: EventFd,
    backend: BlockBackend,
}

impl BlockWorker {
    fn process(&mut self) {
        let mem = self.mem.clone();
        loop {
            self.queue.disable_notification(&mem);
            while let Some(chain) = self.queue.pop(&mem, &*self.irq) {
                let parsed = parse_chain(chain, &mem);
                let outcome = execute_request(&mem, &parsed, &self.backend);
                self.queue.add_used(&mem, parsed.head, outcome.used_len, &*self.irq);
            }
            if !self.queue.enable_notification(&mem, &*self.irq) {
                break;
            }
        }
        self.queue.notify(&mem, &*self.irq);
    }
}

impl WorkerHandler for BlockWorker {
    fn handle(&mut self, _token: u64, _events: EventSet, _ctl: &EpollCtl<'_>) {
        drain(&self.kick);
        self.process();
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn name(&self) -> &'static str {
        "virtio-blk"
    }
    fn features(&self) -> u64 {
        let base = F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.config.read_only { base | F_RO } else { base | F_DISCARD | F_WRITE_ZEROES }
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn pci_class(&self) -> u32 {
        0x01_00_00
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let img = self.config_image();
        for (i, d) in data.iter_mut().enumerate() {
            *d = img.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        const NAME: &str = "virtio-blk";
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive { device: NAME });
        }
        ctx.expect_queues(NAME, 1)?;
        let file = self.file.try_clone().map_err(|source| ActivateError::Worker { device: NAME, source })?;
        let ActiveQueue { queue, event, .. } = ctx.queues.remove(0);
        let fd = event.as_raw_fd();
        let w = BlockWorker {
            mem: ctx.mem,
            irq: ctx.interrupt,
            queue: DeviceQueue::new(queue, 0),
            kick: event,
            backend: BlockBackend {
                file,
                capacity_sectors: self.capacity_sectors,
                read_only: self.config.read_only,
                writeback: ctx.acked_features & F_FLUSH != 0,
                id: self.id,
            },
        };
        self.worker = Some(Worker::spawn(NAME, &[(fd, 0)], w).map_err(|source| ActivateError::Worker { device: NAME, source })?);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
