//! A NAT VM's link: the RayOS bridge ([`NAT_BRIDGE`]) and one persistent tap per VM, an
//! isolated port of it. rayosd (root) prepares a VM's tap before its VMM starts; netd makes
//! the bridge at its own start too, so its DHCP server and DNS forwarder have something to
//! bind to whether or not a NAT VM ran yet. Both make it "if missing": whoever comes first.
//!
//! Why isolated ports: the kernel then forwards no frame from one VM's tap to another's, so
//! VMs cannot reach each other at layer 2; layer 3 between them goes through RayOS's
//! forward chain, which drops it (see [`crate::nft`]).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use futures_util::TryStreamExt;
use rayos_proto::net::NAT_BRIDGE;
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec};

#[derive(Debug, thiserror::Error)]
pub enum VmLinkError {
    #[error("tap {tap}: {what}: {source} (is CONFIG_TUN on, and is the caller root?)")]
    Tap {
        tap: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("{link}: {what}: {source}")]
    Netlink {
        link: String,
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(io::Error),
    #[error("{0} does not exist after it was made")]
    Missing(String),
}

/// The tap of the VM whose own uid is `uid` (one per VM: rayosd refuses two VMs with one
/// uid), at most 15 bytes as interface names must be.
pub fn tap_name(uid: u32) -> String {
    format!("rayvm-{:06x}", uid & 0xff_ffff)
}

/// Makes the bridge if it is missing and sets it up; its index.
pub async fn ensure_bridge(handle: &Handle) -> Result<u32, VmLinkError> {
    if index_of(handle, NAT_BRIDGE).await?.is_none() {
        let made = handle
            .link()
            .add(LinkBridge::new(NAT_BRIDGE).up().build())
            .execute()
            .await;
        // EEXIST: the other of rayosd and netd made it in between.
        if let Err(e) = made {
            if !is_errno(&e, libc::EEXIST) {
                return Err(nl(NAT_BRIDGE, "creating the bridge", e));
            }
        }
    }
    let index = index_of(handle, NAT_BRIDGE)
        .await?
        .ok_or_else(|| VmLinkError::Missing(NAT_BRIDGE.into()))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| nl(NAT_BRIDGE, "setting it up", e))?;
    Ok(index)
}

/// Everything a NAT VM's VMM needs before it starts: the bridge, and the VM's tap (owned by
/// the VM's user `uid`) up as an isolated port of it. Idempotent: a restart or a resume of
/// the same VM finds its tap and uses it again.
pub async fn prepare(uid: u32) -> Result<String, VmLinkError> {
    let tap = tap_name(uid);
    make_persistent_tap(&tap, uid)?;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(VmLinkError::Socket)?;
    let task = tokio::spawn(conn);
    let r = attach(&handle, &tap).await;
    task.abort();
    r.map(|()| tap)
}

/// Removes a VM's tap (the VM was deleted or no longer has a network). A missing tap is fine.
pub async fn remove(uid: u32) -> Result<(), VmLinkError> {
    let tap = tap_name(uid);
    let (conn, handle, _) = rtnetlink::new_connection().map_err(VmLinkError::Socket)?;
    let task = tokio::spawn(conn);
    let r = async {
        if let Some(i) = index_of(&handle, &tap).await? {
            handle
                .link()
                .del(i)
                .execute()
                .await
                .map_err(|e| nl(&tap, "deleting the tap", e))?;
        }
        Ok(())
    }
    .await;
    task.abort();
    r
}

async fn attach(handle: &Handle, tap: &str) -> Result<(), VmLinkError> {
    let bridge = ensure_bridge(handle).await?;
    let index = index_of(handle, tap)
        .await?
        .ok_or_else(|| VmLinkError::Missing(tap.into()))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .controller(bridge)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| nl(tap, "making it a port of the bridge", e))?;
    // Port options go in RTM_NEWLINK's slave data: RTM_SETLINK takes them without a word
    // and changes nothing (the isolation test found a VM reaching another).
    handle
        .link()
        .set_port(LinkBridgePort::new(index).isolated(true).build())
        .execute()
        .await
        .map_err(|e| nl(tap, "isolating its bridge port", e))?;
    Ok(())
}

async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, VmLinkError> {
    let mut found = handle.link().get().match_name(name.to_string()).execute();
    match found.try_next().await {
        Ok(m) => Ok(m.map(|m| m.header.index)),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(name, "looking it up", e)),
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

fn nl(link: &str, what: &'static str, source: rtnetlink::Error) -> VmLinkError {
    VmLinkError::Netlink {
        link: link.into(),
        what,
        source,
    }
}

// The tun driver has no rtnetlink "newlink" (it answers EOPNOTSUPP), so a persistent tap is
// made with its ioctls, as `ip tuntap` does.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;

/// A tap that outlives this process, owned by `uid`, with the flags rayos-vmm opens it with
/// (so attaching to it later changes nothing).
fn make_persistent_tap(name: &str, uid: u32) -> Result<(), VmLinkError> {
    let err = |what, source| VmLinkError::Tap {
        tap: name.into(),
        what,
        source,
    };
    if name.is_empty() || name.len() > 15 {
        return Err(err(
            "its name",
            io::Error::new(io::ErrorKind::InvalidInput, "must be 1-15 bytes"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| err("opening /dev/net/tun", e))?;
    let fd = file.as_raw_fd();
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes on x86-64); `ifr` is that
    // large and lives across the call.
    if unsafe { libc::ioctl(fd, TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
        return Err(err("creating it", io::Error::last_os_error()));
    }
    for (req, arg, what) in [
        (TUNSETOWNER, uid, "giving it to the VM's user"),
        (TUNSETGROUP, uid, "giving it to the VM's group"),
        (TUNSETPERSIST, 1, "making it persistent"),
    ] {
        // SAFETY: these tun ioctls take their argument by value.
        if unsafe { libc::ioctl(fd, req, libc::c_ulong::from(arg)) } < 0 {
            return Err(err(what, io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_an_interface_name_and_follow_the_uid() {
        // VM uids span 2^24 from 2_000_000_000: their low 24 bits tell them apart.
        let a = tap_name(2_000_000_000 + 0xabcdef);
        assert_eq!(
            a,
            format!("rayvm-{:06x}", (2_000_000_000u32 + 0xabcdef) & 0xff_ffff)
        );
        assert_eq!(a.len(), 12);
        let first = 2_000_000_000u32;
        let names: std::collections::HashSet<String> = (0..4096)
            .map(|i| tap_name(first + i * 4093))
            .chain([tap_name(first + (1 << 24) - 1)])
            .collect();
        assert_eq!(names.len(), 4097, "two VM uids share a tap");
    }
}
