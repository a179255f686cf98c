//! The DHCPv4 client of one interface (RFC 2131 §4.4), as a state machine without I/O: it is
//! fed packets, timer expiries and link changes with the current time, and answers with
//! [`Action`]s (send this, apply that lease, drop it). [`crate::uplink`] does the I/O; the
//! tests here drive every transition with a fake clock.
//!
//! Why our own state machine: the maintained DHCP crates (`dhcproto`) encode and decode
//! messages only, and the client crates there are are either unmaintained or own the socket
//! and the routes in ways that do not fit a supervised, netlink-configured service.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use rayos_proto::net::{DhcpState, Lease};

/// DISCOVER and REQUEST are retried after 1, 2, 4, 8, 16, 16… s (RFC 2131 §4.1 asks for
/// 4 s doubling to 64 s; a desktop wants its address within a second of a lost packet, and a
/// LAN server that missed one DISCOVER answers the next).
const RETRY_FIRST_MS: u64 = 1_000;
const RETRY_MAX_MS: u64 = 16_000;
/// REQUESTs for one offer before going back to DISCOVER.
const REQUEST_TRIES: u32 = 4;
/// While renewing or rebinding, retries come at half the time left, but no more often than
/// this (RFC 2131 §4.4.5).
const RENEW_RETRY_MIN_MS: u64 = 60_000;
/// After a NAK, or a lease that could not be put on the interface, the next DISCOVER waits
/// this long, doubling up to [`AFTER_FAILURE_MAX_MS`] while failures follow each other: a
/// server that refuses every request must not get a DISCOVER-OFFER-REQUEST-NAK loop at wire
/// speed.
const AFTER_FAILURE_FIRST_MS: u64 = 1_000;
const AFTER_FAILURE_MAX_MS: u64 = 60_000;
/// A lease without a lease time (option 51) lasts this long.
const DEFAULT_LEASE_SECS: u32 = 3600;
/// A lease shorter than this is taken as this long: a server offering seconds would have us
/// renewing in a loop.
const MIN_LEASE_SECS: u32 = 60;
/// The largest message we accept (option 57 says so to the server).
pub const MAX_MESSAGE: usize = 1500;

/// Where a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// 255.255.255.255 on the interface: we have no address yet, or any server may answer.
    Broadcast,
    /// The server that gave the lease (renewing).
    Unicast(Ipv4Addr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        packet: Vec<u8>,
        to: Dest,
    },
    /// Put this lease on the interface: address, prefix, default route.
    Apply(Lease),
    /// Take this lease off the interface.
    Drop(Lease),
}

/// Why a packet was not used (logged by the caller; the client state is unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("not a DHCP message: {0}")]
    Malformed(String),
    #[error("not a reply to us (op, transaction id or hardware address differ)")]
    NotOurs,
    #[error("no DHCP message type")]
    NoType,
    #[error("a {0:?} is not expected in state {1}")]
    Unexpected(MessageType, &'static str),
    #[error("offer or ack without a usable address ({0})")]
    BadAddress(Ipv4Addr),
    #[error("offer without a server identifier")]
    NoServer,
}

#[derive(Debug, Clone)]
struct Offer {
    address: Ipv4Addr,
    server: Ipv4Addr,
}

#[derive(Debug, Clone)]
enum State {
    NoCarrier,
    Selecting,
    Requesting { offer: Offer, tries: u32 },
    Bound,
    Renewing,
    Rebinding,
}

/// A lease and its rebinding time, in milliseconds of the caller's clock (T1 is the
/// deadline while bound).
#[derive(Debug, Clone)]
struct Held {
    lease: Lease,
    t2_ms: u64,
}

pub struct Client {
    mac: [u8; 6],
    state: State,
    xid: u32,
    /// Seeds the next transaction id (a new one per exchange, as RFC 2131 asks).
    xid_seed: u32,
    held: Option<Held>,
    /// The address we had, asked for again after a replug or restart.
    previous: Option<Ipv4Addr>,
    /// When to act next (retransmit, renew, rebind, expire).
    deadline: Option<u64>,
    retry_ms: u64,
    /// The wait before the DISCOVER that follows the next failure (reset once bound).
    failure_wait_ms: u64,
    /// When this exchange began (the `secs` field).
    started_ms: u64,
}

