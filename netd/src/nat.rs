//! RayOS's side of the VMs' private network: the bridge with [`NAT_GATEWAY`] on it,
//! forwarding on, the nf_tables ruleset ([`crate::nft`]), the DHCP server
//! ([`crate::dhcp_server`]) and the DNS forwarder ([`crate::dns`]). Started once with netd;
//! the VMs' taps join the bridge whenever rayosd starts a NAT VM.
//!
//! Nothing here waits for the uplink: a VM gets its lease and its DNS answers (SERVFAIL
//! while offline) whether or not the machine is online.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayos_proto::net::{fmt_mac, NatLease, NAT_BRIDGE, NAT_GATEWAY, NAT_PREFIX_LEN};
use rtnetlink::Handle;
use tokio::net::UdpSocket;
use tracing::{info, warn};

use crate::dhcp_server::{Server, ServerConfig};
use crate::dns;
use crate::status::Board;

const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;

/// Sets the private network up and serves it until netd ends. A step that fails is said in
/// the status (`nat.problem`) and the rest still runs: a lease without masquerade still
/// lets a VM talk to RayOS's DNS forwarder.
pub async fn run(handle: Handle, board: Arc<Board>) {
    let mut problems = Vec::new();
    match set_up(&handle).await {
        Ok(()) => {}
        Err(e) => problems.push(e),
    }
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        problems.push(format!(
            "turning forwarding on (/proc/sys/net/ipv4/ip_forward): {e}"
        ));
    }
    match tokio::task::spawn_blocking(|| crate::nft::install(&crate::nft::NatRules::rayos())).await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("the masquerade rules: {e}")),
        Err(e) => problems.push(format!("the masquerade rules: {e}")),
    }
    let ready = problems.is_empty();
    if ready {
        info!("nat: {NAT_BRIDGE} is {NAT_GATEWAY}/{NAT_PREFIX_LEN}, forwarding and masquerade on");
    } else {
        for p in &problems {
            warn!("nat: {p}");
        }
    }
    board.nat(|n| {
        n.ready = ready;
        n.problem = problems.join("; ");
    });

    let counters = Arc::new(dns::Counters::default());
    match dns_socket() {
        Ok(sock) => {
            let b = board.clone();
            let c = counters.clone();
            tokio::spawn(async move {
                if let Err(e) = dns::serve(Arc::new(sock), move || b.dns_servers(), c).await {
                    warn!("nat: the DNS forwarder stopped: {e}");
                }
            });
        }
        Err(e) => add_problem(
            &board,
            format!("the DNS forwarder on {NAT_GATEWAY}:53: {e}"),
        ),
    }
    {
        let b = board.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let (a, f) = (
                    counters.answered.load(Ordering::Relaxed),
                    counters.failed.load(Ordering::Relaxed),
                );
                b.nat(|n| (n.dns_answered, n.dns_failed) = (a, f));
            }
        });
    }
    match dhcp_socket() {
        Ok(sock) => {
            if let Err(e) = serve_dhcp(sock, &board).await {
                add_problem(&board, format!("the DHCP server stopped: {e}"));
            }
        }
        Err(e) => add_problem(
            &board,
            format!("the DHCP server on {NAT_BRIDGE} port 67: {e}"),
        ),
    }
}

fn add_problem(board: &Board, p: String) {
    warn!("nat: {p}");
    board.nat(|n| {
        n.ready = false;
        if n.problem.is_empty() {
            n.problem = p;
        } else {
            n.problem = format!("{}; {p}", n.problem);
        }
    });
}

async fn set_up(handle: &Handle) -> Result<(), String> {
    let index = crate::vmlink::ensure_bridge(handle)
        .await
        .map_err(|e| e.to_string())?;
    let added = handle
        .address()
        .add(index, IpAddr::V4(NAT_GATEWAY), NAT_PREFIX_LEN)
        .replace()
        .execute()
        .await;
    added.map_err(|e| format!("{NAT_BRIDGE}: adding {NAT_GATEWAY}/{NAT_PREFIX_LEN}: {e}"))
}

/// The server's socket: port 67 on the bridge alone, broadcasts allowed (the guests have no
/// address to send to yet).
fn dhcp_socket() -> std::io::Result<UdpSocket> {
    crate::sock::on_device(
        NAT_BRIDGE,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SERVER_PORT),
        true,
    )
}

fn dns_socket() -> std::io::Result<UdpSocket> {
    crate::sock::on_device(NAT_BRIDGE, SocketAddrV4::new(NAT_GATEWAY, 53), false)
}

async fn serve_dhcp(sock: UdpSocket, board: &Board) -> std::io::Result<()> {
    let mut server = Server::new(ServerConfig::nat());
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT);
    // Room for one byte more than the largest datagram the server takes, so an oversized
    // one is seen as such and not cut to fit.
    let mut buf = vec![0u8; 2048];
    let mut known: Vec<(String, Ipv4Addr)> = Vec::new();
    let (mut refused, mut answered) = (0u64, 0u64);
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let now = Instant::now();
        match server.handle(&buf[..n], now) {
            Ok(Some(reply)) => {
                answered += 1;
                if let Err(e) = sock.send_to(&reply, to).await {
                    warn!("nat: dhcp: answering {from}: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => {
                // A guest can send these as fast as it likes: said at 1, 2, 4, 8… of them.
                refused += 1;
                if refused.is_power_of_two() {
                    warn!("nat: dhcp: a {n}-byte datagram from {from} got no answer: {e} ({refused} refused so far)");
                }
            }
        }
        let leases: Vec<NatLease> = server
            .leases(now)
            .into_iter()
            .map(|l| NatLease {
                mac: fmt_mac(&l.mac),
                address: l.address,
                expires_ms: crate::uplink::now_ms() + l.left.as_millis() as u64,
            })
            .collect();
        for l in &leases {
            if !known.contains(&(l.mac.clone(), l.address)) {
                info!("nat: dhcp: {} has {}", l.mac, l.address);
            }
        }
        known = leases.iter().map(|l| (l.mac.clone(), l.address)).collect();
        board.nat(|s| {
            s.leases = leases;
            (s.dhcp_answered, s.dhcp_refused) = (answered, refused);
        });
    }
}
