//! The NAT ruleset of the VMs' private network, installed over nf_tables netlink.
//!
//! In `nft` syntax, the table this module keeps in place (one atomic batch, so a netd restart
//! replaces the previous table without a moment with no rules):
//!
//! ```text
//! table ip rayos {
//!     chain postrouting { type nat hook postrouting priority 100; policy accept;
//!         ip saddr 10.73.0.0/24 oifname != "rayos-nat" masquerade }
//!     chain forward { type filter hook forward priority 0; policy drop;
//!         ct state established,related accept
//!         iifname "rayos-nat" ip saddr 10.73.0.0/24 oifname != "rayos-nat" accept }
//!     chain input { type filter hook input priority 0; policy accept;
//!         iifname "rayos-nat" udp dport 67 accept
//!         iifname "rayos-nat" ip daddr 10.73.0.1 udp dport 53 accept
//!         iifname "rayos-nat" ip daddr 10.73.0.1 tcp dport 53 accept
//!         iifname "rayos-nat" ct state established,related accept
//!         iifname "rayos-nat" drop }
//! }
//! ```
//!
//! VMs reach the outside only masqueraded, and the answers come back; they never reach each
//! other (traffic routed between two bridge ports is dropped in `forward`, bridged traffic is
//! stopped by the bridge's port isolation), and on RayOS itself they reach only its DHCP
//! server and DNS forwarder.
//!
//! Hand-written because nothing usable does it: `rustables` is GPL-3.0 (not compatible with
//! this Apache-2.0 tree), `nftnl` binds the C libnftnl, and RayOS ships neither `nft` nor
//! libnftnl. The encoding follows the kernel's `include/uapi/linux/netfilter/nf_tables.h` and
//! `nfnetlink.h`; the batch is the same one `nft -f` would send for that table.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use rayos_proto::net::{NAT_BRIDGE, NAT_GATEWAY, NAT_NETWORK, NAT_PREFIX_LEN};

/// The table's name; family `ip` (NFPROTO_IPV4).
const TABLE: &str = "rayos";
/// How long to wait for the kernel's answers: it answers a whole batch at once, right away.
const ACK_WAIT_SECS: libc::time_t = 2;
/// Sequence number of the batch `install` sends: each install uses a fresh socket.
const FIRST_SEQ: u32 = 1;

// Netlink framing (include/uapi/linux/netlink.h). Headers are host-endian.
const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;

// nfnetlink (include/uapi/linux/netfilter/nfnetlink.h, linux/netfilter.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10; // NLMSG_MIN_TYPE: no subsystem byte
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNETLINK_V0: u8 = 0;
const AF_UNSPEC: u8 = 0;
const NFPROTO_IPV4: u8 = 2;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

// nf_tables messages and attributes (include/uapi/linux/netfilter/nf_tables.h).
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CT_STATE: u32 = 0;
// NF_CT_STATE_BIT(ctinfo) = 1 << (ctinfo + 1) (nf_conntrack_common.h); the ct expression
// loads the state as a host-endian u32.
const CT_STATE_ESTABLISHED: u32 = 1 << 1;
const CT_STATE_RELATED: u32 = 1 << 2;
/// Interface names in a register: IFNAMSIZ bytes, NUL-padded, as the kernel holds them.
const IFNAMSIZ: usize = 16;

/// The VMs' private network, as the ruleset sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRules {
    pub bridge: String,
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

impl NatRules {
    /// RayOS's own: `rayos-nat`, 10.73.0.0/24, gateway 10.73.0.1.
    pub fn rayos() -> Self {
        Self {
            bridge: NAT_BRIDGE.to_owned(),
            network: NAT_NETWORK,
            prefix_len: NAT_PREFIX_LEN,
            gateway: NAT_GATEWAY,
        }
    }
}

/// Why the ruleset is not in place.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("opening a NETLINK_NETFILTER socket: {0} (is CONFIG_NETFILTER_NETLINK built?)")]
    Open(io::Error),
    #[error("sending the nf_tables batch: {0}")]
    Send(io::Error),
    #[error("reading nf_tables' answers: {0}")]
    Recv(io::Error),
    #[error("nf_tables refused {what}: {}{hint}", io::Error::from_raw_os_error(*.errno))]
    Refused {
        what: String,
        errno: i32,
        hint: String,
    },
    #[error(
        "nf_tables did not answer {missing} of {sent} messages in {ACK_WAIT_SECS} s, from {first}"
    )]
    NoAnswer {
        missing: usize,
        sent: usize,
        first: String,
    },
}

/// The whole batch as bytes, sequence numbers from `seq` (the batch's begin) on, and what
/// each inner message is, by sequence number, for error messages.
pub fn ruleset_batch(r: &NatRules, seq: u32) -> (Vec<u8>, Vec<(u32, String)>) {
    let (bytes, sent) = build(r, seq);
    (bytes, sent.into_iter().map(|s| (s.seq, s.what)).collect())
}

/// Replaces table `ip rayos` with the ruleset of `r`, atomically: on error the previous
/// table (if any) stays as it was. Blocking (up to 2 s per read): call it at start or from
/// `spawn_blocking`.
pub fn install(r: &NatRules) -> Result<(), NftError> {
    let (batch, sent) = build(r, FIRST_SEQ);
    let total = sent.len();
    let mut pending: BTreeMap<u32, Sent> = sent.into_iter().map(|s| (s.seq, s)).collect();
    let sock = Socket::open().map_err(NftError::Open)?;
    sock.send(&batch).map_err(NftError::Send)?;
    let mut buf = vec![0u8; 64 * 1024];
    while !pending.is_empty() {
        match sock.recv(&mut buf) {
            Ok(n) => settle(&buf[..n], &mut pending)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(unanswered(&pending, total));
            }
            Err(e) => return Err(NftError::Recv(e)),
        }
    }
    Ok(())
}