impl Client {
    /// A client for the interface with hardware address `mac`, link down until told.
    /// `xid_seed` should be random (transaction ids must differ across machines).
    pub fn new(mac: [u8; 6], xid_seed: u32) -> Client {
        Client {
            mac,
            state: State::NoCarrier,
            xid: 0,
            xid_seed,
            held: None,
            previous: None,
            deadline: None,
            retry_ms: RETRY_FIRST_MS,
            failure_wait_ms: AFTER_FAILURE_FIRST_MS,
            started_ms: 0,
        }
    }

    pub fn state(&self) -> DhcpState {
        match self.state {
            State::NoCarrier => DhcpState::NoCarrier,
            State::Selecting => DhcpState::Selecting,
            State::Requesting { .. } => DhcpState::Requesting,
            State::Bound => DhcpState::Bound,
            State::Renewing => DhcpState::Renewing,
            State::Rebinding => DhcpState::Rebinding,
        }
    }

    pub fn lease(&self) -> Option<&Lease> {
        self.held.as_ref().map(|h| &h.lease)
    }

    /// When [`Client::on_timer`] wants to be called next.
    pub fn deadline(&self) -> Option<u64> {
        self.deadline
    }

    /// The cable is in: start asking (for the previous address, if we had one).
    pub fn link_up(&mut self, now: u64) -> Vec<Action> {
        if !matches!(self.state, State::NoCarrier) {
            return Vec::new();
        }
        self.discover(now)
    }

    /// The cable is out: the lease comes off the interface (a route through a dead link would
    /// keep traffic from any other uplink); its address is asked for again on replug.
    pub fn link_down(&mut self) -> Vec<Action> {
        self.state = State::NoCarrier;
        self.deadline = None;
        self.drop_lease()
    }

    pub fn on_timer(&mut self, now: u64) -> Vec<Action> {
        match self.deadline {
            Some(d) if now >= d => {}
            _ => return Vec::new(),
        }
        match self.state.clone() {
            State::NoCarrier => {
                self.deadline = None;
                Vec::new()
            }
            State::Selecting => {
                self.backoff(now);
                vec![self.send_discover(now)]
            }
            State::Requesting { offer, tries } => {
                if tries >= REQUEST_TRIES {
                    return self.discover(now);
                }
                self.state = State::Requesting {
                    offer: offer.clone(),
                    tries: tries + 1,
                };
                self.backoff(now);
                vec![self.send_request(now, &offer)]
            }
            State::Bound | State::Renewing | State::Rebinding => self.lease_timer(now),
        }
    }

    /// A packet arrived on the interface's DHCP client port.
    pub fn on_packet(&mut self, bytes: &[u8], now: u64) -> Result<Vec<Action>, Ignored> {
        let msg = Message::decode(&mut Decoder::new(bytes))
            .map_err(|e| Ignored::Malformed(e.to_string()))?;
        // dhcproto takes any hardware length and its `chaddr()` slices the 16-byte field by
        // it: a length past 16 from a hostile server would panic there.
        if usize::from(msg.hlen()) != self.mac.len() {
            return Err(Ignored::NotOurs);
        }
        if msg.opcode() != Opcode::BootReply
            || msg.xid() != self.xid
            || msg.chaddr().get(..6) != Some(&self.mac[..])
        {
            return Err(Ignored::NotOurs);
        }
        let kind = msg.opts().msg_type().ok_or(Ignored::NoType)?;
        let state_name = self.state().as_str();
        match (&self.state, kind) {
            (State::Selecting, MessageType::Offer) => {
                let address = usable(msg.yiaddr())?;
                let server = match msg.opts().get(OptionCode::ServerIdentifier) {
                    Some(DhcpOption::ServerIdentifier(s)) => *s,
                    _ => return Err(Ignored::NoServer),
                };
                // The first offer wins (RFC 2131 lets the client choose; the first is what
                // every common client takes).
                let offer = Offer { address, server };
                self.state = State::Requesting {
                    offer: offer.clone(),
                    tries: 1,
                };
                self.retry_ms = RETRY_FIRST_MS;
                self.deadline = Some(now + self.retry_ms);
                Ok(vec![self.send_request(now, &offer)])
            }
            (State::Requesting { offer, .. }, MessageType::Ack) => {
                let server = offer.server;
                Ok(self.bind(&msg, server, now)?)
            }
            (State::Renewing | State::Rebinding, MessageType::Ack) => {
                let server = match msg.opts().get(OptionCode::ServerIdentifier) {
                    Some(DhcpOption::ServerIdentifier(s)) => *s,
                    _ => self
                        .held
                        .as_ref()
                        .map(|h| h.lease.server)
                        .unwrap_or(Ipv4Addr::UNSPECIFIED),
                };
                Ok(self.bind(&msg, server, now)?)
            }
            (State::Requesting { .. } | State::Renewing | State::Rebinding, MessageType::Nak) => {
                // The address is not ours any more: off the interface, and start over after a
                // wait.
                self.previous = None;
                Ok(self.fail(now))
            }
            (_, kind) => Err(Ignored::Unexpected(kind, state_name)),
        }
    }

