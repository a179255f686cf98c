//! MSI-X (PCI Local Bus 3.0, 6.8.2): the capability, the vector table and the pending bit
//! array, with delivery through [`VmHandle::signal_msi`].
//!
//! The table lives in a memory BAR of the device; the device forwards BAR accesses in the
//! table and PBA ranges here. Interrupts are raised from device worker threads, so the state
//! sits behind a mutex shared with the transport ([`SharedMsix`]).

use std::sync::{Arc, Mutex};


use super::config::PciConfiguration;
use super::PciError;
use crate::devices::VmHandle;

/// PCI capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes per table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
const VECTOR_MASKED: u32 = 1;

#[derive(Clone, Copy, Debug, Default)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

/// Saved MSI-X state: per vector (address low, address high, data, control), pending bits.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    pub entries: Vec<[u32; 4]>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// MSI-X state of one function.
pub struct MsixConfig {
    vm: Arc<dyn VmHandle>,
    table: Vec<MsixEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}

/// MSI-X state shared by a device's transport (guest accesses) and its workers (interrupts).
pub type SharedMsix = Arc<Mutex<MsixConfig>>;

impl MsixConfig {
    /// `vectors` entries, all masked as after reset (6.8.2.9).
    pub fn new(vm: Arc<dyn VmHandle>, vectors: u16) -> Self {
        let n = usize::from(vectors);
        let entry = MsixEntry { control: VECTOR_MASKED, ..Default::default() };
        Self { vm, table: vec![entry; n], pending: vec![false; n], enabled: false, function_masked: false }
    }

    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Bytes the table occupies in its BAR.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes the PBA occupies (whole QWORDs).
    pub fn pba_size(&self) -> u64 {
        self.table.len().div_ceil(64) as u64 * 8
    }

    /// Apply the message control word the guest wrote into the capability.
    pub fn set_message_control(&mut self, control: u16) {
        self.enabled = control & MSIX_ENABLE != 0;
        self.function_masked = control & MSIX_FUNCTION_MASK != 0;
        self.deliver_unmasked_pending();
    }

    pub fn save(&self) -> MsixState {
        MsixState {
            entries: self.table.iter().map(|e| [e.addr_lo, e.addr_hi, e.data, e.control]).collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Restore a saved state (same number of vectors). Pending vectors stay pending until the
    /// guest unmasks them, as before the snapshot.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), String> {
        if s.entries.len() != self.table.len() || s.pending.len() != self.pending.len() {
            return Err(format!("MSI-X: saved {} vectors, device has {}", s.entries.len(), self.table.len()));
        }
        for (e, w) in self.table.iter_mut().zip(&s.entries) {
            *e = MsixEntry { addr_lo: w[0], addr_hi: w[1], data: w[2], control: w[3] & VECTOR_MASKED };
        }
        self.pending.clone_from(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        Ok(())
    }

    /// Back to the power-on state (device reset): disabled, all vectors masked.
    pub fn reset(&mut self) {
        for e in &mut self.table {
            *e = MsixEntry { control: VECTOR_MASKED, ..Default::default() };
        }
        self.pending.iter_mut().for_each(|p| *p = false);
        self.enabled = false;
        self.function_masked = false;
    }

    fn deliver_unmasked_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for v in 0..self.table.len() {
            if self.pending[v] && self.table[v].control & VECTOR_MASKED == 0 {
                self.pending[v] = false;
                self.send(v);
            }
        }
    }

    fn send(&self, v: usize) {
        let e = self.table[v];
        let addr = u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo);
        if let Err(err) = self.vm.signal_msi(addr, e.data) {
            crate::ratelimit::guest_warn!(vector = v, addr, data = e.data, %err, "MSI-X delivery failed");
        }
    }

    /// Raise `vector`: deliver it now, or set its pending bit while it (or the function) is
    /// masked. Returns false when MSI-X is disabled or the vector does not exist.
    pub fn notify(&mut self, vector: u16) -> bool {
        let v = usize::from(vector);
        if !self.enabled || v >= self.table.len() {
            return false;
        }
        if self.function_masked || self.table[v].control & VECTOR_MASKED != 0 {
            self.pending[v] = true;
        } else {
            self.send(v);
        }
        true
    }

    pub fn is_pending(&self, vector: u16) -> bool {
        self.pending.get(usize::from(vector)).copied().unwrap_or(false)
    }

