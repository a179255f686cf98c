//! `org.rayos.Net1` at `/org/rayos/Net`: the machine's network as `rayos-netd` last wrote it
//! ([`rayos_proto::net::STATUS_PATH`]). Reading it needs nothing, like `ip address` does not.

use std::path::{Path, PathBuf};

use rayos_proto::net::NetStatus;
use serde::{Deserialize, Serialize};
use zbus::zvariant::Type;

pub const OBJECT_PATH: &str = "/org/rayos/Net";
pub const INTERFACE: &str = "org.rayos.Net1";
/// netd's program name, to tell its pid from a reused one.
const NETD_COMM: &str = "rayos-netd";

/// What `Status` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct NetInfo {
    /// "running", or why there is no live state ("not running", "unreadable state: …").
    pub service: String,
    pub uplinks: Vec<UplinkInfo>,
    pub nat: NatInfo,
}

/// The VMs' private network (`network = "nat"` VMs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct NatInfo {
    /// The bridge has its address, the masquerade rules are in, forwarding is on.
    pub ready: bool,
    /// RayOS on that network: "10.73.0.1/24" (gateway, DHCP server, DNS forwarder).
    pub gateway: String,
    pub leases: Vec<NatLeaseInfo>,
    pub dhcp_answered: u64,
    pub dhcp_refused: u64,
    pub dns_answered: u64,
    pub dns_failed: u64,
    pub problem: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct NatLeaseInfo {
    pub mac: String,
    pub address: String,
    pub expires_in_secs: u64,
}

impl NetInfo {
    /// The address RayOS's DHCP server gave the card with MAC `mac`, if any.
    pub fn nat_address(&self, mac: &str) -> Option<&str> {
        self.nat.leases.iter().find(|l| l.mac.eq_ignore_ascii_case(mac)).map(|l| l.address.as_str())
    }
}

/// One wired interface. Addresses are text ("" when absent) so any D-Bus client reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct UplinkInfo {
    pub name: String,
    pub mac: String,
    pub driver: String,
    pub carrier: bool,
    /// no-carrier, selecting, requesting, bound, renewing, rebinding.
    pub state: String,
    /// "10.0.2.15/24".
    pub address: String,
    pub gateway: String,
    pub dns: Vec<String>,
    pub domain: String,
    /// The DHCP server that gave the lease.
    pub server: String,
    pub lease_secs: u32,
    pub expires_in_secs: u64,
    /// The gateway's answer to a ping after the lease went on; 0 while it has not answered.
    pub gateway_rtt_us: u64,
    pub problem: String,
}

impl NetInfo {
    /// Reads netd's state from `path`; `now_ms` is CLOCK_BOOTTIME (the lease times' clock).
    pub fn read(path: &Path, proc_root: &Path, now_ms: u64) -> NetInfo {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return NetInfo {
                    service: "not running".into(),
                    uplinks: vec![],
                    ..Default::default()
                };
            }
            Err(e) => {
                return NetInfo {
                    service: format!("unreadable state {}: {e}", path.display()),
                    uplinks: vec![],
                    ..Default::default()
                }
            }
        };
        let s = match NetStatus::parse(&text) {
            Ok(s) => s,
            Err(e) => {
                return NetInfo {
                    service: format!("unreadable state {}: {e}", path.display()),
                    uplinks: vec![],
                    ..Default::default()
                }
            }
        };
        let alive = std::fs::read_to_string(proc_root.join(s.pid.to_string()).join("comm"))
            .map(|c| c.trim() == NETD_COMM)
            .unwrap_or(false);
        if !alive {
            return NetInfo {
                service: "not running".into(),
                ..Default::default()
            };
        }
        let uplinks = s
            .uplinks
            .into_iter()
            .map(|u| {
                let mut i = UplinkInfo {
                    name: u.name,
                    mac: u.mac,
                    driver: u.driver,
                    carrier: u.carrier,
                    state: u.state.as_str().into(),
                    gateway_rtt_us: u.gateway_rtt_us,
                    problem: u.problem,
                    ..Default::default()
                };
                if let Some(l) = u.lease {
                    i.address = format!("{}/{}", l.address, l.prefix_len);
                    i.gateway = l.gateway.map(|g| g.to_string()).unwrap_or_default();
                    i.dns = l.dns.iter().map(|d| d.to_string()).collect();
                    i.domain = l.domain.unwrap_or_default();
                    i.server = l.server.to_string();
                    i.lease_secs = l.lease_secs;
                    i.expires_in_secs = l.expires_ms.saturating_sub(now_ms) / 1000;
                }
                i
            })
            .collect();
        let nat = NatInfo {
            ready: s.nat.ready,
            gateway: format!("{}/{}", rayos_proto::net::NAT_GATEWAY, rayos_proto::net::NAT_PREFIX_LEN),
            leases: s
                .nat
                .leases
                .into_iter()
                // netd drops expired leases only when the next DHCP message comes.
                .filter(|l| l.expires_ms > now_ms)
                .map(|l| NatLeaseInfo { mac: l.mac, address: l.address.to_string(), expires_in_secs: (l.expires_ms - now_ms) / 1000 })
                .collect(),
            dhcp_answered: s.nat.dhcp_answered,
            dhcp_refused: s.nat.dhcp_refused,
            dns_answered: s.nat.dns_answered,
            dns_failed: s.nat.dns_failed,
            problem: s.nat.problem,
        };
        NetInfo {
            service: "running".into(),
            uplinks,
            nat,
        }
    }
}

