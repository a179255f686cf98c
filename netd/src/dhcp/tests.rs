use super::*;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

fn sent(actions: &[Action]) -> Vec<(Message, Dest)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { packet, to } => {
                Some((Message::decode(&mut Decoder::new(packet)).unwrap(), *to))
            }
            _ => None,
        })
        .collect()
}

/// The server's answer to `req`: `kind`, with the usual options.
fn reply(req: &Message, kind: MessageType, lease_secs: u32) -> Vec<u8> {
    let mut m = Message::new_with_id(
        req.xid(),
        Ipv4Addr::UNSPECIFIED,
        ADDR,
        SERVER,
        Ipv4Addr::UNSPECIFIED,
        &req.chaddr()[..6],
    );
    m.set_opcode(Opcode::BootReply);
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ServerIdentifier(SERVER));
    o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
    o.insert(DhcpOption::Router(vec![SERVER]));
    o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
        10, 0, 2, 3,
    )]));
    o.insert(DhcpOption::AddressLeaseTime(lease_secs));
    encode(&m)
}

/// A client bound to ADDR at time 0 with a lease of `secs`.
fn bound(secs: u32) -> Client {
    let mut c = Client::new(MAC, 0x1234_5678);
    let d = sent(&c.link_up(0));
    let r = sent(
        &c.on_packet(&reply(&d[0].0, MessageType::Offer, secs), 10)
            .unwrap(),
    );
    c.on_packet(&reply(&r[0].0, MessageType::Ack, secs), 20)
        .unwrap();
    c
}