    /// Guest read in the table at `offset`. Only aligned DWORD and QWORD accesses are defined
    /// (6.8.2); anything else reads all ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let (idx, field) = ((offset / MSIX_ENTRY_SIZE) as usize, offset % MSIX_ENTRY_SIZE);
        let Some(e) = self.table.get(idx) else { return };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        match (data.len(), field) {
            (4, f) if f % 4 == 0 => data.copy_from_slice(&words[f as usize / 4].to_le_bytes()),
            (8, f) if f % 8 == 0 => {
                let i = f as usize / 4;
                data[..4].copy_from_slice(&words[i].to_le_bytes());
                data[4..].copy_from_slice(&words[i + 1].to_le_bytes());
            }
            _ => {}
        }
    }

    /// Guest write in the table at `offset`.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let (idx, field) = ((offset / MSIX_ENTRY_SIZE) as usize, offset % MSIX_ENTRY_SIZE);
        if idx >= self.table.len() {
            return;
        }
        let mut set = |f: u64, v: u32| {
            let e = &mut self.table[idx];
            match f {
                0 => e.addr_lo = v,
                4 => e.addr_hi = v,
                8 => e.data = v,
                // Only the mask bit of vector control is writable.
                _ => e.control = v & VECTOR_MASKED,
            }
        };
        match (data.len(), field) {
            (4, f) if f % 4 == 0 => set(f, u32::from_le_bytes(data.try_into().unwrap_or([0; 4]))),
            (8, f) if f % 8 == 0 => {
                set(f, u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
                set(f + 4, u32::from_le_bytes([data[4], data[5], data[6], data[7]]));
            }
            _ => return,
        }
        self.deliver_unmasked_pending();
    }

    /// Guest read in the PBA; writes to the PBA are ignored (read-only per spec).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let byte = offset as usize + i;
            let mut v = 0u8;
            for bit in 0..8 {
                if self.pending.get(byte * 8 + bit).copied().unwrap_or(false) {
                    v |= 1 << bit;
                }
            }
            *d = v;
        }
    }
}

/// Where a device put its MSI-X capability, table and PBA.
#[derive(Clone, Copy, Debug)]
pub struct MsixCap {
    /// Offset of the capability in configuration space.
    pub cap_offset: usize,
    pub bar: u8,
    pub table_offset: u64,
    pub pba_offset: u64,
}

impl MsixCap {
    /// Add the capability for `msix` with table and PBA at the given offsets of `bar`.
    pub fn add_to(
        config: &mut PciConfiguration,
        msix: &MsixConfig,
        bar: u8,
        table_offset: u64,
        pba_offset: u64,
    ) -> Result<Self, PciError> {
        let control = msix.num_vectors().saturating_sub(1) & 0x7ff;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&control.to_le_bytes());
        body.extend_from_slice(&(table_offset as u32 | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset as u32 | u32::from(bar)).to_le_bytes());
        // Only enable and function mask are guest-writable.
        let wmask = [0x00, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0];
        let cap_offset = config.add_capability(MSIX_CAP_ID, &body, &wmask)?;
        Ok(Self { cap_offset, bar, table_offset, pba_offset })
    }

    /// After a config write to register `reg`, push a changed message control to `msix`.
    pub fn config_written(&self, config: &PciConfiguration, reg: usize, msix: &Mutex<MsixConfig>) {
        if reg == self.cap_offset / 4 {
            let control = (config.read_reg(reg) >> 16) as u16;
            lock(msix).set_message_control(control);
        }
    }

    /// Route a BAR read; returns false when `offset` is outside the table and PBA.
    pub fn bar_read(&self, msix: &Mutex<MsixConfig>, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        let m = lock(msix);
        if bar != self.bar {
            return false;
        }
        if (self.table_offset..self.table_offset + m.table_size()).contains(&offset) {
            m.read_table(offset - self.table_offset, data);
        } else if (self.pba_offset..self.pba_offset + m.pba_size()).contains(&offset) {
            m.read_pba(offset - self.pba_offset, data);
        } else {
            return false;
        }
        true
    }

    /// Route a BAR write; returns false when `offset` is outside the table and PBA.
    pub fn bar_write(&self, msix: &Mutex<MsixConfig>, bar: u8, offset: u64, data: &[u8]) -> bool {
        let mut m = lock(msix);
        if bar != self.bar {
            return false;
        }
        if (self.table_offset..self.table_offset + m.table_size()).contains(&offset) {
            m.write_table(offset - self.table_offset, data);
        } else if !(self.pba_offset..self.pba_offset + m.pba_size()).contains(&offset) {
            return false;
        }
        true
    }
}

/// Lock a device mutex. A worker that panicked while holding it cannot leave the MSI-X state
/// half-written in a way that matters more than losing the VM's interrupts, so poisoning is
/// ignored rather than propagated as a second panic on a vCPU thread.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
