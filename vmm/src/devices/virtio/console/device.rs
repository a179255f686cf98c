use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::{debug, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::super::chain::{parse_chain, read_segments, total_len, write_segments, DeviceQueue};
use super::super::worker::{drain, EpollCtl, Worker, WorkerHandler};
use super::super::{device_type, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt};
use crate::devices::GuestMemory;

const NAME: &str = "virtio-console";
const F_MULTIPORT: u64 = 1 << 1;
const QUEUE_SIZE: u16 = 256;
/// At most this many bytes move per chain, so one port cannot starve the others.
const MAX_CHUNK: usize = 64 * 1024;
const SOCKET_TOKEN: u64 = 1 << 32;

// Control events (5.3.6.2).
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

const CONTROL_RX: usize = 2;
/// Control messages waiting for driver buffers beyond this are dropped: a driver spamming
/// DEVICE_READY without posting buffers must not grow the VMM without bound.
const MAX_PENDING_CONTROL: usize = 1024;
const CONTROL_TX: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("virtio-console: port name {0:?} is empty or longer than 255 bytes")]
    BadName(String),
    #[error("virtio-console: creating the socket pair for port {name}: {source}")]
    Socket { name: String, source: io::Error },
}

struct PortSpec {
    name: String,
    socket: UnixStream,
    /// Connection state that must outlive a worker paused for a snapshot.
    flags: Arc<PortFlags>,
}

#[derive(Default)]
struct PortFlags {
    guest_open: AtomicBool,
    host_closed: AtomicBool,
}

/// The multiport console device.
pub struct VirtioConsole {
    ports: Vec<PortSpec>,
    queue_sizes: Vec<u16>,
    worker: Option<Worker>,
}

fn rx_queue(port: usize) -> usize {
    if port == 0 { 0 } else { 2 + 2 * port }
}

impl VirtioConsole {
    /// A console with the named ports (ids 1..=n, in order). Returns the device and, per port,
    /// the VMM's end of the byte stream: what the VMM writes there the guest reads from the
    /// port, and what the guest writes comes out of it.
    pub fn new(port_names: &[&str]) -> Result<(Self, Vec<UnixStream>), ConsoleError> {
        let mut ports = Vec::new();
        let mut host_ends = Vec::new();
        for name in port_names {
            if name.is_empty() || name.len() > 255 {
                return Err(ConsoleError::BadName((*name).to_owned()));
            }
            let (ours, theirs) =
                UnixStream::pair().map_err(|source| ConsoleError::Socket { name: (*name).to_owned(), source })?;
            ports.push(PortSpec { name: (*name).to_owned(), socket: ours, flags: Arc::default() });
            host_ends.push(theirs);
        }
        // Queues: port 0 rx/tx, control rx/tx, then rx/tx per port 1..=n.
        let queue_sizes = vec![QUEUE_SIZE; 4 + 2 * ports.len()];
        Ok((Self { ports, queue_sizes, worker: None }, host_ends))
    }

    fn max_nr_ports(&self) -> u32 {
        self.ports.len() as u32 + 1
    }
}

fn control_msg(id: u32, event: u16, value: u16, extra: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + extra.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(extra);
    m
}

struct Port {
    name: String,
    socket: UnixStream,
    flags: Arc<PortFlags>,
    guest_open: bool,
    host_closed: bool,
    /// The guest has no receive buffers posted; stop reading the socket until it does.
    rx_blocked: bool,
    /// Guest output the socket did not take yet (at most one chunk: the transmit queue is
    /// not drained while this is non-empty). Never blocking on the socket keeps a stalled
    /// host reader from hanging the worker, and with it a vCPU resetting the device.
    out: Vec<u8>,
    /// What the socket is registered for in the worker's epoll.
    interest: EventSet,
}

impl Port {
    /// Mirror the connection state into the device, which keeps it across a pause.
    fn publish(&self) {
        self.flags.guest_open.store(self.guest_open, Ordering::SeqCst);
        self.flags.host_closed.store(self.host_closed, Ordering::SeqCst);
    }

    fn wants_input(&self) -> bool {
        self.guest_open && !self.host_closed && !self.rx_blocked
    }

