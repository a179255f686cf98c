//! Both ends of `cargo rayos bench nat` (issue #16's benchmark), run inside the outer machine
//! of a nested-KVM run, where `rayos-vmm-testinit` is PID 1 and plays RayOS's part.
//!
//! - `rayos-natbench host …` is RayOS: it starts the NAT exactly as netd does
//!   ([`netd::nat::run`]: the bridge, forwarding, the nf_tables ruleset, the DHCP server and
//!   the DNS forwarder), makes the VM's tap as rayosd does ([`netd::vmlink::prepare`]), and
//!   boots one guest again and again with two network cards:
//!   - card 1 on the NAT bridge, the way a `network = "nat"` VM is connected;
//!   - card 2 on a plain tap, the baseline, moved (once the VMM has it) into a second
//!     namespace, the *router* (`rayos-natbench router`), which only forwards: no bridge, no
//!     nf_tables, no connection tracking, no address translation.
//! - `rayos-natbench sink` is the machine the VM talks to: a TCP sink in a network namespace
//!   of its own, reached from RayOS's namespace over one veth pair (10.75.0.2, the NAT's way
//!   out, as the uplink would be) and from the router's over another (10.76.0.2). A sink in
//!   RayOS's own namespace would be RayOS itself, which the NAT's rules keep VMs from.
//! - As a guest's `/init` (PID 1), it is the guest: it brings its NAT card up and takes a
//!   lease with netd's own DHCP client ([`netd::uplink::run`]), timing from the moment it
//!   sets the card up to the lease being on it; then it sends the same amount of data to
//!   the sink both ways in turn, plain and NAT alternating, and prints one line per figure
//!   (`natbench-guest: …`) on its console, which the host passes on.
//!
//! Both paths are tap → forwarding → veth → sink; what the NAT path does on top (the bridge,
//! the ruleset, conntrack, masquerade) is the NAT's own cost, the figure issue #16 asks for.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures_util::TryStreamExt;
use netd::links::Link;
use netd::status::Board;
use netd::uplink::{LinkEvent, Uplink};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

const SINK_PORT: u16 = 5001;
/// The plain card's tap: made by the VMM, then moved into the router's namespace.
const PLAIN_TAP: &str = "natb-plain";
const PLAIN_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 74, 0, 1);
const PLAIN_GUEST: Ipv4Addr = Ipv4Addr::new(10, 74, 0, 2);
const PLAIN_NET: Ipv4Addr = Ipv4Addr::new(10, 74, 0, 0);
/// RayOS's namespace ↔ the sink's: the NAT's way out.
const VETH_NEAR: &str = "natb-near";
const VETH_FAR: &str = "natb-far";
const FAR_NEAR: Ipv4Addr = Ipv4Addr::new(10, 75, 0, 1);
const FAR_SINK: Ipv4Addr = Ipv4Addr::new(10, 75, 0, 2);
/// The router's namespace ↔ the sink's: the plain path's way out.
const VETH_ROUTER: &str = "natb-pr";
const VETH_ROUTED: &str = "natb-ps";
const ROUTED_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 1);
const ROUTED_SINK: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 2);
const ROUTED_NET: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 0);
/// The guest's plain card (the NAT card's comes from the VM's UUID, as rayosd's does).
const PLAIN_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x4e, 0x42, 0x01];
const GUEST_UUID: [u8; 16] = *b"rayos-natbench-1";
/// The line the guest prints each figure on, passed on by the host.
const GUEST_TAG: &str = "natbench-guest:";

