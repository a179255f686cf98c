//! The VM supervisor: rayosd owns every VM for its whole life.
//!
//! - [`registry`]: the records on the data volume (atomic writes, backup, corrupt handling).
//! - [`state`]: VM states and which requests each accepts.
//! - [`vmm_process`]: one `rayos-vmm` process: spec, spawn, control socket client.
//! - [`manager`]: the per-VM tasks: start, stop, pause, resume, crash restarts, autostart.
//! - [`serial_tail`]: the end of a VM's serial console log, read in bounded memory.
//! - [`cli`]: `rayosctl vm …` (the API itself, `org.rayos.Vms1`, is `crate::api::vms`).

pub mod boot;
pub mod cli;
pub mod manager;
pub mod registry;
pub mod serial_tail;
pub mod state;
pub mod vmm_process;

pub use manager::{Paths, Settings, VmManager};

#[cfg(test)]
mod tests;
