//! The display channel (`rayos-vmm --display-fd N`; the wire format and its contract are
//! `rayos_proto::display`): one thread that answers the compositor on a SOCK_SEQPACKET socket.
//!
//! - [`ToVmm::Attach`] is answered with [`FromVmm::Framebuffer`] carrying the framebuffer memfd
//!   (reopened read-only, so a compositor cannot write the guest's pixels) and then the LEDs.
//! - While [`ToVmm::Shown`] is true, every [`TICK`] the thread reads KVM's dirty log of the
//!   framebuffer slot and sends [`FromVmm::Damage`] for the lines written, and
//!   [`FromVmm::Mode`] when the mode's generation moved. Hidden, it only waits in `poll`.
//! - Input datagrams go to the keyboard's or the tablet's injector; only SYN, KEY, REL, ABS and
//!   MSC records pass.
//! - The guest's keyboard LEDs go out as [`FromVmm::Leds`] when they change.
//!
//! Nothing the compositor sends can stop the thread or the VM: a malformed datagram, input for
//! a device the VM lacks or a record of another kind is a rate-limited warning, and the next
//! datagram is read as usual. Sends never block: what cannot go out yet (a compositor that does
//! not read) is kept, merged (damage ranges join, the newest mode and LEDs win) and sent when
//! the socket is writable. Only the peer closing (EOF, or EPIPE on a send) ends the thread;
//! rayosd keeps its own copy of the other end, so that is only seen in tests.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, sendmsg, ControlMessage, MsgFlags};
use rayos_proto::display::{decode_to_vmm, encode_from_vmm, ChannelError, FromVmm, InputTarget, ToVmm, VmmInbound, MAX_DATAGRAM};

use crate::attach::{Attached, Display};
use crate::devices::display::{damaged_lines, FbMode};
use crate::devices::virtio::input::{InputEvent, InputInjector, EV_ABS, EV_KEY, EV_MSC, EV_REL, EV_SYN};
use crate::ratelimit::RateLimit;

/// How often the framebuffer is checked for writes while shown (60 Hz).
pub const TICK: Duration = Duration::from_millis(16);
/// Datagrams read per wake-up before the tick and the sends get their turn.
const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--display-fd {fd}: not an open descriptor: {source}")]
    NotOpen { fd: RawFd, source: io::Error },
    #[error("--display-fd {fd}: not a unix SOCK_SEQPACKET socket (give one end of socketpair(AF_UNIX, SOCK_SEQPACKET))")]
    NotSeqpacket { fd: RawFd },
    #[error("--display-fd: this VM has no display (spec: display)")]
    NoDisplay,
    #[error("display channel: reopening the framebuffer read-only for the compositor: {0}")]
    ReadOnly(io::Error),
    #[error("display channel: starting its thread: {0}")]
    Spawn(io::Error),
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which we own; a bad fd only fails.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
    if r == 0 { Ok(v) } else { Err(io::Error::last_os_error()) }
}

/// Takes over the compositor's channel end handed to us as fd `fd`: checked to be a unix
/// SOCK_SEQPACKET socket (datagrams are whole messages) and marked close-on-exec.
pub fn from_fd(fd: RawFd) -> Result<OwnedFd, SetupError> {
    // SAFETY: F_GETFD only queries a descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(SetupError::NotOpen { fd, source: io::Error::last_os_error() });
    }
    let seqpacket = sockopt(fd, libc::SO_TYPE).is_ok_and(|t| t == libc::SOCK_SEQPACKET)
        && sockopt(fd, libc::SO_DOMAIN).is_ok_and(|d| d == libc::AF_UNIX);
    if !seqpacket {
        return Err(SetupError::NotSeqpacket { fd });
    }
    // SAFETY: fcntl on a descriptor checked open above.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the fd is an open socket that nothing else in this process owns: the parent
    // passed it for us alone, and main removes it from the fds isolation closes.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `tracing::warn!` for what the compositor causes, at most a few lines a second per call
/// site (see [`crate::ratelimit`]): a buggy compositor must not flood rayosd's log.
macro_rules! peer_warn {
    ($($arg:tt)+) => {{
        static LIMIT: RateLimit = RateLimit::new();
        if let Some(suppressed) = LIMIT.allow(Instant::now()) {
            if suppressed > 0 {
                tracing::warn!(suppressed, "{} more display-channel warnings like the next were suppressed", suppressed);
            }
            tracing::warn!($($arg)+);
        }
    }};
}

