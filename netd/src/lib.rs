//! rayos-netd: the machine's wired network, supervised by rayosd.
//!
//! - [`dhcp`]: one interface's DHCPv4 client, a state machine without I/O.
//! - [`dhcp_server`]: the DHCPv4 server of the VMs' NAT network, a state machine without I/O.
//! - [`uplink`]: one wired interface: its DHCP socket, timers, and the lease put on the
//!   interface over netlink.
//! - [`links`]: which interfaces are wired uplinks, and what a link message says.
//! - [`nft`]: the VMs' NAT ruleset, installed over nf_tables netlink in one atomic batch.
//! - [`ping`]: one ICMP echo to the gateway, the proof that a lease is really on the interface.
//! - [`privs`]: netd runs as its own uid with three network capabilities.
//! - [`nat`]: the VMs' private network: bridge address, forwarding, rules, DHCP and DNS.
//! - [`dns`]: the VMs' DNS forwarder.
//! - [`vmlink`]: a NAT VM's tap, an isolated port of the RayOS bridge (used by rayosd).
//! - [`sock`]: UDP sockets bound to one interface (DHCP client and server, DNS).
//! - [`status`]: the state rayosd shows (`rayos_proto::net`), written at every change.

pub mod dhcp;
pub mod dhcp_server;
pub mod dns;
pub mod links;
pub mod nat;
pub mod nft;
pub mod ping;
pub mod privs;
pub mod sock;
pub mod status;
pub mod uplink;
pub mod vmlink;