/// One message of the batch: what it asks, and the kernel option it needs, for errors.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    seq: u32,
    what: String,
    needs: &'static str,
}

/// A base chain of the table.
struct Chain {
    name: &'static str,
    kind: &'static str,
    hook: u32,
    priority: i32,
    policy: u32,
}

impl Chain {
    fn what(&self) -> String {
        let policy = if self.policy == NF_ACCEPT {
            "accept"
        } else {
            "drop"
        };
        format!(
            "chain `{}` (type {} priority {} policy {policy})",
            self.name, self.kind, self.priority
        )
    }

    fn needs(&self) -> &'static str {
        if self.kind == "nat" {
            "CONFIG_NFT_NAT"
        } else {
            "CONFIG_NF_TABLES_IPV4"
        }
    }
}

/// One rule: its expressions, and the same in `nft` words for error messages.
struct Rule {
    chain: &'static str,
    text: String,
    exprs: Vec<Expr>,
}

impl Rule {
    fn what(&self) -> String {
        format!("rule `{}: {}`", self.chain, self.text)
    }

    /// The kernel option behind the rule's least common expression.
    fn needs(&self) -> &'static str {
        if self.exprs.iter().any(|e| matches!(e, Expr::Masq)) {
            "CONFIG_NFT_MASQ"
        } else if self.exprs.iter().any(|e| matches!(e, Expr::Ct(_))) {
            "CONFIG_NFT_CT"
        } else {
            "CONFIG_NF_TABLES"
        }
    }
}

/// The expressions the ruleset uses; every one works on register 1.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    /// Meta key → reg 1.
    Meta(u32),
    /// Packet bytes → reg 1.
    Payload {
        base: u32,
        offset: u32,
        len: u32,
    },
    /// reg 1 = (reg 1 & mask) ^ xor.
    Bitwise {
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// reg 1 `op` data, or the rule stops here.
    Cmp(u32, Vec<u8>),
    /// Conntrack key → reg 1.
    Ct(u32),
    /// The verdict.
    Verdict(u32),
    Masq,
}

impl Expr {
    fn payload(base: u32, offset: u32, len: u32) -> Self {
        Expr::Payload { base, offset, len }
    }

    /// reg 1 &= mask.
    fn and(mask: [u8; 4]) -> Self {
        Expr::Bitwise {
            mask: mask.to_vec(),
            xor: vec![0; 4],
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Expr::Meta(_) => "meta",
            Expr::Payload { .. } => "payload",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Cmp(..) => "cmp",
            Expr::Ct(_) => "ct",
            Expr::Verdict(_) => "immediate",
            Expr::Masq => "masq",
        }
    }

    fn encode(&self, m: &mut Msg) {
        m.nest(NFTA_LIST_ELEM, |m| {
            m.put_str(NFTA_EXPR_NAME, self.name());
            // Even masq, which has no attributes, gets its (empty) data nest: libnftnl sends
            // one for every expression type that has a build step, and the kernel takes it.
            m.nest(NFTA_EXPR_DATA, |m| self.encode_data(m));
        });
    }

    fn encode_data(&self, m: &mut Msg) {
        match self {
            Expr::Meta(key) => {
                m.put_u32(NFTA_META_DREG, NFT_REG_1);
                m.put_u32(NFTA_META_KEY, *key);
            }
            Expr::Payload { base, offset, len } => {
                m.put_u32(NFTA_PAYLOAD_DREG, NFT_REG_1);
                m.put_u32(NFTA_PAYLOAD_BASE, *base);
                m.put_u32(NFTA_PAYLOAD_OFFSET, *offset);
                m.put_u32(NFTA_PAYLOAD_LEN, *len);
            }
            Expr::Bitwise { mask, xor } => {
                debug_assert_eq!(mask.len(), xor.len());
                m.put_u32(NFTA_BITWISE_SREG, NFT_REG_1);
                m.put_u32(NFTA_BITWISE_DREG, NFT_REG_1);
                m.put_u32(NFTA_BITWISE_LEN, mask.len() as u32);
                m.nest(NFTA_BITWISE_MASK, |m| m.put(NFTA_DATA_VALUE, mask));
                m.nest(NFTA_BITWISE_XOR, |m| m.put(NFTA_DATA_VALUE, xor));
            }
            Expr::Cmp(op, data) => {
                m.put_u32(NFTA_CMP_SREG, NFT_REG_1);
                m.put_u32(NFTA_CMP_OP, *op);
                m.nest(NFTA_CMP_DATA, |m| m.put(NFTA_DATA_VALUE, data));
            }
            Expr::Ct(key) => {
                m.put_u32(NFTA_CT_DREG, NFT_REG_1);
                m.put_u32(NFTA_CT_KEY, *key);
            }
            Expr::Verdict(code) => {
                m.put_u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                m.nest(NFTA_IMMEDIATE_DATA, |m| {
                    m.nest(NFTA_DATA_VERDICT, |m| m.put_u32(NFTA_VERDICT_CODE, *code));
                });
            }
            Expr::Masq => {}
        }
    }
}

/// A piece of a rule: its `nft` words and its expressions.
type Part = (String, Vec<Expr>);

fn iifname(name: &str) -> Part {
    let exprs = vec![
        Expr::Meta(NFT_META_IIFNAME),
        Expr::Cmp(NFT_CMP_EQ, ifname(name)),
    ];
    (format!("iifname {name}"), exprs)
}

fn oifname_not(name: &str) -> Part {
    let exprs = vec![
        Expr::Meta(NFT_META_OIFNAME),
        Expr::Cmp(NFT_CMP_NEQ, ifname(name)),
    ];
    (format!("oifname != {name}"), exprs)
}

