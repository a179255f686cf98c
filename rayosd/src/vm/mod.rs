//! The VM supervisor: rayosd owns every VM for its whole life.
//!
//! - [`registry`]: the records on the data volume (atomic writes, backup, corrupt handling).
//! - [`state`]: VM states and which requests each accepts.
//! - [`vmm_process`]: one `rayos-vmm` process: spec, spawn with its supervisor connection.
//! - [`vmm_conn`]: that connection: requests with their answers, the VMM's events.
//! - [`manager`]: the VMs as the API sees them: registry, state, requests, autostart.
//! - [`task`]: the per-VM task loop: start, stop, pause, resume, crash restarts.
//! - [`agent`]: the guest agent: readiness, heartbeat, screen requests.
//! - [`display`]: screenshots.
//! - [`dbus`]: the `org.rayos.Vms1` interface on the control connection.
//! - [`cli`]: `rayosctl vm …`.

pub mod agent;
pub mod boot;
pub mod cli;
pub mod dbus;
pub mod display;
pub mod manager;
pub mod registry;
pub mod state;
pub mod task;
pub mod vmm_conn;
pub mod vmm_process;

pub use manager::{Paths, Settings, VmManager};

#[cfg(test)]
mod tests;