    /// Send as much of `out` as the socket takes now; true when it is all gone.
    fn flush_out(&mut self) -> bool {
        while !self.out.is_empty() {
            // SAFETY: send reads at most out.len() bytes from the valid buffer; MSG_NOSIGNAL
            // turns a closed peer into EPIPE instead of SIGPIPE.
            let n = unsafe {
                libc::send(self.socket.as_raw_fd(), self.out.as_ptr().cast(), self.out.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            };
            if n >= 0 {
                self.out.drain(..n as usize);
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return false,
                _ => {
                    warn!(%e, port = %self.name, "{NAME}: host end gone; dropping guest output");
                    self.host_closed = true;
                    self.publish();
                    self.out.clear();
                }
            }
        }
        true
    }
}

struct ConsoleWorker {
    mem: GuestMemory,
    irq: Arc<dyn VirtioInterrupt>,
    queues: Vec<DeviceQueue>,
    kicks: Vec<EventFd>,
    ports: Vec<Port>,
    pending_control: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl ConsoleWorker {
    /// Port number (1-based) for a data queue index, and whether it is the rx queue.
    fn port_of_queue(q: usize) -> Option<(usize, bool)> {
        (q >= 4).then(|| (q / 2 - 1, q.is_multiple_of(2)))
    }

    fn queue_control(&mut self, msg: Vec<u8>) {
        if self.pending_control.len() >= MAX_PENDING_CONTROL {
            crate::ratelimit::guest_warn!("{NAME}: driver is not taking control messages; dropping one");
            return;
        }
        self.pending_control.push_back(msg);
    }

    fn send_control(&mut self) {
        let mem = self.mem.clone();
        let q = &mut self.queues[CONTROL_RX];
        let mut sent = false;
        while !self.pending_control.is_empty() {
            let Some(chain) = q.pop(&mem, &*self.irq) else { break };
            let p = parse_chain(chain, &mem);
            let msg = self.pending_control.pop_front().unwrap_or_default();
            let n = if p.error.is_none() && total_len(&p.writable) >= msg.len() as u64 {
                write_segments(&mem, &p.writable, 0, &msg)
            } else {
                crate::ratelimit::guest_warn!("{NAME}: control receive buffer unusable or too small; message dropped");
                0
            };
            q.add_used(&mem, p.head, n as u32, &*self.irq);
            sent = true;
        }
        if sent {
            q.notify(&mem, &*self.irq);
        }
    }

    fn handle_control_tx(&mut self, ctl: &EpollCtl<'_>) {
        let mem = self.mem.clone();
        let mut msgs = Vec::new();
        while let Some(chain) = self.queues[CONTROL_TX].pop(&mem, &*self.irq) {
            let p = parse_chain(chain, &mem);
            let mut m = [0u8; 8];
            if p.error.is_none() && read_segments(&mem, &p.readable, 0, &mut m) == 8 {
                msgs.push(m);
            }
            self.queues[CONTROL_TX].add_used(&mem, p.head, 0, &*self.irq);
        }
        self.queues[CONTROL_TX].notify(&mem, &*self.irq);
        for m in msgs {
            let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]) as usize;
            let event = u16::from_le_bytes([m[4], m[5]]);
            let value = u16::from_le_bytes([m[6], m[7]]);
            debug!(id, event, value, "{NAME}: control message from driver");
            match event {
                DEVICE_READY if value == 1 => {
                    for id in 1..=self.ports.len() {
                        self.queue_control(control_msg(id as u32, DEVICE_ADD, 0, &[]));
                    }
                }
                PORT_READY if value == 1 && (1..=self.ports.len()).contains(&id) => {
                    let name = self.ports[id - 1].name.clone();
                    self.queue_control(control_msg(id as u32, PORT_NAME, 0, name.as_bytes()));
                    // The host side is connected from the start; without this the guest's
                    // writes block.
                    let open = u16::from(!self.ports[id - 1].host_closed);
                    self.queue_control(control_msg(id as u32, PORT_OPEN, open, &[]));
                }
                PORT_OPEN if (1..=self.ports.len()).contains(&id) => {
                    self.ports[id - 1].guest_open = value == 1;
                    self.ports[id - 1].publish();
                    self.sync_interest(id, ctl);
                }
                _ => {}
            }
        }
        self.send_control();
    }

