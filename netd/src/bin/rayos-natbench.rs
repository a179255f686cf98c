//! Both ends of `cargo rayos bench nat` (issue #16's benchmark), run inside the outer machine
//! of a nested-KVM run, where `rayos-vmm-testinit` is PID 1 and plays RayOS's part.
//!
//! - `rayos-natbench host …` is RayOS: it starts the NAT exactly as netd does
//!   ([`netd::nat::run`]: the bridge, forwarding, the nf_tables ruleset, the DHCP server and
//!   the DNS forwarder), makes the VM's tap as rayosd does ([`netd::vmlink::prepare`]), and
//!   boots one guest again and again with two network cards:
//!   - card 1 on the NAT bridge, the way a `network = "nat"` VM is connected;
//!   - card 2 on a plain tap with an address on RayOS's side (10.74.0.1/30), the baseline:
//!     no bridge, no forwarding, no address translation.
//! - `rayos-natbench sink` is the machine the VM talks to through the NAT: a TCP sink in a
//!   network namespace of its own behind a veth pair (10.75.0.2), so that what the guest
//!   sends to it is forwarded and masqueraded as it would be to the uplink. (A sink in RayOS's
//!   own namespace would be RayOS itself, which the NAT's rules keep VMs from.) RayOS's own
//!   namespace has the same sink on port 5001 for the plain tap.
//! - As a guest's `/init` (PID 1), it is the guest: it brings its NAT card up and takes a
//!   lease with netd's own DHCP client ([`netd::uplink::run`]), timing from the moment it
//!   sets the card up to the lease being on it; then it sends the same amount of data to
//!   each sink in turn, plain and NAT alternating, and prints one line per figure
//!   (`natbench-guest: …`) on its console, which the host passes on.
//!
//! The NAT path crosses the veth pair as well, which a real uplink would replace with its
//! own driver: the comparison leans against the NAT, if anything.

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
use rtnetlink::{Handle, LinkUnspec, LinkVeth};

const SINK_PORT: u16 = 5001;
const PLAIN_TAP: &str = "natb-plain";
const PLAIN_HOST: Ipv4Addr = Ipv4Addr::new(10, 74, 0, 1);
const PLAIN_GUEST: Ipv4Addr = Ipv4Addr::new(10, 74, 0, 2);
const VETH_NEAR: &str = "natb-near";
const VETH_FAR: &str = "natb-far";
const FAR_NEAR: Ipv4Addr = Ipv4Addr::new(10, 75, 0, 1);
const FAR_SINK: Ipv4Addr = Ipv4Addr::new(10, 75, 0, 2);
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
        /// Guest boots (each takes one lease).
        #[arg(long, default_value_t = 3)]
        boots: u32,
        /// Transfers per path per boot, plain and NAT alternating.
        #[arg(long, default_value_t = 3)]
        pairs: u32,
        /// MiB per transfer.
        #[arg(long, default_value_t = 64)]
        mib: u32,
    },
    /// The far end: a TCP sink in a network namespace of its own.
    Sink,
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
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Takes whatever is sent on each connection until the sender closes its side, then answers
/// with the byte count (8 bytes, little-endian), so that the sender's clock covers delivery.
/// With `only_from`, a connection from any other address is closed unanswered: the far sink
/// takes only what the NAT masqueraded, so a NAT that forwards without translating fails the
/// benchmark instead of being measured as if it worked.
fn serve_sink(listener: TcpListener, only_from: Option<Ipv4Addr>) {
    for conn in listener.incoming() {
        let Ok(mut c) = conn else { continue };
        if let (Some(want), Ok(peer)) = (only_from, c.peer_addr()) {
            if peer.ip() != IpAddr::V4(want) {
                println!("sink: refused a connection from {peer}: not masqueraded to {want}");
                continue;
            }
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

fn sink() -> Result<()> {
    // Before any thread: a namespace of our own, with only `lo` in it.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET): is CONFIG_NET_NS on?")?;
    println!("sink: in its own namespace");
    runtime()?.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let t0 = Instant::now();
        // The host moves the veth's far end in once it has read the line above.
        while index_of(&handle, VETH_FAR).await?.is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("{VETH_FAR} never came into the sink's namespace");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lo = need(&handle, "lo").await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo.index).up().build())
            .execute()
            .await?;
        address_up(&handle, VETH_FAR, FAR_SINK, 30).await?;
        Ok::<(), anyhow::Error>(())
    })?;
    let listener =
        TcpListener::bind(SocketAddrV4::new(FAR_SINK, SINK_PORT)).context("the far sink's port")?;
    println!("sink: listening on {FAR_SINK}:{SINK_PORT}");
    serve_sink(listener, Some(FAR_NEAR));
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
    let mut far = Command::new("/proc/self/exe")
        .arg("sink")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the far sink")?;
    let mut far_out = BufReader::new(far.stdout.take().expect("piped"));
    let mut line = String::new();
    far_out.read_line(&mut line)?;
    if !line.contains("own namespace") {
        bail!("the far sink did not start: {line:?}");
    }
    let rt = runtime()?;
    let r = rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        handle
            .link()
            .add(LinkVeth::new(VETH_NEAR, VETH_FAR).build())
            .execute()
            .await
            .context("making the veth pair (is CONFIG_VETH on?)")?;
        let far_end = need(&handle, VETH_FAR).await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(far_end.index).setns_by_pid(far.id()).build())
            .execute()
            .await
            .context("moving the veth's far end into the sink's namespace")?;
        address_up(&handle, VETH_NEAR, FAR_NEAR, 30).await?;
        line.clear();
        far_out.read_line(&mut line)?;
        if !line.contains("listening") {
            bail!("the far sink did not listen: {line:?}");
        }
        print!("{line}");
        let near = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SINK_PORT)).context("the plain sink's port")?;
        std::thread::spawn(move || serve_sink(near, None));

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
        netd::vmlink::make_persistent_tap(PLAIN_TAP, 0)?;
        address_up(&handle, PLAIN_TAP, PLAIN_HOST, 30).await?;
        println!("natbench: NAT ready; the guest's NAT card is on {nat_tap}, its plain card on {PLAIN_TAP}");

        for boot in 1..=h.boots {
            let spec = guest_spec(h, &nat_tap, boot);
            let path = format!("/run/natbench/guest-{boot}.json");
            std::fs::write(&path, spec.to_string())?;
            let vmm = h.vmm.clone();
            let ok = tokio::task::spawn_blocking(move || run_guest(&vmm, &path)).await??;
            if !ok {
                bail!("boot {boot}: the guest did not finish its measurements");
            }
        }
        println!("natbench: host done, {} boots", h.boots);
        Ok(())
    });
    let _ = far.kill();
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
    runtime()?.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
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
                for (path, to) in [("plain", PLAIN_HOST), ("nat", FAR_SINK)] {
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
