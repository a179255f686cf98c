//! The DHCPv4 server of the VMs' private NAT network (RFC 2131 §4.3), as a state machine
//! without I/O: the caller owns the socket on port 67 of the bridge, hands each datagram to
//! [`Server::handle`] with the current time, and broadcasts what comes back to
//! 255.255.255.255:68 on the bridge (the guests have no address yet, and we write no ARP
//! entries for them).
//!
//! Every guest is a potential adversary: the fixed header is checked here before the
//! third-party parser sees it, and all state is bounded by the size of the pool however many
//! hardware addresses a guest invents.
//!
//! Leases live in memory only. A restarted netd loses them, which the guests do not notice:
//! a VM's MAC derives from its UUID, addresses are handed out from a hash of the MAC, and a
//! renewal or init-reboot for a free address of the pool is acknowledged as if remembered.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode, MAGIC};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use rayos_proto::net::{NAT_GATEWAY, NAT_NETWORK, NAT_PREFIX_LEN};

use crate::links::fmt_mac;

/// The largest datagram looked at: the bridge's MTU. Nothing legitimate is bigger, and the
/// options parser's work is bounded by it.
pub const MAX_DATAGRAM: usize = 1500;
/// The lease the VMs get: long enough that a netd restart or a stalled host goes unnoticed,
/// short enough that a deleted VM's address comes back within the hour.
pub const NAT_LEASE: Duration = Duration::from_secs(3600);
/// An offered address is kept for its client this long (a REQUEST follows within
/// milliseconds; a client that never sends one must not hold the address).
const OFFER_HOLD: Duration = Duration::from_secs(60);
/// An address a client declined (someone else answers ARP for it) is not offered for this
/// long (RFC 2131 §3.1.5 leaves the time to the server).
const DECLINE_HOLD: Duration = Duration::from_secs(600);
/// The 236-byte BOOTP header and the 4-byte magic cookie.
const HEADER_LEN: usize = 240;
const COOKIE_AT: usize = 236;
/// The smallest maximum message size a client may announce (RFC 2132 §9.10).
const MIN_MAX_MESSAGE: u16 = 576;
/// Replies are padded to the BOOTP minimum: some old clients and relays drop anything
/// shorter (RFC 1542 §2.1).
const MIN_REPLY: usize = 300;
const HTYPE_ETHERNET: u8 = 1;
const HLEN_ETHERNET: u8 = 6;
const OP_BOOTREQUEST: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Our address on the network: also the guests' router and DNS server.
    pub server: Ipv4Addr,
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    pub lease: Duration,
}

impl ServerConfig {
    /// The NAT network of `rayos_proto::net`: 10.73.0.0/24 served from 10.73.0.1.
    pub fn nat() -> ServerConfig {
        ServerConfig {
            server: NAT_GATEWAY,
            network: NAT_NETWORK,
            prefix_len: NAT_PREFIX_LEN,
            lease: NAT_LEASE,
        }
    }
}

/// A lease in force, for the status and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveLease {
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    /// Until it expires.
    pub left: Duration,
}

