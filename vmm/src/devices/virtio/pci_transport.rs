//! The modern virtio-pci transport (virtio 1.2, 4.1): one 64-bit memory BAR 0 holding the
//! common configuration, ISR, device configuration and notification regions, and the MSI-X
//! table and PBA. No legacy (transitional) interface: Linux, OVMF and the Windows virtio
//! drivers all speak the modern one.
//!
//! BAR 0 layout:
//! | offset | region |
//! | --- | --- |
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device configuration |
//! | 0x3000 | notifications, 4 bytes per queue (`notify_off_multiplier` 4) |
//! | 0x8000 | MSI-X table |
//! | 0xA000 | MSI-X PBA |

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, status, ActivateContext, ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::devices::pci::{
    lock, BarKind, BarSpec, MsixCap, MsixConfig, PciConfiguration, PciDevice,
    PciError, PciHeader, SharedMsix,
};
use crate::devices::{GuestMemory, VmHandle};

/// Size of BAR 0.
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x10000;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const REGION_SIZE: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x8000;
const MSIX_PBA_OFFSET: u64 = 0xA000;
const COMMON_CFG_LEN: u32 = 0x38;
/// "No vector" in the MSI-X vector fields.
const NO_VECTOR: u16 = 0xffff;
const VIRTIO_PCI_VENDOR: u16 = 0x1af4;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Interrupt state shared between the transport (register accesses on vCPU threads) and the
/// device worker (raising interrupts).
struct PciInterrupt {
    msix: SharedMsix,
    isr: AtomicU8,
    status: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl PciInterrupt {
    fn raise(&self, vector: u16, isr_bit: u8) {
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        if vector != NO_VECTOR {
            lock(&self.msix).notify(vector);
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) {
        let v = self.queue_vectors.get(usize::from(queue)).map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        self.raise(v, ISR_QUEUE);
    }
    fn signal_config(&self) {
        self.raise(self.config_vector.load(Ordering::SeqCst), ISR_CONFIG);
    }
    fn set_needs_reset(&self) {
        self.status.fetch_or(status::DEVICE_NEEDS_RESET, Ordering::SeqCst);
        self.signal_config();
    }
}

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self { max_size, size: max_size, enabled: false, desc: 0, driver: 0, device: 0 }
    }
}

/// A [`VirtioDevice`] on the PCI bus.
pub struct VirtioPciDevice {
    name: String,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    vm: Arc<dyn VmHandle>,
    config: PciConfiguration,
    msix_cap: MsixCap,
    interrupt: Arc<PciInterrupt>,
    queues: Vec<QueueConfig>,
    queue_events: Vec<EventFd>,
    offered: u64,
    acked: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    config_generation: u8,
    active: bool,
    /// Activated, but the worker is stopped for a snapshot.
    paused: bool,
    bar_addr: Option<u64>,
    ioevents_registered: bool,
    pci_cfg_cap: usize,
}

