//! The per-device worker thread: an epoll loop over the device's queue eventfds (and any
//! backend fds such as a tap or socket), stopped through a kill eventfd on reset.

use std::io;
use std::os::fd::RawFd;
use std::thread::JoinHandle;

use tracing::{error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const KILL_TOKEN: u64 = u64::MAX;

/// Lets a handler change what the loop waits on (e.g. stop polling a socket while the guest
/// has no receive buffers, so a readable socket does not spin the thread).
pub struct EpollCtl<'a> {
    epoll: &'a Epoll,
}

impl EpollCtl<'_> {
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
    }
    /// Register `fd` for `events` (add), change its events (modify), or drop it (`events`
    /// empty), given what it is registered for now (`current`).
    pub fn set(&self, fd: RawFd, token: u64, current: EventSet, events: EventSet) -> io::Result<()> {
        if current == events {
            return Ok(());
        }
        if events.is_empty() {
            return self.remove(fd);
        }
        let op = if current.is_empty() { ControlOperation::Add } else { ControlOperation::Modify };
        self.epoll.ctl(op, fd, EpollEvent::new(events, token))
    }
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// Device-side event handling run on the worker thread.
pub trait WorkerHandler: Send + 'static {
    /// `token` is the value an fd was registered with; `events` its ready set.
    fn handle(&mut self, token: u64, events: EventSet, ctl: &EpollCtl<'_>);
}

/// A running worker; dropping it stops the thread.
pub struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start thread `name` watching `fds` (fd, token) for input and calling `handler`.
    /// The fds must stay open while the worker runs (the handler usually owns them).
    pub fn spawn<H: WorkerHandler>(name: &str, fds: &[(RawFd, u64)], mut handler: H) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let kill = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(ControlOperation::Add, kill.as_raw_fd(), EpollEvent::new(EventSet::IN, KILL_TOKEN))?;
        for &(fd, token) in fds {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))?;
        }
        // Workers keep their buffers on the heap; a small stack keeps per-device overhead
        // low (the VMM's memory budget is a few MiB besides guest RAM).
        let thread = std::thread::Builder::new().name(name.to_owned()).stack_size(256 * 1024).spawn(move || {
            let mut events = vec![EpollEvent::default(); 16];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        error!(%e, "virtio worker epoll failed; device stops");
                        return;
                    }
                };
                for ev in &events[..n] {
                    if ev.data() == KILL_TOKEN {
                        return;
                    }
                    handler.handle(ev.data(), ev.event_set(), &EpollCtl { epoll: &epoll });
                }
            }
        })?;
        Ok(Self { kill, thread: Some(thread) })
    }

    /// Stop the thread and wait for it; guest memory is not touched after this returns.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            if let Err(e) = self.kill.write(1) {
                warn!(%e, "cannot signal virtio worker to stop");
            }
            if t.join().is_err() {
                error!("virtio worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Queue notifications from the guest's drivers that device workers took, all devices
/// together. The progress watchdog (`watch` in lib.rs) reads it: a guest whose only activity
/// is virtio I/O (ioeventfds, no exit to the VMM) is still making progress. One VMM process
/// runs one VM, so one counter per process is that VM's.
pub static GUEST_KICKS: AtomicU64 = AtomicU64::new(0);

/// Clear a queue's notification eventfd, counting a notification that was pending in
/// [`GUEST_KICKS`]; a read error (nothing pending on a non-blocking fd) is fine.
pub fn drain(evt: &EventFd) {
    if evt.read().is_ok() {
        GUEST_KICKS.fetch_add(1, Ordering::Relaxed);
    }
}
