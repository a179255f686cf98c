use super::*;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OTHER: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 73, 0, 1);
const HOUR: Duration = Duration::from_secs(3600);

fn nat() -> Server {
    Server::new(ServerConfig::nat())
}

/// A /29: 10.73.0.2–.6, five addresses.
fn small() -> Server {
    Server::new(ServerConfig {
        prefix_len: 29,
        ..ServerConfig::nat()
    })
}

/// A client's message: `kind` from `mac`, shaped further by `f`.
fn msg(kind: MessageType, mac: [u8; 6], f: impl FnOnce(&mut Message)) -> Vec<u8> {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(0x1234_5678, z, z, z, z, &mac);
    m.set_flags(dhcproto::v4::Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    f(&mut m);
    encode(&m)
}

fn discover(mac: [u8; 6]) -> Vec<u8> {
    msg(MessageType::Discover, mac, |_| {})
}

fn select(mac: [u8; 6], a: Ipv4Addr, server: Ipv4Addr) -> Vec<u8> {
    msg(MessageType::Request, mac, |m| {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(a));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    })
}

fn renew(mac: [u8; 6], a: Ipv4Addr) -> Vec<u8> {
    msg(MessageType::Request, mac, |m| {
        m.set_ciaddr(a);
    })
}

fn init_reboot(mac: [u8; 6], a: Ipv4Addr) -> Vec<u8> {
    msg(MessageType::Request, mac, |m| {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(a));
    })
}

fn answer(s: &mut Server, datagram: &[u8], now: Instant) -> Message {
    let bytes = s.handle(datagram, now).unwrap().expect("a reply");
    Message::decode(&mut Decoder::new(&bytes)).unwrap()
}

fn kind(m: &Message) -> MessageType {
    m.opts().msg_type().unwrap()
}

/// DISCOVER, OFFER, REQUEST, ACK: the address leased.
fn lease(s: &mut Server, mac: [u8; 6], now: Instant) -> Ipv4Addr {
    let offer = answer(s, &discover(mac), now);
    assert_eq!(kind(&offer), MessageType::Offer);
    let ack = answer(s, &select(mac, offer.yiaddr(), GATEWAY), now);
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(ack.yiaddr(), offer.yiaddr());
    ack.yiaddr()
}

fn in_nat_pool(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[..3] == [10, 73, 0] && (2..=254).contains(&o[3])
}

#[test]
fn discover_offer_request_ack_leases_a_pool_address_with_every_option() {
    let mut s = nat();
    let t0 = Instant::now();
    let offer = answer(&mut s, &discover(MAC), t0);
    assert_eq!(kind(&offer), MessageType::Offer);
    assert_eq!(offer.opcode(), Opcode::BootReply);
    assert_eq!((offer.xid(), offer.chaddr()), (0x1234_5678, &MAC[..]));
    assert!(offer.flags().broadcast(), "flags are copied");
    assert_eq!(offer.siaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(in_nat_pool(offer.yiaddr()), "{}", offer.yiaddr());
    assert!(s.leases(t0).is_empty(), "an offer is not a lease");

    let ack = answer(&mut s, &select(MAC, offer.yiaddr(), GATEWAY), t0);
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(ack.yiaddr(), offer.yiaddr());
    let o = ack.opts();
    let expect = [
        DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)),
        DhcpOption::Router(vec![GATEWAY]),
        DhcpOption::DomainNameServer(vec![GATEWAY]),
        DhcpOption::BroadcastAddr(Ipv4Addr::new(10, 73, 0, 255)),
        DhcpOption::AddressLeaseTime(3600),
        DhcpOption::ServerIdentifier(GATEWAY),
        DhcpOption::Renewal(1800),
        DhcpOption::Rebinding(3150),
    ];
    for e in expect {
        assert_eq!(o.get(OptionCode::from(&e)), Some(&e));
    }
    assert_eq!(
        s.leases(t0),
        vec![ActiveLease {
            mac: MAC,
            address: ack.yiaddr(),
            left: HOUR
        }]
    );
    let bytes = s
        .handle(&select(MAC, ack.yiaddr(), GATEWAY), t0)
        .unwrap()
        .unwrap();
    assert!(bytes.len() >= 300, "padded to the BOOTP minimum");
}