#[derive(Parser)]
#[command(
    name = "rayos-natbench",
    about = "cargo rayos bench nat's host, sink and guest"
)]
struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// RayOS's side: the NAT, the taps, the sinks, and the guest's boots.
    Host {
        #[arg(long, default_value = "/rayos-vmm")]
        vmm: PathBuf,
        #[arg(long, default_value = "/guest/bzImage")]
        kernel: PathBuf,
        #[arg(long, default_value = "/guest/initrd")]
        initrd: PathBuf,
        /// Guest boots (each takes one lease). These three come from `cargo rayos bench nat`,
        /// which owns their defaults.
        #[arg(long)]
        boots: u32,
        /// Transfers per path per boot, plain and NAT alternating.
        #[arg(long)]
        pairs: u32,
        /// MiB per transfer.
        #[arg(long)]
        mib: u32,
    },
    /// The far end: a TCP sink in a network namespace of its own.
    Sink,
    /// The plain path's forwarder: a network namespace with forwarding and nothing else.
    Router,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .init();
    if std::process::id() == 1 {
        guest();
    }
    match Args::parse().role {
        Role::Host {
            vmm,
            kernel,
            initrd,
            boots,
            pairs,
            mib,
        } => host(&Host {
            vmm,
            kernel,
            initrd,
            boots,
            pairs,
            mib,
        }),
        Role::Sink => sink(),
        Role::Router => router(),
    }
}

/// Runs `f` on a single-threaded runtime with a netlink connection of its own (each role is
/// its own process, most in a namespace of their own, so each needs its own socket).
fn with_netlink<T, F: std::future::Future<Output = Result<T>>>(
    f: impl FnOnce(Handle) -> F,
) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            f(handle).await
        })
}

/// Takes whatever is sent on each connection until the sender closes its side, then answers
/// with the byte count (8 bytes, little-endian), so that the sender's clock covers delivery.
/// A connection must come from where its path leads: on the NAT's side from RayOS's address
/// (masqueraded), on the router's side from the guest's own (forwarded untouched). Any other
/// is closed unanswered, so a NAT that forwards without translating, or a plain path that
/// went through the NAT, fails the benchmark instead of being measured as if it worked.
fn serve_sink(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut c) = conn else { continue };
        let (Ok(local), Ok(peer)) = (c.local_addr(), c.peer_addr()) else {
            continue;
        };
        let want = if local.ip() == IpAddr::V4(FAR_SINK) {
            FAR_NEAR
        } else {
            PLAIN_GUEST
        };
        if peer.ip() != IpAddr::V4(want) {
            eprintln!(
                "sink: refused a connection from {peer} to {local}: it should come from {want}"
            );
            continue;
        }
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                match c.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = c.write_all(&total.to_le_bytes());
        });
    }
}

async fn index_of(handle: &Handle, name: &str) -> Result<Option<Link>> {
    let mut found = handle.link().get().match_name(name.to_string()).execute();
    match found.try_next().await {
        Ok(m) => Ok(m.as_ref().and_then(Link::from_message)),
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up {name}")),
    }
}

async fn need(handle: &Handle, name: &str) -> Result<Link> {
    index_of(handle, name)
        .await?
        .with_context(|| format!("no interface {name}"))
}

async fn address_up(handle: &Handle, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<()> {
    let l = need(handle, name).await?;
    handle
        .address()
        .add(l.index, IpAddr::V4(addr), prefix)
        .replace()
        .execute()
        .await
        .with_context(|| format!("{name}: adding {addr}/{prefix}"))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(l.index).up().build())
        .execute()
        .await
        .with_context(|| format!("{name}: setting it up"))
}

/// Waits (up to 20 s) for `name` to come into this namespace.
async fn wait_for_link(handle: &Handle, name: &str) -> Result<Link> {
    let t0 = Instant::now();
    loop {
        if let Some(l) = index_of(handle, name).await? {
            return Ok(l);
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("{name} never came into this namespace");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn lo_up(handle: &Handle) -> Result<()> {
    let lo = need(handle, "lo").await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(lo.index).up().build())
        .execute()
        .await?;
    Ok(())
}

async fn route_via(handle: &Handle, net: Ipv4Addr, prefix: u8, gw: Ipv4Addr) -> Result<()> {
    let r = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(net, prefix)
        .gateway(gw)
        .build();
    handle
        .route()
        .add(r)
        .replace()
        .execute()
        .await
        .with_context(|| format!("a route to {net}/{prefix} via {gw}"))
}

/// A namespace of our own (before any thread), said on stdout for the host to act on.
fn own_namespace(who: &str) -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET): is CONFIG_NET_NS on?")?;
    println!("{who}: in its own namespace");
    Ok(())
}