/// Why a datagram got no reply. The caller logs these (rate-limited: a guest chooses how
/// many it causes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("oversized: {0} bytes (max 1500)")]
    Oversized(usize),
    #[error("truncated: {0} bytes, shorter than the 240 of the BOOTP header and magic cookie")]
    Truncated(usize),
    #[error("op {0} is not a BOOTREQUEST")]
    NotRequest(u8),
    #[error("hardware type {0} (only Ethernet, 1)")]
    HardwareType(u8),
    #[error("hardware length {0} (only Ethernet, 6)")]
    HardwareLength(u8),
    #[error("no DHCP magic cookie (found {0:02x?})")]
    NoCookie([u8; 4]),
    #[error("undecodable: {0}")]
    Undecodable(String),
    #[error("no DHCP message type")]
    NoMessageType,
    #[error("client hardware address {} is not a unicast one", fmt_mac(.0))]
    NotUnicast([u8; 6]),
    #[error("maximum message size {0} is under the 576-byte minimum")]
    MaxMessageSize(u16),
    #[error("a {0:?} is not a message a client sends")]
    NotFromClient(MessageType),
    #[error("{0} names no address (option 50 or ciaddr)")]
    NoAddress(&'static str),
    #[error("{0} for server {1}, not this one")]
    OtherServer(&'static str, Ipv4Addr),
    #[error("{kind} for {address} which is not this client's")]
    NotTheirs {
        kind: &'static str,
        address: Ipv4Addr,
    },
    #[error("no free address: every one of the pool is leased, offered or declined")]
    PoolExhausted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Held for a client between its DISCOVER and its REQUEST.
    Offered,
    Leased,
    /// Someone else answers for it: kept away from everyone until it expires.
    Declined,
}

/// What one address of the pool is doing. A binding past `until` is free: it is kept only so
/// that its client gets the address back if nobody took it meanwhile.
#[derive(Debug, Clone, Copy)]
struct Binding {
    mac: [u8; 6],
    kind: Kind,
    until: Instant,
}

/// The host addresses of the network but the server's, numbered 0..size.
#[derive(Debug, Clone, Copy)]
struct Pool {
    first: u32,
    last: u32,
    server: u32,
    mask: u32,
    broadcast: u32,
}

impl Pool {
    fn new(cfg: &ServerConfig) -> Pool {
        assert!(
            (1..=30).contains(&cfg.prefix_len),
            "DHCP server: a /{} network has no addresses to give",
            cfg.prefix_len
        );
        let mask = u32::MAX << (32 - cfg.prefix_len);
        let network = u32::from(cfg.network);
        assert_eq!(
            network & !mask,
            0,
            "DHCP server: {} has host bits set",
            cfg.network
        );
        let broadcast = network | !mask;
        let (first, last) = (network + 1, broadcast - 1);
        let server = u32::from(cfg.server);
        assert!(
            (first..=last).contains(&server),
            "DHCP server: {} is not a host of {}/{}",
            cfg.server,
            cfg.network,
            cfg.prefix_len
        );
        Pool {
            first,
            last,
            server,
            mask,
            broadcast,
        }
    }

    fn size(&self) -> u32 {
        // The host range less the server.
        self.last - self.first
    }

    fn nth(&self, i: u32) -> Ipv4Addr {
        let a = self.first + i;
        Ipv4Addr::from(if a >= self.server { a + 1 } else { a })
    }

    fn contains(&self, a: Ipv4Addr) -> bool {
        let a = u32::from(a);
        (self.first..=self.last).contains(&a) && a != self.server
    }
}

pub struct Server {
    cfg: ServerConfig,
    pool: Pool,
    /// Lease seconds, T1 and T2 as sent.
    lease_secs: u32,
    /// At most one binding per pool address: this is what bounds the state.
    by_addr: BTreeMap<Ipv4Addr, Binding>,
    /// A client's offered or leased address (never a declined one).
    by_mac: HashMap<[u8; 6], Ipv4Addr>,
}

impl Server {
    /// # Panics
    /// On a configuration with no address to give (prefix outside 1..=30, host bits in the
    /// network, the server outside it) or a lease outside 1 s..136 years: it is the
    /// program's constant, not input.
    pub fn new(cfg: ServerConfig) -> Server {
        let pool = Pool::new(&cfg);
        let secs = cfg.lease.as_secs();
        // u32::MAX means "infinite" on the wire.
        assert!(
            (1..u64::from(u32::MAX)).contains(&secs),
            "DHCP server: a lease of {secs} s"
        );
        Server {
            cfg,
            pool,
            lease_secs: secs as u32,
            by_addr: BTreeMap::new(),
            by_mac: HashMap::new(),
        }
    }

    /// How many addresses there are to give.
    pub fn pool_size(&self) -> u32 {
        self.pool.size()
    }

    /// The leases in force at `now`, by address (offers are not leases).
    pub fn leases(&self, now: Instant) -> Vec<ActiveLease> {
        self.by_addr
            .iter()
            .filter(|(_, b)| b.kind == Kind::Leased && b.until > now)
            .map(|(a, b)| ActiveLease {
                mac: b.mac,
                address: *a,
                left: b.until - now,
            })
            .collect()
    }

    /// A datagram arrived on port 67: the reply to broadcast, `None` when the message wants
    /// none (RELEASE, DECLINE), or why it got none.
    pub fn handle(&mut self, datagram: &[u8], now: Instant) -> Result<Option<Vec<u8>>, Refused> {
        check_header(datagram)?;
        let msg = decode(datagram)?;
        let kind = msg.opts().msg_type().ok_or(Refused::NoMessageType)?;
        let mac = client_mac(&msg)?;
        if let Some(DhcpOption::MaxMessageSize(n)) = msg.opts().get(OptionCode::MaxMessageSize) {
            if *n < MIN_MAX_MESSAGE {
                return Err(Refused::MaxMessageSize(*n));
            }
        }
        match kind {
            MessageType::Discover => self.discover(&msg, mac, now).map(Some),
            MessageType::Request => self.request(&msg, mac, now).map(Some),
            MessageType::Release => self.release(&msg, mac).map(|()| None),
            MessageType::Decline => self.decline(&msg, mac, now).map(|()| None),
            // A client with an address of its own wants only the options (RFC 2131 §3.4).
            MessageType::Inform => Ok(Some(self.reply(&msg, Answer::InformAck))),
            other => Err(Refused::NotFromClient(other)),
        }
    }

    fn discover(&mut self, msg: &Message, mac: [u8; 6], now: Instant) -> Result<Vec<u8>, Refused> {
        let address = self.choose(mac, requested(msg), now)?;
        // A client that holds a lease and discovers again (a reboot) keeps the lease as it is;
        // anything else is an offer, held for a while.
        if !self.is_live(address, mac, Kind::Leased, now) {
            self.bind(mac, address, Kind::Offered, now + OFFER_HOLD);
        }
        Ok(self.reply(msg, Answer::Offer(address)))
    }

    /// SELECTING (server identifier), RENEWING/REBINDING (ciaddr) and INIT-REBOOT (option 50)
    /// all come down to one question: may this client have that address? We are the only
    /// server of this network, so a free address of the pool is granted even when we do not
    /// remember offering it (a netd restarted between, or since, the client's last exchange).
    fn request(&mut self, msg: &Message, mac: [u8; 6], now: Instant) -> Result<Vec<u8>, Refused> {
        if let Some(id) = server_id(msg) {
            if id != self.cfg.server {
                // The client took another server's offer: ours is free again.
                self.forget_offer(mac, now);
                return Err(Refused::OtherServer("REQUEST", id));
            }
        }
        // RENEWING and REBINDING name the address in ciaddr and must not send option 50;
        // should both come, ciaddr is what the client has configured.
        let address = match server_id(msg) {
            None if !msg.ciaddr().is_unspecified() => msg.ciaddr(),
            _ => requested(msg).ok_or(Refused::NoAddress("REQUEST"))?,
        };
        if let Some(why) = self.refusal(mac, address, now) {
            return Ok(self.reply(msg, Answer::Nak(why)));
        }
        self.bind(mac, address, Kind::Leased, now + self.cfg.lease);
        Ok(self.reply(msg, Answer::Ack(address)))
    }

    fn release(&mut self, msg: &Message, mac: [u8; 6]) -> Result<(), Refused> {
        self.check_server_id(msg, "RELEASE")?;
        let address = msg.ciaddr();
        if address.is_unspecified() {
            return Err(Refused::NoAddress("RELEASE"));
        }
        if !self.is_held_by(address, mac) {
            return Err(Refused::NotTheirs {
                kind: "RELEASE",
                address,
            });
        }
        self.by_addr.remove(&address);
        self.by_mac.remove(&mac);
        Ok(())
    }

    /// Only an address this client was offered or leased can be declined: a guest must not
    /// be able to take addresses out of the pool by naming them.
    fn decline(&mut self, msg: &Message, mac: [u8; 6], now: Instant) -> Result<(), Refused> {
        self.check_server_id(msg, "DECLINE")?;
        let address = requested(msg).ok_or(Refused::NoAddress("DECLINE"))?;
        if !self.is_held_by(address, mac) {
            return Err(Refused::NotTheirs {
                kind: "DECLINE",
                address,
            });
        }
        self.by_mac.remove(&mac);
        self.by_addr.insert(
            address,
            Binding {
                mac,
                kind: Kind::Declined,
                until: now + DECLINE_HOLD,
            },
        );
        Ok(())
    }

    fn check_server_id(&self, msg: &Message, kind: &'static str) -> Result<(), Refused> {
        match server_id(msg) {
            Some(id) if id != self.cfg.server => Err(Refused::OtherServer(kind, id)),
            _ => Ok(()),
        }
    }

    /// The address for a DISCOVER: the client's own, the one it asks for, the first free
    /// one from where its MAC hashes to, one nobody renewed, and last an offer never taken.
    fn choose(
        &mut self,
        mac: [u8; 6],
        asked: Option<Ipv4Addr>,
        now: Instant,
    ) -> Result<Ipv4Addr, Refused> {
        let own = self.by_mac.get(&mac).copied();
        if let Some(a) = own
            .into_iter()
            .chain(asked)
            .find(|a| self.may_take(mac, *a, now))
        {
            return Ok(a);
        }
        if let Some(a) = self.probe(mac, now) {
            return Ok(a);
        }
        self.oldest_offer(now).ok_or(Refused::PoolExhausted)
    }

    /// The first never-bound address from the MAC's hash onwards, else the first expired
    /// one. The hash is ours, not std's: it must not change across builds, so that a VM
    /// gets the address it had before netd restarted.
    fn probe(&self, mac: [u8; 6], now: Instant) -> Option<Ipv4Addr> {
        let size = self.pool.size();
        let start = fnv1a(&mac) % size;
        let mut expired = None;
        for i in 0..size {
            let a = self.pool.nth((start + i) % size);
            match self.by_addr.get(&a) {
                None => return Some(a),
                Some(b) if b.until <= now && expired.is_none() => expired = Some(a),
                Some(_) => {}
            }
        }
        expired
    }

    /// A full pool with offers nobody took: a guest cycling through invented MACs can only
    /// push out other offers, never a lease.
    fn oldest_offer(&self, now: Instant) -> Option<Ipv4Addr> {
        self.by_addr
            .iter()
            .filter(|(_, b)| b.kind == Kind::Offered && b.until > now)
            .min_by_key(|(_, b)| b.until)
            .map(|(a, _)| *a)
    }

    /// Why `mac` may not have `address` (the text of the NAK), or None.
    fn refusal(&self, mac: [u8; 6], address: Ipv4Addr, now: Instant) -> Option<&'static str> {
        if !self.pool.contains(address) {
            Some("address not in this network's pool")
        } else if !self.may_take(mac, address, now) {
            Some("address in use")
        } else {
            None
        }
    }

    /// A pool address that is free, or this client's offer or lease.
    fn may_take(&self, mac: [u8; 6], address: Ipv4Addr, now: Instant) -> bool {
        self.pool.contains(address)
            && match self.by_addr.get(&address) {
                None => true,
                Some(b) if b.until <= now => true,
                Some(b) => b.mac == mac && b.kind != Kind::Declined,
            }
    }

    /// Offered or leased to `mac`, expired or not (a client may release or decline what it
    /// still believes it has).
    fn is_held_by(&self, address: Ipv4Addr, mac: [u8; 6]) -> bool {
        matches!(self.by_addr.get(&address), Some(b) if b.mac == mac && b.kind != Kind::Declined)
    }

    fn is_live(&self, address: Ipv4Addr, mac: [u8; 6], kind: Kind, now: Instant) -> bool {
        matches!(
            self.by_addr.get(&address),
            Some(b) if b.mac == mac && b.kind == kind && b.until > now
        )
    }

    fn forget_offer(&mut self, mac: [u8; 6], now: Instant) {
        if let Some(a) = self.by_mac.get(&mac).copied() {
            if self.is_live(a, mac, Kind::Offered, now) {
                self.by_addr.remove(&a);
                self.by_mac.remove(&mac);
            }
        }
    }

    /// Gives `address` to `mac`, taking it from whoever had it (an expired binding, an
    /// evicted offer) and taking the client's previous address, if another, back.
    fn bind(&mut self, mac: [u8; 6], address: Ipv4Addr, kind: Kind, until: Instant) {
        if let Some(old) = self.by_mac.insert(mac, address) {
            if old != address && self.is_held_by(old, mac) {
                self.by_addr.remove(&old);
            }
        }
        let previous = self.by_addr.insert(address, Binding { mac, kind, until });
        if let Some(p) = previous.filter(|p| p.mac != mac) {
            if self.by_mac.get(&p.mac) == Some(&address) {
                self.by_mac.remove(&p.mac);
            }
        }
    }

    fn reply(&self, req: &Message, answer: Answer) -> Vec<u8> {
        let z = Ipv4Addr::UNSPECIFIED;
        let (yiaddr, ciaddr) = match answer {
            Answer::Offer(a) => (a, z),
            Answer::Ack(a) => (a, req.ciaddr()),
            Answer::InformAck => (z, req.ciaddr()),
            Answer::Nak(_) => (z, z),
        };
        let mut m = Message::new_with_id(req.xid(), ciaddr, yiaddr, z, req.giaddr(), req.chaddr());
        m.set_opcode(Opcode::BootReply);
        m.set_flags(req.flags());
        let o = m.opts_mut();
        o.insert(DhcpOption::ServerIdentifier(self.cfg.server));
        match answer {
            Answer::Nak(why) => {
                o.insert(DhcpOption::MessageType(MessageType::Nak));
                o.insert(DhcpOption::Message(why.to_string()));
            }
            Answer::Offer(_) | Answer::Ack(_) | Answer::InformAck => {
                let kind = match answer {
                    Answer::Offer(_) => MessageType::Offer,
                    _ => MessageType::Ack,
                };
                o.insert(DhcpOption::MessageType(kind));
                self.network_options(o);
                // An INFORM's reply must not carry lease times (RFC 2131 §4.3.5).
                if !matches!(answer, Answer::InformAck) {
                    self.lease_options(o);
                }
            }
        }
        encode(&m)
    }

    fn network_options(&self, o: &mut dhcproto::v4::DhcpOptions) {
        o.insert(DhcpOption::SubnetMask(self.pool.mask.into()));
        o.insert(DhcpOption::Router(vec![self.cfg.server]));
        o.insert(DhcpOption::DomainNameServer(vec![self.cfg.server]));
        o.insert(DhcpOption::BroadcastAddr(self.pool.broadcast.into()));
    }

    fn lease_options(&self, o: &mut dhcproto::v4::DhcpOptions) {
        let secs = u64::from(self.lease_secs);
        o.insert(DhcpOption::AddressLeaseTime(self.lease_secs));
        o.insert(DhcpOption::Renewal((secs / 2) as u32));
        o.insert(DhcpOption::Rebinding((secs * 7 / 8) as u32));
    }
}

