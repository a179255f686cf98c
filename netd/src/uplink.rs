//! One wired interface: its DHCP client's socket and timers, the lease put on the interface
//! (address, default route) over netlink, and its line in the status.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use rayos_proto::net::{Lease, Uplink as UplinkStatus};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::dhcp::{Action, Client, Dest, MAX_MESSAGE};
use crate::links::fmt_mac;
use crate::status::Board;

const CLIENT_PORT: u16 = 68;
const SERVER_PORT: u16 = 67;
/// Default routes of uplinks are ordered by this plus the interface index: the first wired
/// interface wins, and two uplinks' routes never replace each other.
const ROUTE_METRIC_BASE: u32 = 100;

const MAX_SLEEP: Duration = Duration::from_secs(60);

/// What the link watcher tells an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    Carrier(bool),
    /// The interface went away (a USB adapter pulled out).
    Gone,
}

pub struct Uplink {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub driver: String,
}

/// Milliseconds of CLOCK_BOOTTIME: the DHCP client's clock, and what lease times in the
/// status are counted in.
pub fn now_ms() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
    t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000
}

/// A UDP socket on port 68 of this interface only, allowed to broadcast. Several such
/// sockets (one per uplink) share the port: SO_REUSEADDR plus a different bound device each.
fn dhcp_socket(name: &str) -> std::io::Result<UdpSocket> {
    crate::sock::on_device(
        name,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT),
        true,
    )
}

fn xid_seed(mac: &[u8; 6]) -> u32 {
    let mut b = [0u8; 4];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    let seed = if random.is_ok() {
        u32::from_ne_bytes(b)
    } else {
        now_ms() as u32 ^ u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
    };
    // xorshift never leaves 0.
    seed.max(1)
}

