//! The network service's state: `rayos-netd` writes it to [`STATUS_PATH`] at every change,
//! rayosd reads it for `org.rayos.Net1.Status` and `rayosctl net status`.
//!
//! A file and not a socket because the reader only ever wants the latest state, and a file
//! written by rename is always whole: rayosd never waits on netd, and a netd that died leaves
//! its last state plus a pid that says it is gone.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Where netd keeps its state (tmpfs: it describes this boot only).
pub const STATUS_PATH: &str = "/run/rayos/net/status.json";
/// The uid (and gid) netd runs as once started: not root, and nobody else's (the
/// compositor's is 1_999_000_001).
pub const NETD_UID: u32 = 1_999_000_002;

/// The bridge every `network = "nat"` VM's tap is a port of (isolated: ports reach the
/// bridge, never each other). rayosd makes it (and the taps); netd gives it
/// [`NAT_GATEWAY`], serves DHCP and DNS on it and masquerades what leaves through it.
pub const NAT_BRIDGE: &str = "rayos-nat";
/// The VMs' private network: `10.73.0.0/24`. Chosen away from the ranges home routers,
/// libvirt (192.168.122/24), Docker (172.17-31) and QEMU's user network (10.0.2/24) use.
pub const NAT_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 73, 0, 0);
pub const NAT_PREFIX_LEN: u8 = 24;
/// RayOS on the VMs' network: their gateway, DHCP server and DNS forwarder.
pub const NAT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 73, 0, 1);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetStatus {
    /// netd's pid, so a reader can tell a live state from a dead service's last words.
    pub pid: u32,
    /// The wired interfaces netd manages, by name.
    pub uplinks: Vec<Uplink>,
    /// The VMs' private network (`network = "nat"` VMs).
    #[serde(default)]
    pub nat: NatStatus,
}

/// RayOS's side of the VMs' private network: the bridge's address, the masquerade rules,
/// and the leases its DHCP server handed out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatStatus {
    /// The bridge has [`NAT_GATEWAY`], the nf_tables rules are in and forwarding is on.
    pub ready: bool,
    pub leases: Vec<NatLease>,
    /// DHCP datagrams the server answered, and those it refused (malformed, not ours).
    #[serde(default)]
    pub dhcp_answered: u64,
    #[serde(default)]
    pub dhcp_refused: u64,
    /// DNS queries the forwarder answered, and those that got no answer upstream.
    pub dns_answered: u64,
    pub dns_failed: u64,
    /// What keeps NAT from working, for the user; empty when nothing does.
    pub problem: String,
}

/// One VM's address on the private network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatLease {
    pub mac: String,
    pub address: Ipv4Addr,
    /// CLOCK_BOOTTIME milliseconds when the lease runs out (a countdown written here would be
    /// stale by the time it is read: netd writes this only when a DHCP message comes).
    pub expires_ms: u64,
}

/// The MAC of a NAT VM's network card: from its UUID, so it never changes across restarts
/// and restores (the DHCP server then gives it the same address). Locally administered,
/// unicast.
pub fn vm_mac(id: &[u8; 16]) -> [u8; 6] {
    // FNV-1a over the whole UUID: UUIDv4s differ everywhere, but a hand-written one may not.
    let mut h: u32 = 0x811c_9dc5;
    for b in id {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}

pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl NetStatus {
    /// The lease the machine's traffic leaves through: the first bound uplink.
    pub fn default_lease(&self) -> Option<(&Uplink, &Lease)> {
        self.uplinks
            .iter()
            .find_map(|u| u.lease.as_ref().map(|l| (u, l)))
    }
}

/// One wired interface and where its DHCP client is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    pub name: String,
    pub mac: String,
    /// The kernel driver (e1000e, r8169, …), from sysfs; empty when unknown.
    pub driver: String,
    /// A cable is in and the link partner answers (IFF_LOWER_UP).
    pub carrier: bool,
    pub state: DhcpState,
    pub lease: Option<Lease>,
    /// How long the gateway took to answer a ping after the lease went on the interface;
    /// 0 while it has not answered (or there is no lease or no gateway).
    #[serde(default)]
    pub gateway_rtt_us: u64,
    /// The last thing that went wrong on this interface, for the user; empty when nothing did.
    pub problem: String,
}

/// RFC 2131's client states, plus `NoCarrier` (nothing to talk to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DhcpState {
    NoCarrier,
    /// DISCOVER sent, waiting for offers.
    Selecting,
    /// REQUEST sent for an offer, waiting for the ACK.
    Requesting,
    Bound,
    /// T1 passed: renewing with the server that gave the lease.
    Renewing,
    /// T2 passed: asking any server.
    Rebinding,
}

impl DhcpState {
    pub fn as_str(self) -> &'static str {
        match self {
            DhcpState::NoCarrier => "no-carrier",
            DhcpState::Selecting => "selecting",
            DhcpState::Requesting => "requesting",
            DhcpState::Bound => "bound",
            DhcpState::Renewing => "renewing",
            DhcpState::Rebinding => "rebinding",
        }
    }
}

/// What a DHCP server gave an interface (applied to it: address, default route).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub server: Ipv4Addr,
    pub lease_secs: u32,
    /// CLOCK_BOOTTIME milliseconds when the ACK came, and when the lease runs out.
    pub acquired_ms: u64,
    pub expires_ms: u64,
}

impl NetStatus {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("NetStatus serializes")
    }

    pub fn parse(text: &str) -> Result<NetStatus, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reads_back_as_written_and_names_the_bound_uplink() {
        let s = NetStatus {
            pid: 42,
            nat: NatStatus::default(),
            uplinks: vec![
                Uplink {
                    name: "eth1".into(),
                    mac: "52:54:00:00:00:02".into(),
                    driver: "r8169".into(),
                    carrier: false,
                    state: DhcpState::NoCarrier,
                    lease: None,
                    gateway_rtt_us: 0,
                    problem: String::new(),
                },
                Uplink {
                    name: "eth0".into(),
                    mac: "52:54:00:12:34:56".into(),
                    driver: "e1000e".into(),
                    carrier: true,
                    state: DhcpState::Bound,
                    lease: Some(Lease {
                        address: Ipv4Addr::new(10, 0, 2, 15),
                        prefix_len: 24,
                        gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
                        dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
                        domain: None,
                        server: Ipv4Addr::new(10, 0, 2, 2),
                        lease_secs: 86400,
                        acquired_ms: 1000,
                        expires_ms: 86_401_000,
                    }),
                    gateway_rtt_us: 420,
                    problem: String::new(),
                },
            ],
        };
        let back = NetStatus::parse(&s.to_json()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.default_lease().unwrap().0.name, "eth0");
        assert!(
            s.to_json().contains("\"state\": \"no-carrier\""),
            "{}",
            s.to_json()
        );
        assert!(NetStatus::parse(r#"{"pid":1,"uplinks":[],"extra":1}"#).is_err());
    }
}