    /// The lease that was just applied could not be put on the interface: drop what may be
    /// there and try again after a wait (a fault that lasts is retried at most once a minute).
    pub fn apply_failed(&mut self, now: u64) -> Vec<Action> {
        self.fail(now)
    }

    /// Drops the lease and schedules a DISCOVER after the failure wait, which doubles.
    fn fail(&mut self, now: u64) -> Vec<Action> {
        let actions = self.drop_lease();
        self.state = State::Selecting;
        self.new_exchange(now);
        // The timer's backoff doubles this: the first DISCOVER's retry comes RETRY_FIRST_MS
        // after it.
        self.retry_ms = RETRY_FIRST_MS / 2;
        self.deadline = Some(now + self.failure_wait_ms);
        self.failure_wait_ms = (self.failure_wait_ms * 2).min(AFTER_FAILURE_MAX_MS);
        actions
    }

    fn bind(&mut self, msg: &Message, server: Ipv4Addr, now: u64) -> Result<Vec<Action>, Ignored> {
        let address = usable(msg.yiaddr())?;
        let opts = msg.opts();
        let prefix_len = match opts.get(OptionCode::SubnetMask) {
            Some(DhcpOption::SubnetMask(m)) => prefix_of(*m).unwrap_or(24),
            _ => 24,
        };
        let gateway = match opts.get(OptionCode::Router) {
            Some(DhcpOption::Router(r)) => r
                .iter()
                .copied()
                .find(|g| !g.is_unspecified() && !g.is_broadcast()),
            _ => None,
        };
        let dns = match opts.get(OptionCode::DomainNameServer) {
            Some(DhcpOption::DomainNameServer(d)) => d
                .iter()
                .copied()
                .filter(|a| !a.is_unspecified())
                .take(3)
                .collect(),
            _ => Vec::new(),
        };
        let domain = match opts.get(OptionCode::DomainName) {
            Some(DhcpOption::DomainName(d)) if is_domain(d) => Some(d.clone()),
            _ => None,
        };
        let secs = match opts.get(OptionCode::AddressLeaseTime) {
            Some(DhcpOption::AddressLeaseTime(s)) => (*s).max(MIN_LEASE_SECS),
            _ => DEFAULT_LEASE_SECS,
        };
        let lease_ms = u64::from(secs) * 1000;
        let t1 = match opts.get(OptionCode::Renewal) {
            Some(DhcpOption::Renewal(s)) if u64::from(*s) * 1000 < lease_ms => u64::from(*s) * 1000,
            _ => lease_ms / 2,
        };
        let t2 = match opts.get(OptionCode::Rebinding) {
            Some(DhcpOption::Rebinding(s))
                if u64::from(*s) * 1000 < lease_ms && u64::from(*s) * 1000 > t1 =>
            {
                u64::from(*s) * 1000
            }
            _ => (lease_ms * 7 / 8).max(t1),
        };
        let lease = Lease {
            address,
            prefix_len,
            gateway,
            dns,
            domain,
            server,
            lease_secs: secs,
            acquired_ms: now,
            expires_ms: now + lease_ms,
        };
        let mut actions = Vec::new();
        // A different address (or prefix, or gateway) replaces the old one on the interface.
        if let Some(old) = &self.held {
            if old.lease.address != lease.address
                || old.lease.prefix_len != lease.prefix_len
                || old.lease.gateway != lease.gateway
            {
                actions.push(Action::Drop(old.lease.clone()));
            }
        }
        actions.push(Action::Apply(lease.clone()));
        self.previous = Some(address);
        self.held = Some(Held {
            lease,
            t2_ms: now + t2,
        });
        self.state = State::Bound;
        self.deadline = Some(now + t1);
        self.failure_wait_ms = AFTER_FAILURE_FIRST_MS;
        Ok(actions)
    }

