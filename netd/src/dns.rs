//! The VMs' DNS forwarder: UDP queries to [`NAT_GATEWAY`]:53 are relayed to the uplinks'
//! DNS servers (from their leases) and the answers relayed back. Each query gets its own
//! upstream socket, connected to the server, so an answer can only come from the server
//! asked and only for that query; nothing is cached.
//!
//! What a guest sends is checked only as far as relaying needs (a header, not an answer);
//! the upstream server parses the rest. When no server answers (offline, no lease), the
//! guest gets SERVFAIL at once instead of waiting out its own timeout.
//!
//! [`NAT_GATEWAY`]: rayos_proto::net::NAT_GATEWAY

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// The DNS header's length: anything shorter is not a message.
const HEADER: usize = 12;
/// Largest query or answer relayed (EDNS0's common buffer size).
pub const MAX_MESSAGE: usize = 4096;
/// Queries in flight at once; more are dropped (the guest retries), so a guest flooding the
/// forwarder cannot make netd open sockets without bound.
pub const MAX_IN_FLIGHT: usize = 128;
/// How long one upstream server gets before the next is asked.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many servers are asked for one query.
const MAX_SERVERS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadQuery {
    #[error("{0} bytes: shorter than a DNS header")]
    Short(usize),
    #[error("an answer (QR set), not a query")]
    NotAQuery,
}

/// Checks that `msg` can be relayed as a query.
pub fn check_query(msg: &[u8]) -> Result<(), BadQuery> {
    if msg.len() < HEADER {
        return Err(BadQuery::Short(msg.len()));
    }
    if msg[2] & 0x80 != 0 {
        return Err(BadQuery::NotAQuery);
    }
    Ok(())
}

/// Whether `answer` answers `query`: a whole header, QR set, the same id.
pub fn answers(query: &[u8], answer: &[u8]) -> bool {
    answer.len() >= HEADER && answer[2] & 0x80 != 0 && answer[..2] == query[..2]
}

/// SERVFAIL for `query`: the query itself (its question, and its EDNS record if any) turned
/// into an answer with no records, which resolvers match by id and question.
pub fn servfail(query: &[u8]) -> Vec<u8> {
    let mut a = query.to_vec();
    // QR, the query's opcode and RD kept; RA set; rcode 2 (SERVFAIL).
    a[2] = 0x80 | (query[2] & 0x79);
    a[3] = 0x80 | 2;
    // No answer or authority records (a query has none; a hostile one may claim some).
    a[6..10].fill(0);
    a
}

#[derive(Default)]
pub struct Counters {
    pub answered: AtomicU64,
    pub failed: AtomicU64,
}

/// Serves `sock` (bound to the gateway's port 53) until it fails. `servers` says, at each
/// query, where to ask.
pub async fn serve(
    sock: Arc<UdpSocket>,
    servers: impl Fn() -> Vec<Ipv4Addr> + Send + Sync + 'static,
    counters: Arc<Counters>,
) -> std::io::Result<()> {
    let servers = Arc::new(servers);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut refused_logged = 0u64;
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let query = &buf[..n];
        if n > MAX_MESSAGE {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if let Err(e) = check_query(query) {
            // Said once in a while, not per packet: a guest can send these as fast as it likes.
            if refused_logged.is_power_of_two() {
                warn!("dns: a query from {from} not relayed: {e} ({refused_logged} so far)");
            }
            refused_logged += 1;
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("dns: {MAX_IN_FLIGHT} queries in flight; dropped one from {from}");
            continue;
        };
        let query = query.to_vec();
        let (sock, servers, counters) = (sock.clone(), servers.clone(), counters.clone());
        tokio::spawn(async move {
            let upstream: Vec<SocketAddrV4> = servers()
                .into_iter()
                .map(|s| SocketAddrV4::new(s, 53))
                .collect();
            let answer = match relay(&query, &upstream).await {
                Some(a) => {
                    counters.answered.fetch_add(1, Ordering::Relaxed);
                    a
                }
                None => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    servfail(&query)
                }
            };
            if let Err(e) = sock.send_to(&answer, from).await {
                debug!("dns: answering {from}: {e}");
            }
            drop(slot);
        });
    }
}

/// Asks each server in turn; the first answer to `query`.
async fn relay(query: &[u8], servers: &[SocketAddrV4]) -> Option<Vec<u8>> {
    for server in servers.iter().take(MAX_SERVERS) {
        match ask(query, *server).await {
            Ok(a) => return Some(a),
            Err(e) => debug!("dns: {server}: {e}"),
        }
    }
    None
}

async fn ask(query: &[u8], server: SocketAddrV4) -> std::io::Result<Vec<u8>> {
    let up = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).await?;
    up.connect(SocketAddr::V4(server)).await?;
    up.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, up.recv(&mut buf))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 2 s")
            })??;
        // A stray datagram with another id (a late answer to nothing) is skipped.
        if answers(query, &buf[..n]) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A query for example.com A with an EDNS OPT record, as dig sends it.
    fn query() -> Vec<u8> {
        let mut q = vec![0xbe, 0xef, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1];
        q.extend_from_slice(b"\x07example\x03com\x00\x00\x01\x00\x01");
        q.extend_from_slice(&[0, 0, 0x29, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        q
    }

    #[test]
    fn only_queries_with_a_header_are_relayed() {
        assert_eq!(check_query(&query()), Ok(()));
        assert_eq!(check_query(&[0; 11]), Err(BadQuery::Short(11)));
        let mut a = query();
        a[2] |= 0x80;
        assert_eq!(check_query(&a), Err(BadQuery::NotAQuery));
    }

    #[test]
    fn an_answer_must_carry_the_query_id_and_qr() {
        let q = query();
        let mut a = q.clone();
        assert!(!answers(&q, &a), "a query echoed back is no answer");
        a[2] |= 0x80;
        assert!(answers(&q, &a));
        a[1] ^= 1;
        assert!(!answers(&q, &a), "another id");
        assert!(!answers(&q, &a[..5]));
    }

    #[test]
    fn servfail_keeps_the_question_and_says_servfail() {
        let mut q = query();
        q[6] = 0x12; // a hostile "answer count" in a query
        let a = servfail(&q);
        assert!(answers(&q, &a));
        assert_eq!(a[3] & 0x0f, 2, "rcode SERVFAIL");
        assert_eq!(a[2] & 0x01, 1, "RD kept");
        assert_eq!(&a[4..6], &[0, 1], "one question");
        assert_eq!(&a[6..10], &[0, 0, 0, 0], "no answers claimed");
        assert_eq!(&a[12..], &q[12..], "the question and EDNS record kept");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_query_goes_to_the_first_server_that_answers() {
        // A server on loopback that answers every query: first with a stray id, then right.
        let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let good = match up.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        tokio::spawn(async move {
            let mut b = [0u8; 512];
            loop {
                let (n, from) = up.recv_from(&mut b).await.unwrap();
                b[2] |= 0x80;
                b[0] ^= 0xff;
                up.send_to(&b[..n], from).await.unwrap();
                b[0] ^= 0xff;
                up.send_to(&b[..n], from).await.unwrap();
            }
        });
        // One that never answers: asked first, given up after its timeout.
        let mute = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mute_addr = match mute.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let q = query();
        let a = relay(&q, &[mute_addr, good])
            .await
            .expect("the second server answers");
        assert!(answers(&q, &a));
        assert_eq!(&a[12..], &q[12..]);
        assert_eq!(
            relay(&q, &[]).await,
            None,
            "no server: no answer (the caller says SERVFAIL)"
        );
    }
}