impl VirtioPciDevice {
    /// Wrap `device`. `mem` is the guest RAM its queues live in; `vm` delivers MSIs and takes
    /// ioeventfds for the notification region.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, vm: Arc<dyn VmHandle>) -> Result<Self, PciError> {
        let name = device.name().to_owned();
        let io_err = |source| PciError::Device { name: name.clone(), source };
        let num_queues = device.queue_max_sizes().len();
        let device_id = 0x1040 + device.device_type() as u16;
        let mut config = PciConfiguration::new(PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR,
            device_id,
            // Revision 1: a modern-only (non-transitional) device.
            revision: 1,
            class_code: device.pci_class(),
            // QEMU's subsystem IDs: the virtio-win driver INFs match
            // PCI\VEN_1AF4&DEV_10xx&SUBSYS_11001AF4&REV_01.
            subsystem_vendor_id: VIRTIO_PCI_VENDOR,
            subsystem_id: 0x1100,
        });
        config.add_bar(0, BarSpec { size: VIRTIO_PCI_BAR_SIZE, kind: BarKind::Mem64, prefetchable: false })?;
        // One vector per queue plus one for configuration changes.
        let msix = MsixConfig::new(vm.clone(), num_queues as u16 + 1);
        let msix_cap = MsixCap::add_to(&mut config, &msix, 0, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET)?;
        let mut add_cap = |cfg_type: u8, offset: u64, len: u32, extra: &[u8], wmask: &[u8]| {
            let mut body = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&len.to_le_bytes());
            body.extend_from_slice(extra);
            config.add_capability(CAP_VENDOR, &body, wmask)
        };
        add_cap(CFG_COMMON, COMMON_OFFSET, COMMON_CFG_LEN, &[], &[])?;
        add_cap(CFG_ISR, ISR_OFFSET, 1, &[], &[])?;
        add_cap(CFG_DEVICE, DEVICE_CFG_OFFSET, REGION_SIZE as u32, &[], &[])?;
        add_cap(CFG_NOTIFY, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * num_queues as u32, &NOTIFY_MULTIPLIER.to_le_bytes(), &[])?;
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and the data window are guest-writable.
        let pci_cfg_mask = [0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let pci_cfg_cap = add_cap(CFG_PCI, 0, 0, &[0; 4], &pci_cfg_mask)?;

        let queue_events = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_err)?;
        let interrupt = Arc::new(PciInterrupt {
            msix: Arc::new(Mutex::new(msix)),
            isr: AtomicU8::new(0),
            status: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        });
        let offered = device.features() | features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX;
        let queues = device.queue_max_sizes().iter().map(|&m| QueueConfig::new(m)).collect();
        Ok(Self {
            name,
            device,
            mem,
            vm,
            config,
            msix_cap,
            interrupt,
            queues,
            queue_events,
            offered,
            acked: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            config_generation: 0,
            active: false,
            paused: false,
            bar_addr: None,
            ioevents_registered: false,
            pci_cfg_cap,
        })
    }

    fn status(&self) -> u8 {
        self.interrupt.status.load(Ordering::SeqCst)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.paused = false;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for v in &self.interrupt.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.interrupt.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        self.interrupt.isr.store(0, Ordering::SeqCst);
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.acked = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for e in &self.queue_events {
            super::worker::drain(e);
        }
    }

    fn set_status(&mut self, new: u8) {
        if new == 0 {
            debug!(device = %self.name, "driver reset");
            self.reset();
            return;
        }
        let old = self.status();
        let mut new = new | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let valid = self.acked & !self.offered == 0 && self.acked & features::VERSION_1 != 0;
            if !valid {
                crate::ratelimit::guest_warn!(device = %self.name, acked = self.acked, offered = self.offered, "driver accepted features we do not offer (or not VERSION_1); refusing FEATURES_OK");
                new &= !status::FEATURES_OK;
            }
        }
        self.interrupt.status.store(new, Ordering::SeqCst);
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 && new & status::FEATURES_OK != 0 && !self.active {
            self.activate();
        }
    }

    /// Start the device on the configured queues; `resume` continues rings from the used
    /// index in guest memory (after a pause or a restored snapshot) instead of from 0.
    fn activate(&mut self) {
        self.start_device(false);
    }

    fn start_device(&mut self, resume: bool) {
        let mut queues = Vec::new();
        for (i, qc) in self.queues.iter().enumerate() {
            if !qc.enabled {
                continue;
            }
            let q = match self.build_queue(qc, resume) {
                Ok(q) => q,
                Err(why) => {
                    crate::ratelimit::guest_warn!(device = %self.name, queue = i, why, "queue unusable at DRIVER_OK");
                    self.interrupt.set_needs_reset();
                    return;
                }
            };
            let event = match self.queue_events[i].try_clone() {
                Ok(e) => e,
                Err(e) => {
                    warn!(device = %self.name, %e, "cannot clone queue eventfd");
                    self.interrupt.set_needs_reset();
                    return;
                }
            };
            queues.push(ActiveQueue { index: i as u16, queue: q, event });
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            acked_features: self.acked,
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                info!(device = %self.name, features = format_args!("{:#x}", self.acked), "virtio device activated");
                self.active = true;
            }
            Err(e) => {
                warn!(device = %self.name, %e, "activation failed");
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn build_queue(&self, qc: &QueueConfig, resume: bool) -> Result<Queue, &'static str> {
        let mut q = Queue::new(qc.max_size).map_err(|_| "invalid maximum size")?;
        q.try_set_size(qc.size).map_err(|_| "size not a power of two within the maximum")?;
        q.try_set_desc_table_address(vm_memory::GuestAddress(qc.desc)).map_err(|_| "misaligned descriptor table")?;
        q.try_set_avail_ring_address(vm_memory::GuestAddress(qc.driver)).map_err(|_| "misaligned driver area")?;
        q.try_set_used_ring_address(vm_memory::GuestAddress(qc.device)).map_err(|_| "misaligned device area")?;
        q.set_event_idx(self.acked & features::RING_EVENT_IDX != 0);
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            return Err("rings outside guest memory");
        }
        if resume {
            let used_idx = q.used_idx(&self.mem, std::sync::atomic::Ordering::Acquire).map_err(|_| "used ring unreadable")?;
            q.set_next_used(used_idx.0);
            q.set_next_avail(used_idx.0);
        }
        Ok(q)
    }

    fn common_image(&self) -> [u8; 0x40] {
        let mut b = [0u8; 0x40];
        let feat = match self.device_feature_select {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        };
        let drv = match self.driver_feature_select {
            0 => self.acked as u32,
            1 => (self.acked >> 32) as u32,
            _ => 0,
        };
        b[0..4].copy_from_slice(&self.device_feature_select.to_le_bytes());
        b[4..8].copy_from_slice(&feat.to_le_bytes());
        b[8..12].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        b[12..16].copy_from_slice(&drv.to_le_bytes());
        b[0x10..0x12].copy_from_slice(&self.interrupt.config_vector.load(Ordering::SeqCst).to_le_bytes());
        b[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        b[0x14] = self.status();
        b[0x15] = self.config_generation;
        b[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        let qi = usize::from(self.queue_select);
        if let Some(q) = self.queues.get(qi) {
            b[0x18..0x1a].copy_from_slice(&q.size.to_le_bytes());
            b[0x1a..0x1c].copy_from_slice(&self.interrupt.queue_vectors[qi].load(Ordering::SeqCst).to_le_bytes());
            b[0x1c..0x1e].copy_from_slice(&u16::from(q.enabled).to_le_bytes());
            b[0x1e..0x20].copy_from_slice(&self.queue_select.to_le_bytes());
            b[0x20..0x28].copy_from_slice(&q.desc.to_le_bytes());
            b[0x28..0x30].copy_from_slice(&q.driver.to_le_bytes());
            b[0x30..0x38].copy_from_slice(&q.device.to_le_bytes());
        }
        // A non-existent queue reads size 0, which tells the driver it is not available.
        b
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let img = self.common_image();
        for (i, d) in data.iter_mut().enumerate() {
            *d = img.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if v == NO_VECTOR || v >= lock(&self.interrupt.msix).num_vectors() { NO_VECTOR } else { v }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let val = data.iter().rev().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        let driver_ok = self.status() & status::DRIVER_OK != 0;
        let qi = usize::from(self.queue_select);
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = val as u32,
            (0x08, 4) => self.driver_feature_select = val as u32,
            (0x0c, 4) => {
                // Features are fixed once FEATURES_OK is set (3.1.1).
                if self.status() & status::FEATURES_OK == 0 {
                    match self.driver_feature_select {
                        0 => self.acked = (self.acked & !0xffff_ffff) | val,
                        1 => self.acked = (self.acked & 0xffff_ffff) | val << 32,
                        _ => {}
                    }
                }
            }
            (0x10, 2) => {
                let v = self.valid_vector(val as u16);
                self.interrupt.config_vector.store(v, Ordering::SeqCst);
            }
            (0x14, 1) => self.set_status(val as u8),
            (0x16, 2) => self.queue_select = val as u16,
            (0x1a, 2) if qi < self.queues.len() => {
                let v = self.valid_vector(val as u16);
                self.interrupt.queue_vectors[qi].store(v, Ordering::SeqCst);
            }
            _ if driver_ok || qi >= self.queues.len() => {
                debug!(device = %self.name, offset, "ignored common config write");
            }
            (0x18, 2) => self.queues[qi].size = val as u16,
            // Writing 0 to queue_enable is not allowed (4.1.4.3.2); only 1 counts.
            (0x1c, 2) if val == 1 => self.queues[qi].enabled = true,
            (0x20..=0x37, 4 | 8) if offset.is_multiple_of(4) => {
                let q = &mut self.queues[qi];
                let field = match offset & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.driver,
                    _ => &mut q.device,
                };
                if data.len() == 8 {
                    *field = val;
                } else if offset.is_multiple_of(8) {
                    *field = (*field & !0xffff_ffff) | val;
                } else {
                    *field = (*field & 0xffff_ffff) | val << 32;
                }
            }
            _ => debug!(device = %self.name, offset, len = data.len(), "ignored common config write"),
        }
    }

    fn register_ioevents(&mut self, base: u64) {
        for (i, e) in self.queue_events.iter().enumerate() {
            let addr = base + NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * i as u64;
            if let Err(err) = self.vm.register_ioevent(e, addr, None) {
                // Notifications still work, through the MMIO exit.
                debug!(device = %self.name, %err, "no ioeventfd; queue notifications take the MMIO exit");
                self.unregister_ioevents_upto(base, i);
                return;
            }
        }
        self.ioevents_registered = true;
    }

    fn unregister_ioevents_upto(&mut self, base: u64, n: usize) {
        for (i, e) in self.queue_events.iter().enumerate().take(n) {
            let addr = base + NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * i as u64;
            if let Err(err) = self.vm.unregister_ioevent(e, addr, None) {
                warn!(device = %self.name, %err, addr, "unregister ioeventfd failed");
            }
        }
        self.ioevents_registered = false;
    }

    fn bar_access_read(&mut self, offset: u64, data: &mut [u8]) {
        if self.msix_cap.bar_read(&self.interrupt.msix, 0, offset, data) {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + REGION_SIZE => self.common_read(o - COMMON_OFFSET, data),
            o if o < ISR_OFFSET + REGION_SIZE => {
                data.fill(0);
                if o == ISR_OFFSET && !data.is_empty() {
                    // Reading the ISR clears it (4.1.4.5).
                    data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if o < DEVICE_CFG_OFFSET + REGION_SIZE => self.device.read_config(o - DEVICE_CFG_OFFSET, data),
            _ => data.fill(0),
        }
    }

    fn bar_access_write(&mut self, offset: u64, data: &[u8]) {
        if self.msix_cap.bar_write(&self.interrupt.msix, 0, offset, data) {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + REGION_SIZE => self.common_write(o - COMMON_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_SIZE).contains(&o) => {
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(e) = self.queue_events.get(q) {
                    if let Err(err) = e.write(1) {
                        warn!(device = %self.name, queue = q, %err, "queue notify failed");
                    }
                }
            }
            _ => {}
        }
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG window: bar, offset and length from the capability.
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let c = self.pci_cfg_cap;
        let bar = (self.config.read_reg(c / 4 + 1) & 0xff) as u8;
        let offset = u64::from(self.config.read_reg(c / 4 + 2));
        let len = self.config.read_reg(c / 4 + 3) as usize;
        (bar == 0 && matches!(len, 1 | 2 | 4) && offset + len as u64 <= VIRTIO_PCI_BAR_SIZE).then_some((offset, len))
    }
}

/// What a snapshot keeps of the transport.
#[derive(serde::Serialize, serde::Deserialize)]
struct TransportState {
    status: u8,
    acked: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    config_generation: u8,
    isr: u8,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    queues: Vec<QueueConfig>,
    active: bool,
    msix: crate::devices::pci::MsixState,
    device: serde_json::Value,
}

impl PciDevice for VirtioPciDevice {
    fn pause(&mut self) {
        if self.active && !self.paused {
            self.device.pause();
            self.paused = true;
        }
    }

    fn resume(&mut self) {
        if self.active && self.paused {
            self.paused = false;
            self.active = false;
            self.start_device(true);
            // A notification the driver sent just before a snapshot went to the saving
            // process's eventfd: after a restore nothing would ever look at that request. One
            // kick per queue makes the worker read every ring once (an empty one costs a look).
            if self.active {
                for (qc, e) in self.queues.iter().zip(&self.queue_events) {
                    if qc.enabled {
                        if let Err(err) = e.write(1) {
                            warn!(device = %self.name, %err, "cannot kick a resumed queue");
                        }
                    }
                }
            }
        }
    }

    fn save_state(&mut self) -> serde_json::Value {
        // Never save a running worker's half-done view.
        self.pause();
        let st = TransportState {
            status: self.status(),
            acked: self.acked,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            isr: self.interrupt.isr.load(Ordering::SeqCst),
            config_vector: self.interrupt.config_vector.load(Ordering::SeqCst),
            queue_vectors: self.interrupt.queue_vectors.iter().map(|v| v.load(Ordering::SeqCst)).collect(),
            queues: self.queues.clone(),
            active: self.active,
            msix: lock(&self.interrupt.msix).save(),
            device: self.device.save_state(),
        };
        serde_json::to_value(st).unwrap_or(serde_json::Value::Null)
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let st: TransportState = serde_json::from_value(state.clone()).map_err(|e| format!("virtio transport state: {e}"))?;
        if st.queues.len() != self.queues.len() || st.queue_vectors.len() != self.queues.len() {
            return Err(format!("saved {} queues, device has {}", st.queues.len(), self.queues.len()));
        }
        if st.queues.iter().zip(&self.queues).any(|(a, b)| a.max_size != b.max_size) {
            return Err("saved queue sizes differ from the device's".into());
        }
        if self.active {
            self.device.reset();
        }
        lock(&self.interrupt.msix).restore(&st.msix)?;
        self.device.restore_state(&st.device)?;
        self.interrupt.status.store(st.status, Ordering::SeqCst);
        self.interrupt.isr.store(st.isr, Ordering::SeqCst);
        self.interrupt.config_vector.store(st.config_vector, Ordering::SeqCst);
        for (v, s) in self.interrupt.queue_vectors.iter().zip(&st.queue_vectors) {
            v.store(*s, Ordering::SeqCst);
        }
        self.acked = st.acked;
        self.device_feature_select = st.device_feature_select;
        self.driver_feature_select = st.driver_feature_select;
        self.queue_select = st.queue_select;
        self.config_generation = st.config_generation;
        self.queues = st.queues;
        // Activated before the snapshot: runs again on `resume`.
        self.active = st.active;
        self.paused = st.active;
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_cap / 4 + 4 {
            if let Some((offset, len)) = self.pci_cfg_target() {
                let mut buf = [0u8; 4];
                self.bar_access_read(offset, &mut buf[..len]);
                return u32::from_le_bytes(buf);
            }
        }
        self.config.read_reg(reg)
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        self.msix_cap.config_written(&self.config, reg, &self.interrupt.msix);
        if reg == self.pci_cfg_cap / 4 + 4 {
            if let Some((off, len)) = self.pci_cfg_target() {
                let v = self.config.read_reg(reg).to_le_bytes();
                self.bar_access_write(off, &v[..len]);
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 {
            self.bar_access_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.bar_access_write(offset, data);
        }
    }

    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        if bar != 0 {
            return;
        }
        if let (Some(old), true) = (self.bar_addr, self.ioevents_registered) {
            self.unregister_ioevents_upto(old, self.queue_events.len());
        }
        self.bar_addr = addr;
        if let Some(new) = addr {
            self.register_ioevents(new);
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