    /// Watch the port's socket for input only while the guest has it open with buffers posted
    /// (a readable socket with nowhere to put the data would spin the loop), and for output
    /// space only while guest output is waiting.
    fn sync_interest(&mut self, port: usize, ctl: &EpollCtl<'_>) {
        let p = &mut self.ports[port - 1];
        let mut want = EventSet::empty();
        if p.wants_input() {
            want |= EventSet::IN;
        }
        if !p.out.is_empty() && !p.host_closed {
            want |= EventSet::OUT;
        }
        match ctl.set(p.socket.as_raw_fd(), SOCKET_TOKEN + port as u64, p.interest, want) {
            Ok(()) => p.interest = want,
            Err(e) => warn!(%e, port = %p.name, "{NAME}: cannot watch socket"),
        }
    }

    /// Guest to host: everything the driver queued on the port's transmit queue, as far as
    /// the socket takes it without blocking.
    fn handle_tx(&mut self, port: usize, ctl: &EpollCtl<'_>) {
        let mem = self.mem.clone();
        let q = rx_queue(port) + 1;
        let mut returned = false;
        if self.ports[port - 1].flush_out() {
            while let Some(chain) = self.queues[q].pop(&mem, &*self.irq) {
                let p = parse_chain(chain, &mem);
                let mut n = 0;
                if p.error.is_none() {
                    let len = (total_len(&p.readable) as usize).min(MAX_CHUNK);
                    n = read_segments(&mem, &p.readable, 0, &mut self.buf[..len]);
                }
                // The data is copied out; the buffer goes back to the driver right away.
                self.queues[q].add_used(&mem, p.head, 0, &*self.irq);
                returned = true;
                let st = &mut self.ports[port - 1];
                if !st.host_closed {
                    st.out.extend_from_slice(&self.buf[..n]);
                    if !st.flush_out() {
                        break;
                    }
                }
            }
        }
        if returned {
            self.queues[q].notify(&mem, &*self.irq);
        }
        self.sync_interest(port, ctl);
    }

    /// Host to guest: move socket data into receive buffers while both exist.
    fn handle_rx(&mut self, port: usize, ctl: &EpollCtl<'_>) {
        let mem = self.mem.clone();
        let q = rx_queue(port);
        let mut delivered = false;
        loop {
            if !self.ports[port - 1].wants_input() {
                break;
            }
            let Some(chain) = self.queues[q].pop(&mem, &*self.irq) else {
                // No buffers: stop watching the socket until the driver adds some.
                self.ports[port - 1].rx_blocked = true;
                break;
            };
            let p = parse_chain(chain, &mem);
            if p.error.is_some() {
                self.queues[q].add_used(&mem, p.head, 0, &*self.irq);
                delivered = true;
                continue;
            }
            let len = (total_len(&p.writable) as usize).min(MAX_CHUNK);
            let sock = &self.ports[port - 1].socket;
            // SAFETY: recv writes at most `len` bytes into `self.buf`, which holds MAX_CHUNK.
            let n = unsafe { libc::recv(sock.as_raw_fd(), self.buf.as_mut_ptr().cast(), len, libc::MSG_DONTWAIT) };
            match n {
                n if n > 0 => {
                    let w = write_segments(&mem, &p.writable, 0, &self.buf[..n as usize]);
                    self.queues[q].add_used(&mem, p.head, w as u32, &*self.irq);
                    delivered = true;
                }
                0 => {
                    self.queues[q].undo_pop();
                    let st = &mut self.ports[port - 1];
                    debug!(port = %st.name, "{NAME}: host closed its end");
                    st.host_closed = true;
                    st.publish();
                    self.queue_control(control_msg(port as u32, PORT_OPEN, 0, &[]));
                    self.send_control();
                    break;
                }
                _ => {
                    self.queues[q].undo_pop();
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                        warn!(%e, "{NAME}: socket read failed");
                    }
                    break;
                }
            }
        }
        if delivered {
            self.queues[q].notify(&mem, &*self.irq);
        }
        self.sync_interest(port, ctl);
    }
}