fn sink() -> Result<()> {
    own_namespace("sink")?;
    with_netlink(|handle| async move {
        // The host moves the veths' ends in once it has read the line above.
        wait_for_link(&handle, VETH_FAR).await?;
        wait_for_link(&handle, VETH_ROUTED).await?;
        lo_up(&handle).await?;
        address_up(&handle, VETH_FAR, FAR_SINK, 30).await?;
        address_up(&handle, VETH_ROUTED, ROUTED_SINK, 30).await?;
        // The plain path's answers go back through the router; the NAT's need no route
        // (masqueraded, they come from the veth's other end).
        route_via(&handle, PLAIN_NET, 30, ROUTED_ROUTER).await
    })?;
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SINK_PORT))
        .context("the sink's port")?;
    println!("sink: listening on {FAR_SINK}:{SINK_PORT} and {ROUTED_SINK}:{SINK_PORT}");
    serve_sink(listener);
    Ok(())
}

/// Forwards between the plain tap and the sink, and configures the plain tap each time the
/// host moves a new one in (one per guest boot: the VMM makes it, it goes with the VMM).
fn router() -> Result<()> {
    own_namespace("router")?;
    with_netlink(|handle| async move {
        wait_for_link(&handle, VETH_ROUTER).await?;
        lo_up(&handle).await?;
        address_up(&handle, VETH_ROUTER, ROUTED_ROUTER, 30).await?;
        // This namespace's own forwarding switch (/proc/sys/net is per namespace).
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .context("turning forwarding on in the router")?;
        println!("router: ready");
        let mut configured = None;
        loop {
            match index_of(&handle, PLAIN_TAP).await? {
                Some(l) if configured != Some(l.index) => {
                    address_up(&handle, PLAIN_TAP, PLAIN_ROUTER, 30).await?;
                    configured = Some(l.index);
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Starts `rayos-natbench <role>` and waits for it to be in its own namespace.
fn start_role(role: &str) -> Result<(std::process::Child, BufReader<std::process::ChildStdout>)> {
    let mut child = Command::new("/proc/self/exe")
        .arg(role)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the {role}"))?;
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    expect_line(&mut out, role, "own namespace")?;
    Ok((child, out))
}

fn expect_line(
    out: &mut BufReader<std::process::ChildStdout>,
    who: &str,
    what: &str,
) -> Result<()> {
    let mut line = String::new();
    out.read_line(&mut line)?;
    if !line.contains(what) {
        bail!("the {who} did not say `{what}`: {line:?}");
    }
    print!("{line}");
    Ok(())
}

/// A veth pair made here with each end given to the namespace of `pids` (None: stays here).
async fn veth(handle: &Handle, ends: [(&str, Option<u32>); 2]) -> Result<()> {
    handle
        .link()
        .add(LinkVeth::new(ends[0].0, ends[1].0).build())
        .execute()
        .await
        .context("making a veth pair (is CONFIG_VETH on?)")?;
    for (name, pid) in ends {
        if let Some(pid) = pid {
            let l = need(handle, name).await?;
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(l.index)
                        .setns_by_pid(pid)
                        .build(),
                )
                .execute()
                .await
                .with_context(|| format!("moving {name} into process {pid}'s namespace"))?;
        }
    }
    Ok(())
}

struct Host {
    vmm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    boots: u32,
    pairs: u32,
    mib: u32,
}

fn host(h: &Host) -> Result<()> {
    let (mut sink, mut sink_out) = start_role("sink")?;
    let (mut router, mut router_out) = start_role("router")?;
    let (sink_pid, router_pid) = (sink.id(), router.id());
    let r = with_netlink(|handle| async move {
        veth(&handle, [(VETH_NEAR, None), (VETH_FAR, Some(sink_pid))]).await?;
        veth(
            &handle,
            [
                (VETH_ROUTER, Some(router_pid)),
                (VETH_ROUTED, Some(sink_pid)),
            ],
        )
        .await?;
        address_up(&handle, VETH_NEAR, FAR_NEAR, 30).await?;
        expect_line(&mut sink_out, "sink", "listening")?;
        expect_line(&mut router_out, "router", "ready")?;

        // The NAT, started as netd starts it.
        let board = Arc::new(Board::new(PathBuf::from("/run/natbench/status.json")));
        tokio::spawn(netd::nat::run(handle.clone(), board.clone()));
        let t0 = Instant::now();
        loop {
            let n = board.nat_status();
            if n.ready {
                break;
            }
            if !n.problem.is_empty() || t0.elapsed() > Duration::from_secs(20) {
                bail!("the NAT did not come up: {}", n.problem);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let nat_tap = netd::vmlink::prepare(0).await?;
        println!("natbench: NAT ready; the guest's NAT card is on {nat_tap}, its plain card on {PLAIN_TAP} (in the router)");

        for boot in 1..=h.boots {
            let spec = guest_spec(h, &nat_tap, boot);
            let path = format!("/run/natbench/guest-{boot}.json");
            std::fs::write(&path, spec.to_string())?;
            let vmm = h.vmm.clone();
            let guest = tokio::task::spawn_blocking(move || run_guest(&vmm, &path));
            // The VMM makes the plain tap here; it goes to the router, which sets it up.
            let tap = wait_for_link(&handle, PLAIN_TAP).await?;
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(tap.index)
                        .setns_by_pid(router_pid)
                        .build(),
                )
                .execute()
                .await
                .context("moving the plain tap into the router's namespace")?;
            if !guest.await?? {
                bail!("boot {boot}: the guest did not finish its measurements");
            }
        }
        println!("natbench: host done, {} boots", h.boots);
        Ok(())
    });
    let _ = sink.kill();
    let _ = router.kill();
    r
}

fn guest_spec(h: &Host, nat_tap: &str, boot: u32) -> serde_json::Value {
    serde_json::json!({
        "name": format!("natbench-{boot}"),
        "vcpus": 1,
        "memory_mib": 512,
        "kernel": h.kernel,
        "initramfs": h.initrd,
        "cmdline": format!("console=ttyS0 quiet natbench.mib={} natbench.pairs={}", h.mib, h.pairs),
        "serial_stdout": true,
        "net": [
            { "tap": nat_tap, "mac": rayos_proto::net::vm_mac(&GUEST_UUID) },
            { "tap": PLAIN_TAP, "mac": PLAIN_MAC },
        ],
    })
}

/// Boots the guest once and passes its figures on; true when it said it was done.
fn run_guest(vmm: &std::path::Path, spec: &str) -> Result<bool> {
    let mut child = Command::new(vmm)
        .args(["--spec", spec])
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", vmm.display()))?;
    let out = BufReader::new(child.stdout.take().expect("piped"));
    let mut done = false;
    // The guest powers off when it is done or fails; its console ends with it.
    for l in out.lines() {
        let l = l?;
        if let Some(at) = l.find(GUEST_TAG) {
            let rest = l[at..].trim_end();
            println!("{rest}");
            done |= rest == format!("{GUEST_TAG} done");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("natbench: the VMM ended with {status}");
    }
    Ok(done)
}

// ---- the guest ----

fn mount(src: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let _ = nix::mount::mount(
        Some(src),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
}

fn guest() -> ! {
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("tmpfs", "/run", "tmpfs");
    match guest_run() {
        Ok(()) => println!("{GUEST_TAG} done"),
        Err(e) => println!("{GUEST_TAG} FAIL {e:#}"),
    }
    let _ = std::io::stdout().flush();
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn cmdline_number(cmdline: &str, key: &str, default: u32) -> u32 {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(default)
}

fn guest_run() -> Result<()> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mib = cmdline_number(&cmdline, "natbench.mib", 64);
    let pairs = cmdline_number(&cmdline, "natbench.pairs", 3);
    let nat_mac = rayos_proto::net::vm_mac(&GUEST_UUID);
    with_netlink(|handle| async move {
        let t0 = Instant::now();
        let (nat, plain) = loop {
            let mut links = Vec::new();
            let mut dump = handle.link().get().execute();
            while let Some(m) = dump.try_next().await? {
                links.extend(Link::from_message(&m));
            }
            let by_mac = |mac| links.iter().find(|l| l.mac == Some(mac)).cloned();
            if let (Some(n), Some(p)) = (by_mac(nat_mac), by_mac(PLAIN_MAC)) {
                break (n, p);
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!(
                    "the two network cards did not show up within 20 s (found {:?})",
                    links.iter().map(|l| &l.name).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let lo = need(&handle, "lo").await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo.index).up().build())
            .execute()
            .await?;
        address_up(&handle, &plain.name, PLAIN_GUEST, 30).await?;
        route_via(&handle, ROUTED_NET, 30, PLAIN_ROUTER).await?;

        // The lease: from setting the card up to its lease being on it (address and route).
        let up_at = Instant::now();
        handle
            .link()
            .set(LinkUnspec::new_with_index(nat.index).up().build())
            .execute()
            .await?;
        while !need(&handle, &nat.name).await?.carrier {
            if up_at.elapsed() > Duration::from_secs(10) {
                bail!("{}: no carrier within 10 s of setting it up", nat.name);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let board = Arc::new(Board::new(PathBuf::from("/run/netd/status.json")));
        let (events, rx) = tokio::sync::mpsc::unbounded_channel::<LinkEvent>();
        let uplink = Uplink {
            index: nat.index,
            name: nat.name.clone(),
            mac: nat_mac,
            driver: "virtio_net".into(),
        };
        tokio::spawn(netd::uplink::run(
            uplink,
            true,
            handle.clone(),
            rx,
            board.clone(),
        ));
        let lease = loop {
            if let Some(l) = board.uplink(&nat.name).and_then(|u| u.lease) {
                break l;
            }
            if up_at.elapsed() > Duration::from_secs(30) {
                bail!("{}: no lease within 30 s", nat.name);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let lease_ms = up_at.elapsed().as_millis();
        println!(
            "{GUEST_TAG} lease ms={lease_ms} address={} gateway={:?}",
            lease.address, lease.gateway
        );

        let r = tokio::task::spawn_blocking(move || {
            for _ in 0..pairs {
                for (path, to) in [("plain", ROUTED_SINK), ("nat", FAR_SINK)] {
                    let (bytes, took) = send(to, mib)
                        .with_context(|| format!("the {path} path to {to}:{SINK_PORT}"))?;
                    let kib_s = bytes as u128 * 1000 / 1024 / took.as_millis().max(1);
                    println!(
                        "{GUEST_TAG} {path} bytes={bytes} ms={} kib_s={kib_s}",
                        took.as_millis()
                    );
                }
            }
            Ok::<(), anyhow::Error>(())
        })
        .await?;
        drop(events);
        r
    })
}

/// Sends `mib` MiB to the sink at `to` and waits for its count: bytes and time taken.
fn send(to: Ipv4Addr, mib: u32) -> Result<(u64, Duration)> {
    let t0 = Instant::now();
    let mut c = TcpStream::connect_timeout(
        &SocketAddrV4::new(to, SINK_PORT).into(),
        Duration::from_secs(10),
    )?;
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    let chunk = vec![0x5au8; 256 << 10];
    let total = u64::from(mib) << 20;
    let mut sent = 0u64;
    while sent < total {
        c.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    c.read_exact(&mut count).with_context(|| format!("the sink closed without a count (the far one takes only connections masqueraded to {FAR_NEAR})"))?;
    let got = u64::from_le_bytes(count);
    if got != sent {
        bail!("the sink counted {got} bytes of {sent}");
    }
    Ok((sent, t0.elapsed()))
}
