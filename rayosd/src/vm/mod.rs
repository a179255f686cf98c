//! The VM supervisor: rayosd owns every VM for its whole life.
//!
//! - [`registry`]: the records on the data volume (atomic writes, backup, corrupt handling).
//! - [`state`]: VM states and which requests each accepts.
//! - [`vmm_process`]: one `rayos-vmm` process: spec, spawn with its supervisor connection.
//! - [`vmm_conn`]: that connection: requests with their answers, the VMM's events.
//! - [`owner`]: each VM's own unprivileged user and the files it owns.
//! - [`manager`]: the VMs as the API sees them: registry, state, requests, autostart.
//! - [`task`]: the per-VM task loop: start, stop, pause, resume, save, crash restarts.
//! - [`saved`]: saved states on the data volume: checked against the disks, used up before a resume.
//! - [`agent`]: the guest agent: readiness, heartbeat, screen requests.
//! - [`hang`]: when a guest counts as hung (no init within its bound, a silent agent).
//! - [`display`]: screenshots.
//! - [`monitor`]: the primary monitor's mode as the compositor reports it; each start's display size.
//! - [`serial_tail`]: the end of a VM's serial console log, read in bounded memory.
//! - [`serial_input`]: typing on a VM's serial console.
//! - [`keys`]: key names, combos, the "us" text layout and tablet positions as input reports.
//! - [`keymap`]: the system keymap's kbd file: which key and modifiers type each character.
//! - [`input`]: injecting those reports on the VM's display channel (automation).
//! - [`cli`]: `rayosctl vm …` (the API itself, `org.rayos.Vms1`, is `crate::api::vms`).

pub mod agent;
pub mod boot;
pub mod cli;
pub mod display;
pub mod hang;
pub mod input;
pub mod keymap;
pub mod keys;
pub mod manager;
pub mod monitor;
pub mod owner;
pub mod registry;
pub mod saved;
pub mod serial_input;
pub mod serial_tail;
pub mod state;
pub mod task;
pub mod vmm_conn;
pub mod vmm_process;

pub use manager::{Paths, Settings, VmManager};

#[cfg(test)]
mod tests;