#[test]
fn a_mac_gets_its_address_back_after_release_and_from_a_fresh_server() {
    let t0 = Instant::now();
    let mut s = nat();
    let first = lease(&mut s, MAC, t0);
    s.handle(
        &msg(MessageType::Release, MAC, |m| {
            m.set_ciaddr(first);
        }),
        t0,
    )
    .unwrap();
    assert!(s.leases(t0).is_empty());
    assert_eq!(lease(&mut s, MAC, t0), first, "after RELEASE");
    assert_eq!(lease(&mut nat(), MAC, t0), first, "after a restart");
}

#[test]
fn two_macs_get_different_addresses() {
    let t0 = Instant::now();
    let mut s = nat();
    let a = lease(&mut s, MAC, t0);
    let b = lease(&mut s, OTHER, t0);
    assert_ne!(a, b);
    assert!(in_nat_pool(a) && in_nat_pool(b));
    // And not by probing: their hashes land apart.
    assert_ne!(lease(&mut nat(), OTHER, t0), a);
}

#[test]
fn a_renewal_of_its_own_lease_is_acked_and_of_another_clients_naked() {
    let t0 = Instant::now();
    let mut s = nat();
    let a = lease(&mut s, MAC, t0);
    let b = lease(&mut s, OTHER, t0);
    let later = t0 + Duration::from_secs(1800);
    let ack = answer(&mut s, &renew(MAC, a), later);
    assert_eq!(
        (kind(&ack), ack.yiaddr(), ack.ciaddr()),
        (MessageType::Ack, a, a)
    );
    assert_eq!(
        s.leases(later)[0].left,
        HOUR,
        "the lease runs from the renewal"
    );
    let nak = answer(&mut s, &renew(MAC, b), later);
    assert_eq!(
        (kind(&nak), nak.yiaddr()),
        (MessageType::Nak, Ipv4Addr::UNSPECIFIED)
    );
    assert_eq!(
        nak.opts().get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(GATEWAY))
    );
    let nak = answer(&mut s, &renew(MAC, Ipv4Addr::new(192, 168, 1, 7)), later);
    assert_eq!(kind(&nak), MessageType::Nak);
    // The other client's lease is untouched.
    assert!(s
        .leases(later)
        .iter()
        .any(|l| l.mac == OTHER && l.address == b));
}

#[test]
fn a_renewal_after_a_restart_is_acked_when_the_address_is_free() {
    let t0 = Instant::now();
    let a = lease(&mut nat(), MAC, t0);
    let mut fresh = nat();
    let ack = answer(&mut fresh, &renew(MAC, a), t0);
    assert_eq!((kind(&ack), ack.yiaddr()), (MessageType::Ack, a));
    assert_eq!(fresh.leases(t0)[0].address, a);
}

#[test]
fn init_reboot_acks_a_free_or_own_address_and_naks_the_rest() {
    let t0 = Instant::now();
    let mut s = nat();
    for wrong in [
        Ipv4Addr::new(192, 168, 1, 20),
        Ipv4Addr::new(10, 73, 1, 20),
        Ipv4Addr::new(10, 73, 0, 0),
        Ipv4Addr::new(10, 73, 0, 255),
        GATEWAY,
    ] {
        let nak = answer(&mut s, &init_reboot(MAC, wrong), t0);
        assert_eq!(kind(&nak), MessageType::Nak, "{wrong}");
    }
    let theirs = lease(&mut s, OTHER, t0);
    assert_eq!(
        kind(&answer(&mut s, &init_reboot(MAC, theirs), t0)),
        MessageType::Nak
    );
    let free = Ipv4Addr::new(10, 73, 0, 77);
    let ack = answer(&mut s, &init_reboot(MAC, free), t0);
    assert_eq!((kind(&ack), ack.yiaddr()), (MessageType::Ack, free));
    let again = answer(&mut s, &init_reboot(MAC, free), t0);
    assert_eq!(kind(&again), MessageType::Ack);
}