pub struct NetServer {
    status: PathBuf,
}

impl NetServer {
    pub fn new(status: PathBuf) -> NetServer {
        NetServer { status }
    }
}

#[zbus::interface(name = "org.rayos.Net1")]
impl NetServer {
    async fn status(&self) -> NetInfo {
        NetInfo::read(&self.status, Path::new("/proc"), crate::timeline::uptime_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayos_proto::net::{DhcpState, Lease, Uplink};
    use std::net::Ipv4Addr;

    #[test]
    fn the_state_reads_as_text_and_a_dead_service_is_named() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("status.json");
        let procs = d.path().join("proc");
        assert_eq!(NetInfo::read(&path, &procs, 0).service, "not running");
        std::fs::write(&path, "{ not json").unwrap();
        assert!(
            NetInfo::read(&path, &procs, 0)
                .service
                .starts_with("unreadable state"),
            "{:?}",
            NetInfo::read(&path, &procs, 0)
        );
        let s = NetStatus {
            pid: 77,
            uplinks: vec![Uplink {
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
                gateway_rtt_us: 0,
                problem: String::new(),
            }],
            nat: rayos_proto::net::NatStatus {
                ready: true,
                leases: vec![
                    rayos_proto::net::NatLease {
                        mac: "52:54:aa:bb:cc:dd".into(),
                        address: Ipv4Addr::new(10, 73, 0, 9),
                        expires_ms: 4_001_000,
                    },
                    // Ran out after netd last wrote the file: not shown.
                    rayos_proto::net::NatLease {
                        mac: "52:54:aa:bb:cc:ee".into(),
                        address: Ipv4Addr::new(10, 73, 0, 10),
                        expires_ms: 1_000_999,
                    },
                ],
                ..Default::default()
            },
        };
        std::fs::write(&path, s.to_json()).unwrap();
        // pid 77 is not netd (no such process here): its last state is not shown as live.
        assert_eq!(
            NetInfo::read(&path, &procs, 0),
            NetInfo {
                service: "not running".into(),
                ..Default::default()
            }
        );
        std::fs::create_dir_all(procs.join("77")).unwrap();
        std::fs::write(procs.join("77/comm"), "rayos-netd\n").unwrap();
        let i = NetInfo::read(&path, &procs, 1_001_000);
        assert_eq!(i.service, "running");
        let u = &i.uplinks[0];
        assert_eq!(
            (
                u.address.as_str(),
                u.gateway.as_str(),
                u.dns.clone(),
                u.state.as_str()
            ),
            (
                "10.0.2.15/24",
                "10.0.2.2",
                vec!["10.0.2.3".to_string()],
                "bound"
            )
        );
        assert_eq!(u.expires_in_secs, 85_400);
        assert!(i.nat.ready);
        assert_eq!(i.nat.gateway, "10.73.0.1/24");
        assert_eq!(i.nat_address("52:54:AA:BB:CC:DD"), Some("10.73.0.9"));
        assert_eq!(i.nat_address("52:54:00:00:00:01"), None);
        assert_eq!(i.nat_address("52:54:aa:bb:cc:ee"), None, "an expired lease is listed");
        assert_eq!(i.nat.leases[0].expires_in_secs, 3000, "the countdown is counted from the reader's clock");
    }
}