impl WorkerHandler for ConsoleWorker {
    fn handle(&mut self, token: u64, events: EventSet, ctl: &EpollCtl<'_>) {
        if token >= SOCKET_TOKEN {
            let port = (token - SOCKET_TOKEN) as usize;
            if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                self.handle_tx(port, ctl);
            }
            if events.intersects(EventSet::IN | EventSet::HANG_UP) {
                self.handle_rx(port, ctl);
            }
            return;
        }
        let q = token as usize;
        if let Some(k) = self.kicks.get(q) {
            drain(k);
        }
        match q {
            CONTROL_RX => self.send_control(),
            CONTROL_TX => self.handle_control_tx(ctl),
            _ => match Self::port_of_queue(q) {
                Some((port, true)) if port <= self.ports.len() => {
                    // New receive buffers: resume reading the socket.
                    self.ports[port - 1].rx_blocked = false;
                    self.handle_rx(port, ctl);
                }
                Some((port, false)) if port <= self.ports.len() => self.handle_tx(port, ctl),
                // Port 0 is never added; drain anything a confused driver puts there.
                _ => {}
            },
        }
    }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }
    fn name(&self) -> &'static str {
        NAME
    }
    fn features(&self) -> u64 {
        F_MULTIPORT
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn pci_class(&self) -> u32 {
        0x07_80_00
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (unused without F_SIZE), max_nr_ports, emerg_wr.
        let mut img = [0u8; 12];
        img[4..8].copy_from_slice(&self.max_nr_ports().to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = img.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive { device: NAME });
        }
        if ctx.acked_features & F_MULTIPORT == 0 {
            // Without multiport only port 0 exists, which we do not offer: nothing to run.
            crate::ratelimit::guest_warn!("{NAME}: driver did not accept MULTIPORT; named ports unavailable");
        }
        if ctx.acked_features & F_MULTIPORT != 0 {
            ctx.expect_queues(NAME, self.queue_sizes.len())?;
        }
        let worker_err = |source| ActivateError::Worker { device: NAME, source };
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        let mut fds = Vec::new();
        for (i, aq) in ctx.queues.into_iter().enumerate() {
            fds.push((aq.event.as_raw_fd(), i as u64));
            queues.push(DeviceQueue::new(aq.queue, aq.index));
            kicks.push(aq.event);
        }
        let mut ports = Vec::new();
        for (i, p) in self.ports.iter().enumerate() {
            let socket = p.socket.try_clone().map_err(worker_err)?;
            let guest_open = p.flags.guest_open.load(Ordering::SeqCst);
            let host_closed = p.flags.host_closed.load(Ordering::SeqCst);
            // A port the guest already had open (resumed after a snapshot) is read at once.
            let mut interest = EventSet::empty();
            if guest_open && !host_closed {
                fds.push((socket.as_raw_fd(), SOCKET_TOKEN + i as u64 + 1));
                interest = EventSet::IN;
            }
            ports.push(Port {
                name: p.name.clone(),
                socket,
                flags: p.flags.clone(),
                guest_open,
                host_closed,
                rx_blocked: false,
                out: Vec::new(),
                interest,
            });
        }
        if queues.len() < 4 {
            // Single-port mode: nothing of ours to serve.
            return Ok(());
        }
        let w = ConsoleWorker {
            mem: ctx.mem,
            irq: ctx.interrupt,
            queues,
            kicks,
            ports,
            pending_control: VecDeque::new(),
            buf: vec![0; MAX_CHUNK],
        };
        self.worker = Some(Worker::spawn(NAME, &fds, w).map_err(worker_err)?);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
        // A new driver starts with every port closed.
        for p in &self.ports {
            p.flags.guest_open.store(false, Ordering::SeqCst);
        }
    }

    fn pause(&mut self) {
        self.worker = None;
    }

    fn save_state(&self) -> serde_json::Value {
        let open: Vec<bool> = self.ports.iter().map(|p| p.flags.guest_open.load(Ordering::SeqCst)).collect();
        serde_json::json!({ "guest_open": open })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let open: Vec<bool> = serde_json::from_value(state.get("guest_open").cloned().unwrap_or_default())
            .map_err(|e| format!("{NAME} state: {e}"))?;
        if open.len() != self.ports.len() {
            return Err(format!("{NAME}: saved {} ports, device has {}", open.len(), self.ports.len()));
        }
        for (p, o) in self.ports.iter().zip(open) {
            p.flags.guest_open.store(o, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
