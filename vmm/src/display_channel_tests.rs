//! The channel thread driven through a real SOCK_SEQPACKET socketpair, against a real bochs
//! display (on a fake VM whose "dirty log" the tests write) and real virtio-input injectors.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, SockFlag, SockType};
use rayos_proto::display::{Leds, decode_from_vmm, encode_input, encode_to_vmm, FbMode, InputRecord, PixelFormat, TAG_CONTROL};

use super::*;
use crate::devices::display::{BochsDisplay, DEFAULT_FB_SIZE};
use crate::devices::pci::testing::FakeVm;
use crate::devices::pci::{PciMmioWindow, PciRoot};
use crate::devices::virtio::input::{InputKind, VirtioInput};
use crate::devices::virtio::testing::{guest_mem, RecordingIrq, Rings};
use crate::devices::virtio::VirtioDevice;
use crate::devices::BusDevice;

const WINDOW: std::ops::Range<u64> = 0xC000_0000..0xD000_0000;
/// Long enough for anything the thread owes to arrive; only a failing test waits it out.
const WAIT: Duration = Duration::from_secs(3);

struct Rig {
    _root: PciRoot,
    vm: Arc<FakeVm>,
    mmio: PciMmioWindow,
    regs: u64,
    fb_bar: u64,
    comp: OwnedFd,
    keyboard: InputInjector,
    keyboard_dev: VirtioInput,
    thread: Option<JoinHandle<()>>,
}

impl Rig {
    /// A VM with a display and a keyboard (no tablet), its channel served on a thread.
    fn new() -> Rig {
        let vm = Arc::new(FakeVm::default());
        let mut root = PciRoot::new(vm.clone(), WINDOW);
        let dev = BochsDisplay::new(vm.clone(), DEFAULT_FB_SIZE).unwrap();
        let display = Display { framebuffer: dev.framebuffer(), dirty: dev.dirty() };
        let slot = root.add(Box::new(dev)).unwrap();
        let regs = root.bar_address(slot, 2).unwrap().0 - WINDOW.start;
        let fb_bar = root.bar_address(slot, 0).unwrap().0 - WINDOW.start;
        let (keyboard_dev, keyboard) = VirtioInput::new(InputKind::Keyboard, "kbd").unwrap();
        let devices = Attached { keyboard: Some(keyboard.clone()), display: Some(display), ..Attached::default() };
        let (vmm_end, comp) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let thread = Channel::new(vmm_end, &devices).unwrap().spawn().unwrap();
        Rig { mmio: root.mmio_window(), _root: root, vm, regs, fb_bar, comp, keyboard, keyboard_dev, thread: Some(thread) }
    }

    fn dispi(&mut self, index: u64, v: u16) {
        self.mmio.write(self.regs + 0x500 + 2 * index, &v.to_le_bytes());
    }

    /// Linux's bochs_hw_setmode at 32 bpp.
    fn set_mode(&mut self, x: u16, y: u16) {
        for (i, v) in [(4, 0), (3, 32), (1, x), (2, y), (5, 0), (6, x), (8, 0), (9, 0), (4, 0x41)] {
            self.dispi(i, v);
        }
    }

    fn send(&self, datagram: &[u8]) {
        nix::sys::socket::send(self.comp.as_raw_fd(), datagram, MsgFlags::empty()).unwrap();
    }

    /// The next datagram within `wait`, decoded, with the descriptor it carried.
    fn next_within(&self, wait: Duration) -> Option<(FromVmm, Option<OwnedFd>)> {
        let mut fds = [PollFd::new(self.comp.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::try_from(wait).unwrap()).unwrap() == 0 {
            return None;
        }
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(self.comp.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
        let mut fd = None;
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: the kernel just installed this descriptor for us.
                fd = v.first().map(|f| unsafe { OwnedFd::from_raw_fd(*f) });
            }
        }
        let n = msg.bytes;
        Some((decode_from_vmm(&buf[..n]).unwrap(), fd))
    }

    fn next(&self) -> (FromVmm, Option<OwnedFd>) {
        self.next_within(WAIT).expect("a datagram from the VMM")
    }

    fn attach(&self) -> (u64, Option<FbMode>, OwnedFd) {
        self.send(&encode_to_vmm(&ToVmm::Attach));
        let (msg, fd) = self.next();
        let FromVmm::Framebuffer { size, mode } = msg else { panic!("expected the framebuffer, got {msg:?}") };
        assert_eq!(self.next().0, FromVmm::Leds(Leds { num: false, caps: false, scroll: false }), "then the LEDs");
        (size, mode, fd.expect("the memfd rides along"))
    }
}