/// What is waiting to go to the compositor (sent in this order when the socket takes it).
#[derive(Default)]
struct Outbox {
    framebuffer: bool,
    mode: bool,
    leds: Option<FromVmm>,
    damage: Option<(u32, u32)>,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        !self.framebuffer && !self.mode && self.leds.is_none() && self.damage.is_none()
    }

    fn add_damage(&mut self, (y0, y1): (u32, u32)) {
        self.damage = Some(self.damage.map_or((y0, y1), |(a, b)| (a.min(y0), b.max(y1))));
    }
}

/// The peer is gone (EOF or EPIPE): nothing more can be said on this socket.
struct Gone;

/// One VM's end of the display channel; [`Channel::spawn`] serves it on its own thread.
pub struct Channel {
    sock: OwnedFd,
    display: Display,
    /// The memfd reopened O_RDONLY: what the compositor gets. Opened at set-up, through
    /// /proc/self/fd, which the isolated VMM (another uid, not dumpable) could not.
    fb_read_only: File,
    keyboard: Option<InputInjector>,
    tablet: Option<InputInjector>,
    attached: bool,
    shown: bool,
    next_tick: Option<Instant>,
    /// The framebuffer generation whose mode the compositor was last sent.
    sent_generation: u64,
    out: Outbox,
}

impl Channel {
    /// The channel for `devices` (which must have a display; input devices are optional).
    pub fn new(sock: OwnedFd, devices: &Attached) -> Result<Self, SetupError> {
        let display = devices.display.as_ref().ok_or(SetupError::NoDisplay)?;
        let path = format!("/proc/self/fd/{}", display.framebuffer.fd().as_raw_fd());
        let fb_read_only = File::open(path).map_err(SetupError::ReadOnly)?;
        Ok(Channel {
            sock,
            display: display.clone(),
            fb_read_only,
            keyboard: devices.keyboard.clone(),
            tablet: devices.tablet.clone(),
            attached: false,
            shown: false,
            next_tick: None,
            sent_generation: 0,
            out: Outbox::default(),
        })
    }

    /// Serves the channel on a thread named `display` until the peer is gone.
    pub fn spawn(self) -> Result<JoinHandle<()>, SetupError> {
        std::thread::Builder::new().name("display".into()).spawn(move || self.run()).map_err(SetupError::Spawn)
    }

