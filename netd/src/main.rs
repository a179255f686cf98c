//! rayos-netd: brings up the machine's wired interfaces and keeps a DHCP lease on each, as
//! rayosd's supervised service. Offline is normal: no interface or no lease delays nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt};
use netd::links::{self, Link};
use netd::status::Board;
use netd::uplink::{self, LinkEvent, Uplink};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, LinkUnspec, MulticastGroup};
use tokio::sync::mpsc;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "rayos-netd",
    version,
    about = "RayOS's wired network: links, DHCP, routes"
)]
struct Args {
    /// Where the state goes (rayosd reads it for `rayosctl net status`).
    #[arg(long, default_value = rayos_proto::net::STATUS_PATH)]
    status: PathBuf,
    /// The sysfs folder that tells wired devices from the rest.
    #[arg(long, default_value = "/sys/class/net")]
    class_net: PathBuf,
}

struct Tracked {
    name: String,
    events: mpsc::UnboundedSender<LinkEvent>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .init();
    let args = Args::parse();
    // Before the runtime starts any thread.
    if nix::unistd::geteuid().is_root() {
        let uid = rayos_proto::net::NETD_UID;
        netd::status::fresh_folder(&args.status, uid)?;
        netd::privs::drop_to(uid, uid)?;
        info!("running as uid {uid} with CAP_NET_ADMIN, CAP_NET_BIND_SERVICE and CAP_NET_RAW only");
    } else {
        info!(
            "not root: keeping uid {} (and whatever capabilities it has)",
            nix::unistd::geteuid()
        );
    }
    // Written from here on as netd's own uid, never as root.
    let board = Arc::new(Board::new(args.status.clone()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args, board))
}

async fn run(args: Args, board: Arc<Board>) -> anyhow::Result<()> {
    // One netlink socket for the link events and our requests.
    let (conn, handle, mut messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
        .context("opening a netlink socket (is CONFIG_NET on?)")?;
    tokio::spawn(conn);
    set_up(&handle, 1, "lo").await;
    // The VMs' private network, beside the uplinks and independent of them.
    tokio::spawn(netd::nat::run(handle.clone(), board.clone()));
    let mut tracked: HashMap<u32, Tracked> = HashMap::new();
    let mut dump = handle.link().get().execute();
    while let Some(m) = dump
        .try_next()
        .await
        .context("listing the network interfaces")?
    {
        if let Some(l) = Link::from_message(&m) {
            on_link(l, &args.class_net, &handle, &board, &mut tracked).await;
        }
    }
    if tracked.is_empty() {
        info!("no wired interface; waiting for one (a USB adapter, a cable in a new port)");
    }
    while let Some((msg, _)) = messages.next().await {
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                if let Some(l) = Link::from_message(&m) {
                    on_link(l, &args.class_net, &handle, &board, &mut tracked).await;
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                if let Some(t) = tracked.remove(&m.header.index) {
                    let _ = t.events.send(LinkEvent::Gone);
                }
            }
            _ => {}
        }
    }
    anyhow::bail!("the kernel closed the netlink socket")
}

async fn set_up(handle: &Handle, index: u32, name: &str) {
    if let Err(e) = handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
    {
        warn!("{name}: cannot set the link up: {e}");
    }
}

/// A link appeared or changed: a new wired one gets an uplink task, a known one hears of its
/// carrier.
async fn on_link(
    l: Link,
    class_net: &Path,
    handle: &Handle,
    board: &Arc<Board>,
    tracked: &mut HashMap<u32, Tracked>,
) {
    if let Some(t) = tracked.get(&l.index) {
        if t.name == l.name {
            let _ = t.events.send(LinkEvent::Carrier(l.carrier));
            return;
        }
        // Renamed (udev-style naming does not run here, but a name can still change).
        let _ = t.events.send(LinkEvent::Gone);
        tracked.remove(&l.index);
    }
    let Some(mac) = l.mac else { return };
    if !links::is_wired(class_net, &l.name) {
        return;
    }
    if !l.up {
        set_up(handle, l.index, &l.name).await;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let up = Uplink {
        index: l.index,
        name: l.name.clone(),
        mac,
        driver: links::driver(class_net, &l.name),
    };
    tokio::spawn(uplink::run(
        up,
        l.carrier,
        handle.clone(),
        rx,
        board.clone(),
    ));
    tracked.insert(
        l.index,
        Tracked {
            name: l.name,
            events: tx,
        },
    );
}
