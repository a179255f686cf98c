//! Which network interfaces are wired uplinks, and what a link message says about one.
//!
//! A wired uplink is a real Ethernet device: it has a `device` (PCI or USB) behind it in
//! sysfs, link type 1 (ARPHRD_ETHER), and no wireless side. Taps, bridges, loopback and
//! anything a VM owns have no `device` and are left alone.

use std::path::Path;

use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

/// What one RTM_NEWLINK says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// A cable is in and the partner answers (IFF_LOWER_UP).
    pub carrier: bool,
}

impl Link {
    pub fn from_message(m: &LinkMessage) -> Option<Link> {
        let mut name = None;
        let mut mac = None;
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    mac = Some([a[0], a[1], a[2], a[3], a[4], a[5]])
                }
                _ => {}
            }
        }
        let flags = m.header.flags;
        Some(Link {
            index: m.header.index,
            name: name?,
            mac,
            up: flags.contains(LinkFlags::Up),
            carrier: flags.contains(LinkFlags::LowerUp),
        })
    }
}

/// Whether `/sys/class/net/<name>` (under `class_net`) is a wired Ethernet device.
pub fn is_wired(class_net: &Path, name: &str) -> bool {
    let d = class_net.join(name);
    let ether = std::fs::read_to_string(d.join("type"))
        .map(|t| t.trim() == "1")
        .unwrap_or(false);
    ether
        && d.join("device").exists()
        && !d.join("wireless").exists()
        && !d.join("phy80211").exists()
}

/// The kernel driver bound to the interface (`e1000e`, `r8169`, `virtio_net`…), or "".
pub fn driver(class_net: &Path, name: &str) -> String {
    std::fs::read_link(class_net.join(name).join("device/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

pub use rayos_proto::net::fmt_mac;

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(root: &Path, name: &str, kind: &str, device: bool, wireless: bool) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("type"), format!("{kind}\n")).unwrap();
        if device {
            std::fs::create_dir_all(root.join("devices").join(name).join("driver-e1000e")).unwrap();
            std::os::unix::fs::symlink(root.join("devices").join(name), d.join("device")).unwrap();
            std::os::unix::fs::symlink(
                root.join("devices").join(name).join("driver-e1000e"),
                root.join("devices").join(name).join("driver"),
            )
            .unwrap();
        }
        if wireless {
            std::fs::create_dir_all(d.join("wireless")).unwrap();
        }
    }

    #[test]
    fn only_real_wired_ethernet_devices_are_uplinks() {
        let t = std::env::temp_dir().join(format!("netd-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        iface(&t, "enp0s2", "1", true, false);
        iface(&t, "wlp3s0", "1", true, true);
        iface(&t, "rvm-1234", "1", false, false); // a tap
        iface(&t, "lo", "772", false, false);
        assert!(is_wired(&t, "enp0s2"));
        assert!(!is_wired(&t, "wlp3s0"));
        assert!(!is_wired(&t, "rvm-1234"));
        assert!(!is_wired(&t, "lo"));
        assert!(!is_wired(&t, "missing"));
        assert_eq!(driver(&t, "enp0s2"), "driver-e1000e");
        assert_eq!(driver(&t, "lo"), "");
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn macs_print_like_ip_link() {
        assert_eq!(
            fmt_mac(&[0x52, 0x54, 0, 0x12, 0x34, 0xab]),
            "52:54:00:12:34:ab"
        );
    }
}