    fn run(mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let leds = self.keyboard.clone();
        loop {
            let timeout = match self.next_tick {
                // Rounded up: waking early would only spin until the deadline.
                Some(t) => {
                    let ms = t.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000);
                    PollTimeout::from(ms.min(1000) as u16)
                }
                None => PollTimeout::NONE,
            };
            let mut want = PollFlags::POLLIN;
            if self.attached && !self.out.is_empty() {
                want |= PollFlags::POLLOUT;
            }
            let mut fds = vec![PollFd::new(self.sock.as_fd(), want)];
            if let Some(k) = &leds {
                // SAFETY: the eventfd lives in the injector, which outlives this poll.
                let fd = unsafe { BorrowedFd::borrow_raw(k.leds_changed().as_raw_fd()) };
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("display channel: poll: {e}; channel closed");
                    return;
                }
            }
            let sock_ev = fds[0].revents().unwrap_or(PollFlags::empty());
            let led_ev = fds.get(1).and_then(|f| f.revents()).unwrap_or(PollFlags::empty());
            drop(fds);
            if sock_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                && self.read_batch(&mut buf, sock_ev.contains(PollFlags::POLLHUP)).is_err()
            {
                break;
            }
            if led_ev.contains(PollFlags::POLLIN) {
                if let Some(k) = &leds {
                    // Re-arm first, then read the state: a change in between is not lost.
                    let _ = k.leds_changed().read();
                    if self.attached {
                        let l = k.leds();
                        self.out.leds = Some(FromVmm::Leds(l));
                    }
                }
            }
            if self.next_tick.is_some_and(|t| Instant::now() >= t) {
                self.tick();
            }
            if self.flush().is_err() {
                break;
            }
        }
        tracing::info!("display channel: the compositor's end is closed; channel thread ends");
    }

    /// Reads up to [`BATCH`] datagrams (fewer when none is left).
    fn read_batch(&mut self, buf: &mut [u8], hangup: bool) -> Result<(), Gone> {
        for _ in 0..BATCH {
            // MSG_TRUNC: the datagram's real length, so an oversized one is refused, not cut.
            match recv(self.sock.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC) {
                Ok(0) if hangup => return Err(Gone),
                Ok(n) if n > buf.len() => peer_warn!("{}; dropped", ChannelError::TooLong(n)),
                Ok(n) => match decode_to_vmm(&buf[..n]) {
                    Ok(msg) => self.handle(msg),
                    Err(e) => peer_warn!("{e}; dropped"),
                },
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("display channel: recv: {e}");
                    return Err(Gone);
                }
            }
        }
        Ok(())
    }

    fn handle(&mut self, msg: VmmInbound) {
        match msg {
            VmmInbound::Control(ToVmm::Attach) => {
                // A new compositor: whatever the last one was owed is stale.
                self.attached = true;
                self.out = Outbox { framebuffer: true, ..Outbox::default() };
                if let Some(k) = &self.keyboard {
                    let l = k.leds();
                    self.out.leds = Some(FromVmm::Leds(l));
                }
            }
            VmmInbound::Control(ToVmm::Shown { shown }) => {
                self.shown = shown;
                if shown {
                    // What it shows may be old: all of it is damage, then the ticks say what changed.
                    self.next_tick = Some(Instant::now());
                    if let Some(m) = self.display.framebuffer.mode() {
                        self.out.add_damage((0, m.height));
                    }
                } else {
                    self.next_tick = None;
                    self.out.damage = None;
                }
            }
            VmmInbound::Input { target, records } => self.input(target, records),
        }
    }

    fn input(&self, target: InputTarget, records: Vec<InputEvent>) {
        let device = match target {
            InputTarget::Keyboard => &self.keyboard,
            InputTarget::Tablet => &self.tablet,
        };
        let Some(device) = device else {
            peer_warn!("display channel: input for the VM's {target:?}, which it does not have (spec: input); dropped");
            return;
        };
        let n = records.len();
        let pass: Vec<InputEvent> =
            records.into_iter().filter(|r| matches!(r.kind, EV_SYN | EV_KEY | EV_REL | EV_ABS | EV_MSC)).collect();
        if pass.len() != n {
            peer_warn!("display channel: {} input records of a kind other than SYN, KEY, REL, ABS or MSC dropped", n - pass.len());
        }
        if !pass.is_empty() {
            device.inject(&pass);
        }
    }

    /// While shown: the lines written since the last tick, and a changed mode.
    fn tick(&mut self) {
        let now = Instant::now();
        // Steady 60 Hz; after a stall, the next tick is one period away, not a burst.
        self.next_tick = self.next_tick.map(|t| if t + TICK > now { t + TICK } else { now + TICK });
        let fb = &self.display.framebuffer;
        if fb.generation() != self.sent_generation {
            self.out.mode = true;
        }
        let written = self.display.dirty.take();
        if let Some(lines) = fb.mode().and_then(|m: FbMode| damaged_lines(&m, &written)) {
            if self.attached {
                self.out.add_damage(lines);
            }
        }
    }

    /// Sends what waits, in order, until the socket is full.
    fn flush(&mut self) -> Result<(), Gone> {
        if !self.attached {
            return Ok(());
        }
        if self.out.framebuffer {
            // The generation before the mode: a change in between is sent again as Mode.
            let generation = self.display.framebuffer.generation();
            let msg = FromVmm::Framebuffer { size: self.display.framebuffer.size(), mode: self.display.framebuffer.mode() };
            if !self.send(&msg, Some(self.fb_read_only.as_raw_fd()))? {
                return Ok(());
            }
            self.out.framebuffer = false;
            self.out.mode = false;
            self.sent_generation = generation;
        }
        if self.out.mode {
            let generation = self.display.framebuffer.generation();
            if !self.send(&FromVmm::Mode { mode: self.display.framebuffer.mode() }, None)? {
                return Ok(());
            }
            self.out.mode = false;
            self.sent_generation = generation;
        }
        if let Some(leds) = &self.out.leds {
            if !self.send(leds, None)? {
                return Ok(());
            }
            self.out.leds = None;
        }
        if let Some((y0, y1)) = self.out.damage {
            if !self.send(&FromVmm::Damage { y0, y1 }, None)? {
                return Ok(());
            }
            self.out.damage = None;
        }
        Ok(())
    }

    /// Ok(false): the socket is full, try again when it is writable.
    fn send(&self, msg: &FromVmm, fd: Option<RawFd>) -> Result<bool, Gone> {
        let bytes = encode_from_vmm(msg);
        let iov = [IoSlice::new(&bytes)];
        let fds: Vec<RawFd> = fd.into_iter().collect();
        let rights = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        loop {
            match sendmsg::<()>(self.sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL, None) {
                Ok(_) => return Ok(true),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN | Errno::ENOBUFS) => return Ok(false),
                Err(e) => {
                    tracing::warn!("display channel: send: {e}");
                    return Err(Gone);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "display_channel_tests.rs"]
mod tests;
