//! netd gives up root before it reads a single packet: DHCP replies and link names come
//! from the network and the hardware, so the process that parses them runs as its own uid
//! ([`rayos_proto::net::NETD_UID`]) with only the capabilities its work needs, no way back
//! (no_new_privs, a bounding set of the same three).

use caps::{CapSet, Capability, CapsHashSet};

/// NET_ADMIN: addresses, routes, links over netlink. NET_BIND_SERVICE: the DHCP client port
/// 68. NET_RAW: the gateway ping's raw ICMP socket and SO_BINDTODEVICE.
pub const KEPT: [Capability; 3] = [
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
];

#[derive(Debug, thiserror::Error)]
#[error("dropping privileges ({step}): {reason}")]
pub struct PrivError {
    step: &'static str,
    reason: String,
}

fn fail(step: &'static str) -> impl Fn(&dyn std::fmt::Display) -> PrivError {
    move |e| PrivError {
        step,
        reason: e.to_string(),
    }
}

/// Becomes `uid`/`gid` keeping [`KEPT`]. Call on the main thread before any other exists.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivError> {
    let keep: CapsHashSet = KEPT.into_iter().collect();
    // The bounding set first: changing it needs CAP_SETPCAP, which the uid change ends.
    for c in caps::all() {
        if !keep.contains(&c) {
            caps::drop(None, CapSet::Bounding, c).map_err(|e| fail("bounding set")(&e))?;
        }
    }
    // Keep the permitted set across the uid change; it is narrowed right after.
    nix::sys::prctl::set_keepcaps(true).map_err(|e| fail("keepcaps")(&e))?;
    let (u, g) = (
        nix::unistd::Uid::from_raw(uid),
        nix::unistd::Gid::from_raw(gid),
    );
    nix::unistd::setgroups(&[]).map_err(|e| fail("setgroups")(&e))?;
    nix::unistd::setresgid(g, g, g).map_err(|e| fail("setresgid")(&e))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| fail("setresuid")(&e))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| fail("permitted set")(&e))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| fail("effective set")(&e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| fail("inheritable set")(&e))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| fail("no_new_privs")(&e))?;
    Ok(())
}