#[test]
fn a_request_for_another_server_forgets_our_offer() {
    let t0 = Instant::now();
    let mut s = small();
    let offered = answer(&mut s, &discover(MAC), t0).yiaddr();
    let r = s.handle(&select(MAC, offered, Ipv4Addr::new(10, 73, 0, 9)), t0);
    assert_eq!(
        r,
        Err(Refused::OtherServer("REQUEST", Ipv4Addr::new(10, 73, 0, 9)))
    );
    // The address is free: a client asking for it gets it.
    let ack = answer(&mut s, &init_reboot(OTHER, offered), t0);
    assert_eq!((kind(&ack), ack.yiaddr()), (MessageType::Ack, offered));
}

#[test]
fn a_request_without_an_address_is_refused() {
    let mut s = nat();
    let r = s.handle(&msg(MessageType::Request, MAC, |_| {}), Instant::now());
    assert_eq!(r, Err(Refused::NoAddress("REQUEST")));
}

#[test]
fn an_expired_lease_frees_its_address() {
    let t0 = Instant::now();
    let mut s = nat();
    let a = lease(&mut s, MAC, t0);
    let before = t0 + HOUR - Duration::from_secs(1);
    assert_eq!(
        kind(&answer(&mut s, &init_reboot(OTHER, a), before)),
        MessageType::Nak
    );
    let after = t0 + HOUR + Duration::from_secs(1);
    assert!(s.leases(after).is_empty());
    let ack = answer(&mut s, &init_reboot(OTHER, a), after);
    assert_eq!((kind(&ack), ack.yiaddr()), (MessageType::Ack, a));
    assert_eq!(s.leases(after)[0].mac, OTHER);
    // The first client's renewal comes too late.
    assert_eq!(
        kind(&answer(&mut s, &renew(MAC, a), after)),
        MessageType::Nak
    );
}

#[test]
fn an_exhausted_pool_is_refused_by_name_and_offers_never_push_out_leases() {
    let t0 = Instant::now();
    let mut s = small();
    assert_eq!(s.pool_size(), 5);
    let mut got = Vec::new();
    for i in 0..5u8 {
        got.push(lease(&mut s, [0x52, 0x54, 0, 0, 0, i], t0));
    }
    got.sort();
    let want: Vec<_> = (2..=6).map(|i| Ipv4Addr::new(10, 73, 0, i)).collect();
    assert_eq!(got, want, "every host of the /29 but the server");
    let r = s.handle(&discover([0x52, 0x54, 0, 0, 0, 9]), t0);
    assert_eq!(r, Err(Refused::PoolExhausted));
    assert_eq!(s.leases(t0).len(), 5);

    // Offers only: a flood of new MACs turns them over, oldest first.
    let mut s = small();
    let mut offered = Vec::new();
    for i in 0..5u8 {
        let at = t0 + Duration::from_secs(u64::from(5 - i));
        offered.push(answer(&mut s, &discover([0x52, 0x54, 0, 0, 1, i]), at).yiaddr());
    }
    let late = t0 + Duration::from_secs(10);
    let newcomer = answer(&mut s, &discover([0x52, 0x54, 0, 0, 2, 0]), late);
    assert_eq!(newcomer.yiaddr(), offered[4], "the oldest offer went");
    assert_eq!(s.by_addr.len(), 5);
}

#[test]
fn state_stays_bounded_under_a_flood_of_invented_macs() {
    let t0 = Instant::now();
    let mut s = nat();
    let kept = lease(&mut s, MAC, t0);
    for i in 0..5000u32 {
        let b = i.to_be_bytes();
        let _ = s.handle(&discover([0x02, 0xee, b[0], b[1], b[2], b[3]]), t0);
    }
    assert!(s.by_addr.len() <= s.pool_size() as usize);
    assert!(s.by_mac.len() <= s.by_addr.len());
    assert_eq!(
        s.leases(t0),
        vec![ActiveLease {
            mac: MAC,
            address: kept,
            left: HOUR
        }]
    );
}

#[test]
fn a_declined_address_is_skipped_for_ten_minutes() {
    let t0 = Instant::now();
    let mut s = nat();
    let a = lease(&mut s, MAC, t0);
    let decline = msg(MessageType::Decline, MAC, |m| {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(a));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(GATEWAY));
    });
    assert_eq!(s.handle(&decline, t0), Ok(None));
    assert!(s.leases(t0).is_empty());
    let b = lease(&mut s, MAC, t0);
    assert_ne!(b, a);
    assert_eq!(
        kind(&answer(&mut s, &init_reboot(OTHER, a), t0)),
        MessageType::Nak
    );
    let later = t0 + Duration::from_secs(601);
    assert_eq!(
        kind(&answer(&mut s, &init_reboot(OTHER, a), later)),
        MessageType::Ack
    );
}