fn saddr_in(network: Ipv4Addr, prefix_len: u8) -> Part {
    let mask = prefix_mask(prefix_len);
    let network = Ipv4Addr::from(u32::from(network) & mask);
    let exprs = vec![
        Expr::payload(NFT_PAYLOAD_NETWORK_HEADER, 12, 4),
        Expr::and(mask.to_be_bytes()),
        Expr::Cmp(NFT_CMP_EQ, network.octets().to_vec()),
    ];
    (format!("ip saddr {network}/{}", prefix_len.min(32)), exprs)
}

fn daddr(addr: Ipv4Addr) -> Part {
    let exprs = vec![
        Expr::payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4),
        Expr::Cmp(NFT_CMP_EQ, addr.octets().to_vec()),
    ];
    (format!("ip daddr {addr}"), exprs)
}

/// A transport protocol: its `nft` word and IP protocol number.
type Proto = (&'static str, u8);
const UDP: Proto = ("udp", 17);
const TCP: Proto = ("tcp", 6);

/// The protocol check first, so the port is read from the right header (UDP and TCP both
/// keep the destination port at offset 2).
fn dport((proto, number): Proto, port: u16) -> Part {
    let exprs = vec![
        Expr::Meta(NFT_META_L4PROTO),
        Expr::Cmp(NFT_CMP_EQ, vec![number]),
        Expr::payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
        Expr::Cmp(NFT_CMP_EQ, port.to_be_bytes().to_vec()),
    ];
    (format!("{proto} dport {port}"), exprs)
}

fn established_related() -> Part {
    let bits = CT_STATE_ESTABLISHED | CT_STATE_RELATED;
    let exprs = vec![
        Expr::Ct(NFT_CT_STATE),
        Expr::and(bits.to_ne_bytes()),
        Expr::Cmp(NFT_CMP_NEQ, 0u32.to_ne_bytes().to_vec()),
    ];
    ("ct state established,related".to_owned(), exprs)
}

fn accept() -> Part {
    ("accept".to_owned(), vec![Expr::Verdict(NF_ACCEPT)])
}

fn drop_packet() -> Part {
    ("drop".to_owned(), vec![Expr::Verdict(NF_DROP)])
}

fn masquerade() -> Part {
    ("masquerade".to_owned(), vec![Expr::Masq])
}

fn rule(chain: &'static str, parts: Vec<Part>) -> Rule {
    let (words, exprs): (Vec<String>, Vec<Vec<Expr>>) = parts.into_iter().unzip();
    Rule {
        chain,
        text: words.join(" "),
        exprs: exprs.concat(),
    }
}

/// A name as the kernel holds it in a register; a longer one than fits could match no
/// interface anyway.
fn ifname(name: &str) -> Vec<u8> {
    let mut bytes = vec![0u8; IFNAMSIZ];
    let n = name.len().min(IFNAMSIZ - 1);
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    bytes
}

fn prefix_mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// The chains and their rules (as parts), in the order they are sent.
fn ruleset(r: &NatRules) -> Vec<(Chain, Vec<Vec<Part>>)> {
    let br = r.bridge.as_str();
    let from_vms = || iifname(br);
    let to_gateway = || daddr(r.gateway);
    let postrouting = Chain {
        name: "postrouting",
        kind: "nat",
        hook: NF_INET_POST_ROUTING,
        priority: 100,
        policy: NF_ACCEPT,
    };
    let forward = Chain {
        name: "forward",
        kind: "filter",
        hook: NF_INET_FORWARD,
        priority: 0,
        policy: NF_DROP,
    };
    let input = Chain {
        name: "input",
        kind: "filter",
        hook: NF_INET_LOCAL_IN,
        priority: 0,
        policy: NF_ACCEPT,
    };
    vec![
        (
            postrouting,
            vec![vec![
                saddr_in(r.network, r.prefix_len),
                oifname_not(br),
                masquerade(),
            ]],
        ),
        (
            forward,
            vec![
                vec![established_related(), accept()],
                // Only the VMs' own addresses: a guest sending from a forged address
                // would otherwise leave un-masqueraded, as if RayOS routed for it.
                vec![
                    from_vms(),
                    saddr_in(r.network, r.prefix_len),
                    oifname_not(br),
                    accept(),
                ],
            ],
        ),
        (
            input,
            vec![
                vec![from_vms(), dport(UDP, 67), accept()],
                vec![from_vms(), to_gateway(), dport(UDP, 53), accept()],
                vec![from_vms(), to_gateway(), dport(TCP, 53), accept()],
                vec![from_vms(), established_related(), accept()],
                vec![from_vms(), drop_packet()],
            ],
        ),
    ]
}

/// The batch, and what each of its inner messages is.
fn build(r: &NatRules, first_seq: u32) -> (Vec<u8>, Vec<Sent>) {
    let mut b = Batch::begin(first_seq);
    // Create (if missing), delete, create: whatever was there, the batch ends with a fresh
    // table, and the kernel swaps it in at commit.
    let tables = [
        (
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            "table `rayos` (create if missing)",
        ),
        (
            NFT_MSG_DELTABLE,
            0,
            "table `rayos` (delete the previous ruleset)",
        ),
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, "table `rayos`"),
    ];
    for (ty, flags, what) in tables {
        let mut m = Msg::nft(ty, flags, b.next_seq(), NFPROTO_IPV4);
        m.put_str(NFTA_TABLE_NAME, TABLE);
        b.push(m, what.to_owned(), "CONFIG_NF_TABLES_IPV4");
    }
    for (chain, rules) in ruleset(r) {
        let m = chain_msg(&chain, b.next_seq());
        b.push(m, chain.what(), chain.needs());
        for parts in rules {
            let rule = rule(chain.name, parts);
            let m = rule_msg(&rule, b.next_seq());
            b.push(m, rule.what(), rule.needs());
        }
    }
    b.end()
}