/// Runs one uplink until its interface goes away: DHCP on it while it has a carrier.
pub async fn run(
    link: Uplink,
    carrier: bool,
    handle: Handle,
    mut events: mpsc::UnboundedReceiver<LinkEvent>,
    board: Arc<Board>,
) {
    let mut client = Client::new(link.mac, xid_seed(&link.mac));
    let mut carrier_now = false;
    // When the cable came in, until the lease that follows is on (bench net reads the log).
    let mut carrier_at: Option<u64> = None;
    let mut problem = String::new();
    let mut rtt_us = 0u64;
    // Ping answers come back here, tagged with the lease they were for.
    let (rtt_tx, mut rtt_rx) = mpsc::unbounded_channel::<(Ipv4Addr, u64)>();
    let mut ping_seq = 0u16;
    let publish = |client: &Client, carrier: bool, problem: &str, rtt_us: u64| {
        board.set(UplinkStatus {
            name: link.name.clone(),
            mac: fmt_mac(&link.mac),
            driver: link.driver.clone(),
            carrier,
            state: client.state(),
            lease: client.lease().cloned(),
            gateway_rtt_us: rtt_us,
            problem: problem.to_string(),
        })
    };
    let sock = match dhcp_socket(&link.name) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("cannot open the DHCP socket on {}: {e}", link.name);
            warn!("{msg}");
            publish(&client, carrier, &msg, 0);
            // Keep the line in the status until the interface goes; nothing else to do.
            while let Some(ev) = events.recv().await {
                if ev == LinkEvent::Gone {
                    break;
                }
            }
            board.remove(&link.name);
            return;
        }
    };
    info!(
        "{}: wired uplink ({}, {}), carrier {}",
        link.name,
        fmt_mac(&link.mac),
        if link.driver.is_empty() {
            "driver unknown"
        } else {
            &link.driver
        },
        if carrier { "on" } else { "off" }
    );
    let mut pending = Vec::new();
    if carrier {
        carrier_now = true;
        carrier_at = Some(now_ms());
        pending = client.link_up(now_ms());
    }
    publish(&client, carrier_now, &problem, rtt_us);
    let mut buf = vec![0u8; MAX_MESSAGE + 512];
    let mut ignored_logged = 0u64;
    loop {
        // A lease that could not be applied brings follow-up actions (its drop).
        let mut failed = false;
        while !pending.is_empty() {
            for a in std::mem::take(&mut pending) {
                let is_apply = matches!(a, Action::Apply(_));
                let applied = match &a {
                    Action::Apply(l) => l.gateway.map(|g| (l.address, g)),
                    Action::Drop(_) => {
                        rtt_us = 0;
                        None
                    }
                    Action::Send { .. } => None,
                };
                match act(&link, &handle, &sock, a, &mut carrier_at).await {
                    Err(e) => {
                        warn!("{}: {e}", link.name);
                        // The first failure is the one to show: the drop after a refused
                        // lease usually fails too, for want of what was refused.
                        if !failed {
                            problem = e;
                            failed = true;
                        }
                        if is_apply {
                            // Not on the interface: take off whatever went on, ask again later
                            // (the client backs off), rather than show a lease that is not there.
                            pending.extend(client.apply_failed(now_ms()));
                        }
                    }
                    Ok(()) => {
                        if is_apply {
                            problem.clear();
                        }
                        if let Some((addr, gw)) = applied {
                            ping_seq = ping_seq.wrapping_add(1);
                            spawn_ping(link.name.clone(), addr, gw, ping_seq, rtt_tx.clone());
                        }
                    }
                }
            }
        }
        publish(&client, carrier_now, &problem, rtt_us);
        // The deadlines are CLOCK_BOOTTIME, tokio's sleep is monotonic (it stops while the
        // machine is suspended): a sleep of at most a minute rechecks the lease after a resume.
        let sleep = match client.deadline() {
            Some(d) => Duration::from_millis(d.saturating_sub(now_ms())),
            None => MAX_SLEEP,
        }
        .min(MAX_SLEEP);
        tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) => match client.on_packet(&buf[..n], now_ms()) {
                    Ok(actions) => pending = actions,
                    Err(why) => {
                        // Other machines' DHCP traffic, and a second offer for a repeated
                        // DISCOVER, are normal on a LAN: logged at debug level, anything
                        // else at most once a minute.
                        if matches!(why, crate::dhcp::Ignored::NotOurs | crate::dhcp::Ignored::Unexpected(..)) || now_ms() < ignored_logged {
                            debug!("{}: ignored a packet from {from}: {why}", link.name);
                        } else {
                            ignored_logged = now_ms() + 60_000;
                            warn!("{}: ignored a packet from {from}: {why}", link.name);
                        }
                    }
                },
                Err(e) => {
                    warn!("{}: receiving on the DHCP socket: {e}", link.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            _ = tokio::time::sleep(sleep) => pending = client.on_timer(now_ms()),
            Some((addr, us)) = rtt_rx.recv() => {
                // Only for the lease still held (a late answer for a dropped one is stale).
                if client.lease().map(|l| l.address) == Some(addr) {
                    rtt_us = us.max(1);
                }
            }
            ev = events.recv() => match ev {
                Some(LinkEvent::Carrier(true)) if !carrier_now => {
                    info!("{}: cable in, asking for an address", link.name);
                    carrier_now = true;
                    carrier_at = Some(now_ms());
                    problem.clear();
                    pending = client.link_up(now_ms());
                }
                Some(LinkEvent::Carrier(false)) if carrier_now => {
                    info!("{}: cable out", link.name);
                    carrier_now = false;
                    pending = client.link_down();
                }
                Some(LinkEvent::Carrier(_)) => {}
                Some(LinkEvent::Gone) | None => {
                    info!("{}: interface gone", link.name);
                    break;
                }
            },
        }
    }
    board.remove(&link.name);
}

/// Pings the gateway a few times until it answers; the round trip goes to `tx`.
fn spawn_ping(
    dev: String,
    addr: Ipv4Addr,
    gw: Ipv4Addr,
    seq: u16,
    tx: mpsc::UnboundedSender<(Ipv4Addr, u64)>,
) {
    tokio::task::spawn_blocking(move || {
        let mut last = None;
        for i in 0..5u16 {
            match crate::ping::ping(
                gw,
                &dev,
                seq.wrapping_mul(8).wrapping_add(i),
                Duration::from_secs(1),
            ) {
                Ok(rtt) => {
                    info!(
                        "{dev}: the gateway {gw} answers ({:.1} ms)",
                        rtt.as_secs_f64() * 1000.0
                    );
                    let _ = tx.send((addr, rtt.as_micros() as u64));
                    return;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            warn!("{dev}: the gateway {gw} does not answer a ping: {e}");
        }
    });
}

/// Carries out one action; the error is the problem the status shows.
async fn act(
    link: &Uplink,
    handle: &Handle,
    sock: &UdpSocket,
    a: Action,
    carrier_at: &mut Option<u64>,
) -> Result<(), String> {
    match a {
        Action::Send { packet, to } => {
            let dest = match to {
                Dest::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT),
                Dest::Unicast(ip) => SocketAddrV4::new(ip, SERVER_PORT),
            };
            sock.send_to(&packet, dest)
                .await
                .map(|_| ())
                .map_err(|e| format!("sending a DHCP message to {dest}: {e}"))
        }
        Action::Apply(lease) => {
            apply(link, handle, &lease).await.map_err(|e| {
                format!(
                    "putting {}/{} on the interface: {e}",
                    lease.address, lease.prefix_len
                )
            })?;
            let since = carrier_at
                .take()
                .map(|t| {
                    format!(
                        ", {} ms after the cable came in",
                        now_ms().saturating_sub(t)
                    )
                })
                .unwrap_or_default();
            info!(
                "{}: bound to {}/{} gateway {} dns {} for {} s (server {}){since}",
                link.name,
                lease.address,
                lease.prefix_len,
                lease
                    .gateway
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "none".into()),
                if lease.dns.is_empty() {
                    "none".to_string()
                } else {
                    lease
                        .dns
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                },
                lease.lease_secs,
                lease.server
            );
            Ok(())
        }
        Action::Drop(lease) => {
            info!(
                "{}: {}/{} off the interface",
                link.name, lease.address, lease.prefix_len
            );
            remove(link, handle, &lease)
                .await
                .map_err(|e| format!("taking {} off the interface: {e}", lease.address))
        }
    }
}

