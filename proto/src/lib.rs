//! The contracts between RayOS's processes, as types. Whatever one process writes and another
//! reads is defined here once, with its parse and format functions:
//!
//! - [`spec`]: the VM spec rayosd writes and `rayos-vmm --spec` reads.
//! - [`vmm`]: the VMM's control requests, answers and events, and its exit codes.
//! - [`display`]: the display channel between the compositor and each VMM (framebuffer,
//!   damage, LEDs one way; input records the other).
//! - [`agent`]: the guest agent's line protocol on the `org.rayos.agent` port.
//! - [`firstboot`]: a Linux VM's first-boot user and settings, and the checks on them.
//! - [`net`]: the network service's state (uplinks, DHCP leases), netd → rayosd.
//! - [`registry`]: the VM registry file (`vms.json`) and its records.
//! - [`system`]: `system.toml`, written by the installer and read by rayosd.
//!
//! The wire formats are the ones installed disks and tools already use; the tests pin them
//! against literal examples.

pub mod agent;
pub mod display;
pub mod firstboot;
pub mod net;
pub mod registry;
pub mod spec;
pub mod system;
pub mod vmm;