fn chain_msg(chain: &Chain, seq: u32) -> Msg {
    let mut m = Msg::nft(NFT_MSG_NEWCHAIN, NLM_F_CREATE, seq, NFPROTO_IPV4);
    m.put_str(NFTA_CHAIN_TABLE, TABLE);
    m.put_str(NFTA_CHAIN_NAME, chain.name);
    m.nest(NFTA_CHAIN_HOOK, |m| {
        m.put_u32(NFTA_HOOK_HOOKNUM, chain.hook);
        // The kernel reads it as ntohl() into an int: two's complement, big-endian.
        m.put(NFTA_HOOK_PRIORITY, &chain.priority.to_be_bytes());
    });
    m.put_u32(NFTA_CHAIN_POLICY, chain.policy);
    m.put_str(NFTA_CHAIN_TYPE, chain.kind);
    m
}

fn rule_msg(rule: &Rule, seq: u32) -> Msg {
    let mut m = Msg::nft(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        seq,
        NFPROTO_IPV4,
    );
    m.put_str(NFTA_RULE_TABLE, TABLE);
    m.put_str(NFTA_RULE_CHAIN, rule.chain);
    m.nest(NFTA_RULE_EXPRESSIONS, |m| {
        rule.exprs.iter().for_each(|e| e.encode(m))
    });
    m
}

/// Messages between a BATCH_BEGIN and a BATCH_END: the kernel applies all or none.
struct Batch {
    bytes: Vec<u8>,
    seq: u32,
    sent: Vec<Sent>,
}

impl Batch {
    fn begin(seq: u32) -> Self {
        let bytes = Msg::batch(NFNL_MSG_BATCH_BEGIN, seq).finish();
        Self {
            bytes,
            seq,
            sent: Vec::new(),
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn push(&mut self, m: Msg, what: String, needs: &'static str) {
        self.sent.push(Sent {
            seq: m.seq(),
            what,
            needs,
        });
        self.bytes.extend(m.finish());
    }

    fn end(mut self) -> (Vec<u8>, Vec<Sent>) {
        let seq = self.next_seq();
        self.bytes
            .extend(Msg::batch(NFNL_MSG_BATCH_END, seq).finish());
        (self.bytes, self.sent)
    }
}

/// One netlink message with its nfgenmsg, attributes appended as libmnl lays them out.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(512);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish()
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it in
        buf.extend_from_slice(&[family, NFNETLINK_V0]);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Self { buf }
    }

    /// An nf_tables request; the kernel acknowledges each one.
    fn nft(msg: u16, flags: u16, seq: u32, family: u8) -> Self {
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        Self::new(ty, NLM_F_REQUEST | NLM_F_ACK | flags, seq, family, 0)
    }

    /// The batch's begin or end; `res_id` names the subsystem the batch is for.
    fn batch(ty: u16, seq: u32) -> Self {
        Self::new(ty, NLM_F_REQUEST, seq, AF_UNSPEC, NFNL_SUBSYS_NFTABLES)
    }

    fn seq(&self) -> u32 {
        u32::from_ne_bytes(self.buf[8..12].try_into().expect("4 bytes"))
    }

    fn put(&mut self, ty: u16, payload: &[u8]) {
        self.put_header(ty, NLA_HDRLEN + payload.len());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    /// Integers in nf_tables attributes are big-endian.
    fn put_u32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }

