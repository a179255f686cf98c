//! The VM supervisor: rayosd owns every VM for its whole life.
//!
//! - [`registry`]: the records on the data volume (atomic writes, backup, corrupt handling).
//! - [`state`]: VM states and which requests each accepts.
//! - [`vmm_process`]: one `rayos-vmm` process: spec, spawn, control socket client.
//! - [`owner`]: each VM's own unprivileged user and the files it owns.
//! - [`manager`]: the per-VM tasks: start, stop, pause, resume, crash restarts, autostart.
//! - [`dbus`]: the `org.rayos.Vms1` interface on the control connection.
//! - [`cli`]: `rayosctl vm …`.

pub mod boot;
pub mod cli;
pub mod dbus;
pub mod manager;
pub mod owner;
pub mod registry;
pub mod state;
pub mod vmm_process;

pub use manager::{Paths, Settings, VmManager};

#[cfg(test)]
mod tests;