fn default_route(
    link: &Uplink,
    lease: &Lease,
    gw: Ipv4Addr,
) -> rtnetlink::packet_route::route::RouteMessage {
    let b = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gw)
        .output_interface(link.index)
        .priority(ROUTE_METRIC_BASE + link.index)
        .protocol(RouteProtocol::Dhcp)
        .scope(RouteScope::Universe);
    // A gateway outside the leased prefix (a /32 lease, some ISPs' layouts) is still on the
    // link: say so, or the kernel refuses the route as unreachable.
    if on_link(lease.address, lease.prefix_len, gw) {
        b.build()
    } else {
        b.onlink().build()
    }
}

/// Whether `gw` is inside `addr/prefix_len`.
pub fn on_link(addr: Ipv4Addr, prefix_len: u8, gw: Ipv4Addr) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    u32::from(addr) & mask == u32::from(gw) & mask
}

async fn apply(link: &Uplink, handle: &Handle, lease: &Lease) -> Result<(), rtnetlink::Error> {
    let mut add = handle
        .address()
        .add(link.index, IpAddr::V4(lease.address), lease.prefix_len)
        .replace();
    // The kernel ends the address with the lease, even if netd is gone by then (a crash, a
    // restart that gets another address); each renewal sets the times again.
    let left =
        (lease.expires_ms.saturating_sub(now_ms()) / 1000).min(u64::from(u32::MAX - 1)) as u32;
    let mut times = rtnetlink::packet_route::address::CacheInfo::default();
    times.ifa_preferred = left;
    times.ifa_valid = left;
    add.message_mut()
        .attributes
        .push(AddressAttribute::CacheInfo(times));
    add.execute().await?;
    if let Some(gw) = lease.gateway {
        handle
            .route()
            .add(default_route(link, lease, gw))
            .replace()
            .execute()
            .await?;
    }
    Ok(())
}

async fn remove(link: &Uplink, handle: &Handle, lease: &Lease) -> Result<(), rtnetlink::Error> {
    if let Some(gw) = lease.gateway {
        // Gone already when the kernel dropped it with the address or the link: fine.
        if let Err(e) = handle
            .route()
            .del(default_route(link, lease, gw))
            .execute()
            .await
        {
            debug!("{}: default route via {gw}: {e}", link.name);
        }
    }
    let mut msg = rtnetlink::packet_route::address::AddressMessage::default();
    msg.header.family = rtnetlink::packet_route::AddressFamily::Inet;
    msg.header.index = link.index;
    msg.header.prefix_len = lease.prefix_len;
    msg.attributes
        .push(AddressAttribute::Local(IpAddr::V4(lease.address)));
    msg.attributes
        .push(AddressAttribute::Address(IpAddr::V4(lease.address)));
    handle.address().del(msg).execute().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateways_outside_the_prefix_are_told_apart() {
        let a = Ipv4Addr::new(10, 0, 2, 15);
        assert!(on_link(a, 24, Ipv4Addr::new(10, 0, 2, 2)));
        assert!(!on_link(a, 24, Ipv4Addr::new(10, 0, 3, 1)));
        assert!(
            !on_link(a, 32, Ipv4Addr::new(10, 0, 2, 2)),
            "a /32 has no neighbour"
        );
        assert!(on_link(a, 0, Ipv4Addr::new(192, 168, 1, 1)));
    }
}