    /// Bound, renewing or rebinding, and the deadline came.
    fn lease_timer(&mut self, now: u64) -> Vec<Action> {
        let Some(held) = self.held.clone() else {
            return self.discover(now);
        };
        if now >= held.lease.expires_ms {
            let mut actions = self.drop_lease();
            actions.extend(self.discover(now));
            return actions;
        }
        let (to, until) = if now >= held.t2_ms {
            if !matches!(self.state, State::Rebinding) {
                self.new_exchange(now);
            }
            self.state = State::Rebinding;
            (Dest::Broadcast, held.lease.expires_ms)
        } else {
            if !matches!(self.state, State::Renewing) {
                self.new_exchange(now);
            }
            self.state = State::Renewing;
            (Dest::Unicast(held.lease.server), held.t2_ms)
        };
        self.deadline = Some((now + ((until - now) / 2).max(RENEW_RETRY_MIN_MS)).min(until));
        let mut m = self.message(MessageType::Request, now);
        m.set_ciaddr(held.lease.address);
        vec![Action::Send {
            packet: encode(&m),
            to,
        }]
    }

    fn discover(&mut self, now: u64) -> Vec<Action> {
        self.state = State::Selecting;
        self.new_exchange(now);
        self.retry_ms = RETRY_FIRST_MS;
        self.deadline = Some(now + self.retry_ms);
        vec![self.send_discover(now)]
    }

    fn new_exchange(&mut self, now: u64) {
        // xorshift: distinct ids per exchange from one random seed.
        let mut x = self.xid_seed;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.xid_seed = x;
        self.xid = x;
        self.started_ms = now;
    }

    fn backoff(&mut self, now: u64) {
        self.retry_ms = (self.retry_ms * 2).min(RETRY_MAX_MS);
        self.deadline = Some(now + self.retry_ms);
    }

    fn drop_lease(&mut self) -> Vec<Action> {
        match self.held.take() {
            Some(h) => vec![Action::Drop(h.lease)],
            None => Vec::new(),
        }
    }

    fn message(&self, kind: MessageType, now: u64) -> Message {
        let z = Ipv4Addr::UNSPECIFIED;
        let mut m = Message::new_with_id(self.xid, z, z, z, z, &self.mac);
        let secs = ((now.saturating_sub(self.started_ms)) / 1000).min(u64::from(u16::MAX)) as u16;
        m.set_secs(secs);
        let opts = m.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        let mut id = vec![1u8];
        id.extend_from_slice(&self.mac);
        opts.insert(DhcpOption::ClientIdentifier(id));
        opts.insert(DhcpOption::MaxMessageSize(MAX_MESSAGE as u16));
        opts.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::DomainName,
            OptionCode::AddressLeaseTime,
            OptionCode::Renewal,
            OptionCode::Rebinding,
        ]));
        m
    }

    fn send_discover(&self, now: u64) -> Action {
        let mut m = self.message(MessageType::Discover, now);
        // Without an address we cannot take a unicast reply: ask servers to broadcast.
        m.set_flags(Flags::default().set_broadcast());
        if let Some(p) = self.previous {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(p));
        }
        Action::Send {
            packet: encode(&m),
            to: Dest::Broadcast,
        }
    }

    fn send_request(&self, now: u64, offer: &Offer) -> Action {
        let mut m = self.message(MessageType::Request, now);
        m.set_flags(Flags::default().set_broadcast());
        m.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(offer.address));
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(offer.server));
        Action::Send {
            packet: encode(&m),
            to: Dest::Broadcast,
        }
    }
}

fn encode(m: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(300);
    m.encode(&mut Encoder::new(&mut buf))
        .expect("encoding into a Vec cannot fail");
    buf
}

/// An address a host may take: not 0.0.0.0, broadcast, multicast or loopback.
fn usable(a: Ipv4Addr) -> Result<Ipv4Addr, Ignored> {
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
        return Err(Ignored::BadAddress(a));
    }
    Ok(a)
}

/// The prefix length of a contiguous netmask (255.255.255.0 → 24, 255.255.255.255 → 32);
/// None for a mask with holes or 0.0.0.0.
pub fn prefix_of(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let len = m.leading_ones();
    (m.checked_shl(len).unwrap_or(0) == 0 && len > 0).then_some(len as u8)
}

/// A domain name fit to show and to hand to guests: letters, digits, '-', '.'.
fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests;
