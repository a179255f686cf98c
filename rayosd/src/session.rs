//! The session preamble in front of the control API's D-Bus stream.
//!
//! Why it exists: over the virtio-serial bridge one byte stream carries one host client after
//! another, and bytes the previous session's server wrote may still be in flight (in the
//! virtqueue or QEMU's chardev) when the next client connects. D-Bus cannot tell them from the
//! new server's answers, so such a client either fails its handshake or waits for ever. So a
//! client opens with a random nonce and takes nothing as the server's until that nonce comes
//! back; what came before it is stale and dropped.
//!
//! Wire format (before any D-Bus byte): client `RAYOS-SESSION <32 hex digits>\r\n`, server
//! `RAYOS-SESSION-OK <the same digits>\r\n`. The server sends nothing more until the client
//! starts D-Bus (a D-Bus server only ever answers), so nothing can follow the answer in the
//! same read. Plain D-Bus clients (`busctl`, `gdbus`) skip the preamble: their first byte is
//! NUL, never `R`, and servers accept both.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const HELLO: &[u8] = b"RAYOS-SESSION ";
pub const ACK: &[u8] = b"RAYOS-SESSION-OK ";
/// The first byte of a preamble; a D-Bus client's first byte is NUL.
pub const FIRST_BYTE: u8 = b'R';
const NONCE_LEN: usize = 32;
/// The longest a hello line can be (prefix, nonce, CRLF).
pub const HELLO_LEN: usize = HELLO.len() + NONCE_LEN + 2;
/// Stale bytes a client drops before it gives up on ever seeing its answer.
const MAX_STALE: usize = 8 << 20;
/// How long a client waits for the next byte of the server's answer. It is per read, so a
/// long stream of stale bytes does not count against it; it ends a session whose hello was
/// lost, rather than waiting for ever.
pub const CLIENT_WAIT: Duration = Duration::from_secs(30);
/// How long a server waits for a connected client's first bytes.
pub const SERVER_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session preamble: {0}")]
    Io(#[from] std::io::Error),
    #[error("session preamble: malformed hello {0:?} (expected `RAYOS-SESSION <32 hex digits>`)")]
    BadHello(String),
    #[error("session preamble: the server closed the connection before answering (is it serving too many clients?)")]
    Closed,
    #[error("session preamble: {0} bytes arrived without the server's answer; is this a RayOS control socket?")]
    NoAnswer(usize),
    #[error("session preamble: no answer from the server within {0:?}")]
    NoAnswerWithin(Duration),
    #[error("session preamble: {0} unexpected bytes after the server's answer")]
    Trailing(usize),
    #[error("session preamble: the client sent nothing within {0:?}")]
    Silent(Duration),
}

/// A fresh random nonce (hex), from the kernel's random pool through uuid.
pub fn new_nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub fn hello_line(nonce: &str) -> Vec<u8> {
    [HELLO, nonce.as_bytes(), b"\r\n"].concat()
}

pub fn ack_line(nonce: &str) -> Vec<u8> {
    [ACK, nonce.as_bytes(), b"\r\n"].concat()
}

/// The nonce of a complete hello line (with its CRLF).
pub fn parse_hello(line: &[u8]) -> Result<&str, SessionError> {
    let bad = || SessionError::BadHello(String::from_utf8_lossy(line).into_owned());
    let nonce = line.strip_prefix(HELLO).and_then(|r| r.strip_suffix(b"\r\n")).ok_or_else(bad)?;
    if nonce.len() != NONCE_LEN || !nonce.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad());
    }
    std::str::from_utf8(nonce).map_err(|_| bad())
}

/// Where `ack` ends in `buf`, if it is there.
fn find_end(buf: &[u8], ack: &[u8]) -> Option<usize> {
    buf.windows(ack.len()).position(|w| w == ack).map(|at| at + ack.len())
}

/// Client side: sends the hello and reads until the server's answer, dropping stale bytes.
pub async fn client_open(stream: &mut tokio::net::UnixStream) -> Result<(), SessionError> {
    let nonce = new_nonce();
    // A server that closes at once (one at its client limit) can do so before the hello is
    // written, or without reading it: the kernel then reports a broken pipe or a reset
    // rather than an end of stream. Either is the server closing before it answered.
    let closed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => SessionError::Closed,
        _ => SessionError::Io(e),
    };
    stream.write_all(&hello_line(&nonce)).await.map_err(closed)?;
    let ack = ack_line(&nonce);
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    let mut total = 0;
    loop {
        let n = tokio::time::timeout(CLIENT_WAIT, stream.read(&mut chunk))
            .await
            .map_err(|_| SessionError::NoAnswerWithin(CLIENT_WAIT))?
            .map_err(closed)?;
        if n == 0 {
            return Err(SessionError::Closed);
        }
        total += n;
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_end(&buf, &ack) {
            if end != buf.len() {
                return Err(SessionError::Trailing(buf.len() - end));
            }
            let stale = end - ack.len();
            if stale > 0 {
                tracing::debug!("session: dropped {stale} stale bytes before the server's answer");
            }
            return Ok(());
        }
        if total > MAX_STALE {
            return Err(SessionError::NoAnswer(total));
        }
        // Keep only what could still hold the start of the answer.
        if buf.len() > 2 * ack.len() + 4096 {
            buf.drain(..buf.len() - ack.len());
        }
    }
}