    /// NUL-terminated, as `mnl_attr_put_strz`.
    fn put_str(&mut self, ty: u16, s: &str) {
        self.put_header(ty, NLA_HDRLEN + s.len() + 1);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn nest(&mut self, ty: u16, fill: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.put_header(ty | NLA_F_NESTED, NLA_HDRLEN);
        fill(self);
        let len = attr_len(self.buf.len() - start);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn put_header(&mut self, ty: u16, len: usize) {
        self.buf.extend_from_slice(&attr_len(len).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).expect("netlink message under 4 GiB");
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn attr_len(len: usize) -> u16 {
    // Our attributes are a few hundred bytes at most: names, addresses, short lists.
    u16::try_from(len).expect("netlink attribute under 64 KiB")
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The kernel's answer to one message: the sequence number it answers and its errno (0:
/// done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ack {
    seq: u32,
    errno: i32,
}

/// Every ACK or error in one datagram; other messages are skipped.
fn acks(datagram: &[u8]) -> Vec<Ack> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        let ty = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        // struct nlmsgerr: i32 error, then the header of the message it answers.
        if ty == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 + NLMSG_HDRLEN {
            let error = i32::from_ne_bytes(rest[16..20].try_into().expect("4 bytes"));
            let seq = u32::from_ne_bytes(rest[28..32].try_into().expect("4 bytes"));
            out.push(Ack {
                seq,
                errno: error.saturating_neg(),
            });
        }
        rest = &rest[align4(len).min(rest.len())..];
    }
    out
}

/// Crosses off what one datagram acknowledges; the first refusal is the error (later ones
/// in a batch are mostly its consequences).
fn settle(datagram: &[u8], pending: &mut BTreeMap<u32, Sent>) -> Result<(), NftError> {
    for ack in acks(datagram) {
        if ack.errno == 0 {
            pending.remove(&ack.seq);
        } else {
            return Err(refused(ack, pending.get(&ack.seq)));
        }
    }
    Ok(())
}

/// `sent` is `None` when the kernel refused the batch as a whole (it answers the begin).
fn refused(ack: Ack, sent: Option<&Sent>) -> NftError {
    let (what, needs) = match sent {
        Some(s) => (s.what.clone(), s.needs),
        None => (format!("the batch (seq {})", ack.seq), "CONFIG_NF_TABLES"),
    };
    let hint = match ack.errno {
        libc::EPERM | libc::EACCES => "; does netd have CAP_NET_ADMIN?".to_owned(),
        libc::ENOENT | libc::EOPNOTSUPP | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT => {
            format!("; is {needs} built?")
        }
        _ => String::new(),
    };
    NftError::Refused {
        what,
        errno: ack.errno,
        hint,
    }
}

fn unanswered(pending: &BTreeMap<u32, Sent>, sent: usize) -> NftError {
    let first = pending
        .values()
        .next()
        .map_or_else(String::new, |s| s.what.clone());
    NftError::NoAnswer {
        missing: pending.len(),
        sent,
        first,
    }
}

/// A NETLINK_NETFILTER socket that gives up reading after [`ACK_WAIT_SECS`].
struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Self> {
        let (domain, ty) = (libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC);
        // SAFETY: plain integers in, a descriptor (checked below) out.
        let fd = unsafe { libc::socket(domain, ty, libc::NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it; OwnedFd closes it once.
        let sock = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let timeout = libc::timeval {
            tv_sec: ACK_WAIT_SECS,
            tv_usec: 0,
        };
        let size = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        let opt = (&raw const timeout).cast();
        // SAFETY: `opt` points to a live timeval of exactly `size` bytes for the call.
        let rc = unsafe {
            libc::setsockopt(
                sock.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                opt,
                size,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// The batch must go in one datagram. No address: an unconnected netlink socket sends
    /// to port 0, the kernel.
    fn send(&self, batch: &[u8]) -> io::Result<()> {
        // SAFETY: `batch` is readable for its whole length during the call.
        let n = unsafe { libc::send(self.0.as_raw_fd(), batch.as_ptr().cast(), batch.len(), 0) };
        match usize::try_from(n) {
            Err(_) => Err(io::Error::last_os_error()),
            Ok(n) if n != batch.len() => Err(io::Error::other(format!(
                "sent {n} of {} bytes",
                batch.len()
            ))),
            Ok(_) => Ok(()),
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for its whole length during the call.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    //! The numbers here are typed from the kernel headers, not taken from the module's
    //! constants, so a wrong constant turns a test red.

    use super::*;

    /// One decoded message: header fields, and every leaf attribute by path (`4/1[2]/2/3`:
    /// attribute 4, its third child of type 1, that one's child 2, its child 3). An empty
    /// nest is a leaf with no bytes.
    #[derive(Debug)]
    struct Decoded {
        len: usize,
        ty: u16,
        flags: u16,
        seq: u32,
        family: u8,
        version: u8,
        res_id: [u8; 2],
        attrs: BTreeMap<String, Vec<u8>>,
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn decode_batch(batch: &[u8]) -> Vec<Decoded> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < batch.len() {
            let len = u32_at(batch, off) as usize;
            assert!(len >= 20, "message at {off} shorter than its headers");
            assert_eq!(len % 4, 0, "message at {off} not 4-aligned");
            assert!(
                off + len <= batch.len(),
                "message at {off} runs past the batch"
            );
            let m = &batch[off..off + len];
            let mut attrs = BTreeMap::new();
            flatten(&m[20..], "", &mut attrs);
            out.push(Decoded {
                len,
                ty: u16_at(m, 4),
                flags: u16_at(m, 6),
                seq: u32_at(m, 8),
                family: m[16],
                version: m[17],
                res_id: [m[18], m[19]],
                attrs,
            });
            off += len;
        }
        assert_eq!(off, batch.len());
        out
    }

    fn flatten(mut data: &[u8], prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) {
        let mut attrs = Vec::new();
        while !data.is_empty() {
            assert!(data.len() >= 4, "truncated attribute header");
            let len = usize::from(u16_at(data, 0));
            let raw = u16_at(data, 2);
            assert!(
                (4..=data.len()).contains(&len),
                "bad attribute length {len}"
            );
            let next = (len + 3) & !3;
            assert!(next <= data.len(), "attribute not padded to 4 bytes");
            assert!(data[len..next].iter().all(|&b| b == 0), "padding not zero");
            attrs.push((raw & 0x3fff, raw & 0x8000 != 0, &data[4..len]));
            data = &data[next..];
        }
        for (i, &(ty, nested, payload)) in attrs.iter().enumerate() {
            let same = attrs.iter().filter(|a| a.0 == ty).count();
            let path = if same > 1 {
                let index = attrs[..i].iter().filter(|a| a.0 == ty).count();
                format!("{prefix}{ty}[{index}]")
            } else {
                format!("{prefix}{ty}")
            };
            if nested && !payload.is_empty() {
                flatten(payload, &format!("{path}/"), out);
            } else {
                assert!(
                    out.insert(path.clone(), payload.to_vec()).is_none(),
                    "{path} twice"
                );
            }
        }
    }

    fn be(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }

    fn strz(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn batch() -> (Vec<Decoded>, Vec<(u32, String)>) {
        let (bytes, whats) = ruleset_batch(&NatRules::rayos(), 1000);
        (decode_batch(&bytes), whats)
    }

    /// The message the map names `what`.
    fn message<'a>(msgs: &'a [Decoded], whats: &[(u32, String)], what: &str) -> &'a Decoded {
        let seq = whats
            .iter()
            .find(|(_, w)| w == what)
            .unwrap_or_else(|| panic!("{what}"))
            .0;
        msgs.iter().find(|m| m.seq == seq).unwrap()
    }

    fn get<'a>(m: &'a Decoded, path: &str) -> &'a [u8] {
        m.attrs
            .get(path)
            .unwrap_or_else(|| panic!("no {path} in {:?}", m.attrs.keys()))
    }

    #[test]
    fn attributes_are_padded_to_four_bytes_and_nests_cover_their_children() {
        let mut m = Msg::new(0x0a06, 0, 7, 2, 0);
        m.put(1, b"abc");
        m.put_str(2, "rayos");
        m.nest(3, |m| m.put_u32(1, 0x0102_0304));
        let bytes = m.finish();
        let attrs = &bytes[20..];
        let mut want = Vec::new();
        want.extend([7u16.to_ne_bytes(), 1u16.to_ne_bytes()].concat());
        want.extend(b"abc\0");
        want.extend([10u16.to_ne_bytes(), 2u16.to_ne_bytes()].concat());
        want.extend(b"rayos\0\0\0");
        want.extend([12u16.to_ne_bytes(), 0x8003u16.to_ne_bytes()].concat());
        want.extend([8u16.to_ne_bytes(), 1u16.to_ne_bytes()].concat());
        want.extend([1, 2, 3, 4]);
        assert_eq!(attrs, &want[..]);
        assert_eq!(u32_at(&bytes, 0) as usize, bytes.len());
    }

    #[test]
    fn every_message_length_is_its_nlmsg_len() {
        let (bytes, _) = ruleset_batch(&NatRules::rayos(), 1);
        let msgs = decode_batch(&bytes);
        assert_eq!(msgs.iter().map(|m| m.len).sum::<usize>(), bytes.len());
        assert!(msgs.iter().all(|m| m.version == 0));
    }

    #[test]
    fn batch_is_framed_numbered_and_every_message_is_named() {
        let (msgs, whats) = batch();
        let (first, last) = (&msgs[0], msgs.last().unwrap());
        for (m, ty) in [(first, 0x10), (last, 0x11)] {
            assert_eq!((m.ty, m.flags, m.family, m.res_id), (ty, 0x1, 0, [0, 10]));
            assert!(m.attrs.is_empty());
        }
        let seqs: Vec<u32> = msgs.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1000..1000 + msgs.len() as u32).collect::<Vec<_>>());
        let inner = &msgs[1..msgs.len() - 1];
        assert_eq!(
            whats.iter().map(|w| w.0).collect::<Vec<_>>(),
            seqs[1..seqs.len() - 1]
        );
        let kinds: Vec<(u16, u16)> = inner.iter().map(|m| (m.ty, m.flags)).collect();
        let (newtable, deltable, newchain, newrule) = (
            (0x0a00, 0x405),
            (0x0a02, 0x005),
            (0x0a03, 0x405),
            (0x0a06, 0xc05),
        );
        #[rustfmt::skip]
        let want = [
            newtable, deltable, newtable,
            newchain, newrule,
            newchain, newrule, newrule,
            newchain, newrule, newrule, newrule, newrule, newrule,
        ];
        assert_eq!(kinds, want);
        assert!(inner.iter().all(|m| m.family == 2 && m.res_id == [0, 0]));
    }

    #[test]
    fn the_table_is_created_deleted_and_created_again() {
        let (msgs, whats) = batch();
        for m in &msgs[1..4] {
            assert_eq!(m.attrs.len(), 1);
            assert_eq!(get(m, "1"), strz("rayos"));
        }
        assert_eq!(whats[1].1, "table `rayos` (delete the previous ruleset)");
    }

    #[test]
    fn chains_hook_where_and_how_they_should() {
        let (msgs, _) = batch();
        let chains: Vec<&Decoded> = msgs.iter().filter(|m| m.ty == 0x0a03).collect();
        // (name, hook, priority, policy, type)
        let want = [
            ("postrouting", 4, 100, 1, "nat"),
            ("forward", 2, 0, 0, "filter"),
            ("input", 1, 0, 1, "filter"),
        ];
        assert_eq!(chains.len(), want.len());
        for (m, (name, hook, priority, policy, kind)) in chains.into_iter().zip(want) {
            assert_eq!(get(m, "1"), strz("rayos"));
            assert_eq!(get(m, "3"), strz(name));
            assert_eq!(get(m, "4/1"), be(hook), "{name} hook");
            assert_eq!(get(m, "4/2"), be(priority), "{name} priority");
            assert_eq!(get(m, "5"), be(policy), "{name} policy");
            assert_eq!(get(m, "7"), strz(kind));
            assert_eq!(m.attrs.len(), 6);
        }
    }

    #[test]
    fn priorities_are_twos_complement_big_endian() {
        for (priority, bytes) in [(-100, [0xff, 0xff, 0xff, 0x9c]), (100, [0, 0, 0, 0x64])] {
            let chain = Chain {
                name: "c",
                kind: "filter",
                hook: 1,
                priority,
                policy: 1,
            };
            let msgs = decode_batch(&chain_msg(&chain, 1).finish());
            assert_eq!(get(&msgs[0], "4/2"), bytes);
        }
    }

    #[test]
    fn masquerade_rule_field_by_field() {
        let (msgs, whats) = batch();
        let what = "rule `postrouting: ip saddr 10.73.0.0/24 oifname != rayos-nat masquerade`";
        let m = message(&msgs, &whats, what);
        assert_eq!(get(m, "1"), strz("rayos"));
        assert_eq!(get(m, "2"), strz("postrouting"));
        let e = |i: usize, rest: &str| get(m, &format!("4/1[{i}]/{rest}")).to_vec();
        // payload: network header, offset 12 (saddr), 4 bytes, into reg 1
        assert_eq!(e(0, "1"), strz("payload"));
        assert_eq!(
            [e(0, "2/1"), e(0, "2/2"), e(0, "2/3"), e(0, "2/4")],
            [be(1), be(1), be(12), be(4)]
        );
        // bitwise: reg 1 = reg 1 & ff.ff.ff.00 ^ 0, 4 bytes
        assert_eq!(e(1, "1"), strz("bitwise"));
        assert_eq!(
            [e(1, "2/1"), e(1, "2/2"), e(1, "2/3")],
            [be(1), be(1), be(4)]
        );
        assert_eq!(e(1, "2/4/1"), [0xff, 0xff, 0xff, 0x00]);
        assert_eq!(e(1, "2/5/1"), [0, 0, 0, 0]);
        // cmp eq 10.73.0.0
        assert_eq!(e(2, "1"), strz("cmp"));
        assert_eq!([e(2, "2/1"), e(2, "2/2")], [be(1), be(0)]);
        assert_eq!(e(2, "2/3/1"), [0x0a, 0x49, 0x00, 0x00]);
        // meta oifname into reg 1, cmp neq the 16-byte padded name
        assert_eq!(e(3, "1"), strz("meta"));
        assert_eq!([e(3, "2/1"), e(3, "2/2")], [be(1), be(7)]);
        assert_eq!(e(4, "1"), strz("cmp"));
        assert_eq!([e(4, "2/1"), e(4, "2/2")], [be(1), be(1)]);
        assert_eq!(e(4, "2/3/1"), b"rayos-nat\0\0\0\0\0\0\0");
        // masq: no attributes, an empty data nest
        assert_eq!(e(5, "1"), strz("masq"));
        assert_eq!(e(5, "2"), b"");
        assert!(m.attrs.keys().filter(|k| k.starts_with("4/1[5]")).count() == 2);
        assert!(!m.attrs.contains_key("4/1[6]/1"));
    }

    #[test]
    fn forward_accepts_answers_and_only_traffic_leaving_the_bridge() {
        let (msgs, whats) = batch();
        let m = message(
            &msgs,
            &whats,
            "rule `forward: ct state established,related accept`",
        );
        let e = |i: usize, rest: &str| get(m, &format!("4/1[{i}]/{rest}")).to_vec();
        assert_eq!(e(0, "1"), strz("ct"));
        assert_eq!([e(0, "2/1"), e(0, "2/2")], [be(1), be(0)]);
        assert_eq!(e(1, "1"), strz("bitwise"));
        assert_eq!(e(1, "2/3"), be(4));
        assert_eq!(e(1, "2/4/1"), 6u32.to_ne_bytes());
        assert_eq!(e(1, "2/5/1"), [0; 4]);
        assert_eq!(
            [e(2, "1"), e(2, "2/2"), e(2, "2/3/1")],
            [strz("cmp"), be(1), vec![0; 4]]
        );
        // immediate: verdict register, NF_ACCEPT
        assert_eq!(e(3, "1"), strz("immediate"));
        assert_eq!([e(3, "2/1"), e(3, "2/2/2/1")], [be(0), be(1)]);

        let what =
            "rule `forward: iifname rayos-nat ip saddr 10.73.0.0/24 oifname != rayos-nat accept`";
        let m = message(&msgs, &whats, what);
        let e = |i: usize, rest: &str| get(m, &format!("4/1[{i}]/{rest}")).to_vec();
        assert_eq!(
            [e(0, "2/2"), e(1, "2/2"), e(1, "2/3/1")],
            [be(6), be(0), ifname("rayos-nat")]
        );
        // payload: network header, offset 12 (source address), 4 bytes; masked to the /24
        assert_eq!(
            [e(2, "2/2"), e(2, "2/3"), e(2, "2/4")],
            [be(1), be(12), be(4)]
        );
        assert_eq!(e(3, "2/4/1"), [255, 255, 255, 0]);
        assert_eq!([e(4, "2/2"), e(4, "2/3/1")], [be(0), vec![10, 73, 0, 0]]);
        assert_eq!(
            [e(5, "2/2"), e(6, "2/2"), e(6, "2/3/1")],
            [be(7), be(1), ifname("rayos-nat")]
        );
        assert_eq!(e(7, "2/2/2/1"), be(1));
    }

    #[test]
    fn input_lets_vms_reach_dhcp_and_dns_only() {
        let (msgs, whats) = batch();
        let input: Vec<&str> = whats
            .iter()
            .map(|w| w.1.as_str())
            .filter(|w| w.starts_with("rule `input"))
            .collect();
        assert_eq!(
            input,
            [
                "rule `input: iifname rayos-nat udp dport 67 accept`",
                "rule `input: iifname rayos-nat ip daddr 10.73.0.1 udp dport 53 accept`",
                "rule `input: iifname rayos-nat ip daddr 10.73.0.1 tcp dport 53 accept`",
                "rule `input: iifname rayos-nat ct state established,related accept`",
                "rule `input: iifname rayos-nat drop`",
            ]
        );
        let m = message(&msgs, &whats, input[0]);
        let e = |i: usize, rest: &str| get(m, &format!("4/1[{i}]/{rest}")).to_vec();
        // meta l4proto (16) == 17, then transport header offset 2 len 2 == 67
        assert_eq!([e(2, "1"), e(2, "2/2")], [strz("meta"), be(16)]);
        assert_eq!(e(3, "2/3/1"), [17]);
        assert_eq!(
            [e(4, "1"), e(4, "2/2"), e(4, "2/3"), e(4, "2/4")],
            [strz("payload"), be(2), be(2), be(2)]
        );
        assert_eq!(e(5, "2/3/1"), [0, 67]);

        let m = message(&msgs, &whats, input[2]);
        let e = |i: usize, rest: &str| get(m, &format!("4/1[{i}]/{rest}")).to_vec();
        assert_eq!(
            [e(2, "2/2"), e(2, "2/3"), e(3, "2/3/1")],
            [be(1), be(16), vec![10, 73, 0, 1]]
        );
        assert_eq!([e(5, "2/3/1"), e(7, "2/3/1")], [vec![6], vec![0, 53]]);

        let m = message(&msgs, &whats, input[4]);
        assert_eq!(get(m, "4/1[2]/1"), strz("immediate"));
        assert_eq!(get(m, "4/1[2]/2/2/2/1"), be(0)); // NF_DROP
    }

    #[test]
    fn the_network_is_masked_by_its_prefix() {
        assert_eq!(prefix_mask(24).to_be_bytes(), [0xff, 0xff, 0xff, 0]);
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(32), u32::MAX);
        let (text, exprs) = saddr_in(Ipv4Addr::new(10, 73, 0, 9), 24);
        assert_eq!(text, "ip saddr 10.73.0.0/24");
        assert_eq!(exprs[2], Expr::Cmp(0, vec![10, 73, 0, 0]));
    }

    fn error_message(errno: i32, seq: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(36u32.to_ne_bytes());
        m.extend(2u16.to_ne_bytes()); // NLMSG_ERROR
        m.extend(0x100u16.to_ne_bytes()); // NLM_F_CAPPED
        m.extend(seq.to_ne_bytes());
        m.extend(4242u32.to_ne_bytes());
        m.extend((-errno).to_ne_bytes());
        m.extend(200u32.to_ne_bytes()); // the refused message's header
        m.extend(0x0a06u16.to_ne_bytes());
        m.extend(0xc05u16.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m
    }

    fn pending() -> BTreeMap<u32, Sent> {
        build(&NatRules::rayos(), 1)
            .1
            .into_iter()
            .map(|s| (s.seq, s))
            .collect()
    }

    #[test]
    fn an_error_ack_names_the_message_it_answers() {
        let mut pending = pending();
        let rule =
            "rule `forward: iifname rayos-nat ip saddr 10.73.0.0/24 oifname != rayos-nat accept`";
        let seq = pending.values().find(|s| s.what == rule).unwrap().seq;
        let mut datagram = error_message(0, 2);
        datagram.extend(error_message(95, seq));
        let err = settle(&datagram, &mut pending).unwrap_err();
        assert!(
            !pending.contains_key(&2),
            "the ACK before the error still counts"
        );
        assert!(
            matches!(&err, NftError::Refused { errno: 95, .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.starts_with(&format!(
            "nf_tables refused {rule}: Operation not supported"
        )));
        assert!(text.ends_with("is CONFIG_NF_TABLES built?"), "{text}");
    }

    #[test]
    fn a_refused_batch_without_capability_says_so() {
        let mut pending = pending();
        let err = settle(&error_message(1, 1), &mut pending)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("nf_tables refused the batch (seq 1)"),
            "{err}"
        );
        assert!(err.ends_with("CAP_NET_ADMIN?"), "{err}");
    }

    #[test]
    fn acks_cross_off_and_silence_names_what_is_missing() {
        let mut pending = pending();
        let total = pending.len();
        let datagram: Vec<u8> = (2..=4).flat_map(|seq| error_message(0, seq)).collect();
        settle(&datagram, &mut pending).unwrap();
        assert_eq!(pending.len(), total - 3);
        let err = unanswered(&pending, total).to_string();
        assert!(
            err.contains(&format!("answer {} of {total} messages", total - 3)),
            "{err}"
        );
        assert!(err.ends_with("from chain `postrouting` (type nat priority 100 policy accept)"));
    }

    #[test]
    fn masq_needs_its_own_kernel_option() {
        let mut pending = pending();
        let seq = pending
            .values()
            .find(|s| s.what.contains("masquerade"))
            .unwrap()
            .seq;
        let err = settle(&error_message(2, seq), &mut pending)
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("is CONFIG_NFT_MASQ built?"), "{err}");
    }

    /// libc transcribes the same headers: a second reading of most numbers.
    #[test]
    fn constants_agree_with_libc() {
        let ours: &[(u32, libc::c_int)] = &[
            (NLMSG_ERROR.into(), libc::NLMSG_ERROR),
            (NLM_F_REQUEST.into(), libc::NLM_F_REQUEST),
            (NLM_F_ACK.into(), libc::NLM_F_ACK),
            (NLM_F_CREATE.into(), libc::NLM_F_CREATE),
            (NLM_F_APPEND.into(), libc::NLM_F_APPEND),
            (NLA_F_NESTED.into(), libc::NLA_F_NESTED),
            (NFNL_SUBSYS_NFTABLES.into(), libc::NFNL_SUBSYS_NFTABLES),
            (NFNL_MSG_BATCH_BEGIN.into(), libc::NFNL_MSG_BATCH_BEGIN),
            (NFNL_MSG_BATCH_END.into(), libc::NFNL_MSG_BATCH_END),
            (NFPROTO_IPV4.into(), libc::NFPROTO_IPV4),
            (NFT_MSG_NEWTABLE.into(), libc::NFT_MSG_NEWTABLE),
            (NFT_MSG_DELTABLE.into(), libc::NFT_MSG_DELTABLE),
            (NFT_MSG_NEWCHAIN.into(), libc::NFT_MSG_NEWCHAIN),
            (NFT_MSG_NEWRULE.into(), libc::NFT_MSG_NEWRULE),
            (NF_INET_LOCAL_IN, libc::NF_INET_LOCAL_IN),
            (NF_INET_FORWARD, libc::NF_INET_FORWARD),
            (NF_INET_POST_ROUTING, libc::NF_INET_POST_ROUTING),
            (NF_ACCEPT, libc::NF_ACCEPT),
            (NF_DROP, libc::NF_DROP),
            (NFT_REG_VERDICT, libc::NFT_REG_VERDICT),
            (NFT_CMP_EQ, libc::NFT_CMP_EQ),
            (NFT_REG_1, libc::NFT_REG_1),
            (NFT_META_IIFNAME, libc::NFT_META_IIFNAME),
            (NFT_META_OIFNAME, libc::NFT_META_OIFNAME),
            (NFT_META_L4PROTO, libc::NFT_META_L4PROTO),
            (NFT_CMP_NEQ, libc::NFT_CMP_NEQ),
            (NFT_PAYLOAD_NETWORK_HEADER, libc::NFT_PAYLOAD_NETWORK_HEADER),
            (
                NFT_PAYLOAD_TRANSPORT_HEADER,
                libc::NFT_PAYLOAD_TRANSPORT_HEADER,
            ),
            (NFT_CT_STATE, libc::NFT_CT_STATE),
        ];
        for (i, &(ours, theirs)) in ours.iter().enumerate() {
            assert_eq!(ours as libc::c_int, theirs, "constant #{i}");
        }
    }
}