#[test]
fn a_client_can_release_or_decline_only_its_own_address() {
    let t0 = Instant::now();
    let mut s = nat();
    let theirs = lease(&mut s, OTHER, t0);
    let release = msg(MessageType::Release, MAC, |m| {
        m.set_ciaddr(theirs);
    });
    assert_eq!(
        s.handle(&release, t0),
        Err(Refused::NotTheirs {
            kind: "RELEASE",
            address: theirs
        })
    );
    let decline = msg(MessageType::Decline, MAC, |m| {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(theirs));
    });
    assert!(matches!(
        s.handle(&decline, t0),
        Err(Refused::NotTheirs {
            kind: "DECLINE",
            ..
        })
    ));
    assert_eq!(s.leases(t0).len(), 1);
}

#[test]
fn inform_gets_the_options_and_no_lease() {
    let t0 = Instant::now();
    let mut s = nat();
    let static_addr = Ipv4Addr::new(10, 73, 0, 200);
    let ack = answer(
        &mut s,
        &msg(MessageType::Inform, MAC, |m| {
            m.set_ciaddr(static_addr);
        }),
        t0,
    );
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(
        (ack.yiaddr(), ack.ciaddr()),
        (Ipv4Addr::UNSPECIFIED, static_addr)
    );
    assert_eq!(
        ack.opts().get(OptionCode::Router),
        Some(&DhcpOption::Router(vec![GATEWAY]))
    );
    for code in [
        OptionCode::AddressLeaseTime,
        OptionCode::Renewal,
        OptionCode::Rebinding,
    ] {
        assert_eq!(ack.opts().get(code), None, "{code:?}");
    }
    assert!(s.leases(t0).is_empty());
}

#[test]
fn server_messages_from_a_guest_and_odd_clients_are_refused() {
    let t0 = Instant::now();
    let mut s = nat();
    for k in [
        MessageType::Offer,
        MessageType::Ack,
        MessageType::Nak,
        MessageType::Unknown(99),
    ] {
        assert_eq!(
            s.handle(&msg(k, MAC, |_| {}), t0),
            Err(Refused::NotFromClient(k))
        );
    }
    let small_max = msg(MessageType::Discover, MAC, |m| {
        m.opts_mut().insert(DhcpOption::MaxMessageSize(300));
    });
    assert_eq!(s.handle(&small_max, t0), Err(Refused::MaxMessageSize(300)));
    for mac in [[0xff; 6], [0x01, 0, 0x5e, 0, 0, 1], [0; 6]] {
        assert_eq!(s.handle(&discover(mac), t0), Err(Refused::NotUnicast(mac)));
    }
    assert!(s.by_addr.is_empty());
}

#[test]
fn refusals_name_what_was_wrong() {
    let texts = [
        (Refused::NotRequest(2), "op 2 is not a BOOTREQUEST"),
        (
            Refused::HardwareLength(20),
            "hardware length 20 (only Ethernet, 6)",
        ),
        (Refused::Oversized(1501), "oversized: 1501 bytes (max 1500)"),
        (
            Refused::NotTheirs {
                kind: "REQUEST",
                address: Ipv4Addr::new(10, 73, 0, 9),
            },
            "REQUEST for 10.73.0.9 which is not this client's",
        ),
        (
            Refused::NotUnicast([0xff; 6]),
            "client hardware address ff:ff:ff:ff:ff:ff is not a unicast one",
        ),
    ];
    for (r, text) in texts {
        assert_eq!(r.to_string(), text);
    }
}

/// The header of a valid DISCOVER with `f` applied to its bytes.
fn mangled(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut d = discover(MAC);
    f(&mut d);
    d
}

/// A DISCOVER's header and cookie followed by `opts` as they are.
fn options(opts: &[u8]) -> Vec<u8> {
    mangled(|d| {
        d.truncate(240);
        d.extend_from_slice(opts);
    })
}

