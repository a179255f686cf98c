//! rayosd's end of a VMM's supervisor connection (the socketpair made at spawn; the VMM has
//! the other end as `--control-fd 3`, see `vmm/src/events.rs`). One reader task per VMM
//! splits what arrives: answers go to the request that waits for them (matched by id), events
//! go to the VM's task in order, and guest-agent lines also to whoever listens for one (a
//! `GuestScreen` call waiting for its answer).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rayos_proto::agent::LineBuffer;
use rayos_proto::vmm::{from_line, to_line, Answer, Envelope, Event, FromVmm, Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Longest line read from a VMM (a guest-agent line is capped at 64 KiB by the VMM, and
/// escaping can double it); a longer one is dropped.
const MAX_LINE: usize = 256 * 1024;
/// Events waiting for the VM's task; the VMM waits (and a guest flooding its agent port with
/// it) when they are not taken.
const EVENT_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("the VMM's connection is closed")]
    Closed,
    #[error("no answer from the VMM within {0:?}")]
    Timeout(Duration),
    #[error("writing to the VMM: {0}")]
    Write(std::io::Error),
    /// The VMM refused the request; its reason.
    #[error("{0}")]
    Refused(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

pub struct VmmConn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    agent_lines: broadcast::Sender<String>,
    closed: Arc<AtomicBool>,
}

impl VmmConn {
    /// Starts reading `stream`. Events arrive on the returned receiver, which ends when the
    /// VMM closes its end (it exited, or gave up on us).
    pub fn start(stream: UnixStream, vm: &str) -> (Arc<VmmConn>, mpsc::Receiver<Event>) {
        let (mut read, write) = stream.into_split();
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (agent_lines, _) = broadcast::channel(64);
        let conn = Arc::new(VmmConn {
            writer: tokio::sync::Mutex::new(write),
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
            agent_lines: agent_lines.clone(),
            closed: Arc::new(AtomicBool::new(false)),
        });
        let pending = conn.pending.clone();
        let closed = conn.closed.clone();
        let vm = vm.to_string();
        tokio::spawn(async move {
            let mut lines = LineBuffer::new(MAX_LINE);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for line in lines.push(&buf[..n]) {
                    match from_line::<FromVmm>(&line) {
                        Ok(FromVmm::Answer { id, answer }) => {
                            let waiter = pending.lock().unwrap().remove(&id);
                            match waiter {
                                Some(w) => {
                                    let _ = w.send(answer);
                                }
                                None => tracing::warn!("vm {vm}: VMM answer to no request (id {id}): {answer:?}"),
                            }
                        }
                        Ok(FromVmm::Event { event }) => {
                            if let Event::AgentLine { line } = &event {
                                let _ = agent_lines.send(line.clone());
                            }
                            if events_tx.send(event).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!("vm {vm}: unreadable line from the VMM ({e}): {:?}", truncate(&line)),
                    }
                }
            }
            // Whoever still waits for an answer hears that none will come.
            closed.store(true, Ordering::Relaxed);
            pending.lock().unwrap().clear();
        });
        (conn, events_rx)
    }

    /// Sends `req` and waits up to `timeout` for its answer.
    pub async fn request(&self, req: Request, timeout: Duration) -> Result<Reply, ConnError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(ConnError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let line = to_line(&Envelope { id, request: req });
        let work = async {
            self.writer.lock().await.write_all(line.as_bytes()).await.map_err(ConnError::Write)?;
            rx.await.map_err(|_| ConnError::Closed)
        };
        let answer = match tokio::time::timeout(timeout, work).await {
            Ok(a) => a,
            Err(_) => Err(ConnError::Timeout(timeout)),
        };
        self.pending.lock().unwrap().remove(&id);
        answer?.into_result().map_err(ConnError::Refused)
    }

    /// The guest agent's lines from now on.
    pub fn agent_lines(&self) -> broadcast::Receiver<String> {
        self.agent_lines.subscribe()
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayos_proto::vmm::RunState;
    use tokio::io::AsyncBufReadExt;

    #[tokio::test(flavor = "current_thread")]
    async fn answers_find_their_request_and_events_keep_their_order() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (conn, mut events) = VmmConn::start(ours, "t");
        let mut agent = conn.agent_lines();
        // A VMM: events unasked, then the answer to whatever is asked, out of order with them.
        let vmm = tokio::spawn(async move {
            let (r, mut w) = theirs.into_split();
            let mut r = tokio::io::BufReader::new(r).lines();
            let ev = |e| to_line(&FromVmm::Event { event: e });
            w.write_all(ev(Event::Up { name: "t".into(), state: RunState::Running, boot_ms: None }).as_bytes()).await.unwrap();
            w.write_all(b"garbage that is no message\n").await.unwrap();
            let env: Envelope = from_line(&r.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(env.request, Request::Pause);
            w.write_all(ev(Event::AgentLine { line: "heartbeat 1".into() }).as_bytes()).await.unwrap();
            let answer = to_line(&FromVmm::Answer { id: env.id, answer: Answer::ok(Reply::State { state: RunState::Paused }) });
            w.write_all(answer.as_bytes()).await.unwrap();
            let env: Envelope = from_line(&r.next_line().await.unwrap().unwrap()).unwrap();
            let answer = to_line(&FromVmm::Answer { id: env.id, answer: Answer::err("this VM has no display") });
            w.write_all(answer.as_bytes()).await.unwrap();
            // Then it goes silent but stays connected until the test ends.
            while let Ok(Some(_)) = r.next_line().await {}
        });
        assert!(matches!(events.recv().await, Some(Event::Up { .. })));
        let r = conn.request(Request::Pause, Duration::from_secs(2)).await.unwrap();
        assert_eq!(r, Reply::State { state: RunState::Paused });
        assert_eq!(events.recv().await, Some(Event::AgentLine { line: "heartbeat 1".into() }));
        assert_eq!(agent.recv().await.unwrap(), "heartbeat 1");
        let e = conn.request(Request::Display { points: vec![] }, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(&e, ConnError::Refused(r) if r.contains("no display")), "{e}");
        let e = conn.request(Request::Status, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(e, ConnError::Timeout(_)), "{e}");
        vmm.abort();
        let _ = vmm.await;
        assert_eq!(events.recv().await, None, "the events end with the connection");
        let e = conn.request(Request::Status, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(e, ConnError::Closed | ConnError::Write(_)), "{e}");
    }
}