#[derive(Debug, Clone, Copy)]
enum Answer {
    Offer(Ipv4Addr),
    Ack(Ipv4Addr),
    InformAck,
    Nak(&'static str),
}

/// The fixed header, checked on the raw bytes: dhcproto takes any hardware length and slices
/// its 16-byte chaddr by it (a panic past 16), and checks neither op nor cookie.
fn check_header(d: &[u8]) -> Result<(), Refused> {
    if d.len() > MAX_DATAGRAM {
        return Err(Refused::Oversized(d.len()));
    }
    if d.len() < HEADER_LEN {
        return Err(Refused::Truncated(d.len()));
    }
    match (d[0], d[1], d[2]) {
        (OP_BOOTREQUEST, HTYPE_ETHERNET, HLEN_ETHERNET) => {}
        (OP_BOOTREQUEST, HTYPE_ETHERNET, hlen) => return Err(Refused::HardwareLength(hlen)),
        (OP_BOOTREQUEST, htype, _) => return Err(Refused::HardwareType(htype)),
        (op, _, _) => return Err(Refused::NotRequest(op)),
    }
    let cookie = [
        d[COOKIE_AT],
        d[COOKIE_AT + 1],
        d[COOKIE_AT + 2],
        d[COOKIE_AT + 3],
    ];
    if cookie != MAGIC {
        return Err(Refused::NoCookie(cookie));
    }
    Ok(())
}

/// dhcproto is a third-party parser facing a hostile guest: beyond the header checked above,
/// its option decoders may assert (0.15 `debug_assert!`s that Rapid Commit is empty), so a
/// panic is caught and refused here rather than taking netd down. The release profile
/// aborts on panic, where this catches nothing: the header checks are what guard there.
fn decode(d: &[u8]) -> Result<Message, Refused> {
    match std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(d))) {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(Refused::Undecodable(e.to_string())),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Refused::Undecodable(format!("the parser panicked: {what}")))
        }
    }
}

/// A broadcast, multicast or all-zero chaddr would have every guest's replies (or none)
/// count as one client's.
fn client_mac(msg: &Message) -> Result<[u8; 6], Refused> {
    let mut mac = [0u8; 6];
    // hlen was checked to be 6 before decoding.
    mac.copy_from_slice(&msg.chaddr()[..6]);
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(Refused::NotUnicast(mac));
    }
    Ok(mac)
}

/// Option 50, else ciaddr.
fn requested(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(a)) => Some(*a),
        _ => Some(msg.ciaddr()).filter(|a| !a.is_unspecified()),
    }
}

fn server_id(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(a)) => Some(*a),
        _ => None,
    }
}

fn encode(m: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(MIN_REPLY);
    m.encode(&mut Encoder::new(&mut buf))
        .expect("encoding into a Vec cannot fail");
    // Zeros after the end option are pad options.
    if buf.len() < MIN_REPLY {
        buf.resize(MIN_REPLY, 0);
    }
    buf
}

/// FNV-1a: fixed, so a MAC hashes to the same place in every build.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests;
