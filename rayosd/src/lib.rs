//! rayosd: RayOS's PID 1 and the pieces other crates reuse.
//!
//! - [`cmdline`], [`efivars`], [`timeline`]: what the boot looks like.
//! - [`log`]: kmsg + console + ring buffer + rotating file.
//! - [`reaper`]: the one owner of every `waitpid`.
//! - [`mounts`], [`power`]: PID 1 duties (only the `rayosd` binary calls these).
//! - [`api`]: the control API (D-Bus `org.rayos.Control1`, `org.rayos.Vms1`); [`client`] its client.

pub mod bootcount;
pub mod bridge;
pub mod api;
pub mod client;
pub mod cmdline;
pub mod config;
pub mod datavol;
pub mod efivars;
pub mod log;
pub mod mounts;
pub mod power;
pub mod procfs;
pub mod reaper;
pub mod restart;
pub mod screen;
pub mod session;
pub mod supervisor;
pub mod timeline;
pub mod uevent;
pub mod vm;
pub mod watchdog;