fn wait_queued(inj: &InputInjector, n: usize) -> Vec<InputEvent> {
    crate::devices::virtio::testing::wait_for(|| inj.queued().len() >= n);
    inj.queued()
}

#[test]
fn attach_hands_over_the_framebuffer_read_only_with_its_mode() {
    let mut rig = Rig::new();
    rig.set_mode(1024, 768);
    // A pixel the guest wrote (through the trapped BAR path the fake VM uses).
    rig.mmio.write(rig.fb_bar + 4096 * 5 + 8, &0x00ab_cdefu32.to_le_bytes());
    let (size, mode, fd) = rig.attach();
    assert_eq!(size, DEFAULT_FB_SIZE);
    assert_eq!(mode, Some(FbMode { width: 1024, height: 768, stride: 4096, offset: 0, format: PixelFormat::Xrgb8888 }));
    // SAFETY: mapping the received memfd read-only; unmapped below.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), size as usize, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
    assert_ne!(p, libc::MAP_FAILED, "{}", io::Error::last_os_error());
    // SAFETY: reading inside the mapping.
    let px = unsafe { p.cast::<u8>().add(4096 * 5 + 8).cast::<u32>().read_unaligned() };
    assert_eq!(px, 0x00ab_cdef, "the compositor sees the guest's pixel");
    // SAFETY: unmapping what was mapped above.
    unsafe { libc::munmap(p, size as usize) };
    // SAFETY: as above, with write access: refused on a read-only descriptor.
    let w = unsafe {
        libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    assert_eq!(w, libc::MAP_FAILED, "the compositor cannot write the guest's framebuffer");
    // A second Attach (a restarted compositor) gets it again.
    let (_, mode2, _) = rig.attach();
    assert_eq!(mode2, mode);
}

#[test]
fn input_reaches_the_injector_and_only_input_kinds_pass() {
    let rig = Rig::new();
    let a = [InputRecord::key(30, true), InputRecord::syn()];
    rig.send(&encode_input(InputTarget::Keyboard, &a));
    assert_eq!(wait_queued(&rig.keyboard, 2), a);
    // An LED record (0x11) or a force-feedback one (0x15) is not input: dropped, the rest kept.
    let (led, ff) = (InputRecord { kind: 0x11, code: 1, value: 1 }, InputRecord { kind: 0x15, code: 0, value: 0 });
    let mixed = [led, InputRecord::key(30, false), ff, InputRecord::syn()];
    rig.send(&encode_input(InputTarget::Keyboard, &mixed));
    assert_eq!(wait_queued(&rig.keyboard, 4)[2..], [InputRecord::key(30, false), InputRecord::syn()]);
    // No tablet in this VM: dropped, and the channel goes on.
    rig.send(&encode_input(InputTarget::Tablet, &[InputRecord::abs(0, 5), InputRecord::syn()]));
    rig.send(&encode_input(InputTarget::Keyboard, &[InputRecord { kind: EV_MSC, code: 4, value: 0x1e }]));
    assert_eq!(wait_queued(&rig.keyboard, 5)[4], InputRecord { kind: EV_MSC, code: 4, value: 0x1e });
    assert_eq!(rig.keyboard.queued().len(), 5);
}

#[test]
fn hostile_datagrams_are_survived() {
    let rig = Rig::new();
    let mut too_long = TAG_CONTROL.to_le_bytes().to_vec();
    too_long.resize(MAX_DATAGRAM + 100, b' ');
    let garbage: [&[u8]; 7] = [
        b"",
        &[1, 0],
        &[9, 0, 0, 0],
        &[1, 0, 0, 0, 7, 0, 0, 0],
        &[1, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3],
        b"\x02\0\0\0{\"msg\":\"format_disk\"}",
        &too_long,
    ];
    for g in garbage {
        rig.send(g);
    }
    // A descriptor pushed along with a control message changes nothing about it.
    let stray = File::open("/proc/self/status").unwrap();
    let fds = [stray.as_raw_fd()];
    let hide = encode_to_vmm(&ToVmm::Shown { shown: false });
    sendmsg::<()>(rig.comp.as_raw_fd(), &[IoSlice::new(&hide)], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).unwrap();
    // Still serving, in order: the answer to an Attach sent after all that.
    let (size, _, _) = rig.attach();
    assert_eq!(size, DEFAULT_FB_SIZE);
    rig.send(&encode_input(InputTarget::Keyboard, &[InputRecord::key(1, true)]));
    assert_eq!(wait_queued(&rig.keyboard, 1), [InputRecord::key(1, true)]);
}

#[test]
fn while_shown_writes_become_damage_and_mode_changes_mode_hidden_nothing() {
    let mut rig = Rig::new();
    rig.set_mode(1024, 768);
    rig.attach();
    rig.send(&encode_to_vmm(&ToVmm::Shown { shown: true }));
    assert_eq!(rig.next().0, FromVmm::Damage { y0: 0, y1: 768 }, "shown: all of it once");
    // Guest writes to pages 10 and 12 (one line per page at 1024x768x4).
    rig.vm.guest_writes(&[10, 12]);
    assert_eq!(rig.next().0, FromVmm::Damage { y0: 10, y1: 13 });
    // Writes off screen (the back buffer) are no damage; a page flip is a mode change.
    rig.vm.guest_writes(&[900]);
    assert!(rig.next_within(Duration::from_millis(100)).is_none(), "no damage for the back buffer");
    rig.dispi(9, 768);
    let FromVmm::Mode { mode: Some(m) } = rig.next().0 else { panic!("expected the new mode") };
    assert_eq!(m.offset, 768 * 4096);
    rig.vm.guest_writes(&[768 + 2]);
    assert_eq!(rig.next().0, FromVmm::Damage { y0: 2, y1: 3 }, "lines of the flipped-to buffer");
    // Hidden: no damage and no mode, however much is written.
    rig.send(&encode_to_vmm(&ToVmm::Shown { shown: false }));
    std::thread::sleep(Duration::from_millis(50));
    rig.vm.guest_writes(&[1, 2, 3]);
    rig.set_mode(800, 600);
    assert!(rig.next_within(Duration::from_millis(200)).is_none(), "nothing while hidden");
    // The next thing said is the answer to what is asked next, not a late damage.
    let (_, mode, _) = rig.attach();
    assert_eq!(mode.map(|m| m.width), Some(800));
}

#[test]
fn the_guests_keyboard_leds_are_forwarded() {
    let mut rig = Rig::new();
    rig.attach();
    let mem = guest_mem();
    let rings = Rings::new(&mem, 2, 16);
    let features = crate::devices::virtio::features::VERSION_1;
    rig.keyboard_dev.activate(rings.context(&mem, Arc::new(RecordingIrq::default()), features)).unwrap();
    // Linux's virtinput_status: caps lock on, then num lock on.
    let status = [InputEvent { kind: 0x11, code: 1, value: 1 }, InputEvent { kind: 0x11, code: 0, value: 1 }, InputEvent::syn()];
    rings.send_each(&mem, 1, &status.map(InputEvent::to_bytes));
    // One or two messages (the thread may wake between the two events); the last is the state.
    let mut last = rig.next().0;
    while let Some((m, _)) = rig.next_within(Duration::from_millis(100)) {
        last = m;
    }
    assert_eq!(last, FromVmm::Leds(Leds { num: true, caps: true, scroll: false }));
    rig.keyboard_dev.reset();
}

#[test]
fn the_thread_ends_when_the_compositor_end_is_closed() {
    let mut rig = Rig::new();
    let t = rig.thread.take().unwrap();
    drop(std::mem::replace(&mut rig.comp, File::open("/dev/null").unwrap().into()));
    assert!(crate::devices::virtio::testing::wait_for(|| t.is_finished()), "the thread ended");
    t.join().unwrap();
}

#[test]
fn set_up_refuses_what_is_not_a_display_channel() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let e = from_fd(a.as_raw_fd()).unwrap_err().to_string();
    assert!(e.contains("--display-fd") && e.contains("SOCK_SEQPACKET"), "{e}");
    let f = File::open("/proc/self/status").unwrap();
    assert!(matches!(from_fd(f.as_raw_fd()), Err(SetupError::NotSeqpacket { .. })));
    assert!(matches!(from_fd(987_654), Err(SetupError::NotOpen { .. })));
    let (s, _peer) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::empty()).unwrap();
    let e = Channel::new(s, &Attached::default()).err().unwrap().to_string();
    assert_eq!(e, "--display-fd: this VM has no display (spec: display)");
}