#[test]
fn discover_offer_request_ack_binds_and_applies_the_lease() {
    let mut c = Client::new(MAC, 7);
    assert_eq!(c.state(), DhcpState::NoCarrier);
    let d = sent(&c.link_up(0));
    assert_eq!(d.len(), 1);
    let (disc, to) = &d[0];
    assert_eq!(
        (disc.opts().msg_type(), *to),
        (Some(MessageType::Discover), Dest::Broadcast)
    );
    assert!(
        disc.flags().broadcast(),
        "no address yet: the reply must be broadcast"
    );
    assert_eq!(c.state(), DhcpState::Selecting);

    let r = sent(
        &c.on_packet(&reply(disc, MessageType::Offer, 86400), 5)
            .unwrap(),
    );
    let (req, _) = &r[0];
    assert_eq!(req.opts().msg_type(), Some(MessageType::Request));
    assert_eq!(
        req.opts().get(OptionCode::RequestedIpAddress),
        Some(&DhcpOption::RequestedIpAddress(ADDR))
    );
    assert_eq!(
        req.opts().get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(c.state(), DhcpState::Requesting);

    let a = c
        .on_packet(&reply(req, MessageType::Ack, 86400), 9)
        .unwrap();
    let Some(Action::Apply(l)) = a.first() else {
        panic!("{a:?}")
    };
    assert_eq!(
        (l.address, l.prefix_len, l.gateway, l.dns.clone()),
        (ADDR, 24, Some(SERVER), vec![Ipv4Addr::new(10, 0, 2, 3)])
    );
    assert_eq!(l.expires_ms, 9 + 86_400_000);
    assert_eq!(c.state(), DhcpState::Bound);
    assert_eq!(c.deadline(), Some(9 + 43_200_000), "T1 is half the lease");
}

#[test]
fn lost_discovers_are_repeated_with_backoff() {
    let mut c = Client::new(MAC, 7);
    c.link_up(0);
    assert!(c.on_timer(999).is_empty(), "nothing before the deadline");
    let mut at = 1000;
    let mut gaps = Vec::new();
    for _ in 0..6 {
        assert_eq!(sent(&c.on_timer(at)).len(), 1);
        let next = c.deadline().unwrap();
        gaps.push(next - at);
        at = next;
    }
    assert_eq!(gaps, vec![2000, 4000, 8000, 16000, 16000, 16000]);
}

#[test]
fn renewal_is_unicast_rebinding_broadcast_and_expiry_drops_the_lease() {
    let mut c = bound(600);
    // T1 = 300 s after the ack at 20 ms.
    let t1 = 20 + 300_000;
    assert_eq!(c.deadline(), Some(t1));
    let r = sent(&c.on_timer(t1));
    assert_eq!(r[0].1, Dest::Unicast(SERVER));
    assert_eq!(r[0].0.ciaddr(), ADDR);
    assert_eq!(c.state(), DhcpState::Renewing);
    // No answer until T2 (7/8 of 600 s) …
    let t2 = 20 + 525_000;
    while c.deadline().unwrap() < t2 {
        let d = c.deadline().unwrap();
        c.on_timer(d);
    }
    let r = sent(&c.on_timer(c.deadline().unwrap()));
    assert_eq!(r[0].1, Dest::Broadcast);
    assert_eq!(c.state(), DhcpState::Rebinding);
    // … nor until the lease runs out.
    let mut dropped = None;
    for _ in 0..10 {
        let d = c.deadline().unwrap();
        for a in c.on_timer(d) {
            if let Action::Drop(l) = a {
                dropped = Some((l, d));
            }
        }
        if dropped.is_some() {
            break;
        }
    }
    let (l, at) = dropped.expect("the lease came off the interface");
    assert_eq!((l.address, at), (ADDR, 20 + 600_000));
    assert_eq!(c.state(), DhcpState::Selecting);
}

#[test]
fn an_ack_while_renewing_extends_the_lease_without_dropping_it() {
    let mut c = bound(600);
    let t1 = c.deadline().unwrap();
    let r = sent(&c.on_timer(t1));
    let a = c
        .on_packet(&reply(&r[0].0, MessageType::Ack, 600), t1 + 5)
        .unwrap();
    assert!(
        matches!(a.as_slice(), [Action::Apply(l)] if l.expires_ms == t1 + 5 + 600_000),
        "{a:?}"
    );
    assert_eq!(c.state(), DhcpState::Bound);
}

#[test]
fn a_nak_drops_the_lease_and_starts_over_after_a_growing_wait() {
    let mut c = bound(600);
    let r = sent(&c.on_timer(c.deadline().unwrap()));
    let a = c
        .on_packet(&reply(&r[0].0, MessageType::Nak, 0), 400_000)
        .unwrap();
    assert!(matches!(a.as_slice(), [Action::Drop(_)]), "{a:?}");
    assert_eq!(c.deadline(), Some(401_000), "the next DISCOVER waits 1 s");
    let again = sent(&c.on_timer(401_000));
    assert_eq!(again[0].0.opts().msg_type(), Some(MessageType::Discover));
    assert_eq!(
        again[0].0.opts().get(OptionCode::RequestedIpAddress),
        None,
        "a refused address is not asked for again"
    );
    // A server that refuses every request: the waits double up to a minute.
    let mut waits = Vec::new();
    let mut now = 401_000;
    for _ in 0..8 {
        let d = sent(&c.on_timer(c.deadline().unwrap().max(now)));
        let disc = d.last().unwrap().0.clone();
        let r = sent(
            &c.on_packet(&reply(&disc, MessageType::Offer, 600), now)
                .unwrap(),
        );
        c.on_packet(&reply(&r[0].0, MessageType::Nak, 0), now + 1)
            .unwrap();
        waits.push(c.deadline().unwrap() - (now + 1));
        now = c.deadline().unwrap();
    }
    assert_eq!(
        waits,
        vec![2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
    );
}

#[test]
fn a_lease_that_could_not_be_applied_is_dropped_and_tried_again_later() {
    let mut c = bound(600);
    let a = c.apply_failed(30);
    assert!(
        matches!(a.as_slice(), [Action::Drop(l)] if l.address == ADDR),
        "{a:?}"
    );
    assert_eq!(
        (c.state(), c.lease(), c.deadline()),
        (DhcpState::Selecting, None, Some(1030))
    );
    let d = sent(&c.on_timer(1030));
    assert_eq!(d[0].0.opts().msg_type(), Some(MessageType::Discover));
    // A bind resets the wait.
    let r = sent(
        &c.on_packet(&reply(&d[0].0, MessageType::Offer, 600), 1040)
            .unwrap(),
    );
    c.on_packet(&reply(&r[0].0, MessageType::Ack, 600), 1050)
        .unwrap();
    c.apply_failed(1060);
    assert_eq!(c.deadline(), Some(2060));
}

#[test]
fn a_hardware_length_past_the_field_is_refused_without_a_panic() {
    let mut c = Client::new(MAC, 7);
    let d = sent(&c.link_up(0));
    let mut offer = reply(&d[0].0, MessageType::Offer, 60);
    for hlen in [0u8, 5, 17, 200, 255] {
        offer[2] = hlen;
        assert_eq!(c.on_packet(&offer, 1), Err(Ignored::NotOurs), "hlen {hlen}");
    }
}

#[test]
fn cable_out_drops_the_lease_and_replug_asks_for_the_same_address() {
    let mut c = bound(86400);
    let a = c.link_down();
    assert!(
        matches!(a.as_slice(), [Action::Drop(l)] if l.address == ADDR),
        "{a:?}"
    );
    assert_eq!((c.state(), c.deadline()), (DhcpState::NoCarrier, None));
    let d = sent(&c.link_up(50_000));
    assert_eq!(
        d[0].0.opts().get(OptionCode::RequestedIpAddress),
        Some(&DhcpOption::RequestedIpAddress(ADDR))
    );
}

#[test]
fn garbage_and_foreign_replies_are_ignored_and_change_nothing() {
    let mut c = Client::new(MAC, 7);
    let d = sent(&c.link_up(0));
    let before = (c.state(), c.deadline());
    assert!(matches!(c.on_packet(b"", 1), Err(Ignored::Malformed(_))));
    assert!(matches!(
        c.on_packet(&[0xff; 2000], 1),
        Err(Ignored::Malformed(_) | Ignored::NotOurs)
    ));
    // Another transaction id, another machine's address, a request instead of a reply.
    let mut other =
        Message::decode(&mut Decoder::new(&reply(&d[0].0, MessageType::Offer, 60))).unwrap();
    other.set_xid(d[0].0.xid() ^ 1);
    assert_eq!(c.on_packet(&encode(&other), 1), Err(Ignored::NotOurs));
    let mut req = d[0].0.clone();
    req.set_opcode(Opcode::BootRequest);
    assert_eq!(c.on_packet(&encode(&req), 1), Err(Ignored::NotOurs));
    // An ACK before any offer; an offer of 0.0.0.0 or 255.255.255.255; no server id.
    assert!(matches!(
        c.on_packet(&reply(&d[0].0, MessageType::Ack, 60), 1),
        Err(Ignored::Unexpected(..))
    ));
    for bad in [Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST] {
        let mut o =
            Message::decode(&mut Decoder::new(&reply(&d[0].0, MessageType::Offer, 60))).unwrap();
        o.set_yiaddr(bad);
        assert_eq!(c.on_packet(&encode(&o), 1), Err(Ignored::BadAddress(bad)));
    }
    let mut o =
        Message::decode(&mut Decoder::new(&reply(&d[0].0, MessageType::Offer, 60))).unwrap();
    o.opts_mut().remove(OptionCode::ServerIdentifier);
    assert_eq!(c.on_packet(&encode(&o), 1), Err(Ignored::NoServer));
    assert_eq!((c.state(), c.deadline()), before);
    // Truncated versions of a real offer never panic.
    let good = reply(&d[0].0, MessageType::Offer, 60);
    for n in 0..good.len() {
        let _ = c.on_packet(&good[..n], 1);
    }
}

#[test]
fn hostile_lease_values_are_tamed() {
    let mut c = Client::new(MAC, 7);
    let d = sent(&c.link_up(0));
    let r = sent(
        &c.on_packet(&reply(&d[0].0, MessageType::Offer, 1), 1)
            .unwrap(),
    );
    let mut ack = Message::decode(&mut Decoder::new(&reply(&r[0].0, MessageType::Ack, 1))).unwrap();
    ack.opts_mut()
        .insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 0, 255, 0)));
    ack.opts_mut()
        .insert(DhcpOption::DomainName("evil\n; rm -rf".into()));
    ack.opts_mut().insert(DhcpOption::Renewal(u32::MAX));
    let a = c.on_packet(&encode(&ack), 2).unwrap();
    let Some(Action::Apply(l)) = a.first() else {
        panic!("{a:?}")
    };
    assert_eq!(l.lease_secs, MIN_LEASE_SECS, "a 1 s lease is stretched");
    assert_eq!(l.prefix_len, 24, "a mask with holes falls back to /24");
    assert_eq!(
        l.domain, None,
        "a domain with control characters is not kept"
    );
    assert_eq!(
        c.deadline(),
        Some(2 + 30_000),
        "a T1 past the lease falls back to half of it"
    );
}

#[test]
fn netmasks_convert_to_prefixes() {
    assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
    assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 252, 0)), Some(22));
    assert_eq!(prefix_of(Ipv4Addr::new(255, 0, 0, 0)), Some(8));
    assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
    assert_eq!(prefix_of(Ipv4Addr::new(0, 0, 0, 0)), None);
    assert_eq!(prefix_of(Ipv4Addr::new(0, 255, 0, 0)), None);
}