#[test]
fn garbage_is_refused_without_a_panic() {
    let t0 = Instant::now();
    let mut s = nat();
    let good = discover(MAC);
    let cases: Vec<(Vec<u8>, Refused)> = vec![
        (vec![], Refused::Truncated(0)),
        (vec![1], Refused::Truncated(1)),
        (good[..239].to_vec(), Refused::Truncated(239)),
        (mangled(|d| d[2] = 0), Refused::HardwareLength(0)),
        (mangled(|d| d[2] = 7), Refused::HardwareLength(7)),
        (mangled(|d| d[2] = 17), Refused::HardwareLength(17)),
        (mangled(|d| d[2] = 255), Refused::HardwareLength(255)),
        (mangled(|d| d[1] = 6), Refused::HardwareType(6)),
        (mangled(|d| d[0] = 2), Refused::NotRequest(2)),
        (mangled(|d| d[236] = 0), Refused::NoCookie([0, 130, 83, 99])),
        (mangled(|d| d.resize(1501, 0)), Refused::Oversized(1501)),
        (vec![1; 65536], Refused::Oversized(65536)),
        // The header and cookie alone: no options, so no type.
        (good[..240].to_vec(), Refused::NoMessageType),
        // A message type of length 0, followed by the end.
        (options(&[53, 0, 255]), Refused::NoMessageType),
        // A message type running past the end.
        (options(&[53, 4, 1]), Refused::NoMessageType),
        (options(&[53]), Refused::NoMessageType),
    ];
    for (i, (d, want)) in cases.iter().enumerate() {
        assert_eq!(s.handle(d, t0).as_ref(), Err(want), "case {i}");
    }
    // Options past the end after a good type: the type is kept, the rest dropped.
    let long = options(&[53, 1, 1, 50, 200, 10, 73]);
    assert_eq!(kind(&answer(&mut s, &long, t0)), MessageType::Offer);
    // Every truncation of a good message.
    for n in 0..good.len() {
        let _ = s.handle(&good[..n], t0);
    }
}

/// dhcproto 0.15 `debug_assert!`s that Rapid Commit (option 80) is empty: in a debug build a
/// guest can make the parser panic, which must come back as a refusal.
#[cfg(debug_assertions)]
#[test]
fn a_parser_panic_is_refused_as_undecodable() {
    let d = options(&[53, 1, 1, 80, 1, 0, 255]);
    let r = nat().handle(&d, Instant::now());
    assert!(
        matches!(&r, Err(Refused::Undecodable(why)) if why.contains("panicked")),
        "{r:?}"
    );
}

#[test]
fn random_options_after_a_valid_header_never_panic() {
    let t0 = Instant::now();
    let mut s = small();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let header = discover(MAC)[..240].to_vec();
    let (mut replies, mut refusals) = (0, 0);
    for i in 0..4000u64 {
        let mut d = header.clone();
        // Vary the client, the addresses and flags too: the state machine sees odd ones.
        d[28 + 5] = (next() % 8) as u8;
        if i % 3 == 0 {
            d[12..16].copy_from_slice(&(next() as u32).to_be_bytes());
        }
        let len = (next() % 400) as usize;
        // Half start with a plausible type so that the handlers, not only the parser, run.
        if i % 2 == 0 {
            d.extend([53, 1, (next() % 10) as u8]);
        }
        d.extend((0..len).map(|_| next() as u8));
        match s.handle(&d, t0 + Duration::from_secs(i)) {
            Ok(Some(reply)) => {
                replies += 1;
                let m = Message::decode(&mut Decoder::new(&reply)).unwrap();
                assert_eq!(m.opcode(), Opcode::BootReply);
                assert!(m.yiaddr().is_unspecified() || s.pool.contains(m.yiaddr()));
            }
            Ok(None) => {}
            Err(_) => refusals += 1,
        }
        assert!(s.by_addr.len() <= s.pool_size() as usize);
        assert!(s.by_mac.len() <= s.by_addr.len());
    }
    assert!(
        replies > 100 && refusals > 100,
        "{replies} replies, {refusals} refusals"
    );
}

#[test]
#[should_panic(expected = "has host bits set")]
fn a_network_with_host_bits_is_a_programming_error() {
    Server::new(ServerConfig {
        network: Ipv4Addr::new(10, 73, 0, 1),
        ..ServerConfig::nat()
    });
}
