//! rayos-netd: the machine's wired network, supervised by rayosd.
//!
//! - [`dhcp`]: one interface's DHCPv4 client, a state machine without I/O.
//! - [`uplink`]: one wired interface: its DHCP socket, timers, and the lease put on the
//!   interface over netlink.
//! - [`links`]: which interfaces are wired uplinks, and what a link message says.
//! - [`ping`]: one ICMP echo to the gateway, the proof that a lease is really on the interface.
//! - [`privs`]: netd runs as its own uid with three network capabilities.
//! - [`status`]: the state rayosd shows (`rayos_proto::net`), written at every change.

pub mod dhcp;
pub mod links;
pub mod ping;
pub mod privs;
pub mod status;
pub mod uplink;