/// tokio's UnixStream has no `peek`; MSG_PEEK leaves the byte for zbus.
async fn peek(stream: &tokio::net::UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    stream
        .async_io(tokio::io::Interest::READABLE, || recv(fd, buf, MsgFlags::MSG_PEEK).map_err(std::io::Error::from))
        .await
}

/// Server side on a socket: answers a preamble when the client sent one (returns true), or
/// leaves a plain D-Bus client's bytes unread (returns false).
pub async fn server_accept(stream: &mut tokio::net::UnixStream) -> Result<bool, SessionError> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(SERVER_WAIT, peek(stream, &mut first))
        .await
        .map_err(|_| SessionError::Silent(SERVER_WAIT))??;
    if peeked == 0 || first[0] != FIRST_BYTE {
        return Ok(false);
    }
    let mut line = Vec::with_capacity(HELLO_LEN);
    let read_line = async {
        let mut b = [0u8; 1];
        // Byte by byte: the D-Bus handshake that follows must stay in the socket for zbus.
        while !line.ends_with(b"\r\n") && line.len() < HELLO_LEN {
            if stream.read(&mut b).await? == 0 {
                return Err(SessionError::Closed);
            }
            line.push(b[0]);
        }
        Ok(())
    };
    tokio::time::timeout(SERVER_WAIT, read_line).await.map_err(|_| SessionError::Silent(SERVER_WAIT))??;
    let nonce = parse_hello(&line)?.to_string();
    stream.write_all(&ack_line(&nonce)).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_bad_hellos_are_named() {
        let n = new_nonce();
        assert_eq!(n.len(), NONCE_LEN);
        assert_ne!(n, new_nonce());
        assert_eq!(parse_hello(&hello_line(&n)).unwrap(), n);
        for bad in [&b"RAYOS-SESSION 1234\r\n"[..], b"RAYOS-SESSION zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz\r\n", b"HELLO\r\n"] {
            let e = parse_hello(bad).unwrap_err().to_string();
            assert!(e.contains("malformed hello"), "{e}");
        }
    }

    /// The client drops what an earlier session's server left in the stream, even when it
    /// looks like an answer to someone else's nonce.
    #[tokio::test(flavor = "current_thread")]
    async fn client_skips_stale_bytes_and_foreign_answers() {
        let (mut c, mut s) = tokio::net::UnixStream::pair().unwrap();
        let server = tokio::spawn(async move {
            let mut stale = vec![b'l', 4, 1, 1, 0, 0, 0, 0];
            stale.extend(ack_line(&new_nonce()));
            stale.extend(vec![0xa5; 10_000]);
            s.write_all(&stale).await.unwrap();
            assert!(server_accept(&mut s).await.unwrap());
            // What follows the preamble is left for D-Bus.
            let mut rest = [0u8; 5];
            s.read_exact(&mut rest).await.unwrap();
            rest
        });
        client_open(&mut c).await.unwrap();
        c.write_all(b"\0AUTH").await.unwrap();
        assert_eq!(&server.await.unwrap(), b"\0AUTH");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn plain_dbus_clients_pass_untouched_and_garbage_is_refused() {
        let (mut c, mut s) = tokio::net::UnixStream::pair().unwrap();
        c.write_all(b"\0AUTH EXTERNAL").await.unwrap();
        assert!(!server_accept(&mut s).await.unwrap());
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], 0, "the D-Bus NUL byte is left for zbus");

        let (mut c, mut s) = tokio::net::UnixStream::pair().unwrap();
        c.write_all(b"RAYOS-SESSION not-a-nonce\r\n").await.unwrap();
        let e = server_accept(&mut s).await.unwrap_err().to_string();
        assert!(e.contains("malformed hello"), "{e}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_server_that_never_answers_is_an_error_not_a_hang() {
        let (mut c, s) = tokio::net::UnixStream::pair().unwrap();
        drop(s);
        assert!(matches!(client_open(&mut c).await, Err(SessionError::Closed) | Err(SessionError::Io(_))));
    }
}
